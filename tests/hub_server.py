"""Fixtures for the Hub tests: a local Hub server that this process and child processes talk to,
and a tiny cell classifier trained for a few steps with the files a training run leaves.

Import the fixtures into a test module with ``from hub_server import local_hub, tiny_run``.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import constants

from scrnalf_hf import ScrnaLongformerConfig, ScrnaLongformerForCellClassification, ScrnaLongformerProcessor
from scrnalf_hf.testing import LocalHub

WRITE_TOKEN = "hf_local_write_org"
OTHER_TOKEN = "hf_local_write_someone_else"
TOKENS = {WRITE_TOKEN: ["alice", "org"], OTHER_TOKEN: ["mallory"]}
N_GENES = 24
LABELS = ("B cell", "T cell", "NK cell")


def point_client_at(monkeypatch: pytest.MonkeyPatch, endpoint: str, hf_home: Path, token: str | None) -> None:
    """Point ``huggingface_hub`` in this process (constants read at import) and in children (env) at ``endpoint``."""
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hf_home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(hf_home / "stored_tokens"))


@pytest.fixture
def local_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A running :class:`LocalHub`, with this process's Hub client pointed at it and logged in."""
    with LocalHub(root=tmp_path / "hub_storage", tokens=TOKENS) as hub:
        point_client_at(monkeypatch, hub.endpoint, tmp_path / "hf_home", WRITE_TOKEN)
        yield hub


def unreachable_endpoint() -> str:
    """A 127.0.0.1 URL on a port nobody listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def cells(n_cells: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Counts of three separable cell types: (n_cells, N_GENES) counts, labels, gene symbols."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n_cells) % len(LABELS)
    rates = np.full((len(LABELS), N_GENES), 2.0)
    for label in range(len(LABELS)):
        rates[label, label * 6 : label * 6 + 6] = 20.0  # six marker genes per type
    counts = rng.poisson(rates[labels]).astype(np.float32)
    return counts, labels, [f"GENE{i}" for i in range(N_GENES)]


def train_tiny_classifier(seed: int = 0, steps: int = 15):
    """A tiny-preset classifier and its processor after a few optimiser steps on simulated cells."""
    torch.manual_seed(seed)
    counts, labels, genes = cells(60, seed)
    processor = ScrnaLongformerProcessor(gene_symbols=genes, input_kind="counts")
    batch = processor(counts, gene_names=genes)
    config = ScrnaLongformerConfig.from_preset(
        "tiny",
        n_genes=N_GENES,
        knn_k=4,
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
    )
    model = ScrnaLongformerForCellClassification(config)
    model.scrna_longformer.set_gene_graph(processor.build_gene_graph(batch["expression"], k=4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(**batch, labels=torch.as_tensor(labels)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), processor


def write_run_records(
    run_dir: Path, accuracy: float = 0.912, macro_f1: float = 0.905, logreg: tuple = (0.871, 0.862)
) -> None:
    """The result files a training run writes (the keys scrnalf_hf.hub.cards documents)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    results = {
        "epoch": 3.0,
        "eval_accuracy": accuracy,
        "eval_macro_f1": macro_f1,
        "eval_loss": 0.4312,
        "eval_samples": 20,
        "eval_samples_per_second": 5321.5,
        "train_runtime": 12.34,
        "train_samples": 60,
        "train_samples_per_second": 1234.5,
        "train_loss": 0.5678,
    }
    (run_dir / "all_results.json").write_text(json.dumps(results))
    comparison = [
        {
            "method": "tiny",
            "fold": 0,
            "accuracy": accuracy,
            "macro_f1": macro_f1,
            "train_seconds": 12.3,
            "n_parameters": 859,
        },
        {
            "method": "logreg",
            "fold": 0,
            "accuracy": logreg[0],
            "macro_f1": logreg[1],
            "train_seconds": 0.2,
            "n_parameters": 75,
        },
        {"method": "majority", "fold": 0, "accuracy": 0.35, "macro_f1": 0.173, "train_seconds": 0.0, "n_parameters": 0},
    ]
    (run_dir / "comparison.json").write_text(json.dumps(comparison))
    summary = {"metrics": {"per_class_f1": {"B cell": 0.95, "T cell": 0.875, "NK cell": 0.8333}}}
    (run_dir / "training_summary.json").write_text(json.dumps(summary))
    run_info = {
        "dataset": "scrnalf/simulated-pbmc",
        "label_key": "cell_type",
        "species": "Homo sapiens",
        "tissue": "blood",
        "split": "a stratified 25% validation split",
        "hardware": "2 CPU cores",
        "seed": 0,
    }
    (run_dir / "run_info.json").write_text(json.dumps(run_info))
    state = {
        "num_train_epochs": 3,
        "train_batch_size": 16,
        "global_step": 12,
        "log_history": [{"learning_rate": 0.001, "step": 1}],
    }
    (run_dir / "trainer_state.json").write_text(json.dumps(state))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training output folder: saved tiny classifier + processor + result files."""
    run_dir = tmp_path_factory.mktemp("tiny_run")
    model, processor = train_tiny_classifier()
    model.save_pretrained(run_dir)
    processor.save_pretrained(run_dir)
    write_run_records(run_dir)
    return run_dir
