"""``scrnalf grn`` / ``explain`` / ``perturb`` and ``scrnalf_hf.tl.grn / explain / perturb`` on a
small trained classifier: what they write, and that a failure writes nothing."""

import json

import pandas as pd
import pytest
from helpers import marker_adata, write_h5ad

import scrnalf_hf
from scrnalf_cli import main


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    return write_h5ad(marker_adata(n_cells=24, n_genes=60), tmp_path_factory.mktemp("cells"))


def test_grn_writes_the_edge_list_and_both_heatmaps(trained_tiny_folder, cells, tmp_path):
    output = tmp_path / "edges.tsv"
    assert main(["grn", "--model", str(trained_tiny_folder), "--input", str(cells), "--output", str(output),
                 "--group-by", "cell_type", "--heatmap-top", "8"]) == 0
    edges = pd.read_csv(output, sep="\t")
    assert list(edges.columns) == ["group", "source", "target", "score", "rank"]
    assert set(edges["group"]) == {"type0", "type1", "type2"}
    assert (edges["source"] != edges["target"]).all()
    assert output.with_suffix(".html").stat().st_size > 0 and output.with_suffix(".png").stat().st_size > 0
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert main(["grn", "--model", str(trained_tiny_folder), "--input", str(cells), "--output", str(output)]) == 1


def test_explain_writes_each_class_top_genes(trained_tiny_folder, cells, tmp_path):
    assert main(["explain", "--model", str(trained_tiny_folder), "--input", str(cells), "--output-dir", str(tmp_path),
                 "--n-top", "5", "--n-steps", "8"]) == 0
    top = pd.read_csv(tmp_path / "top_genes.tsv", sep="\t")
    assert list(top.columns) == ["class", "gene", "score", "rank"]
    assert (top.groupby("class").size() == 5).all()
    record = json.loads((tmp_path / "explain.json").read_text())
    assert record["method"] == "integrated_gradients" and record["n_cells"] == 24
    assert (tmp_path / "top_genes.png").stat().st_size > 0


def test_perturb_writes_shifts_and_refuses_a_gene_outside_the_panel(trained_tiny_folder, cells, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["perturb", "--model", str(trained_tiny_folder), "--input", str(cells), "--output-dir", str(out),
                 "--genes", "GENE0,GENE1", "--mode", "delete", "--target-label", "beta",
                 "--group-by", "cell_type", "--group", "type0", "--rank-genes", "GENE0,GENE8,GENE16"]) == 0
    assert len(pd.read_csv(out / "cell_shift.tsv", sep="\t")) == 8
    assert len(pd.read_csv(out / "ranking.tsv", sep="\t")) == 3
    assert json.loads((out / "perturbation.json").read_text())["mean_target_shift"] is not None
    bad = tmp_path / "bad"
    assert main(["perturb", "--model", str(trained_tiny_folder), "--input", str(cells), "--output-dir", str(bad),
                 "--genes", "NOT_A_GENE"]) == 1
    assert "NOT_A_GENE" in capsys.readouterr().err
    assert not bad.exists() or not any(bad.iterdir())


def test_tl_tools_write_into_obs_obsm_and_uns(trained_tiny_folder):
    adata = marker_adata(n_cells=15, n_genes=60)
    scrnalf_hf.tl.grn(adata, trained_tiny_folder, progress=False)
    assert {"source", "target", "score", "rank"} <= set(adata.uns["scrnalf_grn"]["edges"].columns)
    scrnalf_hf.tl.explain(adata, trained_tiny_folder, label_key=None, n_top=3, n_steps=4, progress=False)
    assert adata.obsm["scrnalf_importance"].shape == (15, 60)
    assert len(adata.uns["scrnalf_importance"]["genes"]) == 60
    scrnalf_hf.tl.perturb(adata, trained_tiny_folder, "GENE3", group_by="cell_type", group="type1", progress=False)
    shift = adata.obs["scrnalf_perturbation_shift"]
    assert shift[adata.obs["cell_type"] == "type1"].notna().all() and shift[adata.obs["cell_type"] != "type1"].isna().all()
    assert adata.uns["scrnalf_perturbation"]["mode"] == "delete"
    adata.write_h5ad(__import__("tempfile").mkdtemp() + "/written.h5ad")  # every key writes to .h5ad
