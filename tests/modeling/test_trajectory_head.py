"""The trajectory head: shapes and loss, time-point conditioning, saving and loading through its
Auto class (in process and through trust_remote_code without scrnalf_hf)."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForTimeSeriesPrediction

import scrnalf_hf  # noqa: F401  (registers the Auto classes)
from scrnalf_hf import ScrnaLongformerConfig, ScrnaLongformerForTrajectory


def small_config(**overrides) -> ScrnaLongformerConfig:
    settings = dict(n_genes=24, d_model=16, depth=1, n_heads=2, knn_k=4, hidden_dropout=0.0,
                    kernel_implementation="eager")
    return ScrnaLongformerConfig(**{**settings, **overrides})


def test_forward_gives_one_pseudotime_per_cell_and_the_mse_loss():
    torch.manual_seed(0)
    model = ScrnaLongformerForTrajectory(small_config()).eval()
    expression, labels = torch.rand(5, 24) * 3, torch.rand(5)
    output = model(expression, labels=labels)
    assert output.logits.shape == (5,) and output.cell_embedding.shape == (5, 16)
    torch.testing.assert_close(output.loss, F.mse_loss(output.logits, labels))
    output.loss.backward()
    assert model.regressor.weight.grad is not None and model.scrna_longformer.embeddings.gene_embeddings.weight.grad is not None
    assert model(expression, return_dict=False)[0].shape == (5,)


def test_time_points_condition_the_prediction_only_when_configured():
    torch.manual_seed(0)
    model = ScrnaLongformerForTrajectory(small_config(time_conditioning=True)).eval()
    expression = torch.rand(3, 24) * 3
    early, late = model(expression, time_points=torch.zeros(3)), model(expression, time_points=torch.ones(3))
    torch.testing.assert_close(early.cell_embedding, late.cell_embedding)  # the encoder never sees the time
    assert (early.logits - late.logits).abs().min() > 1e-6
    # and the model can learn from the time alone: a target that is the time point
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    time_points = torch.tensor([0.0, 0.5, 1.0])
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = model(expression, labels=time_points, time_points=time_points).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.1 * losses[0]
    with pytest.raises(ValueError, match="requires|required"):
        model(expression)
    with pytest.raises(ValueError, match=r"time_points must be \(batch,\)"):
        model(expression, time_points=torch.zeros(3, 1))
    plain = ScrnaLongformerForTrajectory(small_config()).eval()
    assert plain.time_encoder is None
    with pytest.raises(ValueError, match="time_conditioning=False"):
        plain(expression, time_points=torch.zeros(3))


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_save_and_load_through_the_auto_class(tmp_path, time_conditioning):
    torch.manual_seed(0)
    model = ScrnaLongformerForTrajectory(small_config(time_conditioning=time_conditioning)).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForTimeSeriesPrediction"] == "modeling_scrnalf.ScrnaLongformerForTrajectory"
    assert config["time_conditioning"] is time_conditioning
    loaded = AutoModelForTimeSeriesPrediction.from_pretrained(tmp_path).eval()
    assert type(loaded) is ScrnaLongformerForTrajectory
    expression = torch.rand(2, 24)
    kwargs = {"time_points": torch.tensor([0.2, 0.9])} if time_conditioning else {}
    torch.testing.assert_close(loaded(expression, **kwargs).logits, model(expression, **kwargs).logits)


LOAD_REMOTE = textwrap.dedent(
    """
    import sys
    sys.modules["scrnalf_hf"] = None  # any import of the package now fails
    import torch
    from transformers import AutoModelForTimeSeriesPrediction

    model = AutoModelForTimeSeriesPrediction.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    torch.manual_seed(1)
    print(type(model).__module__, type(model).__name__, model(torch.rand(2, 24)).logits.tolist())
    """
)


def test_checkpoint_loads_through_trust_remote_code_without_the_package(tmp_path):
    torch.manual_seed(0)
    model = ScrnaLongformerForTrajectory(small_config()).eval()
    model.save_pretrained(tmp_path / "model")
    script = tmp_path / "load.py"
    script.write_text(LOAD_REMOTE)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "model")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    module, name, values = done.stdout.strip().split(" ", 2)
    assert module.startswith("transformers_modules") and name == "ScrnaLongformerForTrajectory"
    torch.manual_seed(1)
    expected = model(torch.rand(2, 24)).logits
    torch.testing.assert_close(torch.tensor(json.loads(values)), expected)
