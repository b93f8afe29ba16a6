"""The roadmap's efficiency targets checked against the figures in a benchmark folder.

:func:`targets_table` reads ``inference.json``, ``memory.json`` and ``train.json`` (whichever
exist) and gives one Markdown row per target: what was asked, what was measured, and whether it
is met. ``write_results`` puts it at the top of ``PERFORMANCE.md``; :func:`update_readme` copies
it into the README between ``<!-- targets:start -->`` and ``<!-- targets:end -->``, so the
numbers there are generated, not typed.
"""

from __future__ import annotations

import json
from pathlib import Path


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


START, END = "<!-- targets:start -->", "<!-- targets:end -->"
KNN_ROWS = ("knn (simulated graph)", "knn (window graph)")


def _load(folder: Path, name: str) -> dict | None:
    path = folder / f"{name}.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); run the benchmark again.") from error


def _section(inference: dict, preset: str, n_genes: int) -> dict | None:
    for section in inference["sections"]:
        if section["preset"] == preset and section["n_genes"] == n_genes:
            return section
    return None


def _row(target: str, measured: list[tuple[str, float]], fmt: str, met: bool) -> list[str]:
    text = "; ".join(f"{label} {format(value, fmt)}" for label, value in measured)
    return [target, text, "yes" if met else "**no**"]


def _per_graph(models: dict, key: str, scale: float = 1.0) -> list[tuple[str, float]]:
    """``[("simulated graph", value), ("window graph", value)]`` of one figure of the knn rows."""
    return [(name.split("(")[1].rstrip(")"), scale * models[name][key]) for name in KNN_ROWS]


def target_rows(folder: str | Path) -> list[list[str]]:
    """[target, measured, met] per roadmap target found in ``folder``'s benchmark JSONs; a target
    is met when every knn graph meets it.

    Raises:
        ValueError: a JSON that is not a ``scrnalf benchmark`` result (unreadable or another layout).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no benchmark folder at {folder}; give the --output-dir a benchmark wrote.")
    try:
        return _target_rows(folder)
    except (KeyError, TypeError, IndexError, AttributeError) as error:
        raise ValueError(
            f"the benchmark JSONs in {folder} do not have the layout `scrnalf benchmark` writes "
            f"({type(error).__name__}: {error}); run the benchmarks again into this folder."
        ) from error


def _target_rows(folder: Path) -> list[list[str]]:
    rows = []

    def add(target, measured, fmt, passes):
        rows.append(_row(target, measured, fmt, all(passes(value) for _, value in measured)))

    inference = _load(folder, "inference")
    if inference is not None:
        tiny = _section(inference, "tiny", 2000)
        if tiny is not None:
            add("tiny preset, 2,000 genes: ≥ 1,000 cells/s", _per_graph(tiny["models"], "cells_per_s"), ",.0f",
                lambda v: v >= 1000)
        default = _section(inference, "default", 2000)
        if default is not None:
            models = default["models"]
            add("default preset, 2,000 genes: ≥ 100 cells/s", _per_graph(models, "cells_per_s"), ",.1f",
                lambda v: v >= 100)
            add("default, 2,000 genes: ≥ 4× BertModel cells/s", _per_graph(models, "speedup_vs_bert"), ".2f",
                lambda v: v >= 4)
            add("default forward: ≥ 25% of the GEMM's GFLOP/s (%)", _per_graph(models, "fraction_of_gemm", 100),
                ".1f", lambda v: v >= 25)
        for section in inference["sections"]:
            if section["preset"] == "default" and section["n_genes"] >= 16000:
                add(
                    f"default, {section['n_genes']:,} genes (batch {section['batch_size']}): ≥ 25× BertModel",
                    _per_graph(section["models"], "speedup_vs_bert"), ".1f", lambda v: v >= 25,
                )
    memory = _load(folder, "memory")
    if memory is not None:
        for name in KNN_ROWS:
            growth = memory["growth"].get(name)
            if growth is None:
                continue
            limit = 1.3 * growth["genes_ratio"]
            add(
                f"{growth['from_genes']:,} → {growth['to_genes']:,} genes, {name.split('(')[1].rstrip(')')}: "
                f"time and memory grow ≤ {limit:.1f}×",
                [("time", growth["time_ratio"]), ("memory", growth["memory_ratio"])], ".1f", lambda v: v <= limit,
            )
    train = _load(folder, "train")
    if train is not None:
        epoch = train["epoch"]
        rows.append(
            _row(
                f"training, {train['preset']} preset: one epoch of {epoch['cells']:,} cells ≤ 30 min",
                [("minutes", epoch["minutes"]), ("cells/s", train["knn"]["cells_per_s"])], ",.1f",
                epoch["minutes"] <= 30,
            )
        )
    return rows


def targets_table(folder: str | Path) -> str:
    """The Markdown table of :func:`target_rows` ('' when the folder has no benchmark JSON)."""
    rows = target_rows(folder)
    if not rows:
        return ""
    return "### Roadmap targets\n\n" + markdown_table(["target", "measured", "met"], rows)


def update_readme(readme: str | Path, folder: str | Path) -> None:
    """Replace the README text between the targets markers with :func:`targets_table`."""
    readme = Path(readme)
    if not readme.is_file():
        raise FileNotFoundError(f"--readme {readme} does not exist; give the README holding the {START} … {END} markers.")
    text = readme.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{readme} has no {START} … {END} markers to fill.")
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    readme.write_text(f"{before}{START}\n{targets_table(folder)}{END}{after}")
