"""Masked-gene pretraining, fine-tuning from the pretrained folder, and predictions into AnnData."""

import json

import anndata as ad
import numpy as np
import pytest
import torch
from helpers import marker_adata, write_h5ad
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM

import scrnalf_hf  # noqa: F401  (registers the Auto classes)
from scrnalf_cli import main


def test_pretrain_then_finetune_frozen_encoder_then_predict(tmp_path, capsys):
    data = write_h5ad(marker_adata(n_cells=90), tmp_path)
    pretrained = tmp_path / "pretrained"
    assert main(["pretrain", "--train-file", str(data), "--preset", "tiny", "--output-dir", str(pretrained),
                 "--config-overrides", "knn_k=8", "--num_train_epochs", "2", "--disable_tqdm", "true"]) == 0
    summary = json.loads((pretrained / "training_summary.json").read_text())
    assert summary["task"] == "masked_genes" and np.isfinite(summary["metrics"]["loss"])
    assert summary["n_train_cells"] + summary["n_validation_cells"] == 90 and summary["n_eval_cells"] == summary["n_validation_cells"]
    assert type(AutoModelForMaskedLM.from_pretrained(pretrained)).__name__ == "ScrnaLongformerForMaskedGeneModeling"
    assert "Masked-gene MSE" in (pretrained / "README.md").read_text()

    finetuned = tmp_path / "finetuned"
    assert main(["finetune", "--train-file", str(data), "--label-key", "cell_type", "--model", str(pretrained),
                 "--freeze-encoder", "--output-dir", str(finetuned), "--num_train_epochs", "2", "--disable_tqdm", "true"]) == 0
    before, after = load_file(pretrained / "model.safetensors"), load_file(finetuned / "model.safetensors")
    encoder = [k for k in after if k.startswith("scrna_longformer.") and k in before]
    assert encoder, "the classifier shares no encoder weights with the pretrained model"
    for name in encoder:  # loaded from the pretrained folder and left untouched by training
        torch.testing.assert_close(after[name], before[name], msg=name)

    predicted = tmp_path / "predicted.h5ad"
    assert main(["predict", "--model", str(finetuned), "--input", str(data), "--output", str(predicted)]) == 0
    adata = ad.read_h5ad(predicted)
    assert set(adata.obs["scrnalf_label"].cat.categories) == {"type0", "type1", "type2"}
    assert adata.obsm["scrnalf_probabilities"].shape == (90, 3)
    np.testing.assert_allclose(adata.obsm["scrnalf_probabilities"].sum(1), 1.0, rtol=1e-5)
    assert adata.obsm["X_scrnalf"].shape[0] == 90
    overlap = adata.uns["scrnalf"]["gene_overlap"]
    assert overlap["matched_genes"] == overlap["panel_genes"] == 40 and overlap["matrix"] == "X"

    embedded = tmp_path / "embedded.h5ad"
    assert main(["embed", "--model", str(pretrained), "--input", str(data), "--output", str(embedded)]) == 0
    assert ad.read_h5ad(embedded).obsm["X_scrnalf"].shape == (90, 8)

    # a pretrained masked-gene model predicts no labels: a clear refusal, nothing written
    capsys.readouterr()
    assert main(["predict", "--model", str(pretrained), "--input", str(data), "--output", str(tmp_path / "x.h5ad")]) == 1
    assert "masked gene modelling" in capsys.readouterr().err and not (tmp_path / "x.h5ad").exists()
    with pytest.raises(ValueError, match="Use `scrnalf embed`"):
        main(["--debug", "predict", "--model", str(pretrained), "--input", str(data), "--output", str(tmp_path / "x.h5ad")])
