"""AnnData → ``datasets`` conversion throughput: runs the data package's
:func:`scrnalf_hf.data.benchmark.benchmark_convert` and writes its figures as JSON, Markdown and
a plot like the other benchmarks."""

from __future__ import annotations

from pathlib import Path

from .harness import conditions_line, machine_info, markdown_table, set_threads, write_results


def benchmark_convert_run(
    output_dir: str | Path,
    n_cells: int = 200_000,
    n_genes: int = 2_000,
    num_proc: int = 1,
    threads: int = 2,
    seed: int = 0,
) -> dict:
    """Convert a simulated backed ``.h5ad`` of ``n_cells`` × ``n_genes`` and record the timing."""
    from ..data.benchmark import benchmark_convert

    set_threads(threads)
    info = machine_info()
    figures = benchmark_convert(
        n_cells=n_cells, n_genes=n_genes, output_dir=Path(output_dir) / "convert_work", num_proc=num_proc, seed=seed
    )
    results = {"benchmark": "convert", "machine": info, **figures}
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
