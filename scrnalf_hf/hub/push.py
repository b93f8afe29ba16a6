"""Publish a Hub-ready model folder in one commit, after checking it is complete.

Everything that can be checked locally is checked before the first network call, so a bad
folder or repo id never leaves a half-published repo: weights (safetensors), config.json with an
``auto_map``, the remote-code files it and the processor name (and their relative imports), the
custom pipeline file, preprocessor_config.json, and README.md with valid card metadata. The
upload itself is a single ``create_commit``: the branch moves only if every file arrived.
"""

from __future__ import annotations

import ast
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import httpx2
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, RepositoryNotFoundError
from huggingface_hub.utils import validate_repo_id

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
    """Check that ``model_dir`` holds everything a user needs to load the model by repo id.

    Raises:
        HubFolderError: naming the first missing or broken piece and how to produce it.
    """
    root = Path(model_dir)
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
    if "model.safetensors.index.json" in files:
        shards = set(json.loads(files["model.safetensors.index.json"].read_text())["weight_map"].values())
        missing = sorted(shard for shard in shards if shard not in files)
        if missing:
            raise HubFolderError(f"{root} lacks weight shards {missing} listed in model.safetensors.index.json.")
    processor_path = require(
        "preprocessor_config.json",
        "save the processor with processor.save_pretrained(folder) (it holds the gene panel).",
    )
    config, processor = json.loads(config_path.read_text()), json.loads(processor_path.read_text())
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
    except ValueError as error:
        raise HubFolderError(f"{readme} has invalid card metadata: {error}") from error
    return HubFolder(root=root, files=files, skipped=skipped)


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
        HubFolderError: the folder is incomplete or the repo id invalid (before any network call).
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
        logger.warning("not uploading Trainer leftovers and pickles: %s", ", ".join(folder.skipped))
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
