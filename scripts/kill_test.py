"""SIGKILL `scrnalf convert` and `scrnalf push` at random moments and check what each kill leaves.

Each command runs as its own process (``python -m scrnalf_cli``, this checkout's code) and is
killed with SIGKILL, sent to that process only, at ``--kills`` moments drawn (seeded) one in each
equal slice of an uninterrupted run, so the kills cover start-up, work and the finish
(``--window work`` leaves out start-up, mostly imports, and counts from the moment the command
first touches its output: convert's staging folder, push's first request). After every kill:

- the output is whole: for ``convert --overwrite --num-proc 2`` over an existing dataset, OUT
  still holds the previous dataset or holds the new one, loading with
  ``datasets.load_from_disk`` with every cell and value (never half a dataset, never nothing);
  for ``push`` to the local Hub (:class:`scrnalf_hf.testing.local_hub.LocalHub`), ``main`` is absent
  or the repo's creation commit, the previous push (odd rounds push over one), or a commit with
  exactly the folder's files;
- no process the command started survives it by more than ``--orphan-timeout`` seconds
  (processes are found by an environment variable they inherit, wherever they were re-parented);
- the same command, run again without a kill, succeeds, gives the complete new output, and leaves
  no leftovers of the interrupted run.

Prints one row per kill and a summary table; exits 1 if any check failed.

    python scripts/kill_test.py                                  # 20 kills per command, seed 0
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

    def start_from_previous() -> int:
        shutil.rmtree(output, ignore_errors=True)
        for leftover in hidden_siblings(output):
            shutil.rmtree(leftover)
        shutil.copytree(previous, output)
        return os.stat(output).st_ino

    previous_inode = start_from_previous()
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

    rounds = []
    window_length = duration - work_began if window == "work" else duration
    for index, kill_at in enumerate(kill_times(window_length, kills, seed)):
        previous_inode = start_from_previous()
        log = workdir / f"kill-{index:02d}.log"
        killed_in, orphans = run_and_kill(argv, {}, kill_at, phase, log, orphan_timeout, window == "work")
        result = KillRound("convert", index, kill_at, killed_in, output_state(), orphans)
        if result.output not in ("previous", "new"):
            result.problems.append(f"OUT after the kill is {result.output}, not the previous or the new dataset")
        if orphans:
            result.problems.append(f"{orphans} process(es) outlived the killed conversion by {orphan_timeout} s")
        result.leftovers = len(hidden_siblings(output))
        status, *_ = run(argv, command_environment(uuid.uuid4().hex), log.with_suffix(".rerun.log"))
        state, remaining = output_state(), hidden_siblings(output)
        result.rerun_ok = status == 0 and state == "new" and not remaining
        if not result.rerun_ok:
            result.problems.append(
                f"rerun: exit {status}, OUT {state}, left {[p.name for p in remaining]}: "
                f"{tail(log.with_suffix('.rerun.log'))}"
            )
        report(result)
        rounds.append(result)
    return rounds


# -- push -----------------------------------------------------------------------------------------------


def make_hub_folder(folder: Path, n_genes: int, seed: int, preset: str) -> Path:
    """A Hub-ready folder of an untrained classifier: weights, config, processor, code, card."""
    import torch

    from scrnalf_hf import ScrnaLongformerConfig, ScrnaLongformerForCellClassification, ScrnaLongformerProcessor
    from scrnalf_hf.hub import save_hub_folder, write_model_card

    logging.getLogger("scrnalf_hf.hub.cards").setLevel(logging.ERROR)  # "not recorded" notes: no run records
    torch.manual_seed(seed)
    labels = ["B cell", "T cell", "NK cell"]
    config = ScrnaLongformerConfig.from_preset(
        preset, n_genes=n_genes, id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)}
    )
    processor = ScrnaLongformerProcessor(gene_symbols=[f"GENE{i}" for i in range(n_genes)])
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
            result = KillRound("push", index, kill_at, killed_in, state, orphans)
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


# -- report ------------------------------------------------------------------------------------------------


def print_row(result: KillRound) -> None:
    print(
        f"{result.command:8} {result.index:5d} {result.kill_at:8.2f} s  {result.phase:10} {result.output:12} "
        f"{result.orphans:7d} {result.leftovers:9d}  {'ok' if result.rerun_ok else 'FAILED':6} "
        f"{'; '.join(result.problems)}",
        flush=True,
    )


def summary_table(rounds: list[KillRound]) -> str:
    rows = [
        ("command", "kills", "killed while", "output after kill", "incomplete outputs", "orphans",
         "leftovers cleaned", "reruns ok", "problems"),
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
            str(sum(name not in ("none", "previous", "new") for name in (r.output for r in mine))),
            str(sum(r.orphans for r in mine)),
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
    parser.add_argument("--commands", default="convert,push", help="comma-separated: convert, push")
    parser.add_argument("--kills", type=int, default=20, help="kills per command")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill times and the data")
    parser.add_argument("--n-cells", type=int, default=20_000, help="cells of the dataset convert writes")
    parser.add_argument("--n-genes", type=int, default=2000, help="genes of the dataset and of the pushed model")
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
    unknown = set(commands) - {"convert", "push"}
    if unknown or args.kills < 1:
        parser.error(f"--commands takes convert and/or push (got {sorted(unknown)}); --kills must be >= 1.")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="scrnalf-kill-test-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {workdir}")
    print(f"kill at: seconds after {'the start' if args.window == 'run' else 'the work began'} (--window {args.window})\n")
    print(f"{'command':8} {'round':>5} {'kill at':>10}  {'phase':10} {'output':12} {'orphans':>7} {'leftovers':>9}  rerun")
    rounds: list[KillRound] = []
    try:
        if "convert" in commands:
            rounds += convert_rounds(workdir, args.kills, args.seed, args.n_cells, args.n_genes, args.num_proc,
                                     args.orphan_timeout, args.window, print_row)
        if "push" in commands:
            rounds += push_rounds(workdir, args.kills, args.seed, args.n_genes, args.preset, args.orphan_timeout,
                                  args.window, print_row)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(summary_table(rounds))
    print(json.dumps({"problems": [p for r in rounds for p in r.problems]}, indent=1) if any(r.problems for r in rounds)
          else "\nno problems: every kill left a whole output, no orphan, and a rerun that succeeded.")
    return 1 if any(r.problems for r in rounds) else 0


if __name__ == "__main__":
    sys.exit(main())
