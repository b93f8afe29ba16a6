"""The scRNA longformer: a gene-token transformer with kNN-local attention over a gene graph.

A cell is a sequence of ``1 + G`` tokens: a global CLS token followed by one token per gene of
the model's fixed gene panel. Each gene token attends to its ``k`` nearest genes in a gene–gene
kNN graph (a ``(G, k)`` neighbour table saved with the weights) and to CLS; CLS attends to every
gene. Three interchangeable attention kernels compute this:

- ``knn``: exact sparse attention, O(G·k) time and memory; no tensor of G×G size is ever built.
  Each gene gathers its k neighbours' keys and values; ``torch.compile`` fuses the kernel into
  one pass (eager PyTorch is the fallback), so its cost does not depend on how the graph is laid
  out over the panel. On an AVX-512 CPU small C kernels (below) run it instead, forward and
  backward.
- ``dense``: masked SDPA over the full token set with the same graph as a boolean mask. It is the
  numerical reference for ``knn`` and is O(G²).
- ``linear``: kernelised global attention (feature map elu + 1), O(G·d²); ignores the graph.

The file reads in the order data flows: gene graph helpers, embeddings, attention kernels,
attention, layer, encoder, the pretrained base class, the bare model, then the task heads.

This file is copied next to saved weights as remote code: it imports only torch, transformers,
the Python standard library and the configuration file beside it (the C source of the kNN
kernels is a string in it).
"""

import ctypes
import functools
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput, logging

from .configuration_scrnalf import ScrnaLongformerConfig

logger = logging.get_logger(__name__)

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
        # Tent weights max(0, 1 - |position - b|) are the linear interpolation between the two bins
        # around each value, written as a product with the bin table so that its gradient is one
        # matrix product instead of a scatter-add into 16 rows (4% of a training step, measured).
        centres = torch.arange(n_bins, dtype=expression.dtype, device=expression.device)
        weights = (1 - (position.unsqueeze(-1) - centres).abs()).clamp(min=0)  # (batch, G, n_bins)
        return weights @ self.value_bins.weight

    def forward(
        self, expression: torch.Tensor, masked_positions: torch.Tensor | None = None, c_dropout: bool = False
    ) -> torch.Tensor:
        """``c_dropout``: draw the dropout mask with the C kernel (compiled graphs only)."""
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
        return _dropout(self.dropout, tokens, c_dropout)


# ---------------------------------------------------------------------------------------------
# Attention kernels. Each takes q, k, v of shape (batch, 1 + G, heads, head_dim) — token-major,
# as the fused QKV projection lays them out, CLS at index 0 — the (G, k) neighbour table, and a
# (batch, 1 + G) boolean key mask (True = may be attended to; CLS is always True). Each returns
# (batch, 1 + G, heads, head_dim) and, if asked, the gene rows' attention weights in
# neighbour-table form: (batch, heads, G, k + 1), column j < k the weight on
# gene_neighbors[g, j], column k the weight on CLS.
# ---------------------------------------------------------------------------------------------


def _cls_attention(query, key, value, key_mask, dropout):
    """CLS attends to every measured token: O(G). (b, 1 + G, h, dh) -> (b, 1, h, dh)."""
    scale = query.shape[-1] ** -0.5
    scores = torch.einsum("bhd,bthd->bht", query[:, 0] * scale, key)  # (b, h, 1 + G)
    scores = scores.masked_fill(~key_mask[:, None, :], float("-inf"))
    probs = F.dropout(scores.softmax(-1), p=dropout, training=dropout > 0)
    return torch.einsum("bht,bthd->bhd", probs, value).unsqueeze(1)


def knn_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    gene_neighbors: torch.Tensor,
    key_mask: torch.Tensor,
    dropout: float = 0.0,
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
    batch, n_tokens, heads, head_dim = query.shape
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
    probs = torch.cat([scores, to_cls], dim=2).softmax(2)  # (b, G, k + 1, h); CLS keeps rows finite
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    gene_output = (probs[:, :, :k].unsqueeze(-1) * neighbor_values).sum(2)  # (b, G, h, dh)
    gene_output = gene_output + probs[:, :, k].unsqueeze(-1) * value[:, :1]
    output = torch.cat([_cls_attention(query, key, value, key_mask, dropout), gene_output], dim=1)
    if not output_attentions:
        return output, None
    weights = probs.permute(0, 3, 1, 2)  # (b, h, G, k + 1)
    padding = torch.cat([gene_neighbors < 0, gene_neighbors.new_zeros(n_genes, 1, dtype=torch.bool)], dim=1)
    return output, weights.masked_fill(padding, 0.0)


def graph_attention_mask(gene_neighbors: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """The kNN graph as a dense boolean mask, (batch, 1, 1 + G, 1 + G): True = may attend.
    For the ``dense`` reference only — it is O(G²)."""
    n_genes, k = gene_neighbors.shape
    n_tokens = n_genes + 1
    # Padding (-1) is sent to a spare last column, dropped below: no data-dependent shapes, so
    # torch.compile keeps the whole layer in one graph.
    columns = torch.where(gene_neighbors >= 0, gene_neighbors + 1, n_tokens)  # (G, k)
    gene_rows = torch.zeros(n_genes, n_tokens + 1, dtype=torch.bool, device=gene_neighbors.device)
    gene_rows = gene_rows.scatter(1, columns, True)[:, :n_tokens]
    gene_rows[:, 0] = True  # every gene sees CLS
    cls_row = torch.ones(1, n_tokens, dtype=torch.bool, device=gene_neighbors.device)  # CLS sees every gene
    allowed = torch.cat([cls_row, gene_rows], dim=0)  # (1 + G, 1 + G)
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
    query, key, value = (tensor.transpose(1, 2) for tensor in (query, key, value))  # (b, h, 1 + G, dh)
    if not output_attentions:
        output = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout)
        return output.transpose(1, 2), None
    scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(query.shape[-1])
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    output = torch.matmul(probs, value).transpose(1, 2)
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
    query_features = F.elu(query) + 1  # (b, 1 + G, h, dh)
    key_features = (F.elu(key) + 1) * key_mask[:, :, None, None].to(key.dtype)
    key_value = torch.einsum("bthd,bthe->bhde", key_features, value)  # (b, h, dh, dh)
    normaliser = torch.einsum("bthd,bhd->bth", query_features, key_features.sum(dim=1))  # (b, 1 + G, h)
    output = torch.einsum("bthd,bhde->bthe", query_features, key_value)
    return output / normaliser.clamp(min=1e-6).unsqueeze(-1), None


ATTENTION_KERNELS = {"knn": knn_attention, "dense": dense_attention, "linear": linear_attention}


# ---------------------------------------------------------------------------------------------
# kNN attention on CPU: small C kernels (AVX-512), compiled on first use
#
# torch.compile's generated loop for the gather-and-softmax is scalar-bound (a horizontal sum per
# neighbour and head, softmax over 17 × 4 values in masked vectors): 4.2 ms per 4-cell chunk of
# the default preset at 2,000 genes on one core; its backward scatter-adds into the neighbours'
# key and value gradients and does not split over threads. These kernels do the same arithmetic
# (forward 1.9 ms there) in torch's own OpenMP pool: the forward splits rows over the threads,
# the backward whole cells, so scatters into a cell's gradients never race. They are used with
# compiled kernels where they are exact to float rounding: no attention dropout, no attention
# weights requested, float32 on a CPU with AVX-512, k <= 16 (``ScrnaLongformerLayer.uses_c_kernel``).
# Everywhere else, and wherever a C compiler is missing, ``knn_attention`` runs. The same library
# draws dropout masks for compiled graphs (``_dropout``).
# ---------------------------------------------------------------------------------------------

_KNN_KERNEL_SOURCE = r"""
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Compiled with -DHEADS=… -DHEAD_DIM=… -DNEIGHBORS=… (NEIGHBORS <= 16). A head's HEAD_DIM values
   span VECTORS 16-lane vectors; the last one is loaded and stored under a lane mask. */
#define VECTORS ((HEAD_DIM + 15) / 16)
#define WIDTH (HEADS * HEAD_DIM)
#define LANES(v) ((v) < VECTORS - 1 || HEAD_DIM % 16 == 0 ? (__mmask16)0xFFFF : (__mmask16)((1u << (HEAD_DIM % 16)) - 1))
#define LOAD(pointer, v) _mm512_maskz_loadu_ps(LANES(v), (pointer) + 16 * (v))
#define STORE(pointer, v, x) _mm512_mask_storeu_ps((pointer) + 16 * (v), LANES(v), (x))

/* exp(x) for x <= 0 (x >= -87 after clamping): 2^n · p(r), degree-7 Taylor on |r| <= ln2/2. */
static inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.f / 5040.f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

/* Lane j of the result = sum of the 16 lanes of v[j]. */
static inline __m512 transpose_sum16(const __m512 v[16]) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; ++i)
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; ++i)
        b[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 2; ++i)
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* a · b[offset ..] over one head. */
static inline float dot(const __m512 a[VECTORS], const float *b, int offset) {
    __m512 sum = _mm512_mul_ps(a[0], LOAD(b + offset, 0));
    for (int v = 1; v < VECTORS; ++v) sum = _mm512_fmadd_ps(a[v], LOAD(b + offset, v), sum);
    return _mm512_reduce_add_ps(sum);
}

/* Lane j = a · rows[j][offset ..] over one head, for the NEIGHBORS rows (0 in unused lanes). */
static inline __m512 neighbor_dots(const __m512 a[VECTORS], const float *const rows[NEIGHBORS], int offset) {
    __m512 products[16];
    for (int j = 0; j < 16; ++j) {
        if (j >= NEIGHBORS) { products[j] = _mm512_setzero_ps(); continue; }
        __m512 sum = _mm512_mul_ps(a[0], LOAD(rows[j] + offset, 0));
        for (int v = 1; v < VECTORS; ++v) sum = _mm512_fmadd_ps(a[v], LOAD(rows[j] + offset, v), sum);
        products[j] = sum;
    }
    return transpose_sum16(products);
}

/* The first min(count, 16) lanes. */
static inline __mmask16 first_lanes(int64_t count) {
    return count >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << count) - 1);
}

/* Softmax weights of one gene row and head: lane j of w over neighbour j (0 where invalid), and
   *cls_weight over CLS. q: the row's query, already scaled; keys[j]: neighbour j's key row. */
static inline void gene_row_weights(const __m512 q[VECTORS], const float *const keys[NEIGHBORS], __mmask16 valid,
                                    const float *cls_key, int offset, float w[16], float *cls_weight) {
    const float cls_score = dot(q, cls_key, offset);
    const __m512 scores = neighbor_dots(q, keys, offset);
    float maximum = _mm512_mask_reduce_max_ps(valid, scores);
    maximum = cls_score > maximum ? cls_score : maximum;
    __m512 weights = _mm512_maskz_mov_ps(valid, exp_nonpositive(_mm512_sub_ps(scores, _mm512_set1_ps(maximum))));
    const float cls_exp = expf(cls_score - maximum);
    const float inverse = 1.f / (_mm512_reduce_add_ps(weights) + cls_exp);
    _mm512_storeu_ps(w, _mm512_mul_ps(weights, _mm512_set1_ps(inverse)));
    *cls_weight = cls_exp * inverse;
}

/* Softmax weights of the CLS row and one head over every token (0 where unmeasured), into
   weights[0 .. n_tokens). q: CLS's query, already scaled; base: the cell's qkv. */
static void cls_row_weights(const __m512 q[VECTORS], const float *base, const bool *mask, int64_t n_tokens,
                            int offset, float *weights) {
    float maximum = -INFINITY;
    for (int64_t t = 0; t < n_tokens; ++t) {
        const float score = mask[t] ? dot(q, base + t * 3 * WIDTH + WIDTH, offset) : -INFINITY;
        weights[t] = score;
        maximum = score > maximum ? score : maximum;
    }
    __m512 total = _mm512_setzero_ps();
    for (int64_t t = 0; t < n_tokens; t += 16) {
        const __mmask16 lanes = first_lanes(n_tokens - t);
        const __m512 x = _mm512_maskz_loadu_ps(lanes, weights + t);
        const __mmask16 finite = _mm512_mask_cmp_ps_mask(lanes, x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
        const __m512 weight = _mm512_maskz_mov_ps(finite, exp_nonpositive(_mm512_sub_ps(x, _mm512_set1_ps(maximum))));
        _mm512_mask_storeu_ps(weights + t, lanes, weight);
        total = _mm512_add_ps(total, weight);
    }
    const __m512 inverse = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(total));
    for (int64_t t = 0; t < n_tokens; t += 16) {
        const __mmask16 lanes = first_lanes(n_tokens - t);
        _mm512_mask_storeu_ps(weights + t, lanes, _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, weights + t), inverse));
    }
}

static inline void scaled_query(const float *query, int offset, float scale, __m512 q[VECTORS]) {
    for (int v = 0; v < VECTORS; ++v) q[v] = _mm512_mul_ps(LOAD(query + offset, v), _mm512_set1_ps(scale));
}

/* The row's neighbours' key rows (padding points at token 1, masked out) and which are valid. */
static inline __mmask16 neighbor_keys(const float *base, const bool *mask, const int64_t *row_neighbors,
                                      const float *keys[NEIGHBORS]) {
    __mmask16 valid = 0;
    for (int j = 0; j < NEIGHBORS; ++j) {
        const int64_t n = row_neighbors[j];
        if (n >= 0 && mask[1 + n]) valid |= (__mmask16)(1u << j);
        keys[j] = base + (1 + (n >= 0 ? n : 0)) * 3 * WIDTH + WIDTH;
    }
    return valid;
}

/* Forward. qkv: (cells, T, 3, HEADS, HEAD_DIM), T = 1 + G tokens, CLS first; neighbors: (G,
   NEIGHBORS) int64, -1 = padding; key_mask: (cells, T) bool, CLS always true; out: (cells, T,
   HEADS, HEAD_DIM). Gene rows attend to their neighbours and CLS, CLS to every measured token. */
void scrnalf_knn_attention(const float *qkv, const int64_t *neighbors, const bool *key_mask,
                           float *out, int64_t cells, int64_t n_tokens, float scale, int threads) {
    const int64_t n_genes = n_tokens - 1;
    const int64_t rows = cells * n_genes;
#pragma omp parallel num_threads(threads)
    {
        const int64_t team = omp_get_num_threads(), member = omp_get_thread_num();
        const int64_t first = rows * member / team, last = rows * (member + 1) / team;
        int64_t cell = first / n_genes, gene = first % n_genes;
        for (int64_t row = first; row < last; ++row, ++gene) {
            if (gene == n_genes) { gene = 0; ++cell; }
            const float *base = qkv + cell * n_tokens * 3 * WIDTH;
            const float *query = base + (1 + gene) * 3 * WIDTH;
            const float *keys[NEIGHBORS];
            const __mmask16 valid = neighbor_keys(base, key_mask + cell * n_tokens, neighbors + gene * NEIGHBORS, keys);
            float *target = out + (cell * n_tokens + 1 + gene) * WIDTH;
            for (int h = 0; h < HEADS; ++h) {
                const int offset = h * HEAD_DIM;
                __m512 q[VECTORS];
                scaled_query(query, offset, scale, q);
                float w[16], cls_weight;
                gene_row_weights(q, keys, valid, base + WIDTH, offset, w, &cls_weight);
                __m512 acc[VECTORS];
                for (int v = 0; v < VECTORS; ++v)
                    acc[v] = _mm512_mul_ps(_mm512_set1_ps(cls_weight), LOAD(base + 2 * WIDTH + offset, v));
                for (int j = 0; j < NEIGHBORS; ++j) {
                    if (!((valid >> j) & 1)) continue;
                    const __m512 weight = _mm512_set1_ps(w[j]);
                    for (int v = 0; v < VECTORS; ++v)
                        acc[v] = _mm512_fmadd_ps(weight, LOAD(keys[j] + WIDTH + offset, v), acc[v]);
                }
                for (int v = 0; v < VECTORS; ++v) STORE(target + offset, v, acc[v]);
            }
        }
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t item = 0; item < cells * HEADS; ++item) {
        const int64_t cell = item / HEADS;
        const int offset = (int)(item % HEADS) * HEAD_DIM;
        const float *base = qkv + cell * n_tokens * 3 * WIDTH;
        float *weights = (float *)malloc(sizeof(float) * (size_t)n_tokens);
        __m512 q[VECTORS];
        scaled_query(base, offset, scale, q);
        cls_row_weights(q, base, key_mask + cell * n_tokens, n_tokens, offset, weights);
        __m512 acc[VECTORS];
        for (int v = 0; v < VECTORS; ++v) acc[v] = _mm512_setzero_ps();
        for (int64_t t = 0; t < n_tokens; ++t) {
            if (weights[t] == 0.f) continue;
            const __m512 weight = _mm512_set1_ps(weights[t]);
            for (int v = 0; v < VECTORS; ++v)
                acc[v] = _mm512_fmadd_ps(weight, LOAD(base + t * 3 * WIDTH + 2 * WIDTH + offset, v), acc[v]);
        }
        for (int v = 0; v < VECTORS; ++v) STORE(out + cell * n_tokens * WIDTH + offset, v, acc[v]);
        free(weights);
    }
}

/* One attended token's share of the backward: with weight p and d(score) = ds, adds
   ds·scale·key to grad_q, ds·q (q already scaled) to the token's key gradient and p·grad_out
   to its value gradient. */
static inline void backward_pair(const __m512 q[VECTORS], const __m512 grad_out[VECTORS], const float *key_row,
                                 float *grad_key_row, __m512 grad_q[VECTORS], float p, float ds, float scale, int offset) {
    const __m512 ds_scaled = _mm512_set1_ps(ds * scale), ds_vector = _mm512_set1_ps(ds), weight = _mm512_set1_ps(p);
    for (int v = 0; v < VECTORS; ++v) {
        grad_q[v] = _mm512_fmadd_ps(ds_scaled, LOAD(key_row + offset, v), grad_q[v]);
        STORE(grad_key_row + offset, v, _mm512_fmadd_ps(ds_vector, q[v], LOAD(grad_key_row + offset, v)));
        STORE(grad_key_row + WIDTH + offset, v, _mm512_fmadd_ps(weight, grad_out[v], LOAD(grad_key_row + WIDTH + offset, v)));
    }
}

/* Whether a row of WIDTH floats is all zeros (either sign). */
static inline int zero_row(const float *row) {
    uint32_t bits = 0;
    for (int i = 0; i < WIDTH; ++i) {
        uint32_t word;
        memcpy(&word, row + i, sizeof word);
        bits |= word << 1;
    }
    return bits == 0;
}

/* Backward of scrnalf_knn_attention. out and grad_out: (cells, T, HEADS, HEAD_DIM); grad_qkv:
   like qkv, receives d loss / d qkv. Each thread takes whole cells, so the
   scatter of key and value gradients to neighbours never races. */
void scrnalf_knn_attention_backward(const float *qkv, const int64_t *neighbors, const bool *key_mask,
                                    const float *out, const float *grad_out, float *grad_qkv, int64_t cells,
                                    int64_t n_tokens, float scale, int threads) {
    const int64_t n_genes = n_tokens - 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t cell = 0; cell < cells; ++cell) {
        const float *base = qkv + cell * n_tokens * 3 * WIDTH;
        float *grad_base = grad_qkv + cell * n_tokens * 3 * WIDTH;
        const bool *mask = key_mask + cell * n_tokens;
        memset(grad_base, 0, sizeof(float) * (size_t)(n_tokens * 3 * WIDTH));
        for (int64_t gene = 0; gene < n_genes; ++gene) {
            const float *row_grad = grad_out + (cell * n_tokens + 1 + gene) * WIDTH;
            /* A row without gradient adds nothing anywhere: masked gene modelling's last layer
               passes gradient to its masked genes only. */
            if (zero_row(row_grad)) continue;
            const float *query = base + (1 + gene) * 3 * WIDTH;
            const float *keys[NEIGHBORS];
            const __mmask16 valid = neighbor_keys(base, mask, neighbors + gene * NEIGHBORS, keys);
            const float *row_out = out + (cell * n_tokens + 1 + gene) * WIDTH;
            for (int h = 0; h < HEADS; ++h) {
                const int offset = h * HEAD_DIM;
                __m512 q[VECTORS], g[VECTORS], grad_q[VECTORS];
                scaled_query(query, offset, scale, q);
                float w[16], cls_weight;
                gene_row_weights(q, keys, valid, base + WIDTH, offset, w, &cls_weight);
                for (int v = 0; v < VECTORS; ++v) { g[v] = LOAD(row_grad + offset, v); grad_q[v] = _mm512_setzero_ps(); }
                const float delta = dot(g, row_out, offset);
                const __m512 value_dots = neighbor_dots(g, keys, WIDTH + offset); /* keys[j] + WIDTH: value rows */
                float ds[16]; /* d loss / d score: w_j · (grad_out · value_j - grad_out · out) */
                _mm512_storeu_ps(ds, _mm512_mul_ps(_mm512_loadu_ps(w), _mm512_sub_ps(value_dots, _mm512_set1_ps(delta))));
                for (int j = 0; j < NEIGHBORS; ++j) {
                    if (!((valid >> j) & 1)) continue;
                    backward_pair(q, g, keys[j], grad_base + (keys[j] - base), grad_q, w[j], ds[j], scale, offset);
                }
                const float cls_ds = cls_weight * (dot(g, base + 2 * WIDTH, offset) - delta);
                backward_pair(q, g, base + WIDTH, grad_base + WIDTH, grad_q, cls_weight, cls_ds, scale, offset);
                for (int v = 0; v < VECTORS; ++v) STORE(grad_base + (1 + gene) * 3 * WIDTH + offset, v, grad_q[v]);
            }
        }
        float *weights = (float *)malloc(sizeof(float) * (size_t)n_tokens);
        for (int h = 0; h < HEADS; ++h) {
            const int offset = h * HEAD_DIM;
            __m512 q[VECTORS], g[VECTORS], grad_q[VECTORS];
            scaled_query(base, offset, scale, q);
            cls_row_weights(q, base, mask, n_tokens, offset, weights);
            for (int v = 0; v < VECTORS; ++v) {
                g[v] = LOAD(grad_out + cell * n_tokens * WIDTH + offset, v);
                grad_q[v] = _mm512_setzero_ps();
            }
            const float delta = dot(g, out + cell * n_tokens * WIDTH, offset);
            for (int64_t t = 0; t < n_tokens; ++t) {
                if (weights[t] == 0.f) continue;
                const float *key_row = base + t * 3 * WIDTH + WIDTH;
                const float ds = weights[t] * (dot(g, key_row + WIDTH, offset) - delta);
                backward_pair(q, g, key_row, grad_base + t * 3 * WIDTH + WIDTH, grad_q, weights[t], ds, scale, offset);
            }
            /* Token 0's query row gets gradient from the CLS row only. */
            for (int v = 0; v < VECTORS; ++v) STORE(grad_base + offset, v, grad_q[v]);
        }
        free(weights);
    }
}

/* Dropout keep-mask: keep[i] = 1 with probability 1 - threshold / 2^32, from the splitmix64 hash
   of (seed, i). The mask depends only on the seed, not on how the elements are split over threads. */
void scrnalf_dropout_keep(bool *keep, int64_t n, uint64_t seed, uint64_t threshold, int threads) {
#pragma omp parallel for simd num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; ++i) {
        uint64_t z = seed + (uint64_t)i * 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        keep[i] = (z >> 32) >= threshold;
    }
}
"""

_knn_kernels: dict[tuple[int, int, int], object] = {}


def _compile_knn_kernel(heads: int, head_dim: int, k: int):
    """The C kernels (attention forward, backward, dropout mask) for one (heads, head_dim, k),
    compiled once per machine into the temporary
    directory (keyed by a hash of source and flags; written atomically, so concurrent processes
    are safe) and loaded with ctypes. Returns None, after one warning, where it cannot be built."""
    flags = ["-O3", "-mavx512f", "-mavx512dq", "-mfma", "-fopenmp", "-shared", "-fPIC",
             f"-DHEADS={heads}", f"-DHEAD_DIM={head_dim}", f"-DNEIGHBORS={k}"]
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    digest = hashlib.sha256((_KNN_KERNEL_SOURCE + " ".join(flags)).encode()).hexdigest()[:16]
    directory = os.path.join(tempfile.gettempdir(), "scrnalf-kernels")
    library = os.path.join(directory, f"knn_attention_{digest}.so")
    try:
        if not os.path.exists(library):
            if compiler is None:
                raise RuntimeError("no C compiler found (set CC)")
            os.makedirs(directory, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=directory) as build:
                source = os.path.join(build, "knn_attention.c")
                with open(source, "w") as handle:
                    handle.write(_KNN_KERNEL_SOURCE)
                built = os.path.join(build, "knn_attention.so")
                subprocess.run([compiler, *flags, source, "-o", built], check=True, capture_output=True, text=True)
                os.replace(built, library)
        shared_library = ctypes.CDLL(library)
    except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", None) or str(error)
        logger.warning(
            "the C kNN attention kernel could not be built (%s); inference uses the compiled "
            "PyTorch kernel instead.", detail.strip().splitlines()[-1][:200] if detail.strip() else type(error).__name__,
        )
        return None
    forward, backward = shared_library.scrnalf_knn_attention, shared_library.scrnalf_knn_attention_backward
    dropout_keep = shared_library.scrnalf_dropout_keep
    forward.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_float, ctypes.c_int]
    backward.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 2 + [ctypes.c_float, ctypes.c_int]
    dropout_keep.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int]
    forward.restype = backward.restype = dropout_keep.restype = None
    return forward, backward, dropout_keep


def knn_kernel_available(heads: int, head_dim: int, k: int) -> bool:
    """Whether the C inference kernel serves this shape on this machine (compiling it if needed)."""
    if k > 16 or torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX"):
        return False
    key = (heads, head_dim, k)
    if key not in _knn_kernels:
        _knn_kernels[key] = _compile_knn_kernel(heads, head_dim, k)
    return _knn_kernels[key] is not None


def _kernels_for(qkv: torch.Tensor, gene_neighbors: torch.Tensor):
    heads, head_dim, k = qkv.shape[3], qkv.shape[4], gene_neighbors.shape[1]
    if not knn_kernel_available(heads, head_dim, k):
        raise RuntimeError(f"no C kNN attention kernel for heads={heads}, head_dim={head_dim}, k={k} on this machine.")
    return _knn_kernels[(heads, head_dim, k)]


def _kernel_layout(qkv: torch.Tensor, gene_neighbors: torch.Tensor, key_mask: torch.Tensor):
    """The dense layouts and dtypes the C kernels read: float32, int64 and bool, contiguous."""
    return qkv.contiguous(), gene_neighbors.long().contiguous(), key_mask.bool().contiguous()


def _knn_attention_c_impl(qkv: torch.Tensor, gene_neighbors: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """qkv (b, 1 + G, 3, h, dh) float32, gene_neighbors (G, k), key_mask (b, 1 + G) bool ->
    attention output (b, 1 + G, h, dh), as ``knn_attention`` computes it."""
    forward, _, _ = _kernels_for(qkv, gene_neighbors)
    batch, n_tokens, _, heads, head_dim = qkv.shape
    qkv, gene_neighbors, key_mask = _kernel_layout(qkv, gene_neighbors, key_mask)
    output = qkv.new_empty(batch, n_tokens, heads, head_dim)
    forward(qkv.data_ptr(), gene_neighbors.data_ptr(), key_mask.data_ptr(), output.data_ptr(),
            batch, n_tokens, head_dim**-0.5, torch.get_num_threads())
    return output


def _knn_attention_c_backward_impl(
    grad_output: torch.Tensor, qkv: torch.Tensor, gene_neighbors: torch.Tensor, key_mask: torch.Tensor, output: torch.Tensor
) -> torch.Tensor:
    """d loss / d qkv (b, 1 + G, 3, h, dh) from d loss / d output (b, 1 + G, h, dh)."""
    _, backward, _ = _kernels_for(qkv, gene_neighbors)
    batch, n_tokens, _, heads, head_dim = qkv.shape
    qkv, gene_neighbors, key_mask = _kernel_layout(qkv, gene_neighbors, key_mask)
    output, grad_output = output.contiguous(), grad_output.contiguous()
    grad_qkv = torch.empty_like(qkv)
    backward(qkv.data_ptr(), gene_neighbors.data_ptr(), key_mask.data_ptr(), output.data_ptr(), grad_output.data_ptr(),
             grad_qkv.data_ptr(), batch, n_tokens, head_dim**-0.5, torch.get_num_threads())
    return grad_qkv


# Any compiled library serves the dropout mask; this one is compiled for it.
_DROPOUT_LIBRARY = (1, 16, 16)


def c_kernels_available() -> bool:
    """Whether this machine runs the C kernels (AVX-512 and a working C compiler); compiled
    graphs then also draw their dropout masks with them."""
    return knn_kernel_available(*_DROPOUT_LIBRARY)


def _dropout_keep_impl(like: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """A bool keep-mask of ``like``'s shape, True with probability 1 - p, fixed by ``seed``."""
    if not c_kernels_available():
        raise RuntimeError("the C dropout kernel is not available on this machine.")
    keep = torch.empty(like.shape, dtype=torch.bool, device=like.device)
    _knn_kernels[_DROPOUT_LIBRARY][2](keep.data_ptr(), keep.numel(), int(seed) % 2**64, round(p * 2**32), torch.get_num_threads())
    return keep


def _dropout(dropout: nn.Dropout, hidden_states: torch.Tensor, c_kernel: bool) -> torch.Tensor:
    """``dropout(hidden_states)``; with ``c_kernel`` (in compiled graphs) the mask comes from the C
    kernel, seeded from torch's generator, and the multiply fuses into the next elementwise
    kernel. The Bernoulli draws ``nn.Dropout`` compiles to run on one thread, and were a sixth of
    a default-preset training step (measured); the C mask costs a few percent of that."""
    if not (c_kernel and dropout.training and dropout.p > 0):
        return dropout(hidden_states)
    seed = torch.randint(0, 2**62, (), dtype=torch.int64, device=hidden_states.device)
    keep = torch.ops.scrnalf.dropout_keep(hidden_states, dropout.p, seed)
    return hidden_states * keep * (1.0 / (1.0 - dropout.p))


def _setup_knn_attention_c(ctx, inputs, output):
    qkv, gene_neighbors, key_mask = inputs
    ctx.save_for_backward(qkv, gene_neighbors, key_mask, output)


def _knn_attention_c_autograd(ctx, grad_output):
    qkv, gene_neighbors, key_mask, output = ctx.saved_tensors
    return torch.ops.scrnalf.knn_attention_c_backward(grad_output, qkv, gene_neighbors, key_mask, output), None, None


# Custom ops, so that torch.compile keeps the whole layer (and its backward) in one graph around
# the calls. The model file may be imported twice in one process (package and remote-code copy):
# the ops are defined once.
if not hasattr(torch.ops.scrnalf, "knn_attention_c"):
    _forward_op = torch.library.custom_op("scrnalf::knn_attention_c", mutates_args=())(_knn_attention_c_impl)
    _backward_op = torch.library.custom_op("scrnalf::knn_attention_c_backward", mutates_args=())(
        _knn_attention_c_backward_impl
    )

    @_forward_op.register_fake
    def _(qkv, gene_neighbors, key_mask):
        batch, n_tokens, _, heads, head_dim = qkv.shape
        return qkv.new_empty(batch, n_tokens, heads, head_dim)

    @_backward_op.register_fake
    def _(grad_output, qkv, gene_neighbors, key_mask, output):
        return torch.empty_like(qkv)

    _forward_op.register_autograd(_knn_attention_c_autograd, setup_context=_setup_knn_attention_c)
    _dropout_op = torch.library.custom_op("scrnalf::dropout_keep", mutates_args=())(_dropout_keep_impl)

    @_dropout_op.register_fake
    def _(like, p, seed):
        return torch.empty_like(like, dtype=torch.bool)




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
        c_kernel: bool = False,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``c_kernel``: run the C kNN kernel (the caller has checked that it applies:
        see ``ScrnaLongformerLayer.uses_c_kernel``). ``rows``: (n,) indices into the batch's
        ``batch·(1 + G)`` tokens, row-major; only those tokens' outputs are projected and returned,
        as (n, d)."""
        batch, n_tokens, d_model = hidden_states.shape
        heads = self.config.n_heads
        qkv = _project(self.qkv, hidden_states).view(batch, n_tokens, 3, heads, d_model // heads)
        query, key, value = qkv.unbind(2)  # each (b, 1 + G, h, dh), views of one tensor
        if c_kernel:
            context, weights = torch.ops.scrnalf.knn_attention_c(qkv, gene_neighbors, key_mask), None
        else:
            kernel = ATTENTION_KERNELS[self.config.attention_type]
            dropout = self.config.attention_dropout if self.training else 0.0
            context, weights = kernel(query, key, value, gene_neighbors, key_mask, dropout, output_attentions)
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


class CompiledFunction:
    """``torch.compile`` of a function, built on first use, with a clean fallback.

    Graphs are specialised to every shape except the batch dimension of ``batch_arguments``
    (marked dynamic when above 1), and never made dynamic automatically: the code that runs for
    an input depends only on that input's shapes, not on what ran before in the process, so two
    processes give bit-identical outputs.

    Compilation needs a working backend (a C++ compiler on CPU, Triton on GPU). Where it fails,
    one warning is logged and the eager function is used from then on: the same numbers to
    float rounding, more slowly. An exception the eager function raises too is the caller's
    error and propagates.
    """

    # Each model size, flag combination and batch-of-one is one graph; a process that uses
    # many models must not silently fall back to eager after torch's default of 8.
    recompile_limit = 64

    def __init__(self, function, batch_arguments: tuple[int, ...] = ()):
        self.function = function
        self.batch_arguments = batch_arguments
        self.compiled = None
        self.unavailable = False

    def __call__(self, *args, kernel_threads: int = 1):
        """``kernel_threads``: OpenMP threads of the generated CPU kernels, fixed when a graph is
        first compiled. One by default: torch.compile's own kNN gather loops and their backward's
        scatter-adds ran 2.4× and 1.35× slower split over 2 threads (measured), while the matrix
        products use every intra-op thread regardless. Graphs without them (elementwise ops,
        reductions, the C kernels) gain from more: the default preset's inference ran 1.3×
        faster with 2 on 2 cores.

        Random numbers in compiled graphs come from torch's own generator (inductor's
        ``fallback_random``): its per-element generator made dropout a third of a training step."""
        if self.unavailable or torch.compiler.is_compiling():
            return self.function(*args)
        if self.compiled is None:
            self.compiled = torch.compile(self.function, dynamic=False)
        for index in self.batch_arguments:
            if args[index] is not None and args[index].shape[0] > 1:
                torch._dynamo.maybe_mark_dynamic(args[index], 0)
        from torch._inductor import config as inductor_config

        try:
            with (
                torch._dynamo.config.patch(recompile_limit=self.recompile_limit),
                inductor_config.patch({"cpp.threads": kernel_threads, "fallback_random": True}),
            ):
                return self.compiled(*args)
        except Exception as error:  # noqa: BLE001 - any backend failure falls back to eager
            result = self.function(*args)
            self.unavailable = True
            logger.warning(
                "torch.compile of %s failed (%s: %s); running eager PyTorch instead.",
                self.function.__name__, type(error).__name__, str(error).splitlines()[0][:200] if str(error) else "",
            )
            return result


def _layer_forward(
    layer: "ScrnaLongformerLayer",
    hidden_states: torch.Tensor,
    gene_neighbors: torch.Tensor,
    key_mask: torch.Tensor,
    output_attentions: bool,
    c_kernel: bool = False,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    attended, weights = layer.attention(
        layer.attention_norm(hidden_states), gene_neighbors, key_mask, output_attentions, c_kernel, rows
    )
    if rows is not None:
        hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1]).index_select(0, rows)
    hidden_states = hidden_states + _dropout(layer.dropout, attended, c_kernel)
    hidden_states = hidden_states + _dropout(
        layer.dropout, layer.feed_forward(layer.feed_forward_norm(hidden_states)), c_kernel
    )
    return hidden_states, weights


def _embed(
    embeddings: "ScrnaLongformerEmbeddings",
    expression: torch.Tensor,
    masked_positions: torch.Tensor | None,
    c_dropout: bool = False,
) -> torch.Tensor:
    return embeddings(expression, masked_positions, c_dropout)


def _pool_and_normalize(
    final_norm: nn.LayerNorm, pooler_norm: nn.LayerNorm, pooling: str, hidden: torch.Tensor, gene_mask: torch.Tensor
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
    return final_norm(hidden), pooler_norm(pooled)


# One compiled function for every layer of every model in the process: torch.compile keeps its
# graphs per function, and the layers' weights are inputs to it, not constants. The embeddings
# and the pooling are compiled too: eager, their chains of elementwise ops over (b, 1 + G, d)
# took 13% of the default preset's forward (measured).
_COMPILED_LAYER_FORWARD = CompiledFunction(_layer_forward, batch_arguments=(1, 3, 6))
_COMPILED_EMBED = CompiledFunction(_embed, batch_arguments=(1, 2))
_COMPILED_POOL_AND_NORMALIZE = CompiledFunction(_pool_and_normalize, batch_arguments=(3, 4))


class ScrnaLongformerLayer(GradientCheckpointingLayer):
    """Pre-LayerNorm transformer layer: attention then feed-forward, each with a residual.
    With ``config.kernel_implementation="compiled"`` the whole layer runs as one compiled graph
    (the kNN gather, LayerNorms, GELU and residual adds fused around the matrix products)."""

    def __init__(self, config: ScrnaLongformerConfig):
        super().__init__()
        self.config = config
        self.attention_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attention = ScrnaLongformerAttention(config)
        self.feed_forward_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.feed_forward = ScrnaLongformerFeedForward(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

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
        output_attentions: bool = False,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(b, 1 + G, d) -> (b, 1 + G, d) and the attention weights if asked. With ``rows`` (n,),
        indices into the ``b·(1 + G)`` tokens, everything after the attention runs at those
        tokens only: -> (n, d)."""
        if self.config.kernel_implementation == "eager":
            return _layer_forward(self, hidden_states, gene_neighbors, key_mask, bool(output_attentions), False, rows)
        c_kernel = self.uses_c_kernel(hidden_states, gene_neighbors, bool(output_attentions))
        return _COMPILED_LAYER_FORWARD(
            self, hidden_states, gene_neighbors, key_mask, bool(output_attentions), c_kernel, rows,
            kernel_threads=torch.get_num_threads() if c_kernel else 1,
        )

    def uses_c_kernel(self, hidden_states: torch.Tensor, gene_neighbors: torch.Tensor, output_attentions: bool) -> bool:
        """Whether this call runs the C kNN kernels: compiled kernels, ``knn`` attention, no
        attention dropout, no attention weights, float32 on CPU, a supported shape."""
        config = self.config
        return (
            config.attention_type == "knn"
            and not output_attentions
            and not (self.training and config.attention_dropout > 0)
            and hidden_states.device.type == "cpu"
            and hidden_states.dtype == torch.float32
            and knn_kernel_available(config.n_heads, config.d_model // config.n_heads, gene_neighbors.shape[1])
        )


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
        last_layer_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple | None, tuple | None]:
        """``last_layer_rows``: see ``ScrnaLongformerLayer.forward``'s ``rows``; the last layer
        then returns (n, d)."""
        all_hidden = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for index, layer in enumerate(self.layers):
            rows = last_layer_rows if index == len(self.layers) - 1 else None
            hidden_states, weights = layer(hidden_states, gene_neighbors, key_mask, output_attentions, rows=rows)
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
        logits: (batch, G) predicted normalised expression of every gene (in training mode, of
            the masked genes only, NaN elsewhere: see ``ScrnaLongformerForMaskedGeneModeling``).
        masked_positions: (batch, G) bool, the genes that were hidden from the input.
        cell_embedding: (batch, d_model); None in training mode.
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
        gene_mask = self._checked_gene_mask(expression, attention_mask)
        batch = expression.shape[0]
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        step = max(batch, 1) if torch.is_grad_enabled() else self.inference_chunk_cells()
        chunks = [
            self._encode(
                expression[start : start + step],
                gene_mask[start : start + step],
                None if masked_positions is None else masked_positions[start : start + step],
                output_attentions,
                output_hidden_states,
            )
            for start in range(0, max(batch, 1), step)  # an empty batch still gives one (empty) chunk
        ]
        if len(chunks) == 1:
            return chunks[0]
        return ScrnaLongformerModelOutput(
            last_hidden_state=torch.cat([chunk.last_hidden_state for chunk in chunks]),
            cell_embedding=torch.cat([chunk.cell_embedding for chunk in chunks]),
            hidden_states=_cat_per_layer([chunk.hidden_states for chunk in chunks]),
            attentions=_cat_per_layer([chunk.attentions for chunk in chunks]),
        )

    def selected_gene_states(
        self,
        expression: torch.Tensor,
        selected: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        masked_positions: torch.Tensor | None = None,
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
        gene_mask = self._checked_gene_mask(expression, attention_mask)
        if tuple(selected.shape) != tuple(expression.shape):
            raise ValueError(
                f"selected must have the shape of expression {tuple(expression.shape)}, got {tuple(selected.shape)}."
            )
        # Flat indices into the (b, 1 + G) tokens; the CLS column is never selected.
        rows = F.pad(selected.bool(), (1, 0)).reshape(-1).nonzero().squeeze(1)
        hidden, _, _ = self._run_encoder(expression, gene_mask, masked_positions, False, False, rows)
        return self.final_norm(hidden)

    def _checked_gene_mask(self, expression: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Validate the inputs; (batch, G) bool, True for the genes measured in each cell."""
        _check_expression(expression, self.config.n_genes)
        if attention_mask is None:
            return torch.ones_like(expression, dtype=torch.bool)
        if tuple(attention_mask.shape) != tuple(expression.shape):
            raise ValueError(
                f"attention_mask must have the shape of expression {tuple(expression.shape)}, "
                f"got {tuple(attention_mask.shape)}."
            )
        return attention_mask.bool()

    def inference_chunk_cells(self) -> int:
        """Cells per forward chunk when no gradient is kept: cells are independent, and a chunk
        whose widest activation (tokens × max(3·d, MLP width) floats) is about 8 MB stays in the
        CPU caches yet keeps the matrix products large enough for every thread; on 2 cores it
        runs the default preset at 2,000 genes 2–3× faster than one batch of 32."""
        n_tokens = self.config.n_genes + 1
        widest = max(3 * self.config.d_model, self.config.intermediate_size)
        return max(1, _INFERENCE_CHUNK_FLOATS // (n_tokens * widest))

    def _run_encoder(self, expression, gene_mask, masked_positions, output_attentions, output_hidden_states, rows=None):
        """Embeddings and layers of validated cells: the residual stream (b, 1 + G, d), or (n, d)
        at ``rows`` (see ``ScrnaLongformerEncoder``), and the per-layer outputs asked for."""
        key_mask = torch.cat([gene_mask.new_ones(expression.shape[0], 1), gene_mask], dim=1)  # (b, 1 + G)
        if self.config.kernel_implementation == "compiled":
            c_dropout = self.training and expression.device.type == "cpu" and c_kernels_available()
            # Elementwise graphs and reductions, no scatter: every thread.
            tokens = _COMPILED_EMBED(
                self.embeddings, expression, masked_positions, c_dropout, kernel_threads=torch.get_num_threads()
            )
        else:
            tokens = _embed(self.embeddings, expression, masked_positions)
        return self.encoder(tokens, self.gene_neighbors, key_mask, output_attentions, output_hidden_states, rows)

    def _encode(self, expression, gene_mask, masked_positions, output_attentions, output_hidden_states):
        """The forward pass of one chunk of cells, already validated."""
        hidden, all_hidden, all_attentions = self._run_encoder(
            expression, gene_mask, masked_positions, output_attentions, output_hidden_states
        )
        if self.config.kernel_implementation == "compiled":
            pool_and_normalize = functools.partial(_COMPILED_POOL_AND_NORMALIZE, kernel_threads=torch.get_num_threads())
        else:
            pool_and_normalize = _pool_and_normalize
        last_hidden_state, cell_embedding = pool_and_normalize(
            self.final_norm, self.pooler_norm, self.config.pooling, hidden, gene_mask
        )
        return ScrnaLongformerModelOutput(
            last_hidden_state=last_hidden_state,
            cell_embedding=cell_embedding,
            hidden_states=all_hidden,
            attentions=all_attentions,
        )


# Floats in the widest activation of one inference chunk (8 MB in fp32; the best of 2–32 MB
# measured on 2 cores for the tiny and default presets).
_INFERENCE_CHUNK_FLOATS = 2**21


def _cat_per_layer(per_chunk: list[tuple | None]) -> tuple | None:
    """Concatenate per-layer tuples of chunk outputs along the batch."""
    if per_chunk[0] is None:
        return None
    return tuple(torch.cat(layer_outputs) for layer_outputs in zip(*per_chunk))


class ScrnaLongformerForMaskedGeneModeling(ScrnaLongformerPreTrainedModel):
    """Masked gene modelling: hide the values of a random ``mask_ratio`` of the measured genes
    from the input and regress them from the rest. The loss covers the masked genes only.

    In training mode the last layer and the prediction head run at the masked genes only (see
    ``ScrnaLongformerModel.selected_gene_states``): the loss and every gradient are those of the
    full forward, at about two thirds of the cost for the two-layer default preset. The output's
    ``logits`` then hold predictions at the masked genes and NaN elsewhere, and
    ``cell_embedding`` is None; ``model.eval()`` or ``predict_all_genes=True`` gives them all.
    """

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
        predict_all_genes: bool | None = None,
        **kwargs,
    ) -> MaskedGeneModelingOutput:
        r"""
        Args:
            masked_positions: (batch, G) bool, genes to hide and score; sampled if None.
            labels: (batch, G) target values; defaults to ``expression`` itself.
            predict_all_genes: predict every gene and pool the cell embedding; by default only
                outside training mode or when hidden states or attentions are asked for.
        """
        if masked_positions is None:
            masked_positions = self.sample_masked_positions(expression, attention_mask)
        masked_positions = masked_positions.bool()
        targets = expression if labels is None else labels
        n_masked = masked_positions.sum()
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if predict_all_genes is None:
            predict_all_genes = not self.training or bool(output_attentions) or bool(output_hidden_states)
        if not predict_all_genes:
            states = self.scrna_longformer.selected_gene_states(
                expression, masked_positions, attention_mask=attention_mask, masked_positions=masked_positions
            )  # (n_masked, d)
            masked_predictions = self._predict(states)  # (n_masked,)
            loss = (masked_predictions - targets[masked_positions]).pow(2).sum() / n_masked.clamp(min=1)
            predictions = torch.full_like(expression, float("nan"), dtype=masked_predictions.dtype)
            return MaskedGeneModelingOutput(
                loss=loss,
                logits=predictions.masked_scatter(masked_positions, masked_predictions),
                masked_positions=masked_positions,
            )
        outputs = self.scrna_longformer(
            expression,
            attention_mask=attention_mask,
            masked_positions=masked_positions,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        predictions = self._predict(outputs.last_hidden_state[:, 1:])  # (b, G)
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

    def _predict(self, gene_states: torch.Tensor) -> torch.Tensor:
        """Gene token states (..., d) -> predicted values (...)."""
        transformed = self.prediction_norm(F.gelu(self.prediction_transform(gene_states)))
        return self.prediction_head(transformed).squeeze(-1)


class ScrnaLongformerForCellClassification(ScrnaLongformerPreTrainedModel):
    """Cell-type classification from the pooled cell embedding."""

    def __init__(self, config: ScrnaLongformerConfig):
        super().__init__(config)
        self.scrna_longformer = ScrnaLongformerModel(config)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.classifier = nn.Linear(config.d_model, config.num_labels)
        self.post_init()

    def classification_loss(self, logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """Mean cross-entropy of logits (b, num_labels) against class ids (b,), with
        ``config.class_weights`` if set and the given label smoothing."""
        if labels.dim() != 1 or int(labels.min()) < 0 or int(labels.max()) >= self.config.num_labels:
            raise ValueError(
                f"labels must be a (batch,) tensor of class ids in [0, {self.config.num_labels}), "
                f"got shape {tuple(labels.shape)} with values {int(labels.min())}..{int(labels.max())}."
            )
        weight = None
        if self.config.class_weights is not None:
            weight = torch.tensor(self.config.class_weights, dtype=logits.dtype, device=logits.device)
        return F.cross_entropy(logits, labels.long(), weight=weight, label_smoothing=label_smoothing)

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
        loss = None if labels is None else self.classification_loss(logits, labels)
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
