"""A model's gene panel and gene graph, fitted on training cells only.

- :func:`fit_processor`: the processor for a dataset — every gene of it, or with
  ``n_top_genes`` the highly variable genes of the training cells (scanpy's
  ``highly_variable_genes``; ``seurat_v3`` on raw counts, ``seurat`` on log-normalised values) —
  recording where in an AnnData the values were read, so that ``predict`` reads the same.
- :func:`gene_graph` : the gene–gene kNN graph from (a sample of) the training cells.
"""

from __future__ import annotations

import logging

import numpy as np

from ..processing_scrnalf import ScrnaLongformerProcessor
from .cells import Cells, panel_matrix

logger = logging.getLogger(__name__)

# Highly variable genes are chosen on at most this many training cells (seeded sample): the
# ranking of a few thousand genes is stable long before that, and memory stays bounded.
HVG_MAX_CELLS = 50_000
HVG_FLAVORS = {"counts": "seurat_v3", "log1p": "seurat"}


def _anndata_location(matrix_name: str) -> dict:
    """Processor ``layer`` / ``use_raw`` for the AnnData matrix a dataset was converted from."""
    if matrix_name == "raw.X":
        return {"layer": None, "use_raw": True}
    if matrix_name == "X":
        return {"layer": "X", "use_raw": False}
    if matrix_name.startswith("layers["):
        return {"layer": matrix_name[len("layers[") : -1].strip("'\""), "use_raw": False}
    return {"layer": None, "use_raw": False}


def fit_processor(
    cells: Cells, train_rows: np.ndarray, n_top_genes: int | None = None, seed: int = 0
) -> ScrnaLongformerProcessor:
    """The processor of a fresh model for ``cells``.

    Args:
        cells: the dataset.
        train_rows: the training cells' row positions; nothing else is looked at.
        n_top_genes: keep only this many highly variable genes of the training cells (the rest
            still count in each cell's library size); ``None`` keeps every gene.
        seed: seed of the cell sample highly variable genes are chosen on.

    Returns:
        A processor whose panel, value kind and AnnData location match the dataset; with
        ``n_top_genes`` its ``highly_variable_genes`` attribute records how they were chosen.
    """
    genes = cells.genes
    symbols, ids = list(genes.gene_symbols), None if genes.gene_ids is None else list(genes.gene_ids)
    chosen, selection = None, None
    if n_top_genes is not None:
        if not 0 < n_top_genes:
            raise ValueError(f"--n-top-genes must be a positive number of genes, got {n_top_genes}.")
        if n_top_genes < genes.n_genes:
            chosen, selection = highly_variable_genes(cells, train_rows, n_top_genes, seed)
            symbols = [symbols[i] for i in chosen]
            ids = None if ids is None else [ids[i] for i in chosen]
        else:
            logger.warning("--n-top-genes %d keeps all %d genes of %s.", n_top_genes, genes.n_genes, cells.name)
    arguments = {"input_kind": genes.input_kind, "highly_variable_genes": selection, **_anndata_location(genes.matrix)}
    if genes.protein_names is not None:  # CITE-seq cells: the panel's proteins are theirs, in their order
        arguments["protein_names"] = list(genes.protein_names)
    if genes.peak_names is not None:  # multiome cells: the panel's peaks are theirs, in their order
        arguments["peak_names"], arguments["peak_coordinates"] = list(genes.peak_names), genes.peak_coordinates
    if cells.species_setup is not None:
        from .species import fit_species_processor

        return fit_species_processor(cells, train_rows, chosen, arguments)
    return ScrnaLongformerProcessor(gene_symbols=symbols, gene_ids=ids, **arguments)


def highly_variable_genes(cells: Cells, train_rows: np.ndarray, n_top_genes: int, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Indices (into the dataset's gene list, in its order) of the ``n_top_genes`` most variable
    genes of the training cells, and a record of how they were chosen."""
    import anndata as ad
    import scanpy as sc

    rows = np.asarray(train_rows)
    if len(rows) > HVG_MAX_CELLS:
        rows = np.sort(np.random.default_rng(seed).choice(rows, HVG_MAX_CELLS, replace=False))
    identity = ScrnaLongformerProcessor(
        gene_symbols=[f"gene{i}" for i in range(cells.genes.n_genes)], input_kind="log1p"
    )  # positions as they are, values unnormalised
    alignment = _identity_alignment(identity)
    values = panel_matrix(cells, rows, identity, alignment)  # (cells, genes) stored values
    flavor = HVG_FLAVORS[cells.input_kind]
    adata = ad.AnnData(values)
    sc.pp.highly_variable_genes(adata, n_top_genes=n_top_genes, flavor=flavor, subset=False)
    chosen = np.flatnonzero(adata.var["highly_variable"].to_numpy())
    record = {"n_top_genes": int(n_top_genes), "flavor": flavor, "n_cells": int(len(rows)), "chosen_from": cells.genes.n_genes}
    logger.info("kept %d highly variable genes of %d (%s, %d training cells)", len(chosen), cells.genes.n_genes, flavor, len(rows))
    return chosen, record


def _identity_alignment(processor: ScrnaLongformerProcessor):
    from ..processing_scrnalf import GeneAlignment

    n = processor.n_genes
    return GeneAlignment(vocab_index=np.arange(n), n_matched=n, n_vocab=n, matched_by="position")


def gene_graph(
    processor: ScrnaLongformerProcessor,
    cells: Cells,
    train_rows: np.ndarray,
    k: int,
    max_cells: int = 5000,
    seed: int = 0,
    metric: str = "cosine",
) -> np.ndarray:
    """The model's (G, k) gene kNN graph from at most ``max_cells`` training cells (seeded sample),
    normalised by ``processor`` exactly as the model will see them (``processor.build_gene_graph``
    with ``metric``: ``"cosine"`` or ``"correlation"``)."""
    rows = np.asarray(train_rows)
    if len(rows) == 0:
        raise ValueError("there are no training cells to build the gene graph from.")
    if len(rows) > max_cells:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_cells, replace=False))
    expression = panel_matrix(cells, rows, processor).toarray()  # (≤ max_cells, G)
    return processor.build_gene_graph(expression, k, max_cells=max_cells, seed=seed, metric=metric)


__all__ = ["fit_processor", "gene_graph", "highly_variable_genes"]
