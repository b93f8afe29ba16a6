"""RNA + ATAC (multiome) through the command line: ``--atac-key`` keeps each cell's open peaks
sparsely, matched to the RNA by cell id; the collator densifies them in the model's peak order;
finetune saves the peak panel (processor) and the peak graph (checkpoint); predict reads a
.h5mu's atac modality, or RNA alone; the baselines read the same peaks."""

import json

import anndata as ad
import mudata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scrnalf_cli import main
from scrnalf_hf import ScrnaLongformerProcessor
from scrnalf_hf.data import open_cells
from scrnalf_hf.data.atac import PeakCoordinates, binarize_peaks, build_peak_graph, parse_peak_coordinates
from scrnalf_hf.data.collators import CellCollator
from scrnalf_hf.data.panel import fit_processor
from scrnalf_hf.data.simulation import simulate_multiome
from scrnalf_hf.inference import load_model
from scrnalf_hf.training.finetune import (
    baseline_features,
    baselines_read_peaks,
    build_model,
    make_collator,
    read_targets,
)
from scrnalf_hf.training.tasks import get_task

N_CELLS, N_GENES, N_PEAKS = 120, 100, 200
TRAIN = ["--preset", "tiny", "--config-overrides", "kernel_implementation=eager", "--num_train_epochs", "2",
         "--disable_tqdm", "true"]


def multiome(**settings) -> mudata.MuData:
    return simulate_multiome(N_CELLS, N_GENES, N_PEAKS, seed=0, **settings)


def open_peaks(mdata: mudata.MuData) -> np.ndarray:
    """(n_cells, P) 0/1 accessibility of the atac modality in the RNA's cell order."""
    atac = mdata.mod["atac"][mdata.mod["rna"].obs_names]
    return (np.asarray(atac.X.todense()) > 0).astype(np.float32)


def shuffled(mdata: mudata.MuData, seed: int = 1) -> mudata.MuData:
    """The same cells with the atac modality's rows in another order (ids unchanged)."""
    order = np.random.default_rng(seed).permutation(mdata.mod["atac"].n_obs)
    with mudata.set_options(pull_on_update=False):
        return mudata.MuData({"rna": mdata.mod["rna"], "atac": mdata.mod["atac"][order].copy()})


@pytest.fixture(scope="module")
def h5mu(tmp_path_factory):
    """A .h5mu whose atac rows are shuffled against the RNA's, and its peaks in RNA order."""
    mdata = multiome()
    path = tmp_path_factory.mktemp("multiome") / "multiome.h5mu"
    shuffled(mdata).write_h5mu(path)
    return path, open_peaks(mdata), mdata.mod["atac"].var


@pytest.fixture(scope="module")
def trained(h5mu, tmp_path_factory):
    path = h5mu[0]
    output = tmp_path_factory.mktemp("run") / "atac"
    assert main(["finetune", "--train-file", str(path), "--label-key", "cell_type", "--atac-key", "atac",
                 "--output-dir", str(output), *TRAIN]) == 0
    return output


def test_sparse_binarisation_equals_the_dense_one_and_checks_the_same():
    counts = sp.random(30, 50, density=0.2, format="csr", random_state=0, data_rvs=lambda n: np.arange(n) % 4)
    before = counts.copy()
    sparse = binarize_peaks(counts, sparse=True)
    assert (counts != before).nnz == 0  # the input is left as it was
    assert sp.issparse(sparse) and sparse.dtype == np.float32 and (sparse.data == 1).all()  # explicit zeros dropped
    np.testing.assert_array_equal(sparse.toarray(), binarize_peaks(counts))
    with pytest.raises(ValueError, match="negative"):
        binarize_peaks(-counts, sparse=True)


def test_convert_keeps_each_cells_open_peaks_sparse_and_matched_by_cell_id(h5mu, tmp_path):
    path, accessibility, var = h5mu
    assert main(["convert", str(path), str(tmp_path / "out"), "--label-key", "cell_type", "--atac-key", "atac"]) == 0
    cells = open_cells(tmp_path / "out", progress=False)
    stored = cells.dataset
    assert stored.features["peaks"].feature.dtype == "int32"  # indices of open peaks, not a dense row
    rna_ids = mudata.read_h5mu(path).mod["rna"].obs_names
    assert list(stored["cell_id"]) == list(rna_ids)
    for row, peaks in enumerate(stored["peaks"]):
        assert peaks == np.flatnonzero(accessibility[row]).tolist()
    np.testing.assert_array_equal(cells.open_peaks(np.arange(N_CELLS)).toarray(), accessibility)
    record = json.loads((tmp_path / "out" / "genes.json").read_text())
    assert record["peak_names"] == list(var.index)
    assert record["peak_coordinates"] == parse_peak_coordinates(var.index, var).to_dict()


def test_collator_densifies_peaks_in_the_models_peak_order(h5mu):
    path, accessibility, _ = h5mu
    cells = open_cells(path, label_key="cell_type", atac_key="atac", progress=False)
    fitted = fit_processor(cells, np.arange(N_CELLS))
    reversed_panel = ScrnaLongformerProcessor(
        gene_symbols=fitted.gene_symbols, peak_names=fitted.peak_names[::-1],
        peak_coordinates={key: values[::-1] for key, values in fitted.peak_coordinates.items()},
    )
    rows = [5, 0, 17]
    features = [cells.dataset.with_format("numpy")[row] for row in rows]
    for processor, order in ((fitted, slice(None)), (reversed_panel, slice(None, None, -1))):
        batch = CellCollator(processor, cells.genes, peaks=True)(features)
        assert batch["peak_accessibility"].dtype == torch.float32 and batch["peak_mask"].dtype == torch.bool
        np.testing.assert_array_equal(batch["peak_accessibility"].numpy(), accessibility[rows][:, order])
        assert batch["peak_mask"].shape == (3, N_PEAKS) and bool(batch["peak_mask"].all())


def test_finetune_saves_the_peak_panel_and_the_peak_graph(trained, h5mu):
    _, _, var = h5mu
    config = json.loads((trained / "config.json").read_text())
    assert config["modalities"] == {"atac": N_PEAKS} and config["peak_names"] == list(var.index)
    model, processor = load_model(str(trained))
    assert processor.peak_names == list(var.index)
    coordinates = PeakCoordinates.from_dict(processor.peak_coordinates)
    expected = build_peak_graph(parse_peak_coordinates(var.index, var), model.config.peak_knn_k)
    np.testing.assert_array_equal(build_peak_graph(coordinates, model.config.peak_knn_k), expected)
    np.testing.assert_array_equal(model.fusion.peak_encoder.peak_neighbors.numpy(), expected)
    assert f"ATAC ({N_PEAKS} peaks" in (trained / "README.md").read_text()  # the model card says what it reads


def test_predict_reads_the_h5mu_atac_modality_or_runs_on_rna_alone(trained, h5mu, tmp_path):
    path = h5mu[0]
    assert main(["predict", "--model", str(trained), "--input", str(path), "--output", str(tmp_path / "multiome.h5ad")]) == 0
    with_atac = ad.read_h5ad(tmp_path / "multiome.h5ad")
    assert with_atac.n_obs == N_CELLS and with_atac.obs["scrnalf_label"].notna().all()
    rna = mudata.read_h5mu(path).mod["rna"]
    rna.write_h5ad(tmp_path / "rna.h5ad")
    assert main(["predict", "--model", str(trained), "--input", str(tmp_path / "rna.h5ad"), "--output", str(tmp_path / "rna_pred.h5ad")]) == 0
    rna_only = ad.read_h5ad(tmp_path / "rna_pred.h5ad")
    assert list(rna_only.obs_names) == list(with_atac.obs_names)
    # the peaks change what the model sees: its probabilities differ from RNA alone
    assert not np.allclose(with_atac.obsm["scrnalf_probabilities"], rna_only.obsm["scrnalf_probabilities"])


def test_predict_treats_panel_peaks_the_file_lacks_as_unmeasured(trained, h5mu, tmp_path):
    from scrnalf_hf.data.atac import read_atac
    from scrnalf_hf.inference import predict

    model, processor = load_model(str(trained))
    rna, peaks = read_atac(h5mu[0], sparse=True)
    half = processor.peaks(peaks.accessibility[:, ::2], peaks.names[::2])
    assert half["peak_mask"].shape == (N_CELLS, N_PEAKS) and half["peak_mask"].sum(1).tolist() == [N_PEAKS // 2] * N_CELLS
    rna = rna.copy()
    predict(rna, model, processor, peaks=peaks)
    assert rna.obs["scrnalf_label"].notna().all()


def test_baselines_read_the_binarised_peaks_too(h5mu):
    path, accessibility, _ = h5mu
    cells = open_cells(path, label_key="cell_type", atac_key="atac", progress=False)
    rows = np.arange(0, N_CELLS, 3)
    processor = fit_processor(cells, rows)
    assert baselines_read_peaks(get_task("classification"), cells)
    assert not baselines_read_peaks(get_task("trajectory"), cells)
    features = baseline_features(cells, rows, processor, peaks=True)
    assert features.shape == (len(rows), N_GENES + N_PEAKS)
    np.testing.assert_array_equal(features[:, N_GENES:].toarray(), accessibility[rows])


def test_proteins_and_peaks_together(tmp_path):
    mdata = multiome(n_proteins=4)
    rna = mdata.mod["rna"]
    prot = ad.AnnData(rna.obsm.pop("protein"), obs=pd.DataFrame(index=rna.obs_names),
                      var=pd.DataFrame(index=list(rna.uns["protein_names"])))
    with mudata.set_options(pull_on_update=False):
        mudata.MuData({"rna": rna, "prot": prot, "atac": mdata.mod["atac"]}).write_h5mu(tmp_path / "cells.h5mu")
    cells = open_cells(tmp_path / "cells.h5mu", label_key="cell_type", protein_key="prot", atac_key="atac", progress=False)
    task, rows = get_task("classification"), np.arange(N_CELLS)
    processor = fit_processor(cells, rows)
    model = build_model(task, processor, cells, rows, read_targets(task, cells, "cell_type"), preset="tiny",
                        config_overrides={"kernel_implementation": "eager"})
    assert model.config.modalities == {"protein": 4, "atac": N_PEAKS}
    batch = make_collator(task, processor, cells, model.config, seed=0, evaluation=True)(
        [cells.with_targets(None).with_format("numpy")[row] for row in range(4)]
    )
    assert {"protein_expression", "protein_mask", "peak_accessibility", "peak_mask"} <= set(batch)
    assert model(**batch).logits.shape == (4, model.config.num_labels)


def test_embed_of_an_h5mu_writes_the_rna_encoders_embeddings(trained, h5mu, tmp_path):
    assert main(["embed", "--model", str(trained), "--input", str(h5mu[0]), "--output", str(tmp_path / "embedded.h5ad")]) == 0
    embedded = ad.read_h5ad(tmp_path / "embedded.h5ad")
    assert embedded.obsm["X_scrnalf"].shape == (N_CELLS, json.loads((trained / "config.json").read_text())["d_model"])


def test_compare_fits_the_baselines_on_rna_and_peaks(h5mu, tmp_path):
    path = h5mu[0]
    assert main(["compare", "--train-file", str(path), "--label-key", "cell_type", "--atac-key", "atac", "--methods", "logreg",
                 "--cv", "2", "--folds", "0", "--output-dir", str(tmp_path / "cmp")]) == 0
    rows = {row["method"]: row for row in json.loads((tmp_path / "cmp" / "comparison.json").read_text())}
    n_classes = mudata.read_h5mu(path).mod["rna"].obs["cell_type"].nunique()
    # one weight per class and feature: the features are the genes and the peaks
    assert rows["logreg"]["n_parameters"] >= n_classes * (N_GENES + N_PEAKS)
