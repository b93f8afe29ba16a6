"""The simulator: seeding, ground-truth shapes and consistency, chunk-wise writing, separability."""

import anndata as ad
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from scrnalf_hf.data import simulate, write_simulated_h5ad

SMALL = {"n_cell_types": 4, "markers_per_type": 5, "n_modules": 4}


def test_same_seed_same_data_and_another_seed_other_data():
    a = simulate(300, 60, seed=3, **SMALL)
    b = simulate(300, 60, seed=3, **SMALL)
    c = simulate(300, 60, seed=4, **SMALL)
    assert (a.X != b.X).nnz == 0 and a.obs.equals(b.obs)
    assert (a.X != c.X).nnz > 0


def test_counts_are_nonnegative_integers_with_varying_library_sizes():
    adata = simulate(500, 80, **SMALL)
    values = adata.X.data
    assert adata.X.format == "csr" and adata.X.dtype == np.float32
    assert (values > 0).all() and np.array_equal(values, np.round(values))
    totals = np.asarray(adata.X.sum(1)).ravel()
    assert totals.max() / totals.min() > 3
    assert 0.05 < adata.X.nnz / np.prod(adata.shape) < 0.95


def test_ground_truth_is_stored_and_consistent():
    adata = simulate(400, 100, n_cell_types=4, markers_per_type=5, n_modules=5, trajectory=True)
    truth = adata.uns["simulation"]
    assert list(truth["cell_types"]) == list(adata.obs["cell_type"].cat.categories)
    assert truth["type_module_activity"].shape == (4, 5)
    edges = truth["regulatory_edges"]
    var = adata.var
    assert len(edges["source"]) == len(edges["target"]) == len(edges["weight"]) > 0
    assert var.loc[edges["source"], "is_regulator"].all()
    np.testing.assert_array_equal(var.loc[edges["source"], "module"].values, var.loc[edges["target"], "module"].values)
    assert (var["marker_of"] != "").sum() == 4 * 5
    assert adata.obs["pseudotime"].between(0, 1).all()
    assert (var["trajectory_slope"] != 0).sum() == 10


def test_markers_are_higher_in_their_own_cell_type():
    adata = simulate(1000, 100, **SMALL)
    normalised = np.log1p(adata.X.toarray() / adata.X.sum(1).A * 1e4)
    for cell_type in adata.obs["cell_type"].cat.categories:
        markers = (adata.var["marker_of"] == cell_type).to_numpy()
        inside = (adata.obs["cell_type"] == cell_type).to_numpy()
        assert normalised[inside][:, markers].mean() > normalised[~inside][:, markers].mean() + 0.3


def test_regulator_noise_propagates_to_its_targets():
    adata = simulate(2000, 100, **SMALL)
    normalised = np.log1p(adata.X.toarray() / adata.X.sum(1).A * 1e4)
    edges = adata.uns["simulation"]["regulatory_edges"]
    position = {name: i for i, name in enumerate(adata.var_names)}
    strongest = np.argmax(np.abs(edges["weight"]))
    source, target = position[edges["source"][strongest]], position[edges["target"][strongest]]
    correlation = np.corrcoef(normalised[:, source], normalised[:, target])[0, 1]
    assert np.sign(correlation) == np.sign(edges["weight"][strongest]) and abs(correlation) > 0.2


def test_second_species_and_proteins():
    adata = simulate(300, 50, second_species=True, ortholog_fraction=0.6, n_proteins=3, **SMALL)
    assert adata.shape == (300, 100)
    mouse = (adata.obs["species"] == "mouse").to_numpy()
    human_genes = (adata.var["species"] == "human").to_numpy()
    assert 0 < mouse.sum() < 300
    assert adata.X[mouse][:, human_genes].nnz == 0 and adata.X[~mouse][:, ~human_genes].nnz == 0
    orthologs = adata.uns["simulation"]["orthologs"]
    assert len(orthologs["human"]) == len(orthologs["mouse"]) == pytest.approx(30, abs=12)
    assert set(orthologs["mouse"]) <= set(adata.var_names[~human_genes])
    assert adata.obsm["protein"].shape == (300, 3)
    assert list(adata.uns["simulation"]["protein_genes"]) == [
        g for g in adata.uns["simulation"]["protein_genes"] if adata.var.loc[g, "marker_of"] != ""
    ]


def test_chunkwise_writer_gives_the_same_cells_as_simulate(tmp_path):
    path = write_simulated_h5ad(tmp_path / "sim.h5ad", 5000, 60, seed=2, n_proteins=2, **SMALL)
    written = ad.read_h5ad(path)
    expected = simulate(5000, 60, seed=2, n_proteins=2, **SMALL)
    assert (written.X != expected.X).nnz == 0
    assert written.obs.equals(expected.obs) and written.var.equals(expected.var)
    np.testing.assert_array_equal(written.obsm["protein"], expected.obsm["protein"])
    backed = ad.read_h5ad(path, backed="r")
    assert backed.X[4096:4100].shape == (4, 60)


def test_default_signal_lets_logistic_regression_separate_cell_types():
    adata = simulate(1500, 500, seed=0)
    counts = adata.X.toarray()
    normalised = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    labels = adata.obs["cell_type"].cat.codes.to_numpy()
    train, test = train_test_split(np.arange(len(labels)), test_size=0.3, stratify=labels, random_state=0)
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300))
    predicted = classifier.fit(normalised[train], labels[train]).predict(normalised[test])
    macro_f1 = f1_score(labels[test], predicted, average="macro")
    assert 0.8 < macro_f1 < 0.99, macro_f1  # separable, but not trivially
