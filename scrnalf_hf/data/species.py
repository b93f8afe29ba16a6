"""Cross-species panels: one model, several species, each read through its own genes.

A model of several species (``config.species``) has one panel of tokens: ortholog groups shared
between species (a one-to-one pair is one token; one-to-many and many-to-many pairs are one
token fed by all their genes, whose values are summed) and species-specific genes (their own
tokens, masked out in the other species' cells by ``attention_mask``). The kNN kernels, the gene
graph and every fast path see one ordinary panel; only the processor knows that a mouse cell's
``Cd8b1`` feeds the token a human cell's ``CD8B`` feeds.

:func:`fit_species_processor` builds that processor from training cells and an ortholog table
(:mod:`~scrnalf_hf.data.orthologs`). Species that have no training cells (a human+mouse model
trained on human cells only) get their gene list from the table: every gene paired with a panel
gene of a species that has cells.

The gene graph is one graph over the union (cosine similarity of tokens across the training
cells of every species): a species-specific token is zero in the other species' cells, which
adds nothing to a cosine, so its neighbours come from its own species' cells; shared tokens
pool every species' cells.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..processing_scrnalf import ScrnaLongformerProcessor, gene_id_match_key
from .orthologs import OrthologTable, build_vocabulary, canonical_species, load_orthologs

logger = logging.getLogger(__name__)

# Below this fraction of a dataset's genes matching a second species' genes exactly, the second
# species' matches are taken for shared symbols, not for a file mixing species.
MIXED_SPECIES_FRACTION = 0.2


@dataclass(frozen=True)
class SpeciesSetup:
    """The species a model knows and the table relating their genes.

    Attributes:
        species: canonical species names, in the model's order (``config.species``).
        table: ortholog pairs between them (None for a single species).
    """

    species: list[str]
    table: OrthologTable | None

    @classmethod
    def from_options(cls, species: Sequence[str], orthologs: str | None = "biomart") -> "SpeciesSetup":
        """``--model-species human,mouse --orthologs biomart|hcop|PATH``."""
        names = [canonical_species(name) for name in species]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"--model-species must list distinct species, got {list(species)}.")
        if len(names) == 1:
            return cls(names, None)
        if len(names) > 2:
            raise ValueError(f"a cross-species model relates two species through one ortholog table; got {names}.")
        table = load_orthologs(orthologs or "biomart", species=names)
        return cls(names, table)


def with_species_setup(
    cells,
    *,
    species: str | None = None,
    species_key: str | None = None,
    model_species: str | Sequence[str] | None = None,
    orthologs: str | None = "biomart",
):
    """``cells`` ready for a model of several species (``--species`` / ``--species-key`` /
    ``--model-species`` / ``--orthologs``), or unchanged when none of them is given.

    The model knows ``model_species`` (comma-separated), by default the species of the cells;
    every cell's species must be one of them.
    """
    import dataclasses

    cells = cells.with_species(species, species_key)
    if model_species is None and species is None and species_key is None:
        return cells
    names = cells.cell_species()
    if names is None:
        raise ValueError("--model-species needs each cell's species: give --species NAME or --species-key OBS_COLUMN.")
    present = list(dict.fromkeys(names))
    if model_species is None:
        listed = present
    else:
        listed = [n.strip() for n in model_species.split(",")] if isinstance(model_species, str) else list(model_species)
    setup = SpeciesSetup.from_options(listed, orthologs)
    unknown = [name for name in present if name not in setup.species]
    if unknown:
        raise ValueError(
            f"{cells.name} holds cells of species {unknown}, but the model is to know {setup.species}; "
            "add them to --model-species."
        )
    return dataclasses.replace(cells, species_setup=setup)


def _species_universe(table: OrthologTable, species: str) -> tuple[set[str], set[str]]:
    """(symbols, id keys) of one species' genes in the table (symbols with their case)."""
    side = "a" if table.species[0] == species else "b"
    pairs = table.pairs
    symbols = {str(s) for s in pairs[f"{side}_symbol"].dropna()}
    ids = {gene_id_match_key(g) for g in pairs[f"{side}_id"].dropna()}
    return symbols, ids


def _genes_of_species(
    cells, train_rows: np.ndarray, keep: np.ndarray, setup: SpeciesSetup, present: list[str], seed: int = 0
) -> dict[str, np.ndarray]:
    """Which of the kept dataset genes (positions into ``keep``) belong to each species with cells.

    One species: all of them. Several (a file mixing species, its genes side by side): a gene
    belongs to the species whose ortholog-table genes it matches exactly (symbol with its case,
    or id); a gene known to neither (no ortholog) to the species whose training cells express it
    most often (a sample of at most 5,000 of them)."""
    if len(present) == 1:
        return {present[0]: np.arange(len(keep))}
    genes = cells.genes
    symbols = [genes.gene_symbols[i] for i in keep]
    ids = None if genes.gene_ids is None else [genes.gene_ids[i] for i in keep]
    owner = np.full(len(keep), "", dtype=object)
    for name in present:
        known_symbols, known_ids = _species_universe(setup.table, name)
        hits = np.array([s in known_symbols for s in symbols])
        if ids is not None:
            hits |= np.array([gene_id_match_key(g) in known_ids for g in ids])
        owner[hits & (owner == "")] = name
    unknown = np.flatnonzero(owner == "")
    if len(unknown):
        rows = np.asarray(train_rows)
        if len(rows) > 5000:
            rows = np.sort(np.random.default_rng(seed).choice(rows, 5000, replace=False))
        species = cells.cell_species()[rows]
        indices = cells.dataset.select(rows).with_format("numpy")["indices"]
        position = np.full(genes.n_genes, -1, dtype=np.int64)
        position[keep] = np.arange(len(keep))
        expressed = np.zeros((len(present), len(keep)), dtype=np.int64)  # cells of each species expressing each gene
        for row_species, row_indices in zip(species, indices):
            found = position[np.asarray(row_indices, dtype=np.int64)]
            expressed[present.index(row_species), found[found >= 0]] += 1
        owner[unknown] = np.asarray(present, dtype=object)[expressed[:, unknown].argmax(0)]
    return {name: np.flatnonzero(owner == name) for name in present}


def check_single_species(symbols: list[str], ids: list[str] | None, setup: SpeciesSetup, species: str, where: str) -> None:
    """Refuse a dataset declared as one species whose genes are largely another species' too
    (a file mixing species, given without --species-key)."""
    if setup.table is None:
        return
    counts = {}
    for name in setup.species:
        known_symbols, known_ids = _species_universe(setup.table, name)
        hits = sum(s in known_symbols for s in symbols)
        if ids is not None:
            hits = max(hits, sum(gene_id_match_key(g) in known_ids for g in ids))
        counts[name] = hits
    others = {name: n for name, n in counts.items() if name != species and n >= MIXED_SPECIES_FRACTION * len(symbols)}
    if others and counts[species] >= MIXED_SPECIES_FRACTION * len(symbols):
        found = ", ".join(f"{n} {name}" for name, n in counts.items())
        raise ValueError(
            f"{where} has genes of several species ({found} of its {len(symbols)} genes match each species' genes "
            f"exactly), but every cell is said to be {species}; give each cell's species with --species-key."
        )


def fit_species_processor(
    cells, train_rows: np.ndarray, chosen_genes: np.ndarray | None, processor_arguments: dict
) -> ScrnaLongformerProcessor:
    """The multi-species processor of a fresh model for ``cells`` (with ``cells.species_setup``).

    Args:
        cells: the dataset; each cell's species in its ``species`` column.
        train_rows: the training cells (their species decide which species have data).
        chosen_genes: positions of the dataset genes the panel keeps (highly variable genes), or
            None for all.
        processor_arguments: the rest of the processor's fields (value kind, AnnData location,
            highly variable genes record).

    Raises:
        ValueError: cells without species, species the model does not know, a table missing.
    """
    setup = cells.species_setup
    species = cells.cell_species()
    if species is None:
        raise ValueError(
            f"a model of the species {setup.species} needs each cell's species: give --species NAME (every cell) "
            "or --species-key OBS_COLUMN."
        )
    unknown = sorted(set(species) - set(setup.species))
    if unknown:
        raise ValueError(f"{cells.name} holds cells of species {unknown}, which the model does not know ({setup.species}).")
    present = [name for name in setup.species if name in set(species[np.asarray(train_rows)])]
    if not present:
        raise ValueError("there are no training cells to build the gene panel from.")
    genes = cells.genes
    keep = np.arange(genes.n_genes) if chosen_genes is None else np.asarray(chosen_genes)
    symbols = [genes.gene_symbols[i] for i in keep]
    ids = None if genes.gene_ids is None else [genes.gene_ids[i] for i in keep]
    if len(present) == 1 and len(set(species)) == 1:
        check_single_species(symbols, ids, setup, present[0], cells.name)
    positions = _genes_of_species(cells, train_rows, keep, setup, present)
    vocabulary = build_vocabulary(
        {
            name: ([symbols[i] for i in positions[name]], None if ids is None else [ids[i] for i in positions[name]])
            for name in present
        },
        setup.table,
        derive=[name for name in setup.species if name not in present],
    )
    species_genes = {name: vocabulary.species_genes[name] for name in setup.species}
    for name, report in vocabulary.report.items():
        if name in setup.species:
            logger.info(
                "%s: %d genes, %d in ortholog groups shared with another species, %d %s-specific",
                name, report["n_genes"], report["n_shared"], report["n_specific"], name,
            )
    return ScrnaLongformerProcessor(
        gene_symbols=vocabulary.tokens,
        gene_ids=None,
        species=setup.species,
        species_genes=species_genes,
        orthologs=None if setup.table is None else setup.table.source,
        species_report=vocabulary.report,
        **processor_arguments,
    )


__all__ = ["SpeciesSetup", "check_single_species", "fit_species_processor", "with_species_setup"]
