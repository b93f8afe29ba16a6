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

from ..processing_scrnalf import ScrnaLongformerProcessor, scatter_to_panel
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
        if not len(measured):
            return torch.zeros_like(measured)
        # per cell: cells of different species in one batch measure different numbers of tokens
        n_masked = (self.mask_ratio * measured.sum(1).double()).round().long().clamp(min=1)  # (batch,)
        scores = self._scores(measured, cell_ids).masked_fill(~measured, -1.0)  # unmeasured genes lose every draw
        chosen = scores.topk(int(n_masked.max()), dim=1).indices  # (batch, most masked)
        kept = torch.arange(chosen.shape[1]) < n_masked.unsqueeze(1)
        return torch.zeros_like(measured).scatter_(1, chosen, kept)


class ProteinMaskSampler:
    """Which proteins masked-modality training hides in each cell (the model predicts them).

    A ``whole_ratio`` fraction of cells have every protein hidden — as at inference, where the
    model reads RNA only — and the others each protein with probability 1/2 (at least one), so
    that the model also learns from the proteins it is shown. One generator moves on from batch
    to batch (each DataLoader worker offsets its seed by its worker id).
    """

    def __init__(self, whole_ratio: float = 0.5, seed: int = 0):
        if not 0.0 <= whole_ratio <= 1.0:
            raise ValueError(f"whole_ratio must lie in [0, 1], got {whole_ratio}.")
        self.whole_ratio = whole_ratio
        self.seed = seed
        self._generator: torch.Generator | None = None

    def __call__(self, measured: torch.Tensor) -> torch.Tensor:
        """(batch, P) bool measured proteins -> (batch, P) bool hidden proteins."""
        if self._generator is None:
            worker = torch.utils.data.get_worker_info()
            self._generator = torch.Generator().manual_seed(self.seed + (worker.id if worker is not None else 0))
        batch, n_proteins = measured.shape
        whole = torch.rand(batch, generator=self._generator) < self.whole_ratio  # (batch,)
        some = torch.rand(batch, n_proteins, generator=self._generator) < 0.5
        # at least one hidden protein per cell: its highest-scoring measured one
        first = torch.rand(batch, n_proteins, generator=self._generator).masked_fill(~measured, -1.0).argmax(1)
        some[torch.arange(batch), first] = True
        return (whole.unsqueeze(1) | some) & measured


PROTEIN_MODES = ("none", "inputs", "targets", "masked")


class CellCollator:
    """Rows ``{"cell_id", "indices", "values", "library_size"[, "labels"]}`` → model inputs.

    Args:
        processor: the model's processor (gene panel of size G, normalisation).
        genes: the dataset's gene list (:func:`~scrnalf_hf.data.convert.dataset_genes`).
        masking: hide genes for masked gene modelling; the batch then also carries their true
            values as ``labels`` (the regression targets).
        normalize: apply the processor's normalisation; ``False`` returns the stored values as
            they are (exact round trips).
        species: for a multi-species model, the species the rows' ``species`` names may hold
            (aligned, and so checked, at once; others when first seen); each species' genes are
            aligned to the panel on their own.
        proteins: what a multimodal model gets of the rows' ``protein`` counts (aligned to the
            processor's protein panel by name, CLR-normalised): ``"none"``; ``"inputs"``
            (``protein_expression``, ``protein_mask``: a classifier reading both modalities);
            ``"targets"`` (only ``protein_mask``: the model predicts the proteins from RNA, as at
            inference); ``"masked"`` (``protein_expression``, ``protein_mask`` and
            ``masked_proteins`` drawn by ``protein_masking``: masked-modality training).
        protein_masking: the sampler of ``"masked"``.
        peaks: a multiome classifier reads the rows' open ``peaks`` (aligned to the processor's
            peak panel by name) as ``peak_accessibility`` and ``peak_mask``.

    Returns (from ``__call__``):
        ``expression`` (batch, G) float32, ``attention_mask`` (batch, G) int64 (1 = panel gene
        measured by the dataset; unmeasured genes are 0 in ``expression``); ``labels`` as
        stored (int64 class ids, float32 values) when the rows carry them; with ``masking``,
        ``masked_positions`` (batch, G) bool and ``labels`` (batch, G) float32; for a
        multi-species model ``species`` (batch,) int64; for rows with a ``time_points`` column
        (a time-conditioned trajectory model) ``time_points`` (batch,) float32; the protein
        inputs above, each (batch, P).
    """

    def __init__(
        self,
        processor: ScrnaLongformerProcessor,
        genes: DatasetGenes,
        masking: MaskSampler | None = None,
        normalize: bool = True,
        species: Sequence[str] | None = None,
        proteins: str = "none",
        protein_masking: ProteinMaskSampler | None = None,
        peaks: bool = False,
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
        if processor.species is None:
            if species:
                raise ValueError(f"the cells are of species {list(species)}, but this model knows no species.")
            self.alignments = {0: processor.align_genes(genes.gene_symbols, genes.gene_ids)}
        else:
            if not species:
                species = [None]  # a model of one species needs no species column
            self.alignments = {
                processor.species_id(name): processor.align_genes(genes.gene_symbols, genes.gene_ids, species=name)
                for name in species
            }
        self._ids: dict[str, int] = {}
        self.alignment = next(iter(self.alignments.values()))
        # (G,) per species id
        self._measured = {s: torch.from_numpy(a.measured.astype(np.int64)) for s, a in self.alignments.items()}
        if proteins not in PROTEIN_MODES:
            raise ValueError(f"proteins must be one of {PROTEIN_MODES}, got {proteins!r}.")
        if proteins == "masked" and protein_masking is None:
            raise ValueError('proteins="masked" needs a protein_masking sampler.')
        self.proteins = proteins
        self.protein_masking = protein_masking
        if proteins != "none":
            if genes.protein_names is None:
                raise ValueError(
                    "this model reads proteins, but the cells have none; give them with --protein-key (an obsm key, or "
                    "the protein modality of a .h5mu file)."
                )
            self.protein_positions = processor.align_proteins(genes.protein_names, "the cells' proteins")  # (P_data,)
            measured = np.zeros(processor.n_proteins, dtype=bool)
            measured[self.protein_positions[self.protein_positions >= 0]] = True
            self.protein_measured = measured  # (P,)
        self.peaks = peaks
        if peaks:
            if genes.peak_names is None:
                raise ValueError("this model reads ATAC peaks, but the cells have none; give them with --atac-key (a .h5mu modality).")
            self.peak_positions = processor.align_peaks(genes.peak_names, "the cells' peaks")  # (P_data,)
            self.peak_measured = np.zeros(processor.n_peaks, dtype=bool)  # (P,)
            self.peak_measured[self.peak_positions[self.peak_positions >= 0]] = True

    def _species_ids(self, features: Sequence[dict]) -> np.ndarray:
        """(batch,) the model's species id of each row (its ``species`` name)."""
        if self.processor.species is None or "species" not in features[0]:
            return np.full(len(features), next(iter(self.alignments)), dtype=np.int64)
        species = np.array([self._species_id(str(f["species"])) for f in features], dtype=np.int64)
        return species

    def _species_id(self, name: str) -> int:
        if name not in self._ids:
            species_id = self.processor.species_id(name)
            if species_id not in self.alignments:
                genes = self.genes
                self.alignments[species_id] = self.processor.align_genes(genes.gene_symbols, genes.gene_ids, species=name)
                self._measured[species_id] = torch.from_numpy(self.alignments[species_id].measured.astype(np.int64))
            self._ids[name] = species_id
        return self._ids[name]

    def dense_panel(self, features: Sequence[dict]) -> np.ndarray:
        """(batch, G) float32: each row's stored values, normalised, in panel order (each
        species' genes on their own tokens)."""
        species = self._species_ids(features)
        panel = np.zeros((len(features), self.processor.n_genes), dtype=np.float32)
        for species_id in np.unique(species):
            rows = np.flatnonzero(species == species_id)
            panel[rows] = self._dense_rows([features[i] for i in rows], self.alignments[int(species_id)])
        return panel

    def _dense_rows(self, features: Sequence[dict], alignment) -> np.ndarray:
        lengths = [len(f["indices"]) for f in features]
        cell_of_entry = np.repeat(np.arange(len(features)), lengths)  # (total nonzeros,)
        positions = alignment.vocab_index[np.concatenate([np.asarray(f["indices"], dtype=np.int64) for f in features])]
        values = np.concatenate([np.asarray(f["values"], dtype=np.float32) for f in features])
        kept = positions >= 0
        values = values[kept]
        if self.normalize:
            library_size = np.array([f["library_size"] for f in features], dtype=np.float64)
            values = self.processor.normalize_entries(values, library_size[cell_of_entry[kept]])
        return scatter_to_panel(
            len(features), self.processor.n_genes, cell_of_entry[kept], positions[kept], values, alignment.collapses
        )

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        missing = [c for c in ("indices", "values", "library_size") if c not in features[0]]
        if missing:
            raise ValueError(
                f"the rows lack {missing}: give the collator rows of a converted dataset, and train with "
                "remove_unused_columns=False so that Trainer keeps them."
            )
        species = self._species_ids(features)
        batch = {
            "expression": torch.from_numpy(self.dense_panel(features)),
            "attention_mask": torch.stack([self._measured[int(s)] for s in species]) if len(features) else
            torch.zeros(0, self.processor.n_genes, dtype=torch.int64),
        }
        if self.processor.species is not None:
            batch["species"] = torch.from_numpy(species)
        if "time_points" in features[0]:
            batch["time_points"] = torch.from_numpy(np.array([f["time_points"] for f in features], dtype=np.float32))
        if "labels" in features[0]:
            labels = np.stack([np.asarray(f["labels"]) for f in features])
            batch["labels"] = torch.from_numpy(labels.astype(np.int64 if labels.dtype.kind in "iub" else np.float32))
        if self.masking is not None:
            batch["masked_positions"] = self.masking(batch["attention_mask"].bool(), [f["cell_id"] for f in features])
            batch["labels"] = batch["expression"].clone()
        if self.proteins != "none":
            batch.update(self.protein_batch(features))
        if self.peaks:
            batch.update(self.peak_batch(features))
        return batch

    def peak_batch(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        """The rows' open peaks densified into the panel: ``peak_accessibility`` (batch, P)
        float32 0/1 and ``peak_mask`` (batch, P) bool (the panel peaks the cells' data has)."""
        accessibility = np.zeros((len(features), self.processor.n_peaks), dtype=np.float32)
        open_peaks = [self.peak_positions[np.asarray(f["peaks"], dtype=np.int64)] for f in features]  # panel positions
        cell_of_entry = np.repeat(np.arange(len(features)), [len(p) for p in open_peaks])
        positions = np.concatenate(open_peaks) if open_peaks else np.zeros(0, dtype=np.int64)
        kept = positions >= 0
        accessibility[cell_of_entry[kept], positions[kept]] = 1.0
        mask = np.broadcast_to(self.peak_measured, accessibility.shape).copy()
        return {"peak_accessibility": torch.from_numpy(accessibility), "peak_mask": torch.from_numpy(mask)}

    def protein_batch(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        """The rows' protein counts densified into the panel, CLR-normalised, as this collator's
        ``proteins`` mode asks."""
        from ..processing_scrnalf import clr_normalize

        n_proteins = self.processor.n_proteins
        counts = np.zeros((len(features), n_proteins), dtype=np.float64)
        kept = self.protein_positions >= 0
        if len(features):
            stored = np.stack([np.asarray(f["protein"], dtype=np.float64) for f in features])  # (batch, P_data)
            counts[:, self.protein_positions[kept]] = stored[:, kept]
        measured = torch.from_numpy(np.broadcast_to(self.protein_measured, counts.shape).copy())
        batch = {"protein_mask": measured.long()}
        if self.proteins in ("inputs", "masked"):
            batch["protein_expression"] = torch.from_numpy(clr_normalize(counts, self.protein_measured))
        if self.proteins == "masked":
            batch["masked_proteins"] = self.protein_masking(measured)
        return batch


__all__ = ["CellCollator", "MaskSampler", "ProteinMaskSampler"]
