"""A Hugging Face Hub stand-in on 127.0.0.1, for tests and offline demos of publishing.

The real Hub is unreachable from CI, so the publishing round trip (``scrnalf push`` →
``from_pretrained(repo_id, revision=commit)``) is exercised against this server instead. It speaks
the part of the Hub HTTP API that ``huggingface_hub`` 2.x uses for ``create_repo``,
``create_branch``, ``create_commit`` / ``upload_folder`` (preupload, the git-LFS batch API with
basic single-part transfers, ndjson commits with base64 and LFS entries), ``validate-yaml``,
repo info, tree listing and ``resolve/{revision}/{path}`` (with ``X-Repo-Commit``,
``ETag`` / ``X-Linked-Etag``), which is everything ``hf_hub_download``, ``snapshot_download`` and
transformers' ``from_pretrained`` / ``pipeline`` touch.

Storage lives in a directory: content-addressed blobs (``blobs/<sha256>``) and one JSON file per
repo holding its branches and its commits. A commit is an immutable snapshot (path → blob) whose id
is a 40-hex sha1, so a pinned revision never changes.

What it does not do: Xet storage (clients must run with ``HF_HUB_DISABLE_XET=1``; see
:func:`client_environment`), multi-part LFS, ranged (resumed) downloads, ``whoami``, refs
listing, pull requests, tags, pagination, gated repos, or any of the Hub's web pages. Tokens are
plain strings mapped to the namespaces they may write.

Usage::

    with LocalHub(tokens={"hf_write": ["org"]}) as hub:
        os.environ.update(hub.client_environment(token="hf_write"))
        ...
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

# The Hub stores these with git-LFS whatever their size (its default .gitattributes).
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".arrow", ".parquet", ".npz", ".zip")
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
DEFAULT_GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES)
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
REPO_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
MAX_BODY_BYTES = 2 * 1024**3


def git_blob_oid(content: bytes) -> str:
    """The git object id of a blob (what ``git hash-object`` prints)."""
    return hashlib.sha1(b"blob %d\x00" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-LFS pointer file that git stores in place of a large file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class HubError(Exception):
    """An HTTP error answered the way the Hub answers it (status, ``X-Error-Code``, message)."""

    def __init__(
        self,
        status: int,
        message: str,
        error_code: str | None = None,
        repo_commit: str | None = None,
        extra: dict | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.repo_commit = repo_commit
        self.extra = extra or {}


@dataclass
class FileEntry:
    """One file of a commit: its content blob and how git would store it."""

    sha256: str
    size: int
    lfs: bool
    git_oid: str

    def to_json(self) -> dict:
        return {"sha256": self.sha256, "size": self.size, "lfs": self.lfs, "git_oid": self.git_oid}


@dataclass
class Commit:
    """An immutable snapshot of a repository."""

    oid: str
    parent: str | None
    title: str
    description: str
    date: str
    files: dict[str, FileEntry]


@dataclass
class Repo:
    """A repository: branches pointing at commits, and the commits themselves."""

    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit:
        """The commit a branch name or a (full or 7+-char abbreviated) commit id points at."""
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if re.fullmatch(r"[0-9a-f]{7,40}", revision):
            matches = [oid for oid in self.commits if oid.startswith(revision)]
            if len(matches) == 1:
                return self.commits[matches[0]]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


class LocalHub:
    """A threaded Hub HTTP server on 127.0.0.1 with a random free port.

    Args:
        root: directory for blobs and repositories; a temporary one (removed on stop) if ``None``.
        tokens: access token → namespaces (users and organisations) it may create repos in and
            push to. Requests without a token may read public repos only.
    """

    def __init__(self, root: str | Path | None = None, tokens: dict[str, list[str]] | None = None):
        self._owns_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="local-hub-") if root is None else root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.tokens = dict(tokens or {})
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.RLock()
        self._commit_counter = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        for state_file in sorted(self.root.glob("repos/*/*/*/repo.json")):
            self._load(state_file)

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """Base URL to set as ``HF_ENDPOINT``."""
        if self._server is None:
            raise RuntimeError("LocalHub is not running; call start() or use it as a context manager.")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> LocalHub:
        """Bind a free port and serve from a daemon thread."""
        handler = type("Handler", (_HubRequestHandler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        # A short poll interval keeps stop() (and so each test's teardown) fast.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="local-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, and delete the storage directory if it was a temporary one."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = None
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def client_environment(self, token: str | None = None) -> dict[str, str]:
        """Environment variables that point a ``huggingface_hub`` client (this process or a child) here.

        Xet is disabled because this server implements only the git-LFS upload protocol.
        """
        env = {"HF_ENDPOINT": self.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
        if token is not None:
            env["HF_TOKEN"] = token
        return env

    # -- inspection helpers for tests ------------------------------------------------------------

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo | None:
        """The stored repository, or ``None`` if it was never created."""
        with self._lock:
            return self.repos.get((repo_type, repo_id))

    # -- storage ---------------------------------------------------------------------------------

    def _blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256

    def _store_blob(self, content: bytes) -> str:
        sha256 = hashlib.sha256(content).hexdigest()
        path = self._blob_path(sha256)
        if not path.exists():
            partial = path.with_suffix(".incomplete")
            partial.write_bytes(content)
            partial.replace(path)
        return sha256

    def _persist(self, repo: Repo) -> None:
        """Write the repo's branches and commits next to the blobs (read back by :meth:`_load`)."""
        folder = self.root / "repos" / repo.repo_type / repo.repo_id
        folder.mkdir(parents=True, exist_ok=True)
        state = {
            "private": repo.private,
            "created_at": repo.created_at,
            "branches": repo.branches,
            "commits": {
                oid: {
                    "parent": c.parent,
                    "title": c.title,
                    "description": c.description,
                    "date": c.date,
                    "files": {p: e.to_json() for p, e in c.files.items()},
                }
                for oid, c in repo.commits.items()
            },
        }
        (folder / "repo.json").write_text(json.dumps(state, indent=1))

    def _load(self, state_file: Path) -> None:
        """Read back a repo that :meth:`_persist` wrote, so a storage folder survives restarts."""
        repo_type, namespace, name = state_file.parent.relative_to(self.root / "repos").parts
        state = json.loads(state_file.read_text())
        repo = Repo(repo_type, f"{namespace}/{name}", state["private"], state["created_at"], dict(state["branches"]))
        for oid, c in state["commits"].items():
            files = {path: FileEntry(**entry) for path, entry in c["files"].items()}
            repo.commits[oid] = Commit(oid, c["parent"], c["title"], c["description"], c["date"], files)
        self.repos[(repo_type, repo.repo_id)] = repo
        self._commit_counter += len(repo.commits)

    def _new_commit(self, repo: Repo, parent: str | None, title: str, description: str, files: dict) -> Commit:
        self._commit_counter += 1
        date = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        manifest = json.dumps(
            {
                "parent": parent,
                "title": title,
                "description": description,
                "date": date,
                "n": self._commit_counter,
                "files": {p: e.to_json() for p, e in sorted(files.items())},
            },
            sort_keys=True,
        )
        commit = Commit(hashlib.sha1(manifest.encode()).hexdigest(), parent, title, description, date, dict(files))
        repo.commits[commit.oid] = commit
        return commit

    def _file_entry(self, content: bytes) -> FileEntry:
        sha256 = self._store_blob(content)
        return FileEntry(sha256=sha256, size=len(content), lfs=False, git_oid=git_blob_oid(content))

    def _get_repo(self, repo_type: str, repo_id: str, token: str | None, write: bool = False) -> Repo:
        """The repo, after the access check the Hub makes (a private repo looks missing to strangers)."""
        with self._lock:
            repo = self.repos.get((repo_type, repo_id))
        allowed = token is not None and repo_id.split("/")[0] in self.tokens.get(token, [])
        if repo is None or (repo.private and not allowed):
            raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        if write and not allowed:
            raise HubError(403, f"You don't have the rights to write to {repo_id}.")
        return repo

    def _check_token(self, token: str | None) -> None:
        if token is not None and token not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")

    # -- API operations (called by the request handler) --------------------------------------------

    def create_repo(self, token: str | None, payload: dict) -> dict:
        self._check_token(token)
        if token is None:
            raise HubError(401, "You must be authenticated to create a repo.")
        name = payload.get("name") or ""
        namespace = payload.get("organization") or self.tokens[token][0]
        repo_type = payload.get("type") or "model"
        if not REPO_NAME_RE.fullmatch(name) or ".." in name or name.endswith((".git", ".")):
            raise HubError(400, f"Invalid repo name {name!r}.")
        if repo_type not in URL_PREFIX:
            raise HubError(400, f"Invalid repo type {repo_type!r}.")
        if namespace not in self.tokens[token]:
            raise HubError(403, f"You don't have the rights to create a {repo_type} under the namespace {namespace!r}.")
        repo_id = f"{namespace}/{name}"
        url = f"{self.endpoint}/{URL_PREFIX[repo_type]}{repo_id}"
        with self._lock:
            if (repo_type, repo_id) in self.repos:
                # huggingface_hub reads the existing repo's url from the 409 body (exist_ok=True).
                raise HubError(409, f"You already created this {repo_type} repo: {repo_id}", extra={"url": url})
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
            repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=now)
            initial = self._new_commit(
                repo, None, "initial commit", "", {".gitattributes": self._file_entry(DEFAULT_GITATTRIBUTES.encode())}
            )
            repo.branches["main"] = initial.oid
            self.repos[(repo_type, repo_id)] = repo
            self._persist(repo)
        return {"url": url, "name": repo_id, "id": repo_id}

    def create_branch(self, token: str | None, repo_type: str, repo_id: str, branch: str, payload: dict) -> dict:
        self._check_token(token)
        repo = self._get_repo(repo_type, repo_id, token, write=True)
        with self._lock:
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            start = repo.resolve(payload.get("startingPoint") or "main")
            repo.branches[branch] = start.oid
            self._persist(repo)
        return {}

    def repo_info(self, token: str | None, repo_type: str, repo_id: str, revision: str) -> dict:
        self._check_token(token)
        repo = self._get_repo(repo_type, repo_id, token)
        commit = repo.resolve(revision)
        info = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "tags": [],
            "siblings": [{"rfilename": path} for path in sorted(commit.files)],
        }
        if repo_type == "model":
            info["modelId"] = repo_id
        if "README.md" in commit.files:
            metadata = _front_matter(self._blob_path(commit.files["README.md"].sha256).read_text(encoding="utf-8"))
            info["cardData"] = metadata
            info["tags"] = list(metadata.get("tags") or [])
            for key in ("library_name", "pipeline_tag"):
                if key in metadata:
                    info[key] = metadata[key]
        return info

    def tree(self, token: str | None, repo_type: str, repo_id: str, revision: str, path: str, recursive: bool) -> list:
        self._check_token(token)
        commit = self._get_repo(repo_type, repo_id, token).resolve(revision)
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in commit.files):
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", commit.oid)
        entries, folders = [], set()
        for file_path, entry in sorted(commit.files.items()):
            if not file_path.startswith(prefix):
                continue
            rest = file_path[len(prefix) :]
            parts = rest.split("/")
            for depth in range(1, len(parts)):
                folder = prefix + "/".join(parts[:depth])
                if (recursive or depth == 1) and folder not in folders:
                    folders.add(folder)
                    oid = hashlib.sha1(f"{commit.oid}:{folder}".encode()).hexdigest()
                    entries.append({"type": "directory", "oid": oid, "size": 0, "path": folder})
            if recursive or len(parts) == 1:
                item = {"type": "file", "oid": entry.git_oid, "size": entry.size, "path": file_path}
                if entry.lfs:
                    pointer_size = len(lfs_pointer(entry.sha256, entry.size))
                    item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": pointer_size}
                entries.append(item)
        return entries

    def preupload(self, token: str | None, repo_type: str, repo_id: str, revision: str, payload: dict) -> dict:
        self._check_token(token)
        repo = self._get_repo(repo_type, repo_id, token, write=True)
        commit = repo.resolve(revision)
        files = []
        for item in payload.get("files", []):
            path, size = item["path"], int(item["size"])
            lfs = path.endswith(LFS_SUFFIXES) or size >= LFS_SIZE_THRESHOLD
            existing = commit.files.get(path)
            oid = None
            if existing is not None:
                oid = existing.sha256 if existing.lfs else existing.git_oid
            files.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        return {"files": files, "commitOid": commit.oid}

    def lfs_batch(self, token: str | None, repo_type: str, repo_id: str, payload: dict) -> dict:
        self._check_token(token)
        self._get_repo(repo_type, repo_id, token, write=True)
        if payload.get("operation") != "upload":
            raise HubError(400, "Only the LFS upload operation is supported.")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            item: dict = {"oid": oid, "size": size}
            if not self._blob_path(oid).exists():
                item["actions"] = {
                    "upload": {"href": f"{self.endpoint}/__lfs/{oid}"},
                    "verify": {"href": f"{self.endpoint}/__lfs/verify"},
                }
            objects.append(item)
        return {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

    def lfs_put(self, oid: str, content: bytes) -> None:
        if not re.fullmatch(r"[0-9a-f]{64}", oid):
            raise HubError(400, f"Invalid LFS oid {oid!r}.")
        if hashlib.sha256(content).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match its sha256 {oid}.")
        self._store_blob(content)

    def lfs_verify(self, payload: dict) -> dict:
        path = self._blob_path(payload.get("oid", ""))
        if not path.exists() or path.stat().st_size != int(payload.get("size", -1)):
            raise HubError(404, f"LFS object {payload.get('oid')} was not uploaded.")
        return {}

    def commit(self, token: str | None, repo_type: str, repo_id: str, revision: str, lines: list[dict]) -> dict:
        """Apply an ndjson commit atomically: every line is checked before the branch moves."""
        self._check_token(token)
        repo = self._get_repo(repo_type, repo_id, token, write=True)
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "A commit payload starts with a header line.")
        header = lines[0]["value"]
        if not header.get("summary"):
            raise HubError(400, "The commit summary must not be empty.")
        with self._lock:
            if revision not in repo.branches:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            head = repo.commits[repo.branches[revision]]
            parent = header.get("parentCommit")
            if parent is not None and not head.oid.startswith(parent):
                raise HubError(412, f"A commit has happened since {parent}; head of {revision} is {head.oid}.")
            files = dict(head.files)
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value", {})
                path = value.get("path", "")
                if not path or path.startswith("/") or ".." in path.split("/"):
                    raise HubError(400, f"Invalid path in commit: {path!r}.")
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise HubError(400, f"Unsupported encoding {value.get('encoding')!r} for {path}.")
                    files[path] = self._file_entry(base64.b64decode(value["content"]))
                elif key == "lfsFile":
                    oid = value["oid"]
                    blob = self._blob_path(oid)
                    if not blob.exists():
                        raise HubError(422, f"LFS file {path} ({oid}) was committed but never uploaded.")
                    size = blob.stat().st_size
                    files[path] = FileEntry(
                        sha256=oid, size=size, lfs=True, git_oid=git_blob_oid(lfs_pointer(oid, size))
                    )
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    files = {p: e for p, e in files.items() if not p.startswith(prefix)}
                else:
                    raise HubError(400, f"Unsupported commit operation {key!r}.")
            commit = self._new_commit(repo, head.oid, header["summary"], header.get("description", ""), files)
            repo.branches[revision] = commit.oid
            self._persist(repo)
        url = f"{self.endpoint}/{URL_PREFIX[repo_type]}{repo_id}/commit/{commit.oid}"
        return {"success": True, "commitOid": commit.oid, "commitUrl": url, "pullRequestUrl": None}

    def validate_yaml(self, payload: dict) -> dict:
        """Check a README's metadata block as the Hub does before a commit (schema via ModelCardData)."""
        from huggingface_hub import DatasetCardData, ModelCardData

        content = payload.get("content", "")
        try:
            metadata = _front_matter(content)
            card_data = DatasetCardData if payload.get("repoType") == "dataset" else ModelCardData
            card_data(**metadata)
        except (yaml.YAMLError, ValueError, TypeError, KeyError) as error:
            raise HubError(400, f"Invalid metadata: {error}") from error
        warnings = [] if metadata else [{"message": "Empty metadata: add YAML front matter to README.md."}]
        return {"errors": [], "warnings": warnings}

    def resolve(
        self, token: str | None, repo_type: str, repo_id: str, revision: str, path: str
    ) -> tuple[Commit, FileEntry]:
        self._check_token(token)
        commit = self._get_repo(repo_type, repo_id, token).resolve(revision)
        entry = commit.files.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", commit.oid)
        return commit, entry


def _front_matter(readme: str) -> dict:
    """The YAML metadata block at the top of a README (empty if there is none)."""
    match = re.match(r"^\s*---\s*\n(.*?)\n---\s*(\n|$)", readme, flags=re.DOTALL)
    if match is None:
        return {}
    metadata = yaml.safe_load(match.group(1)) or {}
    if not isinstance(metadata, dict):
        raise ValueError("README metadata must be a YAML mapping.")
    return metadata


class _HubRequestHandler(BaseHTTPRequestHandler):
    """Routes Hub URLs to :class:`LocalHub` operations and writes Hub-shaped responses."""

    hub: LocalHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - signature fixed by the base class
        pass  # requests are recorded in hub.requests; stderr noise would drown test output

    # -- plumbing --------------------------------------------------------------------------------

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[len("Bearer ") :].strip() if auth.startswith("Bearer ") else None

    def _body(self) -> bytes:
        # huggingface_hub always sends Content-Length (no chunked uploads), so that is all we read.
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise HubError(413, "Payload too large.")
        return self.rfile.read(length) if length else b""

    def _json_body(self) -> dict:
        body = self._body()
        try:
            return json.loads(body) if body else {}
        except json.JSONDecodeError as error:
            raise HubError(400, f"Malformed JSON body: {error}") from error

    def _send(
        self, status: int, body: bytes, headers: dict[str, str] | None = None, content_type: str = "application/json"
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, payload, status: int = 200) -> None:
        self._send(status, json.dumps(payload).encode())

    def _send_error(self, error: HubError) -> None:
        headers = {"X-Error-Message": error.message}
        if error.error_code:
            headers["X-Error-Code"] = error.error_code
        if error.repo_commit:
            headers["X-Repo-Commit"] = error.repo_commit
        self._send(error.status, json.dumps({"error": error.message, **error.extra}).encode(), headers)

    def _dispatch(self) -> None:
        self.hub.requests.append((self.command, self.path))
        try:
            url = urlsplit(self.path)
            segments = [unquote(s) for s in url.path.strip("/").split("/")]
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            self._route(segments, query)
        except HubError as error:
            self._send_error(error)
        except (KeyError, ValueError, TypeError) as error:
            self._send_error(HubError(400, f"Bad request: {error!r}"))

    do_GET = do_HEAD = do_POST = do_PUT = _dispatch

    # -- routing ---------------------------------------------------------------------------------

    def _route(self, s: list[str], query: dict[str, str]) -> None:
        hub, method, token = self.hub, self.command, self._token()
        if s == ["api", "repos", "create"] and method == "POST":
            return self._send_json(hub.create_repo(token, self._json_body()))
        if s == ["api", "validate-yaml"] and method == "POST":
            return self._send_json(hub.validate_yaml(self._json_body()))
        if s[:1] == ["__lfs"] and len(s) == 2:
            if s[1] == "verify" and method == "POST":
                return self._send_json(hub.lfs_verify(self._json_body()))
            if method == "PUT":
                hub.lfs_put(s[1], self._body())
                return self._send(200, b"", {"ETag": f'"{s[1]}"'})
        if s[:1] == ["api"] and len(s) >= 4 and s[1] in REPO_TYPES:
            return self._route_api(REPO_TYPES[s[1]], f"{s[2]}/{s[3]}", s[4:], query, token)
        repo_type = "model"
        if s[:1] in (["datasets"], ["spaces"]):
            repo_type, s = REPO_TYPES[s[0]], s[1:]
        if len(s) >= 2 and s[1].endswith(".git") and s[2:] == ["info", "lfs", "objects", "batch"] and method == "POST":
            repo_id = f"{s[0]}/{s[1][: -len('.git')]}"
            body = hub.lfs_batch(token, repo_type, repo_id, self._json_body())
            return self._send(200, json.dumps(body).encode(), content_type="application/vnd.git-lfs+json")
        if len(s) >= 5 and s[2] == "resolve" and method in ("GET", "HEAD"):
            return self._serve_file(repo_type, f"{s[0]}/{s[1]}", s[3], "/".join(s[4:]), token)
        raise HubError(404, f"No such endpoint: {method} {self.path}")

    def _route_api(self, repo_type: str, repo_id: str, rest: list[str], query: dict, token: str | None) -> None:
        hub, method = self.hub, self.command
        if not rest and method == "GET":
            return self._send_json(hub.repo_info(token, repo_type, repo_id, "main"))
        if rest[:1] == ["revision"] and len(rest) == 2 and method == "GET":
            return self._send_json(hub.repo_info(token, repo_type, repo_id, rest[1]))
        if rest[:1] == ["tree"] and len(rest) >= 2 and method == "GET":
            recursive = query.get("recursive", "false").lower() in ("1", "true")
            return self._send_json(hub.tree(token, repo_type, repo_id, rest[1], "/".join(rest[2:]), recursive))
        if rest[:1] == ["branch"] and len(rest) == 2 and method == "POST":
            return self._send_json(hub.create_branch(token, repo_type, repo_id, rest[1], self._json_body()))
        if rest[:1] == ["preupload"] and len(rest) == 2 and method == "POST":
            return self._send_json(hub.preupload(token, repo_type, repo_id, rest[1], self._json_body()))
        if rest[:1] == ["commit"] and len(rest) == 2 and method == "POST":
            if query.get("create_pr"):
                raise HubError(400, "Pull requests are not supported by the local Hub.")
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
            return self._send_json(hub.commit(token, repo_type, repo_id, rest[1], lines))
        raise HubError(404, f"No such endpoint: {method} {self.path}")

    def _serve_file(self, repo_type: str, repo_id: str, revision: str, path: str, token: str | None) -> None:
        commit, entry = self.hub.resolve(token, repo_type, repo_id, revision, path)
        content = self.hub._blob_path(entry.sha256).read_bytes()
        etag = entry.sha256 if entry.lfs else entry.git_oid
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{etag}"'}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
        self._send(200, content, headers, content_type="application/octet-stream")


def main(argv: list[str] | None = None) -> None:
    """Serve a local Hub until interrupted, e.g. to try ``scrnalf push`` without huggingface.co.

    ``python -m scrnalf_hf.testing.local_hub --root hub_storage --token hf_local=my-lab`` prints the
    environment variables to export in the shell that pushes and loads. With ``--detach`` the
    server runs in its own session, the command returns once it answers, and the printed lines
    add ``LOCAL_HUB_PID`` (``eval "$(python -m scrnalf_hf.testing.local_hub --detach ...)"``).
    """
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None, help="storage folder (kept); a temporary one if omitted")
    parser.add_argument(
        "--token", action="append", default=[], help="TOKEN=NAMESPACE[,NAMESPACE...] that may write; repeatable"
    )
    parser.add_argument(
        "--detach", action="store_true", help="serve in the background; print the exports once it answers, then return"
    )
    parser.add_argument("--env-file", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    tokens = {}
    for item in args.token:
        token, _, namespaces = item.partition("=")
        if not token or not namespaces:
            parser.error(f"--token takes TOKEN=NAMESPACE[,NAMESPACE...], got {item!r}")
        tokens[token] = namespaces.split(",")
    if args.detach:
        _serve_detached([a for a in (argv if argv is not None else sys.argv[1:]) if a != "--detach"])
        return
    with LocalHub(root=args.root, tokens=tokens) as hub:
        first_token = next(iter(tokens), None)
        exports = "".join(f"export {key}={value}\n" for key, value in hub.client_environment(first_token).items())
        if args.env_file is not None:
            partial = args.env_file.with_name(args.env_file.name + ".partial")
            partial.write_text(exports)
            partial.replace(args.env_file)
        else:
            print(exports, end="", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


def _serve_detached(arguments: list[str], timeout_s: float = 120.0) -> None:
    """Start the server in a new session with no inherited pipes; print its exports once it is up.

    A background server that kept the caller's stdout/stderr open would make anything waiting on
    those pipes (a CI step, ``subprocess.run(capture_output=True)``) wait for ever.
    """
    import subprocess
    import time

    with tempfile.TemporaryDirectory(prefix="local-hub-") as scratch:
        env_file = Path(scratch) / "env"
        server = subprocess.Popen(
            [sys.executable, "-m", "scrnalf_hf.testing.local_hub", *arguments, "--env-file", str(env_file)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while not env_file.exists():
            if server.poll() is not None:
                raise SystemExit(f"local_hub: the server exited with status {server.returncode} before answering")
            if time.monotonic() > deadline:
                server.kill()
                raise SystemExit(f"local_hub: the server did not answer within {timeout_s:.0f} s")
            time.sleep(0.1)
        print(env_file.read_text() + f"export LOCAL_HUB_PID={server.pid}", flush=True)


if __name__ == "__main__":
    main()


__all__ = ["HubError", "LocalHub", "git_blob_oid", "lfs_pointer"]
