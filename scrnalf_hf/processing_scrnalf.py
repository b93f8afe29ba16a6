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
# log1p of counts scaled to 10,000 per cell stays below ~9.3; integers far above that are counts.
_LARGEST_LOG1P = 30.0
_KIND_NAMES = {"counts": "raw integer counts", "log1p": "log-normalised values (log1p)"}
GENE_ID_COLUMNS = ("gene_ids", "gene_id", "ensembl_id", "ensembl_gene_id", "feature_id")


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
        vocab_index: (n_input_genes,) int64, the vocabulary position of each input gene, -1 if absent.
        n_matched: number of vocabulary genes found in the input.
        n_vocab: vocabulary size G.
        matched_by: ``"gene_ids"`` or ``"gene_symbols"``.
        missing: vocabulary symbols not found in the input.
    """

    vocab_index: np.ndarray
    n_matched: int
    n_vocab: int
    matched_by: str
    missing: list[str] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.n_matched / self.n_vocab

    @property
    def measured(self) -> np.ndarray:
        """(n_vocab,) bool: which vocabulary genes the input measures."""
        measured = np.zeros(self.n_vocab, dtype=bool)
        measured[self.vocab_index[self.vocab_index >= 0]] = True
        return measured

    def __str__(self) -> str:
        return (
            f"{self.n_matched}/{self.n_vocab} panel genes found in the input "
            f"({100 * self.fraction:.1f}%, matched by {self.matched_by})"
        )


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

    @property
    def n_genes(self) -> int:
        return len(self.gene_symbols)

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
    ) -> GeneAlignment:
        """Map input genes onto the panel: by Ensembl id when both sides have ids (or the input
        names are Ensembl ids), else by symbol, case-insensitively.

        Repeated input symbols (without ids) are made unique the way anndata's
        ``var_names_make_unique`` does (``Rp1``, ``Rp1-1``: the first keeps its name), with a
        warning: the first occurrence is the one matched. Panel genes whose symbol repeats
        (possible only in a panel with ids) cannot be matched by symbol and count as missing.

        Raises:
            ValueError: repeated input ids, or fewer than ``min_gene_overlap`` of the panel found.
        """
        gene_names = [str(name) for name in gene_names]
        looks_like_ids = len(gene_names) > 0 and np.mean([n.upper().startswith("ENS") for n in gene_names]) > 0.9
        if self.gene_ids is not None and (gene_ids is not None or looks_like_ids):
            matched_by = "gene_ids"
            input_keys = [gene_id_match_key(g) for g in (gene_ids if gene_ids is not None else gene_names)]
            repeated = repeated_keys(input_keys)
            if repeated:
                raise ValueError(f"duplicate gene ids in the input: {repeated[:10]}; every gene needs its own id.")
            vocab_keys = [gene_id_match_key(g) for g in self.gene_ids]
        else:
            matched_by = "gene_symbols"
            input_keys = [symbol_match_key(n) for n in make_unique(gene_names)]
            repeated = repeated_keys([symbol_match_key(n) for n in gene_names])
            if repeated:
                logger.warning(
                    f"the input repeats gene symbols {repeated[:10]} and has no gene ids; the first of each is "
                    "matched to the panel (the others are renamed NAME-1, NAME-2, ... as var_names_make_unique does)."
                )
            vocab_keys = [symbol_match_key(s) for s in self.gene_symbols]
            ambiguous = set(repeated_keys(vocab_keys))
            vocab_keys = [None if key in ambiguous else key for key in vocab_keys]
        position = {key: index for index, key in enumerate(vocab_keys) if key is not None}
        vocab_index = np.array([position.get(key, -1) for key in input_keys], dtype=np.int64)
        n_matched = int((vocab_index >= 0).sum())
        found = np.zeros(self.n_genes, dtype=bool)
        found[vocab_index[vocab_index >= 0]] = True
        alignment = GeneAlignment(
            vocab_index=vocab_index,
            n_matched=n_matched,
            n_vocab=self.n_genes,
            matched_by=matched_by,
            missing=[self.gene_symbols[i] for i in np.flatnonzero(~found)],
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
        **kwargs,
    ) -> BatchFeature:
        """Cells -> model inputs.

        Args:
            cells: an AnnData, or a (n_cells, n_input_genes) numpy / scipy-sparse / torch matrix.
            gene_names: the matrix's gene names (required for a matrix unless it already has
                exactly the panel's genes in panel order).
            matrix_name: what to call a matrix input in error messages (e.g. ``raw.X``).

        Returns:
            ``BatchFeature`` with ``expression`` (n_cells, G) float32 and ``attention_mask``
            (n_cells, G) int64 (1 = gene measured in the input; missing genes are zero-filled).
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
        alignment = self.align_genes(gene_names, gene_ids)

        library_size = np.asarray(matrix.sum(axis=1), dtype=np.float64).reshape(-1)
        columns = np.flatnonzero(alignment.vocab_index >= 0)
        selected = matrix.tocsc()[:, columns].toarray() if _is_sparse(matrix) else np.asarray(matrix)[:, columns]
        panel = np.zeros((matrix.shape[0], self.n_genes), dtype=np.float32)
        panel[:, alignment.vocab_index[columns]] = selected
        expression = self.normalize(panel, library_size)
        attention_mask = np.broadcast_to(alignment.measured.astype(np.int64), panel.shape).copy()
        return BatchFeature(
            data={"expression": expression, "attention_mask": attention_mask}, tensor_type=return_tensors
        )

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
    ) -> np.ndarray:
        """The gene–gene kNN graph from **training cells only**.

        Similarity is the cosine of two genes' normalised expression across cells. Each gene
        keeps itself and its most similar genes; the graph is then symmetrised (an edge in either
        direction counts for both genes) and each row keeps its ``k`` most similar neighbours.
        Genes never expressed in these cells have only themselves.

        Args:
            expression: (n_cells, G) normalised panel values (the processor's ``expression``).
            k: neighbours per gene, itself included (the model's ``knn_k``).
            max_cells: cells sampled (seeded) to bound the cost.

        Returns:
            (G, k) int64 neighbour table, ``-1`` = padding.
        """
        values = expression.detach().cpu().numpy() if hasattr(expression, "detach") else np.asarray(expression)
        if values.ndim != 2 or values.shape[1] != self.n_genes:
            raise ValueError(f"expression must have shape (n_cells, {self.n_genes}), got {values.shape}.")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}.")
        if values.shape[0] > max_cells:
            rows = np.random.default_rng(seed).choice(values.shape[0], size=max_cells, replace=False)
            values = values[np.sort(rows)]
        values = values.astype(np.float32)
        norms = np.linalg.norm(values, axis=0)  # (G,)
        expressed = norms > 0
        unit = values / np.where(expressed, norms, 1.0)
        n_genes = self.n_genes
        width = min(k, n_genes)

        sources, targets, similarities = [], [], []
        for start in range(0, n_genes, block_size):
            stop = min(start + block_size, n_genes)
            block = unit[:, start:stop].T @ unit  # (block, G) cosine similarities
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


__all__ = ["ScrnaLongformerProcessor", "GeneAlignment"]
