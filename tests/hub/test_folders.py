"""Hub-ready folders from a training run, and the cell-type pipeline saved inside them."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from helpers import load_script
from hub_server import LABELS, cells, tiny_run  # noqa: F401 - fixture
from transformers import AutoConfig, pipeline

from scrnalf_hf import ScrnaLongformerConfig
from scrnalf_hf.hub import validate_hub_folder
from scrnalf_hf.pipeline_scrnalf import TASK as CELL_TYPE_TASK

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_hub_folders.py"


def make_hub_folders(argv: list[str]) -> int:
    return load_script("make_hub_folders").main(argv)


@pytest.fixture(scope="module")
def tiny_folder(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("hub_folders")
    assert make_hub_folders(["--run", f"tiny={tiny_run}", "--output-dir", str(output), "--org", "org"]) == 0
    return output / "scrna-longformer-tiny"


def test_script_writes_a_complete_folder_with_the_run_records(tiny_folder, tiny_run):
    folder = validate_hub_folder(tiny_folder)
    assert {"pipeline_scrnalf.py", "all_results.json", "comparison.json", "README.md"} <= set(folder.files)
    assert json.loads((tiny_folder / "all_results.json").read_text()) == json.loads(
        (tiny_run / "all_results.json").read_text()
    )
    config = json.loads((tiny_folder / "config.json").read_text())
    assert config["custom_pipelines"][CELL_TYPE_TASK]["impl"] == "pipeline_scrnalf.CellTypeClassificationPipeline"
    assert 'repo_id, revision = "org/scrna-longformer-tiny"' in (tiny_folder / "README.md").read_text()


def test_script_refuses_a_run_published_under_another_preset_name(tiny_run, tmp_path):
    with pytest.raises(SystemExit, match="is not a 'default' model: d_model=8 \\(preset 64\\)"):
        make_hub_folders(["--run", f"default={tiny_run}", "--output-dir", str(tmp_path), "--org", "org"])


def test_pipeline_takes_anndata_in_any_gene_order_like_the_panel_matrix(tiny_folder):
    classify = pipeline(model=str(tiny_folder), trust_remote_code=True)
    counts, _, genes = cells(12, seed=5)
    from_matrix = classify(counts, gene_names=genes, top_k=len(LABELS))

    order = np.random.default_rng(0).permutation(len(genes))
    # A gene outside the panel, unexpressed so that library sizes stay the same.
    extra = np.zeros((counts.shape[0], 1), dtype=np.float32)
    adata = ad.AnnData(
        X=np.hstack([counts[:, order], extra]),
        var=pd.DataFrame(index=[genes[i].lower() for i in order] + ["NOT_IN_PANEL"]),
    )
    from_anndata = classify(adata, top_k=len(LABELS))

    assert len(from_anndata) == counts.shape[0]
    for by_matrix, by_anndata in zip(from_matrix, from_anndata, strict=True):
        assert [r["label"] for r in by_anndata] == [r["label"] for r in by_matrix]
        assert {r["label"] for r in by_anndata} == set(LABELS)
        np.testing.assert_allclose([r["score"] for r in by_anndata], [r["score"] for r in by_matrix], rtol=1e-5)
        assert sum(r["score"] for r in by_anndata) == pytest.approx(1.0, abs=1e-5)
    best = classify(adata)
    assert [cell["label"] for cell in best] == [cell[0]["label"] for cell in from_anndata]


@pytest.mark.parametrize("preset", ["tiny", "default", "large"])
def test_hub_config_presets_load_by_path_and_by_name(preset):
    by_path = AutoConfig.from_pretrained(str(SCRIPT.parents[1] / "hub_configs" / f"{preset}.json"))
    by_name = ScrnaLongformerConfig.from_preset(preset)
    assert isinstance(by_path, ScrnaLongformerConfig)
    fields = ("n_genes", "d_model", "depth", "n_heads", "mlp_ratio", "knn_k", "attention_type")
    assert {f: getattr(by_path, f) for f in fields} == {f: getattr(by_name, f) for f in fields}
