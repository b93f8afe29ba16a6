"""Task declarations: every head is declared here once, and everything else reads the declaration.

A :class:`Task` says, for one head, what the rest of the package needs to know:

- which model class it is and which transformers Auto class it answers to (``__init__``
  registers both, and ``save_pretrained`` writes them into ``auto_map``);
- how each cell's target is read from a dataset (:class:`Targets`; the collator puts it in the
  batch as ``labels``), or that the collator masks genes instead (masked gene modelling);
- how predictions are scored (through ``evaluate``), and which score picks the best checkpoint;
- which classical baselines ``finetune`` and ``compare`` fit on the same processor output;
- how predictions go back into an AnnData (``obs`` / ``obsm`` names);
- its model-card sentences and the pipeline that travels with the weights.

``finetune``/``pretrain``/``compare`` (:mod:`~scrnalf_hf.training.fit`), ``predict``
(:mod:`scrnalf_hf.inference`), the model cards and the Hub folder (:mod:`scrnalf_hf.hub`) all
look a head up here (:func:`get_task`, :func:`task_for_model`). Adding a head is one model
class, one :class:`Task` passed to :func:`register_task`, and tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import softmax

from ..data.cells import numeric_column
from ..modeling_scrnalf import (
    ScrnaLongformerForCellClassification,
    ScrnaLongformerForMaskedGeneModeling,
    ScrnaLongformerForProteinPrediction,
    ScrnaLongformerForTrajectory,
    ScrnaLongformerPreTrainedModel,
)
from ..pipeline_scrnalf import TASK as CELL_TYPE_PIPELINE
from ..pipeline_scrnalf import CellTypeClassificationPipeline
from .baselines import CLASSIFICATION_BASELINES, REGRESSION_BASELINES
from .metrics import classification_metrics, protein_metrics, regression_metrics

EMBEDDING_KEY = "X_scrnalf"


@dataclass
class Targets:
    """What a task reads from a dataset before training: one target per cell.

    Attributes:
        values: (n_cells,) or (n_cells, k) targets in row order (the batch's ``labels``), or None
            when the task needs none (masked gene modelling).
        usable: (n_cells,) bool, cells that take part (e.g. classes too small to keep dropped).
        key: the ``obs`` column the targets came from.
        stratify: (n_cells,) int class ids to stratify splits by, or None for random splits.
        names: class names, ``names[i]`` = class id ``i`` (classification).
        config: model config fields the head needs (``id2label``, ``num_labels``, ...).
    """

    values: np.ndarray | None
    usable: np.ndarray
    key: str | None = None
    stratify: np.ndarray | None = None
    names: list[str] | None = None
    config: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    """One head, declared once (see the module docstring).

    Attributes:
        name: the ``--task`` value.
        model_class: the head's ``PreTrainedModel`` class.
        auto_class: the transformers Auto class it answers to.
        summary: what it does, in a few words (help texts, model cards).
        target_option: the command-line option naming the ``obs`` column of its targets
            (``label_key``, ``time_key``), or None.
        read_targets: ``(cells, key, min_cells_per_label) -> Targets``; None for a task whose
            collator makes its own targets.
        align_targets: ``(test Targets, training Targets) -> test Targets`` expressed like the
            training ones (class ids of the training labels; cells of unseen classes unusable),
            for a test set read from another dataset.
        masks_genes: the collator hides genes and asks the model to predict them.
        metric_names: held-out scores, in ``comparison.json`` and ``eval_*`` results.
        best_metric / greater_is_better: the score that picks the best checkpoint.
        predictions: model ``logits`` (n, ...) -> the arrays kept per cell.
        point: kept arrays -> (n,) point predictions (what ``score`` compares with targets).
        score: ``(targets (n,), point predictions (n,), Targets, detailed) -> {metric: value}``.
        baselines: name -> ``factory(seed, class_weighting)`` of a scikit-learn estimator, fitted
            on the processor output of the same training cells.
        floor: the baseline every comparison shows (the floor a model must clear), if any.
        write_predictions: ``(adata, kept arrays, model config) -> None``: predictions into
            ``obs`` columns named ``scrnalf_*`` and ``obsm`` (``uns["scrnalf"]`` for names that
            apply to every cell); None if the head predicts nothing a user keeps. It is called
            per chunk of cells, so it writes per-cell values only.
        card_sentence / intended_use: model-card text, given the model config.
        metric_labels: display names of ``metric_names``; metric_types: model-index
            ``(metric_type, metric_config)`` of each.
        card_notes: ``TrainingRun -> list of Markdown sentences`` after the evaluation table.
        pipeline: ``(pipeline task name, Pipeline class)`` saved with the weights, or None.
        recipe: the Trainer flags this task trains with unless the command line says otherwise.
        embedding_lr_multiplier: the token embeddings' learning rate as a multiple of the rest.
        fit_config: training cells' target values -> config fields learnt from them (e.g. the
            scale of regression targets), or None.
    """

    name: str
    model_class: type[ScrnaLongformerPreTrainedModel]
    auto_class: str
    summary: str
    target_option: str | None
    read_targets: Callable[..., Targets] | None
    align_targets: Callable[[Targets, Targets], Targets] | None
    masks_genes: bool
    metric_names: tuple[str, ...]
    best_metric: str
    greater_is_better: bool
    predictions: Callable[[np.ndarray], dict[str, np.ndarray]]
    point: Callable[[dict[str, np.ndarray]], np.ndarray]
    score: Callable[..., dict] | None
    baselines: Mapping[str, Callable] = field(default_factory=dict)
    floor: str | None = None
    write_predictions: Callable[..., None] | None = None
    card_sentence: Callable[[dict], str] = lambda config: ""
    intended_use: Callable[[dict], str] = lambda config: ""
    metric_labels: Mapping[str, str] = field(default_factory=dict)
    metric_types: Mapping[str, tuple[str, str | None]] = field(default_factory=dict)
    card_notes: Callable[[Any], list[str]] = lambda run: []
    pipeline: tuple[str, type] | None = None
    recipe: tuple[str, ...] = ()
    embedding_lr_multiplier: float = 1.0
    fit_config: Callable[[np.ndarray], dict] | None = None

    @property
    def predicts(self) -> bool:
        return self.write_predictions is not None

    def trainer_metrics(self, targets: Targets) -> Callable | None:
        """A ``compute_metrics`` for `transformers.Trainer`: its ``EvalPrediction`` holds the
        logits (or a tuple whose first element they are) and the batch ``labels``."""
        if self.score is None:
            return None

        def compute_metrics(eval_prediction) -> dict:
            logits = eval_prediction.predictions
            if isinstance(logits, (tuple, list)):
                logits = logits[0]
            point = self.point(self.predictions(np.asarray(logits)))
            return self.score(np.asarray(eval_prediction.label_ids), point, targets, detailed=False)

        return compute_metrics


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Make a head known to every command (``--task NAME``), ``predict`` and the Hub folder.

    Registers its model class with its Auto class (unless one of ours already answers to that
    Auto class) and for ``save_pretrained``'s ``auto_map``.
    """
    import transformers

    from ..configuration_scrnalf import ScrnaLongformerConfig

    TASKS[task.name] = task
    auto = getattr(transformers, task.auto_class)
    registered = auto._model_mapping._extra_content.get(ScrnaLongformerConfig)
    if registered is None or registered is task.model_class or registered.__name__ == task.model_class.__name__:
        auto.register(ScrnaLongformerConfig, task.model_class, exist_ok=True)
    task.model_class.register_for_auto_class(task.auto_class)
    if task.pipeline is not None:
        from transformers.pipelines import PIPELINE_REGISTRY

        pipeline_name, pipeline_class = task.pipeline
        PIPELINE_REGISTRY.register_pipeline(pipeline_name, pipeline_class=pipeline_class, pt_model=auto)
    return task


def get_task(name: str) -> Task:
    """The task called ``name``; a ``ValueError`` lists the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}.")
    return TASKS[name]


def task_for_model(model_or_config) -> Task | None:
    """The task of a model, a config or a ``config.json`` dict (by its architecture), or None for
    the bare encoder."""
    config = getattr(model_or_config, "config", model_or_config)
    if isinstance(model_or_config, ScrnaLongformerPreTrainedModel):
        names = [type(model_or_config).__name__]
    elif isinstance(config, dict):
        names = config.get("architectures") or []
    else:
        names = getattr(config, "architectures", None) or []
    for task in TASKS.values():
        if task.model_class.__name__ in names:
            return task
    return None


# ---------------------------------------------------------------------------------------------
# Cell classification
# ---------------------------------------------------------------------------------------------


def _class_targets(cells, key: str, min_cells_per_label: int | None = None) -> Targets:
    """Class ids of ``obs[key]``; cells of classes below ``min_cells_per_label`` left out."""
    from ..data.splits import check_class_sizes

    values = cells.obs_column(key)
    missing = pd.isna(values)
    if missing.any():
        raise ValueError(
            f"label column {key!r} has {int(missing.sum())} cell(s) without a label; drop unlabelled cells first "
            f"(adata = adata[adata.obs[{key!r}].notna()])."
        )
    values = values.astype(str)
    names = list(dict.fromkeys(cells.dataset.features["label"].names)) if (
        key == cells.label_key and "label" in cells.dataset.column_names
    ) else sorted(set(values))
    names = [name for name in names if (values == name).any()]
    usable = np.ones(len(values), dtype=bool)
    if min_cells_per_label is not None:
        counts = pd.Series(values).value_counts()
        dropped = [name for name in names if counts.get(name, 0) < min_cells_per_label]
        if dropped:
            import logging

            logging.getLogger(__name__).warning(
                "dropping %d class(es) with fewer than %d cells: %s", len(dropped), min_cells_per_label, dropped
            )
            usable = ~np.isin(values, dropped)
            names = [name for name in names if name not in dropped]
            if not names:
                raise ValueError(
                    f"--min-cells-per-label {min_cells_per_label} drops every class of {key!r} (the largest has "
                    f"{int(counts.max())} cells); give a smaller number."
                )
    index = {name: i for i, name in enumerate(names)}
    codes = np.array([index.get(v, -1) for v in values], dtype=np.int64)
    check_class_sizes(codes[usable], names, key, min_cells=2)
    id2label = dict(enumerate(names))
    return Targets(
        values=codes, usable=usable, key=key, stratify=codes, names=names,
        config={"id2label": id2label, "label2id": {n: i for i, n in id2label.items()}, "num_labels": len(names)},
    )


def _align_classes(test: Targets, train: Targets) -> Targets:
    """Test labels as training class ids; cells of classes the model never saw are left out."""
    import logging

    index = {name: i for i, name in enumerate(train.names)}
    unseen = [name for name in test.names if name not in index]
    if len(unseen) == len(test.names):
        raise ValueError(
            f"none of the test labels in {test.key!r} ({test.names[:10]}) is among the training labels "
            f"({train.names[:10]}); compare needs the same label vocabulary."
        )
    test_names = np.asarray(test.names, dtype=object)
    codes = np.array([index.get(name, -1) for name in test_names[test.values]], dtype=np.int64)
    usable = test.usable & (codes >= 0)
    if unseen:
        logging.getLogger(__name__).warning(
            "%d test cell(s) of %d label(s) absent from the training labels are not scored: %s",
            int((test.usable & (codes < 0)).sum()), len(unseen), unseen[:10],
        )
    return Targets(values=codes, usable=usable, key=test.key, stratify=codes, names=train.names, config=train.config)


def _class_probabilities(logits: np.ndarray) -> dict[str, np.ndarray]:
    return {"probabilities": softmax(np.asarray(logits, dtype=np.float64), axis=1).astype(np.float32)}


def _predicted_class(predicted: dict[str, np.ndarray]) -> np.ndarray:
    return predicted["probabilities"].argmax(1)


def _class_scores(targets: np.ndarray, point: np.ndarray, task_targets: Targets, detailed: bool = False) -> dict:
    return classification_metrics(targets, point, len(task_targets.names), per_class=detailed)


LABEL_KEY = "scrnalf_label"
CONFIDENCE_KEY = "scrnalf_confidence"
PROBABILITIES_KEY = "scrnalf_probabilities"


def _write_cell_labels(adata, predicted: dict[str, np.ndarray], config) -> None:
    """``obs["scrnalf_label"]`` (categorical), ``obs["scrnalf_confidence"]`` (probability of that
    label), ``obsm["scrnalf_probabilities"]`` (n_cells, num_labels; label order in
    ``uns["scrnalf"]["labels"]``)."""
    probabilities = predicted["probabilities"]
    labels = [config.id2label[i] for i in range(config.num_labels)]
    adata.obs[LABEL_KEY] = pd.Categorical([labels[i] for i in probabilities.argmax(1)], categories=labels)
    adata.obs[CONFIDENCE_KEY] = probabilities.max(1)
    adata.obsm[PROBABILITIES_KEY] = probabilities
    adata.uns.setdefault("scrnalf", {})["labels"] = labels


def _classification_notes(run) -> list[str]:
    notes = []
    majority = run.baseline_rows().get("majority")
    macro_f1 = run.metric("macro_f1")
    if majority and macro_f1 is not None:
        floor = float(np.mean([float(r["macro_f1"]) for r in majority]))
        notes.append(f"Always predicting the largest class scores macro-F1 {floor:.3f}; this model scores {macro_f1:.3f}.")
    per_class = (run.training_summary.get("metrics") or {}).get("per_class_f1")
    if per_class:
        notes.append(
            "Per-class F1 of this model: " + ", ".join(f"{label} {float(f1):.3f}" for label, f1 in per_class.items()) + "."
        )
    return notes


CLASSIFICATION = Task(
    name="classification",
    model_class=ScrnaLongformerForCellClassification,
    auto_class="AutoModelForSequenceClassification",
    summary="cell-type classification",
    target_option="label_key",
    read_targets=_class_targets,
    align_targets=_align_classes,
    masks_genes=False,
    metric_names=("accuracy", "macro_f1"),
    best_metric="macro_f1",
    greater_is_better=True,
    predictions=_class_probabilities,
    point=_predicted_class,
    score=_class_scores,
    baselines=CLASSIFICATION_BASELINES,
    floor="majority",
    write_predictions=_write_cell_labels,
    card_sentence=lambda config: f"This checkpoint classifies cells into {len(config.get('id2label') or {})} types.",
    intended_use=lambda config: "annotating cells of the same kind of sample as the training data with the labels "
    "above, and as a starting point for fine-tuning on related data.",
    metric_labels={"accuracy": "Accuracy", "macro_f1": "Macro-F1"},
    metric_types={"accuracy": ("accuracy", None), "macro_f1": ("f1", "macro")},
    card_notes=_classification_notes,
    pipeline=(CELL_TYPE_PIPELINE, CellTypeClassificationPipeline),
    recipe=(
        "--learning_rate", "3e-3",
        "--num_train_epochs", "40",
        "--label_smoothing_factor", "0.1",
    ),
    # The token embeddings (unit-scale gene and value embeddings) train at 10x the learning rate
    # of the layers in fine-tuning; see ScrnaTrainer.
    embedding_lr_multiplier=10.0,
)


# ---------------------------------------------------------------------------------------------
# Masked gene modelling
# ---------------------------------------------------------------------------------------------

MASKED_GENES = Task(
    name="masked_genes",
    model_class=ScrnaLongformerForMaskedGeneModeling,
    auto_class="AutoModelForMaskedLM",
    summary="masked gene modelling (pretraining)",
    target_option=None,
    read_targets=None,
    align_targets=None,
    masks_genes=True,
    metric_names=("loss",),
    best_metric="loss",
    greater_is_better=False,
    predictions=lambda logits: {"expression": np.asarray(logits, dtype=np.float32)},
    point=lambda predicted: predicted["expression"],
    score=None,
    card_sentence=lambda config: "This checkpoint is a masked-gene-modelling encoder to fine-tune or embed cells with.",
    intended_use=lambda config: "cell embeddings and fine-tuning on downstream tasks with the same gene panel.",
    metric_labels={"loss": "Masked-gene MSE"},
    recipe=(
        "--learning_rate", "3e-3",
        "--num_train_epochs", "20",
    ),
    embedding_lr_multiplier=1.0,
)


# ---------------------------------------------------------------------------------------------
# Trajectory (pseudotime regression)
# ---------------------------------------------------------------------------------------------


def _time_targets(cells, key: str, min_cells_per_label: int | None = None) -> Targets:
    """Each cell's time (pseudotime, or e.g. days) from the numeric ``obs[key]``, float32."""
    if min_cells_per_label is not None:
        raise ValueError("--min-cells-per-label drops rare classes of a classification; the trajectory task has none, drop it.")
    values = numeric_column(cells.obs_column(key), key, "--time-key", "time", "a pseudotime or time per cell")
    return Targets(values=values, usable=np.ones(len(values), dtype=bool), key=key)


def _time_scale(values: np.ndarray) -> dict:
    """The training times' mean and standard deviation: the trajectory head's units."""
    values = np.asarray(values, dtype=np.float64)
    scale = float(values.std()) if len(values) else 0.0
    return {"target_center": float(values.mean()) if len(values) else 0.0, "target_scale": scale if scale > 0 else 1.0}


def _time_scores(targets: np.ndarray, point: np.ndarray, task_targets: Targets, detailed: bool = False) -> dict:
    return regression_metrics(targets, point)


PSEUDOTIME_KEY = "scrnalf_pseudotime"


def _write_pseudotime(adata, predicted: dict[str, np.ndarray], config) -> None:
    """``obs["scrnalf_pseudotime"]``: each cell's predicted pseudotime, in the units of the
    training targets."""
    adata.obs[PSEUDOTIME_KEY] = predicted["pseudotime"]


def _trajectory_notes(run) -> list[str]:
    ridge = run.baseline_rows().get("ridge")
    spearman = run.metric("spearman")
    if not ridge or spearman is None:
        return []
    floor = float(np.mean([float(r["spearman"]) for r in ridge]))
    return [f"Ridge regression on the same input reaches a Spearman correlation of {floor:.3f}; this model {spearman:.3f}."]


TRAJECTORY = Task(
    name="trajectory",
    model_class=ScrnaLongformerForTrajectory,
    # Sequence classification (regression of one value per sequence in transformers) is the cell
    # classifier's, masked LM the pretraining head's: time series prediction is the Auto class
    # whose name says "predict a time-ordered quantity", and no other head of ours claims it.
    auto_class="AutoModelForTimeSeriesPrediction",
    summary="pseudotime regression",
    target_option="time_key",
    read_targets=_time_targets,
    fit_config=_time_scale,
    align_targets=None,
    masks_genes=False,
    metric_names=("spearman", "mae"),
    best_metric="spearman",
    greater_is_better=True,
    predictions=lambda logits: {"pseudotime": np.asarray(logits, dtype=np.float32).reshape(-1)},
    point=lambda predicted: predicted["pseudotime"],
    score=_time_scores,
    baselines=REGRESSION_BASELINES,
    floor="ridge",
    write_predictions=_write_pseudotime,
    card_sentence=lambda config: "This checkpoint predicts each cell's pseudotime (a position along a trajectory)"
    + (", given the time point its sample was collected at." if config.get("time_conditioning") else "."),
    intended_use=lambda config: "ordering cells of the same kind of sample as the training data along the trajectory "
    "it was trained on; pseudotime is in the units of the training targets, and cells off that trajectory get a "
    "value all the same.",
    metric_labels={"spearman": "Spearman correlation", "mae": "Mean absolute error"},
    metric_types={"spearman": ("spearmanr", None), "mae": ("mae", None)},
    card_notes=_trajectory_notes,
    recipe=(
        # the default preset reaches a held-out Spearman of 0.97 on simulated 2,000 cells x 500
        # genes in 8 epochs (0.93 after the first); early stopping ends runs that plateau sooner
        "--learning_rate", "3e-3",
        "--num_train_epochs", "10",
    ),
    embedding_lr_multiplier=10.0,
)


# ---------------------------------------------------------------------------------------------
# Cross-modal prediction (RNA -> protein, CITE-seq)
# ---------------------------------------------------------------------------------------------


def _protein_targets(cells, key: str, min_cells_per_label: int | None = None) -> Targets:
    """Each cell's CLR-normalised protein levels (n_cells, P) from the cells' ``protein`` column
    (read from ``--protein-key`` when the cells were opened), in the order of its protein names."""
    from ..processing_scrnalf import clr_normalize

    if min_cells_per_label is not None:
        raise ValueError("--min-cells-per-label drops rare classes of a classification; the protein task has none, drop it.")
    names = cells.genes.protein_names
    if names is None or "protein" not in cells.dataset.column_names:
        raise ValueError(
            f"{cells.name} holds no proteins; give them with --protein-key (an obsm key such as protein_expression, or the "
            "protein modality of a .h5mu file), or convert the input with --protein-key."
        )
    counts = np.asarray(cells.dataset.with_format("numpy")["protein"], dtype=np.float64)  # (n_cells, P)
    return Targets(
        values=clr_normalize(counts), usable=np.ones(len(counts), dtype=bool), key=key,
        config={"modalities": {"protein": len(names)}, "protein_names": list(names)},
    )


def _protein_scores(targets: np.ndarray, point: np.ndarray, task_targets: Targets, detailed: bool = False) -> dict:
    return protein_metrics(targets, point)


PROTEIN_KEY = "scrnalf_protein"


def _write_proteins(adata, predicted: dict[str, np.ndarray], config) -> None:
    """``obsm["scrnalf_protein"]``: (n_cells, P) predicted CLR protein levels; the protein names,
    in column order, in ``uns["scrnalf"]["protein_names"]``."""
    adata.obsm[PROTEIN_KEY] = predicted["protein"]
    adata.uns.setdefault("scrnalf", {})["protein_names"] = list(config.protein_names or [])


def _protein_notes(run) -> list[str]:
    ridge = run.baseline_rows().get("ridge")
    pearson = run.metric("pearson_median")
    if not ridge or pearson is None:
        return []
    floor = float(np.mean([float(r["pearson_median"]) for r in ridge]))
    return [
        f"Ridge regression of the proteins on the same RNA input reaches a median Pearson correlation of {floor:.3f}; "
        f"this model {pearson:.3f}."
    ]


PROTEIN = Task(
    name="protein",
    model_class=ScrnaLongformerForProteinPrediction,
    # one output per protein token: token classification is the Auto class of per-token heads,
    # and no other head of ours claims it
    auto_class="AutoModelForTokenClassification",
    summary="protein prediction from RNA",
    target_option="protein_key",
    read_targets=_protein_targets,
    align_targets=None,
    masks_genes=False,
    metric_names=("pearson_median", "rmse"),
    best_metric="pearson_median",
    greater_is_better=True,
    predictions=lambda logits: {"protein": np.asarray(logits, dtype=np.float32)},
    point=lambda predicted: predicted["protein"],
    score=_protein_scores,
    baselines=REGRESSION_BASELINES,
    floor="ridge",
    write_predictions=_write_proteins,
    card_sentence=lambda config: "This checkpoint reads RNA and CITE-seq proteins and predicts the levels of "
    f"{len(config.get('protein_names') or [])} proteins (CLR-normalised) from RNA alone: "
    + ", ".join(config.get("protein_names") or []) + ".",
    intended_use=lambda config: "imputing the antibody panel above for cells of the same kind of sample measured with "
    "RNA only; predicted levels are in CLR units of the training data.",
    metric_labels={"pearson_median": "Median Pearson r over proteins", "rmse": "RMSE (CLR)"},
    metric_types={"pearson_median": ("pearsonr", "median over proteins"), "rmse": ("rmse", None)},
    card_notes=_protein_notes,
    # the settings of the committed simulated CITE-seq benchmark (median Pearson 0.852 vs ridge
    # 0.722, benchmarks/multimodal): a decaying schedule over 6 epochs stopped at 0.729
    recipe=(
        "--learning_rate", "3e-3",
        "--num_train_epochs", "10",
        "--lr_scheduler_type", "constant",
    ),
    embedding_lr_multiplier=10.0,
)


for _task in (CLASSIFICATION, MASKED_GENES, TRAJECTORY, PROTEIN):
    register_task(_task)


__all__ = [
    "CLASSIFICATION",
    "EMBEDDING_KEY",
    "MASKED_GENES",
    "PROTEIN",
    "PROTEIN_KEY",
    "PSEUDOTIME_KEY",
    "TASKS",
    "TRAJECTORY",
    "Targets",
    "Task",
    "get_task",
    "register_task",
    "task_for_model",
]
