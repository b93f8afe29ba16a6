"""``scrnalf grn`` / ``explain`` / ``perturb``: the tools of :mod:`scrnalf_hf.tl` on an ``.h5ad``
file, with their tables and pictures written as files.

Each command checks its arguments and the output before reading any cell, writes every output
under a hidden staging name in the output folder and renames it into place only when all are
complete, so a failure leaves nothing half-written and no earlier output replaced.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..staging import remove_dead_staging, staging_path

logger = logging.getLogger(__name__)

_STAGING = ".interpret-incomplete"


def _read_cells(input_path, max_cells: int | None, seed: int):
    """The input AnnData in memory (``max_cells`` of them drawn at random, order kept)."""
    from ..data.anndata_io import read_anndata

    input_path = Path(input_path)
    if not input_path.is_file():
        raise FileNotFoundError(f"no AnnData file at {input_path}; expected an existing .h5ad file.")
    if max_cells is not None and max_cells < 1:
        raise ValueError(f"--max-cells must be a positive number of cells, got {max_cells}.")
    adata = read_anndata(input_path)
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"{input_path} has {adata.n_obs} cells × {adata.n_vars} genes: nothing to analyse.")
    if max_cells is not None and adata.n_obs > max_cells:
        rows = np.sort(np.random.default_rng(seed).choice(adata.n_obs, max_cells, replace=False))
        adata = adata[rows].copy()
        logger.info("analysing %d cells drawn at random from %s (--max-cells)", max_cells, input_path)
    return adata


def _check_outputs(paths: Sequence[Path], overwrite: bool) -> None:
    for path in paths:
        for folder in path.parents:
            if folder.exists():
                if not folder.is_dir():
                    raise NotADirectoryError(f"{path} lies under {folder}, which is a file; choose another output.")
                break
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder; choose another output.")
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; choose another output or pass --overwrite to replace it.")


def _write_all(writers: dict[Path, Callable[[Path], None]]) -> list[Path]:
    """Write each output through its writer into a staging folder beside it, then rename every
    file into place: all of them or none."""
    folders = {path.parent for path in writers}
    staged = {}
    try:
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            remove_dead_staging(folder, _STAGING, "scrnalf grn/explain/perturb")
        staging = {folder: staging_path(folder, _STAGING) for folder in folders}
        for folder in staging.values():
            folder.mkdir()
        for path, write in writers.items():
            staged[path] = staging[path.parent] / path.name
            write(staged[path])
        for path, written in staged.items():
            os.replace(written, path)
    finally:
        for folder in locals().get("staging", {}).values():
            shutil.rmtree(folder, ignore_errors=True)
    for path in writers:
        logger.info("wrote %s", path)
    return list(writers)


def _tsv(frame: pd.DataFrame) -> Callable[[Path], None]:
    return lambda path: frame.to_csv(path, sep="\t", index=False)


def _json(record: dict) -> Callable[[Path], None]:
    return lambda path: path.write_text(json.dumps(record, indent=2, default=float) + "\n")


def _strongest_genes(edges: pd.DataFrame, n: int) -> list[str]:
    """The ``n`` genes with the largest summed edge score (as source or target)."""
    totals = pd.concat([edges.groupby("source")["score"].sum(), edges.groupby("target")["score"].sum()])
    return list(totals.groupby(level=0).sum().sort_values(ascending=False).index[:n])


def grn_file(
    model: str, input_path, output_path, *, group_by: str | None = None, method: str = "attention",
    layers: str | Sequence[int] = "all", heatmap_genes: Sequence[str] | None = None, heatmap_top: int = 30,
    max_cells: int | None = None, batch_size: int = 64, layer: str | None = None, use_raw: bool | None = None,
    overwrite: bool = False, seed: int = 0,
) -> list[Path]:
    """``scrnalf grn``: the ranked edge list as TSV at ``output_path``, plus an interactive heatmap
    (``.html``) and a static one (``.png``) of the edges among ``heatmap_genes`` (by default the
    ``heatmap_top`` genes with the strongest edges; the first group's edges with ``group_by``)."""
    from .. import tl
    from .grn import attention_heatmap

    output_path = Path(output_path)
    html, png = output_path.with_suffix(".html"), output_path.with_suffix(".png")
    _check_outputs([output_path, html, png], overwrite)
    adata = _read_cells(input_path, max_cells, seed)
    tl.grn(adata, model, group_by=group_by, method=method, layers=layers, batch_size=batch_size, layer=layer,
           use_raw=use_raw)
    edges = adata.uns[tl.GRN_KEY]["edges"]
    shown = edges if group_by is None else edges[edges["group"] == edges["group"].iloc[0]]
    genes = list(heatmap_genes) if heatmap_genes else _strongest_genes(shown, heatmap_top)
    missing = sorted(set(genes) - set(edges["source"]) - set(edges["target"]))
    if missing:
        raise ValueError(f"--heatmap-genes {missing[:10]} have no edge in the model's gene graph; name genes of its panel.")
    title = f"{method} edges" + ("" if group_by is None else f", {group_by} = {shown['group'].iloc[0]}")
    return _write_all({
        output_path: _tsv(edges),
        # one drawing writes both pictures into the staging folder
        html: lambda path: attention_heatmap(shown, genes, path, path.with_name(png.name), title=title),
        png: lambda path: None,
    })


def explain_file(
    model: str, input_path, output_dir, *, label_key: str | None = None, labels: Sequence[str] | None = None,
    method: str = "integrated_gradients", n_top: int = 20, n_steps: int = 32, max_cells: int | None = None,
    batch_size: int = 32, layer: str | None = None, use_raw: bool | None = None, overwrite: bool = False,
    seed: int = 0,
) -> list[Path]:
    """``scrnalf explain``: each class's top genes (``top_genes.tsv``), a bar plot per class
    (``top_genes.png``) and the run (``explain.json``) in ``output_dir``."""
    from .. import tl
    from .importance import plot_importance

    output_dir = Path(output_dir)
    outputs = [output_dir / name for name in ("top_genes.tsv", "top_genes.png", "explain.json")]
    _check_outputs(outputs, overwrite)
    adata = _read_cells(input_path, max_cells, seed)
    tl.explain(adata, model, label_key=label_key, method=method, n_top=n_top, n_steps=n_steps, layer=layer,
               use_raw=use_raw, batch_size=batch_size)
    top = adata.uns[tl.IMPORTANCE_KEY]["top_genes"]
    if labels:
        unknown = sorted(set(labels) - set(top["class"]))
        if unknown:
            raise ValueError(f"--labels {unknown} are not among the explained classes {sorted(set(top['class']))}.")
        top = top[top["class"].isin(labels)]
    per_class = {name: part.drop(columns="class") for name, part in top.groupby("class", sort=False)}
    record = {
        "model": str(model), "input": str(input_path), "method": method, "n_cells": int(adata.n_obs),
        "label_key": label_key, "classes": {name: part["gene"].tolist() for name, part in per_class.items()},
    }
    return _write_all({
        outputs[0]: _tsv(top), outputs[1]: lambda path: plot_importance(per_class, path), outputs[2]: _json(record),
    })


def perturb_file(
    model: str, input_path, output_dir, genes: Sequence[str], *, mode: str = "delete", group_by: str | None = None,
    group: str | None = None, target_label: str | None = None, rank_genes: Sequence[str] | None = None,
    max_cells: int | None = None, batch_size: int = 64, layer: str | None = None, use_raw: bool | None = None,
    overwrite: bool = False, seed: int = 0,
) -> list[Path]:
    """``scrnalf perturb``: per-gene shifts (``gene_shift.tsv``), per-cell embedding shifts
    (``cell_shift.tsv``), a picture (``perturbation.png``), the run (``perturbation.json``) and,
    with ``rank_genes``, the candidates ranked by how far perturbing each moves the cells toward
    ``target_label`` (``ranking.tsv``) in ``output_dir``."""
    from .. import tl
    from .perturb import perturb, plot_perturbation, rank_perturbations

    if (group_by is None) != (group is None):
        raise ValueError("--group-by and --group go together: the obs column and the value of the cells to perturb.")
    if rank_genes is not None and target_label is None:
        raise ValueError("--rank-genes ranks candidates by their move toward a target state; give --target-label too.")
    output_dir = Path(output_dir)
    names = ["gene_shift.tsv", "cell_shift.tsv", "perturbation.png", "perturbation.json"]
    if rank_genes is not None:
        names.append("ranking.tsv")
    outputs = {name: output_dir / name for name in names}
    _check_outputs(list(outputs.values()), overwrite)
    adata = _read_cells(input_path, max_cells, seed)
    model, processor = tl.resolve_model(model)
    result = perturb(model, processor, adata, list(genes), mode=mode, group_by=group_by, group=group,
                     target_label=target_label, batch_size=batch_size, layer=layer, use_raw=use_raw)
    cells = pd.DataFrame({"cell": result.cell_names, "embedding_shift": result.embedding_shift})
    if result.target_shift is not None:
        cells["target_shift"] = result.target_shift
    record = {
        "model": str(getattr(model, "name_or_path", "")), "input": str(input_path), "genes": list(genes), "mode": mode,
        "group_by": group_by, "group": group, "target_label": target_label, "n_cells": int(len(result.cell_names)),
        "mean_embedding_shift": float(np.mean(result.embedding_shift)),
        "mean_target_shift": None if result.target_shift is None else float(np.mean(result.target_shift)),
    }
    writers = {
        outputs["gene_shift.tsv"]: _tsv(result.to_frame()),
        outputs["cell_shift.tsv"]: _tsv(cells),
        outputs["perturbation.png"]: lambda path: plot_perturbation(result, path),
        outputs["perturbation.json"]: _json(record),
    }
    if rank_genes is not None:
        ranking = rank_perturbations(model, processor, adata, list(rank_genes), mode=mode, target_label=target_label,
                                     group_by=group_by, group=group, batch_size=batch_size, layer=layer, use_raw=use_raw)
        writers[outputs["ranking.tsv"]] = _tsv(ranking)
    return _write_all(writers)


__all__ = ["explain_file", "grn_file", "perturb_file"]
