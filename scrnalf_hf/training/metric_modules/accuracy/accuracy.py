"""Accuracy as a local `evaluate` metric module (no Hub download needed).

Loaded with ``evaluate.load(<path to this folder>)``; see ``scrnalf_hf.training.metrics``.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy: the fraction of cells whose predicted label equals the reference label."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted class ids, one per cell.
    references (list of int): true class ids, one per cell.
    sample_weight (list of float, optional): per-cell weights.
Returns:
    accuracy (float): in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, sample_weight=None):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        correct = (predictions == references).astype(np.float64)
        if sample_weight is None:
            return {"accuracy": float(correct.mean()) if correct.size else 0.0}
        sample_weight = np.asarray(sample_weight, dtype=np.float64)
        return {"accuracy": float((correct * sample_weight).sum() / sample_weight.sum())}
