"""AnnData → datasets conversion: exact round trips, bad inputs, interrupted conversions, CLI."""

import contextlib
import json
import signal
import subprocess
import sys

import anndata as ad
import datasets
import numpy as np
import pytest
import scipy.sparse as sp

from scrnalf_hf import ScrnaLongformerProcessor
from scrnalf_cli import main as cli_main
from scrnalf_hf.data import (
    CellCollator,
    convert_anndata,
    dataset_genes,
    read_anndata,
    simulate,
    stream_anndata,
)
from scrnalf_hf.data import convert as convert_module


def small_counts(n_cells: int = 120, n_genes: int = 40, seed: int = 0) -> ad.AnnData:
    adata = simulate(n_cells, n_genes, seed=seed, n_cell_types=3, markers_per_type=3, n_modules=3)
    adata.obs_names = adata.obs_names.astype(str)
    return adata


def shuffled_panel_processor(adata: ad.AnnData, **kwargs) -> tuple[ScrnaLongformerProcessor, np.ndarray]:
    """A processor whose panel is the AnnData's genes in another order plus two genes it lacks.

    Returns the processor and, for every panel gene, its column in the AnnData (-1 = absent).
    """
    order = np.random.default_rng(1).permutation(adata.n_vars)
    symbols = [adata.var_names[i] for i in order] + ["ABSENT1", "ABSENT2"]
    ids = [adata.var["gene_ids"].iloc[i] for i in order] + ["ENSABSENT1", "ENSABSENT2"]
    processor = ScrnaLongformerProcessor(gene_symbols=symbols, gene_ids=ids, **kwargs)
    return processor, np.concatenate([order, [-1, -1]])


def densify(dataset: datasets.Dataset, processor: ScrnaLongformerProcessor, folder) -> dict:
    collator = CellCollator(processor, dataset_genes(folder), normalize=False)
    return collator([dataset[i] for i in range(len(dataset))])


def expected_panel(matrix, panel_columns: np.ndarray) -> np.ndarray:
    dense = matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)
    panel = np.zeros((dense.shape[0], len(panel_columns)), dtype=np.float32)
    present = panel_columns >= 0
    panel[:, present] = dense[:, panel_columns[present]]
    return panel


def as_csc(adata):
    adata.X = adata.X.tocsc()
    return adata, {}


def as_dense(adata):
    adata.X = adata.X.toarray()
    return adata, {}


def in_raw(adata):
    """Counts in .raw, log-normalised values in X: the default counts lookup must find .raw."""
    adata.raw = adata.copy()
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()))
    return adata, {}


def in_counts_layer(adata):
    adata.layers["counts"] = adata.X.copy()
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()))
    return adata, {}


@pytest.mark.parametrize(
    "prepare, on_disk",
    [
        (lambda a: (a, {}), None),
        (as_csc, None),
        (as_dense, None),
        (in_raw, None),
        (lambda a: (in_raw(a)[0], {"use_raw": True}), None),
        (in_counts_layer, None),
        (lambda a: (a, {}), "backed"),
        (lambda a: (a, {}), "path"),
        (as_dense, "path"),
        (in_raw, "path"),
        (as_csc, "backed"),
    ],
    ids=[
        "csr",
        "csc",
        "dense",
        "raw-default",
        "raw-explicit",
        "counts-layer",
        "backed-csr",
        "path-csr",
        "path-dense",
        "path-raw",
        "backed-csc",
    ],
)
def test_convert_then_collate_reproduces_the_matrix_exactly(tmp_path, prepare, on_disk):
    original = small_counts()
    counts = original.X.copy()
    adata, options = prepare(original)
    source = adata
    if on_disk is not None:
        adata.write_h5ad(tmp_path / "in.h5ad")
        source = tmp_path / "in.h5ad" if on_disk == "path" else read_anndata(tmp_path / "in.h5ad", backed=True)
    backed_csc = on_disk == "backed" and sp.issparse(adata.X) and adata.X.format == "csc"
    with pytest.warns(UserWarning, match="column-compressed") if backed_csc else contextlib.nullcontext():
        dataset = convert_anndata(
            source, tmp_path / "out", label_key="cell_type", progress=False, chunk_size=32, **options
        )

    processor, panel_columns = shuffled_panel_processor(original)
    batch = densify(dataset, processor, tmp_path / "out")
    np.testing.assert_array_equal(batch["expression"].numpy(), expected_panel(counts, panel_columns))
    np.testing.assert_array_equal(batch["attention_mask"][0].numpy(), (panel_columns >= 0).astype(np.int64))
    names = dataset.features["label"].names
    assert [names[i] for i in dataset["label"]] == list(original.obs["cell_type"].astype(str))
    assert dataset["cell_id"] == list(original.obs_names)
    np.testing.assert_allclose(dataset["library_size"], np.asarray(counts.sum(1)).ravel())
    assert dataset["length"] == np.diff(sp.csr_matrix(counts).indptr).tolist()


def test_gene_alignment_is_by_symbol_case_insensitively_when_the_panel_has_no_ids(tmp_path):
    adata = small_counts()
    dataset = convert_anndata(adata, tmp_path / "out", progress=False)
    panel = [name.lower() for name in adata.var_names[::-1]]
    processor = ScrnaLongformerProcessor(gene_symbols=panel)
    batch = densify(dataset, processor, tmp_path / "out")
    np.testing.assert_array_equal(batch["expression"].numpy(), adata.X.toarray()[:, ::-1])


def test_normalised_collation_matches_the_processor_on_the_same_cells(tmp_path):
    adata = small_counts()
    dataset = convert_anndata(adata, tmp_path / "out", progress=False)
    processor, _ = shuffled_panel_processor(adata)
    collated = CellCollator(processor, dataset_genes(tmp_path / "out"))([dataset[i] for i in range(len(dataset))])
    direct = processor(adata.X, gene_names=list(adata.var_names), gene_ids=list(adata.var["gene_ids"]))
    np.testing.assert_allclose(collated["expression"].numpy(), direct["expression"].numpy(), rtol=1e-6)


def test_collator_refuses_a_dataset_of_another_input_kind(tmp_path):
    adata = small_counts()
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()))
    convert_anndata(adata, tmp_path / "out", require_counts=False, layer="X", progress=False)
    processor, _ = shuffled_panel_processor(adata)
    with pytest.raises(ValueError, match="holds log1p values but the model's processor expects counts"):
        CellCollator(processor, dataset_genes(tmp_path / "out"))


def test_obs_columns_species_and_batch_are_stored(tmp_path):
    adata = small_counts()
    adata.obs["batch_id"] = ["b1", "b2"] * (adata.n_obs // 2)
    dataset = convert_anndata(
        adata, tmp_path / "out", species="human", batch_key="batch_id", obs_keys=["true_library_size"], progress=False
    )
    assert set(dataset["species"]) == {"human"}
    assert dataset["batch"][:2] == ["b1", "b2"]
    np.testing.assert_allclose(dataset["true_library_size"], adata.obs["true_library_size"], rtol=1e-6)
    info = json.loads((tmp_path / "out" / "genes.json").read_text())
    assert info["gene_symbols"] == list(adata.var_names) and info["gene_ids"] == list(adata.var["gene_ids"])


def test_parallel_conversion_equals_single_process_conversion(tmp_path):
    adata = small_counts(n_cells=300)
    one = convert_anndata(adata, tmp_path / "one", label_key="cell_type", progress=False)
    two = convert_anndata(
        adata, tmp_path / "two", label_key="cell_type", num_proc=2, cells_per_shard=50, chunk_size=20, progress=False
    )
    assert len(list((tmp_path / "two").glob("data-*.arrow"))) == 6
    assert one.to_dict() == two.to_dict()


def test_streaming_yields_the_same_rows_as_conversion(tmp_path):
    adata = small_counts(n_cells=100)
    adata.write_h5ad(tmp_path / "in.h5ad")
    converted = convert_anndata(tmp_path / "in.h5ad", tmp_path / "out", label_key="cell_type", progress=False)
    stream = stream_anndata(tmp_path / "in.h5ad", label_key="cell_type", chunk_size=16, n_shards=3)
    assert isinstance(stream, datasets.IterableDataset) and stream.num_shards == 3
    assert list(stream) == [converted[i] for i in range(len(converted))]
    assert dataset_genes(tmp_path / "in.h5ad") == dataset_genes(tmp_path / "out")


def bad_values(value):
    def prepare(adata):
        dense = adata.X.toarray()
        dense[-1, 3] = value
        adata.X = sp.csr_matrix(dense)

    return prepare


def empty_last_cell(adata):
    dense = adata.X.toarray()
    dense[-1] = 0
    adata.X = sp.csr_matrix(dense)


def empty_gene(adata):
    dense = adata.X.toarray()
    dense[:, 5] = 0
    adata.X = sp.csr_matrix(dense)


def unlabelled_cell(adata):
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(object)
    adata.obs.iloc[7, adata.obs.columns.get_loc("cell_type")] = np.nan


def duplicate_ids(adata):
    adata.obs_names = ["same"] * 2 + list(adata.obs_names[2:])


@pytest.mark.parametrize(
    "prepare, options, message",
    [
        (bad_values(2.5), {}, "counts are required but X holds non-integer values"),
        (bad_values(-1.0), {}, "negative values"),
        (bad_values(np.nan), {}, "NaN or infinite"),
        (bad_values(np.inf), {"require_counts": False}, "NaN or infinite"),
        (empty_last_cell, {}, "have no expressed gene"),
        (empty_gene, {}, "zero in every cell"),
        (lambda a: None, {"label_key": "no_such_column"}, "obs column 'no_such_column' not found"),
        (unlabelled_cell, {"label_key": "cell_type"}, "label column 'cell_type' has 1 missing value"),
        (duplicate_ids, {}, "occur more than once"),
        (lambda a: None, {"layer": "spliced"}, "layer 'spliced' not found"),
        (lambda a: None, {"use_raw": True}, "has no .raw"),
    ],
    ids=[
        "non-integer",
        "negative",
        "nan",
        "inf",
        "empty-cell",
        "empty-gene",
        "missing-label",
        "unlabelled-cell",
        "duplicate-ids",
        "missing-layer",
        "missing-raw",
    ],
)
def test_bad_input_is_refused_with_a_clear_error_and_no_output(tmp_path, prepare, options, message):
    adata = small_counts()
    prepare(adata)
    adata.write_h5ad(tmp_path / "in.h5ad")
    with pytest.raises(ValueError, match=message):
        convert_anndata(tmp_path / "in.h5ad", tmp_path / "out", progress=False, chunk_size=16, **options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad"]


def test_empty_genes_are_kept_when_allowed(tmp_path):
    adata = small_counts()
    empty_gene(adata)
    dataset = convert_anndata(adata, tmp_path / "out", allow_empty_genes=True, progress=False)
    assert len(dataset) == adata.n_obs


@pytest.mark.parametrize("content", [b"", b"not an hdf5 file at all"])
def test_unreadable_file_gets_a_clear_error(tmp_path, content):
    (tmp_path / "broken.h5ad").write_bytes(content)
    with pytest.raises(ValueError, match="could not open .*broken.h5ad"):
        convert_anndata(tmp_path / "broken.h5ad", tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="no AnnData file"):
        convert_anndata(tmp_path / "missing.h5ad", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_interrupted_conversion_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    adata = small_counts(n_cells=200)
    real_table = convert_module._cells_table
    calls = []

    def interrupt_on_third_chunk(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_table(*args)

    monkeypatch.setattr(convert_module, "_cells_table", interrupt_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        convert_anndata(adata, tmp_path / "out", chunk_size=40, progress=False)
    assert len(calls) == 3
    assert list(tmp_path.iterdir()) == []


def test_killed_conversion_leaves_no_dataset_folder(tmp_path):
    """A hard kill (no cleanup code runs) mid-conversion leaves only a hidden staging folder."""
    small_counts(n_cells=200).write_h5ad(tmp_path / "in.h5ad")
    script = f"""
import os, signal
from scrnalf_hf.data import convert
real_table, calls = convert._cells_table, []
def killed_on_third_chunk(*args):
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_table(*args)
convert._cells_table = killed_on_third_chunk
convert.convert_anndata({str(tmp_path / "in.h5ad")!r}, {str(tmp_path / "out")!r}, chunk_size=40, progress=False)
"""
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, check=False)
    assert finished.returncode == -signal.SIGKILL, finished.stderr.decode()
    assert not (tmp_path / "out").exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "in.h5ad"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".out.incomplete-")
    assert list((tmp_path / leftovers[0]).glob("data-*.arrow"))  # it did write before dying


def test_failed_overwrite_keeps_the_previous_dataset(tmp_path):
    good = small_counts()
    convert_anndata(good, tmp_path / "out", progress=False)
    bad = small_counts()
    bad_values(-3.0)(bad)
    with pytest.raises(ValueError, match="negative"):
        convert_anndata(bad, tmp_path / "out", overwrite=True, progress=False)
    assert len(datasets.load_from_disk(str(tmp_path / "out"))) == good.n_obs
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(FileExistsError, match="already exists"):
        convert_anndata(good, tmp_path / "out", progress=False)


def test_cli_convert_writes_a_loadable_dataset(tmp_path, capsys):
    adata = small_counts()
    adata.write_h5ad(tmp_path / "in.h5ad")
    assert (
        cli_main(
            [
                "convert",
                str(tmp_path / "in.h5ad"),
                str(tmp_path / "out"),
                "--label-key",
                "cell_type",
                "--species",
                "human",
                "--num-proc",
                "2",
            ]
        )
        == 0
    )
    dataset = datasets.load_from_disk(str(tmp_path / "out"))
    assert dataset.features["label"].names == ["type_0", "type_1", "type_2"]
    assert set(dataset["species"]) == {"human"}
    assert f"wrote {adata.n_obs:,} cells" in capsys.readouterr().out


def test_card_writer_runs_inside_the_staging_folder_with_a_summary(tmp_path):
    seen = {}

    def write_card(folder, summary):
        seen.update(folder=folder, summary=summary)
        (folder / "README.md").write_text(f"# {summary['n_cells']} cells")

    adata = small_counts()
    convert_anndata(adata, tmp_path / "out", label_key="cell_type", card_writer=write_card, progress=False)
    assert seen["folder"].name.startswith(".out.incomplete-")
    assert seen["summary"]["label_names"] == ["type_0", "type_1", "type_2"]
    assert seen["summary"]["matrix"] == "X" and seen["summary"]["input_kind"] == "counts"
    assert (tmp_path / "out" / "README.md").read_text() == f"# {adata.n_obs} cells"
