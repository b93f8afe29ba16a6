"""Real single-cell data that ships inside installable wheels (no download, no network).

- scanpy's ``pbmc68k_reduced``: 700 human PBMCs, 10 ``bulk_labels`` cell types and
  ``louvain`` clusters. ``.raw`` holds 765 genes, log-normalised (log1p); ``X`` is scaled
  (z-scores, negative values) and is not a model input. Convert it with ``use_raw=True,
  require_counts=False`` and use an ``input_kind="log1p"`` processor.
- celltypist's sample (optional; needs ``pip install celltypist``): 559 human cells ×
  32,786 genes of raw counts, without labels. It is read straight from the installed package's
  data folder, without importing celltypist.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

_CELLTYPIST_SAMPLE = Path("data") / "samples" / "sample_cell_by_gene.csv"
# The CSV stores counts as decimals that are off by up to ~1e-11; anything further from an
# integer is not a count.
_COUNT_TOLERANCE = 1e-6


def load_pbmc68k_reduced() -> ad.AnnData:
    """scanpy's bundled ``pbmc68k_reduced`` (700 cells), read from the file inside scanpy's wheel.

    Returns:
        The AnnData as scanpy ships it: ``.raw`` (700 × 765) log-normalised values, ``X``
        (700 × 765) scaled values, ``obs["bulk_labels"]`` (10 cell types), ``obs["louvain"]``.
    """
    import scanpy

    return scanpy.datasets.pbmc68k_reduced()


def load_celltypist_sample() -> ad.AnnData:
    """celltypist's bundled sample of raw counts (559 cells × 32,786 genes), if celltypist is installed.

    Returns:
        AnnData with ``X`` a CSR float32 matrix of integer counts and gene symbols as ``var_names``.

    Raises:
        ImportError: celltypist is not installed.
    """
    spec = importlib.util.find_spec("celltypist")
    if spec is None or spec.origin is None:
        raise ImportError("celltypist's sample needs the celltypist package: pip install celltypist.")
    csv_path = Path(spec.origin).parent / _CELLTYPIST_SAMPLE
    if not csv_path.is_file():
        raise FileNotFoundError(f"this celltypist installation does not ship {csv_path}.")
    table = pd.read_csv(csv_path, index_col=0)
    values = table.to_numpy(dtype=np.float64)  # (cells, genes)
    counts = np.rint(values)
    if np.abs(values - counts).max() > _COUNT_TOLERANCE:
        raise ValueError(f"{csv_path} does not hold integer counts; this celltypist version ships another sample.")
    return ad.AnnData(
        X=sp.csr_matrix(counts.astype(np.float32)),
        obs=pd.DataFrame(index=table.index.astype(str)),
        var=pd.DataFrame(index=table.columns.astype(str)),
    )
