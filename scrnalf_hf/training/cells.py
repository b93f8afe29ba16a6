"""Labelled cells for training and evaluation: read once, checked, split, and encoded.

A cell travels through training like this:

1. :func:`load_labelled_cells` reads an ``.h5ad`` file, an AnnData or a folder written by
   ``scrnalf convert`` into a :class:`LabelledCells` (an in-memory CSR matrix, gene names,
   integer labels). Bad labels are rejected here, before any model exists.
2. :func:`stratified_folds` / :func:`stratified_split` choose cells; :func:`check_split_sizes`
   rejects splits too small for the number of classes.
3. :func:`fit_processor` builds the processor (the model's gene panel and normalisation) and
   :func:`encode` turns the chosen cells into the dense (n_cells, G) ``expression`` matrix that
   both the transformer and the baselines receive. The gene graph is built by the caller from the
   encoded *training* cells only.

Nothing here looks at evaluation cells to fit anything.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.model_selection import StratifiedKFold, train_test_split

from ..processing_scrnalf import ScrnaLongformerProcessor

logger = logging.getLogger(__name__)

INPUT_KINDS = ("auto", "counts", "log1p")


@dataclass
class LabelledCells:
    """Cells with one class label each.

    Attributes:
        matrix: (n_cells, n_genes) CSR matrix, raw counts or log-normalised values.
        gene_symbols: (n_genes,) gene names of the matrix columns.
        gene_ids: (n_genes,) Ensembl ids, if the input had them.
        labels: (n_cells,) int64 class ids in [0, n_classes).
        label_names: class names; ``label_names[i]`` is class id ``i``.
        label_key: the ``obs`` column the labels came from.
        input_kind: ``"counts"`` or ``"log1p"`` (how the processor must normalise ``matrix``).
        matrix_name: where the matrix came from (``"raw.X"``, ``"layers['counts']"``, ``"X"``).
        dataset_name: a name for reports (file stem unless given).
        cell_ids: (n_cells,) ``obs_names``.
    """

    matrix: sp.csr_matrix
    gene_symbols: list[str]
    gene_ids: list[str] | None
    labels: np.ndarray
    label_names: list[str]
    label_key: str
    input_kind: str
    matrix_name: str
    dataset_name: str
    cell_ids: list[str]

    @property
    def n_cells(self) -> int:
        return self.matrix.shape[0]

    @property
    def n_classes(self) -> int:
        return len(self.label_names)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.label_names))


def _guess_input_kind(matrix: sp.csr_matrix) -> str:
    """``"counts"`` if every stored value is a non-negative integer, else ``"log1p"``."""
    values = matrix.data[: 1_000_000]
    return "counts" if values.size and np.array_equal(values, np.round(values)) else "log1p"


def check_labels(labels: np.ndarray, label_names: list[str], label_key: str, min_cells: int) -> None:
    """Raise ``ValueError`` if any class has fewer than ``min_cells`` cells or there is one class.

    Args:
        labels: (n_cells,) int class ids.
        min_cells: cells each class needs (2 for a stratified split, the fold count for CV).
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


def load_labelled_cells(
    source,
    label_key: str,
    *,
    layer: str | None = None,
    use_raw: bool = False,
    input_kind: str = "auto",
    min_cells_per_label: int | None = None,
    dataset_name: str | None = None,
) -> LabelledCells:
    """Read cells and their labels, checking the labels before anything is trained.

    Args:
        source: an AnnData, a ``.h5ad`` path, or a folder written by ``scrnalf convert``.
        label_key: ``obs`` column with the class of each cell.
        layer / use_raw: which matrix to read; by default the first present of
            ``layers["counts"]``, ``.raw.X``, ``X`` (the scverse places for raw counts).
        input_kind: ``"counts"``, ``"log1p"``, or ``"auto"`` (counts if all values are integers).
        min_cells_per_label: drop classes with fewer cells (logged); ``None`` keeps every class and
            leaves rare classes to be rejected by the split checks with a clear message.
        dataset_name: name for reports; defaults to the file or folder stem.

    Raises:
        ValueError: unknown ``label_key``, cells without a label, a single class.
    """
    if input_kind not in INPUT_KINDS:
        raise ValueError(f"input_kind must be one of {INPUT_KINDS}, got {input_kind!r}.")
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        matrix, symbols, ids, obs, matrix_name, stored_kind = _read_converted_folder(Path(source), label_key)
        if input_kind == "auto":
            input_kind = stored_kind
    else:
        from ..data.anndata_io import open_anndata

        with open_anndata(source, layer=layer, use_raw=use_raw, require_counts=True) as expression_source:
            chunks = [chunk for _, chunk in expression_source.row_chunks(50_000)]
            matrix = sp.vstack(chunks, format="csr") if chunks else sp.csr_matrix((0, expression_source.n_genes))
            symbols, ids = expression_source.gene_symbols, expression_source.gene_ids
            obs, matrix_name = expression_source.obs, expression_source.matrix_name
    if dataset_name is None:
        dataset_name = Path(source).stem if isinstance(source, (str, Path)) else "anndata"

    if label_key not in obs.columns:
        raise ValueError(
            f"label key {label_key!r} is not a column of obs; available columns: {list(obs.columns)}. "
            "Pass one of them with --label-key."
        )
    column = obs[label_key]
    missing = column.isna().to_numpy()
    if missing.any():
        raise ValueError(
            f"label column {label_key!r} has {int(missing.sum())} cell(s) without a label (first "
            f"{obs.index[missing][0]!r}); drop unlabelled cells (adata = adata[adata.obs[{label_key!r}].notna()]) first."
        )
    values = column.astype(str).to_numpy()
    label_names = sorted(set(values), key=str) if not hasattr(column, "cat") else [
        str(c) for c in column.cat.categories if (values == str(c)).any()
    ]
    index = {name: i for i, name in enumerate(label_names)}
    labels = np.array([index[v] for v in values], dtype=np.int64)
    keep = np.ones(len(labels), dtype=bool)
    if min_cells_per_label is not None:
        counts = np.bincount(labels, minlength=len(label_names))
        dropped = [label_names[i] for i in np.flatnonzero(counts < min_cells_per_label)]
        if dropped:
            logger.warning("dropping %d class(es) with fewer than %d cells: %s", len(dropped), min_cells_per_label, dropped)
            keep = counts[labels] >= min_cells_per_label
            label_names = [name for name in label_names if name not in dropped]
            index = {name: i for i, name in enumerate(label_names)}
            labels = np.array([index[v] for v in values[keep]], dtype=np.int64)
    check_labels(labels, label_names, label_key, min_cells=2)

    matrix = sp.csr_matrix(matrix)[keep] if not keep.all() else sp.csr_matrix(matrix)
    matrix = matrix.astype(np.float32)
    kind = _guess_input_kind(matrix) if input_kind == "auto" else input_kind
    logger.info(
        "read %d cells × %d genes from %s (%s), %d classes in %r",
        matrix.shape[0], matrix.shape[1], matrix_name, kind, len(label_names), label_key,
    )
    return LabelledCells(
        matrix=matrix,
        gene_symbols=list(symbols),
        gene_ids=None if ids is None else list(ids),
        labels=labels,
        label_names=label_names,
        label_key=label_key,
        input_kind=kind,
        matrix_name=matrix_name,
        dataset_name=dataset_name,
        cell_ids=[str(c) for c, k in zip(obs.index, keep) if k],
    )


def _read_converted_folder(folder: Path, label_key: str | None = None):
    """Read a ``scrnalf convert`` folder back into a CSR matrix, genes, obs (the ``label``
    column renamed to the ``label_key`` it was converted from) and the stored input kind."""
    import json

    import datasets
    import pandas as pd

    from ..data.convert import GENES_FILE, dataset_genes

    genes = dataset_genes(folder)
    converted_label_key = json.loads((folder / GENES_FILE).read_text()).get("label_key")
    dataset = datasets.load_from_disk(str(folder))
    columns = dataset.column_names
    indices = dataset["indices"]
    values = dataset["values"]
    indptr = np.zeros(len(indices) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(row) for row in indices])
    matrix = sp.csr_matrix(
        (np.concatenate(values).astype(np.float32), np.concatenate(indices).astype(np.int64), indptr),
        shape=(len(indices), genes.n_genes),
    )
    obs_columns = [c for c in columns if c not in ("indices", "values", "library_size", "length")]
    obs = pd.DataFrame({c: dataset[c] for c in obs_columns})
    for column in obs_columns:
        feature = dataset.features[column]
        if isinstance(feature, datasets.ClassLabel):
            obs[column] = pd.Categorical.from_codes(obs[column], categories=feature.names)
    if "cell_id" in obs.columns:
        obs.index = obs.pop("cell_id").astype(str).to_numpy()
    if "label" in obs.columns and converted_label_key and converted_label_key not in obs.columns:
        obs = obs.rename(columns={"label": converted_label_key})
    return matrix, genes.gene_symbols, genes.gene_ids, obs, f"{folder.name} (scrnalf convert, {genes.matrix})", genes.input_kind


def check_split_sizes(labels: np.ndarray, n_classes: int, n_folds: int, what: str = "fold") -> None:
    """Raise ``ValueError`` if a split would hold fewer cells than there are classes.

    Args:
        labels: (n_cells,) class ids of the cells being split.
        n_folds: number of cross-validation folds (or 1/fraction for a single held-out split).
    """
    cells_per_fold = len(labels) // n_folds
    if cells_per_fold < n_classes:
        raise ValueError(
            f"each {what} would hold about {cells_per_fold} cells ({len(labels)} cells / {n_folds}) but there "
            f"are {n_classes} classes, so most classes could not be scored in it. Use fewer folds "
            f"(at most {max(1, len(labels) // n_classes)}), more cells, or fewer classes."
        )


def stratified_folds(labels: np.ndarray, n_folds: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified K-fold cell indices, shuffled with ``seed``: ``[(train_index, test_index), ...]``.

    Every method of a comparison receives exactly these folds.
    """
    if n_folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {n_folds}.")
    n_classes = int(labels.max()) + 1
    check_split_sizes(labels, n_classes, n_folds)
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return [(train, test) for train, test in splitter.split(np.zeros(len(labels)), labels)]


def stratified_split(index: np.ndarray, labels: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split ``index`` (cell indices) into (kept, held_out), stratified by ``labels[index]``:
    ``fraction`` of the cells held out, but at least one cell per class. Classes with a single
    cell stay in ``kept``."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"a held-out fraction must lie in (0, 1), got {fraction}.")
    index = np.asarray(index)
    sub_labels = labels[index]
    counts = np.bincount(sub_labels)
    splittable = counts[sub_labels] >= 2
    n_classes = len(np.unique(sub_labels[splittable]))
    n_splittable = int(splittable.sum())
    n_held_out = max(int(round(fraction * n_splittable)), n_classes)
    if n_splittable - n_held_out < n_classes:
        raise ValueError(
            f"{len(index)} cells of {len(counts[counts > 0])} classes are too few to hold out one cell per class "
            "and keep one per class for training; use more cells or fewer classes."
        )
    kept, held_out = train_test_split(
        index[splittable], test_size=n_held_out, stratify=sub_labels[splittable], random_state=seed
    )
    return np.sort(np.concatenate([kept, index[~splittable]])), np.sort(held_out)


def fit_processor(cells: LabelledCells, **kwargs) -> ScrnaLongformerProcessor:
    """A processor whose gene panel is every gene of ``cells`` and whose normalisation matches
    ``cells.input_kind``. Normalisation is per cell (library size, log1p), so it learns nothing
    from other cells; the gene graph is built separately from training cells only."""
    return ScrnaLongformerProcessor(
        gene_symbols=cells.gene_symbols, gene_ids=cells.gene_ids, input_kind=cells.input_kind, **kwargs
    )


def encode(processor: ScrnaLongformerProcessor, cells: LabelledCells, index: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Processor output for the chosen cells: ``expression`` (n, G) float32 and
    ``attention_mask`` (n, G) int64, in the processor's gene order.

    Raises:
        ValueError: from the processor, when the cells' genes overlap its panel too little.
    """
    matrix = cells.matrix if index is None else cells.matrix[np.asarray(index)]
    features = processor(matrix, gene_names=cells.gene_symbols, gene_ids=cells.gene_ids, return_tensors="np")
    return {"expression": features["expression"], "attention_mask": features["attention_mask"]}


class CellDataset(torch.utils.data.Dataset):
    """Encoded cells as a map-style dataset of ``{"expression", "attention_mask"[, "labels"]}``
    rows, collated by transformers' default collator into (batch, G) tensors."""

    def __init__(self, expression: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray | None = None):
        self.expression = torch.from_numpy(np.ascontiguousarray(expression, dtype=np.float32))
        self.attention_mask = torch.from_numpy(np.ascontiguousarray(attention_mask, dtype=np.int64))
        self.labels = None if labels is None else torch.from_numpy(np.asarray(labels, dtype=np.int64))

    def __len__(self) -> int:
        return self.expression.shape[0]

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        row = {"expression": self.expression[item], "attention_mask": self.attention_mask[item]}
        if self.labels is not None:
            row["labels"] = self.labels[item]
        return row
