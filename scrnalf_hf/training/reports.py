"""The output folder of ``scrnalf finetune`` / ``scrnalf pretrain``: Hub-ready, with the figures
of the run that made it.

Files written to ``output_dir`` (on the main process only):

``model.safetensors``, ``config.json``, ``preprocessor_config.json``, ``*_scrnalf.py``
    the best model, its processor, the task's pipeline and their remote code.
``README.md``
    the model card, rendered from the files below (:mod:`scrnalf_hf.hub.cards`), so that
    ``scrnalf push --model-dir output_dir`` needs nothing else.
``all_results.json`` / ``train_results.json`` / ``eval_results.json`` / ``trainer_state.json``
    as transformers' example scripts write them; ``eval_*`` are the held-out cells' scores
    (the validation cells' where no cells were held out).
``comparison.json``
    ``scrnalf compare`` rows (``method``, ``fold`` = 0, the task's metrics, ``train_seconds``,
    ``n_parameters``) of the model and every baseline measured on this split.
``training_summary.json``
    everything above plus the training settings that actually ran (epochs run and planned,
    steps, best step, learning rate, batch size, class weighting, ...).
``run_info.json``
    the subset the model card reads about the data: ``dataset``, ``label_key``, ``species``,
    cell counts, ``split``, ``hardware``, ``seed``.
``split.json``
    what identifies the split (seed, cells, train and test positions), checked on resume.
``.scrnalf-export.json``
    the exported files (every one above but ``split.json``) with their sha256: what the card
    belongs to.

Interruptions. The folder also holds Trainer's ``checkpoint-N/``, so it is not renamed as a
whole; instead every exported file is written into a hidden staging folder inside it,
``.export-incomplete-PID-XXXXXXXX``, and only once all are complete moved into place
(:func:`publish_export`): the previous model card is removed first, then each file replaces its
namesake (``os.replace``), and the new card comes last. So a folder with a ``README.md`` (what
``scrnalf push`` requires) holds one run's complete export, the previous one or the new one,
whenever the run is killed; a folder without one is being replaced (push refuses it). The next
run into the folder removes staging folders whose process is gone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path


from ..data.cells import Cells
from ..machine import hardware_description
from ..staging import WRITER_FILE, record_writer, remove_dead_staging, staging_path
from .finetune import FitResult, HeldOutScores

logger = logging.getLogger(__name__)

EXPORT_STAGING = ".export-incomplete"
EXPORT_RECORD = ".scrnalf-export.json"
CARD = "README.md"


def write_json(path: Path, payload) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def _write_metrics(folder: Path, split: str, metrics: dict) -> None:
    """``{split}_results.json`` and ``all_results.json`` as ``Trainer.save_metrics(combined=True)``
    writes them, but into ``folder``."""
    (folder / f"{split}_results.json").write_text(json.dumps(metrics, indent=4, sort_keys=True))
    combined = folder / "all_results.json"
    everything = json.loads(combined.read_text()) if combined.is_file() else {}
    everything.update(metrics)
    combined.write_text(json.dumps(everything, indent=4, sort_keys=True))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_record(folder: Path) -> dict | None:
    """``.scrnalf-export.json`` of ``folder``: ``{"files": {name: sha256}}``, or None."""
    try:
        record = json.loads((Path(folder) / EXPORT_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("files"), dict) else None


def remove_interrupted_exports(output_dir: Path) -> list[Path]:
    """Removes the staging folders of exports into ``output_dir`` whose process is gone (logged);
    raises if another process is exporting into it right now."""
    removed, running = remove_dead_staging(output_dir, EXPORT_STAGING, "finetune/pretrain export")
    if running:
        raise FileExistsError(
            f"another run is writing its output into {output_dir} ({running[0].name}); wait for it or choose another "
            "--output-dir."
        )
    return removed


def publish_export(staging: Path, output_dir: Path) -> None:
    """Moves the complete export in ``staging`` into ``output_dir``, the model card last.

    The previous card goes first, so that from then until the new card arrives the folder does
    not look finished; files of the previous export the new one lacks are removed.
    """
    staging, output_dir = Path(staging), Path(output_dir)
    (staging / WRITER_FILE).unlink(missing_ok=True)
    names = sorted(p.name for p in staging.iterdir())
    if CARD not in names or EXPORT_RECORD not in names:
        raise RuntimeError(f"{staging} lacks {CARD} or {EXPORT_RECORD}; the export is incomplete.")
    (output_dir / CARD).unlink(missing_ok=True)
    previous = export_record(output_dir)
    (output_dir / EXPORT_RECORD).unlink(missing_ok=True)
    for name in (previous or {}).get("files", {}):
        if name not in names and "/" not in name and not name.startswith("."):
            (output_dir / name).unlink(missing_ok=True)
    for name in names:
        if name not in (CARD, EXPORT_RECORD):
            os.replace(staging / name, output_dir / name)
    os.replace(staging / EXPORT_RECORD, output_dir / EXPORT_RECORD)
    os.replace(staging / CARD, output_dir / CARD)
    shutil.rmtree(staging, ignore_errors=True)


def training_settings(result: FitResult) -> dict:
    """What the training run actually did, from Trainer's state and arguments."""
    state, args = result.trainer.state, result.trainer.args
    best_step = None
    if state.best_model_checkpoint:
        best_step = int(Path(state.best_model_checkpoint).name.split("-")[-1])
    return {
        "epochs_run": float(state.epoch or 0.0),
        "epochs_planned": float(args.num_train_epochs),
        "global_step": int(state.global_step),
        "best_step": best_step,
        "best_metric": {"name": args.metric_for_best_model, "value": state.best_metric} if state.best_metric is not None else None,
        "learning_rate": float(args.learning_rate),
        "embedding_learning_rate": float(args.learning_rate) * result.trainer.embedding_lr_multiplier,
        "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        "warmup_steps": float(args.warmup_steps),
        "batch_size": int(args.per_device_train_batch_size) * int(args.gradient_accumulation_steps) * int(args.world_size),
        "weight_decay": float(args.weight_decay),
        "label_smoothing": float(getattr(result.model.config, "label_smoothing", 0.0) or 0.0),
        "early_stopped": bool(state.epoch is not None and state.epoch < args.num_train_epochs and args.max_steps <= 0),
    }


def write_run_outputs(
    output_dir: Path,
    cells: Cells,
    result: FitResult,
    held_out: HeldOutScores | None,
    baselines: list[dict],
    *,
    method: str,
    preset: str | None,
    model_name_or_path: str | None,
    class_weighting: str | None,
    freeze: bool,
    evaluation: dict | None = None,
) -> dict:
    """Write the Hub-ready model folder, the run records and the model card (module docstring).

    ``evaluation``: ``trainer.evaluate()`` of the kept model when nothing is held out, computed by
    every process of a distributed run (its gathers need them all; only the main one writes);
    evaluated here when not given.

    Everything is written into a staging folder inside ``output_dir`` and moved into place,
    the model card last, only when complete (module docstring). Returns the training summary.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    remove_interrupted_exports(output_dir)
    staging = staging_path(output_dir, EXPORT_STAGING)
    staging.mkdir()
    try:
        record_writer(staging)
        summary = _write_export(staging, cells, result, held_out, baselines, method=method, preset=preset,
                                model_name_or_path=model_name_or_path, class_weighting=class_weighting, freeze=freeze,
                                evaluation=evaluation, model_name=output_dir.resolve().name)
        write_json(staging / EXPORT_RECORD, {
            "files": {p.name: _sha256(p) for p in sorted(staging.iterdir()) if p.is_file() and p.name != WRITER_FILE},
        })
        publish_export(staging, output_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return summary


def _write_export(
    output_dir: Path, cells: Cells, result: FitResult, held_out: HeldOutScores | None, baselines: list[dict], *,
    method: str, preset: str | None, model_name_or_path: str | None, class_weighting: str | None, freeze: bool,
    evaluation: dict | None = None, model_name: str | None = None,
) -> dict:
    """``model_name``: the card's name (the final folder's, not the staging folder's it is written in)."""
    from ..hub.cards import write_model_card
    from ..hub.folder import save_hub_folder

    task, trainer = result.task, result.trainer
    save_hub_folder(result.model, result.processor, output_dir)
    trainer.state.save_to_json(str(output_dir / "trainer_state.json"))
    if held_out is not None:
        scores, n_eval = held_out.metrics, len(held_out.rows)
    else:  # nothing held out: the validation cells' scores of the kept model
        if evaluation is None:
            evaluation = trainer.evaluate() if trainer.eval_dataset is not None else {}
        scores = {key.removeprefix("eval_"): value for key, value in evaluation.items() if key.startswith("eval_")}
        n_eval = len(result.validation_rows)
    eval_metrics = {f"eval_{name}": float(scores[name]) for name in task.metric_names if name in scores}
    eval_metrics["eval_samples"] = int(n_eval)
    if held_out is not None:
        eval_metrics["eval_samples_per_second"] = held_out.cells_per_second
    train_metrics = {k: v for k, v in result.train_metrics.items() if isinstance(v, (int, float))}
    train_metrics["train_samples"] = int(len(result.train_rows))
    _write_metrics(output_dir, "train", train_metrics)
    _write_metrics(output_dir, "eval", eval_metrics)

    model_row = {"method": method, "fold": 0, **{name: float(scores[name]) for name in task.metric_names if name in scores},
                 "train_seconds": result.train_seconds, "n_parameters": result.n_parameters}
    write_json(output_dir / "comparison.json", [model_row, *baselines])
    metrics = {name: float(scores[name]) for name in task.metric_names if name in scores}
    if "per_class_f1" in scores and result.targets.names:
        metrics["per_class_f1"] = dict(zip(result.targets.names, scores["per_class_f1"]))
        metrics["confusion_matrix"] = {"labels": result.targets.names, "matrix": scores["confusion_matrix"]}
    hardware = hardware_description()
    summary = {
        "task": task.name,
        "dataset": cells.name,
        "target_key": result.targets.key,
        "label_key": result.targets.key if task.target_option == "label_key" else None,
        "preset": preset,
        "model_name_or_path": model_name_or_path,
        "n_train_cells": int(len(result.train_rows)),
        "n_validation_cells": int(len(result.validation_rows)),
        "n_eval_cells": int(n_eval),
        "metrics": metrics,
        "baselines": {row["method"]: {name: row[name] for name in task.metric_names if name in row} for row in baselines},
        "train_seconds": result.train_seconds,
        "train_cells_per_second": result.train_cells_per_second,
        "inference_cells_per_second": None if held_out is None else held_out.cells_per_second,
        "hardware": hardware,
        "n_parameters": result.n_parameters,
        "seed": int(trainer.args.seed),
        "class_weighting": class_weighting,
        "freeze_encoder": freeze,
        "input": cells.genes.matrix,
        "input_kind": cells.input_kind,
        "gene_panel": {"n_genes": result.processor.n_genes, "highly_variable_genes": result.processor.highly_variable_genes},
        "training": training_settings(result),
    }
    write_json(output_dir / "training_summary.json", summary)
    held_out_description = (
        f"{n_eval} held-out test cells" if held_out is not None else f"{n_eval} validation cells (no test cells held out)"
    )
    write_json(
        output_dir / "run_info.json",
        {
            "task": task.name,
            "dataset": cells.name,
            "label_key": summary["label_key"],
            "n_train_cells": summary["n_train_cells"],
            "n_eval_cells": summary["n_eval_cells"],
            "species": _species(cells),
            "split": (
                ("stratified" if result.targets.stratify is not None else "random")
                + f": {len(result.train_rows)} training, {len(result.validation_rows)} validation "
                f"(best checkpoint on {trainer.args.metric_for_best_model}), {held_out_description}"
            ),
            "hardware": hardware,
            "seed": summary["seed"],
        },
    )
    write_model_card(output_dir, repo_id=f"<org>/{model_name or output_dir.name}")
    return summary


def _species(cells: Cells) -> str | None:
    """The species of the cells, where the dataset records one (``convert --species`` or
    ``--species-key``); None otherwise."""
    if not isinstance(cells, Cells) or "species" not in cells.dataset.column_names:  # SOMA: one species
        return None
    names = sorted(set(map(str, cells.dataset.unique("species"))))
    return ", ".join(names) or None


def check_against_baselines(summary: dict) -> None:
    """Say loudly when a classifier does not beat the majority class (the first prototype's
    failure) or falls behind logistic regression on the same split."""
    model_f1 = summary["metrics"].get("macro_f1")
    majority, logreg = summary["baselines"].get("majority"), summary["baselines"].get("logreg")
    if model_f1 is None or majority is None or logreg is None:
        return
    logger.info(
        "held-out macro-F1: model %.3f | majority class %.3f | logistic regression %.3f",
        model_f1, majority["macro_f1"], logreg["macro_f1"],
    )
    if model_f1 <= majority["macro_f1"] + 0.05:
        logger.warning("the model is no better than always predicting the majority class: training failed.")
    elif model_f1 < logreg["macro_f1"] - 0.03:
        logger.warning("the model trails logistic regression by %.3f macro-F1 on this split.", logreg["macro_f1"] - model_f1)


__all__ = [
    "check_against_baselines",
    "export_record",
    "publish_export",
    "remove_interrupted_exports",
    "training_settings",
    "write_json",
    "write_run_outputs",
]
