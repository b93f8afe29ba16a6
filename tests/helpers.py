"""Small data builders shared by the tests (importable as ``helpers``: pytest puts ``tests/`` on the path)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd


def marker_adata(n_cells=150, n_genes=40, n_types=3, seed=0, marker_rate=10.0) -> ad.AnnData:
    """Integer counts; each cell type over-expresses its own block of 8 marker genes; labels in
    ``obs["cell_type"]`` (categorical ``type0``, ``type1``, ...)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n_cells) % n_types
    rates = np.full((n_types, n_genes), 1.0)
    for cell_type in range(n_types):
        rates[cell_type, cell_type * 8 : cell_type * 8 + 8] = marker_rate
    counts = rng.poisson(rates[labels]).astype(np.float32)
    names = np.array([f"type{t}" for t in range(n_types)])
    obs = pd.DataFrame({"cell_type": pd.Categorical(names[labels])}, index=[f"cell{i}" for i in range(n_cells)])
    return ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=[f"GENE{i}" for i in range(n_genes)]))


def write_h5ad(adata: ad.AnnData, folder: Path, name: str = "cells.h5ad") -> Path:
    path = Path(folder) / name
    adata.write_h5ad(path)
    return path


def synthetic_counts(n_cells: int = 90, n_genes: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Integer counts for 3 cell types whose marker genes differ; returns counts, labels, genes."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n_cells) % 3
    rates = np.full((3, n_genes), 1.0)
    for cell_type in range(3):
        rates[cell_type, cell_type * 10 : cell_type * 10 + 10] = 12.0
    counts = rng.poisson(rates[labels]).astype(np.float32)
    return counts, labels, [f"GENE{i}" for i in range(n_genes)]


# The first lines of a script run with `python -I` where scrnalf_hf must be unavailable: it proves
# that before anything loads, so a checkpoint's remote code is what runs.
WITHOUT_PACKAGE = """
import sys
sys.modules["scrnalf_hf"] = None
try:
    import scrnalf_hf
except ImportError:
    pass
else:
    raise SystemExit("scrnalf_hf must not be importable here")
"""


def load_script(name: str):
    """A script of ``scripts/`` imported as a module (``load_script("kill_test")``); registered in
    ``sys.modules`` because dataclasses look their module up by name."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
