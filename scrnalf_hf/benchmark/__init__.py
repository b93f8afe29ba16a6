"""Performance benchmarks, each measured in one process next to its baselines (the transformers
``BertModel`` peer of the same shape, the project's ``dense`` attention, and an fp32 GEMM roof).

``scrnalf benchmark {inference,train,memory,convert}`` calls :func:`run_benchmark`; each
benchmark writes ``<name>.json``, ``<name>.md`` (the README table) and ``<name>.png`` into an
output folder.
"""

import json
import os
import subprocess
import sys

from .convert import benchmark_convert_run
from .inference import benchmark_inference
from .memory import benchmark_memory
from .train import benchmark_train

BENCHMARKS = {
    "inference": benchmark_inference,
    "train": benchmark_train,
    "memory": benchmark_memory,
    "convert": benchmark_convert_run,
}


def run_benchmark(name: str, **settings) -> int:
    """Run benchmark ``name`` with keyword ``settings``; returns an exit status.

    On a shared, oversubscribed machine GNU OpenMP's default spin-waiting makes every parallel
    operator wait for a descheduled thread (a 200-gene forward took 400 ms with 2 threads and
    4 ms with 1). ``OMP_WAIT_POLICY=PASSIVE`` removes that, but OpenMP reads it only when torch
    loads, so unless the variable is already set the benchmark runs in a child process with it.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)}.")
    if "OMP_WAIT_POLICY" in os.environ:
        BENCHMARKS[name](**settings)
        return 0
    code = (
        "import json, sys; from scrnalf_hf.benchmark import run_benchmark; "
        "run_benchmark(sys.argv[1], **json.loads(sys.argv[2]))"
    )
    environment = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.call([sys.executable, "-c", code, name, json.dumps(settings)], env=environment)


__all__ = ["run_benchmark", "benchmark_inference", "benchmark_train", "benchmark_memory", "benchmark_convert_run"]
