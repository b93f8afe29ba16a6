"""Choosing cells: one split function, cross-validation folds, and the checks that come first.

Every split is a set of row positions into one dataset. With class labels the split is
stratified (every class keeps cells on both sides); without them (masked gene modelling,
regression heads) it is a seeded random draw. Nothing fitted to data — the processor's gene
panel, highly variable genes, the gene graph, the baselines — ever sees the held-out side
(a leak of the first prototype).
"""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import KFold, StratifiedKFold, train_test_split


def check_class_sizes(labels: np.ndarray, label_names: list[str], label_key: str, min_cells: int) -> None:
    """Raise ``ValueError`` if there is a single class or a class has fewer than ``min_cells`` cells.

    Args:
        labels: (n_cells,) int class ids.
        min_cells: cells each class needs (2 for a held-out split, the fold count for CV).
    """
    counts = np.bincount(labels, minlength=len(label_names))
    if len(label_names) < 2:
        raise ValueError(
            f"label column {label_key!r} has a single class ({label_names!r}); classification needs at "
            "least two. Choose another --label-key."
        )
    rare = [(label_names[i], int(c)) for i, c in enumerate(counts) if c < min_cells]
    if rare:
        listed = ", ".join(f"{name!r} ({count} cell{'s' if count != 1 else ''})" for name, count in rare)
        raise ValueError(
            f"label column {label_key!r}: every class needs at least {min_cells} cells for stratified "
            f"splitting, but {listed} {'has' if len(rare) == 1 else 'have'} fewer. Remove or merge these "
            "classes, use fewer folds, or pass --min-cells-per-label N to drop classes below N cells."
        )


def check_split_sizes(n_cells: int, n_classes: int, n_parts: int, what: str = "fold") -> None:
    """Raise ``ValueError`` if each of ``n_parts`` parts would hold fewer cells than there are classes."""
    cells_per_part = n_cells // n_parts
    if cells_per_part < n_classes:
        raise ValueError(
            f"each {what} would hold about {cells_per_part} cells ({n_cells} cells / {n_parts}) but there "
            f"are {n_classes} classes, so most classes could not be scored in it. Use fewer folds "
            f"(at most {max(1, n_cells // n_classes)}), more cells, or fewer classes."
        )


def split_off(
    positions: np.ndarray, fraction: float, *, seed: int = 0, labels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``positions`` into ``(kept, held_out)`` with ``fraction`` of them held out.

    Args:
        positions: (n,) row positions to split.
        fraction: share held out, in (0, 1).
        seed: seed of the draw.
        labels: (n_rows,) class ids indexed by position, or None for a random split. With labels
            the split is stratified (scikit-learn's ``train_test_split``) and holds out at least as
            many cells as there are classes; classes with a single cell stay in ``kept``.

    Returns:
        Sorted int64 positions ``(kept, held_out)``.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"a held-out fraction must lie in (0, 1), got {fraction}.")
    positions = np.asarray(positions, dtype=np.int64)
    if labels is None:
        order = np.random.default_rng(seed).permutation(positions)
        n_held_out = min(max(1, int(round(fraction * len(positions)))), len(positions) - 1)
        if n_held_out < 1:
            raise ValueError(f"{len(positions)} cells are too few to hold any out; use more cells.")
        return np.sort(order[n_held_out:]), np.sort(order[:n_held_out])
    sub_labels = labels[positions]
    counts = np.bincount(sub_labels)
    splittable = counts[sub_labels] >= 2
    n_classes = len(np.unique(sub_labels[splittable]))
    n_splittable = int(splittable.sum())
    n_held_out = max(int(round(fraction * n_splittable)), n_classes)
    if n_splittable - n_held_out < n_classes:
        raise ValueError(
            f"{len(positions)} cells of {len(counts[counts > 0])} classes are too few to hold out one cell per class "
            "and keep one per class for training; use more cells or fewer classes."
        )
    kept, held_out = train_test_split(
        positions[splittable], test_size=n_held_out, stratify=sub_labels[splittable], random_state=seed
    )
    return np.sort(np.concatenate([kept, positions[~splittable]])), np.sort(held_out)


def cross_validation_folds(
    n_cells: int, n_folds: int, *, seed: int = 0, labels: np.ndarray | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """K folds of row positions ``[(train, test), ...]``, shuffled with ``seed``; stratified when
    ``labels`` (n_cells,) are given. Every method of a comparison receives exactly these folds."""
    if n_folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {n_folds}.")
    if labels is None:
        if n_cells < n_folds:
            raise ValueError(f"{n_cells} cells cannot fill {n_folds} folds; use fewer folds.")
        splitter = KFold(n_splits=n_folds, shuffle=True, random_state=seed)
    else:
        check_split_sizes(n_cells, int(labels.max()) + 1, n_folds)
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(n_cells), labels))


__all__ = ["check_class_sizes", "check_split_sizes", "cross_validation_folds", "split_off"]
