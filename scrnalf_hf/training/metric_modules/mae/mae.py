"""Mean absolute error as a local `evaluate` metric module (no Hub download needed).

Loaded with ``evaluate.load(<path to this folder>)``; see ``scrnalf_hf.training.metrics``.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Mean absolute error: the mean of |prediction - reference| over cells, in the references' units."

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of float): predicted values, one per cell.
    references (list of float): true values, one per cell.

Returns:
    mae (float): >= 0.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Mae(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}
            ),
        )

    def _compute(self, predictions, references):
        predictions = np.asarray(predictions, dtype=np.float64)
        references = np.asarray(references, dtype=np.float64)
        return {"mae": float(np.abs(predictions - references).mean()) if predictions.size else float("nan")}
