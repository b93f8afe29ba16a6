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
is in ``pretrained/``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def labelled_subset(train_index: np.ndarray, labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """A stratified ``fraction`` of ``train_index``: ``max(2, round(fraction · n_c))`` cells of each
    class c (all of them if it has fewer), chosen with ``seed``."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fractions must lie in (0, 1], got {fraction}.")
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels[train_index]):
        members = train_index[labels[train_index] == label]
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


def run_transfer(args) -> list[dict]:
    """``scrnalf transfer`` (arguments in the CLI); returns the rows written to transfer.json."""
    from .arguments import FINETUNE_DEFAULTS, PRETRAIN_DEFAULTS, parse_arguments
    from .baselines import fit_baseline
    from .cells import encode, fit_processor, load_labelled_cells, stratified_split
    from .finetune import finetune
    from .metrics import classification_metrics
    from .pretrain import pretrain, read_unlabelled_cells

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    fractions = sorted({float(f) for f in str(args.fractions).split(",")})
    cells = load_labelled_cells(
        args.train_file, args.label_key, layer=args.layer, use_raw=args.use_raw, input_kind=args.input_kind,
        min_cells_per_label=args.min_cells_per_label, dataset_name=args.dataset_name,
    )
    train, test = stratified_split(np.arange(cells.n_cells), cells.labels, args.test_fraction, seed=args.seed)
    processor = fit_processor(cells)
    unlabelled = encode(processor, cells, train)
    if args.pretrain_file:
        matrix, symbols, ids, _, _ = read_unlabelled_cells(args.pretrain_file)
        extra = processor(matrix, gene_names=symbols, gene_ids=ids, return_tensors="np")
        unlabelled = {k: np.concatenate([unlabelled[k], extra[k]]) for k in unlabelled}

    def trainer_args(defaults, folder, epochs):
        return parse_arguments(
            ["--train_file", str(args.train_file), "--output_dir", str(folder), f"--seed={args.seed}",
             f"--num_train_epochs={epochs}", "--disable_tqdm=true", *getattr(args, "extra_args", [])],
            defaults,
        )[2]

    pretrained_dir = output_dir / "pretrained"
    logger.warning("transfer: pretraining %s on %d unlabelled cells", args.preset, len(unlabelled["expression"]))
    pre = pretrain(processor, unlabelled["expression"], unlabelled["attention_mask"],
                   trainer_args(PRETRAIN_DEFAULTS, pretrained_dir, args.pretrain_epochs), preset=args.preset)
    pre.trainer.save_model(str(pretrained_dir))

    rows: list[dict] = []
    test_features = encode(processor, cells, test)["expression"]
    for fraction in fractions:
        subset = labelled_subset(train, cells.labels, fraction, seed=args.seed)
        for method in ("pretrained", "scratch"):
            folder = output_dir / "runs" / f"{method}_{fraction:g}"
            result = finetune(
                cells, subset, test, trainer_args(FINETUNE_DEFAULTS, folder, args.finetune_epochs),
                preset=None if method == "pretrained" else args.preset,
                model_name_or_path=str(pretrained_dir) if method == "pretrained" else None,
            )
            rows.append({"fraction": fraction, "n_labelled_cells": int(len(subset)), "method": method,
                         "accuracy": result.metrics["accuracy"], "macro_f1": result.metrics["macro_f1"]})
        fitted = fit_baseline("logreg", encode(processor, cells, subset)["expression"], cells.labels[subset], test_features, seed=args.seed)
        scores = classification_metrics(cells.labels[test], fitted.predictions, cells.n_classes, per_class=False)
        rows.append({"fraction": fraction, "n_labelled_cells": int(len(subset)), "method": "logreg", **scores})
        logger.warning("transfer: fraction %g done: %s", fraction, [(r["method"], round(r["macro_f1"], 3)) for r in rows[-3:]])
        (output_dir / "transfer.json").write_text(json.dumps(rows, indent=2) + "\n")

    lines = ["| labelled cells | fraction | pretrained | scratch | logreg |", "| --- | --- | --- | --- | --- |"]
    for fraction in fractions:
        chosen = {r["method"]: r for r in rows if r["fraction"] == fraction}
        lines.append(
            f"| {chosen['logreg']['n_labelled_cells']} | {fraction:g} | {chosen['pretrained']['macro_f1']:.3f} | "
            f"{chosen['scratch']['macro_f1']:.3f} | {chosen['logreg']['macro_f1']:.3f} |"
        )
    table = "held-out macro-F1\n\n" + "\n".join(lines) + "\n"
    (output_dir / "transfer.md").write_text(table)
    plot_learning_curve(rows, output_dir / "learning_curve.png", f"{cells.dataset_name} · {cells.label_key}: pretrained vs scratch vs logreg")
    print(table)
    return rows
