"""A trained model's outputs written back into AnnData: ``scrnalf predict`` and ``scrnalf embed``.

Follows the scanpy convention: functions take an AnnData, write under documented keys and
return ``None``:

- :func:`embed` → ``obsm["X_scrnalf"]`` (n_cells, d_model) cell embeddings;
- :func:`predict` → whatever the model's task writes (cell classification:
  ``obs["scrnalf_label"]``, ``obs["scrnalf_confidence"]``, ``obsm["scrnalf_probabilities"]``;
  see :mod:`scrnalf_hf.training.tasks`), plus the embeddings;
- both record the run in ``uns["scrnalf"]``: the model, its task, which AnnData matrix was read,
  and the gene overlap (panel genes matched, by id or symbol, and the first missing ones).

Cells go through the model's own processor in chunks of ``batch_size``. :func:`predict_file` /
:func:`embed_file` (the commands) stream a ``.h5ad`` file: cells are read chunk by chunk from
disk, the results are written chunk by chunk into a copy of the file beside the output, and the
copy is renamed into place only when complete, so memory stays bounded by a chunk (plus
``obs``) however many cells the file holds, and an interrupted run leaves any earlier output as
it was. The copy, ``.NAME.incomplete-PID-XXXXXXXX``, carries the writing process's id; the next
run to the same output removes those whose process is gone (:mod:`scrnalf_hf.staging`).

:func:`predict_soma` / :func:`embed_soma` (the commands with ``--soma-uri``) read the cells of a
SOMA experiment instead, on one process or several (torchrun / ``accelerate launch``): each process
reads its own block of cells chunk by chunk and writes a shard into a staging folder beside the
output; rank 0 merges the shards into one ``.h5ad`` and renames it into place.

A ``.h5mu`` (MuData) input is read whole: its RNA modality ``rna`` is annotated and written as
the output ``.h5ad``. A classifier with an ``atac`` modality also reads the file's ``atac``
modality when it has one (cells matched by id, peaks matched to the model's panel by name; panel
peaks the file lacks are unmeasured); without it the model reads RNA only.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import torch

from .configuration_scrnalf import ScrnaLongformerConfig
from .data.cells import numeric_column
from .modeling_scrnalf import ScrnaLongformerModel, ScrnaLongformerPreTrainedModel
from .processing_scrnalf import GeneAlignment, ScrnaLongformerProcessor
from .staging import record_writer, remove_dead_staging, staging_path
from .training.tasks import EMBEDDING_KEY, Task, task_for_model

logger = logging.getLogger(__name__)

RUN_KEY = "scrnalf"


def load_model(
    model_name_or_path: str, *, head: bool = True, revision: str | None = None
) -> tuple[ScrnaLongformerPreTrainedModel, ScrnaLongformerProcessor]:
    """A saved model (folder or Hub repo id, at ``revision``: pin the commit ``scrnalf push``
    printed) and its processor: with ``head``, as the class of its task (config
    ``architectures``), else the bare encoder (any checkpoint embeds cells)."""
    from .hub.folder import model_source_errors

    if revision is not None and Path(model_name_or_path).exists():
        raise ValueError(
            f"--revision {revision} pins a commit of a Hub repo, but {model_name_or_path} is a local folder, which has no "
            "revisions; drop --revision, or give the repo id."
        )
    with model_source_errors(model_name_or_path):
        config = ScrnaLongformerConfig.from_pretrained(model_name_or_path, revision=revision)
        task = task_for_model(config)
        model_class = task.model_class if head and task is not None else ScrnaLongformerModel
        model = model_class.from_pretrained(model_name_or_path, config=config, revision=revision)
        processor = ScrnaLongformerProcessor.from_pretrained(model_name_or_path, revision=revision)
    if processor.n_genes != config.n_genes:
        raise ValueError(
            f"{model_name_or_path}: its processor's gene panel has {processor.n_genes} genes but the model was built for "
            f"{config.n_genes}; the processor and the model must be saved from the same run."
        )
    return model, processor


def _predicting_task(model: ScrnaLongformerPreTrainedModel) -> Task:
    """The model's task, which must predict something to write into an AnnData."""
    task = task_for_model(model)
    if task is None or not task.predicts:
        kind = "the bare encoder" if task is None else f"a {task.summary} model"
        raise ValueError(
            f"{getattr(model, 'name_or_path', '') or 'this model'} is {kind}: it has no head that predicts "
            "anything to write into the AnnData. Use `scrnalf embed` for cell embeddings, or fine-tune it first "
            "(scrnalf finetune --model ... --label-key ...)."
        )
    return task


def _overlap(
    processor: ScrnaLongformerProcessor, gene_names, gene_ids, where: str, species: str | None = None
) -> tuple[dict, GeneAlignment]:
    """Which panel genes the input measures (checked against the processor's thresholds).

    ``"report"`` is the line the run logs once the first chunk has gone through the model, so that
    input refused on its values ends in the error alone. The alignment is reused by every chunk.
    """
    alignment = processor.align_genes(gene_names, gene_ids, species=species)
    record = {"species": alignment.species} if alignment.species is not None else {}
    if alignment.n_shared is not None:
        record["matched_in_shared_ortholog_groups"] = alignment.n_shared
        record["matched_by_symbol_where_ids_missed"] = alignment.n_by_symbol
    return alignment, {
        **record,
        "report": f"reading {where}: {alignment}",
        "matrix": where,
        "panel_genes": alignment.n_vocab,
        "matched_genes": alignment.n_matched,
        "matched_fraction": round(alignment.fraction, 4),
        "matched_by": alignment.matched_by,
        "missing_genes": alignment.missing[:50],
    }


def _time_points(model: ScrnaLongformerPreTrainedModel, obs: pd.DataFrame, key: str | None) -> np.ndarray | None:
    """(n_cells,) float32 sampled time of each cell (``obs[key]``) for a model that conditions on
    it, None for any other; a key given to the wrong model, or missing for the right one, is
    refused before anything is written."""
    conditioned = getattr(model, "time_encoder", None) is not None
    if conditioned and key is None:
        raise ValueError(
            "this trajectory model conditions on each cell's sampled time: give --time-point-key, the numeric obs "
            "column it was trained with."
        )
    if key is None:
        return None
    if not conditioned:
        raise ValueError("--time-point-key is read only by a trajectory model trained with one (--time-point-key on finetune); this model ignores time points.")
    if key not in obs.columns:
        raise ValueError(f"--time-point-key {key!r} is not an obs column of the input; obs columns: {list(obs.columns)[:20]}.")
    return numeric_column(obs[key].to_numpy(), key, "--time-point-key", "time point", "the sampled time of each cell")


@torch.no_grad()
def _annotated_chunks(
    model: ScrnaLongformerPreTrainedModel,
    processor: ScrnaLongformerProcessor,
    task: Task | None,
    chunks: Iterator[tuple[int, object]],
    obs: pd.DataFrame,
    gene_names: list[str],
    gene_ids: list[str] | None,
    where: str,
    overlap_report: str,
    species: str | None,
    alignment: GeneAlignment,
    time_points: np.ndarray | None = None,
    peaks=None,
    proteins=None,
) -> Iterator[tuple[int, ad.AnnData]]:
    """For each ``(first row, cells × genes matrix, library sizes or None)`` chunk, an AnnData of
    those cells (no X) holding what the run writes: the task's predictions (``task`` None: none)
    and the embeddings. Library sizes (n,) are given where the matrix holds only some of each
    cell's genes, else the processor sums the rows. ``time_points``: (n_cells,) of a
    time-conditioned trajectory model; ``peaks``: the cells'
    :class:`~scrnalf_hf.data.atac.Peaks` (rows in ``obs`` order) for a multiome classifier;
    ``proteins``: the cells' :class:`~scrnalf_hf.data.multimodal.Proteins` (rows in ``obs`` order)
    for a classifier of RNA + protein."""
    model.eval()
    for first, matrix, library_size in chunks:
        features = processor(
            matrix, gene_names=gene_names, gene_ids=gene_ids, return_tensors="pt", matrix_name=where, species=species,
            alignment=alignment, library_size=library_size,
        )
        if time_points is not None:
            features["time_points"] = torch.from_numpy(time_points[first : first + matrix.shape[0]])
        if peaks is not None:
            chunk_peaks = processor.peaks(peaks.accessibility[first : first + matrix.shape[0]], peaks.names, peaks.source)
            features.update({name: torch.from_numpy(values) for name, values in chunk_peaks.items()})
        if proteins is not None:
            chunk_proteins = processor.proteins(proteins.counts[first : first + matrix.shape[0]], proteins.names, proteins.source)
            features.update({name: torch.as_tensor(values) for name, values in chunk_proteins.items()})
        output = model(**features)
        cells = ad.AnnData(obs=obs.iloc[first : first + matrix.shape[0]].copy())
        if task is not None:
            task.write_predictions(cells, task.predictions(output.logits.float().numpy()), model.config)
        cells.obsm[EMBEDDING_KEY] = output.cell_embedding.float().numpy()
        if first == 0:
            logger.info(overlap_report)
        yield first, cells


def _written_columns(cells: ad.AnnData) -> list[str]:
    """The obs columns a run wrote: tasks name theirs ``scrnalf_*``."""
    return [column for column in cells.obs.columns if column.startswith("scrnalf_")]


def _run_record(model, overlap: dict) -> dict:
    """What ``uns["scrnalf"]`` records of a run: the model, the task its checkpoint was trained
    for (also when only its encoder embedded the cells) and the gene overlap."""
    task = task_for_model(model.config)
    return {
        "model": str(getattr(model, "name_or_path", "")) or type(model).__name__,
        "task": None if task is None else task.name,
        "gene_overlap": overlap,
    }


def _annotate(
    adata, model, processor, task, layer, use_raw, batch_size: int, species: str | None = None, time_point_key: str | None = None,
    peaks=None, proteins=None,
) -> None:
    """Run ``model`` over an in-memory AnnData (and its cells' ``peaks`` and ``proteins``, if
    any) and write what it produces into it."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of cells, got {batch_size}.")
    time_points = _time_points(model, adata.obs, time_point_key) if task is not None else None
    matrix, names, ids, where = processor.read_anndata_matrix(adata, layer, use_raw)
    alignment, overlap = _overlap(processor, names, ids, where, species)
    chunks = ((first, matrix[first : first + batch_size], None) for first in range(0, adata.n_obs, batch_size))
    parts = [
        cells
        for _, cells in _annotated_chunks(
            model, processor, task, chunks, adata.obs, names, ids, where, overlap.pop("report"), species, alignment, time_points,
            peaks, proteins,
        )
    ]
    if parts:
        written = ad.concat(parts, merge="first", uns_merge="first")
        for column in _written_columns(written):
            adata.obs[column] = written.obs[column].values
        for key, values in written.obsm.items():
            adata.obsm[key] = np.asarray(values)
        adata.uns[RUN_KEY] = {**dict(adata.uns.get(RUN_KEY, {})), **dict(parts[0].uns.get(RUN_KEY, {})), **_run_record(model, overlap)}
    else:
        adata.obsm[EMBEDDING_KEY] = np.zeros((0, model.config.d_model), np.float32)
        adata.uns[RUN_KEY] = _run_record(model, overlap)


def embed(
    adata, model: ScrnaLongformerPreTrainedModel, processor: ScrnaLongformerProcessor,
    *, layer: str | None = None, use_raw: bool | None = None, batch_size: int = 256, species: str | None = None,
) -> None:
    """Write cell embeddings (n_cells, d_model) to ``adata.obsm["X_scrnalf"]`` and the run to
    ``adata.uns["scrnalf"]``. Any head's checkpoint embeds (its encoder's cell embedding).
    ``species``: the cells' species, for a model of several species."""
    _annotate(adata, model, processor, None, layer, use_raw, batch_size, species)


def predict(
    adata, model: ScrnaLongformerPreTrainedModel, processor: ScrnaLongformerProcessor,
    *, layer: str | None = None, use_raw: bool | None = None, batch_size: int = 256, species: str | None = None,
    time_point_key: str | None = None, peaks=None, proteins=None,
) -> None:
    """Write the model's predictions into ``adata`` as its task declares (module docstring), the
    cell embeddings into ``obsm["X_scrnalf"]`` and the run into ``uns["scrnalf"]``.
    ``species``: the cells' species, for a model of several species; ``time_point_key``: the
    numeric ``obs`` column of each cell's sampled time, for a time-conditioned trajectory model;
    ``peaks``: the cells' :class:`~scrnalf_hf.data.atac.Peaks` (rows in ``adata``'s cell order,
    e.g. from :func:`~scrnalf_hf.data.atac.read_atac`), for a classifier with an ``atac`` modality;
    ``proteins``: the cells' :class:`~scrnalf_hf.data.multimodal.Proteins` (same order, e.g. from
    :func:`~scrnalf_hf.data.multimodal.proteins_from_anndata`), for a classifier of RNA + protein.

    Raises:
        ValueError: the model has no prediction head (a pretrained masked-gene model or the bare
            encoder): it embeds cells, or is fine-tuned first.
    """
    _annotate(adata, model, processor, _predicting_task(model), layer, use_raw, batch_size, species, time_point_key, peaks,
              proteins)


# ---------------------------------------------------------------------------------------------
# Files: streamed in chunks, written beside the output and renamed into place
# ---------------------------------------------------------------------------------------------


def _file_matrix_arguments(processor: ScrnaLongformerProcessor, path: Path, layer, use_raw) -> dict:
    """``open_anndata`` arguments selecting the matrix the processor reads in the file at ``path``."""
    from .data.anndata_io import _open_h5ad

    with _open_h5ad(path) as handle:  # a clear error for a file that is not a complete .h5ad
        layers = list(handle["layers"].keys()) if "layers" in handle else []
        has_raw = "raw" in handle and "X" in handle["raw"]
    shape = SimpleNamespace(layers=dict.fromkeys(layers), raw=object() if has_raw else None)
    where = processor.anndata_matrix(shape, layer, use_raw)
    if where == "raw":
        return {"use_raw": True}
    return {"layer": where}


class _FileWriter:
    """Writes chunks of annotations into an open ``.h5ad`` (anndata's on-disk layout): ``obsm``
    arrays slice by slice as they come, ``obs`` columns and ``uns`` once at the end."""

    def __init__(self, handle, n_obs: int):
        self.handle, self.n_obs = handle, n_obs
        self.obs_columns: dict[str, list[np.ndarray]] = {}
        self.categories: dict[str, pd.Index] = {}
        self.uns: dict = {}

    def add(self, first: int, cells: ad.AnnData) -> None:
        for key, values in cells.obsm.items():
            values = np.asarray(values)
            group = self.handle.require_group("obsm")
            if first == 0:
                if key in group:
                    del group[key]
                dataset = group.create_dataset(key, shape=(self.n_obs, *values.shape[1:]), dtype=values.dtype)
                dataset.attrs["encoding-type"], dataset.attrs["encoding-version"] = "array", "0.2.0"
            group[key][first : first + len(values)] = values
        for column in _written_columns(cells):
            values = cells.obs[column]
            if isinstance(values.dtype, pd.CategoricalDtype):
                self.categories.setdefault(column, values.cat.categories)
                values = values.astype(str)
            # A copy, not the Series: a Series of a chunk's obs kept ~3 KB per cell alive (3 GB at 1M cells).
            self.obs_columns.setdefault(column, []).append(values.to_numpy().copy())
        if first == 0:
            self.uns = dict(cells.uns)

    def finish(self, record: dict) -> None:
        from anndata.io import read_elem, write_elem

        obs = read_elem(self.handle["obs"])
        for column, parts in self.obs_columns.items():
            values = np.concatenate(parts)
            obs[column] = pd.Categorical(values, categories=self.categories[column]) if column in self.categories else values
        del self.handle["obs"]
        write_elem(self.handle, "obs", obs)
        uns = self.handle.require_group("uns")
        if RUN_KEY in uns:
            del uns[RUN_KEY]
        write_elem(uns, RUN_KEY, {**dict(self.uns.get(RUN_KEY, {})), **record})


def _reads_proteins(model, task) -> bool:
    """A classifier trained on RNA + protein reads the input's proteins; the protein head predicts
    them from RNA, and the bare encoder (embed) has no fusion."""
    return task is not None and task.name == "classification" and bool(getattr(model.config, "n_proteins", 0))


def _input_proteins(model, task, input_path: Path, protein_key: str | None, mdata=None, rna=None):
    """The input's proteins for a classifier that reads them: ``--protein-key``, else the
    CITE-seq default place (a ``.h5mu`` ``prot`` modality, ``obsm["protein_expression"]``) when
    the input has it; None (RNA alone, logged) when it has none. ``--protein-key`` for any other
    model is an error: it would be ignored."""
    from .data.multimodal import PROTEIN_MODALITY, PROTEIN_OBSM_KEY, proteins_of_mudata, read_proteins

    if not _reads_proteins(model, task):
        if protein_key is not None:
            raise ValueError(f"--protein-key {protein_key}: this model does not read proteins (only a classifier trained "
                             "with --protein-key does); drop --protein-key.")
        return None
    if mdata is not None:
        key = protein_key or PROTEIN_MODALITY
        if protein_key is None and key not in mdata.mod:
            logger.warning("%s has no %r modality: classifying from RNA alone (name the proteins with --protein-key)", input_path, key)
            return None
        return proteins_of_mudata(mdata, rna, input_path, key)
    key = protein_key
    if key is None:
        import h5py

        with h5py.File(input_path, "r") as handle:
            present = "obsm" in handle and PROTEIN_OBSM_KEY in handle["obsm"]
        if not present:
            logger.warning("%s has no obsm[%r]: classifying from RNA alone (name the proteins with --protein-key)",
                           input_path, PROTEIN_OBSM_KEY)
            return None
        key = PROTEIN_OBSM_KEY
    return read_proteins(input_path, key)[1]


def _process_file(
    model_name_or_path: str, input_path, output_path, head: bool, *, layer: str | None = None,
    use_raw: bool | None = None, batch_size: int = 256, overwrite: bool = False, revision: str | None = None,
    species: str | None = None, time_point_key: str | None = None, protein_key: str | None = None,
) -> None:
    import h5py

    from .data.anndata_io import open_anndata
    from .data.multimodal import is_mudata_path

    input_path, output_path = Path(input_path), Path(output_path)
    if batch_size < 1:
        raise ValueError(f"--batch-size must be a positive number of cells, got {batch_size}.")
    if not input_path.is_file():
        raise FileNotFoundError(f"no AnnData file at {input_path}; expected an existing .h5ad file.")
    if output_path.resolve() == input_path.resolve():
        raise ValueError(f"--output must differ from --input ({input_path}); the input file is left unchanged.")
    _check_output(output_path, overwrite)
    remove_dead_staging(output_path.parent, f".{output_path.name}.incomplete", "predict/embed")
    model, processor = load_model(model_name_or_path, head=head, revision=revision)
    task = _predicting_task(model) if head else None
    staging = staging_path(output_path.parent, f".{output_path.name}.incomplete")
    if is_mudata_path(input_path):
        _process_mudata(input_path, output_path, staging, model, processor, task, layer, use_raw, batch_size, species, time_point_key,
                        protein_key)
        return
    proteins = _input_proteins(model, task, input_path, protein_key)
    try:
        with open_anndata(input_path, require_counts=False, **_file_matrix_arguments(processor, input_path, layer, use_raw)) as source:
            where = source.matrix_name
            if source.n_cells == 0 or source.n_genes == 0:
                raise ValueError(
                    f"{input_path} has {source.n_cells} cells × {source.n_genes} genes in {where}: nothing to "
                    f"{'predict' if head else 'embed'}. Check the filters that made it."
                )
            time_points = _time_points(model, source.obs, time_point_key) if head else None
            alignment, overlap = _overlap(processor, source.gene_symbols, source.gene_ids, where, species)
            try:
                shutil.copyfile(input_path, staging)
            except PermissionError as error:
                raise PermissionError(
                    f"cannot write in {output_path.parent} ({error.strerror}); choose an --output folder you can write to."
                ) from error
            with h5py.File(staging, "r+") as handle:
                writer = _FileWriter(handle, source.n_cells)
                chunks = _annotated_chunks(
                    model, processor, task, ((first, chunk, None) for first, chunk in source.row_chunks(batch_size)),
                    source.obs, source.gene_symbols, source.gene_ids, where, overlap.pop("report"), species, alignment,
                    time_points, None, proteins,
                )
                for first, cells in chunks:
                    writer.add(first, cells)
                writer.finish(_run_record(model, overlap))
        os.replace(staging, output_path)
    finally:
        staging.unlink(missing_ok=True)
    logger.info("wrote %s (%d cells)", output_path, source.n_cells)


def _process_mudata(
    input_path: Path, output_path: Path, staging: Path, model, processor, task, layer, use_raw, batch_size: int,
    species: str | None, time_point_key: str | None, protein_key: str | None = None,
) -> None:
    """``predict`` / ``embed`` of a ``.h5mu`` file: its RNA modality, annotated in memory (with its
    ATAC and protein modalities for a model that reads them), written to ``output_path`` (an ``.h5ad``)."""
    from .data.atac import ATAC_MODALITY, peaks_of_mudata
    from .data.multimodal import read_h5mu

    mdata, rna = read_h5mu(input_path)
    peaks = None
    # the bare encoder (embed) has no fusion: it embeds the RNA alone
    if model.config.n_peaks and getattr(model, "fusion", None) is not None and ATAC_MODALITY in mdata.mod:
        peaks = peaks_of_mudata(mdata, rna, input_path, ATAC_MODALITY, sparse=True)
    proteins = _input_proteins(model, task, input_path, protein_key, mdata, rna)
    _annotate(rna, model, processor, task, layer, use_raw, batch_size, species, time_point_key, peaks, proteins)
    try:
        try:
            rna.write_h5ad(staging)
        except PermissionError as error:
            raise PermissionError(
                f"cannot write in {output_path.parent} ({error.strerror}); choose an --output folder you can write to."
            ) from error
        os.replace(staging, output_path)
    finally:
        staging.unlink(missing_ok=True)
    logger.info("wrote %s (%d cells)", output_path, rna.n_obs)


def _check_output(output_path: Path, overwrite: bool) -> None:
    """An existing output is replaced only with ``overwrite``, and only if this tool wrote it."""
    if output_path.is_dir():
        raise IsADirectoryError(f"--output {output_path} is a folder; give the path of the .h5ad file to write.")
    if not output_path.exists():
        above = next((folder for folder in output_path.parents if folder.exists()), None)
        if above is not None and not above.is_dir():
            raise NotADirectoryError(f"--output {output_path} lies under {above}, which is a file; choose another --output.")
        if not output_path.parent.is_dir():
            raise FileNotFoundError(f"the folder of --output {output_path} does not exist.")
        return
    if not overwrite:
        raise FileExistsError(f"{output_path} exists; choose another --output or pass --overwrite to replace it.")
    import h5py

    try:
        with h5py.File(output_path, "r") as handle:
            written_here = "uns" in handle and RUN_KEY in handle["uns"]
    except OSError:
        written_here = False
    if not written_here:
        raise FileExistsError(
            f"{output_path} exists and is not an .h5ad that scrnalf predict/embed wrote; it is left as it is. "
            "Choose another --output."
        )


def predict_file(model_name_or_path: str, input_path, output_path, **kwargs) -> None:
    """``scrnalf predict``: stream ``input_path`` through the model into ``output_path``."""
    _process_file(model_name_or_path, input_path, output_path, head=True, **kwargs)


def embed_file(model_name_or_path: str, input_path, output_path, **kwargs) -> None:
    """``scrnalf embed``: stream ``input_path`` through the model's encoder into ``output_path``."""
    _process_file(model_name_or_path, input_path, output_path, head=False, **kwargs)


# ---------------------------------------------------------------------------------------------
# SOMA experiments: each process its own cells, written as a shard, shards merged into one file
# ---------------------------------------------------------------------------------------------

# Rows copied at a time when the shards are merged (a slice of each obsm array in memory).
MERGE_ROWS = 65536


def launched_rank() -> tuple[int, int]:
    """``(rank, world size)`` as torchrun / ``accelerate launch`` set them (``RANK``, ``WORLD_SIZE``);
    ``(0, 1)`` for a process started on its own."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def rank_cells(n_cells: int, rank: int, world_size: int) -> np.ndarray:
    """The rows (positions into the query's cells) of process ``rank``: contiguous blocks, sizes
    differing by at most one, every cell in exactly one block (none sits out, unlike training)."""
    if world_size > n_cells:
        raise ValueError(
            f"{world_size} processes but only {n_cells} cells to read: every process needs at least one cell; "
            "use fewer processes (--num_processes / --nproc_per_node) or select more cells."
        )
    return np.array_split(np.arange(n_cells), world_size)[rank]


@contextmanager
def _process_group(world_size: int):
    """A gloo process group over the launched processes (their rendezvous is in the environment),
    for the barrier before the merge; nothing for one process."""
    import torch.distributed as dist

    if world_size == 1 or dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def _shared_staging(output_path: Path, rank: int, world_size: int) -> Path:
    """Rank 0 makes the staging folder beside the output; every process learns its name."""
    staging = None
    if rank == 0:
        staging = staging_path(output_path.parent, f".{output_path.name}.incomplete")
        try:
            staging.mkdir()
        except PermissionError as error:
            raise PermissionError(
                f"cannot write in {output_path.parent} ({error.strerror}); choose an --output folder you can write to."
            ) from error
        record_writer(staging)
    if world_size == 1:
        return staging
    import torch.distributed as dist

    shared = [staging]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def _soma_obs(cells, rows: np.ndarray, time_point_key: str | None) -> pd.DataFrame:
    """``obs`` of the cells at ``rows``: named by ``obs_id``, with their ``soma_joinid`` (and the
    time point column a time-conditioned model reads)."""
    obs = pd.DataFrame({"soma_joinid": cells.obs_joinids[rows]}, index=pd.Index(cells.cell_ids()[rows].astype(str)))
    if time_point_key is not None:
        obs[time_point_key] = cells.obs_column(time_point_key)[rows]
    return obs


def _write_shard(path: Path, cells, rows, obs, model, processor, task, alignment, overlap: dict, species, time_points, batch_size):
    """Run the model over the cells at ``rows`` and write them as an ``.h5ad`` (obs, obsm, uns,
    no X) chunk by chunk: memory holds one chunk of cells and their obs."""
    import h5py

    ad.AnnData(obs=obs).write_h5ad(path)

    def chunks():
        for first in range(0, len(rows), batch_size):
            values, library_size = cells.read_rows(rows[first : first + batch_size])  # CSR on the var filter's genes
            yield first, values, library_size

    with h5py.File(path, "r+") as handle:
        writer = _FileWriter(handle, len(rows))
        record = dict(overlap)
        annotated = _annotated_chunks(
            model, processor, task, chunks(), obs, cells.genes.gene_symbols, cells.genes.gene_ids,
            cells.genes.matrix, record.pop("report"), species, alignment, time_points,
        )
        for first, part in annotated:
            writer.add(first, part)
        writer.finish(_run_record(model, record))


def _merge_shards(shards: list[Path], output: Path) -> int:
    """Concatenate the ranks' shards, in rank order (= soma_joinid order), into one ``.h5ad``,
    obsm arrays ``MERGE_ROWS`` rows at a time. Returns the number of cells."""
    import h5py
    from anndata.io import read_elem

    observations = []
    for shard in shards:
        with h5py.File(shard, "r") as handle:
            observations.append(read_elem(handle["obs"]))
            record = read_elem(handle["uns"][RUN_KEY])  # the same run record in every shard
    obs = pd.concat(observations)
    ad.AnnData(obs=obs[[c for c in obs.columns if not c.startswith("scrnalf_")]]).write_h5ad(output)
    with h5py.File(output, "r+") as handle:
        writer = _FileWriter(handle, len(obs))
        offset = 0
        for shard, shard_obs in zip(shards, observations):
            with h5py.File(shard, "r") as source:
                keys = list(source["obsm"].keys()) if "obsm" in source else []
                for start in range(0, len(shard_obs), MERGE_ROWS):
                    part = ad.AnnData(obs=shard_obs.iloc[start : start + MERGE_ROWS])
                    for key in keys:
                        part.obsm[key] = source["obsm"][key][start : start + MERGE_ROWS]
                    writer.add(offset + start, part)
            offset += len(shard_obs)
        writer.finish({**record, "processes": len(shards)})
    return len(obs)


def _process_soma(
    model_name_or_path: str, uri, output_path, head: bool, *, measurement: str = "RNA", soma_layer: str | None = None,
    obs_filter: str | None = None, var_filter: str | None = None, batch_size: int = 256, overwrite: bool = False,
    revision: str | None = None, species: str | None = None, time_point_key: str | None = None,
) -> None:
    from .data.soma import open_soma

    output_path = Path(output_path)
    rank, world_size = launched_rank()
    if batch_size < 1:
        raise ValueError(f"--batch-size must be a positive number of cells, got {batch_size}.")
    if rank == 0:
        _check_output(output_path, overwrite)
        remove_dead_staging(output_path.parent, f".{output_path.name}.incomplete", "predict/embed")
    cells = open_soma(uri, measurement=measurement, layer=soma_layer, obs_filter=obs_filter, var_filter=var_filter)
    rows = rank_cells(cells.n_cells, rank, world_size)
    model, processor = load_model(model_name_or_path, head=head, revision=revision)
    task = _predicting_task(model) if head else None
    obs = _soma_obs(cells, rows, time_point_key if head else None)
    time_points = _time_points(model, obs, time_point_key) if head else None
    alignment, overlap = _overlap(processor, cells.genes.gene_symbols, cells.genes.gene_ids, cells.genes.matrix, species)
    with _process_group(world_size):
        staging = _shared_staging(output_path, rank, world_size)
        try:
            _write_shard(staging / f"rank{rank:05d}.h5ad", cells, rows, obs, model, processor, task, alignment, overlap,
                         species, time_points, batch_size)
            if world_size > 1:
                import torch.distributed as dist

                dist.barrier()  # every shard complete
            if rank == 0:
                shards = [staging / f"rank{r:05d}.h5ad" for r in range(world_size)]
                n_cells = _merge_shards(shards, staging / output_path.name)
                os.replace(staging / output_path.name, output_path)
                logger.info("wrote %s (%d cells; processes: %d)", output_path, n_cells, world_size)
        finally:
            if rank == 0:
                shutil.rmtree(staging, ignore_errors=True)


def predict_soma(model_name_or_path: str, uri, output_path, **kwargs) -> None:
    """``scrnalf predict --soma-uri``: the cells of a SOMA experiment (query: ``measurement``,
    ``soma_layer``, ``obs_filter``, ``var_filter`` as :func:`~scrnalf_hf.data.soma.open_soma`)
    through the model into the ``.h5ad`` ``output_path`` (obs named by ``obs_id``, with
    ``soma_joinid``; no X), in ``soma_joinid`` order.

    Under torchrun / ``accelerate launch`` each process takes its own contiguous block of cells,
    reads it chunk by chunk and writes it as a shard; rank 0 merges the shards once all are done
    and renames the result into place, so an interrupted run leaves no partial output.
    """
    _process_soma(model_name_or_path, uri, output_path, head=True, **kwargs)


def embed_soma(model_name_or_path: str, uri, output_path, **kwargs) -> None:
    """``scrnalf embed --soma-uri``: as :func:`predict_soma`, cell embeddings only
    (``obsm["X_scrnalf"]``, (n_cells, d_model))."""
    _process_soma(model_name_or_path, uri, output_path, head=False, **kwargs)


__all__ = ["embed", "embed_file", "embed_soma", "load_model", "predict", "predict_file", "predict_soma"]
