"""Performance benchmarks, each measured in one process next to its baselines (the transformers
``BertModel`` peer of the same shape, the project's ``dense`` attention, and an fp32 GEMM roof).

``scrnalf benchmark {inference,train,memory,convert,predict,loader}`` calls :func:`run_benchmark`; each
benchmark writes ``<name>.json``, ``<name>.md`` (the README table) and ``<name>.png`` into an
output folder.
"""

from .convert import benchmark_convert_run
from .inference import benchmark_inference
from .loader import benchmark_loader
from .memory import benchmark_memory
from .predict import benchmark_predict
from .train import benchmark_train

BENCHMARKS = {
    "inference": benchmark_inference,
    "train": benchmark_train,
    "memory": benchmark_memory,
    "convert": benchmark_convert_run,
    "predict": benchmark_predict,
    "loader": benchmark_loader,
}


def run_benchmark(name: str, **settings) -> int:
    """Run benchmark ``name`` with keyword ``settings``; returns an exit status.

    The OpenMP wait policy is left as the environment sets it and recorded with the results.
    On a quiet machine leave it unset: ``OMP_WAIT_POLICY=PASSIVE`` makes every parallel region
    wake sleeping threads (the default preset ran 30% slower with it here). On a machine shared
    with other jobs, PASSIVE keeps spin-waiting threads from stalling on descheduled ones.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)}.")
    BENCHMARKS[name](**settings)
    return 0


__all__ = [
    "benchmark_convert_run",
    "benchmark_inference",
    "benchmark_loader",
    "benchmark_memory",
    "benchmark_predict",
    "benchmark_train",
    "run_benchmark",
]
