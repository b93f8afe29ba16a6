"""In-silico deletion on simulated cells with known regulatory edges: are a regulator's targets
the genes that respond when the model loses it?

1. Simulate cells whose genes form modules, each with one regulator and directed edges
   regulator → target (``simulate``; ``uns["simulation"]["regulatory_edges"]``; targets follow
   the regulator's realised level times the edge weight, 20% of weights negative).
2. Pretrain a masked-gene model on them through the command line (``scrnalf pretrain``).
3. Delete each regulator in turn (``perturb(..., mode="delete")``: its normalised value set to 0)
   in the evaluation cells and rank every other gene by the size of its mean predicted-expression
   change (each gene predicted while hidden, from the original and from the perturbed cell).
4. Score each regulator's ranking by the AUROC of its known targets against all other genes,
   beside the same ranking by |Pearson correlation| with the regulator over the same cells.

Simulated data shows the mechanics, not biology. Results go to ``OUTPUT_DIR/perturbation.json``
and ``.md``, and ``perturbation_<regulator>.png`` for the first regulator.

    python scripts/perturbation.py --output-dir benchmarks/perturbation
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from scrnalf_cli import main as scrnalf


def _run(*argv) -> float:
    started = time.perf_counter()
    code = scrnalf([str(a) for a in argv])
    if code != 0:
        raise SystemExit(f"scrnalf {' '.join(map(str, argv))} failed ({code})")
    return time.perf_counter() - started


def absolute_correlation(expression: np.ndarray, gene: int) -> np.ndarray:
    """(G,) |Pearson r| of every gene with ``gene`` over the cells (0 for constant genes)."""
    centred = expression - expression.mean(0)
    norms = np.linalg.norm(centred, axis=0)
    r = centred.T @ centred[:, gene] / np.where(norms * norms[gene] > 0, norms * norms[gene], np.inf)
    return np.abs(r)


def graph_reach(model, processor, edges: pd.DataFrame) -> dict:
    """Per regulator: how many genes list it among their graph neighbours (``readers``, all that a
    one-layer deletion reaches besides CLS) and how many of those are its targets."""
    table = model.base_model.gene_neighbors.cpu().numpy()
    symbols = list(processor.gene_symbols)
    reach = {}
    for regulator, targets in edges.groupby("source"):
        position = symbols.index(regulator)
        readers = {symbols[g] for g in np.flatnonzero((table == position).any(1)) if g != position}
        reach[regulator] = {"readers": len(readers), "targets_among_readers": len(readers & set(targets["target"]))}
    return reach


def evaluate(model, processor, cells, edges: pd.DataFrame, output_dir: Path, batch_size: int) -> dict:
    from scrnalf_hf.interpret.perturb import perturb, plot_perturbation

    symbols = list(processor.gene_symbols)
    expression = processor(cells, return_tensors="np")["expression"]  # (n, G) normalised
    reach = graph_reach(model, processor, edges)
    rows = []
    for index, (regulator, targets) in enumerate(edges.groupby("source")):
        started = time.perf_counter()
        result = perturb(model, processor, cells, [regulator], mode="delete", batch_size=batch_size, progress=False)
        if index == 0:
            plot_perturbation(result, output_dir / f"perturbation_{regulator}.png")
        position = symbols.index(regulator)
        others = np.array([g for g in range(len(symbols)) if g != position])
        is_target = np.isin(np.asarray(symbols)[others], targets["target"].to_numpy())
        positive = np.isin(np.asarray(symbols)[others], targets.loc[targets["weight"] > 0, "target"].to_numpy())
        model_score = np.abs(result.gene_shift[others])
        correlation_score = absolute_correlation(expression, position)[others]
        rows.append({
            "regulator": regulator,
            "n_targets": int(is_target.sum()),
            "n_negative_edges": int((targets["weight"] < 0).sum()),
            "auroc_model": float(roc_auc_score(is_target, model_score)),
            "auroc_correlation": float(roc_auc_score(is_target, correlation_score)),
            # the positive edges alone against the non-targets
            "auroc_model_positive_edges": float(roc_auc_score(positive[~is_target | positive], model_score[~is_target | positive])),
            "mean_embedding_shift": float(result.embedding_shift.mean()),
            **reach[regulator],
            "seconds": round(time.perf_counter() - started, 1),
        })
        print(f"  {regulator}: {rows[-1]['n_targets']} targets, AUROC model {rows[-1]['auroc_model']:.3f}, "
              f"|r| {rows[-1]['auroc_correlation']:.3f} ({rows[-1]['seconds']:.0f} s)", flush=True)
    return {"per_regulator": rows}


def summarise(rows: list[dict]) -> dict:
    table = pd.DataFrame(rows)
    return {
        f"{statistic}_{column}": float(getattr(table[column], statistic)())
        for column in ("auroc_model", "auroc_correlation", "auroc_model_positive_edges")
        for statistic in ("mean", "median")
    }


def write_markdown(report: dict, path: Path) -> None:
    summary, settings = report["summary"], report["settings"]
    lines = [
        "# In-silico deletion of regulators (simulated data)",
        "",
        f"{settings['n_cells']} simulated cells × {settings['n_genes']} genes, {settings['n_regulators']} regulators with "
        f"known targets; `{settings['preset']}` masked-gene model (gene graph: {settings['graph']}, k = {settings['knn_k']}) "
        f"pretrained for {settings['epochs']:g} epochs"
        + (f" ({report['pretrain_seconds']:.0f} s)" if report["pretrain_seconds"] is not None else "")
        + (f" (saved checkpoint `{Path(report['pretrained']).name}`)" if report["pretrained"] else "")
        + f"; deletion evaluated on {settings['n_eval_cells']} cells "
        f"({report['perturb_seconds']:.0f} s). Simulated data: mechanics, not biology.",
        "",
        "Ranking of all other genes by |mean predicted-expression change| after deleting the regulator, scored by the "
        "AUROC of its targets against every other gene; beside it, the ranking by |Pearson r| with the regulator.",
        "",
        "| | model (deletion) | \\|Pearson r\\| | model, positive edges only |",
        "| --- | --- | --- | --- |",
        f"| mean AUROC | {summary['mean_auroc_model']:.3f} | {summary['mean_auroc_correlation']:.3f} | {summary['mean_auroc_model_positive_edges']:.3f} |",
        f"| median AUROC | {summary['median_auroc_model']:.3f} | {summary['median_auroc_correlation']:.3f} | {summary['median_auroc_model_positive_edges']:.3f} |",
        "",
        f"Acceptance (mean AUROC of the model ≥ 0.8): **{'met' if summary['mean_auroc_model'] >= 0.8 else 'not met'}**.",
        "",
        "`readers`: genes that list the regulator among their graph neighbours (what a deletion reaches through "
        "attention besides the global CLS token), and how many of them are its targets.",
        "",
        "| regulator | targets (negative edges) | readers (targets among them) | AUROC model | AUROC \\|r\\| | AUROC model, positive edges |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["per_regulator"]:
        lines.append(f"| {row['regulator']} | {row['n_targets']} ({row['n_negative_edges']}) | {row['readers']} "
                     f"({row['targets_among_readers']}) | {row['auroc_model']:.3f} | "
                     f"{row['auroc_correlation']:.3f} | {row['auroc_model_positive_edges']:.3f} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, required=True, help="where perturbation.json, .md and the PNG go")
    parser.add_argument("--work-dir", type=Path, default=None, help="data and model (default: a temporary folder)")
    parser.add_argument("--n-cells", type=int, default=2000)
    parser.add_argument("--n-genes", type=int, default=300)
    parser.add_argument("--n-eval-cells", type=int, default=200, help="cells the deletions are evaluated on")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--pretrained", type=Path, default=None,
        help="evaluate this saved masked-gene model (or a checkpoint-N folder of a pretrain run on the same simulated "
        "cells) instead of pretraining one; --graph, --epochs and --preset then only label the report",
    )
    parser.add_argument(
        "--graph", choices=("cosine", "correlation"), default="cosine",
        help="the gene graph pretrain builds (the config's gene_graph_metric): cosine of normalised values "
        "(the default) or |Pearson r|",
    )
    args = parser.parse_args()

    from scrnalf_hf.data.simulation import simulate
    from scrnalf_hf.inference import load_model

    args.output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as temporary:
        work = args.work_dir or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        adata = simulate(args.n_cells, args.n_genes, seed=args.seed)
        adata.write_h5ad(work / "cells.h5ad")
        edges = pd.DataFrame({key: np.asarray(values) for key, values in adata.uns["simulation"]["regulatory_edges"].items()})
        print(f"simulated {adata.n_obs} cells × {adata.n_vars} genes, {edges['source'].nunique()} regulators, "
              f"{len(edges)} edges", flush=True)
        if args.pretrained is not None:
            model_dir, pretrain_seconds = args.pretrained, None
        else:
            model_dir = work / "model"
            pretrain_seconds = _run(
                "pretrain", "--train-file", work / "cells.h5ad", "--preset", args.preset,
                "--config-overrides", f"gene_graph_metric={args.graph}", "--output-dir", model_dir,
                "--num_train_epochs", args.epochs, "--seed", args.seed, "--disable_tqdm", "true", "--overwrite",
            )
            print(f"pretrained in {pretrain_seconds:.0f} s", flush=True)
        model, processor = load_model(str(model_dir))
        eval_cells = adata[np.random.default_rng(args.seed).choice(adata.n_obs, min(args.n_eval_cells, adata.n_obs), replace=False)]
        started = time.perf_counter()
        report = evaluate(model, processor, eval_cells, edges, args.output_dir, args.batch_size)
        perturb_seconds = time.perf_counter() - started
        epochs = args.epochs
        if (model_dir / "trainer_state.json").is_file():  # a checkpoint: the epochs it had trained
            epochs = json.loads((model_dir / "trainer_state.json").read_text())["epoch"]

    report = {
        "settings": {
            "n_cells": args.n_cells, "n_genes": args.n_genes, "n_eval_cells": len(eval_cells), "preset": args.preset,
            "epochs": epochs, "seed": args.seed, "graph": args.graph, "n_regulators": int(edges["source"].nunique()),
            "n_mask_groups": round(1 / model.config.mask_ratio), "knn_k": model.config.knn_k,
        },
        "summary": summarise(report["per_regulator"]),
        "pretrain_seconds": None if pretrain_seconds is None else round(pretrain_seconds, 1),
        "pretrained": None if args.pretrained is None else str(args.pretrained),
        "perturb_seconds": round(perturb_seconds, 1),
        **report,
    }
    (args.output_dir / "perturbation.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, args.output_dir / "perturbation.md")
    print((args.output_dir / "perturbation.md").read_text())


if __name__ == "__main__":
    main()
