"""Training throughput: masked gene modelling on simulated cells, step by step, with the BERT
peer and the project's ``dense`` attention timed on the same batches in the same process."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..configuration_scrnalf import ScrnaLongformerConfig
from ..data.collators import MaskSampler
from ..modeling_scrnalf import ScrnaLongformerForMaskedGeneModeling
from .harness import (
    bert_peer,
    conditions_line,
    gemm_gflops,
    machine_info,
    set_threads,
    write_results,
)
from .targets import markdown_table


def simulated_expression(n_cells: int, n_genes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised expression (n_cells, G) of simulated cells and the gene graph built from them."""
    from ..data.simulation import simulate
    from ..processing_scrnalf import ScrnaLongformerProcessor

    cells = simulate(n_cells=n_cells, n_genes=n_genes, seed=seed)
    processor = ScrnaLongformerProcessor.from_anndata(cells)
    expression = processor(cells, return_tensors="pt")["expression"].float()
    return expression, torch.as_tensor(processor.build_gene_graph(expression, k=16, seed=seed))


class _BertRegressor(nn.Module):
    """The BERT peer with the same masked-value regression head size, for a like-for-like step."""

    def __init__(self, config: ScrnaLongformerConfig):
        super().__init__()
        self.bert = bert_peer(config, config.n_genes + 1)
        self.head = nn.Linear(config.d_model, 1)

    def forward(self, token_ids, targets):
        hidden = self.bert(input_ids=token_ids).last_hidden_state[:, 1:]  # (b, G, d)
        return (self.head(hidden).squeeze(-1) - targets).pow(2).mean()


def _step_function(model, batch_size: int, n_genes: int, micro_batch_size: int):
    """One optimiser step over a batch, accumulated over micro-batches of ``micro_batch_size``
    cells (as Trainer's ``gradient_accumulation_steps`` does), each micro-batch loss weighted by
    its share of the batch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    token_ids = torch.arange(n_genes + 1).expand(micro_batch_size, -1)
    # The genes masked gene modelling hides, drawn as the training collator draws them.
    masking = MaskSampler(getattr(getattr(model, "config", None), "mask_ratio", 0.15), seed=0)

    def step(expression):
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for part in expression.split(micro_batch_size):
            if isinstance(model, _BertRegressor):
                loss = model(token_ids[: part.shape[0]], part)
            else:
                masked = masking(torch.ones_like(part, dtype=torch.bool), [""] * part.shape[0])
                loss = model(expression=part, masked_positions=masked, labels=part).loss
            (loss * (part.shape[0] / expression.shape[0])).backward()
            total += loss.item() * part.shape[0] / expression.shape[0]
        optimizer.step()
        return total

    return step


def benchmark_train(
    output_dir: str | Path,
    preset: str = "default",
    n_genes: int = 2000,
    n_cells: int = 10_240,
    batch_size: int = 32,
    micro_batch_size: int = 4,
    epoch_cells: int = 100_000,
    baseline_steps: int = 3,
    dense_batch_size: int = 4,
    max_minutes: float | None = None,
    threads: int = 2,
    seed: int = 0,
) -> dict:
    """Train ``preset`` (knn attention, masked gene modelling, AdamW) over ``n_cells`` simulated
    cells and extrapolate the time of one epoch over ``epoch_cells`` cells. With
    ``max_minutes``, training stops at that wall-clock budget and the JSON says so.

    The model trains as ``Trainer`` runs it (training mode): the last layer and the prediction
    head run at the masked genes only, which gives the full forward's loss and gradients (see
    ``ScrnaLongformerForMaskedGeneModeling``). ``dense`` does the same; the BERT peer runs
    its whole stack at every gene, as transformers' ``BertModel`` does.

    The extrapolation is trusted only if the per-step time is constant: the JSON gives the
    median step time of the first and last quarter of the steps and their ratio. An fp32 GEMM
    timed before and after training shows how fast the (possibly shared) host was meanwhile. Batches come
    from a tensor in memory, so this is the model's cost, not the data loader's. The BERT peer
    and ``dense`` run ``baseline_steps`` (+1 warm-up) steps on the same batches, alternating with
    knn's first steps; ``dense`` on the first ``dense_batch_size`` cells of each batch only, since
    its (1 + G)² attention backward does not fit in memory at batch 32 (about 16 GB at 2,000
    genes), so compare cells/s.
    """
    set_threads(threads)
    info = machine_info()
    gemm_before = gemm_gflops()["gflops_median"]
    torch.manual_seed(seed)
    start = time.perf_counter()
    expression, graph = simulated_expression(n_cells, n_genes, seed)
    setup_s = time.perf_counter() - start
    config = ScrnaLongformerConfig.from_preset(preset, n_genes=n_genes)
    models = {}
    for attention_type in ("knn", "dense"):
        model = ScrnaLongformerForMaskedGeneModeling(
            ScrnaLongformerConfig.from_preset(preset, n_genes=n_genes, attention_type=attention_type)
        )
        model.scrna_longformer.set_gene_graph(graph)
        models[attention_type] = model.train()
    models["bert"] = _BertRegressor(config).train()
    baseline_batch = {"dense": min(dense_batch_size, batch_size), "bert": batch_size}
    steps = {"knn": _step_function(models["knn"], batch_size, n_genes, micro_batch_size)}
    steps.update(
        {name: _step_function(models[name], size, n_genes, micro_batch_size) for name, size in baseline_batch.items()}
    )

    batches = list(expression[: n_cells - n_cells % batch_size].split(batch_size))
    baseline_seconds = {"dense": [], "bert": []}
    knn_seconds, losses = [], []
    deadline = None if max_minutes is None else time.perf_counter() + 60 * max_minutes
    for index, batch in enumerate(batches):
        if deadline is not None and time.perf_counter() > deadline:
            break
        started = time.perf_counter()
        losses.append(steps["knn"](batch))
        knn_seconds.append(time.perf_counter() - started)
        if index >= 1 and len(baseline_seconds["bert"]) <= baseline_steps:
            # Baselines step on the same batches as knn steps 1, 2, ...; their first step is a warm-up.
            for name in baseline_seconds:
                started = time.perf_counter()
                steps[name](batch[: baseline_batch[name]])
                baseline_seconds[name].append(time.perf_counter() - started)

    gemm_after = gemm_gflops()["gflops_median"]
    measured = knn_seconds[1:]  # the first step warms up allocator and threads
    quarter = max(1, len(measured) // 4)
    first, last = statistics.median(measured[:quarter]), statistics.median(measured[-quarter:])
    step_median = statistics.median(measured)
    epoch_steps = math.ceil(epoch_cells / batch_size)
    epoch_minutes = epoch_steps * step_median / 60
    results = {
        "benchmark": "train",
        "machine": info,
        "preset": preset,
        "n_genes": n_genes,
        "knn_k": config.knn_k,
        "batch_size": batch_size,
        "micro_batch_size": micro_batch_size,
        "graph": "simulated",
        "setup_s": setup_s,
        "cells_trained": len(knn_seconds) * batch_size,
        "steps": len(knn_seconds),
        "stopped_at_time_budget": len(knn_seconds) < len(batches),
        "step_seconds": knn_seconds,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "knn": {
            "median_step_s": step_median,
            "min_step_s": min(measured),
            "max_step_s": max(measured),
            "cells_per_s": batch_size / step_median,
            "first_quarter_median_s": first,
            "last_quarter_median_s": last,
            "last_over_first": last / first,
            "wall_s": sum(knn_seconds),
        },
        "baselines": {
            name: {
                "batch_size": baseline_batch[name],
                "median_step_s": statistics.median(values[1:]),
                "cells_per_s": baseline_batch[name] / statistics.median(values[1:]),
                "steps_timed": len(values) - 1,
            }
            for name, values in baseline_seconds.items()
        },
        "epoch": {"cells": epoch_cells, "steps": epoch_steps, "minutes": epoch_minutes},
        "gemm_gflops": {"before": gemm_before, "after": gemm_after},
    }
    for baseline in results["baselines"].values():
        baseline["knn_speedup"] = results["knn"]["cells_per_s"] / baseline["cells_per_s"]
    _plot(output_dir, results)
    write_results(output_dir, "train", results, _markdown(results))
    return results


def _markdown(results: dict) -> str:
    knn = results["knn"]
    rows = [
        ["knn (this model)", results["batch_size"], f"{knn['cells_per_s']:.1f}", f"{knn['median_step_s']:.3f}", "1.0×"]
    ]
    for name, baseline in results["baselines"].items():
        label = "BertModel (SDPA) peer" if name == "bert" else "dense (masked SDPA, same graph)"
        rows.append(
            [
                label,
                baseline["batch_size"],
                f"{baseline['cells_per_s']:.1f}",
                f"{baseline['median_step_s']:.3f}",
                f"{1 / baseline['knn_speedup']:.2f}×",
            ]
        )
    epoch = results["epoch"]
    return (
        f"### Training ({results['preset']} preset, masked gene modelling, {results['n_genes']} genes, "
        f"k = {results['knn_k']}, batch {results['batch_size']} in micro-batches of {results['micro_batch_size']})\n\n"
        + markdown_table(["model", "batch", "cells/s", "s/step (median)", "cells/s relative to knn"], rows)
        + f"\n{results['cells_trained']:,} simulated cells trained; per-step median of the last quarter / first "
        f"quarter = {knn['last_over_first']:.2f}. One epoch over {epoch['cells']:,} cells: "
        f"**{epoch['minutes']:.1f} min** (extrapolated from the median step). The last layer and the "
        "prediction head ran at the masked genes only (the full forward's loss and gradients). fp32 GEMM "
        f"2048³: {results['gemm_gflops']['before']:.0f} GFLOP/s before training, "
        f"{results['gemm_gflops']['after']:.0f} after. {conditions_line(results['machine'])}.\n"
    )


def _plot(output_dir: str | Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = np.array(results["step_seconds"])
    figure, axis = plt.subplots(figsize=(7, 3.5))
    axis.plot(np.arange(len(seconds)), seconds, ".", markersize=3, label="knn step")
    axis.axhline(results["knn"]["median_step_s"], color="C0", label="knn median")
    for index, (name, baseline) in enumerate(results["baselines"].items(), start=1):
        axis.axhline(
            baseline["median_step_s"],
            color=f"C{index}",
            linestyle="--",
            label=f"{name} median (batch {baseline['batch_size']})",
        )
    axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_ylabel(f"seconds per step (batch {results['batch_size']})")
    axis.set_title(f"Training, {results['preset']} preset, {results['n_genes']} genes")
    axis.legend(fontsize=8)
    figure.tight_layout()
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    figure.savefig(Path(output_dir) / "train.png", dpi=120)
    plt.close(figure)
