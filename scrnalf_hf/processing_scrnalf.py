"""Processor of the scRNA longformer: gene vocabulary, normalisation and the gene kNN graph.

Turns an AnnData or a cells × genes matrix into model-ready tensors aligned to the model's gene
panel, matching genes by Ensembl id or by symbol (case-insensitive), never by column position.

This file is copied next to saved weights as remote code: it imports only numpy and
transformers, and reads AnnData and scipy matrices by duck typing.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from transformers import BatchFeature
from transformers.feature_extraction_utils import FeatureExtractionMixin
from transformers.utils import logging

logger = logging.get_logger(__name__)

INPUT_KINDS = ("counts", "log1p")
PROTEIN_NORMALIZATIONS = ("clr",)
# log1p of counts scaled to 10,000 per cell stays below ~9.3; integers far above that are counts.
_LARGEST_LOG1P = 30.0
_KIND_NAMES = {"counts": "raw integer counts", "log1p": "log-normalised values (log1p)"}
GENE_ID_COLUMNS = ("gene_ids", "gene_id", "ensembl_id", "ensembl_gene_id", "feature_id")


# Other spellings of the species names users give (--species Homo_sapiens). Here, not in the
# package's ortholog module, because this file travels with the weights.
SPECIES_ALIASES = {
    **dict.fromkeys(["human", "homo_sapiens", "homo sapiens", "hsapiens", "hs"], "human"),
    **dict.fromkeys(["mouse", "mus_musculus", "mus musculus", "mmusculus", "mm"], "mouse"),
}


def _canonical_species(name: str) -> str:
    """``"Homo  Sapiens"`` -> ``"human"``; names without an alias are lowercased."""
    key = " ".join(str(name).strip().lower().split())
    return SPECIES_ALIASES.get(key, key)


def gene_id_match_key(gene_id: str) -> str:
    """Ensembl ids match without their version suffix: ENSG00000141510.16 == ENSG00000141510."""
    return str(gene_id).split(".")[0].upper()


def symbol_match_key(symbol: str) -> str:
    return str(symbol).lower()


def repeated_keys(keys: Sequence[str]) -> list[str]:
    seen, repeated = set(), []
    for key in keys:
        if key in seen and key not in repeated:
            repeated.append(key)
        seen.add(key)
    return repeated


def make_unique(names: Sequence[str]) -> list[str]:
    """Repeated names get ``-1``, ``-2``, ... appended, as anndata's ``var_names_make_unique``
    does (case-insensitively here, as genes are matched): ``[A, a, A] -> [A, a-1, A-2]``. The one
    rule for repeated gene symbols: ``convert`` names a dataset's genes with it, the processor
    aligns an input's genes with it (this file imports no anndata: it travels as remote code)."""
    taken = {symbol_match_key(name) for name in names}
    seen: set[str] = set()
    unique = []
    for name in names:
        key = symbol_match_key(name)
        if key in seen:
            suffix = 1
            while symbol_match_key(f"{name}-{suffix}") in taken:
                suffix += 1
            name = f"{name}-{suffix}"
            key = symbol_match_key(name)
            taken.add(key)
        seen.add(key)
        unique.append(name)
    return unique


def _other_matrices(adata) -> str:
    """Which matrices an AnnData offers and the options that pick them, for error messages."""
    options = ["X (--layer X)"]
    if adata.raw is not None:
        options.append(".raw (--use-raw)")
    options += [f"layers[{name!r}] (--layer {name})" for name in adata.layers.keys()]
    return "it has " + ", ".join(options) + "."


def _is_sparse(matrix) -> bool:
    return hasattr(matrix, "tocsr") and hasattr(matrix, "nnz")


def _stored_values(matrix) -> np.ndarray:
    """The values that are actually stored (all of a dense matrix, the nonzeros of a sparse one)."""
    if _is_sparse(matrix):
        return np.asarray(matrix.data)
    return np.asarray(matrix)


@dataclass
class GeneAlignment:
    """How an input's genes map onto a vocabulary.

    Attributes:
        vocab_index: (n_input_genes,) int64, the panel position (token) of each input gene, -1 if
            absent. In a multi-species panel several genes of one species may share a token
            (one-to-many orthologs): their values are summed (:func:`scatter_to_panel`).
        n_matched: number of vocabulary genes found in the input.
        n_vocab: vocabulary size: the panel's G, or for a multi-species panel the number of genes
            of the input's species.
        matched_by: ``"gene_ids"`` or ``"gene_symbols"``.
        missing: vocabulary symbols not found in the input.
        n_panel: the panel's G when it differs from ``n_vocab`` (multi-species panels).
        species: the input's species in a multi-species panel.
        n_shared: of the matched genes, those in ortholog groups shared with another species.
        n_by_symbol: in a multi-species panel matched by ids, the genes found by symbol instead
            (their ids absent or different on one side).
    """

    vocab_index: np.ndarray
    n_matched: int
    n_vocab: int
    matched_by: str
    missing: list[str] = field(default_factory=list)
    n_panel: int | None = None
    species: str | None = None
    n_shared: int | None = None
    n_by_symbol: int = 0

    @property
    def fraction(self) -> float:
        return self.n_matched / self.n_vocab

    @property
    def measured(self) -> np.ndarray:
        """(G,) bool: which panel tokens the input measures."""
        measured = np.zeros(self.n_panel or self.n_vocab, dtype=bool)
        measured[self.vocab_index[self.vocab_index >= 0]] = True
        return measured

    @property
    def collapses(self) -> bool:
        """Whether several input genes share a panel token (their values are then summed)."""
        found = self.vocab_index[self.vocab_index >= 0]
        return len(np.unique(found)) < len(found)

    def __str__(self) -> str:
        if self.species is None:
            return (
                f"{self.n_matched}/{self.n_vocab} panel genes found in the input "
                f"({100 * self.fraction:.1f}%, matched by {self.matched_by})"
            )
        if self.matched_by == "gene_ids":
            how = f"{self.n_matched - self.n_by_symbol} by id, {self.n_by_symbol} by symbol"
        else:
            how = f"{self.n_matched} by symbol"
        shared = "" if self.n_shared is None else f"; {self.n_shared} in ortholog groups shared with another species"
        return (
            f"{self.n_matched}/{self.n_vocab} of the model's {self.species} genes found in the input "
            f"({100 * self.fraction:.1f}%: {how}{shared})"
        )


def scatter_to_panel(
    n_cells: int, n_panel: int, cell_of_entry: np.ndarray, positions: np.ndarray, values: np.ndarray, collapses: bool
) -> np.ndarray:
    """(n_cells, G) float32 panel from normalised entries (cell, token, value).

    Where several genes of a cell share a token (``collapses``: one-to-many orthologs), the
    token's value is the log1p of their summed normalised counts, ``log1p(Σ expm1(v))`` — for
    counts exactly the normalised sum of the genes' counts."""
    panel = np.zeros((n_cells, n_panel), dtype=np.float32)
    if not collapses:
        panel[cell_of_entry, positions] = values
        return panel
    linear = np.zeros((n_cells, n_panel), dtype=np.float64)
    np.add.at(linear, (cell_of_entry, positions), np.expm1(values.astype(np.float64)))
    np.log1p(linear, out=linear)
    panel[:] = linear
    return panel


def _match_genes(
    gene_names: Sequence[str], gene_ids: Sequence[str] | None, vocab_symbols: Sequence[str], vocab_ids: Sequence[str] | None
) -> tuple[np.ndarray, str]:
    """(n_input,) vocabulary position of each input gene (-1: absent) and how they were matched:
    by Ensembl id when both sides have ids (or the input names are Ensembl ids), else by symbol,
    case-insensitively (repeated input symbols made unique first, repeated vocabulary symbols
    matched by none)."""
    looks_like_ids = len(gene_names) > 0 and np.mean([n.upper().startswith("ENS") for n in gene_names]) > 0.9
    if vocab_ids is not None and (gene_ids is not None or looks_like_ids):
        matched_by = "gene_ids"
        input_keys = [gene_id_match_key(g) for g in (gene_ids if gene_ids is not None else gene_names)]
        repeated = repeated_keys(input_keys)
        if repeated:
            raise ValueError(f"duplicate gene ids in the input: {repeated[:10]}; every gene needs its own id.")
        vocab_keys = [gene_id_match_key(g) for g in vocab_ids]
    else:
        matched_by = "gene_symbols"
        input_keys = [symbol_match_key(n) for n in make_unique(gene_names)]
        repeated = repeated_keys([symbol_match_key(n) for n in gene_names])
        if repeated:
            logger.warning(
                f"the input repeats gene symbols {repeated[:10]} and has no gene ids; the first of each is "
                "matched to the panel (the others are renamed NAME-1, NAME-2, ... as var_names_make_unique does)."
            )
        vocab_keys = [symbol_match_key(s) for s in vocab_symbols]
        ambiguous = set(repeated_keys(vocab_keys))
        vocab_keys = [None if key in ambiguous else key for key in vocab_keys]
    position = {key: index for index, key in enumerate(vocab_keys) if key is not None}
    return np.array([position.get(key, -1) for key in input_keys], dtype=np.int64), matched_by


def _repeated_targets(targets: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """(n,) bool: chosen entries whose target another chosen entry also has."""
    counts = np.bincount(targets[chosen], minlength=int(targets.max(initial=0)) + 1)
    return chosen & (counts[np.maximum(targets, 0)] > 1)


def _exact_matches(gene_names: Sequence[str], gene_ids: Sequence[str] | None, genes: dict) -> int:
    """Input genes whose id, or case-sensitive symbol, is one of a species' genes: mouse ``Cd79a``
    and human ``CD79A`` are one gene to case-insensitive matching but not here."""
    symbols = set(genes["gene_symbols"])
    hits = sum(name in symbols for name in gene_names)
    if gene_ids is not None and genes.get("gene_ids") is not None:
        ids = {gene_id_match_key(g) for g in genes["gene_ids"]}
        hits = max(hits, sum(gene_id_match_key(g) in ids for g in gene_ids))
    elif genes.get("gene_ids") is not None and all(str(n).upper().startswith("ENS") for n in gene_names[:100]):
        ids = {gene_id_match_key(g) for g in genes["gene_ids"]}
        hits = max(hits, sum(gene_id_match_key(n) in ids for n in gene_names))
    return hits


def clr_normalize(counts: np.ndarray, measured: np.ndarray | None = None) -> np.ndarray:
    """Centred log-ratio of protein counts per cell: ``log1p(x) - mean(log1p(x))`` over the cell's
    measured proteins; unmeasured ones are 0.

    Args:
        counts: (n_cells, P) non-negative counts.
        measured: (P,) or (n_cells, P) bool (all measured by default).

    Returns:
        (n_cells, P) float32.
    """
    counts = np.asarray(counts, dtype=np.float64)
    measured = np.ones(counts.shape, dtype=bool) if measured is None else np.broadcast_to(measured, counts.shape)
    logged = np.where(measured, np.log1p(counts), 0.0)
    mean = logged.sum(1, keepdims=True) / np.maximum(measured.sum(1, keepdims=True), 1)
    return np.where(measured, logged - mean, 0.0).astype(np.float32)


class ScrnaLongformerProcessor(FeatureExtractionMixin):
    r"""
    Holds a model's gene panel and turns cells into its inputs.

    Args:
        gene_symbols: the panel's gene symbols, in model order (length G).
        gene_ids: the panel's Ensembl ids in the same order, if known.
        input_kind: ``"counts"`` (raw integer UMI counts: library-size normalised to
            ``target_sum`` then log1p) or ``"log1p"`` (already log-normalised; used as is).
        target_sum: counts per cell after library-size normalisation.
        min_gene_overlap: smallest fraction of the panel an input must measure (an error below).
        warn_gene_overlap: below this fraction of the panel measured, a warning says how much is
            missing (zero-filled genes cost accuracy).
        layer / use_raw: where in an AnnData the processor reads by default.
        gene_id_key: ``.var`` column holding Ensembl ids in AnnData inputs.
        highly_variable_genes: how the panel was chosen when it is the training cells' most
            variable genes (``n_top_genes``, scanpy ``flavor``, ``n_cells``), else None.
        species: the species a multi-species panel serves (e.g. ``["human", "mouse"]``); the
            panel's entries (``gene_symbols``) are then tokens — ortholog groups shared between
            species and species-specific genes — and each species has its own gene list.
        species_genes: species -> ``{"gene_symbols", "gene_ids" (or None), "tokens"}``: that
            species' genes and the panel token each one feeds (several genes may feed one token:
            one-to-many orthologs, whose values are summed).
        orthologs: where the ortholog pairs came from (table, release, checksum).
        species_report: per species, how many of its genes are shared or specific and how they
            were found in the ortholog table (for the model card).
        protein_names: the protein panel of a multimodal (CITE-seq) model, in model order
            (length P; antibody / protein names as the training data spelled them), else None.
            Proteins of an input are matched to it by name (case-insensitive), never by position.
        protein_normalization: how protein counts become model values: ``"clr"``, the centred
            log-ratio per cell over its measured panel proteins,
            ``log1p(x) - mean(log1p(x))`` (the CITE-seq convention of Stoeckius et al. 2017 and
            Seurat's ``NormalizeData(method="CLR", margin=2)`` per cell).
        min_protein_overlap: smallest fraction of the protein panel an input must measure.
        peak_names: the ATAC peak panel of a multiome model, in model order (length P, e.g.
            ``chr1:1000-1500``), else None. Peaks of an input are matched to it by name.
        peak_coordinates: the panel peaks' ``{"chrom", "start", "end"}`` lists (the peak
            graph is built from them; :class:`~scrnalf_hf.data.atac.PeakCoordinates`).
    """

    model_input_names = ["expression", "attention_mask"]

    def __init__(
        self,
        gene_symbols: Sequence[str] = (),
        gene_ids: Sequence[str] | None = None,
        input_kind: str = "counts",
        target_sum: float = 1e4,
        min_gene_overlap: float = 0.5,
        warn_gene_overlap: float = 0.9,
        layer: str | None = None,
        use_raw: bool = False,
        gene_id_key: str | None = None,
        highly_variable_genes: dict | None = None,
        species: Sequence[str] | None = None,
        species_genes: dict | None = None,
        orthologs: dict | None = None,
        species_report: dict | None = None,
        protein_names: Sequence[str] | None = None,
        protein_normalization: str = "clr",
        min_protein_overlap: float = 0.5,
        peak_names: Sequence[str] | None = None,
        peak_coordinates: dict | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if len(gene_symbols) == 0:
            raise ValueError("gene_symbols is empty: a processor needs the model's gene panel.")
        if input_kind not in INPUT_KINDS:
            raise ValueError(f"input_kind must be one of {INPUT_KINDS}, got {input_kind!r}.")
        for name, value in (("min_gene_overlap", min_gene_overlap), ("warn_gene_overlap", warn_gene_overlap)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value}.")
        self.gene_symbols = [str(symbol) for symbol in gene_symbols]
        self.gene_ids = None if gene_ids is None else [str(gene_id) for gene_id in gene_ids]
        if self.gene_ids is not None and len(self.gene_ids) != len(self.gene_symbols):
            raise ValueError(
                f"gene_ids has {len(self.gene_ids)} entries but gene_symbols has {len(self.gene_symbols)}."
            )
        # Ids, where the panel has them, are the genes' keys: real feature tables repeat symbols
        # (10x lists `Rp1` twice in mouse) but never ids. Without ids the symbols are the keys.
        if self.gene_ids is not None:
            repeated = repeated_keys([gene_id_match_key(g) for g in self.gene_ids])
            if repeated:
                raise ValueError(f"duplicate gene ids in the panel: {repeated[:10]}; every gene needs its own id.")
        else:
            repeated = repeated_keys([symbol_match_key(s) for s in self.gene_symbols])
            if repeated:
                raise ValueError(
                    f"duplicate gene symbols in the panel (case-insensitive): {repeated[:10]}; give Ensembl "
                    "gene_ids, or make the symbols unique (adata.var_names_make_unique())."
                )
        self.input_kind = input_kind
        self.target_sum = float(target_sum)
        self.min_gene_overlap = float(min_gene_overlap)
        self.warn_gene_overlap = max(float(warn_gene_overlap), self.min_gene_overlap)
        self.layer = layer
        self.use_raw = bool(use_raw)
        self.gene_id_key = gene_id_key
        self.highly_variable_genes = highly_variable_genes
        self.species = None if species is None else [str(name) for name in species]
        self.species_genes = None if species_genes is None else {str(k): dict(v) for k, v in species_genes.items()}
        self.orthologs = orthologs
        self.species_report = species_report
        if self.species is not None:
            self._check_species_genes()
        self.protein_names = None if protein_names is None else [str(name) for name in protein_names]
        if self.protein_names is not None:
            if not self.protein_names:
                raise ValueError("protein_names is empty: a multimodal processor needs at least one protein.")
            repeated = repeated_keys([symbol_match_key(n) for n in self.protein_names])
            if repeated:
                raise ValueError(f"duplicate protein names in the panel (case-insensitive): {repeated[:10]}.")
        if protein_normalization not in PROTEIN_NORMALIZATIONS:
            raise ValueError(f"protein_normalization must be one of {PROTEIN_NORMALIZATIONS}, got {protein_normalization!r}.")
        self.protein_normalization = protein_normalization
        if not 0.0 < float(min_protein_overlap) <= 1.0:
            raise ValueError(f"min_protein_overlap must lie in (0, 1], got {min_protein_overlap}.")
        self.min_protein_overlap = float(min_protein_overlap)
        self.peak_names = None if peak_names is None else [str(name) for name in peak_names]
        self.peak_coordinates = None if peak_coordinates is None else {k: list(v) for k, v in peak_coordinates.items()}
        if self.peak_names is not None:
            if not self.peak_names:
                raise ValueError("peak_names is empty: a multiome processor needs at least one peak.")
            coordinates = self.peak_coordinates or {}
            if any(len(coordinates.get(key, ())) != len(self.peak_names) for key in ("chrom", "start", "end")):
                raise ValueError("peak_coordinates must give chrom, start and end of each of the peak_names.")

    def _check_species_genes(self) -> None:
        if len(set(self.species)) != len(self.species) or not self.species:
            raise ValueError(f"species must be distinct names, got {self.species}.")
        if self.species_genes is None or set(self.species_genes) != set(self.species):
            raise ValueError(
                f"species_genes must hold the genes of every species {self.species}, got "
                f"{sorted(self.species_genes or {})}."
            )
        for name, genes in self.species_genes.items():
            symbols, tokens, ids = genes.get("gene_symbols"), genes.get("tokens"), genes.get("gene_ids")
            if symbols is None or tokens is None or len(symbols) != len(tokens) or (ids is not None and len(ids) != len(symbols)):
                raise ValueError(f"species_genes[{name!r}] needs gene_symbols and tokens (and gene_ids) of one length each.")
            tokens = np.asarray(tokens, dtype=np.int64)
            if len(tokens) and (tokens.min() < 0 or tokens.max() >= self.n_genes):
                raise ValueError(f"species_genes[{name!r}] points at tokens outside the {self.n_genes}-token panel.")

    @property
    def n_genes(self) -> int:
        return len(self.gene_symbols)

    def species_id(self, species: str | None) -> int:
        """The model's id of ``species`` (its position in ``species``); for a multi-species panel
        ``None`` is allowed only when the model knows a single species.

        Raises:
            ValueError: unknown species, or a species missing where the model needs one.
        """
        if self.species is None:
            if species is not None:
                raise ValueError(
                    f"species {species!r} was given, but this model has one gene vocabulary and knows no species; "
                    "drop --species."
                )
            return 0
        if species is None:
            if len(self.species) == 1:
                return 0
            raise ValueError(f"this model knows the species {self.species}; say which the cells are (--species NAME).")
        name = _canonical_species(species)
        if name not in self.species:
            raise ValueError(f"unknown species {species!r}; this model knows {self.species}.")
        return self.species.index(name)

    def token_shapes(self) -> np.ndarray:
        """(G,) str per token: ``"one2one"`` (exactly one gene of every species), ``"group"``
        (shared, with several genes in some species) or ``"specific"`` (one species only);
        ``"one2one"`` everywhere for a single-vocabulary panel."""
        if self.species is None:
            return np.full(self.n_genes, "one2one", dtype=object)
        per_species = np.stack([
            np.bincount(np.asarray(self.species_genes[name]["tokens"], dtype=np.int64), minlength=self.n_genes)
            for name in self.species
        ])  # (species, G) genes of each species feeding each token
        shapes = np.full(self.n_genes, "group", dtype=object)
        shapes[(per_species > 0).sum(0) < 2] = "specific"
        shapes[(per_species == 1).all(0)] = "one2one"
        return shapes

    # -----------------------------------------------------------------------------------------
    # Construction from data
    # -----------------------------------------------------------------------------------------

    @classmethod
    def from_anndata(
        cls,
        adata,
        layer: str | None = None,
        use_raw: bool = False,
        input_kind: str = "counts",
        gene_id_key: str | None = None,
        **kwargs,
    ) -> "ScrnaLongformerProcessor":
        """A processor whose panel is the AnnData's genes (``.raw``'s if ``use_raw``)."""
        var = adata.raw.var if use_raw else adata.var
        names = adata.raw.var_names if use_raw else adata.var_names
        if gene_id_key is None:
            gene_id_key = next((column for column in GENE_ID_COLUMNS if column in var.columns), None)
        elif gene_id_key not in var.columns:
            raise ValueError(f"gene_id_key {gene_id_key!r} is not a column of .var; columns: {list(var.columns)}.")
        gene_ids = None if gene_id_key is None else [str(v) for v in var[gene_id_key]]
        return cls(
            gene_symbols=[str(name) for name in names],
            gene_ids=gene_ids,
            input_kind=input_kind,
            layer=layer,
            use_raw=use_raw,
            gene_id_key=gene_id_key,
            **kwargs,
        )

    # -----------------------------------------------------------------------------------------
    # Gene alignment and normalisation
    # -----------------------------------------------------------------------------------------

    def align_genes(
        self,
        gene_names: Sequence[str],
        gene_ids: Sequence[str] | None = None,
        min_gene_overlap: float | None = None,
        species: str | None = None,
    ) -> GeneAlignment:
        """Map input genes onto the panel: by Ensembl id when both sides have ids (or the input
        names are Ensembl ids), else by symbol, case-insensitively.

        Repeated input symbols (without ids) are made unique the way anndata's
        ``var_names_make_unique`` does (``Rp1``, ``Rp1-1``: the first keeps its name), with a
        warning: the first occurrence is the one matched. Panel genes whose symbol repeats
        (possible only in a panel with ids) cannot be matched by symbol and count as missing.

        A multi-species panel matches the input against ``species``' own genes and maps them to
        their tokens; genes that match another species' genes exactly (case-sensitive symbols,
        ids) far better than ``species``' are refused as the wrong species.

        Raises:
            ValueError: repeated input ids, fewer than ``min_gene_overlap`` of the panel (of the
                species' genes) found, an unknown species, or genes of another species.
        """
        gene_names = [str(name) for name in gene_names]
        if self.species is None:
            self.species_id(species)  # a species given to a single-vocabulary model is an error
            vocab_index, matched_by = _match_genes(gene_names, gene_ids, self.gene_symbols, self.gene_ids)
            vocab_symbols, n_panel, name, n_shared = self.gene_symbols, None, None, None
        else:
            name = self.species[self.species_id(species)]
            genes = self.species_genes[name]
            vocab_symbols = genes["gene_symbols"]
            position, matched_by = _match_genes(gene_names, gene_ids, vocab_symbols, genes.get("gene_ids"))
            n_by_symbol = 0
            if matched_by == "gene_ids" and gene_ids is not None:
                # a species' genes come from several sources (data, ortholog tables): where ids
                # miss, a gene may still be found by its symbol
                by_symbol, _ = _match_genes(gene_names, None, vocab_symbols, None)
                free = (position < 0) & (by_symbol >= 0) & ~np.isin(by_symbol, position[position >= 0])
                free &= ~_repeated_targets(by_symbol, free)
                position[free] = by_symbol[free]
                n_by_symbol = int(free.sum())
            self._check_species_of_genes(gene_names, gene_ids, name, int((position >= 0).sum()))
            tokens = np.asarray(genes["tokens"], dtype=np.int64)
            vocab_index = np.where(position >= 0, tokens[np.maximum(position, 0)], -1)
            n_panel = self.n_genes
            specific = self.token_shapes() == "specific"
            n_shared = int((~specific[tokens[position[position >= 0]]]).sum())
        matched = vocab_index >= 0 if self.species is None else position >= 0
        found = np.zeros(len(vocab_symbols), dtype=bool)
        found[(vocab_index if self.species is None else position)[matched]] = True
        alignment = GeneAlignment(
            vocab_index=vocab_index,
            n_matched=int(found.sum()),
            n_vocab=len(vocab_symbols),
            matched_by=matched_by,
            missing=[vocab_symbols[i] for i in np.flatnonzero(~found)],
            n_panel=n_panel,
            species=name,
            n_shared=n_shared,
            n_by_symbol=0 if self.species is None else n_by_symbol,
        )
        threshold = self.min_gene_overlap if min_gene_overlap is None else min_gene_overlap
        if alignment.fraction < threshold:
            raise ValueError(
                f"gene overlap too low: {alignment}, below the required {100 * threshold:.0f}%. "
                "Check that the input uses the same gene naming (symbols vs Ensembl ids) and species "
                "as the model, or lower min_gene_overlap."
            )
        if alignment.fraction < self.warn_gene_overlap:
            logger.warning(
                f"only {alignment}; genes the input lacks are zero-filled and masked out, which costs accuracy "
                f"(the panel's missing genes start with {alignment.missing[:5]})."
            )
        else:
            logger.debug(f"Gene alignment: {alignment}.")
        return alignment

    def _check_species_of_genes(self, gene_names, gene_ids, species: str, n_matched: int) -> None:
        """Refuse genes that are plainly another species' (exact symbol or id matches)."""
        exact = {name: _exact_matches(gene_names, gene_ids, genes) for name, genes in self.species_genes.items()}
        best = max(exact, key=exact.get)
        if best != species and exact[best] > 2 * exact[species] and exact[best] >= 0.5 * max(n_matched, 1):
            raise ValueError(
                f"these genes look like {best} genes, not {species}: {exact[best]} match the model's {best} genes exactly "
                f"(symbols with their case, or ids), {exact[species]} its {species} genes; pass --species {best}, or "
                f"translate the genes."
            )

    def normalize(self, values: np.ndarray, library_size: np.ndarray | None = None) -> np.ndarray:
        """Normalise panel values.

        Args:
            values: (n_cells, G) in panel order: raw counts for ``input_kind="counts"``,
                log-normalised values for ``"log1p"``.
            library_size: (n_cells,) total counts of each cell over all its genes (not only the
                panel's); defaults to ``values.sum(1)``. Ignored for ``"log1p"``.

        Returns:
            (n_cells, G) float32: ``log1p(values / library_size * target_sum)`` for counts,
            the values unchanged for log1p.
        """
        values = np.asarray(values, dtype=np.float32)
        self.check_values(values)
        if library_size is None:
            library_size = values.sum(axis=1)
        per_value = np.broadcast_to(np.asarray(library_size, dtype=np.float64).reshape(-1, 1), values.shape)
        return self.normalize_entries(values, per_value)

    def normalize_entries(self, values: np.ndarray, library_size: np.ndarray) -> np.ndarray:
        """Normalise single (cell, gene) values, e.g. the nonzeros of a sparse matrix.

        Args:
            values: float32 values of any shape (already checked: finite, non-negative).
            library_size: the same shape, the total counts of each value's cell.

        Returns:
            float32 of the same shape, exactly what :meth:`normalize` gives for those values.
        """
        values = np.asarray(values, dtype=np.float32)
        if self.input_kind == "log1p":
            return values
        library_size = np.asarray(library_size, dtype=np.float64)
        scale = np.divide(self.target_sum, library_size, out=np.zeros_like(library_size), where=library_size > 0)
        return np.log1p(values * scale).astype(np.float32)

    def check_values(self, values, where: str = "the expression matrix") -> None:
        """Raise ``ValueError`` naming ``where`` for NaN/inf, negative values, or values of the
        wrong kind (non-integer counts; integers far above any log1p value)."""
        stored = _stored_values(values)
        if stored.size == 0:
            return
        if not np.isfinite(stored).all():
            raise ValueError(f"{where} contains NaN or infinite values.")
        if (stored < 0).any():
            raise ValueError(
                f"{where} contains negative values (minimum {stored.min():.3g}): it looks scaled or centred, but "
                f"this model reads {_KIND_NAMES[self.input_kind]}."
            )
        if self.input_kind == "log1p" and stored.max() > _LARGEST_LOG1P and np.array_equal(stored, np.round(stored)):
            raise ValueError(
                f"{where} holds integers up to {stored.max():.0f}, which look like raw counts, but this model reads "
                f"{_KIND_NAMES['log1p']}."
            )
        if self.input_kind == "counts" and not np.array_equal(stored, np.round(stored)):
            raise ValueError(f"{where} holds non-integer values, but this model reads {_KIND_NAMES['counts']}.")

    # -----------------------------------------------------------------------------------------
    # Cells -> model inputs
    # -----------------------------------------------------------------------------------------

    def anndata_matrix(self, adata, layer: str | None = None, use_raw: bool | None = None) -> str:
        """Where this processor reads an AnnData: ``"raw"``, ``"X"`` or a layer name.

        An explicit ``layer`` (``"X"`` for ``X``) or ``use_raw=True`` wins; then where the
        model's training cells were read (recorded in ``layer`` / ``use_raw`` when it was
        trained); else, as ``scrnalf convert`` does, the first present of ``layers["counts"]``,
        ``.raw``, ``X`` for a counts processor and ``X`` for a log1p one.
        """
        if use_raw and layer is not None:
            raise ValueError(f"choose either layer= (--layer {layer}) or use_raw=True (--use-raw), not both.")
        if use_raw:
            return "raw"
        if layer is not None:
            return layer
        if self.use_raw:
            return "raw"
        if self.layer is not None:
            return self.layer
        if self.input_kind == "counts":
            if "counts" in adata.layers:
                return "counts"
            if adata.raw is not None:
                return "raw"
        return "X"

    def read_anndata_matrix(self, adata, layer: str | None, use_raw: bool | None):
        """(matrix, gene names, gene ids, where) of the matrix :meth:`anndata_matrix` chooses."""
        where = self.anndata_matrix(adata, layer, use_raw)
        if where == "raw":
            if adata.raw is None:
                raise ValueError(
                    f"this model reads .raw (where its training values were) but the AnnData has no .raw; "
                    f"{_other_matrices(adata)}"
                )
            matrix, var, names = adata.raw.X, adata.raw.var, adata.raw.var_names
        elif where == "X":
            matrix, var, names = adata.X, adata.var, adata.var_names
        else:
            if where not in adata.layers:
                raise ValueError(
                    f"this model reads layers[{where!r}] but the AnnData has no such layer; {_other_matrices(adata)}"
                )
            matrix, var, names = adata.layers[where], adata.var, adata.var_names
        gene_ids = None
        if self.gene_id_key is not None and self.gene_id_key in var.columns:
            gene_ids = [str(v) for v in var[self.gene_id_key]]
        label = ".raw" if where == "raw" else "X" if where == "X" else f"layers[{where!r}]"
        return matrix, [str(n) for n in names], gene_ids, label

    def __call__(
        self,
        cells,
        gene_names: Sequence[str] | None = None,
        gene_ids: Sequence[str] | None = None,
        layer: str | None = None,
        use_raw: bool | None = None,
        return_tensors: str | None = "pt",
        matrix_name: str | None = None,
        species: str | None = None,
        alignment: GeneAlignment | None = None,
        protein_counts=None,
        protein_names: Sequence[str] | None = None,
        library_size=None,
        **kwargs,
    ) -> BatchFeature:
        """Cells -> model inputs.

        Args:
            cells: an AnnData, or a (n_cells, n_input_genes) numpy / scipy-sparse / torch matrix.
            gene_names: the matrix's gene names (required for a matrix unless it already has
                exactly the panel's genes in panel order).
            matrix_name: what to call a matrix input in error messages (e.g. ``raw.X``).
            species: the cells' species, for a multi-species model (one species per call).
            alignment: these genes' :meth:`align_genes` result, reused across the chunks of one
                file (checked and reported once, not per chunk).
            protein_counts / protein_names: a multimodal model's second modality, (n_cells, P_in)
                raw antibody counts of the same cells in the same order and their names; without
                them the model reads RNA only (and predicts the proteins).
            library_size: (n_cells,) each cell's total counts over all its genes, when the matrix
                holds only some of them (a SOMA ``--var-filter``); by default the matrix's row sums.

        Returns:
            ``BatchFeature`` with ``expression`` (n_cells, G) float32 and ``attention_mask``
            (n_cells, G) int64 (1 = gene measured in the input; missing genes are zero-filled);
            for a multi-species model also ``species`` (n_cells,) int64, the model's species id.
        """
        adata = cells if hasattr(cells, "var_names") and hasattr(cells, "obs_names") else None
        where = matrix_name or "the expression matrix"
        if adata is not None:
            matrix, names, ids, where = self.read_anndata_matrix(adata, layer, use_raw)
            gene_names = names if gene_names is None else gene_names
            gene_ids = ids if gene_ids is None else gene_ids
        else:
            matrix = cells.detach().cpu().numpy() if hasattr(cells, "detach") else cells
            if not _is_sparse(matrix):
                matrix = np.asarray(matrix)
            if matrix.ndim != 2:
                raise ValueError(f"cells must be a 2-D (cells, genes) matrix, got shape {matrix.shape}.")
            if gene_names is None:
                if self.species is not None:
                    raise ValueError("a matrix given to a multi-species model needs gene_names= (the species' genes).")
                if matrix.shape[1] != self.n_genes:
                    raise ValueError(
                        f"a matrix with {matrix.shape[1]} genes needs gene_names= to align it to the "
                        f"{self.n_genes}-gene panel."
                    )
                gene_names = self.gene_symbols
        if len(gene_names) != matrix.shape[1]:
            raise ValueError(f"{len(gene_names)} gene names for a matrix with {matrix.shape[1]} genes.")
        if not _is_sparse(matrix) and not np.issubdtype(np.asarray(matrix).dtype, np.number):
            raise ValueError(f"the expression matrix must be numeric, got dtype {np.asarray(matrix).dtype}.")
        try:
            self.check_values(matrix, where)
        except ValueError as error:
            if adata is None:
                raise
            raise ValueError(f"{error} Read another matrix: {_other_matrices(adata)}") from None
        if alignment is None:
            alignment = self.align_genes(gene_names, gene_ids, species=species)
        elif len(alignment.vocab_index) != len(gene_names):
            raise ValueError(f"the alignment is of {len(alignment.vocab_index)} genes, the matrix has {len(gene_names)}.")

        if library_size is None:
            library_size = matrix.sum(axis=1)
        library_size = np.asarray(library_size, dtype=np.float64).reshape(-1)
        if len(library_size) != matrix.shape[0]:
            raise ValueError(f"{len(library_size)} library sizes for {matrix.shape[0]} cells.")
        columns = np.flatnonzero(alignment.vocab_index >= 0)
        selected = matrix.tocsc()[:, columns].toarray() if _is_sparse(matrix) else np.asarray(matrix)[:, columns]
        selected = np.asarray(selected, dtype=np.float32)
        normalised = self.normalize_entries(selected, np.broadcast_to(library_size[:, None], selected.shape))
        n_cells = matrix.shape[0]
        expression = np.zeros((n_cells, self.n_genes), dtype=np.float32)
        if alignment.collapses:  # genes sharing a token: log1p of their summed normalised counts
            linear = np.zeros((n_cells, self.n_genes), dtype=np.float64)
            np.add.at(linear, (slice(None), alignment.vocab_index[columns]), np.expm1(normalised.astype(np.float64)))
            expression[:] = np.log1p(linear)
        else:
            expression[:, alignment.vocab_index[columns]] = normalised
        attention_mask = np.broadcast_to(alignment.measured.astype(np.int64), expression.shape).copy()
        data = {"expression": expression, "attention_mask": attention_mask}
        if self.species is not None:
            data["species"] = np.full(n_cells, self.species_id(species), dtype=np.int64)
        if protein_counts is not None:
            if protein_names is None:
                raise ValueError("protein_counts need protein_names= (one name per column).")
            if len(protein_counts) != n_cells:
                raise ValueError(f"{len(protein_counts)} cells of protein counts for {n_cells} cells of RNA.")
            data.update(self.proteins(protein_counts, protein_names))
        return BatchFeature(data=data, tensor_type=return_tensors)

    # -----------------------------------------------------------------------------------------
    # Proteins (multimodal models)
    # -----------------------------------------------------------------------------------------

    @property
    def n_proteins(self) -> int:
        return 0 if self.protein_names is None else len(self.protein_names)

    def align_proteins(self, protein_names: Sequence[str], where: str = "the input") -> np.ndarray:
        """Panel position of each input protein, by name (case-insensitive); -1 for proteins
        outside the panel.

        Args:
            protein_names: the input's protein names, in its column order (length P_in).

        Returns:
            (P_in,) int64 panel positions.

        Raises:
            ValueError: the processor has no protein panel, the input repeats a name, or it
                measures less than ``min_protein_overlap`` of the panel.
        """
        if self.protein_names is None:
            raise ValueError("this model has no protein panel; it reads RNA only (train a multimodal model with --task protein).")
        keys = [symbol_match_key(str(n)) for n in protein_names]
        repeated = repeated_keys(keys)
        if repeated:
            raise ValueError(f"{where} lists proteins more than once: {repeated[:10]}; give each protein once.")
        panel = {symbol_match_key(n): i for i, n in enumerate(self.protein_names)}
        positions = np.array([panel.get(k, -1) for k in keys], dtype=np.int64)
        overlap = int((positions >= 0).sum()) / self.n_proteins
        if overlap < self.min_protein_overlap:
            missing = [n for n in self.protein_names if symbol_match_key(n) not in set(keys)]
            raise ValueError(
                f"{where} measures {int((positions >= 0).sum())} of the model's {self.n_proteins} panel proteins "
                f"({overlap:.0%}, below the {self.min_protein_overlap:.0%} needed); missing e.g. {missing[:5]}. "
                "Check the protein names (the model's are in its processor's protein_names)."
            )
        return positions

    # -----------------------------------------------------------------------------------------
    # ATAC peaks (multiome models)
    # -----------------------------------------------------------------------------------------

    @property
    def n_peaks(self) -> int:
        return 0 if self.peak_names is None else len(self.peak_names)

    def align_peaks(self, peak_names: Sequence[str], where: str = "the input's peaks") -> np.ndarray:
        """Panel position of each input peak, by name; -1 for peaks outside the panel.

        Args:
            peak_names: the input's peak names, in its column order (length P_in).

        Returns:
            (P_in,) int64 panel positions.

        Raises:
            ValueError: the processor has no peak panel, or no input peak is in it (the model
                would silently read RNA only).
        """
        if self.peak_names is None:
            raise ValueError("this model has no ATAC peak panel; it reads RNA only (train one with --atac-key).")
        panel = {name: i for i, name in enumerate(self.peak_names)}
        positions = np.array([panel.get(str(name), -1) for name in peak_names], dtype=np.int64)
        if not (positions >= 0).any():
            raise ValueError(
                f"none of the {len(positions)} peaks of {where} (e.g. {list(peak_names)[:3]}) is in the model's "
                f"{self.n_peaks}-peak panel (e.g. {self.peak_names[:3]}); name peaks as the training data did."
            )
        return positions

    def peaks(self, accessibility, peak_names: Sequence[str], where: str = "the input's peaks") -> dict:
        """Binarised input peaks -> the model's ``peak_accessibility`` (n_cells, P) float32 0/1 in
        panel order and ``peak_mask`` (n_cells, P) bool (False: a panel peak the input lacks).

        Args:
            accessibility: (n_cells, P_in) 0/1, dense or sparse
                (:func:`~scrnalf_hf.data.atac.binarize_peaks`).
            peak_names: the P_in input peak names.
        """
        if accessibility.shape[1] != len(peak_names):
            raise ValueError(f"{len(peak_names)} peak names for peak accessibility of shape {accessibility.shape}.")
        positions = self.align_peaks(peak_names, where)
        kept = np.flatnonzero(positions >= 0)
        values = accessibility[:, kept]
        panel = np.zeros((accessibility.shape[0], self.n_peaks), dtype=np.float32)
        panel[:, positions[kept]] = values.toarray() if _is_sparse(values) else np.asarray(values)
        measured = np.zeros(self.n_peaks, dtype=bool)
        measured[positions[kept]] = True
        return {"peak_accessibility": panel, "peak_mask": np.broadcast_to(measured, panel.shape).copy()}

    def check_proteins(self, values, where: str = "the protein counts") -> None:
        """Raise ``ValueError`` naming ``where`` for NaN/inf or negative protein counts."""
        stored = _stored_values(values)
        if stored.size and not np.isfinite(stored).all():
            raise ValueError(f"{where} contain NaN or infinite values; give raw antibody counts (ADT) for every cell.")
        if stored.size and (stored < 0).any():
            raise ValueError(
                f"{where} contain negative values (minimum {stored.min():.3g}): they look normalised or centred; "
                "give raw antibody counts (ADT), the processor normalises them (CLR)."
            )

    def normalize_proteins(self, counts: np.ndarray, measured: np.ndarray | None = None) -> np.ndarray:
        """CLR of protein counts per cell: ``log1p(x) - mean over the cell's measured panel
        proteins of log1p(x)``; unmeasured proteins stay 0.

        Args:
            counts: (n_cells, P) raw counts in panel order (unmeasured proteins any value).
            measured: (P,) or (n_cells, P) bool, the proteins the input measured (all by default).

        Returns:
            (n_cells, P) float32.
        """
        self.check_proteins(counts)
        return clr_normalize(counts, measured)

    def proteins(self, counts, protein_names: Sequence[str], where: str = "the protein counts") -> dict:
        """Input proteins -> ``protein_expression`` (n_cells, P) float32 CLR values in panel order
        and ``protein_mask`` (n_cells, P) int64 (1 = measured by the input).

        Args:
            counts: (n_cells, P_in) raw counts (numpy, scipy sparse or a DataFrame's values).
            protein_names: the P_in input protein names.
        """
        counts = counts.toarray() if _is_sparse(counts) else np.asarray(counts)
        if counts.ndim != 2 or counts.shape[1] != len(protein_names):
            raise ValueError(f"{len(protein_names)} protein names for protein counts of shape {counts.shape}.")
        if counts.shape[1] == 0:
            raise ValueError(f"{where} have zero proteins; give at least one protein column.")
        self.check_proteins(counts, where)
        positions = self.align_proteins(protein_names, where)
        kept = positions >= 0
        panel = np.zeros((counts.shape[0], self.n_proteins), dtype=np.float64)
        panel[:, positions[kept]] = counts[:, kept]
        measured = np.zeros(self.n_proteins, dtype=bool)
        measured[positions[kept]] = True
        return {
            "protein_expression": self.normalize_proteins(panel, measured),
            "protein_mask": np.broadcast_to(measured.astype(np.int64), panel.shape).copy(),
        }

    # -----------------------------------------------------------------------------------------
    # Gene graph
    # -----------------------------------------------------------------------------------------

    def build_gene_graph(
        self,
        expression,
        k: int,
        max_cells: int = 5000,
        block_size: int = 1024,
        seed: int = 0,
        metric: str = "cosine",
    ) -> np.ndarray:
        """The gene–gene kNN graph from **training cells only**.

        Similarity of two genes across cells is the cosine of their normalised expression
        (``metric="cosine"``) or the absolute Pearson correlation (``"correlation"``: centred
        cosine, so that co-varying genes are neighbours whatever their mean level, and
        anti-correlated ones too). Each gene keeps itself and its most similar genes; the graph is
        then symmetrised (an edge in either direction counts for both genes) and each row keeps
        its ``k`` most similar neighbours. Genes never expressed in these cells (or, for
        correlation, constant across them) have only themselves.

        Args:
            expression: (n_cells, G) normalised panel values (the processor's ``expression``).
            k: neighbours per gene, itself included (the model's ``knn_k``).
            max_cells: cells sampled (seeded) to bound the cost.
            metric: ``"cosine"`` or ``"correlation"`` (the config's ``gene_graph_metric``).

        Returns:
            (G, k) int64 neighbour table, ``-1`` = padding.
        """
        values = expression.detach().cpu().numpy() if hasattr(expression, "detach") else np.asarray(expression)
        if values.ndim != 2 or values.shape[1] != self.n_genes:
            raise ValueError(f"expression must have shape (n_cells, {self.n_genes}), got {values.shape}.")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}.")
        if metric not in ("cosine", "correlation"):
            raise ValueError(f"metric must be 'cosine' or 'correlation', got {metric!r}.")
        if values.shape[0] > max_cells:
            rows = np.random.default_rng(seed).choice(values.shape[0], size=max_cells, replace=False)
            values = values[np.sort(rows)]
        values = values.astype(np.float32)
        if metric == "correlation":
            values = values - values.mean(axis=0)
        norms = np.linalg.norm(values, axis=0)  # (G,)
        expressed = norms > 0
        unit = values / np.where(expressed, norms, 1.0)
        n_genes = self.n_genes
        width = min(k, n_genes)

        sources, targets, similarities = [], [], []
        for start in range(0, n_genes, block_size):
            stop = min(start + block_size, n_genes)
            block = unit[:, start:stop].T @ unit  # (block, G) cosine similarities
            if metric == "correlation":
                block = np.abs(block)
            block[:, ~expressed] = -np.inf
            block[~expressed[start:stop]] = -np.inf
            block[np.arange(stop - start), np.arange(start, stop)] = np.inf  # self always first
            top = np.argpartition(-block, width - 1, axis=1)[:, :width]  # (block, width)
            top_similarity = np.take_along_axis(block, top, axis=1)
            keep = np.isfinite(top_similarity) | (top == np.arange(start, stop)[:, None])
            rows = np.repeat(np.arange(start, stop), width).reshape(-1, width)
            sources.append(rows[keep])
            targets.append(top[keep])
            similarities.append(top_similarity[keep])
        sources, targets, similarities = map(np.concatenate, (sources, targets, similarities))

        # Symmetrise: each edge also counts for its other end.
        all_sources = np.concatenate([sources, targets])
        all_targets = np.concatenate([targets, sources])
        all_similarities = np.concatenate([similarities, similarities])
        order = np.lexsort((-all_similarities, all_targets, all_sources))
        all_sources, all_targets, all_similarities = all_sources[order], all_targets[order], all_similarities[order]
        first = np.ones(len(all_sources), dtype=bool)
        first[1:] = (all_sources[1:] != all_sources[:-1]) | (all_targets[1:] != all_targets[:-1])
        all_sources, all_targets, all_similarities = all_sources[first], all_targets[first], all_similarities[first]
        order = np.lexsort((-all_similarities, all_sources))
        all_sources, all_targets = all_sources[order], all_targets[order]
        row_start = np.searchsorted(all_sources, np.arange(n_genes))
        rank = np.arange(len(all_sources)) - row_start[all_sources]
        keep = rank < k
        table = np.full((n_genes, k), -1, dtype=np.int64)
        table[all_sources[keep], rank[keep]] = all_targets[keep]
        return table


__all__ = ["ScrnaLongformerProcessor", "GeneAlignment", "clr_normalize"]
