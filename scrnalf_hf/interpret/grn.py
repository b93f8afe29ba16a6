"""Scoring gene networks against a known truth, the baselines to beat, and pictures of them.

Edge lists everywhere are DataFrames with ``source``, ``target`` (gene symbols) and ``score``
(higher = more confident), directed ``source`` → ``target`` as in
:func:`~scrnalf_hf.interpret.attention.attention_edges`.

Baselines (none of them is the model, so they may use gene × gene matrices):

- :func:`random_edges`: uniform random scores on every ordered pair (AUPRC ≈ the share of
  true edges);
- :func:`correlation_edges`: absolute Pearson correlation between two genes over cells
  (symmetric: both directions score the same);
- :func:`knn_graph_edges`: the model's own input, its kNN gene graph, scored by cosine
  similarity or neighbour order;
- :func:`genie3_edges`: GENIE3 (Huynh-Thu et al. 2010): for every target gene a tree ensemble
  regresses it on all other genes, and a gene's importance there scores its edge to the target.

:func:`edge_auprc` scores any of them, and attention, against directed true edges
(``adata.uns["simulation"]["regulatory_edges"]`` for simulated cells), over all ordered pairs or
only those of a given graph. :func:`attention_heatmap` draws the edges among chosen genes.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from sklearn.metrics import average_precision_score
from tqdm.auto import tqdm


def _dense(matrix) -> np.ndarray:
    """(n_cells, G) numpy / scipy-sparse / torch -> float64 numpy array."""
    if hasattr(matrix, "detach"):
        matrix = matrix.detach().cpu().numpy()
    if sp.issparse(matrix):
        matrix = matrix.toarray()
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"matrix must be (n_cells, n_genes), got shape {matrix.shape}.")
    return matrix


def _check_genes(genes: Sequence[str], n_genes: int, what: str) -> pd.Index:
    genes = pd.Index([str(g) for g in genes])
    if len(genes) != n_genes:
        raise ValueError(f"{len(genes)} gene names for {what} of {n_genes} genes.")
    if genes.has_duplicates:
        raise ValueError(f"gene names repeat: {list(genes[genes.duplicated()][:5])}; make them unique.")
    return genes


def _all_pairs(score: np.ndarray, genes: pd.Index) -> pd.DataFrame:
    """(G, G) score[source, target] -> every ordered pair but self pairs, ranked."""
    source, target = np.nonzero(~np.eye(len(genes), dtype=bool))
    return _ranked(source, target, score[source, target], genes)


def _ranked(source: np.ndarray, target: np.ndarray, score: np.ndarray, genes: pd.Index) -> pd.DataFrame:
    order = np.argsort(-score, kind="stable")
    return pd.DataFrame({
        "source": pd.Categorical.from_codes(source[order], categories=genes),
        "target": pd.Categorical.from_codes(target[order], categories=genes),
        "score": score[order],
        "rank": np.arange(1, len(order) + 1, dtype=np.int64),
    })


# ---------------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------------


def random_edges(genes: Sequence[str], seed: int = 0) -> pd.DataFrame:
    """Every ordered pair of ``genes`` (G·(G−1) rows) with a uniform random score in [0, 1)."""
    genes = _check_genes(genes, len(genes), "random edges")
    score = np.random.default_rng(seed).random((len(genes), len(genes)))
    return _all_pairs(score, genes)


def correlation_edges(matrix, genes: Sequence[str]) -> pd.DataFrame:
    """Absolute Pearson correlation of every ordered gene pair over cells.

    Args:
        matrix: (n_cells, G) normalised expression (numpy, scipy sparse or torch).
        genes: (G,) gene symbols of the columns.

    Returns:
        G·(G−1) ranked edges; a gene constant over cells scores 0 with every other.
    """
    values = _dense(matrix)
    genes = _check_genes(genes, values.shape[1], "a matrix")
    with np.errstate(invalid="ignore", divide="ignore"):
        correlation = np.corrcoef(values, rowvar=False)  # (G, G)
    return _all_pairs(np.nan_to_num(np.abs(correlation), nan=0.0), genes)


def knn_graph_edges(graph, genes: Sequence[str], *, matrix=None, include_self: bool = False) -> pd.DataFrame:
    """The model's input gene graph as an edge list, in the direction attention reads it.

    Row ``g`` of the neighbour table lists the genes ``g`` attends to; each gives the edge
    neighbour → ``g``, as :func:`~scrnalf_hf.interpret.attention.attention_edges` writes it.

    Args:
        graph: a model (its ``base_model.gene_neighbors``) or a (G, k) neighbour table (numpy or
            torch, ``-1`` = padding) whose rows list the nearest neighbour first, as
            ``ScrnaLongformerProcessor.build_gene_graph`` does.
        genes: (G,) gene symbols in model order.
        matrix: (n_cells, G) normalised expression; when given, an edge scores the cosine
            similarity of its genes over these cells (what the graph was built from), else its
            neighbour order, ``1 - j / k`` for the j-th entry of the row.
        include_self: keep each gene's edge to itself.

    Returns:
        ranked edges, one per non-padding entry of the table.
    """
    if hasattr(graph, "base_model"):
        graph = graph.base_model.gene_neighbors
    table = graph.detach().cpu().numpy() if isinstance(graph, torch.Tensor) else np.asarray(graph)
    if table.ndim != 2 or not np.issubdtype(table.dtype, np.integer):
        raise ValueError(f"graph must be a model or a (G, k) integer neighbour table, got {table.dtype} {table.shape}.")
    genes = _check_genes(genes, table.shape[0], "a neighbour table")
    target, slot = np.nonzero(table >= 0)
    source = table[target, slot]
    if not include_self:
        keep = source != target
        target, slot, source = target[keep], slot[keep], source[keep]
    if matrix is None:
        score = 1.0 - slot / table.shape[1]
    else:
        values = _dense(matrix)
        if values.shape[1] != len(genes):
            raise ValueError(f"matrix has {values.shape[1]} genes but the graph {len(genes)}.")
        norms = np.linalg.norm(values, axis=0)
        unit = values / np.where(norms > 0, norms, 1.0)
        score = np.einsum("ce,ce->e", unit[:, source], unit[:, target])  # (E,) cosine per edge
    return _ranked(source, target, score.astype(np.float64), genes)


def genie3_edges(
    matrix,
    genes: Sequence[str],
    *,
    n_trees: int = 50,
    max_features: str | float = "sqrt",
    max_cells: int | None = 2000,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """GENIE3-style edges: for every target gene, extremely randomised trees regress its
    standardised expression on all other genes; each gene's impurity importance there is the
    score of its edge to the target (importances sum to 1 per target).

    Cost: G ensembles of ``n_trees`` trees on ``max_cells`` cells, one core (``n_jobs=1``).

    Args:
        matrix: (n_cells, G) normalised expression.
        genes: (G,) gene symbols.
        n_trees: trees per target (the original uses 1,000; fewer is cheaper and noisier).
        max_features: features tried per split (scikit-learn's meaning; the original's "sqrt").
        max_cells: cells sampled (seeded) to bound the cost; ``None`` = all.
        seed: seeds the cell sample and the trees.
        progress: a progress bar over target genes.

    Returns:
        G·(G−1) ranked edges.
    """
    from sklearn.ensemble import ExtraTreesRegressor

    values = _dense(matrix)
    genes = _check_genes(genes, values.shape[1], "a matrix")
    rng = np.random.default_rng(seed)
    if max_cells is not None and values.shape[0] > max_cells:
        values = values[np.sort(rng.choice(values.shape[0], max_cells, replace=False))]
    n_genes = len(genes)
    score = np.zeros((n_genes, n_genes))
    for target in tqdm(range(n_genes), desc="GENIE3", unit="gene", disable=not progress):
        response = values[:, target]
        if response.std() == 0:
            continue  # nothing to explain
        others = np.delete(np.arange(n_genes), target)
        forest = ExtraTreesRegressor(
            n_estimators=n_trees, max_features=max_features, n_jobs=1, random_state=int(rng.integers(2**31))
        )
        forest.fit(values[:, others], (response - response.mean()) / response.std())
        score[others, target] = forest.feature_importances_
    return _all_pairs(score, genes)


# ---------------------------------------------------------------------------------------------
# Scoring against a truth
# ---------------------------------------------------------------------------------------------


def _codes(edges: pd.DataFrame, genes: pd.Index, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) positions of an edge list's genes in ``genes``."""
    missing = [column for column in ("source", "target") if column not in edges.columns]
    if missing:
        raise ValueError(f"{what} must have source and target columns; found {list(edges.columns)}.")
    positions = []
    for column in ("source", "target"):
        values = edges[column]
        if isinstance(values.dtype, pd.CategoricalDtype) and values.cat.categories.equals(genes):
            codes = values.cat.codes.to_numpy().astype(np.int64)
        else:
            codes = genes.get_indexer(values.astype(str))
        if (codes < 0).any():
            unknown = list(pd.unique(values.astype(str)[codes < 0])[:5])
            raise ValueError(f"{what} names genes outside the {len(genes)} given: {unknown}.")
        positions.append(codes)
    return positions[0], positions[1]


def edge_auprc(
    scores: pd.DataFrame,
    true_edges: pd.DataFrame,
    genes: Sequence[str],
    *,
    within: pd.DataFrame | None = None,
    directed: bool = True,
) -> float:
    """Area under the precision–recall curve (scikit-learn's average precision) of edge scores
    against true edges, over every ordered pair of distinct ``genes`` (G·(G−1) pairs).

    Pairs ``scores`` leaves out rank below every scored pair (tied with one another); a pair
    scored twice keeps its higher score; self pairs are never counted.

    Args:
        scores: edges with ``source``, ``target``, ``score`` (one group: select a ``group`` of
            grouped attention edges first).
        true_edges: directed ``source`` → ``target`` truth, e.g.
            ``pd.DataFrame(adata.uns["simulation"]["regulatory_edges"])``.
        genes: the gene universe (e.g. the model's panel).
        within: only count the pairs listed here (e.g. ``knn_graph_edges(model, genes)``): does a
            method rank edges *within* that graph well?
        directed: ``False`` scores unordered pairs instead: a pair is true if either direction
            is, and scores its higher direction (for methods that cannot tell direction).

    Returns:
        AUPRC in [0, 1]; a random ranking scores about the share of true pairs.
    """
    if "group" in scores.columns and scores["group"].nunique() > 1:
        raise ValueError(
            f"scores hold {scores['group'].nunique()} groups; score one at a time, e.g. scores[scores.group == 'B']."
        )
    if "score" not in scores.columns:
        raise ValueError(f"scores must have a score column; found {list(scores.columns)}.")
    genes = _check_genes(genes, len(genes), "the gene universe")
    n_genes = len(genes)
    source, target = _codes(scores, genes, "scores")
    value = scores["score"].to_numpy(dtype=np.float64)
    if not np.isfinite(value).all():
        raise ValueError("scores hold NaN or infinite values.")
    true_source, true_target = _codes(true_edges, genes, "true_edges")

    if not directed:
        source, target = np.minimum(source, target), np.maximum(source, target)
        true_source, true_target = np.minimum(true_source, true_target), np.maximum(true_source, true_target)
    bottom = (value.min() - 1.0) if len(value) else 0.0
    pair_score = np.full(n_genes * n_genes, bottom)  # flat index source · G + target
    np.maximum.at(pair_score, source * n_genes + target, value)
    truth = np.zeros(n_genes * n_genes, dtype=bool)
    truth[true_source * n_genes + true_target] = True

    counted = ~np.eye(n_genes, dtype=bool)
    if not directed:
        counted = np.triu(counted)
    counted = counted.reshape(-1)
    if within is not None:
        within_source, within_target = _codes(within, genes, "within")
        if not directed:
            within_source, within_target = np.minimum(within_source, within_target), np.maximum(within_source, within_target)
        listed = np.zeros(n_genes * n_genes, dtype=bool)
        listed[within_source * n_genes + within_target] = True
        counted &= listed
    if not truth[counted].any():
        raise ValueError("no true edge lies among the counted pairs; AUPRC is undefined.")
    return float(average_precision_score(truth[counted], pair_score[counted]))


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------


def attention_heatmap(
    edges: pd.DataFrame,
    genes: Sequence[str],
    html_path,
    png_path=None,
    title: str = "Gene–gene attention",
) -> tuple[Path, Path | None]:
    """Heatmap of the edge scores among ``genes``: rows are sources (attended-to genes), columns
    targets (attending genes); a pair without an edge stays empty.

    Writes an interactive plotly HTML file with plotly.js inside (it opens offline; hover shows
    source, target and score) and, with ``png_path``, a static matplotlib PNG.

    Args:
        edges: one group's edges (``source``, ``target``, ``score``).
        genes: the genes to show, in this order (e.g. top regulators and their targets).
        html_path / png_path: output files (folders are created).
        title: the figure title.

    Returns:
        (html path, png path or None).
    """
    import plotly.graph_objects as go

    if "group" in edges.columns and edges["group"].nunique() > 1:
        raise ValueError(f"edges hold {edges['group'].nunique()} groups; draw one at a time.")
    shown = _check_genes(genes, len(genes), "the heatmap")
    if len(shown) == 0:
        raise ValueError("genes is empty; name the genes to draw.")
    source = shown.get_indexer(edges["source"].astype(str))
    target = shown.get_indexer(edges["target"].astype(str))
    inside = (source >= 0) & (target >= 0)
    grid = np.full((len(shown), len(shown)), np.nan)  # (source, target)
    grid[source[inside], target[inside]] = edges["score"].to_numpy(dtype=np.float64)[inside]

    labels = list(shown)
    figure = go.Figure(
        go.Heatmap(
            z=grid, x=labels, y=labels, colorscale="Viridis", hoverongaps=False, colorbar={"title": "score"},
            hovertemplate="source %{y} → target %{x}<br>score %{z:.4g}<extra></extra>",
        )
    )
    side = max(500, 14 * len(labels) + 200)
    figure.update_layout(
        title=title, width=side + 100, height=side, xaxis_title="target (attending gene)",
        yaxis_title="source (attended-to gene)", yaxis_autorange="reversed",
    )
    html_path = Path(html_path)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    figure.write_html(html_path, include_plotlyjs=True, full_html=True)

    if png_path is not None:
        from matplotlib import colormaps
        from matplotlib.figure import Figure  # no pyplot: leaves the user's backend alone

        png_path = Path(png_path)
        png_path.parent.mkdir(parents=True, exist_ok=True)
        size = max(5.0, 0.18 * len(labels) + 2.5)
        fig = Figure(figsize=(size + 1.0, size))
        ax = fig.subplots()
        colormap = colormaps["viridis"].with_extremes(bad="white")
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=colormap, interpolation="nearest")
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(len(labels)), labels, fontsize=6)
        ax.set_xlabel("target (attending gene)")
        ax.set_ylabel("source (attended-to gene)")
        ax.set_title("\n".join(textwrap.wrap(title, 70)), fontsize=9)
        fig.colorbar(image, ax=ax, label="score")
        fig.tight_layout()
        fig.savefig(png_path, dpi=150)
    return html_path, png_path


__all__ = [
    "attention_heatmap",
    "correlation_edges",
    "edge_auprc",
    "genie3_edges",
    "knn_graph_edges",
    "random_edges",
]
