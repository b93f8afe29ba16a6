"""In-silico perturbation: delete or overexpress genes in the model's input and read what moves.

A perturbation edits the normalised input of the chosen cells — deletion sets the genes to 0
(unexpressed), overexpression to a high value the gene reaches in these data — and compares the
model's outputs before and after:

- ``embedding_shift`` (n_cells,): cosine distance of each cell's embedding before and after;
- class probabilities before and after (a classification head);
- ``gene_shift`` (G,): how every other gene responds, averaged over the cells. For a masked-gene
  model this is the change of the gene's *predicted expression* (normalised log1p units): the
  genes are split into fixed random groups (about ``1 / mask_ratio`` of them, so each hides as
  many genes as training did), and each group in turn is hidden and predicted from the rest of
  the cell, from the original and from the perturbed input; the perturbed genes are never
  hidden, so their edited values are what the context carries. A few forwards per cell. For
  other heads it is the cosine distance of the gene's final token state before and after
  (non-negative: how much its contextual representation moved);
- ``target_shift`` (n_cells,), toward a target state: the gain of a class's probability
  (``target_label``), or how much closer (in cosine distance) the cell embedding moved to the
  mean embedding of target cells (``target_cells`` / ``target_group``).

:func:`rank_perturbations` runs one perturbation per candidate gene and ranks them by how far
they move cells toward the target state; :func:`plot_perturbation` draws one result.
"""

from __future__ import annotations

from collections.abc import Sequence
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..modeling_scrnalf import ScrnaLongformerForMaskedGeneModeling, ScrnaLongformerPreTrainedModel
from ..processing_scrnalf import ScrnaLongformerProcessor
from .importance import cell_batches, class_id, is_classifier, panel_inputs

logger = logging.getLogger(__name__)

MODES = ("delete", "overexpress")
PREDICTED_EXPRESSION = "predicted_expression"
TOKEN_STATE = "token_state_cosine"


@dataclass
class PerturbationResult:
    """What one in-silico perturbation did (see the module docstring for each quantity).

    Attributes:
        genes: the perturbed genes (panel symbols).
        mode: ``"delete"`` or ``"overexpress"``.
        values: (len(genes),) the normalised value each perturbed gene was set to.
        cell_names: (n_cells,) obs names of the perturbed cells.
        gene_symbols: (G,) the panel, in model order.
        embedding_shift: (n_cells,) cosine distance of each cell's embedding before/after.
        gene_shift: (G,) mean response of each gene over the cells (NaN at the perturbed genes
            and at genes no perturbed cell measures); its kind is ``gene_shift_kind``.
        gene_shift_kind: ``"predicted_expression"`` (masked-gene model: change of the predicted
            normalised expression, signed) or ``"token_state_cosine"`` (other heads: cosine
            distance of the final gene token states, non-negative); None if not computed.
        probabilities_before / probabilities_after: (n_cells, n_classes) of a classifier, else None.
        class_names: the classifier's classes, else None.
        target: what ``target_shift`` measures, in words; None without a target.
        target_shift: (n_cells,) gain of the target class's probability, or decrease of the
            cosine distance to the target cells' mean embedding; None without a target.
        settings: how the gene shifts were computed (``n_mask_groups`` of a masked-gene model).

    Cosine distances are float64: a small move gives a distance of order 1e-8.
    """

    genes: list[str]
    mode: str
    values: np.ndarray
    cell_names: np.ndarray
    gene_symbols: np.ndarray
    embedding_shift: np.ndarray
    gene_shift: np.ndarray | None = None
    gene_shift_kind: str | None = None
    probabilities_before: np.ndarray | None = None
    probabilities_after: np.ndarray | None = None
    class_names: list[str] | None = None
    target: str | None = None
    target_shift: np.ndarray | None = None
    settings: dict = field(default_factory=dict)

    @property
    def probability_shift(self) -> np.ndarray | None:
        """(n_cells, n_classes) probabilities after minus before; None without a classifier."""
        if self.probabilities_before is None:
            return None
        return self.probabilities_after - self.probabilities_before

    def to_frame(self) -> pd.DataFrame:
        """One row per panel gene: ``gene``, ``shift`` (``gene_shift``), ``abs_shift`` and
        ``rank`` (1 = largest ``abs_shift``; the perturbed genes and unmeasured genes, NaN, last),
        sorted by rank."""
        if self.gene_shift is None:
            raise ValueError("this result has no gene shifts; run perturb(..., gene_shifts=True).")
        frame = pd.DataFrame({"gene": self.gene_symbols, "shift": self.gene_shift, "abs_shift": np.abs(self.gene_shift)})
        frame = frame.sort_values("abs_shift", ascending=False, na_position="last", kind="stable").reset_index(drop=True)
        frame["rank"] = np.arange(1, len(frame) + 1)
        return frame


# ---------------------------------------------------------------------------------------------
# Choosing genes, cells and targets
# ---------------------------------------------------------------------------------------------


def gene_indices(processor: ScrnaLongformerProcessor, genes: Sequence[str]) -> np.ndarray:
    """Panel positions of ``genes`` (symbols, or gene ids where the processor has them)."""
    if isinstance(genes, str):
        genes = [genes]
    if len(genes) == 0:
        raise ValueError("no genes to perturb; give at least one gene of the model's panel (processor.gene_symbols).")
    symbols = {symbol: index for index, symbol in enumerate(processor.gene_symbols)}
    ids = {gene_id: index for index, gene_id in enumerate(processor.gene_ids or [])}
    missing = [gene for gene in genes if gene not in symbols and gene not in ids]
    if missing:
        raise ValueError(
            f"genes not in the model's {processor.n_genes}-gene panel: {missing[:10]}; choose genes of "
            f"processor.gene_symbols (e.g. {list(processor.gene_symbols[:3])})."
        )
    positions = np.array([symbols.get(gene, ids.get(gene)) for gene in genes], dtype=np.int64)
    if len(set(positions.tolist())) != len(positions):
        raise ValueError(f"genes lists the same panel gene twice: {list(genes)}.")
    return positions


def select_cells(adata, cells=None, group_by: str | None = None, group: str | None = None, what: str = "cells") -> np.ndarray:
    """(n_obs,) bool: ``cells`` (a bool mask), or the cells with ``obs[group_by] == group``, or all."""
    if cells is not None and group is not None:
        raise ValueError(f"choose the {what} either by a mask or by group_by/group, not both.")
    if cells is not None:
        mask = np.asarray(cells)
        if mask.dtype != bool or mask.shape != (adata.n_obs,):
            raise ValueError(f"the {what} mask must be a bool array of one entry per cell ({adata.n_obs}), got {mask.dtype} {mask.shape}.")
        if not mask.any():
            raise ValueError(f"the {what} mask selects no cells.")
        return mask
    if group is None:
        return np.ones(adata.n_obs, dtype=bool)
    if group_by is None:
        raise ValueError(f"group={group!r} needs group_by=, the obs column that holds it.")
    if group_by not in adata.obs.columns:
        raise ValueError(f"obs has no column {group_by!r}; its columns are {list(adata.obs.columns)}.")
    mask = (adata.obs[group_by].astype(str) == str(group)).to_numpy()
    if not mask.any():
        present = sorted(map(str, adata.obs[group_by].unique()))[:20]
        raise ValueError(f"no cells with obs[{group_by!r}] == {group!r}; its values are {present}.")
    return mask


def overexpression_values(
    expression: torch.Tensor, positions: np.ndarray, symbols: Sequence[str], quantile: float, value: float | None
) -> torch.Tensor:
    """(len(positions),) the normalised value each gene is overexpressed to: ``value`` if given,
    else the ``quantile`` of the gene's non-zero values over all cells (e.g. its 99th percentile:
    high, yet a level the gene reaches in these data)."""
    if value is not None:
        if not value > 0:
            raise ValueError(f"overexpress_value must be a positive normalised value, got {value}.")
        return torch.full((len(positions),), float(value))
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"overexpress_quantile must lie in (0, 1], got {quantile}.")
    values = []
    for position, symbol in zip(positions, symbols):
        expressed = expression[:, position][expression[:, position] > 0]
        if len(expressed) == 0:
            raise ValueError(
                f"{symbol} is expressed in none of these cells, so it has no level to overexpress to; "
                "give overexpress_value= (normalised log1p units)."
            )
        values.append(float(torch.quantile(expressed.double(), quantile)))
    return torch.tensor(values)


def _cosine_distance(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """1 − cos along the last axis, in float64: small moves give distances of order 1e-8 (the
    distance is quadratic in the angle), below float32's rounding of a cosine near 1."""
    return 1.0 - F.cosine_similarity(before.double(), after.double(), dim=-1)


# ---------------------------------------------------------------------------------------------
# The perturbation run
# ---------------------------------------------------------------------------------------------


class _Perturber:
    """The chosen cells' inputs and the model's original outputs on them, computed once and
    reused by every perturbation of a :func:`rank_perturbations` run."""

    def __init__(self, model, processor, adata, chosen, *, layer, use_raw, batch_size, progress, n_mask_groups, mask_seed):
        self.model, self.processor = model, processor
        self.batch_size, self.progress = batch_size, progress
        inputs = panel_inputs(processor, adata, layer, use_raw)
        self.all_inputs = inputs  # every cell of adata: overexpression levels and target cells
        self.inputs = {name: values[torch.from_numpy(chosen)] for name, values in inputs.items()}
        self.cell_names = np.asarray(adata.obs_names)[chosen]
        self.classifier = is_classifier(model)
        self.masked_genes = isinstance(model, ScrnaLongformerForMaskedGeneModeling)
        n_genes = model.config.n_genes
        if n_mask_groups is None:
            n_mask_groups = max(2, round(1 / model.config.mask_ratio))
        if n_mask_groups < 1:
            raise ValueError(f"n_mask_groups must be a positive number of gene groups, got {n_mask_groups}.")
        order = np.random.default_rng(mask_seed).permutation(n_genes)
        self.mask_groups = [np.sort(order[g::n_mask_groups]) for g in range(min(n_mask_groups, n_genes))]
        self._original: dict = {}
        model.eval()

    def batches(self, description: str):
        return enumerate(cell_batches(len(self.inputs["expression"]), self.batch_size, self.progress, description))

    def _batch(self, cells: slice) -> dict[str, torch.Tensor]:
        return {name: values[cells].to(self.model.device) for name, values in self.inputs.items()}

    @torch.no_grad()
    def outputs(self, batch: dict[str, torch.Tensor], masked: torch.Tensor | None = None, token_states: bool = False):
        """The model's outputs; with ``token_states``, also ``token_states`` (b, G, d), the final
        gene token states (the encoder's ``last_hidden_state`` without CLS), which heads do not return."""
        if masked is not None:
            return self.model(**batch, masked_positions=masked)
        output = self.model(**batch, output_hidden_states=token_states)
        if token_states:
            output.token_states = self.model.base_model.final_norm(output.hidden_states[-1][:, 1:])
        return output

    def original(self, index: int, batch, key=None, masked=None):
        """The original outputs of batch ``index`` (``key`` names a masked forward), cached."""
        key = (index, key)
        if key not in self._original:
            output = self.outputs(batch, masked)
            if masked is not None:
                kept = output.logits.float().cpu()
            else:
                probabilities = output.logits.float().softmax(-1).cpu() if self.classifier else None
                kept = (output.cell_embedding.float().cpu(), probabilities)
            self._original[key] = kept
        return self._original[key]

    def embeddings(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(n, d) cell embeddings of any cells' inputs."""
        parts = [
            self.outputs({name: values[cells].to(self.model.device) for name, values in inputs.items()}).cell_embedding.float().cpu()
            for cells in cell_batches(len(inputs["expression"]), self.batch_size, False, "")
        ]
        return torch.cat(parts)

    def run(self, positions: np.ndarray, values: torch.Tensor, mode: str, gene_shifts: bool, target_class, target_embedding):
        n_genes = self.model.config.n_genes
        embedding_shift, before_probs, after_probs, target_shift = [], [], [], []
        shift_sum = torch.zeros(n_genes, dtype=torch.float64)
        shift_count = torch.zeros(n_genes, dtype=torch.float64)
        perturbed_genes = torch.from_numpy(positions)
        for index, cells in self.batches(f"perturbing {len(positions)} gene(s)"):
            batch = self._batch(cells)
            edited = dict(batch)
            edited["expression"] = batch["expression"].clone()
            edited["expression"][:, perturbed_genes] = values.to(edited["expression"])
            if mode == "overexpress" and "attention_mask" in edited:  # a gene absent from the dataset is now measured
                edited["attention_mask"] = batch["attention_mask"].clone()
                edited["attention_mask"][:, perturbed_genes] = 1
            before_embedding, before_probability = self.original(index, batch)
            token_states = gene_shifts and not self.masked_genes
            after = self.outputs(edited, token_states=token_states)
            after_embedding = after.cell_embedding.float().cpu()
            embedding_shift.append(_cosine_distance(before_embedding, after_embedding))
            if self.classifier:
                after_probability = after.logits.float().softmax(-1).cpu()
                before_probs.append(before_probability)
                after_probs.append(after_probability)
                if target_class is not None:
                    target_shift.append(after_probability[:, target_class] - before_probability[:, target_class])
            if target_embedding is not None:
                target = target_embedding.expand_as(after_embedding)
                target_shift.append(_cosine_distance(before_embedding, target) - _cosine_distance(after_embedding, target))
            if gene_shifts:
                if self.masked_genes:
                    response = self._predicted_expression_change(index, batch, edited, positions)
                else:
                    before_states = self.outputs(batch, token_states=True).token_states
                    response = _cosine_distance(before_states, after.token_states).cpu()  # (b, G)
                response = response.double()
                response[:, perturbed_genes] = float("nan")
                if "attention_mask" in batch:
                    response[~batch["attention_mask"].bool().cpu()] = float("nan")
                seen = ~torch.isnan(response)
                shift_sum += torch.where(seen, response, 0.0).sum(0)
                shift_count += seen.sum(0)
        gene_shift = None
        if gene_shifts:
            gene_shift = torch.where(shift_count > 0, shift_sum / shift_count.clamp(min=1), float("nan")).numpy()
        return {
            "embedding_shift": torch.cat(embedding_shift).numpy() if embedding_shift else np.zeros(0, np.float32),
            "gene_shift": gene_shift,
            "probabilities_before": torch.cat(before_probs).numpy() if before_probs else None,
            "probabilities_after": torch.cat(after_probs).numpy() if after_probs else None,
            "target_shift": torch.cat(target_shift).numpy() if target_shift else None,
        }

    def _predicted_expression_change(self, index, batch, edited, positions) -> torch.Tensor:
        """(b, G) predicted expression from the edited input minus from the original, each gene
        predicted while its mask group is hidden; the perturbed genes are never hidden."""
        n_cells, n_genes = batch["expression"].shape
        change = torch.full((n_cells, n_genes), float("nan"))
        for group_index, group in enumerate(self.mask_groups):
            hidden = np.setdiff1d(group, positions)
            if len(hidden) == 0:
                continue
            masked = torch.zeros(n_cells, n_genes, dtype=torch.bool, device=self.model.device)
            masked[:, torch.from_numpy(hidden)] = True
            excluded = tuple(np.intersect1d(group, positions).tolist())
            before = self.original(index, batch, key=(group_index, excluded), masked=masked)
            after = self.outputs(edited, masked).logits.float().cpu()
            change[:, hidden] = after[:, hidden] - before[:, hidden]
        return change


def _targets(model, perturber: _Perturber, target_label, target_mask):
    """(target class id or None, target mean embedding (1, d) or None, description or None)."""
    if target_label is not None and target_mask is not None:
        raise ValueError("give either target_label (a class) or target cells / target_group, not both.")
    if target_label is not None:
        if not perturber.classifier:
            raise ValueError(
                f"target_label={target_label!r} needs a classification head, which {type(model).__name__} has not; "
                "give target_cells= or target_group= (move toward their mean embedding) instead."
            )
        target = class_id(model, target_label)
        return target, None, f"probability of {model.config.id2label[target]!r} (after − before)"
    if target_mask is not None:
        chosen = torch.from_numpy(target_mask)
        centroid = perturber.embeddings({name: values[chosen] for name, values in perturber.all_inputs.items()})
        centroid = centroid.mean(0, keepdim=True)  # (1, d)
        return None, centroid, f"cosine distance to the mean embedding of {int(target_mask.sum())} target cells (before − after)"
    return None, None, None


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")


def _target_mask(adata, target_cells, group_by, target_group) -> np.ndarray | None:
    if target_cells is None and target_group is None:
        return None
    return select_cells(adata, target_cells, group_by, target_group, what="target cells")


def perturb(
    model: ScrnaLongformerPreTrainedModel,
    processor: ScrnaLongformerProcessor,
    adata,
    genes: Sequence[str],
    *,
    mode: str = "delete",
    cells: np.ndarray | None = None,
    group_by: str | None = None,
    group: str | None = None,
    target_label: str | None = None,
    target_cells: np.ndarray | None = None,
    target_group: str | None = None,
    overexpress_quantile: float = 0.99,
    overexpress_value: float | None = None,
    gene_shifts: bool = True,
    n_mask_groups: int | None = None,
    mask_seed: int = 0,
    batch_size: int = 64,
    layer: str | None = None,
    use_raw: bool | None = None,
    progress: bool = True,
) -> PerturbationResult:
    """Delete or overexpress ``genes`` in the chosen cells and measure what moves.

    Args:
        model: any head: a masked-gene model (gene shifts are predicted-expression changes), a
            classifier (class probabilities; ``target_label``), or another head / the encoder.
        processor: the model's processor.
        adata: the cells (AnnData), read as for prediction.
        genes: panel genes to perturb together (symbols of ``processor.gene_symbols``).
        mode: ``"delete"`` sets them to 0 (unexpressed); ``"overexpress"`` sets them to
            ``overexpress_value`` if given, else to the ``overexpress_quantile`` of each gene's
            non-zero normalised values over all cells of ``adata`` (default the 99th percentile),
            and marks them measured.
        cells: (n_obs,) bool mask of the cells to perturb; or ``group_by`` / ``group``, the cells
            with ``obs[group_by] == group``; by default every cell.
        target_label: a class of a classifier: ``target_shift`` is the gain of its probability.
        target_cells / target_group: cells of the target state (a mask, or ``obs[group_by] ==
            target_group``): ``target_shift`` is how much closer each cell's embedding came to
            their mean embedding (cosine distance before − after).
        gene_shifts: compute ``gene_shift`` (the costlier part for a masked-gene model:
            ``2 × n_mask_groups`` forwards per cell, half of them cached across calls of one
            :func:`rank_perturbations` run).
        n_mask_groups: gene groups hidden in turn (masked-gene model); ``round(1 / mask_ratio)``
            by default, so each group hides as many genes as training did.
        mask_seed: seed of the random split of genes into groups.
        batch_size: cells per forward.
        layer, use_raw: which matrix of ``adata`` to read.
        progress: show a progress bar over batches.

    Returns:
        A :class:`PerturbationResult`.

    Raises:
        ValueError: a gene not in the panel, a group or mask without cells, an unknown mode, a
            target class the model does not have, or ``target_label`` without a classifier.
    """
    _check_mode(mode)
    positions = gene_indices(processor, genes)
    symbols = [processor.gene_symbols[p] for p in positions]
    _warn_unread(model, positions, symbols)
    chosen = select_cells(adata, cells, group_by, group)
    perturber = _Perturber(
        model, processor, adata, chosen, layer=layer, use_raw=use_raw, batch_size=batch_size, progress=progress,
        n_mask_groups=n_mask_groups, mask_seed=mask_seed,
    )
    target_class, target_embedding, target = _targets(model, perturber, target_label, _target_mask(adata, target_cells, group_by, target_group))
    return _perturb_one(perturber, positions, symbols, mode, overexpress_quantile, overexpress_value, gene_shifts,
                        target_class, target_embedding, target)


def graph_readers(model: ScrnaLongformerPreTrainedModel, positions: Sequence[int]) -> np.ndarray:
    """(len(positions),) how many other genes list each gene among their gene-graph neighbours:
    besides the global CLS token, the only genes a change of it reaches in one layer."""
    table = model.base_model.gene_neighbors.cpu().numpy()  # (G, k), -1 = padding
    listed = np.zeros(len(table), dtype=np.int64)
    rows, _ = np.nonzero(table >= 0)
    np.add.at(listed, table[table >= 0], 1)
    listed -= np.bincount(rows[table[table >= 0] == rows], minlength=len(table))  # a gene is its own neighbour
    return listed[np.asarray(positions)]


def _warn_unread(model: ScrnaLongformerPreTrainedModel, positions: Sequence[int], symbols: Sequence[str]) -> None:
    unread = [symbol for symbol, readers in zip(symbols, graph_readers(model, positions), strict=True) if readers == 0]
    if unread:
        metric = getattr(model.config, "gene_graph_metric", "cosine")
        logger.warning(
            "%s: no other gene lists %s among its gene-graph neighbours (the graph links genes by %s), so a "
            "perturbation reaches other genes only through the global CLS token%s",
            ", ".join(unread), "it" if len(unread) == 1 else "them", metric,
            "; a model built with --config-overrides gene_graph_metric=correlation links co-varying genes"
            if metric == "cosine" else ".",
        )


def _perturb_one(perturber: _Perturber, positions, symbols, mode, quantile, value, gene_shifts, target_class,
                 target_embedding, target) -> PerturbationResult:
    if mode == "delete":
        values = torch.zeros(len(positions))
    else:
        values = overexpression_values(perturber.all_inputs["expression"], positions, symbols, quantile, value)
    outcome = perturber.run(positions, values, mode, gene_shifts, target_class, target_embedding)
    config = perturber.model.config
    return PerturbationResult(
        genes=list(symbols),
        mode=mode,
        values=values.numpy(),
        cell_names=perturber.cell_names,
        gene_symbols=np.asarray(perturber.processor.gene_symbols),
        gene_shift_kind=(PREDICTED_EXPRESSION if perturber.masked_genes else TOKEN_STATE) if gene_shifts else None,
        class_names=[config.id2label[i] for i in range(config.num_labels)] if perturber.classifier else None,
        target=target,
        settings={"n_mask_groups": len(perturber.mask_groups)} if perturber.masked_genes and gene_shifts else {},
        **outcome,
    )


def rank_perturbations(
    model: ScrnaLongformerPreTrainedModel,
    processor: ScrnaLongformerProcessor,
    adata,
    candidate_genes: Sequence[str],
    *,
    mode: str = "delete",
    cells: np.ndarray | None = None,
    group_by: str | None = None,
    group: str | None = None,
    target_label: str | None = None,
    target_cells: np.ndarray | None = None,
    target_group: str | None = None,
    overexpress_quantile: float = 0.99,
    overexpress_value: float | None = None,
    batch_size: int = 64,
    layer: str | None = None,
    use_raw: bool | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Rank candidate genes by how far perturbing each one alone moves the chosen cells toward
    the target state (a class, or target cells' mean embedding; see :func:`perturb`).

    The model's outputs on the unperturbed cells are computed once and shared by every
    candidate. Without a target, genes are ranked by the mean embedding shift (how much the
    perturbation changes the cells at all).

    Returns:
        DataFrame, best first: ``gene``, ``target_shift`` (mean over cells; only with a target),
        ``fraction_toward_target`` (share of cells with a positive shift; only with a target),
        ``embedding_shift`` (mean cosine distance), ``rank`` (1 = moves cells furthest).
    """
    _check_mode(mode)
    positions = gene_indices(processor, candidate_genes)
    chosen = select_cells(adata, cells, group_by, group)
    perturber = _Perturber(
        model, processor, adata, chosen, layer=layer, use_raw=use_raw, batch_size=batch_size, progress=False,
        n_mask_groups=None, mask_seed=0,
    )
    target_class, target_embedding, target = _targets(model, perturber, target_label, _target_mask(adata, target_cells, group_by, target_group))
    rows = []
    for position in tqdm(positions, desc="ranking perturbations", unit="gene", disable=not progress):
        symbol = processor.gene_symbols[position]
        result = _perturb_one(perturber, np.array([position]), [symbol], mode, overexpress_quantile, overexpress_value,
                              False, target_class, target_embedding, target)
        row = {"gene": symbol, "embedding_shift": float(result.embedding_shift.mean())}
        if result.target_shift is not None:
            row["target_shift"] = float(result.target_shift.mean())
            row["fraction_toward_target"] = float((result.target_shift > 0).mean())
        rows.append(row)
    frame = pd.DataFrame(rows)
    key = "target_shift" if target is not None else "embedding_shift"
    frame = frame.sort_values(key, ascending=False, kind="stable").reset_index(drop=True)
    frame["rank"] = np.arange(1, len(frame) + 1)
    columns = ["gene", "target_shift", "fraction_toward_target", "embedding_shift", "rank"]
    return frame[[c for c in columns if c in frame.columns]]


def plot_perturbation(result: PerturbationResult, path: str | Path, *, n_genes: int = 20) -> Path:
    """Two panels: the distribution of the cells' embedding shifts, and the ``n_genes`` genes
    whose ``gene_shift`` is largest in size. Writes a PNG at ``path`` and returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if result.gene_shift is not None else 1
    figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.5), squeeze=False)
    axis = axes[0, 0]
    axis.hist(result.embedding_shift, bins=min(40, max(5, len(result.embedding_shift) // 5)), color="tab:gray")
    axis.set_xlabel("embedding shift (cosine distance)")
    axis.set_ylabel("cells")
    axis.set_title(f"{result.mode} {', '.join(result.genes[:5])}: {len(result.embedding_shift)} cells", fontsize=9)
    if panels == 2:
        top = result.to_frame().dropna(subset=["shift"]).head(n_genes)[::-1]
        axis = axes[0, 1]
        axis.barh(np.arange(len(top)), top["shift"], color=np.where(top["shift"] >= 0, "tab:red", "tab:blue"))
        axis.set_yticks(np.arange(len(top)), top["gene"], fontsize=7)
        unit = "predicted expression change" if result.gene_shift_kind == PREDICTED_EXPRESSION else "token state shift (cosine)"
        axis.set_xlabel(f"mean {unit}", fontsize=8)
        axis.set_title(f"top {len(top)} responding genes", fontsize=9)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


__all__ = [
    "MODES",
    "PerturbationResult",
    "perturb",
    "plot_perturbation",
    "rank_perturbations",
]
