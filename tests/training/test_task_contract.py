"""The task contract: a head is one model class plus one declaration, and every command reads it.

The toy head here (regressing a per-cell score stored in ``obs``) lives outside the package, as a remote-code module
beside copies of the model files, and is declared with `register_task` alone: it trains through
the same `finetune` path, is saved as a Hub-ready folder, reloads through `trust_remote_code`
where `scrnalf_hf` cannot be imported, and writes its predictions into AnnData.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr
from sklearn.dummy import DummyRegressor
from sklearn.linear_model import Ridge

import scrnalf_hf
from scrnalf_hf.data import open_cells, simulate
from scrnalf_hf.hub.folder import save_hub_folder
from scrnalf_hf.inference import predict
from scrnalf_hf.training.arguments import training_arguments
from scrnalf_hf.training.finetune import CellPart, finetune, fit_baselines, read_targets, score_held_out
from scrnalf_hf.training.tasks import TASKS, Targets, Task, get_task, register_task, task_for_model

HEAD_SOURCE = Path(__file__).parent / "marker_score_head" / "modeling_marker_score.py"
REMOTE_CODE = ("configuration_scrnalf.py", "modeling_scrnalf.py", "kernels_scrnalf.py")


def _score_targets(cells, key, min_cells_per_label=None) -> Targets:
    scores = cells.obs_column(key).astype(np.float32)
    return Targets(values=scores, usable=np.isfinite(scores), key=key)


def _scores(targets, point, task_targets, detailed=False) -> dict:
    return {"mae": float(np.abs(targets - point).mean()), "pearson": float(pearsonr(targets, point)[0])}


def _write_score(adata, predicted, config) -> None:
    adata.obs["scrnalf_marker_score"] = predicted["score"]


@pytest.fixture(scope="module")
def marker_score_task(tmp_path_factory):
    """Load the toy head as `scrnalf_hf.modeling_marker_score` from a folder that also holds the
    model files it imports, declare its task, and forget it afterwards."""
    folder = tmp_path_factory.mktemp("head")
    shutil.copy(HEAD_SOURCE, folder)
    for name in REMOTE_CODE:
        shutil.copy(Path(scrnalf_hf.__file__).parent / name, folder)
    spec = importlib.util.spec_from_file_location("scrnalf_hf.modeling_marker_score", folder / HEAD_SOURCE.name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    task = register_task(
        Task(
            name="marker_score",
            model_class=module.ScrnaLongformerForMarkerScore,
            auto_class="AutoModelForSequenceClassification",
            summary="marker-score regression",
            target_option="score_key",
            read_targets=_score_targets,
            align_targets=None,
            masks_genes=False,
            metric_names=("mae", "pearson"),
            best_metric="mae",
            greater_is_better=False,
            predictions=lambda logits: {"score": np.asarray(logits, dtype=np.float32)[:, 0]},
            point=lambda predicted: predicted["score"],
            score=_scores,
            baselines={"mean": lambda seed, weighting: DummyRegressor(), "ridge": lambda seed, weighting: Ridge()},
            write_predictions=_write_score,
            embedding_lr_multiplier=10.0,
        )
    )
    yield task
    TASKS.pop("marker_score")
    sys.modules.pop(spec.name)


LOAD_WITHOUT_PACKAGE = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch
    sys.modules["scrnalf_hf"] = None  # any import of the package now fails
    from transformers import AutoFeatureExtractor, AutoModelForSequenceClassification

    folder, inputs, output = sys.argv[1], sys.argv[2], sys.argv[3]
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoFeatureExtractor.from_pretrained(folder, trust_remote_code=True)
    data = np.load(inputs)
    with torch.no_grad():
        logits = model(**processor(data["counts"], gene_names=list(data["genes"]))).logits
    np.savez(output, logits=logits.numpy(), model_class=type(model).__name__)
    """
)


def test_a_head_declared_outside_the_package_trains_saves_reloads_and_predicts(marker_score_task, tmp_path):
    adata = simulate(300, 60, n_cell_types=3, markers_per_type=3, n_modules=3, seed=3)
    markers = (adata.var["marker_of"] == "type_0").to_numpy()
    normalised = np.log1p(adata.X.toarray() / adata.X.sum(1).A * 1e4)
    adata.obs["type0_score"] = normalised[:, markers].mean(1)  # how strongly a cell runs type_0's programme
    cells = open_cells(adata, obs_keys=("type0_score",), progress=False)
    task = get_task("marker_score")
    targets = read_targets(task, cells, "type0_score")
    train, test = np.arange(240), np.arange(240, 300)
    args = training_arguments(task, tmp_path / "run", num_train_epochs=30, learning_rate=1e-2, disable_tqdm=True,
                              per_device_train_batch_size=16)
    torch.manual_seed(0)
    result = finetune(task, cells, targets, train, args, preset="tiny", config_overrides={"knn_k": 8})
    held_out = score_held_out(result, CellPart(cells, targets, test))
    (mean_row,), _ = fit_baselines(task, result.processor, CellPart(cells, targets, train), CellPart(cells, targets, test), ["mean"])
    assert held_out.metrics["mae"] < 0.5 * mean_row["mae"]  # it learned what a constant cannot
    assert held_out.metrics["pearson"] > 0.8
    assert result.trainer.args.metric_for_best_model == "mae" and not result.trainer.args.greater_is_better

    folder = tmp_path / "hub"
    save_hub_folder(result.model, result.processor, folder)
    assert {"modeling_marker_score.py", *REMOTE_CODE} <= {p.name for p in folder.iterdir()}
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForSequenceClassification"] == "modeling_marker_score.ScrnaLongformerForMarkerScore"

    counts = adata.X[test].toarray()
    np.savez(tmp_path / "inputs.npz", counts=counts, genes=np.array(adata.var_names, dtype=str))
    script = tmp_path / "load.py"
    script.write_text(LOAD_WITHOUT_PACKAGE)
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    loaded = subprocess.run([sys.executable, str(script), str(folder), str(tmp_path / "inputs.npz"), str(tmp_path / "out.npz")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    remote = np.load(tmp_path / "out.npz")
    assert str(remote["model_class"]) == "ScrnaLongformerForMarkerScore"
    np.testing.assert_allclose(remote["logits"][:, 0], held_out.point, rtol=1e-4, atol=1e-4)

    model = task.model_class.from_pretrained(folder)
    assert task_for_model(model) is task
    new_cells = adata[test].copy()
    predict(new_cells, model, result.processor)
    np.testing.assert_allclose(new_cells.obs["scrnalf_marker_score"], held_out.point, rtol=1e-4, atol=1e-4)
    assert new_cells.obsm["X_scrnalf"].shape == (60, model.config.d_model)
    assert new_cells.uns["scrnalf"]["task"] == "marker_score"


def test_built_in_heads_are_registered_from_their_declarations():
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

    from scrnalf_hf import ScrnaLongformerConfig

    config = ScrnaLongformerConfig.from_preset("tiny", n_genes=20, knn_k=4)
    assert type(AutoModelForSequenceClassification.from_config(config)) is get_task("classification").model_class
    assert type(AutoModelForMaskedLM.from_config(config)) is get_task("masked_genes").model_class
    with pytest.raises(ValueError, match=r"unknown task 'trajectoryy'; choose one of \["):
        get_task("trajectoryy")
