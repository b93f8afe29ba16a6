"""``scrnalf transfer``: does masked-gene pretraining help when labels are scarce?

1. Split the cells (stratified) into training and held-out test cells.
2. Pretrain a preset with masked gene modelling on the training cells *without their labels*
   (plus, optionally, the cells of ``--pretrain-file`` aligned to the same panel). Test cells are
   never seen.
3. For each fraction of labelled training cells (stratified; at least 2 cells per class), fine-tune
   the pretrained model and the same preset from scratch with the same recipe, and fit logistic
   regression on the same cells; score all three on the same test cells.

Writes ``transfer.json`` (rows ``{"fraction", "n_labelled_cells", "method", "accuracy",
"macro_f1"}``, method ∈ pretrained / scratch / logreg), ``transfer.md`` and
``learning_curve.png`` (macro-F1 vs labelled cells) into ``--output-dir``; the pretrained model
is in ``pretrained/``. With ``--pretrained-model`` step 2 is skipped and that checkpoint is
fine-tuned instead (it may have seen the test cells' expression, unlabelled: say so).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import numpy as np

logger = logging.getLogger(__name__)


def labelled_subset(train_rows: np.ndarray, labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """A stratified ``fraction`` of ``train_rows``: ``max(2, round(fraction · n_c))`` cells of each
    class c (all of them if it has fewer), chosen with ``seed``."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fractions must lie in (0, 1], got {fraction}.")
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels[train_rows]):
        members = train_rows[labels[train_rows] == label]
        count = min(len(members), max(2, int(round(fraction * len(members)))))
        chosen.append(rng.choice(members, size=count, replace=False))
    return np.sort(np.concatenate(chosen))


def plot_learning_curve(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for method, style in (("pretrained", "o-"), ("scratch", "s--"), ("logreg", "^:")):
        chosen = sorted((r for r in rows if r["method"] == method), key=lambda r: r["n_labelled_cells"])
        axis.plot([r["n_labelled_cells"] for r in chosen], [r["macro_f1"] for r in chosen], style, label=method)
    axis.set_xscale("log")
    axis.set_xlabel("labelled training cells")
    axis.set_ylabel("held-out macro-F1")
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.legend()
    axis.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _unlabelled_cells(cells, train_rows, processor, pretrain_file):
    """The cells to pretrain on: the training cells, plus those of ``pretrain_file`` aligned to
    ``processor``'s panel (the training dataset's own genes)."""
    from ..data.cells import CELL_COLUMNS, Cells, open_cells

    own = cells.dataset.select_columns([*CELL_COLUMNS, "length"]).select(train_rows)
    if not pretrain_file:
        return Cells(own, cells.genes, cells.name), np.arange(len(own))
    extra = open_cells(pretrain_file, input_kind=cells.input_kind).on_panel(processor)
    joined = datasets.concatenate_datasets([own.flatten_indices(), extra.dataset])
    merged = Cells(joined, extra.genes, f"{cells.name} + {extra.name}", None, extra._workdir)
    return merged, np.arange(len(joined))


def run_transfer(args) -> list[dict]:
    """``scrnalf transfer`` (arguments in the CLI); returns the rows written to transfer.json."""
    if args.species or args.species_key or args.model_species:
        raise ValueError("scrnalf transfer trains single-species models; drop --species / --species-key / --model-species.")
    if getattr(args, "pretrained_model", None) and args.pretrain_file:
        raise ValueError("--pretrain-file adds cells to pretraining here; with --pretrained-model nothing is pretrained, drop one.")
    from ..data.cells import open_cells
    from ..data.panel import fit_processor
    from ..data.splits import split_off
    from .arguments import training_arguments
    from .finetune import CellPart, finetune, fit_baselines, no_targets, read_targets, score_held_out
    from .tasks import CLASSIFICATION, MASKED_GENES

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    fractions = sorted({float(f) for f in str(args.fractions).split(",")})
    cells = open_cells(
        args.train_file, layer=args.layer, use_raw=args.use_raw, input_kind=args.input_kind,
        label_key=args.label_key, name=args.dataset_name,
    )
    targets = read_targets(CLASSIFICATION, cells, args.label_key, args.min_cells_per_label)
    train, test = split_off(np.flatnonzero(targets.usable), args.test_fraction, seed=args.seed, labels=targets.stratify)
    processor = fit_processor(cells, train)
    unlabelled, rows = _unlabelled_cells(cells, train, processor, args.pretrain_file)

    if getattr(args, "pretrained_model", None):
        # a checkpoint pretrained elsewhere (its own panel and cells); nothing is pretrained here
        pretrained_dir = args.pretrained_model
        logger.info("transfer: fine-tuning the given checkpoint %s", pretrained_dir)
    else:
        pretrained_dir = output_dir / "pretrained"
        logger.info("transfer: pretraining %s on %d unlabelled cells", args.preset, len(rows))
        pre = finetune(
            MASKED_GENES, unlabelled, no_targets(unlabelled), rows,
            training_arguments(MASKED_GENES, pretrained_dir, seed=args.seed, num_train_epochs=args.pretrain_epochs, disable_tqdm=True),
            preset=args.preset, validation_fraction=0.05, early_stopping_patience=0,
        )
        pre.trainer.save_model(str(pretrained_dir))

    rows_out: list[dict] = []
    test_part = CellPart(cells, targets, test)
    for fraction in fractions:
        subset = labelled_subset(train, targets.values, fraction, seed=args.seed)
        for method in ("pretrained", "scratch"):
            folder = output_dir / "runs" / f"{method}_{fraction:g}"
            result = finetune(
                CLASSIFICATION, cells, targets, subset,
                training_arguments(CLASSIFICATION, folder, seed=args.seed, num_train_epochs=args.finetune_epochs, disable_tqdm=True),
                preset=None if method == "pretrained" else args.preset,
                model_name_or_path=str(pretrained_dir) if method == "pretrained" else None,
            )
            scores = score_held_out(result, test_part).metrics
            rows_out.append({"fraction": fraction, "n_labelled_cells": int(len(subset)), "method": method,
                             "accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]})
        (logreg,), _ = fit_baselines(CLASSIFICATION, processor, CellPart(cells, targets, subset), test_part, ["logreg"], seed=args.seed)
        rows_out.append({"fraction": fraction, "n_labelled_cells": int(len(subset)), "method": "logreg",
                         "accuracy": logreg["accuracy"], "macro_f1": logreg["macro_f1"]})
        logger.info("transfer: fraction %g done: %s", fraction, [(r["method"], round(r["macro_f1"], 3)) for r in rows_out[-3:]])
        (output_dir / "transfer.json").write_text(json.dumps(rows_out, indent=2) + "\n")

    lines = ["| labelled cells | fraction | pretrained | scratch | logreg |", "| --- | --- | --- | --- | --- |"]
    for fraction in fractions:
        chosen = {r["method"]: r for r in rows_out if r["fraction"] == fraction}
        lines.append(
            f"| {chosen['logreg']['n_labelled_cells']} | {fraction:g} | {chosen['pretrained']['macro_f1']:.3f} | "
            f"{chosen['scratch']['macro_f1']:.3f} | {chosen['logreg']['macro_f1']:.3f} |"
        )
    table = "held-out macro-F1\n\n" + "\n".join(lines) + "\n"
    (output_dir / "transfer.md").write_text(table)
    plot_learning_curve(rows_out, output_dir / "learning_curve.png",
                        f"{cells.name} · {targets.key}: pretrained vs scratch vs logreg")
    print(table)
    return rows_out
