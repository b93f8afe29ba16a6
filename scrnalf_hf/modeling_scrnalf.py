"""The scRNA longformer: a gene-token transformer with kNN-local attention over a gene graph.

A cell is a sequence of ``1 + G`` tokens: a global CLS token followed by one token per gene of
the model's fixed gene panel. Each gene token attends to its ``k`` nearest genes in a gene–gene
kNN graph (a ``(G, k)`` neighbour table saved with the weights) and to CLS; CLS attends to every
gene. Three interchangeable attention kernels compute this:

- ``knn``: exact sparse attention, O(G·k) time and memory; no tensor of G×G size is ever built.
  Each gene gathers its k neighbours' keys and values; ``torch.compile`` fuses the kernel into
  one pass, so its cost does not depend on how the graph is laid out over the panel. On an
  AVX-512 CPU small C kernels (``kernels_scrnalf.py``) run it instead, forward and backward.
- ``dense``: masked SDPA over the full token set with the same graph as a boolean mask. It is the
  numerical reference for ``knn`` and is O(G²).
- ``linear``: kernelised global attention (feature map elu + 1), O(G·d²); ignores the graph.

Every way of computing attention is an entry of one registry (``ATTENTION_FUNCTIONS``); the bare
model picks the entry once per forward and hands it to every layer.

Other modalities join through ``ScrnaLongformerCrossModalFusion``: CITE-seq protein tokens, and
ATAC peak tokens, which run through the same embeddings and kNN layers over a genomic peak graph
(``ScrnaLongformerPeakEncoder``: each peak attends to its nearest peaks on its chromosome).

The file reads in the order data flows: gene graph helpers, embeddings, attention kernels and
their registry, attention, layer, encoder, other modalities and fusion, outputs, the pretrained
base class, the bare model, then the task heads.

This file is copied next to saved weights as remote code: it imports only torch, transformers,
the Python standard library and the configuration and kernels files beside it.
"""

import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput, logging

from .configuration_scrnalf import MODALITIES, ScrnaLongformerConfig
from .kernels_scrnalf import C_KNN_ATTENTION, AttentionFunction, CompiledFunction, torch_dropout

logger = logging.get_logger(__name__)


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


def _dropout(dropout: nn.Dropout, hidden_states: torch.Tensor, attention_function: AttentionFunction) -> torch.Tensor:
    """``dropout(hidden_states)``; inside a compiled graph, the attention function's own dropout
    (the C kernels draw the mask on CPU: see ``kernels_scrnalf.c_dropout``)."""
    if torch.compiler.is_compiling():
        return attention_function.graph_dropout(hidden_states, dropout.p, dropout.training)
    return dropout(hidden_states)


class ScrnaLongformerEmbeddings(nn.Module):
    """Turns a cell's expression values into ``1 + G`` tokens.

    A gene's token combines its gene embedding with an embedding of its value in this cell. The
    value embedding interpolates linearly between ``n_value_bins`` learned vectors spread evenly
    over ``[0, value_max]``, so it is a smooth, learned, non-linear function of the value that
    stays differentiable. Multiplicative encoding (gene ⊙ (1 + value)) lets the mean over gene
    tokens carry gene-specific expression, which an additive shared value projection averages
    away. With ``use_mask_token``, masked genes get a learned mask vector instead of their value
    embedding.

    Input ``expression`` (batch, G) float; output (batch, 1 + G, d_model), CLS first.

    A model of several species (``config.species``) also has, per species, a species token
    (added to CLS) and a small adapter of the gene tokens — a scale and a shift per channel,
    ``token ⊙ (1 + scale_s) + shift_s`` — both starting at zero, i.e. as the identity: the trunk
    is shared, and a species without training cells is read exactly like the others.
    """

    def __init__(self, config: ScrnaLongformerConfig, use_mask_token: bool = False):
        super().__init__()
        self.config = config
        self.gene_embeddings = nn.Embedding(config.n_genes, config.d_model)
        self.value_bins = nn.Embedding(config.n_value_bins, config.d_model)
        self.mask_embedding = nn.Parameter(torch.zeros(config.d_model)) if use_mask_token else None
        self.cls_embedding = nn.Parameter(torch.zeros(config.d_model))
        n_species = len(config.species or ())
        self.species_embeddings = nn.Embedding(n_species, config.d_model) if n_species else None
        self.species_scale = nn.Embedding(n_species, config.d_model) if n_species else None
        self.species_shift = nn.Embedding(n_species, config.d_model) if n_species else None
        self.dropout = nn.Dropout(config.hidden_dropout)

    def adapt_to_species(self, tokens: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        """(batch, 1 + G, d) tokens of cells of ``species`` (batch,) ids -> the same, with the
        species token added to CLS and each species' adapter applied to its cells' gene tokens."""
        scale = self.species_scale(species).unsqueeze(1).to(tokens.dtype)  # (batch, 1, d)
        shift = self.species_shift(species).unsqueeze(1).to(tokens.dtype)
        genes = tokens[:, 1:] * (1 + scale) + shift
        cls = tokens[:, :1] + self.species_embeddings(species).unsqueeze(1).to(tokens.dtype)
        return torch.cat([cls, genes], dim=1)

    def encode_values(self, expression: torch.Tensor) -> torch.Tensor:
        """(batch, G) values -> (batch, G, d_model) soft-binned value embeddings."""
        n_bins = self.config.n_value_bins
        position = expression.clamp(0, self.config.value_max) * ((n_bins - 1) / self.config.value_max)
        # Tent weights max(0, 1 - |position - b|) are the linear interpolation between the two bins
        # around each value, written as a product with the bin table so that its gradient is one
        # matrix product instead of a scatter-add into 16 rows (4% of a training step, measured).
        centres = torch.arange(n_bins, dtype=expression.dtype, device=expression.device)
        weights = (1 - (position.unsqueeze(-1) - centres).abs()).clamp(min=0)  # (batch, G, n_bins)
        return weights @ self.value_bins.weight

    def forward(
        self,
        expression: torch.Tensor,
        masked_positions: torch.Tensor | None,
        attention_function: AttentionFunction,
    ) -> torch.Tensor:
        """``masked_positions`` (batch, G) bool, only with ``use_mask_token``; ``attention_function``
        supplies the dropout of compiled graphs."""
        values = self.encode_values(expression.to(self.value_bins.weight.dtype))  # (batch, G, d)
        if masked_positions is not None:
            values = torch.where(masked_positions.unsqueeze(-1), self.mask_embedding.to(values.dtype), values)
        # The table is looked up, not read as .weight: FSDP shards the input embeddings as a unit of
        # their own (accelerate's FSDP2 does), and only a call gathers the full table.
        gene_index = torch.arange(self.gene_embeddings.num_embeddings, device=expression.device)
        genes = self.gene_embeddings(gene_index).unsqueeze(0)  # (1, G, d)
        if self.config.value_encoding == "multiplicative":
            tokens = genes * (1 + values)
        else:
            tokens = genes + values
        cls = self.cls_embedding.to(tokens.dtype).expand(tokens.shape[0], 1, -1)  # (batch, 1, d)
        tokens = torch.cat([cls, tokens], dim=1)  # (batch, 1 + G, d)
        # No LayerNorm here: it would rescale every token to unit size and so erase how strongly
        # a gene is expressed; the pre-LayerNorm layers normalise what they read.
        return _dropout(self.dropout, tokens, attention_function)


# ---------------------------------------------------------------------------------------------
# Attention kernels. Each takes the fused projection qkv (batch, 1 + G, 3, heads, head_dim) —
# token-major, CLS at index 0 — the (G, k) neighbour table, a (batch, 1 + G) boolean key mask
# (True = may be attended to; CLS is always True), the dropout probability and whether to return
# attention weights. Each returns (batch, 1 + G, heads, head_dim) and, if asked, the gene rows'
# attention weights in neighbour-table form: (batch, heads, G, k + 1), column j < k the weight on
# gene_neighbors[g, j], column k the weight on CLS. Returned weights are on the autograd graph:
# the output is computed from them.
# ---------------------------------------------------------------------------------------------


def _cls_attention(query, key, value, key_mask, dropout_p):
    """CLS attends to every measured token: O(G). (b, 1 + G, h, dh) -> (b, 1, h, dh)."""
    scale = query.shape[-1] ** -0.5
    scores = torch.einsum("bhd,bthd->bht", query[:, 0] * scale, key)  # (b, h, 1 + G)
    scores = scores.masked_fill(~key_mask[:, None, :], float("-inf"))
    probs = F.dropout(scores.softmax(-1), p=dropout_p, training=dropout_p > 0)
    return torch.einsum("bht,bthd->bhd", probs, value).unsqueeze(1)


def knn_attention(
    qkv: torch.Tensor,
    gene_neighbors: torch.Tensor,
    key_mask: torch.Tensor,
    dropout_p: float = 0.0,
    output_attentions: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sparse kNN attention, exact, O(G·k) time and memory; never builds a G×G tensor, and costs
    the same for any graph, local or scattered over the panel.

    Each gene's query meets its k neighbours' keys and CLS. Written as a gather of the
    neighbours' K/V rows followed by products and sums over small axes: eager PyTorch
    materialises the gathered (b, G, k, h, dh) copies, while ``torch.compile`` (the layers'
    ``kernel_implementation="compiled"``) fuses it into one loop that reads each neighbour row
    once and writes only the output.
    """
    query, key, value = qkv.unbind(2)  # each (b, 1 + G, h, dh)
    batch, _, heads, head_dim = query.shape
    n_genes, k = gene_neighbors.shape
    scale = head_dim**-0.5
    flat = (gene_neighbors.clamp(min=0) + 1).reshape(-1)  # (G·k,) token index of each neighbour
    gene_query = query[:, 1:] * scale  # (b, G, h, dh)
    neighbor_keys = key.index_select(1, flat).view(batch, n_genes, k, heads, head_dim)
    neighbor_values = value.index_select(1, flat).view(batch, n_genes, k, heads, head_dim)

    scores = (gene_query.unsqueeze(2) * neighbor_keys).sum(-1)  # (b, G, k, h)
    valid = (gene_neighbors >= 0).unsqueeze(0) & key_mask.index_select(1, flat).view(batch, n_genes, k)
    scores = scores.masked_fill(~valid.unsqueeze(-1), float("-inf"))
    to_cls = (gene_query * key[:, :1]).sum(-1).unsqueeze(2)  # (b, G, 1, h)
    # (b, G, k + 1, h); CLS keeps every row finite, so padding and unmeasured genes get exactly 0.
    probs = torch.cat([scores, to_cls], dim=2).softmax(2)
    probs = F.dropout(probs, p=dropout_p, training=dropout_p > 0)
    weights = None
    if output_attentions:
        weights = probs.permute(0, 3, 1, 2)  # (b, h, G, k + 1)
        probs = weights.permute(0, 2, 3, 1)  # the same values, now computed from the returned tensor
    gene_output = (probs[:, :, :k].unsqueeze(-1) * neighbor_values).sum(2)  # (b, G, h, dh)
    gene_output = gene_output + probs[:, :, k].unsqueeze(-1) * value[:, :1]
    output = torch.cat([_cls_attention(query, key, value, key_mask, dropout_p), gene_output], dim=1)
    return output, weights


def graph_attention_mask(gene_neighbors: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """The kNN graph as a dense boolean mask, (batch, 1, 1 + G, 1 + G): True = may attend.
    For the ``dense`` reference only — it is O(G²)."""
    n_genes = gene_neighbors.shape[0]
    n_tokens = n_genes + 1
    gene_rows = torch.zeros(n_genes, n_tokens + 1, dtype=torch.bool, device=gene_neighbors.device)
    gene_rows = gene_rows.scatter(1, _token_columns(gene_neighbors), True)[:, :n_tokens]
    gene_rows[:, 0] = True  # every gene sees CLS
    cls_row = torch.ones(1, n_tokens, dtype=torch.bool, device=gene_neighbors.device)  # CLS sees every gene
    allowed = torch.cat([cls_row, gene_rows], dim=0)  # (1 + G, 1 + G)
    return allowed.unsqueeze(0).unsqueeze(0) & key_mask[:, None, None, :]


def _token_columns(gene_neighbors: torch.Tensor) -> torch.Tensor:
    """(G, k) token index of each neighbour; padding (-1) goes to a spare column 1 + G, which the
    callers drop: no data-dependent shapes, so torch.compile keeps the whole layer in one graph."""
    n_tokens = gene_neighbors.shape[0] + 1
    return torch.where(gene_neighbors >= 0, gene_neighbors + 1, n_tokens)


def dense_attention(
    qkv: torch.Tensor,
    gene_neighbors: torch.Tensor,
    key_mask: torch.Tensor,
    dropout_p: float = 0.0,
    output_attentions: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference: SDPA over all 1 + G tokens with the graph as a dense boolean mask."""
    mask = graph_attention_mask(gene_neighbors, key_mask)  # (b, 1, 1 + G, 1 + G)
    query, key, value = (tensor.transpose(1, 2) for tensor in qkv.unbind(2))  # (b, h, 1 + G, dh)
    if not output_attentions:
        output = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout_p)
        return output.transpose(1, 2), None
    scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(query.shape[-1])
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    probs = F.dropout(probs, p=dropout_p, training=dropout_p > 0)  # (b, h, 1 + G, 1 + G)
    # The gene rows in neighbour-table form, so that knn and dense report the same thing.
    n_genes, k = gene_neighbors.shape
    columns = _token_columns(gene_neighbors).expand(*probs.shape[:2], -1, -1)  # (b, h, G, k)
    gene_probs = F.pad(probs[:, :, 1:], (0, 1))  # (b, h, G, 2 + G); the spare column is 0
    weights = torch.cat([gene_probs.gather(-1, columns), gene_probs[..., :1]], dim=-1)  # (b, h, G, k + 1)
    # Scatter them back: a gene row is 0 outside its neighbours and CLS, so this rebuilds probs
    # exactly, now computed from the returned weights.
    gene_rows = torch.zeros_like(gene_probs).scatter(-1, columns, weights[..., :k])
    gene_rows = torch.cat([weights[..., k:], gene_rows[..., 1 : n_genes + 1]], dim=-1)  # (b, h, G, 1 + G)
    probs = torch.cat([probs[:, :, :1], gene_rows], dim=2)
    return torch.matmul(probs, value).transpose(1, 2), weights


def linear_attention(
    qkv: torch.Tensor,
    gene_neighbors: torch.Tensor,
    key_mask: torch.Tensor,
    dropout_p: float = 0.0,
    output_attentions: bool = False,
) -> tuple[torch.Tensor, None]:
    """Kernelised global attention, φ(x) = elu(x) + 1: O(G·d²), no attention matrix at all.
    The gene graph is not used; masked keys are removed by zeroing their features."""
    if output_attentions:
        raise ValueError("attention weights are not defined for attention_type='linear'; use 'knn' or 'dense'.")
    query, key, value = qkv.unbind(2)  # each (b, 1 + G, h, dh)
    query_features = F.elu(query) + 1
    key_features = (F.elu(key) + 1) * key_mask[:, :, None, None].to(key.dtype)
    key_value = torch.einsum("bthd,bthe->bhde", key_features, value)  # (b, h, dh, dh)
    normaliser = torch.einsum("bthd,bhd->bth", query_features, key_features.sum(dim=1))  # (b, 1 + G, h)
    output = torch.einsum("bthd,bhde->bthe", query_features, key_value)
    return output / normaliser.clamp(min=1e-6).unsqueeze(-1), None


def _configured(attention_type: str):
    """``supports`` of a PyTorch kernel: it computes its attention type anywhere."""

    def supports(config, device, dtype, training, output_attentions, knn_k) -> bool:
        return config.attention_type == attention_type

    return supports


# Every way to compute the layers' attention, the most specialised first: the first entry whose
# ``supports`` accepts a call computes it. A new kernel, say a Triton kNN kernel for GPUs, is
# one more entry, listed before the general one it stands in for.
ATTENTION_FUNCTIONS: tuple[AttentionFunction, ...] = (
    C_KNN_ATTENTION,
    AttentionFunction("knn", knn_attention, _configured("knn"), torch_dropout),
    AttentionFunction("dense", dense_attention, _configured("dense"), torch_dropout),
    AttentionFunction("linear", linear_attention, _configured("linear"), torch_dropout),
)


def resolve_attention_function(
    config: ScrnaLongformerConfig,
    device: torch.device,
    dtype: torch.dtype,
    training: bool,
    output_attentions: bool,
    knn_k: int,
) -> AttentionFunction:
    """The registry entry that computes the attention for a forward with these settings."""
    for attention_function in ATTENTION_FUNCTIONS:
        if attention_function.supports(config, device, dtype, training, output_attentions, knn_k):
            return attention_function
    raise ValueError(f"no attention function computes attention_type={config.attention_type!r}.")


# ---------------------------------------------------------------------------------------------
# Transformer blocks
# ---------------------------------------------------------------------------------------------


def _project(linear: nn.Linear, hidden_states: torch.Tensor) -> torch.Tensor:
    """``linear(hidden_states)``. Inside a compiled graph the bias is added as its own elementwise
    op, which inductor fuses into the next elementwise kernel: a CPU ``addmm`` first copies the
    broadcast bias into its whole output, an extra pass over the widest activations (8% of the
    default preset's forward, measured)."""
    if torch.compiler.is_compiling():
        return F.linear(hidden_states, linear.weight) + linear.bias
    return linear(hidden_states)


class ScrnaLongformerAttention(nn.Module):
    """Multi-head attention with a fused QKV projection, computed by the attention function the
    model resolved for this forward. (batch, 1 + G, d) -> (batch, 1 + G, d)."""

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
        attention_function: AttentionFunction,
        output_attentions: bool = False,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``rows``: (n,) indices into the batch's ``batch·(1 + G)`` tokens, row-major; only those
        tokens' outputs are projected and returned, as (n, d)."""
        batch, n_tokens, d_model = hidden_states.shape
        heads = self.config.n_heads
        qkv = _project(self.qkv, hidden_states).view(batch, n_tokens, 3, heads, d_model // heads)
        dropout_p = self.config.attention_dropout if self.training else 0.0
        context, weights = attention_function(qkv, gene_neighbors, key_mask, dropout_p, output_attentions)
        context = context.reshape(batch, n_tokens, d_model)
        if rows is not None:
            context = context.reshape(batch * n_tokens, d_model).index_select(0, rows)
        return _project(self.output, context), weights


class ScrnaLongformerFeedForward(nn.Module):
    """Position-wise MLP, d -> d·mlp_ratio -> d."""

    def __init__(self, config: ScrnaLongformerConfig):
        super().__init__()
        self.up = nn.Linear(config.d_model, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.d_model)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return _project(self.down, F.gelu(_project(self.up, hidden_states)))


def _layer_forward(
    layer: "ScrnaLongformerLayer",
    hidden_states: torch.Tensor,
    gene_neighbors: torch.Tensor,
    key_mask: torch.Tensor,
    attention_function: AttentionFunction,
    output_attentions: bool,
    rows: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    attended, weights = layer.attention(
        layer.attention_norm(hidden_states), gene_neighbors, key_mask, attention_function, output_attentions, rows
    )
    if rows is not None:
        hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1]).index_select(0, rows)
    hidden_states = hidden_states + _dropout(layer.dropout, attended, attention_function)
    feed_forward = layer.feed_forward(layer.feed_forward_norm(hidden_states))
    hidden_states = hidden_states + _dropout(layer.dropout, feed_forward, attention_function)
    return hidden_states, weights


class ScrnaLongformerLayer(GradientCheckpointingLayer):
    """Pre-LayerNorm transformer layer: attention then feed-forward, each with a residual.
    With ``config.kernel_implementation="compiled"`` the whole layer runs as one compiled graph
    (the kNN gather, LayerNorms, GELU and residual adds fused around the matrix products);
    ``compiled_forward`` is that graph's wrapper, shared by the layers of one model."""

    def __init__(self, config: ScrnaLongformerConfig, compiled_forward: CompiledFunction):
        super().__init__()
        self.config = config
        self.attention_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attention = ScrnaLongformerAttention(config)
        self.feed_forward_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.feed_forward = ScrnaLongformerFeedForward(config)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.compiled_forward = compiled_forward

    def __call__(self, *args, **kwargs):
        # Non-reentrant gradient checkpointing stops its recomputation early by default, which a
        # compiled graph cannot do; recomputing the whole layer is the same work.
        with torch.utils.checkpoint.set_checkpoint_early_stop(False):
            return super().__call__(*args, **kwargs)

    def forward(
        self,
        hidden_states: torch.Tensor,
        gene_neighbors: torch.Tensor,
        key_mask: torch.Tensor,
        attention_function: AttentionFunction,
        output_attentions: bool = False,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(b, 1 + G, d) -> (b, 1 + G, d) and the attention weights if asked. With ``rows`` (n,),
        indices into the ``b·(1 + G)`` tokens, everything after the attention runs at those
        tokens only: -> (n, d)."""
        arguments = (self, hidden_states, gene_neighbors, key_mask, attention_function, bool(output_attentions), rows)
        # Returned attention weights are on the autograd graph, which the outputs of a compiled
        # graph cannot be (each is a leaf of its backward): with weights asked for, run eagerly.
        if self.config.kernel_implementation == "eager" or output_attentions:
            return _layer_forward(*arguments)
        threads = torch.get_num_threads() if attention_function.multithreaded_graphs else 1
        return self.compiled_forward(*arguments, kernel_threads=threads)


class ScrnaLongformerEncoder(nn.Module):
    """A stack of ``depth`` pre-LayerNorm layers; returns the un-normalised residual stream."""

    def __init__(self, config: ScrnaLongformerConfig):
        super().__init__()
        compiled_forward = CompiledFunction(_layer_forward, batch_arguments=(1, 3, 6))
        self.layers = nn.ModuleList([ScrnaLongformerLayer(config, compiled_forward) for _ in range(config.depth)])

    def forward(
        self,
        hidden_states: torch.Tensor,
        gene_neighbors: torch.Tensor,
        key_mask: torch.Tensor,
        attention_function: AttentionFunction,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        last_layer_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple | None, tuple | None]:
        """``last_layer_rows``: see ``ScrnaLongformerLayer.forward``'s ``rows``; the last layer
        then returns (n, d)."""
        all_hidden = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for index, layer in enumerate(self.layers):
            rows = last_layer_rows if index == len(self.layers) - 1 else None
            hidden_states, weights = layer(
                hidden_states, gene_neighbors, key_mask, attention_function, output_attentions, rows=rows
            )
            if output_hidden_states:
                all_hidden += (hidden_states,)
            if output_attentions:
                all_attentions += (weights,)
        return hidden_states, all_hidden, all_attentions


# ---------------------------------------------------------------------------------------------
# Other modalities: protein tokens (CITE-seq), the ATAC peak encoder, cross-modal fusion
# ---------------------------------------------------------------------------------------------


class ScrnaLongformerProteinEmbeddings(nn.Module):
    """Turns a cell's protein levels into P protein tokens: a protein-panel vocabulary (one
    learned vector per protein of ``config.protein_names``) plus an encoding of the protein's
    CLR-normalised level in this cell (a small MLP of the value: CLR values are signed and
    unbounded, so the value bins of the gene tokens do not fit them). Proteins hidden from the
    input (masked-modality training, RNA-only inference) or not measured get a learned mask
    vector instead of their value encoding.

    ``summarize`` gives the cell's protein summary: one linear map of the shown proteins' levels
    and of which proteins are hidden, so that each protein has its own direction in it.

    Input ``protein_expression`` (batch, P) float or None (every protein hidden), ``hidden``
    (batch, P) bool; output (batch, P, d_model).
    """

    def __init__(self, config: ScrnaLongformerConfig):
        super().__init__()
        self.protein_embeddings = nn.Embedding(config.n_proteins, config.d_model)
        self.value_input = nn.Linear(1, config.d_model)
        self.value_output = nn.Linear(config.d_model, config.d_model)
        self.mask_embedding = nn.Parameter(torch.zeros(config.d_model))
        self.summary = nn.Linear(2 * config.n_proteins, config.d_model)

    def summarize(self, protein_expression: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor:
        """(batch, P) CLR levels or None, (batch, P) bool hidden -> (batch, d_model). Hidden
        proteins enter as 0 plus their hidden flag: a level of 0 is a real CLR value."""
        dtype = self.summary.weight.dtype
        shown = hidden.new_zeros(hidden.shape, dtype=dtype) if protein_expression is None else (
            protein_expression.to(dtype).masked_fill(hidden, 0.0)
        )
        return self.summary(torch.cat([shown, hidden.to(dtype)], dim=-1))

    def forward(self, protein_expression: torch.Tensor | None, hidden: torch.Tensor, batch: int) -> torch.Tensor:
        proteins = self.protein_embeddings.weight.unsqueeze(0).expand(batch, -1, -1)  # (b, P, d)
        masked = self.mask_embedding.to(proteins.dtype).expand_as(proteins)
        if protein_expression is None:
            return proteins + masked
        values = protein_expression.to(proteins.dtype).unsqueeze(-1)  # (b, P, 1)
        encoded = self.value_output(F.gelu(self.value_input(values)))  # (b, P, d)
        return proteins + torch.where(hidden.unsqueeze(-1), masked, encoded)


class ScrnaLongformerFusionLayer(nn.Module):
    """One cross-modal layer (pre-LayerNorm): the fused tokens — the cell token and the P protein
    tokens — attend to each other and to every measured gene token of the RNA encoder's output
    (and every measured peak token of the ATAC encoder's), then a feed-forward block; both with
    residuals. Cost O((1 + P)·(1 + P + K)) for K gene and peak tokens: linear in the gene and peak
    panels, their tokens are keys only.

    (batch, 1 + P, d) fused tokens, (batch, K, d) gene (then peak) tokens, (batch, 1 + P + K) bool
    key mask -> (batch, 1 + P, d).
    """

    def __init__(self, config: ScrnaLongformerConfig):
        super().__init__()
        self.config = config
        self.query_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.query = nn.Linear(config.d_model, config.d_model)
        self.key_value = nn.Linear(config.d_model, 2 * config.d_model)
        self.output = nn.Linear(config.d_model, config.d_model)
        self.feed_forward_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.feed_forward = ScrnaLongformerFeedForward(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, fused: torch.Tensor, tokens: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        batch, n_fused, d_model = fused.shape
        heads = self.config.n_heads
        normed = self.query_norm(fused)
        keys = torch.cat([normed, tokens], dim=1)  # (b, 1 + P + K, d)
        query = self.query(normed).view(batch, n_fused, heads, -1).transpose(1, 2)  # (b, h, 1 + P, dh)
        key, value = self.key_value(keys).view(batch, keys.shape[1], 2, heads, -1).permute(2, 0, 3, 1, 4)
        dropout_p = self.config.attention_dropout if self.training else 0.0
        context = F.scaled_dot_product_attention(
            query, key, value, attn_mask=key_mask[:, None, None, :], dropout_p=dropout_p
        )  # (b, h, 1 + P, dh)
        context = context.transpose(1, 2).reshape(batch, n_fused, d_model)
        fused = fused + self.dropout(self.output(context))
        return fused + self.dropout(self.feed_forward(self.feed_forward_norm(fused)))


class ScrnaLongformerPeakEncoder(nn.Module):
    """The ATAC encoder: one token per peak of the peak panel, the same embeddings, kNN-attention
    layers and pooling as the gene encoder (``config.peak_encoder_config()``), over a peak graph
    held as the buffer ``peak_neighbors`` (P, peak_knn_k): each peak attends to its nearest peaks
    on the same chromosome and to its own CLS token, so the cost is O(P·k) time and memory.

    Accessibility enters binarised (0 = no fragment in the peak, 1 = at least one) through the
    gene tokens' value encoding; peaks a cell's data did not measure (``peak_mask`` False, e.g.
    every peak of a cell without ATAC) are never attended to.

    Input ``peak_accessibility`` (batch, P) float 0/1, ``peak_mask`` (batch, P) bool; output a
    ``ScrnaLongformerModelOutput``: ``last_hidden_state`` (batch, 1 + P, d), CLS first, and the
    pooled ATAC cell embedding (batch, d).
    """

    def __init__(self, config: ScrnaLongformerConfig):
        super().__init__()
        self.config = config.peak_encoder_config()
        self.embeddings = ScrnaLongformerEmbeddings(self.config)
        self.encoder = ScrnaLongformerEncoder(self.config)
        self.final_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.register_buffer(
            "peak_neighbors", default_gene_neighbors(config.n_peaks, config.peak_knn_k), persistent=True
        )

    def set_peak_graph(self, peak_neighbors) -> None:
        """Replace the peak graph with a ``(P, peak_knn_k)`` neighbour table (-1 = padding), e.g.
        from ``scrnalf_hf.data.atac.build_peak_graph`` on the peaks' genomic coordinates."""
        table = torch.as_tensor(peak_neighbors)
        validate_gene_neighbors(table, self.config.n_genes, self.config.knn_k)
        self.peak_neighbors.copy_(table.to(device=self.peak_neighbors.device, dtype=torch.long))

    def forward(self, peak_accessibility: torch.Tensor, peak_mask: torch.Tensor) -> "ScrnaLongformerModelOutput":
        weight = self.embeddings.value_bins.weight
        attention_function = resolve_attention_function(
            self.config, weight.device, weight.dtype, self.training, False, self.peak_neighbors.shape[1]
        )
        tokens = self.embeddings(peak_accessibility, None, attention_function)  # (b, 1 + P, d)
        key_mask = torch.cat([peak_mask.new_ones(peak_mask.shape[0], 1), peak_mask], dim=1)  # (b, 1 + P)
        hidden, _, _ = self.encoder(tokens, self.peak_neighbors, key_mask, attention_function)
        last_hidden_state, cell_embedding = _pool_and_normalize(self.final_norm, self.config.pooling, hidden, peak_mask)
        return ScrnaLongformerModelOutput(last_hidden_state=last_hidden_state, cell_embedding=cell_embedding)


class ScrnaLongformerCrossModalFusion(nn.Module):
    """Fuses a cell's RNA encoding with its other modalities (proteins, ATAC peaks).

    The RNA encoder's output (gene tokens and the pooled cell embedding), the protein tokens
    (``ScrnaLongformerProteinEmbeddings``) and the peak tokens (``ScrnaLongformerPeakEncoder``)
    each get a modality-type embedding (0 = RNA, then one per entry of ``config.modalities`` in
    the order protein, atac); ``config.fusion_depth`` fusion layers then let the cell token and
    the protein tokens attend to each other, to the gene tokens and to the peak tokens. Returns
    the final-normalised fused tokens (batch, 1 + P, d): the fused cell embedding first, then one
    state per protein (P = 0 without proteins).

    The cell token starts as the RNA cell embedding plus, for cells with ATAC, the ATAC cell
    embedding and, in a model with proteins, the protein summary; each protein token as its protein embedding, its value encoding (or the mask
    vector) and the cell token. Modalities a cell lacks (``protein_expression`` None,
    ``peak_mask`` all False or ``peak_accessibility`` None) are hidden, so a multimodal model
    still runs on RNA alone.
    """

    def __init__(self, config: ScrnaLongformerConfig):
        super().__init__()
        self.protein_embeddings = ScrnaLongformerProteinEmbeddings(config) if config.n_proteins else None
        self.peak_encoder = ScrnaLongformerPeakEncoder(config) if config.n_peaks else None
        present = [name for name in MODALITIES if name in (config.modalities or {})]
        # 2 rows for a protein-only model, as before ATAC existed: its checkpoints still load
        self.modality_types = {name: 1 + index for index, name in enumerate(present)}
        self.modality_embeddings = nn.Embedding(1 + len(present), config.d_model)
        self.layers = nn.ModuleList([ScrnaLongformerFusionLayer(config) for _ in range(config.fusion_depth)])
        self.final_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)

    def forward(
        self,
        rna: "ScrnaLongformerModelOutput",
        gene_mask: torch.Tensor,
        protein_expression: torch.Tensor | None,
        hidden_proteins: torch.Tensor | None,
        peak_accessibility: torch.Tensor | None = None,
        peak_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``gene_mask`` (b, G) bool measured genes; ``hidden_proteins`` (b, P) bool;
        ``peak_accessibility`` (b, n_peaks) 0/1 and ``peak_mask`` (b, n_peaks) bool, both or neither."""
        batch = rna.cell_embedding.shape[0]
        types = self.modality_embeddings.weight  # (1 + modalities, d)
        cell = (rna.cell_embedding + types[0]).unsqueeze(1)  # (b, 1, d)
        keys = [rna.last_hidden_state[:, 1:] + types[0]]  # gene tokens (b, G, d)
        key_masks = [gene_mask]
        if self.peak_encoder is not None and peak_accessibility is not None:
            atac = self.peak_encoder(peak_accessibility, peak_mask)
            atac_type = types[self.modality_types["atac"]]
            has_atac = peak_mask.any(dim=1, keepdim=True).unsqueeze(-1)  # (b, 1, 1)
            # the ATAC summary joins the cell token, so that both modalities reach the head at full scale
            cell = cell + torch.where(has_atac, (atac.cell_embedding + atac_type).unsqueeze(1), 0.0)
            keys.append(atac.last_hidden_state[:, 1:] + atac_type)  # peak tokens (b, n_peaks, d)
            key_masks.append(peak_mask)
        if self.protein_embeddings is not None:
            # the protein summary joins the cell token as the ATAC summary does: attention of one
            # token over 1 + P + G keys reads a few proteins' levels only faintly, and a cell type
            # told apart by proteins alone never reached the classifier
            cell = cell + self.protein_embeddings.summarize(protein_expression, hidden_proteins).unsqueeze(1)
        fused = cell
        if self.protein_embeddings is not None:
            protein_type = types[self.modality_types["protein"]]
            # each protein token starts from the cell token: what the cell's RNA (and ATAC) says
            # reaches every protein at full scale, the layers then refine it from the gene tokens
            proteins = self.protein_embeddings(protein_expression, hidden_proteins, batch) + protein_type + cell
            fused = torch.cat([cell, proteins], dim=1)  # (b, 1 + P, d)
        keys = torch.cat(keys, dim=1)  # (b, G [+ n_peaks], d)
        key_mask = torch.cat([gene_mask.new_ones(batch, fused.shape[1]), *key_masks], dim=1)
        for layer in self.layers:
            fused = layer(fused, keys, key_mask)
        return self.final_norm(fused)


def _check_proteins(
    config: ScrnaLongformerConfig,
    expression: torch.Tensor,
    protein_expression: torch.Tensor | None,
    protein_mask: torch.Tensor | None,
    masked_proteins: torch.Tensor | None,
) -> torch.Tensor:
    """Validate a multimodal model's protein inputs; returns (batch, P) bool: proteins hidden from
    the input (every one without ``protein_expression``, and every unmeasured one)."""
    if not config.n_proteins:
        if protein_expression is not None or protein_mask is not None or masked_proteins is not None:
            raise ValueError("protein inputs were given, but this model reads RNA only (config.modalities has no protein).")
        return None
    shape = (expression.shape[0], config.n_proteins)
    for name, tensor in (("protein_expression", protein_expression), ("protein_mask", protein_mask), ("masked_proteins", masked_proteins)):
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape (batch, n_proteins) = {shape}, got {tuple(tensor.shape)}.")
    if protein_expression is None:
        return torch.ones(shape, dtype=torch.bool, device=expression.device)
    if not protein_expression.is_floating_point():
        raise TypeError(f"protein_expression must be floating point (CLR values), got {protein_expression.dtype}.")
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(protein_expression).all()):
        raise ValueError("protein_expression contains NaN or infinite values.")
    hidden = torch.zeros(shape, dtype=torch.bool, device=expression.device)
    if masked_proteins is not None:
        hidden = hidden | masked_proteins.bool()
    if protein_mask is not None:
        hidden = hidden | ~protein_mask.bool()
    return hidden


def _check_peaks(
    config: ScrnaLongformerConfig,
    expression: torch.Tensor,
    peak_accessibility: torch.Tensor | None,
    peak_mask: torch.Tensor | None,
) -> torch.Tensor | None:
    """Validate a multimodal model's ATAC inputs; returns the (batch, n_peaks) bool mask of
    measured peaks (all True when only ``peak_accessibility`` is given), or None without ATAC."""
    if not config.n_peaks:
        if peak_accessibility is not None or peak_mask is not None:
            raise ValueError("ATAC inputs were given, but this model reads no peaks (config.modalities has no atac).")
        return None
    if peak_accessibility is None:
        if peak_mask is not None:
            raise ValueError("peak_mask was given without peak_accessibility; give both, or neither for cells without ATAC.")
        return None
    shape = (expression.shape[0], config.n_peaks)
    for name, tensor in (("peak_accessibility", peak_accessibility), ("peak_mask", peak_mask)):
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape (batch, n_peaks) = {shape}, got {tuple(tensor.shape)}.")
    if not peak_accessibility.is_floating_point():
        raise TypeError(f"peak_accessibility must be floating point (binarised 0/1), got {peak_accessibility.dtype}.")
    if not torch.compiler.is_compiling() and not bool(((peak_accessibility == 0) | (peak_accessibility == 1)).all()):
        raise ValueError(
            "peak_accessibility must be binarised (0 or 1 per peak); binarise fragment counts with "
            "scrnalf_hf.data.atac.binarize_peaks."
        )
    if peak_mask is None:
        return torch.ones(shape, dtype=torch.bool, device=expression.device)
    return peak_mask.bool()


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


@dataclass
class ScrnaLongformerModelOutput(ModelOutput):
    """
    Args:
        last_hidden_state: (batch, 1 + G, d_model), CLS first, after the final LayerNorm.
        cell_embedding: (batch, d_model), the residual stream pooled per ``config.pooling``, then
            normalised by the same final LayerNorm.
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
        loss: mean squared error over the masked genes; only when ``labels`` are given.
        logits: (batch, G) predicted normalised expression of every gene (when training on
            ``labels``, of the masked genes only, NaN elsewhere: see
            ``ScrnaLongformerForMaskedGeneModeling``).
        cell_embedding: (batch, d_model); None when only the masked genes were predicted.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cell_embedding: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class CellClassifierOutput(ModelOutput):
    """
    Args:
        loss: per ``config.problem_type``; only when ``labels`` are given.
        logits: (batch, num_labels).
        cell_embedding: (batch, d_model).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cell_embedding: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class TrajectoryOutput(ModelOutput):
    """
    Args:
        loss: mean squared error between ``logits`` and ``labels``; only when ``labels`` are given.
        logits: (batch,) predicted pseudotime (or time) of each cell, in the units of the
            training targets. One value per cell, not (batch, 1): it is compared with (batch,)
            targets as it is.
        cell_embedding: (batch, d_model), the encoder's cell embedding (before any time point
            is added).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cell_embedding: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class ProteinPredictionOutput(ModelOutput):
    """
    Args:
        loss: mean squared error between ``logits`` and ``labels`` over the scored proteins
            (hidden ones, or all measured ones when nothing is hidden); only with ``labels``.
        logits: (batch, P) predicted CLR-normalised protein levels, panel order.
        cell_embedding: (batch, d_model), the fused cell embedding (RNA and proteins).
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
    # A checkpoint of one head loads into any other (or the bare model) without the other
    # heads' weights being reported as unexpected.
    _keys_to_ignore_on_load_unexpected = [
        r"classifier\.", r"prediction_(transform|norm|head)\.", r"mask_embedding", r"regressor\.", r"time_encoder\.",
        r"fusion\.", r"protein_head\.",
    ]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ScrnaLongformerEmbeddings):
            # Unit-scale gene and value embeddings: tokens are not normalised (see the class), so
            # at 0.02 the expression signal would start far below what the layers add and small
            # presets collapse to the majority class.
            init.normal_(module.gene_embeddings.weight, mean=0.0, std=1.0)
            if self.config.value_encoding == "multiplicative":
                # 1 + value embedding starts as the value itself (bin b at value b·value_max/(n-1))
                # plus small per-dimension noise: a gene's token is then ~ gene embedding × value,
                # unmeasured-level genes start near zero, and the mean-pooled cell embedding starts
                # as a random linear projection of the expression profile (unit-scale random bins
                # instead bury the cell-to-cell signal under a per-gene constant).
                n_bins = self.config.n_value_bins
                centres = torch.arange(n_bins, dtype=torch.float32) * (self.config.value_max / (n_bins - 1))
                noise = 0.1 * torch.randn(n_bins, self.config.d_model)
                init.copy_(module.value_bins.weight, (centres - 1.0).unsqueeze(1) + noise)
            else:
                init.normal_(module.value_bins.weight, mean=0.0, std=1.0)
            init.normal_(module.cls_embedding, mean=0.0, std=1.0)
            if module.mask_embedding is not None:
                init.normal_(module.mask_embedding, mean=0.0, std=1.0)
            if module.species_embeddings is not None:
                # The identity: species differ only by what they learn.
                for table in (module.species_embeddings, module.species_scale, module.species_shift):
                    init.zeros_(table.weight)
        elif isinstance(module, ScrnaLongformerProteinEmbeddings):
            # unit scale like the gene embeddings: the fusion layers are pre-LayerNorm
            init.normal_(module.protein_embeddings.weight, mean=0.0, std=1.0)
            init.normal_(module.mask_embedding, mean=0.0, std=1.0)
            # a unit-scale random projection of the panel, like the pooled RNA cell embedding
            init.normal_(module.summary.weight, mean=0.0, std=module.summary.in_features ** -0.5)
            init.zeros_(module.summary.bias)
        elif isinstance(module, ScrnaLongformerModel):
            init.copy_(module.gene_neighbors, default_gene_neighbors(self.config.n_genes, self.config.knn_k))
        elif isinstance(module, ScrnaLongformerPeakEncoder):
            init.copy_(module.peak_neighbors, default_gene_neighbors(self.config.n_peaks, self.config.peak_knn_k))

    def save_pretrained(self, save_directory, *args, **kwargs):
        if self._auto_class is not None:
            self.config.auto_map = self._auto_map()
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _auto_map(self) -> dict[str, str]:
        """The config's ``auto_map`` with every model class of this module that was registered for
        an Auto class (the package registers each head), so that a checkpoint of any head loads
        with any of those Auto classes through trust_remote_code. This model's own class keeps
        its own Auto class."""
        module = sys.modules[type(self).__module__]
        file_name = module.__name__.rsplit(".", 1)[-1]
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        for model_class in vars(module).values():
            if (
                isinstance(model_class, type)
                and issubclass(model_class, ScrnaLongformerPreTrainedModel)
                and model_class.__dict__.get("_auto_class") is not None
            ):
                auto_map[model_class._auto_class] = f"{file_name}.{model_class.__name__}"
        auto_map[self._auto_class] = f"{file_name}.{type(self).__name__}"
        return auto_map


def _check_expression(expression: torch.Tensor, n_genes: int) -> None:
    if not isinstance(expression, torch.Tensor) or not expression.is_floating_point():
        found = expression.dtype if isinstance(expression, torch.Tensor) else type(expression).__name__
        raise TypeError(f"expression must be a floating-point tensor, got {found}; use processor(...) or .float().")
    if expression.dim() != 2 or expression.shape[1] != n_genes:
        raise ValueError(
            f"expression must have shape (batch, n_genes={n_genes}), got {tuple(expression.shape)}; "
            "align the cells to the model's gene panel with its processor."
        )
    if torch.compiler.is_compiling():
        return  # the checks below read the values, which a traced graph does not have
    if not bool(torch.isfinite(expression).all()):
        raise ValueError("expression contains NaN or infinite values.")
    if bool((expression < 0).any()):
        raise ValueError("expression contains negative values; the model expects log1p-normalised expression >= 0.")


def _check_same_shape(name: str, tensor: torch.Tensor, expression: torch.Tensor) -> None:
    if tuple(tensor.shape) != tuple(expression.shape):
        raise ValueError(
            f"{name} must have the shape of expression {tuple(expression.shape)}, got {tuple(tensor.shape)}."
        )


def _embed(
    embeddings: ScrnaLongformerEmbeddings,
    expression: torch.Tensor,
    masked_positions: torch.Tensor | None,
    attention_function: AttentionFunction,
) -> torch.Tensor:
    return embeddings(expression, masked_positions, attention_function)


def _pool_and_normalize(
    final_norm: nn.LayerNorm, pooling: str, hidden: torch.Tensor, gene_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, 1 + G, d) residual stream and (b, G) gene mask -> normalised token states
    (b, 1 + G, d) and cell embedding (b, d)."""
    # Pool the residual stream first and normalise the pooled vector: normalising each gene
    # token before the mean would again erase how strongly each gene is expressed.
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        weights = gene_mask.unsqueeze(-1).to(hidden.dtype)  # (b, G, 1)
        pooled = (hidden[:, 1:] * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    return final_norm(hidden), final_norm(pooled)


# Floats in the widest activation of one inference chunk (8 MB in fp32; the best of 2–32 MB
# measured on 2 cores for the tiny and default presets).
_INFERENCE_CHUNK_FLOATS = 2**21


def _cat_per_layer(per_chunk: list[tuple | None]) -> tuple | None:
    """Concatenate per-layer tuples of chunk outputs along the batch."""
    if per_chunk[0] is None:
        return None
    return tuple(torch.cat(layer_outputs) for layer_outputs in zip(*per_chunk))


class ScrnaLongformerModel(ScrnaLongformerPreTrainedModel):
    """The bare encoder: expression (batch, G) -> token states (batch, 1 + G, d) and a cell
    embedding (batch, d). Holds the gene graph as the buffer ``gene_neighbors`` (G, k).

    Args:
        config: the model's configuration.
        use_mask_token: learn a mask vector that stands in for hidden values (``masked_positions``),
            for masked gene modelling.
    """

    def __init__(self, config: ScrnaLongformerConfig, use_mask_token: bool = False):
        super().__init__(config)
        self.embeddings = ScrnaLongformerEmbeddings(config, use_mask_token)
        self.encoder = ScrnaLongformerEncoder(config)
        self.final_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.register_buffer("gene_neighbors", default_gene_neighbors(config.n_genes, config.knn_k), persistent=True)
        # The embeddings and the pooling are compiled too: eager, their chains of elementwise ops
        # over (b, 1 + G, d) took 13% of the default preset's forward (measured).
        self.compiled_embeddings = CompiledFunction(_embed, batch_arguments=(1, 2))
        self.compiled_pool_and_normalize = CompiledFunction(_pool_and_normalize, batch_arguments=(2, 3))
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.gene_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.gene_embeddings = value

    def set_gene_graph(self, gene_neighbors) -> None:
        """Replace the gene graph with a ``(G, k)`` neighbour table (-1 = padding), e.g. from
        ``ScrnaLongformerProcessor.build_gene_graph`` on training cells."""
        table = torch.as_tensor(gene_neighbors)
        validate_gene_neighbors(table, self.config.n_genes, self.config.knn_k)
        self.gene_neighbors.copy_(table.to(device=self.gene_neighbors.device, dtype=torch.long))

    def attention_function(self, output_attentions: bool) -> AttentionFunction:
        """The entry of ``ATTENTION_FUNCTIONS`` that computes this model's attention for a forward
        now (its device, dtype and mode) with or without attention weights."""
        parameter = self.embeddings.value_bins.weight
        return resolve_attention_function(
            self.config, parameter.device, parameter.dtype, self.training, bool(output_attentions),
            self.gene_neighbors.shape[1],
        )

    def forward(
        self,
        expression: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        masked_positions: torch.Tensor | None = None,
        species: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> ScrnaLongformerModelOutput | tuple:
        r"""
        Args:
            expression: (batch, G) float, normalised expression in the model's gene order.
            attention_mask: (batch, G), 1 for genes measured in this cell's dataset and 0 for
                genes absent from it (zero-filled); absent genes are never attended to.
            masked_positions: (batch, G) bool; those genes' values are hidden from the input
                (only for a model built with ``use_mask_token=True``).
            species: (batch,) int, each cell's species as an index into ``config.species``
                (models of several species; optional when the model knows one).
            output_attentions, output_hidden_states, return_dict: as everywhere in transformers;
                ``return_dict=False`` returns a tuple.
        """
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        gene_mask, masked_positions = self._checked_inputs(expression, attention_mask, masked_positions)
        species = self._checked_species(species, expression)
        attention_function = self.attention_function(output_attentions)
        batch = expression.shape[0]
        step = max(batch, 1) if torch.is_grad_enabled() else self.inference_chunk_cells()
        chunks = [
            self._encode(
                expression[start : start + step],
                gene_mask[start : start + step],
                None if masked_positions is None else masked_positions[start : start + step],
                None if species is None else species[start : start + step],
                attention_function,
                output_attentions,
                output_hidden_states,
            )
            for start in range(0, max(batch, 1), step)  # an empty batch still gives one (empty) chunk
        ]
        if len(chunks) == 1:
            output = chunks[0]
        else:
            output = ScrnaLongformerModelOutput(
                last_hidden_state=torch.cat([chunk.last_hidden_state for chunk in chunks]),
                cell_embedding=torch.cat([chunk.cell_embedding for chunk in chunks]),
                hidden_states=_cat_per_layer([chunk.hidden_states for chunk in chunks]),
                attentions=_cat_per_layer([chunk.attentions for chunk in chunks]),
            )
        return output if return_dict else output.to_tuple()

    def selected_gene_states(
        self,
        expression: torch.Tensor,
        selected: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        masked_positions: torch.Tensor | None = None,
        species: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r"""Final-normalised states of the selected genes only, for a loss over a few of them.

        Equal to ``forward(...).last_hidden_state[:, 1:][selected]`` to float rounding, but
        everything after the last layer's attention (its output projection, feed-forward and the
        final LayerNorm) runs at the selected tokens only. Nothing else of the last layer reaches
        such a loss, so its gradients are the same; masked gene modelling selects 15% of the
        genes and skips most of a layer's work.

        Args:
            expression, attention_mask, masked_positions: as for ``forward``.
            selected: (batch, G) bool.

        Returns:
            (n_selected, d_model), in the row-major order of ``selected``.
        """
        gene_mask, masked_positions = self._checked_inputs(expression, attention_mask, masked_positions)
        species = self._checked_species(species, expression)
        _check_same_shape("selected", selected, expression)
        # Flat indices into the (b, 1 + G) tokens; the CLS column is never selected.
        rows = F.pad(selected.bool(), (1, 0)).reshape(-1).nonzero().squeeze(1)
        hidden, _, _ = self._run_encoder(
            expression, gene_mask, masked_positions, species, self.attention_function(False), False, False, rows
        )
        return self.final_norm(hidden)

    def _checked_inputs(
        self, expression: torch.Tensor, attention_mask: torch.Tensor | None, masked_positions: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Validate the inputs; returns the (batch, G) bool masks of measured and masked genes."""
        _check_expression(expression, self.config.n_genes)
        if masked_positions is not None:
            if self.embeddings.mask_embedding is None:
                raise ValueError(
                    "masked_positions were given but this model has no mask token; masked gene modelling "
                    "uses ScrnaLongformerForMaskedGeneModeling (or ScrnaLongformerModel(config, use_mask_token=True))."
                )
            _check_same_shape("masked_positions", masked_positions, expression)
            masked_positions = masked_positions.bool()
        if attention_mask is None:
            return torch.ones_like(expression, dtype=torch.bool), masked_positions
        _check_same_shape("attention_mask", attention_mask, expression)
        return attention_mask.bool(), masked_positions

    def _checked_species(self, species: torch.Tensor | None, expression: torch.Tensor) -> torch.Tensor | None:
        """(batch,) long species ids of a multi-species model (zeros where it knows one species and
        none were given); None for a model without species."""
        known = self.config.species or []
        if not known:
            if species is not None:
                raise ValueError("species were given, but this model knows no species (config.species is None).")
            return None
        if species is None:
            if len(known) > 1:
                raise ValueError(
                    f"this model knows the species {known}; pass species (batch,) ids into that list "
                    "(the processor returns them: processor(adata, species='mouse'))."
                )
            return torch.zeros(expression.shape[0], dtype=torch.long, device=expression.device)
        if species.dim() != 1 or species.shape[0] != expression.shape[0] or species.is_floating_point():
            raise ValueError(
                f"species must be (batch,) integer ids, got {species.dtype} of shape {tuple(species.shape)} for "
                f"{expression.shape[0]} cells."
            )
        if not torch.compiler.is_compiling() and len(species) and (int(species.min()) < 0 or int(species.max()) >= len(known)):
            raise ValueError(f"species ids must lie in [0, {len(known)}) for the species {known}.")
        return species.long()

    def inference_chunk_cells(self) -> int:
        """Cells per forward chunk when no gradient is kept: cells are independent, and a chunk
        whose widest activation (tokens × max(3·d, MLP width) floats) is about 8 MB stays in the
        CPU caches yet keeps the matrix products large enough for every thread; on 2 cores it
        runs the default preset at 2,000 genes 2–3× faster than one batch of 32."""
        n_tokens = self.config.n_genes + 1
        widest = max(3 * self.config.d_model, self.config.intermediate_size)
        return max(1, _INFERENCE_CHUNK_FLOATS // (n_tokens * widest))

    def _run_encoder(
        self, expression, gene_mask, masked_positions, species, attention_function, output_attentions,
        output_hidden_states, rows=None,
    ):
        """Embeddings and layers of validated cells: the residual stream (b, 1 + G, d), or (n, d)
        at ``rows`` (see ``ScrnaLongformerEncoder``), and the per-layer outputs asked for."""
        key_mask = torch.cat([gene_mask.new_ones(expression.shape[0], 1), gene_mask], dim=1)  # (b, 1 + G)
        if self.config.kernel_implementation == "compiled":
            # Elementwise graphs and reductions, no scatter: every thread.
            tokens = self.compiled_embeddings(
                self.embeddings, expression, masked_positions, attention_function,
                kernel_threads=torch.get_num_threads(),
            )
        else:
            tokens = self.embeddings(expression, masked_positions, attention_function)
        if species is not None:
            tokens = self.embeddings.adapt_to_species(tokens, species)
        return self.encoder(
            tokens, self.gene_neighbors, key_mask, attention_function, output_attentions, output_hidden_states, rows
        )

    def _encode(
        self, expression, gene_mask, masked_positions, species, attention_function, output_attentions,
        output_hidden_states,
    ) -> ScrnaLongformerModelOutput:
        """The forward pass of one chunk of cells, already validated."""
        hidden, all_hidden, all_attentions = self._run_encoder(
            expression, gene_mask, masked_positions, species, attention_function, output_attentions,
            output_hidden_states,
        )
        arguments = (self.final_norm, self.config.pooling, hidden, gene_mask)
        if self.config.kernel_implementation == "compiled":
            last_hidden_state, cell_embedding = self.compiled_pool_and_normalize(
                *arguments, kernel_threads=torch.get_num_threads()
            )
        else:
            last_hidden_state, cell_embedding = _pool_and_normalize(*arguments)
        return ScrnaLongformerModelOutput(
            last_hidden_state=last_hidden_state,
            cell_embedding=cell_embedding,
            hidden_states=all_hidden,
            attentions=all_attentions,
        )


class ScrnaLongformerForMaskedGeneModeling(ScrnaLongformerPreTrainedModel):
    """Masked gene modelling: regress the values of masked genes, hidden from the input, from the
    rest. A data collator chooses the masked genes (``masked_positions``); the model never
    samples them, so its outputs are deterministic in eval mode. The loss covers the masked
    genes only.

    In training mode with ``labels``, the last layer and the prediction head run at the masked
    genes only (see ``ScrnaLongformerModel.selected_gene_states``): the loss and every gradient
    are those of the full forward, at about two thirds of the cost for the two-layer default
    preset. The output's ``logits`` then hold predictions at the masked genes and NaN elsewhere,
    and ``cell_embedding`` is None; ``predict_all_genes=True`` gives them all.
    """

    def __init__(self, config: ScrnaLongformerConfig):
        super().__init__(config)
        self.scrna_longformer = ScrnaLongformerModel(config, use_mask_token=True)
        self.prediction_transform = nn.Linear(config.d_model, config.d_model)
        self.prediction_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.prediction_head = nn.Linear(config.d_model, 1)
        self.post_init()

    def forward(
        self,
        expression: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        masked_positions: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        species: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        predict_all_genes: bool | None = None,
    ) -> MaskedGeneModelingOutput | tuple:
        r"""
        Args:
            species: (batch,) species ids (see ``ScrnaLongformerModel.forward``).
            masked_positions: (batch, G) bool, the genes whose values are hidden from the input and
                scored by the loss.
            labels: (batch, G) float target values (usually the unmasked ``expression``); the
                loss is the mean squared error over ``masked_positions``, which it requires.
            predict_all_genes: predict every gene and pool the cell embedding; by default all but
                when training on ``labels`` without hidden states or attentions asked for.
        """
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if labels is not None:
            if masked_positions is None:
                raise ValueError(
                    "labels were given without masked_positions: the loss is taken over the masked genes, "
                    "which the data collator chooses; pass masked_positions (batch, n_genes) bool."
                )
            _check_same_shape("labels", labels, expression)
        if predict_all_genes is None:
            predict_all_genes = not (self.training and labels is not None) or output_attentions or output_hidden_states
        if not predict_all_genes and masked_positions is None:
            raise ValueError("predict_all_genes=False predicts the masked genes only; pass masked_positions.")

        if predict_all_genes:
            outputs = self.scrna_longformer(
                expression,
                attention_mask=attention_mask,
                masked_positions=masked_positions,
                species=species,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                return_dict=True,
            )
            predictions = self._predict(outputs.last_hidden_state[:, 1:])  # (b, G)
            loss = None
            if labels is not None:
                masked_positions = masked_positions.bool()
                squared_error = torch.where(masked_positions, (predictions - labels).pow(2), 0.0)
                loss = squared_error.sum() / masked_positions.sum().clamp(min=1)
            output = MaskedGeneModelingOutput(
                loss=loss,
                logits=predictions,
                cell_embedding=outputs.cell_embedding,
                hidden_states=outputs.hidden_states,
                attentions=outputs.attentions,
            )
        else:
            masked_positions = masked_positions.bool()
            states = self.scrna_longformer.selected_gene_states(
                expression, masked_positions, attention_mask=attention_mask, masked_positions=masked_positions,
                species=species,
            )  # (n_masked, d)
            masked_predictions = self._predict(states)  # (n_masked,)
            loss = None
            if labels is not None:
                squared_error = (masked_predictions - labels[masked_positions]).pow(2)
                loss = squared_error.sum() / masked_positions.sum().clamp(min=1)
            predictions = torch.full_like(expression, float("nan"), dtype=masked_predictions.dtype)
            output = MaskedGeneModelingOutput(
                loss=loss, logits=predictions.masked_scatter(masked_positions, masked_predictions)
            )
        return output if return_dict else output.to_tuple()

    def _predict(self, gene_states: torch.Tensor) -> torch.Tensor:
        """Gene token states (..., d) -> predicted values (...)."""
        transformed = self.prediction_norm(F.gelu(self.prediction_transform(gene_states)))
        return self.prediction_head(transformed).squeeze(-1)


class ScrnaLongformerForCellClassification(ScrnaLongformerPreTrainedModel):
    """Cell classification (or regression) from the cell embedding. The loss follows
    ``config.problem_type`` as in transformers' ``*ForSequenceClassification`` heads: cross-entropy
    (with ``config.class_weights`` and ``config.label_smoothing``), binary cross-entropy per label,
    or mean squared error.

    A multimodal model (``config.modalities`` with a protein panel and / or ATAC peaks)
    classifies from the fused cell embedding (``ScrnaLongformerCrossModalFusion``); cells given
    without proteins or peaks are classified from what they have, through the same model."""

    def __init__(self, config: ScrnaLongformerConfig):
        super().__init__(config)
        self.scrna_longformer = ScrnaLongformerModel(config)
        self.fusion = ScrnaLongformerCrossModalFusion(config) if config.modalities else None
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.classifier = nn.Linear(config.d_model, config.num_labels)
        self.post_init()

    def forward(
        self,
        expression: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        species: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        protein_expression: torch.Tensor | None = None,
        protein_mask: torch.Tensor | None = None,
        peak_accessibility: torch.Tensor | None = None,
        peak_mask: torch.Tensor | None = None,
    ) -> CellClassifierOutput | tuple:
        r"""
        Args:
            species: (batch,) species ids (see ``ScrnaLongformerModel.forward``).
            labels: (batch,) int class ids in ``[0, num_labels)`` for single-label classification,
                (batch, num_labels) float 0/1 for multi-label classification, (batch,) or
                (batch, num_labels) float targets for regression.
            protein_expression / protein_mask: (batch, P) CLR protein levels and measured
                proteins (multimodal models only; see ``ScrnaLongformerForProteinPrediction``).
            peak_accessibility / peak_mask: (batch, n_peaks) binarised (0/1) ATAC accessibility in
                the peak panel's order and the measured peaks (all False for a cell without ATAC);
                models with an ``atac`` modality only. None: no cell of the batch has ATAC.
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        hidden_proteins = _check_proteins(self.config, expression, protein_expression, protein_mask, None)
        peak_mask = _check_peaks(self.config, expression, peak_accessibility, peak_mask)
        outputs = self.scrna_longformer(
            expression,
            attention_mask=attention_mask,
            species=species,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        cell_embedding = outputs.cell_embedding  # (b, d)
        if self.fusion is not None:
            gene_mask = torch.ones_like(expression, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            cell_embedding = self.fusion(
                outputs, gene_mask, protein_expression, hidden_proteins, peak_accessibility, peak_mask
            )[:, 0]
        logits = self.classifier(self.dropout(cell_embedding))  # (b, num_labels)
        output = CellClassifierOutput(
            loss=None if labels is None else self._loss(logits, labels),
            logits=logits,
            cell_embedding=cell_embedding,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of logits (b, num_labels) per ``config.problem_type``, inferred from the labels
        when None: one label is regression, integer labels single-label classification, float
        labels multi-label classification."""
        num_labels = self.config.num_labels
        problem_type = self.config.problem_type
        if problem_type is None:
            if num_labels == 1:
                problem_type = "regression"
            elif labels.is_floating_point():
                problem_type = "multi_label_classification"
            else:
                problem_type = "single_label_classification"
        if problem_type == "regression":
            if num_labels == 1:
                return F.mse_loss(logits.view(-1), labels.to(logits.dtype).view(-1))
            return F.mse_loss(logits, labels.to(logits.dtype))
        if problem_type == "multi_label_classification":
            return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        if labels.dim() != 1 or labels.is_floating_point():
            raise ValueError(
                f"single-label classification needs labels of shape (batch,) holding class ids, got "
                f"{labels.dtype} of shape {tuple(labels.shape)}."
            )
        if not torch.compiler.is_compiling() and (int(labels.min()) < 0 or int(labels.max()) >= num_labels):
            raise ValueError(
                f"labels must be class ids in [0, {num_labels}), got values {int(labels.min())}..{int(labels.max())}."
            )
        weight = None
        if self.config.class_weights is not None:
            weight = torch.tensor(self.config.class_weights, dtype=logits.dtype, device=logits.device)
        return F.cross_entropy(logits, labels.long(), weight=weight, label_smoothing=self.config.label_smoothing)


class ScrnaLongformerTimeEncoder(nn.Module):
    """A sampled time point (batch,) -> a (batch, d_model) vector added to the cell embedding: a
    two-layer perceptron, so that the model can learn how collection time shifts pseudotime
    (the roadmap's temporal model). Time points are standardised first with the config's
    ``time_point_center`` / ``time_point_scale``, so any unit works."""

    def __init__(self, config: ScrnaLongformerConfig):
        super().__init__()
        self.center = float(config.time_point_center)
        self.scale = float(config.time_point_scale)
        self.input = nn.Linear(1, config.d_model)
        self.output = nn.Linear(config.d_model, config.d_model)

    def forward(self, time_points: torch.Tensor) -> torch.Tensor:
        standardised = (time_points - self.center) / self.scale
        return self.output(F.gelu(self.input(standardised.unsqueeze(-1))))  # (b, d)


class ScrnaLongformerForTrajectory(ScrnaLongformerPreTrainedModel):
    """Pseudotime (or time) regression: one value per cell, regressed from the cell embedding
    with a linear head and a mean-squared-error loss, both in units standardised by the config's
    ``target_center`` / ``target_scale`` (predictions come back in the targets' own units).

    With ``config.time_conditioning`` the model also reads each cell's sampled time point (the
    collection time of its sample, ``time_points``), encoded by ``ScrnaLongformerTimeEncoder``
    and added to the cell embedding before the head: pseudotime then refines the coarse
    collection time instead of being read from expression alone.
    """

    def __init__(self, config: ScrnaLongformerConfig):
        super().__init__(config)
        self.scrna_longformer = ScrnaLongformerModel(config)
        self.time_encoder = ScrnaLongformerTimeEncoder(config) if config.time_conditioning else None
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.regressor = nn.Linear(config.d_model, 1)
        self.post_init()

    def forward(
        self,
        expression: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        time_points: torch.Tensor | None = None,
        species: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> TrajectoryOutput | tuple:
        r"""
        Args:
            labels: (batch,) float target pseudotime (or time) of each cell; the loss is the mean
                squared error.
            time_points: (batch,) float sampled (collection) time of each cell's sample; required
                when ``config.time_conditioning`` is set, refused otherwise.
            species: (batch,) species ids (see ``ScrnaLongformerModel.forward``).
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if (time_points is not None) != (self.time_encoder is not None):
            raise ValueError(
                "time_points are read only by a model with config.time_conditioning=True and required by it; "
                f"this model has time_conditioning={self.config.time_conditioning} and "
                f"{'got' if time_points is not None else 'no'} time_points."
            )
        if time_points is not None and tuple(time_points.shape) != (expression.shape[0],):
            raise ValueError(
                f"time_points must be (batch,) = ({expression.shape[0]},) floats, got shape {tuple(time_points.shape)}."
            )
        if labels is not None and labels.numel() != expression.shape[0]:
            raise ValueError(f"labels must hold one value per cell ({expression.shape[0]}), got shape {tuple(labels.shape)}.")
        outputs = self.scrna_longformer(
            expression,
            attention_mask=attention_mask,
            species=species,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        cell_state = outputs.cell_embedding  # (b, d)
        if self.time_encoder is not None:
            cell_state = cell_state + self.time_encoder(time_points.to(cell_state.dtype))
        standardised = self.regressor(self.dropout(cell_state)).squeeze(-1)  # (b,)
        center, scale = float(self.config.target_center), float(self.config.target_scale)
        logits = center + scale * standardised
        loss = None
        if labels is not None:
            loss = F.mse_loss(standardised, (labels.to(standardised.dtype).view(-1) - center) / scale)
        output = TrajectoryOutput(
            loss=loss,
            logits=logits,
            cell_embedding=outputs.cell_embedding,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()


class ScrnaLongformerForProteinPrediction(ScrnaLongformerPreTrainedModel):
    """Cross-modal prediction: each cell's protein levels (CLR-normalised, the protein panel of
    ``config.protein_names``) from its RNA, through the fused RNA + protein encoding
    (``ScrnaLongformerCrossModalFusion``): each protein's fused token is regressed to its level
    (see the head below).

    Trained with a masked-modality objective: the data collator hides some proteins of each
    cell — all of them in a ``config.protein_mask_ratio`` fraction of cells, as at inference —
    (``masked_proteins``), and the loss is the mean squared error over the hidden, measured
    proteins. Without ``protein_expression`` every protein is hidden: the model predicts the
    proteins from RNA alone (RNA-only inference).

    The head: a shared transform of each protein's fused token (linear, GELU, LayerNorm), then
    that protein's own readout vector and offset.
    """

    def __init__(self, config: ScrnaLongformerConfig):
        super().__init__(config)
        if not config.n_proteins:
            raise ValueError(
                "ScrnaLongformerForProteinPrediction needs a protein panel: config.modalities={'protein': P} "
                "(scrnalf finetune --task protein sets it from the data)."
            )
        self.scrna_longformer = ScrnaLongformerModel(config)
        self.fusion = ScrnaLongformerCrossModalFusion(config)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.protein_head_transform = nn.Linear(config.d_model, config.d_model)
        self.protein_head_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        # per protein: a readout vector of its fused token and an offset
        self.protein_head = nn.Embedding(config.n_proteins, config.d_model)
        self.protein_head_offset = nn.Embedding(config.n_proteins, 1)
        self.post_init()

    def forward(
        self,
        expression: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        protein_expression: torch.Tensor | None = None,
        protein_mask: torch.Tensor | None = None,
        masked_proteins: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        species: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> ProteinPredictionOutput | tuple:
        r"""
        Args:
            protein_expression: (batch, P) float CLR-normalised protein levels in panel order
                (the processor's ``protein_expression``); None for RNA-only cells.
            protein_mask: (batch, P), 1 for proteins the cell's data measured; unmeasured ones
                are hidden and never scored.
            masked_proteins: (batch, P) bool, proteins hidden from the input and scored.
            labels: (batch, P) float true CLR levels; the loss is the mean squared error over the
                hidden measured proteins (over every measured protein when none is hidden).
            species: (batch,) species ids (see ``ScrnaLongformerModel.forward``).
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        hidden = _check_proteins(self.config, expression, protein_expression, protein_mask, masked_proteins)
        if labels is not None and tuple(labels.shape) != tuple(hidden.shape):
            raise ValueError(f"labels must have shape (batch, n_proteins) = {tuple(hidden.shape)}, got {tuple(labels.shape)}.")
        outputs = self.scrna_longformer(
            expression,
            attention_mask=attention_mask,
            species=species,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        gene_mask = torch.ones_like(expression, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        fused = self.fusion(outputs, gene_mask, protein_expression, hidden)  # (b, 1 + P, d)
        protein_states = self.dropout(fused[:, 1:])  # (b, P, d)
        transformed = self.protein_head_norm(F.gelu(self.protein_head_transform(protein_states)))
        logits = (transformed * self.protein_head.weight).sum(-1) + self.protein_head_offset.weight.squeeze(-1)  # (b, P)
        loss = None
        if labels is not None:
            measured = torch.ones_like(hidden) if protein_mask is None else protein_mask.bool()
            scored = (hidden if protein_expression is not None else torch.ones_like(hidden)) & measured
            squared_error = torch.where(scored, (logits - labels.to(logits.dtype)).pow(2), 0.0)
            loss = squared_error.sum() / scored.sum().clamp(min=1)
        output = ProteinPredictionOutput(
            loss=loss,
            logits=logits,
            cell_embedding=fused[:, 0],
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()


__all__ = [
    "ATTENTION_FUNCTIONS",
    "ScrnaLongformerPreTrainedModel",
    "ScrnaLongformerModel",
    "ScrnaLongformerForMaskedGeneModeling",
    "ScrnaLongformerForCellClassification",
    "ScrnaLongformerForTrajectory",
    "ScrnaLongformerForProteinPrediction",
    "default_gene_neighbors",
    "validate_gene_neighbors",
    "resolve_attention_function",
    "knn_attention",
    "dense_attention",
    "linear_attention",
]
