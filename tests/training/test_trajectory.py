"""The trajectory task: pseudotime targets, training that learns, predict, compare rows (with
scanpy's diffusion pseudotime beside the model) and the refusals of bad time columns."""

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from helpers import write_h5ad

from scrnalf_cli import main
from scrnalf_hf.data import open_cells, simulate
from scrnalf_hf.training.arguments import training_arguments
from scrnalf_hf.training.compare import compare
from scrnalf_hf.training.finetune import CellPart, finetune, read_targets, score_held_out
from scrnalf_hf.training.tasks import PSEUDOTIME_KEY, TRAJECTORY, get_task, task_for_model

# a strong, short trajectory: half of the genes follow pseudotime (log fold change 3 from t=0 to t=1)
SIMULATION = {"trajectory": True, "n_cell_types": 2, "markers_per_type": 3, "n_modules": 3, "trajectory_fraction": 0.5,
              "trajectory_log_fold_change": 3.0}
FAST = {"num_train_epochs": 8, "learning_rate": 1e-2, "per_device_train_batch_size": 16, "disable_tqdm": True,
        "log_level": "warning"}
EAGER = {"kernel_implementation": "eager"}


def trajectory_adata(n_cells=120, n_genes=30, seed=0) -> ad.AnnData:
    return simulate(n_cells, n_genes, seed=seed, **SIMULATION)


def trajectory_cells(adata):
    cells = open_cells(adata, obs_keys=("pseudotime",), progress=False)
    return cells, read_targets(TRAJECTORY, cells, "pseudotime")


def test_trajectory_is_a_registered_task_with_its_own_head():
    task = get_task("trajectory")
    assert task is TRAJECTORY and task.target_option == "time_key" and task.floor == "ridge"
    assert task_for_model({"architectures": ["ScrnaLongformerForTrajectory"]}) is TRAJECTORY
    assert task.metric_names == ("spearman", "mae") and task.best_metric == "spearman"


def test_time_targets_are_the_numeric_column_with_random_splits():
    adata = trajectory_adata(n_cells=20)
    cells, targets = trajectory_cells(adata)
    np.testing.assert_allclose(targets.values, adata.obs["pseudotime"].to_numpy(), rtol=1e-6)
    assert targets.values.dtype == np.float32 and targets.stratify is None and targets.names is None


@pytest.mark.parametrize(
    "column, message",
    [
        (None, "obs column 'day' is not in"),
        (["early", "late"] * 10, "time column 'day' must hold numbers"),
        ([0.1] * 19 + [np.nan], "time column 'day' has 1 cell"),
    ],
)
def test_bad_time_columns_are_one_line_errors_and_write_nothing(tmp_path, capsys, column, message):
    adata = trajectory_adata(n_cells=20)
    if column is not None:
        adata.obs["day"] = pd.Series(column, index=adata.obs_names)
    if column is not None:
        cells = open_cells(adata, obs_keys=("day",), progress=False)
        with pytest.raises(ValueError, match=message):
            read_targets(TRAJECTORY, cells, "day")
    data = write_h5ad(adata, tmp_path)
    for command in (
        ["finetune", "--task", "trajectory", "--time-key", "day", "--preset", "tiny"],
        ["compare", "--task", "trajectory", "--time-key", "day", "--methods", "ridge", "--cv", "2"],
    ):
        output = tmp_path / command[0]
        capsys.readouterr()
        assert main([*command, "--train-file", str(data), "--output-dir", str(output)]) == 1
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith(f"scrnalf {command[0]}: error: ") and message in error, error
        assert not output.exists()


def test_the_other_task_target_option_is_refused(tmp_path, capsys):
    data = write_h5ad(trajectory_adata(n_cells=20), tmp_path)
    assert main(["finetune", "--task", "trajectory", "--label-key", "cell_type", "--train-file", str(data),
                 "--preset", "tiny", "--output-dir", str(tmp_path / "out")]) == 1
    assert "--label-key does not apply to pseudotime regression; give --time-key instead" in capsys.readouterr().err
    assert main(["finetune", "--train-file", str(data), "--preset", "tiny", "--output-dir", str(tmp_path / "out")]) == 1
    assert "--label-key is required" in capsys.readouterr().err
    assert main(["finetune", "--task", "trajectory", "--train-file", str(data), "--preset", "tiny",
                 "--output-dir", str(tmp_path / "out")]) == 1
    assert "--time-key is required for pseudotime regression" in capsys.readouterr().err


@pytest.mark.parametrize("unit", [1.0, 1000.0])  # pseudotime in [0, 1), or in thousands of e.g. minutes
def test_finetune_learns_pseudotime_of_simulated_linear_data_in_any_unit(tmp_path, unit):
    adata = trajectory_adata()
    adata.obs["pseudotime"] *= unit
    cells, targets = trajectory_cells(adata)
    rows = np.random.default_rng(0).permutation(cells.n_cells)
    train, test = np.sort(rows[:90]), np.sort(rows[90:])
    args = training_arguments(TRAJECTORY, tmp_path, **FAST, eval_strategy="no", save_strategy="no",
                              load_best_model_at_end=False)
    result = finetune(TRAJECTORY, cells, targets, train, args, preset="tiny", validation_fraction=0, config_overrides=EAGER)
    config = result.trainer.model.config
    assert config.target_center == pytest.approx(targets.values[train].mean(), rel=1e-5)
    assert config.target_scale == pytest.approx(targets.values[train].std(), rel=1e-5)
    scores = score_held_out(result, CellPart(cells, targets, test))
    assert scores.point.shape == (30,) and scores.metrics["spearman"] > 0.5, scores.metrics
    assert scores.metrics["mae"] < 0.2 * unit


def test_cli_finetune_then_predict_writes_pseudotime(tmp_path):
    adata = trajectory_adata()
    data = write_h5ad(adata, tmp_path)
    model_dir = tmp_path / "model"
    assert main(["finetune", "--task", "trajectory", "--time-key", "pseudotime", "--train-file", str(data),
                 "--preset", "tiny", "--output-dir", str(model_dir), "--config-overrides", "kernel_implementation=eager",
                 "--num_train_epochs", "4", "--learning_rate", "1e-2", "--per_device_train_batch_size", "16",
                 "--disable_tqdm", "true"]) == 0
    summary = json.loads((model_dir / "training_summary.json").read_text())
    assert summary["task"] == "trajectory" and summary["target_key"] == "pseudotime"
    assert set(summary["metrics"]) == {"spearman", "mae"} and set(summary["baselines"]) == {"ridge"}
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["ScrnaLongformerForTrajectory"]
    assert config["auto_map"]["AutoModelForTimeSeriesPrediction"] == "modeling_scrnalf.ScrnaLongformerForTrajectory"
    assert "Spearman correlation" in (model_dir / "README.md").read_text()

    predicted = tmp_path / "predicted.h5ad"
    assert main(["predict", "--model", str(model_dir), "--input", str(data), "--output", str(predicted)]) == 0
    result = ad.read_h5ad(predicted)
    assert result.obs[PSEUDOTIME_KEY].dtype == np.float32 and np.isfinite(result.obs[PSEUDOTIME_KEY]).all()
    assert result.obs[PSEUDOTIME_KEY].std() > 0 and result.obsm["X_scrnalf"].shape[0] == adata.n_obs


def test_compare_rows_have_the_exact_columns_with_diffusion_pseudotime(tmp_path):
    adata = trajectory_adata(n_cells=150)
    cells, targets = trajectory_cells(adata)
    root = str(adata.obs_names[int(np.argmin(adata.obs["pseudotime"]))])
    args = training_arguments(TRAJECTORY, tmp_path / "runs", **{**FAST, "num_train_epochs": 2})
    result = compare(TRAJECTORY, cells, targets, "tiny,ridge", tmp_path, args, n_folds=3, only_folds=[0],
                     config_overrides=EAGER, root_cell=root)
    rows = json.loads((tmp_path / "comparison.json").read_text())
    assert [row["method"] for row in rows] == ["tiny", "ridge", "diffusion_pseudotime"]
    for row in rows:
        assert list(row) == ["method", "fold", "spearman", "mae", "train_seconds", "n_parameters"]
        assert row["fold"] == 0 and -1 <= row["spearman"] <= 1 and row["mae"] >= 0
    by_method = {row["method"]: row for row in rows}
    # with half of the genes on the trajectory the unsupervised DPT and the supervised ridge both order cells well
    assert by_method["ridge"]["spearman"] > 0.8 and by_method["diffusion_pseudotime"]["spearman"] > 0.6
    held_out = result.folds == 0
    for method in ("tiny", "ridge", "diffusion_pseudotime"):
        assert np.isfinite(result.predictions[method][held_out]).all()
    assert "| diffusion_pseudotime | 1 |" in (tmp_path / "comparison.md").read_text()


def test_root_cell_must_be_a_cell_and_belongs_to_the_trajectory_task(tmp_path, capsys):
    data = write_h5ad(trajectory_adata(n_cells=20), tmp_path)
    base = ["compare", "--train-file", str(data), "--methods", "ridge", "--cv", "2"]
    assert main([*base, "--task", "trajectory", "--time-key", "pseudotime", "--root-cell", "nope",
                 "--output-dir", str(tmp_path / "a")]) == 1
    assert "--root-cell 'nope' is not a cell of" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert main([*base[:-4], "--methods", "logreg", "--cv", "2", "--label-key", "cell_type", "--root-cell", "cell_0000000",
                 "--output-dir", str(tmp_path / "b")]) == 1
    assert "applies to --task trajectory" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_time_point_conditioning_runs_from_finetune_through_predict_and_ridge_sees_the_time_too(tmp_path, capsys):
    adata = trajectory_adata()
    adata.obs["day"] = np.round(adata.obs["pseudotime"].to_numpy() * 3)  # four sampling days
    data = write_h5ad(adata, tmp_path)
    model_dir = tmp_path / "model"
    assert main(["finetune", "--task", "trajectory", "--time-key", "pseudotime", "--time-point-key", "day",
                 "--train-file", str(data), "--preset", "tiny", "--output-dir", str(model_dir),
                 "--config-overrides", "kernel_implementation=eager", "--num_train_epochs", "2",
                 "--disable_tqdm", "true"]) == 0
    assert json.loads((model_dir / "config.json").read_text())["time_conditioning"] is True

    predicted = tmp_path / "predicted.h5ad"
    assert main(["predict", "--model", str(model_dir), "--input", str(data), "--output", str(predicted)]) == 1
    assert "give --time-point-key" in capsys.readouterr().err and not predicted.exists()
    assert main(["predict", "--model", str(model_dir), "--input", str(data), "--output", str(predicted),
                 "--time-point-key", "day"]) == 0
    shifted = adata.copy()
    shifted.obs["day"] += 5  # far outside the training days: the time encoder moves every prediction
    assert not np.allclose(
        ad.read_h5ad(predicted).obs[PSEUDOTIME_KEY],
        __import__("scrnalf_hf").tl.pseudotime(shifted, str(model_dir), time_point_key="day", copy=True).obs[PSEUDOTIME_KEY],
    )

    rows = {}
    for key in (None, "day"):
        output = tmp_path / f"compare_{key}"
        assert main(["compare", "--task", "trajectory", "--time-key", "pseudotime", "--train-file", str(data),
                     "--methods", "ridge", "--cv", "2", "--output-dir", str(output),
                     *(["--time-point-key", key] if key else [])]) == 0
        rows[key] = json.loads((output / "comparison.json").read_text())[0]
    assert rows["day"]["n_parameters"] == rows[None]["n_parameters"] + 1  # one more feature: the time point


def test_time_points_are_refused_where_they_mean_nothing(tmp_path, capsys, trained_tiny_folder):
    adata = trajectory_adata(n_cells=20)
    adata.obs["day"] = ["d0", "d1"] * 10
    data = write_h5ad(adata, tmp_path)
    assert main(["finetune", "--task", "trajectory", "--time-key", "pseudotime", "--time-point-key", "day",
                 "--train-file", str(data), "--preset", "tiny", "--output-dir", str(tmp_path / "a")]) == 1
    assert "time point column 'day' must hold numbers" in capsys.readouterr().err and not (tmp_path / "a").exists()
    adata.obs["day"] = 1.0
    data = write_h5ad(adata, tmp_path, "numeric.h5ad")
    assert main(["compare", "--label-key", "cell_type", "--time-point-key", "day", "--methods", "logreg", "--cv", "2",
                 "--train-file", str(data), "--output-dir", str(tmp_path / "b")]) == 1
    assert "--time-point-key conditions a trajectory model" in capsys.readouterr().err and not (tmp_path / "b").exists()
    assert main(["predict", "--model", str(trained_tiny_folder), "--input", str(data), "--output", str(tmp_path / "c.h5ad"),
                 "--time-point-key", "day"]) == 1
    assert "this model ignores time points" in capsys.readouterr().err and not (tmp_path / "c.h5ad").exists()
