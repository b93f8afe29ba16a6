"""Peak memory of pretraining streamed from a SOMA store, at two store sizes, on 1 and 2 processes,
and of distributed inference (``scrnalf embed --soma-uri``) over it.

    python scripts/soma_memory.py write --n-cells 1000000 --n-genes 200 --output data/soma_1m
    python scripts/soma_memory.py measure --stores data/soma_100k,data/soma_1m --max-steps 100 \\
        --output benchmarks/cpu-2core/soma_memory.json
    python scripts/soma_memory.py embed --stores data/soma_100k,data/soma_1m --processes 1,2 \\
        --output benchmarks/cpu-2core/soma_embed.json

``write`` simulates the cells block by block into a backed ``.h5ad`` (bounded memory) and writes a
SOMA experiment from it with ``tiledbsoma.io.from_h5ad``. ``measure`` runs, for each store and each
process count, in fresh processes whose whole process tree is sampled for resident memory
(:class:`scrnalf_hf.machine.PeakMemory`):

- ``stream``: one full epoch over every cell of the store through the training collator (masked
  gene modelling batches), as a training process reads them (DataLoader workers 0), with
  ``RANK`` / ``WORLD_SIZE`` set per process as a launcher sets them: the data path alone, every cell;
- ``pretrain``: ``scripts/pretrain.py --soma-uri STORE --preset tiny --max-steps N`` (``torchrun`` for 2
  processes): the whole command (panel, gene graph from a sample, Trainer, export), training cut
  at ``N`` steps because a full epoch of a million cells takes hours on 2 cores.

``embed`` runs ``scrnalf embed --soma-uri STORE`` (an untrained ``tiny`` preset on the store's genes
unless ``--model`` is given) as N processes started as a launcher starts them (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` / ``MASTER_PORT``), each sampled on its own: peak resident memory per
process, and cells per second over the whole command (reading, the model, the shards and rank 0's
merge), every cell of the store.

Simulated cells: memory and speed of the mechanics, not biology.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

STREAM = """
import os, sys, time
import numpy as np
from scrnalf_hf.data.collators import CellCollator, MaskSampler
from scrnalf_hf.data.soma import open_soma
from scrnalf_hf.processing_scrnalf import ScrnaLongformerProcessor
cells = open_soma(sys.argv[1])
processor = ScrnaLongformerProcessor(gene_symbols=cells.genes.gene_symbols, gene_ids=cells.genes.gene_ids)
collator = CellCollator(processor, cells.genes, masking=MaskSampler(0.15))
batches = cells.with_targets(None).select(np.arange(cells.n_cells)).batches(64, True, 0, 1)
started, n = time.perf_counter(), 0
for rows in batches:
    n += collator(rows)["expression"].shape[0]
print("CELLS", n, "SECONDS", time.perf_counter() - started, flush=True)
"""


def write(n_cells: int, n_genes: int, output: Path, seed: int) -> None:
    import tiledbsoma.io

    from scrnalf_hf.data.simulation import write_simulated_h5ad

    output = Path(output)
    if output.exists():
        raise FileExistsError(f"{output} exists; remove it or choose another --output.")
    with tempfile.TemporaryDirectory(dir=output.parent if output.parent.exists() else None) as folder:
        started = time.perf_counter()
        h5ad = write_simulated_h5ad(Path(folder) / "cells.h5ad", n_cells, n_genes, seed=seed)
        simulated = time.perf_counter() - started
        started = time.perf_counter()
        tiledbsoma.io.from_h5ad(str(output), str(h5ad), measurement_name="RNA", X_layer_name="raw")
        print(f"wrote {output}: {n_cells:,} cells x {n_genes:,} genes (simulated in {simulated:.0f} s, "
              f"SOMA written in {time.perf_counter() - started:.0f} s)")


def _run_sampled(command: list[str], env: dict) -> dict:
    from scrnalf_hf.machine import PeakMemory

    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with PeakMemory(process.pid, interval=0.05) as peak:
        output, _ = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{output[-3000:]}")
    return {"peak_rss_bytes": peak.bytes, "seconds": time.perf_counter() - started, "output_tail": output[-500:]}


def measure(stores: list[str], max_steps: int, processes: list[int], output: Path, stream_processes: list[int]) -> dict:
    import tiledbsoma

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    results = {"max_steps": max_steps, "runs": []}
    for store in stores:
        with tiledbsoma.Experiment.open(store) as experiment:
            n_cells = experiment.obs.count
        for n_processes in processes:
            # stream: one process per rank, each sampled on its own (RANK / WORLD_SIZE as torchrun sets them)
            stream = []
            for rank in range(n_processes if n_processes in stream_processes else 0):
                rank_env = {**env, "RANK": str(rank), "WORLD_SIZE": str(n_processes)}
                run = _run_sampled([sys.executable, "-c", STREAM, store], rank_env)
                cells = int(run["output_tail"].split("CELLS ")[1].split()[0])
                stream.append({"rank": rank, "peak_rss_bytes": run["peak_rss_bytes"], "cells": cells, "seconds": run["seconds"]})
            with tempfile.TemporaryDirectory() as folder:
                launcher = [sys.executable] if n_processes == 1 else [
                    sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n_processes), "--master_port", "29541"]
                command = [*launcher, str(REPO / "scripts" / "pretrain.py"), "--soma-uri", store, "--preset", "tiny",
                           "--max-steps", str(max_steps), "--output-dir", str(Path(folder) / "run"), "--disable-tqdm", "true",
                           "--save-strategy", "no", "--eval-strategy", "no", "--load-best-model-at-end", "false"]
                pretrain = _run_sampled(command, env)
            row = {"store": store, "n_cells": int(n_cells), "processes": n_processes,
                   "stream": stream,
                   "stream_peak_rss_bytes_per_process": max((s["peak_rss_bytes"] for s in stream), default=None),
                   "pretrain_peak_rss_bytes_all_processes": pretrain["peak_rss_bytes"], "pretrain_seconds": pretrain["seconds"]}
            results["runs"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "stream"}), flush=True)
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            Path(output).write_text(json.dumps(results, indent=2))  # after every row: a long run keeps what it measured
    return results


def tiny_model_for(store: str, folder: Path) -> Path:
    """An untrained ``tiny`` preset on the store's genes, saved with its processor (what is measured is
    the data path and the writing, not what the model learnt)."""
    from scrnalf_hf import ScrnaLongformerConfig, ScrnaLongformerModel, ScrnaLongformerProcessor
    from scrnalf_hf.data.soma import open_soma

    genes = open_soma(store).genes
    processor = ScrnaLongformerProcessor(gene_symbols=genes.gene_symbols, gene_ids=genes.gene_ids)
    ScrnaLongformerModel(ScrnaLongformerConfig.from_preset("tiny", n_genes=processor.n_genes)).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _run_processes(commands: list[list[str]], envs: list[dict]) -> tuple[list[int], float]:
    """Start one process per command at once, sample each one's resident memory on its own;
    returns the peaks (bytes) and the wall time of the slowest."""
    from contextlib import ExitStack

    from scrnalf_hf.machine import PeakMemory

    started = time.perf_counter()
    processes = [subprocess.Popen(c, cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for c, e in zip(commands, envs)]
    with ExitStack() as stack:
        peaks = [stack.enter_context(PeakMemory(p.pid, interval=0.05)) for p in processes]
        outputs = [p.communicate()[0] for p in processes]
    seconds = time.perf_counter() - started
    for process, output in zip(processes, outputs):
        if process.returncode != 0:
            raise RuntimeError(f"{' '.join(process.args)} failed:\n{output[-3000:]}")
    return [peak.bytes for peak in peaks], seconds


def measure_embed(stores: list[str], processes: list[int], output: Path, model: str | None, batch_size: int) -> dict:
    import anndata as ad
    import tiledbsoma

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    results = {"command": "scrnalf embed --soma-uri", "batch_size": batch_size, "runs": []}
    for store in stores:
        with tiledbsoma.Experiment.open(store) as experiment:
            n_cells = experiment.obs.count
        with tempfile.TemporaryDirectory() as folder:
            model_dir = model or str(tiny_model_for(store, Path(folder) / "model"))
            for n_processes in processes:
                result = Path(folder) / f"embedded-{n_processes}.h5ad"
                command = [sys.executable, str(REPO / "scrnalf_cli.py"), "embed", "--model", model_dir, "--soma-uri", store,
                           "--output", str(result), "--batch-size", str(batch_size)]
                launched = [{**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(n_processes),
                             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29551"} for rank in range(n_processes)]
                peaks, seconds = _run_processes([command] * n_processes, launched)
                written = ad.read_h5ad(result, backed="r")
                if written.n_obs != n_cells:
                    raise RuntimeError(f"{result} holds {written.n_obs} cells, the store {n_cells}.")
                row = {"store": store, "n_cells": int(n_cells), "processes": n_processes, "peak_rss_bytes_per_process": peaks,
                       "seconds": round(seconds, 1), "cells_per_second": round(n_cells / seconds, 1)}
                results["runs"].append(row)
                print(json.dumps(row), flush=True)
                Path(output).parent.mkdir(parents=True, exist_ok=True)
                Path(output).write_text(json.dumps(results, indent=2))  # after every row
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser("write", help="simulate cells into a SOMA store")
    sub.add_argument("--n-cells", type=int, required=True)
    sub.add_argument("--n-genes", type=int, default=200)
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--output", required=True)
    sub = commands.add_parser("measure", help="peak RSS of streaming and of pretraining")
    sub.add_argument("--stores", required=True, help="comma-separated store folders")
    sub.add_argument("--max-steps", type=int, default=100)
    sub.add_argument("--processes", default="1,2")
    sub.add_argument("--stream-processes", default="1,2", help="process counts whose full-epoch stream is measured too")
    sub.add_argument("--output", required=True)
    sub = commands.add_parser("embed", help="peak RSS per process and cells/s of scrnalf embed --soma-uri")
    sub.add_argument("--stores", required=True, help="comma-separated store folders")
    sub.add_argument("--processes", default="1,2")
    sub.add_argument("--model", default=None, help="model folder (default: an untrained tiny preset on the store's genes)")
    sub.add_argument("--batch-size", type=int, default=256)
    sub.add_argument("--output", required=True)
    args = parser.parse_args()
    if args.command == "embed":
        measure_embed(args.stores.split(","), [int(p) for p in args.processes.split(",")], Path(args.output), args.model,
                      args.batch_size)
    elif args.command == "write":
        write(args.n_cells, args.n_genes, Path(args.output), args.seed)
    else:
        measure(args.stores.split(","), args.max_steps, [int(p) for p in args.processes.split(",")], Path(args.output),
                [int(p) for p in args.stream_processes.split(",")])


if __name__ == "__main__":
    main()
