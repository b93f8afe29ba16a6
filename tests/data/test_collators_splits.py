"""The one data path: cells of a converted dataset → collator batches and sparse panel matrices,
one mask sampler, one split function, and the train-only gene graph."""

import numpy as np
import pytest
import scipy.sparse as sp

from scrnalf_hf import ScrnaLongformerProcessor
from scrnalf_hf.data import (
    CellCollator,
    MaskSampler,
    convert_anndata,
    cross_validation_folds,
    dataset_genes,
    gene_graph,
    open_cells,
    panel_matrix,
    simulate,
    split_off,
)
from scrnalf_hf.data.cells import CELL_COLUMNS


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    adata = simulate(240, 40, n_cell_types=3, markers_per_type=3, n_modules=3)
    folder = tmp_path_factory.mktemp("converted") / "cells"
    convert_anndata(adata, folder, label_key="cell_type", progress=False)
    return adata, open_cells(folder)


def panel_with_unmeasured_genes(adata) -> ScrnaLongformerProcessor:
    return ScrnaLongformerProcessor(gene_symbols=list(adata.var_names) + [f"MISSING{i}" for i in range(10)])


def rows_of(cells, positions):
    return [cells.with_targets(None)[int(i)] for i in positions]


def test_masks_hide_the_requested_share_of_measured_genes_only(converted):
    adata, cells = converted
    collator = CellCollator(panel_with_unmeasured_genes(adata), cells.genes, masking=MaskSampler(0.25, seed=0))
    batch = collator(rows_of(cells, range(16)))
    masked = batch["masked_positions"]
    assert masked.shape == (16, 50) and masked.dtype == torch_bool()
    assert not masked[:, 40:].any()  # unmeasured panel genes are never masked
    assert (masked.sum(1) == 10).all()  # round(0.25 * 40) per cell
    assert not (masked[0] == masked[1]).all()  # each cell draws its own positions
    np.testing.assert_array_equal(batch["labels"].numpy(), batch["expression"].numpy())  # the targets are the values


def torch_bool():
    import torch

    return torch.bool


def test_training_masks_move_on_while_evaluation_masks_stay_with_the_cell(converted):
    adata, cells = converted
    processor = panel_with_unmeasured_genes(adata)
    rows = rows_of(cells, range(8))
    training = CellCollator(processor, cells.genes, masking=MaskSampler(seed=7))
    again = CellCollator(processor, cells.genes, masking=MaskSampler(seed=7))
    first, second = training(rows)["masked_positions"], training(rows)["masked_positions"]
    assert (first == again(rows)["masked_positions"]).all()  # reproducible from the seed
    assert not (first == second).all()  # the generator moves on between batches
    evaluation = CellCollator(processor, cells.genes, masking=MaskSampler(seed=7, per_cell=True))
    whole = evaluation(rows)["masked_positions"]
    assert (whole == evaluation(rows)["masked_positions"]).all()  # every evaluation hides the same genes
    assert (whole[3:5] == evaluation(rows[3:5])["masked_positions"]).all()  # whatever the batch


def test_collator_batches_and_panel_matrix_hold_the_processor_output(converted):
    adata, cells = converted
    processor = ScrnaLongformerProcessor(gene_symbols=list(adata.var_names)[::-1])  # another gene order
    expected = processor(adata, return_tensors="np")["expression"]
    batch = CellCollator(processor, cells.genes)(rows_of(cells, range(cells.n_cells)))
    np.testing.assert_array_equal(batch["expression"].numpy(), expected)
    matrix = panel_matrix(cells, np.arange(cells.n_cells), processor, chunk_size=64)
    assert sp.issparse(matrix) and matrix.dtype == np.float32
    np.testing.assert_array_equal(matrix.toarray(), expected)
    np.testing.assert_array_equal(panel_matrix(cells, np.array([5, 2]), processor).toarray(), expected[[5, 2]])


def test_collator_passes_the_targets_as_labels_with_their_kind(converted):
    adata, cells = converted
    collator = CellCollator(ScrnaLongformerProcessor(gene_symbols=list(adata.var_names)), cells.genes)
    classes = collator([cells.with_targets(np.arange(cells.n_cells) % 3)[i] for i in range(4)])["labels"]
    assert classes.dtype.is_floating_point is False and classes.tolist() == [0, 1, 2, 0]
    values = collator([cells.with_targets(np.linspace(0, 1, cells.n_cells))[i] for i in range(2)])["labels"]
    assert values.dtype.is_floating_point


def test_collator_refuses_rows_without_the_dataset_columns(converted):
    adata, cells = converted
    collator = CellCollator(ScrnaLongformerProcessor(gene_symbols=list(adata.var_names)), cells.genes)
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        collator([{"cell_id": "a", "label": 0}])
    assert set(cells.with_targets(None).column_names) == set(CELL_COLUMNS)


def test_stratified_split_keeps_every_class_on_both_sides_and_is_seeded():
    labels = np.array([0] * 50 + [1] * 9 + [2] * 3)
    kept, held_out = split_off(np.arange(len(labels)), 0.2, seed=0, labels=labels)
    assert sorted(np.concatenate([kept, held_out]).tolist()) == list(range(len(labels)))
    assert set(labels[kept]) == {0, 1, 2} and set(labels[held_out]) >= {0, 1}
    assert len(held_out) == round(0.2 * len(labels))
    again = split_off(np.arange(len(labels)), 0.2, seed=0, labels=labels)
    assert (again[1] == held_out).all()
    other = split_off(np.arange(len(labels)), 0.2, seed=1, labels=labels)
    assert not np.array_equal(other[1], held_out)


def test_random_split_and_folds_without_labels_cover_every_cell_once():
    kept, held_out = split_off(np.arange(10, 30), 0.25, seed=0)
    assert len(held_out) == 5 and sorted(np.concatenate([kept, held_out]).tolist()) == list(range(10, 30))
    folds = cross_validation_folds(20, 4, seed=0)
    assert sorted(np.concatenate([test for _, test in folds]).tolist()) == list(range(20))
    with pytest.raises(ValueError, match="at least 2 folds"):
        cross_validation_folds(20, 1)


def test_gene_graph_is_built_from_training_cells_only(converted):
    adata, cells = converted
    processor = ScrnaLongformerProcessor(gene_symbols=list(adata.var_names))
    train = np.arange(0, cells.n_cells, 2)
    graph = gene_graph(processor, cells, train, k=6)
    expected = processor.build_gene_graph(processor(adata[train].X, gene_names=list(adata.var_names))["expression"], k=6)
    np.testing.assert_array_equal(graph, expected)
    everything = processor.build_gene_graph(processor(adata.X, gene_names=list(adata.var_names))["expression"], k=6)
    assert not np.array_equal(graph, everything)


def test_duplicate_symbols_align_by_ensembl_id(tmp_path):
    adata = simulate(60, 40, n_cell_types=3, markers_per_type=3, n_modules=3)
    panel = ScrnaLongformerProcessor(gene_symbols=list(adata.var_names), gene_ids=list(adata.var["gene_ids"]))
    adata.var_names = ["DUP", "dup"] + list(adata.var_names[2:])  # clashes case-insensitively
    adata.var["gene_ids"] = [f"{g}.7" for g in adata.var["gene_ids"]]  # versioned ids still match
    convert_anndata(adata, tmp_path / "out", progress=False)
    cells = open_cells(tmp_path / "out")
    collator = CellCollator(panel, dataset_genes(tmp_path / "out"), normalize=False)
    assert collator.alignment.matched_by == "gene_ids" and collator.alignment.fraction == 1.0
    batch = collator(rows_of(cells, range(cells.n_cells)))
    np.testing.assert_array_equal(batch["expression"].numpy(), adata.X.toarray())
    # the repeat is renamed as var_names_make_unique would, so a symbols-only panel still aligns
    assert dataset_genes(tmp_path / "out").gene_symbols[:2] == ["DUP", "dup-1"]
    symbols_only = ScrnaLongformerProcessor(gene_symbols=["DUP"] + list(adata.var_names[2:]))
    assert CellCollator(symbols_only, cells.genes).alignment.matched_by == "gene_symbols"


def test_low_gene_overlap_is_refused_with_the_overlap_in_the_message(converted):
    adata, cells = converted
    mostly_other_genes = list(adata.var_names[:10]) + [f"OTHER{i}" for i in range(30)]
    with pytest.raises(ValueError, match=r"10/40 panel genes found in the input \(25.0%"):
        CellCollator(ScrnaLongformerProcessor(gene_symbols=mostly_other_genes), cells.genes)


def test_cells_on_another_panel_keep_their_values_and_library_size(converted):
    adata, cells = converted
    panel = ScrnaLongformerProcessor(gene_symbols=["EXTRA"] + list(adata.var_names[::2]))
    moved = cells.on_panel(panel)
    assert moved.genes.gene_symbols == panel.gene_symbols
    identity = ScrnaLongformerProcessor(gene_symbols=panel.gene_symbols, input_kind="counts")
    np.testing.assert_array_equal(
        panel_matrix(moved, np.arange(10), identity).toarray(), panel_matrix(cells, np.arange(10), identity).toarray()
    )
