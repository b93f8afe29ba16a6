"""Cell-type fine-tuning with `transformers.Trainer`, and the ``scrnalf finetune`` command.

One run: cells are split (stratified) into training and held-out test cells; a validation part
of the training cells picks the best checkpoint (validation macro-F1) and stops training early.
The processor's panel and the gene graph come from the training cells only. The held-out cells
are scored once, by the best checkpoint, next to the majority class and logistic regression
fitted on exactly the same training cells and the same processor output.

Files written to ``--output-dir`` (all on the main process only):

``model.safetensors``, ``config.json``, ``preprocessor_config.json``, ``*_scrnalf.py``
    the best model, its processor and their remote code (a Hub-ready folder; the card is rendered
    by ``scrnalf_hf.hub``).
``all_results.json`` / ``train_results.json`` / ``eval_results.json`` / ``trainer_state.json``
    as transformers' example scripts write them; ``eval_*`` are the held-out test cells' scores.
``comparison.json``
    ``scrnalf compare`` rows (``method``, ``fold`` = 0, ``accuracy``, ``macro_f1``,
    ``train_seconds``, ``n_parameters``) for the model, ``majority`` and ``logreg`` on this split.
``training_summary.json``
    ``dataset``, ``label_key``, ``preset``, ``n_train_cells``, ``n_validation_cells``,
    ``n_eval_cells``, ``metrics`` (``accuracy``, ``macro_f1``, ``per_class_f1`` by label,
    ``confusion_matrix`` with ``labels``), ``majority`` and ``logreg`` (``accuracy``,
    ``macro_f1`` on the same split), ``train_seconds``, ``train_cells_per_second``,
    ``inference_cells_per_second``, ``hardware``, ``n_parameters``, ``seed``, ``class_weighting``,
    ``freeze_encoder``, ``model_name_or_path``.
``run_info.json``
    the subset the model card reads: ``dataset``, ``label_key``, ``n_train_cells``,
    ``n_eval_cells``, ``split``, ``hardware``, ``seed``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from transformers import EarlyStoppingCallback, Trainer, TrainingArguments, set_seed

from ..configuration_scrnalf import ScrnaLongformerConfig
from ..modeling_scrnalf import ScrnaLongformerEmbeddings, ScrnaLongformerForCellClassification
from ..processing_scrnalf import ScrnaLongformerProcessor
from .arguments import EMBEDDING_LR_MULTIPLIER
from .baselines import fit_baseline
from .cells import (
    CellDataset,
    LabelledCells,
    check_labels,
    check_split_sizes,
    encode,
    fit_processor,
    load_labelled_cells,
    stratified_split,
)
from .metrics import classification_metrics, make_compute_metrics

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Building the model
# ---------------------------------------------------------------------------------------------


def balanced_class_weights(labels: np.ndarray, n_classes: int) -> list[float]:
    """``n / (C · n_c)`` per class from the training labels — scikit-learn's ``"balanced"``."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    if (counts == 0).any():
        missing = np.flatnonzero(counts == 0).tolist()
        raise ValueError(f"classes {missing} have no training cells; cannot weight them.")
    return (len(labels) / (n_classes * counts)).tolist()


def hardware_description() -> str:
    """A short description of where this process trains, for reports and model cards."""
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}× {torch.cuda.get_device_name(0)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {cpu}, {torch.get_num_threads()} threads"


def build_classifier(
    processor: ScrnaLongformerProcessor,
    train_expression: np.ndarray,
    label_names: Sequence[str],
    *,
    preset: str | None = None,
    model_name_or_path: str | None = None,
    config_overrides: dict | None = None,
    class_weights: list[float] | None = None,
) -> ScrnaLongformerForCellClassification:
    """A cell classifier for ``label_names``: a fresh ``preset`` whose gene graph is built from
    ``train_expression`` (n_train, G), or a saved model whose own gene graph is kept (its head is
    replaced when the labels differ).

    Exactly one of ``preset`` / ``model_name_or_path`` must be given.
    """
    if (preset is None) == (model_name_or_path is None):
        raise ValueError("give exactly one of --preset (a fresh model) or --model (a saved one).")
    overrides = dict(config_overrides or {})
    id2label = dict(enumerate(label_names))
    label2id = {name: i for i, name in id2label.items()}
    if preset is not None:
        config = ScrnaLongformerConfig.from_preset(
            preset, n_genes=processor.n_genes, id2label=id2label, label2id=label2id,
            class_weights=class_weights, **overrides,
        )
        model = ScrnaLongformerForCellClassification(config)
        model.scrna_longformer.set_gene_graph(processor.build_gene_graph(train_expression, k=config.knn_k))
    else:
        model = ScrnaLongformerForCellClassification.from_pretrained(
            model_name_or_path, id2label=id2label, label2id=label2id, num_labels=len(label_names),
            class_weights=class_weights, ignore_mismatched_sizes=True, **overrides,
        )
    return model


def freeze_encoder(model: ScrnaLongformerForCellClassification) -> None:
    """Train only the classification head: every encoder parameter stops receiving gradients."""
    for parameter in model.scrna_longformer.parameters():
        parameter.requires_grad_(False)


def count_trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_parameters(model: torch.nn.Module) -> int:
    """All parameters (the gene-graph buffer is not one), frozen ones included."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Training and scoring one split
# ---------------------------------------------------------------------------------------------


@dataclass
class FinetuneResult:
    """What :func:`finetune` produced on one split.

    Attributes:
        metrics: test-cell ``accuracy``, ``macro_f1``, ``per_class_f1`` (num_labels,),
            ``confusion_matrix`` (num_labels × num_labels, rows = true class).
        predictions: (n_test,) predicted class ids.
        logits: (n_test, num_labels) classifier logits of the test cells.
        cell_embeddings: (n_test, d_model) pooled cell embeddings of the test cells.
    """

    model: ScrnaLongformerForCellClassification
    processor: ScrnaLongformerProcessor
    trainer: Trainer
    metrics: dict
    predictions: np.ndarray
    logits: np.ndarray
    cell_embeddings: np.ndarray
    train_index: np.ndarray
    validation_index: np.ndarray
    test_index: np.ndarray
    train_seconds: float
    train_cells_per_second: float
    inference_cells_per_second: float
    n_parameters: int
    train_metrics: dict = field(default_factory=dict)


class _SeededTrainer(Trainer):
    """Trainer whose loss is the model's own mean over the batch (the model ignores
    ``num_items_in_batch``, so Trainer must scale for gradient accumulation itself), whose label
    smoothing keeps the model's class weights, and whose optimizer gives the token embeddings
    ``embedding_lr_multiplier`` × the learning rate.

    Why the label smoothing is ours: Trainer's own ``--label_smoothing_factor`` takes the labels
    away from the model and scores the logits without ``config.class_weights``, so a comparison
    with ``--class-weighting balanced`` would weight the baselines but not the transformer.

    Why the embeddings get a larger step: gene and value embeddings are unit-scale (they are not
    normalised; see ``ScrnaLongformerEmbeddings``), while the layers' weights start at 0.02. Adam
    moves every weight by about the learning rate per step, so at a rate the layers tolerate
    (3e-3) the embeddings, which carry the gene-specific signal, change by 0.3 % per step and a
    few hundred cells train too slowly; a rate that suits the embeddings makes the layers diverge.
    """

    def __init__(self, *args, embedding_lr_multiplier: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False
        self.embedding_lr_multiplier = float(embedding_lr_multiplier)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.label_smoother is None or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = self.accelerator.unwrap_model(model).classification_loss(
            outputs.logits, labels, label_smoothing=self.args.label_smoothing_factor
        )
        return (loss, outputs) if return_outputs else loss

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.embedding_lr_multiplier == 1.0 or any(g.get("embedding_group") for g in optimizer.param_groups):
            return optimizer
        opt_model = self.model if model is None else model
        embedding_ids = {
            id(p) for module in opt_model.modules() if isinstance(module, ScrnaLongformerEmbeddings) for p in module.parameters()
        }
        moved_groups = []
        for group in optimizer.param_groups:
            moved = [p for p in group["params"] if id(p) in embedding_ids]
            if moved:
                group["params"] = [p for p in group["params"] if id(p) not in embedding_ids]
                settings = {k: v for k, v in group.items() if k not in ("params", "initial_lr")}
                settings["lr"] = group["lr"] * self.embedding_lr_multiplier
                moved_groups.append({**settings, "params": moved, "embedding_group": True})
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
        for group in moved_groups:
            optimizer.add_param_group(group)
        return optimizer


@torch.no_grad()
def predict_cells(
    model: ScrnaLongformerForCellClassification, expression: np.ndarray, attention_mask: np.ndarray, batch_size: int = 128
) -> tuple[np.ndarray, np.ndarray, float]:
    """Logits (n, num_labels), cell embeddings (n, d_model) and cells/s of a forward pass."""
    model.eval()
    device = next(model.parameters()).device
    logits, embeddings = [], []
    start = time.perf_counter()
    for first in range(0, len(expression), batch_size):
        output = model(
            expression=torch.from_numpy(expression[first : first + batch_size]).to(device),
            attention_mask=torch.from_numpy(attention_mask[first : first + batch_size]).to(device),
        )
        logits.append(output.logits.float().cpu().numpy())
        embeddings.append(output.cell_embedding.float().cpu().numpy())
    seconds = time.perf_counter() - start
    return np.concatenate(logits), np.concatenate(embeddings), len(expression) / max(seconds, 1e-9)


def finetune(
    cells: LabelledCells,
    train_index: np.ndarray,
    test_index: np.ndarray,
    training_args: TrainingArguments,
    *,
    preset: str | None = None,
    model_name_or_path: str | None = None,
    config_overrides: dict | None = None,
    freeze: bool = False,
    class_weighting: str | None = None,
    validation_fraction: float = 0.1,
    early_stopping_patience: int = 8,
    callbacks: Sequence = (),
) -> FinetuneResult:
    """Fine-tune a classifier on ``train_index`` cells and score it on ``test_index`` cells.

    A stratified ``validation_fraction`` of the training cells selects the best checkpoint
    (``eval_macro_f1``) and drives early stopping; with ``validation_fraction=0`` every training
    cell is trained on for the given epochs and the last epoch's model is scored. The processor
    and gene graph see only the remaining training cells. Checks that can fail (labels, split sizes, gene overlap with a saved
    model's panel) run before any training.

    Args:
        cells: all cells and labels (see :func:`~scrnalf_hf.training.cells.load_labelled_cells`).
        train_index / test_index: (n,) cell indices; disjoint.
        training_args: Trainer settings (``output_dir`` receives checkpoints).
        preset / model_name_or_path: a fresh preset or a saved model (exactly one).
        config_overrides: config fields to change (e.g. ``{"pooling": "cls"}``).
        freeze: train only the classification head.
        class_weighting: ``None`` or ``"balanced"``.
        callbacks: extra `TrainerCallback` objects.
    """
    if np.intersect1d(train_index, test_index).size:
        raise ValueError("training and test cells overlap; pass disjoint index arrays.")
    if class_weighting not in (None, "balanced"):
        raise ValueError(f"class_weighting must be None or 'balanced', got {class_weighting!r}.")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(
            f"validation_fraction must lie in [0, 1) (0: no validation split), got {validation_fraction}."
        )
    check_labels(cells.labels[train_index], cells.label_names, cells.label_key, min_cells=2)
    if validation_fraction == 0:
        inner_train, validation = np.sort(np.asarray(train_index)), np.array([], dtype=np.int64)
        training_args = dataclasses.replace(training_args, eval_strategy="no", load_best_model_at_end=False)
    else:
        inner_train, validation = stratified_split(train_index, cells.labels, validation_fraction, seed=training_args.seed)
    if not training_args.load_best_model_at_end or training_args.metric_for_best_model not in ("macro_f1", "eval_macro_f1"):
        logger.warning("best-checkpoint selection is off or not on macro_f1; the last epoch's model is scored.")

    set_seed(training_args.seed)
    if model_name_or_path is not None:
        processor = ScrnaLongformerProcessor.from_pretrained(model_name_or_path)
    else:
        processor = fit_processor(cells)
    train_inputs = encode(processor, cells, inner_train)  # raises on too little gene overlap
    validation_inputs = encode(processor, cells, validation)
    test_inputs = encode(processor, cells, test_index)

    weights = balanced_class_weights(cells.labels[inner_train], cells.n_classes) if class_weighting else None
    model = build_classifier(
        processor, train_inputs["expression"], cells.label_names, preset=preset,
        model_name_or_path=model_name_or_path, config_overrides=config_overrides, class_weights=weights,
    )
    if freeze:
        freeze_encoder(model)
    logger.info(
        "fine-tuning %s: %d trainable / %d parameters; %d train, %d validation, %d test cells",
        preset or model_name_or_path, count_trainable_parameters(model), count_parameters(model),
        len(inner_train), len(validation), len(test_index),
    )

    trainer_callbacks = list(callbacks)
    if early_stopping_patience > 0 and training_args.load_best_model_at_end:
        trainer_callbacks.append(EarlyStoppingCallback(early_stopping_patience=early_stopping_patience))
    trainer = _SeededTrainer(
        model=model,
        args=training_args,
        train_dataset=CellDataset(train_inputs["expression"], train_inputs["attention_mask"], cells.labels[inner_train]),
        eval_dataset=CellDataset(validation_inputs["expression"], validation_inputs["attention_mask"], cells.labels[validation])
        if len(validation) else None,
        processing_class=processor,
        compute_metrics=make_compute_metrics(cells.n_classes),
        callbacks=trainer_callbacks,
        embedding_lr_multiplier=EMBEDDING_LR_MULTIPLIER,
    )
    resume = training_args.resume_from_checkpoint
    if resume is not None and resume.lower() in ("true", "last"):
        resume = True
    train_output = trainer.train(resume_from_checkpoint=resume)
    model = trainer.model

    logits, embeddings, inference_speed = predict_cells(
        model, test_inputs["expression"], test_inputs["attention_mask"], training_args.per_device_eval_batch_size
    )
    predictions = logits.argmax(-1)
    metrics = classification_metrics(cells.labels[test_index], predictions, cells.n_classes)
    train_metrics = dict(train_output.metrics)
    return FinetuneResult(
        model=model,
        processor=processor,
        trainer=trainer,
        metrics=metrics,
        predictions=predictions,
        logits=logits,
        cell_embeddings=embeddings,
        train_index=inner_train,
        validation_index=validation,
        test_index=np.asarray(test_index),
        train_seconds=float(train_metrics.get("train_runtime", float("nan"))),
        train_cells_per_second=float(train_metrics.get("train_samples_per_second", float("nan"))),
        inference_cells_per_second=float(inference_speed),
        n_parameters=count_parameters(model),
        train_metrics=train_metrics,
    )


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------


def baseline_rows(cells: LabelledCells, result: FinetuneResult, class_weighting: str | None, fold: int = 0) -> list[dict]:
    """Majority class and logistic regression on the same split and the same processor output
    as ``result`` (fitted on all of its training cells, validation part included)."""
    train_index = np.sort(np.concatenate([result.train_index, result.validation_index]))
    train_features = encode(result.processor, cells, train_index)["expression"]
    test_features = encode(result.processor, cells, result.test_index)["expression"]
    rows = []
    for name in ("majority", "logreg"):
        fitted = fit_baseline(
            name, train_features, cells.labels[train_index], test_features,
            seed=int(result.trainer.args.seed), class_weighting=class_weighting,
        )
        scores = classification_metrics(cells.labels[result.test_index], fitted.predictions, cells.n_classes, per_class=False)
        rows.append({"method": name, "fold": fold, **scores, "train_seconds": fitted.train_seconds, "n_parameters": fitted.n_parameters})
    return rows


def write_json(path: Path, payload) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def write_run_outputs(
    output_dir: Path,
    cells: LabelledCells,
    result: FinetuneResult,
    *,
    method: str,
    preset: str | None,
    model_name_or_path: str | None,
    class_weighting: str | None,
    freeze: bool,
    baselines: list[dict],
) -> dict:
    """Write the Hub-ready model folder and the result files listed in the module docstring.

    Returns the training summary.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    trainer = result.trainer
    trainer.save_model(str(output_dir))  # best model + processor (+ remote code)
    trainer.save_state()
    eval_metrics = {
        "eval_accuracy": result.metrics["accuracy"],
        "eval_macro_f1": result.metrics["macro_f1"],
        "eval_samples": int(len(result.test_index)),
        "eval_samples_per_second": result.inference_cells_per_second,
    }
    train_metrics = {k: v for k, v in result.train_metrics.items() if isinstance(v, (int, float))}
    train_metrics["train_samples"] = int(len(result.train_index))
    trainer.save_metrics("train", train_metrics, combined=True)
    trainer.save_metrics("eval", eval_metrics, combined=True)

    model_row = {
        "method": method, "fold": 0, "accuracy": result.metrics["accuracy"], "macro_f1": result.metrics["macro_f1"],
        "train_seconds": result.train_seconds, "n_parameters": result.n_parameters,
    }
    write_json(output_dir / "comparison.json", [model_row, *baselines])
    by_method = {row["method"]: row for row in baselines}
    hardware = hardware_description()
    summary = {
        "dataset": cells.dataset_name,
        "label_key": cells.label_key,
        "preset": preset,
        "model_name_or_path": model_name_or_path,
        "n_train_cells": int(len(result.train_index)),
        "n_validation_cells": int(len(result.validation_index)),
        "n_eval_cells": int(len(result.test_index)),
        "metrics": {
            "accuracy": result.metrics["accuracy"],
            "macro_f1": result.metrics["macro_f1"],
            "per_class_f1": dict(zip(cells.label_names, result.metrics["per_class_f1"])),
            "confusion_matrix": {"labels": cells.label_names, "matrix": result.metrics["confusion_matrix"]},
        },
        "majority": {k: by_method["majority"][k] for k in ("accuracy", "macro_f1")},
        "logreg": {k: by_method["logreg"][k] for k in ("accuracy", "macro_f1")},
        "train_seconds": result.train_seconds,
        "train_cells_per_second": result.train_cells_per_second,
        "inference_cells_per_second": result.inference_cells_per_second,
        "hardware": hardware,
        "n_parameters": result.n_parameters,
        "seed": int(trainer.args.seed),
        "class_weighting": class_weighting,
        "freeze_encoder": freeze,
        "input": cells.matrix_name,
        "input_kind": cells.input_kind,
    }
    write_json(output_dir / "training_summary.json", summary)
    write_json(
        output_dir / "run_info.json",
        {
            "dataset": cells.dataset_name,
            "label_key": cells.label_key,
            "n_train_cells": summary["n_train_cells"],
            "n_eval_cells": summary["n_eval_cells"],
            "split": (
                f"stratified: {len(result.train_index)} training, {len(result.validation_index)} validation "
                f"(best checkpoint on macro-F1), {len(result.test_index)} held-out test cells"
            ),
            "hardware": hardware,
            "seed": summary["seed"],
        },
    )
    return summary


def check_against_baselines(summary: dict) -> None:
    """Log loudly when the model does not beat the majority class (the first prototype's
    failure) or falls behind logistic regression on the same split."""
    model_f1, majority_f1, logreg_f1 = summary["metrics"]["macro_f1"], summary["majority"]["macro_f1"], summary["logreg"]["macro_f1"]
    logger.warning(
        "held-out macro-F1: model %.3f | majority class %.3f | logistic regression %.3f", model_f1, majority_f1, logreg_f1
    )
    if model_f1 <= majority_f1 + 0.05:
        logger.warning("the model is no better than always predicting the majority class: training failed.")
    elif model_f1 < logreg_f1 - 0.03:
        logger.warning("the model trails logistic regression by %.3f macro-F1 on this split.", logreg_f1 - model_f1)


def run_finetune(argv: Sequence[str]) -> dict:
    """``scrnalf finetune``: parse the arguments, train, score, write the output folder.

    Returns the training summary (see the module docstring).
    """
    from .arguments import FINETUNE_DEFAULTS, parse_arguments, parse_config_overrides

    data_args, model_args, training_args = parse_arguments(list(argv), FINETUNE_DEFAULTS)
    if data_args.label_key is None:
        raise ValueError("--label-key is required: the obs column holding each cell's class.")
    if model_args.preset is None and model_args.model_name_or_path is None:
        raise ValueError("give --preset tiny|default|large for a fresh model or --model PATH_OR_REPO to start from one.")
    overrides = parse_config_overrides(model_args.config_overrides)
    cells = load_labelled_cells(
        data_args.train_file, data_args.label_key, layer=data_args.layer, use_raw=data_args.use_raw,
        input_kind=data_args.input_kind, min_cells_per_label=data_args.min_cells_per_label,
        dataset_name=data_args.dataset_name,
    )
    check_split_sizes(cells.labels, cells.n_classes, max(1, round(1 / data_args.test_fraction)), what="test split")
    train_index, test_index = stratified_split(np.arange(cells.n_cells), cells.labels, data_args.test_fraction, seed=training_args.seed)
    if data_args.max_train_cells is not None and len(train_index) > data_args.max_train_cells:
        keep = 1 - data_args.max_train_cells / len(train_index)
        train_index, _ = stratified_split(train_index, cells.labels, keep, seed=training_args.seed)
    result = finetune(
        cells, train_index, test_index, training_args,
        preset=model_args.preset, model_name_or_path=model_args.model_name_or_path,
        config_overrides=overrides, freeze=model_args.freeze_encoder, class_weighting=model_args.class_weighting,
        validation_fraction=data_args.validation_fraction, early_stopping_patience=model_args.early_stopping_patience,
    )
    summary = {}
    if result.trainer.is_world_process_zero():
        baselines = baseline_rows(cells, result, model_args.class_weighting)
        summary = write_run_outputs(
            Path(training_args.output_dir), cells, result, method=model_args.preset or "pretrained",
            preset=model_args.preset, model_name_or_path=model_args.model_name_or_path,
            class_weighting=model_args.class_weighting, freeze=model_args.freeze_encoder, baselines=baselines,
        )
        check_against_baselines(summary)
    return summary
