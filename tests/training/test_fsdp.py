"""Masked-gene pretraining under FSDP2 by two CPU processes (gloo, torchrun), through
``scripts/pretrain.py`` with transformers' own ``--fsdp`` / ``--fsdp_config`` flags: each
``ScrnaLongformerLayer`` becomes its own FSDP unit whose parameters are DTensors sharded across
both ranks, the loss stays finite, and the exported folder holds the full, unsharded weights."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import marker_adata, write_h5ad
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]

# Runs scripts/pretrain.py unchanged, with one callback added to the Trainer that records, from
# inside the run, how the model was wrapped, the losses, and the full weights at the end.
WORKER = textwrap.dedent(
    """
    import json, runpy, sys
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Shard
    from transformers import TrainerCallback
    from scrnalf_hf.modeling_scrnalf import ScrnaLongformerLayer
    from scrnalf_hf.training import trainer as training

    evidence_dir, script, *flags = sys.argv[1:]

    def describe(parameter):
        if not isinstance(parameter, DTensor):
            return {"dtensor": False, "shape": list(parameter.shape)}
        rows_split = [isinstance(p, Shard) and p.dim == 0 for p in parameter.placements]
        return {"dtensor": True, "rows_split": rows_split, "mesh": parameter.device_mesh.size(),
                "shape": list(parameter.shape), "local_shape": list(parameter.to_local().shape)}

    class Evidence(TrainerCallback):
        def __init__(self):
            self.record = {"losses": []}

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            layers = [m for m in model.modules() if isinstance(m, ScrnaLongformerLayer)]
            self.record["root_is_fsdp"] = isinstance(model, FSDPModule)
            self.record["layers"] = [
                {"fsdp": isinstance(layer, FSDPModule), "parameters": {n: describe(p) for n, p in layer.named_parameters()}}
                for layer in layers
            ]

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.record["losses"].append(logs["loss"])

        def on_train_end(self, args, state, control, model=None, **kwargs):
            full = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone().contiguous()
                    for n, p in model.state_dict().items()}  # a collective: every rank gathers
            rank = dist.get_rank()
            if rank == 0:
                save_file(full, f"{evidence_dir}/gathered.safetensors")
            with open(f"{evidence_dir}/rank{rank}.json", "w") as handle:
                json.dump({**self.record, "world_size": dist.get_world_size()}, handle)

    original_init = training.ScrnaTrainer.__init__

    def with_evidence(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(Evidence())

    training.ScrnaTrainer.__init__ = with_evidence
    sys.argv = [script, *flags]
    runpy.run_path(script, run_name="__main__")
    """
)


@pytest.mark.slow  # two torch processes train 8 steps: about two minutes on 2 cores
def test_fsdp2_shards_each_longformer_layer_across_two_cpu_ranks_and_exports_full_weights(tmp_path):
    from scrnalf_hf.inference import load_model

    data = write_h5ad(marker_adata(n_cells=64, n_genes=24), tmp_path)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    evidence, output = tmp_path / "evidence", tmp_path / "run"
    evidence.mkdir()
    fsdp_config = {"version": 2, "transformer_layer_cls_to_wrap": ["ScrnaLongformerLayer"], "state_dict_type": "FULL_STATE_DICT"}
    flags = [
        "--train-file", str(data), "--preset", "tiny", "--config-overrides", "depth=2,knn_k=8",
        "--num-train-epochs", "2", "--per-device-train-batch-size", "8", "--learning-rate", "1e-2",
        "--logging-strategy", "steps", "--logging-steps", "1", "--save-strategy", "no", "--eval-strategy", "no",
        "--load-best-model-at-end", "false", "--disable-tqdm", "true", "--output-dir", str(output),
        "--fsdp", "full_shard", "--fsdp_config", json.dumps(fsdp_config),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29537",
               str(worker), str(evidence), str(REPO / "scripts" / "pretrain.py"), *flags]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]

    records = [json.loads((evidence / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for record in records:
        assert record["world_size"] == 2 and record["root_is_fsdp"]
        assert len(record["layers"]) == 2 and all(layer["fsdp"] for layer in record["layers"])
        for layer in record["layers"]:
            for name, parameter in layer["parameters"].items():
                assert parameter["dtensor"] and parameter["mesh"] == 2 and parameter["rows_split"] == [True], name
                assert parameter["local_shape"][0] == math.ceil(parameter["shape"][0] / 2), name  # half the rows each
        assert record["losses"] and all(math.isfinite(loss) for loss in record["losses"])

    model, _ = load_model(str(output))
    exported = load_file(output / "model.safetensors")
    gathered = load_file(evidence / "gathered.safetensors")
    fresh = type(model)(model.config).state_dict()
    assert model.config.depth == 2 and set(exported) == set(gathered)
    for name, weights in exported.items():
        assert weights.shape == fresh[name].shape, name  # full shapes, not one rank's shard
        torch.testing.assert_close(weights, gathered[name], rtol=0, atol=0)  # the trained weights, unsharded
    assert math.isfinite(json.loads((output / "all_results.json").read_text())["train_loss"])
