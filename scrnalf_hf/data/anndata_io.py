"""Reading AnnData for conversion: choose the expression matrix, check it, iterate rows in chunks.

An :class:`ExpressionSource` is the one view the rest of ``scrnalf_hf.data`` has of an AnnData,
whether it is in memory or a ``.h5ad`` file on disk. For files, the matrix is read straight from
HDF5 one row chunk at a time (CSR or dense), so memory stays bounded however many cells the
file holds; ``obs`` and ``var`` are read in full (they are small next to the matrix).

Where the matrix comes from (``layer`` / ``use_raw``):

- ``layer="NAME"`` → ``layers["NAME"]``; ``layer="X"`` → ``X``; ``use_raw=True`` → ``.raw.X``;
- neither, when counts are required → the first present of ``layers["counts"]``, ``.raw.X``,
  ``X`` (the scverse places for raw counts);
- neither, when counts are not required → ``X``.

Gene names (:func:`gene_names_from_var`): Ensembl ids, where ``.var`` has them, are the gene key
and must be unique; symbols may repeat and are made unique the way ``var_names_make_unique``
does it, so that every reader of an AnnData (``convert``, ``finetune``, ``pretrain``) sees one
name per gene, as a model's gene panel requires.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem, sparse_dataset

from ..processing_scrnalf import GENE_ID_COLUMNS, gene_id_match_key, make_unique, repeated_keys

COUNTS_LAYER = "counts"

logger = logging.getLogger(__name__)


def read_anndata(path: str | Path, backed: bool = False) -> ad.AnnData:
    """Reads a ``.h5ad`` file, in memory or backed (``backed=True``: ``X`` stays on disk).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a readable ``.h5ad`` (not HDF5, truncated, wrong layout).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no AnnData file at {path}; expected an existing .h5ad file.")
    try:
        return ad.read_h5ad(path, backed="r" if backed else None)
    except Exception as error:  # h5py and anndata raise many types for a damaged file
        raise ValueError(
            f"could not read {path} as an AnnData .h5ad file ({type(error).__name__}: {error}); "
            "check that the file is complete and was written by anndata (adata.write_h5ad)."
        ) from error


def _open_h5ad(path: Path) -> h5py.File:
    if not path.is_file():
        raise FileNotFoundError(f"no AnnData file at {path}; expected an existing .h5ad file.")
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise ValueError(
            f"could not open {path} as an HDF5 .h5ad file ({error}); check that the file is complete "
            "and was written by anndata (adata.write_h5ad)."
        ) from error
    if "obs" not in handle or "var" not in handle:
        handle.close()
        raise ValueError(f"{path} is an HDF5 file but not an AnnData .h5ad: it has no 'obs' or 'var' group.")
    return handle


def gene_names_from_var(var: pd.DataFrame, gene_id_key: str | None = None) -> tuple[list[str], list[str] | None]:
    """Gene symbols (``var_names``, made unique) and Ensembl ids (``var[gene_id_key]`` or a usual id column).

    The ids, where present, are the gene key: a repeated id (compared without its version
    suffix, ``ENSG…1.2`` = ``ENSG…1.3``, as models match ids) is an error. Symbols may repeat
    (10x tables list e.g. ``Rp1`` twice): repeats (compared case-insensitively, as models match
    symbols) get the suffixes of ``anndata``'s ``var_names_make_unique`` (``Rp1``, ``Rp1-1``), so
    that a gene panel built from them has one name per gene. Without ids a ``UserWarning`` names
    the renamed genes, because matching by symbol then depends on the new names.

    Returns:
        ``(gene_symbols, gene_ids)``; ``gene_ids`` is ``None`` when ``.var`` has no id column.

    Raises:
        ValueError: ``gene_id_key`` is not a column, or the id column repeats an id.
    """
    if gene_id_key is None:
        gene_id_key = next((column for column in GENE_ID_COLUMNS if column in var.columns), None)
    elif gene_id_key not in var.columns:
        raise ValueError(f"gene_id_key {gene_id_key!r} is not a column of .var; columns: {list(var.columns)}.")
    symbols = [str(name) for name in var.index]
    ids = None if gene_id_key is None else [str(value) for value in var[gene_id_key]]
    if ids is not None:
        repeated_ids = repeated_keys([gene_id_match_key(gene_id) for gene_id in ids])
        if repeated_ids:
            raise ValueError(
                f".var[{gene_id_key!r}] is the gene key but repeats {len(repeated_ids)} gene id(s) (ignoring "
                f"version suffixes): {repeated_ids[:10]}; each id must name one gene. Drop or sum the repeated "
                f"genes first, or pick another id column with gene_id_key= (--gene-id-key)."
            )
    unique_symbols = make_unique(symbols)
    renamed = [(old, new) for old, new in zip(symbols, unique_symbols) if old != new]
    if renamed:
        shown = ", ".join(f"{old!r} → {new!r}" for old, new in renamed[:10])
        if ids is None:
            warnings.warn(
                f"{len(renamed)} gene symbol(s) repeat (case-insensitively) and .var has no gene id column, so the "
                f"repeats were renamed as var_names_make_unique would: {shown}. Genes are matched to a model by "
                "these names; pass gene_id_key= (--gene-id-key) if .var holds Ensembl ids.",
                UserWarning,
                stacklevel=3,
            )
        else:
            logger.info("genes are keyed by .var[%r]; repeated symbols renamed: %s", gene_id_key, shown)
    return unique_symbols, ids


@dataclass
class ExpressionSource:
    """The chosen expression matrix of an AnnData, with its cells and genes.

    Attributes:
        matrix: (n_cells, n_genes) — a numpy array, a scipy sparse matrix, or an open HDF5
            group / dataset for files (read through :meth:`row_chunks`).
        obs: per-cell annotations, indexed by cell id.
        gene_symbols: the matrix's gene names (``var_names``), length n_genes.
        gene_ids: Ensembl ids from ``.var`` if present.
        matrix_name: where the matrix came from, e.g. ``"layers['counts']"`` (for messages).
        path: the ``.h5ad`` file for file sources, else ``None``.
    """

    matrix: Any
    obs: pd.DataFrame
    gene_symbols: list[str]
    gene_ids: list[str] | None
    matrix_name: str
    path: Path | None = None
    _handle: h5py.File | None = field(default=None, repr=False)

    @property
    def n_cells(self) -> int:
        return len(self.obs)

    @property
    def n_genes(self) -> int:
        return len(self.gene_symbols)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def row_chunks(
        self, chunk_size: int, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[int, sp.csr_matrix]]:
        """Yields ``(first_row, chunk)`` with ``chunk`` a (rows, n_genes) CSR matrix without
        explicit zeros, for rows ``start`` to ``stop`` in order."""
        stop = self.n_cells if stop is None else stop
        for first in range(start, stop, chunk_size):
            chunk = _read_rows(self.matrix, first, min(first + chunk_size, stop))
            if not chunk.data.all():  # explicit zeros are rare; removing them costs a full copy
                chunk.eliminate_zeros()
            yield first, chunk


def _read_rows(matrix: Any, start: int, stop: int) -> sp.csr_matrix:
    if isinstance(matrix, h5py.Group):  # CSR on disk (CSC groups are loaded at open time)
        bounds = matrix["indptr"][start : stop + 1]
        lo, hi = int(bounds[0]), int(bounds[-1])
        return sp.csr_matrix(
            (matrix["data"][lo:hi], matrix["indices"][lo:hi], bounds - lo),
            shape=(stop - start, int(matrix.attrs["shape"][1])),
        )
    if isinstance(matrix, (h5py.Dataset, np.ndarray)):
        return sp.csr_matrix(np.asarray(matrix[start:stop]))
    return sp.csr_matrix(matrix[start:stop])


def _matrix_in_file(handle: h5py.File, key: str, path: Path) -> Any:
    element = handle[key]
    encoding = element.attrs.get("encoding-type", "array")
    if isinstance(encoding, bytes):
        encoding = encoding.decode()
    if encoding == "csr_matrix":
        return element
    if encoding == "csc_matrix":
        # Row chunks of a column-compressed matrix would each read the whole matrix.
        warnings.warn(
            f"{path}:{key} is stored column-compressed (CSC); loading it into memory as CSR. "
            "For bounded memory on large files, rewrite it as CSR (adata.X = adata.X.tocsr()).",
            stacklevel=3,
        )
        return sparse_dataset(element).to_memory().tocsr()
    if isinstance(element, h5py.Dataset) and element.ndim == 2:
        return element
    raise ValueError(f"{path}:{key} is not a cells × genes matrix (encoding {encoding!r}).")


def _choose(
    layer: str | None, use_raw: bool, require_counts: bool, layers: Sequence[str], has_raw: bool, where: str
) -> tuple[str, str, str]:
    """Returns ``(key of the matrix, key of its var, name for messages)`` (HDF5 keys of a .h5ad)."""
    if layer is not None and use_raw:
        raise ValueError("choose either layer= or use_raw=True, not both.")
    if use_raw:
        if not has_raw:
            raise ValueError(f"use_raw=True but {where} has no .raw; use layer= or the default X instead.")
        return "raw/X", "raw/var", "raw.X"
    if layer == "X":
        return "X", "var", "X"
    if layer is not None:
        if layer not in layers:
            raise ValueError(f"layer {layer!r} not found in {where}; its layers are {list(layers)} (or use layer='X').")
        return f"layers/{layer}", "var", f"layers[{layer!r}]"
    if require_counts and COUNTS_LAYER in layers:
        return f"layers/{COUNTS_LAYER}", "var", f"layers[{COUNTS_LAYER!r}]"
    if require_counts and has_raw:
        return "raw/X", "raw/var", "raw.X"
    return "X", "var", "X"


def open_anndata(
    source: ad.AnnData | str | Path,
    layer: str | None = None,
    use_raw: bool = False,
    require_counts: bool = True,
    gene_id_key: str | None = None,
) -> ExpressionSource:
    """Opens an AnnData (object, or ``.h5ad`` path read chunk-wise) and chooses its matrix.

    Args:
        source: an AnnData in memory or backed, or the path of a ``.h5ad`` file.
        layer: a layer name, or ``"X"``; see the module docstring for the default.
        use_raw: read ``.raw.X`` (and ``.raw.var``'s genes).
        require_counts: counts are wanted; decides the default matrix (``layers["counts"]``,
            ``.raw``, ``X``). The values themselves are checked by :func:`check_chunk`.
        gene_id_key: ``.var`` column of Ensembl ids (default: the first usual id column present).

    Returns:
        An :class:`ExpressionSource`; close it (or use ``with``) to release a file.
    """
    if isinstance(source, ad.AnnData) and source.isbacked:
        if source.is_view:
            raise ValueError(
                "a subset (view) of a backed AnnData cannot be read chunk-wise from its file; "
                "write the subset to its own file (adata[mask].write_h5ad(...)) or load it (.to_memory())."
            )
        # a backed AnnData is read through its file, whose layers and .raw stay on disk too
        source = Path(source.filename)
    if isinstance(source, ad.AnnData):
        matrix_key, _, name = _choose(
            layer, use_raw, require_counts, list(source.layers.keys()), source.raw is not None, where="the AnnData"
        )
        if matrix_key == "raw/X":
            matrix, var = source.raw.X, source.raw.var
        elif matrix_key == "X":
            matrix, var = source.X, source.var
        else:
            matrix, var = source.layers[matrix_key.removeprefix("layers/")], source.var
        if matrix is None:
            raise ValueError(f"the AnnData has no {name} matrix.")
        if sp.issparse(matrix) and matrix.format != "csr":
            matrix = matrix.tocsr()  # row slicing a CSC matrix costs a pass over all of it
        symbols, ids = gene_names_from_var(var, gene_id_key)
        return ExpressionSource(matrix, source.obs, symbols, ids, name)

    path = Path(source)
    handle = _open_h5ad(path)
    try:
        layers = list(handle["layers"].keys()) if "layers" in handle else []
        has_raw = "raw" in handle and "X" in handle["raw"]
        matrix_key, var_key, name = _choose(layer, use_raw, require_counts, layers, has_raw, where=str(path))
        if matrix_key not in handle:
            raise ValueError(f"{path} has no {name} matrix.")
        matrix = _matrix_in_file(handle, matrix_key, path)
        obs = read_elem(handle["obs"])
        symbols, ids = gene_names_from_var(read_elem(handle[var_key]), gene_id_key)
    except Exception:
        handle.close()
        raise
    return ExpressionSource(matrix, obs, symbols, ids, name, path=path, _handle=handle)


def check_chunk(chunk: sp.csr_matrix, first_row: int, source: ExpressionSource, require_counts: bool) -> None:
    """Raises ``ValueError`` at the first bad value of a row chunk of ``source``'s matrix.

    Checks: NaN or infinite values, negative values, non-integer values when counts are
    required, and cells with no nonzero value. The message names the matrix and the cell.
    """

    def cell_of(position: int) -> str:
        row = int(np.searchsorted(chunk.indptr, position, side="right") - 1)
        return f"cell {source.obs.index[first_row + row]!r} (row {first_row + row})"

    values = chunk.data
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        bad = np.flatnonzero(~np.isfinite(values))
        raise ValueError(
            f"{source.matrix_name} holds NaN or infinite values, first at {cell_of(bad[0])}; "
            "expression must be finite: fix or drop those cells before converting."
        )
    if values.size and values.min() < 0:
        bad = np.flatnonzero(values < 0)
        raise ValueError(
            f"{source.matrix_name} holds negative values (e.g. {values[bad[0]]:.3g} at {cell_of(bad[0])}); "
            "it looks scaled or centred. Convert raw counts (layer='counts' or use_raw=True) or "
            "log-normalised values instead."
        )
    if require_counts and values.dtype.kind == "f" and not np.array_equal(values, np.rint(values)):
        bad = np.flatnonzero(values != np.rint(values))
        raise ValueError(
            f"counts are required but {source.matrix_name} holds non-integer values "
            f"(e.g. {values[bad[0]]:.4g} at {cell_of(bad[0])}). Choose the raw-count matrix "
            "(layer='counts' or use_raw=True) or, for log-normalised values, pass "
            "require_counts=False (--no-require-counts)."
        )
    empty = np.flatnonzero(np.diff(chunk.indptr) == 0)
    if empty.size:
        row = first_row + int(empty[0])
        raise ValueError(
            f"{empty.size} cell(s) in rows {first_row}-{first_row + chunk.shape[0] - 1} of "
            f"{source.matrix_name} have no expressed gene, first cell {source.obs.index[row]!r} (row {row}); "
            "filter empty cells first (scanpy.pp.filter_cells(adata, min_genes=1))."
        )


def check_cells_and_labels(source: ExpressionSource, label_key: str | None, obs_keys: Sequence[str]) -> None:
    """Raises ``ValueError`` for duplicated cell ids, or a missing / incomplete label or obs column."""
    if source.n_cells == 0 or source.n_genes == 0:
        raise ValueError(f"{source.matrix_name} is empty ({source.n_cells} cells × {source.n_genes} genes).")
    if not source.obs.index.is_unique:
        repeated = source.obs.index[source.obs.index.duplicated()].unique()
        raise ValueError(
            f"{len(repeated)} cell id(s) occur more than once (e.g. {list(repeated[:5])}); cell ids must be "
            "unique: call adata.obs_names_make_unique() before converting."
        )
    for key in ([label_key] if label_key is not None else []) + list(obs_keys):
        if key not in source.obs.columns:
            raise ValueError(f"obs column {key!r} not found; available columns: {list(source.obs.columns)}.")
    if label_key is not None:
        missing = source.obs[label_key].isna()
        if missing.any():
            raise ValueError(
                f"label column {label_key!r} has {int(missing.sum())} missing value(s) (first at cell "
                f"{source.obs.index[missing.to_numpy()][0]!r}); drop unlabelled cells or fill them first."
            )
