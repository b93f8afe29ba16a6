"""RNA + protein (CITE-seq) measured on simulated cells: protein prediction and classification.

Cells are simulated with a protein panel (``simulate(..., n_proteins=P)``: each protein reads
module genes through a known linear, switch-like or complex (minimum of two genes) function,
and a few proteins also carry a hidden state no gene sees; see ``scrnalf_hf.data.simulation``)
and measured through the commands a user runs, on the same folds for every method:

1. protein prediction from RNA (held-out cells)::

       scrnalf compare --task protein --protein-key protein --methods <preset>,ridge --cv K

   median over proteins of the Pearson correlation, and RMSE (CLR units), beside ridge
   regression on the same processor output;

2. classification of ``cell_subtype`` (cell type × the hidden protein state) from RNA + protein
   and from RNA alone::

       scrnalf compare --label-key cell_subtype --protein-key protein --methods <preset>,logreg --cv K
       scrnalf compare --label-key cell_subtype --methods <preset>,logreg --cv K

   (with ``--protein-key``, logistic regression reads the CLR proteins beside the RNA too);

Writes ``OUTPUT_DIR/protein/``, ``OUTPUT_DIR/classification_rna_protein/`` and
``OUTPUT_DIR/classification_rna/`` (each ``comparison.json`` / ``.md`` / ``.png``) and
``OUTPUT_DIR/multimodal.json`` / ``multimodal.md`` with every figure, the acceptance checks and
the command line. Simulated data: these figures show that the mechanics work, not how well real
proteins are predicted.

    python scripts/multimodal.py --output-dir benchmarks/multimodal
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

from scrnalf_cli import main as scrnalf

# A CITE-seq-like simulation whose RNA says enough about the module programmes that proteins
# read: 5 modules of ~30 genes each, 5,000 counts per cell, mild overdispersion and dropout.
SIMULATION = {"n_modules": 5, "nb_theta": 20.0, "dropout": 0.1, "mean_library_size": 5000.0}


def _run(argv: list, what: str) -> float:
    argv = [str(a) for a in argv]
    started = time.perf_counter()
    if scrnalf(argv) != 0:
        raise SystemExit(f"scrnalf {' '.join(argv)} failed")
    seconds = time.perf_counter() - started
    print(f"  {what}: scrnalf {argv[0]} {seconds:.0f} s", flush=True)
    return seconds


def _run_folds_in_parallel(argv: list, folds: list[int], jobs: int, target: Path, task_name: str, what: str) -> float:
    """``scrnalf compare ARGV --folds f`` for each fold as its own process (``jobs`` at a time),
    then their rows merged into ``target/comparison.json`` / ``.md`` / ``.png`` — the same
    folds (``--cv`` and ``--seed`` fix them), one process per fold."""
    import subprocess

    from scrnalf_hf.training.compare import comparison_table, plot_comparison
    from scrnalf_hf.training.tasks import get_task

    started = time.perf_counter()
    pending, running, rows = list(folds), [], []
    while pending or running:
        while pending and len(running) < jobs:
            fold = pending.pop(0)
            command = [sys.executable, "-m", "scrnalf_cli", *map(str, argv), "--folds", str(fold),
                       "--output-dir", str(target / f"fold{fold}")]
            running.append((fold, subprocess.Popen(command, stdout=subprocess.DEVNULL)))
        time.sleep(5)
        for fold, process in list(running):
            if process.poll() is not None:
                running.remove((fold, process))
                if process.returncode != 0:
                    raise SystemExit(f"{' '.join(map(str, argv))} --folds {fold} failed")
                rows += json.loads((target / f"fold{fold}" / "comparison.json").read_text())
    rows.sort(key=lambda row: row["fold"])
    task = get_task(task_name)
    (target / "comparison.json").write_text(json.dumps(rows, indent=2) + "\n")
    title = f"{what}, folds {folds} (one process each)"
    (target / "comparison.md").write_text(comparison_table(rows, task, title=title))
    plot_comparison(rows, task, target / "comparison.png", title=title)
    for fold in folds:
        shutil.rmtree(target / f"fold{fold}", ignore_errors=True)
    seconds = time.perf_counter() - started
    print(f"  {what}: {len(folds)} folds in parallel, {seconds:.0f} s", flush=True)
    return seconds


def _mean(rows: list[dict], method: str, metric: str) -> float:
    return statistics.fmean(float(r[metric]) for r in rows if r["method"] == method)


def _by_fold(rows: list[dict], method: str, metric: str) -> dict[int, float]:
    return {int(r["fold"]): float(r[metric]) for r in rows if r["method"] == method}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--n-cells", type=int, default=1000)
    parser.add_argument("--n-genes", type=int, default=300)
    parser.add_argument("--n-proteins", type=int, default=24)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--cv", type=int, default=5)
    parser.add_argument("--folds", default=None, help="score only these folds, e.g. 0,1 (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train-epochs", type=float, default=None, help="default: each task's recipe")
    parser.add_argument("--skip-classification", action="store_true")
    parser.add_argument("--classification-folds", default=None,
                        help="score the two classifications on only these folds of the same --cv split (default: --folds)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="run each comparison's folds as this many parallel processes (same folds, merged rows)")
    args, trainer_flags = parser.parse_known_args(argv)
    if args.num_train_epochs is not None:
        trainer_flags = ["--num_train_epochs", str(args.num_train_epochs), *trainer_flags]
    fold_numbers = [int(f) for f in args.folds.split(",")] if args.folds else list(range(args.cv))
    classification_folds = (
        [int(f) for f in args.classification_folds.split(",")] if args.classification_folds else fold_numbers
    )
    from scrnalf_hf.data import simulate

    output = args.output_dir
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="scrnalf-multimodal-") as work:
        data = Path(work) / "cite.h5ad"
        adata = simulate(args.n_cells, args.n_genes, seed=args.seed, n_proteins=args.n_proteins, **SIMULATION)
        adata.write_h5ad(data)
        common = ["--train-file", data, "--cv", args.cv, "--seed", args.seed, "--disable-tqdm", "true", *trainer_flags]
        runs = {}
        for name, task_args, methods in (
            ("protein", ["--task", "protein", "--protein-key", "protein"], f"{args.preset},ridge"),
            ("classification_rna_protein", ["--label-key", "cell_subtype", "--protein-key", "protein"], f"{args.preset},logreg"),
            ("classification_rna", ["--label-key", "cell_subtype"], f"{args.preset},logreg"),
        ):
            if name.startswith("classification") and args.skip_classification:
                continue
            target = output / name
            if target.exists():
                shutil.rmtree(target)
            compare_argv = ["compare", *task_args, "--methods", methods, *common]
            chosen = fold_numbers if name == "protein" else classification_folds
            if args.jobs > 1:
                task_name = "protein" if name == "protein" else "classification"
                seconds = _run_folds_in_parallel(compare_argv, chosen, args.jobs, target, task_name, name)
            else:
                only = ["--folds", ",".join(map(str, chosen))] if chosen != list(range(args.cv)) else []
                seconds = _run([*compare_argv, *only, "--output-dir", target], name)
            runs[name] = {"seconds": seconds, "rows": json.loads((target / "comparison.json").read_text())}
            shutil.rmtree(target / "runs", ignore_errors=True)  # the fitted models: large, and not results

    preset = args.preset
    protein_rows = runs["protein"]["rows"]
    model_folds, ridge_folds = _by_fold(protein_rows, preset, "pearson_median"), _by_fold(protein_rows, "ridge", "pearson_median")
    summary = {
        "command": "python scripts/multimodal.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "data": {"n_cells": args.n_cells, "n_genes": args.n_genes, "n_proteins": args.n_proteins, "seed": args.seed,
                 "simulation": SIMULATION, "cv": args.cv, "folds": fold_numbers, "classification_folds": classification_folds},
        "protein": {
            "rows": protein_rows,
            preset: {"pearson_median": _mean(protein_rows, preset, "pearson_median"), "rmse": _mean(protein_rows, preset, "rmse")},
            "ridge": {"pearson_median": _mean(protein_rows, "ridge", "pearson_median"), "rmse": _mean(protein_rows, "ridge", "rmse")},
            "seconds": runs["protein"]["seconds"],
        },
        "acceptance": {
            "protein_pearson_median_at_least_0.8": _mean(protein_rows, preset, "pearson_median") >= 0.8,
            "protein_above_ridge_on_every_fold": all(model_folds[f] > ridge_folds[f] for f in model_folds),
        },
        "seconds": time.perf_counter() - started,
    }
    if not args.skip_classification:
        both, rna = runs["classification_rna_protein"]["rows"], runs["classification_rna"]["rows"]
        summary["classification"] = {
            "rna_protein": {m: {k: _mean(both, m, k) for k in ("accuracy", "macro_f1")} for m in (preset, "logreg")},
            "rna": {m: {k: _mean(rna, m, k) for k in ("accuracy", "macro_f1")} for m in (preset, "logreg")},
            "rows_rna_protein": both,
            "rows_rna": rna,
        }
        summary["acceptance"]["classification_rna_protein_at_least_rna_only"] = (
            _mean(both, preset, "macro_f1") >= _mean(rna, preset, "macro_f1")
        )
    (output / "multimodal.json").write_text(json.dumps(summary, indent=2) + "\n")
    (output / "multimodal.md").write_text(_report(summary, preset))
    print((output / "multimodal.md").read_text())
    return 0


def _report(summary: dict, preset: str) -> str:
    data = summary["data"]
    protein = summary["protein"]
    lines = [
        f"Simulated CITE-seq: {data['n_cells']:,} cells × {data['n_genes']} genes, {data['n_proteins']} proteins, seed "
        f"{data['seed']}, {data['cv']}-fold CV (protein: folds {data['folds']}; classification: folds "
        f"{data['classification_folds']}); held-out cells, mean over folds. Simulated data: mechanics, not biology.",
        "",
        "| task | method | metric | value |",
        "| --- | --- | --- | --- |",
        f"| protein from RNA | {preset} preset | median Pearson r / RMSE (CLR) | {protein[preset]['pearson_median']:.3f} / "
        f"{protein[preset]['rmse']:.3f} |",
        f"| protein from RNA | ridge regression | median Pearson r / RMSE (CLR) | {protein['ridge']['pearson_median']:.3f} / "
        f"{protein['ridge']['rmse']:.3f} |",
    ]
    if "classification" in summary:
        c = summary["classification"]
        for inputs, label in (("rna_protein", "RNA + protein"), ("rna", "RNA only")):
            baseline = f"logistic regression ({label}: the same inputs)"
            for method, name in ((preset, f"{preset} preset"), ("logreg", baseline)):
                lines.append(
                    f"| cell_subtype from {label} | {name} | accuracy / macro-F1 | {c[inputs][method]['accuracy']:.3f} / "
                    f"{c[inputs][method]['macro_f1']:.3f} |"
                )
    lines += ["", "Per fold, protein prediction (median Pearson r):", "", "| fold | " + preset + " | ridge |", "| --- | --- | --- |"]
    model_folds = _by_fold(protein["rows"], preset, "pearson_median")
    ridge_folds = _by_fold(protein["rows"], "ridge", "pearson_median")
    lines += [f"| {f} | {model_folds[f]:.3f} | {ridge_folds[f]:.3f} |" for f in sorted(model_folds)]
    lines += ["", "Acceptance:", ""]
    lines += [f"- {name}: {'yes' if passed else 'NO'}" for name, passed in summary["acceptance"].items()]
    lines += ["", f"Command ({summary['seconds']:.0f} s): `{summary['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
