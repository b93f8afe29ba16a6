"""The scRNA longformer: a gene-token transformer with kNN-local attention over a gene graph.

A cell is a sequence of ``1 + G`` tokens: a global CLS token followed by one token per gene of
the model's fixed gene panel. Each gene token attends to its ``k`` nearest genes in a gene–gene
kNN graph (a ``(G, k)`` neighbour table saved with the weights) and to CLS; CLS attends to every
gene. Three interchangeable attention kernels compute this:

- ``knn``: exact sparse attention, O(G·k) time and memory; no tensor of G×G size is ever built.
  Genes in Cuthill–McKee order are cut into blocks that share their neighbours' keys (dense
  ``bmm`` under the exact graph mask), or, for graphs without locality, each gene's k
  neighbours' keys and values are gathered one by one.
- ``dense``: masked SDPA over the full token set with the same graph as a boolean mask. It is the
  numerical reference for ``knn`` and is O(G²).
- ``linear``: kernelised global attention (feature map elu + 1), O(G·d²); ignores the graph.

The file reads in the order data flows: gene graph helpers, embeddings, attention kernels,
attention, layer, encoder, the pretrained base class, the bare model, then the task heads.

This file is copied next to saved weights as remote code: it imports only torch, transformers
and the configuration file beside it.
"""

import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .configuration_scrnalf import ScrnaLongformerConfig

# The Auto classes each head answers to, written into every saved config so that a checkpoint of
# any head loads with any of them through trust_remote_code.
AUTO_MAP = {
    "AutoConfig": "configuration_scrnalf.ScrnaLongformerConfig",
    "AutoModel": "modeling_scrnalf.ScrnaLongformerModel",
    "AutoModelForMaskedLM": "modeling_scrnalf.ScrnaLongformerForMaskedGeneModeling",
    "AutoModelForSequenceClassification": "modeling_scrnalf.ScrnaLongformerForCellClassification",
}


# ---------------------------------------------------------------------------------------------
# Gene graph
# ---------------------------------------------------------------------------------------------


def default_gene_neighbors(n_genes: int, k: int) -> torch.Tensor:
    """A placeholder gene graph for a model that has seen no data: each gene's neighbours are the
    ``k`` genes of a window around it in panel order (itself included).

    Returns:
        ``(n_genes, k)`` int64 neighbour table; ``-1`` pads rows when ``n_genes < k``.
    """
    width = min(k, n_genes)
    genes = torch.arange(n_genes, dtype=torch.long).unsqueeze(1)  # (G, 1)
    window_start = (genes - (width - 1) // 2).clamp(min=0, max=n_genes - width)
    table = torch.full((n_genes, k), -1, dtype=torch.long)
    table[:, :width] = window_start + torch.arange(width, dtype=torch.long)
    return table


def validate_gene_neighbors(gene_neighbors: torch.Tensor, n_genes: int, k: int) -> None:
    """Raise ``ValueError`` naming the problem if a neighbour table is not a valid ``(G, k)`` graph:
    integer entries in ``[-1, G)`` (``-1`` = padding) and no gene listed twice in one row."""
    if gene_neighbors.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"gene_neighbors must hold integers, got dtype {gene_neighbors.dtype}.")
    if tuple(gene_neighbors.shape) != (n_genes, k):
        raise ValueError(
            f"gene_neighbors must have shape (n_genes, knn_k) = ({n_genes}, {k}), "
            f"got {tuple(gene_neighbors.shape)}."
        )
    low, high = int(gene_neighbors.min()), int(gene_neighbors.max())
    if low < -1 or high >= n_genes:
        raise ValueError(
            f"gene graph index out of range: entries must lie in [-1, {n_genes - 1}] "
            f"(-1 = padding), found values from {low} to {high}."
        )
    ordered = gene_neighbors.sort(dim=1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    if bool(repeated.any()):
        gene = int(repeated.any(dim=1).nonzero()[0])
        raise ValueError(f"gene graph row {gene} lists the same neighbour twice: {gene_neighbors[gene].tolist()}.")


# ---------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------


class ScrnaLongformerEmbeddings(nn.Module):
    """Turns a cell's expression values into ``1 + G`` tokens.

    A gene's token combines its gene embedding with an embedding of its value in this cell. The
    value embedding interpolates linearly between ``n_value_bins`` learned vectors spread evenly
    over ``[0, value_max]``, so it is a smooth, learned, non-linear function of the value that
    stays differentiable. Multiplicative encoding (gene ⊙ (1 + value)) lets the mean over gene
    tokens carry gene-specific expression, which an additive shared value projection averages
    away. Masked genes get a learned mask vector instead of their value embedding.

    Input ``expression`` (batch, G) float; output (batch, 1 + G, d_model), CLS first.
    """

    def __init__(self, config: ScrnaLongformerConfig):
        super().__init__()
        self.config = config
        self.gene_embeddings = nn.Embedding(config.n_genes, config.d_model)
        self.value_bins = nn.Embedding(config.n_value_bins, config.d_model)
        self.mask_embedding = nn.Parameter(torch.zeros(config.d_model))
        self.cls_embedding = nn.Parameter(torch.zeros(config.d_model))
        self.dropout = nn.Dropout(config.hidden_dropout)

    def encode_values(self, expression: torch.Tensor) -> torch.Tensor:
        """(batch, G) values -> (batch, G, d_model) soft-binned value embeddings."""
        n_bins = self.config.n_value_bins
        position = expression.clamp(0, self.config.value_max) * ((n_bins - 1) / self.config.value_max)
        lower = position.floor().long().clamp(max=n_bins - 2)  # (batch, G)
        upper_weight = (position - lower).unsqueeze(-1)  # (batch, G, 1)
        bins = self.value_bins.weight
        return bins[lower] * (1 - upper_weight) + bins[lower + 1] * upper_weight

    def forward(self, expression: torch.Tensor, masked_positions: torch.Tensor | None = None) -> torch.Tensor:
        values = self.encode_values(expression)  # (batch, G, d)
        if masked_positions is not None:
            values = torch.where(masked_positions.unsqueeze(-1), self.mask_embedding.to(values.dtype), values)
        genes = self.gene_embeddings.weight.unsqueeze(0)  # (1, G, d)
        if self.config.value_encoding == "multiplicative":
            tokens = genes * (1 + values)
        else:
            tokens = genes + values
        cls = self.cls_embedding.to(tokens.dtype).expand(tokens.shape[0], 1, -1)  # (batch, 1, d)
        tokens = torch.cat([cls, tokens], dim=1)  # (batch, 1 + G, d)
        # No LayerNorm here: it would rescale every token to unit size and so erase how strongly
        # a gene is expressed; the pre-LayerNorm layers normalise what they read.
        return self.dropout(tokens)


# ---------------------------------------------------------------------------------------------
# Attention kernels. Each takes q, k, v of shape (batch, heads, 1 + G, head_dim) with the CLS token
# at index 0, the (G, k) neighbour table, and a (batch, 1 + G) boolean key mask (True = may be
# attended to; CLS is always True). Each returns (batch, heads, 1 + G, head_dim) and, if asked,
# the gene rows' attention weights in neighbour-table form: (batch, heads, G, k + 1), column j < k
# the weight on gene_neighbors[g, j], column k the weight on CLS.
# ---------------------------------------------------------------------------------------------


def cuthill_mckee_order(gene_neighbors: torch.Tensor) -> torch.Tensor:
    """An order of the genes in which graph neighbours tend to sit close together.

    Cuthill–McKee: breadth-first search over the symmetrised graph, each component started at
    its least-connected gene, neighbours visited least-connected first. Pure Python over the
    ``(G, k)`` table (about 0.5 s at G = 16,000), run once per graph.

    Returns:
        ``(G,)`` int64: ``order[i]`` is the gene placed at position ``i``.
    """
    rows = gene_neighbors.tolist()
    adjacent = [set() for _ in rows]
    for gene, row in enumerate(rows):
        for neighbor in row:
            if neighbor >= 0 and neighbor != gene:
                adjacent[gene].add(neighbor)
                adjacent[neighbor].add(gene)
    degree = [len(genes) for genes in adjacent]
    adjacent = [sorted(genes, key=degree.__getitem__) for genes in adjacent]
    visited = [False] * len(rows)
    order = []
    for start in sorted(range(len(rows)), key=degree.__getitem__):
        if visited[start]:
            continue
        visited[start] = True
        head = len(order)
        order.append(start)
        while head < len(order):
            for neighbor in adjacent[order[head]]:
                if not visited[neighbor]:
                    visited[neighbor] = True
                    order.append(neighbor)
            head += 1
    return torch.tensor(order, dtype=torch.long, device=gene_neighbors.device)


@dataclass
class GeneBlockLayout:
    """The kNN graph cut into query blocks for :func:`knn_attention`'s block path.

    Genes are placed in Cuthill–McKee order and cut into blocks of ``block_size`` consecutive
    genes. A block's keys are CLS plus the union of its genes' neighbours, padded to the widest
    block; ``blocked`` masks the columns that are not really a row gene's neighbour, so attention over
    a block's keys with that mask is exactly kNN attention.

    Attributes:
        block_size: genes per query block, B.
        query_tokens: ``(n_blocks * B,)`` token index (1 + gene) of each query row; rows past
            the last gene read token 0 and are dropped.
        key_tokens: ``(n_blocks, width)`` token index of each key column; column 0 is CLS,
            padding columns read token 0 and are never allowed.
        blocked: ``(n_blocks, B, width)`` bool, True where the row's gene does not attend to the
            column.
        row_of_gene: ``(G,)`` query row of each gene.
        weight_index: ``(G, k + 1)`` flat index into a block's ``(n_blocks * B * width)``
            attention weights giving the neighbour-table form: column j < k the weight on
            ``gene_neighbors[g, j]`` (padding entries point to CLS and are zeroed by the kernel),
            column k the weight on CLS.
    """

    block_size: int
    query_tokens: torch.Tensor
    key_tokens: torch.Tensor
    blocked: torch.Tensor
    row_of_gene: torch.Tensor
    weight_index: torch.Tensor

    @property
    def width(self) -> int:
        return self.key_tokens.shape[1]


def build_gene_block_layout(gene_neighbors: torch.Tensor, order: torch.Tensor, block_size: int) -> GeneBlockLayout:
    """Cut the graph ``(G, k)`` into query blocks of ``block_size`` genes taken in ``order``."""
    n_genes, k = gene_neighbors.shape
    device = gene_neighbors.device
    n_blocks = -(-n_genes // block_size)
    row_genes = torch.full((n_blocks * block_size,), -1, dtype=torch.long, device=device)
    row_genes[:n_genes] = order
    row_neighbors = gene_neighbors[row_genes.clamp(min=0)].masked_fill(row_genes.unsqueeze(1) < 0, -1)  # (rows, k)
    block_neighbors = row_neighbors.view(n_blocks, block_size * k)

    # Each block's distinct neighbours, in gene order, become its key columns 1, 2, ...
    candidates = block_neighbors.sort(dim=1).values  # (n_blocks, B·k), -1 padding first
    distinct = candidates >= 0
    distinct[:, 1:] &= candidates[:, 1:] != candidates[:, :-1]
    width = 1 + int(distinct.sum(dim=1).max())
    column = distinct.cumsum(dim=1) * distinct  # 1-based key column of each distinct gene, else 0
    key_tokens = torch.zeros(n_blocks, width, dtype=torch.long, device=device)
    key_tokens.scatter_(1, column, (candidates + 1) * distinct)  # column 0 keeps token 0 = CLS

    # The key column of every (row, neighbour) pair, found by binary search in the block's keys.
    beyond = n_genes + 2
    sorted_keys = torch.where(key_tokens[:, 1:] > 0, key_tokens[:, 1:], beyond)  # (n_blocks, width - 1)
    pair_column = 1 + torch.searchsorted(sorted_keys, block_neighbors + 1)  # (n_blocks, B·k)
    pair_column = pair_column.masked_fill(block_neighbors < 0, 0).view(n_blocks, block_size, k)
    allowed = torch.zeros(n_blocks, block_size, width, dtype=torch.bool, device=device)
    allowed.scatter_(2, pair_column, True)
    allowed[:, :, 0] = True  # every gene attends to CLS

    row_of_gene = torch.empty(n_genes, dtype=torch.long, device=device)
    row_of_gene[order] = torch.arange(n_genes, device=device)
    gene_columns = pair_column.view(n_blocks * block_size, k)[row_of_gene]  # (G, k), 0 = padding
    columns = torch.cat([gene_columns, gene_columns.new_zeros(n_genes, 1)], dim=1)  # (G, k + 1), CLS last
    weight_index = row_of_gene.unsqueeze(1) * width + columns
    return GeneBlockLayout(block_size, row_genes + 1, key_tokens, ~allowed, row_of_gene, weight_index)


# The block sizes knn_attention chooses from, and the work it accepts: a block layout is used
# when its cost (keys scored per gene, plus K and V rows gathered) is below that of gathering
# every gene's k neighbours one by one. Both counts assume head_dim 16, the presets' value.
_BLOCK_SIZES = (16, 32, 64)
_HEAD_DIM_FOR_COST = 16


def _block_layout_cost(layout: GeneBlockLayout) -> float:
    """Work per gene of the block path: ``width`` scores plus K and V rows gathered per block."""
    return layout.width * (1 + 2 * _HEAD_DIM_FOR_COST / layout.block_size)


def choose_gene_block_layout(gene_neighbors: torch.Tensor) -> GeneBlockLayout | None:
    """The cheapest block layout of a graph, or None when gathering neighbours is cheaper (a
    graph with no locality, e.g. random neighbours)."""
    n_genes, k = gene_neighbors.shape
    order = cuthill_mckee_order(gene_neighbors)
    layouts = [build_gene_block_layout(gene_neighbors, order, size) for size in _BLOCK_SIZES]
    best = min(layouts, key=_block_layout_cost)
    gathered_cost = (k + 1) * (1 + 2 * _HEAD_DIM_FOR_COST)
    return best if _block_layout_cost(best) < gathered_cost else None


# Layouts are derived from the gene graph, which changes only through set_gene_graph or loading
# weights, so they are kept per graph tensor (by identity, dropped when the tensor is freed) and
# checked against a snapshot of its contents.
_GENE_BLOCK_LAYOUTS: dict[int, tuple] = {}


def gene_block_layout(gene_neighbors: torch.Tensor) -> GeneBlockLayout | None:
    """The cached :func:`choose_gene_block_layout` of this graph tensor."""
    graph_id = id(gene_neighbors)
    cached = _GENE_BLOCK_LAYOUTS.get(graph_id)
    if cached is not None and cached[0]() is gene_neighbors and torch.equal(cached[1], gene_neighbors):
        return cached[2]
    # Built as ordinary tensors even inside inference_mode, so that training can use them later.
    with torch.inference_mode(False), torch.no_grad():
        snapshot = gene_neighbors.clone()
        layout = choose_gene_block_layout(snapshot)
    forget = weakref.ref(gene_neighbors, lambda _: _GENE_BLOCK_LAYOUTS.pop(graph_id, None))
    _GENE_BLOCK_LAYOUTS[graph_id] = (forget, snapshot, layout)
    return layout


def _cls_attention(query, key, value, key_mask, dropout):
    """CLS attends to every token: O(G). (b, h, 1 + G, dh) -> (b, h, 1, dh)."""
    scores = torch.matmul(query[:, :, :1], key.transpose(-1, -2)) / math.sqrt(query.shape[-1])  # (b, h, 1, 1+G)
    scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    probs = F.dropout(scores.softmax(-1), p=dropout, training=dropout > 0)
    return torch.matmul(probs, value)


def _knn_attention_blocked(query, key, value, layout, gene_neighbors, key_mask, dropout, output_attentions):
    """kNN attention over query blocks: one gather of each block's keys, then dense ``bmm``
    inside the blocks with the exact graph as mask."""
    batch, heads, _, head_dim = query.shape
    n_blocks, width = layout.key_tokens.shape
    block_query = query.index_select(2, layout.query_tokens) * (1.0 / math.sqrt(head_dim))  # (b, h, nb·B, dh)
    block_query = block_query.view(batch, heads, n_blocks, -1, head_dim)  # (b, h, nb, B, dh)
    key_tokens = layout.key_tokens.view(-1)
    block_keys = key.index_select(2, key_tokens).view(batch, heads, n_blocks, width, head_dim)  # (b, h, nb, W, dh)
    block_values = value.index_select(2, key_tokens).view(batch, heads, n_blocks, width, head_dim)

    scores = torch.matmul(block_query, block_keys.transpose(-1, -2))  # (b, h, nb, B, W)
    blocked = layout.blocked  # (nb, B, W), shared by every cell
    if not bool(key_mask.all()):
        unmeasured = ~key_mask[:, key_tokens].view(batch, n_blocks, 1, width)
        blocked = (blocked | unmeasured).unsqueeze(1)  # (b, 1, nb, B, W)
    probs = F.dropout(scores.masked_fill_(blocked, float("-inf")).softmax(-1), p=dropout, training=dropout > 0)
    block_output = torch.matmul(probs, block_values)  # (b, h, nb, B, dh)

    # Back to gene order, token-major, so that the caller's (b, 1 + G, h·dh) view needs no copy.
    gene_output = block_output.view(batch, heads, -1, head_dim).transpose(1, 2)  # (b, nb·B, h, dh)
    gene_output = gene_output.index_select(1, layout.row_of_gene)  # (b, G, h, dh)
    cls_output = _cls_attention(query, key, value, key_mask, dropout).transpose(1, 2)  # (b, 1, h, dh)
    output = torch.cat([cls_output, gene_output], dim=1).transpose(1, 2)  # (b, h, 1 + G, dh)
    if not output_attentions:
        return output, None
    weights = probs.reshape(batch, heads, -1)[:, :, layout.weight_index]  # (b, h, G, k + 1)
    weights[..., :-1] = weights[..., :-1].masked_fill(gene_neighbors < 0, 0.0)
    return output, weights


def _knn_attention_gathered(query, key, value, gene_neighbors, key_mask, dropout, output_attentions):
    """kNN attention by gathering each gene's k neighbours' keys and values: O(G·k·dh) memory,
    for graphs without the locality the block path needs."""
    batch, heads, _, head_dim = query.shape
    n_genes, k = gene_neighbors.shape
    scale = 1.0 / math.sqrt(head_dim)
    gene_query = query[:, :, 1:]  # (b, h, G, dh)
    flat = (gene_neighbors.clamp(min=0) + 1).reshape(-1)  # token index of each neighbour
    neighbor_keys = key.index_select(2, flat).view(batch, heads, n_genes, k, head_dim)  # (b, h, G, k, dh)
    neighbor_values = value.index_select(2, flat).view(batch, heads, n_genes, k, head_dim)

    neighbor_scores = torch.matmul(gene_query.unsqueeze(-2), neighbor_keys.transpose(-1, -2)).squeeze(-2)
    neighbor_scores = neighbor_scores * scale  # (b, h, G, k)
    valid = (gene_neighbors >= 0).unsqueeze(0) & key_mask[:, flat].view(batch, n_genes, k)  # (b, G, k)
    neighbor_scores = neighbor_scores.masked_fill(~valid[:, None], float("-inf"))
    to_cls = (gene_query * key[:, :, :1]).sum(-1, keepdim=True) * scale  # (b, h, G, 1)

    probs = torch.cat([neighbor_scores, to_cls], dim=-1).softmax(-1)  # (b, h, G, k + 1)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    gene_output = torch.matmul(probs[..., :k].unsqueeze(-2), neighbor_values).squeeze(-2)  # (b, h, G, dh)
    gene_output = gene_output + probs[..., k:] * value[:, :, :1]
    output = torch.cat([_cls_attention(query, key, value, key_mask, dropout), gene_output], dim=2)  # (b, h, 1 + G, dh)
    return output, (probs if output_attentions else None)


def knn_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    gene_neighbors: torch.Tensor,
    key_mask: torch.Tensor,
    dropout: float = 0.0,
    output_attentions: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sparse kNN attention, exact, O(G·k) time and memory; never builds a G×G tensor.

    Two paths give the same result; :func:`choose_gene_block_layout` picks the cheaper one once
    per graph. Blocks: genes in Cuthill–McKee order are cut into blocks and attention runs as
    dense ``bmm`` over each block's keys under the exact graph mask (:class:`GeneBlockLayout`);
    cheap when a block's genes share neighbours (the default window graph: 32 keys per gene at
    k = 16). Gathering: each gene's k neighbours' keys and values are copied out; used when the
    graph has no locality at all (random neighbours).
    """
    layout = gene_block_layout(gene_neighbors)
    if layout is None:
        return _knn_attention_gathered(query, key, value, gene_neighbors, key_mask, dropout, output_attentions)
    return _knn_attention_blocked(query, key, value, layout, gene_neighbors, key_mask, dropout, output_attentions)


def graph_attention_mask(gene_neighbors: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """The kNN graph as a dense boolean mask, (batch, 1, 1 + G, 1 + G): True = may attend.
    For the ``dense`` reference only — it is O(G²)."""
    n_genes, k = gene_neighbors.shape
    n_tokens = n_genes + 1
    allowed = torch.zeros(n_tokens, n_tokens, dtype=torch.bool, device=gene_neighbors.device)
    allowed[0, :] = True  # CLS sees every gene
    allowed[1:, 0] = True  # every gene sees CLS
    rows = torch.arange(1, n_tokens, device=gene_neighbors.device).unsqueeze(1).expand(n_genes, k)
    real = gene_neighbors >= 0
    allowed[rows[real], gene_neighbors[real] + 1] = True
    return allowed.unsqueeze(0).unsqueeze(0) & key_mask[:, None, None, :]


def dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    gene_neighbors: torch.Tensor,
    key_mask: torch.Tensor,
    dropout: float = 0.0,
    output_attentions: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference: SDPA over all 1 + G tokens with the graph as a dense boolean mask."""
    mask = graph_attention_mask(gene_neighbors, key_mask)  # (b, 1, 1 + G, 1 + G)
    if not output_attentions:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout), None
    scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(query.shape[-1])
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    output = torch.matmul(probs, value)
    # Express the gene rows in neighbour-table form so that knn and dense report the same thing.
    gene_probs = probs[:, :, 1:]  # (b, h, G, 1 + G)
    columns = (gene_neighbors.clamp(min=0) + 1).expand(*gene_probs.shape[:2], -1, -1)
    neighbor_probs = gene_probs.gather(-1, columns).masked_fill(gene_neighbors < 0, 0.0)
    return output, torch.cat([neighbor_probs, gene_probs[..., :1]], dim=-1)


def linear_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    gene_neighbors: torch.Tensor,
    key_mask: torch.Tensor,
    dropout: float = 0.0,
    output_attentions: bool = False,
) -> tuple[torch.Tensor, None]:
    """Kernelised global attention, φ(x) = elu(x) + 1: O(G·d²), no attention matrix at all.
    The gene graph is not used; masked keys are removed by zeroing their features."""
    if output_attentions:
        raise ValueError("attention weights are not defined for attention_type='linear'; use 'knn' or 'dense'.")
    query_features = F.elu(query) + 1
    key_features = (F.elu(key) + 1) * key_mask[:, None, :, None].to(key.dtype)
    key_value = torch.matmul(key_features.transpose(-1, -2), value)  # (b, h, dh, dh)
    normaliser = torch.matmul(query_features, key_features.sum(dim=2).unsqueeze(-1))  # (b, h, 1 + G, 1)
    return torch.matmul(query_features, key_value) / normaliser.clamp(min=1e-6), None


ATTENTION_KERNELS = {"knn": knn_attention, "dense": dense_attention, "linear": linear_attention}


# ---------------------------------------------------------------------------------------------
# Transformer blocks
# ---------------------------------------------------------------------------------------------


class ScrnaLongformerAttention(nn.Module):
    """Multi-head attention with a fused QKV projection; the kernel is chosen by
    ``config.attention_type``. (batch, 1 + G, d) -> (batch, 1 + G, d)."""

    def __init__(self, config: ScrnaLongformerConfig):
        super().__init__()
        self.config = config
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.output = nn.Linear(config.d_model, config.d_model)

    def forward(
        self,
        hidden_states: torch.Tensor,
        gene_neighbors: torch.Tensor,
        key_mask: torch.Tensor,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, n_tokens, d_model = hidden_states.shape
        heads = self.config.n_heads
        qkv = self.qkv(hidden_states).view(batch, n_tokens, 3, heads, d_model // heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (b, h, 1 + G, dh)
        kernel = ATTENTION_KERNELS[self.config.attention_type]
        dropout = self.config.attention_dropout if self.training else 0.0
        context, weights = kernel(query, key, value, gene_neighbors, key_mask, dropout, output_attentions)
        context = context.transpose(1, 2).reshape(batch, n_tokens, d_model)
        return self.output(context), weights


class ScrnaLongformerFeedForward(nn.Module):
    """Position-wise MLP, d -> d·mlp_ratio -> d."""

    def __init__(self, config: ScrnaLongformerConfig):
        super().__init__()
        self.up = nn.Linear(config.d_model, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.d_model)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(hidden_states)))


class ScrnaLongformerLayer(GradientCheckpointingLayer):
    """Pre-LayerNorm transformer layer: attention then feed-forward, each with a residual."""

    def __init__(self, config: ScrnaLongformerConfig):
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attention = ScrnaLongformerAttention(config)
        self.feed_forward_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.feed_forward = ScrnaLongformerFeedForward(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        gene_neighbors: torch.Tensor,
        key_mask: torch.Tensor,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, weights = self.attention(
            self.attention_norm(hidden_states), gene_neighbors, key_mask, output_attentions
        )
        hidden_states = hidden_states + self.dropout(attended)
        hidden_states = hidden_states + self.dropout(self.feed_forward(self.feed_forward_norm(hidden_states)))
        return hidden_states, weights


class ScrnaLongformerEncoder(nn.Module):
    """A stack of ``depth`` pre-LayerNorm layers; returns the un-normalised residual stream."""

    def __init__(self, config: ScrnaLongformerConfig):
        super().__init__()
        self.layers = nn.ModuleList([ScrnaLongformerLayer(config) for _ in range(config.depth)])

    def forward(
        self,
        hidden_states: torch.Tensor,
        gene_neighbors: torch.Tensor,
        key_mask: torch.Tensor,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple | None, tuple | None]:
        all_hidden = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            hidden_states, weights = layer(hidden_states, gene_neighbors, key_mask, output_attentions)
            if output_hidden_states:
                all_hidden += (hidden_states,)
            if output_attentions:
                all_attentions += (weights,)
        return hidden_states, all_hidden, all_attentions


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


@dataclass
class ScrnaLongformerModelOutput(ModelOutput):
    """
    Args:
        last_hidden_state: (batch, 1 + G, d_model), CLS first, after the final LayerNorm.
        cell_embedding: (batch, d_model), pooled per ``config.pooling``.
        hidden_states: per layer (batch, 1 + G, d_model), the embeddings first.
        attentions: per layer (batch, heads, G, k + 1) in neighbour-table form: column j < k is
            the weight on ``gene_neighbors[g, j]``, column k the weight on CLS.
    """

    last_hidden_state: torch.FloatTensor | None = None
    cell_embedding: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class MaskedGeneModelingOutput(ModelOutput):
    """
    Args:
        loss: mean squared error over the masked genes only.
        logits: (batch, G) predicted normalised expression of every gene.
        masked_positions: (batch, G) bool, the genes that were hidden from the input.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    masked_positions: torch.BoolTensor | None = None
    cell_embedding: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class CellClassifierOutput(ModelOutput):
    """
    Args:
        loss: cross-entropy (with ``config.class_weights`` if set).
        logits: (batch, num_labels).
        cell_embedding: (batch, d_model).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cell_embedding: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


class ScrnaLongformerPreTrainedModel(PreTrainedModel):
    config: ScrnaLongformerConfig
    config_class = ScrnaLongformerConfig
    base_model_prefix = "scrna_longformer"
    main_input_name = "expression"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ScrnaLongformerLayer"]
    # The losses are means over the batch; Trainer must not rescale them by num_items_in_batch.
    accepts_loss_kwargs = False

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ScrnaLongformerEmbeddings):
            # Unit-scale gene and value embeddings: tokens are not normalised (see the class), so
            # at 0.02 the expression signal would start far below what the layers add and small
            # presets collapse to the majority class.
            init.normal_(module.gene_embeddings.weight, mean=0.0, std=1.0)
            init.normal_(module.value_bins.weight, mean=0.0, std=1.0)
            init.normal_(module.cls_embedding, mean=0.0, std=1.0)
            init.normal_(module.mask_embedding, mean=0.0, std=1.0)
        elif isinstance(module, ScrnaLongformerModel):
            init.copy_(module.gene_neighbors, default_gene_neighbors(self.config.n_genes, self.config.knn_k))

    def save_pretrained(self, save_directory, *args, **kwargs):
        if getattr(self, "_auto_class", None) is not None:
            self.config.auto_map = dict(AUTO_MAP)
        return super().save_pretrained(save_directory, *args, **kwargs)


def _check_expression(expression: torch.Tensor, n_genes: int) -> None:
    if not isinstance(expression, torch.Tensor) or not expression.is_floating_point():
        found = expression.dtype if isinstance(expression, torch.Tensor) else type(expression).__name__
        raise TypeError(f"expression must be a floating-point tensor, got {found}; use processor(...) or .float().")
    if expression.dim() != 2 or expression.shape[1] != n_genes:
        raise ValueError(
            f"expression must have shape (batch, n_genes={n_genes}), got {tuple(expression.shape)}; "
            "align the cells to the model's gene panel with its processor."
        )
    if not bool(torch.isfinite(expression).all()):
        raise ValueError("expression contains NaN or infinite values.")
    if bool((expression < 0).any()):
        raise ValueError("expression contains negative values; the model expects log1p-normalised expression >= 0.")


class ScrnaLongformerModel(ScrnaLongformerPreTrainedModel):
    """The bare encoder: expression (batch, G) -> token states (batch, 1 + G, d) and a cell
    embedding (batch, d). Holds the gene graph as the buffer ``gene_neighbors`` (G, k)."""

    def __init__(self, config: ScrnaLongformerConfig):
        super().__init__(config)
        self.embeddings = ScrnaLongformerEmbeddings(config)
        self.encoder = ScrnaLongformerEncoder(config)
        self.final_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.pooler_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.register_buffer("gene_neighbors", default_gene_neighbors(config.n_genes, config.knn_k), persistent=True)
        self.post_init()

    def set_gene_graph(self, gene_neighbors) -> None:
        """Replace the gene graph with a ``(G, k)`` neighbour table (-1 = padding), e.g. from
        ``ScrnaLongformerProcessor.build_gene_graph`` on training cells."""
        table = torch.as_tensor(gene_neighbors)
        validate_gene_neighbors(table, self.config.n_genes, self.config.knn_k)
        self.gene_neighbors.copy_(table.to(device=self.gene_neighbors.device, dtype=torch.long))

    def forward(
        self,
        expression: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        masked_positions: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> ScrnaLongformerModelOutput:
        r"""
        Args:
            expression: (batch, G) float, normalised expression in the model's gene order.
            attention_mask: (batch, G), 1 for genes measured in this cell's dataset and 0 for
                genes absent from it (zero-filled); absent genes are never attended to.
            masked_positions: (batch, G) bool; those genes' values are hidden from the input.
        """
        _check_expression(expression, self.config.n_genes)
        batch = expression.shape[0]
        if attention_mask is None:
            gene_mask = torch.ones_like(expression, dtype=torch.bool)
        else:
            if tuple(attention_mask.shape) != tuple(expression.shape):
                raise ValueError(
                    f"attention_mask must have the shape of expression {tuple(expression.shape)}, "
                    f"got {tuple(attention_mask.shape)}."
                )
            gene_mask = attention_mask.bool()
        key_mask = torch.cat([gene_mask.new_ones(batch, 1), gene_mask], dim=1)  # (b, 1 + G)
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )

        tokens = self.embeddings(expression, masked_positions)
        hidden, all_hidden, all_attentions = self.encoder(
            tokens, self.gene_neighbors, key_mask, output_attentions, output_hidden_states
        )
        # Pool the residual stream first and normalise the pooled vector: normalising each gene
        # token before the mean would again erase how strongly each gene is expressed.
        if self.config.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = gene_mask.unsqueeze(-1).to(hidden.dtype)  # (b, G, 1)
            pooled = (hidden[:, 1:] * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return ScrnaLongformerModelOutput(
            last_hidden_state=self.final_norm(hidden),
            cell_embedding=self.pooler_norm(pooled),
            hidden_states=all_hidden,
            attentions=all_attentions,
        )


class ScrnaLongformerForMaskedGeneModeling(ScrnaLongformerPreTrainedModel):
    """Masked gene modelling: hide the values of a random ``mask_ratio`` of the measured genes
    from the input and regress them from the rest. The loss covers the masked genes only."""

    def __init__(self, config: ScrnaLongformerConfig):
        super().__init__(config)
        self.scrna_longformer = ScrnaLongformerModel(config)
        self.prediction_transform = nn.Linear(config.d_model, config.d_model)
        self.prediction_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.prediction_head = nn.Linear(config.d_model, 1)
        self.post_init()

    def sample_masked_positions(self, expression: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(batch, G) bool: each measured gene is masked with probability ``mask_ratio``."""
        masked = torch.rand(expression.shape, device=expression.device) < self.config.mask_ratio
        if attention_mask is not None:
            masked &= attention_mask.bool()
        return masked

    def forward(
        self,
        expression: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        masked_positions: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> MaskedGeneModelingOutput:
        r"""
        Args:
            masked_positions: (batch, G) bool, genes to hide and score; sampled if None.
            labels: (batch, G) target values; defaults to ``expression`` itself.
        """
        if masked_positions is None:
            masked_positions = self.sample_masked_positions(expression, attention_mask)
        masked_positions = masked_positions.bool()
        outputs = self.scrna_longformer(
            expression,
            attention_mask=attention_mask,
            masked_positions=masked_positions,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        gene_states = outputs.last_hidden_state[:, 1:]  # (b, G, d)
        transformed = self.prediction_norm(F.gelu(self.prediction_transform(gene_states)))
        predictions = self.prediction_head(transformed).squeeze(-1)  # (b, G)
        targets = expression if labels is None else labels
        n_masked = masked_positions.sum()
        squared_error = (predictions - targets).pow(2) * masked_positions
        loss = squared_error.sum() / n_masked.clamp(min=1)
        return MaskedGeneModelingOutput(
            loss=loss,
            logits=predictions,
            masked_positions=masked_positions,
            cell_embedding=outputs.cell_embedding,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class ScrnaLongformerForCellClassification(ScrnaLongformerPreTrainedModel):
    """Cell-type classification from the pooled cell embedding."""

    def __init__(self, config: ScrnaLongformerConfig):
        super().__init__(config)
        self.scrna_longformer = ScrnaLongformerModel(config)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.classifier = nn.Linear(config.d_model, config.num_labels)
        self.post_init()

    def forward(
        self,
        expression: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> CellClassifierOutput:
        r"""
        Args:
            labels: (batch,) int64 class ids in ``[0, num_labels)``.
        """
        outputs = self.scrna_longformer(
            expression,
            attention_mask=attention_mask,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        logits = self.classifier(self.dropout(outputs.cell_embedding))  # (b, num_labels)
        loss = None
        if labels is not None:
            if labels.dim() != 1 or int(labels.min()) < 0 or int(labels.max()) >= self.config.num_labels:
                raise ValueError(
                    f"labels must be a (batch,) tensor of class ids in [0, {self.config.num_labels}), "
                    f"got shape {tuple(labels.shape)} with values {int(labels.min())}..{int(labels.max())}."
                )
            weight = None
            if self.config.class_weights is not None:
                weight = torch.tensor(self.config.class_weights, dtype=logits.dtype, device=logits.device)
            loss = F.cross_entropy(logits, labels.long(), weight=weight)
        return CellClassifierOutput(
            loss=loss,
            logits=logits,
            cell_embedding=outputs.cell_embedding,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = [
    "ScrnaLongformerPreTrainedModel",
    "ScrnaLongformerModel",
    "ScrnaLongformerForMaskedGeneModeling",
    "ScrnaLongformerForCellClassification",
    "default_gene_neighbors",
    "knn_attention",
    "dense_attention",
    "linear_attention",
]
