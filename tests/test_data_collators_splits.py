"""Masked-gene collation, stratified splits and the train-only gene graph."""

import numpy as np
import pytest

from scrnalf_hf import ScrnaLongformerProcessor
from scrnalf_hf.data import (
    GenePanelCollator,
    MaskedGeneCollator,
    convert_anndata,
    dataset_genes,
    gene_graph_from_training,
    simulate,
    split_dataset,
    stratified_split,
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    adata = simulate(240, 40, n_cell_types=3, markers_per_type=3, n_modules=3)
    folder = tmp_path_factory.mktemp("converted") / "cells"
    dataset = convert_anndata(adata, folder, label_key="cell_type", progress=False)
    return adata, dataset, dataset_genes(folder)


def panel_with_unmeasured_genes(adata) -> ScrnaLongformerProcessor:
    return ScrnaLongformerProcessor(gene_symbols=list(adata.var_names) + [f"MISSING{i}" for i in range(10)])


def test_masked_positions_are_measured_genes_in_the_requested_ratio(converted):
    adata, dataset, genes = converted
    collator = MaskedGeneCollator(panel_with_unmeasured_genes(adata), genes, mask_ratio=0.25, seed=0)
    batch = collator([dataset[i] for i in range(16)])
    masked = batch["masked_positions"]
    assert masked.shape == (16, 50) and masked.dtype.is_floating_point is False
    assert not masked[:, 40:].any()  # unmeasured panel genes are never masked
    assert (masked.sum(1) == 10).all()  # round(0.25 * 40) per cell
    assert "labels" not in batch
    assert not (masked[0] == masked[1]).all()  # each cell draws its own positions


def test_masking_is_reproducible_from_the_seed(converted):
    adata, dataset, genes = converted
    rows = [dataset[i] for i in range(8)]
    first = MaskedGeneCollator(panel_with_unmeasured_genes(adata), genes, seed=7)
    second = MaskedGeneCollator(panel_with_unmeasured_genes(adata), genes, seed=7)
    draws = [first(rows)["masked_positions"], first(rows)["masked_positions"]]
    assert (draws[0] == second(rows)["masked_positions"]).all()
    assert not (draws[0] == draws[1]).all()  # the generator moves on between batches


def test_stratified_split_keeps_every_label_in_every_split():
    labels = np.array(["a"] * 50 + ["b"] * 9 + ["c"] * 3)
    parts = stratified_split(labels, validation_size=0.1, test_size=0.2, seed=0)
    everything = np.concatenate(list(parts.values()))
    assert sorted(everything.tolist()) == list(range(len(labels)))
    for split in parts.values():
        assert set(labels[split]) == {"a", "b", "c"}
    assert len(parts["test"]) == 10 + 2 + 1 and len(parts["validation"]) == 5 + 1 + 1
    again = stratified_split(labels, validation_size=0.1, test_size=0.2, seed=0)
    assert all((again[k] == parts[k]).all() for k in parts)


def test_labels_with_too_few_cells_get_a_clear_error():
    labels = np.array(["a"] * 20 + ["rare"] * 2)
    with pytest.raises(ValueError, match=r"fewer than 3 cells.*'rare': 2"):
        stratified_split(labels)
    assert len(stratified_split(labels, test_size=0)["validation"]) == 2 + 1


def test_split_dataset_returns_disjoint_stratified_splits(converted):
    _, dataset, _ = converted
    splits = split_dataset(dataset, validation_size=0.2, test_size=0.2)
    ids = [set(splits[name]["cell_id"]) for name in ("train", "validation", "test")]
    assert sum(map(len, ids)) == len(dataset) and not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert set(splits["test"]["label"]) == {0, 1, 2}


def test_gene_graph_is_built_from_training_cells_only(converted):
    adata, dataset, genes = converted
    splits = split_dataset(dataset, validation_size=0.2, test_size=0.2)
    processor = ScrnaLongformerProcessor(gene_symbols=list(adata.var_names))
    graph = gene_graph_from_training(processor, splits["train"], genes, k=6)
    train_cells = adata[list(splits["train"]["cell_id"])]
    expected = processor.build_gene_graph(processor(train_cells.X, gene_names=list(adata.var_names))["expression"], k=6)
    np.testing.assert_array_equal(graph, expected)
    everything = processor.build_gene_graph(processor(adata.X, gene_names=list(adata.var_names))["expression"], k=6)
    assert not np.array_equal(graph, everything)


def test_duplicate_symbols_align_by_ensembl_id(tmp_path):
    adata = simulate(60, 40, n_cell_types=3, markers_per_type=3, n_modules=3)
    panel = ScrnaLongformerProcessor(gene_symbols=list(adata.var_names), gene_ids=list(adata.var["gene_ids"]))
    adata.var_names = ["DUP", "dup"] + list(adata.var_names[2:])  # clashes case-insensitively
    adata.var["gene_ids"] = [f"{g}.7" for g in adata.var["gene_ids"]]  # versioned ids still match
    dataset = convert_anndata(adata, tmp_path / "out", progress=False)
    collator = GenePanelCollator(panel, dataset_genes(tmp_path / "out"), normalize=False)
    assert collator.alignment.matched_by == "gene_ids" and collator.alignment.fraction == 1.0
    batch = collator([dataset[i] for i in range(len(dataset))])
    np.testing.assert_array_equal(batch["expression"].numpy(), adata.X.toarray())
    # the repeat is renamed as var_names_make_unique would, so a symbols-only panel still aligns
    assert dataset_genes(tmp_path / "out").gene_symbols[:2] == ["DUP", "dup-1"]
    symbols_only = ScrnaLongformerProcessor(gene_symbols=["DUP"] + list(adata.var_names[2:]))
    assert GenePanelCollator(symbols_only, dataset_genes(tmp_path / "out")).alignment.matched_by == "gene_symbols"


def test_low_gene_overlap_is_refused_with_the_overlap_in_the_message(converted):
    adata, _, genes = converted
    mostly_other_genes = list(adata.var_names[:10]) + [f"OTHER{i}" for i in range(30)]
    with pytest.raises(ValueError, match=r"10/40 panel genes found in the input \(25.0%"):
        GenePanelCollator(ScrnaLongformerProcessor(gene_symbols=mostly_other_genes), genes)
