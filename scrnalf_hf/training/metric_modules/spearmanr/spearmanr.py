"""Spearman rank correlation as a local `evaluate` metric module (no Hub download needed).

Loaded with ``evaluate.load(<path to this folder>)``; see ``scrnalf_hf.training.metrics``.
"""

import datasets
import evaluate
import numpy as np
from scipy.stats import spearmanr

_DESCRIPTION = (
    "Spearman's rank correlation between predicted and reference values (e.g. pseudotime): 1 when "
    "the predictions order the cells exactly as the references do, whatever their scale."
)

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of float): predicted values, one per cell.
    references (list of float): true values, one per cell.

Returns:
    spearmanr (float): in [-1, 1]; NaN when either side is constant.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Spearmanr(evaluate.Metric):
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
        if np.ptp(predictions) == 0 or np.ptp(references) == 0:
            return {"spearmanr": float("nan")}
        return {"spearmanr": float(spearmanr(references, predictions).statistic)}
