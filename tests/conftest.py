"""Shared fixtures: a small trained model folder, saved as users would save it."""

import numpy as np
import pytest
import torch
from helpers import synthetic_counts

import scrnalf_hf  # noqa: F401  (registers the Auto classes before any test loads a model)
from scrnalf_hf import ScrnaLongformerConfig, ScrnaLongformerForCellClassification, ScrnaLongformerProcessor

N_GENES = 60


@pytest.fixture(scope="session")
def trained_tiny_folder(tmp_path_factory):
    """A tiny classifier trained for a few steps on synthetic counts, saved with its processor.

    Returns the folder; it also holds ``inputs.npz`` (counts and gene names) for reloading tests.
    """
    torch.manual_seed(0)
    counts, labels, genes = synthetic_counts()
    processor = ScrnaLongformerProcessor(gene_symbols=genes)
    batch = processor(counts, gene_names=genes)
    config = ScrnaLongformerConfig.from_preset(
        "tiny", n_genes=N_GENES, knn_k=8, id2label={0: "alpha", 1: "beta", 2: "gamma"}
    )
    model = ScrnaLongformerForCellClassification(config)
    model.scrna_longformer.set_gene_graph(processor.build_gene_graph(batch["expression"], k=config.knn_k))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    target = torch.from_numpy(labels)
    for _ in range(10):
        optimizer.zero_grad()
        model(**batch, labels=target).loss.backward()
        optimizer.step()
    folder = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    np.savez(folder / "inputs.npz", counts=counts, genes=np.array(genes))
    return folder


def pytest_addoption(parser):
    parser.addoption(
        "--bad-inputs-report", default=None, metavar="PATH",
        help="write the table of tests/test_bad_inputs.py (every bad input and what the user gets) to PATH, "
        "e.g. docs/bad_inputs.md",
    )
