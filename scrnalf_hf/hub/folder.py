"""Hub-ready model folders: weights, config, processor, remote code, pipeline and card together."""

from __future__ import annotations

import json
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from ..configuration_scrnalf import ScrnaLongformerConfig
from ..modeling_scrnalf import ScrnaLongformerModel, ScrnaLongformerPreTrainedModel
from ..processing_scrnalf import ScrnaLongformerProcessor
from ..training.tasks import TASKS, task_for_model
from .cards import write_model_card

# Copied beside the weights so the card's figures can be checked against their source.
RUN_RECORDS = (
    "all_results.json",
    "eval_results.json",
    "train_results.json",
    "trainer_state.json",
    "comparison.json",
    "run_info.json",
    "training_summary.json",
)


def save_hub_folder(
    model: ScrnaLongformerPreTrainedModel, processor: ScrnaLongformerProcessor, output_dir: str | Path
) -> Path:
    """Save weights (safetensors), config, processor and their remote code to ``output_dir``.

    A head whose task declares a pipeline is saved through it, so the folder also carries the
    pipeline's code and ``custom_pipelines`` in config.json and loads with
    ``pipeline(model=folder_or_repo, trust_remote_code=True)``.
    """
    output_dir = Path(output_dir)
    task = task_for_model(model)
    if task is not None and task.pipeline is not None:
        config = model.config
        if task.target_option == "label_key" and (not config.id2label or len(config.id2label) != config.num_labels):
            raise ValueError(
                "the classifier's config has no id2label; set label names before saving so predictions are readable."
            )
        pipeline_name, pipeline_class = task.pipeline
        pipeline_class(model=model, feature_extractor=processor, task=pipeline_name).save_pretrained(output_dir)
    else:
        model.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
    return output_dir


def check_model_source(name_or_path: str) -> None:
    """Raise a clear error for a ``--model`` that is neither a saved model folder nor a Hub repo
    id (transformers would answer with "Repo id must be in the form ...")."""
    path = Path(name_or_path)
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"--model {name_or_path} is a file; give the folder the model was saved to.")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{name_or_path} has no config.json, so it is not a saved model folder (save_pretrained, scrnalf "
                "finetune and scrnalf pretrain write one)."
            )
        try:
            saved = json.loads((path / "config.json").read_text())
        except (UnicodeDecodeError, ValueError) as error:
            raise ValueError(
                f"{path / 'config.json'} is not valid JSON ({error}); the folder is damaged: save the model again."
            ) from error
        model_type = saved.get("model_type") if isinstance(saved, dict) else None
        if model_type != ScrnaLongformerConfig.model_type:
            raise ValueError(
                f"{name_or_path} holds a {model_type!r} model, not a scRNA longformer ({ScrnaLongformerConfig.model_type!r}); "
                "give a folder written by scrnalf finetune / pretrain or save_pretrained of this package."
            )
        return
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(name_or_path)):
        raise FileNotFoundError(f"no model folder at {name_or_path}, and it is not a Hub repo id (ORG/NAME) either.")


@contextmanager
def model_source_errors(name_or_path: str):
    """Turn transformers' "cannot find / cannot reach" into one line naming the ``--model`` given."""
    from safetensors import SafetensorError

    check_model_source(name_or_path)
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if Path(name_or_path).exists():
            # a local folder that is incomplete or damaged (no weights, truncated weights, no processor, ...)
            raise ValueError(
                f"{name_or_path} does not load as a saved scRNA longformer ({type(error).__name__}: {first}); the "
                "folder is incomplete or damaged: save the model and its processor again (save_pretrained)."
            ) from error
        if not isinstance(error, OSError):
            raise
        raise FileNotFoundError(
            f"no model folder at {name_or_path}, and the Hub repo {name_or_path} could not be loaded ({first})."
        ) from error


def load_saved_model(model_dir: str | Path) -> ScrnaLongformerPreTrainedModel:
    """The model saved in ``model_dir`` as the class its ``config.json`` names (a known task's head
    or the bare encoder)."""
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing; point at the folder the run saved its model to.")
    config = json.loads(config_path.read_text())
    task = task_for_model(config)
    if task is not None:
        return task.model_class.from_pretrained(model_dir)
    if config.get("architectures") in (None, [ScrnaLongformerModel.__name__]):
        return ScrnaLongformerModel.from_pretrained(model_dir)
    known = [ScrnaLongformerModel.__name__, *(t.model_class.__name__ for t in TASKS.values())]
    raise ValueError(f"{config_path} names architectures {config['architectures']}; expected one of {known}.")


def export_hub_folder(
    model_dir: str | Path,
    output_dir: str | Path,
    *,
    run_dir: str | Path | None = None,
    repo_id: str | None = None,
    license: str = "mit",
    benchmark_file: str | Path | None = None,
) -> Path:
    """Turn a training run's saved model into a fresh Hub-ready folder with a filled model card.

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
    model = load_saved_model(model_dir)
    processor = ScrnaLongformerProcessor.from_pretrained(model_dir)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    save_hub_folder(model, processor, output_dir)
    for name in RUN_RECORDS:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, output_dir / name)
    write_model_card(output_dir, repo_id=repo_id, license=license, benchmark_file=benchmark_file)
    return output_dir


__all__ = ["check_model_source", "export_hub_folder", "load_saved_model", "model_source_errors", "save_hub_folder"]
