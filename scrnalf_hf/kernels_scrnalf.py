"""Attention kernels beyond eager PyTorch: small C kernels for kNN attention on AVX-512 CPUs, the
kernel interface the model's attention registry holds (``AttentionFunction``), and the
``torch.compile`` wrapper the layers run in (``CompiledFunction``).

torch.compile's generated loop for the kNN gather-and-softmax is scalar-bound (a horizontal sum
per neighbour and head, softmax over 17 × 4 values in masked vectors): 4.2 ms per 4-cell chunk of
the default preset at 2,000 genes on one core; its backward scatter-adds into the neighbours' key
and value gradients and does not split over threads. The C kernels below do the same arithmetic
(forward 1.9 ms there) in torch's own OpenMP pool: the forward splits rows over the threads, the
backward whole cells, so scatters into a cell's gradients never race. The same library draws
dropout masks for compiled graphs: the Bernoulli draws ``nn.Dropout`` compiles to run on one
thread and were a sixth of a default-preset training step (measured); the C mask costs a few
percent of that.

The libraries are compiled on first use into a per-user cache directory and loaded with ctypes
only after checking who owns them and that they are the bytes that were built (see
``load_kernel_library``). The ``torch.library`` custom ops around them, which keep a compiled
layer in one graph, are registered on first use.

This file is copied next to saved weights as remote code with the model file: it imports only
torch and the Python standard library.
"""

import ctypes
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# The kernel interface
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class AttentionFunction:
    """One way to compute a layer's attention: an entry of the model's attention registry
    (``modeling_scrnalf.ATTENTION_FUNCTIONS``), picked once per forward by ``supports``.

    Args:
        name: short name, for messages and tests.
        forward: ``(qkv, gene_neighbors, key_mask, dropout_p, output_attentions) -> (context,
            weights)``. ``qkv`` (batch, 1 + G, 3, heads, head_dim) is the fused projection,
            token-major, CLS at index 0; ``gene_neighbors`` (G, k) int64, -1 = padding;
            ``key_mask`` (batch, 1 + G) bool, True = may be attended to (CLS always True).
            ``context`` is (batch, 1 + G, heads, head_dim); ``weights``, only if asked, holds the
            gene rows in neighbour-table form, (batch, heads, G, k + 1): column j < k the
            weight on ``gene_neighbors[g, j]``, column k the weight on CLS. Otherwise None.
        supports: ``(config, device, dtype, training, output_attentions, knn_k) -> bool``,
            whether this function computes the configured attention for such a call.
        graph_dropout: ``(hidden_states, p, training) -> hidden_states``, the dropout the
            layers apply inside compiled graphs when this function runs.
        multithreaded_graphs: whether the CPU code torch.compile generates around this function
            uses every thread. Not around torch.compile's own kNN gather loops, whose loops and
            backward scatter-adds ran 2.4× and 1.35× slower split over 2 threads (measured);
            around a kernel of its own the generated code is elementwise and gains from them.
    """

    name: str
    forward: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
    supports: Callable[..., bool]
    graph_dropout: Callable[[torch.Tensor, float, bool], torch.Tensor]
    multithreaded_graphs: bool = False

    def __call__(self, qkv, gene_neighbors, key_mask, dropout_p, output_attentions):
        return self.forward(qkv, gene_neighbors, key_mask, dropout_p, output_attentions)

    def __repr__(self) -> str:
        return f"AttentionFunction({self.name!r})"


def torch_dropout(hidden_states: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    return F.dropout(hidden_states, p=p, training=training)


# ---------------------------------------------------------------------------------------------
# The C kernels. Used with compiled layers where they are exact to float rounding (see
# ``supports_c_knn_attention``); everywhere else, and wherever they cannot be built, the model's
# PyTorch ``knn_attention`` runs.
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


# ---------------------------------------------------------------------------------------------
# Building, caching and loading the C library
# ---------------------------------------------------------------------------------------------

# Cached libraries not loaded for this long are deleted (loading one touches it).
PRUNE_AFTER_SECONDS = 30 * 24 * 3600


class KernelUnavailable(RuntimeError):
    """The C kernels cannot be built or loaded safely on this machine; the message says why."""


def kernel_cache_dir() -> str:
    """Where compiled kernels are cached: ``$SCRNALF_KERNEL_CACHE``, else
    ``$XDG_CACHE_HOME/scrnalf-hf/kernels``, else ``~/.cache/scrnalf-hf/kernels``. Never the
    shared temporary directory, where anyone may plant a library under the expected name."""
    if os.environ.get("SCRNALF_KERNEL_CACHE"):
        return os.environ["SCRNALF_KERNEL_CACHE"]
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache_home, "scrnalf-hf", "kernels")


def _compiler_flags(heads: int, head_dim: int, k: int) -> list[str]:
    return [
        "-O3", "-mavx512f", "-mavx512dq", "-mfma", "-fopenmp", "-shared", "-fPIC",
        f"-DHEADS={heads}", f"-DHEAD_DIM={head_dim}", f"-DNEIGHBORS={k}",
    ]


def library_path(directory: str, heads: int, head_dim: int, k: int) -> str:
    """The cache file of the library for one (heads, head_dim, k), named by a hash of the source
    and the flags; ``<library>.sha256`` beside it records the hash of the bytes that were built."""
    flags = " ".join(_compiler_flags(heads, head_dim, k))
    digest = hashlib.sha256((_KNN_KERNEL_SOURCE + flags).encode()).hexdigest()[:16]
    return os.path.join(directory, f"knn_attention_{digest}.so")


def _foreign(path: str, status: os.stat_result) -> str | None:
    """Why ``path`` may have been written by someone else, or None if only this user can have."""
    if status.st_uid != os.getuid():
        return f"{path} is owned by uid {status.st_uid}, not by this user (uid {os.getuid()})"
    if status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others (mode {stat.S_IMODE(status.st_mode):o})"
    return None


def _private_directory(directory: str) -> str:
    """Create ``directory`` with mode 0700 if needed, and check that it is this user's and that
    nobody else can write to it."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    status = os.stat(directory)
    problem = _foreign(directory, status) if stat.S_ISDIR(status.st_mode) else f"{directory} is not a directory"
    if problem is not None:
        raise KernelUnavailable(
            f"the kernel cache is unsafe: {problem}; make it private (chmod 700) or point SCRNALF_KERNEL_CACHE "
            "at a directory of your own"
        )
    return directory


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _distrust(library: str) -> str | None:
    """None if the cached ``library`` may be loaded: it and its recorded hash are regular files of
    this user that nobody else can write, and its bytes have the recorded hash. Otherwise why not."""
    recorded = library + ".sha256"
    try:
        for path in (library, recorded):
            status = os.lstat(path)  # a symbolic link could point anywhere
            if not stat.S_ISREG(status.st_mode):
                return f"{path} is not a regular file"
            problem = _foreign(path, status)
            if problem is not None:
                return problem
        with open(recorded) as handle:
            expected = handle.read().strip()
        if _sha256(library) != expected:
            return f"{library} does not have the sha256 recorded when it was built"
    except FileNotFoundError:
        return "not built yet"
    return None


def _build(library: str, heads: int, head_dim: int, k: int) -> None:
    """Compile the library for one shape into ``library``, then record its sha256 beside it. Both
    are written under temporary names in the (private) cache directory and renamed into place,
    so concurrent processes never see half a file."""
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise KernelUnavailable("no C compiler found (set CC)")
    with tempfile.TemporaryDirectory(dir=os.path.dirname(library), prefix=".build-") as build:
        source = os.path.join(build, "knn_attention.c")
        with open(source, "w") as handle:
            handle.write(_KNN_KERNEL_SOURCE)
        built = os.path.join(build, "knn_attention.so")
        command = [compiler, *_compiler_flags(heads, head_dim, k), source, "-o", built]
        try:
            subprocess.run(command, check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as error:
            detail = (getattr(error, "stderr", None) or str(error)).strip()
            raise KernelUnavailable(
                f"compiling it failed: {detail.splitlines()[-1][:200] if detail else type(error).__name__}"
            ) from None
        os.chmod(built, 0o700)
        digest = _sha256(built)
        os.replace(built, library)
        recorded = os.path.join(build, "sha256")
        with open(recorded, "w") as handle:
            handle.write(digest + "\n")
        os.replace(recorded, library + ".sha256")


def prune_kernel_cache(directory: str, max_age_seconds: float = PRUNE_AFTER_SECONDS) -> list[str]:
    """Delete the libraries of ``directory`` not loaded for ``max_age_seconds`` (with their
    recorded hashes), hashes whose library is gone, and build folders that old (left by
    interrupted builds). Returns the paths deleted."""
    cutoff = time.time() - max_age_seconds
    deleted = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        try:
            old = os.lstat(path).st_mtime < cutoff
            if name.startswith("knn_attention_") and name.endswith(".so") and old:
                os.unlink(path)
                deleted.append(path)
                if os.path.lexists(path + ".sha256"):
                    os.unlink(path + ".sha256")
                    deleted.append(path + ".sha256")
            elif name.endswith(".so.sha256") and not os.path.lexists(path[: -len(".sha256")]):
                os.unlink(path)
                deleted.append(path)
            elif name.startswith(".build-") and old:
                shutil.rmtree(path, ignore_errors=True)
                deleted.append(path)
        except FileNotFoundError:  # another process pruned it first
            continue
    return deleted


class KernelLibrary:
    """The C functions of one loaded library, with their ctypes signatures."""

    def __init__(self, path: str):
        shared_library = ctypes.CDLL(path)
        self.path = path
        self.knn_attention = shared_library.scrnalf_knn_attention
        self.knn_attention.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_float, ctypes.c_int]
        self.knn_attention_backward = shared_library.scrnalf_knn_attention_backward
        self.knn_attention_backward.argtypes = (
            [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 2 + [ctypes.c_float, ctypes.c_int]
        )
        self.dropout_keep = shared_library.scrnalf_dropout_keep
        self.dropout_keep.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int]
        self.knn_attention.restype = self.knn_attention_backward.restype = self.dropout_keep.restype = None


def load_kernel_library(heads: int, head_dim: int, k: int, directory: str | None = None) -> KernelLibrary:
    """The C kernels for one (heads, head_dim, k), from the per-user cache ``directory``
    (default ``kernel_cache_dir()``), built there first if needed.

    A cached library is loaded only if the directory and the file belong to this user, none of
    them is writable by group or others, and the file's sha256 is the one recorded when it was
    built; otherwise it is rebuilt. Raises ``KernelUnavailable`` where that cannot be done.
    """
    directory = _private_directory(directory or kernel_cache_dir())
    prune_kernel_cache(directory)
    library = library_path(directory, heads, head_dim, k)
    reason = _distrust(library)
    if reason is not None:
        if os.path.lexists(library):
            logger.warning("not loading the cached C kernel library (%s); rebuilding it.", reason)
        _build(library, heads, head_dim, k)
        reason = _distrust(library)
        if reason is not None:
            raise KernelUnavailable(f"the library just built cannot be trusted: {reason}")
    os.utime(library)  # marks it as used, for prune_kernel_cache
    return KernelLibrary(library)


# The libraries this process has loaded (or failed to), per (heads, head_dim, k): a shared
# object is loaded once per process whichever model asks for it.
_LIBRARIES: dict[tuple[int, int, int], KernelLibrary | None] = {}
_LIBRARIES_LOCK = threading.Lock()


def kernel_library(heads: int, head_dim: int, k: int) -> KernelLibrary | None:
    """The loaded C kernels for one shape, or None where this machine cannot run them: no
    AVX-512, k > 16, or (after one warning) no compiler or no safe cache."""
    if k > 16 or torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX"):
        return None
    key = (heads, head_dim, k)
    if key in _LIBRARIES:
        return _LIBRARIES[key]
    with _LIBRARIES_LOCK:
        if key not in _LIBRARIES:
            try:
                _LIBRARIES[key] = load_kernel_library(heads, head_dim, k)
            except (KernelUnavailable, OSError) as error:
                logger.warning(
                    "the C kNN attention kernel could not be built or loaded (%s); the PyTorch kernel runs instead.",
                    error,
                )
                _LIBRARIES[key] = None
        return _LIBRARIES[key]


# Any library draws dropout masks; this one is built for it.
_DROPOUT_LIBRARY = (1, 16, 16)


def c_kernels_available() -> bool:
    """Whether this machine runs the C kernels (AVX-512, a C compiler and a safe cache)."""
    return kernel_library(*_DROPOUT_LIBRARY) is not None


# ---------------------------------------------------------------------------------------------
# Custom ops around the C kernels, so that torch.compile keeps a whole layer (and its backward)
# in one graph around the calls, and torch.export can record them.
# ---------------------------------------------------------------------------------------------


def _library_for(qkv: torch.Tensor, gene_neighbors: torch.Tensor) -> KernelLibrary:
    heads, head_dim, k = qkv.shape[3], qkv.shape[4], gene_neighbors.shape[1]
    library = kernel_library(heads, head_dim, k)
    if library is None:
        raise RuntimeError(f"no C kNN attention kernel for heads={heads}, head_dim={head_dim}, k={k} on this machine.")
    return library


def _kernel_layout(qkv: torch.Tensor, gene_neighbors: torch.Tensor, key_mask: torch.Tensor):
    """The dense layouts and dtypes the C kernels read: float32, int64 and bool, contiguous."""
    return qkv.contiguous(), gene_neighbors.long().contiguous(), key_mask.bool().contiguous()


def _knn_attention_c(qkv: torch.Tensor, gene_neighbors: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """qkv (b, 1 + G, 3, h, dh) float32, gene_neighbors (G, k), key_mask (b, 1 + G) bool ->
    attention output (b, 1 + G, h, dh), as ``modeling_scrnalf.knn_attention`` computes it."""
    library = _library_for(qkv, gene_neighbors)
    batch, n_tokens, _, heads, head_dim = qkv.shape
    qkv, gene_neighbors, key_mask = _kernel_layout(qkv, gene_neighbors, key_mask)
    output = qkv.new_empty(batch, n_tokens, heads, head_dim)
    library.knn_attention(
        qkv.data_ptr(), gene_neighbors.data_ptr(), key_mask.data_ptr(), output.data_ptr(),
        batch, n_tokens, head_dim**-0.5, torch.get_num_threads(),
    )
    return output


def _knn_attention_c_backward(
    grad_output: torch.Tensor, qkv: torch.Tensor, gene_neighbors: torch.Tensor, key_mask: torch.Tensor, output: torch.Tensor
) -> torch.Tensor:
    """d loss / d qkv (b, 1 + G, 3, h, dh) from d loss / d output (b, 1 + G, h, dh)."""
    library = _library_for(qkv, gene_neighbors)
    batch, n_tokens, _, _, head_dim = qkv.shape
    qkv, gene_neighbors, key_mask = _kernel_layout(qkv, gene_neighbors, key_mask)
    output, grad_output = output.contiguous(), grad_output.contiguous()
    grad_qkv = torch.empty_like(qkv)
    library.knn_attention_backward(
        qkv.data_ptr(), gene_neighbors.data_ptr(), key_mask.data_ptr(), output.data_ptr(), grad_output.data_ptr(),
        grad_qkv.data_ptr(), batch, n_tokens, head_dim**-0.5, torch.get_num_threads(),
    )
    return grad_qkv


def _dropout_keep(like: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """A bool keep-mask of ``like``'s shape, True with probability 1 - p, fixed by ``seed``."""
    library = kernel_library(*_DROPOUT_LIBRARY)
    if library is None:
        raise RuntimeError("the C dropout kernel is not available on this machine.")
    keep = torch.empty(like.shape, dtype=torch.bool, device=like.device)
    library.dropout_keep(keep.data_ptr(), keep.numel(), int(seed) % 2**64, round(p * 2**32), torch.get_num_threads())
    return keep


def _setup_knn_attention_c(ctx, inputs, output):
    qkv, gene_neighbors, key_mask = inputs
    ctx.save_for_backward(qkv, gene_neighbors, key_mask, output)


def _knn_attention_c_autograd(ctx, grad_output):
    qkv, gene_neighbors, key_mask, output = ctx.saved_tensors
    return torch.ops.scrnalf.knn_attention_c_backward(grad_output, qkv, gene_neighbors, key_mask, output), None, None


_OPS_LOCK = threading.Lock()


def custom_ops():
    """``torch.ops.scrnalf`` with the ops ``knn_attention_c``, ``knn_attention_c_backward`` and
    ``dropout_keep`` defined. They are registered on the first call; this file may be imported
    twice in one process (the package and a checkpoint's remote-code copy), and the second copy
    uses the ops the first one registered."""
    with _OPS_LOCK:
        if not hasattr(torch.ops.scrnalf, "dropout_keep"):
            forward = torch.library.custom_op("scrnalf::knn_attention_c", mutates_args=())(_knn_attention_c)
            backward = torch.library.custom_op("scrnalf::knn_attention_c_backward", mutates_args=())(
                _knn_attention_c_backward
            )
            forward.register_fake(
                lambda qkv, gene_neighbors, key_mask: qkv.new_empty(*qkv.shape[:2], *qkv.shape[3:])
            )
            backward.register_fake(lambda grad_output, qkv, gene_neighbors, key_mask, output: torch.empty_like(qkv))
            forward.register_autograd(_knn_attention_c_autograd, setup_context=_setup_knn_attention_c)
            dropout_keep = torch.library.custom_op("scrnalf::dropout_keep", mutates_args=())(_dropout_keep)
            dropout_keep.register_fake(lambda like, p, seed: torch.empty_like(like, dtype=torch.bool))
    return torch.ops.scrnalf


# ---------------------------------------------------------------------------------------------
# The C kNN attention as an entry of the model's attention registry
# ---------------------------------------------------------------------------------------------


def supports_c_knn_attention(config, device, dtype, training, output_attentions, knn_k) -> bool:
    """The C kernels compute ``knn`` attention exactly (to float rounding) for compiled layers on
    an AVX-512 CPU in float32 with k <= 16, without attention dropout and without returning
    attention weights. Checking builds the library on first use."""
    if not (
        config.attention_type == "knn"
        and config.kernel_implementation == "compiled"
        and device.type == "cpu"
        and dtype == torch.float32
        and not output_attentions
        and not (training and config.attention_dropout > 0)
        and kernel_library(config.n_heads, config.d_model // config.n_heads, knn_k) is not None
        and (not training or c_kernels_available())  # compiled training draws dropout masks with it
    ):
        return False
    custom_ops()
    return True


def c_knn_attention(qkv, gene_neighbors, key_mask, dropout_p, output_attentions):
    """kNN attention on the C kernels, forward and backward (see ``AttentionFunction``); never
    with dropout or weights, which ``supports_c_knn_attention`` rules out."""
    return torch.ops.scrnalf.knn_attention_c(qkv, gene_neighbors, key_mask), None


def c_dropout(hidden_states: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout with the keep-mask drawn by the C kernel, seeded from torch's generator; the
    multiply fuses into the next elementwise kernel of the compiled graph."""
    if not (training and p > 0):
        return hidden_states
    seed = torch.randint(0, 2**62, (), dtype=torch.int64, device=hidden_states.device)
    keep = torch.ops.scrnalf.dropout_keep(hidden_states, p, seed)
    return hidden_states * keep * (1.0 / (1.0 - p))


C_KNN_ATTENTION = AttentionFunction(
    name="knn-c",
    forward=c_knn_attention,
    supports=supports_c_knn_attention,
    graph_dropout=c_dropout,
    multithreaded_graphs=True,
)


# ---------------------------------------------------------------------------------------------
# torch.compile, per model
# ---------------------------------------------------------------------------------------------


def _in_dispatch_mode() -> bool:
    """Whether a Python dispatch mode (a memory tracer, a FakeTensorMode...) is active. torch.compile
    declines to run under one and then never compiles that function again in the process, for any
    model: such calls run the eager function instead."""
    from torch.utils import _python_dispatch

    return (
        _python_dispatch.any_torch_dispatch_mode_on_stack()
        or _python_dispatch.is_in_any_mode_without_ignore_compile_internals()
    )


class CompiledFunction:
    """``torch.compile`` of a function, built on first use, with a clean fallback. Each model
    owns its instances; torch.compile keeps its graphs per Python function, so models and layers
    that run the same function share compiled graphs, but a failure is local to the instance.

    Graphs are specialised to every shape except the batch dimension of ``batch_arguments``
    (marked dynamic when above 1), and never made dynamic automatically: the code that runs for
    an input depends only on that input's shapes, not on what ran before in the process, so two
    processes give bit-identical outputs.

    Compilation needs a working backend (a C++ compiler on CPU, Triton on GPU). Where it fails,
    one warning is logged and this instance runs the eager function from then on: the same
    numbers to float rounding, more slowly. An exception the eager function raises too is the
    caller's error and propagates.
    """

    # Each model size, flag combination and batch-of-one is one graph; a process that uses
    # many models must not silently fall back to eager after torch's default of 8.
    recompile_limit = 64

    def __init__(self, function: Callable, batch_arguments: tuple[int, ...] = ()):
        self.function = function
        self.batch_arguments = batch_arguments
        self.compiled = None
        self.unavailable = False
        self._lock = threading.Lock()

    def __call__(self, *args, kernel_threads: int = 1):
        """``kernel_threads``: OpenMP threads of the generated CPU kernels, fixed when a graph is
        first compiled (the matrix products use every intra-op thread regardless). One by
        default, for graphs with torch.compile's own kNN gather loops (see
        ``AttentionFunction.multithreaded_graphs``); graphs without them (elementwise ops,
        reductions, the C kernels) gain from more: the default preset's inference ran 1.3× faster
        with 2 on 2 cores.

        Random numbers in compiled graphs come from torch's own generator (inductor's
        ``fallback_random``): its per-element generator made dropout a third of a training step.
        Compiled backwards keep their saved tensors (no donated buffers), so that
        ``backward(retain_graph=True)`` works as it does eagerly. torch reads that switch when a
        compiled backward runs, not when it is compiled, so it can only be set for the process."""
        if self.unavailable or torch.compiler.is_compiling() or _in_dispatch_mode():
            return self.function(*args)
        with self._lock:
            if self.compiled is None:
                torch._functorch.config.donated_buffer = False
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
                "torch.compile of %s failed (%s: %s); this model runs eager PyTorch instead.",
                self.function.__name__, type(error).__name__, str(error).splitlines()[0][:200] if str(error) else "",
            )
            return result

    def __getstate__(self):
        # A compiled graph and a lock belong to one process and one model: a copy compiles anew.
        return {"function": self.function, "batch_arguments": self.batch_arguments, "unavailable": self.unavailable}

    def __setstate__(self, state):
        self.__init__(state["function"], state["batch_arguments"])
        self.unavailable = state["unavailable"]

    def __deepcopy__(self, memo):
        copy = CompiledFunction(self.function, self.batch_arguments)
        copy.unavailable = self.unavailable
        return copy


__all__ = [
    "AttentionFunction",
    "C_KNN_ATTENTION",
    "CompiledFunction",
    "KernelUnavailable",
    "c_kernels_available",
    "custom_ops",
    "kernel_cache_dir",
    "kernel_library",
    "library_path",
    "load_kernel_library",
    "prune_kernel_cache",
    "torch_dropout",
]
