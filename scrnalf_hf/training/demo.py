"""``scrnalf demo``: the main job on the bundled ``pbmc68k_reduced`` (700 human PBMCs).

Steps (progress is logged as they run):

1. convert the AnnData (``.raw``, log-normalised) to a ``datasets`` folder with ``scrnalf convert``'s API;
2. ``compare`` the tiny and default presets with logistic regression (and the other requested
   baselines and the majority class) on the same stratified folds — by default the first fold of
   a 5-fold split, to stay within 10 minutes on 2 CPU cores (``--folds 0,1,2,3,4`` for all) —
   with balanced class weights for every method (``class_weighting=None`` for none): louvain's
   smallest clusters have 13–19 cells;
3. plot the confusion matrix of the best transformer preset's held-out predictions and a UMAP of
   the tiny model's cell embeddings of all cells, coloured by label;
4. export the tiny model of the first scored fold as a Hub-ready ``scrna-longformer-tiny`` folder
   (weights, config, processor, remote code, run records and a model card filled from them).

Everything goes to ``output_dir`` (``demo_output/`` by default):
``dataset/``, ``comparison.json|md|png``, ``confusion_matrix.png``, ``umap_cell_embeddings.png``,
``runs/``, ``scrna-longformer-tiny/`` and ``README.md`` (the summary printed at the end).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)

# Per-preset recipe for the demo: Trainer flags (see FINETUNE_DEFAULTS for the rest).
# The token embeddings train at EMBEDDING_LR_MULTIPLIER (10) × these learning rates.
DEMO_RECIPES = {
    "tiny": {"num_train_epochs": 30, "learning_rate": 3e-3},
    "default": {"num_train_epochs": 10, "learning_rate": 3e-3},
    "large": {"num_train_epochs": 10, "learning_rate": 3e-3},
}


def _progress(message: str, started: float) -> None:
    print(f"[scrnalf demo {time.perf_counter() - started:6.0f} s] {message}", flush=True)


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import umap

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
    label_key: str = "louvain",
    n_folds: int = 5,
    folds: Sequence[int] = (0,),
    methods: str = "tiny,default,logreg,random_forest",
    epochs: float | None = None,
    seed: int = 0,
    class_weighting: str | None = "balanced",
) -> dict:
    """Run the demo (see the module docstring). Returns ``{"rows", "hub_folder", "files"}``."""
    from ..data.bundled import load_pbmc68k_reduced
    from ..data.convert import convert_anndata
    from .cells import encode, load_labelled_cells
    from .compare import PRESETS, compare, comparison_table, default_training_args, parse_methods, summarise
    from .finetune import predict_cells, write_run_outputs
    from .metrics import classification_metrics

    started = time.perf_counter()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    method_names = parse_methods(methods)
    presets = [m for m in method_names if m in PRESETS]

    _progress("converting pbmc68k_reduced (.raw, log-normalised) with scrnalf convert", started)
    adata = load_pbmc68k_reduced()
    other_keys = [k for k in ("bulk_labels", "louvain") if k != label_key]
    dataset_dir = output_dir / "dataset"
    convert_anndata(adata, dataset_dir, label_key=label_key, obs_keys=other_keys, use_raw=True,
                    require_counts=False, overwrite=True, progress=False)
    cells = load_labelled_cells(dataset_dir, label_key, dataset_name="pbmc68k_reduced")
    _progress(f"{cells.n_cells} cells × {len(cells.gene_symbols)} genes, {cells.n_classes} labels in {label_key!r}", started)

    training_args = {}
    for preset in presets:
        recipe = dict(DEMO_RECIPES[preset])
        if epochs is not None:
            recipe["num_train_epochs"] = epochs
        training_args[preset] = default_training_args(output_dir / "runs", seed=seed, **recipe)
    _progress(f"comparing {', '.join(method_names)} on fold(s) {list(folds)} of a {n_folds}-fold stratified split", started)
    result = compare(
        cells, method_names, output_dir, n_folds=n_folds, seed=seed, training_args=training_args,
        only_folds=folds, keep_models=True, class_weighting=class_weighting,
    )

    summary = summarise(result.rows)
    transformer_summary = [entry for entry in summary if entry["method"] in PRESETS]
    files = {"comparison": output_dir / "comparison.md", "comparison_plot": output_dir / "comparison.png"}
    if transformer_summary:
        best = max(transformer_summary, key=lambda entry: entry["macro_f1"][0])["method"]
        scored = result.predictions[best] >= 0
        confusion = classification_metrics(cells.labels[scored], result.predictions[best][scored], cells.n_classes)["confusion_matrix"]
        files["confusion_matrix"] = output_dir / "confusion_matrix.png"
        plot_confusion_matrix(confusion, cells.label_names, files["confusion_matrix"],
                              f"{best} preset, held-out cells of fold(s) {list(folds)} ({label_key})")
        _progress(f"confusion matrix of the best preset ({best}) written", started)

    hub_folder = None
    if "tiny" in result.fold_models:
        fold = sorted(result.fold_models["tiny"])[0]
        tiny = result.fold_models["tiny"][fold]
        features = encode(tiny.processor, cells)
        _, embeddings, _ = predict_cells(tiny.model, features["expression"], features["attention_mask"])
        files["umap"] = output_dir / "umap_cell_embeddings.png"
        plot_umap(embeddings, cells.labels, cells.label_names, files["umap"],
                  f"tiny preset cell embeddings (fold {fold} model), all {cells.n_cells} cells, coloured by {label_key}", seed)
        _progress("UMAP of the tiny model's cell embeddings written", started)

        run_dir = output_dir / "runs" / "tiny" / f"fold{fold}"
        baselines = [row for row in result.rows if row["fold"] == fold and row["method"] in ("majority", "logreg")]
        if {row["method"] for row in baselines} == {"majority", "logreg"}:
            write_run_outputs(run_dir, cells, tiny, method="tiny", preset="tiny", model_name_or_path=None,
                              class_weighting=class_weighting, freeze=False, baselines=baselines)
        hub_folder = output_dir / "scrna-longformer-tiny"
        try:
            from ..hub.folder import export_hub_folder
        except ImportError as error:  # the hub module is another area's; the demo still runs without it
            logger.warning("scrnalf_hf.hub is not importable (%s); saving the tiny model without a model card.", error)
            tiny.trainer.save_model(str(hub_folder))
        else:
            export_hub_folder(run_dir, hub_folder, run_dir=run_dir, repo_id="scrnalf/scrna-longformer-tiny")
        files["hub_folder"] = hub_folder
        _progress(f"Hub-ready folder written: {hub_folder}", started)

    table = comparison_table(result.rows, title=f"pbmc68k_reduced, `{label_key}`, fold(s) {list(folds)} of {n_folds}-fold stratified CV")
    readme = [
        "# scrnalf demo", "", table, "",
        f"Total time: {time.perf_counter() - started:.0f} s.", "",
        "Files: " + ", ".join(f"`{Path(p).relative_to(output_dir)}`" for p in files.values()),
        "",
        "Every method saw the same folds and the same processor output, "
        + ("with balanced class weights" if class_weighting else "without class weights")
        + "; the transformer presets hold out 10% "
        "of their training cells for best-checkpoint selection, so they train on fewer cells than the baselines.",
    ]
    (output_dir / "README.md").write_text("\n".join(readme) + "\n")
    _progress(f"done; summary in {output_dir / 'README.md'}", started)
    return {"rows": result.rows, "hub_folder": hub_folder, "files": files}
