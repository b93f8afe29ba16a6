"""Publish a Hub-ready model folder in one commit, after checking it is complete.

Everything that can be checked locally is checked before the first network call, so a bad
folder or repo id never leaves a half-published repo: weights (safetensors), config.json with an
``auto_map``, the remote-code files it and the processor name (and their relative imports), the
custom pipeline file, preprocessor_config.json, and README.md with valid card metadata. Then the
folder is loaded as a user would load it: the config (``AutoConfig``), the processor, and every
weight tensor (``safetensors``), whose names and shapes must be those of the model the config
describes; a truncated or mismatched file is refused by name. The upload itself is a single
``create_commit``: the branch moves only if every file arrived.
"""

from __future__ import annotations

import ast
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import httpx2
import torch
import yaml
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, RepositoryNotFoundError
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig

from .. import modeling_scrnalf
from ..configuration_scrnalf import ScrnaLongformerConfig
from ..processing_scrnalf import ScrnaLongformerProcessor

# Trainer leftovers and pickles never go to the Hub: safetensors only, no optimiser state.
SKIPPED_DIR_PREFIXES = ("checkpoint-", ".")
SKIPPED_DIR_NAMES = ("runs", "__pycache__")
SKIPPED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


logger = logging.getLogger(__name__)


class HubFolderError(ValueError):
    """The folder is not ready to publish; the message says what is missing and how to fix it."""


class HubPushError(RuntimeError):
    """The Hub refused or could not be reached; nothing was committed."""


@dataclass(frozen=True)
class HubFolder:
    """A validated folder: the files to upload (repo path → local path) and those left out."""

    root: Path
    files: dict[str, Path]
    skipped: list[str]


def _remote_code_modules(auto_map: dict) -> set[str]:
    modules = set()
    for reference in auto_map.values():
        for item in reference if isinstance(reference, (list, tuple)) else [reference]:
            if item:
                modules.add(item.split("--")[-1].split(".")[0])
    return modules


def _relative_imports(source: Path) -> set[str]:
    tree = ast.parse(source.read_text(), filename=str(source))
    return {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module
    }


def validate_hub_folder(model_dir: str | Path) -> HubFolder:
    """Check that ``model_dir`` holds everything a user needs to load the model by repo id, and
    that it loads: config, processor, and every weight tensor with the shape the config implies.

    Raises:
        HubFolderError: naming the first missing or broken piece and how to produce it.
    """
    root = Path(model_dir)
    if root.is_file():
        raise HubFolderError(f"model folder {root} is a file; give the Hub-ready folder (scripts/make_hub_folders.py writes one).")
    if not root.is_dir():
        raise HubFolderError(f"model folder {root} does not exist.")
    files: dict[str, Path] = {}
    skipped: list[str] = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        in_skipped_dir = any(p.startswith(SKIPPED_DIR_PREFIXES) or p in SKIPPED_DIR_NAMES for p in relative.parts[:-1])
        if in_skipped_dir or relative.name.startswith("."):
            if path.is_file():
                skipped.append(relative.as_posix())
            continue
        if path.is_file():
            if path.suffix in SKIPPED_SUFFIXES:
                skipped.append(relative.as_posix())
            else:
                files[relative.as_posix()] = path

    def require(name: str, how: str) -> Path:
        if name not in files:
            raise HubFolderError(f"{root} has no {name}; {how}")
        return files[name]

    config_path = require("config.json", "save the model with model.save_pretrained(folder).")
    if "model.safetensors" not in files and "model.safetensors.index.json" not in files:
        raise HubFolderError(
            f"{root} has no weights (model.safetensors); save the model with model.save_pretrained(folder) "
            "— pickled .bin/.pt weights are never published."
        )
    weight_map = None
    if "model.safetensors.index.json" in files:
        weight_map = _read_json(files["model.safetensors.index.json"]).get("weight_map") or {}
        missing = sorted(shard for shard in set(weight_map.values()) if shard not in files)
        if missing:
            raise HubFolderError(f"{root} lacks weight shards {missing} listed in model.safetensors.index.json.")
    processor_path = require(
        "preprocessor_config.json",
        "save the processor with processor.save_pretrained(folder) (it holds the gene panel).",
    )
    config, processor = _read_json(config_path), _read_json(processor_path)
    for name, saved in (("config.json", config), ("preprocessor_config.json", processor)):
        if not saved.get("auto_map"):
            raise HubFolderError(
                f"{root}/{name} has no auto_map, so trust_remote_code cannot load it; save it after "
                "`import scrnalf_hf` (which registers the classes for the Auto API)."
            )
    modules = _remote_code_modules(config["auto_map"]) | _remote_code_modules(processor["auto_map"])
    for pipeline in (config.get("custom_pipelines") or {}).values():
        modules.add(pipeline["impl"].split(".")[0])
    pending = sorted(modules)
    while pending:
        module = pending.pop()
        source = require(
            f"{module}.py", "save the model, processor and pipeline with save_pretrained so their code is copied."
        )
        for imported in _relative_imports(source) - modules:
            modules.add(imported)
            pending.append(imported)
    readme = require(
        "README.md", "write the model card first (scrnalf_hf.hub.write_model_card or scripts/make_hub_folders.py)."
    )
    try:
        ModelCard(readme.read_text(encoding="utf-8"), ignore_metadata_errors=False)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 2} of README.md" if mark is not None else ""  # + the '---' line, 1-based
        problem = getattr(error, "problem", None) or error
        raise HubFolderError(
            f"{readme} has a malformed YAML metadata block (between the '---' lines): {problem}{where}; fix the "
            "YAML, or write the card again (scrnalf_hf.hub.write_model_card)."
        ) from error
    except ValueError as error:
        raise HubFolderError(f"{readme} has invalid card metadata: {error}") from error
    model_config = _load_config(root)
    _check_weights(root, weight_map, model_config)
    _load_processor(processor_path, model_config)
    return HubFolder(root=root, files=files, skipped=skipped)


def _read_json(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise HubFolderError(f"{path} is not valid JSON ({error}); save the folder again with save_pretrained.") from error
    if not isinstance(record, dict):
        raise HubFolderError(f"{path} holds a JSON {type(record).__name__}, expected an object; save it again.")
    return record


def _load_config(root: Path) -> ScrnaLongformerConfig:
    """config.json as ``AutoConfig`` reads it, through the installed classes (no code from the folder runs)."""
    try:
        config = AutoConfig.from_pretrained(root, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise HubFolderError(
            f"{root / 'config.json'} does not load as a scRNA longformer config ({type(error).__name__}: {error}); "
            "save the model again with model.save_pretrained(folder)."
        ) from error
    if not isinstance(config, ScrnaLongformerConfig):
        raise HubFolderError(
            f"{root / 'config.json'} does not load as a scRNA longformer config: it loads as "
            f"{type(config).__name__} (model_type {config.model_type!r}); publish a folder saved from a scRNA "
            "longformer with model.save_pretrained(folder)."
        )
    architectures = config.architectures or []
    model_class = getattr(modeling_scrnalf, architectures[0], None) if len(architectures) == 1 else None
    if not (isinstance(model_class, type) and issubclass(model_class, modeling_scrnalf.ScrnaLongformerPreTrainedModel)):
        raise HubFolderError(
            f"{root / 'config.json'} names architectures {architectures}; expected one scRNA longformer class "
            "(save the model with model.save_pretrained(folder))."
        )
    return config


def _load_processor(path: Path, config: ScrnaLongformerConfig) -> None:
    try:
        processor = ScrnaLongformerProcessor.from_pretrained(path.parent)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise HubFolderError(
            f"{path} does not load ({type(error).__name__}: {error}); save the processor again with "
            "processor.save_pretrained(folder)."
        ) from error
    if processor.n_genes != config.n_genes:
        raise HubFolderError(
            f"{path} holds a panel of {processor.n_genes} genes but config.json has n_genes={config.n_genes}; the "
            "processor and the model must be saved from the same run."
        )


def _config_summary(config: ScrnaLongformerConfig) -> str:
    fields = ("n_genes", "d_model", "depth", "n_heads", "knn_k", "num_labels")
    return ", ".join(f"{name}={getattr(config, name)}" for name in fields if hasattr(config, name))


def _check_weights(root: Path, weight_map: dict[str, str] | None, config: ScrnaLongformerConfig) -> None:
    """Reads every tensor and compares names and shapes with the model ``config`` describes.

    Args:
        weight_map: tensor → shard file, from ``model.safetensors.index.json``; ``None`` for a single
            ``model.safetensors``.

    The expected model is built on the ``meta`` device, so nothing is allocated, and its
    ``state_dict`` gives the names and shapes ``from_pretrained`` will require.
    """
    weight_files = ["model.safetensors"] if weight_map is None else sorted(set(weight_map.values()))
    saved: dict[str, tuple[str, tuple[int, ...]]] = {}  # tensor → (file, shape)
    for name in weight_files:
        path = root / name
        try:
            with safe_open(str(path), framework="pt") as weights:
                for tensor in weights.keys():
                    saved[tensor] = (name, tuple(weights.get_tensor(tensor).shape))
        except (SafetensorError, OSError, RuntimeError) as error:
            raise HubFolderError(
                f"{path} cannot be read as safetensors ({error}); at {path.stat().st_size:,} bytes it is probably "
                "truncated or only partly copied. Save the model again with model.save_pretrained(folder)."
            ) from error
    with torch.device("meta"):
        model = getattr(modeling_scrnalf, config.architectures[0])(config)
    expected = {tensor: tuple(value.shape) for tensor, value in model.state_dict().items()}
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})  # saved once, under their source
    if weight_map is not None:
        misplaced = sorted(t for t in set(weight_map) | set(saved) if weight_map.get(t) != saved.get(t, (None,))[0])
        if misplaced:
            raise HubFolderError(
                f"model.safetensors.index.json does not match its shards for {len(misplaced)} tensor(s), e.g. "
                f"{misplaced[:5]}; save the model again with model.save_pretrained(folder)."
            )
    where = root / weight_files[0] if len(weight_files) == 1 else f"the weight shards in {root}"
    missing = sorted(set(expected) - set(saved) - tied)
    if missing:
        raise HubFolderError(
            f"{where} lacks {len(missing)} tensor(s) of {config.architectures[0]}: {missing[:5]}; it was saved from "
            "another model or cut short. Save the model again with model.save_pretrained(folder)."
        )
    unexpected = sorted(set(saved) - set(expected))
    if unexpected:
        raise HubFolderError(
            f"{where} holds {len(unexpected)} tensor(s) {config.architectures[0]} does not have: {unexpected[:5]}; "
            "it was saved from another model. Save the model again with model.save_pretrained(folder)."
        )
    mismatched = [
        f"{tensor} has shape {shape} where the config gives {expected[tensor]}"
        for tensor, (_, shape) in sorted(saved.items())
        if shape != expected[tensor]
    ]
    if mismatched:
        raise HubFolderError(
            f"{where} does not fit config.json ({_config_summary(config)}): {'; '.join(mismatched[:3])}. Save the "
            "model and its config together with model.save_pretrained(folder)."
        )


def _check_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise HubFolderError(f"invalid repo id {repo_id!r}: {error}") from error
    if not re.fullmatch(r"[^/]+/[^/]+", repo_id):
        raise HubFolderError(f"invalid repo id {repo_id!r}: expected ORG/NAME, e.g. my-lab/scrna-longformer-tiny.")


def push_to_hub(
    model_dir: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
) -> str:
    """Upload a validated Hub-ready folder to ``repo_id`` in one commit and return its commit id.

    Creates the repo (and the branch ``revision``, from ``main``) if needed. The token comes from
    ``token`` or the usual ``huggingface_hub`` sources (``HF_TOKEN``, ``hf auth login``); the
    endpoint from ``HF_ENDPOINT``.

    Raises:
        HubFolderError: the folder is incomplete or does not load (config, processor, weights, card),
            or the repo id is invalid (all before any network call).
        HubPushError: no token, the token cannot write the repo, or the endpoint is unreachable.
    """
    _check_repo_id(repo_id)
    folder = validate_hub_folder(model_dir)
    token = token or get_token()
    if not token:
        raise HubPushError(
            "no Hugging Face token found: set HF_TOKEN, run `hf auth login`, or pass token=...; "
            "a write token is needed to publish."
        )
    if folder.skipped:
        tops = sorted({name.split("/")[0] + ("/" if "/" in name else "") for name in folder.skipped})
        logger.warning(
            "not uploading %d file(s) of Trainer checkpoints and pickles: %s", len(folder.skipped), ", ".join(tops)
        )
    api = HfApi(token=token)
    endpoint = api.endpoint or constants.ENDPOINT
    message = commit_message or f"Upload {Path(model_dir).resolve().name} with scrnalf push"
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in folder.files.items()
    ]
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None and revision != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.create_commit(repo_id, operations, commit_message=message, revision=revision)
    except httpx2.TransportError as error:
        raise HubPushError(
            f"cannot reach the Hub at {endpoint} ({error.__class__.__name__}: {error}); "
            "check HF_ENDPOINT and the network."
        ) from error
    except RepositoryNotFoundError as error:
        raise HubPushError(
            f"{repo_id} is not visible with this token at {endpoint}; check the token and the repo id."
        ) from error
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            raise HubPushError(
                f"the token cannot write to {repo_id} at {endpoint} (HTTP {status}); use a write token of a member of "
                f"{repo_id.split('/')[0]!r}."
            ) from error
        raise HubPushError(f"the Hub refused the upload to {repo_id} at {endpoint}: {error}") from error
    except RuntimeError as error:  # huggingface_hub wraps a failed LFS (weights) upload in RuntimeError
        raise HubPushError(
            f"the Hub refused the upload to {repo_id} at {endpoint}: {error} ({error.__cause__}); "
            "nothing was committed."
        ) from error
    return commit.oid


__all__ = ["HubFolder", "HubFolderError", "HubPushError", "push_to_hub", "validate_hub_folder"]
