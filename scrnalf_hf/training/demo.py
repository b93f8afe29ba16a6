"""``scrnalf demo``: the main job on the bundled ``pbmc68k_reduced`` (700 human PBMCs).

Steps (progress is printed as they run):

1. convert the AnnData (``.raw``, log-normalised) to a ``datasets`` folder with ``scrnalf convert``'s API;
2. ``compare`` the tiny and default presets with logistic regression, a random forest and the
   majority class on the same stratified folds — by default the first fold of a 5-fold split,
   to stay within 10 minutes on 2 CPU cores (``--folds 0,1,2,3,4`` for all) — with balanced
   class weights for every method (``class_weighting=None`` for none): the smallest cell types
   have few cells;
3. for the best transformer preset (highest macro-F1): the confusion matrix of its held-out
   predictions and a UMAP of its cell embeddings of all cells, coloured by cell type;
4. export that preset's model of the first scored fold as the Hub-ready folder
   ``scrna-longformer-pbmc`` (weights, config, processor, remote code, run records and a model
   card filled from them, with every baseline of that fold beside it).

Everything goes to ``output_dir`` (``demo_output/`` by default): ``dataset/``,
``comparison.json|md|png``, ``confusion_matrix.png``, ``umap_cell_embeddings.png``, ``runs/``,
``scrna-longformer-pbmc/`` and ``README.md`` (the summary printed at the end).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)

# Per-preset recipe for the demo: Trainer flags (the classification task's recipe for the rest).
# The token embeddings train at the task's embedding multiple (10) of these learning rates.
DEMO_RECIPES = {
    "tiny": {"num_train_epochs": 30, "learning_rate": 3e-3},
    "default": {"num_train_epochs": 10, "learning_rate": 3e-3},
    "large": {"num_train_epochs": 10, "learning_rate": 3e-3},
}
LABEL_KEYS = ("bulk_labels", "louvain")
# The exported model's folder: the same name whichever preset wins, so that commands can name it.
HUB_FOLDER = "scrna-longformer-pbmc"


def _progress(message: str, started: float) -> None:
    print(f"[scrnalf demo {time.perf_counter() - started:5.0f} s] {message}", flush=True)


def plot_confusion_matrix(matrix: np.ndarray, label_names: Sequence[str], path: Path, title: str) -> None:
    """Row-normalised confusion matrix (rows = true label) with counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(matrix, dtype=float)
    fractions = matrix / np.clip(matrix.sum(1, keepdims=True), 1, None)
    size = max(5, 0.55 * len(label_names) + 2)
    figure, axis = plt.subplots(figsize=(size + 1, size))
    image = axis.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(label_names)):
        for j in range(len(label_names)):
            if matrix[i, j]:
                axis.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7,
                          color="white" if fractions[i, j] > 0.5 else "black")
    axis.set_xticks(range(len(label_names)), label_names, rotation=60, ha="right", fontsize=8)
    axis.set_yticks(range(len(label_names)), label_names, fontsize=8)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title, fontsize=10)
    figure.colorbar(image, ax=axis, fraction=0.046, label="fraction of true label")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_umap(embeddings: np.ndarray, labels: np.ndarray, label_names: Sequence[str], path: Path, title: str, seed: int = 0) -> None:
    """UMAP (umap-learn, 15 neighbours) of (n_cells, d) embeddings, one colour per label."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import umap

    with warnings.catch_warnings():  # umap-learn warns that a seed disables its parallelism
        warnings.simplefilter("ignore", UserWarning)
        coordinates = umap.UMAP(n_neighbors=15, random_state=seed).fit_transform(embeddings)
    figure, axis = plt.subplots(figsize=(7, 5.5))
    colours = plt.get_cmap("tab20")
    for index, name in enumerate(label_names):
        chosen = labels == index
        axis.scatter(coordinates[chosen, 0], coordinates[chosen, 1], s=6, color=colours(index % 20), label=name)
    axis.set_xticks([])
    axis.set_yticks([])
    axis.set_xlabel("UMAP 1")
    axis.set_ylabel("UMAP 2")
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1, 0.5), frameon=False)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_demo(
    output_dir: str | Path = "demo_output",
    label_key: str = "bulk_labels",
    n_folds: int = 5,
    folds: Sequence[int] = (0,),
    methods: str = "tiny,default,logreg,random_forest",
    epochs: float | None = None,
    seed: int = 0,
    class_weighting: str | None = "balanced",
) -> dict:
    """Run the demo (see the module docstring). Returns ``{"rows", "hub_folder", "files", "best"}``."""
    from ..data.bundled import load_pbmc68k_reduced
    from ..data.cells import open_cells
    from ..data.convert import convert_anndata
    from ..hub.folder import export_hub_folder
    from ..presets import PRESET_NAMES
    from .arguments import training_arguments
    from .compare import compare, parse_methods, summarise
    from .finetune import CellPart, read_targets, score_held_out
    from .reports import write_run_outputs
    from .tasks import CLASSIFICATION

    if label_key not in LABEL_KEYS:
        raise ValueError(f"the demo's label keys are {LABEL_KEYS}, got {label_key!r}.")
    started = time.perf_counter()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    task = CLASSIFICATION
    method_names = parse_methods(task, methods)
    presets = [m for m in method_names if m in PRESET_NAMES]

    _progress("converting pbmc68k_reduced (.raw, log-normalised) with scrnalf convert", started)
    dataset_dir = output_dir / "dataset"
    convert_anndata(
        load_pbmc68k_reduced(), dataset_dir, label_key=label_key, obs_keys=[k for k in LABEL_KEYS if k != label_key],
        use_raw=True, require_counts=False, species="human", overwrite=True, progress=False,
    )
    cells = open_cells(dataset_dir, name="pbmc68k_reduced")
    targets = read_targets(task, cells, label_key)
    _progress(f"{cells.n_cells} cells × {cells.genes.n_genes} genes, {len(targets.names)} cell types in {label_key!r}", started)

    training_args = {}
    for preset in presets:
        recipe = dict(DEMO_RECIPES[preset], disable_tqdm=True)
        if epochs is not None:
            recipe["num_train_epochs"] = epochs
        training_args[preset] = training_arguments(task, output_dir / "runs", seed=seed, **recipe)
    scored = f"fold {folds[0]}" if len(folds) == 1 else f"folds {', '.join(map(str, folds))}"
    _progress(f"comparing {', '.join(method_names)} on {scored} of a {n_folds}-fold stratified split", started)
    result = compare(
        task, cells, targets, method_names, output_dir, training_args, n_folds=n_folds, seed=seed,
        only_folds=folds, keep_models=True, class_weighting=class_weighting,
    )
    summary = summarise(result.rows, task)
    files = {"comparison": output_dir / "comparison.md", "comparison_plot": output_dir / "comparison.png"}
    best = hub_folder = None
    transformer_summary = [entry for entry in summary if entry["method"] in presets]
    if transformer_summary:
        best = max(transformer_summary, key=lambda entry: entry["macro_f1"][0])["method"]
        scored_cells = result.predictions[best] >= 0
        from .metrics import classification_metrics

        confusion = classification_metrics(
            targets.values[scored_cells], result.predictions[best][scored_cells], len(targets.names)
        )["confusion_matrix"]
        files["confusion_matrix"] = output_dir / "confusion_matrix.png"
        plot_confusion_matrix(confusion, targets.names, files["confusion_matrix"],
                              f"{best} preset, held-out cells of {scored} ({label_key})")

        fold = sorted(result.fold_models[best])[0]
        fit, held_out = result.fold_models[best][fold]
        everything = score_held_out(fit, CellPart(cells, targets, np.arange(cells.n_cells)))
        files["umap"] = output_dir / "umap_cell_embeddings.png"
        plot_umap(everything.cell_embeddings, targets.values, targets.names, files["umap"],
                  f"{best} preset cell embeddings (fold {fold} model), all {cells.n_cells} cells, coloured by {label_key}", seed)
        _progress(f"best preset: {best}; confusion matrix and UMAP of its cell embeddings written", started)

        run_dir = output_dir / "runs" / best / f"fold{fold}"
        baselines = [row for row in result.rows if row["fold"] == fold and row["method"] in task.baselines]
        write_run_outputs(run_dir, cells, fit, held_out, baselines, method=best, preset=best, model_name_or_path=None,
                          class_weighting=class_weighting, freeze=False)
        hub_folder = output_dir / HUB_FOLDER
        export_hub_folder(run_dir, hub_folder, repo_id=f"scrnalf/{HUB_FOLDER}")
        files["hub_folder"] = hub_folder
        _progress(f"Hub-ready folder written: {hub_folder}", started)

    table = files["comparison"].read_text()
    readme = [
        "# scrnalf demo", "", table,
        f"{len(folds)} of {n_folds} folds scored: each figure is one held-out fold of {int((result.folds >= 0).sum())} cells"
        if len(folds) == 1 else f"{len(folds)} of {n_folds} folds scored (mean ± standard deviation over folds).",
        "",
        "Every method saw the same folds and the same processor output, "
        + ("with balanced class weights" if class_weighting else "without class weights")
        + "; the transformer presets hold out 10% of their training cells for best-checkpoint selection, so they "
        "train on fewer cells than the baselines.",
        "",
        (f"Best transformer preset: `{best}` (its confusion matrix, UMAP and Hub-ready folder are written)." if best else ""),
        "",
        f"Total time: {time.perf_counter() - started:.0f} s.",
        "",
        "Files: " + ", ".join(f"`{Path(p).relative_to(output_dir)}`" for p in files.values()),
    ]
    (output_dir / "README.md").write_text("\n".join(readme) + "\n")
    print("\n" + table)
    _progress(f"done; summary in {output_dir / 'README.md'}", started)
    return {"rows": result.rows, "hub_folder": hub_folder, "files": files, "best": best}
