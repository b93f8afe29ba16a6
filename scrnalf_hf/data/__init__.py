"""Data: AnnData I/O, conversion to ``datasets``, collators, splits, simulator, bundled data.

How a cell travels: ``.h5ad`` / AnnData → :func:`convert_anndata` (or :func:`stream_anndata`)
→ sparse rows + ``genes.json`` → :class:`GenePanelCollator` / :class:`MaskedGeneCollator`
(aligned to the model's gene panel, normalised) → model.

``scrnalf_hf.data.simulate`` is the simulator *function*; import the rest of its module with
``from scrnalf_hf.data.simulate import write_simulated_h5ad`` (``import ... as`` would bind the
function).
"""

from .anndata_io import ExpressionSource, open_anndata, read_anndata
from .bundled import load_celltypist_sample, load_pbmc68k_reduced
from .collators import GenePanelCollator, MaskedGeneCollator
from .convert import DatasetGenes, convert_anndata, dataset_genes, stream_anndata
from .simulate import SimulationSettings, simulate, write_simulated_h5ad
from .splits import gene_graph_from_training, split_dataset, stratified_split

__all__ = [
    "DatasetGenes",
    "ExpressionSource",
    "GenePanelCollator",
    "MaskedGeneCollator",
    "SimulationSettings",
    "convert_anndata",
    "dataset_genes",
    "gene_graph_from_training",
    "load_celltypist_sample",
    "load_pbmc68k_reduced",
    "open_anndata",
    "read_anndata",
    "simulate",
    "split_dataset",
    "stratified_split",
    "stream_anndata",
    "write_simulated_h5ad",
]
