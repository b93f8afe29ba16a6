"""Metrics through the bundled `evaluate` modules, and baselines scored on shared folds."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
from helpers import marker_adata
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from scrnalf_hf.data import cross_validation_folds, open_cells
from scrnalf_hf.training.arguments import training_arguments
from scrnalf_hf.training.baselines import CLASSIFICATION_BASELINES, fit_baseline
from scrnalf_hf.training.compare import compare, comparison_table, summarise
from scrnalf_hf.training.finetune import read_targets
from scrnalf_hf.training.metrics import classification_metrics
from scrnalf_hf.training.tasks import CLASSIFICATION, MASKED_GENES


def marker_cells(**kwargs):
    cells = open_cells(marker_adata(**kwargs), label_key="cell_type", progress=False)
    return cells, read_targets(CLASSIFICATION, cells, "cell_type")


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
        fit_baseline("knn_pca", CLASSIFICATION_BASELINES, features, labels, features, class_weighting="balanced")
    balanced = fit_baseline("logreg", CLASSIFICATION_BASELINES, features, labels, features, class_weighting="balanced")
    assert balanced.predictions.shape == (30,)


@pytest.mark.parametrize("method", sorted(CLASSIFICATION_BASELINES))
def test_baselines_predict_the_same_from_sparse_and_dense_features(method):
    rng = np.random.default_rng(0)
    labels = np.arange(90) % 3
    features = rng.poisson(1.0, (90, 30)).astype(np.float32) * (1 + labels[:, None] * (np.arange(30) < 10))
    dense = fit_baseline(method, CLASSIFICATION_BASELINES, features, labels, features, seed=0)
    sparse = fit_baseline(method, CLASSIFICATION_BASELINES, sp.csr_matrix(features), labels, sp.csr_matrix(features), seed=0)
    np.testing.assert_array_equal(dense.predictions, sparse.predictions)


def test_compare_gives_every_method_the_same_folds_and_writes_rows(tmp_path):
    cells, targets = marker_cells()
    args = training_arguments(CLASSIFICATION, tmp_path / "runs")
    result = compare(CLASSIFICATION, cells, targets, "logreg,knn_pca,random_forest", tmp_path, args, n_folds=3, seed=1)
    rows = json.loads((tmp_path / "comparison.json").read_text())
    assert {tuple(sorted(row)) for row in rows} == {
        ("accuracy", "fold", "macro_f1", "method", "n_parameters", "train_seconds")
    }
    assert sorted({row["method"] for row in rows}) == ["knn_pca", "logreg", "majority", "random_forest"]
    for method in ("logreg", "knn_pca", "random_forest", "majority"):
        assert sorted(row["fold"] for row in rows if row["method"] == method) == [0, 1, 2]
    # the out-of-fold predictions come from exactly the stratified folds
    folds = cross_validation_folds(cells.n_cells, 3, seed=1, labels=targets.values)
    for fold, (_, test_index) in enumerate(folds):
        assert (result.folds[test_index] == fold).all()
        logreg_row = next(r for r in rows if r["method"] == "logreg" and r["fold"] == fold)
        assert logreg_row["accuracy"] == pytest.approx(
            accuracy_score(targets.values[test_index], result.predictions["logreg"][test_index])
        )
    by_method = {entry["method"]: entry for entry in summarise(rows, CLASSIFICATION)}
    assert by_method["logreg"]["macro_f1"][0] > by_method["majority"]["macro_f1"][0] + 0.5
    assert (tmp_path / "comparison.png").stat().st_size > 0
    assert "± " in (tmp_path / "comparison.md").read_text()


def test_comparison_table_reports_mean_and_sample_std():
    rows = [
        {"method": "logreg", "fold": f, "accuracy": a, "macro_f1": m, "train_seconds": 1.0, "n_parameters": 10}
        for f, (a, m) in enumerate([(0.8, 0.6), (0.9, 0.8)])
    ]
    table = comparison_table(rows, CLASSIFICATION)
    assert "0.850 ± 0.071" in table and "0.700 ± 0.141" in table and "| 0.600 |" in table
    single = comparison_table(rows[:1], CLASSIFICATION)
    assert "± " not in single and "| 0.800 | 0.600 |" in single  # one scored fold: no spread to show


def test_compare_on_a_separate_test_file_scores_only_the_labels_it_was_trained_on(tmp_path):
    cells, targets = marker_cells()
    test_adata = marker_adata(n_cells=60, seed=5, n_types=4, n_genes=40)  # type3 never seen in training
    test_cells = open_cells(test_adata, label_key="cell_type", progress=False)
    test_targets = read_targets(CLASSIFICATION, test_cells, "cell_type")
    result = compare(CLASSIFICATION, cells, targets, "logreg", tmp_path, training_arguments(CLASSIFICATION, tmp_path),
                     test_cells=test_cells, test_targets=test_targets)
    scored = result.folds >= 0
    assert scored.sum() == 45 and (test_adata.obs["cell_type"][~scored] == "type3").all()
    logreg = next(row for row in result.rows if row["method"] == "logreg")
    assert logreg["accuracy"] > 0.9
    assert "tested on anndata (45 cells)" in (tmp_path / "comparison.md").read_text()


def test_compare_refuses_a_task_without_predictions(tmp_path):
    cells, targets = marker_cells(n_cells=30)
    with pytest.raises(ValueError, match="makes none to score"):
        compare(MASKED_GENES, cells, targets, "tiny", tmp_path, training_arguments(MASKED_GENES, tmp_path))


def test_logistic_regression_reproduces_pbmc68k_reduced_bulk_labels():
    """Acceptance 1, baseline half: 5-fold stratified CV on .raw, ≈0.826 accuracy / ≈0.672 macro-F1."""
    import scanpy as sc

    from scrnalf_hf.data import fit_processor, panel_matrix

    cells = open_cells(sc.datasets.pbmc68k_reduced(), label_key="bulk_labels", progress=False)
    targets = read_targets(CLASSIFICATION, cells, "bulk_labels")
    assert cells.genes.matrix == "raw.X" and cells.input_kind == "log1p"
    scores = []
    for train_index, test_index in cross_validation_folds(cells.n_cells, 5, seed=0, labels=targets.values):
        processor = fit_processor(cells, train_index)
        fitted = fit_baseline(
            "logreg", CLASSIFICATION_BASELINES, panel_matrix(cells, train_index, processor), targets.values[train_index],
            panel_matrix(cells, test_index, processor),
        )
        scores.append(classification_metrics(targets.values[test_index], fitted.predictions, 10, per_class=False))
    assert np.mean([s["accuracy"] for s in scores]) == pytest.approx(0.826, abs=0.01)
    assert np.mean([s["macro_f1"] for s in scores]) == pytest.approx(0.672, abs=0.01)


def test_baselines_on_many_training_cells_fit_a_stratified_sample(caplog, monkeypatch):
    """Above max_train_cells the baselines see a stratified sample of that many cells (logged),
    and still score every test cell."""
    import logging

    from scrnalf_hf.data import fit_processor, open_cells
    from scrnalf_hf.training import finetune as finetune_module
    from scrnalf_hf.training.finetune import CellPart, fit_baselines, read_targets
    from scrnalf_hf.training.tasks import CLASSIFICATION

    cells = open_cells(marker_adata(n_cells=150), label_key="cell_type", progress=False)
    targets = read_targets(CLASSIFICATION, cells, "cell_type")
    train, test = np.arange(0, 120), np.arange(120, 150)
    processor = fit_processor(cells, train)
    seen = []
    fit_one = finetune_module.fit_baseline

    def recording(name, factories, train_features, train_targets, *args, **kwargs):
        seen.append(np.bincount(train_targets, minlength=3))
        return fit_one(name, factories, train_features, train_targets, *args, **kwargs)

    monkeypatch.setattr(finetune_module, "fit_baseline", recording)
    with caplog.at_level(logging.INFO, logger="scrnalf_hf.training.finetune"):
        rows, predictions = fit_baselines(CLASSIFICATION, processor, CellPart(cells, targets, train),
                                          CellPart(cells, targets, test), ["logreg"], max_train_cells=30)
    assert seen[0].sum() == 30 and seen[0].min() >= 9  # 3 balanced classes of 40: about 10 each
    assert len(predictions["logreg"]) == 30 and rows[0]["accuracy"] > 0.8
    assert "sample of 30 of the 120 training cells" in caplog.text
