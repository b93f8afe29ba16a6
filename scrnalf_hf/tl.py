"""scanpy-style tools: ``scrnalf_hf.tl.embed / predict / pseudotime / grn / explain / perturb``.

Like ``sc.tl`` functions, each takes an AnnData and a model, writes its results into the AnnData
under documented keys and returns None (a changed copy with ``copy=True``). ``model`` is a model
folder or Hub repo id (loaded with its processor) or a loaded model, then with ``processor=``
(or the processor saved beside it, found through ``model.name_or_path``). The cells are read
where the model was trained (``layer`` / ``use_raw`` override it) and aligned to the model's
gene panel by id or symbol, as everywhere in the package.

Keys written:

====================  =====================================================================
``embed``             ``obsm["X_scrnalf"]`` (n_cells, d_model); the run in ``uns["scrnalf"]``
``predict``           what the model's task writes (``obs["scrnalf_label"]``, ...) and the above
``pseudotime``        ``obs["scrnalf_pseudotime"]`` (a trajectory model) and the above
``grn``               ``uns["scrnalf_grn"]``: ``edges`` (source, target, score, rank[, group]) and
                      the settings
``explain``           ``obsm["scrnalf_importance"]`` (n_cells, G) attributions in the panel order
                      of ``uns["scrnalf_importance"]["genes"]``, each cell for its own class;
                      ``uns["scrnalf_importance"]["top_genes"]`` (class, gene, score, rank)
``perturb``           ``obs["scrnalf_perturbation_shift"]`` (cosine distance the perturbation
                      moved each cell's embedding; NaN outside the perturbed group) and
                      ``uns["scrnalf_perturbation"]``: ``gene_shift`` per panel gene and settings
====================  =====================================================================
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .inference import embed as _embed
from .inference import load_model
from .inference import predict as _predict
from .modeling_scrnalf import ScrnaLongformerPreTrainedModel
from .processing_scrnalf import ScrnaLongformerProcessor
from .training.tasks import task_for_model

ModelLike = str | os.PathLike | ScrnaLongformerPreTrainedModel

GRN_KEY = "scrnalf_grn"
IMPORTANCE_KEY = "scrnalf_importance"
PERTURBATION_KEY = "scrnalf_perturbation"


def resolve_model(
    model: ModelLike, processor: ScrnaLongformerProcessor | None = None, *, head: bool = True
) -> tuple[ScrnaLongformerPreTrainedModel, ScrnaLongformerProcessor]:
    """A model and its processor from a folder / repo id, or a loaded model (and its processor)."""
    if isinstance(model, (str, os.PathLike)):
        return load_model(str(model), head=head)
    if not isinstance(model, ScrnaLongformerPreTrainedModel):
        raise TypeError(f"model must be a model folder, a Hub repo id or a loaded scrnalf model, got {type(model).__name__}.")
    if processor is None:
        source = getattr(model, "name_or_path", "")
        if not source:
            raise ValueError("this model was not loaded from a folder; pass its processor (processor=...).")
        processor = ScrnaLongformerProcessor.from_pretrained(source)
    return model, processor


def _target(adata, copy: bool):
    return adata.copy() if copy else adata


def embed(adata, model: ModelLike, *, processor=None, species: str | None = None, layer: str | None = None,
          use_raw: bool | None = None, batch_size: int = 256, copy: bool = False):
    """Cell embeddings (n_cells, d_model) into ``obsm["X_scrnalf"]`` (any checkpoint: its encoder)."""
    adata = _target(adata, copy)
    model, processor = resolve_model(model, processor, head=False)
    _embed(adata, model, processor, layer=layer, use_raw=use_raw, batch_size=batch_size, species=species)
    return adata if copy else None


def predict(adata, model: ModelLike, *, processor=None, species: str | None = None, layer: str | None = None,
            use_raw: bool | None = None, batch_size: int = 256, time_point_key: str | None = None, copy: bool = False):
    """The model's predictions as its task writes them (cell types, pseudotime, ...) and the
    embeddings. A model without a predicting head (a pretrained encoder) is refused.
    ``time_point_key``: the ``obs`` column of each cell's sampled time (a time-conditioned trajectory model)."""
    adata = _target(adata, copy)
    model, processor = resolve_model(model, processor)
    _predict(adata, model, processor, layer=layer, use_raw=use_raw, batch_size=batch_size, species=species,
             time_point_key=time_point_key)
    return adata if copy else None


def require_task(model: ScrnaLongformerPreTrainedModel, names: Sequence[str], what: str, fix: str) -> str:
    """The model's task name, which must be one of ``names``; otherwise a one-line ValueError."""
    task = task_for_model(model)
    name = None if task is None else task.name
    if name not in names:
        kind = "the bare encoder" if task is None else f"a {task.summary} model"
        raise ValueError(f"{what} needs a {' or '.join(names)} head, but this model is {kind}; {fix}")
    return name


def pseudotime(adata, model: ModelLike, *, processor=None, species: str | None = None, layer: str | None = None,
               use_raw: bool | None = None, batch_size: int = 256, time_point_key: str | None = None, copy: bool = False):
    """Each cell's predicted pseudotime into ``obs["scrnalf_pseudotime"]`` (a trajectory model;
    one trained with ``--time-point-key`` also reads ``obs[time_point_key]``, each cell's sampled time)."""
    adata = _target(adata, copy)
    model, processor = resolve_model(model, processor)
    require_task(model, ["trajectory"], "pseudotime", "fine-tune one with `scrnalf finetune --task trajectory --time-key K`.")
    _predict(adata, model, processor, layer=layer, use_raw=use_raw, batch_size=batch_size, species=species,
             time_point_key=time_point_key)
    return adata if copy else None


def grn(adata, model: ModelLike, *, processor=None, group_by: str | None = None, method: str = "attention",
        layers: str | Sequence[int] = "all", layer: str | None = None, use_raw: bool | None = None,
        batch_size: int = 64, progress: bool = True, key_added: str = GRN_KEY, copy: bool = False):
    """A ranked, directed gene–gene edge list from the model's attention on its kNN gene graph,
    per ``obs[group_by]`` group (see :func:`scrnalf_hf.interpret.attention.attention_edges`),
    into ``uns[key_added]["edges"]``."""
    from .interpret.attention import attention_edges

    adata = _target(adata, copy)
    model, processor = resolve_model(model, processor)
    edges = attention_edges(
        model, processor, adata, group_by=group_by, layers=layers, method=method, batch_size=batch_size,
        layer=layer, use_raw=use_raw, progress=progress,
    )
    settings = {"method": method, "layers": layers if isinstance(layers, str) else np.asarray(layers)}
    if group_by is not None:
        settings["group_by"] = group_by
    adata.uns[key_added] = {"edges": edges.reset_index(drop=True), **settings}
    return adata if copy else None


def _cell_classes(adata, model, processor, label_key: str | None, layer, use_raw, batch_size: int) -> np.ndarray:
    """(n_cells,) the class name each cell is explained for: its label in ``obs[label_key]``, or
    the class the model predicts."""
    if label_key is not None:
        if label_key not in adata.obs:
            raise ValueError(f"label key {label_key!r} is not an obs column; choose one of {list(adata.obs.columns)[:20]}.")
        return adata.obs[label_key].astype(str).to_numpy()
    from .interpret.importance import panel_inputs, predicted_classes

    # the logits' argmax alone: no copy of the AnnData, no embeddings or probabilities written
    predicted = predicted_classes(model, panel_inputs(processor, adata, layer, use_raw), batch_size)
    return np.array([model.config.id2label[int(i)] for i in predicted], dtype=object)


def explain(adata, model: ModelLike, *, processor=None, label_key: str | None = None,
            method: str = "integrated_gradients", n_top: int = 20, n_steps: int = 32, layer: str | None = None,
            use_raw: bool | None = None, batch_size: int = 32, progress: bool = True,
            key_added: str = IMPORTANCE_KEY, copy: bool = False):
    """Gene importance of a cell classifier: each cell's attributions toward its own class
    (its ``obs[label_key]`` label, or the class the model predicts) by integrated gradients
    (captum) or attention rollout, and each class's top ``n_top`` genes by mean attribution
    over its cells."""
    from .interpret.importance import attention_rollout, integrated_gradients

    if method not in ("integrated_gradients", "attention_rollout"):
        raise ValueError(f"method must be integrated_gradients or attention_rollout, got {method!r}.")
    if n_top < 1:
        raise ValueError(f"n_top must be at least 1, got {n_top}.")
    adata = _target(adata, copy)
    model, processor = resolve_model(model, processor)
    require_task(model, ["classification"], "explain", "fine-tune a classifier first (scrnalf finetune --label-key K).")
    classes = _cell_classes(adata, model, processor, label_key, layer, use_raw, batch_size)
    known = set(model.config.id2label.values())
    attributions = np.full((adata.n_obs, processor.n_genes), np.nan, dtype=np.float32)
    rows = []
    for name in sorted(set(classes) & known):
        cells = np.flatnonzero(classes == name)
        if method == "integrated_gradients":
            values = integrated_gradients(
                model, processor, adata[cells], target=name, n_steps=n_steps, batch_size=batch_size,
                layer=layer, use_raw=use_raw, progress=progress,
            )
        else:
            values = attention_rollout(model, processor, adata[cells], batch_size=batch_size, layer=layer, use_raw=use_raw)
        attributions[cells] = values
        rows.append(_top(values.mean(0), processor.gene_symbols, n_top).assign(**{"class": name}))
    if not rows:
        raise ValueError(
            f"none of the cells' classes ({sorted(set(classes))[:10]}) is one the model knows ({sorted(known)[:10]}); "
            "give the label key of the model's classes."
        )
    adata.obsm[key_added] = attributions
    top = pd.concat(rows, ignore_index=True)[["class", "gene", "score", "rank"]]
    adata.uns[key_added] = {"genes": np.asarray(processor.gene_symbols, dtype=object), "method": method, "top_genes": top}
    return adata if copy else None


def _top(scores: np.ndarray, genes: Sequence[str], n: int) -> pd.DataFrame:
    order = np.argsort(-scores, kind="stable")[:n]
    return pd.DataFrame({"gene": np.asarray(genes, dtype=object)[order], "score": scores[order], "rank": np.arange(1, len(order) + 1)})


def perturb(adata, model: ModelLike, genes: Sequence[str] | str, *, processor=None, mode: str = "delete",
            group_by: str | None = None, group: str | None = None, target_label: str | None = None,
            layer: str | None = None, use_raw: bool | None = None, batch_size: int = 64, progress: bool = True,
            key_added: str = PERTURBATION_KEY, copy: bool = False):
    """In-silico perturbation: delete or overexpress ``genes`` in every cell (of ``group`` in
    ``obs[group_by]``) and measure how far each cell's embedding moves, how each other gene
    shifts and, with ``target_label``, the move toward that class
    (:func:`scrnalf_hf.interpret.perturb.perturb`)."""
    from .interpret.perturb import perturb as run_perturbation
    from .interpret.perturb import select_cells

    genes = [genes] if isinstance(genes, str) else list(genes)
    adata = _target(adata, copy)
    model, processor = resolve_model(model, processor)
    result = run_perturbation(
        model, processor, adata, genes, mode=mode, group_by=group_by, group=group, target_label=target_label,
        batch_size=batch_size, layer=layer, use_raw=use_raw, progress=progress,
    )
    shift = np.full(adata.n_obs, np.nan, dtype=np.float32)
    shift[select_cells(adata, None, group_by, group)] = result.embedding_shift
    adata.obs[f"{key_added}_shift"] = shift
    record = {"genes": np.asarray(genes, dtype=object), "mode": mode, "gene_shift": result.to_frame()}
    for name, value in (("group_by", group_by), ("group", group), ("target_label", target_label)):
        if value is not None:
            record[name] = value
    if result.target_shift is not None:
        record["mean_target_shift"] = float(np.mean(result.target_shift))
    adata.uns[key_added] = record
    return adata if copy else None


__all__ = ["embed", "explain", "grn", "perturb", "predict", "pseudotime", "resolve_model"]
