"""Confusion matrix as a local `evaluate` metric module (no Hub download needed).

Row i, column j counts cells whose true class is ``labels[i]`` and predicted class is
``labels[j]``; shape (n_classes, n_classes).
"""

import datasets
import evaluate
from sklearn.metrics import confusion_matrix

_DESCRIPTION = "Confusion matrix: counts of (true class, predicted class) pairs."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted class ids, one per cell.
    references (list of int): true class ids, one per cell.
    labels (list of int, optional): the classes, in row/column order (default: those present).
Returns:
    confusion_matrix (list of list of int): shape (n_classes, n_classes), rows = true class.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ConfusionMatrix(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, labels=None, sample_weight=None):
        matrix = confusion_matrix(references, predictions, labels=labels, sample_weight=sample_weight)
        return {"confusion_matrix": matrix.tolist()}
