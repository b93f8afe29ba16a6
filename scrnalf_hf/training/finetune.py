"""Training one head on one split, scoring it on held-out cells, and the baselines beside it.

The same path serves every task (:mod:`~scrnalf_hf.training.tasks`), ``scrnalf finetune``,
``scrnalf pretrain`` (the masked-gene task), ``compare``'s folds, ``transfer`` and the demo:

1. :func:`build_model`: a fresh preset (gene panel and gene graph from the training cells
   only) or a saved model (its own panel and graph), with the task's head;
2. :func:`finetune`: `ScrnaTrainer` on the training cells, streamed through the collator; a
   validation part of them picks the best checkpoint and stops training early;
3. :func:`score_held_out`: the best model on the held-out cells;
4. :func:`fit_baselines`: the task's classical baselines on exactly the same cells and the same
   processor output.

:func:`train_from_arguments` runs all of it for the command line and writes the output folder
(:mod:`~scrnalf_hf.training.reports`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from transformers import EarlyStoppingCallback, TrainingArguments, set_seed

from ..configuration_scrnalf import ScrnaLongformerConfig
from ..data.cells import Cells, open_cells, panel_matrix
from ..data.collators import CellCollator, MaskSampler, ProteinMaskSampler
from ..data.panel import fit_processor, gene_graph
from ..data.species import with_species_setup
from ..data.splits import check_split_sizes, split_off
from ..modeling_scrnalf import ScrnaLongformerPreTrainedModel
from ..processing_scrnalf import ScrnaLongformerProcessor
from .baselines import fit_baseline
from .tasks import Targets, Task, get_task
from .trainer import ScrnaTrainer, full_state_dict

logger = logging.getLogger(__name__)


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Parameters of ``model`` (the gene-graph buffer is not one)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def balanced_class_weights(labels: np.ndarray, n_classes: int) -> list[float]:
    """``n / (C · n_c)`` per class from the training labels — scikit-learn's ``"balanced"``."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    if (counts == 0).any():
        missing = np.flatnonzero(counts == 0).tolist()
        raise ValueError(f"classes {missing} have no training cells; cannot weight them.")
    return (len(labels) / (n_classes * counts)).tolist()


def no_targets(cells: Cells) -> Targets:
    """Targets of a task that needs none (masked gene modelling): every cell takes part."""
    return Targets(values=None, usable=np.ones(cells.n_cells, dtype=bool))


def target_key_of(task: Task, arguments) -> str | None:
    """The ``obs`` column of the task's targets named on the command line (``arguments.label_key``
    for classification, ``arguments.time_key`` for the trajectory task); the other task's option
    given instead is refused in one line."""
    options = ("label_key", "time_key")
    for option in options:
        if option != task.target_option and getattr(arguments, option, None) is not None:
            wanted = f"; give --{task.target_option.replace('_', '-')} instead" if task.target_option else ""
            raise ValueError(f"--{option.replace('_', '-')} does not apply to {task.summary}{wanted}.")
    return None if task.target_option is None else getattr(arguments, task.target_option, None)


def protein_key_of(task: Task, arguments, source) -> str | None:
    """Where the cells' proteins are: ``--protein-key``, or for the protein task by default the
    ``prot`` modality of a ``.h5mu`` file, ``obsm["protein_expression"]`` of an AnnData (a
    converted folder keeps what it was converted with)."""
    from ..data.multimodal import PROTEIN_MODALITY, PROTEIN_OBSM_KEY, is_mudata_path

    key = getattr(arguments, "protein_key", None)
    if key is not None or task.name != "protein":
        return key
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        return None
    return PROTEIN_MODALITY if is_mudata_path(source) else PROTEIN_OBSM_KEY


def atac_key_of(task: Task, arguments) -> str | None:
    """``--atac-key``: the ATAC modality of a ``.h5mu`` input, read by cell classification only
    (the model reads RNA + peaks); any other task is refused in one line."""
    key = getattr(arguments, "atac_key", None)
    if key is not None and not config_uses_peaks(task):
        raise ValueError(f"--atac-key {key}: only cell classification reads ATAC peaks, not {task.summary}; drop --atac-key.")
    return key


def target_obs_keys(task: Task, key: str | None, time_point_key: str | None = None) -> tuple[str, ...]:
    """``obs`` columns an ``.h5ad`` input's conversion must keep for the task's targets besides
    the label (classification stores its label column as ``label``; the protein task's are
    the cells' proteins, not an ``obs`` column), and the time points."""
    keys = () if key is None or task.target_option in ("label_key", "protein_key") else (key,)
    return keys + (() if time_point_key is None else (time_point_key,))


def with_time_points(task: Task, cells: Cells, key: str | None, config_overrides: dict) -> Cells:
    """``--time-point-key``: ``cells`` carrying each cell's sampled time point, and
    ``config_overrides`` (changed in place) asking for a time-conditioned model whose time
    encoder standardises time points by the mean and standard deviation of these cells' (an
    input scale, like a gene's; the first cells given, the training file's, set it)."""
    if key is None:
        return cells
    if task.target_option != "time_key":
        raise ValueError(f"--time-point-key conditions a trajectory model on sampled times; it does not apply to {task.summary}.")
    cells = cells.with_time_points(key)
    if "time_point_center" not in config_overrides:  # the training cells' scale, kept for their test cells
        time_points = cells.time_points(np.arange(cells.n_cells)).astype(np.float64)
        config_overrides["time_point_center"] = float(time_points.mean())
        config_overrides["time_point_scale"] = float(time_points.std()) or 1.0
    config_overrides["time_conditioning"] = True
    return cells


def read_targets(task: Task, cells: Cells, key: str | None, min_cells_per_label: int | None = None) -> Targets:
    """The task's targets of ``cells`` (``obs[key]``), checked before any model exists."""
    if task.read_targets is None:
        return no_targets(cells)
    if task.target_option is not None and key is None and task.name != "protein":  # proteins: a default place
        raise ValueError(
            f"--{task.target_option.replace('_', '-')} is required for {task.summary}: the obs column of each cell's target."
        )
    return task.read_targets(cells, key, min_cells_per_label)


# ---------------------------------------------------------------------------------------------
# Building the model
# ---------------------------------------------------------------------------------------------


def build_model(
    task: Task,
    processor: ScrnaLongformerProcessor,
    cells: Cells,
    train_rows: np.ndarray,
    targets: Targets,
    *,
    preset: str | None = None,
    model_name_or_path: str | None = None,
    config_overrides: dict | None = None,
    class_weights: list[float] | None = None,
) -> ScrnaLongformerPreTrainedModel:
    """The task's head: a fresh ``preset`` whose gene graph is built from the training cells, or a
    saved model whose own gene graph is kept (its head is replaced when the labels differ).

    Exactly one of ``preset`` / ``model_name_or_path`` must be given.
    """
    if (preset is None) == (model_name_or_path is None):
        raise ValueError("give exactly one of --preset (a fresh model) or --model (a saved one).")
    learnt = task.fit_config(targets.values[train_rows]) if task.fit_config else {}
    fields = {**targets.config, **learnt, **(config_overrides or {})}
    if class_weights is not None:
        fields["class_weights"] = class_weights
    if processor.species is not None:
        fields["species"] = processor.species
    modalities = {}
    if processor.protein_names is not None and config_uses_proteins(task):
        modalities["protein"] = processor.n_proteins
        fields.setdefault("protein_names", list(processor.protein_names))
    if processor.peak_names is not None and config_uses_peaks(task):
        modalities["atac"] = processor.n_peaks
        fields.setdefault("peak_names", list(processor.peak_names))
    if modalities:
        fields.setdefault("modalities", modalities)
    if preset is not None:
        config = ScrnaLongformerConfig.from_preset(preset, n_genes=processor.n_genes, **fields)
        model = task.model_class(config)
        model.base_model.set_gene_graph(
            gene_graph(processor, cells, train_rows, k=config.knn_k, metric=config.gene_graph_metric)
        )
        if config.n_peaks:  # a buffer: the saved checkpoint keeps the peak graph
            from ..data.atac import PeakCoordinates, build_peak_graph

            coordinates = PeakCoordinates.from_dict(processor.peak_coordinates)
            model.fusion.peak_encoder.set_peak_graph(build_peak_graph(coordinates, config.peak_knn_k))
        return model
    return task.model_class.from_pretrained(model_name_or_path, ignore_mismatched_sizes=True, **fields)


def config_uses_proteins(task: Task) -> bool:
    """Whether a model of ``task`` reads a protein panel the processor has: the protein task,
    and cell classification (from RNA and proteins)."""
    return task.name in ("protein", "classification")


def config_uses_peaks(task: Task) -> bool:
    """Whether a model of ``task`` reads the ATAC peak panel the processor has: cell
    classification only (from RNA and peaks)."""
    return task.name == "classification"


def freeze_encoder(model: ScrnaLongformerPreTrainedModel) -> None:
    """Train only the task head: every encoder parameter stops receiving gradients."""
    for parameter in model.base_model.parameters():
        parameter.requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Training one split
# ---------------------------------------------------------------------------------------------


@dataclass
class FitResult:
    """What :func:`finetune` produced on one split.

    Attributes:
        train_rows / validation_rows: the cells trained on and the cells that picked the best
            checkpoint (disjoint; both only ever from the training side of the split).
        train_metrics: Trainer's train metrics (``train_runtime`` s, ``train_samples_per_second``...).
    """

    task: Task
    model: ScrnaLongformerPreTrainedModel
    processor: ScrnaLongformerProcessor
    trainer: ScrnaTrainer
    targets: Targets
    train_rows: np.ndarray
    validation_rows: np.ndarray
    train_metrics: dict = field(default_factory=dict)

    @property
    def train_seconds(self) -> float:
        return float(self.train_metrics.get("train_runtime", float("nan")))

    @property
    def train_cells_per_second(self) -> float:
        return float(self.train_metrics.get("train_samples_per_second", float("nan")))

    @property
    def n_parameters(self) -> int:
        return count_parameters(self.model)

    def collator(self, cells: Cells, evaluation: bool = True) -> CellCollator:
        """The collator this model trains or evaluates with on ``cells``."""
        return make_collator(self.task, self.processor, cells, self.model.config, self.trainer.args.seed, evaluation)


def make_collator(
    task: Task, processor: ScrnaLongformerProcessor, cells: Cells, config, seed: int, evaluation: bool
) -> CellCollator:
    """The one collator; masked gene modelling hides genes (the same ones per cell in evaluation)."""
    masking = MaskSampler(config.mask_ratio, seed=seed, per_cell=evaluation) if task.masks_genes else None
    species = None
    if processor.species is not None:
        names = cells.cell_species()
        species = None if names is None else list(dict.fromkeys(names))
    # a multimodal model: the protein task trains on masked proteins and is scored on RNA alone
    # (as at inference); a classifier reads both modalities
    proteins, protein_masking = "none", None
    if getattr(config, "n_proteins", 0):
        if task.name == "protein":
            proteins = "targets" if evaluation else "masked"
            protein_masking = None if evaluation else ProteinMaskSampler(config.protein_mask_ratio, seed=seed)
        elif cells.genes.protein_names is not None:
            proteins = "inputs"
    # cells without ATAC (an RNA-only test file) run on RNA alone, as the model allows
    peaks = bool(getattr(config, "n_peaks", 0)) and cells.genes.peak_names is not None
    return CellCollator(
        processor, cells.genes, masking=masking, species=species, proteins=proteins, protein_masking=protein_masking,
        peaks=peaks,
    )


def finetune(
    task: Task,
    cells: Cells,
    targets: Targets,
    train_rows: np.ndarray,
    training_args: TrainingArguments,
    *,
    preset: str | None = None,
    model_name_or_path: str | None = None,
    n_top_genes: int | None = None,
    config_overrides: dict | None = None,
    freeze: bool = False,
    class_weighting: str | None = None,
    validation_fraction: float = 0.1,
    early_stopping_patience: int = 8,
    embedding_lr_multiplier: float | None = None,
    callbacks: Sequence = (),
) -> FitResult:
    """Train the task's head on ``train_rows`` of ``cells``.

    A ``validation_fraction`` of the training cells (stratified by class where the task has
    classes) selects the best checkpoint (the task's ``best_metric``) and drives early
    stopping; with ``validation_fraction=0`` every training cell is trained on and the last
    epoch's model is kept. The processor's panel (with ``n_top_genes``, the training cells'
    most variable genes) and the gene graph see only the remaining training cells. Checks that
    can fail (labels, split sizes, gene overlap with a saved model's panel) run before training.

    Args:
        task: the head (:func:`~scrnalf_hf.training.tasks.get_task`).
        cells / targets: the dataset and the task's targets of it (:func:`read_targets`).
        train_rows: (n,) row positions to train on (never held-out cells).
        training_args: Trainer settings (``output_dir`` receives checkpoints).
        preset / model_name_or_path: a fresh preset or a saved model (exactly one).
        config_overrides: config fields to change (e.g. ``{"pooling": "cls"}``).
        freeze: train only the head.
        class_weighting: ``None`` or ``"balanced"`` (classification).
        embedding_lr_multiplier: the embeddings' learning-rate multiple; the task's by default.
        callbacks: extra `TrainerCallback` objects.
    """
    if class_weighting not in (None, "balanced"):
        raise ValueError(f"class_weighting must be none or balanced, got {class_weighting!r}.")
    if class_weighting is not None and targets.names is None:
        raise ValueError(f"class weighting applies to classification, not to {task.summary}.")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must lie in [0, 1) (0: no validation split), got {validation_fraction}.")
    if model_name_or_path is not None and n_top_genes is not None:
        raise ValueError("--n-top-genes chooses a fresh model's panel; a saved model (--model) keeps its own.")
    train_rows = np.sort(np.asarray(train_rows, dtype=np.int64))
    if targets.names is not None:
        from ..data.splits import check_class_sizes

        check_class_sizes(targets.values[train_rows], targets.names, targets.key, min_cells=2)
    if validation_fraction == 0:
        inner_train, validation = train_rows, np.array([], dtype=np.int64)
        training_args = dataclasses.replace(training_args, eval_strategy="no", load_best_model_at_end=False)
    else:
        inner_train, validation = split_off(
            train_rows, validation_fraction, seed=training_args.seed, labels=targets.stratify
        )
    if training_args.remove_unused_columns:
        training_args = dataclasses.replace(training_args, remove_unused_columns=False)

    set_seed(training_args.seed)
    if model_name_or_path is not None:
        from ..hub.folder import model_source_errors

        with model_source_errors(model_name_or_path):
            processor = ScrnaLongformerProcessor.from_pretrained(model_name_or_path)
    else:
        processor = fit_processor(cells, inner_train, n_top_genes, seed=training_args.seed)
    class_weights = None
    if class_weighting is not None:
        class_weights = balanced_class_weights(targets.values[inner_train], len(targets.names))
    protein_names = targets.config.get("protein_names")
    if model_name_or_path is not None and protein_names is not None and processor.protein_names != protein_names:
        raise ValueError(
            f"the model's protein panel ({(processor.protein_names or [])[:5]}...) is not the cells' proteins "
            f"({protein_names[:5]}...) in the same order; fine-tune a fresh preset on these proteins."
        )
    model = build_model(
        task, processor, cells, inner_train, targets, preset=preset, model_name_or_path=model_name_or_path,
        config_overrides=config_overrides, class_weights=class_weights,
    )
    if freeze:
        freeze_encoder(model)
    training = make_collator(task, processor, cells, model.config, training_args.seed, evaluation=False)
    evaluation = make_collator(task, processor, cells, model.config, training_args.seed, evaluation=True)
    logger.info(
        "%s with %s: %d trainable / %d parameters; %d training, %d validation cells; %s",
        task.summary, preset or model_name_or_path, count_parameters(model, trainable_only=True),
        count_parameters(model), len(inner_train), len(validation), training.alignment,
    )
    trainer_callbacks = list(callbacks)
    if early_stopping_patience > 0 and training_args.load_best_model_at_end:
        trainer_callbacks.append(EarlyStoppingCallback(early_stopping_patience=early_stopping_patience))
    rows = cells.with_targets(targets.values)
    trainer = ScrnaTrainer(
        model=model,
        args=training_args,
        data_collator=training,
        eval_data_collator=evaluation,
        train_dataset=rows.select(inner_train),
        eval_dataset=rows.select(validation) if len(validation) else None,
        processing_class=processor,
        compute_metrics=task.trainer_metrics(targets),
        callbacks=trainer_callbacks,
        embedding_lr_multiplier=task.embedding_lr_multiplier if embedding_lr_multiplier is None else embedding_lr_multiplier,
    )
    resume = training_args.resume_from_checkpoint
    if resume is not None and str(resume).lower() in ("true", "last"):
        resume = last_complete_checkpoint(training_args.output_dir, remove_incomplete=training_args.process_index == 0)
        if resume is None:
            raise ValueError(f"cannot resume: {training_args.output_dir} holds no complete checkpoint-N; start a new run.")
    model_class = type(model)  # before FSDP2 swaps in its own subclass
    train_output = trainer.train(resume_from_checkpoint=resume)
    return FitResult(
        task=task, model=unsharded_model(trainer, model_class), processor=processor, trainer=trainer, targets=targets,
        train_rows=inner_train, validation_rows=validation, train_metrics=dict(train_output.metrics),
    )


def unsharded_model(trainer: ScrnaTrainer, model_class: type) -> ScrnaLongformerPreTrainedModel:
    """The trained model with full weights for saving: ``trainer.model`` itself, except under FSDP,
    where every parameter is a DTensor holding one rank's rows. Then all ranks gather the full
    weights (a collective) and rank 0 gets them in a plain ``model_class`` (the exported model);
    the other ranks keep the sharded one, which they only use for collective evaluation."""
    if not trainer.is_fsdp_enabled:
        return trainer.model
    full = full_state_dict(trainer.model)
    if not trainer.is_world_process_zero():
        return trainer.model
    model = model_class(trainer.model.config)
    model.load_state_dict(full)
    model.name_or_path = trainer.model.name_or_path
    return model


# ---------------------------------------------------------------------------------------------
# Scoring held-out cells, and the baselines beside the model
# ---------------------------------------------------------------------------------------------


@dataclass
class CellPart:
    """Some cells of a dataset with the task's targets of that dataset."""

    cells: Cells
    targets: Targets
    rows: np.ndarray


@dataclass
class HeldOutScores:
    """The model on held-out cells.

    Attributes:
        rows: (n,) the cells' row positions.
        metrics: the task's scores (classification: ``accuracy``, ``macro_f1``, ``per_class_f1``,
            ``confusion_matrix``; masked gene modelling: ``loss``).
        predicted: the task's kept arrays per cell (e.g. ``probabilities`` (n, C)).
        point: (n,) point predictions, or None.
        cell_embeddings: (n, d_model).
        cells_per_second: inference speed of the pass.
    """

    rows: np.ndarray
    metrics: dict
    predicted: dict
    point: np.ndarray | None
    cell_embeddings: np.ndarray | None
    cells_per_second: float


def score_held_out(result: FitResult, test: CellPart) -> HeldOutScores:
    """Score the trained model on held-out cells (one inference pass), of its training dataset
    or of another one (aligned to the model's panel by the collator)."""
    rows = np.asarray(test.rows, dtype=np.int64)
    trainer, task = result.trainer, result.task
    training_collator = trainer.eval_data_collator
    trainer.eval_data_collator = result.collator(test.cells, evaluation=True)
    try:
        output = trainer.predict(test.cells.with_targets(test.targets.values).select(rows), metric_key_prefix="test")
    finally:
        trainer.eval_data_collator = training_collator
    speed = float(output.metrics.get("test_samples_per_second", float("nan")))
    if task.score is None:
        return HeldOutScores(rows, {"loss": float(output.metrics["test_loss"])}, {}, None, None, speed)
    logits, embeddings = output.predictions[0], output.predictions[1]
    predicted = task.predictions(logits)
    point = task.point(predicted)
    metrics = task.score(test.targets.values[rows], point, test.targets, detailed=True)
    return HeldOutScores(rows, metrics, predicted, point, np.asarray(embeddings), speed)


BASELINE_MAX_TRAIN_CELLS = 20_000


@dataclass
class _PanelRows:
    """``panel_matrix`` of ``rows``, computed slice by slice when sliced: the test cells' features
    are never all in memory at once."""

    cells: Cells
    rows: np.ndarray
    processor: ScrnaLongformerProcessor
    columns: np.ndarray | None = None
    proteins: bool = False
    peaks: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        n_genes = self.processor.n_genes if self.columns is None else len(self.columns)
        n_proteins = len(self.cells.genes.protein_names) if self.proteins else 0
        n_peaks = len(self.cells.genes.peak_names) if self.peaks else 0
        return len(self.rows), n_genes + self.cells.has_time_points + n_proteins + n_peaks

    def __getitem__(self, part: slice):
        return baseline_features(self.cells, self.rows[part], self.processor, self.columns, self.proteins, self.peaks)


def baseline_features(
    cells: Cells,
    rows: np.ndarray,
    processor: ScrnaLongformerProcessor,
    columns: np.ndarray | None = None,
    proteins: bool = False,
    peaks: bool = False,
) -> sp.csr_matrix:
    """(len(rows), n_features) what the baselines read of ``rows``: the processor's panel values
    (the ``columns`` of them where given); for cells with time points, each cell's time point
    as one more column — a time-conditioned model reads it, so its baselines do too; with
    ``proteins``, the cells' CLR protein levels as P more columns (a classifier of RNA + protein
    is compared with baselines that read both); with ``peaks``, the cells' binarised ATAC peaks
    as n_peaks more columns (likewise for RNA + ATAC)."""
    matrix = panel_matrix(cells, rows, processor)
    if columns is not None:
        matrix = matrix[:, columns]
    time_points = cells.time_points(rows)
    if time_points is not None:
        matrix = sp.hstack([matrix, sp.csr_matrix(time_points[:, None])], format="csr")
    if proteins:
        matrix = sp.hstack([matrix, sp.csr_matrix(cells.protein_levels(rows))], format="csr")
    if peaks:
        matrix = sp.hstack([matrix, cells.open_peaks(rows)], format="csr")
    return matrix


def baselines_read_proteins(task: Task, cells: Cells) -> bool:
    """Whether the baselines of ``task`` read the cells' proteins as features: a classifier's do
    when the cells carry proteins (the model reads them); the protein task's proteins are its
    targets."""
    return task.name != "protein" and config_uses_proteins(task) and cells.has_proteins


def baselines_read_peaks(task: Task, cells: Cells) -> bool:
    """Whether the baselines of ``task`` read the cells' binarised ATAC peaks as features: a
    classifier's do when the cells carry peaks (the model reads them)."""
    return config_uses_peaks(task) and cells.has_peaks


def baseline_columns(processor: ScrnaLongformerProcessor) -> np.ndarray | None:
    """The panel columns the baselines read: every one, or in a panel of several species the
    one-to-one ortholog pairs only — the usual way of taking a classifier across species (its
    features must mean the same gene in both)."""
    if processor.species is None or len(processor.species) < 2:
        return None
    columns = np.flatnonzero(processor.token_shapes() == "one2one")
    if len(columns) == 0:
        raise ValueError("the species of this panel share no one-to-one orthologs for the baselines to read.")
    return columns


def fit_baselines(
    task: Task,
    processor: ScrnaLongformerProcessor,
    train: CellPart,
    test: CellPart,
    names: Sequence[str],
    *,
    seed: int = 0,
    class_weighting: str | None = None,
    fold: int = 0,
    max_train_cells: int | None = BASELINE_MAX_TRAIN_CELLS,
) -> tuple[list[dict], dict[str, np.ndarray]]:
    """The named baselines fitted on the training cells and scored on the test cells, on
    ``processor``'s output: rows ``{"method", "fold", <task metrics>, "train_seconds",
    "n_parameters"}`` and each baseline's (n_test,) point predictions.

    Above ``max_train_cells`` training cells the baselines are fitted on a stratified sample of
    that many (logged), and the test cells are featurised chunk by chunk: the feature matrix of
    every training cell (plus scikit-learn's float64 copy) cost more memory than training the
    transformer (peak RSS 3.8 GB against 2.1 GB at 160,000 cells × 2,000 genes), while a linear
    model or a forest gains little from more than 20,000 cells.
    """
    train_rows = np.asarray(train.rows, dtype=np.int64)
    if max_train_cells is not None and len(train_rows) > max_train_cells:
        train_rows, _ = split_off(train_rows, 1 - max_train_cells / len(train_rows), seed=seed, labels=train.targets.stratify)
        logger.info("baselines fitted on a stratified sample of %d of the %d training cells", len(train_rows), len(train.rows))
        train = CellPart(train.cells, train.targets, train_rows)
    columns = baseline_columns(processor)
    if columns is not None:
        logger.info("baselines read the %d one-to-one ortholog tokens of the %d-token panel", len(columns), processor.n_genes)
    proteins, peaks = baselines_read_proteins(task, train.cells), baselines_read_peaks(task, train.cells)
    train_features = baseline_features(train.cells, train.rows, processor, columns, proteins, peaks)
    test_features = _PanelRows(test.cells, np.asarray(test.rows, dtype=np.int64), processor, columns, proteins, peaks)
    rows, predictions = [], {}
    for name in names:
        fitted = fit_baseline(
            name, task.baselines, train_features, train.targets.values[train.rows], test_features,
            seed=seed, class_weighting=class_weighting,
        )
        scores = task.score(test.targets.values[test.rows], fitted.predictions, test.targets, detailed=False)
        rows.append(
            {"method": name, "fold": fold, **scores, "train_seconds": fitted.train_seconds, "n_parameters": fitted.n_parameters}
        )
        predictions[name] = fitted.predictions
    return rows, predictions


# ---------------------------------------------------------------------------------------------
# The command line: split, train, score, write
# ---------------------------------------------------------------------------------------------


def split_record(cells: Cells, train_rows, validation_fraction: float, test_rows, seed: int) -> dict:
    """What identifies a run's split: resuming with another one would score trained-on cells.

    ``held_out_cell_ids`` names the cells the run scored (``obs_names`` of the input), so that
    anyone can score the saved model, or another method, on exactly those cells later.
    """

    def digest(values) -> str:
        return hashlib.sha256(np.asarray(values, dtype=np.int64).tobytes()).hexdigest()[:16]

    cell_ids = cells.cell_ids()
    return {
        "seed": int(seed),
        "n_cells": int(cells.n_cells),
        "cells": hashlib.sha256("\n".join(map(str, cell_ids)).encode()).hexdigest()[:16],
        "train": digest(train_rows),
        "test": digest(test_rows),
        "validation_fraction": float(validation_fraction),
        "held_out_cell_ids": [str(cell_ids[row]) for row in np.asarray(test_rows, dtype=np.int64)],
    }


def check_resume(output_dir: Path, record: dict) -> None:
    """Refuse to resume a run whose split, seed or data differ from the checkpoint's."""
    path = output_dir / "split.json"
    if not path.is_file():
        raise ValueError(
            f"cannot resume: {path} is missing, so the checkpoint's split cannot be checked; start a new run "
            "(another --output-dir) instead of --resume_from_checkpoint."
        )
    saved = json.loads(path.read_text())
    # held_out_cell_ids lists what the "test" digest already identifies
    changed = [key for key in record if key != "held_out_cell_ids" and saved.get(key) != record[key]]
    if changed:
        raise ValueError(
            f"cannot resume: this run's {', '.join(changed)} differ from the checkpoint's ({path}); resuming would "
            "train on or score different cells (held-out cells could have been trained on). Use the same data and "
            "--seed, or start a new run."
        )


def check_output_folder(output_dir: str | Path, flag: str = "--output-dir") -> Path:
    """Refuse an output folder that cannot be created (it, or a folder above it, is a file)
    before any cell is read."""
    output_dir = Path(output_dir)
    for folder in (output_dir, *output_dir.parents):
        if folder.exists():
            if not folder.is_dir():
                where = "is a file" if folder == output_dir else f"lies under {folder}, which is a file"
                raise NotADirectoryError(f"{flag} {output_dir} {where}; choose a folder.")
            break
    return output_dir


def _is_run_folder(output_dir: Path) -> bool:
    """Whether ``output_dir`` was written by ``scrnalf finetune`` / ``pretrain`` (its split record,
    or the training summary of an export)."""
    for name, key in (("split.json", "cells"), ("training_summary.json", "task")):
        try:
            record = json.loads((output_dir / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and key in record:
            return True
    return False


def _retire(path: Path) -> None:
    """Removes a folder in two steps, a rename to a hidden name of this process first, so that a kill
    leaves either the whole folder or a hidden leftover (removed by the next run), never half of it
    under its own name."""
    from ..staging import staging_path

    retired = staging_path(path.parent, f".{path.name}.replaced")
    os.rename(path, retired)
    shutil.rmtree(retired, ignore_errors=True)


def remove_interrupted_leftovers(output_dir: Path) -> None:
    """What killed runs left in ``output_dir``: export staging folders, retired checkpoints."""
    from ..staging import remove_dead_staging
    from .reports import remove_interrupted_exports

    remove_interrupted_exports(output_dir)
    remove_dead_staging(output_dir, ".split.json.incomplete", "finetune/pretrain start")
    if output_dir.is_dir():
        for name in sorted({p.name.split(".replaced-")[0] for p in output_dir.glob(".*.replaced-*")}):
            remove_dead_staging(output_dir, f"{name}.replaced", "replacement of an earlier run")


def check_output_dir(output_dir: Path, *, overwrite: bool, resume) -> None:
    """Checks ``--output-dir`` before any cell is read (main process only).

    Leftovers of killed runs (export staging folders, retired checkpoints) are removed. Then a
    folder that holds anything is refused, unless ``resume`` (continued, :func:`check_resume`
    checks its split later) or ``overwrite`` and a finetune/pretrain run wrote it.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"--output-dir {output_dir} is a file; finetune writes a folder. Choose another path.")
    remove_interrupted_leftovers(output_dir)
    if resume:
        if overwrite:
            raise ValueError("--overwrite starts the run afresh and --resume-from-checkpoint continues it; give one.")
        return
    contents = sorted(p.name for p in output_dir.iterdir()) if output_dir.is_dir() else []
    if not contents:
        return
    if not _is_run_folder(output_dir):
        raise FileExistsError(
            f"--output-dir {output_dir} is not empty ({', '.join(contents[:5])}{' ...' if len(contents) > 5 else ''}) "
            "and was not written by scrnalf finetune/pretrain; it is left as it is. Choose a new or empty folder."
        )
    if not overwrite:
        finished = (output_dir / "README.md").is_file()
        what = "a finished run (its model card README.md)" if finished else "an interrupted run (no model card)"
        hint = "" if finished else ", or --resume-from-checkpoint true to continue it"
        raise FileExistsError(
            f"--output-dir {output_dir} already holds {what}; choose a new folder, or pass --overwrite to replace it{hint}."
        )


def prepare_output_dir(output_dir: Path, record: dict, *, resume) -> None:
    """Readies the checked ``--output-dir`` (:func:`check_output_dir`) for training (main process only).

    ``resume``: the folder must hold this very split (:func:`check_resume`). Otherwise an earlier
    run's checkpoints are removed at once, but its exported model, run records and card stay,
    whole, until the new run's export replaces them
    (:func:`~scrnalf_hf.training.reports.publish_export`); then the new ``split.json`` is written.
    """
    if resume:
        check_resume(output_dir, record)
        return
    checkpoints = [p for p in sorted(output_dir.glob("checkpoint-*")) if p.is_dir() and not p.is_symlink()]
    if checkpoints:
        logger.warning(
            "--overwrite: replacing the run in %s; its checkpoints are removed, its exported model stays until the new "
            "one is complete.", output_dir,
        )
    for checkpoint in checkpoints:
        _retire(checkpoint)
    output_dir.mkdir(parents=True, exist_ok=True)
    from ..staging import staging_path

    partial = staging_path(output_dir, ".split.json.incomplete")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(partial, output_dir / "split.json")


def last_complete_checkpoint(output_dir: Path, remove_incomplete: bool = False) -> str | None:
    """The highest ``checkpoint-N`` that Trainer finished writing (``trainer_state.json`` comes last);
    with ``remove_incomplete``, higher ones a kill cut short are removed (logged)."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    found = []
    for path in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        step = path.name.rsplit("-", 1)[1]
        if path.is_dir() and step.isdigit():
            found.append((int(step), path))
    for _, path in sorted(found, reverse=True):
        if (path / "trainer_state.json").is_file():
            return str(path)
        if remove_incomplete:
            logger.warning("removing %s: a killed run left it incomplete (no trainer_state.json).", path)
            _retire(path)
    return None


def train_from_arguments(data_args, model_args, training_args) -> dict:
    """``scrnalf finetune`` / ``scrnalf pretrain``: read the cells, split them, train, score the
    held-out cells next to the baselines, and write the Hub-ready output folder
    (:func:`~scrnalf_hf.training.reports.write_run_outputs`). Returns the training summary."""
    from .arguments import parse_config_overrides
    from .reports import check_against_baselines, write_run_outputs

    task = get_task(model_args.task)
    if model_args.preset is None and model_args.model_name_or_path is None:
        raise ValueError("give --preset tiny|default|large for a fresh model or --model PATH_OR_REPO to start from one.")
    if task.read_targets is None and data_args.label_key is not None:
        raise ValueError(f"--label-key does not apply to {task.summary}; drop it.")
    target_key = target_key_of(task, data_args)
    if training_args.num_train_epochs <= 0 and training_args.max_steps <= 0:
        raise ValueError(f"--num_train_epochs must be positive, got {training_args.num_train_epochs}; nothing would be trained.")
    if not 0.0 <= data_args.test_fraction < 1.0:
        raise ValueError(f"--test-fraction must lie in [0, 1), got {data_args.test_fraction}.")
    if not 0.0 <= data_args.validation_fraction < 1.0:
        raise ValueError(
            f"validation_fraction must lie in [0, 1) (0: no validation split), got {data_args.validation_fraction}."
        )
    if data_args.max_train_cells is not None and data_args.max_train_cells < 1:
        raise ValueError(f"--max-train-cells must be a positive number of cells, got {data_args.max_train_cells}.")
    if data_args.n_top_genes is not None and data_args.n_top_genes < 1:
        raise ValueError(f"--n-top-genes must be a positive number of genes, got {data_args.n_top_genes}.")
    if task.read_targets is None:
        for flag, given in (("--freeze-encoder", model_args.freeze_encoder), ("--min-cells-per-label", data_args.min_cells_per_label)):
            if given:
                raise ValueError(f"{flag} does not apply to {task.summary}; drop it.")
    output_dir = check_output_folder(training_args.output_dir)
    overrides = parse_config_overrides(model_args.config_overrides)
    if training_args.process_index == 0:
        check_output_dir(output_dir, overwrite=data_args.overwrite, resume=training_args.resume_from_checkpoint)
    if (data_args.train_file is None) == (data_args.soma_uri is None):
        raise ValueError("give exactly one source of cells: --train-file (.h5ad or convert folder) or --soma-uri (a SOMA experiment).")
    if data_args.soma_uri is not None:
        from ..data.soma import open_soma

        if data_args.atac_key is not None:
            raise ValueError("--atac-key reads the ATAC modality of a .h5mu file; a SOMA experiment (--soma-uri) is read as RNA only.")
        cells = open_soma(
            data_args.soma_uri, measurement=data_args.measurement, layer=data_args.soma_layer,
            obs_filter=data_args.obs_filter, var_filter=data_args.var_filter, input_kind=data_args.input_kind,
            name=data_args.dataset_name,
        )
        if data_args.layer is not None or data_args.use_raw:
            raise ValueError("--layer / --use-raw choose an AnnData matrix; for a SOMA experiment name the X layer with --soma-layer.")
    else:
        for flag in ("obs_filter", "var_filter", "soma_layer"):
            if getattr(data_args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} applies to --soma-uri only; drop it or read the cells from a SOMA experiment.")
        cells = open_cells(
            data_args.train_file, layer=data_args.layer, use_raw=data_args.use_raw, input_kind=data_args.input_kind,
            label_key=data_args.label_key, name=data_args.dataset_name,
            species=data_args.species, species_key=data_args.species_key, obs_keys=target_obs_keys(task, target_key, data_args.time_point_key),
            protein_key=protein_key_of(task, data_args, data_args.train_file), atac_key=atac_key_of(task, data_args),
        )
    if model_args.model_name_or_path is None:
        cells = with_species_setup(
            cells, species=data_args.species, species_key=data_args.species_key, model_species=data_args.model_species,
            orthologs=data_args.orthologs,
        )
    elif data_args.model_species is not None:
        raise ValueError("--model-species chooses the species of a fresh model; a saved model (--model) keeps its own.")
    targets = read_targets(task, cells, target_key, data_args.min_cells_per_label)
    cells = with_time_points(task, cells, data_args.time_point_key, overrides)
    usable = np.flatnonzero(targets.usable)
    seed = training_args.seed
    if data_args.test_fraction > 0:
        if targets.names is not None:
            check_split_sizes(len(usable), len(targets.names), max(1, round(1 / data_args.test_fraction)), what="test split")
        train_rows, test_rows = split_off(usable, data_args.test_fraction, seed=seed, labels=targets.stratify)
    else:
        train_rows, test_rows = usable, np.array([], dtype=np.int64)
    if data_args.max_train_cells is not None and len(train_rows) > data_args.max_train_cells:
        train_rows, _ = split_off(train_rows, 1 - data_args.max_train_cells / len(train_rows), seed=seed, labels=targets.stratify)
    record = split_record(cells, train_rows, data_args.validation_fraction, test_rows, seed)
    created = not output_dir.exists()
    if training_args.process_index == 0:
        prepare_output_dir(output_dir, record, resume=training_args.resume_from_checkpoint)
    elif training_args.resume_from_checkpoint:
        check_resume(output_dir, record)
    try:
        result = finetune(
            task, cells, targets, train_rows, training_args,
            preset=model_args.preset, model_name_or_path=model_args.model_name_or_path, n_top_genes=data_args.n_top_genes,
            config_overrides=overrides, freeze=model_args.freeze_encoder, class_weighting=model_args.class_weighting,
            validation_fraction=data_args.validation_fraction, early_stopping_patience=model_args.early_stopping_patience,
        )
    except BaseException:
        # a run refused before its first checkpoint leaves no half-made output folder behind
        if created and training_args.process_index == 0 and output_dir.is_dir() and not any(output_dir.glob("checkpoint-*")):
            shutil.rmtree(output_dir, ignore_errors=True)
        raise
    held_out = score_held_out(result, CellPart(cells, targets, test_rows)) if len(test_rows) else None
    evaluation = None
    if held_out is None and result.trainer.eval_dataset is not None:
        evaluation = result.trainer.evaluate()  # on every process: its gathers wait for all of them
    if not result.trainer.is_world_process_zero():
        return {}
    baselines = []
    if held_out is not None and task.baselines:
        all_train = np.sort(np.concatenate([result.train_rows, result.validation_rows]))
        names = [name for name in dict.fromkeys([task.floor, "logreg"]) if name in task.baselines]
        baselines, _ = fit_baselines(
            task, result.processor, CellPart(cells, targets, all_train), CellPart(cells, targets, test_rows), names,
            seed=seed, class_weighting=model_args.class_weighting,
        )
    summary = write_run_outputs(
        output_dir, cells, result, held_out, baselines, method=model_args.preset or "pretrained",
        preset=model_args.preset, model_name_or_path=model_args.model_name_or_path,
        class_weighting=model_args.class_weighting, freeze=model_args.freeze_encoder, evaluation=evaluation,
    )
    check_against_baselines(summary)
    return summary


__all__ = [
    "CellPart",
    "FitResult",
    "HeldOutScores",
    "balanced_class_weights",
    "build_model",
    "check_output_dir",
    "count_parameters",
    "finetune",
    "fit_baselines",
    "freeze_encoder",
    "last_complete_checkpoint",
    "make_collator",
    "prepare_output_dir",
    "read_targets",
    "score_held_out",
    "target_key_of",
    "target_obs_keys",
    "train_from_arguments",
]
