"""What machine a run used, and how much memory a process tree takes, for reports and benchmarks."""

from __future__ import annotations

import os
import platform
import threading
import time
from pathlib import Path

import psutil


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine() -> dict:
    """Facts that decide how fast a run goes: CPU, threads, GPU, torch, current load."""
    import torch

    gpu = None
    if torch.cuda.is_available():
        gpu = f"{torch.cuda.device_count()}× {torch.cuda.get_device_name(0)}"
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "gpu": gpu,
        "torch": torch.__version__,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }


def hardware_description() -> str:
    """One line for model cards and run records, e.g. ``CPU: Intel Xeon ..., 2 threads``."""
    machine = describe_machine()
    if machine["gpu"]:
        return machine["gpu"]
    return f"CPU: {machine['cpu']}, {machine['threads']} threads"


def tree_rss(process: psutil.Process) -> int:
    """Resident bytes of ``process`` and all its children."""
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class PeakMemory:
    """Samples the resident memory of a process tree every ``interval`` seconds in a thread.

    ``with PeakMemory(pid) as peak: ...`` then ``peak.bytes`` is the largest total seen.
    """

    def __init__(self, pid: int | None = None, interval: float = 0.02):
        self.process = psutil.Process(pid)
        self.interval = interval
        self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                self.bytes = max(self.bytes, tree_rss(self.process))
            except psutil.NoSuchProcess:
                return
            time.sleep(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


__all__ = ["PeakMemory", "cpu_model", "describe_machine", "hardware_description", "tree_rss"]
