"""Classical baselines scored on exactly the same splits and input matrix as the transformer.

Every baseline receives the (n_cells, n_genes) matrix that the processor produces for the model
(same gene panel, same normalisation, chosen on the training cells only) as a sparse matrix —
normalisation keeps zeros at zero, so it costs what the data costs, not cells × genes — is
fitted on the training cells only, and gets no tuning the transformer lacks: class weighting is
one switch that applies to every method of a comparison or to none (``class_weighting``).

Each task declares which baselines apply to it (:mod:`~scrnalf_hf.training.tasks`).
Trajectory (``REGRESSION_BASELINES``): ``ridge``, scikit-learn ``Ridge(alpha=1.0)`` on the matrix
as is, regressing each cell's pseudotime (or time). Classification (``CLASSIFICATION_BASELINES``):

- ``majority``: always the most frequent training class — the floor every model must clear.
- ``logreg``: scikit-learn ``LogisticRegression(max_iter=1000)`` on the matrix as is (the
  roadmap's champion; 0.826 accuracy / 0.674 macro-F1 on pbmc68k_reduced ``bulk_labels``).
- ``random_forest``: 300 trees, default depth.
- ``knn_pca``: PCA to 50 components fitted on the training cells, then 15 nearest neighbours.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import PCA
from sklearn.dummy import DummyClassifier
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline

CLASS_WEIGHTINGS = (None, "balanced")


def _majority(seed: int, class_weighting: str | None):
    return DummyClassifier(strategy="most_frequent")


def _logreg(seed: int, class_weighting: str | None):
    return LogisticRegression(max_iter=1000, class_weight=class_weighting, random_state=seed)


def _random_forest(seed: int, class_weighting: str | None):
    return RandomForestClassifier(n_estimators=300, class_weight=class_weighting, random_state=seed, n_jobs=-1)


def _knn_pca(seed: int, class_weighting: str | None):
    if class_weighting is not None:
        raise ValueError(
            f"knn_pca has no class weighting, but class_weighting={class_weighting!r} was asked "
            "for; drop knn_pca from --methods or compare every method without class weights."
        )
    return _KnnOnPca(seed)


class _KnnOnPca:
    """PCA (50 components, fitted on training cells) followed by a 15-nearest-neighbour vote."""

    def __init__(self, seed: int, n_components: int = 50, n_neighbors: int = 15):
        self.seed, self.n_components, self.n_neighbors = seed, n_components, n_neighbors

    def fit(self, features, labels: np.ndarray) -> "_KnnOnPca":
        features = _dense(features)
        n_components = min(self.n_components, features.shape[0] - 1, features.shape[1])
        n_neighbors = min(self.n_neighbors, features.shape[0])
        self.pipeline = make_pipeline(
            PCA(n_components=n_components, random_state=self.seed),
            KNeighborsClassifier(n_neighbors=n_neighbors),
        ).fit(features, labels)
        return self

    def predict(self, features) -> np.ndarray:
        return self.pipeline.predict(_dense(features))


def _dense(features) -> np.ndarray:
    """PCA needs a dense matrix; kNN on PCA is meant for datasets small enough to hold one."""
    return features.toarray() if sp.issparse(features) else np.asarray(features)


CLASSIFICATION_BASELINES: dict[str, Callable] = {
    "majority": _majority,
    "logreg": _logreg,
    "random_forest": _random_forest,
    "knn_pca": _knn_pca,
}


def _ridge(seed: int, class_weighting: str | None):
    if class_weighting is not None:
        raise ValueError(f"class weighting applies to classification, not to ridge regression; got {class_weighting!r}.")
    return Ridge(alpha=1.0, random_state=seed)


REGRESSION_BASELINES: dict[str, Callable] = {"ridge": _ridge}


@dataclass
class BaselineResult:
    """What one baseline fit on one split produced."""

    predictions: np.ndarray  # (n_eval,) point predictions (class ids for classification, values for regression)
    train_seconds: float
    n_parameters: int
    train_cpu_seconds: float = float("nan")  # CPU seconds of the fit, every thread (energy estimates)


def count_parameters(estimator) -> int:
    """Number of fitted numbers the estimator needs to predict (its size, for the comparison table).

    Random forest: total tree nodes (each holds a split or a leaf value). kNN on PCA: PCA
    components and mean + the stored projected training cells. Majority class: 1. Any other
    scikit-learn estimator (e.g. a task's regression baselines): the sizes of its fitted arrays
    (attributes ending in ``_``, such as ``coef_`` and ``intercept_``).
    """
    if isinstance(estimator, RandomForestClassifier):
        return int(sum(tree.tree_.node_count for tree in estimator.estimators_))
    if isinstance(estimator, _KnnOnPca):
        pca, knn = estimator.pipeline[0], estimator.pipeline[1]
        return int(pca.components_.size + pca.mean_.size + knn.n_samples_fit_ * pca.n_components_)
    if isinstance(estimator, DummyClassifier):
        return 1
    fitted = [value for name, value in vars(estimator).items() if name.endswith("_") and not name.startswith("_")]
    return int(sum(np.size(value) for value in fitted if isinstance(value, (np.ndarray, float, int)) and not isinstance(value, bool)))


PREDICT_CHUNK = 10_000


def fit_baseline(
    name: str,
    factories: dict[str, Callable],
    train_features,
    train_targets: np.ndarray,
    eval_features,
    *,
    seed: int = 0,
    class_weighting: str | None = None,
) -> BaselineResult:
    """Fit baseline ``name`` on the training cells and predict the evaluation cells.

    Args:
        name: a key of ``factories`` (the task's baselines).
        factories: name -> ``factory(seed, class_weighting)`` of an estimator.
        train_features: (n_train, n_genes) processor output of the training cells (sparse or dense).
        train_targets: (n_train,) targets (class ids for classification).
        eval_features: (n_eval, n_genes) from the same processor, or anything with that
            ``shape`` whose row slices are such matrices.
        seed: random state of the estimator.
        class_weighting: ``None`` or ``"balanced"``; must be the same for every method compared.
    """
    if name not in factories:
        raise ValueError(f"unknown baseline {name!r}; choose from {sorted(factories)}.")
    if class_weighting not in CLASS_WEIGHTINGS:
        raise ValueError(f"class_weighting must be one of {CLASS_WEIGHTINGS}, got {class_weighting!r}.")
    if train_features.shape[1] != eval_features.shape[1]:
        raise ValueError(
            f"training and evaluation matrices must share the gene panel; got "
            f"{train_features.shape[1]} and {eval_features.shape[1]} genes."
        )
    estimator = factories[name](seed, class_weighting)
    start, start_cpu = time.perf_counter(), time.process_time()
    estimator.fit(train_features, train_targets)
    train_seconds, train_cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    # In chunks: scikit-learn predicts on a float64 copy of what it is given.
    chunks = range(0, eval_features.shape[0], PREDICT_CHUNK) or [0]
    predictions = np.concatenate([np.asarray(estimator.predict(eval_features[start : start + PREDICT_CHUNK])) for start in chunks])
    return BaselineResult(predictions, train_seconds, count_parameters(estimator), train_cpu_seconds)
