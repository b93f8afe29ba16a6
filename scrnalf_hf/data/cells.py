"""Cells for training and evaluation: a ``scrnalf convert`` folder, opened once, never densified.

Every command that learns from cells reads them through :func:`open_cells`: a folder written by
``scrnalf convert`` is memory-mapped as it is; an ``.h5ad`` file or an AnnData is first converted
(chunk by chunk, checked) into a temporary folder of the same layout. From there a batch of
cells travels ``datasets.Dataset`` → :class:`~scrnalf_hf.data.collators.CellCollator` (gene
panel alignment, densified per batch, normalised, masked) → model, and a fold's cells go to the
baselines as one sparse matrix (:func:`panel_matrix`). No step holds the dense cells × genes
matrix of a whole dataset.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..processing_scrnalf import GeneAlignment, ScrnaLongformerProcessor
from .anndata_io import open_anndata
from .convert import DatasetGenes, convert_anndata, dataset_genes

if TYPE_CHECKING:
    from .species import SpeciesSetup

logger = logging.getLogger(__name__)

INPUT_KINDS = ("auto", "counts", "log1p")
# Each cell's sampled (collection) time, read by a time-conditioned trajectory model.
TIME_POINT_COLUMN = "time_points"
# Columns a batch needs besides the task's targets.
CELL_COLUMNS = ("cell_id", "indices", "values", "library_size")
TARGET_COLUMN = "labels"


@dataclass
class Cells:
    """One row per cell (the ``scrnalf convert`` layout) and the gene list its rows refer to.

    Attributes:
        dataset: the memory-mapped rows: ``cell_id``, ``indices``, ``values``, ``library_size``,
            ``label`` (if converted with a label key) and the kept ``obs`` columns.
        genes: the dataset's genes, value kind (``counts`` or ``log1p``) and source matrix.
        name: a name for reports (file or folder stem unless given).
        label_key: the ``obs`` column stored as ``label``, if any.
        species_setup: for a model of several species, the species it knows and the ortholog
            table relating their genes (:func:`~scrnalf_hf.data.species.fit_species_processor`);
            each cell's species is the dataset's ``species`` column.
    """

    dataset: datasets.Dataset
    genes: DatasetGenes
    name: str
    label_key: str | None = None
    _workdir: tempfile.TemporaryDirectory | None = field(default=None, repr=False)
    species_setup: "SpeciesSetup | None" = None

    @property
    def n_cells(self) -> int:
        return len(self.dataset)

    @property
    def input_kind(self) -> str:
        return self.genes.input_kind

    def with_targets(self, targets: np.ndarray | None) -> datasets.Dataset:
        """The rows a collator needs (:data:`CELL_COLUMNS`, and ``species``, ``time_points`` and
        ``protein`` and ``peaks`` where the cells have them), numpy-formatted, with each cell's target (``targets[i]`` for row ``i``, shape (n_cells,) or (n_cells, k)) as ``labels``."""
        columns = list(CELL_COLUMNS) + [c for c in ("species", TIME_POINT_COLUMN, "protein", "peaks") if c in self.dataset.column_names]
        dataset = self.dataset.select_columns(columns)
        if targets is not None:
            if len(targets) != self.n_cells:
                raise ValueError(f"{len(targets)} targets for {self.n_cells} cells.")
            dataset = dataset.add_column(TARGET_COLUMN, list(targets) if np.ndim(targets) > 1 else targets)
        return dataset.with_format("numpy")

    def on_panel(self, processor: ScrnaLongformerProcessor) -> "Cells":
        """These cells re-indexed to ``processor``'s panel (genes outside it dropped, library sizes
        kept), so that they can be concatenated with other cells on the same panel. The rows are
        written once (``datasets.map``) into a temporary folder this object keeps alive."""
        alignment = processor.align_genes(self.genes.gene_symbols, self.genes.gene_ids)
        workdir = tempfile.TemporaryDirectory(prefix="scrnalf-panel-")

        def reindex(batch):
            indices, values = [], []
            for row_indices, row_values in zip(batch["indices"], batch["values"]):
                positions = alignment.vocab_index[np.asarray(row_indices, dtype=np.int64)]
                kept = positions >= 0
                order = np.argsort(positions[kept], kind="stable")
                indices.append(positions[kept][order].astype(np.int32))
                values.append(np.asarray(row_values, dtype=np.float32)[kept][order])
            return {"indices": indices, "values": values, "length": [len(row) for row in indices]}

        columns = self.dataset.select_columns([*CELL_COLUMNS, "length"])
        mapped = columns.map(
            reindex, batched=True, cache_file_name=str(Path(workdir.name) / "cells.arrow"), desc="Aligning to the panel"
        )
        genes = DatasetGenes(processor.gene_symbols, processor.gene_ids, self.genes.input_kind, self.genes.matrix)
        return Cells(mapped, genes, self.name, None, workdir)

    def cell_ids(self) -> np.ndarray:
        """(n_cells,) each cell's name (the input's ``obs_names``)."""
        return self.dataset.with_format("numpy")["cell_id"]

    def cell_species(self) -> np.ndarray | None:
        """(n_cells,) each cell's species, canonical names (``Homo_sapiens`` -> ``human``), or
        None when the cells carry no species. Read once: every batch of baselines features and
        every collator asks."""
        return self._cell_species

    @functools.cached_property
    def _cell_species(self) -> np.ndarray | None:
        if "species" not in self.dataset.column_names:
            return None
        from ..processing_scrnalf import _canonical_species

        values = pd.Series(self.dataset.with_format("arrow")["species"].to_numpy(zero_copy_only=False))
        if values.isna().any():
            raise ValueError(f"{int(values.isna().sum())} cell(s) of {self.name} have no species; give every cell one.")
        names = {value: _canonical_species(value) for value in values.unique()}
        return values.map(names).to_numpy(dtype=object)

    def with_species(self, species: str | None = None, species_key: str | None = None) -> "Cells":
        """These cells with a ``species`` column: ``species`` for every cell, or the stored ``obs``
        column ``species_key``. A stored species that contradicts ``species`` is an error."""
        if species is not None and species_key is not None:
            raise ValueError("give --species (one for every cell) or --species-key (an obs column), not both.")
        if species is None and species_key is None:
            return self
        from ..processing_scrnalf import _canonical_species

        if species_key is not None:
            if species_key == "species" and "species" in self.dataset.column_names:
                return self
            values = self.obs_column(species_key).astype(str)
        else:
            stored = self.cell_species()
            if stored is not None:
                others = sorted(set(stored) - {_canonical_species(species)})
                if others:
                    raise ValueError(
                        f"{self.name} holds cells of species {others}, but --species {species} says every cell is "
                        f"{_canonical_species(species)}; use --species-key for a file that mixes species."
                    )
                return self
            values = np.full(self.n_cells, _canonical_species(species), dtype=object)
        dataset = self.dataset.remove_columns([c for c in ("species",) if c in self.dataset.column_names])
        dataset = dataset.add_column("species", [str(v) for v in values])
        return dataclasses.replace(self, dataset=dataset)

    def with_time_points(self, key: str) -> "Cells":
        """These cells with each cell's sampled time point (the numeric ``obs`` column ``key``,
        e.g. the day of collection) as the ``time_points`` column that a time-conditioned
        trajectory model reads."""
        values = numeric_column(self.obs_column(key), key, "--time-point-key", "time point", "the sampled time of each cell")
        dataset = self.dataset.remove_columns([c for c in (TIME_POINT_COLUMN,) if c in self.dataset.column_names])
        return dataclasses.replace(self, dataset=dataset.add_column(TIME_POINT_COLUMN, values))

    @property
    def has_time_points(self) -> bool:
        return TIME_POINT_COLUMN in self.dataset.column_names

    def time_points(self, rows: np.ndarray) -> np.ndarray | None:
        """(len(rows),) float32 time points of ``rows``, or None when the cells carry none. Read
        once: the baselines ask for every chunk of test cells."""
        return None if self._time_points is None else self._time_points[np.asarray(rows)]

    @functools.cached_property
    def _time_points(self) -> np.ndarray | None:
        if not self.has_time_points:
            return None
        return np.asarray(self.dataset.with_format("numpy")[TIME_POINT_COLUMN], dtype=np.float32)

    @property
    def has_proteins(self) -> bool:
        return self.genes.protein_names is not None and "protein" in self.dataset.column_names

    @property
    def has_peaks(self) -> bool:
        return self.genes.peak_names is not None and "peaks" in self.dataset.column_names

    def protein_levels(self, rows: np.ndarray) -> np.ndarray | None:
        """(len(rows), P) float32 CLR-normalised protein levels of ``rows`` in the cells' own
        protein order (``genes.protein_names``), or None when the cells carry no proteins."""
        return None if self._protein_levels is None else self._protein_levels[np.asarray(rows)]

    def open_peaks(self, rows: np.ndarray) -> sp.csr_matrix | None:
        """(len(rows), n_peaks) float32 binarised ATAC accessibility of ``rows`` in the cells' own
        peak order (``genes.peak_names``), sparse, or None when the cells carry no peaks."""
        if not self.has_peaks:
            return None
        rows = np.asarray(rows, dtype=np.int64)
        open_peaks = self.dataset.select_columns(["peaks"]).with_format("arrow")[rows]["peaks"].combine_chunks()
        offsets = open_peaks.offsets.to_numpy()
        indices = open_peaks.flatten().to_numpy()  # the rows' entries only, also of a sliced array
        return sp.csr_matrix(
            (np.ones(len(indices), dtype=np.float32), indices, offsets - offsets[0]),
            shape=(len(rows), len(self.genes.peak_names)),
        )

    @functools.cached_property
    def _protein_levels(self) -> np.ndarray | None:
        if not self.has_proteins:
            return None
        from ..processing_scrnalf import clr_normalize

        counts = np.asarray(self.dataset.with_format("numpy")["protein"], dtype=np.float64)  # (n_cells, P)
        return clr_normalize(counts).astype(np.float32)

    def obs_column(self, key: str) -> np.ndarray:
        """(n_cells,) values of a stored ``obs`` column, by its ``obs`` name (``label`` answers to
        the label key it was converted from)."""
        column = "label" if key == self.label_key and "label" in self.dataset.column_names else key
        if column not in self.dataset.column_names:
            stored = [c for c in self.dataset.column_names if c not in CELL_COLUMNS + ("length",)]
            if self.label_key:
                stored = [self.label_key if c == "label" else c for c in stored]
            raise ValueError(
                f"obs column {key!r} is not in {self.name} (its columns: {stored}); name an obs column of the "
                f"input, or, for a folder written by scrnalf convert, convert again with --label-key {key} (or "
                f"--obs-keys {key})."
            )
        values = self.dataset.with_format("numpy")[column]
        feature = self.dataset.features[column]
        if isinstance(feature, datasets.ClassLabel):
            return np.asarray(feature.names, dtype=object)[values]
        return np.asarray(values)


def numeric_column(values: np.ndarray, key: str, option: str, name: str, meaning: str) -> np.ndarray:
    """(n,) float32 ``values`` of the obs column ``key``, refused in one line unless every one
    is a finite number. ``option`` is the flag that named the column, ``name`` what one value is
    (``"time"``), ``meaning`` what the column should hold."""
    values = np.asarray(values)
    if values.dtype.kind not in "iuf":
        raise ValueError(
            f"{name} column {key!r} must hold numbers ({meaning}), found {values.dtype} values "
            f"such as {values[:3].tolist()}; give a numeric obs column as {option}."
        )
    values = values.astype(np.float64)
    missing = ~np.isfinite(values)
    if missing.any():
        raise ValueError(
            f"{name} column {key!r} has {int(missing.sum())} cell(s) without a finite {name} (NaN or inf); drop them "
            f"first (adata = adata[np.isfinite(adata.obs[{key!r}])])."
        )
    return values.astype(np.float32)


def guess_input_kind(values: np.ndarray) -> str:
    """``"counts"`` if every value is a non-negative integer, else ``"log1p"``."""
    values = np.asarray(values)[:1_000_000]
    return "counts" if values.size and np.array_equal(values, np.round(values)) else "log1p"


def _matrix_arguments(matrix_name: str) -> dict:
    """``open_anndata`` arguments that select the matrix named ``matrix_name`` again."""
    if matrix_name == "raw.X":
        return {"layer": None, "use_raw": True}
    if matrix_name == "X":
        return {"layer": "X", "use_raw": False}
    return {"layer": matrix_name.removeprefix("layers[").removesuffix("]").strip("'\""), "use_raw": False}


def open_cells(
    source,
    *,
    layer: str | None = None,
    use_raw: bool = False,
    input_kind: str = "auto",
    label_key: str | None = None,
    obs_keys: tuple[str, ...] = (),
    name: str | None = None,
    progress: bool = True,
    species: str | None = None,
    species_key: str | None = None,
    protein_key: str | None = None,
    atac_key: str | None = None,
) -> Cells:
    """Open cells for training: a ``scrnalf convert`` folder, an ``.h5ad`` or ``.h5mu`` file or an AnnData.

    Args:
        source: the folder, the file, or an AnnData (in memory or backed).
        layer / use_raw: which AnnData matrix; by default the first present of
            ``layers["counts"]``, ``.raw``, ``X`` (the scverse places for raw counts).
        input_kind: ``"counts"``, ``"log1p"`` or ``"auto"`` (counts if the chosen matrix holds
            integers). For a folder it must match what was converted.
        label_key / obs_keys: ``obs`` columns an AnnData's conversion keeps (the label as
            ``label``); a folder keeps what it was converted with.
        name: a name for reports.
        species / species_key: the cells' species (one for all) or the ``obs`` column holding
            each cell's, kept as the ``species`` column (cross-species models).
        protein_key: where the cells' proteins are (CITE-seq): an ``obsm`` key of an AnnData, or
            the protein modality of a ``.h5mu`` file (whose RNA modality is ``rna``); kept as the
            ``protein`` column, matched to the RNA by cell id. A folder keeps what it was
            converted with.
        atac_key: the ATAC modality of a ``.h5mu`` file (multiome), kept as the ``peaks``
            column (each cell's open peaks, binarised), matched to the RNA by cell id; any other
            input with ``atac_key`` is an error. A folder keeps what it was converted with.

    Raises:
        ValueError / FileNotFoundError: unreadable input, bad values, an ``input_kind`` that does
            not match a converted folder.
    """
    if input_kind not in INPUT_KINDS:
        raise ValueError(f"input_kind must be one of {INPUT_KINDS}, got {input_kind!r}.")
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        folder = Path(source)
        genes = dataset_genes(folder)
        if input_kind not in ("auto", genes.input_kind):
            raise ValueError(
                f"{folder} holds {genes.input_kind} values ({genes.matrix}) but --input-kind {input_kind} was "
                f"given; drop --input-kind or convert the {input_kind} matrix."
            )
        import json

        converted_label_key = json.loads((folder / "genes.json").read_text()).get("label_key")
        if protein_key is not None and genes.protein_names is None:
            raise ValueError(
                f"{folder} holds no proteins, but --protein-key {protein_key} was given; convert the input again with "
                f"--protein-key {protein_key}."
            )
        if atac_key is not None and genes.peak_names is None:
            raise ValueError(
                f"{folder} holds no ATAC peaks, but --atac-key {atac_key} was given; convert the .h5mu input again with "
                f"--atac-key {atac_key}."
            )
        cells = Cells(datasets.load_from_disk(str(folder)), genes, name or folder.name, converted_label_key)
        return cells.with_species(species, species_key)

    from .multimodal import is_mudata_path, read_modalities

    if name is None and is_mudata_path(source):
        name = Path(source).stem
    source, proteins, peaks = read_modalities(source, protein_key, atac_key)

    with open_anndata(source, layer=layer, use_raw=use_raw, require_counts=True) as expression:
        matrix_name = expression.matrix_name
        if input_kind == "auto":
            first = next(expression.row_chunks(2048), (0, sp.csr_matrix((0, 0))))[1]
            input_kind = guess_input_kind(first.data)
        present = [key for key in obs_keys if key in expression.obs.columns and key != label_key]
        if species_key is not None and species_key not in expression.obs.columns:
            raise ValueError(
                f"--species-key {species_key!r} is not an obs column of {source}; obs columns: "
                f"{list(expression.obs.columns)[:20]}."
            )
    if species is not None and species_key is not None:
        raise ValueError("give --species (one for every cell) or --species-key (an obs column), not both.")
    workdir = tempfile.TemporaryDirectory(prefix="scrnalf-cells-")
    folder = Path(workdir.name) / "cells"
    convert_anndata(
        source, folder, label_key=label_key, obs_keys=present, require_counts=input_kind == "counts",
        allow_empty_genes=True, progress=progress, species=species, species_key=species_key, proteins=proteins,
        peaks=peaks, **_matrix_arguments(matrix_name),
    )
    if name is None:
        name = Path(source).stem if isinstance(source, (str, Path)) else "anndata"
    logger.info("converted %s (%s, %s) for training", name, matrix_name, input_kind)
    return Cells(datasets.load_from_disk(str(folder)), dataset_genes(folder), name, label_key, workdir)


def panel_matrix(
    cells: Cells,
    rows: np.ndarray,
    processor: ScrnaLongformerProcessor,
    alignment: GeneAlignment | None = None,
    chunk_size: int = 8192,
) -> sp.csr_matrix:
    """The processor's output for the chosen cells as one sparse matrix (n_rows, G), float32.

    The same values a :class:`~scrnalf_hf.data.collators.CellCollator` batch holds (normalised,
    in panel order, unmeasured genes 0; in a multi-species panel each cell's genes on its own
    species' tokens, genes sharing a token summed), built from the Arrow columns without Python
    loops; normalisation keeps zeros at zero, so the matrix is as sparse as the data.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if not isinstance(cells, Cells):  # a streamed source (data/soma.py) reads its own rows
        return cells.panel_matrix(rows, processor, alignment, chunk_size)
    if processor.species is None or alignment is not None:
        if alignment is None:
            alignment = processor.align_genes(cells.genes.gene_symbols, cells.genes.gene_ids)
        return _aligned_panel_matrix(cells, rows, processor, alignment, chunk_size)
    species = cells.cell_species()
    species = np.full(len(rows), None, dtype=object) if species is None else species[rows]
    parts, order = [], []
    for name in dict.fromkeys(species):
        chosen = np.flatnonzero(species == name) if name is not None else np.arange(len(rows))
        species_alignment = processor.align_genes(cells.genes.gene_symbols, cells.genes.gene_ids, species=name)
        parts.append(_aligned_panel_matrix(cells, rows[chosen], processor, species_alignment, chunk_size))
        order.append(chosen)
    if not parts:
        return sp.csr_matrix((0, processor.n_genes), dtype=np.float32)
    stacked = sp.vstack(parts, format="csr")
    inverse = np.empty(len(rows), dtype=np.int64)
    inverse[np.concatenate(order)] = np.arange(len(rows))
    return stacked[inverse]


def _aligned_panel_matrix(
    cells: Cells,
    rows: np.ndarray,
    processor: ScrnaLongformerProcessor,
    alignment: GeneAlignment,
    chunk_size: int = 8192,
) -> sp.csr_matrix:
    """:func:`panel_matrix` of cells that all share one alignment to the panel."""
    columns = cells.dataset.select_columns(["indices", "values", "library_size"]).with_format("arrow")
    # The matrix is filled in place, chunk by chunk, so that it is held once: at most every
    # stored value of the chosen cells (genes outside the panel are dropped).
    capacity = int(np.asarray(cells.dataset.with_format("numpy").select(rows)["length"], dtype=np.int64).sum()) if len(rows) else 0
    data = np.empty(capacity, dtype=np.float32)
    gene_positions = np.empty(capacity, dtype=np.int32)
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    filled = 0
    for start in range(0, len(rows), chunk_size):
        table = columns[rows[start : start + chunk_size].tolist()]
        indices, values = table["indices"].combine_chunks(), table["values"].combine_chunks()
        offsets = indices.offsets.to_numpy()
        cell_of_entry = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
        positions = alignment.vocab_index[indices.values.to_numpy()]
        kept = positions >= 0
        library_size = table["library_size"].to_numpy()
        entries = processor.normalize_entries(values.values.to_numpy()[kept], library_size[cell_of_entry[kept]])
        cells_kept = cell_of_entry[kept]
        order = np.lexsort((positions[kept], cells_kept))  # CSR: by cell, genes ascending
        count = int(kept.sum())
        data[filled : filled + count] = entries[order]
        gene_positions[filled : filled + count] = positions[kept][order]
        indptr[start + 1 : start + table.num_rows + 1] = filled + np.cumsum(np.bincount(cells_kept, minlength=table.num_rows))
        filled += count
    matrix = sp.csr_matrix((data[:filled], gene_positions[:filled], indptr), shape=(len(rows), processor.n_genes))
    if alignment.collapses:  # genes sharing a token: log1p of their summed normalised counts
        matrix.data = np.expm1(matrix.data)
        matrix.sum_duplicates()
        matrix.data = np.log1p(matrix.data).astype(np.float32)
    return matrix


__all__ = ["Cells", "guess_input_kind", "open_cells", "panel_matrix"]
