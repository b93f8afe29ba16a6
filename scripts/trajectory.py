"""Pseudotime regression measured on simulated linear and branching trajectories.

For each trajectory shape, cells are simulated with a known pseudotime (``simulate(...,
trajectory=True, trajectory_shape=...)``: ``t ~ U(0, 1)``; on the branching one each cell past
t = 0.5 takes one of two branches with genes of their own) and compared through the command a
user runs::

    scrnalf compare --task trajectory --time-key pseudotime --methods <preset>,ridge --cv K \
        --root-cell <the cell of smallest pseudotime>

so that on the same K folds the transformer preset, ridge regression (the same processor output)
and scanpy's diffusion pseudotime (unsupervised, from the named root cell, mapped to the
training times by a line) are scored on held-out cells: Spearman correlation with the true
pseudotime and mean absolute error. Writes per shape ``OUTPUT_DIR/<shape>/comparison.json``,
``comparison.md``, ``comparison.png`` and ``scatter.png`` (out-of-fold predicted against true
pseudotime, per method), and ``OUTPUT_DIR/trajectory.json`` / ``trajectory.md`` with every
figure and the command line. Simulated data: these figures show that the mechanics work, not
how well real trajectories are recovered.

    python scripts/trajectory.py --output-dir benchmarks/trajectory
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from scrnalf_cli import main as scrnalf

SHAPES = ("linear", "branching")
METHODS_SHOWN = {"ridge": "ridge regression", "diffusion_pseudotime": "diffusion pseudotime (DPT)"}


def _compare(work: Path, shape: str, args) -> tuple[Path, dict]:
    from scrnalf_hf.data import simulate

    adata = simulate(args.n_cells, args.n_genes, seed=args.seed, trajectory=True, trajectory_shape=shape)
    data = work / f"{shape}.h5ad"
    adata.write_h5ad(data)
    root = str(adata.obs_names[int(np.argmin(adata.obs["pseudotime"].to_numpy()))])
    output = work / shape
    argv = ["compare", "--train-file", data, "--task", "trajectory", "--time-key", "pseudotime",
            "--methods", f"{args.preset},ridge", "--cv", args.cv, "--root-cell", root, "--seed", args.seed,
            "--output-dir", output, "--disable-tqdm", "true", *args.trainer_flags]
    started = time.perf_counter()
    if scrnalf([str(a) for a in argv]) != 0:
        raise SystemExit(f"scrnalf {' '.join(map(str, argv))} failed")
    seconds = time.perf_counter() - started
    print(f"  {shape}: scrnalf compare {seconds:.0f} s", flush=True)
    info = {"root_cell": root, "seconds": seconds, "branch": adata.obs.get("branch")}
    return output, info


def _scatter(output: Path, path: Path, shape: str, branch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    predicted = np.load(output / "comparison_predictions.npz")
    truth = predicted["labels"]
    rows = json.loads((output / "comparison.json").read_text())
    methods = list(dict.fromkeys(row["method"] for row in rows))
    figure, axes = plt.subplots(1, len(methods), figsize=(4 * len(methods), 4), squeeze=False)
    colours = None
    if branch is not None:
        palette = {"stem": "#636363", "branch_a": "#e6550d", "branch_b": "#3182bd"}
        colours = [palette[b] for b in np.asarray(branch)]
    for axis, method in zip(axes[0], methods):
        values = predicted[method]
        spearman = statistics.fmean(row["spearman"] for row in rows if row["method"] == method)
        axis.scatter(truth, values, s=3, alpha=0.5, c=colours if colours is not None else "#3182bd", linewidths=0)
        axis.plot([0, 1], [0, 1], color="black", lw=0.8, ls="--")
        axis.set_title(f"{method}\nSpearman {spearman:.3f} (mean of folds)", fontsize=9)
        axis.set_xlabel("true pseudotime")
        axis.set_ylabel("predicted (held-out cells)")
    if colours is not None:
        for name, colour in palette.items():
            axes[0][0].scatter([], [], c=colour, s=10, label=name)
        axes[0][0].legend(fontsize=7, loc="upper left")
    figure.suptitle(f"simulated {shape} trajectory: out-of-fold pseudotime", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _summary(rows: list[dict]) -> dict:
    summary = {}
    for method in dict.fromkeys(row["method"] for row in rows):
        chosen = [row for row in rows if row["method"] == method]
        entry = {}
        for name in ("spearman", "mae", "train_seconds"):
            values = [float(row[name]) for row in chosen]
            entry[name] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                           "folds": values}
        entry["n_parameters"] = int(chosen[0]["n_parameters"])
        summary[method] = entry
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--n-cells", type=int, default=2000)
    parser.add_argument("--n-genes", type=int, default=500)
    parser.add_argument("--cv", type=int, default=3)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated: linear, branching")
    args, args.trainer_flags = parser.parse_known_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    command = "python scripts/trajectory.py " + " ".join(sys.argv[1:] if argv is None else argv)
    measured = {}
    with tempfile.TemporaryDirectory(prefix="scrnalf-trajectory-") as work:
        for shape in args.shapes.split(","):
            compared, info = _compare(Path(work), shape, args)
            folder = output_dir / shape
            folder.mkdir(exist_ok=True)
            for name in ("comparison.json", "comparison.md", "comparison.png"):
                shutil.copy(compared / name, folder / name)
            _scatter(compared, folder / "scatter.png", shape, info["branch"])
            rows = json.loads((compared / "comparison.json").read_text())
            measured[shape] = {
                "command": command, "n_cells": args.n_cells, "n_genes": args.n_genes, "cv": args.cv, "seed": args.seed,
                "preset": args.preset, "trainer_flags": args.trainer_flags, "root_cell": info["root_cell"],
                "compare_seconds": info["seconds"], "methods": _summary(rows),
            }
    # shapes run separately (e.g. in parallel, --shapes linear / --shapes branching) add to one record
    record = output_dir / "trajectory.json"
    results = json.loads(record.read_text()) if record.is_file() else {"datasets": {}}
    results["datasets"].update(measured)
    record.write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "Simulated trajectories, held-out cells of k-fold CV (mean ± std over folds); each row's command below. "
        "Simulated data: mechanics, not biology.",
        "",
        "| trajectory | method | Spearman | MAE | train s | parameters |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for shape, entry in results["datasets"].items():
        for method, values in entry["methods"].items():
            name = METHODS_SHOWN.get(method, f"{method} preset")
            lines.append(
                f"| {shape} | {name} | {values['spearman']['mean']:.3f} ± {values['spearman']['std']:.3f} | "
                f"{values['mae']['mean']:.3f} ± {values['mae']['std']:.3f} | {values['train_seconds']['mean']:.1f} | "
                f"{values['n_parameters']:,} |"
            )
    lines.append("")
    for shape, entry in results["datasets"].items():
        lines.append(f"- {shape}: {entry['n_cells']:,} cells × {entry['n_genes']} genes, seed {entry['seed']}, "
                     f"{entry['cv']}-fold CV, root cell {entry['root_cell']}, {entry['compare_seconds']:.0f} s: "
                     f"`{entry['command']}`")
    table = "\n".join(lines) + "\n"
    (output_dir / "trajectory.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
