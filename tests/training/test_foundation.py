"""scripts/pretrain_foundation.py: several sources → one pretrained, Hub-ready folder with its data
and compute on the card."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForMaskedLM

import scrnalf_hf  # noqa: F401  (registers the Auto classes)
from scrnalf_cli import main
from scrnalf_hf.data.simulation import simulate

ROOT = Path(__file__).resolve().parents[2]


def run_script(*args: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "pretrain_foundation.py"), *args],
                           capture_output=True, text=True, env=environment, timeout=600)


def test_two_sources_pretrain_into_a_loadable_folder_whose_card_names_them(tmp_path):
    first = tmp_path / "first.h5ad"
    simulate(n_cells=60, n_genes=120, seed=0).write_h5ad(first)
    second = simulate(n_cells=40, n_genes=120, seed=1)[:, 20:]  # 100 of the same genes: the union is 120
    second.write_h5ad(tmp_path / "second.h5ad")
    converted = tmp_path / "second_dataset"
    assert main(["convert", str(tmp_path / "second.h5ad"), str(converted)]) == 0
    output = tmp_path / "foundation"

    done = run_script("--source", str(first), "--source", str(converted), "--species", "human", "--species", "mouse",
                      "--preset", "tiny", "--output-dir", str(output), "--num-train-epochs", "1", "--logging-steps", "1",
                      "--disable-tqdm", "true")

    assert done.returncode == 0, done.stderr[-2000:]
    assert type(AutoModelForMaskedLM.from_pretrained(output)).__name__ == "ScrnaLongformerForMaskedGeneModeling"
    record = json.loads((output / "foundation.json").read_text())
    assert [(s["location"], s["kind"], s["n_cells"], s["species"]) for s in record["sources"]] == [
        (str(first), "h5ad", 60, "human"), (str(converted), "convert folder", 40, "mouse")]
    assert record["n_cells"] == 100 and record["n_genes_union"] == 120 and record["genes_matched_by"] == "gene_ids"
    compute = record["compute"]
    assert compute["device_count"] == 1 and compute["device_hours"] > 0 and compute["train_cells_per_second"] > 0
    assert len(record["loss_curve"]) >= 2 and all(point["loss"] > 0 for point in record["loss_curve"])
    assert (output / "foundation_loss.png").stat().st_size > 0
    card = (output / "README.md").read_text()
    assert "\n# foundation\n" in card and ".export-incomplete" not in card  # named after the folder, not its staging
    assert "## Pretraining data and compute" in card and "not a biological foundation model" in card
    assert f"`{first}`" in card and f"`{converted}`" in card and "foundation_loss.png" in card


def test_a_missing_source_is_refused_in_one_line_and_nothing_is_written(tmp_path):
    present = tmp_path / "present.h5ad"
    simulate(n_cells=20, n_genes=120, seed=0).write_h5ad(present)
    output = tmp_path / "foundation"

    done = run_script("--source", str(present), "--source", str(tmp_path / "absent.h5ad"), "--preset", "tiny",
                      "--output-dir", str(output))

    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [f"pretrain_foundation.py: error: source {tmp_path / 'absent.h5ad'} does not exist."]
    assert not output.exists()


def test_transfer_refuses_a_pretrain_file_next_to_a_given_checkpoint(tmp_path, capsys):
    cells = tmp_path / "cells.h5ad"
    simulate(n_cells=20, n_genes=120, seed=0).write_h5ad(cells)

    code = main(["transfer", "--train-file", str(cells), "--label-key", "cell_type", "--output-dir", str(tmp_path / "curve"),
                 "--pretrained-model", str(tmp_path / "foundation"), "--pretrain-file", str(cells)])

    assert code != 0
    assert "with --pretrained-model nothing is pretrained" in capsys.readouterr().err


@pytest.mark.slow  # a SOMA store and a pretraining process: ~20 s each
def test_one_soma_source_streams_and_its_cells_are_counted(tmp_path):
    pytest.importorskip("tiledbsoma_ml")
    from scrnalf_hf.data.soma import write_soma

    store = tmp_path / "store"
    write_soma(simulate(n_cells=50, n_genes=120, seed=0), store)
    output = tmp_path / "foundation"

    done = run_script("--source", str(store), "--species", "human", "--preset", "tiny", "--output-dir", str(output),
                      "--num-train-epochs", "1", "--disable-tqdm", "true")

    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((output / "foundation.json").read_text())
    assert record["sources"] == [{"location": str(store), "kind": "soma", "n_cells": 50, "species": "human"}]
    assert "streamed from the SOMA experiment" in (output / "README.md").read_text()


@pytest.mark.slow  # a SOMA store and a pretraining process: ~20 s each
def test_a_soma_source_does_not_mix_with_files(tmp_path):
    store, cells = tmp_path / "store", tmp_path / "cells.h5ad"
    store.mkdir()
    (store / "__group").mkdir()  # what a local TileDB group holds
    simulate(n_cells=20, n_genes=120, seed=0).write_h5ad(cells)

    done = run_script("--source", str(cells), "--source", str(store), "--preset", "tiny", "--output-dir", str(tmp_path / "out"))

    assert done.returncode != 0 and "cannot be combined with other sources" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
