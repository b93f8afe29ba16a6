"""A fresh model's gene panel: every gene, or the training cells' most variable genes, chosen by
scanpy on the training cells only, with the AnnData location of the values recorded."""

import numpy as np
import pytest
import scanpy as sc

from scrnalf_hf.data import fit_processor, open_cells, simulate


@pytest.mark.parametrize("kind", ["counts", "log1p"])
def test_highly_variable_genes_are_scanpys_on_the_training_cells_alone(kind):
    adata = simulate(300, 150, n_cell_types=3, markers_per_type=4, n_modules=3, seed=4)
    if kind == "log1p":
        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
    cells = open_cells(adata, progress=False)
    train = np.arange(0, 300, 3)
    processor = fit_processor(cells, train, n_top_genes=30)
    expected = adata[train].copy()
    flavor = "seurat_v3" if kind == "counts" else "seurat"
    sc.pp.highly_variable_genes(expected, n_top_genes=30, flavor=flavor)
    assert processor.gene_symbols == list(expected.var_names[expected.var["highly_variable"]])
    assert processor.gene_ids == list(expected.var["gene_ids"][expected.var["highly_variable"]])
    assert processor.highly_variable_genes == {"n_top_genes": 30, "flavor": flavor, "n_cells": 100, "chosen_from": 150}
    everything = fit_processor(cells, np.arange(300), n_top_genes=30)
    assert everything.gene_symbols != processor.gene_symbols  # held-out cells would have changed the panel


def test_the_panel_records_where_the_values_were_read():
    adata = simulate(40, 30, n_cell_types=2, markers_per_type=3, n_modules=2)
    adata.raw = adata.copy()
    assert fit_processor(open_cells(adata, progress=False), np.arange(40)).use_raw  # counts found in .raw
    adata.layers["counts"] = adata.X.copy()
    processor = fit_processor(open_cells(adata, progress=False), np.arange(40))
    assert processor.layer == "counts" and not processor.use_raw
    with pytest.raises(ValueError, match="positive number of genes"):
        fit_processor(open_cells(adata, progress=False), np.arange(40), n_top_genes=0)
