"""Gene networks read from a trained model's attention.

Each gene token attends to the ``k`` genes of its row of the model's kNN gene graph
(``model.base_model.gene_neighbors``, (G, k), ``-1`` = padding) and to the CLS token. A gene's
query weighing a neighbour's key means the neighbour's value flows into that gene's next state:
information flows **neighbour → gene**. An edge is therefore written ``source`` = the neighbour
(the attended-to key), ``target`` = the attending gene (the query), the direction of a regulatory
edge regulator → target.

Everything is accumulated in the graph's own ``(G, k + 1)`` layout (k neighbours, then CLS), per
group of cells: no gene × gene matrix is ever built here, so the cost is O(cells · G · k).

Two scores per edge, each a mean over cells, heads and the chosen layers:

- ``method="attention"``: the attention weight itself (a probability: a gene's weights over its
  neighbours and CLS sum to 1).
- ``method="gradient"``: attention × gradient, ``|A ⊙ ∂y/∂A|``, how much of the model's output
  ``y`` passes through the edge to first order. ``y`` per cell is: for a cell classifier the
  logit of its predicted class (a regression head: the sum of its outputs); for a masked-gene
  model the sum of its predicted values over all genes; for the bare encoder the Euclidean norm
  of the cell embedding. Units: those of ``y``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..modeling_scrnalf import ScrnaLongformerForMaskedGeneModeling, ScrnaLongformerPreTrainedModel
from ..processing_scrnalf import ScrnaLongformerProcessor

METHODS = ("attention", "gradient")


@dataclass
class GeneAttention:
    """Attention (or attention × gradient) of every gene on its graph neighbours and on CLS,
    averaged over the cells of each group, the heads and the chosen layers.

    Attributes:
        genes: (G,) the panel's gene symbols, in model order.
        gene_neighbors: (G, k) int64 neighbour table of the model (``-1`` = padding).
        groups: the group names (one per block of ``scores``); ``None`` when all cells form one
            group.
        scores: (n_groups, G, k + 1) float64; ``scores[i, g, j]`` for ``j < k`` is gene ``g``'s
            score on gene ``gene_neighbors[g, j]``, ``scores[i, g, k]`` its score on CLS.
        n_cells: (n_groups,) cells averaged in each group.
        method: ``"attention"`` or ``"gradient"``.
        layers: the layer indices averaged.
    """

    genes: list[str]
    gene_neighbors: np.ndarray
    groups: list[str] | None
    scores: np.ndarray
    n_cells: np.ndarray
    method: str
    layers: list[int]

    def edges(self, include_self: bool = False) -> pd.DataFrame:
        """The ranked, directed edge list, one row per graph edge and group.

        Args:
            include_self: keep each gene's score on itself (the graph lists every gene as its own
                neighbour); a gene network has no self edges, so they are dropped by default.

        Returns:
            DataFrame with ``group`` (only when grouped), ``source`` (the attended-to neighbour),
            ``target`` (the attending gene), ``score`` and ``rank`` (1 = highest score within the
            group; ties keep the graph's order), sorted by group then rank. ``source`` and
            ``target`` are categoricals over the panel's genes.
        """
        n_genes, k = self.gene_neighbors.shape
        target, slot = np.nonzero(self.gene_neighbors >= 0)  # (E,) each, row-major
        source = self.gene_neighbors[target, slot]
        if not include_self:
            keep = source != target
            target, slot, source = target[keep], slot[keep], source[keep]
        genes = pd.Index(self.genes)
        blocks = []
        for index, name in enumerate(self.groups or [None]):
            score = self.scores[index, target, slot]
            order = np.argsort(-score, kind="stable")
            block = pd.DataFrame({
                "source": pd.Categorical.from_codes(source[order], categories=genes),
                "target": pd.Categorical.from_codes(target[order], categories=genes),
                "score": score[order],
                "rank": np.arange(1, len(order) + 1, dtype=np.int64),
            })
            if name is not None:
                block.insert(0, "group", name)
            blocks.append(block)
        edges = pd.concat(blocks, ignore_index=True)
        if self.groups is not None:
            edges["group"] = pd.Categorical(edges["group"], categories=self.groups)
        return edges

    def cls_attention(self) -> pd.DataFrame:
        """Each gene's score on the CLS token (the cell summary): (G, n_groups) DataFrame indexed
        by gene, one column per group (``"all"`` when ungrouped)."""
        k = self.gene_neighbors.shape[1]
        return pd.DataFrame(
            self.scores[:, :, k].T, index=pd.Index(self.genes, name="gene"), columns=self.groups or ["all"]
        )


def _check_model(model: ScrnaLongformerPreTrainedModel, processor: ScrnaLongformerProcessor, method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    config = model.config
    if config.attention_type == "linear":
        raise ValueError(
            "this model uses attention_type='linear', which has no attention weights to read; "
            "gene networks need a checkpoint trained with 'knn' or 'dense' attention."
        )
    if processor.n_genes != config.n_genes:
        raise ValueError(
            f"the processor's panel has {processor.n_genes} genes but the model has {config.n_genes}; "
            "use the processor saved with this model."
        )


def _layer_indices(layers: str | int | Sequence[int], depth: int) -> list[int]:
    """``"all"``, a layer index or layer indices (negative ones count from the last) -> sorted
    distinct indices."""
    if isinstance(layers, int):
        layers = [layers]
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"layers must be 'all' or a list of layer indices, got {layers!r}.")
        return list(range(depth))
    chosen = sorted({int(index) % depth if -depth <= int(index) < depth else -1 for index in layers})
    if not chosen or chosen[0] < 0:
        raise ValueError(f"layers must be indices in [-{depth}, {depth}) for this {depth}-layer model, got {list(layers)}.")
    return chosen


def _cell_groups(adata, group_by: str | None, groups: Sequence[str] | None) -> tuple[list[str] | None, np.ndarray]:
    """(group names or None, (n_cells,) int group code per cell, -1 = not in any chosen group)."""
    if adata.n_obs == 0:
        raise ValueError("the AnnData has no cells; gene networks are averaged over cells.")
    if group_by is None:
        if groups is not None:
            raise ValueError("groups= chooses values of obs[group_by]; give group_by as well.")
        return None, np.zeros(adata.n_obs, dtype=np.int64)
    if group_by not in adata.obs.columns:
        raise ValueError(f"group_by {group_by!r} is not a column of adata.obs; columns: {list(adata.obs.columns)}.")
    values = adata.obs[group_by]
    present = values.dropna()
    if isinstance(values.dtype, pd.CategoricalDtype):
        observed = [str(c) for c in values.cat.categories if (values == c).any()]
    else:
        observed = sorted({str(v) for v in present})
    if groups is None:
        groups = observed
    else:
        groups = [str(g) for g in groups]
        empty = [g for g in groups if g not in observed]
        if empty:
            raise ValueError(
                f"group(s) {empty} of obs[{group_by!r}] have no cells; groups with cells: {observed[:20]}."
            )
    if not groups:
        raise ValueError(f"obs[{group_by!r}] holds no values (all missing); choose another group_by.")
    codes = pd.Index(groups).get_indexer(values.astype(str).where(values.notna(), None))
    return groups, codes.astype(np.int64)


def _gradient_target(model: ScrnaLongformerPreTrainedModel, outputs) -> torch.Tensor:
    """The scalar whose gradient scores edges: the sum over cells of each cell's ``y`` (see the
    module docstring); cells are independent in eval mode, so each cell gets its own gradient."""
    if isinstance(model, ScrnaLongformerForMaskedGeneModeling):
        return outputs.logits.sum()
    logits = getattr(outputs, "logits", None)
    if logits is None:
        return outputs.cell_embedding.norm(dim=-1).sum()
    regression = model.config.problem_type == "regression" or logits.shape[-1] == 1
    if regression:
        return logits.sum()
    return logits.gather(1, logits.argmax(dim=1, keepdim=True)).sum()


def _batch_scores(model, features: dict, layers: list[int], method: str) -> torch.Tensor:
    """(b, G, k + 1) per-cell scores, summed over heads and the chosen layers."""
    if method == "attention":
        with torch.no_grad():
            attentions = model(**features, output_attentions=True).attentions
        return sum(attentions[i].sum(1) for i in layers)
    with torch.enable_grad():
        # The input on the graph: the attention weights then carry gradients even when every
        # parameter is frozen.
        features["expression"] = features["expression"].detach().requires_grad_(True)
        outputs = model(**features, output_attentions=True)
        chosen = [outputs.attentions[i] for i in layers]  # each (b, h, G, k + 1)
        gradients = torch.autograd.grad(_gradient_target(model, outputs), chosen)
        return sum((a * g).abs().sum(1) for a, g in zip(chosen, gradients)).detach()


def gene_attention(
    model: ScrnaLongformerPreTrainedModel,
    processor: ScrnaLongformerProcessor,
    adata,
    *,
    group_by: str | None = None,
    groups: Sequence[str] | None = None,
    layers: str | int | Sequence[int] = "all",
    method: str = "attention",
    batch_size: int = 64,
    layer: str | None = None,
    use_raw: bool | None = None,
    species: str | None = None,
    progress: bool = True,
) -> GeneAttention:
    """Average every gene's attention on its graph neighbours and on CLS over the cells of each
    group (one pass over the cells, batch by batch; nothing of gene × gene size is built).

    Args:
        model: any trained scRNA longformer with ``knn`` or ``dense`` attention (a head or the
            bare encoder).
        processor: its processor (the gene panel).
        adata: the cells, read where the processor reads them (``layer`` / ``use_raw`` override).
        group_by: an ``obs`` column; one block of scores per value with cells (missing values are
            left out). ``None``: all cells together.
        groups: only these values of ``obs[group_by]`` (each must have cells).
        layers: ``"all"``, a layer index or layer indices (``-1`` = the last layer).
        method: ``"attention"`` (weights) or ``"gradient"`` (``|A ⊙ ∂y/∂A|``; see the module
            docstring for ``y``).
        batch_size: cells per forward pass.
        species: the cells' species, for a multi-species model.
        progress: show a progress bar over the batches.

    Returns:
        :class:`GeneAttention`.

    Raises:
        ValueError: linear attention, an unknown method, group key, group or layer, a group
            without cells, or a processor of another panel.
    """
    _check_model(model, processor, method)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    chosen_layers = _layer_indices(layers, model.config.depth)
    group_names, codes = _cell_groups(adata, group_by, groups)
    matrix, gene_names, gene_ids, where = processor.read_anndata_matrix(adata, layer, use_raw)
    alignment = processor.align_genes(gene_names, gene_ids, species=species)

    gene_neighbors = model.base_model.gene_neighbors
    n_genes, k = gene_neighbors.shape
    n_groups = len(group_names or [None])
    device = next(model.parameters()).device
    # Summed on the CPU in float64: exact means over many cells, on any accelerator.
    sums = torch.zeros(n_groups, n_genes, k + 1, dtype=torch.float64)
    cells = np.flatnonzero(codes >= 0)
    starts = range(0, len(cells), batch_size)
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(starts, desc=f"gene {method}", unit="batch", disable=not progress):
            rows = cells[start : start + batch_size]
            features = processor(
                matrix[rows], gene_names=gene_names, gene_ids=gene_ids, return_tensors="pt", matrix_name=where,
                species=species, alignment=alignment,
            )
            features = {name: tensor.to(device) for name, tensor in features.items()}
            per_cell = _batch_scores(model, features, chosen_layers, method)  # (b, G, k + 1)
            sums.index_add_(0, torch.as_tensor(codes[rows]), per_cell.cpu().double())
    finally:
        model.train(was_training)
    n_cells = np.bincount(codes[cells], minlength=n_groups)
    per_average = torch.as_tensor(n_cells, dtype=torch.float64) * model.config.n_heads * len(chosen_layers)
    return GeneAttention(
        genes=list(processor.gene_symbols),
        gene_neighbors=gene_neighbors.cpu().numpy().astype(np.int64),
        groups=group_names,
        scores=(sums / per_average[:, None, None]).numpy(),
        n_cells=n_cells,
        method=method,
        layers=chosen_layers,
    )


def attention_edges(
    model: ScrnaLongformerPreTrainedModel,
    processor: ScrnaLongformerProcessor,
    adata,
    *,
    group_by: str | None = None,
    layers: str | int | Sequence[int] = "all",
    method: str = "attention",
    batch_size: int = 64,
    layer: str | None = None,
    use_raw: bool | None = None,
    progress: bool = True,
    groups: Sequence[str] | None = None,
    species: str | None = None,
    include_self: bool = False,
) -> pd.DataFrame:
    """A ranked, directed gene–gene edge list from the model's attention.

    An edge is ``source`` → ``target`` where ``target``'s query attends to ``source`` (a
    neighbour of ``target`` in the model's kNN gene graph): information flows from the
    attended-to gene into the attending one. Only edges of the graph can appear. Scores are means
    over the cells of each group, the heads and the chosen ``layers`` (see
    :func:`gene_attention` for every argument and :class:`GeneAttention` for the CLS scores).

    Returns:
        DataFrame with ``group`` (with ``group_by``), ``source``, ``target`` (gene symbols),
        ``score`` and ``rank`` (1 = strongest, per group), sorted by group then rank.
    """
    attention = gene_attention(
        model, processor, adata, group_by=group_by, groups=groups, layers=layers, method=method,
        batch_size=batch_size, layer=layer, use_raw=use_raw, species=species, progress=progress,
    )
    return attention.edges(include_self=include_self)


def write_edges(edges: pd.DataFrame, path) -> Path:
    """Write an edge list as a tab-separated file with a header, without the index.

    The table goes to a temporary file beside ``path`` that is renamed onto it once complete, so
    a failure leaves either the previous file or nothing, never half a table.

    Args:
        edges: at least ``source``, ``target`` and ``score`` columns (e.g. from
            :func:`attention_edges`).
        path: the ``.tsv`` file to write (its folder is created).

    Returns:
        The path written.
    """
    missing = [column for column in ("source", "target", "score") if column not in edges.columns]
    if missing:
        raise ValueError(f"edges must have source, target and score columns; missing {missing} of {list(edges.columns)}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of our own rather than tempfile's: its files are private (0600), this one gets the
    # permissions of any file the user writes.
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(temporary, "w", newline="") as handle:
            edges.to_csv(handle, sep="\t", index=False)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


__all__ = ["GeneAttention", "attention_edges", "gene_attention", "write_edges"]
