"""The one data collator: sparse cells of a converted dataset → a batch on the model's gene panel.

A converted dataset stores each cell as nonzero positions in *its own* gene list. The collator
aligns that list to the model's panel once (``processor.align_genes``: Ensembl id or
case-insensitive symbol), then per batch normalises the stored values with each cell's library
size (its total over all its genes, not only the panel's) and scatters them into a dense
(batch, G) panel. It adds the task's targets (the ``labels`` column, see
:meth:`~scrnalf_hf.data.cells.Cells.with_targets`) and, for masked gene modelling, the genes to
hide (:class:`MaskSampler`).

Use with ``Trainer(..., data_collator=collator)`` and ``TrainingArguments(remove_unused_columns=False)``:
the dataset's columns (``indices``, ``values``, ...) are not model arguments, and Trainer would
otherwise drop them before the collator sees them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

from ..processing_scrnalf import ScrnaLongformerProcessor
from .convert import DatasetGenes


class MaskSampler:
    """Which measured genes masked gene modelling hides in each cell.

    Each cell gets exactly ``round(mask_ratio × measured genes)`` (at least one) masked genes,
    drawn uniformly among its measured panel genes; unmeasured genes are never masked (there is
    nothing to predict).

    Args:
        mask_ratio: fraction of measured genes masked, in (0, 1).
        seed: seed of the draws.
        per_cell: draw each cell's mask from its ``cell_id`` and ``seed`` alone, so that an
            evaluation scores the same genes every time (the evaluation loss is comparable
            between epochs); otherwise (training) one generator moves on from batch to batch,
            so every epoch hides other genes. Each DataLoader worker offsets the training
            generator's seed by its worker id.
    """

    def __init__(self, mask_ratio: float = 0.15, seed: int = 0, per_cell: bool = False):
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in (0, 1), got {mask_ratio}.")
        self.mask_ratio = mask_ratio
        self.seed = seed
        self.per_cell = per_cell
        self._generator: torch.Generator | None = None

    def _scores(self, measured: torch.Tensor, cell_ids: Sequence[str]) -> torch.Tensor:
        if self.per_cell:
            return torch.stack([torch.rand(measured.shape[1], generator=self._cell_generator(c)) for c in cell_ids])
        if self._generator is None:
            worker = torch.utils.data.get_worker_info()
            self._generator = torch.Generator().manual_seed(self.seed + (worker.id if worker is not None else 0))
        return torch.rand(measured.shape, generator=self._generator)

    def _cell_generator(self, cell_id: str) -> torch.Generator:
        digest = hashlib.sha256(f"{self.seed}:{cell_id}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))

    def __call__(self, measured: torch.Tensor, cell_ids: Sequence[str]) -> torch.Tensor:
        """(batch, G) bool measured genes -> (batch, G) bool masked genes."""
        n_masked = max(1, round(self.mask_ratio * int(measured[0].sum()))) if len(measured) else 0
        scores = self._scores(measured, cell_ids).masked_fill(~measured, -1.0)  # unmeasured genes lose every draw
        chosen = scores.topk(n_masked, dim=1).indices  # (batch, n_masked)
        return torch.zeros_like(measured).scatter_(1, chosen, True)


class CellCollator:
    """Rows ``{"cell_id", "indices", "values", "library_size"[, "labels"]}`` → model inputs.

    Args:
        processor: the model's processor (gene panel of size G, normalisation).
        genes: the dataset's gene list (:func:`~scrnalf_hf.data.convert.dataset_genes`).
        masking: hide genes for masked gene modelling; the batch then also carries their true
            values as ``labels`` (the regression targets).
        normalize: apply the processor's normalisation; ``False`` returns the stored values as
            they are (exact round trips).

    Returns (from ``__call__``):
        ``expression`` (batch, G) float32, ``attention_mask`` (batch, G) int64 (1 = panel gene
        measured by the dataset; unmeasured genes are 0 in ``expression``); ``labels`` as
        stored (int64 class ids, float32 values) when the rows carry them; with ``masking``,
        ``masked_positions`` (batch, G) bool and ``labels`` (batch, G) float32.
    """

    def __init__(
        self,
        processor: ScrnaLongformerProcessor,
        genes: DatasetGenes,
        masking: MaskSampler | None = None,
        normalize: bool = True,
    ):
        if normalize and genes.input_kind != processor.input_kind:
            raise ValueError(
                f"the dataset holds {genes.input_kind} values but the model's processor expects "
                f"{processor.input_kind}; convert the matching matrix (raw counts for a counts processor) "
                "or train a model on this kind of values."
            )
        self.processor = processor
        self.genes = genes
        self.masking = masking
        self.normalize = normalize
        self.alignment = processor.align_genes(genes.gene_symbols, genes.gene_ids)
        self._measured = torch.from_numpy(self.alignment.measured.astype(np.int64))  # (G,)

    def dense_panel(self, features: Sequence[dict]) -> np.ndarray:
        """(batch, G) float32: each row's stored values, normalised, in panel order."""
        lengths = [len(f["indices"]) for f in features]
        cell_of_entry = np.repeat(np.arange(len(features)), lengths)  # (total nonzeros,)
        positions = self.alignment.vocab_index[np.concatenate([np.asarray(f["indices"], dtype=np.int64) for f in features])]
        values = np.concatenate([np.asarray(f["values"], dtype=np.float32) for f in features])
        kept = positions >= 0
        values = values[kept]
        if self.normalize:
            library_size = np.array([f["library_size"] for f in features], dtype=np.float64)
            values = self.processor.normalize_entries(values, library_size[cell_of_entry[kept]])
        panel = np.zeros((len(features), self.processor.n_genes), dtype=np.float32)
        panel[cell_of_entry[kept], positions[kept]] = values
        return panel

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        missing = [c for c in ("indices", "values", "library_size") if c not in features[0]]
        if missing:
            raise ValueError(
                f"the rows lack {missing}: give the collator rows of a converted dataset, and train with "
                "remove_unused_columns=False so that Trainer keeps them."
            )
        batch = {
            "expression": torch.from_numpy(self.dense_panel(features)),
            "attention_mask": self._measured.expand(len(features), -1).clone(),
        }
        if "labels" in features[0]:
            labels = np.stack([np.asarray(f["labels"]) for f in features])
            batch["labels"] = torch.from_numpy(labels.astype(np.int64 if labels.dtype.kind in "iub" else np.float32))
        if self.masking is not None:
            batch["masked_positions"] = self.masking(batch["attention_mask"].bool(), [f["cell_id"] for f in features])
            batch["labels"] = batch["expression"].clone()
        return batch


__all__ = ["CellCollator", "MaskSampler"]
