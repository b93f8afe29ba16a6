"""scrnalf search: 6 optuna trials through Trainer.hyperparameter_search, two objectives, a Pareto
front, the study as table and plot, and the best configuration as a loadable config."""

import json

import pytest
from helpers import marker_adata

from scrnalf_hf import ScrnaLongformerConfig
from scrnalf_hf.data import open_cells
from scrnalf_hf.training.arguments import training_arguments
from scrnalf_hf.training.finetune import read_targets
from scrnalf_hf.training.search import MODEL_FIELDS, search
from scrnalf_hf.training.tasks import CLASSIFICATION

pytest.importorskip("optuna")


@pytest.mark.slow  # 6 trainings: about a minute on 2 idle cores (11 min measured on the shared, loaded machine)
def test_six_trials_give_a_pareto_front_a_table_a_plot_and_a_loadable_best_config(tmp_path):
    cells = open_cells(marker_adata(n_cells=90, n_genes=40, n_types=3), label_key="cell_type", progress=False)
    targets = read_targets(CLASSIFICATION, cells, "cell_type")
    out = tmp_path / "search"
    args = training_arguments(CLASSIFICATION, out / "runs", disable_tqdm=True, per_device_train_batch_size=16)
    record = search(CLASSIFICATION, cells, targets, out, args, n_trials=6, max_epochs=1,
                    config_overrides={"kernel_implementation": "eager"}, command="scrnalf search test")
    assert {p.name for p in out.iterdir()} == {"search.json", "study.md", "study.csv", "pareto.png", "best_config"}
    written = json.loads((out / "search.json").read_text())
    assert len(written["trials"]) == 6
    assert len({json.dumps(t["params"], sort_keys=True) for t in written["trials"]}) > 1  # the sampler moved
    front = [t for t in written["trials"] if t["pareto"]]
    assert front and [t["trial"] for t in front] and set(written["pareto_front"]) == {t["trial"] for t in front}
    # no trial outside the front beats a front trial on both objectives (that is what a Pareto front is)
    for t in written["trials"]:
        for f in front:
            assert not (t["macro_f1"] > f["macro_f1"] and t["eval_cells_per_second"] > f["eval_cells_per_second"])
    best = record["best"]
    assert best["macro_f1"] == max(f["macro_f1"] for f in front)
    assert all(k in t for t in written["trials"] for k in ("train_seconds", "train_wh_per_million_cells_estimate"))
    config = ScrnaLongformerConfig.from_pretrained(out / "best_config")
    for field in MODEL_FIELDS:
        assert getattr(config, field) == best["params"][field]
    assert config.n_genes == 40 and config.num_labels == 3
    choice = json.loads((out / "best_config" / "search_choice.json").read_text())
    assert "--config-overrides" in choice["finetune_command"] and "kernel_implementation=eager" in choice["finetune_command"]
    table = (out / "study.md").read_text()
    assert table.count("★") == len(front) and "scrnalf search test" in table


def test_zero_trials_are_refused_before_anything_is_written(tmp_path):
    cells = open_cells(marker_adata(n_cells=30, n_genes=40, n_types=3), label_key="cell_type", progress=False)
    targets = read_targets(CLASSIFICATION, cells, "cell_type")
    args = training_arguments(CLASSIFICATION, tmp_path / "runs")
    with pytest.raises(ValueError, match="--trials"):
        search(CLASSIFICATION, cells, targets, tmp_path / "search", args, n_trials=0)
    assert not (tmp_path / "search").exists()
