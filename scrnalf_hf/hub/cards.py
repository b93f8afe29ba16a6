"""Model and dataset cards, rendered with ``huggingface_hub.ModelCard`` / ``DatasetCard`` from the
Jinja templates in ``model_cards/`` and filled only from files a run or ``scrnalf convert`` wrote.

Files read for a model card (``model_dir`` = the Hub-ready folder; ``run_dir`` = the training
output folder, ``model_dir`` itself by default). Missing optional files leave their card fields
as "not recorded (… missing)" and log a warning naming the file:

``model_dir/config.json`` (required)
    architecture and label names.
``model_dir/preprocessor_config.json`` (required)
    gene panel (``gene_symbols``, ``gene_ids``), ``input_kind``, ``target_sum``,
    ``min_gene_overlap``, ``layer``, ``use_raw``.
``model_dir/model.safetensors`` (or a sharded index)
    parameter count (floating-point tensors; the gene graph buffer is not a parameter).
``run_dir/all_results.json``, then ``run_dir/eval_results.json`` (transformers' example-script files)
    ``eval_accuracy``, ``eval_macro_f1`` (the model on the held-out split; needed for the
    evaluation table and ``model-index``), and optionally ``eval_loss``, ``train_runtime``
    (seconds), ``train_samples_per_second``, ``eval_samples_per_second``, ``train_samples``,
    ``eval_samples``, ``epoch``, ``train_loss``.
``run_dir/comparison.json`` (optional)
    rows ``{"method", "fold", "accuracy", "macro_f1", "train_seconds"}`` on the same split (the
    ``scrnalf compare`` row format). Rows of the baselines (``logreg``, ``majority``,
    ``random_forest``, ``knn_pca``) are shown beside the model, ``logreg`` first; the model's own
    row is ignored (its figures come from ``eval_*``). Several folds are shown as mean ± std.
``run_dir/training_summary.json`` (optional)
    ``metrics.per_class_f1`` (label → F1 on the held-out cells).
``run_dir/trainer_state.json`` (optional, Trainer's)
    ``train_batch_size``, ``num_train_epochs``, ``global_step``, ``best_metric``, learning rate
    (first ``learning_rate`` in ``log_history``).
``run_dir/run_info.json`` (optional)
    ``dataset`` (Hub dataset id or name), ``label_key``, ``species``, ``tissue``,
    ``n_train_cells``, ``n_eval_cells``, ``split`` (how cells were split), ``hardware``,
    ``seed``.
``benchmark_file`` (optional, from ``scrnalf benchmark``)
    ``inference_cells_per_second``, ``train_cells_per_second``, ``device``.
"""

from __future__ import annotations

import json
import logging
import re
import statistics
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
from huggingface_hub import DatasetCard, DatasetCardData, EvalResult, ModelCard, ModelCardData

TEMPLATES = Path(__file__).parent / "model_cards"
MODEL_CARD_TEMPLATE = TEMPLATES / "model_card_template.md"
DATASET_CARD_TEMPLATE = TEMPLATES / "dataset_card_template.md"
# No Hub task is "cell-type classification"; a cell is a row of a cells × genes table.
PIPELINE_TAG = "tabular-classification"
BASE_TAGS = ["single-cell", "scRNA-seq", "transcriptomics", "biology", "scrna-longformer", "custom_code"]

logger = logging.getLogger(__name__)


def _read_json(path: Path, required: bool = False) -> dict | list | None:
    if not path.is_file():
        if required:
            raise FileNotFoundError(
                f"{path} is missing; a Hub-ready model folder needs it (save the model and processor there)."
            )
        logger.warning("model card: %s not found; its fields are marked 'not recorded'.", path)
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); rewrite it from the training run.") from error


def _count_parameters(model_dir: Path) -> int | None:
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    )
    if not all((model_dir / name).is_file() for name in files):
        return None
    total = 0
    for name in files:
        with safe_open(str(model_dir / name), framework="np") as weights:
            for key in weights.keys():
                tensor = weights.get_slice(key)
                if tensor.get_dtype().startswith(("F", "BF")):
                    shape = tensor.get_shape()
                    total += int(_product(shape))
    return total


def _product(shape: list[int]) -> int:
    result = 1
    for size in shape:
        result *= size
    return result


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", str(text).lower()).strip("-")


NOT_RECORDED = "not recorded"
BASELINE_NAMES = {
    "logreg": "logistic regression",
    "majority": "majority class",
    "random_forest": "random forest",
    "knn_pca": "kNN on PCA",
    "ridge": "ridge regression",
    "diffusion_pseudotime": "diffusion pseudotime (scanpy DPT)",
}


@dataclass
class TrainingRun:
    """What a training run left on disk, read once (see the module docstring for the keys)."""

    model_dir: Path
    run_dir: Path
    config: dict
    processor: dict
    n_parameters: int | None
    results: dict = field(default_factory=dict)
    comparison: list[dict] = field(default_factory=list)
    trainer_state: dict = field(default_factory=dict)
    training_summary: dict = field(default_factory=dict)
    run_info: dict = field(default_factory=dict)
    benchmark: dict = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)

    @classmethod
    def read(
        cls, model_dir: str | Path, run_dir: str | Path | None = None, benchmark_file: str | Path | None = None
    ) -> TrainingRun:
        model_dir = Path(model_dir)
        run_dir = model_dir if run_dir is None else Path(run_dir)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"model folder {model_dir} does not exist.")
        run = cls(
            model_dir=model_dir,
            run_dir=run_dir,
            config=_read_json(model_dir / "config.json", required=True),
            processor=_read_json(model_dir / "preprocessor_config.json", required=True),
            n_parameters=_count_parameters(model_dir),
        )
        run.sources = ["config.json", "preprocessor_config.json"]
        for name in ("eval_results.json", "all_results.json"):  # all_results wins where both have a key
            if (run_dir / name).is_file():
                run.results.update(_read_json(run_dir / name))
                run.sources.append(name)
        if not run.results:
            logger.warning(
                "model card: neither all_results.json nor eval_results.json in %s; no figures to report.", run_dir
            )
        for attribute, name in (
            ("comparison", "comparison.json"),
            ("trainer_state", "trainer_state.json"),
            ("training_summary", "training_summary.json"),
            ("run_info", "run_info.json"),
        ):
            data = _read_json(run_dir / name)
            if data is not None:
                setattr(run, attribute, data)
                run.sources.append(name)
        if benchmark_file is not None:
            run.benchmark = _read_json(Path(benchmark_file), required=True)
            run.sources.append(Path(benchmark_file).name)
        if not isinstance(run.comparison, list):
            raise ValueError(
                f"{run_dir / 'comparison.json'} must be a list of rows {{method, fold, accuracy, macro_f1}}."
            )
        return run

    # -- derived facts ---------------------------------------------------------------------------

    @property
    def labels(self) -> list[str]:
        id2label = self.config.get("id2label") or {}
        return [id2label[key] for key in sorted(id2label, key=int)]

    @property
    def task(self):
        """The head's task declaration (None for the bare encoder)."""
        from ..training.tasks import task_for_model

        return task_for_model(self.config)

    @property
    def species(self) -> str | None:
        return self.run_info.get("species")

    @property
    def tissue(self) -> str | None:
        return self.run_info.get("tissue")

    def metric(self, name: str) -> float | None:
        value = self.results.get(f"eval_{name}")
        return None if value is None else float(value)

    def baseline_rows(self) -> dict[str, list[dict]]:
        """Rows of every baseline the run measured (``comparison.json``), by method; the model's
        own rows (presets, ensembles, ``pretrained``) are left out."""
        task = self.task
        baselines = set(task.baselines) if task is not None else set(BASELINE_NAMES)
        by_method: dict[str, list[dict]] = {}
        for row in self.comparison:
            if row["method"] in baselines:
                by_method.setdefault(row["method"], []).append(row)
        return by_method


def _card_metadata(run: TrainingRun, model_name: str, license: str) -> ModelCardData:
    task = run.task
    tags = list(BASE_TAGS)
    if task is not None:
        tags.append(_slug(task.summary.split(" (")[0]))
    for extra in (run.species, run.tissue, *(run.processor.get("species") or [])):
        if extra and _slug(extra) not in tags:
            tags.append(_slug(extra))
    dataset = run.run_info.get("dataset")
    eval_results = []
    if task is not None and task.predicts:
        common = dict(
            task_type=PIPELINE_TAG,
            task_name=task.summary[0].upper() + task.summary[1:],
            dataset_type=dataset or "custom",
            dataset_name=dataset or "held-out cells of the training dataset",
            dataset_split="test",
        )
        for name, (metric_type, metric_config) in task.metric_types.items():
            value = run.metric(name)
            if value is not None:
                eval_results.append(
                    EvalResult(
                        metric_type=metric_type, metric_name=task.metric_labels.get(name, name),
                        metric_config=metric_config, metric_value=round(value, 4), **common,
                    )
                )
    return ModelCardData(
        model_name=model_name,
        library_name="transformers",
        license=license,
        tags=tags,
        datasets=[dataset] if dataset else None,
        metrics=sorted({metric_type for metric_type, _ in task.metric_types.values()}) if eval_results else None,
        pipeline_tag=PIPELINE_TAG if task is not None and task.pipeline is not None else None,
        eval_results=eval_results or None,
    )


def _evaluation(run: TrainingRun) -> tuple[str, str, str]:
    """(intro sentence, Markdown table, notes) of the held-out figures and the baselines."""
    task = run.task
    names = list(task.metric_names) if task is not None else ["loss"]
    values = {name: run.metric(name) for name in names}
    if all(value is None for value in values.values()):
        return (
            "This run recorded no evaluation figures (all_results.json / eval_results.json lack "
            + ", ".join(f"eval_{name}" for name in names) + ").",
            "",
            "",
        )
    n_eval = run.results.get("eval_samples") or run.run_info.get("n_eval_cells")
    split = run.run_info.get("split")
    intro = f"Measured on {n_eval or 'the'} held-out cells" + (f" ({split})" if split else "") + "."
    labels = [task.metric_labels.get(name, name) if task is not None else name for name in names]
    rows = ["| Method | " + " | ".join(labels) + " |", "| --- |" + " --- |" * len(names)]
    rows.append("| **this model** | " + " | ".join("—" if v is None else f"{v:.3f}" for v in values.values()) + " |")
    baselines = run.baseline_rows()
    if task is not None and task.baselines:
        intro += (
            " Every baseline below was fitted on the same training cells and scored on the same held-out cells,"
            " with the same preprocessed input."
        )
        if "logreg" in task.baselines and "logreg" not in baselines:
            logger.warning(
                "model card: no logreg row in %s; the baseline is marked 'not measured'.", run.run_dir / "comparison.json"
            )
            rows.append("| logistic regression | not measured (comparison.json missing or without a logreg row) |" + " |" * (len(names) - 1))
    for method, method_rows in sorted(baselines.items(), key=lambda item: (item[0] != "logreg", item[0])):
        cells = [_mean_std([float(r[name]) for r in method_rows]) if name in method_rows[0] else "—" for name in names]
        rows.append(f"| {BASELINE_NAMES.get(method, method)} | " + " | ".join(cells) + " |")
    notes = task.card_notes(run) if task is not None else []
    return intro, "\n".join(rows), "\n\n".join(notes)


def _training_text(run: TrainingRun) -> tuple[str, str]:
    info, results = run.run_info, run.results
    task = run.task
    dataset = info.get("dataset") or NOT_RECORDED + " (run_info.json missing)"
    n_train = results.get("train_samples") or info.get("n_train_cells")
    data = [f"- Dataset: {dataset}"]
    data.append(f"- Species / tissue: {info.get('species') or NOT_RECORDED} / {info.get('tissue') or NOT_RECORDED}")
    if task is not None and task.target_option == "label_key":
        data.append(f"- Label column: `{info.get('label_key') or NOT_RECORDED}` ({len(run.labels)} labels)")
    data.append(f"- Training cells: {n_train if n_train else NOT_RECORDED}")
    if info.get("split"):
        data.append(f"- Split: {info['split']}")
    panel = run.training_summary.get("gene_panel") or {}
    if panel.get("highly_variable_genes"):
        chosen = panel["highly_variable_genes"]
        data.append(
            f"- Gene panel: the {chosen['n_top_genes']} most variable of {chosen['chosen_from']} genes "
            f"(scanpy `highly_variable_genes`, flavor `{chosen['flavor']}`, {chosen['n_cells']} training cells)."
        )
    data.append("- The gene panel and the gene graph were chosen from the training cells only.")

    what = f"Trained for {task.summary}" if task is not None else "Trained"
    settings = run.training_summary.get("training")
    if not settings:
        return "\n".join(data), f"{what} with `transformers.Trainer`; training settings {NOT_RECORDED} (training_summary.json missing)."
    epochs = f"{settings['epochs_run']:g} epochs"
    if settings.get("early_stopped"):
        epochs += f" of {settings['epochs_planned']:g} planned (early stopping)"
    procedure = [
        f"{what} with `transformers.Trainer`: {epochs}, {settings['global_step']} optimisation steps of "
        f"{settings['batch_size']} cells, peak learning rate {settings['learning_rate']:g} "
        f"({settings['lr_scheduler_type']} schedule, warm-up {settings['warmup_steps']:g}; token embeddings at "
        f"{settings['embedding_learning_rate']:g}), weight decay {settings['weight_decay']:g}"
    ]
    if settings.get("label_smoothing"):
        procedure.append(f", label smoothing {settings['label_smoothing']:g}")
    if run.training_summary.get("class_weighting"):
        procedure.append(f", {run.training_summary['class_weighting']} class weights")
    if results.get("train_loss") is not None:
        procedure.append(f"; final training loss {float(results['train_loss']):.4f}")
    best = settings.get("best_metric")
    if best and settings.get("best_step") is not None:
        procedure.append(f"; the kept checkpoint is step {settings['best_step']} (validation {best['name']} {float(best['value']):.4f})")
    if info.get("seed") is not None:
        procedure.append(f"; seed {info['seed']}")
    return "\n".join(data), "".join(procedure) + "."


def _compute_cost(run: TrainingRun) -> dict[str, str]:
    results, bench = run.results, run.benchmark

    def throughput(value, source: str) -> str:
        return f"{float(value):,.0f} cells/s ({source})" if value is not None else NOT_RECORDED

    train_runtime = results.get("train_runtime")
    inference = bench.get("inference_cells_per_second")
    inference_source = "benchmark"
    if inference is None:
        inference, inference_source = results.get("eval_samples_per_second"), "evaluation pass of the run"
    train = bench.get("train_cells_per_second")
    train_source = "benchmark"
    if train is None:
        train, train_source = results.get("train_samples_per_second"), "Trainer's train_samples_per_second"
    return {
        "hardware": run.run_info.get("hardware") or bench.get("device") or NOT_RECORDED,
        "train_wall_time": f"{float(train_runtime):.1f} s" if train_runtime is not None else NOT_RECORDED,
        "train_cells_per_second": throughput(train, train_source),
        "inference_cells_per_second": throughput(inference, inference_source),
    }


def _citation(model_name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        package_version = version("scrnalf-hf")
    except PackageNotFoundError:
        package_version = "unreleased"
    year = date.today().year
    key = re.sub(r"[^a-z0-9]", "", model_name.lower())
    return (
        f"@software{{{key}{year},\n"
        f"  title = {{{model_name}: a kNN-masked gene-token transformer for single-cell RNA-seq}},\n"
        f"  note = {{Trained with scrnalf-hf {package_version}}},\n"
        f"  year = {{{year}}}\n"
        "}"
    )


def _species_section(processor: dict) -> str:
    """The card's species section: the species, the panel's ortholog groups, where the ortholog
    pairs came from and how each species' genes were found in them (empty for one species)."""
    species = processor.get("species")
    if not species:
        return ""
    report = processor.get("species_report") or {}
    groups = report.get("groups") or {}
    source = processor.get("orthologs") or {}
    rows = [
        "| species | genes | in ortholog groups shared with another species | species-specific | found in the table by id | by symbol |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in species:
        entry = report.get(name) or {}
        shared = entry.get("n_shared", NOT_RECORDED)
        if entry.get("n_genes"):
            shared = f"{shared} ({100 * shared / entry['n_genes']:.1f}%)"
        rows.append(
            f"| {name} | {entry.get('n_genes', NOT_RECORDED)} | {shared} | "
            f"{entry.get('n_specific', NOT_RECORDED)} | {entry.get('matched_by_id', NOT_RECORDED)} | "
            f"{entry.get('matched_by_symbol', NOT_RECORDED)} |"
        )
    shapes = ", ".join(f"{n:,} {shape}" for shape, n in groups.items()) or NOT_RECORDED
    provenance = (
        f"`{source.get('name', NOT_RECORDED)}` — {source.get('release', NOT_RECORDED)}"
        + (f", sha256 `{source['sha256'][:16]}…`" if source.get("sha256") else "")
        if source else "none (a single species)"
    )
    return "\n".join([
        "## Species and orthologs",
        "",
        f"This model knows {', '.join(species)}. Each species is read through its own genes: a one-to-one ortholog "
        "pair shares one token, the genes of a one-to-many or many-to-many group feed one token (their normalised "
        "counts summed), and genes without an ortholog keep their own token, absent (masked) in the other species' "
        f"cells. Shared tokens by shape: {shapes}. Ortholog pairs: {provenance}.",
        "",
        *rows,
        "",
        'Give the cells\' species when you use it: `processor(adata, species="mouse")`, '
        "`scrnalf predict --species mouse`.",
        "",
    ])


def _modalities_section(processor: dict) -> str:
    """The card's modalities section of a multimodal model (empty for an RNA-only one): the
    protein panel and how the processor normalises it, the ATAC peak panel."""
    proteins, peaks = processor.get("protein_names"), processor.get("peak_names")
    if not proteins and not peaks:
        return ""
    kinds = [f"RNA ({len(processor.get('gene_symbols') or [])}-gene panel)"]
    if proteins:
        kinds.append(f"protein ({len(proteins)} proteins, CITE-seq antibody counts)")
    if peaks:
        kinds.append(f"ATAC ({len(peaks)} peaks, binarised chromatin accessibility)")
    lines = ["", "## Modalities", "", f"Modalities: {', '.join(kinds[:-1])} and {kinds[-1]}.", ""]
    if proteins:
        lines += [
            f"- Protein panel: {', '.join(proteins)}.",
            "- Protein normalisation (processor): centred log-ratio per cell, `log1p(x) - mean(log1p(x))` over the cell's "
            "measured panel proteins; proteins are matched by name (case-insensitive), and an input must measure at least "
            f"{float(processor.get('min_protein_overlap', 0.5)):.0%} of the panel.",
            "- Proteins enter as tokens (panel embedding + value encoding + modality-type embedding) that attend to the gene "
            "tokens and the cell embedding in cross-modal fusion layers. Cells without proteins run on RNA alone: "
            "`processor(adata)` without `protein_counts`, or `scrnalf predict` on an RNA-only file.",
        ]
    if peaks:
        lines += [
            f"- Peak panel: the processor's `peak_names` (e.g. {', '.join(peaks[:3])}) and their `peak_coordinates`; "
            "an input's peaks are matched by name, each open (1) or closed (0) in a cell.",
            "- Peaks run through their own encoder over the peak graph (each peak's nearest peaks on its chromosome); its "
            "cell embedding joins the RNA's in the cross-modal fusion layers. `scrnalf predict` on a `.h5mu` reads its "
            "`atac` modality; cells without ATAC run on RNA alone.",
        ]
    return "\n".join([*lines, ""])


def _loading_code(task, repo_id: str, species: list[str] | None = None) -> str:
    """The card's example: load the processor and the head (and its pipeline) by repo id."""
    auto_class = task.auto_class if task is not None else "AutoModel"
    lines = [
        f"from transformers import AutoFeatureExtractor, {auto_class}" + (", pipeline" if task is not None and task.pipeline else ""),
        "",
        f'repo_id, revision = "{repo_id}", "<commit id>"',
        f"model = {auto_class}.from_pretrained(repo_id, revision=revision, trust_remote_code=True)",
        "processor = AutoFeatureExtractor.from_pretrained(repo_id, revision=revision, trust_remote_code=True)",
        f'inputs = processor(adata, species="{species[-1]}")  # the cells\' species: one of {species}'
        if species
        else "inputs = processor(adata)  # AnnData, or a matrix with gene_names=[...]",
    ]
    if task is not None and task.target_option == "label_key":
        lines.append("cell_types = model(**inputs).logits.argmax(-1)")
    else:
        lines.append("cell_embeddings = model(**inputs).cell_embedding")
    if task is not None and task.pipeline is not None:
        lines += [
            "",
            "# or, labels and scores in one call:",
            "classify = pipeline(model=repo_id, revision=revision, trust_remote_code=True)",
            'predictions = classify(adata)  # [{"label": ..., "score": ...}, ...] one per cell',
        ]
    return "\n".join(lines)


def render_model_card(
    model_dir: str | Path,
    run_dir: str | Path | None = None,
    *,
    repo_id: str | None = None,
    license: str = "mit",
    benchmark_file: str | Path | None = None,
) -> ModelCard:
    """The model card of a Hub-ready folder, filled from its training run's files.

    Args:
        model_dir: folder with config.json, preprocessor_config.json and the weights.
        run_dir: the training output folder holding all_results.json etc. (``model_dir`` if None).
        repo_id: the repo the card will live in (shown in the loading example; defaults to
            ``<org>/<folder name>``).
        license: SPDX id of the weights' license.
        benchmark_file: JSON from ``scrnalf benchmark`` with cells/s figures.
    """
    run = TrainingRun.read(model_dir, run_dir, benchmark_file)
    model_name = (repo_id or Path(model_dir).resolve().name).split("/")[-1]
    processor, config = run.processor, run.config
    intro, table, majority_note = _evaluation(run)
    training_data, training_procedure = _training_text(run)
    gene_symbols = processor.get("gene_symbols") or []
    if processor.get("input_kind") == "log1p":
        input_description = "log1p-normalised expression, used as given."
    else:
        input_description = (
            f"raw integer UMI counts; the processor scales each cell to {processor.get('target_sum', NOT_RECORDED)} "
            "counts and applies log1p."
        )
    if processor.get("use_raw"):
        source = "`.raw`"
    elif processor.get("layer") not in (None, "X"):
        source = f"layer `{processor['layer']}`"
    elif processor.get("layer") == "X" or processor.get("input_kind") == "log1p":
        source = "`.X`"
    else:
        source = "the first present of `layers['counts']`, `.raw`, `.X`"
    species_clause = f" ({run.species})" if run.species else ""
    if processor.get("species"):
        species_clause = f" (its genes of {', '.join(processor['species'])})"
    task = run.task
    if task is not None:
        task_sentence, intended_use = task.card_sentence(config), task.intended_use(config)
    else:
        task_sentence = "This checkpoint is the bare encoder: it embeds cells."
        intended_use = "cell embeddings and fine-tuning on downstream tasks with the same gene panel."
    extra_limitations = ""
    if not run.comparison:
        extra_limitations = "- No baseline was measured for this run (comparison.json missing).\n"
    card = ModelCard.from_template(
        _card_metadata(run, model_name, license),
        template_path=str(MODEL_CARD_TEMPLATE),
        model_name=model_name,
        repo_id=repo_id or f"<org>/{model_name}",
        sources="`, `".join(run.sources),
        task_sentence=task_sentence,
        n_genes=config.get("n_genes"),
        value_encoding=config.get("value_encoding"),
        n_value_bins=config.get("n_value_bins"),
        knn_k=config.get("knn_k"),
        architecture=", ".join(config.get("architectures") or [NOT_RECORDED]),
        n_parameters=f"{run.n_parameters:,}" if run.n_parameters is not None else NOT_RECORDED + " (weights missing)",
        d_model=config.get("d_model"),
        depth=config.get("depth"),
        n_heads=config.get("n_heads"),
        mlp_ratio=config.get("mlp_ratio"),
        attention_type=config.get("attention_type"),
        pooling=config.get("pooling"),
        n_labels=len(run.labels),
        labels=", ".join(run.labels) if run.labels else "none (no classification head)",
        alignment="by Ensembl id where both sides have ids, else by gene symbol (case-insensitive)"
        if processor.get("gene_ids")
        else "by gene symbol (case-insensitive)",
        min_gene_overlap=f"{float(processor.get('min_gene_overlap', 0)):.0%}",
        input_description=input_description,
        anndata_source=source,
        first_genes=", ".join(gene_symbols[:10]) + (" …" if len(gene_symbols) > 10 else ""),
        training_data=training_data,
        training_procedure=training_procedure,
        evaluation_intro=intro,
        evaluation_table=table,
        majority_note=majority_note,
        intended_use=intended_use,
        species_clause=species_clause,
        extra_limitations=extra_limitations,
        citation=_citation(model_name),
        loading_code=_loading_code(task, repo_id or f"<org>/{model_name}", processor.get("species")),
        species_section=_species_section(processor) + _modalities_section(processor),
        pipeline_file=", `pipeline_scrnalf.py`" if task is not None and task.pipeline is not None else "",
        **_compute_cost(run),
    )
    return card


def write_model_card(model_dir: str | Path, run_dir: str | Path | None = None, **kwargs) -> Path:
    """Render the model card (see :func:`render_model_card`) into ``model_dir/README.md``."""
    card = render_model_card(model_dir, run_dir, **kwargs)
    path = Path(model_dir) / "README.md"
    card.save(path)
    return path


def render_dataset_card(
    dataset_dir: str | Path,
    summary: dict | None = None,
    *,
    repo_id: str | None = None,
    license: str | None = None,
) -> DatasetCard:
    """The dataset card of a folder written by ``scrnalf convert``.

    Figures come from the folder itself: cells, columns, label counts (the ``label`` ClassLabel
    column) and species (the ``species`` column) from the Arrow data; source file, matrix, value
    kind, gene panel and label key from ``genes.json`` (or ``summary``, the same record, when
    ``convert_anndata`` calls :func:`write_dataset_card` as its ``card_writer``).

    Args:
        dataset_dir: the output folder of ``scrnalf convert``.
        summary: the conversion record; read from ``dataset_dir/genes.json`` if None.
        repo_id: the dataset repo the card will live in.
        license: SPDX id of the data's license (the source data's terms decide it).
    """
    from datasets import ClassLabel, load_from_disk

    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise FileNotFoundError(f"dataset folder {dataset_dir} does not exist; write it with `scrnalf convert`.")
    if summary is None:
        summary = _read_json(dataset_dir / "genes.json")
        if summary is None:
            raise FileNotFoundError(
                f"{dataset_dir}/genes.json is missing: {dataset_dir} was not written by scrnalf convert."
            )
    cells = load_from_disk(str(dataset_dir))
    features = cells.features
    species = sorted(set(cells["species"])) if "species" in features else []
    n_cells = len(cells)
    size_category = next(
        (
            name
            for bound, name in (
                (1_000, "n<1K"),
                (10_000, "1K<n<10K"),
                (100_000, "10K<n<100K"),
                (1_000_000, "100K<n<1M"),
            )
            if n_cells < bound
        ),
        "1M<n<10M",
    )
    has_labels = isinstance(features.get("label"), ClassLabel)
    pretty_name = (repo_id or dataset_dir.resolve().name).split("/")[-1]
    card_data = DatasetCardData(
        license=license,
        pretty_name=pretty_name,
        size_categories=[size_category],
        task_categories=["tabular-classification"] if has_labels else None,
        tags=["single-cell", "scRNA-seq", "transcriptomics", "biology", *(_slug(name) for name in species)],
    )
    columns_list = "\n".join(f"- `{name}`: {feature}" for name, feature in features.items())
    if has_labels:
        names = features["label"].names
        counts = np.bincount(np.asarray(cells["label"], dtype=np.int64), minlength=len(names))
        labels_section = "\n".join(
            [f"Column `label` (from `obs['{summary.get('label_key')}']`), {len(names)} labels:", ""]
            + ["| Label | Cells |", "| --- | --- |"]
            + [f"| {names[i]} | {int(counts[i]):,} |" for i in np.argsort(-counts, kind="stable")]
        )
    else:
        labels_section = "No label column (converted without `--label-key`)."
    gene_ids = summary.get("gene_ids")
    source_section = "\n".join(
        [
            f"- Source: {summary.get('source', NOT_RECORDED)}",
            f"- Values: `{summary.get('matrix', NOT_RECORDED)}`, "
            + ("raw integer counts" if summary.get("input_kind") == "counts" else "log-normalised values"),
            f"- Genes: {len(summary.get('gene_symbols') or []):,}"
            + (" with Ensembl ids" if gene_ids else " (symbols only)")
            + "; the list is in `genes.json`, and each cell stores only its nonzero genes.",
            f"- Species: {', '.join(species) if species else NOT_RECORDED}",
        ]
    )
    return DatasetCard.from_template(
        card_data,
        template_path=str(DATASET_CARD_TEMPLATE),
        pretty_name=pretty_name,
        dataset_dir=dataset_dir.name,
        repo_id=repo_id or f"<org>/{pretty_name}",
        splits_table=f"One split of {n_cells:,} cells.",
        columns_list=columns_list,
        labels_section=labels_section,
        source_section=source_section,
        limitations="Cell-type labels come from the source annotation and carry its errors; cells of one study "
        "share its protocol and batch effects, so models trained here should be checked on other data.",
    )


def write_dataset_card(dataset_dir: str | Path, summary: dict | None = None, **kwargs) -> Path:
    """Render the dataset card (see :func:`render_dataset_card`) into ``dataset_dir/README.md``.

    Its signature fits ``convert_anndata(..., card_writer=write_dataset_card)``.
    """
    path = Path(dataset_dir) / "README.md"
    render_dataset_card(dataset_dir, summary, **kwargs).save(path)
    return path


__all__ = ["TrainingRun", "render_dataset_card", "render_model_card", "write_dataset_card", "write_model_card"]
