"""Cell-type prediction as a transformers ``pipeline``: AnnData or a cells × genes matrix in, one
label and its probability per cell out.

This file is copied next to saved weights as remote code (``custom_pipelines`` in config.json),
so that ``pipeline(model="org/scrna-longformer-tiny", trust_remote_code=True)`` works where
``scrnalf_hf`` is not installed. It therefore imports only torch, numpy and transformers; the
model and its processor (a feature extractor) are loaded by ``pipeline()`` itself.
"""

import numpy as np
import torch
from transformers import Pipeline

TASK = "cell-type-classification"


class CellTypeClassificationPipeline(Pipeline):
    """Predict each cell's type with a ``ScrnaLongformerForCellClassification`` and its processor.

    Call it with an AnnData (genes aligned by the processor: Ensembl id or symbol, missing genes
    zero-filled) or a (n_cells, n_genes) matrix with ``gene_names=``. Returns one result per
    cell: ``{"label": str, "score": float}``, or with ``top_k=k`` a list of the ``k`` most probable
    ``{"label", "score"}`` per cell.

    Args (call time):
        gene_names: gene names of a matrix input's columns.
        layer / use_raw: where to read an AnnData's values (processor defaults otherwise).
        species: the cells' species, for a model of several species (e.g. ``"mouse"``).
        top_k: number of labels per cell; ``None`` returns only the best one as a dict.
        cell_batch_size: cells per forward pass (bounds memory on large inputs).
    """

    _load_feature_extractor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_processor = False

    def _sanitize_parameters(
        self, gene_names=None, layer=None, use_raw=None, top_k=None, cell_batch_size=None, species=None
    ):
        preprocess = {
            key: value
            for key, value in (("gene_names", gene_names), ("layer", layer), ("use_raw", use_raw), ("species", species))
            if value is not None
        }
        forward = {} if cell_batch_size is None else {"cell_batch_size": int(cell_batch_size)}
        postprocess = {}
        if top_k is not None:
            if int(top_k) < 1:
                raise ValueError(f"top_k must be >= 1, got {top_k}.")
            postprocess["top_k"] = int(top_k)
        return preprocess, forward, postprocess

    def preprocess(self, cells, **processor_kwargs):
        if self.feature_extractor is None:
            raise ValueError("this pipeline needs the model's processor (preprocessor_config.json) to align genes.")
        return self.feature_extractor(cells, return_tensors="pt", **processor_kwargs)

    def _forward(self, model_inputs, cell_batch_size: int = 512):
        n_cells = model_inputs["expression"].shape[0]
        logits = []
        for start in range(0, n_cells, cell_batch_size):
            batch = {name: tensor[start : start + cell_batch_size] for name, tensor in model_inputs.items()}
            logits.append(self.model(**batch).logits)
        return {"logits": torch.cat(logits) if logits else torch.empty(0, self.model.config.num_labels)}

    def postprocess(self, model_outputs, top_k: int | None = None):
        probabilities = torch.softmax(model_outputs["logits"].float(), dim=-1).numpy()  # (cells, labels)
        id2label = self.model.config.id2label
        order = np.argsort(-probabilities, axis=1)[:, : top_k or 1]
        results = [
            [{"label": id2label[int(i)], "score": float(row[i])} for i in top_ids]
            for row, top_ids in zip(probabilities, order, strict=True)
        ]
        return results if top_k is not None else [cell[0] for cell in results]
