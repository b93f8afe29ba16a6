"""Data loading beside compute: cells/s that each source delivers to a training step, and the cells/s
the model trains at, measured in one process on the same simulated cells.

Each source feeds the one training collator (:class:`~scrnalf_hf.data.collators.CellCollator` with
masked gene modelling's masking: dense panel, normalised, masked genes drawn), the way Trainer
would read it with the recipe's ``--dataloader_num_workers 0``:

- **SOMA**: a TileDB-SOMA experiment streamed through ``tiledbsoma_ml`` (chunked shuffle), as
  ``scrnalf pretrain --soma-uri`` reads it;
- **Arrow**: the ``scrnalf convert`` folder (memory-mapped ``datasets``), shuffled by a
  ``RandomSampler`` as Trainer does;
- **backed .h5ad**: random cells read from an AnnData opened in backed mode (``anndata`` reads
  each mini-batch's rows from the file). ``scrnalf`` itself converts an ``.h5ad`` input to the
  Arrow layout first; this row shows what reading the file directly would give.

The model's own rate is the default preset's optimiser step (AdamW, masked gene modelling,
batches in micro-batches as :mod:`~scrnalf_hf.benchmark.train` times it) on batches of the same
cells already in memory. A loader at least a few times faster than that is not the bottleneck.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..configuration_scrnalf import ScrnaLongformerConfig
from ..data.collators import CellCollator, MaskSampler
from ..modeling_scrnalf import ScrnaLongformerForMaskedGeneModeling
from ..processing_scrnalf import ScrnaLongformerProcessor
from .harness import conditions_line, machine_info, set_threads, write_results
from .targets import markdown_table
from .train import _step_function


def _time_loader(batches, seconds: float, max_cells: int) -> dict:
    """Iterate collated batches for at most ``seconds`` (after the first) or ``max_cells`` cells."""
    started = time.perf_counter()
    iterator = iter(batches)
    first = next(iterator)
    first_s = time.perf_counter() - started
    cells, timed_started = 0, time.perf_counter()
    for batch in iterator:
        cells += batch["expression"].shape[0]
        if time.perf_counter() - timed_started > seconds or cells >= max_cells:
            break
    elapsed = time.perf_counter() - timed_started
    return {
        "first_batch_s": first_s,
        "cells_timed": cells,
        "seconds": elapsed,
        "cells_per_s": cells / elapsed if elapsed > 0 else float("nan"),
        "batch_shape": list(first["expression"].shape),
    }


class _BackedRows(torch.utils.data.Dataset):
    """Rows of a backed ``.h5ad`` as collator rows (``cell_id``, ``indices``, ``values``, ``library_size``)."""

    def __init__(self, path: Path):
        import anndata as ad

        self.adata = ad.read_h5ad(path, backed="r")

    def __len__(self) -> int:
        return self.adata.n_obs

    def __getitem__(self, index: int) -> dict:
        row = self.adata.X[int(index)]  # (1, genes) CSR read from the file
        return {"cell_id": str(index), "indices": row.indices.astype(np.int32), "values": row.data.astype(np.float32),
                "library_size": float(row.data.sum())}


def benchmark_loader(
    output_dir: str | Path,
    preset: str = "default",
    n_cells: int = 20_000,
    n_genes: int = 2000,
    batch_size: int = 32,
    micro_batch_size: int = 4,
    train_steps: int = 8,
    seconds: float = 20.0,
    workdir: str | Path | None = None,
    threads: int = 2,
    seed: int = 0,
) -> dict:
    """Write ``n_cells`` simulated cells as a backed ``.h5ad``, a ``scrnalf convert`` folder and a
    SOMA experiment (setup times recorded), time each source's collated batches for ``seconds``
    (or one epoch), then ``train_steps`` (+1 warm-up) optimiser steps of ``preset``. Results:
    ``loader.json`` / ``loader.md`` in ``output_dir``; the stores go to ``workdir`` (a temporary
    folder, removed, by default)."""
    from ..data.cells import open_cells
    from ..data.simulation import write_simulated_h5ad
    from ..data.soma import open_soma

    set_threads(threads)
    info = machine_info()
    temporary = None if workdir is not None else tempfile.TemporaryDirectory(prefix="scrnalf-loader-")
    folder = Path(workdir if workdir is not None else temporary.name)
    folder.mkdir(parents=True, exist_ok=True)
    setup = {}
    try:
        started = time.perf_counter()
        h5ad = write_simulated_h5ad(folder / "cells.h5ad", n_cells, n_genes, seed=seed)
        setup["simulate_h5ad_s"] = time.perf_counter() - started
        started = time.perf_counter()
        arrow = open_cells(h5ad, progress=False)  # converted into a temporary Arrow folder, as scrnalf does
        setup["convert_arrow_s"] = time.perf_counter() - started
        started = time.perf_counter()
        import tiledbsoma.io

        tiledbsoma.io.from_h5ad(str(folder / "soma"), str(h5ad), measurement_name="RNA", X_layer_name="raw")
        setup["write_soma_s"] = time.perf_counter() - started
        soma = open_soma(folder / "soma")

        processor = ScrnaLongformerProcessor(gene_symbols=arrow.genes.gene_symbols, gene_ids=arrow.genes.gene_ids,
                                             input_kind="counts")
        masking = MaskSampler(0.15, seed=seed)
        collator = CellCollator(processor, arrow.genes, masking=masking)
        generator = torch.Generator().manual_seed(seed)
        loaders = {
            "soma": torch.utils.data.DataLoader(
                soma.with_targets(None).select(np.arange(soma.n_cells)).batches(batch_size, True, seed, 1),
                batch_size=None, collate_fn=CellCollator(processor, soma.genes, masking=masking),
            ),
            "arrow": torch.utils.data.DataLoader(
                arrow.with_targets(None), batch_size=batch_size, shuffle=True, collate_fn=collator, generator=generator
            ),
            "backed_h5ad": torch.utils.data.DataLoader(
                _BackedRows(h5ad), batch_size=batch_size, shuffle=True, collate_fn=collator, generator=generator
            ),
        }
        max_cells = n_cells - batch_size  # one epoch after the first batch
        sources = {name: _time_loader(loader, seconds, max_cells) for name, loader in loaders.items()}

        # The model's rate on batches of the same cells, already collated and in memory.
        batches = [batch["expression"] for _, batch in zip(range(train_steps + 1), loaders["arrow"])]
        config = ScrnaLongformerConfig.from_preset(preset, n_genes=processor.n_genes)
        model = ScrnaLongformerForMaskedGeneModeling(config).train()
        step = _step_function(model, batch_size, processor.n_genes, micro_batch_size)
        step_seconds = []
        for expression in batches:
            started = time.perf_counter()
            step(expression)
            step_seconds.append(time.perf_counter() - started)
        train_step_s = statistics.median(step_seconds[1:])  # the first step warms up
        training = {"preset": preset, "n_parameters": sum(p.numel() for p in model.parameters()),
                    "median_step_s": train_step_s, "cells_per_s": batch_size / train_step_s, "steps_timed": len(step_seconds) - 1}
    finally:
        if temporary is not None:
            temporary.cleanup()
    for source in sources.values():
        source["times_training"] = source["cells_per_s"] / training["cells_per_s"]
    results = {
        "benchmark": "loader", "machine": info, "n_cells": n_cells, "n_genes": n_genes, "batch_size": batch_size,
        "micro_batch_size": micro_batch_size, "dataloader_num_workers": 0, "setup": setup, "sources": sources,
        "training": training, "soma_over_training": sources["soma"]["times_training"],
    }
    write_results(output_dir, "loader", results, _markdown(results))
    return results


SOURCE_NAMES = {
    "soma": "TileDB-SOMA (tiledbsoma-ml, chunked shuffle)",
    "arrow": "Arrow folder (`scrnalf convert`, random order)",
    "backed_h5ad": "backed .h5ad (anndata, random rows)",
}


def _markdown(results: dict) -> str:
    training = results["training"]
    rows = [
        [SOURCE_NAMES[name], f"{source['cells_per_s']:,.0f}", f"{source['times_training']:.1f}×",
         f"{source['first_batch_s']:.2f}", f"{source['cells_timed']:,}"]
        for name, source in results["sources"].items()
    ]
    rows.append([f"training step, {training['preset']} preset (batches in memory)", f"{training['cells_per_s']:,.1f}", "1.0×",
                 "", f"{training['steps_timed'] * results['batch_size']:,}"])
    setup = results["setup"]
    return (
        f"### Data loading beside training ({results['n_cells']:,} simulated cells × {results['n_genes']:,} genes, "
        f"batch {results['batch_size']}, DataLoader workers 0)\n\n"
        + markdown_table(["source → collated masked-gene batch", "cells/s", "× training", "first batch (s)", "cells timed"], rows)
        + f"\nSOMA delivers **{results['soma_over_training']:.0f}×** the cells/s the {training['preset']} preset trains at "
        f"(same process, same cells). Setup: simulated .h5ad {setup['simulate_h5ad_s']:.0f} s, Arrow conversion "
        f"{setup['convert_arrow_s']:.0f} s, SOMA write (tiledbsoma.io.from_h5ad) {setup['write_soma_s']:.0f} s. "
        f"{conditions_line(results['machine'])}. Simulated cells: loader speed, not biology.\n"
    )


__all__ = ["benchmark_loader"]
