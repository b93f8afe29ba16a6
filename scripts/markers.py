"""Do a cell classifier's most important genes include the textbook markers of each cell type?

On scanpy's bundled ``pbmc68k_reduced`` (700 human PBMCs, 765 genes, log-normalised ``.raw``,
cell types in ``bulk_labels``):

1. fine-tune a classifier through the command line (``scrnalf finetune``, the ``default`` preset
   with the demo's recipe and balanced class weights);
2. the top 20 genes of B cells (``CD19+ B``), CD14+ monocytes (``CD14+ Monocyte``) and NK cells
   (``CD56+ NK``) by integrated gradients (``top_genes``: mean attribution to the class's logit
   over the cells labelled so, from an all-unexpressed baseline);
3. beside them, the top 20 of logistic regression's coefficients (standardised normalised
   values, the same processor output) and of ``sc.tl.rank_genes_groups`` (Wilcoxon, one class
   against the rest) on the same cells;
4. which canonical markers each list holds (B: MS4A1, CD79A, CD79B; monocytes: CD14, LYZ,
   S100A8, S100A9, FCGR3A; NK: NKG7, GNLY, GZMB, KLRD1), counting only those in the 765-gene
   panel (CD14 and KLRD1 are not).

Results: ``OUTPUT_DIR/markers.json`` and ``.md``, and ``markers.png`` (the model's top genes).

    python scripts/markers.py --output-dir benchmarks/markers
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

CLASSES = {"B cells": "CD19+ B", "CD14+ monocytes": "CD14+ Monocyte", "NK cells": "CD56+ NK"}
CANONICAL_MARKERS = {
    "CD19+ B": ["MS4A1", "CD79A", "CD79B"],
    "CD14+ Monocyte": ["CD14", "LYZ", "S100A8", "S100A9", "FCGR3A"],
    "CD56+ NK": ["NKG7", "GNLY", "GZMB", "KLRD1"],
}
LABEL_KEY = "bulk_labels"
RECIPE = {"num_train_epochs": 10, "learning_rate": 3e-3}  # the demo's recipe of the default preset


def train_classifier(work: Path, preset: str, epochs: int | None, seed: int) -> tuple[Path, float]:
    """``scrnalf finetune`` on pbmc68k_reduced's ``.raw``; returns the model folder and seconds."""
    from scrnalf_cli import main as scrnalf
    from scrnalf_hf.data.bundled import load_pbmc68k_reduced

    path = work / "pbmc68k_reduced.h5ad"
    load_pbmc68k_reduced().write_h5ad(path)
    output = work / "classifier"
    started = time.perf_counter()
    code = scrnalf([
        "finetune", "--train-file", str(path), "--use-raw", "--input-kind", "log1p", "--label-key", LABEL_KEY,
        "--preset", preset, "--output-dir", str(output), "--class-weighting", "balanced", "--seed", str(seed),
        "--num_train_epochs", str(epochs or RECIPE["num_train_epochs"]), "--learning_rate", str(RECIPE["learning_rate"]),
        "--disable_tqdm", "true", "--overwrite",
    ])
    if code != 0:
        raise SystemExit(f"scrnalf finetune failed ({code})")
    return output, time.perf_counter() - started


def logistic_regression_top(expression: np.ndarray, labels: np.ndarray, genes: list[str], n: int, seed: int) -> dict[str, list[str]]:
    """Top ``n`` genes per class by logistic-regression coefficient (standardised inputs)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaled = StandardScaler().fit_transform(expression)
    model = LogisticRegression(max_iter=3000, class_weight="balanced", random_state=seed).fit(scaled, labels)
    return {
        label: [genes[g] for g in np.argsort(-model.coef_[list(model.classes_).index(label)])[:n]]
        for label in CLASSES.values()
    }


def rank_genes_groups_top(adata, n: int) -> dict[str, list[str]]:
    """Top ``n`` genes per class by ``sc.tl.rank_genes_groups`` (Wilcoxon on ``.raw``)."""
    import scanpy as sc

    sc.tl.rank_genes_groups(adata, LABEL_KEY, use_raw=True, method="wilcoxon", n_genes=n)
    names = adata.uns["rank_genes_groups"]["names"]
    return {label: [str(g) for g in names[label][:n]] for label in CLASSES.values()}


def found_markers(top: dict[str, list[str]], panel: set[str]) -> dict[str, list[str]]:
    return {label: [m for m in CANONICAL_MARKERS[label] if m in panel and m in top[label]] for label in CLASSES.values()}


def run(output_dir: Path, *, preset: str = "default", epochs: int | None = None, n: int = 20, seed: int = 0,
        work_dir: Path | None = None) -> dict:
    """Everything of the module docstring; returns the report (also written to ``output_dir``)."""
    from scrnalf_hf.data.bundled import load_pbmc68k_reduced
    from scrnalf_hf.inference import load_model
    from scrnalf_hf.interpret.importance import plot_importance, top_genes

    output_dir.mkdir(parents=True, exist_ok=True)
    adata = load_pbmc68k_reduced()
    with tempfile.TemporaryDirectory() as temporary:
        work = work_dir or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        model_dir, train_seconds = train_classifier(work, preset, epochs, seed)
        summary = json.loads((model_dir / "training_summary.json").read_text())
        model, processor = load_model(str(model_dir))
        started = time.perf_counter()
        tables = {label: top_genes(model, adata, label, processor=processor, label_key=LABEL_KEY, n=n, progress=False)
                  for label in CLASSES.values()}
        importance_seconds = time.perf_counter() - started
    genes = list(processor.gene_symbols)
    panel = set(genes)
    expression = processor(adata, return_tensors="np")["expression"]
    labels = adata.obs[LABEL_KEY].astype(str).to_numpy()
    model_top = {label: table["gene"].tolist() for label, table in tables.items()}
    logistic_top = logistic_regression_top(expression, labels, genes, n, seed)
    wilcoxon_top = rank_genes_groups_top(adata, n)
    found = {
        "integrated_gradients": found_markers(model_top, panel),
        "logistic_regression": found_markers(logistic_top, panel),
        "rank_genes_groups": found_markers(wilcoxon_top, panel),
    }
    report = {
        "settings": {"preset": preset, "epochs": epochs or RECIPE["num_train_epochs"], "learning_rate": RECIPE["learning_rate"],
                     "n": n, "seed": seed, "n_steps": 32, "baseline": "zeros", "panel_genes": len(genes)},
        "classifier": {"held_out_macro_f1": summary["metrics"].get("macro_f1"), "held_out_accuracy": summary["metrics"].get("accuracy"),
                       "train_seconds": round(train_seconds, 1)},
        "importance_seconds": round(importance_seconds, 1),
        "canonical_markers": CANONICAL_MARKERS,
        "canonical_markers_in_panel": {label: [m for m in markers if m in panel] for label, markers in CANONICAL_MARKERS.items()},
        "cells": {label: int((labels == label).sum()) for label in CLASSES.values()},
        "top_genes": {"integrated_gradients": model_top, "logistic_regression": logistic_top, "rank_genes_groups": wilcoxon_top},
        "integrated_gradients_scores": {label: table["score"].round(5).tolist() for label, table in tables.items()},
        "markers_found": found,
        "acceptance_met": all(found["integrated_gradients"][label] for label in CLASSES.values()),
    }
    (output_dir / "markers.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_importance(tables, output_dir / "markers.png",
                    title=f"integrated gradients, {preset} classifier on pbmc68k_reduced (mean over the class's cells)")
    write_markdown(report, output_dir / "markers.md")
    return report


def write_markdown(report: dict, path: Path) -> None:
    classifier = report["classifier"]
    lines = [
        "# Marker genes of a fine-tuned classifier (pbmc68k_reduced)",
        "",
        f"`{report['settings']['preset']}` classifier fine-tuned with `scrnalf finetune` ({report['settings']['epochs']} epochs, "
        f"{classifier['train_seconds']:.0f} s; held-out macro-F1 {classifier['held_out_macro_f1']:.3f}, accuracy "
        f"{classifier['held_out_accuracy']:.3f}). Top {report['settings']['n']} genes per class by integrated gradients "
        f"(mean attribution to the class's logit over the cells labelled so, zero baseline, {report['settings']['n_steps']} steps; "
        f"{report['importance_seconds']:.0f} s), beside logistic regression's coefficients and `sc.tl.rank_genes_groups` "
        "(Wilcoxon) on the same cells.",
        "",
        "Canonical markers found in each top list (only markers in the 765-gene panel can be found):",
        "",
        "| class | cells | markers in panel | integrated gradients | logistic regression | rank_genes_groups |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    found = report["markers_found"]
    for label in CLASSES.values():
        in_panel = report["canonical_markers_in_panel"][label]
        missing = [m for m in report["canonical_markers"][label] if m not in in_panel]
        cells = ", ".join(in_panel) + (f" (not in panel: {', '.join(missing)})" if missing else "")
        row = [found[method][label] for method in ("integrated_gradients", "logistic_regression", "rank_genes_groups")]
        lines.append(f"| {label} | {report['cells'][label]} | {cells} | " + " | ".join(
            f"{len(r)}/{len(in_panel)}: {', '.join(r) or '—'}" for r in row) + " |")
    lines += ["", f"Acceptance (≥ 1 canonical marker in each class's integrated-gradients top 20): "
                  f"**{'met' if report['acceptance_met'] else 'not met'}**.", ""]
    for label in CLASSES.values():
        lines += [f"## {label}", "", "| rank | integrated gradients | logistic regression | rank_genes_groups |", "| --- | --- | --- | --- |"]
        tops = report["top_genes"]
        for rank in range(report["settings"]["n"]):
            lines.append(f"| {rank + 1} | " + " | ".join(tops[m][label][rank] for m in ("integrated_gradients", "logistic_regression", "rank_genes_groups")) + " |")
        lines.append("")
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, required=True, help="where markers.json, .md and .png go")
    parser.add_argument("--work-dir", type=Path, default=None, help="data and model (default: a temporary folder)")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--epochs", type=int, default=None, help=f"default: the demo's recipe ({RECIPE['num_train_epochs']})")
    parser.add_argument("--n", type=int, default=20, help="top genes per class")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    report = run(args.output_dir, preset=args.preset, epochs=args.epochs, n=args.n, seed=args.seed, work_dir=args.work_dir)
    print((args.output_dir / "markers.md").read_text())
    if not report["acceptance_met"]:
        raise SystemExit("a class has no canonical marker among its integrated-gradients top genes")


if __name__ == "__main__":
    main()
