"""`scrnalf convert` under hostile conditions: killed runs, workers orphaned by a killed parent,
leftovers of interrupted runs, --overwrite of something that is not a dataset, repeated genes."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import datasets
import numpy as np
import pytest
from helpers import load_script

from scrnalf_hf.data import convert as convert_module
from scrnalf_hf.data import convert_anndata, dataset_genes, simulate

REPO = Path(__file__).resolve().parents[2]


def small_counts(n_cells: int = 120, n_genes: int = 40, seed: int = 0) -> ad.AnnData:
    adata = simulate(n_cells, n_genes, seed=seed, n_cell_types=3, markers_per_type=3, n_modules=3)
    adata.obs_names = adata.obs_names.astype(str)
    return adata


def python_child(code: str) -> subprocess.Popen:
    """A Python process running ``code`` with this checkout's ``scrnalf_hf``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def slowed_conversion(source: Path, output: Path, seconds_per_chunk: float, num_proc: int) -> str:
    """Code for a child that converts ``source`` with every chunk delayed, so it can be caught mid-run."""
    return f"""
import time
from scrnalf_hf.data import convert
real_table = convert._cells_table
def slow_table(*args):
    time.sleep({seconds_per_chunk})
    return real_table(*args)
convert._cells_table = slow_table
convert.convert_anndata({str(source)!r}, {str(output)!r}, chunk_size=10, cells_per_shard=50,
                        num_proc={num_proc}, progress=False)
"""


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def staging_folders(parent: Path, name: str = "out") -> list[Path]:
    return sorted(p for p in parent.iterdir() if p.name.startswith(f".{name}.incomplete-"))


# -- a parent killed while its workers write ------------------------------------------------------


@pytest.fixture(scope="module")
def killed_parallel_run(tmp_path_factory):
    """Kill (SIGKILL) a 2-worker conversion while both workers write shards.

    Returns the folder and the workers still alive 5 s after the kill (then killed, so a failing
    run leaves no stray processes on the machine).
    """
    import psutil

    folder = tmp_path_factory.mktemp("killed")
    small_counts(n_cells=400).write_h5ad(folder / "in.h5ad")
    child = python_child(slowed_conversion(folder / "in.h5ad", folder / "out", 0.3, num_proc=2))
    parent = psutil.Process(child.pid)
    workers = wait_for(lambda: len(parent.children()) >= 2 and parent.children(), 120, "two worker processes")
    wait_for(lambda: any(p.glob("data-*.arrow") for p in staging_folders(folder)), 60, "a shard being written")
    child.kill()
    child.wait()
    _, alive = psutil.wait_procs(workers, timeout=5)
    for worker in alive:
        worker.kill()
    return folder, alive


def test_workers_die_with_their_killed_parent(killed_parallel_run):
    _, alive = killed_parallel_run
    assert alive == [], f"worker processes {[p.pid for p in alive]} outlived their SIGKILLed parent"


def test_next_conversion_removes_what_a_killed_run_left_and_names_it(killed_parallel_run, caplog):
    folder, _ = killed_parallel_run
    leftovers = staging_folders(folder)
    assert leftovers, "the killed run should have left its staging folder"
    with caplog.at_level(logging.WARNING, logger=convert_module.__name__):
        dataset = convert_anndata(folder / "in.h5ad", folder / "out", progress=False)
    assert len(dataset) == 400
    assert staging_folders(folder) == []
    for leftover in leftovers:
        assert leftover.name in caplog.text
    assert "interrupted" in caplog.text


def test_an_interrupted_parallel_conversion_stops_its_workers_at_once(tmp_path, monkeypatch):
    """Ctrl-C (or an error) in the parent must not wait for the remaining shards to be written."""
    import psutil

    real_table, real_wait, calls = convert_module._cells_table, convert_module.wait, []

    def slow_table(*args):  # runs in the forked workers
        time.sleep(0.2)
        return real_table(*args)

    def interrupted_wait(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_wait(*args, **kwargs)

    monkeypatch.setattr(convert_module, "_cells_table", slow_table)
    monkeypatch.setattr(convert_module, "wait", interrupted_wait)
    adata = small_counts(n_cells=400)
    # Children this process had before (e.g. torch.compile's worker pool of earlier tests) are not ours.
    before = {child.pid for child in psutil.Process().children()}
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):  # 40 chunks of 0.2 s on 2 workers: 4 s if it waited
        convert_anndata(adata, tmp_path / "out", chunk_size=10, cells_per_shard=50, num_proc=2, progress=False)
    assert time.monotonic() - started < 2.5
    assert [child for child in psutil.Process().children() if child.pid not in before] == []
    assert list(tmp_path.iterdir()) == []


def test_a_running_conversions_staging_folder_is_left_alone(tmp_path):
    small_counts(n_cells=200).write_h5ad(tmp_path / "in.h5ad")
    child = python_child(slowed_conversion(tmp_path / "in.h5ad", tmp_path / "out", 600, num_proc=1))
    try:
        running = wait_for(lambda: staging_folders(tmp_path), 120, "the running conversion's staging folder")
        convert_anndata(tmp_path / "in.h5ad", tmp_path / "out", progress=False)
        assert staging_folders(tmp_path) == running
        assert child.poll() is None
    finally:
        child.kill()
        child.wait()


def test_a_staging_folder_whose_pid_was_reused_is_removed(tmp_path, caplog):
    """A pid alive again after its writer died belongs to another process (other start time)."""
    stale = tmp_path / f".out.incomplete-{os.getpid()}-0a1b2c3d"
    stale.mkdir()
    (stale / convert_module.WRITER_FILE).write_text(
        json.dumps({"pid": os.getpid(), "create_time": 1.0, "host": socket.gethostname()})
    )
    (stale / "data-00000-of-00001.arrow").write_bytes(b"partial")
    with caplog.at_level(logging.WARNING, logger=convert_module.__name__):
        convert_anndata(small_counts(), tmp_path / "out", progress=False)
    assert not stale.exists() and stale.name in caplog.text


def test_a_dataset_moved_aside_by_an_interrupted_replace_is_restored(tmp_path, caplog):
    """Without an atomic exchange, a kill between the two renames leaves only `.out.replaced-*`."""
    old = small_counts(n_cells=90)
    convert_anndata(old, tmp_path / "out", progress=False)
    writer = subprocess.Popen(["true"])
    writer.wait()
    (tmp_path / "out").rename(tmp_path / f".out.replaced-{writer.pid}-0a1b2c3d")
    with caplog.at_level(logging.WARNING, logger=convert_module.__name__), pytest.raises(FileExistsError):
        convert_anndata(small_counts(n_cells=120), tmp_path / "out", progress=False)
    assert len(datasets.load_from_disk(str(tmp_path / "out"))) == 90
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert "restored" in caplog.text


def test_replacing_swaps_the_finished_dataset_in_and_leaves_nothing_behind(tmp_path):
    convert_anndata(small_counts(n_cells=90), tmp_path / "out", progress=False)
    dataset = convert_anndata(small_counts(n_cells=120), tmp_path / "out", overwrite=True, progress=False)
    assert len(dataset) == 120
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert convert_module.WRITER_FILE not in {p.name for p in (tmp_path / "out").iterdir()}


# -- --overwrite replaces only what convert wrote -----------------------------------------------


def foreign_folder(path: Path) -> None:
    path.mkdir()
    (path / "notes.txt").write_text("my analysis")


def saved_to_disk_dataset(path: Path) -> None:
    datasets.Dataset.from_dict({"x": [1, 2]}).save_to_disk(str(path))


def fake_genes_json(path: Path) -> None:
    path.mkdir()
    for name in ("genes.json", "dataset_info.json", "state.json"):
        (path / name).write_text("[1, 2, 3]")


@pytest.mark.parametrize(
    "make_target", [foreign_folder, saved_to_disk_dataset, fake_genes_json, Path.mkdir], ids=lambda f: f.__name__
)
def test_overwrite_refuses_a_folder_that_is_not_a_converted_dataset(tmp_path, make_target):
    target = tmp_path / "out"
    make_target(target)
    before = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match=r"not a dataset written by scrnalf convert") as error:
        convert_anndata(small_counts(), target, overwrite=True, progress=False)
    assert str(target) in str(error.value) and "genes.json" in str(error.value)
    assert {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_existing_file_as_output_is_refused_before_anything_is_written(tmp_path, overwrite, monkeypatch):
    (tmp_path / "out").write_text("results")
    monkeypatch.setattr(convert_module, "open_anndata", lambda *a, **k: pytest.fail("the input was read"))
    with pytest.raises(FileExistsError, match=r"is a file, not a folder") as error:
        convert_anndata(small_counts(), tmp_path / "out", overwrite=overwrite, progress=False)
    assert str(tmp_path / "out") in str(error.value)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out").read_text() == "results"


# -- repeated genes ---------------------------------------------------------------------------------


def with_genes(symbols: list[str], ids: list[str] | None) -> ad.AnnData:
    adata = small_counts(n_genes=len(symbols))
    adata.var_names = symbols
    adata.var = adata.var.drop(columns="gene_ids") if ids is None else adata.var.assign(gene_ids=ids)
    return adata


def finetune_processor(folder: Path):
    """The processor `scrnalf finetune --train-file FOLDER` builds: the dataset's genes as its panel."""
    import numpy as np

    from scrnalf_hf.data import fit_processor, open_cells

    cells = open_cells(folder)
    return fit_processor(cells, np.arange(cells.n_cells))


def symbols_with_repeats(n: int) -> list[str]:
    return ["Rp1", "Sox17", "Rp1", "RP1"] + [f"G{i}" for i in range(n - 4)]


def test_repeated_symbols_are_fine_where_gene_ids_are_the_key(tmp_path, recwarn):
    symbols = symbols_with_repeats(40)
    ids = [f"ENSMUSG{i:011d}" for i in range(40)]
    convert_anndata(with_genes(symbols, ids), tmp_path / "out", label_key="cell_type", progress=False)
    genes = dataset_genes(tmp_path / "out")
    assert genes.gene_ids == ids
    assert genes.gene_symbols[:4] == ["Rp1", "Sox17", "Rp1-1", "RP1-2"]
    assert not [w for w in recwarn if "repeat" in str(w.message)]
    processor = finetune_processor(tmp_path / "out")
    assert processor.gene_ids == ids


def test_repeated_gene_ids_are_refused_naming_them(tmp_path):
    symbols = [f"G{i}" for i in range(40)]
    ids = [f"ENSMUSG{i:011d}" for i in range(40)]
    ids[7] = ids[3]
    ids[9] = ids[5] + ".2"  # the same gene in another Ensembl release
    with pytest.raises(ValueError, match=r"gene_ids.*ENSMUSG00000000003.*ENSMUSG00000000005.*gene_id_key"):
        convert_anndata(with_genes(symbols, ids), tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_repeated_symbols_without_ids_are_made_unique_with_a_warning(tmp_path):
    symbols = symbols_with_repeats(40)
    adata = with_genes(symbols, None)
    with pytest.warns(UserWarning, match=r"repeat.*var_names_make_unique.*'Rp1' → 'Rp1-1'"):
        convert_anndata(adata, tmp_path / "out", label_key="cell_type", progress=False)
    genes = dataset_genes(tmp_path / "out")
    assert genes.gene_ids is None
    assert genes.gene_symbols[:4] == ["Rp1", "Sox17", "Rp1-1", "RP1-2"] and len(set(genes.gene_symbols)) == 40
    processor = finetune_processor(tmp_path / "out")
    batch = processor(adata.X[:5], gene_names=genes.gene_symbols)
    np.testing.assert_array_equal(batch["attention_mask"].numpy(), 1)


def test_streamed_and_converted_gene_lists_agree_with_repeated_symbols(tmp_path):
    with_genes(symbols_with_repeats(40), None).write_h5ad(tmp_path / "in.h5ad")
    with pytest.warns(UserWarning, match="repeat"):
        convert_anndata(tmp_path / "in.h5ad", tmp_path / "out", progress=False, num_proc=2, cells_per_shard=40)
    with pytest.warns(UserWarning, match="repeat"):
        assert dataset_genes(tmp_path / "in.h5ad") == dataset_genes(tmp_path / "out")


# -- SIGKILL at random points (the fast version of scripts/kill_test.py) -------------------------------



@pytest.mark.slow
def test_convert_killed_at_random_moments_leaves_a_whole_dataset_and_no_orphan(tmp_path):
    """Three kills of `scrnalf convert --overwrite --num-proc 2` while it works on its output."""
    rounds = load_script("kill_test").convert_rounds(
        tmp_path, kills=3, seed=1, n_cells=3000, n_genes=300, num_proc=2, window="work"
    )
    assert len(rounds) == 3
    assert [problem for result in rounds for problem in result.problems] == []
