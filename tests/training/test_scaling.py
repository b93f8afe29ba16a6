"""scrnalf scaling: subsamples, the fixed test set, summaries, crossovers, energy estimates, files."""

import json

import numpy as np
import pytest
from helpers import marker_adata

from scrnalf_hf.data import open_cells
from scrnalf_hf.training.arguments import training_arguments
from scrnalf_hf.training.finetune import read_targets
from scrnalf_hf.training.scaling import (
    crossover_sentences,
    crossovers,
    energy_wh_per_million_cells,
    epochs_for,
    parse_sizes,
    scaling,
    stratified_subsample,
    summarise,
)
from scrnalf_hf.training.tasks import CLASSIFICATION


def marker_cells(**kwargs):
    cells = open_cells(marker_adata(**kwargs), label_key="cell_type", progress=False)
    return cells, read_targets(CLASSIFICATION, cells, "cell_type")


def test_stratified_subsample_has_the_size_two_cells_of_every_class_and_follows_the_seed():
    labels = np.array([0] * 90 + [1] * 8 + [2] * 2)  # a dominant class, a small one, a tiny one
    pool = np.arange(100)
    subset = stratified_subsample(pool, 10, labels, seed=0)
    assert len(subset) == 10 and len(np.unique(subset)) == 10
    counts = np.bincount(labels[subset], minlength=3)
    assert (counts >= 2).all()  # plain proportional sampling would give class 2 no cell at all
    assert counts[0] > counts[1]  # the rest follows the class sizes
    assert np.array_equal(subset, stratified_subsample(pool, 10, labels, seed=0))
    assert not np.array_equal(subset, stratified_subsample(pool, 10, labels, seed=1))
    assert set(stratified_subsample(pool[::2], 20, labels, seed=0)) <= set(pool[::2])


def test_parse_sizes_sorts_and_refuses_bad_sizes():
    assert parse_sizes("3000,1000") == [1000, 3000]
    for bad, message in (("0,10", "positive"), ("10,10", "twice"), ("a,b", "comma-separated"), ("", "empty")):
        with pytest.raises(ValueError, match=message):
            parse_sizes(bad)


def test_energy_estimate_is_cpu_seconds_times_power_per_million_cells():
    # 36 CPU seconds at 10 W = 360 J = 0.1 Wh for 1,000 cells -> 100 Wh per million cells
    assert energy_wh_per_million_cells(36.0, 1000, 10.0) == pytest.approx(100.0)
    assert np.isnan(energy_wh_per_million_cells(1.0, 0))


def test_epoch_budget_is_clipped_to_one_epoch_and_the_recipe():
    assert epochs_for(500, 40, None) == 40
    assert epochs_for(500, 40, 3000) == 6
    assert epochs_for(100, 40, 30000) == 40
    assert epochs_for(30000, 40, 3000) == 1


def _summary(curves):
    rows = []
    for method, values in curves.items():
        for size, per_repeat in values.items():
            for repeat, f1 in enumerate(per_repeat):
                rows.append({"method": method, "size": size, "repeat": repeat, "macro_f1": f1, "accuracy": f1,
                             "train_seconds": 1.0, "train_cpu_seconds": 1.0, "train_cells_per_second": 1.0,
                             "predict_seconds": 1.0, "predict_cells_per_second": 1.0,
                             "train_wh_per_million_cells_estimate": 1.0, "predict_wh_per_million_cells_estimate": 1.0,
                             "n_parameters": 1})
    return summarise(rows)


def test_crossover_found_where_a_preset_overtakes_logreg_for_good():
    summary = _summary({
        "logreg": {1000: [0.80, 0.82], 10000: [0.85, 0.86], 100000: [0.86, 0.87, 0.865]},
        "default": {1000: [0.60, 0.62], 10000: [0.84, 0.85], 100000: [0.95, 0.96, 0.955]},
        "tiny": {1000: [0.50, 0.52], 10000: [0.60, 0.61], 100000: [0.70, 0.71]},
    })
    found = crossovers(summary)
    assert found["default"]["overtakes_at"] == 100000
    estimate = found["default"]["crossing_estimate"]
    assert estimate["direction"] == "overtakes" and 10000 < estimate["size"] < 100000
    assert found["default"]["separated_at"][-1] == {"size": 100000, "method_better": True}
    assert found["tiny"]["overtakes_at"] is None and found["tiny"]["crossing_estimate"] is None
    text = " ".join(crossover_sentences(found))
    assert "`default` overtakes `logreg` from 100,000 cells" in text
    assert "`tiny` never overtakes `logreg`" in text


def test_summary_interval_is_a_t_interval_over_repeats():
    (entry,) = _summary({"logreg": {100: [0.50, 0.51]}})
    assert entry["macro_f1"] == pytest.approx(0.505)
    # t(0.975, 1) = 12.706; std 0.00707 / sqrt(2) = 0.005 -> half-width 0.0635
    assert entry["macro_f1_ci95"] == pytest.approx([0.505 - 0.0635, 0.505 + 0.0635], abs=1e-3)
    (wide,) = _summary({"logreg": {100: [0.5, 0.7]}})  # half-width 1.27: clipped to the scores' range
    assert wide["macro_f1_ci95"] == [0.0, 1.0]


def test_scaling_writes_rows_for_every_size_repeat_and_method_on_one_fixed_test_set(tmp_path):
    cells, targets = marker_cells(n_cells=150, n_genes=40, n_types=3)
    out = tmp_path / "scaling"
    args = training_arguments(CLASSIFICATION, out / "runs", disable_tqdm=True)
    record = scaling(CLASSIFICATION, cells, targets, "12,60", "logreg", out, args, repeats=2, test_fraction=0.2,
                     command="scrnalf scaling test")
    assert {p.name for p in out.iterdir()} == {"scaling.json", "scaling.md", "scaling.png"}
    written = json.loads((out / "scaling.json").read_text())
    assert written["command"] == "scrnalf scaling test"
    assert written["settings"]["n_test_cells"] == 30 and written["settings"]["n_pool_cells"] == 120
    keys = {(r["method"], r["size"], r["repeat"]) for r in written["rows"]}
    assert keys == {(m, s, r) for m in ("logreg", "majority") for s in (12, 60) for r in (0, 1)}
    assert all(r["train_wh_per_million_cells_estimate"] >= 0 for r in written["rows"])
    assert {e["size"] for e in record["summary"]} == {12, 60}
    table = (out / "scaling.md").read_text()
    assert "scrnalf scaling test" in table and "| 60 |" in table and "estimates" in table
    # marker genes separate the types: logreg beats the floor at the larger size
    by = {(e["method"], e["size"]): e["macro_f1"] for e in record["summary"]}
    assert by[("logreg", 60)] > by[("majority", 60)] + 0.3


def test_resume_keeps_finished_fits_and_refuses_other_settings(tmp_path, monkeypatch):
    cells, targets = marker_cells(n_cells=90, n_genes=40, n_types=3)
    out = tmp_path / "scaling"
    args = training_arguments(CLASSIFICATION, out / "runs", disable_tqdm=True)
    scaling(CLASSIFICATION, cells, targets, "12", "logreg", out, args, repeats=1)
    before = json.loads((out / "scaling.json").read_text())["rows"]
    with pytest.raises(ValueError, match="--resume"):
        scaling(CLASSIFICATION, cells, targets, "12", "logreg", out, args, repeats=1)
    from scrnalf_hf.training import scaling as module

    def no_fit(*a, **k):
        raise AssertionError("a finished fit ran again")

    monkeypatch.setattr(module, "_fit_baselines", no_fit)
    again = scaling(CLASSIFICATION, cells, targets, "12", "logreg", out, args, repeats=1, resume=True)
    assert again["rows"] == before
    with pytest.raises(ValueError, match=r"other settings \(n_pool_cells, n_test_cells\)"):
        scaling(CLASSIFICATION, cells, targets, "12", "logreg", out, args, repeats=1, max_test_cells=5, resume=True)


def test_resume_adds_sizes_and_repeats_without_refitting_and_records_every_command(tmp_path, monkeypatch):
    cells, targets = marker_cells(n_cells=90, n_genes=40, n_types=3)
    out = tmp_path / "scaling"
    args = training_arguments(CLASSIFICATION, out / "runs", disable_tqdm=True)
    first = scaling(CLASSIFICATION, cells, targets, "12", "logreg", out, args, repeats=1, command="first")
    from scrnalf_hf.training import scaling as module

    fitted_sizes = []
    fit_baselines = module._fit_baselines

    def counted(task, cells, targets, subset, *rest, **options):
        fitted_sizes.append(len(subset))
        return fit_baselines(task, cells, targets, subset, *rest, **options)

    monkeypatch.setattr(module, "_fit_baselines", counted)
    grown = scaling(CLASSIFICATION, cells, targets, "12,30", "logreg", out, args, repeats=2, resume=True, command="second")
    # (12, repeat 0) was measured: only (12, 1), (30, 0) and (30, 1) are fitted
    assert sorted(fitted_sizes) == [12, 30, 30]
    assert [r for r in grown["rows"] if (r["size"], r["repeat"]) == (12, 0)] == first["rows"]
    assert grown["settings"]["sizes"] == [12, 30] and grown["settings"]["repeats"] == 2
    assert grown["commands"] == ["first", "second"] and grown["unfinished"] == []
    assert "first\nsecond" in (out / "scaling.md").read_text()


def test_a_preset_fit_is_timed_and_scored_on_the_test_set(tmp_path):
    cells, targets = marker_cells(n_cells=90, n_genes=40, n_types=3)
    out = tmp_path / "scaling"
    args = training_arguments(CLASSIFICATION, out / "runs", disable_tqdm=True, num_train_epochs=2, per_device_train_batch_size=16)
    record = scaling(CLASSIFICATION, cells, targets, "30", "tiny", out, args, repeats=1,
                     config_overrides={"kernel_implementation": "eager"})
    (row,) = [r for r in record["rows"] if r["method"] == "tiny"]
    assert row["epochs"] == pytest.approx(2) and row["n_parameters"] > 0
    assert row["train_seconds"] > 0 and row["train_cpu_seconds"] > 0 and row["predict_cells_per_second"] > 0
    assert 0.0 <= row["macro_f1"] <= 1.0
    assert not (out / "runs").exists()  # models are not kept: the numbers are the result


def test_pretrained_adds_a_fine_tuned_curve_on_the_same_subsamples(tmp_path, trained_tiny_folder):
    cells, targets = marker_cells(n_cells=90, n_genes=60, n_types=3)  # GENE0..59: the saved model's panel
    out = tmp_path / "scaling"
    args = training_arguments(CLASSIFICATION, out / "runs", disable_tqdm=True, num_train_epochs=1, per_device_train_batch_size=16)
    record = scaling(CLASSIFICATION, cells, targets, "30", "logreg", out, args, repeats=1, pretrained=str(trained_tiny_folder),
                     config_overrides={"kernel_implementation": "eager"})
    assert {r["method"] for r in record["rows"]} == {"logreg", "majority", "pretrained"}
    assert record["settings"]["pretrained"] == str(trained_tiny_folder)
    assert "pretrained" in record["crossovers"]


def test_a_pretrained_model_that_does_not_load_fails_before_any_fit(tmp_path):
    cells, targets = marker_cells(n_cells=90, n_genes=40, n_types=3)
    out = tmp_path / "scaling"
    args = training_arguments(CLASSIFICATION, out / "runs")
    with pytest.raises((ValueError, OSError), match="nope"):
        scaling(CLASSIFICATION, cells, targets, "30", "logreg", out, args, pretrained=str(tmp_path / "nope"))
    assert not out.exists()


def test_a_stopped_run_lists_what_it_did_not_measure(tmp_path):
    from scrnalf_hf.training.scaling import write_results

    cells, targets = marker_cells(n_cells=90, n_genes=40, n_types=3)
    out = tmp_path / "scaling"
    record = scaling(CLASSIFICATION, cells, targets, "12,30", "logreg", out, training_arguments(CLASSIFICATION, out / "runs"),
                     repeats=1)
    assert record["unfinished"] == []
    record["rows"] = [row for row in record["rows"] if row["size"] != 30]  # as if stopped before the last size
    write_results(record, out, plot=True)
    assert [(e["method"], e["size"]) for e in record["unfinished"]] == [("logreg", 30), ("majority", 30)]
    assert "**Not measured**" in (out / "scaling.md").read_text() and "logreg at 30 (0 of 1 repeats)" in (out / "scaling.md").read_text()
