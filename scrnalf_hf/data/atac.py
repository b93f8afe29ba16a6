"""The ATAC modality of multiome cells: chromatin accessibility per peak beside the RNA.

Peaks are tokens with their own vocabulary, the peak panel, named like ``chr1:1000-1500``. A
peak's genomic coordinates come from the ``var`` columns ``chrom`` / ``start`` / ``end`` when the
modality has them, otherwise from its name (``chrom:start-end`` or ``chrom-start-end``, as 10x
Genomics and ArchR write them, or ``chrom_start_end``).

Values are binarised: a peak is open (1) in a cell with at least one fragment in it, else 0.
Single-cell ATAC has one or two copies of each locus per cell, so counts above 1 mostly measure
fragment length and sequencing depth, not more accessibility; binary values need no depth
normalisation and are what the model's checks expect.

The peak graph: each peak's neighbours are the ``k`` peaks nearest to it on the same chromosome
(itself included), by the distance between peak centres. Built by sorting, in O(P log P) time;
the table is (P, k), so peak attention costs O(P·k).

The input is a MuData file (``.h5mu``) with an RNA modality (``rna``) and an ATAC modality
(``atac`` by default; its ``layers["counts"]`` or ``X``), read with ``mudata``; cells are matched
to the RNA by id, never by position, as for proteins (``multimodal.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .multimodal import RNA_MODALITY, _match_cells, read_h5mu

ATAC_MODALITY = "atac"
# chrom, start, end separated by ":" then "-" (chr1:100-600), or "-" / "_" throughout
PEAK_NAME = re.compile(r"^(?P<chrom>[^:_\s]+?)[:_-](?P<start>\d+)[-_](?P<end>\d+)$")


@dataclass
class PeakCoordinates:
    """Genomic coordinates of P peaks, in panel order.

    Attributes:
        chrom: (P,) chromosome names (str).
        start, end: (P,) int64 base positions, ``start < end``.
    """

    chrom: np.ndarray
    start: np.ndarray
    end: np.ndarray

    def to_dict(self) -> dict[str, list]:
        """JSON-ready ``{"chrom", "start", "end"}`` lists (``genes.json``, the processor's config)."""
        return {"chrom": self.chrom.tolist(), "start": self.start.tolist(), "end": self.end.tolist()}

    @classmethod
    def from_dict(cls, record: dict) -> "PeakCoordinates":
        return cls(
            np.asarray(record["chrom"], dtype=str),
            np.asarray(record["start"], dtype=np.int64),
            np.asarray(record["end"], dtype=np.int64),
        )


@dataclass
class Peaks:
    """ATAC accessibility of some cells.

    Attributes:
        names: the P peak names, in column order.
        coordinates: their genomic coordinates.
        accessibility: (n_cells, P) float32 binarised (0/1), rows in the RNA's cell order; a
            CSR matrix when read with ``sparse=True`` (most peaks are closed in most cells).
        source: where they were read (for messages).
    """

    names: list[str]
    coordinates: PeakCoordinates
    accessibility: np.ndarray | sp.csr_matrix
    source: str


def parse_peak_coordinates(names, var: pd.DataFrame | None = None, where: str = "the ATAC modality") -> PeakCoordinates:
    """Coordinates of peaks from ``var``'s ``chrom`` / ``start`` / ``end`` columns when all three
    exist, else parsed from the peak names; any peak without valid coordinates is an error."""
    names = [str(name) for name in names]
    if not names:
        raise ValueError(f"{where} has zero peaks; give at least one peak.")
    repeated = pd.Index(names)[pd.Index(names).duplicated()]
    if len(repeated):
        raise ValueError(f"{where} lists peaks more than once: {list(repeated[:3])}; give each peak one column.")
    if var is not None and {"chrom", "start", "end"} <= set(var.columns):
        chrom = var["chrom"].astype(str).to_numpy()
        start = pd.to_numeric(var["start"], errors="coerce").to_numpy(dtype=np.float64)
        end = pd.to_numeric(var["end"], errors="coerce").to_numpy(dtype=np.float64)
        unusable = ~np.isfinite(start) | ~np.isfinite(end)
    else:
        matches = [PEAK_NAME.match(name) for name in names]
        unusable = np.array([match is None for match in matches])
        chrom = np.array([match["chrom"] if match else "" for match in matches])
        start = np.array([float(match["start"]) if match else np.nan for match in matches])
        end = np.array([float(match["end"]) if match else np.nan for match in matches])
    if unusable.any():
        examples = list(np.asarray(names)[unusable][:3])
        raise ValueError(
            f"{where} has {int(unusable.sum())} peak(s) without parseable coordinates (e.g. {examples}); name peaks "
            "chrom:start-end (chr1:1000-1500) or give var columns chrom, start, end."
        )
    inverted = end <= start
    if inverted.any() or (start < 0).any():
        bad = list(np.asarray(names)[inverted | (start < 0)][:3])
        raise ValueError(f"{where} has peaks with end <= start or a negative start (e.g. {bad}); give 0 <= start < end.")
    return PeakCoordinates(chrom.astype(str), start.astype(np.int64), end.astype(np.int64))


def binarize_peaks(counts, where: str = "the ATAC counts", sparse: bool = False) -> np.ndarray | sp.csr_matrix:
    """(n, P) fragment counts (dense or sparse) -> (n, P) float32 0/1: open where count > 0.
    Counts must be finite and non-negative. ``sparse``: a CSR result, never densified (the
    checks then read the stored values only: the implicit zeros are valid counts)."""
    if sparse:
        matrix = sp.csr_matrix(counts, copy=True)  # eliminate_zeros edits the index arrays in place
        binarize_peaks(matrix.data[None, :], where)  # the same checks, on the stored values
        matrix.data = (matrix.data > 0).astype(np.float32)
        matrix.eliminate_zeros()
        return matrix
    values = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
    if not np.issubdtype(values.dtype, np.number):
        raise ValueError(f"{where} must hold numbers, found dtype {values.dtype}.")
    if not np.isfinite(values).all():
        raise ValueError(f"{where} has NaN or infinite values; give fragment counts per peak.")
    if (values < 0).any():
        raise ValueError(f"{where} has negative values (minimum {values.min():.3g}); give raw fragment counts per peak.")
    return (values > 0).astype(np.float32)


def build_peak_graph(coordinates: PeakCoordinates, k: int) -> np.ndarray:
    """The peak graph: row ``p`` lists the ``k`` peaks nearest to peak ``p`` on its chromosome,
    by distance between centres (in bases), nearest first, ``p`` itself included; ``-1`` pads
    rows of chromosomes with fewer than ``k`` peaks.

    On a chromosome sorted by centre, the k nearest peaks of a peak lie within ``k - 1``
    positions of it, so after one sort (O(P log P)) each row picks from ``2k - 1`` candidates:
    O(P·k log k) in all, never P².

    Returns:
        (P, k) int64 neighbour table in panel order.
    """
    if k < 1:
        raise ValueError(f"the peak graph needs k >= 1, got {k}.")
    n_peaks = len(coordinates.chrom)
    centre = (coordinates.start + coordinates.end) / 2.0  # (P,) bases
    order = np.lexsort((centre, coordinates.chrom))  # sorted by chromosome, then centre
    sorted_chrom, sorted_centre = coordinates.chrom[order], centre[order]
    offsets = np.arange(-(k - 1), k)  # (2k - 1,)
    candidates = np.arange(n_peaks)[:, None] + offsets[None, :]  # (P, 2k - 1) sorted positions
    inside = (candidates >= 0) & (candidates < n_peaks)
    clipped = candidates.clip(0, n_peaks - 1)
    same_chromosome = inside & (sorted_chrom[clipped] == sorted_chrom[:, None])
    distance = np.where(same_chromosome, np.abs(sorted_centre[clipped] - sorted_centre[:, None]), np.inf)
    # stable: among equal distances the one earlier on the chromosome comes first
    nearest = np.argsort(distance, axis=1, kind="stable")[:, :k]  # (P, k) columns of candidates
    chosen = np.take_along_axis(clipped, nearest, axis=1)
    found = np.isfinite(np.take_along_axis(distance, nearest, axis=1))
    table_sorted = np.where(found, order[chosen], -1)  # (P, k) panel indices, rows in sorted order
    table = np.empty_like(table_sorted)
    table[order] = table_sorted
    return table.astype(np.int64)


def peaks_from_modality(modality, rna_ids: pd.Index, name: str = ATAC_MODALITY, sparse: bool = False) -> Peaks:
    """The peaks of a MuData ATAC modality (``layers["counts"]`` or ``X``), binarised, in the RNA's
    cell order (a CSR matrix with ``sparse``)."""
    where = f"modality {name!r}"
    if modality.n_vars == 0:
        raise ValueError(f"{where} has zero peaks; give at least one peak.")
    coordinates = parse_peak_coordinates(modality.var_names, modality.var, where)
    rows = _match_cells(rna_ids, modality.obs_names, where)
    matrix = modality.layers["counts"] if "counts" in modality.layers else modality.X
    matrix = matrix[rows] if sp.issparse(matrix) else np.asarray(matrix)[rows]
    accessibility = binarize_peaks(matrix, f"the counts of {where}", sparse=sparse)
    return Peaks([str(n) for n in modality.var_names], coordinates, accessibility, where)


def read_atac(path, atac_modality: str = ATAC_MODALITY, rna_modality: str = RNA_MODALITY, sparse: bool = False):
    """``(rna AnnData, Peaks)`` of a ``.h5mu`` file with an RNA and an ATAC modality (the
    accessibility a CSR matrix with ``sparse``)."""
    mdata, rna = read_h5mu(path, rna_modality)
    return rna, peaks_of_mudata(mdata, rna, path, atac_modality, sparse)


def peaks_of_mudata(mdata, rna, path, atac_modality: str = ATAC_MODALITY, sparse: bool = False) -> Peaks:
    """The peaks of ``mdata``'s ATAC modality in the order of its RNA modality ``rna``; a missing
    modality is an error."""
    if atac_modality not in mdata.mod:
        raise ValueError(
            f"{path} has no ATAC modality {atac_modality!r} (its modalities: {list(mdata.mod)}); name it with "
            "atac_modality (--atac-key)."
        )
    return peaks_from_modality(mdata.mod[atac_modality], rna.obs_names, atac_modality, sparse)


__all__ = [
    "ATAC_MODALITY",
    "PeakCoordinates",
    "Peaks",
    "binarize_peaks",
    "build_peak_graph",
    "parse_peak_coordinates",
    "peaks_from_modality",
    "peaks_of_mudata",
    "read_atac",
]
