"""F1 score as a local `evaluate` metric module (no Hub download needed).

Supports ``average="macro"`` (unweighted mean over classes), ``"micro"``, ``"weighted"`` and
``None`` (one score per class). Pass ``labels`` to fix the set of classes: a class absent from
both predictions and references in this split then scores 0, as in scikit-learn with
``zero_division=0``.
"""

import datasets
import evaluate
from sklearn.metrics import f1_score

_DESCRIPTION = "F1: harmonic mean of precision and recall, per class or averaged over classes."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted class ids, one per cell.
    references (list of int): true class ids, one per cell.
    labels (list of int, optional): the classes to score (default: those present).
    average (str or None): "macro" (default), "micro", "weighted" or None for per-class scores.
Returns:
    f1 (float, or list of float when average is None).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, labels=None, average="macro", sample_weight=None):
        score = f1_score(
            references, predictions, labels=labels, average=average,
            sample_weight=sample_weight, zero_division=0,
        )
        return {"f1": score.tolist() if average is None else float(score)}
