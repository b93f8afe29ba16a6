"""Two CPU processes (gloo) under torchrun train one model per head: identical weights on both
ranks, one checkpoint, and no unused-parameter search (``ddp_find_unused_parameters=False``,
the recipe's default): every parameter of each head gets a gradient from its loss."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from helpers import marker_adata
from safetensors.torch import load_file

WORKER = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch.distributed as dist
    from safetensors.torch import save_file
    from scrnalf_hf.data import open_cells, split_off
    from scrnalf_hf.training.arguments import training_arguments
    from scrnalf_hf.training.finetune import finetune, read_targets
    from scrnalf_hf.training.tasks import CLASSIFICATION, MASKED_GENES

    data_file, output_dir = sys.argv[1], sys.argv[2]
    cells = open_cells(data_file, label_key="cell_type", progress=False)
    for task in (CLASSIFICATION, MASKED_GENES):
        args = training_arguments(
            task, f"{output_dir}/{task.name}", num_train_epochs=2, learning_rate=1e-2, per_device_train_batch_size=8,
            ddp_backend="gloo", load_best_model_at_end=False, save_total_limit=1, disable_tqdm=True,
        )
        assert args.ddp_find_unused_parameters is False
        targets = read_targets(task, cells, "cell_type" if task is CLASSIFICATION else None)
        train, _ = split_off(np.arange(cells.n_cells), 0.2, seed=0, labels=targets.stratify)
        result = finetune(task, cells, targets, train, args, preset="tiny", config_overrides={"knn_k": 8},
                          early_stopping_patience=0)
        rank = dist.get_rank()
        assert dist.get_world_size() == 2
        state = {k: v.detach().contiguous().clone() for k, v in result.model.state_dict().items()}
        save_file(state, f"{output_dir}/{task.name}/rank{rank}.safetensors")
        print(f"{task.name} rank {rank} steps {result.trainer.state.global_step}")
    """
)


def test_two_gloo_processes_train_each_head_without_unused_parameters(tmp_path):
    data_file = tmp_path / "cells.h5ad"
    marker_adata(n_cells=96).write_h5ad(data_file)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    output = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               str(worker), str(data_file), str(output)]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    for task, steps in (("classification", 10), ("masked_genes", 10)):
        rank0, rank1 = load_file(output / task / "rank0.safetensors"), load_file(output / task / "rank1.safetensors")
        assert rank0.keys() == rank1.keys()
        for name in rank0:
            torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0, msg=lambda m, name=name: f"{task} {name}: {m}")
        assert f"{task} rank 0 steps {steps}" in finished.stdout and f"{task} rank 1 steps {steps}" in finished.stdout
        # one checkpoint (save_total_limit=1), written once for both ranks, with each rank's RNG state
        checkpoints = sorted((output / task).glob("checkpoint-*"))
        assert len(checkpoints) == 1
        assert [p.name for p in checkpoints[0].glob("*.safetensors")] == ["model.safetensors"]
        assert sorted(p.name for p in checkpoints[0].glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
