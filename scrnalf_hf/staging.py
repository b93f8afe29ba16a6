"""Staging paths: outputs are written under a hidden name that carries the writing process's id
and renamed into place only when complete; the next run removes what killed runs left.

A staging path is ``.NAME.incomplete-PID-XXXXXXXX`` (``scrnalf predict`` / ``embed``: beside
the output file) or ``.export-incomplete-PID-XXXXXXXX`` (``scrnalf finetune`` / ``pretrain``:
inside the output folder, which also holds Trainer's checkpoints). A staging folder records its
writer (pid, start time, host) in ``.scrnalf-writer.json``, so a reused pid is told apart; a
staging file cannot, and is judged by its pid alone. Leftovers of a process still running are
never touched.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import uuid
from pathlib import Path

import psutil

WRITER_FILE = ".scrnalf-writer.json"
_PID_AND_TOKEN = r"(?P<pid>\d+)-[0-9a-f]{8}"

logger = logging.getLogger(__name__)


def staging_path(parent: Path, stem: str) -> Path:
    """``parent/STEM-PID-XXXXXXXX``: a fresh hidden name of this process (``stem`` starts with a dot)."""
    return Path(parent) / f"{stem}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def record_writer(folder: Path) -> None:
    """Records who writes the staging ``folder`` (pid, its start time, host)."""
    record = {"pid": os.getpid(), "create_time": psutil.Process().create_time(), "host": socket.gethostname()}
    (Path(folder) / WRITER_FILE).write_text(json.dumps(record))


def writer_is_running(path: Path, pid: int) -> bool:
    """Whether the process ``pid`` that wrote the staging ``path`` is still alive (and is that writer,
    where a folder recorded its start time)."""
    record = {}
    if Path(path).is_dir():
        try:
            record = json.loads((Path(path) / WRITER_FILE).read_text())
        except (OSError, ValueError):
            record = {}
    if record.get("host", socket.gethostname()) != socket.gethostname():
        return True  # another machine's process cannot be checked from here
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        started = record.get("create_time")
        return started is None or abs(process.create_time() - started) < 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def remove_dead_staging(parent: Path, stem: str, what: str) -> tuple[list[Path], list[Path]]:
    """Removes ``parent/STEM-PID-*`` whose process is gone, logging each removal as a warning.

    Returns:
        The paths removed, and those of writers still running (left alone).
    """
    parent = Path(parent)
    if not parent.is_dir():
        return [], []
    pattern = re.compile(re.escape(stem) + "-" + _PID_AND_TOKEN)
    removed, running = [], []
    for path in sorted(parent.iterdir()):
        match = pattern.fullmatch(path.name)
        if match is None or path.is_symlink():
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or writer_is_running(path, pid):
            running.append(path)
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        if path.exists():
            logger.warning("could not remove %s, left by an interrupted %s; delete it yourself.", path, what)
            continue
        removed.append(path)
        logger.warning("removed %s in %s, left by an interrupted %s (its process %d is gone).", path.name, parent, what, pid)
    return removed, running


__all__ = ["WRITER_FILE", "record_writer", "remove_dead_staging", "staging_path", "writer_is_running"]
