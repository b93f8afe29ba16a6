"""Conversion benchmark: simulated backed ``.h5ad`` → ``datasets`` folder, cells/s and peak RSS.

Run ``python -m scrnalf_hf.data.benchmark --cells 200000 --genes 2000 --compare-cells 50000``.
Each conversion runs in a fresh process so that its peak resident memory is its own; the peak
is sampled (psutil, every 20 ms) over that process and any workers it starts. The simulated
input is written once per size and seed and reused (``output_dir``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil

from .convert import DEFAULT_CHUNK_SIZE
from .simulate import write_simulated_h5ad

_SAMPLE_SECONDS = 0.02


def _tree_rss(process: psutil.Process) -> int:
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def _convert_in_child(h5ad_path: str, output_dir: str, chunk_size: int, num_proc: int, results) -> None:
    from .convert import convert_anndata

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
    watched = psutil.Process(child.pid)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            try:
                peak = max(peak, _tree_rss(watched))
            except psutil.NoSuchProcess:
                return
            time.sleep(_SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    child.join()
    stop.set()
    sampler.join()
    if child.exitcode != 0:
        raise RuntimeError(f"the conversion process failed with exit code {child.exitcode}; see its traceback above.")
    outcome = results.get()
    return {**outcome, "peak_rss": peak}


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=200_000)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument(
        "--compare-cells", type=int, default=50_000, help="a smaller size to compare peak RSS with (0: skip)"
    )
    parser.add_argument("--num-proc", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--output-dir", default=None, help="keep and reuse the simulated inputs here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sizes = [n for n in (args.compare_cells, args.cells) if n]
    results = [
        benchmark_convert(
            n, args.genes, args.output_dir, chunk_size=args.chunk_size, num_proc=args.num_proc, seed=args.seed
        )
        for n in sizes
    ]
    for result in results:
        print(json.dumps(result))
        print(
            f"{result['n_cells']:>9,} cells × {result['n_genes']:,} genes: {result['cells_per_s']:,} cells/s "
            f"({result['seconds']:.1f} s wall; {result['cells_per_cpu_s']:,} cells per CPU-second), "
            f"peak RSS {result['peak_rss_mb']:,.0f} MiB"
        )
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if len(results) == 2:
        ratio = results[1]["peak_rss_mb"] / results[0]["peak_rss_mb"]
        print(f"peak RSS ratio {results[1]['n_cells']:,} / {results[0]['n_cells']:,} cells: {ratio:.2f}")


if __name__ == "__main__":
    main()
