"""``scrnalf compare``: every method on the same stratified folds, the same input, no favourites.

For each fold, the processor is built from the dataset's genes, the training cells of the fold
are encoded once, and every method sees exactly that (n_cells, G) matrix: the baselines fit on
all training cells of the fold; a transformer preset fine-tunes on them, holding out a stratified
validation part of them for early stopping / best checkpoint (so it trains on fewer cells than
the baselines, never more). Test cells of the fold are touched only to score.

Writes into ``output_dir``:

``comparison.json``
    a list of rows ``{"method", "fold", "accuracy", "macro_f1", "train_seconds", "n_parameters"}``
    (rewritten after every fitted method, so an interrupted run keeps what it finished).
``comparison.md``
    Markdown table: mean ± std (over folds) per method, and the worst fold's macro-F1.
``comparison.png``
    macro-F1 and accuracy per method (bars = mean, dots = folds).
``comparison_predictions.npz``
    out-of-fold predicted class ids per method (``<method>``, (n_cells,)), ``labels``, ``fold``.
``runs/<method>/fold<k>/``
    each transformer fit's Trainer output (final model + processor; checkpoints removed).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.special import softmax
from transformers import TrainingArguments

from .baselines import BASELINES, fit_baseline
from .cells import LabelledCells, check_labels, encode, fit_processor, stratified_folds
from .metrics import classification_metrics

logger = logging.getLogger(__name__)

PRESETS = ("tiny", "default", "large")
ROW_KEYS = ("method", "fold", "accuracy", "macro_f1", "train_seconds", "n_parameters")


def parse_methods(methods: str | Sequence[str]) -> list[str]:
    """``"tiny,default,logreg"`` -> ``["tiny", "default", "logreg"]``, checked, with
    ``majority`` added (every comparison shows the floor)."""
    names = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods) if m.strip()]
    unknown = [m for m in names if m not in PRESETS and m not in BASELINES]
    if unknown:
        raise ValueError(
            f"unknown method(s) {unknown}; choose transformer presets from {list(PRESETS)} and baselines "
            f"from {sorted(BASELINES)}."
        )
    if len(set(names)) != len(names):
        raise ValueError(f"a method is listed twice in {names}.")
    return names if "majority" in names else [*names, "majority"]


@dataclass
class ComparisonResult:
    """Rows as written to comparison.json, plus out-of-fold predictions.

    Attributes:
        rows: one dict per (method, fold), keys ``ROW_KEYS``.
        predictions: method -> (n_cells,) out-of-fold predicted class ids (-1 where not scored).
        folds: (n_cells,) fold in which each cell was a test cell.
        fold_models: method -> {fold: FinetuneResult} for transformer methods (kept in memory
            only when ``keep_models``).
    """

    rows: list[dict]
    predictions: dict[str, np.ndarray]
    folds: np.ndarray
    fold_models: dict = field(default_factory=dict)


def compare(
    cells: LabelledCells,
    methods: str | Sequence[str],
    output_dir: str | Path,
    *,
    n_folds: int = 5,
    seed: int = 0,
    class_weighting: str | None = None,
    training_args: TrainingArguments | dict[str, TrainingArguments] | None = None,
    config_overrides: dict | None = None,
    validation_fraction: float = 0.1,
    early_stopping_patience: int = 8,
    only_folds: Sequence[int] | None = None,
    keep_models: bool = False,
    ensemble: int = 1,
) -> ComparisonResult:
    """Run every method on the same ``n_folds`` stratified folds (shuffled with ``seed``).

    Args:
        cells: cells and labels (:func:`~scrnalf_hf.training.cells.load_labelled_cells`).
        methods: transformer presets (``tiny``, ``default``, ``large``) and baselines
            (``logreg``, ``random_forest``, ``knn_pca``, ``majority``), comma-separated or a list.
        output_dir: where the files listed in the module docstring go.
        class_weighting: ``None`` or ``"balanced"``, applied to every method alike.
        training_args: Trainer settings for the transformer methods (``output_dir`` is replaced
            per fit), or a dict preset -> settings; the finetune recipe's defaults when None.
        config_overrides: config fields for every transformer preset (e.g. pooling).
        only_folds: score only these folds (0-based) of the ``n_folds`` split, e.g. for a quick
            demo; every method still gets exactly the same folds.
        keep_models: keep each transformer fit (model, processor, test embeddings) in the result.
        ensemble: fit each transformer preset this many times per fold, with seeds ``seed`` …
            ``seed + ensemble - 1`` (each also drawing its own validation cells), and predict
            the class of highest mean probability; the row is named ``<preset>×<ensemble>`` and
            counts the summed training time and parameters. Baselines are deterministic given
            their seed and are fitted once.

    Raises:
        ValueError: unknown methods, classes too small for ``n_folds``, folds smaller than the
            number of classes — before anything is trained.
    """
    from .finetune import finetune

    method_names = parse_methods(methods)
    if ensemble < 1 or (ensemble > 1 and keep_models):
        raise ValueError(f"ensemble must be a positive number of fits (and 1 with keep_models), got {ensemble}.")
    check_labels(cells.labels, cells.label_names, cells.label_key, min_cells=n_folds)
    folds = stratified_folds(cells.labels, n_folds, seed=seed)
    fold_numbers = list(range(n_folds)) if only_folds is None else sorted(set(only_folds))
    if any(f < 0 or f >= n_folds for f in fold_numbers):
        raise ValueError(f"only_folds must lie in [0, {n_folds}), got {list(only_folds)}.")
    if any(m in PRESETS for m in method_names) and training_args is None:
        training_args = default_training_args(Path(output_dir) / "runs", seed=seed)

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    row_names = {m: m if m in BASELINES or ensemble == 1 else f"{m}×{ensemble}" for m in method_names}
    predictions = {row_names[m]: np.full(cells.n_cells, -1, dtype=np.int64) for m in method_names}
    fold_of_cell = np.full(cells.n_cells, -1, dtype=np.int64)
    fold_models: dict = {}
    started = time.perf_counter()
    for fold in fold_numbers:
        train_index, test_index = folds[fold]
        fold_of_cell[test_index] = fold
        processor = fit_processor(cells)
        train_features = encode(processor, cells, train_index)["expression"]
        test_features = encode(processor, cells, test_index)["expression"]
        for method in method_names:
            logger.warning("compare: fold %d/%d, %s (%.0f s elapsed)", fold + 1, n_folds, method, time.perf_counter() - started)
            if method in BASELINES:
                fitted = fit_baseline(
                    method, train_features, cells.labels[train_index], test_features,
                    seed=seed, class_weighting=class_weighting,
                )
                fold_predictions, seconds, n_parameters = fitted.predictions, fitted.train_seconds, fitted.n_parameters
            else:
                probabilities, seconds, n_parameters = 0.0, 0.0, 0
                method_args = training_args[method] if isinstance(training_args, dict) else training_args
                for member in range(ensemble):
                    run_dir = output_dir / "runs" / method / f"fold{fold}"
                    if ensemble > 1:
                        run_dir = run_dir / f"seed{seed + member}"
                    args = dataclasses.replace(method_args, output_dir=str(run_dir), seed=method_args.seed + member)
                    result = finetune(
                        cells, train_index, test_index, args, preset=method, config_overrides=config_overrides,
                        class_weighting=class_weighting, validation_fraction=validation_fraction,
                        early_stopping_patience=early_stopping_patience,
                    )
                    if result.trainer.is_world_process_zero():
                        result.trainer.save_model(str(run_dir))
                        for checkpoint in run_dir.glob("checkpoint-*"):
                            shutil.rmtree(checkpoint, ignore_errors=True)
                    probabilities = probabilities + softmax(result.logits, axis=1)
                    seconds += result.train_seconds
                    n_parameters += result.n_parameters
                    if keep_models:
                        fold_models.setdefault(method, {})[fold] = result
                fold_predictions = np.asarray(probabilities).argmax(-1)
            name = row_names[method]
            scores = classification_metrics(cells.labels[test_index], fold_predictions, cells.n_classes, per_class=False)
            predictions[name][test_index] = fold_predictions
            rows.append(
                {"method": name, "fold": fold, "accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"],
                 "train_seconds": float(seconds), "n_parameters": int(n_parameters)}
            )
            logger.warning(
                "compare: fold %d %s accuracy %.3f macro-F1 %.3f (%.1f s)", fold, name, scores["accuracy"], scores["macro_f1"], seconds
            )
            (output_dir / "comparison.json").write_text(json.dumps(rows, indent=2) + "\n")

    np.savez(output_dir / "comparison_predictions.npz", labels=cells.labels, fold=fold_of_cell, **predictions)
    table = comparison_table(rows, title=f"{cells.dataset_name}, label `{cells.label_key}`, {n_folds}-fold stratified CV")
    (output_dir / "comparison.md").write_text(table)
    plot_comparison(rows, output_dir / "comparison.png", title=f"{cells.dataset_name} · {cells.label_key}")
    print(table)
    return ComparisonResult(rows=rows, predictions=predictions, folds=fold_of_cell, fold_models=fold_models)


def default_training_args(output_dir: str | Path, seed: int = 0, **overrides) -> TrainingArguments:
    """The finetune recipe's TrainingArguments (``FINETUNE_DEFAULTS``), with overrides given as
    command-line flags would be, e.g. ``{"num_train_epochs": 10}``."""
    from .arguments import FINETUNE_DEFAULTS, parse_arguments

    flags = [f"--seed={seed}"]
    for key, value in overrides.items():
        flags.append(f"--{key}={value}")
    _, _, training_args = parse_arguments(["--train_file", "unused", "--output_dir", str(output_dir), *flags], FINETUNE_DEFAULTS)
    return training_args


def summarise(rows: Sequence[dict]) -> list[dict]:
    """Per method (in first-appearance order): number of folds, mean and std (sample std over
    folds; 0 for one fold) of accuracy, macro-F1, train seconds; the worst fold's macro-F1; and
    the parameter count (mean)."""
    methods = list(dict.fromkeys(row["method"] for row in rows))
    summary = []
    for method in methods:
        chosen = [row for row in rows if row["method"] == method]

        def stats(key):
            values = [float(row[key]) for row in chosen]
            return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

        summary.append(
            {
                "method": method,
                "folds": len(chosen),
                "accuracy": stats("accuracy"),
                "macro_f1": stats("macro_f1"),
                "train_seconds": stats("train_seconds"),
                "worst_fold_macro_f1": min(float(row["macro_f1"]) for row in chosen),
                "n_parameters": int(round(statistics.fmean(int(row["n_parameters"]) for row in chosen))),
            }
        )
    return summary


def comparison_table(rows: Sequence[dict], title: str | None = None) -> str:
    """A Markdown table of :func:`summarise` (mean ± std over folds)."""
    lines = [f"**{title}**", ""] if title else []
    lines += [
        "| method | folds | accuracy | macro-F1 | worst-fold macro-F1 | train s / fold | parameters |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for entry in summarise(rows):
        (acc, acc_sd), (f1, f1_sd), (sec, _) = entry["accuracy"], entry["macro_f1"], entry["train_seconds"]
        lines.append(
            f"| {entry['method']} | {entry['folds']} | {acc:.3f} ± {acc_sd:.3f} | {f1:.3f} ± {f1_sd:.3f} | "
            f"{entry['worst_fold_macro_f1']:.3f} | {sec:.1f} | {entry['n_parameters']:,} |"
        )
    return "\n".join(lines) + "\n"


def plot_comparison(rows: Sequence[dict], path: str | Path, title: str = "") -> None:
    """Bars of mean macro-F1 and accuracy per method, one dot per fold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(rows)
    methods = [entry["method"] for entry in summary]
    figure, axes = plt.subplots(1, 2, figsize=(max(6, 1.4 * len(methods) * 2), 4), sharey=True)
    for axis, key, label in ((axes[0], "macro_f1", "macro-F1"), (axes[1], "accuracy", "accuracy")):
        means = [entry[key][0] for entry in summary]
        stds = [entry[key][1] for entry in summary]
        positions = np.arange(len(methods))
        axis.bar(positions, means, yerr=stds, color="#9ecae1", edgecolor="#3182bd", capsize=4)
        for position, method in zip(positions, methods):
            values = [row[key] for row in rows if row["method"] == method]
            axis.scatter(np.full(len(values), position), values, color="#08519c", s=12, zorder=3)
        axis.set_xticks(positions, methods, rotation=30, ha="right")
        axis.set_ylabel(label)
        axis.set_ylim(0, 1)
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_compare(args) -> ComparisonResult:
    """``scrnalf compare``: ``args`` from the CLI; ``args.extra_args`` are TrainingArguments flags
    for the transformer presets (e.g. ``--num_train_epochs 20 --learning_rate 1e-3``)."""
    from .arguments import FINETUNE_DEFAULTS, parse_arguments, parse_config_overrides
    from .cells import load_labelled_cells

    cells = load_labelled_cells(
        args.train_file, args.label_key, layer=args.layer, use_raw=args.use_raw, input_kind=args.input_kind,
        min_cells_per_label=args.min_cells_per_label, dataset_name=args.dataset_name,
    )
    extra = list(getattr(args, "extra_args", []) or [])
    _, _, training_args = parse_arguments(
        ["--train_file", args.train_file, "--output_dir", str(Path(args.output_dir) / "runs"), f"--seed={args.seed}", *extra],
        FINETUNE_DEFAULTS,
    )
    only_folds = None if args.folds is None else [int(f) for f in str(args.folds).split(",")]
    return compare(
        cells, args.methods, args.output_dir, n_folds=args.cv, seed=args.seed, class_weighting=args.class_weighting,
        training_args=training_args, config_overrides=parse_config_overrides(args.config_overrides),
        validation_fraction=args.validation_fraction, early_stopping_patience=args.early_stopping_patience,
        only_folds=only_folds, ensemble=args.ensemble,
    )
