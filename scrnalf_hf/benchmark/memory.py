"""Scaling with the gene panel: time per cell and peak memory of one forward pass from 1,000 to
16,000 genes, for ``knn`` and its baselines (``dense``, ``linear``, the BERT peer).

Times are measured in this process, all models interleaved at each panel size, with the same
number of tokens per batch at every size (so that small panels do not get a cache advantage).
Peak memory is measured in a fresh subprocess per (model, panel size): the highest resident set
sampled every millisecond during the first forward of one cell minus the resident set just before it. That
counts every allocation (including the attention's temporaries) and nothing left over from
another model. The probe runs the eager kernels (``kernel_implementation="eager"``): they
materialise every intermediate the compiled kernels fuse away, so the figure is an upper bound,
and no compiler runs inside the measured forward.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import psutil
import torch

from ..machine import PeakMemory
from .harness import (
    bert_peer,
    conditions_line,
    forward_functions,
    gene_graph,
    machine_info,
    scrnalf_model,
    set_threads,
    time_interleaved,
    write_results,
)
from .targets import markdown_table

# name -> (attention type or "bert", graph)
MODELS = {
    "knn (simulated graph)": ("knn", "simulated"),
    "knn (window graph)": ("knn", "window"),
    "linear": ("linear", "window"),
    "dense (same graph)": ("dense", "simulated"),
    "BertModel SDPA peer": ("bert", None),
}


def _build(name: str, preset: str, n_genes: int, graph: torch.Tensor | None, kernel_implementation: str = "compiled"):
    attention_type, _ = MODELS[name]
    if attention_type == "bert":
        return bert_peer(scrnalf_model(preset, n_genes, "linear").config, n_genes + 1)
    return scrnalf_model(preset, n_genes, attention_type, graph, kernel_implementation=kernel_implementation)


def benchmark_memory(
    output_dir: str | Path,
    preset: str = "default",
    gene_counts: tuple[int, ...] = (1000, 2000, 4000, 8000, 16000),
    tokens_per_batch: int = 64_000,
    dense_max_genes: int = 4000,
    models: tuple[str, ...] | None = None,
    warmup: int = 1,
    repeats: int = 3,
    threads: int = 2,
    seed: int = 0,
) -> dict:
    """Time per cell and forward peak memory of each model at each panel size (same batch size
    throughout). ``dense`` builds a (1 + G)² mask, so it stops at ``dense_max_genes``.
    ``models`` picks a subset of :data:`MODELS` (default: all)."""
    set_threads(threads)
    info = machine_info()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for n_genes in gene_counts:
            names = [
                name for name in (models or MODELS) if not (MODELS[name][0] == "dense" and n_genes > dense_max_genes)
            ]
            graphs = {
                kind: gene_graph(kind, n_genes, 16, seed) for kind in {MODELS[name][1] for name in names} - {None}
            }
            built = {name: _build(name, preset, n_genes, graphs.get(MODELS[name][1])) for name in names}
            config = scrnalf_model(preset, n_genes, "knn").config
            batch_size = max(1, tokens_per_batch // n_genes)
            timings = time_interleaved(forward_functions(built, config, batch_size, seed), warmup, repeats)
            del built
            for name in names:
                graph_path = Path(scratch) / f"graph_{n_genes}_{MODELS[name][1]}.npy"
                if MODELS[name][1] is not None:
                    np.save(graph_path, graphs[MODELS[name][1]].numpy())
                peak = _peak_memory_in_subprocess(name, preset, n_genes, 1, graph_path, threads)
                rows.append(
                    {
                        "model": name,
                        "n_genes": n_genes,
                        "batch_size": batch_size,
                        "ms_per_cell": 1e3 * timings[name]["median_s"] / batch_size,
                        "ms_per_cell_min": 1e3 * timings[name]["min_s"] / batch_size,
                        "ms_per_cell_max": 1e3 * timings[name]["max_s"] / batch_size,
                        "peak_forward_mb": peak,
                    }
                )
    results = {
        "benchmark": "memory",
        "machine": info,
        "preset": preset,
        "tokens_per_batch": tokens_per_batch,
        "gene_counts": list(gene_counts),
        "repeats": repeats,
        "rows": rows,
        "growth": _growth(rows, gene_counts),
    }
    _plot(output_dir, results)
    write_results(output_dir, "memory", results, _markdown(results))
    return results


def _growth(rows: list[dict], gene_counts) -> dict:
    """Per model: time per cell and peak memory at the largest panel over the smallest."""
    growth = {}
    for name in MODELS:
        mine = {row["n_genes"]: row for row in rows if row["model"] == name}
        low, high = min(gene_counts), max(mine, default=None)
        if high is None or high == low or low not in mine:
            continue
        growth[name] = {
            "from_genes": low,
            "to_genes": high,
            "genes_ratio": high / low,
            "time_ratio": mine[high]["ms_per_cell"] / mine[low]["ms_per_cell"],
            "memory_ratio": mine[high]["peak_forward_mb"] / max(mine[low]["peak_forward_mb"], 1e-9),
        }
    return growth


def _peak_memory_in_subprocess(name, preset, n_genes, batch_size, graph_path, threads) -> float:
    command = [
        sys.executable,
        "-m",
        "scrnalf_hf.benchmark.memory",
        "--probe",
        name,
        "--preset",
        preset,
        "--n-genes",
        str(n_genes),
        "--batch-size",
        str(batch_size),
        "--graph-path",
        str(graph_path),
        "--threads",
        str(threads),
    ]
    finished = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(finished.stdout.strip().splitlines()[-1])["peak_forward_mb"]


def _probe(args) -> None:
    """Subprocess entry: build one model, run one forward, print the peak RSS growth in MB."""
    set_threads(args.threads)
    graph = torch.from_numpy(np.load(args.graph_path)) if Path(args.graph_path).exists() else None
    # Eager kernels: they materialise every intermediate, so their peak bounds the compiled
    # kernels' from above, and no compiler runs inside the measured forward.
    model = _build(args.probe, args.preset, args.n_genes, graph, kernel_implementation="eager")
    config = scrnalf_model(args.preset, args.n_genes, "linear").config
    forward = forward_functions({args.probe: model}, config, args.batch_size)[args.probe]
    process = psutil.Process()
    before = process.memory_info().rss
    with PeakMemory(interval=0.001) as peak:
        forward()
    print(json.dumps({"peak_forward_mb": (max(peak.bytes, process.memory_info().rss) - before) / 2**20}))


def _markdown(results: dict) -> str:
    rows = [
        [
            row["model"],
            f"{row['n_genes']:,}",
            row["batch_size"],
            f"{row['ms_per_cell']:.2f}",
            f"{row['peak_forward_mb']:.1f}",
        ]
        for row in results["rows"]
    ]
    growth_rows = [
        [
            name,
            f"{g['from_genes']:,} → {g['to_genes']:,} ({g['genes_ratio']:.0f}×)",
            f"{g['time_ratio']:.1f}×",
            f"{g['memory_ratio']:.1f}×",
        ]
        for name, g in results["growth"].items()
    ]
    return (
        f"### Scaling with the gene panel ({results['preset']} preset, forward, "
        f"{results['tokens_per_batch']:,} tokens per batch)\n\n"
        + markdown_table(["model", "genes", "batch", "ms per cell (median)", "one-cell forward peak memory (MB)"], rows)
        + "\n"
        + markdown_table(["model", "genes", "time per cell grows", "peak memory grows"], growth_rows)
        + f"\nTimes: compiled kernels (the default), after a warm-up call that compiles them. Peak memory: growth "
        "of the resident set during a one-cell forward of the eager kernels, which materialise what the compiled "
        "ones fuse (an upper bound), in a fresh process. "
        f"{conditions_line(results['machine'])}.\n"
    )


def _plot(output_dir: str | Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for index, name in enumerate(MODELS):
        mine = [row for row in results["rows"] if row["model"] == name]
        if not mine:
            continue
        genes = [row["n_genes"] for row in mine]
        time_axis.errorbar(
            genes,
            [row["ms_per_cell"] for row in mine],
            yerr=[
                [row["ms_per_cell"] - row["ms_per_cell_min"] for row in mine],
                [row["ms_per_cell_max"] - row["ms_per_cell"] for row in mine],
            ],
            marker="o",
            label=name,
            color=f"C{index}",
        )
        memory_axis.plot(
            genes, [max(row["peak_forward_mb"], 0.1) for row in mine], marker="o", label=name, color=f"C{index}"
        )
    for axis, label in ((time_axis, "ms per cell"), (memory_axis, "forward peak memory (MB)")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("genes (tokens − 1)")
        axis.set_ylabel(label)
    time_axis.legend(fontsize=8)
    figure.suptitle(f"Scaling, {results['preset']} preset, {results['tokens_per_batch']:,} tokens per batch")
    figure.tight_layout()
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    figure.savefig(Path(output_dir) / "memory.png", dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="peak-memory probe (internal)")
    parser.add_argument("--probe", required=True, choices=list(MODELS))
    parser.add_argument("--preset", default="default")
    parser.add_argument("--n-genes", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--graph-path", required=True)
    parser.add_argument("--threads", type=int, default=2)
    _probe(parser.parse_args())
