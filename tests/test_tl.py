"""scanpy-style tools (``scrnalf_hf.tl``): they write into the AnnData like ``sc.tl`` functions."""

import numpy as np
import pytest
from helpers import marker_adata

import scrnalf_hf
from scrnalf_hf.inference import load_model


def test_embed_and_predict_write_into_the_anndata_and_return_none(trained_tiny_folder):
    adata = marker_adata(n_cells=20, n_genes=60)
    assert scrnalf_hf.tl.embed(adata, trained_tiny_folder) is None
    assert adata.obsm["X_scrnalf"].shape[0] == 20
    assert np.isfinite(adata.obsm["X_scrnalf"]).all()
    scrnalf_hf.tl.predict(adata, str(trained_tiny_folder))
    assert set(adata.obs["scrnalf_label"].cat.categories) == {"alpha", "beta", "gamma"}
    assert adata.uns["scrnalf"]["task"] == "classification"


def test_copy_leaves_the_input_alone_and_a_loaded_model_finds_its_processor(trained_tiny_folder):
    adata = marker_adata(n_cells=12, n_genes=60)
    model, _ = load_model(str(trained_tiny_folder))
    written = scrnalf_hf.tl.predict(adata, model, copy=True)
    assert "scrnalf_label" not in adata.obs and "scrnalf_label" in written.obs
    np.testing.assert_array_equal(written.obs_names, adata.obs_names)


def test_pseudotime_refuses_a_model_without_a_trajectory_head(trained_tiny_folder):
    with pytest.raises(ValueError, match="trajectory head.*cell-type classification model"):
        scrnalf_hf.tl.pseudotime(marker_adata(n_cells=5, n_genes=60), trained_tiny_folder)


def test_a_model_object_without_a_source_needs_its_processor():
    from scrnalf_hf import ScrnaLongformerConfig, ScrnaLongformerModel

    model = ScrnaLongformerModel(ScrnaLongformerConfig.from_preset("tiny", n_genes=60, knn_k=8))
    with pytest.raises(ValueError, match="processor="):
        scrnalf_hf.tl.embed(marker_adata(n_cells=5, n_genes=60), model)
