"""The second modality of CITE-seq cells: protein (antibody, ADT) counts beside the RNA.

Two inputs are read, both in the scverse conventions:

- a MuData file (``.h5mu``) with an RNA modality (``rna``) and a protein modality (``prot`` by
  default; its ``layers["counts"]`` or ``X``, proteins named by its ``var_names``), read with the
  ``mudata`` package;
- an AnnData whose ``obsm[key]`` holds the proteins: a DataFrame (columns = protein names,
  index = cell ids), or an array with the names in ``uns["protein_names"]`` (as scvi-tools
  writes ``obsm["protein_expression"]``).

Cells are matched across modalities by id (``obs_names``, a DataFrame's index), never by
position: the protein rows are put in the RNA's cell order, and ids that differ between the
modalities are an error that names some of them. Protein counts must be raw (finite,
non-negative); the processor normalises them (CLR).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

RNA_MODALITY = "rna"
PROTEIN_MODALITY = "prot"
PROTEIN_OBSM_KEY = "protein_expression"
PROTEIN_NAMES_KEY = "protein_names"


@dataclass
class Proteins:
    """Protein counts of some cells.

    Attributes:
        names: the P protein names, in column order.
        counts: (n_cells, P) float32 raw counts, rows in the RNA's cell order.
        source: where they were read (for messages and ``genes.json``).
    """

    names: list[str]
    counts: np.ndarray
    source: str


def is_mudata_path(source) -> bool:
    return isinstance(source, (str, Path)) and Path(source).suffix == ".h5mu"


def _check_counts(counts: np.ndarray, names: list[str], where: str) -> np.ndarray:
    """(n, P) float32 counts, checked: at least one protein, unique names, finite, non-negative."""
    if counts.ndim != 2 or counts.shape[1] == 0 or not names:
        raise ValueError(f"{where} has zero protein features; give at least one protein column.")
    if len(names) != counts.shape[1]:
        raise ValueError(f"{where} names {len(names)} proteins for {counts.shape[1]} protein columns.")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{where} lists proteins more than once: {repeated[:5]}; give each protein one column.")
    if not np.issubdtype(counts.dtype, np.number):
        raise ValueError(f"{where} must hold numbers, found dtype {counts.dtype}.")
    counts = counts.astype(np.float32)
    if not np.isfinite(counts).all():
        bad = int((~np.isfinite(counts)).any(1).sum())
        raise ValueError(f"{where} has NaN or infinite protein counts in {bad} cell(s); give raw antibody counts for every cell.")
    if (counts < 0).any():
        raise ValueError(
            f"{where} has negative protein counts (minimum {counts.min():.3g}): they look normalised or centred; "
            "give raw antibody (ADT) counts, the processor normalises them (CLR)."
        )
    return counts


def _match_cells(rna_ids: pd.Index, protein_ids: pd.Index, where: str) -> np.ndarray:
    """Row of each RNA cell in the other modality's rows (proteins, peaks), by cell id; any id not
    shared is an error."""
    rna_ids, protein_ids = pd.Index(rna_ids.astype(str)), pd.Index(protein_ids.astype(str))
    for name, ids in (("the RNA", rna_ids), (where, protein_ids)):
        if ids.has_duplicates:
            raise ValueError(f"{name} repeats cell ids ({list(ids[ids.duplicated()][:3])}); cells are matched by id, make them unique.")
    only_rna, only_protein = rna_ids.difference(protein_ids), protein_ids.difference(rna_ids)
    if len(only_rna) or len(only_protein):
        raise ValueError(
            f"the cell ids of {where} differ from the RNA's: {len(only_rna)} RNA cell(s) missing from it (e.g. "
            f"{list(only_rna[:3])}), {len(only_protein)} row(s) of no RNA cell (e.g. {list(only_protein[:3])}); "
            "cells are matched by id, never by position: give both modalities the same cell ids (obs_names)."
        )
    return protein_ids.get_indexer(rna_ids)


def proteins_from_anndata(adata, protein_key: str = PROTEIN_OBSM_KEY, where: str | None = None) -> Proteins:
    """The proteins of an AnnData's ``obsm[protein_key]`` in its cell order (see the module docstring)."""
    where = where or f"obsm[{protein_key!r}]"
    if protein_key not in adata.obsm:
        raise ValueError(
            f"the AnnData has no {where}; its obsm keys: {list(adata.obsm.keys())}. Name the proteins with "
            "--protein-key (an obsm key), or give a .h5mu file with a protein modality."
        )
    table = adata.obsm[protein_key]
    if isinstance(table, pd.DataFrame):
        names = [str(c) for c in table.columns]
        rows = _match_cells(adata.obs_names, table.index, where)
        counts = table.to_numpy()[rows] if len(names) else np.zeros((adata.n_obs, 0))
    else:
        names = adata.uns.get(PROTEIN_NAMES_KEY, adata.uns.get(f"{protein_key}_names"))
        if names is None:
            raise ValueError(
                f"{where} is an array without protein names: put them in uns['{PROTEIN_NAMES_KEY}'] (as scvi-tools "
                "does) or store the proteins as a DataFrame with named columns."
            )
        names = [str(n) for n in np.asarray(names).ravel()]
        counts = table.toarray() if sp.issparse(table) else np.asarray(table)
    return Proteins(names, _check_counts(np.asarray(counts), names, where), where)


def proteins_from_modality(modality, rna_ids: pd.Index, name: str) -> Proteins:
    """The proteins of a MuData protein modality (``layers["counts"]`` or ``X``), in the RNA's cell order."""
    where = f"modality {name!r}"
    if modality.n_vars == 0:
        raise ValueError(f"{where} has zero protein features; give at least one protein.")
    matrix = modality.layers["counts"] if "counts" in modality.layers else modality.X
    rows = _match_cells(rna_ids, modality.obs_names, where)
    counts = matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)
    names = [str(n) for n in modality.var_names]
    return Proteins(names, _check_counts(counts[rows], names, where), where)


def read_h5mu(path, rna_modality: str = RNA_MODALITY):
    """``(MuData, rna AnnData)`` of a ``.h5mu`` file; a missing or gene-less RNA modality is an error."""
    import mudata

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found.")
    try:
        mdata = mudata.read_h5mu(path)
    except OSError as error:
        raise ValueError(f"{path} is not a readable .h5mu file ({error}).") from None
    if rna_modality not in mdata.mod:
        raise ValueError(
            f"{path} has no RNA modality {rna_modality!r} (its modalities: {list(mdata.mod)}); a multimodal model reads "
            "gene expression from it."
        )
    rna = mdata.mod[rna_modality]
    if rna.n_vars == 0:
        raise ValueError(f"modality {rna_modality!r} of {path} has zero genes.")
    return mdata, rna


def read_mudata(path, protein_modality: str | None = PROTEIN_MODALITY, rna_modality: str = RNA_MODALITY):
    """``(rna AnnData, Proteins or None)`` of a ``.h5mu`` file; the protein modality is read when
    ``protein_modality`` is given (its absence is then an error)."""
    mdata, rna = read_h5mu(path, rna_modality)
    return rna, None if protein_modality is None else proteins_of_mudata(mdata, rna, path, protein_modality)


def proteins_of_mudata(mdata, rna, path, protein_modality: str) -> Proteins:
    """The proteins of ``mdata``'s modality ``protein_modality`` in the order of its RNA modality
    ``rna``; a missing modality is an error."""
    if protein_modality not in mdata.mod:
        raise ValueError(
            f"{path} has no protein modality {protein_modality!r} (its modalities: {list(mdata.mod)}); name it "
            "with --protein-key."
        )
    return proteins_from_modality(mdata.mod[protein_modality], rna.obs_names, protein_modality)


def read_proteins(source, protein_key: str | None):
    """``(RNA source, Proteins or None)``: the RNA to convert (the path or AnnData as given, or a
    ``.h5mu`` file's RNA modality) and, when ``protein_key`` is given, its proteins (a ``.h5mu``
    modality, or an ``obsm`` key of an AnnData / ``.h5ad`` file)."""
    if is_mudata_path(source):
        return read_mudata(source, protein_modality=protein_key)
    if protein_key is None:
        return source, None
    if isinstance(source, (str, Path)):
        import anndata as ad

        # obs, obsm and uns only: the expression matrix stays on disk for the chunked conversion
        backed = ad.read_h5ad(source, backed="r")
        try:
            proteins = proteins_from_anndata(backed, protein_key, where=f"obsm[{protein_key!r}] of {source}")
        finally:
            backed.file.close()
        return source, proteins
    return source, proteins_from_anndata(source, protein_key)


def read_modalities(source, protein_key: str | None = None, atac_key: str | None = None):
    """``(RNA source, Proteins or None, Peaks or None)``: :func:`read_proteins`, and with
    ``atac_key`` the peaks of that ATAC modality of a ``.h5mu`` file (binarised, a CSR matrix in
    the RNA's cell order; see :mod:`~scrnalf_hf.data.atac`). Peaks exist only beside the RNA of a
    MuData file, so ``atac_key`` with any other input is an error."""
    if atac_key is None:
        return (*read_proteins(source, protein_key), None)
    if not is_mudata_path(source):
        shown = source if isinstance(source, (str, Path)) else "an AnnData"
        raise ValueError(
            f"--atac-key {atac_key} reads the ATAC modality of a .h5mu (MuData) file, but {shown} is not one; give a "
            "MuData file with an RNA modality 'rna' and the ATAC modality."
        )
    from .atac import peaks_of_mudata

    mdata, rna = read_h5mu(source)
    proteins = None if protein_key is None else proteins_of_mudata(mdata, rna, source, protein_key)
    return rna, proteins, peaks_of_mudata(mdata, rna, source, atac_key, sparse=True)


__all__ = [
    "PROTEIN_MODALITY",
    "PROTEIN_OBSM_KEY",
    "Proteins",
    "is_mudata_path",
    "proteins_from_anndata",
    "read_modalities",
    "read_mudata",
    "read_proteins",
]
