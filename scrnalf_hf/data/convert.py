"""AnnData → Hugging Face ``datasets``, sparse per cell, chunked, safe to interrupt.

One row per cell:

========================  ============================================================
column                    content
========================  ============================================================
``cell_id``               the AnnData ``obs_names`` entry
``indices``               int32 positions of the cell's nonzero genes in the dataset's
                          own gene list (``genes.json``), ascending
``values``                float32 values at those genes (raw counts unless
                          ``require_counts=False``)
``library_size``          float64 total of the cell over *all* its genes
``length``                number of nonzero genes (Trainer's length grouping:
                          ``train_sampling_strategy="group_by_length"``)
``label``                 ``ClassLabel`` of ``label_key``, if given
``species`` / ``batch``   strings, if given
``protein``               float32 raw protein (antibody) counts of a CITE-seq cell, in the
                          order of ``genes.json``'s ``protein_names`` (if given; matched to the
                          RNA cells by id, see :mod:`~scrnalf_hf.data.multimodal`)
``peaks``                 int32 positions of a multiome cell's open ATAC peaks in
                          ``genes.json``'s ``peak_names``, ascending (if given; sparse, since
                          most of 100,000 peaks are closed in a cell; see
                          :mod:`~scrnalf_hf.data.atac`)
selected ``obs`` columns  under their own names
========================  ============================================================

The gene list travels next to the Arrow files in ``genes.json`` so that a collator can align
the cells to any model's vocabulary (by Ensembl id or symbol), never by column position.

The folder has exactly the layout ``Dataset.save_to_disk`` writes (``data-XXXXX-of-NNNNN.arrow``
shards, ``dataset_info.json``, ``state.json``), so ``datasets.load_from_disk`` opens it. The
shards are written straight from CSR row chunks instead of through ``save_to_disk``, because
``save_to_disk`` needs a finished ``Dataset`` first: writing it twice would double the time and
map the whole output into memory.

Gene names. Where ``.var`` has Ensembl ids (``gene_id_key``, or a usual id column such as
``gene_ids``), the ids are the gene key: repeated *symbols* are fine (10x tables repeat some,
e.g. ``Rp1`` twice), but a repeated id (compared without its version suffix, as models match
them) is an error that names it. Either way, repeated symbols (compared case-insensitively, as
models match them) are made unique the way ``anndata``'s ``var_names_make_unique`` does it
(``Rp1``, ``Rp1-1``), and those unique names are what ``genes.json`` records, because a model's
gene panel needs one name per gene; without ids, a warning names the renamed genes. See
:func:`~scrnalf_hf.data.anndata_io.gene_names_from_var`.

Interruptions. Everything is written into a hidden staging folder next to ``output_dir``,
``.NAME.incomplete-PID-XXXXXXXX`` (PID: the converting process, also recorded with its start time
in the folder's ``.scrnalf-writer.json``), and moved into place only when complete, so a killed
conversion never leaves a folder that looks like a finished dataset. A previous dataset is
replaced by swapping the two folders in one step (Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere
it is first moved aside to ``.NAME.replaced-PID-XXXXXXXX``), so a kill leaves either the old or
the new dataset at ``output_dir``. Worker processes (``num_proc > 1``) die with the process that
started them. The next conversion to the same ``output_dir`` removes the leftovers of
interrupted runs whose process is gone (logging what it removed) and never touches those of a
conversion still running.

Replacing. ``overwrite=True`` replaces only a folder this module wrote (``genes.json``,
``dataset_info.json`` and ``state.json``); any other folder, and any existing file, is refused
before anything is read or written.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import multiprocessing as mp
import os
import queue
import re
import shutil
import signal
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp
from datasets.arrow_writer import ArrowWriter
from datasets.utils.py_utils import asdict
from tqdm.auto import tqdm

from ..staging import WRITER_FILE, record_writer, writer_is_running
from .anndata_io import (
    ExpressionSource,
    check_cells_and_labels,
    check_chunk,
    open_anndata,
)

GENES_FILE = "genes.json"
DATASET_FILES = (GENES_FILE, datasets.config.DATASET_INFO_FILENAME, datasets.config.DATASET_STATE_JSON_FILENAME)
DEFAULT_CHUNK_SIZE = 8192
DEFAULT_CELLS_PER_SHARD = 100_000

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetGenes:
    """The gene list a converted dataset's ``indices`` refer to.

    Attributes:
        gene_symbols: gene names in column order (length n_genes).
        gene_ids: Ensembl ids in the same order, if the AnnData had them.
        input_kind: ``"counts"`` (raw integer counts) or ``"log1p"`` (log-normalised), the
            processor's ``input_kind`` the values suit.
        matrix: where the values came from in the AnnData, e.g. ``"layers['counts']"``.
        protein_names: the proteins of the ``protein`` column (CITE-seq), in its order, if any.
        peak_names: the ATAC peaks the ``peaks`` column indexes (multiome), in its order, if any.
        peak_coordinates: their ``{"chrom", "start", "end"}`` lists
            (:meth:`~scrnalf_hf.data.atac.PeakCoordinates.to_dict`), with ``peak_names``.
    """

    gene_symbols: list[str]
    gene_ids: list[str] | None
    input_kind: str
    matrix: str
    protein_names: list[str] | None = None
    peak_names: list[str] | None = None
    peak_coordinates: dict | None = None

    @property
    def n_genes(self) -> int:
        return len(self.gene_symbols)


def dataset_genes(
    path: str | Path,
    layer: str | None = None,
    use_raw: bool = False,
    require_counts: bool = True,
    gene_id_key: str | None = None,
) -> DatasetGenes:
    """The gene list that a dataset's ``indices`` refer to.

    Args:
        path: a folder written by :func:`convert_anndata` (read from its ``genes.json``), or a
            ``.h5ad`` file streamed with :func:`stream_anndata` (then pass the same ``layer``,
            ``use_raw``, ``require_counts`` and ``gene_id_key`` as to the stream).
    """
    path = Path(path)
    if path.is_dir():
        genes_file = path / GENES_FILE
        if not genes_file.is_file():
            raise FileNotFoundError(
                f"{genes_file} not found: {path} is not a dataset written by scrnalf convert "
                "(or its conversion did not finish)."
            )
        record = json.loads(genes_file.read_text())
        return DatasetGenes(
            record["gene_symbols"], record["gene_ids"], record["input_kind"], record["matrix"], record.get("protein_names"),
            record.get("peak_names"), record.get("peak_coordinates"),
        )
    with open_anndata(path, layer, use_raw, require_counts, gene_id_key) as source:
        return DatasetGenes(
            source.gene_symbols, source.gene_ids, "counts" if require_counts else "log1p", source.matrix_name
        )


def _obs_feature(column: pd.Series) -> datasets.Value:
    kind = column.dtype.kind
    if isinstance(column.dtype, pd.CategoricalDtype) or kind in "OSUT":
        return datasets.Value("string")
    if kind == "b":
        return datasets.Value("bool")
    if kind in "iu":
        return datasets.Value("int64")
    if kind == "f":
        return datasets.Value("float64")
    raise ValueError(
        f"obs column {column.name!r} has dtype {column.dtype}, which cannot be stored; pick another column."
    )


@dataclass(frozen=True)
class _ConversionPlan:
    """What every shard writer needs to know (picklable, sent to worker processes)."""

    label_key: str | None
    label_names: list[str] | None
    species_key: str | None
    species: str | None
    batch_key: str | None
    obs_keys: tuple[str, ...]
    require_counts: bool
    chunk_size: int
    features: datasets.Features
    protein_counts: np.ndarray | None = None  # (n_cells, P) in the source's cell order
    open_peaks: sp.csr_matrix | None = None  # (n_cells, n_peaks) binarised, in the source's cell order


def _plan_conversion(
    source: ExpressionSource,
    label_key: str | None,
    obs_keys: Sequence[str],
    species: str | None,
    species_key: str | None,
    batch_key: str | None,
    require_counts: bool,
    chunk_size: int,
    proteins=None,
    peaks=None,
) -> _ConversionPlan:
    """Checks cells and columns, then fixes the dataset's features (label names included)."""
    if species is not None and species_key is not None:
        raise ValueError(
            f"give species= (--species, one species for every cell) or species_key= (--species-key, an obs column), "
            f"not both; got {species!r} and {species_key!r}."
        )
    check_cells_and_labels(source, label_key, [k for k in (species_key, batch_key, *obs_keys) if k is not None])
    columns: dict[str, datasets.features.features.FeatureType] = {
        "cell_id": datasets.Value("string"),
        "indices": datasets.List(datasets.Value("int32")),
        "values": datasets.List(datasets.Value("float32")),
        "library_size": datasets.Value("float64"),
        "length": datasets.Value("int32"),
    }
    label_names = None
    if label_key is not None:
        labels = source.obs[label_key]
        if isinstance(labels.dtype, pd.CategoricalDtype):
            present = set(labels.unique())
            label_names = [str(c) for c in labels.cat.categories if c in present]
        else:
            label_names = [str(v) for v in sorted(labels.unique())]
        columns["label"] = datasets.ClassLabel(names=label_names)
    if species_key is not None or species is not None:
        columns["species"] = datasets.Value("string")
    if batch_key is not None:
        columns["batch"] = datasets.Value("string")
    repeated = sorted({key for key in obs_keys if list(obs_keys).count(key) > 1})
    if repeated:
        raise ValueError(f"obs_keys (--obs-keys) lists {repeated} more than once; give each column once.")
    for key in obs_keys:
        if key in columns:
            raise ValueError(f"obs column {key!r} would clash with the dataset column of the same name; rename it.")
        columns[key] = _obs_feature(source.obs[key])
    if proteins is not None:
        if len(proteins.counts) != source.n_cells:
            raise ValueError(f"{len(proteins.counts)} cells of proteins ({proteins.source}) for {source.n_cells} RNA cells.")
        columns["protein"] = datasets.List(datasets.Value("float32"))
    if peaks is not None:
        if peaks.accessibility.shape[0] != source.n_cells:
            raise ValueError(f"{peaks.accessibility.shape[0]} cells of peaks ({peaks.source}) for {source.n_cells} RNA cells.")
        columns["peaks"] = datasets.List(datasets.Value("int32"))
    return _ConversionPlan(
        label_key=label_key,
        label_names=label_names,
        species_key=species_key,
        species=species,
        batch_key=batch_key,
        obs_keys=tuple(obs_keys),
        require_counts=require_counts,
        chunk_size=chunk_size,
        features=datasets.Features(columns),
        protein_counts=None if proteins is None else proteins.counts,
        open_peaks=None if peaks is None else sp.csr_matrix(peaks.accessibility),
    )


def _cells_table(chunk: sp.csr_matrix, first_row: int, source: ExpressionSource, plan: _ConversionPlan) -> pa.Table:
    """One Arrow table for a CSR row chunk: list columns built from the CSR offsets, no per-cell Python."""
    rows = slice(first_row, first_row + chunk.shape[0])
    offsets = pa.array(chunk.indptr.astype(np.int32))  # (cells + 1,)
    obs = source.obs.iloc[rows]
    columns = {
        "cell_id": pa.array(obs.index.astype(str)),
        "indices": pa.ListArray.from_arrays(offsets, pa.array(chunk.indices.astype(np.int32, copy=False))),
        "values": pa.ListArray.from_arrays(offsets, pa.array(chunk.data.astype(np.float32, copy=False))),
        "library_size": pa.array(np.asarray(chunk.sum(axis=1), dtype=np.float64).reshape(-1)),
        "length": pa.array(np.diff(chunk.indptr).astype(np.int32)),
    }
    if plan.label_key is not None:
        codes = pd.Categorical(obs[plan.label_key].astype(str), categories=plan.label_names).codes
        columns["label"] = pa.array(codes.astype(np.int64))
    if plan.species_key is not None:
        columns["species"] = pa.array(obs[plan.species_key].astype(str).to_numpy())
    elif plan.species is not None:
        columns["species"] = pa.array([plan.species] * chunk.shape[0], type=pa.string())
    if plan.batch_key is not None:
        columns["batch"] = pa.array(obs[plan.batch_key].astype(str).to_numpy())
    for key in plan.obs_keys:
        values = obs[key]
        columns[key] = pa.array(
            (values.astype(str) if isinstance(values.dtype, pd.CategoricalDtype) else values).to_numpy()
        )
    if plan.protein_counts is not None:
        proteins = np.ascontiguousarray(plan.protein_counts[rows], dtype=np.float32)  # (cells, P)
        protein_offsets = pa.array(np.arange(0, proteins.size + 1, max(proteins.shape[1], 1), dtype=np.int32))
        columns["protein"] = pa.ListArray.from_arrays(protein_offsets, pa.array(proteins.reshape(-1)))
    if plan.open_peaks is not None:
        open_peaks = plan.open_peaks[rows]  # (cells, n_peaks) CSR: its offsets and indices are the column
        open_peaks.sort_indices()
        columns["peaks"] = pa.ListArray.from_arrays(
            pa.array(open_peaks.indptr.astype(np.int32)), pa.array(open_peaks.indices.astype(np.int32, copy=False))
        )
    return pa.table(columns)


def _chunk_tables(
    source: ExpressionSource, plan: _ConversionPlan, start: int, stop: int, gene_seen: np.ndarray
) -> Iterator[pa.Table]:
    """Checked Arrow tables of rows ``start``–``stop``; marks genes with a nonzero in ``gene_seen``."""
    for first_row, chunk in source.row_chunks(plan.chunk_size, start, stop):
        check_chunk(chunk, first_row, source, plan.require_counts)
        if not gene_seen.all():  # usually true after the first chunk, so later chunks skip the pass
            gene_seen[chunk.indices] = True
        yield _cells_table(chunk, first_row, source, plan)


def _write_shard(
    source: ExpressionSource, plan: _ConversionPlan, start: int, stop: int, path: Path, progress: Callable[[int], None]
) -> np.ndarray:
    """Writes rows ``start``–``stop`` into one Arrow shard; returns (n_genes,) bool: gene has a nonzero."""
    gene_seen = np.zeros(source.n_genes, dtype=bool)
    writer = ArrowWriter(features=plan.features, path=str(path))
    try:
        for table in _chunk_tables(source, plan, start, stop, gene_seen):
            writer.write_table(table)
            progress(table.num_rows)
        writer.finalize()
    finally:
        writer.close()
    return gene_seen


# Worker processes open their own view of the input once (the file by path; an in-memory
# AnnData is inherited through fork, not pickled), kept here for the worker's lifetime.
_worker_state: dict = {}
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _die_with_parent(parent_pid: int) -> None:
    """Makes this worker exit as soon as the conversion process that forked it dies.

    An orphaned worker would finish shards nobody collects, then hang at exit flushing progress
    into a queue nobody reads. On Linux the kernel kills the worker when its parent dies
    (``prctl(PR_SET_PDEATHSIG)``): immediate, and effective while the worker sits in HDF5 or Arrow
    C code, where a Python-level check would not run. The signal follows the parent *thread* that
    forked the worker; ``ProcessPoolExecutor`` forks every worker from the thread that called
    :func:`convert_anndata`, which outlives the pool. Elsewhere a daemon thread polls the parent.
    A parent that died before this ran has already handed the worker to another process, which
    the ``getppid`` check catches.
    """
    armed = False
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        armed = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    if os.getppid() != parent_pid:
        os._exit(1)
    if not armed:
        threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


def _init_worker(source_arguments: dict, plan: _ConversionPlan, progress_queue, parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the parent has already warned about the input once
        _worker_state["source"] = open_anndata(**source_arguments)
    _worker_state["plan"] = plan
    _worker_state["queue"] = progress_queue


def _write_shard_in_worker(start: int, stop: int, path: str) -> np.ndarray:
    queue = _worker_state["queue"]
    return _write_shard(_worker_state["source"], _worker_state["plan"], start, stop, Path(path), queue.put)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Kills the workers mid-shard: a failed or interrupted conversion should not wait for shards
    nobody will use. ``concurrent.futures`` has no public call for this before Python 3.14
    (``kill_workers``), hence its ``_processes``."""
    kill_workers = getattr(pool, "kill_workers", None)
    if kill_workers is not None:
        kill_workers()
    else:
        for worker in list((pool._processes or {}).values()):
            worker.kill()
    pool.shutdown(wait=True, cancel_futures=True)


def _write_shards_in_parallel(
    source_arguments: dict, plan: _ConversionPlan, jobs: list[tuple[int, int, Path]], num_proc: int, bar: tqdm
) -> np.ndarray:
    context = mp.get_context("fork")
    progress_queue = context.Queue()

    def drain() -> None:
        while True:
            try:
                bar.update(progress_queue.get_nowait())
            except queue.Empty:
                return

    pool = ProcessPoolExecutor(
        num_proc,
        mp_context=context,
        initializer=_init_worker,
        initargs=(source_arguments, plan, progress_queue, os.getpid()),
    )
    try:
        futures = [pool.submit(_write_shard_in_worker, start, stop, str(path)) for start, stop, path in jobs]
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
            drain()
            failed = next((f for f in done if f.exception() is not None), None)
            if failed is not None:
                raise failed.exception()
        drain()
    except BaseException:
        _stop_workers(pool)
        raise
    pool.shutdown(wait=True)
    return np.logical_or.reduce([future.result() for future in futures])


def _write_dataset_metadata(folder: Path, features: datasets.Features, n_shards: int, description: str) -> None:
    """``state.json`` and ``dataset_info.json`` exactly as ``Dataset.save_to_disk`` writes them."""
    state = {
        "_data_files": [{"filename": f"data-{i:05d}-of-{n_shards:05d}.arrow"} for i in range(n_shards)],
        "_fingerprint": uuid.uuid4().hex[:16],
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    (folder / datasets.config.DATASET_STATE_JSON_FILENAME).write_text(json.dumps(state, indent=2, sort_keys=True))
    info = asdict(datasets.DatasetInfo(description=description, features=features))
    (folder / datasets.config.DATASET_INFO_FILENAME).write_text(
        json.dumps({k: info[k] for k in sorted(info)}, indent=2)
    )


def _shard_bounds(n_cells: int, cells_per_shard: int, num_proc: int) -> list[tuple[int, int]]:
    n_shards = min(n_cells, max(-(-n_cells // cells_per_shard), num_proc))
    edges = np.linspace(0, n_cells, n_shards + 1).astype(int)
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


def convert_anndata(
    adata_or_path: ad.AnnData | str | Path,
    output_dir: str | Path,
    label_key: str | None = None,
    obs_keys: Sequence[str] = (),
    species: str | None = None,
    species_key: str | None = None,
    batch_key: str | None = None,
    layer: str | None = None,
    use_raw: bool = False,
    require_counts: bool = True,
    gene_id_key: str | None = None,
    allow_empty_genes: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    cells_per_shard: int = DEFAULT_CELLS_PER_SHARD,
    num_proc: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    card_writer: Callable[[Path, dict], None] | None = None,
    proteins=None,
    peaks=None,
) -> datasets.Dataset:
    """Converts an AnnData into a ``datasets.Dataset`` folder, one sparse row per cell.

    Memory stays bounded by ``chunk_size`` cells (plus ``obs``) per process, however many cells
    a ``.h5ad`` file holds.

    Args:
        adata_or_path: an AnnData (in memory or backed) or a ``.h5ad`` path.
        output_dir: the dataset folder to create (``datasets.load_from_disk`` opens it).
        label_key: ``obs`` column stored as the ``label`` ``ClassLabel`` column.
        obs_keys: further ``obs`` columns stored under their own names.
        species: one species name for all cells (e.g. ``"human"``) → ``species`` column.
        species_key: or the ``obs`` column holding each cell's species.
        batch_key: ``obs`` column stored as the ``batch`` column.
        layer / use_raw: which matrix (see :mod:`scrnalf_hf.data.anndata_io`).
        require_counts: values must be raw integer counts (checked). ``False`` declares them
            log-normalised (``genes.json`` records ``input_kind="log1p"``).
        gene_id_key: ``.var`` column with Ensembl ids (default: a usual id column, if present).
        allow_empty_genes: keep genes with no nonzero value in any cell instead of failing.
        chunk_size: cells read, checked and written at a time.
        cells_per_shard: cells per Arrow file (at least ``num_proc`` files are written).
        num_proc: worker processes; each writes whole shards.
        overwrite: replace an existing ``output_dir`` written by this function (only once the
            new one is complete); any other existing folder is refused.
        progress: show a tqdm progress bar.
        card_writer: called as ``card_writer(folder, summary)`` on the finished temporary
            folder before it is renamed into place, to write a dataset card (``README.md``).
        proteins: a :class:`~scrnalf_hf.data.multimodal.Proteins` of the same cells, rows in
            the AnnData's cell order (:func:`~scrnalf_hf.data.multimodal.read_proteins`),
            stored as the ``protein`` column.
        peaks: a :class:`~scrnalf_hf.data.atac.Peaks` of the same cells, rows in the AnnData's
            cell order (:func:`~scrnalf_hf.data.multimodal.read_modalities`), stored as the
            ``peaks`` column (each cell's open peaks), the peak panel in ``genes.json``.

    Returns:
        The converted dataset, memory-mapped from ``output_dir``.

    Raises:
        FileExistsError: ``output_dir`` exists and ``overwrite`` is False, or it is a file, a
            symbolic link, or a folder that this function did not write (checked before the
            input is read).
        ValueError: bad input (unreadable file, NaN, negative or non-integer counts, empty cells
            or genes, missing label column, duplicated cell ids), before anything is renamed.
    """
    output_dir = Path(output_dir)
    if chunk_size < 1 or cells_per_shard < 1 or num_proc < 1:
        raise ValueError(
            f"chunk_size, cells_per_shard and num_proc must be >= 1, got {chunk_size}, {cells_per_shard}, {num_proc}."
        )
    _check_output_target(output_dir)
    remove_interrupted_leftovers(output_dir)
    if output_dir.exists():
        if not overwrite:
            raise FileExistsError(
                f"{output_dir} already exists; choose a new folder or pass overwrite=True (--overwrite)."
            )
        _check_replaceable(output_dir)
    source_arguments = {
        "source": adata_or_path,
        "layer": layer,
        "use_raw": use_raw,
        "require_counts": require_counts,
        "gene_id_key": gene_id_key,
    }
    with open_anndata(**source_arguments) as source:
        plan = _plan_conversion(
            source, label_key, obs_keys, species, species_key, batch_key, require_counts, chunk_size, proteins, peaks
        )
        bounds = _shard_bounds(source.n_cells, cells_per_shard, num_proc)
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = _sibling(output_dir, "incomplete")
        try:
            staging.mkdir()
        except PermissionError as error:
            raise PermissionError(
                f"cannot write in {output_dir.parent} ({error.strerror}); choose an output folder you can write to."
            ) from error
        try:
            record_writer(staging)
            jobs = [
                (start, stop, staging / f"data-{i:05d}-of-{len(bounds):05d}.arrow")
                for i, (start, stop) in enumerate(bounds)
            ]
            with tqdm(total=source.n_cells, unit="cells", desc="Converting", disable=not progress) as bar:
                if num_proc == 1:
                    gene_seen = np.logical_or.reduce(
                        [_write_shard(source, plan, start, stop, path, bar.update) for start, stop, path in jobs]
                    )
                else:
                    gene_seen = _write_shards_in_parallel(source_arguments, plan, jobs, min(num_proc, len(jobs)), bar)
            empty_genes = np.flatnonzero(~gene_seen)
            if empty_genes.size and not allow_empty_genes:
                names = [source.gene_symbols[g] for g in empty_genes[:5]]
                raise ValueError(
                    f"{empty_genes.size} gene(s) of {source.matrix_name} are zero in every cell (e.g. {names}); "
                    "filter them (scanpy.pp.filter_genes(adata, min_cells=1)) or pass allow_empty_genes=True "
                    "(--allow-empty-genes)."
                )
            summary = {
                "gene_symbols": source.gene_symbols,
                "gene_ids": source.gene_ids,
                "input_kind": "counts" if require_counts else "log1p",
                "matrix": source.matrix_name,
                "n_cells": source.n_cells,
                "label_key": label_key,
                "label_names": plan.label_names,
                "source": str(source.path) if source.path is not None else "in-memory AnnData",
            }
            if proteins is not None:
                summary["protein_names"] = list(proteins.names)
                summary["protein_source"] = proteins.source
            if peaks is not None:
                summary["peak_names"] = list(peaks.names)
                summary["peak_coordinates"] = peaks.coordinates.to_dict()
                summary["peak_source"] = peaks.source
            (staging / GENES_FILE).write_text(json.dumps(summary))
            _write_dataset_metadata(
                staging,
                plan.features,
                len(bounds),
                f"{source.n_cells} cells × {source.n_genes} genes from {summary['source']}",
            )
            if card_writer is not None:
                card_writer(staging, summary)
            # The pid in the folder's name still marks it as ours for the last few steps.
            (staging / WRITER_FILE).unlink()
            _move_into_place(staging, output_dir)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
    return datasets.load_from_disk(str(output_dir))


# -- where the output goes: checks, staging folders, leftovers of interrupted runs ------------------

_LEFTOVER_NAME = re.compile(r"(?P<kind>incomplete|replaced)-(?:(?P<pid>\d+)-)?[0-9a-f]{8}")


def _sibling(output_dir: Path, kind: str) -> Path:
    """A hidden folder next to ``output_dir`` whose name carries this process's id."""
    return output_dir.parent / f".{output_dir.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _is_converted_dataset(folder: str | Path) -> bool:
    """Whether ``folder`` is a dataset written by :func:`convert_anndata` (its three records present,
    ``genes.json`` holding the gene list)."""
    folder = Path(folder)
    if not all((folder / name).is_file() for name in DATASET_FILES):
        return False
    try:
        record = json.loads((folder / GENES_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and "gene_symbols" in record


def _check_output_target(output_dir: Path) -> None:
    if output_dir.is_symlink():
        raise FileExistsError(
            f"{output_dir} is a symbolic link; pass the folder it points to ({output_dir.resolve()}) or a new path."
        )
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(
            f"{output_dir} is a file, not a folder; convert writes a dataset folder and never replaces a file, "
            "even with overwrite=True (--overwrite). Choose another output path or move the file away."
        )
    above = next((folder for folder in output_dir.parents if folder.exists()), None)
    if above is not None and not above.is_dir():
        raise NotADirectoryError(f"{output_dir} lies under {above}, which is a file; choose an output folder elsewhere.")


def _check_replaceable(output_dir: Path) -> None:
    if _is_converted_dataset(output_dir):
        return
    contents = sorted(p.name for p in output_dir.iterdir())
    missing = [name for name in DATASET_FILES if name not in contents]
    if not contents:
        found = "it is empty"
    elif missing:
        found = f"it lacks {', '.join(missing)} and holds {contents[:5]}{' ...' if len(contents) > 5 else ''}"
    else:
        found = f"its {GENES_FILE} is not the gene record convert writes"
    raise FileExistsError(
        f"{output_dir} is not a dataset written by scrnalf convert (expected {', '.join(DATASET_FILES)}; {found}), "
        "so overwrite=True (--overwrite) will not replace it. Choose a new output folder, or delete this one "
        "yourself if it is disposable."
    )


def remove_interrupted_leftovers(output_dir: str | Path) -> list[Path]:
    """Removes what conversions to ``output_dir`` left behind when they were killed.

    These are hidden folders next to ``output_dir``: ``.NAME.incomplete-PID-*`` (a dataset being
    written) and ``.NAME.replaced-PID-*`` (a previous dataset moved aside), whose process ``PID``
    is gone. Folders of a conversion still running are left alone. A moved-aside dataset is put
    back when nothing took its place at ``output_dir``. Each removal is logged as a warning.

    Returns:
        The folders removed.
    """
    output_dir = Path(output_dir)
    if not output_dir.parent.is_dir():
        return []
    prefix = f".{output_dir.name}."
    removed = []
    for folder in sorted(output_dir.parent.iterdir()):
        match = _LEFTOVER_NAME.fullmatch(folder.name[len(prefix) :]) if folder.name.startswith(prefix) else None
        if match is None or not folder.is_dir() or folder.is_symlink():
            continue
        if match["pid"] is None:
            logger.warning(
                "%s was left by an interrupted conversion to %s of an older scrnalf, which did not record its "
                "process; delete it yourself (rm -r) if no conversion to %s is running.",
                folder, output_dir, output_dir,
            )
            continue
        pid = int(match["pid"])
        if writer_is_running(folder, pid):
            continue
        if match["kind"] == "replaced" and not output_dir.exists() and _is_converted_dataset(folder):
            os.rename(folder, output_dir)
            logger.warning(
                "restored %s from %s, where a conversion (process %d, gone) moved it aside before it was killed.",
                output_dir, folder.name, pid,
            )
            continue
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        shutil.rmtree(folder, ignore_errors=True)
        if folder.exists():
            logger.warning("could not remove %s, left by an interrupted conversion; delete it yourself.", folder)
            continue
        removed.append(folder)
        logger.warning(
            "removed %s (%s) in %s, left by a conversion to %s that was interrupted (its process %d is gone).",
            folder.name, tqdm.format_sizeof(size, "B", 1000), folder.parent, output_dir.name, pid,
        )
    return removed


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # from <linux/fs.h>


def _exchange(first: Path, second: Path) -> bool:
    """Swaps two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where
    the system or the file system cannot, and nothing was changed."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # old kernel, or a file system without it
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def _move_into_place(staging: Path, output_dir: Path) -> None:
    """Moves the finished folder to ``output_dir``; a previous dataset there is removed afterwards.

    Swapping the two in one step means a kill at any moment leaves a complete dataset at
    ``output_dir``, old or new. Where no swap exists, two renames leave a short gap, which
    :func:`remove_interrupted_leftovers` closes by putting the old dataset back.
    """
    if not output_dir.exists():
        os.rename(staging, output_dir)
    elif _exchange(staging, output_dir):
        shutil.rmtree(staging)  # now the previous dataset
    else:
        retired = _sibling(output_dir, "replaced")
        os.rename(output_dir, retired)
        os.rename(staging, output_dir)
        shutil.rmtree(retired)


def _stream_cells(
    path: str, row_ranges: list[tuple[int, int]], source_arguments: dict, plan: _ConversionPlan
) -> Iterator[dict]:
    with open_anndata(path, **source_arguments) as source:
        gene_seen = np.zeros(source.n_genes, dtype=bool)
        for start, stop in row_ranges:
            for table in _chunk_tables(source, plan, start, stop, gene_seen):
                yield from table.to_pylist()


def stream_anndata(
    path: str | Path,
    label_key: str | None = None,
    obs_keys: Sequence[str] = (),
    species: str | None = None,
    species_key: str | None = None,
    batch_key: str | None = None,
    layer: str | None = None,
    use_raw: bool = False,
    require_counts: bool = True,
    gene_id_key: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    n_shards: int = 8,
) -> datasets.IterableDataset:
    """Streams a ``.h5ad`` file as a ``datasets.IterableDataset`` without converting it first.

    Rows have the same columns as :func:`convert_anndata`'s; the gene list is the file's own
    (``open_anndata(path).gene_symbols``). The file is split into ``n_shards`` row ranges so
    that ``DataLoader`` workers (or ``IterableDataset.shard``) read disjoint cells. Values are
    checked chunk by chunk as they are read; genes that are zero everywhere cannot be detected
    without a full pass and are not reported.
    """
    source_arguments = {
        "layer": layer,
        "use_raw": use_raw,
        "require_counts": require_counts,
        "gene_id_key": gene_id_key,
    }
    with open_anndata(Path(path), **source_arguments) as source:
        plan = _plan_conversion(
            source, label_key, obs_keys, species, species_key, batch_key, require_counts, chunk_size
        )
        bounds = _shard_bounds(source.n_cells, -(-source.n_cells // n_shards), 1)
    return datasets.IterableDataset.from_generator(
        _stream_cells,
        features=plan.features,
        gen_kwargs={"path": str(path), "row_ranges": bounds, "source_arguments": source_arguments, "plan": plan},
    )
