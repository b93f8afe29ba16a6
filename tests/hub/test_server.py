"""The local Hub server answers huggingface_hub the way huggingface.co does, for plain files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx2
import pytest
from hub_server import WRITE_TOKEN, local_hub  # noqa: F401 - fixture
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from scrnalf_hf.testing.local_hub import LocalHub, git_blob_oid


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "folder"
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"n_genes": 3}')
    (root / "model.safetensors").write_bytes(bytes(range(256)) * 8)
    (root / "sub" / "notes.txt").write_text("nested")
    return root


def test_upload_folder_then_snapshot_download_returns_the_same_bytes(local_hub, folder):
    api = HfApi()
    api.create_repo("org/plain")
    commit = api.upload_folder(repo_id="org/plain", folder_path=folder, commit_message="add").oid
    snapshot = Path(snapshot_download("org/plain", revision=commit))
    for path in ("config.json", "model.safetensors", "sub/notes.txt"):
        assert (snapshot / path).read_bytes() == (folder / path).read_bytes()
    assert api.model_info("org/plain").sha == commit
    tree = {entry.path: entry for entry in api.list_repo_tree("org/plain", recursive=True)}
    assert (
        tree["model.safetensors"].lfs.sha256 == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    )
    assert tree["config.json"].lfs is None and tree["config.json"].blob_id == git_blob_oid(b'{"n_genes": 3}')
    assert sorted(e.path for e in api.list_repo_tree("org/plain")) == [
        ".gitattributes",
        "config.json",
        "model.safetensors",
        "sub",
    ]


def test_resolve_sends_commit_and_etag_headers(local_hub, folder):
    api = HfApi()
    api.create_repo("org/plain")
    commit = api.upload_folder(repo_id="org/plain", folder_path=folder, commit_message="add").oid
    weights = (folder / "model.safetensors").read_bytes()
    response = httpx2.head(f"{local_hub.endpoint}/org/plain/resolve/main/model.safetensors")
    assert response.status_code == 200
    assert response.headers["X-Repo-Commit"] == commit
    assert response.headers["X-Linked-Etag"] == f'"{hashlib.sha256(weights).hexdigest()}"'
    assert int(response.headers["X-Linked-Size"]) == len(weights)
    config = httpx2.get(f"{local_hub.endpoint}/org/plain/resolve/{commit}/config.json")
    assert config.headers["ETag"] == f'"{git_blob_oid(config.content)}"'


def test_missing_repo_revision_and_file_raise_the_hub_errors(local_hub, folder):
    HfApi().create_repo("org/plain")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/absent", "config.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("org/plain", ".gitattributes", revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("org/plain", "config.json")


def test_private_repo_is_invisible_without_its_token(local_hub):
    HfApi().create_repo("org/secret", private=True)
    assert HfApi().model_info("org/secret").private
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).model_info("org/secret")


def test_commit_naming_a_never_uploaded_weight_file_is_refused_whole(local_hub):
    HfApi().create_repo("org/plain")
    head = local_hub.repo("org/plain").branches["main"]
    lines = [
        {"key": "header", "value": {"summary": "half"}},
        {"key": "file", "value": {"path": "config.json", "content": "e30=", "encoding": "base64"}},
        {"key": "lfsFile", "value": {"path": "model.safetensors", "algo": "sha256", "oid": "0" * 64, "size": 3}},
    ]
    response = httpx2.post(
        f"{local_hub.endpoint}/api/models/org/plain/commit/main",
        content="\n".join(json.dumps(line) for line in lines),
        headers={"Authorization": f"Bearer {WRITE_TOKEN}", "Content-Type": "application/x-ndjson"},
    )
    assert response.status_code == 422
    assert local_hub.repo("org/plain").branches["main"] == head


def test_commit_on_a_stale_parent_is_refused(local_hub):
    api = HfApi()
    api.create_repo("org/plain")
    first = api.upload_file(path_or_fileobj=b"1", path_in_repo="a.txt", repo_id="org/plain").oid
    api.upload_file(path_or_fileobj=b"2", path_in_repo="a.txt", repo_id="org/plain")
    with pytest.raises(HfHubHTTPError, match="412"):
        api.upload_file(path_or_fileobj=b"3", path_in_repo="a.txt", repo_id="org/plain", parent_commit=first)


def test_a_restarted_server_on_the_same_storage_serves_the_same_commits(local_hub, folder):
    api = HfApi()
    api.create_repo("org/plain")
    commit = api.upload_folder(repo_id="org/plain", folder_path=folder, commit_message="add").oid
    with LocalHub(root=local_hub.root, tokens={}) as restarted:
        response = httpx2.get(f"{restarted.endpoint}/org/plain/resolve/{commit}/model.safetensors")
        assert response.status_code == 200 and response.headers["X-Repo-Commit"] == commit
        assert response.content == (folder / "model.safetensors").read_bytes()
        assert restarted.repo("org/plain").branches["main"] == commit
