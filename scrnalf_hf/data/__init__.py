"""Data: AnnData I/O, conversion to ``datasets``, the cells a model trains on, the collator,
splits, the gene panel, ortholog tables and cross-species panels, the simulator and the bundled data.

How a cell travels: ``.h5ad`` / AnnData → :func:`convert_anndata` (or converted on the fly by
:func:`open_cells`) → sparse rows + ``genes.json`` → :class:`CellCollator` (aligned to the
model's gene panel, densified per batch, normalised, masked) → model.
"""

from .anndata_io import ExpressionSource, open_anndata, read_anndata
from .atac import Peaks, build_peak_graph, read_atac
from .bundled import load_celltypist_sample, load_pbmc68k_reduced
from .cells import Cells, open_cells, panel_matrix
from .collators import CellCollator, MaskSampler
from .convert import DatasetGenes, convert_anndata, dataset_genes, stream_anndata
from .orthologs import OrthologTable, build_vocabulary, canonical_species, load_orthologs
from .panel import fit_processor, gene_graph
from .simulation import SimulationSettings, simulate, simulate_multiome, simulate_two_species, write_simulated_h5ad
from .species import SpeciesSetup, with_species_setup
from .splits import cross_validation_folds, split_off

__all__ = [
    "CellCollator",
    "Cells",
    "DatasetGenes",
    "ExpressionSource",
    "MaskSampler",
    "OrthologTable",
    "Peaks",
    "SimulationSettings",
    "SpeciesSetup",
    "build_peak_graph",
    "build_vocabulary",
    "canonical_species",
    "convert_anndata",
    "cross_validation_folds",
    "dataset_genes",
    "fit_processor",
    "gene_graph",
    "load_celltypist_sample",
    "load_orthologs",
    "load_pbmc68k_reduced",
    "open_anndata",
    "open_cells",
    "panel_matrix",
    "read_anndata",
    "read_atac",
    "simulate",
    "simulate_multiome",
    "simulate_two_species",
    "split_off",
    "stream_anndata",
    "with_species_setup",
    "write_simulated_h5ad",
]
