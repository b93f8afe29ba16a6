"""Metrics through the bundled `evaluate` modules, and baselines scored on shared folds."""

import json
import os
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from scrnalf_hf.training.baselines import fit_baseline
from scrnalf_hf.training.cells import load_labelled_cells, stratified_folds
from scrnalf_hf.training.compare import compare, comparison_table, summarise
from scrnalf_hf.training.metrics import classification_metrics


def marker_adata(n_cells=150, n_genes=40, n_types=3, seed=0, marker_rate=10.0):
    """Integer counts; each cell type over-expresses its own block of 8 marker genes."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n_cells) % n_types
    rates = np.full((n_types, n_genes), 1.0)
    for cell_type in range(n_types):
        rates[cell_type, cell_type * 8 : cell_type * 8 + 8] = marker_rate
    counts = rng.poisson(rates[labels]).astype(np.float32)
    names = np.array([f"type{t}" for t in range(n_types)])
    obs = pd.DataFrame({"cell_type": pd.Categorical(names[labels])}, index=[f"cell{i}" for i in range(n_cells)])
    return ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=[f"GENE{i}" for i in range(n_genes)]))


def test_metrics_match_scikit_learn_including_absent_classes():
    references = np.array([0, 1, 2, 2, 1, 0, 3])
    predictions = np.array([0, 1, 1, 2, 0, 0, 3])
    result = classification_metrics(references, predictions, num_labels=5)
    assert result["accuracy"] == pytest.approx(accuracy_score(references, predictions))
    assert result["macro_f1"] == pytest.approx(f1_score(references, predictions, average="macro"))
    assert result["per_class_f1"] == pytest.approx(
        f1_score(references, predictions, labels=range(5), average=None, zero_division=0).tolist()
    )
    assert result["confusion_matrix"] == confusion_matrix(references, predictions, labels=range(5)).tolist()


def test_metrics_reject_mismatched_lengths_and_out_of_range_ids():
    with pytest.raises(ValueError, match="one entry per cell"):
        classification_metrics([0, 1], [0], num_labels=2)
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 2\)"):
        classification_metrics([0, 2], [0, 1], num_labels=2)


def test_metric_modules_load_offline_in_a_fresh_process(tmp_path):
    code = (
        "from scrnalf_hf.training.metrics import classification_metrics;"
        "print(classification_metrics([0,1,1],[0,1,0],2,per_class=False)['macro_f1'])"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) == pytest.approx(f1_score([0, 1, 1], [0, 1, 0], average="macro"))


def test_class_weighting_is_all_or_none():
    features = np.random.default_rng(0).random((30, 5))
    labels = np.arange(30) % 3
    with pytest.raises(ValueError, match="knn_pca has no class weighting"):
        fit_baseline("knn_pca", features, labels, features, class_weighting="balanced")
    balanced = fit_baseline("logreg", features, labels, features, class_weighting="balanced")
    assert balanced.predictions.shape == (30,)


def test_compare_gives_every_method_the_same_folds_and_writes_rows(tmp_path):
    cells = load_labelled_cells(marker_adata(), "cell_type")
    result = compare(cells, "logreg,knn_pca,random_forest", tmp_path, n_folds=3, seed=1)
    rows = json.loads((tmp_path / "comparison.json").read_text())
    assert {tuple(sorted(row)) for row in rows} == {
        ("accuracy", "fold", "macro_f1", "method", "n_parameters", "train_seconds")
    }
    assert sorted({row["method"] for row in rows}) == ["knn_pca", "logreg", "majority", "random_forest"]
    for method in ("logreg", "knn_pca", "random_forest", "majority"):
        assert sorted(row["fold"] for row in rows if row["method"] == method) == [0, 1, 2]
    # the out-of-fold predictions come from exactly the folds stratified_folds gives
    folds = stratified_folds(cells.labels, 3, seed=1)
    for fold, (_, test_index) in enumerate(folds):
        assert (result.folds[test_index] == fold).all()
        logreg_row = next(r for r in rows if r["method"] == "logreg" and r["fold"] == fold)
        assert logreg_row["accuracy"] == pytest.approx(
            accuracy_score(cells.labels[test_index], result.predictions["logreg"][test_index])
        )
    by_method = {entry["method"]: entry for entry in summarise(rows)}
    assert by_method["logreg"]["macro_f1"][0] > by_method["majority"]["macro_f1"][0] + 0.5
    assert (tmp_path / "comparison.png").stat().st_size > 0
    assert "± " in (tmp_path / "comparison.md").read_text()


def test_comparison_table_reports_mean_and_sample_std():
    rows = [
        {"method": "logreg", "fold": f, "accuracy": a, "macro_f1": m, "train_seconds": 1.0, "n_parameters": 10}
        for f, (a, m) in enumerate([(0.8, 0.6), (0.9, 0.8)])
    ]
    table = comparison_table(rows)
    assert "0.850 ± 0.071" in table and "0.700 ± 0.141" in table and "| 0.600 |" in table


def test_logistic_regression_reproduces_pbmc68k_reduced_bulk_labels():
    """Acceptance 1, baseline half: 5-fold stratified CV on .raw, ≈0.826 accuracy / ≈0.672 macro-F1."""
    import scanpy as sc

    cells = load_labelled_cells(sc.datasets.pbmc68k_reduced(), "bulk_labels")
    assert cells.matrix_name == "raw.X" and cells.input_kind == "log1p"
    scores = []
    for train_index, test_index in stratified_folds(cells.labels, 5, seed=0):
        dense = cells.matrix.toarray()
        fitted = fit_baseline("logreg", dense[train_index], cells.labels[train_index], dense[test_index])
        scores.append(classification_metrics(cells.labels[test_index], fitted.predictions, cells.n_classes, per_class=False))
    assert np.mean([s["accuracy"] for s in scores]) == pytest.approx(0.826, abs=0.01)
    assert np.mean([s["macro_f1"] for s in scores]) == pytest.approx(0.672, abs=0.01)
