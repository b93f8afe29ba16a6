"""``scrnalf predict`` / ``scrnalf embed``: a trained model's outputs written back into AnnData.

Follows the scanpy convention: functions take an AnnData, write under documented keys and
return ``None``:

- :func:`embed_cells` → ``obsm["X_scrnalf"]`` (n_cells, d_model) cell embeddings.
- :func:`predict_cells` → ``obs["scrnalf_label"]`` (categorical), ``obs["scrnalf_confidence"]``
  (probability of the predicted label) and ``obsm["scrnalf_probabilities"]`` (n_cells,
  num_labels), with the label order in ``uns["scrnalf"]["labels"]``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..modeling_scrnalf import ScrnaLongformerForCellClassification, ScrnaLongformerModel
from ..processing_scrnalf import ScrnaLongformerProcessor

logger = logging.getLogger(__name__)

EMBEDDING_KEY = "X_scrnalf"
LABEL_KEY = "scrnalf_label"
CONFIDENCE_KEY = "scrnalf_confidence"
PROBABILITIES_KEY = "scrnalf_probabilities"


@torch.no_grad()
def _run_model(model, processor: ScrnaLongformerProcessor, adata, layer, use_raw, batch_size: int):
    """Yield model outputs batch by batch; the processor aligns each batch to the panel."""
    model.eval()
    for first in range(0, adata.n_obs, batch_size):
        batch = adata[first : first + batch_size]
        features = processor(batch, layer=layer, use_raw=use_raw, return_tensors="pt")
        yield model(expression=features["expression"], attention_mask=features["attention_mask"])


def embed_cells(
    adata, model: ScrnaLongformerModel | ScrnaLongformerForCellClassification, processor: ScrnaLongformerProcessor,
    *, layer: str | None = None, use_raw: bool | None = None, batch_size: int = 256,
) -> None:
    """Write cell embeddings (n_cells, d_model) to ``adata.obsm["X_scrnalf"]``."""
    embeddings = [output.cell_embedding.float().numpy() for output in _run_model(model, processor, adata, layer, use_raw, batch_size)]
    adata.obsm[EMBEDDING_KEY] = np.concatenate(embeddings)


def predict_cells(
    adata, model: ScrnaLongformerForCellClassification, processor: ScrnaLongformerProcessor,
    *, layer: str | None = None, use_raw: bool | None = None, batch_size: int = 256,
) -> None:
    """Write predicted labels, their confidence and all class probabilities into ``adata``
    (keys in the module docstring); also the embeddings in ``obsm["X_scrnalf"]``."""
    if not isinstance(model, ScrnaLongformerForCellClassification):
        raise TypeError(f"predict needs a cell classifier, got {type(model).__name__}; fine-tune the model first.")
    probabilities, embeddings = [], []
    for output in _run_model(model, processor, adata, layer, use_raw, batch_size):
        probabilities.append(output.logits.float().softmax(-1).numpy())
        embeddings.append(output.cell_embedding.float().numpy())
    probabilities = np.concatenate(probabilities)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    predicted = probabilities.argmax(1)
    adata.obs[LABEL_KEY] = pd.Categorical([labels[i] for i in predicted], categories=labels)
    adata.obs[CONFIDENCE_KEY] = probabilities.max(1)
    adata.obsm[PROBABILITIES_KEY] = probabilities
    adata.obsm[EMBEDDING_KEY] = np.concatenate(embeddings)
    adata.uns["scrnalf"] = {"labels": labels}


def load_model_and_processor(model_name_or_path: str, classifier: bool):
    """A saved model (folder or Hub repo id) and its processor."""
    model_class = ScrnaLongformerForCellClassification if classifier else ScrnaLongformerModel
    model = model_class.from_pretrained(model_name_or_path)
    processor = ScrnaLongformerProcessor.from_pretrained(model_name_or_path)
    return model, processor


def _process_file(model_name_or_path: str, input_path: str, output_path: str, classifier: bool, **kwargs) -> None:
    import anndata as ad

    if Path(output_path).resolve() == Path(input_path).resolve():
        raise ValueError(f"--output must differ from --input ({input_path}); the input file is left unchanged.")
    model, processor = load_model_and_processor(model_name_or_path, classifier)
    adata = ad.read_h5ad(input_path)
    (predict_cells if classifier else embed_cells)(adata, model, processor, **kwargs)
    adata.write_h5ad(output_path)
    logger.warning("wrote %s (%d cells)", output_path, adata.n_obs)


def predict_file(model_name_or_path: str, input_path: str, output_path: str, **kwargs) -> None:
    """``scrnalf predict``: read ``input_path``, write it with predictions to ``output_path``."""
    _process_file(model_name_or_path, input_path, output_path, classifier=True, **kwargs)


def embed_file(model_name_or_path: str, input_path: str, output_path: str, **kwargs) -> None:
    """``scrnalf embed``: read ``input_path``, write it with embeddings to ``output_path``."""
    _process_file(model_name_or_path, input_path, output_path, classifier=False, **kwargs)
