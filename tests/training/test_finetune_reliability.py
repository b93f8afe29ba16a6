"""`scrnalf finetune` / `pretrain` outputs are atomic: the export is staged and moved into place
with the model card last, a used --output-dir is replaced only with --overwrite and only if a run
wrote it, killed runs' leftovers are removed by the next run, and resume skips a checkpoint a kill
cut short. The 3-kill versions of scripts/kill_test.py's finetune and predict rounds end the file."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import load_script, marker_adata, write_h5ad

import scrnalf_hf  # noqa: F401  (registers the Auto classes)
from scrnalf_cli import main
from scrnalf_hf.hub import HubFolderError, validate_hub_folder
from scrnalf_hf.training import reports
from scrnalf_hf.training.finetune import last_complete_checkpoint

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def marker_file(tmp_path_factory):
    return write_h5ad(marker_adata(n_cells=150), tmp_path_factory.mktemp("cells"), "markers.h5ad")


def command(data: Path, output: Path, *extra: str) -> list[str]:
    return ["finetune", "--train-file", str(data), "--label-key", "cell_type", "--preset", "tiny", "--output-dir",
            str(output), "--config-overrides", "knn_k=8", "--num_train_epochs", "1", "--disable_tqdm", "true", *extra]


@pytest.fixture(scope="module")
def finished_run(marker_file, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("finished") / "run"
    assert main(command(marker_file, output, "--seed", "1")) == 0
    return output


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


class Killed(BaseException):
    """Stands for SIGKILL: nothing catches it, no clean-up beyond ``finally`` runs."""


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_export_record_lists_every_exported_file_and_the_card(finished_run):
    record = reports.export_record(finished_run)["files"]
    exported = {p.name for p in finished_run.iterdir() if p.is_file() and p.name not in ("split.json", reports.EXPORT_RECORD)}
    assert set(record) == exported and "README.md" in record and "model.safetensors" in record
    assert not [p.name for p in finished_run.iterdir() if p.name.startswith(".") and p.name != reports.EXPORT_RECORD]
    validate_hub_folder(finished_run)


def test_a_used_output_dir_is_refused_without_overwrite_and_left_as_it_was(marker_file, run_copy, capsys):
    before = contents(run_copy)
    assert main(command(marker_file, run_copy)) == 1
    assert "already holds a finished run (its model card README.md)" in capsys.readouterr().err
    assert contents(run_copy) == before and last_complete_checkpoint(run_copy) is not None


def test_overwrite_refuses_a_folder_no_run_wrote(marker_file, tmp_path, capsys):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main(command(marker_file, other, "--overwrite")) == 1
    assert "was not written by scrnalf finetune/pretrain" in capsys.readouterr().err
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_an_interrupted_run_is_refused_naming_resume_and_overwrite(marker_file, run_copy, capsys):
    (run_copy / "README.md").unlink()  # killed while its export was being swapped in
    assert main(command(marker_file, run_copy)) == 1
    assert "--resume-from-checkpoint true to continue it" in capsys.readouterr().err


def test_overwrite_keeps_the_previous_export_whole_when_the_new_one_fails_before_the_swap(
    marker_file, run_copy, monkeypatch
):
    before = {name: data for name, data in contents(run_copy).items() if name != "split.json"}

    def failing_card(folder, *args, **kwargs):
        raise RuntimeError("killed while writing the card")

    monkeypatch.setattr("scrnalf_hf.hub.cards.write_model_card", failing_card)
    with pytest.raises(RuntimeError, match="killed while writing the card"):
        main(["--debug", *command(marker_file, run_copy, "--overwrite", "--seed", "2")])
    after = contents(run_copy)
    assert {name: data for name, data in after.items() if name != "split.json"} == before  # the old export, whole
    assert json.loads(after["split.json"])["seed"] == 2  # the new run's split, for --resume-from-checkpoint
    assert not [p for p in run_copy.iterdir() if p.name.startswith(".export-incomplete-")]
    validate_hub_folder(run_copy)


def test_a_swap_cut_short_leaves_no_card_so_push_refuses_and_a_rerun_completes(marker_file, run_copy, monkeypatch):
    real_replace, moved = os.replace, []

    def replace_three(source, target):
        if len(moved) == 3:
            raise Killed  # as if killed in the middle of the swap
        moved.append(Path(target).name)
        real_replace(source, target)

    monkeypatch.setattr(reports.os, "replace", replace_three)
    with pytest.raises(Killed):
        main(command(marker_file, run_copy, "--overwrite", "--seed", "2"))
    assert len(moved) == 3 and "README.md" not in moved
    assert not (run_copy / "README.md").exists()
    with pytest.raises(HubFolderError, match="no README.md"):
        validate_hub_folder(run_copy)
    monkeypatch.setattr(reports.os, "replace", real_replace)
    assert main(command(marker_file, run_copy, "--overwrite", "--seed", "2")) == 0
    assert json.loads((run_copy / "training_summary.json").read_text())["seed"] == 2
    validate_hub_folder(run_copy)


def test_publish_removes_the_old_card_first_and_moves_the_new_card_last(tmp_path, monkeypatch):
    output, staging = tmp_path / "run", tmp_path / "run" / ".export-incomplete-1-abcdef12"
    staging.mkdir(parents=True)
    for name, text in (("README.md", "old card"), ("stale.json", "{}"), ("model.safetensors", "old")):
        (output / name).write_text(text)
    (output / reports.EXPORT_RECORD).write_text(json.dumps({"files": {"stale.json": "x", "model.safetensors": "y"}}))
    for name in ("README.md", "model.safetensors", "config.json", reports.EXPORT_RECORD):
        (staging / name).write_text(f"new {name}")
    events, real_replace, real_unlink = [], os.replace, Path.unlink

    def replace(source, target):
        events.append(("replace", Path(target).name))
        real_replace(source, target)

    def unlink(self, missing_ok=False):
        events.append(("unlink", self.name))
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(reports.os, "replace", replace)
    monkeypatch.setattr(Path, "unlink", unlink)
    reports.publish_export(staging, output)
    events = [event for event in events if event[1] != ".scrnalf-writer.json"]  # the staging folder's own record
    assert events[0] == ("unlink", "README.md")
    assert events[-2:] == [("replace", reports.EXPORT_RECORD), ("replace", "README.md")]
    assert ("unlink", "stale.json") in events and not (output / "stale.json").exists()  # the old export's extra file
    assert (output / "README.md").read_text() == "new README.md" and not staging.exists()


def test_the_next_run_removes_what_a_killed_run_left_and_names_it(marker_file, run_copy, capsys):
    pid = dead_pid()
    staging = run_copy / f".export-incomplete-{pid}-abcdef12"
    retired = run_copy / f".checkpoint-3.replaced-{pid}-abcdef12"
    for folder in (staging, retired):
        folder.mkdir()
        (folder / "model.safetensors").write_text("half")
    assert main(command(marker_file, run_copy, "--overwrite", "--seed", "2")) == 0
    assert not staging.exists() and not retired.exists()
    err = capsys.readouterr().err
    assert f"removed {staging.name}" in err and f"removed {retired.name}" in err
    assert [p.name for p in run_copy.iterdir() if p.name.startswith(".")] == [reports.EXPORT_RECORD]
    assert [p.name for p in run_copy.glob("checkpoint-*")] == [Path(last_complete_checkpoint(run_copy)).name]


def test_a_running_export_into_the_folder_is_left_alone_and_the_run_refused(marker_file, run_copy, capsys):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        staging = run_copy / f".export-incomplete-{sleeper.pid}-abcdef12"
        staging.mkdir()
        assert main(command(marker_file, run_copy, "--overwrite")) == 1
        assert "another run is writing its output" in capsys.readouterr().err
        assert staging.is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_resume_skips_and_removes_a_checkpoint_a_kill_cut_short(marker_file, run_copy):
    complete = Path(last_complete_checkpoint(run_copy))
    cut = run_copy / "checkpoint-999"
    shutil.copytree(complete, cut)
    (cut / "trainer_state.json").unlink()  # Trainer writes it last
    assert last_complete_checkpoint(run_copy) == str(complete)
    (run_copy / "README.md").unlink()  # killed in the swap: resume writes the export again
    assert main(command(marker_file, run_copy, "--seed", "1", "--resume-from-checkpoint", "true")) == 0
    assert not cut.exists() and (run_copy / "README.md").is_file()
    validate_hub_folder(run_copy)


def test_overwrite_and_resume_together_are_refused(marker_file, run_copy, capsys):
    assert main(command(marker_file, run_copy, "--overwrite", "--resume-from-checkpoint", "true")) == 1
    assert "give one" in capsys.readouterr().err


def test_predict_removes_a_dead_runs_staging_copy_and_keeps_a_running_ones(trained_tiny_folder, tmp_path, caplog):
    import numpy as np

    from scrnalf_hf.inference import predict_file

    inputs = np.load(trained_tiny_folder / "inputs.npz")
    adata = marker_adata(n_cells=30, n_genes=len(inputs["genes"]))
    adata.var_names = list(inputs["genes"])
    source = write_h5ad(adata, tmp_path, "in.h5ad")
    output = tmp_path / "out.h5ad"
    dead = tmp_path / f".out.h5ad.incomplete-{dead_pid()}-abcdef12"
    dead.write_bytes(b"half a file")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running = tmp_path / f".out.h5ad.incomplete-{sleeper.pid}-abcdef12"
        running.write_bytes(b"being written")
        with caplog.at_level(logging.WARNING):
            predict_file(str(trained_tiny_folder), source, output)
        assert output.is_file() and not dead.exists() and running.exists()
        assert f"removed {dead.name}" in caplog.text
    finally:
        sleeper.kill()
        sleeper.wait()


# -- SIGKILL at random points (the fast versions of scripts/kill_test.py's finetune and predict) ----------



@pytest.mark.slow
def test_finetune_killed_at_random_moments_leaves_no_false_card_and_no_orphan(tmp_path):
    """Three kills of `scrnalf finetune --overwrite` over a finished run, once it wrote its split;
    the second rerun resumes where it can."""
    rounds = load_script("kill_test").finetune_rounds(tmp_path, kills=3, seed=1, n_cells=150, n_genes=40, window="work")
    assert len(rounds) == 3
    assert [problem for result in rounds for problem in result.problems] == []


@pytest.mark.slow
def test_predict_killed_at_random_moments_leaves_whole_predictions_and_no_orphan(tmp_path):
    """Three kills of `scrnalf predict --overwrite` over earlier predictions, once its staging copy appeared."""
    rounds = load_script("kill_test").predict_rounds(tmp_path, kills=3, seed=1, n_cells=600, n_genes=100, window="work")
    assert len(rounds) == 3
    assert [problem for result in rounds for problem in result.problems] == []
