"""Cells streamed from a local TileDB-SOMA store: the same values, library sizes and collator
batches as the converted (Arrow) path, filters, and each cell exactly once per epoch across
(emulated) ranks and DataLoader workers."""

from collections import Counter

import numpy as np
import pytest
import torch
from helpers import marker_adata

pytest.importorskip("tiledbsoma_ml")

from scrnalf_hf.data.cells import open_cells, panel_matrix  # noqa: E402
from scrnalf_hf.data.collators import CellCollator  # noqa: E402
from scrnalf_hf.data import soma as soma_module  # noqa: E402
from scrnalf_hf.data.soma import open_soma, write_soma  # noqa: E402
from scrnalf_hf.processing_scrnalf import ScrnaLongformerProcessor  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    adata = marker_adata(n_cells=60, n_genes=24)
    adata.var["gene_ids"] = [f"ENSG{i:011d}" for i in range(adata.n_vars)]
    folder = tmp_path_factory.mktemp("soma")
    write_soma(adata, folder / "store")
    return adata, str(folder / "store")


def _rows(stream_batches):
    return [row for batch in stream_batches for row in batch]


def test_soma_cells_hold_the_anndata_values_library_sizes_and_gene_ids(store):
    adata, uri = store
    cells = open_soma(uri)
    assert cells.n_cells == 60 and cells.genes.gene_symbols == list(adata.var_names)
    assert cells.genes.gene_ids == list(adata.var["gene_ids"]) and cells.input_kind == "counts"
    rows = np.array([7, 0, 59, 3])
    values, library_size = cells.read_rows(rows)
    np.testing.assert_array_equal(values.toarray(), adata.X[rows])
    np.testing.assert_array_equal(library_size, adata.X[rows].sum(1))
    assert list(cells.cell_ids()[rows]) == [f"cell{i}" for i in rows]
    assert list(cells.obs_column("cell_type")[rows]) == list(adata.obs["cell_type"].iloc[rows])


def test_streamed_batches_equal_the_converted_path_on_a_panel_of_other_genes(store):
    adata, uri = store
    soma, converted = open_soma(uri), open_cells(adata, progress=False)
    # a panel that skips genes, reorders them and holds one the store lacks
    panel = ["GENE5", "GENE0", "GENE23", "NOT_MEASURED", *[f"GENE{i}" for i in range(8, 16)]]
    processor = ScrnaLongformerProcessor(gene_symbols=panel)
    rows = np.arange(60)
    np.testing.assert_allclose(
        panel_matrix(soma, rows, processor).toarray(), panel_matrix(converted, rows, processor).toarray(), rtol=1e-6
    )
    streamed = {r["cell_id"]: r for r in _rows(soma.with_targets(None).select(rows).batches(16, False, 0, 1))}
    arrow = converted.with_targets(None)
    features = [{k: arrow[i][k] for k in ("cell_id", "indices", "values", "library_size")} for i in (4, 17, 42)]
    from_soma = CellCollator(processor, soma.genes)([streamed[f["cell_id"]] for f in features])
    from_arrow = CellCollator(processor, converted.genes)(features)
    for key in ("expression", "attention_mask"):
        torch.testing.assert_close(from_soma[key], from_arrow[key])


def test_reads_hold_to_the_memory_budget_and_give_the_same_values_in_passes(store, monkeypatch):
    adata, uri = store
    budget = str(soma_module.READ_MEMORY_BUDGET)
    cells = open_soma(uri)
    with cells._experiment() as experiment:
        assert experiment.context.tiledb_config["sm.mem.total_budget"] == budget
    dataset, _ = cells.with_targets(None).select(np.arange(60)).batches(8, True, 0, 1)._experiment_dataset()
    assert dataset.x_locator.tiledb_config["sm.mem.total_budget"] == budget  # the stream's readers, workers too
    cells.cell_ids()
    assert cells._obs_cache == {}  # a million names are not kept for the whole run
    # a budget far below the matrix: TileDB reads the scattered cells in passes, to the same values
    monkeypatch.setattr(soma_module, "READ_MEMORY_BUDGET", 64 * 2**10)
    rows = np.array([59, 2, 31, 17, 44])
    values, library_size = open_soma(uri).read_rows(rows)
    np.testing.assert_array_equal(values.toarray(), adata.X[rows])
    np.testing.assert_array_equal(library_size, adata.X[rows].sum(1))


def test_filters_choose_cells_and_genes_while_library_sizes_count_every_gene(store):
    adata, uri = store
    cells = open_soma(uri, obs_filter="cell_type == 'type1'", var_filter="var_id in ['GENE3', 'GENE1']")
    chosen = np.flatnonzero(adata.obs["cell_type"] == "type1")
    assert cells.n_cells == len(chosen) and cells.genes.gene_symbols == ["GENE1", "GENE3"]
    rows = _rows(cells.with_targets(None).select(np.arange(cells.n_cells)).batches(5, False, 0, 1))
    first = adata.X[chosen[0]]
    assert rows[0]["library_size"] == first.sum()  # all 24 genes, not the 2 kept
    np.testing.assert_array_equal(rows[0]["values"], first[[1, 3]][first[[1, 3]] > 0])


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_each_cell_once_per_epoch_across_emulated_ranks_and_a_new_order_each_epoch(store, monkeypatch, world_size):
    _, uri = store
    cells = open_soma(uri)
    stream = cells.with_targets(np.arange(60) * 10).select(np.arange(60))
    seen = Counter()
    for rank in range(world_size):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        batches = stream.batches(7, shuffle=True, seed=3, num_workers=1)
        epoch0 = _rows(batches)
        assert len(list(batches)) == len(batches)  # Trainer's step count is what is delivered
        batches.set_epoch(1)
        epoch1 = _rows(batches)
        assert sorted(r["cell_id"] for r in epoch0) == sorted(r["cell_id"] for r in epoch1)
        assert [r["cell_id"] for r in epoch0] != [r["cell_id"] for r in epoch1]
        assert all(r["labels"] == 10 * int(r["cell_id"][4:]) for r in epoch0)  # targets travel with their cell
        seen.update(r["cell_id"] for r in epoch0)
    assert len(stream) == 60 and set(seen.values()) == {1} and len(seen) == 60  # 60 divides by 1, 2, 3


@pytest.mark.slow  # two spawned workers import torch: half a minute on 2 cores
def test_each_cell_once_across_spawned_dataloader_workers(store):
    _, uri = store
    batches = open_soma(uri).with_targets(None).select(np.arange(60)).batches(8, shuffle=True, seed=0, num_workers=2)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=2, multiprocessing_context="spawn")
    delivered = [row["cell_id"] for batch in loader for row in batch]
    assert len(loader) == len(batches) == 8  # 30 cells per worker: 4 batches each, the last one short
    assert Counter(delivered) == Counter(f"cell{i}" for i in range(60))

