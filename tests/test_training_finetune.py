"""Fine-tuning through Trainer: the output folder, best checkpoint, resume, freezing, weights."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

import scrnalf_hf  # noqa: F401  (registers the Auto classes)
from scrnalf_hf.cli import main
from scrnalf_hf.training.cells import load_labelled_cells, stratified_split
from scrnalf_hf.training.compare import default_training_args
from scrnalf_hf.training.finetune import finetune
from test_training_metrics_baselines import marker_adata

# A recipe that learns the easy marker task within seconds (tiny preset, 40 genes).
FAST = {"num_train_epochs": 15, "learning_rate": 1e-2, "per_device_train_batch_size": 16, "disable_tqdm": True}
OVERRIDES = {"knn_k": 8}


@pytest.fixture(scope="module")
def marker_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cells") / "markers.h5ad"
    marker_adata(n_cells=150).write_h5ad(path)
    return path


def test_finetune_command_writes_hub_ready_folder_and_beats_majority(marker_file, tmp_path):
    output = tmp_path / "run"
    main([
        "finetune", "--train-file", str(marker_file), "--label-key", "cell_type", "--preset", "tiny",
        "--output-dir", str(output), "--config-overrides", "knn_k=8,hidden_dropout=0.05",
        "--num_train_epochs", "15", "--learning_rate", "1e-2", "--per_device_train_batch_size", "16",
        "--disable_tqdm", "true",
    ])
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "modeling_scrnalf.py",
                 "configuration_scrnalf.py", "processing_scrnalf.py", "all_results.json", "eval_results.json",
                 "training_summary.json", "run_info.json", "comparison.json"):
        assert (output / name).is_file(), name
    summary = json.loads((output / "training_summary.json").read_text())
    eval_results = json.loads((output / "eval_results.json").read_text())
    assert eval_results["eval_macro_f1"] == pytest.approx(summary["metrics"]["macro_f1"])
    assert summary["n_train_cells"] + summary["n_validation_cells"] + summary["n_eval_cells"] == 150
    for key in ("accuracy", "macro_f1"):
        assert key in summary["logreg"] and key in summary["majority"]
    assert summary["metrics"]["macro_f1"] > summary["majority"]["macro_f1"] + 0.4
    for key in ("train_seconds", "train_cells_per_second", "inference_cells_per_second", "hardware", "n_parameters", "preset", "dataset", "label_key"):
        assert summary[key] not in (None, ""), key
    model = AutoModelForSequenceClassification.from_pretrained(output)
    assert model.config.id2label == {0: "type0", 1: "type1", 2: "type2"}
    assert model.config.hidden_dropout == 0.05


def _cells_and_split(marker_file):
    cells = load_labelled_cells(marker_file, "cell_type")
    train, test = stratified_split(np.arange(cells.n_cells), cells.labels, 0.2, seed=0)
    return cells, train, test


def test_best_checkpoint_is_the_best_validation_epoch_not_the_last(marker_file, tmp_path):
    cells, train, test = _cells_and_split(marker_file)
    args = default_training_args(tmp_path, **FAST)
    result = finetune(cells, train, test, args, preset="tiny", config_overrides=OVERRIDES, early_stopping_patience=0)
    history = [e["eval_macro_f1"] for e in result.trainer.state.log_history if "eval_macro_f1" in e]
    assert result.trainer.state.best_metric == pytest.approx(max(history))
    validation_scores = result.trainer.evaluate()
    assert validation_scores["eval_macro_f1"] == pytest.approx(max(history))
    # the loaded weights are those of the best checkpoint on disk
    best = load_file(f"{result.trainer.state.best_model_checkpoint}/model.safetensors")
    for name, tensor in result.model.state_dict().items():
        if name in best:
            torch.testing.assert_close(tensor, best[name])


class _StopAfterEpoch(TrainerCallback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, args, state, control, **kwargs):
        if state.epoch >= self.epoch:
            control.should_training_stop = True


def test_resume_from_checkpoint_ends_like_an_uninterrupted_run(marker_file, tmp_path):
    cells, train, test = _cells_and_split(marker_file)
    settings = {**FAST, "num_train_epochs": 6, "save_total_limit": 10}
    full = finetune(cells, train, test, default_training_args(tmp_path / "full", **settings), preset="tiny",
                    config_overrides=OVERRIDES, early_stopping_patience=0)
    finetune(cells, train, test, default_training_args(tmp_path / "cut", **settings), preset="tiny",
             config_overrides=OVERRIDES, early_stopping_patience=0, callbacks=[_StopAfterEpoch(3)])
    checkpoint = get_last_checkpoint(str(tmp_path / "cut"))
    assert checkpoint is not None and int(checkpoint.rsplit("-", 1)[1]) < full.trainer.state.global_step
    resumed = finetune(
        cells, train, test,
        default_training_args(tmp_path / "cut", resume_from_checkpoint=checkpoint, **settings),
        preset="tiny", config_overrides=OVERRIDES, early_stopping_patience=0,
    )
    assert resumed.trainer.state.global_step == full.trainer.state.global_step
    assert resumed.metrics["accuracy"] == full.metrics["accuracy"]
    assert resumed.metrics["macro_f1"] == full.metrics["macro_f1"]
    np.testing.assert_array_equal(resumed.predictions, full.predictions)
    for (name, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_freeze_encoder_trains_only_the_head(marker_file, tmp_path):
    cells, train, test = _cells_and_split(marker_file)
    torch.manual_seed(0)
    result = finetune(cells, train, test, default_training_args(tmp_path, **{**FAST, "num_train_epochs": 2}),
                      preset="tiny", config_overrides=OVERRIDES, freeze=True, early_stopping_patience=0)
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias"}


def test_balanced_class_weights_reach_the_model_config(marker_file, tmp_path):
    cells, train, test = _cells_and_split(marker_file)
    keep = np.concatenate([train[cells.labels[train] != 2], train[cells.labels[train] == 2][:10]])
    result = finetune(cells, np.sort(keep), test, default_training_args(tmp_path, **{**FAST, "num_train_epochs": 1}),
                      preset="tiny", config_overrides=OVERRIDES, class_weighting="balanced", early_stopping_patience=0)
    weights = result.model.config.class_weights
    assert weights is not None and len(weights) == 3
    assert weights[2] > weights[0]  # the rare class weighs more


def test_label_smoothing_keeps_the_class_weights(marker_file, tmp_path):
    from scrnalf_hf import ScrnaLongformerConfig, ScrnaLongformerForCellClassification
    from scrnalf_hf.training.finetune import _SeededTrainer

    config = ScrnaLongformerConfig.from_preset("tiny", n_genes=12, num_labels=3, class_weights=[0.2, 1.0, 5.0])
    model = ScrnaLongformerForCellClassification(config).eval()
    args = default_training_args(tmp_path, **{**FAST, "label_smoothing_factor": 0.1, "eval_strategy": "no", "save_strategy": "no", "load_best_model_at_end": False})
    trainer = _SeededTrainer(model=model, args=args)
    inputs = {"expression": torch.rand(6, 12) * 3, "labels": torch.tensor([0, 0, 1, 1, 2, 2])}
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(inputs))
        logits = model(expression=inputs["expression"]).logits
    weighted = torch.nn.functional.cross_entropy(logits, inputs["labels"], weight=torch.tensor([0.2, 1.0, 5.0]), label_smoothing=0.1)
    unweighted = torch.nn.functional.cross_entropy(logits, inputs["labels"], label_smoothing=0.1)
    assert torch.allclose(loss, weighted, atol=1e-6)
    assert not torch.allclose(weighted, unweighted, atol=1e-3)


def test_compare_seed_ensemble_fits_each_preset_once_per_seed(marker_file, tmp_path):
    from scrnalf_hf.training.compare import compare

    cells = load_labelled_cells(marker_file, "cell_type")
    args = default_training_args(tmp_path / "runs", seed=1, **{**FAST, "num_train_epochs": 2})
    with pytest.raises(ValueError, match="ensemble"):
        compare(cells, "tiny", tmp_path, n_folds=3, ensemble=0, training_args=args)
    result = compare(cells, "tiny,logreg", tmp_path, n_folds=3, seed=1, only_folds=[0], training_args=args,
                     config_overrides=OVERRIDES, ensemble=2)
    rows = {row["method"]: row for row in json.loads((tmp_path / "comparison.json").read_text())}
    assert set(rows) == {"tiny×2", "logreg", "majority"}
    members = [tmp_path / "runs" / "tiny" / "fold0" / f"seed{seed}" / "model.safetensors" for seed in (1, 2)]
    first, second = (load_file(member) for member in members)
    assert rows["tiny×2"]["n_parameters"] == 2 * sum(tensor.numel() for name, tensor in first.items() if name != "scrna_longformer.gene_neighbors")
    assert not torch.equal(first["classifier.weight"], second["classifier.weight"])  # two seeds, two models
    assert (result.predictions["tiny×2"][result.folds == 0] >= 0).all()


def test_without_a_validation_split_every_training_cell_trains_and_the_last_epoch_scores(marker_file, tmp_path):
    cells, train, test = _cells_and_split(marker_file)
    result = finetune(cells, train, test, default_training_args(tmp_path, **{**FAST, "num_train_epochs": 2}),
                      preset="tiny", config_overrides=OVERRIDES, validation_fraction=0.0)
    assert np.array_equal(result.train_index, np.sort(train)) and result.validation_index.size == 0
    assert not result.trainer.args.load_best_model_at_end
    assert result.trainer.state.global_step == 2 * int(np.ceil(len(train) / FAST["per_device_train_batch_size"]))
    assert not any("eval_loss" in entry for entry in result.trainer.state.log_history)
    assert result.metrics["macro_f1"] > 0
