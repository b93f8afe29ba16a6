"""``scrnalf scaling``: how each method's held-out macro-F1, training time and speed grow with
the number of labelled cells — the measurements behind "which model at which data scale".

1. One fixed, stratified held-out test set (``test_fraction`` of the labelled cells, at most
   ``max_test_cells``) is split off once; no method ever trains on it.
2. For every size ``n`` and repeat ``r``: a stratified subsample of ``n`` cells of the rest (at
   least 2 cells of every class, the rest shared out in proportion), drawn with seed
   ``seed + r``; the same subsample for every method.
3. Every method is fitted on it with the same per-method fitting ``compare`` uses: transformer
   presets (and, with ``pretrained``, a saved model) through
   :func:`~scrnalf_hf.training.finetune.finetune` (a validation part of the subsample picks the
   best epoch, as in ``compare``) and :func:`~scrnalf_hf.training.finetune.score_held_out`;
   baselines through :func:`~scrnalf_hf.training.baselines.fit_baseline` on the processor's
   panel of the subsample (every training cell: no 20,000-cell cap here, a learning curve must
   not flatten because of one).
4. Each fit records macro-F1 and accuracy on the test set, wall and CPU seconds of training and
   of predicting, cells/s, and an **energy estimate** (measured CPU seconds × a stated power per
   busy core; see :func:`energy_wh_per_million_cells`).

Writes into ``output_dir``: ``scaling.json`` (settings, the exact command, the machine, every
row, the per-(method, size) summary with a 95% interval, and the crossover points),
``scaling.md`` (tables) and ``scaling.png`` (learning curves on a log x-axis, crossovers marked).
Every file is rewritten atomically after each fit, so an interrupted run keeps what it finished
and ``resume=True`` carries on from it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
from transformers import TrainingArguments

from ..data.cells import Cells
from .tasks import Targets, Task

logger = logging.getLogger(__name__)

# A stated power per busy CPU core for the energy estimate (W). Server CPUs draw roughly 3–6 W per
# core at their rated power (e.g. an AMD EPYC of 64 cores at 280 W: 4.4 W); 10 W is a round figure
# above that which leaves room for memory and the rest of the platform. It is an assumption, not a
# measurement: the machines here expose no power counters (no RAPL under /sys/class/powercap).
WATTS_PER_CORE = 10.0
PRETRAINED = "pretrained"
REFERENCE = "logreg"  # the curve every other method is compared with for crossovers
GROWABLE_SETTINGS = ("sizes", "methods", "repeats")  # what --resume may add to
SCALING_FILES = ("scaling.json", "scaling.md", "scaling.png")


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def parse_sizes(sizes: str | Sequence[int]) -> list[int]:
    """``"1000,3000"`` -> ``[1000, 3000]`` (sorted), refusing non-integers, sizes ≤ 0 and repeats."""
    if isinstance(sizes, str):
        try:
            values = [int(item) for item in sizes.split(",") if item.strip()]
        except ValueError:
            raise ValueError(f"--sizes takes comma-separated numbers of cells, e.g. 1000,3000,10000; got {sizes!r}.") from None
    else:
        values = [int(item) for item in sizes]
    if not values:
        raise ValueError("--sizes is empty; give numbers of training cells, e.g. 1000,3000,10000.")
    if any(value <= 0 for value in values):
        raise ValueError(f"--sizes must be positive numbers of cells, got {values}.")
    if len(set(values)) != len(values):
        raise ValueError(f"a size is listed twice in --sizes {values}.")
    return sorted(values)


def stratified_subsample(pool: np.ndarray, size: int, labels: np.ndarray, seed: int) -> np.ndarray:
    """``size`` cells of ``pool`` with every class present: at least ``min(2, cells of the class)``
    cells of each, the rest shared out in proportion to the classes' sizes (largest remainders).

    scikit-learn's stratified split may leave a rare class with one cell or none at small sizes;
    fine-tuning needs two of every class (one to train on, one to validate with).

    Args:
        pool: (n,) row positions to draw from.
        labels: (n_rows,) class ids indexed by row position.

    Returns:
        Sorted int64 row positions, (size,).
    """
    pool = np.asarray(pool, dtype=np.int64)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels[pool], return_counts=True)
    floor = np.minimum(counts, 2)
    if size < floor.sum() or size > len(pool):
        raise ValueError(f"cannot draw {size} cells with 2 of each of {len(classes)} classes from {len(pool)} cells.")
    spare = size - floor.sum()
    share = (counts - floor) * spare / max(1, (counts - floor).sum())
    extra = np.floor(share).astype(np.int64)
    leftover = spare - extra.sum()
    order = np.argsort(-(share - extra), kind="stable")
    for index in order:
        if leftover == 0:
            break
        if floor[index] + extra[index] < counts[index]:
            extra[index] += 1
            leftover -= 1
    chosen = []
    for label, take in zip(classes, floor + extra):
        members = pool[labels[pool] == label]
        chosen.append(rng.choice(members, size=int(take), replace=False))
    return np.sort(np.concatenate(chosen))


def check_sizes(sizes: Sequence[int], pool_size: int, n_classes: int, what: str) -> None:
    """Every size must fit in the training pool and give every class two cells."""
    too_large = [size for size in sizes if size > pool_size]
    if too_large:
        raise ValueError(
            f"--sizes {too_large} exceed the {pool_size} labelled cells of {what!r} left after the held-out test set; "
            f"use sizes up to {pool_size} or a smaller --test-fraction / --max-test-cells."
        )
    too_small = [size for size in sizes if size < 2 * n_classes]
    if too_small:
        raise ValueError(
            f"--sizes {too_small} are too small for {n_classes} classes: every size needs at least 2 cells of each "
            f"class ({2 * n_classes} cells); use larger sizes."
        )


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


def cpu_seconds() -> float:
    """CPU seconds used so far by this process (every thread) and its finished children."""
    times = psutil.Process().cpu_times()
    return float(times.user + times.system + times.children_user + times.children_system)


def energy_wh_per_million_cells(cpu_s: float, n_cells: int, watts_per_core: float = WATTS_PER_CORE) -> float:
    """An *estimate* of energy per million cells: ``cpu_s × watts_per_core`` joules for ``n_cells``
    cells, scaled to 10⁶ cells, in Wh (÷ 3,600). CPU seconds already count every busy core, so
    the figure is per busy core; idle cores and the rest of the machine are not counted."""
    if n_cells <= 0:
        return float("nan")
    return cpu_s * watts_per_core / 3600.0 * 1e6 / n_cells


@dataclass
class _Stopwatch:
    """Wall and CPU seconds of a block."""

    wall: float = 0.0
    cpu: float = 0.0

    def __enter__(self) -> "_Stopwatch":
        self._wall, self._cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self._wall, cpu_seconds() - self._cpu


def epochs_for(n_cells: int, recipe_epochs: float, epoch_budget_cells: int | None) -> float:
    """Epochs of a transformer fit on ``n_cells``: the recipe's, or with a budget of
    ``epoch_budget_cells`` cell passes, ``budget / n_cells`` clipped to [1, recipe]."""
    if epoch_budget_cells is None:
        return float(recipe_epochs)
    return float(min(recipe_epochs, max(1.0, round(epoch_budget_cells / n_cells, 2))))


# ---------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------


def _fit_transformer(task, cells, targets, subset, test, method, training_args, *, pretrained, **fit_options) -> dict:
    from .finetune import finetune, score_held_out

    with _Stopwatch() as train:
        result = finetune(
            task, cells, targets, subset, training_args,
            preset=None if method == PRETRAINED else method,
            model_name_or_path=pretrained if method == PRETRAINED else None,
            n_top_genes=None if method == PRETRAINED else fit_options["n_top_genes"],
            class_weighting=fit_options["class_weighting"], config_overrides=fit_options["config_overrides"],
            validation_fraction=fit_options["validation_fraction"],
            early_stopping_patience=fit_options["early_stopping_patience"],
        )
    with _Stopwatch() as predict:
        held_out = score_held_out(result, test)
    return {
        "macro_f1": float(held_out.metrics["macro_f1"]), "accuracy": float(held_out.metrics["accuracy"]),
        "train": train, "predict": predict, "n_parameters": int(result.n_parameters),
        "epochs": float(result.trainer.state.epoch or 0.0), "n_fitted_cells": int(len(result.train_rows)),
    }


def _fit_baselines(task, cells, targets, subset, test, names, *, seed, class_weighting, n_top_genes) -> dict[str, dict]:
    """Each baseline on the subsample's panel, timed apart: panel and features are built once per
    subsample (``panel_seconds``, shared by the baselines and not counted in their training)."""
    from ..data.panel import fit_processor
    from .baselines import fit_baseline
    from .finetune import baseline_features, baselines_read_peaks, baselines_read_proteins

    with _Stopwatch() as panel:
        processor = fit_processor(cells, subset, n_top_genes, seed=seed)
        proteins, peaks = baselines_read_proteins(task, cells), baselines_read_peaks(task, cells)
        train_features = baseline_features(cells, subset, processor, proteins=proteins, peaks=peaks)
        test_features = baseline_features(test.cells, test.rows, processor, proteins=proteins, peaks=peaks)
    fitted = {}
    for name in names:
        with _Stopwatch() as whole:
            result = fit_baseline(name, task.baselines, train_features, targets.values[subset], test_features,
                                  seed=seed, class_weighting=class_weighting)
        scores = task.score(test.targets.values[test.rows], result.predictions, test.targets, detailed=False)
        train_cpu = result.train_cpu_seconds
        fitted[name] = {
            "macro_f1": float(scores["macro_f1"]), "accuracy": float(scores["accuracy"]),
            "train": _Stopwatch(result.train_seconds, train_cpu),
            "predict": _Stopwatch(max(0.0, whole.wall - result.train_seconds), max(0.0, whole.cpu - train_cpu)),
            "n_parameters": int(result.n_parameters), "epochs": None, "n_fitted_cells": int(len(subset)),
            "panel_seconds": panel.wall,
        }
    return fitted


def _warm_up(task, cells, targets, pool, labels, methods, training_args, output_dir, pretrained, fit_options, seed) -> None:
    """One short untimed fit per transformer method before the timed ones: the first use of a
    model compiles its kernels (``torch.compile``, tens of seconds), which would otherwise be
    charged to whichever size happens to come first."""
    if not methods:
        return
    n_classes = len(np.unique(labels[pool]))
    subset = stratified_subsample(pool, min(len(pool), max(4 * n_classes, 256)), labels, seed)
    for method in methods:
        run_dir = output_dir / "runs" / f"warmup_{method}"
        args = dataclasses.replace(training_args, output_dir=str(run_dir), num_train_epochs=1.0)
        from .finetune import CellPart

        logger.info("scaling: warming up %s (untimed)", method)
        _fit_transformer(task, cells, targets, subset, CellPart(cells, targets, subset[:64]), method, args,
                         pretrained=pretrained, **fit_options)
        shutil.rmtree(run_dir, ignore_errors=True)


def _row(method, size, repeat, fit: dict, n_test: int, watts_per_core: float) -> dict:
    train, predict = fit["train"], fit["predict"]
    return {
        "method": method, "size": int(size), "repeat": int(repeat),
        "macro_f1": fit["macro_f1"], "accuracy": fit["accuracy"],
        "train_seconds": float(train.wall), "train_cpu_seconds": float(train.cpu),
        "train_cells_per_second": float(size / train.wall) if train.wall > 0 else float("nan"),
        "predict_seconds": float(predict.wall), "predict_cpu_seconds": float(predict.cpu),
        "predict_cells_per_second": float(n_test / predict.wall) if predict.wall > 0 else float("nan"),
        "train_wh_per_million_cells_estimate": energy_wh_per_million_cells(train.cpu, size, watts_per_core),
        "predict_wh_per_million_cells_estimate": energy_wh_per_million_cells(predict.cpu, n_test, watts_per_core),
        "epochs": fit["epochs"], "n_parameters": fit["n_parameters"], "n_fitted_cells": fit["n_fitted_cells"],
        **({"panel_seconds": float(fit["panel_seconds"])} if "panel_seconds" in fit else {}),
    }


def scaling(
    task: Task,
    cells: Cells,
    targets: Targets,
    sizes: str | Sequence[int],
    methods: str | Sequence[str],
    output_dir: str | Path,
    training_args: TrainingArguments,
    *,
    repeats: int = 3,
    test_fraction: float = 0.2,
    max_test_cells: int | None = 5000,
    pretrained: str | None = None,
    seed: int = 0,
    epoch_budget_cells: int | None = None,
    watts_per_core: float = WATTS_PER_CORE,
    class_weighting: str | None = None,
    config_overrides: dict | None = None,
    n_top_genes: int | None = None,
    validation_fraction: float = 0.1,
    early_stopping_patience: int = 8,
    resume: bool = False,
    command: str | None = None,
    description: str | None = None,
) -> dict:
    """Measure every method's learning curve on one dataset (see the module docstring).

    Args:
        task: a classification task (the study scores macro-F1).
        cells / targets: the dataset and its class labels.
        sizes: numbers of labelled training cells, e.g. ``"1000,3000,10000"``.
        methods: transformer presets and the task's baselines (``tiny,default,logreg,...``);
            the task's floor (``majority``) is added as ``compare`` does.
        output_dir: where scaling.json, .md and .png go (and runs/ of the transformer fits).
        training_args: Trainer settings of the transformer fits (``output_dir`` and epochs are
            replaced per fit).
        repeats: subsamples per size (seeds ``seed`` … ``seed + repeats - 1``).
        test_fraction / max_test_cells: the fixed held-out test set.
        pretrained: a saved model (folder or Hub id) fine-tuned at every size as the row
            ``pretrained``.
        epoch_budget_cells: cap the transformer fits at this many cell passes
            (:func:`epochs_for`); ``None``: the recipe's epochs at every size.
        watts_per_core: the power per busy core of the energy estimate.
        resume: keep the rows of an earlier run in ``output_dir`` with the same settings, except
            that this run may add sizes, methods and repeats (the record then holds them all, and
            ``commands`` every command line that wrote it).
        command: the command line that produced the run (recorded in scaling.json).
        description: what the data are (e.g. the simulator's settings), recorded with the run.

    Returns:
        The content of scaling.json.

    Raises:
        ValueError: before any fit: unknown methods, sizes larger than the data or too small for
            the classes, repeats < 1, a task without classes.
    """
    from ..data.splits import split_off
    from .compare import parse_methods
    from .finetune import CellPart, check_output_folder

    if targets.names is None:
        raise ValueError(f"scaling measures macro-F1 of cell classes; {task.summary} has none.")
    method_names = parse_methods(task, methods)
    if pretrained is not None:
        if PRETRAINED in method_names:
            raise ValueError(f"{PRETRAINED!r} is the row of --pretrained; do not list it in --methods.")
        method_names.append(PRETRAINED)
    sizes = parse_sizes(sizes)
    if repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {repeats}.")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"--test-fraction must lie in (0, 1), got {test_fraction}.")
    if max_test_cells is not None and max_test_cells < 1:
        raise ValueError(f"--max-test-cells must be a positive number of cells, got {max_test_cells}.")
    if epoch_budget_cells is not None and epoch_budget_cells < 1:
        raise ValueError(f"--epoch-budget-cells must be a positive number of cell passes, got {epoch_budget_cells}.")
    if not watts_per_core > 0:
        raise ValueError(f"--watts-per-core must be positive, got {watts_per_core}.")
    if n_top_genes is not None and n_top_genes < 1:
        raise ValueError(f"--n-top-genes must be a positive number of genes, got {n_top_genes}.")
    output_dir = check_output_folder(output_dir)
    if pretrained is not None:
        # a model that cannot be loaded must fail here, not after the baselines' first rows are written
        from ..hub.folder import model_source_errors
        from ..processing_scrnalf import ScrnaLongformerProcessor

        with model_source_errors(pretrained):
            ScrnaLongformerProcessor.from_pretrained(pretrained)

    usable = np.flatnonzero(targets.usable)
    labels = targets.values
    n_classes = len(np.unique(labels[usable]))
    n_test = int(round(test_fraction * len(usable)))
    if max_test_cells is not None:
        n_test = min(n_test, max_test_cells)
    n_test = max(n_test, n_classes)
    if len(usable) - n_test < 2 * n_classes:
        raise ValueError(f"{len(usable)} labelled cells of {n_classes} classes are too few for a test set and a training pool.")
    pool, test_rows = split_off(usable, n_test / len(usable), seed=seed, labels=labels)
    check_sizes(sizes, len(pool), n_classes, cells.name)
    test = CellPart(cells, targets, test_rows)

    settings = {
        "dataset": cells.name, "label_key": targets.key, "n_classes": int(n_classes), "n_genes": len(cells.genes.gene_symbols),
        "n_labelled_cells": int(len(usable)), "n_test_cells": int(len(test_rows)), "n_pool_cells": int(len(pool)),
        "sizes": sizes, "methods": method_names, "repeats": int(repeats), "seed": int(seed),
        "pretrained": pretrained, "epoch_budget_cells": epoch_budget_cells,
        "recipe_epochs": float(training_args.num_train_epochs), "learning_rate": float(training_args.learning_rate),
        "validation_fraction": validation_fraction, "early_stopping_patience": early_stopping_patience,
        "class_weighting": class_weighting, "config_overrides": config_overrides or {}, "n_top_genes": n_top_genes,
        "description": description,
    }
    from ..machine import describe_machine

    energy = {
        "watts_per_core": watts_per_core,
        "method": "estimate: measured CPU seconds (user + system, all threads) x watts_per_core / 3600, per 10^6 cells "
                  "(training: per million labelled training cells of the fit; inference: per million test cells)",
    }
    record = {"command": command or " ".join(sys.argv), "settings": settings, "energy": energy,
              "machine": describe_machine(), "rows": []}
    json_path = output_dir / "scaling.json"
    rows: list[dict] = []
    if json_path.exists():
        if not resume:
            raise ValueError(f"{json_path} exists; pass --resume to carry on with it, or choose a new --output-dir.")
        earlier = json.loads(json_path.read_text())
        before = earlier.get("settings", {})
        changed = sorted(k for k in settings if k not in GROWABLE_SETTINGS and before.get(k) != settings[k])
        if changed:
            raise ValueError(f"cannot resume {json_path}: its run had other settings ({', '.join(changed)}).")
        rows = earlier["rows"]
        # a resumed study may add sizes, methods or repeats: every subsample and the test set
        # follow from the seed, so the new fits see the cells the earlier ones would have
        settings.update(
            sizes=sorted(set(before["sizes"]) | set(sizes)),
            methods=list(dict.fromkeys([*before["methods"], *method_names])),
            repeats=max(int(before["repeats"]), int(repeats)),
        )
        record["commands"] = [*earlier.get("commands", [earlier["command"]]), record["command"]]
    done = {(row["method"], row["size"], row["repeat"]) for row in rows}
    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)

    transformer_methods = [m for m in method_names if m not in task.baselines]
    baseline_names = [m for m in method_names if m in task.baselines]
    fit_options = {"n_top_genes": n_top_genes, "class_weighting": class_weighting, "config_overrides": config_overrides,
                   "validation_fraction": validation_fraction, "early_stopping_patience": early_stopping_patience}
    from tqdm.auto import tqdm

    plan = [(size, repeat) for size in sizes for repeat in range(repeats)]
    todo = sum(1 for size, repeat in plan for m in method_names if (m, size, repeat) not in done)
    try:
        _warm_up(task, cells, targets, pool, labels, transformer_methods, training_args, output_dir, pretrained, fit_options, seed)
        with tqdm(total=todo, desc="scaling fits", unit="fit", disable=None) as bar:
            for size, repeat in plan:
                wanted = [m for m in method_names if (m, size, repeat) not in done]
                if not wanted:
                    continue
                subset = stratified_subsample(pool, size, labels, seed + repeat)
                fits: dict[str, dict] = {}
                baselines_wanted = [m for m in baseline_names if m in wanted]
                if baselines_wanted:
                    fits.update(_fit_baselines(task, cells, targets, subset, test, baselines_wanted, seed=seed + repeat,
                                               class_weighting=class_weighting, n_top_genes=n_top_genes))
                for method in method_names:
                    if method not in wanted:
                        continue
                    if method in transformer_methods:
                        run_dir = output_dir / "runs" / f"{method}_n{size}_r{repeat}"
                        args = dataclasses.replace(
                            training_args, output_dir=str(run_dir), seed=training_args.seed + repeat,
                            num_train_epochs=epochs_for(size, training_args.num_train_epochs, epoch_budget_cells),
                        )
                        fits[method] = _fit_transformer(task, cells, targets, subset, test, method, args,
                                                        pretrained=pretrained, **fit_options)
                        shutil.rmtree(run_dir, ignore_errors=True)  # the numbers are the result; models would fill the disk
                    row = _row(method, size, repeat, fits[method], len(test_rows), watts_per_core)
                    rows.append(row)
                    logger.info("scaling: %s n=%d repeat %d: macro-F1 %.3f, train %.1f s", method, size, repeat,
                                row["macro_f1"], row["train_seconds"])
                    record["rows"] = rows
                    write_results(record, output_dir)
                    bar.update(1)
        record["rows"] = rows
        shutil.rmtree(output_dir / "runs", ignore_errors=True)
        return write_results(record, output_dir, plot=True)
    except BaseException:
        if created and not json_path.exists():
            shutil.rmtree(output_dir, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------
# Summaries, crossovers, files
# ---------------------------------------------------------------------------------------------


def _interval(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and two-sided 95% t-interval of the mean over repeats, clipped to [0, 1] (the mean
    twice for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean, mean
    from scipy.stats import t

    half = t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    # a score lies in [0, 1]: the interval is clipped to it (two repeats give t = 12.7, a wide interval)
    return mean, float(max(0.0, mean - half)), float(min(1.0, mean + half))


def summarise(rows: Sequence[dict]) -> list[dict]:
    """Per (method, size): repeats, macro-F1 mean and 95% interval, accuracy mean, and the means
    of the timings, speeds and energy estimates."""
    keys = ["accuracy", "train_seconds", "train_cpu_seconds", "train_cells_per_second", "predict_seconds",
            "predict_cells_per_second", "train_wh_per_million_cells_estimate", "predict_wh_per_million_cells_estimate",
            "n_parameters"]
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["size"]), []).append(row)
    summary = []
    for (method, size), chosen in groups.items():
        mean, low, high = _interval([row["macro_f1"] for row in chosen])
        entry = {"method": method, "size": size, "repeats": len(chosen), "macro_f1": mean,
                 "macro_f1_ci95": [low, high]}
        for key in keys:
            entry[key] = statistics.fmean(float(row[key]) for row in chosen)
        summary.append(entry)
    return sorted(summary, key=lambda e: (e["size"], e["method"]))


def crossovers(summary: Sequence[dict], reference: str = REFERENCE) -> dict[str, dict]:
    """Where each method's mean macro-F1 curve crosses ``reference``'s (logistic regression).

    Per method: ``difference`` per size (method − reference, mean macro-F1), ``overtakes_at``
    (the first measured size from which the method stays above the reference at every larger
    measured size; None if it never does), ``crossing_estimate`` (the size where the difference
    changes sign, interpolated on a log scale between the two measured sizes around it; None when
    it does not change sign) and ``separated_at`` (sizes where the two 95% intervals do not
    overlap, with the sign)."""
    by = {(e["method"], e["size"]): e for e in summary}
    methods = list(dict.fromkeys(e["method"] for e in summary if e["method"] != reference))
    result = {}
    for method in methods:
        sizes = sorted(s for (m, s) in by if m == method and (reference, s) in by)
        if not sizes:
            continue
        diff = [by[(method, s)]["macro_f1"] - by[(reference, s)]["macro_f1"] for s in sizes]
        overtakes = None
        for index in range(len(sizes)):
            if all(d > 0 for d in diff[index:]):
                overtakes = sizes[index]
                break
        estimate = None
        for index in range(1, len(sizes)):
            if diff[index - 1] <= 0 < diff[index] or diff[index - 1] >= 0 > diff[index]:
                a, b = math.log(sizes[index - 1]), math.log(sizes[index])
                fraction = diff[index - 1] / (diff[index - 1] - diff[index])
                estimate = {"size": float(math.exp(a + fraction * (b - a))),
                            "direction": "overtakes" if diff[index] > 0 else "falls behind"}
        separated = []
        for s in sizes:
            mine, theirs = by[(method, s)]["macro_f1_ci95"], by[(reference, s)]["macro_f1_ci95"]
            if by[(method, s)]["repeats"] > 1 and (mine[0] > theirs[1] or mine[1] < theirs[0]):
                separated.append({"size": s, "method_better": bool(mine[0] > theirs[1])})
        result[method] = {"sizes": sizes, "difference": diff, "overtakes_at": overtakes,
                          "crossing_estimate": estimate, "separated_at": separated,
                          "min_repeats": min(by[(method, s)]["repeats"] for s in sizes)}
    return result


def crossover_sentences(crossing: dict[str, dict], reference: str = REFERENCE) -> list[str]:
    """One plain sentence per method about its crossing with the reference."""
    lines = []
    for method, info in crossing.items():
        if method == "majority":
            continue
        sizes = info["sizes"]
        span = f"{sizes[0]:,}–{sizes[-1]:,} cells"
        if info["overtakes_at"] is not None and info["overtakes_at"] == sizes[0]:
            text = f"`{method}` is above `{reference}` at every measured size ({span})"
        elif info["overtakes_at"] is not None:
            est = info["crossing_estimate"]
            near = f" (log-interpolated crossing ≈ {est['size']:,.0f} cells)" if est else ""
            text = f"`{method}` overtakes `{reference}` from {info['overtakes_at']:,} cells on{near}"
        elif all(d <= 0 for d in info["difference"]):
            text = f"`{method}` never overtakes `{reference}` in {span} (no crossover)"
        else:
            text = f"`{method}` and `{reference}` cross back and forth in {span} (no lasting crossover)"
        gaps = ", ".join(f"{s:,}: {d:+.3f}" for s, d in zip(sizes, info["difference"]))
        separated = [f"{e['size']:,}" for e in info["separated_at"]]
        if separated:
            tail = f"; 95% intervals apart at {', '.join(separated)}"
        elif info.get("min_repeats", 2) < 2:
            tail = f"; {method} has one repeat at some sizes (no interval there), the intervals overlap where both have two or more"
        else:
            tail = "; 95% intervals overlap at every size"
        lines.append(f"{text}. Mean macro-F1 difference per size: {gaps}{tail}.")
    return lines


def _speed(cells_per_second: float) -> str:
    """Cells/s with enough digits to tell slow fits apart (0.49, not 0)."""
    return f"{cells_per_second:,.0f}" if cells_per_second >= 100 else f"{cells_per_second:.3g}"


def _display_order(methods) -> list[str]:
    """Transformer methods first (in study order), then the baselines, the majority floor last:
    a resumed study that added a preset shows it beside the other presets."""
    from .tasks import CLASSIFICATION

    return sorted(methods, key=lambda m: (m in CLASSIFICATION.baselines, m == "majority"))


def scaling_table(record: dict) -> str:
    """The Markdown of scaling.md: the command, macro-F1 per size and method (mean [95% interval]),
    then timings, speeds and energy estimates, then the crossovers."""
    summary, settings = record["summary"], record["settings"]
    methods = _display_order(m for m in settings["methods"] if any(e["method"] == m for e in summary))
    sizes = sorted({e["size"] for e in summary})
    by = {(e["method"], e["size"]): e for e in summary}
    lines = [
        f"**{settings['dataset']}** · `{settings['label_key']}` · {settings['n_classes']} classes · {settings['n_genes']:,} genes · "
        f"fixed held-out test set of {settings['n_test_cells']:,} cells · {settings['repeats']} repeat(s) per size",
        "",
        "```bash", *record.get("commands", [record["command"]]), "```", "",
    ]
    if settings.get("description"):
        lines += [settings["description"], ""]
    lines += ["Held-out macro-F1, mean [95% interval over repeats]:", "",
              "| training cells | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for size in sizes:
        cells = []
        for m in methods:
            e = by.get((m, size))
            cells.append("—" if e is None else (f"{e['macro_f1']:.3f} [{e['macro_f1_ci95'][0]:.3f}, {e['macro_f1_ci95'][1]:.3f}]"
                                                if e["repeats"] > 1 else f"{e['macro_f1']:.3f}"))
        lines.append(f"| {size:,} | " + " | ".join(cells) + " |")
    watts = record["energy"]["watts_per_core"]
    lines += ["", f"Training and inference per fit (means over repeats). Energy columns are **estimates**: measured CPU seconds × "
              f"{watts:g} W per busy core, per million cells (training: labelled cells of the fit; inference: test cells).", "",
              "| training cells | method | train s | train CPU s | train cells/s | train Wh / 10⁶ cells (est.) | "
              "predict cells/s | predict Wh / 10⁶ cells (est.) | parameters |",
              "|---|---|---|---|---|---|---|---|---|"]
    for size in sizes:
        for m in methods:
            e = by.get((m, size))
            if e is None:
                continue
            lines.append(
                f"| {size:,} | {m} | {e['train_seconds']:.1f} | {e['train_cpu_seconds']:.1f} | {_speed(e['train_cells_per_second'])} | "
                f"{e['train_wh_per_million_cells_estimate']:.2f} | {_speed(e['predict_cells_per_second'])} | "
                f"{e['predict_wh_per_million_cells_estimate']:.3f} | {e['n_parameters']:,.0f} |"
            )
    missing = record.get("unfinished") or []
    if missing:
        listed = ", ".join(f"{e['method']} at {e['size']:,} ({e['repeats_done']} of {settings['repeats']} repeats)" for e in missing)
        lines += ["", f"**Not measured** (fewer repeats than the study's {settings['repeats']}: a run stopped before them, "
                  f"or the command that added them asked for fewer): {listed}."]
    sentences = crossover_sentences(record["crossovers"])
    if sentences:
        lines += ["", "Crossovers with logistic regression (mean curves):", ""] + [f"- {s}" for s in sentences]
    return "\n".join(lines) + "\n"


STYLES = {"logreg": ("k", "^", ":"), "random_forest": ("#8c564b", "v", ":"), "majority": ("#999999", "x", ":"),
          "knn_pca": ("#7f7f7f", "d", ":"), "tiny": ("#1f77b4", "o", "-"), "default": ("#d62728", "s", "-"),
          "large": ("#2ca02c", "D", "-"), PRETRAINED: ("#9467bd", "*", "--")}


def plot_scaling(record: dict, path: str | Path) -> None:
    """Left: macro-F1 (mean, 95% band) against training cells on a log axis, with a dotted line
    where a preset overtakes logistic regression for good. Right: training seconds (log–log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = record["summary"]
    methods = _display_order(m for m in record["settings"]["methods"] if any(e["method"] == m for e in summary))
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    for method in methods:
        chosen = sorted((e for e in summary if e["method"] == method), key=lambda e: e["size"])
        color, marker, line = STYLES.get(method, (None, "o", "-"))
        x = [e["size"] for e in chosen]
        left.plot(x, [e["macro_f1"] for e in chosen], line, marker=marker, color=color, label=method)
        left.fill_between(x, [e["macro_f1_ci95"][0] for e in chosen], [e["macro_f1_ci95"][1] for e in chosen],
                          color=color, alpha=0.12, linewidth=0)
        right.plot(x, [e["train_seconds"] for e in chosen], line, marker=marker, color=color, label=method)
    for method, info in record["crossovers"].items():
        if method == "majority" or info["overtakes_at"] is None or info["overtakes_at"] == info["sizes"][0]:
            continue
        estimate = info["crossing_estimate"]
        where = estimate["size"] if estimate else info["overtakes_at"]
        color = STYLES.get(method, (None,))[0]
        left.axvline(where, color=color, linestyle=":", alpha=0.8)
        left.annotate(f"{method} > logreg\n≈{where:,.0f}", (where, 0.04), fontsize=8, color=color, ha="center")
    settings = record["settings"]
    left.set_xscale("log")
    left.set_xlabel("labelled training cells")
    left.set_ylabel(f"held-out macro-F1 ({settings['n_test_cells']:,} test cells)")
    left.set_ylim(0, 1.02)
    left.grid(alpha=0.3, which="both")
    left.legend(fontsize=8)
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("labelled training cells")
    right.set_ylabel("training wall seconds per fit")
    right.grid(alpha=0.3, which="both")
    figure.suptitle(f"{settings['dataset']} · {settings['label_key']} · {settings['n_classes']} classes · "
                    f"{settings['n_genes']:,} genes · {settings['repeats']} repeat(s)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def unfinished(record: dict) -> list[dict]:
    """Planned (method, size) fits that have fewer rows than repeats: a run stopped (or still
    going) before them. Empty for a finished run."""
    settings = record["settings"]
    done: dict[tuple[str, int], int] = {}
    for row in record["rows"]:
        done[(row["method"], row["size"])] = done.get((row["method"], row["size"]), 0) + 1
    return [{"method": m, "size": s, "repeats_done": done.get((m, s), 0)}
            for s in settings["sizes"] for m in settings["methods"] if done.get((m, s), 0) < settings["repeats"]]


def _atomic_write(path: Path, text: str) -> None:
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_text(text)
    os.replace(staging, path)


def write_results(record: dict, output_dir: Path, plot: bool = False) -> dict:
    """Summary and crossovers from the rows, then scaling.json and scaling.md (each replaced
    whole) and, with ``plot``, scaling.png."""
    record["summary"] = summarise(record["rows"])
    record["crossovers"] = crossovers(record["summary"])
    record["unfinished"] = unfinished(record)
    _atomic_write(output_dir / "scaling.json", json.dumps(record, indent=1) + "\n")
    _atomic_write(output_dir / "scaling.md", scaling_table(record))
    if plot:
        staging = output_dir / f".scaling.{os.getpid()}.png"
        plot_scaling(record, staging)
        os.replace(staging, output_dir / "scaling.png")
    return record


__all__ = [
    "WATTS_PER_CORE", "crossover_sentences", "crossovers", "cpu_seconds", "energy_wh_per_million_cells",
    "epochs_for", "parse_sizes", "plot_scaling", "scaling", "scaling_table", "stratified_subsample", "summarise", "unfinished",
    "write_results",
]
