"""Cells streamed from a TileDB-SOMA experiment (a local store or CELLxGENE Census), across
processes, through ``tiledbsoma-ml``.

A SOMA experiment (``tiledbsoma.io.from_anndata`` writes one from an AnnData; CELLxGENE Census is
one) is opened with :func:`open_soma`. The result, :class:`SomaCells`, stands where
:class:`~scrnalf_hf.data.cells.Cells` stands in the one data path: the processor and the gene
graph are fitted on (a seeded sample of) its cells through :func:`~scrnalf_hf.data.cells.panel_matrix`,
and ``with_targets(...).select(rows)`` gives the Trainer a :class:`SomaCellStream` instead of an
Arrow dataset. The stream reads cells with ``tiledbsoma_ml.ExperimentDataset``, which splits the
cells across DDP ranks and DataLoader workers and shuffles them in chunks; each mini-batch leaves
as the rows :class:`~scrnalf_hf.data.collators.CellCollator` takes (``cell_id``, ``indices``,
``values``, ``library_size``[, ``labels``]), so the collator, the model and the Trainer are the
ones every other source uses. No step holds more than one I/O batch of cells.

Census (no network on the machines this was built on; the form is what ``cellxgene_census``
documents): ``cellxgene_census.open_soma(census_version="2025-01-30")`` opens
``s3://cellxgene-census-public-us-west-2/cell-census/2025-01-30/soma/`` and the experiment is its
``census_data/homo_sapiens``; pass that URI with ``--measurement RNA --soma-layer raw`` and e.g.
``--obs-filter "tissue_general == 'blood' and is_primary_data == True"``. Census ``var`` carries
Ensembl ids (``feature_id``) and symbols (``feature_name``); both are used to align genes.

Exactly once per epoch: ``ExperimentDataset`` gives every rank the same number of cells, so when
the cell count is not a multiple of the world size up to ``world_size - 1`` cells sit out an epoch
(the same ones each epoch: the split is contiguous in ``soma_joinid``); every other cell is seen
exactly once per epoch across ranks and workers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from ..processing_scrnalf import GENE_ID_COLUMNS, GeneAlignment, ScrnaLongformerProcessor
from .anndata_io import gene_names_from_var
from .convert import DatasetGenes

logger = logging.getLogger(__name__)

# var columns holding gene symbols, first present wins (Census: feature_name; from_anndata: var_id).
SYMBOL_COLUMNS = ("feature_name", "gene_symbols", "gene_symbol", "symbol", "gene_name", "var_id")
# X layers tried in this order when --soma-layer is not given (Census and from_anndata's names).
LAYER_ORDER = ("raw", "counts", "data")
# Cells read per tiledbsoma query (memory per process: one I/O batch, two with eager fetch).
IO_BATCH_SIZE = 8192
# Consecutive soma_joinids shuffled as one block: locality for reads, randomness across blocks.
SHUFFLE_CHUNK_SIZE = 64
CELL_ID_COLUMNS = ("obs_id", "cell_id", "barcode")
# TileDB's memory budget per read, in bytes (``sm.mem.total_budget``; TileDB's default is 10 GB).
# A read decompresses the tiles its cells touch; scattered cells (the gene graph's seeded sample,
# a shuffled I/O batch) touch a share of the whole matrix, which grows with the store, unless the
# budget makes TileDB read them in passes. Peak RSS at 1,000,000 (100,000) cells, default -> this
# budget: 5,000 sampled cells 3.9 (0.57) -> 0.25 (0.24) GB; 40,000 shuffled cells through the
# collator 1.48 (1.13) -> 1.10 (0.95) GB; the same speed.
READ_MEMORY_BUDGET = 64 * 2**20


def _import_tiledbsoma():
    try:
        import tiledbsoma
        import tiledbsoma_ml  # noqa: F401
    except ImportError as error:  # the atlas extra is optional
        raise ImportError(
            f"reading a SOMA experiment needs tiledbsoma and tiledbsoma-ml ({error}); install them with "
            "pip install 'scrnalf-hf[atlas]'."
        ) from None
    return tiledbsoma


def _open_experiment(uri: str):
    """``tiledbsoma.Experiment.open(uri)`` with reads held to :data:`READ_MEMORY_BUDGET` (the
    context travels to ``tiledbsoma_ml``'s readers through ``XLocator``)."""
    tiledbsoma = _import_tiledbsoma()
    context = tiledbsoma.SOMATileDBContext(tiledb_config={"sm.mem.total_budget": READ_MEMORY_BUDGET})
    return tiledbsoma.Experiment.open(uri, context=context)


def _soma_error(uri: str, what: str, error: Exception) -> ValueError:
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    return ValueError(f"{what} for the SOMA experiment {uri} ({message}); write it as e.g. \"cell_type == 'B cell'\".")


@dataclass(frozen=True)
class SomaSource:
    """Where the cells are: enough to reopen the experiment in any process (picklable)."""

    uri: str
    measurement: str
    layer: str


@dataclass
class SomaCells:
    """The cells of a SOMA query, standing in for :class:`~scrnalf_hf.data.cells.Cells`.

    Attributes:
        source: experiment URI, measurement and ``X`` layer.
        obs_joinids: (n_cells,) sorted ``soma_joinid`` of the cells the obs filter selected; a
            row position ``i`` anywhere in the training code means ``obs_joinids[i]``.
        var_joinids: (n_var,) every gene of the measurement, in ``soma_joinid`` order; library sizes
            are totals over all of them.
        gene_of_var: (n_var,) position of each gene in ``genes`` (the var filter's genes), -1 for
            genes the filter left out.
        genes: the genes the model may use (gene symbols / Ensembl ids from ``var``), the value
            kind and where they were read (``soma:<measurement>/X/<layer>``).
        name: a name for reports.
        obs_filter / var_filter: the value filters given (for reports).
    """

    source: SomaSource
    obs_joinids: np.ndarray
    var_joinids: np.ndarray
    gene_of_var: np.ndarray
    genes: DatasetGenes
    name: str
    obs_filter: str | None = None
    var_filter: str | None = None
    label_key: str | None = None
    species_setup: None = None
    _obs_cache: dict = field(default_factory=dict, repr=False)

    @property
    def n_cells(self) -> int:
        return len(self.obs_joinids)

    @property
    def input_kind(self) -> str:
        return self.genes.input_kind

    def cell_species(self) -> None:
        return None  # a SOMA experiment is one species (Census: one experiment per organism)

    def with_species(self, species: str | None = None, species_key: str | None = None) -> "SomaCells":
        if species is not None or species_key is not None:
            raise ValueError("--species / --species-key do not apply to a SOMA experiment (one species per experiment).")
        return self

    def _experiment(self):
        return _open_experiment(self.source.uri)

    def obs_column(self, key: str) -> np.ndarray:
        """(n_cells,) values of an ``obs`` column, in ``obs_joinids`` order (kept: labels are read
        more than once)."""
        if key not in self._obs_cache:
            self._obs_cache[key] = self._read_obs_column(key)
        return self._obs_cache[key]

    def _read_obs_column(self, key: str) -> np.ndarray:
        """(n_cells,) values of an ``obs`` column read from the store, in ``obs_joinids`` order."""
        with self._experiment() as experiment:
            names = experiment.obs.schema.names
            if key not in names:
                shown = [n for n in names if n != "soma_joinid"][:20]
                raise ValueError(f"obs column {key!r} is not in the SOMA experiment {self.source.uri} (its columns: {shown}).")
            # the whole column once, then the chosen cells by soma_joinid, rather than a TileDB point
            # query of every chosen soma_joinid (a million coordinates for an atlas)
            table = experiment.obs.read(column_names=["soma_joinid", key]).concat()
        joinids = table["soma_joinid"].to_numpy()
        order = np.argsort(joinids, kind="stable")
        values = table[key].to_numpy(zero_copy_only=False) if hasattr(table[key], "to_numpy") else np.asarray(table[key])
        return np.asarray(values)[order[np.searchsorted(joinids[order], self.obs_joinids)]]

    def cell_ids(self) -> np.ndarray:
        """(n_cells,) each cell's name (``obs_id`` as ``from_anndata`` writes it), else its soma_joinid."""
        with self._experiment() as experiment:
            names = experiment.obs.schema.names
        column = next((c for c in CELL_ID_COLUMNS if c in names), None)
        if column is None:
            return self.obs_joinids.astype(str)
        # not kept: a million names are ~0.1 GB of Python strings, read once for the split record
        return np.asarray(self._read_obs_column(column), dtype=object)

    def read_rows(self, rows: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
        """The stored values of the cells at ``rows`` (positions into ``obs_joinids``), in that order.

        Returns:
            ``(values, library_size)``: (len(rows), n_genes) float32 CSR on ``genes``' columns,
            and (len(rows),) float64 totals over every gene of the measurement.
        """
        rows = np.asarray(rows, dtype=np.int64)
        joinids = self.obs_joinids[rows]
        with self._experiment() as experiment:
            X = experiment.ms[self.source.measurement].X[self.source.layer]
            table = X.read(coords=(np.unique(joinids),)).tables().concat() if len(rows) else None
        if table is None or table.num_rows == 0:
            return sp.csr_matrix((len(rows), self.genes.n_genes), dtype=np.float32), np.zeros(len(rows))
        order = np.argsort(joinids, kind="stable")
        row_of = order[np.searchsorted(joinids[order], table["soma_dim_0"].to_numpy())]
        var_position = np.searchsorted(self.var_joinids, table["soma_dim_1"].to_numpy())
        values = table["soma_data"].to_numpy().astype(np.float32)
        library_size = np.bincount(row_of, weights=values, minlength=len(rows))
        gene = self.gene_of_var[var_position]
        kept = gene >= 0
        matrix = sp.csr_matrix((values[kept], (row_of[kept], gene[kept])), shape=(len(rows), self.genes.n_genes))
        return matrix, library_size

    def panel_matrix(
        self, rows: np.ndarray, processor: ScrnaLongformerProcessor, alignment: GeneAlignment | None = None,
        chunk_size: int = 8192,
    ) -> sp.csr_matrix:
        """:func:`~scrnalf_hf.data.cells.panel_matrix` of these cells: (len(rows), G) float32,
        normalised, in panel order (what a collator batch holds), read chunk by chunk."""
        if alignment is None:
            alignment = processor.align_genes(self.genes.gene_symbols, self.genes.gene_ids)
        parts = []
        for start in range(0, max(len(rows), 1), chunk_size):
            values, library_size = self.read_rows(rows[start : start + chunk_size])
            values = values.tocoo()
            positions = alignment.vocab_index[values.col]
            kept = positions >= 0
            entries = processor.normalize_entries(values.data[kept], library_size[values.row[kept]])
            part = sp.csr_matrix((entries, (values.row[kept], positions[kept])), shape=(values.shape[0], processor.n_genes))
            if alignment.collapses:  # genes sharing a token: log1p of their summed normalised values
                part.data = np.expm1(part.data)
                part.sum_duplicates()
                part.data = np.log1p(part.data)
            parts.append(part.astype(np.float32))
        return sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, processor.n_genes), dtype=np.float32)

    def with_targets(self, targets: np.ndarray | None) -> "SomaRows":
        """What :class:`~scrnalf_hf.data.cells.Cells.with_targets` gives: ``select(rows)`` of it is
        the Trainer's dataset (a :class:`SomaCellStream`)."""
        if targets is not None and len(targets) != self.n_cells:
            raise ValueError(f"{len(targets)} targets for {self.n_cells} cells.")
        return SomaRows(self, targets)


@dataclass
class SomaRows:
    """Cells of a SOMA query with their targets; ``select(rows)`` streams the chosen ones."""

    cells: SomaCells
    targets: np.ndarray | None

    def select(self, rows: Sequence[int]) -> "SomaCellStream":
        rows = np.sort(np.asarray(rows, dtype=np.int64))
        return SomaCellStream(
            self.cells.source, self.cells.obs_joinids[rows], self.cells.var_joinids, self.cells.gene_of_var,
            None if self.targets is None else np.asarray(self.targets)[rows],
        )


def _world_size() -> int:
    """World size as tiledbsoma_ml sees it (``WORLD_SIZE``, or an initialised process group)."""
    from tiledbsoma_ml._distributed import get_distributed_rank_and_world_size  # the library's own rule

    return get_distributed_rank_and_world_size()[1]


class SomaCellStream(torch.utils.data.IterableDataset):
    """Cells of a SOMA experiment as collator rows, for ``Trainer(train_dataset=...)``.

    ``len()`` is the cells delivered per epoch over all ranks (what Trainer counts as samples).
    :class:`~scrnalf_hf.training.trainer.ScrnaTrainer` does not let accelerate split it again
    (it is split already); it asks :meth:`batches` for the DataLoader's dataset instead.

    Args:
        source: the experiment.
        obs_joinids: (n,) the cells to stream (sorted).
        var_joinids / gene_of_var: every gene of the measurement and its position in the model's
            dataset gene list (-1: left out by the var filter).
        targets: (n,) or (n, k) each cell's target (``labels``), or None.
    """

    shards_itself = True  # read by ScrnaTrainer

    def __init__(self, source: SomaSource, obs_joinids, var_joinids, gene_of_var, targets=None):
        super().__init__()
        self.source = source
        self.obs_joinids = np.asarray(obs_joinids, dtype=np.int64)
        self.var_joinids = np.asarray(var_joinids, dtype=np.int64)
        self.gene_of_var = np.asarray(gene_of_var, dtype=np.int64)
        self.targets = targets
        world_size = _world_size()
        if world_size > len(self.obs_joinids):
            raise ValueError(
                f"{world_size} processes but only {len(self.obs_joinids)} cells to stream: every process needs at least "
                "one cell; use fewer processes (--num_processes / --nproc_per_node) or more cells."
            )

    def __len__(self) -> int:
        world_size = _world_size()
        return len(self.obs_joinids) // world_size * world_size

    def __iter__(self):
        """This process's rows, one by one, in soma_joinid order (no shuffling)."""
        for batch in self.batches(256, shuffle=False, seed=0, num_workers=1):
            yield from batch

    def batches(self, batch_size: int, shuffle: bool, seed: int, num_workers: int) -> "_SomaBatches":
        """The mini-batches of this process (an IterableDataset of lists of rows)."""
        return _SomaBatches(self, batch_size, shuffle, seed, num_workers)


class _SomaBatches(torch.utils.data.IterableDataset):
    """One process's mini-batches of a :class:`SomaCellStream`: lists of collator rows.

    ``len()`` is the exact number of batches this process yields per epoch, summed over its
    DataLoader workers (each worker's last batch may be short), so that Trainer's step count
    matches what is delivered and no cell is dropped.
    """

    def __init__(self, stream: SomaCellStream, batch_size: int, shuffle: bool, seed: int, num_workers: int):
        super().__init__()
        self.stream, self.batch_size, self.shuffle, self.seed = stream, int(batch_size), shuffle, int(seed)
        self.num_workers = max(int(num_workers), 1)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        # tiledbsoma-ml 0.1 shuffles with its seed alone; a seed per epoch gives each epoch its own order
        self.epoch = int(epoch)

    def __len__(self) -> int:
        per_rank = len(self.stream.obs_joinids) // _world_size()
        per_worker, remainder = divmod(per_rank, self.num_workers)
        sizes = [per_worker + (worker < remainder) for worker in range(self.num_workers)]
        return sum(-(-size // self.batch_size) for size in sizes)

    def _experiment_dataset(self):
        from tiledbsoma_ml import ExperimentDataset
        from tiledbsoma_ml._query_ids import QueryIDs
        from tiledbsoma_ml.x_locator import XLocator

        with _open_experiment(self.stream.source.uri) as experiment:
            locator = XLocator.create(experiment, self.stream.source.measurement, self.stream.source.layer)
            cell_id = next((c for c in CELL_ID_COLUMNS if c in experiment.obs.schema.names), None)
        query_ids = QueryIDs(obs_joinids=self.stream.obs_joinids, var_joinids=self.stream.var_joinids)
        io_batch_size = max(SHUFFLE_CHUNK_SIZE, min(IO_BATCH_SIZE, -(-len(self.stream.obs_joinids) // SHUFFLE_CHUNK_SIZE) * SHUFFLE_CHUNK_SIZE))
        return ExperimentDataset(
            x_locator=locator, query_ids=query_ids, obs_column_names=["soma_joinid", *([cell_id] if cell_id else [])],
            batch_size=self.batch_size, io_batch_size=io_batch_size, shuffle=self.shuffle,
            shuffle_chunk_size=SHUFFLE_CHUNK_SIZE, seed=self.seed + self.epoch, return_sparse_X=False,
        ), cell_id

    def __iter__(self):
        dataset, cell_id = self._experiment_dataset()
        gene_of_var = self.stream.gene_of_var
        targets = self.stream.targets
        for X, obs in dataset:
            X = np.atleast_2d(X)  # (batch, n_var) dense, var_joinids order
            library_size = X.sum(axis=1, dtype=np.float64)  # (batch,) over every gene
            kept_columns = np.flatnonzero(gene_of_var >= 0)
            X = X[:, kept_columns]
            joinids = obs["soma_joinid"].to_numpy()
            names = obs[cell_id].astype(str).to_numpy() if cell_id else joinids.astype(str)
            target_rows = None if targets is None else np.searchsorted(self.stream.obs_joinids, joinids)
            rows = []
            for i in range(X.shape[0]):
                nonzero = np.flatnonzero(X[i])
                row = {
                    "cell_id": names[i],
                    "indices": gene_of_var[kept_columns[nonzero]].astype(np.int32),
                    "values": X[i, nonzero].astype(np.float32),
                    "library_size": library_size[i],
                }
                if target_rows is not None:
                    row["labels"] = targets[target_rows[i]]
                rows.append(row)
            yield rows


def _choose_layer(measurement, layer: str | None, uri: str) -> str:
    layers = list(measurement.X.keys())
    if layer is not None:
        if layer not in layers:
            raise ValueError(f"--soma-layer {layer!r} is not an X layer of {uri}; its layers: {layers}.")
        return layer
    for name in LAYER_ORDER:
        if name in layers:
            return name
    if len(layers) == 1:
        return layers[0]
    raise ValueError(f"{uri} holds X layers {layers}; name the one with raw counts with --soma-layer.")


def open_soma(
    uri: str | Path,
    *,
    measurement: str = "RNA",
    layer: str | None = None,
    obs_filter: str | None = None,
    var_filter: str | None = None,
    input_kind: str = "auto",
    name: str | None = None,
) -> SomaCells:
    """Open the cells of a SOMA experiment for training.

    Args:
        uri: a local folder or a ``s3://`` / ``tiledb://`` URI of a SOMA experiment.
        measurement: the measurement (``ms``) holding the genes, ``RNA`` by default (Census too).
        layer: the ``X`` layer; by default the first present of ``raw``, ``counts``, ``data``.
        obs_filter / var_filter: SOMA value filters (``"cell_type == 'B cell'"``); the var filter
            chooses which genes the model may use, library sizes still count every gene.
        input_kind: ``counts`` / ``log1p`` / ``auto`` (decided on the first cells' values).
        name: a name for reports (default: the URI's last part).

    Raises:
        ValueError: the URI is not a SOMA experiment, the measurement or layer is missing, a filter
            is malformed or selects no cells / genes, the values are of the wrong kind.
    """
    tiledbsoma = _import_tiledbsoma()
    from .cells import INPUT_KINDS, guess_input_kind

    uri = str(uri)
    if input_kind not in INPUT_KINDS:
        raise ValueError(f"input_kind must be one of {INPUT_KINDS}, got {input_kind!r}.")
    if "://" not in uri and not Path(uri).exists():
        raise FileNotFoundError(f"--soma-uri {uri} does not exist; give the folder of a SOMA experiment.")
    try:
        experiment = _open_experiment(uri)
    except Exception as error:  # tiledbsoma raises its own DoesNotExistError / SOMAError / TypeError
        raise ValueError(
            f"--soma-uri {uri} is not a SOMA experiment ({str(error).splitlines()[0] if str(error) else type(error).__name__}); "
            "write one with tiledbsoma.io.from_anndata or give a Census experiment URI."
        ) from None
    with experiment:
        if measurement not in experiment.ms:
            raise ValueError(
                f"--measurement {measurement!r} is not in {uri}; its measurements: {sorted(experiment.ms.keys())}."
            )
        chosen_layer = _choose_layer(experiment.ms[measurement], layer, uri)
        try:
            query = experiment.axis_query(
                measurement,
                obs_query=tiledbsoma.AxisQuery(value_filter=obs_filter) if obs_filter else tiledbsoma.AxisQuery(),
                var_query=tiledbsoma.AxisQuery(value_filter=var_filter) if var_filter else tiledbsoma.AxisQuery(),
            )
            obs_joinids = np.sort(query.obs_joinids().to_numpy())
            kept_var = np.sort(query.var_joinids().to_numpy())
        except Exception as error:
            raise _soma_error(uri, "--obs-filter / --var-filter is not a valid SOMA value filter", error) from None
        if len(obs_joinids) == 0:
            what = f"--obs-filter {obs_filter!r} selects" if obs_filter else "the experiment holds"
            raise ValueError(f"{what} no cells of {uri}; loosen the filter (obs columns: {experiment.obs.schema.names[:20]}).")
        if len(kept_var) == 0:
            what = f"--var-filter {var_filter!r} selects" if var_filter else f"measurement {measurement!r} holds"
            raise ValueError(f"{what} no genes of {uri}; loosen the filter.")
        var = experiment.ms[measurement].var.read().concat().to_pandas().sort_values("soma_joinid")
    var_joinids = var["soma_joinid"].to_numpy(dtype=np.int64)
    kept = np.isin(var_joinids, kept_var)
    symbol_column = next((c for c in SYMBOL_COLUMNS if c in var.columns), None)
    if symbol_column is None:
        raise ValueError(f"the var of {uri}/{measurement} has no gene symbol column (one of {SYMBOL_COLUMNS}); columns: {list(var.columns)}.")
    id_column = next((c for c in GENE_ID_COLUMNS if c in var.columns), None)
    chosen = var[kept].set_index(symbol_column)
    chosen.index = chosen.index.astype(str)
    symbols, ids = gene_names_from_var(chosen, id_column)
    gene_of_var = np.full(len(var_joinids), -1, dtype=np.int64)
    gene_of_var[kept] = np.arange(int(kept.sum()))
    matrix = f"soma:{measurement}/X/{chosen_layer}"
    cells = SomaCells(
        SomaSource(uri, measurement, chosen_layer), obs_joinids, var_joinids, gene_of_var,
        DatasetGenes(symbols, ids, "counts", matrix), name or Path(uri.rstrip("/")).name, obs_filter, var_filter,
    )
    first, _ = cells.read_rows(np.arange(min(2048, cells.n_cells)))
    found = guess_input_kind(first.data)
    if input_kind == "auto":
        input_kind = found
    elif input_kind == "counts" and found != "counts":
        raise ValueError(f"{matrix} of {uri} holds non-integer values, not raw counts; pass --input-kind log1p or name the counts layer with --soma-layer.")
    cells.genes = DatasetGenes(symbols, ids, input_kind, matrix)
    logger.info("SOMA %s: %d cells, %d of %d genes, %s (%s)", uri, cells.n_cells, len(symbols), len(var_joinids), matrix, input_kind)
    return cells


def write_soma(adata, uri: str | Path, measurement: str = "RNA", layer: str = "raw") -> str:
    """Write an AnnData as a SOMA experiment (``tiledbsoma.io.from_anndata``), ``X`` as ``layer``;
    ``obs_names`` go to ``obs_id``, ``var_names`` to ``var_id``. For tests, benchmarks and the README."""
    tiledbsoma = _import_tiledbsoma()
    import tiledbsoma.io

    return tiledbsoma.io.from_anndata(str(uri), adata, measurement_name=measurement, X_layer_name=layer)


__all__ = ["SomaCellStream", "SomaCells", "SomaSource", "open_soma", "write_soma"]
