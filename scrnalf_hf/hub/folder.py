"""Hub-ready model folders: weights, config, processor, remote code, pipeline and card together."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .. import modeling_scrnalf
from ..modeling_scrnalf import ScrnaLongformerForCellClassification, ScrnaLongformerPreTrainedModel
from ..processing_scrnalf import ScrnaLongformerProcessor
from .cards import write_model_card
from .pipeline_scrnalf import TASK, CellTypeClassificationPipeline

# Copied beside the weights so the card's figures can be checked against their source.
RUN_RECORDS = (
    "all_results.json",
    "eval_results.json",
    "train_results.json",
    "comparison.json",
    "run_info.json",
    "training_summary.json",
)


def save_hub_folder(
    model: ScrnaLongformerPreTrainedModel, processor: ScrnaLongformerProcessor, output_dir: str | Path
) -> Path:
    """Save weights (safetensors), config, processor and their remote code to ``output_dir``.

    A cell classifier is saved through its pipeline, so the folder also carries
    ``pipeline_scrnalf.py`` and ``custom_pipelines`` in config.json and loads with
    ``pipeline(model=folder_or_repo, trust_remote_code=True)``.
    """
    output_dir = Path(output_dir)
    if isinstance(model, ScrnaLongformerForCellClassification):
        if not model.config.id2label or len(model.config.id2label) != model.config.num_labels:
            raise ValueError(
                "the classifier's config has no id2label; set label names before saving so predictions are readable."
            )
        CellTypeClassificationPipeline(model=model, feature_extractor=processor, task=TASK).save_pretrained(output_dir)
    else:
        model.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
    return output_dir


def export_hub_folder(
    model_dir: str | Path,
    output_dir: str | Path,
    *,
    run_dir: str | Path | None = None,
    repo_id: str | None = None,
    license: str = "mit",
    benchmark_file: str | Path | None = None,
) -> Path:
    """Turn a training run's saved model into a Hub-ready folder with a filled model card.

    Args:
        model_dir: where the run saved the model and processor (``save_pretrained``).
        output_dir: the Hub-ready folder to write (created; must not be ``model_dir``).
        run_dir: folder with the run's all_results.json etc. (``model_dir`` if None).
        repo_id, license, benchmark_file: passed to :func:`~scrnalf_hf.hub.cards.render_model_card`.
    """
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    run_dir = model_dir if run_dir is None else Path(run_dir)
    if output_dir.resolve() == model_dir.resolve():
        raise ValueError(f"output_dir must differ from model_dir ({model_dir}); the Hub folder is written fresh.")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing; point model_dir at the folder the run saved its model to.")
    architectures = json.loads(config_path.read_text()).get("architectures") or []
    if len(architectures) != 1 or not hasattr(modeling_scrnalf, architectures[0]):
        raise ValueError(f"{config_path} names architectures {architectures}; expected one scRNA longformer class.")
    model = getattr(modeling_scrnalf, architectures[0]).from_pretrained(model_dir)
    processor = ScrnaLongformerProcessor.from_pretrained(model_dir)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    save_hub_folder(model, processor, output_dir)
    for name in RUN_RECORDS:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, output_dir / name)
    write_model_card(output_dir, run_dir, repo_id=repo_id, license=license, benchmark_file=benchmark_file)
    return output_dir


__all__ = ["save_hub_folder", "export_hub_folder"]
