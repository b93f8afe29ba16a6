"""Classification and regression metrics through `evaluate`, loaded from modules shipped inside this package.

``evaluate.load("accuracy")`` would download the metric script from the Hub; the scripts in
``metric_modules/`` are loaded by local path instead, so metrics work offline
(``HF_HUB_OFFLINE=1``) and give the same numbers everywhere.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import evaluate
import numpy as np

METRIC_MODULES_DIR = Path(__file__).parent / "metric_modules"
METRIC_NAMES = ("accuracy", "f1", "confusion_matrix", "spearmanr", "mae")


@lru_cache(maxsize=None)
def load_metric(name: str) -> evaluate.EvaluationModule:
    """Load one of the bundled `evaluate` metric modules by name, without network access.

    Args:
        name: one of ``METRIC_NAMES``.
    """
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}; the bundled metrics are {METRIC_NAMES}.")
    return evaluate.load(str(METRIC_MODULES_DIR / name))


def classification_metrics(
    references: Sequence[int] | np.ndarray,
    predictions: Sequence[int] | np.ndarray,
    num_labels: int,
    *,
    per_class: bool = True,
) -> dict:
    """Accuracy, macro-F1 and (optionally) per-class F1 and the confusion matrix.

    Args:
        references: (n_cells,) true class ids in [0, num_labels).
        predictions: (n_cells,) predicted class ids in [0, num_labels).
        num_labels: number of classes of the task. Macro-F1 averages over all of them, so a class
            present in the references that is never predicted counts as F1 = 0, and classes
            absent from both this split's references and predictions are left out of the mean
            (as scikit-learn does for ``labels`` not seen).
        per_class: also return ``per_class_f1`` (list, length num_labels) and
            ``confusion_matrix`` (num_labels × num_labels, rows = true class).

    Returns:
        ``{"accuracy", "macro_f1"[, "per_class_f1", "confusion_matrix"]}``.
    """
    references = np.asarray(references, dtype=np.int64).ravel()
    predictions = np.asarray(predictions, dtype=np.int64).ravel()
    if references.shape != predictions.shape:
        raise ValueError(
            f"references and predictions must have one entry per cell; got {references.shape[0]} "
            f"references and {predictions.shape[0]} predictions."
        )
    if references.size == 0:
        raise ValueError("cannot score an empty split: no cells were given.")
    present = np.union1d(references, predictions)
    if present.min() < 0 or present.max() >= num_labels:
        raise ValueError(
            f"class ids must lie in [0, {num_labels}); found ids {present.min()}..{present.max()}."
        )
    accuracy = load_metric("accuracy").compute(predictions=predictions, references=references)["accuracy"]
    macro_f1 = load_metric("f1").compute(
        predictions=predictions, references=references, labels=present.tolist(), average="macro"
    )["f1"]
    result = {"accuracy": float(accuracy), "macro_f1": float(macro_f1)}
    if per_class:
        all_labels = list(range(num_labels))
        result["per_class_f1"] = load_metric("f1").compute(
            predictions=predictions, references=references, labels=all_labels, average=None
        )["f1"]
        result["confusion_matrix"] = load_metric("confusion_matrix").compute(
            predictions=predictions, references=references, labels=all_labels
        )["confusion_matrix"]
    return result


def regression_metrics(references: Sequence[float] | np.ndarray, predictions: Sequence[float] | np.ndarray) -> dict:
    """Spearman rank correlation and mean absolute error of continuous predictions (pseudotime).

    Args:
        references / predictions: (n_cells,) true and predicted values, in the same units.

    Returns:
        ``{"spearman", "mae"}``; ``spearman`` is NaN when the predictions are constant.
    """
    references = np.asarray(references, dtype=np.float64).ravel()
    predictions = np.asarray(predictions, dtype=np.float64).ravel()
    if references.shape != predictions.shape:
        raise ValueError(
            f"references and predictions must have one entry per cell; got {references.shape[0]} "
            f"references and {predictions.shape[0]} predictions."
        )
    if references.size == 0:
        raise ValueError("cannot score an empty split: no cells were given.")
    spearman = load_metric("spearmanr").compute(predictions=predictions, references=references)["spearmanr"]
    mae = load_metric("mae").compute(predictions=predictions, references=references)["mae"]
    return {"spearman": float(spearman), "mae": float(mae)}


def protein_metrics(references: np.ndarray, predictions: np.ndarray) -> dict:
    """Cross-modal prediction scores of (n_cells, P) protein levels (CLR units).

    ``pearson_median``: the median over proteins of the Pearson correlation between true and
    predicted levels across the cells (proteins constant in either are left out; NaN if every
    one is); ``rmse``: root mean squared error over every (cell, protein).
    Plain numpy: ``evaluate``'s ``pearsonr`` module scores one vector, not one correlation per
    protein column.
    """
    references = np.asarray(references, dtype=np.float64)
    predictions = np.asarray(predictions, dtype=np.float64)
    if references.shape != predictions.shape or references.ndim != 2:
        raise ValueError(
            f"references and predictions must both be (n_cells, n_proteins); got {references.shape} and {predictions.shape}."
        )
    if references.shape[0] == 0:
        raise ValueError("cannot score an empty split: no cells were given.")
    centred_true = references - references.mean(0)
    centred_predicted = predictions - predictions.mean(0)
    denominator = np.sqrt((centred_true**2).sum(0) * (centred_predicted**2).sum(0))  # (P,)
    valid = denominator > 0
    pearson = (centred_true * centred_predicted).sum(0)[valid] / denominator[valid]
    return {
        "pearson_median": float(np.median(pearson)) if pearson.size else float("nan"),
        "rmse": float(np.sqrt(np.mean((references - predictions) ** 2))),
    }


def make_compute_metrics(num_labels: int) -> Callable:
    """A ``compute_metrics`` function for `transformers.Trainer`.

    It receives an ``EvalPrediction`` whose ``predictions`` are logits (n_cells, num_labels)
    (or a tuple whose first element is) and returns ``accuracy`` and ``macro_f1`` — flat scalars,
    so Trainer can log them and select the best checkpoint on ``eval_macro_f1``.
    """

    def compute_metrics(eval_prediction) -> dict:
        logits = eval_prediction.predictions
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        predictions = np.asarray(logits).argmax(axis=-1)
        return classification_metrics(eval_prediction.label_ids, predictions, num_labels, per_class=False)

    return compute_metrics


def majority_class_metrics(train_labels: np.ndarray, eval_labels: np.ndarray, num_labels: int) -> dict:
    """Scores of always predicting the most frequent class of the training labels.

    The floor every model must clear: the first prototype's transformer sat exactly on it.
    """
    majority = int(np.bincount(np.asarray(train_labels, dtype=np.int64), minlength=num_labels).argmax())
    predictions = np.full(len(eval_labels), majority, dtype=np.int64)
    return classification_metrics(eval_labels, predictions, num_labels, per_class=False)
