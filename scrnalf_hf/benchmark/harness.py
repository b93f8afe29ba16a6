"""What every benchmark shares: timing with warm-up and repeats, the fp32 GEMM roof, the models
(the project's attention kernels and the transformers ``BertModel`` peer of the same shape), the
gene graphs they run on, honest FLOP counts, and writing JSON / Markdown next to a plot.

Timings on a shared machine vary 2–3× from run to run, so each benchmark measures a figure and
its baselines in one process, interleaving the models repeat by repeat, and reports the median
and the spread (min, max) of the repeats together with the thread count.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from transformers import BertConfig, BertModel

from ..configuration_scrnalf import ScrnaLongformerConfig
from ..kernels_scrnalf import c_kernels_available
from ..machine import describe_machine
from ..modeling_scrnalf import ScrnaLongformerModel, default_gene_neighbors
from .targets import targets_table

GRAPHS = ("window", "simulated")


def set_threads(threads: int) -> int:
    """Use ``threads`` intra-op threads (and no inter-op parallelism); returns the count in use."""
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def machine_info() -> dict:
    """:func:`scrnalf_hf.machine.describe_machine` plus whether the C kNN kernels run here."""
    return {**describe_machine(), "c_knn_kernels": c_kernels_available()}


def summarize(seconds: list[float]) -> dict:
    """Median and spread of repeated timings, in seconds."""
    return {
        "median_s": statistics.median(seconds),
        "min_s": min(seconds),
        "max_s": max(seconds),
        "repeats": len(seconds),
    }


def time_interleaved(functions: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, dict]:
    """Time several callables in one process, alternating them on every repeat so that a burst
    of load on the shared machine hits all of them alike. Returns ``summarize`` per name, plus
    ``first_call_s``: the first warm-up call, which includes ``torch.compile``'s compilation."""
    first_call = {}
    for name, function in functions.items():
        for index in range(warmup):
            start = time.perf_counter()
            function()
            if index == 0:
                first_call[name] = time.perf_counter() - start
    seconds = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            seconds[name].append(time.perf_counter() - start)
    return {name: {**summarize(values), "first_call_s": first_call.get(name)} for name, values in seconds.items()}


def gemm_gflops(size: int = 2048, repeats: int = 5) -> dict:
    """The roof: fp32 ``size``³ matrix multiply, GFLOP/s of the median and best repeat."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator)
    b = torch.randn(size, size, generator=generator)
    timing = time_interleaved({"gemm": lambda: torch.matmul(a, b)}, warmup=1, repeats=repeats)["gemm"]
    flops = 2.0 * size**3
    return {
        "size": size,
        "gflops_median": flops / timing["median_s"] / 1e9,
        "gflops_best": flops / timing["min_s"] / 1e9,
        **timing,
    }


# ---------------------------------------------------------------------------------------------
# Gene graphs and models
# ---------------------------------------------------------------------------------------------


def gene_graph(kind: str, n_genes: int, k: int, seed: int = 0, n_cells: int = 2000) -> torch.Tensor:
    """A ``(G, k)`` neighbour table to benchmark on.

    ``window``: the default graph of a freshly built model (neighbours = nearby panel positions;
    perfectly local). ``simulated``: the processor's cosine kNN graph built from ``n_cells``
    simulated cells (gene modules plus many noise genes whose neighbours are close to random —
    the hard, realistic case).
    """
    if kind == "window":
        return default_gene_neighbors(n_genes, k)
    if kind == "simulated":
        from ..data.simulation import simulate
        from ..processing_scrnalf import ScrnaLongformerProcessor

        cells = simulate(n_cells=n_cells, n_genes=n_genes, seed=seed)
        processor = ScrnaLongformerProcessor.from_anndata(cells)
        expression = processor(cells, return_tensors="pt")["expression"]
        return torch.as_tensor(processor.build_gene_graph(expression, k=k, seed=seed))
    raise ValueError(f"unknown graph {kind!r}; choose one of {GRAPHS}.")


def scrnalf_model(
    preset: str, n_genes: int, attention_type: str, graph: torch.Tensor | None = None, **overrides
) -> ScrnaLongformerModel:
    """The bare encoder of ``preset`` at ``n_genes`` genes in eval mode, random weights;
    ``overrides`` are config fields, e.g. ``kernel_implementation="eager"``."""
    config = ScrnaLongformerConfig.from_preset(preset, n_genes=n_genes, attention_type=attention_type, **overrides)
    model = ScrnaLongformerModel(config).eval()
    if graph is not None:
        model.set_gene_graph(graph)
    return model


def bert_peer(config: ScrnaLongformerConfig, n_tokens: int) -> BertModel:
    """transformers' ``BertModel`` with SDPA attention and the same width, depth, heads, MLP
    size and token count as ``config`` (1 + G tokens), random weights, eval mode."""
    peer_config = BertConfig(
        vocab_size=n_tokens,
        hidden_size=config.d_model,
        num_hidden_layers=config.depth,
        num_attention_heads=config.n_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=n_tokens,
        attn_implementation="sdpa",
    )
    return BertModel(peer_config, add_pooling_layer=False).eval()


def forward_functions(
    models: dict[str, torch.nn.Module], config: ScrnaLongformerConfig, batch_size: int, seed: int = 0
) -> dict[str, Callable[[], object]]:
    """One inference call per model on the same batch: scRNA models take ``expression``
    (batch, G); the BERT peer takes the 1 + G token ids."""
    generator = torch.Generator().manual_seed(seed)
    expression = torch.rand(batch_size, config.n_genes, generator=generator) * 5
    token_ids = torch.arange(config.n_genes + 1).expand(batch_size, -1)

    def call(model):
        if isinstance(model, BertModel):
            return lambda: _inference(model, input_ids=token_ids)
        return lambda: _inference(model, expression=expression)

    return {name: call(model) for name, model in models.items()}


def _inference(model, **inputs):
    with torch.inference_mode():
        return model(**inputs)


# ---------------------------------------------------------------------------------------------
# FLOPs (multiply-add = 2 FLOPs), forward pass of one cell
# ---------------------------------------------------------------------------------------------


def dense_layer_flops(config: ScrnaLongformerConfig) -> float:
    """Projections and feed-forward of one layer, per token: QKV, output, up and down."""
    d, m = config.d_model, config.intermediate_size
    return 2.0 * (d * 3 * d + d * d + 2 * d * m)


def attention_flops(config: ScrnaLongformerConfig, attention_type: str) -> float:
    """The attention's useful FLOPs per layer and cell (QKᵀ and PV, all heads).

    ``knn``: each gene scores its k neighbours and CLS; CLS scores every token. ``dense`` /
    BERT: every token scores every token. ``linear``: φ(K)ᵀV and φ(Q)(φ(K)ᵀV). Work a kernel
    does on padding or masked-out pairs is not counted.
    """
    n_tokens, d, k = config.n_genes + 1, config.d_model, config.knn_k
    head_dim = config.head_dim
    if attention_type == "knn":
        pairs = config.n_genes * (k + 1) + n_tokens
        return 2.0 * 2 * pairs * head_dim * config.n_heads
    if attention_type in ("dense", "bert"):
        return 2.0 * 2 * n_tokens * n_tokens * d
    if attention_type == "linear":
        return 2.0 * 2 * n_tokens * head_dim * d
    raise ValueError(f"no FLOP count for attention {attention_type!r}.")


def forward_flops(config: ScrnaLongformerConfig, attention_type: str) -> float:
    """FLOPs of one cell's forward: every layer's projections, feed-forward and attention."""
    n_tokens = config.n_genes + 1
    return config.depth * (n_tokens * dense_layer_flops(config) + attention_flops(config, attention_type))


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


SECTION_ORDER = ("inference", "memory", "train", "convert", "predict", "loader")


def write_results(output_dir: str | Path, name: str, results: dict, markdown: str) -> Path:
    """Write ``<name>.json`` and ``<name>.md`` into ``output_dir`` and refresh
    ``PERFORMANCE.md`` there, the README's performance section made of every benchmark's
    Markdown present in the folder. Returns the JSON path."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"{name}.json"
    path.write_text(json.dumps(results, indent=2, default=_jsonable))
    (output_dir / f"{name}.md").write_text(markdown)
    sections = [
        (output_dir / f"{section}.md").read_text()
        for section in SECTION_ORDER
        if (output_dir / f"{section}.md").exists()
    ]
    targets = targets_table(output_dir)
    (output_dir / "PERFORMANCE.md").write_text(
        "## Performance\n\nGenerated by `scrnalf benchmark …`; each figure was measured in one process next to its "
        "baselines.\n\n" + (targets + "\n" if targets else "") + "\n".join(sections)
    )
    return path


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def conditions_line(info: dict) -> str:
    return (
        f"fp32, {info['threads']} thread(s) on {info['cpu_count']} CPU core(s), torch {info['torch']}, "
        f"OMP_WAIT_POLICY={info['omp_wait_policy']}, 1-min load average at start {info['load_average_1min']:.1f}"
        + ("" if "c_knn_kernels" not in info else f", C kNN kernels {'on' if info['c_knn_kernels'] else 'off (PyTorch kernels)'}")
    )
