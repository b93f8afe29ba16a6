"""Stratified train / validation / test splits, and fitting data-dependent state on train only.

The processor's normalisation is per cell (library-size scaling then log1p) and has no
dataset-level statistics to fit; the one data-dependent piece of a model is its gene–gene kNN
graph, which :func:`gene_graph_from_training` builds from training cells only, so that
validation and test cells never shape the model (a leak of the first prototype).
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import numpy as np

from ..processing_scrnalf import ScrnaLongformerProcessor
from .collators import GenePanelCollator
from .convert import DatasetGenes


def stratified_split(
    labels: Sequence | np.ndarray, validation_size: float = 0.1, test_size: float = 0.1, seed: int = 0
) -> dict[str, np.ndarray]:
    """Splits cell positions so that every label is represented in every split.

    Each label's cells are shuffled (seeded) and ``round(size × n)`` of them, at least one,
    go to each non-empty held-out split; the rest (at least one) train.

    Args:
        labels: (n_cells,) label of each cell (any hashable values).
        validation_size, test_size: fractions in [0, 1) of each label's cells; 0 skips a split.
        seed: seed of the shuffle.

    Returns:
        ``{"train", "validation", "test"}`` → sorted int64 cell positions (empty for a skipped split).

    Raises:
        ValueError: a label has too few cells to appear in every split.
    """
    if not (0 <= validation_size < 1 and 0 <= test_size < 1 and validation_size + test_size < 1):
        raise ValueError(
            f"validation_size and test_size must lie in [0, 1) and sum below 1, got {validation_size} and {test_size}."
        )
    labels = np.asarray(labels)
    held_out = {"validation": validation_size, "test": test_size}
    needed = 1 + sum(size > 0 for size in held_out.values())
    names, counts = np.unique(labels, return_counts=True)
    too_small = {str(name): int(count) for name, count in zip(names, counts) if count < needed}
    if too_small:
        raise ValueError(
            f"labels with fewer than {needed} cells cannot appear in every split: {too_small}. "
            "Drop or merge these labels, or set validation_size / test_size to 0."
        )
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "validation": [], "test": []}
    for name in names:
        cells = rng.permutation(np.flatnonzero(labels == name))
        sizes = {split: max(1, round(size * len(cells))) if size > 0 else 0 for split, size in held_out.items()}
        while len(cells) - sum(sizes.values()) < 1:  # keep a training cell; every split keeps one too
            sizes[max(sizes, key=sizes.get)] -= 1
        start = 0
        for split, size in sizes.items():
            parts[split].append(cells[start : start + size])
            start += size
        parts["train"].append(cells[start:])
    return {split: np.sort(np.concatenate(p)) if p else np.empty(0, np.int64) for split, p in parts.items()}


def split_dataset(
    dataset: datasets.Dataset,
    label_column: str = "label",
    validation_size: float = 0.1,
    test_size: float = 0.1,
    seed: int = 0,
) -> datasets.DatasetDict:
    """A converted dataset → ``DatasetDict`` of train / validation / test, stratified by label.

    Splits of size 0 are left out of the result.
    """
    if label_column not in dataset.column_names:
        raise ValueError(f"column {label_column!r} not in the dataset; its columns are {dataset.column_names}.")
    positions = stratified_split(np.asarray(dataset[label_column]), validation_size, test_size, seed)
    return datasets.DatasetDict({split: dataset.select(rows) for split, rows in positions.items() if len(rows)})


def gene_graph_from_training(
    processor: ScrnaLongformerProcessor,
    train_dataset: datasets.Dataset,
    genes: DatasetGenes,
    k: int,
    max_cells: int = 5000,
    batch_size: int = 1024,
    seed: int = 0,
) -> np.ndarray:
    """The model's gene kNN graph from the training split only.

    Args:
        processor: the model's processor.
        train_dataset: the training split of a converted dataset (never validation or test).
        genes: the dataset's gene list.
        k: neighbours per gene, itself included (the config's ``knn_k``).
        max_cells: training cells sampled (seeded) to bound time and memory.
        batch_size: cells densified at a time.

    Returns:
        (G, k) int64 neighbour table, ``-1`` = padding (``processor.build_gene_graph``).
    """
    n_cells = len(train_dataset)
    if n_cells == 0:
        raise ValueError("the training dataset is empty; the gene graph needs training cells.")
    rows = np.arange(n_cells)
    if n_cells > max_cells:
        rows = np.sort(np.random.default_rng(seed).choice(n_cells, max_cells, replace=False))
    collator = GenePanelCollator(processor, genes)
    needed = train_dataset.select_columns(["indices", "values", "library_size"])
    expression = np.concatenate(
        [
            collator([needed[int(r)] for r in rows[start : start + batch_size]])["expression"].numpy()
            for start in range(0, len(rows), batch_size)
        ]
    )  # (cells, G) normalised
    return processor.build_gene_graph(expression, k, max_cells=max_cells, seed=seed)
