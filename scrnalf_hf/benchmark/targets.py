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

from .harness import markdown_table

START, END = "<!-- targets:start -->", "<!-- targets:end -->"
KNN_ROWS = ("knn (simulated graph)", "knn (window graph)")


def _load(folder: Path, name: str) -> dict | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _section(inference: dict, preset: str, n_genes: int) -> dict | None:
    for section in inference["sections"]:
        if section["preset"] == preset and section["n_genes"] == n_genes:
            return section
    return None


def _row(target: str, measured: list[tuple[str, float]], fmt: str, met) -> list[str]:
    text = "; ".join(f"{label} {format(value, fmt)}" for label, value in measured)
    return [target, text, "yes" if all(met(value) for _, value in measured) else "**no**"]


def target_rows(folder: str | Path) -> list[list[str]]:
    """[target, measured, met] per roadmap target found in ``folder``'s benchmark JSONs."""
    folder = Path(folder)
    rows = []
    inference = _load(folder, "inference")
    if inference is not None:
        tiny = _section(inference, "tiny", 2000)
        if tiny is not None:
            measured = [(name.split("(")[1].rstrip(")"), tiny["models"][name]["cells_per_s"]) for name in KNN_ROWS]
            rows.append(_row("tiny preset, 2,000 genes: ≥ 1,000 cells/s", measured, ",.0f", lambda v: v >= 1000))
        default = _section(inference, "default", 2000)
        if default is not None:
            models = default["models"]
            measured = [(name.split("(")[1].rstrip(")"), models[name]["cells_per_s"]) for name in KNN_ROWS]
            rows.append(_row("default preset, 2,000 genes: ≥ 100 cells/s", measured, ",.1f", lambda v: v >= 100))
            measured = [(name.split("(")[1].rstrip(")"), models[name]["speedup_vs_bert"]) for name in KNN_ROWS]
            rows.append(_row("default, 2,000 genes: ≥ 4× BertModel cells/s", measured, ".2f", lambda v: v >= 4))
            measured = [(name.split("(")[1].rstrip(")"), 100 * models[name]["fraction_of_gemm"]) for name in KNN_ROWS]
            rows.append(_row("default forward: ≥ 25% of the GEMM's GFLOP/s (%)", measured, ".1f", lambda v: v >= 25))
        for section in inference["sections"]:
            if section["preset"] == "default" and section["n_genes"] >= 16000:
                measured = [
                    (name.split("(")[1].rstrip(")"), section["models"][name]["speedup_vs_bert"]) for name in KNN_ROWS
                ]
                rows.append(
                    _row(
                        f"default, {section['n_genes']:,} genes (batch {section['batch_size']}): ≥ 25× BertModel",
                        measured, ".1f", lambda v: v >= 25,
                    )
                )
    memory = _load(folder, "memory")
    if memory is not None:
        for name in KNN_ROWS:
            growth = memory["growth"].get(name)
            if growth is None:
                continue
            label = name.split("(")[1].rstrip(")")
            limit = 1.3 * growth["genes_ratio"]
            rows.append(
                _row(
                    f"{growth['from_genes']:,} → {growth['to_genes']:,} genes, {label}: time and memory grow "
                    f"≤ {limit:.1f}×",
                    [("time", growth["time_ratio"]), ("memory", growth["memory_ratio"])], ".1f", lambda v: v <= limit,
                )
            )
    train = _load(folder, "train")
    if train is not None:
        epoch = train["epoch"]
        rows.append(
            _row(
                f"training, {train['preset']} preset: one epoch of {epoch['cells']:,} cells ≤ 30 min",
                [("minutes", epoch["minutes"]), ("cells/s", train["knn"]["cells_per_s"])], ",.1f",
                lambda v, minutes=epoch["minutes"]: minutes <= 30,
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
    text = readme.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{readme} has no {START} … {END} markers to fill.")
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    readme.write_text(f"{before}{START}\n{targets_table(folder)}{END}{after}")
