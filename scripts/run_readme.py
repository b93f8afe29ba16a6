"""Run every command block of the README as written, in order, from the repository root.

Fenced ``bash`` blocks run with ``bash -eo pipefail``, fenced ``python`` blocks with this Python;
blocks without a language (diagrams) are not commands. The one line left out is the README's
test command (``python -m pytest``): it is what runs this script's siblings, not something to
run from inside them. Exits non-zero at the first block that fails or outruns ``--timeout``,
printing its output.

    python scripts/run_readme.py [--readme README.md] [--list]

CI runs it on a fresh clone (``.ci/run``); it writes what a user following the README would
(``demo_output/``, ``pbmc68k_reduced.h5ad``, ``runs/``, ...), all ignored by git.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```", re.MULTILINE | re.DOTALL)
TEST_COMMAND = re.compile(r"^\s*python3? -m pytest\b")


def command_blocks(readme: str) -> list[tuple[str, str]]:
    """``[(language, code), ...]`` of the README's bash and python blocks, in order."""
    return [(language, code) for language, code in BLOCK.findall(readme)]


def runnable(language: str, code: str) -> str:
    if language == "bash":
        return "\n".join(line for line in code.splitlines() if not TEST_COMMAND.match(line))
    return code


def run_block(command: list[str], timeout_s: float) -> tuple[int | None, str]:
    """Run one block in its own session; ``(exit status or None on timeout, stdout + stderr)``.

    Output goes to a file, not a pipe, and the whole session is killed afterwards: a server a
    block starts in the background must neither keep this script waiting nor outlive the block.
    """
    with tempfile.TemporaryFile(mode="w+") as output:
        process = subprocess.Popen(
            command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        output.seek(0)
        return returncode, output.read()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    parser.add_argument("--list", action="store_true", help="print the blocks instead of running them")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one block may run (default 1800)")
    args = parser.parse_args(argv)
    blocks = command_blocks(args.readme.read_text())
    for number, (language, code) in enumerate(blocks, 1):
        code = runnable(language, code)
        first = code.strip().splitlines()[0] if code.strip() else "(empty)"
        print(f"[{number}/{len(blocks)}] {language}: {first[:100]}", flush=True)
        if args.list:
            print(code)
            continue
        command = ["bash", "-eo", "pipefail", "-c", code] if language == "bash" else [sys.executable, "-c", code]
        started = time.perf_counter()
        returncode, output = run_block(command, args.timeout)
        seconds = time.perf_counter() - started
        if returncode != 0:
            print(output[-8000:], file=sys.stderr)
            reason = "timed out" if returncode is None else f"failed with exit status {returncode}"
            print(f"README block {number} ({language}) {reason} after {seconds:.0f} s.", file=sys.stderr)
            return 1
        print(f"    ok in {seconds:.0f} s", flush=True)
    print(f"{len(blocks)} README command blocks ran as written.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
