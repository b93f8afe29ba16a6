"""Data collators: sparse cells of a converted dataset → a batch on the model's gene panel.

A converted dataset stores each cell as nonzero positions in *its own* gene list. The collator
aligns that list to the model's vocabulary once (``processor.align_genes``: Ensembl id or
case-insensitive symbol), then per batch scatters the values into a dense (batch, G) panel and
normalises it with ``processor.normalize`` using each cell's stored library size (total over
all its genes, not only the panel's).

Use with ``Trainer(..., data_collator=collator)`` and ``TrainingArguments(remove_unused_columns=False)``:
the dataset's columns (``indices``, ``values``, ...) are not model arguments, and Trainer would
otherwise drop them before the collator sees them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..processing_scrnalf import ScrnaLongformerProcessor
from .convert import DatasetGenes


class GenePanelCollator:
    """Rows ``{"indices", "values", "library_size"[, "label"]}`` → model inputs.

    Args:
        processor: the model's processor (gene panel of size G, normalisation).
        genes: the dataset's gene list (:func:`~scrnalf_hf.data.convert.dataset_genes`).
        normalize: apply ``processor.normalize``; ``False`` returns the stored values as they
            are (exact round trips, or values already normalised).
        label_column: dataset column returned as ``labels`` when present.

    Returns (from ``__call__``):
        ``expression`` (batch, G) float32, ``attention_mask`` (batch, G) int64 (1 = panel gene
        measured by the dataset; unmeasured genes are 0 in ``expression``) and, when the rows
        have ``label_column``, ``labels`` (batch,) int64.
    """

    def __init__(
        self,
        processor: ScrnaLongformerProcessor,
        genes: DatasetGenes,
        normalize: bool = True,
        label_column: str = "label",
    ):
        if normalize and genes.input_kind != processor.input_kind:
            raise ValueError(
                f"the dataset holds {genes.input_kind} values but the processor expects "
                f"input_kind={processor.input_kind!r}; convert the matching matrix (raw counts for a "
                "counts processor) or build the processor with the dataset's input_kind."
            )
        self.processor = processor
        self.genes = genes
        self.normalize = normalize
        self.label_column = label_column
        alignment = processor.align_genes(genes.gene_symbols, genes.gene_ids)
        self.alignment = alignment
        self._panel_position = alignment.vocab_index  # (dataset genes,) panel position or -1
        self._measured = torch.from_numpy(alignment.measured.astype(np.int64))  # (G,)

    def _dense_panel(self, features: Sequence[dict]) -> np.ndarray:
        indices = [np.asarray(f["indices"], dtype=np.int64) for f in features]
        rows = np.repeat(np.arange(len(features)), [len(i) for i in indices])  # (total nonzeros,)
        positions = self._panel_position[np.concatenate(indices)]
        values = np.concatenate([np.asarray(f["values"], dtype=np.float32) for f in features])
        kept = positions >= 0
        panel = np.zeros((len(features), self.processor.n_genes), dtype=np.float32)  # (batch, G)
        panel[rows[kept], positions[kept]] = values[kept]
        return panel

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        panel = self._dense_panel(features)
        if self.normalize:
            library_size = np.array([f["library_size"] for f in features], dtype=np.float64)
            panel = self.processor.normalize(panel, library_size)
        batch = {
            "expression": torch.from_numpy(panel),
            "attention_mask": self._measured.expand(len(features), -1).clone(),
        }
        if self.label_column in features[0]:
            batch["labels"] = torch.tensor([int(f[self.label_column]) for f in features], dtype=torch.int64)
        return batch


class MaskedGeneCollator(GenePanelCollator):
    """:class:`GenePanelCollator` plus ``masked_positions`` for masked gene modelling.

    In every cell, ``round(mask_ratio × measured genes)`` (at least one) measured panel genes
    are drawn uniformly from a seeded generator. ``masked_positions`` (batch, G) bool is True
    where the model must hide the value from its input and score its prediction; unmeasured
    genes are never masked (there is nothing to predict). ``labels`` are not returned: the
    targets are the ``expression`` values themselves.

    Args:
        mask_ratio: fraction of measured genes masked per cell, in (0, 1).
        seed: seed of the masking generator; each ``DataLoader`` worker offsets it by its id
            so that workers do not draw the same masks.
        processor, genes, normalize: as for :class:`GenePanelCollator`.
    """

    def __init__(
        self,
        processor: ScrnaLongformerProcessor,
        genes: DatasetGenes,
        mask_ratio: float = 0.15,
        seed: int = 0,
        normalize: bool = True,
    ):
        super().__init__(processor, genes, normalize=normalize, label_column="label")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in (0, 1), got {mask_ratio}.")
        self.mask_ratio = mask_ratio
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._n_masked = max(1, round(mask_ratio * int(self._measured.sum())))

    def _masking_generator(self) -> torch.Generator:
        if self._generator is None:
            worker = torch.utils.data.get_worker_info()
            self._generator = torch.Generator().manual_seed(self.seed + (worker.id if worker is not None else 0))
        return self._generator

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        batch = super().__call__(features)
        batch.pop("labels", None)
        measured = batch["attention_mask"].bool()  # (batch, G)
        scores = torch.rand(measured.shape, generator=self._masking_generator())
        scores = scores.masked_fill(~measured, -1.0)  # unmeasured genes lose every draw
        chosen = scores.topk(self._n_masked, dim=1).indices  # (batch, n_masked)
        batch["masked_positions"] = torch.zeros_like(measured).scatter_(1, chosen, True)
        return batch
