"""``scrnalf compare``: every method on the same cells, the same input, no favourites.

Either ``n_folds`` folds of one dataset (stratified by class where the task has classes), or the
whole training dataset against a separate test dataset (``test_cells``: another file, aligned to
each model's gene panel; cells of classes the training data lacks are not scored). Per fold the
processor's panel is chosen on the fold's training cells, and every method sees exactly that
processor output: the baselines fit on all training cells of the fold; a transformer preset
fine-tunes on them, holding out a validation part of them for early stopping / best checkpoint
(so it trains on fewer cells than the baselines, never more). Test cells are touched only to
score.

Writes into ``output_dir``:

``comparison.json``
    a list of rows ``{"method", "fold", <the task's metrics>, "train_seconds", "n_parameters"}``
    (rewritten after every fitted method, so an interrupted run keeps what it finished).
``comparison.md``
    Markdown table: mean ± std (over folds) per method, and the worst fold of the first metric.
``comparison.png``
    each metric per method (bars = mean, labelled; dots = folds).
With a root cell (``root_cell``, trajectory task only), scanpy's diffusion pseudotime joins as a
row ``diffusion_pseudotime`` per fold (:mod:`~scrnalf_hf.training.pseudotime`: unsupervised,
computed on the fold's training and held-out cells together, mapped to the training times'
scale by a line fitted on the training cells).

``comparison_predictions.npz``
    out-of-fold point predictions per method (``<method>``, (n_cells,); -1 / NaN where not
    scored), the targets (``labels``) and each cell's ``fold``.
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import TrainingArguments

from ..data.cells import Cells
from ..data.splits import check_class_sizes, cross_validation_folds
from ..presets import PRESET_NAMES
from .finetune import CellPart, check_output_folder, fit_baselines, finetune, score_held_out
from .pseudotime import METHOD as DPT
from .tasks import Targets, Task

logger = logging.getLogger(__name__)


def parse_methods(task: Task, methods: str | Sequence[str]) -> list[str]:
    """``"tiny,default,logreg"`` -> ``["tiny", "default", "logreg"]``, checked against the presets
    and the task's baselines, with the task's floor baseline (e.g. ``majority``) added."""
    names = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods) if m.strip()]
    unknown = [m for m in names if m not in PRESET_NAMES and m not in task.baselines]
    if unknown:
        raise ValueError(
            f"unknown method(s) {unknown} for {task.summary}; choose transformer presets from {list(PRESET_NAMES)} "
            f"and baselines from {sorted(task.baselines)}."
        )
    if not names:
        raise ValueError(
            f"no method given; list presets from {list(PRESET_NAMES)} and/or baselines from {sorted(task.baselines)}, "
            "e.g. --methods tiny,logreg."
        )
    if len(set(names)) != len(names):
        raise ValueError(f"a method is listed twice in {names}.")
    if task.floor is not None and task.floor not in names:
        names.append(task.floor)
    return names


@dataclass
class ComparisonResult:
    """Rows as written to comparison.json, plus out-of-fold predictions.

    Attributes:
        rows: one dict per (method, fold).
        predictions: method -> (n_test_cells,) point predictions (-1 where not scored).
        folds: (n_test_cells,) fold in which each cell was a test cell (-1: never).
        fold_models: method -> {fold: (FitResult, HeldOutScores)} for transformer methods (kept in
            memory only when ``keep_models``).
    """

    rows: list[dict]
    predictions: dict[str, np.ndarray]
    folds: np.ndarray
    fold_models: dict = field(default_factory=dict)


def compare(
    task: Task,
    cells: Cells,
    targets: Targets,
    methods: str | Sequence[str],
    output_dir: str | Path,
    training_args: TrainingArguments | dict[str, TrainingArguments],
    *,
    n_folds: int = 5,
    test_cells: Cells | None = None,
    test_targets: Targets | None = None,
    seed: int = 0,
    class_weighting: str | None = None,
    config_overrides: dict | None = None,
    n_top_genes: int | None = None,
    validation_fraction: float = 0.1,
    early_stopping_patience: int = 8,
    only_folds: Sequence[int] | None = None,
    keep_models: bool = False,
    ensemble: int = 1,
    root_cell: str | None = None,
) -> ComparisonResult:
    """Run every method on the same folds (or the same separate test cells).

    Args:
        task: the head (classification: presets against logistic regression, random forest, ...).
        cells / targets: the dataset and the task's targets of it.
        methods: transformer presets and the task's baselines, comma-separated or a list.
        output_dir: where the files listed in the module docstring go.
        training_args: Trainer settings for the transformer methods (``output_dir`` is replaced
            per fit), or a dict preset -> settings.
        n_folds: cross-validation folds (shuffled with ``seed``); ignored with ``test_cells``.
        test_cells / test_targets: score on this other dataset instead of folds.
        class_weighting: ``None`` or ``"balanced"``, applied to every method alike.
        config_overrides: config fields for every transformer preset (e.g. pooling).
        n_top_genes: every method's panel is the fold's training cells' most variable genes.
        only_folds: score only these folds (0-based), e.g. for a quick demo; every method still
            gets exactly the same folds.
        keep_models: keep each transformer fit (model, processor, held-out scores) in the result.
        ensemble: fit each transformer preset this many times per fold, with seeds ``seed`` …
            ``seed + ensemble - 1`` (each also drawing its own validation cells), and average
            their kept predictions (class probabilities); the row is named
            ``<preset>×<ensemble>`` and counts the summed training time and parameters.
        root_cell: the ``obs_names`` id of the cell where the trajectory starts: adds scanpy's
            diffusion pseudotime as a reference row (trajectory task, cross-validation only).

    Raises:
        ValueError: unknown methods, classes too small for ``n_folds``, folds smaller than the
            number of classes — before anything is trained.
    """
    if task.score is None:
        raise ValueError(f"compare scores predictions, and {task.summary} makes none to score; compare a head instead.")
    method_names = parse_methods(task, methods)
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must lie in [0, 1) (0: no validation split), got {validation_fraction}.")
    if n_top_genes is not None and n_top_genes < 1:
        raise ValueError(f"--n-top-genes must be a positive number of genes, got {n_top_genes}.")
    if early_stopping_patience < 0:
        raise ValueError(f"--early-stopping-patience must be 0 (off) or positive, got {early_stopping_patience}.")
    check_output_folder(output_dir)
    if ensemble < 1 or (ensemble > 1 and keep_models):
        raise ValueError(f"ensemble must be a positive number of fits (and 1 with keep_models), got {ensemble}.")
    root = None
    if root_cell is not None:
        from .pseudotime import root_row

        if targets.names is not None or targets.values is None:
            raise ValueError(f"--root-cell starts a diffusion pseudotime, which compares with times, not with {task.summary}.")
        if test_cells is not None:
            raise ValueError("--root-cell orders the cells of one dataset; use it with --cv, not with --test-file.")
        root = root_row(cells, root_cell)
    usable = np.flatnonzero(targets.usable)
    stratify = None if targets.stratify is None else targets.stratify[usable]
    if test_cells is None:
        if targets.names is not None:
            check_class_sizes(targets.values[usable], targets.names, targets.key, min_cells=n_folds)
        folds = [(usable[train], usable[test]) for train, test in cross_validation_folds(len(usable), n_folds, seed=seed, labels=stratify)]
        test_side, test_labels = CellPart(cells, targets, usable), targets
        description = f"{n_folds}-fold {'stratified ' if stratify is not None else ''}CV"
    else:
        test_labels = task.align_targets(test_targets, targets) if task.align_targets else test_targets
        test_rows = np.flatnonzero(test_labels.usable)
        folds, n_folds = [(usable, test_rows)], 1
        test_side = CellPart(test_cells, test_labels, test_rows)
        description = f"trained on {cells.name}, tested on {test_cells.name} ({len(test_rows)} cells)"
    fold_numbers = list(range(n_folds)) if only_folds is None else sorted(set(only_folds))
    if any(f < 0 or f >= n_folds for f in fold_numbers):
        raise ValueError(f"--folds must lie in [0, {n_folds}), got {list(only_folds)}.")

    output_dir = Path(output_dir)
    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        rows: list[dict] = []
        row_names = {m: m if m in task.baselines or ensemble == 1 else f"{m}×{ensemble}" for m in method_names}
        n_test = test_side.cells.n_cells
        # (n_test,) per cell, or (n_test, k) for targets of several values per cell (proteins)
        point_shape = (n_test, *np.shape(targets.values)[1:]) if targets.values is not None else (n_test,)
        predictions = {row_names[m]: np.full(point_shape, -1, dtype=np.int64 if targets.names else np.float64) for m in method_names}
        if root is not None:
            predictions[DPT] = np.full(n_test, np.nan)
        fold_of_cell = np.full(n_test, -1, dtype=np.int64)
        fold_models: dict = {}
        started = time.perf_counter()
        for fold in fold_numbers:
            train_rows, test_rows = folds[fold]
            fold_of_cell[test_rows] = fold
            test = CellPart(test_side.cells, test_labels, test_rows)
            baseline_names = [m for m in method_names if m in task.baselines]
            baseline_rows, baseline_points = {}, {}
            fold_processor = None
            if baseline_names or root is not None:
                from ..data.panel import fit_processor

                fold_processor = fit_processor(cells, train_rows, n_top_genes, seed=seed)
            if baseline_names:
                logger.info("compare: fold %d of %d, baselines %s", fold, n_folds, ", ".join(baseline_names))
                fitted_rows, baseline_points = fit_baselines(
                    task, fold_processor, CellPart(cells, targets, train_rows),
                    test, baseline_names, seed=seed, class_weighting=class_weighting, fold=fold,
                )
                baseline_rows = {row["method"]: row for row in fitted_rows}
            for method in method_names:
                if method in task.baselines:
                    row, point = baseline_rows[method], baseline_points[method]
                else:
                    logger.info("compare: fold %d of %d, %s (%.0f s elapsed)", fold, n_folds, method, time.perf_counter() - started)
                    method_args = training_args[method] if isinstance(training_args, dict) else training_args
                    kept, seconds, n_parameters = {}, 0.0, 0
                    for member in range(ensemble):
                        run_dir = output_dir / "runs" / method / f"fold{fold}"
                        if ensemble > 1:
                            run_dir = run_dir / f"seed{seed + member}"
                        args = dataclasses.replace(method_args, output_dir=str(run_dir), seed=method_args.seed + member)
                        result = finetune(
                            task, cells, targets, train_rows, args, preset=method, n_top_genes=n_top_genes,
                            config_overrides=config_overrides, class_weighting=class_weighting,
                            validation_fraction=validation_fraction, early_stopping_patience=early_stopping_patience,
                        )
                        held_out = score_held_out(result, test)
                        if result.trainer.is_world_process_zero():
                            result.trainer.save_model(str(run_dir))
                            for checkpoint in run_dir.glob("checkpoint-*"):
                                shutil.rmtree(checkpoint, ignore_errors=True)
                        for name, values in held_out.predicted.items():
                            kept[name] = kept.get(name, 0.0) + values / ensemble
                        seconds += result.train_seconds
                        n_parameters += result.n_parameters
                        if keep_models:
                            fold_models.setdefault(method, {})[fold] = (result, held_out)
                    point = task.point(kept)
                    scores = task.score(test_labels.values[test_rows], point, test_labels, detailed=False)
                    row = {"method": row_names[method], "fold": fold, **scores, "train_seconds": float(seconds),
                           "n_parameters": int(n_parameters)}
                row["method"] = row_names[method]
                rows.append(row)
                predictions[row_names[method]][test_rows] = point
                logger.info(
                    "compare: fold %d %s %s (%.1f s)", fold, row["method"],
                    " ".join(f"{name} {row[name]:.3f}" for name in task.metric_names), row["train_seconds"],
                )
                (output_dir / "comparison.json").write_text(json.dumps(rows, indent=2) + "\n")
            if root is not None:
                from .pseudotime import fit_diffusion_pseudotime

                logger.info("compare: fold %d of %d, diffusion pseudotime", fold, n_folds)
                point, seconds = fit_diffusion_pseudotime(
                    cells, fold_processor, train_rows, targets.values[train_rows], test_rows, root, seed=seed
                )
                scores = task.score(test_labels.values[test_rows], point, test_labels, detailed=False)
                # the line mapping DPT to the training times: its slope and intercept
                rows.append({"method": DPT, "fold": fold, **scores, "train_seconds": float(seconds), "n_parameters": 2})
                predictions[DPT][test_rows] = point
                (output_dir / "comparison.json").write_text(json.dumps(rows, indent=2) + "\n")

        np.savez(output_dir / "comparison_predictions.npz", labels=test_labels.values if test_labels.values is not None else [],
                 fold=fold_of_cell, **predictions)
        scored = f"fold {fold_numbers[0]} of " if len(fold_numbers) == 1 and n_folds > 1 else ""
        title = f"{cells.name}, {task.summary}" + (f" of `{targets.key}`" if targets.key else "") + f", {scored}{description}"
        table = comparison_table(rows, task, title=title)
        (output_dir / "comparison.md").write_text(table)
        plot_comparison(rows, task, output_dir / "comparison.png", title=title)
        return ComparisonResult(rows=rows, predictions=predictions, folds=fold_of_cell, fold_models=fold_models)
    except BaseException:
        # a comparison that fails before its first result leaves no half-made output folder behind
        if created and not (output_dir / "comparison.json").exists():
            shutil.rmtree(output_dir, ignore_errors=True)
        raise


def summarise(rows: Sequence[dict], task: Task) -> list[dict]:
    """Per method (in first-appearance order): number of folds, mean and std (sample std over
    folds; 0 for one fold) of each of the task's metrics and of the training seconds; the worst
    fold's value of the task's best-checkpoint metric; and the parameter count (mean)."""
    metric_names = task.metric_names
    methods = list(dict.fromkeys(row["method"] for row in rows))
    summary = []
    for method in methods:
        chosen = [row for row in rows if row["method"] == method]

        def stats(key):
            values = [float(row[key]) for row in chosen]
            return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

        worst = min if task.greater_is_better else max
        summary.append(
            {
                "method": method,
                "folds": len(chosen),
                **{name: stats(name) for name in metric_names},
                "train_seconds": stats("train_seconds"),
                "worst_fold": worst(float(row[task.best_metric]) for row in chosen),
                "n_parameters": int(round(statistics.fmean(int(row["n_parameters"]) for row in chosen))),
            }
        )
    return summary


def comparison_table(rows: Sequence[dict], task: Task, title: str | None = None) -> str:
    """A Markdown table of :func:`summarise`: mean ± std over the scored folds, or the single
    figure when one fold was scored."""
    names = list(task.metric_names)
    labels = [task.metric_labels.get(name, name) for name in names]
    summary = summarise(rows, task)
    several = any(entry["folds"] > 1 for entry in summary)
    lines = [f"**{title}**", ""] if title else []
    worst = f"worst-fold {task.metric_labels.get(task.best_metric, task.best_metric)}"
    header = ["method", "folds", *labels] + ([worst] if several else []) + ["train s / fold", "parameters"]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for entry in summary:
        figures = [f"{entry[n][0]:.3f} ± {entry[n][1]:.3f}" if entry["folds"] > 1 else f"{entry[n][0]:.3f}" for n in names]
        cells = [entry["method"], str(entry["folds"]), *figures]
        if several:
            cells.append(f"{entry['worst_fold']:.3f}")
        cells += [f"{entry['train_seconds'][0]:.1f}", f"{entry['n_parameters']:,}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_comparison(rows: Sequence[dict], task: Task, path: str | Path, title: str = "") -> None:
    """One panel per metric: bars of the mean per method with the value written on them, one
    dot per fold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(task.metric_names)
    summary = summarise(rows, task)
    methods = [entry["method"] for entry in summary]
    figure, axes = plt.subplots(1, len(names), figsize=(max(6, 1.3 * len(methods) * len(names)), 4.2), squeeze=False)
    for axis, name in zip(axes[0], names):
        means = [entry[name][0] for entry in summary]
        stds = [entry[name][1] for entry in summary]
        positions = np.arange(len(methods))
        bars = axis.bar(positions, means, yerr=stds, color="#9ecae1", edgecolor="#3182bd", capsize=4)
        axis.bar_label(bars, labels=[f"{m:.3f}" for m in means], padding=2, fontsize=8)
        for position, method in zip(positions, methods):
            values = [row[name] for row in rows if row["method"] == method]
            if len(values) > 1:
                axis.scatter(np.full(len(values), position), values, color="#08519c", s=12, zorder=3)
        axis.set_xticks(positions, methods, rotation=30, ha="right")
        axis.set_ylabel(task.metric_labels.get(name, name))
        if task.greater_is_better:
            axis.set_ylim(0, 1.08)
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


__all__ = ["ComparisonResult", "compare", "comparison_table", "parse_methods", "plot_comparison", "summarise"]
