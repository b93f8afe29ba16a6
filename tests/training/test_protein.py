"""RNA + protein (CITE-seq): proteins read from .h5mu and obsm and matched to the RNA by cell id,
kept per cell by convert, densified by the collator; the protein task's targets, finetune ->
predict (obsm["scrnalf_protein"] with the names), compare rows; the simulator's proteins."""

import json

import anndata as ad
import mudata
import numpy as np
import pandas as pd
from helpers import write_h5ad

from scrnalf_cli import main
from scrnalf_hf.data import open_cells, simulate
from scrnalf_hf.data.collators import CellCollator, ProteinMaskSampler
from scrnalf_hf.data.multimodal import read_mudata
from scrnalf_hf.data.panel import fit_processor
from scrnalf_hf.processing_scrnalf import clr_normalize
from scrnalf_hf.training.arguments import training_arguments
from scrnalf_hf.training.compare import compare
from scrnalf_hf.training.finetune import read_targets
from scrnalf_hf.training.tasks import PROTEIN, PROTEIN_KEY, get_task, task_for_model

SIMULATION = {"n_proteins": 6, "n_cell_types": 2, "markers_per_type": 3, "n_modules": 3}
FAST = {"num_train_epochs": 2, "learning_rate": 1e-2, "per_device_train_batch_size": 16, "disable_tqdm": True,
        "log_level": "warning"}
EAGER = {"kernel_implementation": "eager"}


def cite_adata(n_cells=60, n_genes=30, seed=0) -> ad.AnnData:
    return simulate(n_cells, n_genes, seed=seed, **SIMULATION)


def as_mudata(adata: ad.AnnData, prot_order=None) -> mudata.MuData:
    """RNA modality ``rna`` and protein modality ``prot`` (cells in ``prot_order``, by default reversed)."""
    order = np.arange(adata.n_obs)[::-1] if prot_order is None else prot_order
    prot = ad.AnnData(adata.obsm["protein"][order], obs=pd.DataFrame(index=adata.obs_names[order]),
                      var=pd.DataFrame(index=list(adata.uns["protein_names"])))
    rna = ad.AnnData(adata.X, obs=adata.obs, var=adata.var)
    return mudata.MuData({"rna": rna, "prot": prot})


def test_protein_is_a_registered_task_with_its_own_head():
    task = get_task("protein")
    assert task is PROTEIN and task.target_option == "protein_key" and task.floor == "ridge"
    assert task_for_model({"architectures": ["ScrnaLongformerForProteinPrediction"]}) is PROTEIN
    assert task.metric_names == ("pearson_median", "rmse") and task.auto_class == "AutoModelForTokenClassification"


def test_h5mu_proteins_are_matched_to_the_rna_by_cell_id_not_position(tmp_path):
    adata = cite_adata(n_cells=20)
    path = tmp_path / "cells.h5mu"
    as_mudata(adata).write_h5mu(path)  # protein rows in reverse order
    rna, proteins = read_mudata(path)
    assert list(rna.obs_names) == list(adata.obs_names)
    np.testing.assert_array_equal(proteins.counts, adata.obsm["protein"])
    assert proteins.names == list(adata.uns["protein_names"])
    cells = open_cells(path, protein_key="prot", progress=False)
    stored = cells.dataset.with_format("numpy")
    assert list(stored["cell_id"]) == list(adata.obs_names)
    np.testing.assert_array_equal(np.stack(stored["protein"]), adata.obsm["protein"])
    assert cells.genes.protein_names == list(adata.uns["protein_names"])


def test_obsm_dataframe_and_named_array_give_the_same_converted_proteins(tmp_path):
    adata = cite_adata(n_cells=20)
    names = list(adata.uns["protein_names"])
    framed = adata.copy()
    framed.obsm["protein_expression"] = pd.DataFrame(adata.obsm["protein"], index=adata.obs_names, columns=names)
    assert main(["convert", str(write_h5ad(framed, tmp_path, "framed.h5ad")), str(tmp_path / "framed"),
                 "--protein-key", "protein_expression"]) == 0
    assert main(["convert", str(write_h5ad(adata, tmp_path, "array.h5ad")), str(tmp_path / "array"),
                 "--protein-key", "protein"]) == 0
    for folder in ("framed", "array"):
        cells = open_cells(tmp_path / folder, progress=False)
        np.testing.assert_array_equal(np.stack(cells.dataset.with_format("numpy")["protein"]), adata.obsm["protein"])
        assert json.loads((tmp_path / folder / "genes.json").read_text())["protein_names"] == names


def test_collator_densifies_clr_proteins_per_batch_in_each_mode():
    adata = cite_adata(n_cells=12)
    cells = open_cells(adata, protein_key="protein", progress=False)
    processor = fit_processor(cells, np.arange(cells.n_cells))
    assert processor.protein_names == list(adata.uns["protein_names"])
    targets = read_targets(PROTEIN, cells, "protein")
    expected = clr_normalize(adata.obsm["protein"])
    np.testing.assert_allclose(targets.values, expected, rtol=1e-6)
    rows = list(cells.with_targets(targets.values).select(range(4)))
    inputs = CellCollator(processor, cells.genes, proteins="inputs")(rows)
    np.testing.assert_allclose(inputs["protein_expression"].numpy(), expected[:4], rtol=1e-6)
    assert inputs["protein_mask"].shape == (4, 6) and bool(inputs["protein_mask"].all())
    scored = CellCollator(processor, cells.genes, proteins="targets")(rows)
    assert "protein_expression" not in scored and scored["labels"].shape == (4, 6)
    masked = CellCollator(processor, cells.genes, proteins="masked", protein_masking=ProteinMaskSampler(1.0))(rows)
    assert bool(masked["masked_proteins"].all())  # whole_ratio 1: every protein of every cell hidden
    some = ProteinMaskSampler(0.0, seed=1)(masked["protein_mask"].bool())
    assert some.any(1).all() and not some.all()  # at least one hidden per cell, not all


def test_cli_finetune_then_predict_writes_named_protein_predictions(tmp_path):
    adata = cite_adata()
    data = write_h5ad(adata, tmp_path)
    model_dir = tmp_path / "model"
    assert main(["finetune", "--task", "protein", "--protein-key", "protein", "--train-file", str(data), "--preset", "tiny",
                 "--output-dir", str(model_dir), "--config-overrides", "kernel_implementation=eager",
                 "--num_train_epochs", "2", "--disable_tqdm", "true"]) == 0
    summary = json.loads((model_dir / "training_summary.json").read_text())
    assert summary["task"] == "protein" and set(summary["metrics"]) == {"pearson_median", "rmse"}
    assert set(summary["baselines"]) == {"ridge"}
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["ScrnaLongformerForProteinPrediction"]
    assert config["protein_names"] == list(adata.uns["protein_names"]) and config["modalities"] == {"protein": 6}
    card = (model_dir / "README.md").read_text()
    assert "Modalities: RNA" in card and "protein (6" in card
    predicted = tmp_path / "predicted.h5ad"
    rna_only = ad.AnnData(adata.X, obs=adata.obs[[]], var=adata.var)  # no proteins: RNA-only inference
    assert main(["predict", "--model", str(model_dir), "--input", str(write_h5ad(rna_only, tmp_path, "rna.h5ad")),
                 "--output", str(predicted)]) == 0
    result = ad.read_h5ad(predicted)
    assert result.obsm[PROTEIN_KEY].shape == (60, 6) and np.isfinite(result.obsm[PROTEIN_KEY]).all()
    assert list(result.uns["scrnalf"]["protein_names"]) == list(adata.uns["protein_names"])


def test_compare_rows_have_the_exact_columns(tmp_path):
    adata = cite_adata(n_cells=60)
    cells = open_cells(adata, protein_key="protein", progress=False)
    targets = read_targets(PROTEIN, cells, "protein")
    args = training_arguments(PROTEIN, tmp_path / "runs", **FAST)
    result = compare(PROTEIN, cells, targets, "tiny,ridge", tmp_path, args, n_folds=3, only_folds=[0], config_overrides=EAGER)
    rows = json.loads((tmp_path / "comparison.json").read_text())
    assert [row["method"] for row in rows] == ["tiny", "ridge"]
    for row in rows:
        assert list(row) == ["method", "fold", "pearson_median", "rmse", "train_seconds", "n_parameters"]
        assert -1 <= row["pearson_median"] <= 1 and row["rmse"] > 0
    held_out = result.folds == 0
    assert result.predictions["ridge"].shape == (60, 6) and np.isfinite(result.predictions["ridge"][held_out]).all()


def test_simulated_proteins_follow_their_known_relations_and_carry_a_state_rna_lacks():
    adata = simulate(400, 60, seed=0, n_proteins=6, n_modules=3, markers_per_type=3, n_cell_types=2)
    truth = adata.uns["simulation"]
    assert list(truth["protein_kinds"]) == ["linear", "switch", "complex"] * 2
    assert list(adata.uns["protein_names"]) == list(truth["protein_names"])
    assert all(adata.var.loc[g, "module"] >= 0 for g in truth["protein_genes"])
    # the state proteins rise in "high" cells; no gene does (the RNA is that of n_proteins=0)
    clr = clr_normalize(adata.obsm["protein"])
    high = (adata.obs["protein_state"] == "high").to_numpy()
    assert clr[high, 0].mean() - clr[~high, 0].mean() > 1.0
    plain = simulate(400, 60, seed=0, n_modules=3, markers_per_type=3, n_cell_types=2)
    assert (plain.X != adata.X).nnz == 0
    assert set(adata.obs["cell_subtype"].cat.categories) == {f"type_{t}_{s}" for t in range(2) for s in ("low", "high")}


def test_classification_baselines_read_the_proteins_the_model_reads():
    """A classifier of RNA + protein is compared with baselines that read both: the simulated
    protein state (no gene sees it) splits each cell type in two, and only logistic regression
    given the proteins tells the halves apart. The protein task's proteins are its targets."""
    from scrnalf_hf.training.finetune import CellPart, baseline_features, baselines_read_proteins, fit_baselines

    classification = get_task("classification")
    adata = simulate(400, 60, seed=0, n_proteins=6, n_modules=3, markers_per_type=3, n_cell_types=2)
    scores = {}
    for name, cells in (("rna", open_cells(adata, label_key="cell_subtype", progress=False)),
                        ("rna_protein", open_cells(adata, label_key="cell_subtype", protein_key="protein", progress=False))):
        targets = read_targets(classification, cells, "cell_subtype")
        train, test = np.arange(300), np.arange(300, 400)
        processor = fit_processor(cells, train)
        reads = baselines_read_proteins(classification, cells)
        features = baseline_features(cells, test, processor, proteins=reads).toarray()
        assert reads == (name == "rna_protein")
        assert features.shape == (100, processor.n_genes + 6 * reads)
        if reads:
            np.testing.assert_allclose(features[:, -6:], clr_normalize(adata.obsm["protein"])[test], rtol=1e-5, atol=1e-6)
            assert not baselines_read_proteins(PROTEIN, cells)
        rows, _ = fit_baselines(classification, processor, CellPart(cells, targets, train), CellPart(cells, targets, test),
                                ["logreg"])
        scores[name] = rows[0]["macro_f1"]
    assert scores["rna_protein"] > scores["rna"] + 0.25, scores


def test_predict_gives_an_rna_protein_classifier_the_cells_proteins(tmp_path):
    """A classifier trained on RNA + protein classifies a CITE-seq file from both (obsm or the
    .h5mu prot modality, matched by cell id), exactly as the model does given those proteins, and
    a file without proteins from RNA alone."""
    import torch

    from scrnalf_hf.data.multimodal import proteins_from_anndata
    from scrnalf_hf.inference import load_model, predict

    adata = cite_adata()
    data = write_h5ad(adata, tmp_path)
    model_dir = tmp_path / "model"
    assert main(["finetune", "--label-key", "cell_subtype", "--protein-key", "protein", "--train-file", str(data),
                 "--preset", "tiny", "--output-dir", str(model_dir), "--config-overrides", "kernel_implementation=eager",
                 "--num_train_epochs", "2", "--disable_tqdm", "true"]) == 0
    with_obsm, from_h5mu, rna_only = tmp_path / "obsm.h5ad", tmp_path / "h5mu.h5ad", tmp_path / "rna.h5ad"
    assert main(["predict", "--model", str(model_dir), "--input", str(data), "--protein-key", "protein",
                 "--output", str(with_obsm)]) == 0
    mudata_path = tmp_path / "cite.h5mu"
    as_mudata(adata).write_h5mu(mudata_path)  # prot cells in reverse order: matched by id
    assert main(["predict", "--model", str(model_dir), "--input", str(mudata_path), "--output", str(from_h5mu)]) == 0
    plain = ad.AnnData(adata.X, obs=adata.obs[[]], var=adata.var)
    assert main(["predict", "--model", str(model_dir), "--input", str(write_h5ad(plain, tmp_path, "plain.h5ad")),
                 "--output", str(rna_only)]) == 0
    model, processor = load_model(str(model_dir))
    expected = adata.copy()
    with torch.no_grad():
        predict(expected, model, processor, proteins=proteins_from_anndata(adata, "protein"))
    both, mu, rna = (ad.read_h5ad(path).obsm["X_scrnalf"] for path in (with_obsm, from_h5mu, rna_only))
    np.testing.assert_allclose(both, expected.obsm["X_scrnalf"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mu, both, rtol=1e-5, atol=1e-5)
    assert not np.allclose(both, rna, atol=1e-4)  # the proteins reached the fused cell embedding
    # the protein head predicts proteins from RNA: it is given none
    protein_model = tmp_path / "protein_model"
    assert main(["finetune", "--task", "protein", "--protein-key", "protein", "--train-file", str(data), "--preset", "tiny",
                 "--output-dir", str(protein_model), "--config-overrides", "kernel_implementation=eager",
                 "--num_train_epochs", "1", "--disable_tqdm", "true"]) == 0
    assert main(["predict", "--model", str(protein_model), "--input", str(data), "--protein-key", "protein",
                 "--output", str(tmp_path / "refused.h5ad")]) != 0
    assert not (tmp_path / "refused.h5ad").exists()
