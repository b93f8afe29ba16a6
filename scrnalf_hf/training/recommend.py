"""``scrnalf recommend`` / :func:`recommend_architecture`: which method for a dataset of a given
size, read from measured learning curves — never from a rule of thumb.

The measurements are the ``scrnalf scaling`` runs committed under ``benchmarks/scaling/``,
gathered by ``python scripts/scaling.py table`` into the packaged table ``scaling_measurements.json``
(next to this module, so an installed package answers too). The answer:

1. takes the measured study whose gene count and class count are nearest the question (log
   distance; a simulated study says so in its description);
2. places ``n_cells`` among that study's measured sizes: between two of them each method's
   macro-F1 and training time are interpolated linearly on log size (time on log–log); outside
   them the answer **extrapolates**: macro-F1 is that of the nearest measured size (with its
   interval widened to every measured value of the method), and time follows the log–log slope
   of the two nearest measured sizes;
3. drops methods whose estimated training time exceeds ``budget_minutes``, and names the one
   with the highest expected macro-F1 (the preset if that is a transformer);
4. prints every assumption and the measured points it stood on.

Times are those of the machine the study ran on (recorded with it), per fit, with that study's
epoch budget.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..presets import PRESET_NAMES

TABLE = Path(__file__).with_name("scaling_measurements.json")
IGNORED = ("majority",)  # the floor: never an answer


@dataclass
class MethodEstimate:
    """One method's expected figures at the asked size."""

    method: str
    macro_f1: float
    macro_f1_range: tuple[float, float]
    train_minutes: float
    fits_budget: bool
    nearest_points: list[dict]


@dataclass
class Recommendation:
    """What :func:`recommend_architecture` answers.

    Attributes:
        method: the recommended method (a preset name or a baseline).
        preset: the transformer preset, or None when a baseline is recommended.
        expected_macro_f1 / macro_f1_range: the interpolated mean and the range of the 95%
            intervals of the measured points it stands on.
        train_minutes: the estimated training time of one fit on the study's machine.
        extrapolated: whether ``n_cells`` lies outside the measured sizes (or genes / classes far
            from the study's).
        study: the measured study used (dataset, description, genes, classes, command, machine).
        estimates: every method's estimate, best first.
        assumptions: plain sentences: what was assumed and where it extrapolates.
    """

    method: str
    preset: str | None
    expected_macro_f1: float
    macro_f1_range: tuple[float, float]
    train_minutes: float
    extrapolated: bool
    study: dict
    estimates: list[MethodEstimate] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)

    def to_text(self) -> str:
        """The answer as printed by ``scrnalf recommend``."""
        s = self.study
        lines = [
            f"recommended: {self.method}" + (f" (transformer preset {self.preset!r})" if self.preset else " (no transformer preset)"),
            f"expected held-out macro-F1: {self.expected_macro_f1:.3f} (measured range {self.macro_f1_range[0]:.3f}–"
            f"{self.macro_f1_range[1]:.3f}); training time ≈ {self.train_minutes:.1f} min per fit",
            f"measured data: {s['dataset']} ({s.get('description') or 'no description'}); {s['n_genes']:,} genes, "
            f"{s['n_classes']} classes; machine: {s.get('machine', '?')}",
            *[f"measured run: {source}" for source in s.get("sources", [s.get("source", "?")])],
            "reproduce: " + " ; ".join(s.get("commands", [s["command"]])),
            "",
            "| method | expected macro-F1 | measured range | train min (est.) | within budget | nearest measured points (cells: macro-F1 [95% interval], train s) |",
            "|---|---|---|---|---|---|",
        ]
        for e in self.estimates:
            points = "; ".join(
                f"{p['size']:,}: {p['macro_f1']:.3f} [{p['macro_f1_ci95'][0]:.3f}, {p['macro_f1_ci95'][1]:.3f}], {p['train_seconds']:.0f} s"
                for p in e.nearest_points
            ) + (f" ({e.nearest_points[0]['source']})" if e.nearest_points and "source" in e.nearest_points[0] else "")
            lines.append(f"| {e.method} | {e.macro_f1:.3f} | {e.macro_f1_range[0]:.3f}–{e.macro_f1_range[1]:.3f} | "
                         f"{e.train_minutes:.2f} | {'yes' if e.fits_budget else 'no'} | {points} |")
        lines += ["", "assumptions:"] + [f"- {a}" for a in self.assumptions]
        return "\n".join(lines)


def load_measurements(path: str | Path | None = None) -> list[dict]:
    """The measured studies (see the module docstring); ``path`` replaces the packaged table."""
    path = TABLE if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no measured scaling table at {path}; run `scrnalf scaling`, then `python scripts/scaling.py table`.")
    studies = json.loads(path.read_text())
    if not isinstance(studies, list) or not studies:
        raise ValueError(f"{path} holds no measured study.")
    return studies


def study_from_record(record: dict, source: str) -> dict:
    """One study of the table from a scaling.json record (its settings and summary)."""
    settings = record["settings"]
    return {
        "source": source, "dataset": settings["dataset"], "description": settings.get("description"),
        "label_key": settings["label_key"], "n_genes": settings["n_genes"], "n_classes": settings["n_classes"],
        "n_test_cells": settings["n_test_cells"], "sizes": sorted({e["size"] for e in record["summary"]}),
        "epoch_budget_cells": settings.get("epoch_budget_cells"), "command": " ; ".join(record.get("commands", [record["command"]])),
        "machine": f"{record['machine'].get('cpu', '?')}, {record['machine'].get('threads', '?')} threads",
        "points": [
            {k: e[k] for k in ("method", "size", "repeats", "macro_f1", "macro_f1_ci95", "train_seconds",
                               "train_cells_per_second", "predict_cells_per_second",
                               "train_wh_per_million_cells_estimate", "predict_wh_per_million_cells_estimate")}
            for e in record["summary"]
        ],
    }


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive number, got {value!r}.")


def _interpolate(x: float, x0: float, x1: float, y0: float, y1: float) -> float:
    if x1 == x0:
        return y0
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _estimate(points: list[dict], n_cells: int) -> tuple[float, tuple[float, float], float, list[dict], bool]:
    """Expected macro-F1, its range, train seconds, the points used, and whether it extrapolates."""
    points = sorted(points, key=lambda p: p["size"])
    sizes = [p["size"] for p in points]
    log_n = math.log(n_cells)
    if len(points) == 1:
        p = points[0]
        return p["macro_f1"], tuple(p["macro_f1_ci95"]), p["train_seconds"] * n_cells / p["size"], [p], n_cells != p["size"]
    if sizes[0] <= n_cells <= sizes[-1]:
        upper = next(i for i, s in enumerate(sizes) if s >= n_cells)
        lower = max(0, upper - 1) if sizes[upper] != n_cells else upper
        a, b = points[lower], points[upper]
        f1 = _interpolate(log_n, math.log(a["size"]), math.log(b["size"]), a["macro_f1"], b["macro_f1"])
        seconds = math.exp(_interpolate(log_n, math.log(a["size"]), math.log(b["size"]),
                                        math.log(max(a["train_seconds"], 1e-3)), math.log(max(b["train_seconds"], 1e-3))))
        used = [a] if a is b else [a, b]
        low = min(p["macro_f1_ci95"][0] for p in used)
        high = max(p["macro_f1_ci95"][1] for p in used)
        return f1, (low, high), seconds, used, False
    # outside the measured sizes: the nearest end's macro-F1, time along the end's log-log slope
    a, b = (points[0], points[1]) if n_cells < sizes[0] else (points[-2], points[-1])
    nearest = a if n_cells < sizes[0] else b
    slope = (math.log(max(b["train_seconds"], 1e-3)) - math.log(max(a["train_seconds"], 1e-3))) / (math.log(b["size"]) - math.log(a["size"]))
    seconds = nearest["train_seconds"] * (n_cells / nearest["size"]) ** slope
    low = min(p["macro_f1_ci95"][0] for p in points)
    high = max(p["macro_f1_ci95"][1] for p in points)
    return nearest["macro_f1"], (low, high), seconds, [a, b], True


def recommend_architecture(
    n_cells: int,
    n_genes: int,
    n_classes: int,
    budget_minutes: float | None = None,
    *,
    measurements: Sequence[dict] | str | Path | None = None,
) -> Recommendation:
    """Which method (and transformer preset) to train on ``n_cells`` labelled cells of
    ``n_genes`` genes and ``n_classes`` classes, from the measured learning curves.

    Args:
        n_cells: labelled training cells.
        n_genes: genes of the panel the model would read.
        n_classes: cell types to tell apart.
        budget_minutes: training time allowed for one fit (on the measured machine); None: any.
        measurements: the studies (a list as in the packaged table, or a path to such a JSON);
            the packaged table by default.

    Raises:
        ValueError: a non-positive or non-numeric size, gene or class count, or budget; a table
            without any usable point.
    """
    for name, value in (("n_cells", n_cells), ("n_genes", n_genes), ("n_classes", n_classes)):
        _check_positive(f"--{name.replace('_', '-')}", value)
    if n_classes < 2:
        raise ValueError(f"--n-classes must be at least 2 (a classifier of one class has nothing to learn), got {n_classes}.")
    if budget_minutes is not None:
        _check_positive("--budget-minutes", budget_minutes)
    studies = load_measurements(measurements) if measurements is None or isinstance(measurements, (str, Path)) else list(measurements)

    def distance(study: dict) -> float:
        return abs(math.log(n_genes / study["n_genes"])) + abs(math.log(n_classes / study["n_classes"]))

    nearest = min(distance(s) for s in studies)
    # runs of the same data (same genes and classes) are read together: each method from the run
    # that measured it at the most sizes
    tied = [s for s in studies if distance(s) <= nearest + 1e-9]
    study = tied[0]
    methods = list(dict.fromkeys(p["method"] for s in tied for p in s["points"] if p["method"] not in IGNORED))
    if not methods:
        raise ValueError(f"the measured study {study['dataset']} has no method to recommend.")
    estimates, extrapolated, measured_sizes = [], False, set()
    for method in methods:
        source = max(tied, key=lambda s: len({p["size"] for p in s["points"] if p["method"] == method}))
        points = [p for p in source["points"] if p["method"] == method]
        measured_sizes |= {p["size"] for p in points}
        f1, span, seconds, used, outside = _estimate(points, n_cells)
        extrapolated |= outside
        fits = budget_minutes is None or seconds / 60 <= budget_minutes
        estimates.append(MethodEstimate(method, f1, span, seconds / 60, fits, [dict(p, source=source["source"]) for p in used]))
    estimates.sort(key=lambda e: (not e.fits_budget, -e.macro_f1))
    best = estimates[0]
    study = dict(study, sources=[s["source"] for s in tied], commands=[s["command"] for s in tied])

    sizes = sorted(measured_sizes)
    assumptions = [
        f"figures come from the measured study nearest in genes and classes: {study['dataset']} "
        f"({study['n_genes']:,} genes, {study['n_classes']} classes) against the question's {n_genes:,} genes, {n_classes} classes.",
        "between measured sizes macro-F1 is interpolated linearly on log(cells) and training time linearly on log–log; "
        "the range is that of the 95% intervals of the measured points used.",
        f"training times are one fit on the study's machine ({study.get('machine', '?')})"
        + (f" with at most {study['epoch_budget_cells']:,} cell passes per transformer fit" if study.get("epoch_budget_cells") else "")
        + "; another machine or epoch budget scales them.",
    ]
    single = [e.method for e in estimates if len({p["size"] for p in e.nearest_points}) == 1 and
              e.nearest_points[0]["size"] != n_cells]
    if single:
        assumptions.append(f"{', '.join(single)}: measured at one size only, so training time is scaled in proportion to "
                           "the cells (an assumption, not a measured slope) and macro-F1 is that one measurement.")
    outside_methods = [e.method for e in estimates if e.nearest_points and not (
        min(p["size"] for p in e.nearest_points) <= n_cells <= max(p["size"] for p in e.nearest_points))]
    if outside_methods and sizes[0] <= n_cells <= sizes[-1]:
        assumptions.append(f"EXTRAPOLATION for {', '.join(outside_methods)}: {n_cells:,} cells lies outside the sizes "
                           "measured for them (see their nearest points).")
    if n_cells < sizes[0] or n_cells > sizes[-1]:
        side = "above the largest" if n_cells > sizes[-1] else "below the smallest"
        assumptions.append(
            f"EXTRAPOLATION: {n_cells:,} cells lies {side} measured size ({sizes[0]:,}–{sizes[-1]:,}); macro-F1 is that of the nearest "
            "measured size, the range spans every measured value of the method, and time follows the log–log slope of the "
            "two nearest sizes. The ranking may change outside the measured range."
        )
    ratio_genes, ratio_classes = n_genes / study["n_genes"], n_classes / study["n_classes"]
    if not 0.5 <= ratio_genes <= 2 or not 0.5 <= ratio_classes <= 2:
        extrapolated = True
        assumptions.append(
            f"EXTRAPOLATION: the question's genes or classes differ from the study's by more than 2× "
            f"({ratio_genes:.2g}× genes, {ratio_classes:.2g}× classes); no measured study is closer."
        )
    if "simulated" in (study.get("description") or "").lower() or "simulat" in study["dataset"].lower():
        assumptions.append("the study is on simulated cells: it measures mechanics and speed, not biology; "
                           "real data may put the crossover elsewhere.")
    if budget_minutes is not None and not best.fits_budget:
        assumptions.append(f"no method fits {budget_minutes:g} min per fit; the fastest-growing estimate was shown anyway.")
    elif budget_minutes is not None:
        dropped = [e.method for e in estimates if not e.fits_budget]
        if dropped:
            assumptions.append(f"left out for the {budget_minutes:g}-minute budget: {', '.join(dropped)}.")
    return Recommendation(
        method=best.method, preset=best.method if best.method in PRESET_NAMES else None,
        expected_macro_f1=best.macro_f1, macro_f1_range=best.macro_f1_range, train_minutes=best.train_minutes,
        extrapolated=extrapolated, study={k: v for k, v in study.items() if k != "points"},
        estimates=estimates, assumptions=assumptions,
    )


def build_table(benchmark_dir: str | Path, root: str | Path | None = None) -> list[dict]:
    """Every ``scaling.json`` under ``benchmark_dir`` as studies of the table (sorted by path)."""
    benchmark_dir = Path(benchmark_dir)
    root = Path(root) if root is not None else benchmark_dir
    studies = []
    for path in sorted(benchmark_dir.rglob("scaling.json")):
        record = json.loads(path.read_text())
        if record.get("summary"):
            studies.append(study_from_record(record, str(path.relative_to(root))))
    if not studies:
        raise ValueError(f"no scaling.json with results under {benchmark_dir}.")
    return studies


__all__ = ["MethodEstimate", "Recommendation", "build_table", "load_measurements", "recommend_architecture", "study_from_record"]
