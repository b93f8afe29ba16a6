"""Which genes a trained model's output rests on, per cell: gene importance.

- :func:`integrated_gradients`: attributions of one output (a class's logit, or a single-output
  head's value) to every input gene's normalised expression, by captum's ``IntegratedGradients``
  (Sundararajan et al. 2017) from an "unexpressed" baseline. Per cell they sum to the output's
  change from the baseline (completeness).
- :func:`attention_rollout`: attention rollout (Abnar & Zuidema 2020) of the cell summary (the
  CLS token, or the mean of the measured genes for ``pooling="mean"``) back through the layers
  to the input gene tokens, propagated as one row vector through each layer's sparse kNN
  attention: O(G·k) per layer, never a G×G matrix.
- :func:`top_genes`: a class's top genes, the mean attribution over the cells of that class.
- :func:`plot_importance`: bar plots of such tables.

Every function reads cells the way ``scrnalf predict`` does (the model's own processor, the
matrix it was trained on unless ``layer`` / ``use_raw`` say otherwise) and returns genes in the
model's panel order (``processor.gene_symbols``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..modeling_scrnalf import (
    ScrnaLongformerForCellClassification,
    ScrnaLongformerForMaskedGeneModeling,
    ScrnaLongformerModel,
    ScrnaLongformerPreTrainedModel,
)
from ..processing_scrnalf import ScrnaLongformerProcessor

IMPORTANCE_METHODS = ("integrated_gradients", "attention_rollout")
BASELINES = ("zeros", "mean")


# ---------------------------------------------------------------------------------------------
# Cells in, heads and targets: shared with ``perturb``
# ---------------------------------------------------------------------------------------------


def panel_inputs(
    processor: ScrnaLongformerProcessor, adata, layer: str | None = None, use_raw: bool | None = None
) -> dict[str, torch.Tensor]:
    """The model inputs of every cell of ``adata``: ``expression`` (n_cells, G) float32 normalised
    values in panel order, ``attention_mask`` (n_cells, G) and, for a model of several species,
    ``species`` (n_cells,)."""
    features = processor(adata, layer=layer, use_raw=use_raw, return_tensors="pt")
    return {name: torch.as_tensor(values) for name, values in features.items()}


def cell_batches(n_cells: int, batch_size: int, progress: bool, description: str) -> Iterator[slice]:
    """Consecutive slices of ``batch_size`` cells, with a tqdm bar when ``progress``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of cells, got {batch_size}.")
    starts = range(0, n_cells, batch_size)
    for start in tqdm(starts, desc=description, unit="batch", disable=not progress or len(starts) <= 1):
        yield slice(start, start + batch_size)


@contextmanager
def eager_kernels(model: ScrnaLongformerPreTrainedModel):
    """Run ``model`` op by op (``kernel_implementation="eager"``) inside the block.

    Gradients with respect to the input, and forwards that hook into the attention modules, run
    on the eager path: the compiled layers would compile a new graph (minutes on a CPU) for an
    input that requires gradients and run as opaque graphs that module hooks do not see. The
    numbers are the same to float rounding.
    """
    config = model.config
    previous = config.kernel_implementation
    config.kernel_implementation = "eager"
    try:
        yield
    finally:
        config.kernel_implementation = previous


def is_classifier(model: ScrnaLongformerPreTrainedModel) -> bool:
    """Whether ``model`` classifies cells (a cell-classification head with several classes)."""
    return (
        isinstance(model, ScrnaLongformerForCellClassification)
        and model.config.num_labels > 1
        and model.config.problem_type != "regression"
    )


def single_output(model: ScrnaLongformerPreTrainedModel) -> bool:
    """Whether ``model`` has a head with one output per cell (a regression head, e.g. pseudotime)."""
    if isinstance(model, (ScrnaLongformerForMaskedGeneModeling, ScrnaLongformerModel)) or is_classifier(model):
        return False
    probe = torch.zeros(1, model.config.n_genes, device=model.device)
    with torch.no_grad():
        logits = getattr(model(expression=probe), "logits", None)
    return logits is not None and logits.dim() == 2 and logits.shape[1] == 1


def class_id(model: ScrnaLongformerPreTrainedModel, label: str | int) -> int:
    """The class id of ``label`` (a name of ``config.label2id`` or an id) of a classifier."""
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
        if not 0 <= int(label) < len(labels):
            raise ValueError(f"class id {label} is out of range; this model has {len(labels)} classes: {labels}.")
        return int(label)
    if label not in labels:
        raise ValueError(f"unknown class {label!r}; this model's classes are {labels}.")
    return labels.index(label)


@torch.no_grad()
def predicted_classes(model: ScrnaLongformerPreTrainedModel, inputs: dict[str, torch.Tensor], batch_size: int) -> np.ndarray:
    """(n_cells,) the classifier's predicted class id of each cell of ``inputs`` (:func:`panel_inputs`)."""
    model.eval()
    predicted = [
        model(**{name: values[cells].to(model.device) for name, values in inputs.items()}).logits.argmax(-1).cpu().numpy()
        for cells in cell_batches(len(inputs["expression"]), batch_size, False, "")
    ]
    return np.concatenate(predicted) if predicted else np.zeros(0, dtype=np.int64)


def _model_and_processor(model, processor) -> tuple[ScrnaLongformerPreTrainedModel, ScrnaLongformerProcessor]:
    """A model object and its processor from a model, or a saved model's folder / Hub repo id."""
    if isinstance(model, (str, Path)):
        from ..inference import load_model

        return load_model(str(model))
    if processor is None:
        raise ValueError("a model object needs its processor=; or pass the saved model's folder or repo id instead.")
    return model, processor


# ---------------------------------------------------------------------------------------------
# Integrated gradients
# ---------------------------------------------------------------------------------------------


def _baseline_values(baseline, expression: torch.Tensor) -> torch.Tensor:
    """(1, G) reference input: ``"zeros"`` every gene unexpressed, ``"mean"`` the mean profile
    of the cells given, or a given (G,) profile of normalised values."""
    if not isinstance(baseline, str):
        profile = torch.as_tensor(np.asarray(baseline, dtype=np.float32)).reshape(1, -1)
        if profile.shape[1] != expression.shape[1] or bool((profile < 0).any()):
            raise ValueError(
                f"a baseline profile must hold {expression.shape[1]} non-negative normalised values (one per panel "
                f"gene), got shape {tuple(np.shape(baseline))}."
            )
        return profile
    if baseline == "zeros":
        return torch.zeros(1, expression.shape[1], dtype=expression.dtype)
    if baseline == "mean":
        return expression.mean(0, keepdim=True)
    raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}.")


def integrated_gradients(
    model: ScrnaLongformerPreTrainedModel,
    processor: ScrnaLongformerProcessor,
    adata,
    *,
    target: str | int | None = None,
    n_steps: int = 32,
    baseline: str | np.ndarray = "zeros",
    batch_size: int = 32,
    layer: str | None = None,
    use_raw: bool | None = None,
    progress: bool = True,
    return_convergence_delta: bool = False,
    method: str = "gausslegendre",
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Integrated gradients of a head's output with respect to each gene's normalised expression.

    captum's ``IntegratedGradients`` integrates the gradient along the straight path from the
    baseline to the cell's input (Gauss–Legendre rule, ``n_steps`` points). The attribution of
    gene g is (x_g − baseline_g) × the mean gradient along the path, so a gene that is
    unexpressed in the cell gets exactly 0 from the zero baseline, and per cell the attributions
    sum to f(x) − f(baseline) up to the integration error (``return_convergence_delta``).

    Args:
        model: a cell classifier (the output is a class's logit) or a model with one output per
            cell (e.g. a pseudotime head; ``target`` must then be None).
        processor: the model's processor.
        adata: the cells (AnnData), read as the processor reads them for prediction.
        target: the class to explain, a name of ``config.label2id`` or an id; None explains each
            cell's predicted class.
        n_steps: integration points per cell.
        baseline: ``"zeros"`` (every gene unexpressed), ``"mean"`` (the mean profile of the
            cells of ``adata``) or a (G,) profile of normalised values in panel order.
        batch_size: cells per call to captum, and inputs per forward and backward: captum runs
            the ``batch_size × n_steps`` points of a call in chunks of ``batch_size``, so memory
            stays that of one training batch.
        layer, use_raw: which matrix of ``adata`` to read (by default the one the model was
            trained on).
        progress: show a progress bar over batches.
        return_convergence_delta: also return captum's convergence delta per cell: the sum of
            the attributions minus f(x) − f(baseline). The value encoding is piecewise linear in
            the expression (interpolated bins), so the error shrinks like 1 / ``n_steps``;
            check it, and raise ``n_steps`` where completeness matters.
        method: captum's integration rule (``"gausslegendre"``, ``"riemann_trapezoid"``, ...).

    Returns:
        (n_cells, G) float32 attributions in output units (logit for a classifier), genes in
        ``processor.gene_symbols`` order; with ``return_convergence_delta``, also (n_cells,).

    Raises:
        ValueError: the model has no classification or single-output head, or ``target`` is not
            one of its classes.
    """
    from captum.attr import IntegratedGradients

    classifier = is_classifier(model)
    if not classifier and not single_output(model):
        raise ValueError(
            f"integrated gradients needs a classification head (or one output per cell); "
            f"{type(model).__name__} has neither. Fine-tune the model on cell labels first."
        )
    if not classifier and target is not None:
        raise ValueError(f"{type(model).__name__} has one output per cell; leave target=None, got {target!r}.")
    if n_steps < 1:
        raise ValueError(f"n_steps must be a positive number of integration points, got {n_steps}.")
    inputs = panel_inputs(processor, adata, layer, use_raw)
    expression = inputs.pop("expression")
    names = list(inputs)
    reference = _baseline_values(baseline, expression)
    target_id = class_id(model, target) if classifier and target is not None else None

    def forward(values: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        logits = model(expression=values, **dict(zip(names, extra))).logits
        return logits if classifier else logits[:, 0]

    integrated = IntegratedGradients(forward)
    attributions, deltas = [], []
    model.eval()
    with eager_kernels(model):
        for cells in cell_batches(len(expression), batch_size, progress, "integrated gradients"):
            values = expression[cells].to(model.device)
            extra = tuple(inputs[name][cells].to(model.device) for name in names)
            targets = None
            if classifier:
                if target_id is None:
                    with torch.no_grad():
                        targets = forward(values, *extra).argmax(-1).tolist()
                else:
                    targets = target_id
            attribution, delta = integrated.attribute(
                values, baselines=reference.to(model.device), target=targets, additional_forward_args=extra,
                n_steps=n_steps, method=method, internal_batch_size=batch_size, return_convergence_delta=True,
            )
            attributions.append(attribution.detach().float().cpu().numpy())
            deltas.append(delta.detach().float().cpu().numpy())
    n_genes = model.config.n_genes
    result = np.concatenate(attributions) if attributions else np.zeros((0, n_genes), np.float32)
    if return_convergence_delta:
        return result, (np.concatenate(deltas) if deltas else np.zeros(0, np.float32))
    return result


# ---------------------------------------------------------------------------------------------
# Attention rollout
# ---------------------------------------------------------------------------------------------


def _cls_weights(attention_module, args) -> torch.Tensor:
    """The CLS query's attention weights over all tokens, (b, heads, 1 + G), recomputed from the
    layer's own QKV projection of its (normalised) input, as ``_cls_attention`` computes them."""
    hidden, key_mask = args[0], args[2]  # (b, 1 + G, d), (b, 1 + G)
    batch, n_tokens, d_model = hidden.shape
    heads = attention_module.config.n_heads
    qkv = attention_module.qkv(hidden).view(batch, n_tokens, 3, heads, d_model // heads)
    query, key = qkv[:, 0, 0], qkv[:, :, 1]  # (b, h, dh), (b, 1 + G, h, dh)
    scores = torch.einsum("bhd,bthd->bht", query * (d_model // heads) ** -0.5, key)
    return scores.masked_fill(~key_mask[:, None, :], float("-inf")).softmax(-1)


def rollout_step(
    summary: torch.Tensor, gene_weights: torch.Tensor, cls_weights: torch.Tensor, gene_neighbors: torch.Tensor
) -> torch.Tensor:
    """One layer of attention rollout for a row vector: ``summary @ (0.5·A + 0.5·I)``.

    A is the layer's head-averaged attention over the ``1 + G`` tokens, given sparsely: the gene
    rows in neighbour-table form and the CLS row in full. The identity stands for the residual
    connection (Abnar & Zuidema 2020). O(G·k); no (1 + G)² matrix is built.

    Args:
        summary: (b, 1 + G) weights of the layer's output tokens (CLS first).
        gene_weights: (b, G, k + 1) head-averaged gene rows: column j < k on gene_neighbors[g, j],
            column k on CLS.
        cls_weights: (b, 1 + G) head-averaged CLS row.
        gene_neighbors: (G, k) neighbour table, -1 = padding (whose weights are 0).

    Returns:
        (b, 1 + G) weights of the layer's input tokens.
    """
    n_genes, k = gene_neighbors.shape
    through_genes = summary[:, 1:, None] * gene_weights  # (b, G, k + 1)
    columns = (gene_neighbors.clamp(min=0) + 1).reshape(1, -1).expand(summary.shape[0], -1)  # (b, G·k)
    attended = torch.zeros_like(summary).scatter_add(1, columns, through_genes[:, :, :k].reshape(summary.shape[0], -1))
    attended[:, 0] += through_genes[:, :, k].sum(1)
    attended += summary[:, :1] * cls_weights
    return 0.5 * summary + 0.5 * attended


def attention_rollout(
    model: ScrnaLongformerPreTrainedModel,
    processor: ScrnaLongformerProcessor,
    adata,
    *,
    batch_size: int = 64,
    layer: str | None = None,
    use_raw: bool | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Attention rollout of the cell summary onto the input genes (Abnar & Zuidema 2020).

    Each layer's attention, averaged over heads, with the residual connection as
    ``0.5·A + 0.5·I``, is chained from the last layer down. The chain starts at the token(s)
    the cell embedding is read from: the CLS token for ``config.pooling="cls"``, or for
    ``"mean"`` (the presets' default) the uniform average of the measured gene tokens. It is
    one row vector carried through each layer's sparse attention (see :func:`rollout_step`).

    The model returns only the gene rows' weights; the CLS row is recomputed from each layer's
    QKV projection by a forward hook. Target-free: the same for every head.

    Args:
        model: any model of knn or dense attention (``linear`` has no attention weights).
        processor, adata, layer, use_raw: as for :func:`integrated_gradients`.
        batch_size: cells per forward.
        progress: show a progress bar over batches.

    Returns:
        (n_cells, G) float32, non-negative, genes in panel order: how much the cell summary draws
        on each input gene token. Each row sums to 1 minus the share left on the input CLS token
        (a learned constant, the same for every cell).
    """
    if model.config.attention_type == "linear":
        raise ValueError("attention rollout needs attention weights, which attention_type='linear' does not have; use a knn or dense model.")
    base = model.base_model
    inputs = panel_inputs(processor, adata, layer, use_raw)
    cls_rows: list[torch.Tensor] = []

    def keep_cls_row(module, args, output):
        cls_rows.append(_cls_weights(module, args).mean(1))  # (b, 1 + G)

    hooks = [layer_module.attention.register_forward_hook(keep_cls_row) for layer_module in base.encoder.layers]
    rollouts = []
    model.eval()
    try:
        with eager_kernels(model), torch.no_grad():
            for cells in cell_batches(len(inputs["expression"]), batch_size, progress, "attention rollout"):
                batch = {name: values[cells].to(model.device) for name, values in inputs.items()}
                cls_rows.clear()
                attentions = base(**batch, output_attentions=True).attentions
                gene_mask = batch["attention_mask"].bool()
                if model.config.pooling == "cls":
                    summary = torch.zeros(gene_mask.shape[0], 1 + gene_mask.shape[1], device=model.device)
                    summary[:, 0] = 1.0
                else:
                    measured = gene_mask.float()
                    summary = torch.cat([torch.zeros_like(measured[:, :1]), measured / measured.sum(1, keepdim=True).clamp(min=1)], 1)
                for weights, cls_row in zip(reversed(attentions), reversed(cls_rows)):
                    summary = rollout_step(summary, weights.float().mean(1), cls_row.float(), base.gene_neighbors)
                rollouts.append(summary[:, 1:].cpu().numpy())
    finally:
        for hook in hooks:
            hook.remove()
    return np.concatenate(rollouts).astype(np.float32) if rollouts else np.zeros((0, model.config.n_genes), np.float32)


# ---------------------------------------------------------------------------------------------
# A class's top genes, and their pictures
# ---------------------------------------------------------------------------------------------


def top_genes(
    model,
    adata,
    label: str,
    *,
    processor: ScrnaLongformerProcessor | None = None,
    label_key: str | None = None,
    method: str = "integrated_gradients",
    n: int = 20,
    n_steps: int = 32,
    baseline: str | np.ndarray = "zeros",
    batch_size: int = 32,
    layer: str | None = None,
    use_raw: bool | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """A class's top ``n`` genes by mean importance over the cells of that class.

    The cells are those with ``obs[label_key] == label`` when ``label_key`` is given, else the
    cells the model predicts as ``label``. With ``"integrated_gradients"`` the score is the mean
    attribution to that class's logit (signed: positive = evidence for the class); with
    ``"attention_rollout"`` the mean rollout weight (target-free).

    Args:
        model: a cell classifier, or the folder / Hub repo id of a saved one.
        adata: the cells.
        label: a class of the model (``config.label2id``).
        processor: the model's processor (required when ``model`` is an object).
        label_key: obs column of the cells' labels; None selects cells by the model's prediction.
        method: ``"integrated_gradients"`` or ``"attention_rollout"``.
        n: genes to return.
        n_steps, baseline: integrated gradients' settings (:func:`integrated_gradients`);
            ``"mean"`` is the mean profile of all cells of ``adata``, not of the class.
        batch_size, layer, use_raw, progress: as for :func:`integrated_gradients`.

    Returns:
        DataFrame with columns ``gene`` (panel symbol), ``score`` and ``rank`` (1 = top),
        ``n`` rows (fewer if the panel is smaller), best first.
    """
    model, processor = _model_and_processor(model, processor)
    if method not in IMPORTANCE_METHODS:
        raise ValueError(f"method must be one of {IMPORTANCE_METHODS}, got {method!r}.")
    if not is_classifier(model):
        raise ValueError(f"top genes of a class need a classification head; {type(model).__name__} has none.")
    target = class_id(model, label)
    label = model.config.id2label[target]
    if label_key is not None:
        if label_key not in adata.obs.columns:
            raise ValueError(f"obs has no column {label_key!r}; its columns are {list(adata.obs.columns)}.")
        chosen = (adata.obs[label_key].astype(str) == str(label)).to_numpy()
        where = f"with obs[{label_key!r}] == {label!r}"
    else:
        predicted = predicted_classes(model, panel_inputs(processor, adata, layer, use_raw), batch_size)
        chosen = predicted == target
        where = f"predicted as {label!r}"
    if not chosen.any():
        raise ValueError(f"no cells {where}; choose another label, or pass label_key= to select cells by their labels.")
    cells = adata[chosen]
    if method == "integrated_gradients":
        if isinstance(baseline, str) and baseline == "mean":  # all cells' mean, not the class's own
            baseline = panel_inputs(processor, adata, layer, use_raw)["expression"].mean(0).numpy()
        scores = integrated_gradients(
            model, processor, cells, target=target, n_steps=n_steps, baseline=baseline, batch_size=batch_size,
            layer=layer, use_raw=use_raw, progress=progress,
        )
    else:
        scores = attention_rollout(model, processor, cells, batch_size=batch_size, layer=layer, use_raw=use_raw, progress=progress)
    mean = scores.mean(0)
    order = np.argsort(-mean, kind="stable")[:n]
    return pd.DataFrame({
        "gene": np.asarray(processor.gene_symbols)[order],
        "score": mean[order].astype(np.float64),
        "rank": np.arange(1, len(order) + 1),
    })


def plot_importance(tables: pd.DataFrame | Mapping[str, pd.DataFrame], path: str | Path, *, title: str | None = None) -> Path:
    """Horizontal bar plots of gene-importance tables (:func:`top_genes`), one panel per class.

    Args:
        tables: one table, or a mapping class name -> table (columns ``gene`` and ``score``).
        path: the PNG to write.
        title: the figure's title.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if isinstance(tables, pd.DataFrame):
        tables = {"": tables}
    if not tables:
        raise ValueError("no tables to plot; pass a top_genes table or a dict of them per class.")
    n_rows = max(len(table) for table in tables.values())
    figure, axes = plt.subplots(1, len(tables), figsize=(3.6 * len(tables), 0.25 * n_rows + 1.5), squeeze=False)
    for axis, (name, table) in zip(axes[0], tables.items()):
        scores = table["score"].to_numpy()[::-1]
        axis.barh(np.arange(len(table)), scores, color=np.where(scores >= 0, "tab:red", "tab:blue"))
        axis.set_yticks(np.arange(len(table)), table["gene"].to_numpy()[::-1], fontsize=7)
        axis.set_title(str(name), fontsize=9)
        axis.set_xlabel("mean importance", fontsize=8)
        axis.tick_params(axis="x", labelsize=7)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


__all__ = ["attention_rollout", "integrated_gradients", "plot_importance", "rollout_step", "top_genes"]
