"""cells/s of the bare encoder (knn, simulated gene graph, 2,000 genes, batch 32, 2 threads) for
the tiny and default presets, median of N calls after one warm-up call; prints one JSON line.

Run it alternately against two source trees to compare them on the same machine, e.g.::

    git archive 0d5895b | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old python scripts/inference_speed.py 8
    python scripts/inference_speed.py 8
"""

import json
import sys
import time

import torch

from scrnalf_hf.benchmark.harness import gene_graph, scrnalf_model
from scrnalf_hf.configuration_scrnalf import ScrnaLongformerConfig


def main(repeats: int) -> dict:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    figures = {}
    for preset in ("tiny", "default"):
        k = ScrnaLongformerConfig.from_preset(preset, n_genes=2000).knn_k
        model = scrnalf_model(preset, 2000, "knn", gene_graph("simulated", 2000, k, seed=0))
        counts = torch.poisson(torch.full((32, 2000), 0.5))
        expression = torch.log1p(counts / counts.sum(1, keepdim=True).clamp(min=1) * 1e4)
        with torch.no_grad():
            model(expression=expression)
            seconds = []
            for _ in range(repeats):
                started = time.perf_counter()
                model(expression=expression)
                seconds.append(time.perf_counter() - started)
        figures[preset] = round(32 / sorted(seconds)[len(seconds) // 2], 1)
    return figures


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 8)))
