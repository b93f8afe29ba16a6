"""Masked gene modelling with `transformers.Trainer`, and the ``scrnalf pretrain`` command.

Each step hides a random ``mask_ratio`` of every cell's measured genes from the *input* (the
model replaces their value embedding by a mask vector) and regresses their normalised values;
the loss covers the hidden genes only. A held-out fraction of cells (``--validation-fraction``)
gives the evaluation loss that picks the best checkpoint. Labels are not needed (``--label-key``
is ignored if given). The processor's panel is the data's genes; the gene graph is built from
the training cells only.

Files written to ``--output-dir``: the model (``ScrnaLongformerForMaskedGeneModeling``), its
processor and remote code; ``all_results.json`` / ``train_results.json`` / ``eval_results.json``
(``eval_loss`` = mean squared error on masked genes of held-out cells) and
``training_summary.json`` (``dataset``, ``preset``, ``n_train_cells``, ``n_eval_cells``,
``eval_loss``, ``train_seconds``, ``train_cells_per_second``, ``hardware``, ``n_parameters``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.sparse as sp
import torch
from transformers import EarlyStoppingCallback, Trainer, TrainingArguments, set_seed

from ..configuration_scrnalf import ScrnaLongformerConfig
from ..modeling_scrnalf import ScrnaLongformerForMaskedGeneModeling
from ..processing_scrnalf import ScrnaLongformerProcessor
from .cells import CellDataset

logger = logging.getLogger(__name__)


@dataclass
class PretrainResult:
    model: ScrnaLongformerForMaskedGeneModeling
    processor: ScrnaLongformerProcessor
    trainer: Trainer
    eval_loss: float
    train_seconds: float
    train_cells_per_second: float
    n_train_cells: int
    n_eval_cells: int


class MaskedGeneDataset(CellDataset):
    """Cells for masked gene modelling: each row also carries its own values as ``labels``
    (batch, G), the regression targets, so Trainer computes the evaluation loss."""

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        row = super().__getitem__(item)
        row["labels"] = row["expression"]
        return row


class _MaskedGeneTrainer(Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False


def pretrain(
    processor: ScrnaLongformerProcessor,
    expression: np.ndarray,
    attention_mask: np.ndarray,
    training_args: TrainingArguments,
    *,
    preset: str = "tiny",
    config_overrides: dict | None = None,
    validation_fraction: float = 0.05,
    early_stopping_patience: int = 0,
) -> PretrainResult:
    """Masked gene modelling on encoded cells.

    Args:
        processor: the panel the cells were encoded with (saved with the model).
        expression: (n_cells, G) normalised values from ``processor``; no labels needed.
        attention_mask: (n_cells, G) 1 = measured gene.
        training_args: Trainer settings.
        preset: ``tiny`` | ``default`` | ``large``.
        validation_fraction: cells held out for ``eval_loss`` (seeded, random).
    """
    n_cells = expression.shape[0]
    if n_cells < 4:
        raise ValueError(f"masked gene modelling needs at least 4 cells, got {n_cells}.")
    set_seed(training_args.seed)
    order = np.random.default_rng(training_args.seed).permutation(n_cells)
    n_eval = max(1, int(round(validation_fraction * n_cells)))
    eval_rows, train_rows = np.sort(order[:n_eval]), np.sort(order[n_eval:])
    config = ScrnaLongformerConfig.from_preset(preset, n_genes=processor.n_genes, **(config_overrides or {}))
    model = ScrnaLongformerForMaskedGeneModeling(config)
    model.scrna_longformer.set_gene_graph(processor.build_gene_graph(expression[train_rows], k=config.knn_k))
    callbacks = []
    if early_stopping_patience > 0 and training_args.load_best_model_at_end:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience))
    trainer = _MaskedGeneTrainer(
        model=model,
        args=training_args,
        train_dataset=MaskedGeneDataset(expression[train_rows], attention_mask[train_rows]),
        eval_dataset=MaskedGeneDataset(expression[eval_rows], attention_mask[eval_rows]),
        processing_class=processor,
        callbacks=callbacks,
    )
    resume = training_args.resume_from_checkpoint
    if resume is not None and resume.lower() in ("true", "last"):
        resume = True
    train_output = trainer.train(resume_from_checkpoint=resume)
    eval_metrics = trainer.evaluate()
    return PretrainResult(
        model=trainer.model,
        processor=processor,
        trainer=trainer,
        eval_loss=float(eval_metrics["eval_loss"]),
        train_seconds=float(train_output.metrics.get("train_runtime", float("nan"))),
        train_cells_per_second=float(train_output.metrics.get("train_samples_per_second", float("nan"))),
        n_train_cells=len(train_rows),
        n_eval_cells=len(eval_rows),
    )


def read_unlabelled_cells(path, layer=None, use_raw=False, input_kind="auto"):
    """(matrix CSR, gene symbols, gene ids, input kind, matrix name) of any cells, no labels."""
    from ..data.anndata_io import open_anndata
    from .cells import _guess_input_kind, _read_converted_folder

    if Path(str(path)).is_dir():
        matrix, symbols, ids, _, name, stored_kind = _read_converted_folder(Path(path))
        input_kind = stored_kind if input_kind == "auto" else input_kind
    else:
        with open_anndata(path, layer=layer, use_raw=use_raw, require_counts=True) as source:
            chunks = [chunk for _, chunk in source.row_chunks(50_000)]
            matrix = sp.vstack(chunks, format="csr").astype(np.float32)
            symbols, ids, name = source.gene_symbols, source.gene_ids, source.matrix_name
    kind = _guess_input_kind(matrix) if input_kind == "auto" else input_kind
    return matrix, list(symbols), ids, kind, name


def run_pretrain(argv: Sequence[str]) -> dict:
    """``scrnalf pretrain``: parse, read cells, train, write the output folder; returns the summary."""
    from .arguments import PRETRAIN_DEFAULTS, parse_arguments, parse_config_overrides
    from .finetune import count_parameters, hardware_description, write_json

    data_args, model_args, training_args = parse_arguments(list(argv), PRETRAIN_DEFAULTS)
    if model_args.model_name_or_path is not None:
        raise ValueError("pretrain starts from a preset (--preset tiny|default|large); --model is for finetune.")
    preset = model_args.preset or "tiny"
    matrix, symbols, ids, kind, matrix_name = read_unlabelled_cells(
        data_args.train_file, data_args.layer, data_args.use_raw, data_args.input_kind
    )
    processor = ScrnaLongformerProcessor(gene_symbols=symbols, gene_ids=ids, input_kind=kind)
    features = processor(matrix, gene_names=symbols, gene_ids=ids, return_tensors="np")
    result = pretrain(
        processor, features["expression"], features["attention_mask"], training_args, preset=preset,
        config_overrides=parse_config_overrides(model_args.config_overrides),
        validation_fraction=data_args.validation_fraction, early_stopping_patience=model_args.early_stopping_patience,
    )
    summary = {}
    if result.trainer.is_world_process_zero():
        output_dir = Path(training_args.output_dir)
        result.trainer.save_model(str(output_dir))
        result.trainer.save_state()
        train_metrics = {k: v for k, v in result.trainer.state.log_history[-1].items() if isinstance(v, (int, float))}
        train_metrics["train_samples"] = result.n_train_cells
        result.trainer.save_metrics("train", train_metrics, combined=True)
        result.trainer.save_metrics("eval", {"eval_loss": result.eval_loss, "eval_samples": result.n_eval_cells}, combined=True)
        summary = {
            "dataset": data_args.dataset_name or Path(data_args.train_file).stem,
            "preset": preset,
            "objective": "masked gene modelling (mean squared error on hidden genes)",
            "input": matrix_name,
            "input_kind": kind,
            "n_train_cells": result.n_train_cells,
            "n_eval_cells": result.n_eval_cells,
            "eval_loss": result.eval_loss,
            "train_seconds": result.train_seconds,
            "train_cells_per_second": result.train_cells_per_second,
            "hardware": hardware_description(),
            "n_parameters": count_parameters(result.model),
            "seed": int(training_args.seed),
        }
        write_json(output_dir / "training_summary.json", summary)
        logger.warning("pretraining done: held-out masked-gene MSE %.4f", result.eval_loss)
    return summary
