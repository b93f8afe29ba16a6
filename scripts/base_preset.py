"""The ``base`` preset's size and cost: parameters, peak memory and cells/s of a masked-gene training
step and of inference, at a few panel sizes, on this machine (CPU here; CUDA when available).

    python scripts/base_preset.py --gene-counts 2000,20000 --batch-size 4 --steps 3 \\
        --output benchmarks/cpu-2core/base_preset.json

Each panel size runs in a fresh process so that its peak resident memory (``ru_maxrss``; CUDA:
``max_memory_allocated``) is its own. Inputs are random normalised expression, the model's default
gene graph: cost, not accuracy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, resource, sys, time
import torch
from scrnalf_hf import ScrnaLongformerConfig
from scrnalf_hf.data.collators import MaskSampler
from scrnalf_hf.modeling_scrnalf import ScrnaLongformerForMaskedGeneModeling
n_genes, batch_size, steps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
config = ScrnaLongformerConfig.from_preset("base", n_genes=n_genes)
model = ScrnaLongformerForMaskedGeneModeling(config).to(device).train()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
expression = torch.rand(batch_size, n_genes, device=device) * 3
masked = MaskSampler(config.mask_ratio)(torch.ones(batch_size, n_genes, dtype=torch.bool), [""] * batch_size).to(device)
seconds = []
for _ in range(steps + 1):  # the first step warms up
    started = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    model(expression=expression, masked_positions=masked, labels=expression).loss.backward()
    optimizer.step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds.append(time.perf_counter() - started)
train_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model.eval()
with torch.no_grad():
    model.scrna_longformer(expression=expression)  # warm-up
    started = time.perf_counter()
    model.scrna_longformer(expression=expression)
    if device == "cuda":
        torch.cuda.synchronize()
    inference_s = time.perf_counter() - started
step = sorted(seconds[1:])[len(seconds[1:]) // 2]
print(json.dumps({
    "n_genes": n_genes, "device": device, "batch_size": batch_size,
    "n_parameters": sum(p.numel() for p in model.parameters()),
    "config": {k: getattr(config, k) for k in ("d_model", "depth", "n_heads", "mlp_ratio", "knn_k", "attention_type")},
    "train_step_s_median": step, "train_cells_per_s": batch_size / step,
    "inference_cells_per_s": batch_size / inference_s,
    "peak_rss_bytes": train_rss, "rss_before_training_bytes": before,
    # growth of the peak over the built model: activations of the batch plus gradients and AdamW state
    "training_peak_growth_bytes": train_rss - before,
    "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gene-counts", default="2000,20000")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    from scrnalf_hf.machine import describe_machine

    rows = []
    for n_genes in (int(g) for g in args.gene_counts.split(",")):
        done = subprocess.run([sys.executable, "-c", CHILD, str(n_genes), str(args.batch_size), str(args.steps)],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"machine": describe_machine(), "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
