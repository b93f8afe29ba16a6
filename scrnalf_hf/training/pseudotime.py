"""Scanpy's diffusion pseudotime (DPT), the unsupervised reference beside the trajectory head.

DPT (Haghverdi et al. 2016, ``sc.tl.dpt``) orders cells by their diffusion distance from a root
cell a user names; it learns nothing from the training times. In ``scrnalf compare --task
trajectory --root-cell ID`` it runs per fold on the processor output of the fold's training and
held-out cells together (the same input the baselines read): PCA (30 components) → exact
15-nearest-neighbour graph with Gaussian kernel weights, as in the DPT paper (scanpy's
``transformer="sklearn"``, scikit-learn's exact search: scanpy 1.11.5's default
``sc.pp.neighbors``, pynndescent above 4,096 cells, breaks with the newest scipy / scikit-learn;
the Gaussian kernel also avoids compiling umap's numba code. A ``KNeighborsTransformer`` instance
passed as it is would not do: scanpy counts the cell itself among its neighbours, and the graph
it then builds gave a near-random DPT here) → diffusion map → DPT from the root. DPT lies in [0, 1]; it is put on the
training times' scale by the least-squares line of the training cells' times on their DPT (an
increasing map when the root is at the start, so the held-out Spearman correlation is DPT's
own; the mean absolute error is then in the times' units). Cells the graph does not connect to
the root (infinite DPT) are placed at the end (DPT 1).
"""

from __future__ import annotations

import time

import numpy as np

from ..data.cells import Cells, panel_matrix
from ..processing_scrnalf import ScrnaLongformerProcessor

METHOD = "diffusion_pseudotime"


def root_row(cells: Cells, root_cell: str) -> int:
    """The row of the cell named ``root_cell`` (its ``obs_names`` id)."""
    cell_ids = np.asarray(cells.dataset.with_format("numpy")["cell_id"]).astype(str)
    found = np.flatnonzero(cell_ids == str(root_cell))
    if len(found) == 0:
        raise ValueError(
            f"--root-cell {root_cell!r} is not a cell of {cells.name} (cell ids such as {cell_ids[:3].tolist()}); "
            "name the cell where the trajectory starts by its obs_names id."
        )
    return int(found[0])


def diffusion_pseudotime(
    cells: Cells,
    processor: ScrnaLongformerProcessor,
    rows: np.ndarray,
    root: int,
    *,
    n_neighbors: int = 15,
    n_pcs: int = 30,
    seed: int = 0,
) -> np.ndarray:
    """DPT of ``rows`` of ``cells`` (which must include the root's row ``root``), on
    ``processor``'s output: (len(rows),) values in [0, 1] (see the module docstring)."""
    import anndata as ad
    import scanpy as sc

    rows = np.asarray(rows, dtype=np.int64)
    position = np.flatnonzero(rows == root)
    if len(position) == 0:
        raise ValueError("the root cell must be among the cells DPT orders.")
    adata = ad.AnnData(panel_matrix(cells, rows, processor))
    n_pcs = min(n_pcs, adata.n_obs - 1, adata.n_vars - 1)
    sc.pp.pca(adata, n_comps=n_pcs, random_state=seed)
    n_neighbors = min(n_neighbors, adata.n_obs - 1)
    sc.pp.neighbors(
        adata, n_neighbors=n_neighbors, use_rep="X_pca", method="gauss", random_state=seed, transformer="sklearn"
    )
    sc.tl.diffmap(adata, random_state=seed)
    adata.uns["iroot"] = int(position[0])
    sc.tl.dpt(adata)
    pseudotime = adata.obs["dpt_pseudotime"].to_numpy(dtype=np.float64)
    return np.where(np.isfinite(pseudotime), pseudotime, 1.0)


def fit_diffusion_pseudotime(
    cells: Cells,
    processor: ScrnaLongformerProcessor,
    train_rows: np.ndarray,
    train_times: np.ndarray,
    test_rows: np.ndarray,
    root: int,
    seed: int = 0,
) -> tuple[np.ndarray, float]:
    """DPT of the training and test cells together, mapped to the training times' scale by the
    least-squares line fitted on the training cells. Returns the (n_test,) predicted times and
    the seconds it took. The root may be a training or a test cell (DPT uses no times)."""
    train_rows, test_rows = np.asarray(train_rows, dtype=np.int64), np.asarray(test_rows, dtype=np.int64)
    rows = np.concatenate([train_rows, test_rows])
    if root not in set(rows.tolist()):
        rows = np.concatenate([rows, [root]])
    start = time.perf_counter()
    pseudotime = diffusion_pseudotime(cells, processor, rows, root, seed=seed)
    train_dpt, test_dpt = pseudotime[: len(train_rows)], pseudotime[len(train_rows) : len(train_rows) + len(test_rows)]
    slope, intercept = np.polyfit(train_dpt, np.asarray(train_times, dtype=np.float64), deg=1)
    return (slope * test_dpt + intercept).astype(np.float32), time.perf_counter() - start


__all__ = ["METHOD", "diffusion_pseudotime", "fit_diffusion_pseudotime", "root_row"]
