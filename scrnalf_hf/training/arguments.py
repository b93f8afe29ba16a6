"""Command-line arguments of ``scrnalf pretrain`` / ``scrnalf finetune``, parsed with
`transformers.HfArgumentParser` next to `TrainingArguments`, so every Trainer flag works.

Both spellings work for every flag (``--train-file`` and ``--train_file``). Our recipe's
defaults for Trainer flags are in ``FINETUNE_DEFAULTS`` / ``PRETRAIN_DEFAULTS``; any flag given
on the command line overrides them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, TrainingArguments


@dataclass
class DataArguments:
    """Which cells to read and how to split them."""

    train_file: str = field(metadata={"help": "an .h5ad file or a folder written by `scrnalf convert`."})
    label_key: str | None = field(default=None, metadata={"help": "obs column with the cell labels (finetune)."})
    layer: str | None = field(default=None, metadata={"help": "AnnData layer to read (default: counts layer, .raw, X)."})
    use_raw: bool = field(default=False, metadata={"help": "read .raw.X."})
    input_kind: str = field(
        default="auto", metadata={"help": "counts | log1p | auto (counts if all values are integers)."}
    )
    test_fraction: float = field(
        default=0.2, metadata={"help": "stratified fraction of cells held out for the final scores."}
    )
    validation_fraction: float = field(
        default=0.1,
        metadata={"help": "stratified fraction of the training cells used for early stopping / best checkpoint "
                  "(0: train on every training cell and score the last epoch)."},
    )
    min_cells_per_label: int | None = field(
        default=None, metadata={"help": "drop classes with fewer cells (default: keep all, reject rare ones)."}
    )
    max_train_cells: int | None = field(default=None, metadata={"help": "subsample the training cells (seeded)."})
    dataset_name: str | None = field(default=None, metadata={"help": "dataset name for reports and the model card."})


@dataclass
class ModelArguments:
    """Which model to train."""

    preset: str | None = field(default=None, metadata={"help": "tiny | default | large (a fresh model)."})
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "a saved model folder or Hub repo id to start from.", "aliases": ["--model"]},
    )
    freeze_encoder: bool = field(default=False, metadata={"help": "train only the classification head."})
    class_weighting: str | None = field(
        default=None, metadata={"help": "None or 'balanced' (loss weights n / (C · n_c) from the training cells)."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "comma-separated config fields, e.g. 'pooling=cls,hidden_dropout=0.2,attention_type=dense'."},
    )
    early_stopping_patience: int = field(
        default=8, metadata={"help": "evaluations without macro-F1 improvement before stopping (0 = off)."}
    )


# The recipe: Trainer flags we set unless the command line says otherwise.
_COMMON_DEFAULTS = [
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
    "--ddp_find_unused_parameters", "true",
]

# The token embeddings (gene and value embeddings, unit-scale) train at this multiple of
# --learning_rate in fine-tuning; the layers and the head at --learning_rate itself (see
# finetune._SeededTrainer).
EMBEDDING_LR_MULTIPLIER = 10.0

FINETUNE_DEFAULTS = [
    *_COMMON_DEFAULTS,
    "--learning_rate", "3e-3",
    "--num_train_epochs", "40",
    "--label_smoothing_factor", "0.1",
    "--metric_for_best_model", "macro_f1",
    "--greater_is_better", "true",
]

PRETRAIN_DEFAULTS = [
    *_COMMON_DEFAULTS,
    "--learning_rate", "3e-3",
    "--num_train_epochs", "20",
    "--metric_for_best_model", "loss",
    "--greater_is_better", "false",
]


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
    return overrides


def parse_arguments(argv: list[str], defaults: list[str], output_dir_default: str | None = None):
    """Parse ``argv`` into ``(DataArguments, ModelArguments, TrainingArguments)``.

    ``defaults`` come first, so any flag in ``argv`` overrides them (argparse keeps the last).
    """
    parser = HfArgumentParser((DataArguments, ModelArguments, TrainingArguments))
    argv = list(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        # Several CPU processes (torchrun / accelerate launch without GPUs): accelerate only sets
        # up multi-CPU data parallelism for use_cpu, and CPUs need the gloo backend.
        defaults = [*defaults, "--use_cpu", "true", "--ddp_backend", "gloo"]
    if output_dir_default and not any(a.split("=")[0] in ("--output_dir", "--output-dir") for a in argv):
        argv = ["--output_dir", output_dir_default] + argv
    return parser.parse_args_into_dataclasses(args=defaults + argv)
