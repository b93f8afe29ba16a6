"""Masked-gene pretraining streamed from a SOMA store by two CPU processes (gloo, torchrun): every
cell is trained on exactly once per epoch across the ranks, the ranks end with identical weights,
and each epoch visits the cells in a new order."""

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import marker_adata
from safetensors.torch import load_file

pytest.importorskip("tiledbsoma_ml")

WORKER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import torch.distributed as dist
    from safetensors.torch import save_file
    from transformers import TrainerCallback
    from scrnalf_hf.data import collators
    from scrnalf_hf.data.soma import open_soma
    from scrnalf_hf.training.arguments import training_arguments
    from scrnalf_hf.training.finetune import finetune, no_targets
    from scrnalf_hf.training.tasks import MASKED_GENES

    uri, output_dir = sys.argv[1], sys.argv[2]
    seen, epoch = [], [0]
    original = collators.CellCollator.__call__

    def recording(self, features):  # training batches only (evaluation masks per cell)
        if self.masking is not None and not self.masking.per_cell:
            seen.extend((epoch[0], str(f["cell_id"])) for f in features)
        return original(self, features)

    collators.CellCollator.__call__ = recording

    class Epochs(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kwargs):
            epoch[0] = round(state.epoch or 0)

    cells = open_soma(uri)
    args = training_arguments(
        MASKED_GENES, output_dir, num_train_epochs=2, learning_rate=1e-2, per_device_train_batch_size=8,
        ddp_backend="gloo", save_strategy="no", eval_strategy="no", load_best_model_at_end=False, disable_tqdm=True,
    )
    result = finetune(MASKED_GENES, cells, no_targets(cells), np.arange(cells.n_cells), args, preset="tiny",
                      config_overrides={"knn_k": 8}, validation_fraction=0, early_stopping_patience=0,
                      callbacks=[Epochs()])
    rank = dist.get_rank()
    assert dist.get_world_size() == 2
    state = {k: v.detach().contiguous().clone() for k, v in result.model.state_dict().items()}
    save_file(state, f"{output_dir}/rank{rank}.safetensors")
    with open(f"{output_dir}/seen{rank}.json", "w") as handle:
        json.dump({"seen": seen, "steps": result.trainer.state.global_step}, handle)
    """
)


@pytest.mark.slow
def test_two_gloo_processes_see_each_streamed_cell_once_per_epoch(tmp_path):
    from scrnalf_hf.data.soma import write_soma

    n_cells = 64
    write_soma(marker_adata(n_cells=n_cells), tmp_path / "store")
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    output = tmp_path / "run"
    output.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
               str(worker), str(tmp_path / "store"), str(output)]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    records = [json.loads((output / f"seen{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["steps"] for r in records] == [8, 8]  # 32 cells per rank, batches of 8, 2 epochs
    everyone = {f"cell{i}" for i in range(n_cells)}
    orders = []
    for epoch in (0, 1):
        per_rank = [[cell for e, cell in r["seen"] if e == epoch] for r in records]
        counts = Counter(per_rank[0] + per_rank[1])
        assert set(counts) == everyone and set(counts.values()) == {1}, f"epoch {epoch}: {counts}"
        assert not set(per_rank[0]) & set(per_rank[1])
        orders.append(per_rank[0])
    assert orders[0] != orders[1] and sorted(orders[0]) == sorted(orders[1])  # reshuffled, same shard
    rank0, rank1 = load_file(output / "rank0.safetensors"), load_file(output / "rank1.safetensors")
    for name in rank0:
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0)
