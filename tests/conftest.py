"""Shared fixtures: a small trained model folder, saved as users would save it."""

import numpy as np
import pytest
import torch

import scrnalf_hf
from scrnalf_hf import ScrnaLongformerConfig, ScrnaLongformerForCellClassification, ScrnaLongformerProcessor

N_GENES = 60


def synthetic_counts(n_cells: int = 90, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Integer counts for 3 cell types whose marker genes differ; returns counts, labels, genes."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n_cells) % 3
    rates = np.full((3, N_GENES), 1.0)
    for cell_type in range(3):
        rates[cell_type, cell_type * 10 : cell_type * 10 + 10] = 12.0
    counts = rng.poisson(rates[labels]).astype(np.float32)
    return counts, labels, [f"GENE{i}" for i in range(N_GENES)]


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
