"""AnnData → ``datasets`` conversion throughput and memory: a simulated backed ``.h5ad`` is
converted in a fresh process (so that its peak resident memory is its own, sampled over that
process and any workers it starts) and the figures are written as JSON, Markdown and a plot like
the other benchmarks. ``compare_cells`` converts a smaller size too: flat memory means the peak
does not grow with the number of cells.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import shutil
import tempfile
import time
from pathlib import Path

import psutil

from ..data.convert import DEFAULT_CHUNK_SIZE
from ..data.simulation import write_simulated_h5ad
from ..machine import PeakMemory
from .harness import conditions_line, machine_info, set_threads, write_results
from .targets import markdown_table


def _convert_in_child(h5ad_path: str, output_dir: str, chunk_size: int, num_proc: int, results) -> None:
    from ..data.convert import convert_anndata

    ready = psutil.Process().memory_info().rss
    cpu_before = _cpu_seconds()
    started = time.perf_counter()
    dataset = convert_anndata(
        h5ad_path, output_dir, label_key="cell_type", chunk_size=chunk_size, num_proc=num_proc, progress=False
    )
    results.put(
        {
            "seconds": time.perf_counter() - started,
            "cpu_seconds": _cpu_seconds() - cpu_before,
            "rss_after_imports": ready,
            "n_rows": len(dataset),
        }
    )


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished workers."""
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime


def _measure(h5ad_path: Path, output_dir: Path, chunk_size: int, num_proc: int) -> dict:
    context = mp.get_context("spawn")
    results = context.Queue()
    child = context.Process(
        target=_convert_in_child, args=(str(h5ad_path), str(output_dir), chunk_size, num_proc, results)
    )
    child.start()
    with PeakMemory(child.pid) as peak:
        child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"the conversion process failed with exit code {child.exitcode}; see its traceback above.")
    outcome = results.get()
    return {**outcome, "peak_rss": peak.bytes}


def benchmark_convert(
    n_cells: int = 200_000,
    n_genes: int = 2_000,
    output_dir: str | Path | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    num_proc: int = 1,
    seed: int = 0,
    keep_output: bool = False,
) -> dict:
    """Converts a simulated backed ``.h5ad`` of ``n_cells`` × ``n_genes`` and measures it.

    Args:
        n_cells, n_genes: size of the simulated input (raw counts, CSR).
        output_dir: folder for the simulated input (kept and reused between runs) and the
            converted dataset; a temporary folder, removed afterwards, if ``None``.
        chunk_size, num_proc: passed to :func:`~scrnalf_hf.data.convert.convert_anndata`.
        seed: simulator seed.
        keep_output: keep the converted dataset folder.

    Returns:
        ``{"n_cells", "n_genes", "num_proc", "chunk_size", "seconds", "cells_per_s", "cpu_seconds",
        "cells_per_cpu_s", "peak_rss_mb", "rss_after_imports_mb", "input_mb", "output_mb",
        "simulate_seconds"}``; ``seconds`` is the wall time of the conversion alone (not the
        simulation or the imports). ``cpu_seconds`` (user + system, workers included) shows the
        cost when other jobs share the machine and wall time is not representative.
    """
    workdir = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="scrnalf-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    h5ad_path = workdir / f"simulated_{n_cells}x{n_genes}_seed{seed}.h5ad"
    simulate_seconds = 0.0
    if not h5ad_path.exists():
        started = time.perf_counter()
        partial = h5ad_path.with_suffix(".partial")
        write_simulated_h5ad(partial, n_cells, n_genes, seed=seed)
        partial.rename(h5ad_path)
        simulate_seconds = time.perf_counter() - started
    dataset_dir = workdir / f"converted_{n_cells}x{n_genes}"
    shutil.rmtree(dataset_dir, ignore_errors=True)
    try:
        measured = _measure(h5ad_path, dataset_dir, chunk_size, num_proc)
        if measured["n_rows"] != n_cells:
            raise RuntimeError(f"converted {measured['n_rows']} rows for {n_cells} cells.")
        output_bytes = sum(f.stat().st_size for f in dataset_dir.iterdir())
    finally:
        if not keep_output:
            shutil.rmtree(dataset_dir, ignore_errors=True)
        if output_dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    mib = 1024**2
    return {
        "n_cells": n_cells,
        "n_genes": n_genes,
        "num_proc": num_proc,
        "chunk_size": chunk_size,
        "seconds": round(measured["seconds"], 3),
        "cells_per_s": round(n_cells / measured["seconds"]),
        "cpu_seconds": round(measured["cpu_seconds"], 3),
        "cells_per_cpu_s": round(n_cells / measured["cpu_seconds"]),
        "peak_rss_mb": round(measured["peak_rss"] / mib, 1),
        "rss_after_imports_mb": round(measured["rss_after_imports"] / mib, 1),
        "input_mb": round(h5ad_path.stat().st_size / mib, 1) if h5ad_path.exists() else None,
        "output_mb": round(output_bytes / mib, 1),
        "simulate_seconds": round(simulate_seconds, 1),
    }



def benchmark_convert_run(
    output_dir: str | Path,
    n_cells: int = 200_000,
    n_genes: int = 2_000,
    num_proc: int = 1,
    threads: int = 2,
    seed: int = 0,
    compare_cells: int = 50_000,
) -> dict:
    """Convert a simulated backed ``.h5ad`` of ``n_cells`` × ``n_genes`` (and of ``compare_cells``
    cells, unless 0) and record the timing and peak memory."""
    set_threads(threads)
    info = machine_info()
    workdir = Path(output_dir) / "convert_work"
    sizes = [n for n in (compare_cells, n_cells) if n and n != n_cells] + [n_cells]
    measured = [benchmark_convert(n, n_genes, workdir, num_proc=num_proc, seed=seed) for n in sizes]
    figures = measured[-1]
    results = {"benchmark": "convert", "machine": info, **figures}
    if len(measured) == 2:
        results["smaller"] = measured[0]
        results["peak_rss_ratio"] = round(figures["peak_rss_mb"] / measured[0]["peak_rss_mb"], 3)
    markdown = (
        f"### Conversion (simulated {figures['n_cells']:,} cells × {figures['n_genes']:,} genes, "
        f"{figures['num_proc']} process(es))\n\n"
        + markdown_table(
            ["cells/s (wall)", "cells per CPU-second", "seconds", "peak RSS (MB)", "output (MB)"],
            [
                [
                    f"{figures['cells_per_s']:,.0f}",
                    f"{figures['cells_per_cpu_s']:,.0f}",
                    f"{figures['seconds']:.1f}",
                    f"{figures['peak_rss_mb']:.0f}",
                    f"{figures['output_mb']:.0f}",
                ]
            ],
        )
        + (
            f"\nPeak memory at {results['smaller']['n_cells']:,} cells: {results['smaller']['peak_rss_mb']:.0f} MB "
            f"(ratio {results['peak_rss_ratio']:.2f}).\n" if "smaller" in results else ""
        )
        + f"\n{conditions_line(info)}.\n"
    )
    _plot(output_dir, figures)
    write_results(output_dir, "convert", results, markdown)
    return results


def _plot(output_dir: str | Path, figures: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (speed, memory) = plt.subplots(1, 2, figsize=(7, 3))
    speed.bar(["wall", "per CPU-s"], [figures["cells_per_s"], figures["cells_per_cpu_s"]], color=["C0", "C1"])
    speed.set_ylabel("cells per second")
    memory.bar(
        ["peak RSS", "input", "output"], [figures["peak_rss_mb"], figures["input_mb"], figures["output_mb"]], color="C2"
    )
    memory.set_ylabel("MB")
    figure.suptitle(f"Conversion of {figures['n_cells']:,} × {figures['n_genes']:,} simulated cells")
    figure.tight_layout()
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    figure.savefig(Path(output_dir) / "convert.png", dpi=120)
    plt.close(figure)
