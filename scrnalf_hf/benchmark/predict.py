"""``scrnalf predict`` over large files: cells/s and peak memory of the streamed command.

A simulated ``.h5ad`` of each size is written once (kept in ``output_dir/predict_work`` for
reuse), a tiny-preset classifier with the simulated gene panel is saved beside it, and
``predict_file`` runs on each file in a fresh process whose peak resident memory (that process
and its children) is sampled throughout. Bounded memory means the peak at ``n_cells`` stays
close to the peak at ``compare_cells``: the file is read and written chunk by chunk.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

from ..machine import PeakMemory
from .harness import conditions_line, machine_info, set_threads, write_results
from .targets import markdown_table


def _classifier_folder(h5ad_path: Path, folder: Path, seed: int) -> Path:
    """A tiny classifier (random weights: this measures the command, not the model) whose
    panel is the simulated file's genes, saved as a model folder."""
    if (folder / "config.json").is_file():
        return folder
    from ..configuration_scrnalf import ScrnaLongformerConfig
    from ..data.anndata_io import open_anndata
    from ..hub.folder import save_hub_folder
    from ..processing_scrnalf import ScrnaLongformerProcessor
    from ..training.tasks import CLASSIFICATION

    with open_anndata(h5ad_path) as source:
        processor = ScrnaLongformerProcessor(gene_symbols=source.gene_symbols, gene_ids=source.gene_ids, layer="X")
        names = sorted(source.obs["cell_type"].astype(str).unique())
    config = ScrnaLongformerConfig.from_preset(
        "tiny", n_genes=processor.n_genes, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}
    )
    save_hub_folder(CLASSIFICATION.model_class(config), processor, folder)
    return folder


def _predict_in_child(model_dir: str, h5ad_path: str, output: str, batch_size: int, threads: int, results) -> None:
    from ..inference import predict_file

    set_threads(threads)
    started = time.perf_counter()
    predict_file(model_dir, h5ad_path, output, batch_size=batch_size, overwrite=True)
    results.put({"seconds": time.perf_counter() - started})


def _measure(model_dir: Path, h5ad_path: Path, output: Path, batch_size: int, threads: int) -> dict:
    context = mp.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=_predict_in_child, args=(str(model_dir), str(h5ad_path), str(output), batch_size, threads, results))
    child.start()
    with PeakMemory(child.pid) as peak:
        child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"the predict process failed with exit code {child.exitcode}; see its traceback above.")
    return {**results.get(), "peak_rss_mb": round(peak.bytes / 2**20, 1)}


def benchmark_predict(
    output_dir: str | Path,
    n_cells: int = 1_000_000,
    n_genes: int = 1000,
    compare_cells: int = 100_000,
    batch_size: int = 512,
    threads: int = 2,
    seed: int = 0,
) -> dict:
    """Stream ``predict`` over simulated files of ``compare_cells`` and ``n_cells`` cells."""
    from ..data.simulation import write_simulated_h5ad

    set_threads(threads)
    info = machine_info()
    workdir = Path(output_dir) / "predict_work"
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in [n for n in (compare_cells, n_cells) if n]:
        h5ad_path = workdir / f"simulated_{size}x{n_genes}_seed{seed}.h5ad"
        if not h5ad_path.exists():
            partial = h5ad_path.with_suffix(".partial")
            write_simulated_h5ad(partial, size, n_genes, seed=seed)
            partial.rename(h5ad_path)
        model_dir = _classifier_folder(h5ad_path, workdir / f"tiny_{n_genes}", seed)
        output = workdir / f"predicted_{size}.h5ad"
        measured = _measure(model_dir, h5ad_path, output, batch_size, threads)
        output.unlink()
        rows.append({"n_cells": size, "cells_per_s": round(size / measured["seconds"]), **measured,
                     "input_mb": round(h5ad_path.stat().st_size / 2**20, 1)})
    results = {"benchmark": "predict", "machine": info, "n_genes": n_genes, "batch_size": batch_size, "runs": rows}
    if len(rows) == 2:
        results["peak_rss_ratio"] = round(rows[1]["peak_rss_mb"] / rows[0]["peak_rss_mb"], 3)
    markdown = (
        f"### predict, streamed (tiny preset, simulated cells × {n_genes:,} genes, chunks of {batch_size})\n\n"
        + markdown_table(
            ["cells", "cells/s", "seconds", "peak RSS (MB)", "input (MB)"],
            [[f"{r['n_cells']:,}", f"{r['cells_per_s']:,}", f"{r['seconds']:.0f}", f"{r['peak_rss_mb']:.0f}", f"{r['input_mb']:.0f}"] for r in rows],
        )
        + (f"\nPeak memory ratio {rows[-1]['n_cells']:,} / {rows[0]['n_cells']:,} cells: {results['peak_rss_ratio']:.2f}.\n" if len(rows) == 2 else "")
        + f"\n{conditions_line(info)}.\n"
    )
    write_results(output_dir, "predict", results, markdown)
    print(markdown)
    return results


__all__ = ["benchmark_predict"]
