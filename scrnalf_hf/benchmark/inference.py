"""Inference throughput of the presets next to their baselines, with achieved GFLOP/s against an
fp32 GEMM timed in the same interleaved loop (the roof)."""

from __future__ import annotations

from pathlib import Path

import torch

from .harness import (
    bert_peer,
    conditions_line,
    forward_flops,
    forward_functions,
    gene_graph,
    machine_info,
    scrnalf_model,
    set_threads,
    time_interleaved,
    write_results,
)
from .targets import markdown_table

GEMM_SIZE = 2048
MODEL_ORDER = (
    "knn (simulated graph)",
    "knn (window graph)",
    "linear",
    "dense (same graph)",
    "BertModel SDPA peer",
    "knn, eager kernels (simulated graph)",
)


def _models(preset: str, n_genes: int, graphs: dict[str, torch.Tensor], with_dense: bool) -> dict:
    """name -> (model, attention type used for its FLOP count)."""
    models = {
        "knn (simulated graph)": (scrnalf_model(preset, n_genes, "knn", graphs["simulated"]), "knn"),
        "knn, eager kernels (simulated graph)": (
            scrnalf_model(preset, n_genes, "knn", graphs["simulated"], kernel_implementation="eager"), "knn"
        ),
        "knn (window graph)": (scrnalf_model(preset, n_genes, "knn", graphs["window"]), "knn"),
        "linear": (scrnalf_model(preset, n_genes, "linear"), "linear"),
    }
    if with_dense:
        models["dense (same graph)"] = (scrnalf_model(preset, n_genes, "dense", graphs["simulated"]), "dense")
    config = models["linear"][0].config
    models["BertModel SDPA peer"] = (bert_peer(config, n_genes + 1), "bert")
    return models


def _measure_section(preset, n_genes, batch_size, graphs, with_dense, warmup, repeats, seed) -> dict:
    models = _models(preset, n_genes, graphs, with_dense)
    config = models["linear"][0].config
    functions = forward_functions({name: model for name, (model, _) in models.items()}, config, batch_size, seed)
    a = torch.randn(GEMM_SIZE, GEMM_SIZE)
    functions["fp32 GEMM"] = lambda: torch.matmul(a, a)
    timings = time_interleaved(functions, warmup, repeats)
    gemm_gflops = 2.0 * GEMM_SIZE**3 / timings["fp32 GEMM"]["median_s"] / 1e9
    bert_cells_per_s = batch_size / timings["BertModel SDPA peer"]["median_s"]
    rows = {}
    for name, (model, flop_kind) in models.items():
        timing = timings[name]
        cells_per_s = batch_size / timing["median_s"]
        gflops = forward_flops(config, flop_kind) * cells_per_s / 1e9
        rows[name] = {
            "cells_per_s": cells_per_s,
            "cells_per_s_min": batch_size / timing["max_s"],
            "cells_per_s_max": batch_size / timing["min_s"],
            "ms_per_cell": 1e3 / cells_per_s,
            "gflop_per_cell": forward_flops(config, flop_kind) / 1e9,
            "gflops": gflops,
            "fraction_of_gemm": gflops / gemm_gflops,
            "speedup_vs_bert": cells_per_s / bert_cells_per_s,
            "first_call_s": timing["first_call_s"],
        }
    return {
        "preset": preset,
        "n_genes": n_genes,
        "n_tokens": n_genes + 1,
        "batch_size": batch_size,
        "config": {k: getattr(config, k) for k in ("d_model", "depth", "n_heads", "intermediate_size", "knn_k")},
        "gemm": {"size": GEMM_SIZE, "gflops_median": gemm_gflops, **timings["fp32 GEMM"]},
        "models": rows,
        "repeats": repeats,
        "warmup": warmup,
    }


def benchmark_inference(
    output_dir: str | Path,
    presets: tuple[str, ...] = ("tiny", "default"),
    n_genes: int = 2000,
    batch_size: int = 32,
    long_preset: str | None = "default",
    long_n_genes: int = 16000,
    long_batch_size: int = 4,
    warmup: int = 1,
    repeats: int = 5,
    threads: int = 2,
    seed: int = 0,
) -> dict:
    """Cells per second of each preset at ``n_genes`` genes (batch ``batch_size``) for knn on the
    window and the simulated-data graph, linear, dense and the BERT peer, plus the
    ``long_preset`` at ``long_n_genes`` genes (batch ``long_batch_size``; dense is left out
    there: its (1 + G)² mask is the O(G²) cost knn avoids). Writes ``inference.{json,md,png}``."""
    set_threads(threads)
    info = machine_info()
    graphs = {kind: gene_graph(kind, n_genes, 16, seed) for kind in ("window", "simulated")}
    sections = [
        _measure_section(preset, n_genes, batch_size, graphs, True, warmup, repeats, seed) for preset in presets
    ]
    if long_preset is not None:
        long_graphs = {kind: gene_graph(kind, long_n_genes, 16, seed) for kind in ("window", "simulated")}
        sections.append(
            _measure_section(
                long_preset, long_n_genes, long_batch_size, long_graphs, False, warmup, max(2, repeats // 2), seed
            )
        )
    results = {"benchmark": "inference", "machine": info, "sections": sections}
    _plot(output_dir, results)
    write_results(output_dir, "inference", results, _markdown(results))
    return results


def _markdown(results: dict) -> str:
    parts = []
    for section in results["sections"]:
        config = section["config"]
        rows = [
            [
                name,
                f"{row['cells_per_s']:,.1f} ({row['cells_per_s_min']:,.1f}–{row['cells_per_s_max']:,.1f})",
                f"{row['ms_per_cell']:.2f}",
                f"{row['gflops']:.1f} ({100 * row['fraction_of_gemm']:.0f}%)",
                f"{row['speedup_vs_bert']:.2f}×",
                "–" if row["first_call_s"] is None else f"{row['first_call_s']:.1f}",
            ]
            for name, row in section["models"].items()
        ]
        parts.append(
            f"### Inference, {section['preset']} preset (d {config['d_model']}, depth {config['depth']}, "
            f"{config['n_heads']} heads, FFN {config['intermediate_size']}, k = {config['knn_k']}), "
            f"{section['n_genes']:,} genes, batch {section['batch_size']}\n\n"
            + markdown_table(
                ["model", "cells/s median (min–max)", "ms/cell", "GFLOP/s (% of GEMM)", "vs BertModel", "first call s"], rows
            )
            + f"\nfp32 GEMM {section['gemm']['size']}³ in the same loop: "
            f"{section['gemm']['gflops_median']:.1f} GFLOP/s. "
            f"{section['repeats']} repeats after {section['warmup']} warm-up, models interleaved.\n"
        )
    return "\n".join(parts) + (
        f"\n{conditions_line(results['machine'])}. Window graph: each gene's neighbours are nearby panel "
        "positions (a fresh model's default). Simulated graph: the processor's cosine kNN graph of simulated "
        "cells, whose many noise genes have near-random neighbours. FLOPs count projections, feed-forward and "
        "the attention's useful pairs only. Every scRNA model runs with the defaults a user gets: layers compiled "
        "with torch.compile around the C kNN kernels where the CPU has AVX-512 and a C compiler is found (the "
        "first call, which compiles, is timed separately as 'first call s' and left out of the medians) and, "
        "without gradients, cells taken in cache-sized chunks of the batch; the eager row shows the same knn "
        "model in eager PyTorch (kernel_implementation='eager'). The BERT peer runs as transformers ships it, "
        "eager, whole batch.\n"
    )


def _plot(output_dir: str | Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = results["sections"]
    figure, axes = plt.subplots(1, len(sections), figsize=(4.5 * len(sections), 4), squeeze=False)
    for axis, section in zip(axes[0], sections):
        names = list(section["models"])
        rows = [section["models"][name] for name in names]
        values = [row["cells_per_s"] for row in rows]
        errors = [
            [v - row["cells_per_s_min"] for v, row in zip(values, rows)],
            [row["cells_per_s_max"] - v for v, row in zip(values, rows)],
        ]
        axis.bar(range(len(names)), values, yerr=errors, color=[f"C{MODEL_ORDER.index(name)}" for name in names])
        axis.set_xticks(range(len(names)), [name.replace(" (", "\n(") for name in names], fontsize=7, rotation=30)
        axis.set_yscale("log")
        axis.set_ylabel("cells per second")
        axis.set_title(f"{section['preset']}, {section['n_genes']:,} genes, batch {section['batch_size']}", fontsize=9)
    figure.tight_layout()
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    figure.savefig(Path(output_dir) / "inference.png", dpi=120)
    plt.close(figure)
