"""scrnalf recommend: answers read from measured learning curves, interpolated between measured
sizes, flagged when they extrapolate, and the packaged table kept equal to benchmarks/scaling."""

import json
from pathlib import Path

import pytest

from scrnalf_hf.training.recommend import TABLE, build_table, load_measurements, recommend_architecture

REPO = Path(__file__).resolve().parents[2]


def point(method, size, f1, seconds, half=0.01):
    return {"method": method, "size": size, "repeats": 2, "macro_f1": f1, "macro_f1_ci95": [f1 - half, f1 + half],
            "train_seconds": seconds, "train_cells_per_second": size / seconds, "predict_cells_per_second": 1000.0,
            "train_wh_per_million_cells_estimate": 1.0, "predict_wh_per_million_cells_estimate": 0.1}


def study(n_genes=500, n_classes=6, dataset="sim"):
    points = [
        point("logreg", 1000, 0.80, 2), point("logreg", 10000, 0.85, 20),
        point("default", 1000, 0.70, 100), point("default", 10000, 0.90, 1000),
        point("majority", 1000, 0.05, 0.01), point("majority", 10000, 0.05, 0.01),
    ]
    return {"source": "x", "dataset": dataset, "description": "simulated cells", "label_key": "cell_type",
            "n_genes": n_genes, "n_classes": n_classes, "n_test_cells": 1000, "sizes": [1000, 10000],
            "epoch_budget_cells": None, "command": "scrnalf scaling ...", "machine": "cpu", "points": points}


def test_between_measured_sizes_the_answer_interpolates_on_log_cells():
    answer = recommend_architecture(3162, 500, 6, measurements=[study()])  # 10^3.5: half way on a log axis
    estimates = {e.method: e for e in answer.estimates}
    assert estimates["default"].macro_f1 == pytest.approx(0.80, abs=1e-3)
    assert estimates["logreg"].macro_f1 == pytest.approx(0.825, abs=1e-3)
    assert answer.method == "logreg" and answer.preset is None and not answer.extrapolated
    assert estimates["default"].train_minutes == pytest.approx(316.2 / 60, rel=1e-2)  # log-log between 100 and 1000 s
    assert "majority" not in estimates
    text = answer.to_text()
    assert "1,000: 0.700" in text and "10,000: 0.900" in text  # the nearest measured points are printed


def test_at_a_measured_size_the_preset_that_measured_best_is_named():
    answer = recommend_architecture(10000, 500, 6, measurements=[study()])
    assert answer.method == "default" and answer.preset == "default"
    assert answer.expected_macro_f1 == pytest.approx(0.90)
    assert answer.macro_f1_range == pytest.approx((0.89, 0.91))


def test_beyond_the_measured_sizes_the_answer_says_it_extrapolates():
    answer = recommend_architecture(100000, 500, 6, measurements=[study()])
    assert answer.extrapolated
    assert any("EXTRAPOLATION" in a and "above the largest" in a for a in answer.assumptions)
    estimates = {e.method: e for e in answer.estimates}
    assert estimates["default"].macro_f1 == pytest.approx(0.90)  # the nearest measured value, no invented growth
    assert estimates["default"].train_minutes == pytest.approx(10000 / 60, rel=1e-2)  # measured log-log slope 1
    below = recommend_architecture(100, 500, 6, measurements=[study()])
    assert below.extrapolated and any("below the smallest" in a for a in below.assumptions)


def test_a_budget_leaves_out_methods_that_would_train_too_long():
    answer = recommend_architecture(10000, 500, 6, budget_minutes=1, measurements=[study()])
    assert answer.method == "logreg"
    assert any("left out" in a and "default" in a for a in answer.assumptions)


def test_the_nearest_study_in_genes_and_classes_is_used_and_a_far_one_is_flagged():
    near, far = study(n_genes=2000, n_classes=10, dataset="near"), study(n_genes=500, n_classes=3, dataset="far")
    answer = recommend_architecture(5000, 1800, 9, measurements=[far, near])
    assert answer.study["dataset"] == "near" and not answer.extrapolated
    flagged = recommend_architecture(5000, 20000, 9, measurements=[near])
    assert flagged.extrapolated and any("genes or classes differ" in a for a in flagged.assumptions)


@pytest.mark.parametrize("kwargs, message", [
    ({"n_cells": 0}, "--n-cells"), ({"n_cells": -5}, "--n-cells"), ({"n_genes": 0}, "--n-genes"),
    ({"n_classes": 1}, "at least 2"), ({"budget_minutes": 0}, "--budget-minutes"),
])
def test_bad_questions_are_refused(kwargs, message):
    question = {"n_cells": 1000, "n_genes": 500, "n_classes": 6, **kwargs}
    with pytest.raises(ValueError, match=message):
        recommend_architecture(**question, measurements=[study()])


def test_the_packaged_table_is_the_committed_benchmarks_and_answers():
    packaged = load_measurements()
    assert packaged == json.loads(json.dumps(build_table(REPO / "benchmarks" / "scaling", root=REPO))), (
        "scrnalf_hf/training/scaling_measurements.json is stale: run python scripts/scaling.py table")
    assert TABLE.parent.name == "training"
    answer = recommend_architecture(2000, 500, 6)
    assert answer.method and answer.study["command"].startswith("scrnalf scaling")


def test_runs_of_the_same_data_are_read_together_each_method_from_its_widest_run():
    baselines = study(dataset="sim")
    baselines["source"] = "baselines"
    baselines["points"] = [point("logreg", s, 0.8, 2) for s in (1000, 10000, 30000)]
    presets = study(dataset="sim")
    presets["source"] = "presets"
    answer = recommend_architecture(20000, 500, 6, measurements=[presets, baselines])
    estimates = {e.method: e for e in answer.estimates}
    assert {p["source"] for p in estimates["logreg"].nearest_points} == {"baselines"}  # measured up to 30,000 there
    assert {p["source"] for p in estimates["default"].nearest_points} == {"presets"}
    assert any("EXTRAPOLATION for default" in a for a in answer.assumptions)  # 20,000 is past default's 10,000
    assert set(answer.study["sources"]) == {"presets", "baselines"}
