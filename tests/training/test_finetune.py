"""Fine-tuning through Trainer: the output folder, best checkpoint, resume, freezing, weights."""

import json

import anndata as ad
import numpy as np
import pytest
import torch
from helpers import marker_adata, write_h5ad
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

import scrnalf_hf  # noqa: F401  (registers the Auto classes)
from scrnalf_cli import main
from scrnalf_hf.data import open_cells, split_off
from scrnalf_hf.training.arguments import training_arguments
from scrnalf_hf.training.compare import compare
from scrnalf_hf.training.finetune import CellPart, finetune, read_targets, score_held_out
from scrnalf_hf.training.tasks import CLASSIFICATION
from scrnalf_hf.training.trainer import ScrnaTrainer

# A recipe that learns the easy marker task within seconds (tiny preset, 40 genes).
FAST = {"num_train_epochs": 15, "learning_rate": 1e-2, "per_device_train_batch_size": 16, "disable_tqdm": True}
OVERRIDES = {"knn_k": 8}


@pytest.fixture(scope="module")
def marker_file(tmp_path_factory):
    return write_h5ad(marker_adata(n_cells=150), tmp_path_factory.mktemp("cells"), "markers.h5ad")


def args_for(folder, **changes):
    return training_arguments(CLASSIFICATION, folder, **{**FAST, **changes})


def _split(marker_file):
    cells = open_cells(marker_file, label_key="cell_type", progress=False)
    targets = read_targets(CLASSIFICATION, cells, "cell_type")
    train, test = split_off(np.arange(cells.n_cells), 0.2, seed=0, labels=targets.values)
    return cells, targets, train, test


def test_finetune_command_writes_a_pushable_folder_that_beats_the_majority(marker_file, tmp_path):
    output = tmp_path / "run"
    main([
        "finetune", "--train-file", str(marker_file), "--label-key", "cell_type", "--preset", "tiny",
        "--output-dir", str(output), "--config-overrides", "knn_k=8,hidden_dropout=0.05",
        "--num_train_epochs", "15", "--learning_rate", "1e-2", "--per_device_train_batch_size", "16",
        "--disable_tqdm", "true",
    ])
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "modeling_scrnalf.py",
                 "configuration_scrnalf.py", "processing_scrnalf.py", "pipeline_scrnalf.py", "README.md",
                 "all_results.json", "eval_results.json", "training_summary.json", "run_info.json",
                 "comparison.json", "split.json"):
        assert (output / name).is_file(), name
    summary = json.loads((output / "training_summary.json").read_text())
    eval_results = json.loads((output / "eval_results.json").read_text())
    assert eval_results["eval_macro_f1"] == pytest.approx(summary["metrics"]["macro_f1"])
    assert summary["n_train_cells"] + summary["n_validation_cells"] + summary["n_eval_cells"] == 150
    assert summary["metrics"]["macro_f1"] > summary["baselines"]["majority"]["macro_f1"] + 0.4
    held_out = json.loads((output / "split.json").read_text())["held_out_cell_ids"]
    assert len(held_out) == len(set(held_out)) == summary["n_eval_cells"]
    assert set(held_out) < set(ad.read_h5ad(marker_file).obs_names)
    for key in ("train_seconds", "train_cells_per_second", "inference_cells_per_second", "hardware", "n_parameters", "preset", "dataset", "label_key"):
        assert summary[key] not in (None, ""), key
    training = summary["training"]
    assert training["epochs_planned"] == 15 and 0 < training["epochs_run"] <= 15
    assert training["learning_rate"] == 1e-2 and training["label_smoothing"] == 0.1
    model = AutoModelForSequenceClassification.from_pretrained(output)
    assert model.config.id2label == {0: "type0", 1: "type1", 2: "type2"}
    assert model.config.hidden_dropout == 0.05
    from scrnalf_hf.hub import validate_hub_folder

    validate_hub_folder(output)  # push would take it as it is


def test_best_checkpoint_is_the_best_validation_epoch_not_the_last(marker_file, tmp_path):
    cells, targets, train, _ = _split(marker_file)
    result = finetune(CLASSIFICATION, cells, targets, train, args_for(tmp_path), preset="tiny", config_overrides=OVERRIDES,
                      early_stopping_patience=0)
    history = [e["eval_macro_f1"] for e in result.trainer.state.log_history if "eval_macro_f1" in e]
    assert result.trainer.state.best_metric == pytest.approx(max(history))
    assert result.trainer.evaluate()["eval_macro_f1"] == pytest.approx(max(history))
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
    cells, targets, train, test = _split(marker_file)
    settings = {"num_train_epochs": 6, "save_total_limit": 10}
    common = {"preset": "tiny", "config_overrides": OVERRIDES, "early_stopping_patience": 0}
    full = finetune(CLASSIFICATION, cells, targets, train, args_for(tmp_path / "full", **settings), **common)
    finetune(CLASSIFICATION, cells, targets, train, args_for(tmp_path / "cut", **settings), callbacks=[_StopAfterEpoch(3)], **common)
    checkpoint = get_last_checkpoint(str(tmp_path / "cut"))
    assert checkpoint is not None and int(checkpoint.rsplit("-", 1)[1]) < full.trainer.state.global_step
    resumed = finetune(CLASSIFICATION, cells, targets, train,
                       args_for(tmp_path / "cut", resume_from_checkpoint=checkpoint, **settings), **common)
    assert resumed.trainer.state.global_step == full.trainer.state.global_step
    test_part = CellPart(cells, targets, test)
    np.testing.assert_array_equal(score_held_out(resumed, test_part).point, score_held_out(full, test_part).point)
    for (name, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_resuming_with_another_seed_or_data_is_refused(marker_file, tmp_path):
    output = tmp_path / "run"
    command = ["finetune", "--train-file", str(marker_file), "--label-key", "cell_type", "--preset", "tiny",
               "--output-dir", str(output), "--config-overrides", "knn_k=8", "--num_train_epochs", "2", "--disable_tqdm", "true"]
    assert main(command) == 0
    assert main([*command, "--seed", "1", "--resume_from_checkpoint", "true"]) == 1  # one line, no traceback
    with pytest.raises(ValueError, match=r"cannot resume: this run's seed, train, test differ"):
        main([*command, "--seed", "1", "--resume_from_checkpoint", "true", "--debug"])
    assert main([*command, "--resume_from_checkpoint", "true"]) == 0  # the same split resumes


def test_freeze_encoder_trains_only_the_head(marker_file, tmp_path):
    cells, targets, train, _ = _split(marker_file)
    result = finetune(CLASSIFICATION, cells, targets, train, args_for(tmp_path, num_train_epochs=2), preset="tiny",
                      config_overrides=OVERRIDES, freeze=True, early_stopping_patience=0)
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias"}


def test_balanced_class_weights_reach_the_model_config(marker_file, tmp_path):
    cells, targets, train, _ = _split(marker_file)
    keep = np.concatenate([train[targets.values[train] != 2], train[targets.values[train] == 2][:10]])
    result = finetune(CLASSIFICATION, cells, targets, np.sort(keep), args_for(tmp_path, num_train_epochs=1),
                      preset="tiny", config_overrides=OVERRIDES, class_weighting="balanced", early_stopping_patience=0)
    weights = result.model.config.class_weights
    assert weights is not None and len(weights) == 3
    assert weights[2] > weights[0]  # the rare class weighs more


def test_label_smoothing_moves_into_the_model_and_keeps_the_class_weights(tmp_path):
    from scrnalf_hf import ScrnaLongformerConfig, ScrnaLongformerForCellClassification

    config = ScrnaLongformerConfig.from_preset("tiny", n_genes=12, num_labels=3, class_weights=[0.2, 1.0, 5.0])
    model = ScrnaLongformerForCellClassification(config).eval()
    args = args_for(tmp_path, label_smoothing_factor=0.1, eval_strategy="no", save_strategy="no", load_best_model_at_end=False)
    trainer = ScrnaTrainer(model=model, args=args)
    assert trainer.label_smoother is None and model.config.label_smoothing == 0.1
    inputs = {"expression": torch.rand(6, 12) * 3, "labels": torch.tensor([0, 0, 1, 1, 2, 2])}
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(inputs))
        logits = model(expression=inputs["expression"]).logits
    weighted = torch.nn.functional.cross_entropy(logits, inputs["labels"], weight=torch.tensor([0.2, 1.0, 5.0]), label_smoothing=0.1)
    unweighted = torch.nn.functional.cross_entropy(logits, inputs["labels"], label_smoothing=0.1)
    assert torch.allclose(loss, weighted, atol=1e-6)
    assert not torch.allclose(weighted, unweighted, atol=1e-3)
    ScrnaTrainer(model=model, args=args_for(tmp_path, label_smoothing_factor=0.0, eval_strategy="no", save_strategy="no",
                                            load_best_model_at_end=False))
    assert model.config.label_smoothing == 0.0  # a later run without smoothing does not inherit it


def test_compare_seed_ensemble_fits_each_preset_once_per_seed(marker_file, tmp_path):
    cells, targets, _, _ = _split(marker_file)
    args = training_arguments(CLASSIFICATION, tmp_path / "runs", seed=1, **{**FAST, "num_train_epochs": 2})
    with pytest.raises(ValueError, match="ensemble"):
        compare(CLASSIFICATION, cells, targets, "tiny", tmp_path, args, n_folds=3, ensemble=0)
    result = compare(CLASSIFICATION, cells, targets, "tiny,logreg", tmp_path, args, n_folds=3, seed=1, only_folds=[0],
                     config_overrides=OVERRIDES, ensemble=2)
    rows = {row["method"]: row for row in json.loads((tmp_path / "comparison.json").read_text())}
    assert set(rows) == {"tiny×2", "logreg", "majority"}
    members = [tmp_path / "runs" / "tiny" / "fold0" / f"seed{seed}" / "model.safetensors" for seed in (1, 2)]
    first, second = (load_file(member) for member in members)
    assert rows["tiny×2"]["n_parameters"] == 2 * sum(tensor.numel() for name, tensor in first.items() if name != "scrna_longformer.gene_neighbors")
    assert not torch.equal(first["classifier.weight"], second["classifier.weight"])  # two seeds, two models
    assert (result.predictions["tiny×2"][result.folds == 0] >= 0).all()


def test_without_a_validation_split_every_training_cell_trains_and_the_last_epoch_is_kept(marker_file, tmp_path):
    cells, targets, train, _ = _split(marker_file)
    result = finetune(CLASSIFICATION, cells, targets, train, args_for(tmp_path, num_train_epochs=2), preset="tiny",
                      config_overrides=OVERRIDES, validation_fraction=0.0)
    assert np.array_equal(result.train_rows, np.sort(train)) and result.validation_rows.size == 0
    assert not result.trainer.args.load_best_model_at_end
    assert result.trainer.state.global_step == 2 * int(np.ceil(len(train) / FAST["per_device_train_batch_size"]))
    assert not any("eval_loss" in entry for entry in result.trainer.state.log_history)


def test_n_top_genes_keeps_the_training_cells_most_variable_genes(tmp_path):
    from scrnalf_hf.data import simulate

    adata = simulate(200, 120, n_cell_types=3, markers_per_type=4, n_modules=3, seed=2)
    path = write_h5ad(adata, tmp_path)
    output = tmp_path / "run"
    main(["finetune", "--train-file", str(path), "--label-key", "cell_type", "--preset", "tiny", "--n-top-genes", "40",
          "--output-dir", str(output), "--config-overrides", "knn_k=8", "--num_train_epochs", "2", "--disable_tqdm", "true"])
    processor = json.loads((output / "preprocessor_config.json").read_text())
    assert len(processor["gene_symbols"]) == 40
    assert processor["highly_variable_genes"]["flavor"] == "seurat_v3"  # raw counts
    assert processor["highly_variable_genes"]["n_cells"] == json.loads((output / "training_summary.json").read_text())["n_train_cells"]
    assert json.loads((output / "config.json").read_text())["n_genes"] == 40
    marker_genes = set(adata.var_names[adata.var["marker_of"].astype(str) != ""])
    assert len(marker_genes & set(processor["gene_symbols"])) > len(marker_genes) / 2  # markers vary more than most


def test_a_fresh_models_gene_graph_follows_the_configs_metric(marker_file):
    from scrnalf_hf.data.panel import fit_processor, gene_graph
    from scrnalf_hf.training.finetune import build_model

    cells, targets, train, _ = _split(marker_file)
    processor = fit_processor(cells, train, seed=0)
    graphs = {}
    for metric in ("cosine", "correlation"):
        model = build_model(CLASSIFICATION, processor, cells, train, targets, preset="tiny",
                            config_overrides={"knn_k": 8, "gene_graph_metric": metric})
        assert model.config.gene_graph_metric == metric
        graphs[metric] = model.base_model.gene_neighbors.numpy()
        np.testing.assert_array_equal(graphs[metric], gene_graph(processor, cells, train, k=8, metric=metric))
    assert (graphs["cosine"] != graphs["correlation"]).any()
