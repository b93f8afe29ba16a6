"""Masked-gene pretraining, fine-tuning from the pretrained folder, and predictions into AnnData."""

import json

import anndata as ad
import numpy as np
import torch
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM

import scrnalf_hf  # noqa: F401  (registers the Auto classes)
from scrnalf_hf.cli import main
from test_training_metrics_baselines import marker_adata


def test_pretrain_then_finetune_frozen_encoder_then_predict(tmp_path):
    data = tmp_path / "cells.h5ad"
    marker_adata(n_cells=90).write_h5ad(data)
    pretrained = tmp_path / "pretrained"
    main(["pretrain", "--train-file", str(data), "--preset", "tiny", "--output-dir", str(pretrained),
          "--config-overrides", "knn_k=8", "--num_train_epochs", "2", "--disable_tqdm", "true"])
    summary = json.loads((pretrained / "training_summary.json").read_text())
    assert np.isfinite(summary["eval_loss"]) and summary["n_train_cells"] + summary["n_eval_cells"] == 90
    assert type(AutoModelForMaskedLM.from_pretrained(pretrained)).__name__ == "ScrnaLongformerForMaskedGeneModeling"

    finetuned = tmp_path / "finetuned"
    main(["finetune", "--train-file", str(data), "--label-key", "cell_type", "--model", str(pretrained),
          "--freeze-encoder", "--output-dir", str(finetuned), "--num_train_epochs", "2", "--disable_tqdm", "true"])
    before, after = load_file(pretrained / "model.safetensors"), load_file(finetuned / "model.safetensors")
    encoder = [k for k in after if k.startswith("scrna_longformer.") and k in before]
    assert encoder, "the classifier shares no encoder weights with the pretrained model"
    for name in encoder:  # loaded from the pretrained folder and left untouched by training
        torch.testing.assert_close(after[name], before[name], msg=name)

    predicted = tmp_path / "predicted.h5ad"
    main(["predict", "--model", str(finetuned), "--input", str(data), "--output", str(predicted)])
    adata = ad.read_h5ad(predicted)
    assert set(adata.obs["scrnalf_label"].cat.categories) == {"type0", "type1", "type2"}
    assert adata.obsm["scrnalf_probabilities"].shape == (90, 3)
    np.testing.assert_allclose(adata.obsm["scrnalf_probabilities"].sum(1), 1.0, rtol=1e-5)
    assert adata.obsm["X_scrnalf"].shape[0] == 90

    embedded = tmp_path / "embedded.h5ad"
    main(["embed", "--model", str(pretrained), "--input", str(data), "--output", str(embedded)])
    assert ad.read_h5ad(embedded).obsm["X_scrnalf"].shape == (90, 8)
