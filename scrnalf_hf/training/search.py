"""``scrnalf search``: multi-objective hyperparameter search with ``Trainer.hyperparameter_search``
(optuna backend) — held-out macro-F1 *and* inference cells/s, so the answer is a Pareto front, not
one winner.

The space (the roadmap's): ``d_model``, ``depth``, ``n_heads``, ``knn_k``, ``attention_type``
(config fields of a fresh model built on ``base_preset``), ``learning_rate`` and
``num_train_epochs`` (TrainingArguments). Each trial trains on the training part of a stratified
split and is scored on the validation part after every epoch; its objectives are the last
evaluation's ``eval_macro_f1`` and ``eval_samples_per_second`` (cells/s of the evaluation pass on
this machine). The gene panel and the gene graphs (one per ``knn_k``) are built from the training
part only.

Writes into ``output_dir``:

``search.json``
    the command, settings, every trial (parameters, objectives, training seconds and CPU
    seconds, energy estimates per million cells) and which trials form the Pareto front.
``study.md`` / ``study.csv``
    the trials as a table (Pareto trials marked).
``pareto.png``
    macro-F1 against cells/s for every trial, the Pareto front joined.
``best_config/config.json``
    the Pareto trial with the highest macro-F1 as a loadable config
    (``ScrnaLongformerConfig.from_pretrained``), with ``search_choice.json`` beside it: its
    learning rate and epochs and the ``scrnalf finetune`` command that trains it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
from transformers import TrainerCallback, TrainingArguments

from ..data.cells import Cells
from .scaling import WATTS_PER_CORE, _atomic_write, cpu_seconds, energy_wh_per_million_cells
from .tasks import Targets, Task

logger = logging.getLogger(__name__)

# The roadmap's search space. ``dense`` attention is the O(G²) reference implementation; it is in
# the space only when asked for (``attention_types``), as it is far slower at any real panel size.
SPACE = {
    "d_model": [8, 16, 32, 64, 128],
    "depth": (1, 3),
    "n_heads": [1, 2, 4],
    "knn_k": [8, 16, 32],
    "attention_type": ["knn", "linear"],
    "learning_rate": (1e-4, 1e-2),
}
MODEL_FIELDS = ("d_model", "depth", "n_heads", "knn_k", "attention_type")
STUDY_NAME = "scrnalf-search"


class _Timing(TrainerCallback):
    """Per trial: wall and CPU seconds of training, of the evaluations in it, and the cells each
    saw; stored as the optuna trial's user attributes."""

    def __init__(self, trainer_ref: list, watts_per_core: float, n_train: int, n_eval: int):
        self.trainer_ref, self.watts, self.n_train, self.n_eval = trainer_ref, watts_per_core, n_train, n_eval

    def on_train_begin(self, args, state, control, **kwargs):
        import time

        self.start, self.start_cpu, self.eval_cpu, self.mark = time.perf_counter(), cpu_seconds(), 0.0, cpu_seconds()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.mark = cpu_seconds()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.last_eval_cpu = cpu_seconds() - self.mark
        self.eval_cpu += self.last_eval_cpu

    def on_train_end(self, args, state, control, **kwargs):
        import time

        trial = getattr(self.trainer_ref[0], "_trial", None)
        if trial is None or not hasattr(trial, "set_user_attr"):
            return
        wall, cpu = time.perf_counter() - self.start, cpu_seconds() - self.start_cpu - self.eval_cpu
        epochs = float(state.epoch or 0.0)
        trial.set_user_attr("train_seconds", wall)
        trial.set_user_attr("train_cpu_seconds", cpu)
        trial.set_user_attr("epochs", epochs)
        trial.set_user_attr("train_wh_per_million_cells_estimate",
                            energy_wh_per_million_cells(cpu, max(1, int(self.n_train * max(epochs, 1e-9))), self.watts))
        trial.set_user_attr("predict_wh_per_million_cells_estimate",
                            energy_wh_per_million_cells(getattr(self, "last_eval_cpu", float("nan")), self.n_eval, self.watts))


def search(
    task: Task,
    cells: Cells,
    targets: Targets,
    output_dir: str | Path,
    training_args: TrainingArguments,
    *,
    n_trials: int = 6,
    base_preset: str = "tiny",
    max_epochs: int = 3,
    attention_types: tuple[str, ...] = ("knn", "linear"),
    validation_fraction: float = 0.2,
    n_top_genes: int | None = None,
    seed: int = 0,
    watts_per_core: float = WATTS_PER_CORE,
    config_overrides: dict | None = None,
    command: str | None = None,
    train_file: str | None = None,
) -> dict:
    """Run the search (see the module docstring) and write its files; returns search.json's content.

    Args:
        task: a classification task.
        cells / targets: the dataset and its labels.
        training_args: the Trainer settings each trial starts from (learning rate and epochs
            are the trial's; evaluation every epoch; no checkpoints).
        n_trials: trials of the study.
        base_preset: the preset whose other config fields (MLP ratio, pooling, ...) every trial keeps.
        max_epochs: the largest ``num_train_epochs`` a trial may draw (from 1).
        attention_types: attention implementations in the space.
        validation_fraction: labelled cells held out to score the trials.
        config_overrides: config fields every trial keeps (e.g. ``kernel_implementation="eager"``:
            no compilation per trial, which dominates short trials; cells/s are then eager speeds).
        train_file: the input's path, for the printed ``scrnalf finetune`` command.

    Raises:
        ValueError: zero or negative trials or epochs, an unknown attention type or preset, a
            task without classes — before any training.
    """
    from ..configuration_scrnalf import ATTENTION_TYPES, ScrnaLongformerConfig
    from ..data.panel import fit_processor, gene_graph
    from ..data.splits import split_off
    from ..presets import PRESET_NAMES
    from .finetune import check_output_folder, make_collator
    from .trainer import ScrnaTrainer

    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise ValueError(f"--trials must be a positive number of trials, got {n_trials!r}.")
    if max_epochs < 1:
        raise ValueError(f"--max-epochs must be at least 1, got {max_epochs}.")
    if base_preset not in PRESET_NAMES:
        raise ValueError(f"unknown --base-preset {base_preset!r}; choose from {list(PRESET_NAMES)}.")
    unknown = [a for a in attention_types if a not in ATTENTION_TYPES]
    if unknown or not attention_types:
        raise ValueError(f"--attention-types must name some of {list(ATTENTION_TYPES)}, got {list(attention_types)}.")
    if targets.names is None:
        raise ValueError(f"search scores macro-F1 of cell classes; {task.summary} has none.")
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"--validation-fraction must lie in (0, 1), got {validation_fraction}.")
    output_dir = check_output_folder(output_dir)
    if (output_dir / "search.json").exists():
        raise ValueError(f"{output_dir / 'search.json'} exists; choose a new --output-dir.")
    import optuna

    usable = np.flatnonzero(targets.usable)
    train_rows, validation_rows = split_off(usable, validation_fraction, seed=seed, labels=targets.stratify)
    processor = fit_processor(cells, train_rows, n_top_genes, seed=seed)
    graphs: dict[int, np.ndarray] = {}

    def config_for(params: dict) -> ScrnaLongformerConfig:
        fields = {**targets.config, **(config_overrides or {}), **{k: params[k] for k in MODEL_FIELDS if k in params}}
        return ScrnaLongformerConfig.from_preset(base_preset, n_genes=processor.n_genes, **fields)

    def model_init(trial=None):
        params = {}
        if trial is not None:
            d_model = trial.suggest_categorical("d_model", SPACE["d_model"])
            params = {
                "d_model": d_model,
                "depth": trial.suggest_int("depth", *SPACE["depth"]),
                "n_heads": trial.suggest_categorical("n_heads", SPACE["n_heads"]),
                "knn_k": trial.suggest_categorical("knn_k", SPACE["knn_k"]),
                "attention_type": trial.suggest_categorical("attention_type", list(attention_types)),
            }
        config = config_for(params)
        model = task.model_class(config)
        k = min(config.knn_k, processor.n_genes)
        if k not in graphs:
            graphs[k] = gene_graph(processor, cells, train_rows, k=k)
        model.base_model.set_gene_graph(graphs[k])
        return model

    def hp_space(trial) -> dict:
        return {
            "learning_rate": trial.suggest_float("learning_rate", *SPACE["learning_rate"], log=True),
            "num_train_epochs": trial.suggest_int("num_train_epochs", 1, max_epochs),
        }

    def objectives(metrics: dict) -> list[float]:
        return [float(metrics["eval_macro_f1"]), float(metrics["eval_samples_per_second"])]

    runs = output_dir / "runs"
    args = dataclasses.replace(
        training_args, output_dir=str(runs), eval_strategy="epoch", save_strategy="no", load_best_model_at_end=False,
        remove_unused_columns=False,
    )
    base_config = config_for({})
    rows = cells.with_targets(targets.values)
    trainer_ref: list = []
    timing = _Timing(trainer_ref, watts_per_core, len(train_rows), len(validation_rows))
    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        trainer = ScrnaTrainer(
            model_init=model_init, args=args,
            data_collator=make_collator(task, processor, cells, base_config, seed, evaluation=False),
            eval_data_collator=make_collator(task, processor, cells, base_config, seed, evaluation=True),
            train_dataset=rows.select(train_rows), eval_dataset=rows.select(validation_rows),
            processing_class=processor, compute_metrics=task.trainer_metrics(targets), callbacks=[timing],
            embedding_lr_multiplier=task.embedding_lr_multiplier,
        )
        trainer_ref.append(trainer)
        storage = optuna.storages.InMemoryStorage()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        trainer.hyperparameter_search(
            hp_space=hp_space, compute_objective=objectives, n_trials=n_trials, direction=["maximize", "maximize"],
            backend="optuna", sampler=optuna.samplers.TPESampler(seed=seed), study_name=STUDY_NAME, storage=storage,
        )
        study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
        record = _study_record(study, settings={
            "dataset": cells.name, "label_key": targets.key, "n_genes": int(processor.n_genes), "n_classes": len(targets.names),
            "n_train_cells": int(len(train_rows)), "n_validation_cells": int(len(validation_rows)), "n_trials": n_trials,
            "base_preset": base_preset, "max_epochs": max_epochs, "attention_types": list(attention_types),
            "space": {**SPACE, "attention_type": list(attention_types), "num_train_epochs": [1, max_epochs]}, "seed": seed,
            "watts_per_core": watts_per_core, "config_overrides": config_overrides or {},
        }, command=command or " ".join(sys.argv))
        best = record["best"]
        best_dir = output_dir / "best_config"
        config = config_for(best["params"])
        config.save_pretrained(str(best_dir))
        overrides = ",".join([*(f"{k}={v}" for k, v in (config_overrides or {}).items() if k not in MODEL_FIELDS),
                              *(f"{k}={best['params'][k]}" for k in MODEL_FIELDS)])
        finetune_command = (
            f"scrnalf finetune --train-file {train_file or 'F'} --label-key {targets.key} --preset {base_preset} "
            f"--config-overrides {overrides} --learning-rate {best['params']['learning_rate']:.6g} "
            f"--num-train-epochs {best['params']['num_train_epochs']} --output-dir D"
        )
        best["finetune_command"] = finetune_command
        _atomic_write(best_dir / "search_choice.json", json.dumps(best, indent=1) + "\n")
        _atomic_write(output_dir / "search.json", json.dumps(record, indent=1) + "\n")
        _atomic_write(output_dir / "study.md", study_table(record))
        _write_csv(record, output_dir / "study.csv")
        plot_pareto(record, output_dir / "pareto.png")
        shutil.rmtree(runs, ignore_errors=True)
        return record
    except BaseException:
        if created:
            shutil.rmtree(output_dir, ignore_errors=True)
        raise


def _study_record(study, settings: dict, command: str) -> dict:
    """Every finished trial with its parameters, objectives and timings; the Pareto front; the best."""
    pareto = {trial.number for trial in study.best_trials}
    trials = []
    for trial in study.trials:
        if trial.values is None:
            continue
        trials.append({
            "trial": trial.number, "params": dict(trial.params), "macro_f1": float(trial.values[0]),
            "eval_cells_per_second": float(trial.values[1]), "pareto": trial.number in pareto,
            **{k: float(v) for k, v in trial.user_attrs.items()},
        })
    if not trials:
        raise ValueError("no trial of the search finished; see the log for the failures.")
    front = sorted((t for t in trials if t["pareto"]), key=lambda t: (-t["macro_f1"], -t["eval_cells_per_second"]))
    return {"command": command, "settings": settings, "trials": trials, "pareto_front": [t["trial"] for t in front],
            "best": dict(front[0], choice="the Pareto trial with the highest macro-F1 (ties: the faster)")}


def study_table(record: dict) -> str:
    """The trials as Markdown, best macro-F1 first; Pareto trials marked ★."""
    s = record["settings"]
    lines = [f"**{s['dataset']}** · `{s['label_key']}` · {s['n_train_cells']:,} training / {s['n_validation_cells']:,} "
             f"validation cells · {s['n_trials']} trials · base preset `{s['base_preset']}`", "",
             "```bash", record["command"], "```", "",
             "| trial | Pareto | d_model | depth | heads | knn_k | attention | learning rate | epochs | macro-F1 | eval cells/s "
             "| train s | train Wh / 10⁶ cells (est.) | predict Wh / 10⁶ cells (est.) |",
             "|---" * 14 + "|"]
    for t in sorted(record["trials"], key=lambda t: -t["macro_f1"]):
        p = t["params"]
        lines.append(
            f"| {t['trial']} | {'★' if t['pareto'] else ''} | {p['d_model']} | {p['depth']} | {p['n_heads']} | {p['knn_k']} | "
            f"{p['attention_type']} | {p['learning_rate']:.2e} | {p['num_train_epochs']} | {t['macro_f1']:.3f} | "
            f"{t['eval_cells_per_second']:,.0f} | {t.get('train_seconds', float('nan')):.1f} | "
            f"{t.get('train_wh_per_million_cells_estimate', float('nan')):.2f} | "
            f"{t.get('predict_wh_per_million_cells_estimate', float('nan')):.3f} |"
        )
    best = record["best"]
    lines += ["", f"Energy columns are estimates: measured CPU seconds × {s['watts_per_core']:g} W per busy core, per million "
              "cells (training: cell passes of the trial; inference: validation cells).", "",
              f"Best (Pareto, highest macro-F1): trial {best['trial']}, written to `best_config/`; train it with", "",
              "```bash", best.get("finetune_command", ""), "```"]
    return "\n".join(lines) + "\n"


def _write_csv(record: dict, path: Path) -> None:
    import pandas as pd

    frame = pd.DataFrame([{**{k: v for k, v in t.items() if k != "params"}, **t["params"]} for t in record["trials"]])
    staging = path.with_name(f".{path.name}.tmp")
    frame.to_csv(staging, index=False)
    staging.replace(path)


def plot_pareto(record: dict, path: Path) -> None:
    """Macro-F1 against evaluation cells/s (log x), every trial a dot, the Pareto front joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = record["trials"]
    front = sorted((t for t in trials if t["pareto"]), key=lambda t: t["eval_cells_per_second"])
    figure, axis = plt.subplots(figsize=(6, 4.2))
    axis.scatter([t["eval_cells_per_second"] for t in trials], [t["macro_f1"] for t in trials], color="#9ecae1",
                 edgecolor="#3182bd", label="trial")
    axis.plot([t["eval_cells_per_second"] for t in front], [t["macro_f1"] for t in front], "o-", color="#d62728",
              label="Pareto front")
    for t in trials:
        axis.annotate(str(t["trial"]), (t["eval_cells_per_second"], t["macro_f1"]), fontsize=7, xytext=(3, 3),
                      textcoords="offset points")
    axis.set_xscale("log")
    axis.set_xlabel("evaluation cells/s (this machine)")
    axis.set_ylabel("validation macro-F1")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8)
    s = record["settings"]
    axis.set_title(f"{s['dataset']}: {s['n_trials']} trials, macro-F1 vs speed", fontsize=10)
    figure.tight_layout()
    staging = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(staging, dpi=110)
    plt.close(figure)
    staging.replace(path)


__all__ = ["SPACE", "plot_pareto", "search", "study_table"]
