"""Model and dataset cards: valid Hub metadata, and every figure taken from the run's files."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from hub_server import local_hub, tiny_run, write_run_records  # noqa: F401 - fixtures
from huggingface_hub import DatasetCard, HfApi, ModelCard, ModelCardData

from scrnalf_hf.data.convert import convert_anndata
from scrnalf_hf.hub import render_dataset_card, render_model_card, write_dataset_card


@pytest.fixture
def run_copy(tiny_run: Path, tmp_path: Path) -> Path:
    """A private copy of the run, so a test may rewrite its result files."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


def test_card_metadata_round_trips_through_model_card_data(run_copy):
    card = render_model_card(run_copy, repo_id="org/scrna-longformer-tiny")
    reparsed = ModelCard(str(card), ignore_metadata_errors=False).data
    assert ModelCardData(**reparsed.to_dict()).to_dict() == reparsed.to_dict() == card.data.to_dict()

    assert reparsed.library_name == "transformers"
    assert reparsed.license == "mit"
    assert reparsed.pipeline_tag == "tabular-classification"
    assert {"single-cell", "scRNA-seq", "homo-sapiens", "blood", "custom_code"} <= set(reparsed.tags)
    assert reparsed.datasets == ["scrnalf/simulated-pbmc"]
    results = json.loads((run_copy / "all_results.json").read_text())
    assert {(r.metric_type, r.metric_value) for r in reparsed.eval_results} == {
        ("accuracy", results["eval_accuracy"]),
        ("f1", results["eval_macro_f1"]),
    }


def test_card_passes_the_hub_metadata_validation_and_a_broken_one_does_not(local_hub, run_copy):
    card = render_model_card(run_copy, repo_id="org/scrna-longformer-tiny")
    card.validate(repo_type="model")
    assert ("POST", "/api/validate-yaml") in local_hub.requests

    # ModelCard itself drops a broken model-index, so send the raw text the way create_commit
    # checks a README before uploading anything.
    broken = str(card).replace("    - type: accuracy\n      value: 0.912\n", "    - type: accuracy\n")
    with pytest.raises(ValueError, match="Invalid metadata in README.md"):
        HfApi()._validate_yaml(broken, repo_type="model")


def test_card_figures_change_when_the_run_figures_change(run_copy):
    write_run_records(run_copy, accuracy=0.8125, macro_f1=0.7731, logreg=(0.7912, 0.7555))
    first = str(render_model_card(run_copy))
    assert "| **this model** | 0.812 | 0.773 |" in first
    assert "| logistic regression | 0.791 | 0.755 |" in first

    write_run_records(run_copy, accuracy=0.9342, macro_f1=0.9187, logreg=(0.9011, 0.8876))
    results = json.loads((run_copy / "all_results.json").read_text())
    results["train_runtime"] = 98.7
    (run_copy / "all_results.json").write_text(json.dumps(results))
    second = render_model_card(run_copy)
    text = str(second)
    assert "| **this model** | 0.934 | 0.919 |" in text and "0.812" not in text
    assert "| logistic regression | 0.901 | 0.888 |" in text
    assert "| Training wall time | 98.7 s |" in text
    assert {r.metric_value for r in second.data.eval_results} == {0.9342, 0.9187}


def test_missing_optional_run_files_are_reported_not_invented(run_copy, caplog):
    for name in ("comparison.json", "run_info.json", "trainer_state.json"):
        (run_copy / name).unlink()
    with caplog.at_level(logging.WARNING, logger="scrnalf_hf.hub.cards"):
        text = str(render_model_card(run_copy))
    assert "| logistic regression | not measured (comparison.json missing or without a logreg row) | |" in text
    assert "- Dataset: not recorded (run_info.json missing)" in text
    assert "| Hardware | not recorded |" in text
    assert "comparison.json" in caplog.text and "run_info.json" in caplog.text


def test_card_without_classification_metrics_says_so_and_has_no_model_index(run_copy):
    (run_copy / "all_results.json").write_text(json.dumps({"eval_loss": 1.2345, "train_runtime": 3.0}))
    card = render_model_card(run_copy)
    assert card.data.eval_results is None
    assert "This run recorded no evaluation figures (all_results.json / eval_results.json lack eval_accuracy, eval_macro_f1)" in str(card)


def test_card_needs_the_processor_config(run_copy):
    (run_copy / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json is missing"):
        render_model_card(run_copy)


def test_card_shows_baselines_and_per_class_f1_but_not_the_models_own_comparison_row(run_copy):
    text = str(render_model_card(run_copy))
    assert "| tiny |" not in text
    assert "| majority class | 0.350 | 0.173 |" in text
    assert "Per-class F1 of this model: B cell 0.950, T cell 0.875, NK cell 0.833." in text


def test_dataset_card_written_by_convert_counts_cells_and_labels(tmp_path):
    counts = np.random.default_rng(0).poisson(2.0, size=(7, 4)).astype(np.float32)
    counts[:, 0] += 1  # no gene may be zero in every cell
    adata = ad.AnnData(
        X=counts,
        obs=pd.DataFrame({"cell_type": ["B", "B", "T", "T", "T", "NK", "NK"]}, index=[f"c{i}" for i in range(7)]),
        var=pd.DataFrame(index=["CD19", "CD3E", "NKG7", "MS4A1"]),
    )
    convert_anndata(
        adata,
        tmp_path / "converted",
        label_key="cell_type",
        species="Homo sapiens",
        progress=False,
        card_writer=write_dataset_card,
    )

    text = (tmp_path / "converted" / "README.md").read_text()
    assert "One split of 7 cells." in text
    assert "| T | 3 |" in text and "| B | 2 |" in text and "| NK | 2 |" in text
    assert "- Genes: 4 (symbols only)" in text and "- Species: Homo sapiens" in text
    card = render_dataset_card(tmp_path / "converted", repo_id="org/pbmc-cells", license="cc-by-4.0")
    reparsed = DatasetCard(str(card), ignore_metadata_errors=False).data
    assert reparsed.license == "cc-by-4.0"
    assert reparsed.size_categories == ["n<1K"]
    assert "homo-sapiens" in reparsed.tags


def test_benchmark_figures_replace_the_runs_own_throughput(run_copy, tmp_path):
    benchmark = tmp_path / "benchmark.json"
    benchmark.write_text(json.dumps({"inference_cells_per_second": 45678.9, "train_cells_per_second": 2345.6}))
    text = str(render_model_card(run_copy, benchmark_file=benchmark))
    assert "| Inference throughput | 45,679 cells/s (benchmark) |" in text
    assert "| Training throughput | 2,346 cells/s (benchmark) |" in text
    assert "| Hardware | 2 CPU cores |" in text
