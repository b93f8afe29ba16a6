"""Bad input to `scrnalf push`: a clear error, and nothing on the Hub that looks published."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hub_server import OTHER_TOKEN, local_hub, point_client_at, tiny_run, unreachable_endpoint  # noqa: F401
from huggingface_hub import constants

from scrnalf_cli import main as scrnalf
from scrnalf_hf.hub import HubFolderError, HubPushError, export_hub_folder, push_to_hub
from scrnalf_hf.testing.local_hub import HubError

REPO_ID = "org/scrna-longformer-tiny"


@pytest.fixture(scope="module")
def exported(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_hub_folder(tiny_run, tmp_path_factory.mktemp("export") / "scrna-longformer-tiny", repo_id=REPO_ID)


@pytest.fixture
def hub_folder(exported: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(exported, tmp_path / "scrna-longformer-tiny"))


def _drop_auto_map(path: Path) -> None:
    saved = json.loads(path.read_text())
    del saved["auto_map"]
    path.write_text(json.dumps(saved))


BROKEN_FOLDERS = {
    "no weights": (lambda f: (f / "model.safetensors").unlink(), "no weights \\(model.safetensors\\)"),
    "pickled weights only": (
        lambda f: (f / "model.safetensors").rename(f / "pytorch_model.bin"),
        "pickled .bin/.pt weights are never published",
    ),
    "no processor": (lambda f: (f / "preprocessor_config.json").unlink(), "no preprocessor_config.json"),
    "no processor code": (lambda f: (f / "processing_scrnalf.py").unlink(), "no processing_scrnalf.py"),
    "no model code": (lambda f: (f / "modeling_scrnalf.py").unlink(), "no modeling_scrnalf.py"),
    "no pipeline code": (lambda f: (f / "pipeline_scrnalf.py").unlink(), "no pipeline_scrnalf.py"),
    "no model auto_map": (lambda f: _drop_auto_map(f / "config.json"), "config.json has no auto_map"),
    "no processor auto_map": (
        lambda f: _drop_auto_map(f / "preprocessor_config.json"),
        "preprocessor_config.json has no auto_map",
    ),
    "no card": (lambda f: (f / "README.md").unlink(), "no README.md"),
    "broken card metadata": (
        lambda f: (f / "README.md").write_text((f / "README.md").read_text().replace("      value: 0.912\n", "")),
        "invalid card metadata",
    ),
}


@pytest.mark.parametrize("breakage", sorted(BROKEN_FOLDERS))
def test_incomplete_folder_is_refused_before_any_request(local_hub, hub_folder, breakage, capsys):
    break_folder, message = BROKEN_FOLDERS[breakage]
    break_folder(hub_folder)
    with pytest.raises(HubFolderError, match=message):
        push_to_hub(hub_folder, REPO_ID)
    assert scrnalf(["push", "--model-dir", str(hub_folder), "--repo-id", REPO_ID]) == 1
    assert "scrnalf push: error:" in capsys.readouterr().err
    assert local_hub.requests == []


@pytest.mark.parametrize(
    "repo_id", ["no-namespace", "org/has space", "org/two/slashes", "org/--dashes--", "org/name.git"]
)
def test_invalid_repo_id_is_refused_before_any_request(local_hub, hub_folder, repo_id):
    with pytest.raises(HubFolderError, match="invalid repo id"):
        push_to_hub(hub_folder, repo_id)
    assert local_hub.requests == []


def test_unreachable_endpoint_names_the_endpoint(hub_folder, tmp_path, monkeypatch):
    endpoint = unreachable_endpoint()
    point_client_at(monkeypatch, endpoint, tmp_path / "hf_home", "hf_any_token")
    with pytest.raises(HubPushError, match=f"cannot reach the Hub at {endpoint}"):
        push_to_hub(hub_folder, REPO_ID)


def test_missing_token_is_reported_before_any_request(local_hub, hub_folder, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    assert not Path(constants.HF_TOKEN_PATH).exists()
    with pytest.raises(HubPushError, match="no Hugging Face token found"):
        push_to_hub(hub_folder, REPO_ID)
    assert local_hub.requests == []


def test_token_without_write_access_is_refused_and_creates_nothing(local_hub, hub_folder):
    with pytest.raises(HubPushError, match="cannot write to org/scrna-longformer-tiny .*HTTP 403"):
        push_to_hub(hub_folder, REPO_ID, token=OTHER_TOKEN)
    assert local_hub.repo(REPO_ID) is None


def test_token_without_write_access_to_an_existing_repo_leaves_it_unchanged(local_hub, hub_folder):
    good = push_to_hub(hub_folder, REPO_ID)
    with pytest.raises(HubPushError, match="HTTP 403"):
        push_to_hub(hub_folder, REPO_ID, token=OTHER_TOKEN, commit_message="hijack")
    assert local_hub.repo(REPO_ID).branches["main"] == good


def test_failed_weight_upload_leaves_no_commit(local_hub, hub_folder, monkeypatch):
    def refuse(oid: str, content: bytes) -> None:
        raise HubError(400, "storage refused the object")

    monkeypatch.setattr(local_hub, "lfs_put", refuse)
    with pytest.raises(HubPushError, match="refused the upload"):
        push_to_hub(hub_folder, REPO_ID)
    repo = local_hub.repo(REPO_ID)
    assert len(repo.commits) == 1 and set(repo.commits[repo.branches["main"]].files) == {".gitattributes"}


def test_trainer_leftovers_are_not_uploaded(local_hub, hub_folder, caplog):
    (hub_folder / "checkpoint-10").mkdir()
    (hub_folder / "checkpoint-10" / "model.safetensors").write_bytes(b"old")
    (hub_folder / "training_args.bin").write_bytes(b"pickle")
    commit = push_to_hub(hub_folder, REPO_ID)
    files = set(local_hub.repo(REPO_ID).commits[commit].files)
    assert "training_args.bin" not in files and not any(f.startswith("checkpoint-") for f in files)
    assert "not uploading 2 file(s) of Trainer checkpoints and pickles: checkpoint-10/, training_args.bin" in caplog.text
