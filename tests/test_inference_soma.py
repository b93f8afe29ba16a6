"""predict / embed over a TileDB-SOMA experiment: the same embeddings and predictions as the
``.h5ad`` path on the same cells, every cell exactly once in ``soma_joinid`` order, filters, and
two processes (torchrun, gloo) giving what one process gives."""

import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

pytest.importorskip("tiledbsoma_ml")

from scrnalf_cli import main  # noqa: E402
from scrnalf_hf.data.soma import write_soma  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _cells(trained_tiny_folder, n_cells: int) -> ad.AnnData:
    """``n_cells`` cells on the tiny model's 60 genes (its training counts, repeated), with a
    cell type and library sizes that differ from cell to cell."""
    inputs = np.load(trained_tiny_folder / "inputs.npz")
    counts = np.resize(inputs["counts"], (n_cells, inputs["counts"].shape[1])).astype(np.float32)
    adata = ad.AnnData(counts)
    adata.var_names = [str(g) for g in inputs["genes"]]
    adata.obs_names = [f"cell{i}" for i in range(n_cells)]
    adata.obs["cell_type"] = [f"type{i % 3}" for i in range(n_cells)]
    return adata


@pytest.fixture
def store_and_file(trained_tiny_folder, tmp_path):
    adata = _cells(trained_tiny_folder, 37)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    write_soma(adata, tmp_path / "store")
    return tmp_path / "store", tmp_path / "cells.h5ad"


def test_soma_embed_equals_h5ad_embed_with_every_cell_once_in_order(trained_tiny_folder, store_and_file, tmp_path):
    store, h5ad = store_and_file
    model = str(trained_tiny_folder)
    assert main(["embed", "--model", model, "--soma-uri", str(store), "--output", str(tmp_path / "soma.h5ad"), "--batch-size", "5"]) == 0
    assert main(["embed", "--model", model, "--input", str(h5ad), "--output", str(tmp_path / "file.h5ad")]) == 0
    from_soma, from_file = ad.read_h5ad(tmp_path / "soma.h5ad"), ad.read_h5ad(tmp_path / "file.h5ad")
    assert list(from_soma.obs_names) == [f"cell{i}" for i in range(37)]
    np.testing.assert_array_equal(from_soma.obs["soma_joinid"], np.arange(37))
    np.testing.assert_allclose(from_soma.obsm["X_scrnalf"], from_file.obsm["X_scrnalf"], rtol=1e-5, atol=1e-6)
    assert from_soma.uns["scrnalf"]["gene_overlap"]["matched_genes"] == 60 and from_soma.uns["scrnalf"]["processes"] == 1
    assert not [p.name for p in tmp_path.iterdir() if ".incomplete" in p.name]


def test_soma_predict_with_filters_equals_h5ad_predict_on_the_same_cells(trained_tiny_folder, store_and_file, tmp_path):
    store, h5ad = store_and_file
    adata = ad.read_h5ad(h5ad)
    chosen = adata[adata.obs["cell_type"] != "type1"].copy()
    kept_genes = [f"GENE{i}" for i in range(50)]
    # the .h5ad twin of --var-filter: the kept genes' counts, library sizes over every gene
    library_size = np.asarray(chosen.X.sum(1)).ravel()
    kept = np.asarray(chosen[:, kept_genes].X)
    subset = ad.AnnData(np.column_stack([kept, library_size - kept.sum(1)]).astype(np.float32), obs=chosen.obs)
    subset.var_names = [*kept_genes, "NOT_IN_PANEL"]
    subset.write_h5ad(tmp_path / "subset.h5ad")
    model = str(trained_tiny_folder)
    filters = ["--obs-filter", "cell_type != 'type1'", "--var-filter", f"var_id in {kept_genes}"]
    assert main(["predict", "--model", model, "--soma-uri", str(store), *filters, "--output", str(tmp_path / "soma.h5ad")]) == 0
    assert main(["predict", "--model", model, "--input", str(tmp_path / "subset.h5ad"), "--output", str(tmp_path / "file.h5ad")]) == 0
    from_soma, from_file = ad.read_h5ad(tmp_path / "soma.h5ad"), ad.read_h5ad(tmp_path / "file.h5ad")
    assert list(from_soma.obs_names) == list(chosen.obs_names)
    assert list(from_soma.obs["scrnalf_label"]) == list(from_file.obs["scrnalf_label"])
    assert list(from_soma.obs["scrnalf_label"].cat.categories) == ["alpha", "beta", "gamma"]
    for key in ("scrnalf_probabilities", "X_scrnalf"):
        np.testing.assert_allclose(from_soma.obsm[key], from_file.obsm[key], rtol=1e-5, atol=1e-6)
    assert from_soma.uns["scrnalf"]["gene_overlap"]["matched_genes"] == 50


@pytest.mark.slow  # two torch processes load the model: about a minute on 2 cores
def test_two_processes_embed_each_cell_once_and_match_one_process(trained_tiny_folder, tmp_path):
    n_cells = 61  # odd: the two processes take 31 and 30 cells
    write_soma(_cells(trained_tiny_folder, n_cells), tmp_path / "store")
    arguments = ["embed", "--model", str(trained_tiny_folder), "--soma-uri", str(tmp_path / "store"), "--batch-size", "8"]
    assert main([*arguments, "--output", str(tmp_path / "one.h5ad")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29543",
               str(REPO / "scrnalf_cli.py"), *arguments, "--output", str(tmp_path / "two.h5ad")]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    one, two = ad.read_h5ad(tmp_path / "one.h5ad"), ad.read_h5ad(tmp_path / "two.h5ad")
    assert two.uns["scrnalf"]["processes"] == 2
    np.testing.assert_array_equal(two.obs["soma_joinid"], np.arange(n_cells))  # each cell once, in order
    assert list(two.obs_names) == list(one.obs_names) == [f"cell{i}" for i in range(n_cells)]
    np.testing.assert_allclose(two.obsm["X_scrnalf"], one.obsm["X_scrnalf"], rtol=1e-5, atol=1e-6)
    assert not [p.name for p in tmp_path.iterdir() if ".incomplete" in p.name]
