"""SIGKILL `scrnalf convert`, `push`, `finetune` and `predict` at random moments and check what each kill leaves.

Each command runs as its own process (``python -m scrnalf_cli``, this checkout's code) and is
killed with SIGKILL, sent to that process only, at ``--kills`` moments drawn (seeded) one in each
equal slice of an uninterrupted run, so the kills cover start-up, work and the finish
(``--window work`` leaves out start-up, mostly imports, and counts from the moment the command
first touches its output: convert's and predict's staging copy, push's first request, finetune's new
split.json). After every kill:

- the output is whole: for ``convert --overwrite --num-proc 2`` over an existing dataset, OUT
  still holds the previous dataset or holds the new one, loading with
  ``datasets.load_from_disk`` with every cell and value (never half a dataset, never nothing);
  for ``push`` to the local Hub (:class:`scrnalf_hf.testing.local_hub.LocalHub`), ``main`` is absent
  or the repo's creation commit, the previous push (odd rounds push over one), or a commit with
  exactly the folder's files;
  for ``finetune --overwrite`` over a finished run (another seed), OUT has a model card
  (README.md, what ``push`` requires) only over one run's complete export, the previous or the
  new one (every file that ``.scrnalf-export.json`` lists, with its sha256, and no other), and
  otherwise no card ("no card": the export was being swapped in, so it does not look finished);
  for ``predict --overwrite`` over earlier predictions of other cells, OUT holds the previous
  predictions or every new one;
- no process the command started survives it by more than ``--orphan-timeout`` seconds
  (processes are found by an environment variable they inherit, wherever they were re-parented);
- the same command, run again without a kill, succeeds, gives the complete new output, and leaves
  no leftovers of the interrupted run (finetune reruns resume from the last complete checkpoint
  in odd rounds where the kill left one of this run, and start again with ``--overwrite`` otherwise).

Prints one row per kill and a summary table; exits 1 if any check failed.

    python scripts/kill_test.py                                  # 20 kills per command, seed 0
    python scripts/kill_test.py --commands finetune,predict
    python scripts/kill_test.py --commands convert --kills 5 --seed 3 --keep --workdir /tmp/kills
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
TAG = "SCRNALF_KILL_TEST_TAG"
HUB_TOKEN = "hf_kill_test_write"
HUB_ORG = "org"


@dataclass
class KillRound:
    """One kill and what was found after it."""

    command: str
    index: int
    kill_at: float  # seconds after the start (or after the work began, window 'work')
    phase: str  # what the command was doing when the kill came ("finished" if it exited first)
    output: str  # what the output was right after the kill
    orphans: int = 0
    leftovers: int = 0  # leftovers of the interrupted run that the rerun found
    rerun_ok: bool = False
    rerun: str = ""  # how the rerun went on where it applies (finetune: "overwrite" or "resume")
    had_previous: bool = True  # whether an earlier output existed before the killed run (push: odd rounds)
    problems: list[str] = field(default_factory=list)


# -- running, killing, finding orphans ---------------------------------------------------------------


def command_environment(tag: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, **(extra or {}), TAG: tag}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return env


def scrnalf(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "scrnalf_cli", *arguments]


def tagged_processes(tag: str) -> list[psutil.Process]:
    """Live processes that inherited ``TAG=tag``: the command's descendants, wherever re-parented."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(TAG) == tag and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def run(
    argv: list[str], env: dict[str, str], log: Path, phase: Callable[[], str] | None = None
) -> tuple[int, float, float]:
    """Runs a command to the end.

    Returns:
        Its exit status, its duration, and when ``phase()`` first left ``"starting"`` (seconds
        after the start; 0 without ``phase``): where the command's work on its output began.
    """
    started, work_began = time.monotonic(), None
    with log.open("wb") as output:
        process = subprocess.Popen(argv, env=env, stdout=output, stderr=subprocess.STDOUT)
        while process.poll() is None:
            if phase is not None and work_began is None and phase() != "starting":
                work_began = time.monotonic() - started
            time.sleep(0.005)
    duration = time.monotonic() - started
    if work_began is None:
        work_began = 0.0 if phase is None else duration
    return process.returncode, duration, work_began


def run_and_kill(
    argv: list[str],
    extra_env: dict[str, str],
    kill_at: float,
    phase: Callable[[], str],
    log: Path,
    orphan_timeout: float,
    after_work_began: bool = False,
) -> tuple[str, int]:
    """Starts ``argv``, SIGKILLs it ``kill_at`` seconds later unless it finished, and reaps what it left.

    With ``after_work_began``, ``kill_at`` counts from the moment ``phase()`` leaves ``"starting"``
    in this very run, so that start-up times varying from run to run do not shift the kill.

    Returns:
        The phase it was killed in (``phase()`` just before the kill, or ``"finished"``) and the
        number of its processes still alive ``orphan_timeout`` seconds after the kill (then killed).
    """
    tag = uuid.uuid4().hex
    with log.open("wb") as output:
        process = subprocess.Popen(argv, env=command_environment(tag, extra_env), stdout=output, stderr=subprocess.STDOUT)
        while after_work_began and process.poll() is None and phase() == "starting":
            time.sleep(0.002)
        deadline = time.monotonic() + kill_at
        while time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.002)
        if process.poll() is not None:
            killed_in = "finished"
        else:
            killed_in = phase()
            process.send_signal(signal.SIGKILL)
        process.wait()
    _, alive = psutil.wait_procs(tagged_processes(tag), timeout=orphan_timeout)
    for orphan in alive:  # started by this script's command: safe to end, and keeps the next round clean
        orphan.kill()
    return killed_in, len(alive)


def kill_times(window: float, kills: int, seed: int) -> list[float]:
    """One time in each equal slice of ``window`` seconds (stratified), so kills spread over all of it."""
    rng = random.Random(seed)
    return [window * (i + rng.random()) / kills for i in range(kills)]


def tail(log: Path, lines: int = 5) -> str:
    return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])


# -- convert --------------------------------------------------------------------------------------------


def dataset_digest(folder: Path) -> tuple[int, str]:
    """Cells and a hash of every stored value; raises if the folder does not load."""
    import datasets
    import pyarrow.compute as pc

    table = datasets.load_from_disk(str(folder)).data.table
    digest = hashlib.sha256((folder / "genes.json").read_bytes())
    digest.update("\n".join(table.column("cell_id").to_pylist()).encode())
    for column in ("indices", "values"):
        digest.update(pc.list_flatten(table.column(column)).to_numpy().tobytes())
    digest.update(table.column("library_size").to_numpy().tobytes())
    return table.num_rows, digest.hexdigest()


def hidden_siblings(output: Path) -> list[Path]:
    return sorted(p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}."))


def replace_output_rounds(
    command: str, what: str, argv: list[str], output: Path, kill_at_times: list[float],
    start_from_previous: Callable[[], object], output_state: Callable[[], str], phase, workdir: Path,
    orphan_timeout: float, window: str, report: Callable[[KillRound], None],
) -> list[KillRound]:
    """Kill rounds of a command that replaces ``output`` (``--overwrite``): after each kill OUT
    must be the previous or the new ``what``, no process may survive, and a rerun must give the
    new one and leave no hidden siblings."""
    rounds = []
    for index, kill_at in enumerate(kill_at_times):
        start_from_previous()
        log = workdir / f"kill-{index:02d}.log"
        killed_in, orphans = run_and_kill(argv, {}, kill_at, phase, log, orphan_timeout, window == "work")
        result = KillRound(command, index, kill_at, killed_in, output_state(), orphans)
        if result.output not in ("previous", "new"):
            result.problems.append(f"OUT after the kill is {result.output}, not the previous or the new {what}")
        if orphans:
            result.problems.append(f"{orphans} process(es) outlived the killed {command} by {orphan_timeout} s")
        result.leftovers = len(hidden_siblings(output))
        status, *_ = run(argv, command_environment(uuid.uuid4().hex), log.with_suffix(".rerun.log"))
        state, remaining = output_state(), hidden_siblings(output)
        result.rerun_ok = status == 0 and state == "new" and not remaining
        if not result.rerun_ok:
            result.problems.append(
                f"rerun: exit {status}, OUT {state}, left {[p.name for p in remaining]}: {tail(log.with_suffix('.rerun.log'))}"
            )
        report(result)
        rounds.append(result)
    return rounds


def convert_rounds(
    workdir: Path, kills: int = 20, seed: int = 0, n_cells: int = 20_000, n_genes: int = 2000, num_proc: int = 2,
    orphan_timeout: float = 5.0, window: str = "run", report: Callable[[KillRound], None] = lambda r: None,
) -> list[KillRound]:
    """``scrnalf convert NEW OUT --overwrite --num-proc P`` killed ``kills`` times over a previous dataset.

    ``window="run"`` spreads the kills over the whole run, ``"work"`` over the part after the
    staging folder appeared (start-up, mostly imports, excluded).
    """
    from scrnalf_hf.data import convert_anndata
    from scrnalf_hf.data.simulation import write_simulated_h5ad

    workdir = Path(workdir) / "convert"
    workdir.mkdir(parents=True, exist_ok=True)
    old_input, new_input = workdir / "old.h5ad", workdir / "new.h5ad"
    write_simulated_h5ad(old_input, n_cells // 2, n_genes, seed=seed + 1)
    write_simulated_h5ad(new_input, n_cells, n_genes, seed=seed + 2)
    previous = workdir / "previous"
    convert_anndata(old_input, previous, progress=False, allow_empty_genes=True)
    expected = {"previous": dataset_digest(previous)}

    output = workdir / "runs" / "out"
    output.parent.mkdir()
    argv = scrnalf("convert", str(new_input), str(output), "--num-proc", str(num_proc), "--overwrite",
                   "--allow-empty-genes")

    def phase() -> str:
        if any(".incomplete-" in p.name for p in hidden_siblings(output)):
            return "writing"
        try:
            return "starting" if os.stat(output).st_ino == previous_inode else "swapped"
        except FileNotFoundError:
            return "no output"

    previous_inode = None  # of the copied previous dataset: the same inode after a kill means not yet swapped

    def start_from_previous() -> None:
        nonlocal previous_inode
        shutil.rmtree(output, ignore_errors=True)
        for leftover in hidden_siblings(output):
            shutil.rmtree(leftover)
        shutil.copytree(previous, output)
        previous_inode = os.stat(output).st_ino

    start_from_previous()
    status, duration, work_began = run(argv, command_environment("baseline"), workdir / "baseline.log", phase)
    if status != 0:
        raise RuntimeError(f"the uninterrupted conversion failed (exit {status}): {tail(workdir / 'baseline.log')}")
    expected["new"] = dataset_digest(output)

    def output_state() -> str:
        if not output.exists():
            return "none"
        try:
            digest = dataset_digest(output)
        except Exception as error:  # whatever fails to load is the finding
            return f"broken ({type(error).__name__}: {error})"
        return next((name for name, value in expected.items() if value == digest), f"other ({digest[0]} cells)")

    window_length = duration - work_began if window == "work" else duration
    return replace_output_rounds(
        "convert", "dataset", argv, output, kill_times(window_length, kills, seed), start_from_previous, output_state,
        phase, workdir, orphan_timeout, window, report,
    )


# -- push -----------------------------------------------------------------------------------------------


def make_hub_folder(folder: Path, n_genes: int, seed: int, preset: str, gene_symbols: list[str] | None = None) -> Path:
    """A Hub-ready folder of an untrained classifier: weights, config, processor, code, card
    (genes ``GENE0``, ``GENE1``, ... unless ``gene_symbols`` names them)."""
    import torch

    from scrnalf_hf import ScrnaLongformerConfig, ScrnaLongformerForCellClassification, ScrnaLongformerProcessor
    from scrnalf_hf.hub import save_hub_folder, write_model_card

    logging.getLogger("scrnalf_hf.hub.cards").setLevel(logging.ERROR)  # "not recorded" notes: no run records
    torch.manual_seed(seed)
    labels = ["B cell", "T cell", "NK cell"]
    config = ScrnaLongformerConfig.from_preset(
        preset, n_genes=len(gene_symbols) if gene_symbols else n_genes, id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)}
    )
    processor = ScrnaLongformerProcessor(gene_symbols=gene_symbols or [f"GENE{i}" for i in range(n_genes)])
    save_hub_folder(ScrnaLongformerForCellClassification(config), processor, folder)
    write_model_card(folder, repo_id=f"{HUB_ORG}/scrna-longformer-{preset}")
    return folder


def folder_files(folder: Path) -> dict[str, str]:
    """What a complete push of ``folder`` puts on the Hub: path → sha256."""
    from scrnalf_hf.hub import validate_hub_folder

    return {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in validate_hub_folder(folder).files.items()}


def quiet_about_killed_clients(hub) -> None:
    """A killed client resets its connection, which is the point here; the server's traceback for
    each would drown the table."""
    server = hub._server
    report_error = server.handle_error

    def handle_error(request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            report_error(request, client_address)

    server.handle_error = handle_error


def push_rounds(
    workdir: Path, kills: int = 20, seed: int = 0, n_genes: int = 2000, preset: str = "tiny",
    orphan_timeout: float = 5.0, window: str = "run", report: Callable[[KillRound], None] = lambda r: None,
) -> list[KillRound]:
    """``scrnalf push`` to a local Hub killed ``kills`` times; odd rounds push over an earlier commit.

    ``window="run"`` spreads the kills over the whole run, ``"work"`` over the part after the
    first request reached the Hub.
    """
    from scrnalf_hf.testing.local_hub import LocalHub

    workdir = Path(workdir) / "push"
    workdir.mkdir(parents=True, exist_ok=True)
    previous_folder = make_hub_folder(workdir / "previous", n_genes, seed + 1, preset)
    new_folder = make_hub_folder(workdir / "new", n_genes, seed + 2, preset)
    expected = folder_files(new_folder)
    rounds = []
    with LocalHub(root=workdir / "hub_storage", tokens={HUB_TOKEN: [HUB_ORG]}) as hub:
        quiet_about_killed_clients(hub)
        environment = {**hub.client_environment(HUB_TOKEN), "HF_HOME": str(workdir / "hf_home")}

        def push(folder: Path, repo_id: str) -> list[str]:
            return scrnalf("push", "--model-dir", str(folder), "--repo-id", repo_id)

        def main_files(repo_id: str) -> tuple[str | None, dict[str, str]]:
            repo = hub.repo(repo_id)
            if repo is None or "main" not in repo.branches:
                return None, {}
            head = repo.commits[repo.branches["main"]]
            return head.oid, {path: entry.sha256 for path, entry in head.files.items() if path != ".gitattributes"}

        repo_id = f"{HUB_ORG}/kill-baseline"
        requests_before = len(hub.requests)

        def phase() -> str:
            if len(hub.requests) == requests_before:
                return "starting"
            return "committed" if main_files(repo_id)[1] == expected else "uploading"

        status, duration, work_began = run(
            push(new_folder, repo_id), command_environment("baseline", environment), workdir / "baseline.log", phase
        )
        if status != 0 or main_files(repo_id)[1] != expected:
            raise RuntimeError(f"the uninterrupted push failed (exit {status}): {tail(workdir / 'baseline.log')}")

        window_length = duration - work_began if window == "work" else duration
        for index, kill_at in enumerate(kill_times(window_length, kills, seed)):
            repo_id, log = f"{HUB_ORG}/kill-{index:02d}", workdir / f"kill-{index:02d}.log"
            previous_commit = None
            if index % 2:
                status, *_ = run(push(previous_folder, repo_id), command_environment("setup", environment),
                                 log.with_suffix(".setup.log"))
                previous_commit = main_files(repo_id)[0]
                if status != 0 or previous_commit is None:
                    raise RuntimeError(f"pushing the previous folder failed: {tail(log.with_suffix('.setup.log'))}")
            requests_before = len(hub.requests)
            killed_in, orphans = run_and_kill(push(new_folder, repo_id), environment, kill_at, phase, log,
                                              orphan_timeout, window == "work")
            commit, files = main_files(repo_id)
            if not files:
                state = "none"
            elif commit == previous_commit:
                state = "previous"
            elif files == expected:
                state = "new"
            else:
                state = f"partial ({len(files)} of {len(expected)} files)"
            result = KillRound("push", index, kill_at, killed_in, state, orphans, had_previous=previous_commit is not None)
            if state not in ("none", "previous", "new"):
                result.problems.append(f"main after the kill is {state}")
            if orphans:
                result.problems.append(f"{orphans} process(es) outlived the killed push by {orphan_timeout} s")
            status, *_ = run(push(new_folder, repo_id), command_environment(uuid.uuid4().hex, environment),
                             log.with_suffix(".rerun.log"))
            result.rerun_ok = status == 0 and main_files(repo_id)[1] == expected
            if not result.rerun_ok:
                result.problems.append(f"rerun: exit {status}: {tail(log.with_suffix('.rerun.log'))}")
            report(result)
            rounds.append(result)
    return rounds


# -- finetune -------------------------------------------------------------------------------------------

EXPORT_RECORD = ".scrnalf-export.json"


def write_marker_h5ad(path: Path, n_cells: int, n_genes: int, seed: int, n_types: int = 3) -> Path:
    """Integer counts where each cell type over-expresses its own block of 8 genes (obs ``cell_type``)."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    labels = np.arange(n_cells) % n_types
    rates = np.full((n_types, n_genes), 1.0)
    for cell_type in range(n_types):
        rates[cell_type, cell_type * 8 : cell_type * 8 + 8] = 10.0
    names = np.array([f"type{t}" for t in range(n_types)])
    obs = pd.DataFrame({"cell_type": pd.Categorical(names[labels])}, index=[f"cell{i}" for i in range(n_cells)])
    adata = ad.AnnData(rng.poisson(rates[labels]).astype(np.float32), obs=obs,
                       var=pd.DataFrame(index=[f"GENE{i}" for i in range(n_genes)]))
    adata.write_h5ad(path)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_export_state(folder: Path, previous: dict, new_seed: int) -> str:
    """What a finetune output folder looks like.

    ``no card``: no README.md, so it does not look finished (``scrnalf push`` refuses it);
    ``previous`` / ``new``: a card and exactly the files of one run's export (those
    ``.scrnalf-export.json`` lists, with their sha256, and no other exported file), the previous
    run's or one of seed ``new_seed`` that ``scrnalf push`` validates; anything else, e.g.
    ``mixed (...)``, is a folder that looks finished but is not.
    """
    from scrnalf_hf.hub import validate_hub_folder

    if not folder.is_dir():
        return "none"
    if not (folder / "README.md").is_file():
        return "no card"
    try:
        record = json.loads((folder / EXPORT_RECORD).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "card without export record"
    present = {p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.name != "split.json"}
    listed = {name for name in record if not name.startswith(".")}
    if present != listed:
        return f"mixed (files {sorted(present ^ listed)[:3]} differ from the record)"
    changed = [name for name, digest in record.items() if not (folder / name).is_file() or sha256(folder / name) != digest]
    if changed:
        return f"mixed ({len(changed)} of {len(record)} files are not the recorded ones: {changed[:3]})"
    if record == previous:
        return "previous"
    try:
        validate_hub_folder(folder)
        seed = json.loads((folder / "training_summary.json").read_text())["seed"]
    except Exception as error:  # whatever fails is the finding
        return f"broken ({type(error).__name__}: {str(error)[:80]})"
    return "new" if seed == new_seed else f"other (seed {seed})"


def run_leftovers(folder: Path) -> list[Path]:
    """Hidden entries a run left in its output folder or beside it (its export record excepted)."""
    inside = [p for p in folder.iterdir() if p.name.startswith(".") and p.name != EXPORT_RECORD] if folder.is_dir() else []
    return sorted(inside + hidden_siblings(folder))


def inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def finetune_rounds(
    workdir: Path, kills: int = 20, seed: int = 0, n_cells: int = 400, n_genes: int = 60, preset: str = "tiny",
    epochs: int = 1, orphan_timeout: float = 5.0, window: str = "run", report: Callable[[KillRound], None] = lambda r: None,
) -> list[KillRound]:
    """``scrnalf finetune ... --output-dir OUT --overwrite`` killed ``kills`` times over a finished run.

    OUT starts as a copy of a finished run (another seed) each round. After the kill, OUT must
    hold a model card only over a complete export, the previous one or the new one (see
    :func:`run_export_state`); without a card it does not look finished. The rerun continues
    with ``--resume-from-checkpoint true`` in odd rounds where the kill left this run's split and
    a complete checkpoint, and starts again with ``--overwrite`` otherwise; it must succeed, give
    the new export, and leave no hidden leftovers. ``window="work"`` counts from the moment the
    run wrote its split (after reading the cells).
    """
    from scrnalf_hf.training.finetune import last_complete_checkpoint

    workdir = Path(workdir) / "finetune"
    workdir.mkdir(parents=True, exist_ok=True)
    data = write_marker_h5ad(workdir / "cells.h5ad", n_cells, n_genes, seed)
    new_seed = seed + 2

    def finetune(output: Path, run_seed: int, *extra: str) -> list[str]:
        return scrnalf("finetune", "--train-file", str(data), "--label-key", "cell_type", "--preset", preset,
                       "--output-dir", str(output), "--config-overrides", "knn_k=8", "--num-train-epochs", str(epochs),
                       "--disable-tqdm", "true", "--seed", str(run_seed), *extra)

    previous = workdir / "previous"
    status, *_ = run(finetune(previous, seed + 1), command_environment("setup"), workdir / "previous.log")
    if status != 0:
        raise RuntimeError(f"the previous run failed (exit {status}): {tail(workdir / 'previous.log')}")
    previous_record = json.loads((previous / EXPORT_RECORD).read_text())["files"]

    output = workdir / "runs" / "out"
    output.parent.mkdir()
    argv = finetune(output, new_seed, "--overwrite")
    marks: dict[str, int | None] = {}

    def phase() -> str:
        if inode(output / "split.json") == marks["split"]:
            return "starting"
        card = inode(output / "README.md")
        if card is None:
            return "swapping"
        if card != marks["card"]:
            return "swapped"
        if any(p.name.startswith(".export-incomplete-") for p in output.iterdir()):
            return "exporting"
        return "training"

    def start_from_previous() -> None:
        shutil.rmtree(output, ignore_errors=True)
        for leftover in hidden_siblings(output):
            shutil.rmtree(leftover)
        shutil.copytree(previous, output)
        marks.update(split=inode(output / "split.json"), card=inode(output / "README.md"))

    start_from_previous()
    status, duration, work_began = run(argv, command_environment("baseline"), workdir / "baseline.log", phase)
    if status != 0 or run_export_state(output, previous_record, new_seed) != "new":
        raise RuntimeError(f"the uninterrupted run failed (exit {status}): {tail(workdir / 'baseline.log')}")

    rounds = []
    window_length = duration - work_began if window == "work" else duration
    for index, kill_at in enumerate(kill_times(window_length, kills, seed)):
        start_from_previous()
        log = workdir / f"kill-{index:02d}.log"
        killed_in, orphans = run_and_kill(argv, {}, kill_at, phase, log, orphan_timeout, window == "work")
        result = KillRound("finetune", index, kill_at, killed_in, run_export_state(output, previous_record, new_seed), orphans)
        if result.output not in ("no card", "previous", "new"):
            result.problems.append(f"OUT after the kill is {result.output}: it looks finished but is not one run's export")
        if orphans:
            result.problems.append(f"{orphans} process(es) outlived the killed run by {orphan_timeout} s")
        result.leftovers = len(run_leftovers(output))
        resumable = (
            index % 2 == 1 and phase() != "starting" and last_complete_checkpoint(output) is not None
        )
        rerun = finetune(output, new_seed, "--resume-from-checkpoint", "true") if resumable else argv
        status, *_ = run(rerun, command_environment(uuid.uuid4().hex), log.with_suffix(".rerun.log"))
        state, remaining = run_export_state(output, previous_record, new_seed), run_leftovers(output)
        result.rerun_ok = status == 0 and state == "new" and not remaining
        result.rerun = "resume" if resumable else "overwrite"
        if not result.rerun_ok:
            result.problems.append(
                f"rerun ({result.rerun}): exit {status}, OUT {state}, left {[p.name for p in remaining]}: "
                f"{tail(log.with_suffix('.rerun.log'))}"
            )
        report(result)
        rounds.append(result)
    return rounds


# -- predict --------------------------------------------------------------------------------------------


def predictions_digest(path: Path) -> tuple[int, str]:
    """Cells and a hash of what predict wrote (``scrnalf_*`` obs columns, obsm arrays rounded to 1e-4,
    the run record); raises if the file does not read."""
    import h5py
    import numpy as np
    from anndata.io import read_elem

    with h5py.File(path, "r") as handle:
        if "scrnalf" not in handle["uns"]:
            raise ValueError("no uns['scrnalf'] run record")
        obs = read_elem(handle["obs"])
        digest = hashlib.sha256("\n".join(map(str, obs.index)).encode())
        columns = sorted(c for c in obs.columns if c.startswith("scrnalf_"))
        if not columns:
            raise ValueError("no scrnalf_* obs column")
        for column in columns:
            values = obs[column]
            if values.isna().any():
                raise ValueError(f"obs[{column!r}] has missing values")
            digest.update(column.encode() + "\n".join(map(str, values.astype(str))).encode())
        for key in sorted(handle["obsm"]):
            if "scrnalf" in key:
                digest.update(key.encode() + np.round(np.asarray(handle["obsm"][key][:], dtype=np.float64), 4).tobytes())
        return len(obs), digest.hexdigest()


def predict_rounds(
    workdir: Path, kills: int = 20, seed: int = 0, n_cells: int = 20_000, n_genes: int = 2000, preset: str = "tiny",
    orphan_timeout: float = 5.0, window: str = "run", report: Callable[[KillRound], None] = lambda r: None,
) -> list[KillRound]:
    """``scrnalf predict --overwrite`` killed ``kills`` times over an earlier prediction of other cells.

    After the kill, OUT must be the previous predictions or the complete new ones (every cell,
    every value); the rerun must give the new ones and remove the killed run's staging copy.
    ``window="work"`` counts from the moment the staging copy appeared.
    """
    from scrnalf_hf.data import dataset_genes
    from scrnalf_hf.data.simulation import write_simulated_h5ad
    from scrnalf_hf.inference import predict_file

    workdir = Path(workdir) / "predict"
    workdir.mkdir(parents=True, exist_ok=True)
    old_input, new_input = workdir / "old.h5ad", workdir / "new.h5ad"
    write_simulated_h5ad(old_input, max(n_cells // 2, 1), n_genes, seed=seed + 1)
    write_simulated_h5ad(new_input, n_cells, n_genes, seed=seed + 2)
    symbols = list(dataset_genes(new_input, require_counts=False).gene_symbols)
    model = make_hub_folder(workdir / "model", len(symbols), seed, preset, gene_symbols=symbols)
    previous = workdir / "previous.h5ad"
    predict_file(str(model), old_input, previous)
    expected = {"previous": predictions_digest(previous)}

    output = workdir / "runs" / "out.h5ad"
    output.parent.mkdir()
    argv = scrnalf("predict", "--model", str(model), "--input", str(new_input), "--output", str(output), "--overwrite")
    marks: dict[str, int | None] = {}

    def phase() -> str:
        if any(".incomplete-" in p.name for p in hidden_siblings(output)):
            return "writing"
        current = inode(output)
        return "starting" if current == marks["previous"] else ("no output" if current is None else "swapped")

    def start_from_previous() -> None:
        output.unlink(missing_ok=True)
        for leftover in hidden_siblings(output):
            leftover.unlink()
        shutil.copyfile(previous, output)
        marks["previous"] = inode(output)

    def output_state() -> str:
        if not output.exists():
            return "none"
        try:
            digest = predictions_digest(output)
        except Exception as error:  # whatever fails to read is the finding
            return f"broken ({type(error).__name__}: {error})"
        return next((name for name, value in expected.items() if value == digest), f"other ({digest[0]} cells)")

    start_from_previous()
    status, duration, work_began = run(argv, command_environment("baseline"), workdir / "baseline.log", phase)
    if status != 0:
        raise RuntimeError(f"the uninterrupted prediction failed (exit {status}): {tail(workdir / 'baseline.log')}")
    expected["new"] = predictions_digest(output)

    window_length = duration - work_began if window == "work" else duration
    return replace_output_rounds(
        "predict", "predictions", argv, output, kill_times(window_length, kills, seed), start_from_previous, output_state,
        phase, workdir, orphan_timeout, window, report,
    )


# -- report ------------------------------------------------------------------------------------------------


def print_row(result: KillRound) -> None:
    rerun = ("ok" if result.rerun_ok else "FAILED") + (f" ({result.rerun})" if result.rerun else "")
    print(
        f"{result.command:8} {result.index:5d} {result.kill_at:8.2f} s  {result.phase:10} {result.output:12} "
        f"{result.orphans:7d} {result.leftovers:9d}  {rerun:16} "
        f"{'; '.join(result.problems)}",
        flush=True,
    )


def summary_table(rounds: list[KillRound]) -> str:
    rows = [
        ("command", "kills", "killed while", "output after kill", "looked complete, was not", "orphans",
         "previous intact or new whole", "leftovers cleaned", "reruns ok", "problems"),
    ]
    for command in dict.fromkeys(r.command for r in rounds):
        mine = [r for r in rounds if r.command == command]
        phases = Counter(r.phase for r in mine)
        outputs = Counter(r.output for r in mine)
        rows.append((
            command,
            str(len(mine)),
            ", ".join(f"{name} {count}" for name, count in sorted(phases.items())),
            ", ".join(f"{name} {count}" for name, count in sorted(outputs.items())),
            str(sum(name not in ("none", "no card", "previous", "new") for name in (r.output for r in mine))),
            str(sum(r.orphans for r in mine)),
            f"{sum(r.output in ('previous', 'new') or (r.output == 'none' and not r.had_previous) for r in mine)}/{len(mine)}",
            str(sum(r.leftovers for r in mine)),
            f"{sum(r.rerun_ok for r in mine)}/{len(mine)}",
            str(sum(len(r.problems) for r in mine)),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", default="convert,push,finetune,predict",
                        help="comma-separated: convert, push, finetune, predict")
    parser.add_argument("--kills", type=int, default=20, help="kills per command")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill times and the data")
    parser.add_argument("--n-cells", type=int, default=20_000, help="cells of the dataset convert writes")
    parser.add_argument("--n-genes", type=int, default=2000, help="genes of the dataset and of the pushed model")
    parser.add_argument("--predict-cells", type=int, default=3000, help="cells predict reads (simulated)")
    parser.add_argument("--predict-genes", type=int, default=300, help="genes of predict's cells and model")
    parser.add_argument("--finetune-cells", type=int, default=400, help="cells finetune trains on (marker genes, 3 types)")
    parser.add_argument("--finetune-genes", type=int, default=60, help="genes of finetune's cells")
    parser.add_argument("--epochs", type=int, default=1, help="finetune's --num-train-epochs")
    parser.add_argument("--num-proc", type=int, default=2, help="convert's worker processes")
    parser.add_argument("--preset", default="tiny", help="size of the pushed model")
    parser.add_argument(
        "--window", choices=("run", "work"), default="run",
        help="spread kills over the whole run, or over its work only (after start-up: staging folder / first request)",
    )
    parser.add_argument("--orphan-timeout", type=float, default=5.0, help="seconds a killed command's processes may take to die")
    parser.add_argument("--workdir", type=Path, help="where inputs, outputs and logs go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    commands = [c for c in args.commands.split(",") if c]
    unknown = set(commands) - {"convert", "push", "finetune", "predict"}
    if unknown or args.kills < 1:
        parser.error(f"--commands takes convert, push, finetune, predict (got {sorted(unknown)}); --kills must be >= 1.")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="scrnalf-kill-test-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {workdir}")
    print(f"kill at: seconds after {'the start' if args.window == 'run' else 'the work began'} (--window {args.window})\n")
    print(f"{'command':8} {'round':>5} {'kill at':>10}  {'phase':10} {'output':12} {'orphans':>7} {'leftovers':>9}  rerun")
    started = time.monotonic()
    rounds: list[KillRound] = []
    try:
        if "convert" in commands:
            rounds += convert_rounds(workdir, args.kills, args.seed, args.n_cells, args.n_genes, args.num_proc,
                                     args.orphan_timeout, args.window, print_row)
        if "push" in commands:
            rounds += push_rounds(workdir, args.kills, args.seed, args.n_genes, args.preset, args.orphan_timeout,
                                  args.window, print_row)
        if "finetune" in commands:
            rounds += finetune_rounds(workdir, args.kills, args.seed, args.finetune_cells, args.finetune_genes,
                                      args.preset, args.epochs, args.orphan_timeout, args.window, print_row)
        if "predict" in commands:
            rounds += predict_rounds(workdir, args.kills, args.seed, args.predict_cells, args.predict_genes, args.preset,
                                     args.orphan_timeout, args.window, print_row)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n{len(rounds)} kills in {time.monotonic() - started:.0f} s\n")
    print(summary_table(rounds))
    print(json.dumps({"problems": [p for r in rounds for p in r.problems]}, indent=1) if any(r.problems for r in rounds)
          else "\nno problems: every kill left a whole output, no orphan, and a rerun that succeeded.")
    return 1 if any(r.problems for r in rounds) else 0


if __name__ == "__main__":
    sys.exit(main())
