"""Two CPU processes (gloo) under torchrun train one model: identical weights, one checkpoint."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

from test_training_metrics_baselines import marker_adata

WORKER = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch.distributed as dist
    from safetensors.torch import save_file
    from scrnalf_hf.training.arguments import FINETUNE_DEFAULTS, parse_arguments
    from scrnalf_hf.training.cells import load_labelled_cells, stratified_split
    from scrnalf_hf.training.finetune import finetune

    data_file, output_dir = sys.argv[1], sys.argv[2]
    _, _, args = parse_arguments(
        ["--train_file", data_file, "--output_dir", output_dir, "--ddp_backend", "gloo",
         "--num_train_epochs", "2", "--learning_rate", "1e-2", "--per_device_train_batch_size", "8",
         "--load_best_model_at_end", "false", "--save_total_limit", "1", "--disable_tqdm", "true"],
        FINETUNE_DEFAULTS,
    )
    cells = load_labelled_cells(data_file, "cell_type")
    train, test = stratified_split(np.arange(cells.n_cells), cells.labels, 0.2, seed=0)
    result = finetune(cells, train, test, args, preset="tiny", config_overrides={"knn_k": 8}, early_stopping_patience=0)
    rank = dist.get_rank()
    assert dist.get_world_size() == 2
    state = {k: v.detach().contiguous().clone() for k, v in result.model.state_dict().items()}
    save_file(state, f"{output_dir}/rank{rank}.safetensors")
    print(f"rank {rank} steps {result.trainer.state.global_step}")
    """
)


def test_two_gloo_processes_train_identical_weights_and_write_one_checkpoint(tmp_path):
    data_file = tmp_path / "cells.h5ad"
    marker_adata(n_cells=96).write_h5ad(data_file)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    output = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               str(worker), str(data_file), str(output)]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    rank0, rank1 = load_file(output / "rank0.safetensors"), load_file(output / "rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0, msg=name)
    # the model moved away from its initialisation: the ranks agree on a trained model
    assert "rank 0 steps 10" in finished.stdout and "rank 1 steps 10" in finished.stdout
    # one checkpoint (save_total_limit=1), written once for both ranks: one weights file, and the
    # RNG state of each rank beside it
    checkpoints = sorted(output.glob("checkpoint-*"))
    assert len(checkpoints) == 1
    assert [p.name for p in checkpoints[0].glob("*.safetensors")] == ["model.safetensors"]
    assert sorted(p.name for p in checkpoints[0].glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
