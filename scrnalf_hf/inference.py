"""A trained model's outputs written back into AnnData: ``scrnalf predict`` and ``scrnalf embed``.

Follows the scanpy convention: functions take an AnnData, write under documented keys and
return ``None``:

- :func:`embed` → ``obsm["X_scrnalf"]`` (n_cells, d_model) cell embeddings;
- :func:`predict` → whatever the model's task writes (cell classification:
  ``obs["scrnalf_label"]``, ``obs["scrnalf_confidence"]``, ``obsm["scrnalf_probabilities"]``;
  see :mod:`scrnalf_hf.training.tasks`), plus the embeddings;
- both record the run in ``uns["scrnalf"]``: the model, its task, which AnnData matrix was read,
  and the gene overlap (panel genes matched, by id or symbol, and the first missing ones).

Cells go through the model's own processor in chunks of ``batch_size``, so memory is bounded by
a chunk, not the dataset.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from .configuration_scrnalf import ScrnaLongformerConfig
from .modeling_scrnalf import ScrnaLongformerModel, ScrnaLongformerPreTrainedModel
from .processing_scrnalf import ScrnaLongformerProcessor
from .training.tasks import EMBEDDING_KEY, Task, task_for_model

logger = logging.getLogger(__name__)

RUN_KEY = "scrnalf"


def load_model(model_name_or_path: str, *, head: bool = True) -> tuple[ScrnaLongformerPreTrainedModel, ScrnaLongformerProcessor]:
    """A saved model (folder or Hub repo id) and its processor: with ``head``, as the class of its
    task (config ``architectures``), else the bare encoder (any checkpoint embeds cells)."""
    from .hub.folder import model_source_errors

    with model_source_errors(model_name_or_path):
        config = ScrnaLongformerConfig.from_pretrained(model_name_or_path)
        task = task_for_model(config)
        model_class = task.model_class if head and task is not None else ScrnaLongformerModel
        model = model_class.from_pretrained(model_name_or_path, config=config)
        processor = ScrnaLongformerProcessor.from_pretrained(model_name_or_path)
    return model, processor


def _overlap_record(processor: ScrnaLongformerProcessor, adata, layer, use_raw) -> dict:
    """Which panel genes the AnnData measures (also checks the overlap against the processor's thresholds)."""
    matrix, names, ids, where = processor.read_anndata_matrix(adata, layer, use_raw)
    alignment = processor.align_genes(names, ids)
    return {
        "matrix": where,
        "panel_genes": alignment.n_vocab,
        "matched_genes": alignment.n_matched,
        "matched_fraction": round(alignment.fraction, 4),
        "matched_by": alignment.matched_by,
        "missing_genes": alignment.missing[:50],
    }


@torch.no_grad()
def _run(model: ScrnaLongformerPreTrainedModel, processor: ScrnaLongformerProcessor, adata, layer, use_raw, batch_size: int):
    """Yield model outputs chunk by chunk; the processor aligns each chunk to the panel."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of cells, got {batch_size}.")
    model.eval()
    for first in range(0, adata.n_obs, batch_size):
        features = processor(adata[first : first + batch_size], layer=layer, use_raw=use_raw, return_tensors="pt")
        yield model(expression=features["expression"], attention_mask=features["attention_mask"])


def _record(adata, model, task: Task | None, overlap: dict) -> None:
    record = dict(adata.uns.get(RUN_KEY, {}))
    record.update(
        {
            "model": str(getattr(model, "name_or_path", "")) or type(model).__name__,
            "task": None if task is None else task.name,
            "gene_overlap": overlap,
        }
    )
    adata.uns[RUN_KEY] = record


def embed(
    adata, model: ScrnaLongformerPreTrainedModel, processor: ScrnaLongformerProcessor,
    *, layer: str | None = None, use_raw: bool | None = None, batch_size: int = 256,
) -> None:
    """Write cell embeddings (n_cells, d_model) to ``adata.obsm["X_scrnalf"]`` and the run to
    ``adata.uns["scrnalf"]``. Any head's checkpoint embeds (its encoder's cell embedding)."""
    overlap = _overlap_record(processor, adata, layer, use_raw)
    chunks = [output.cell_embedding.float().numpy() for output in _run(model, processor, adata, layer, use_raw, batch_size)]
    adata.obsm[EMBEDDING_KEY] = np.concatenate(chunks) if chunks else np.zeros((0, model.config.d_model), np.float32)
    _record(adata, model, task_for_model(model), overlap)


def predict(
    adata, model: ScrnaLongformerPreTrainedModel, processor: ScrnaLongformerProcessor,
    *, layer: str | None = None, use_raw: bool | None = None, batch_size: int = 256,
) -> None:
    """Write the model's predictions into ``adata`` as its task declares (module docstring), the
    cell embeddings into ``obsm["X_scrnalf"]`` and the run into ``uns["scrnalf"]``.

    Raises:
        ValueError: the model has no prediction head (a pretrained masked-gene model or the bare
            encoder): it embeds cells, or is fine-tuned first.
    """
    task = task_for_model(model)
    if task is None or not task.predicts:
        kind = "the bare encoder" if task is None else f"a {task.summary} model"
        raise ValueError(
            f"{getattr(model, 'name_or_path', '') or 'this model'} is {kind}: it has no head that predicts "
            "anything to write into the AnnData. Use `scrnalf embed` for cell embeddings, or fine-tune it first "
            "(scrnalf finetune --model ... --label-key ...)."
        )
    overlap = _overlap_record(processor, adata, layer, use_raw)
    kept: dict[str, list[np.ndarray]] = {}
    embeddings = []
    for output in _run(model, processor, adata, layer, use_raw, batch_size):
        for name, values in task.predictions(output.logits.float().numpy()).items():
            kept.setdefault(name, []).append(values)
        embeddings.append(output.cell_embedding.float().numpy())
    task.write_predictions(adata, {name: np.concatenate(parts) for name, parts in kept.items()}, model.config)
    adata.obsm[EMBEDDING_KEY] = np.concatenate(embeddings)
    _record(adata, model, task, overlap)


def _process_file(model_name_or_path: str, input_path: str, output_path: str, head: bool, **kwargs) -> None:
    from .data.anndata_io import read_anndata

    if Path(output_path).resolve() == Path(input_path).resolve():
        raise ValueError(f"--output must differ from --input ({input_path}); the input file is left unchanged.")
    model, processor = load_model(model_name_or_path, head=head)
    adata = read_anndata(input_path)
    (predict if head else embed)(adata, model, processor, **kwargs)
    adata.write_h5ad(output_path)
    logger.warning("wrote %s (%d cells)", output_path, adata.n_obs)


def predict_file(model_name_or_path: str, input_path: str, output_path: str, **kwargs) -> None:
    """``scrnalf predict``: read ``input_path``, write it with predictions to ``output_path``."""
    _process_file(model_name_or_path, input_path, output_path, head=True, **kwargs)


def embed_file(model_name_or_path: str, input_path: str, output_path: str, **kwargs) -> None:
    """``scrnalf embed``: read ``input_path``, write it with embeddings to ``output_path``."""
    _process_file(model_name_or_path, input_path, output_path, head=False, **kwargs)


__all__ = ["embed", "embed_file", "load_model", "predict", "predict_file"]
