"""The simulator: seeding, ground-truth shapes and consistency, chunk-wise writing, separability."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from scrnalf_hf.data import simulate, write_simulated_h5ad
from scrnalf_hf.data.simulation import simulate_two_species

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
    # each protein reads a (human) module gene, whose programme varies from cell to cell
    assert all(adata.var.loc[g, "module"] >= 0 and adata.var.loc[g, "species"] == "human"
               for g in adata.uns["simulation"]["protein_genes"])


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


def _pairs(adata):
    return pd.DataFrame({k: np.asarray(v) for k, v in adata.uns["simulation"]["orthologs"].items()})


def _type_means(adata, columns, cell_types):
    """(genes, cell types) mean log1p of normalised counts, summing the columns of each entry."""
    counts = adata.X.toarray()
    scale = 1e4 / counts.sum(1, keepdims=True)
    labels = adata.obs["cell_type"].to_numpy()
    position = {name: i for i, name in enumerate(adata.var_names)}
    out = []
    for genes in columns:
        level = np.log1p(counts[:, [position[g] for g in genes]].sum(1, keepdims=True) * scale).ravel()
        out.append([level[labels == t].mean() for t in cell_types])
    return np.array(out)


def test_species_shift_and_paralog_split_of_the_baseline():
    pairs_of = {}
    for shift in (0.0, 0.3, 1.0):
        adata = simulate(20, 400, second_species=True, one_to_many_fraction=0.2, species_shift_sd=shift, **SMALL)
        base = adata.var["base_log_mean"]
        pairs = _pairs(adata)
        one2one = pairs[pairs["homology"] == "one2one"]
        difference = base[one2one["mouse"]].to_numpy() - base[one2one["human"]].to_numpy()
        print(f"species_shift_sd={shift}: sd of one-to-one mouse - human baseline {difference.std():.3f}")
        assert difference.std() == pytest.approx(shift, abs=0.1 * shift + 1e-12)
        if shift == 0.0:  # the two paralogs split the human gene's level exactly
            split = pairs[pairs["homology"] == "one2many"].groupby("human")["mouse"].agg(list)
            summed = np.logaddexp(*np.array([base[m].to_numpy() for m in split]).T)
            np.testing.assert_allclose(summed, base[split.index].to_numpy(), rtol=0, atol=1e-9)
            share = np.exp(np.array([base[m[0]] for m in split]) - base[split.index].to_numpy())
            assert ((share > 0.3) & (share < 0.7)).all() and share.std() > 0.02
        pairs_of[shift] = pairs
    # the shift moves levels only: the same genes are orthologs and one-to-many
    assert pairs_of[0.0].equals(pairs_of[1.0])


def test_marker_genes_include_one_to_many_genes():
    for seed in range(4):
        adata = simulate(20, 100, seed=seed, second_species=True, one_to_many_fraction=0.1, **SMALL)
        pairs = _pairs(adata)
        one2many = pairs[pairs["homology"] == "one2many"]
        genes = one2many["human"].unique()
        assert len(genes) == pytest.approx(0.1 * pairs["human"].nunique(), abs=2)
        assert (one2many["human"].value_counts() == 2).all()
        assert (pairs.loc[pairs["homology"] == "one2one", "human"].value_counts() == 1).all()
        markers = adata.var.loc[genes, "marker_of"]
        assert (markers != "").sum() >= 1, seed
        # both paralogs are annotated as markers of the human gene's cell type
        np.testing.assert_array_equal(
            adata.var.loc[one2many["mouse"], "marker_of"], adata.var.loc[one2many["human"], "marker_of"]
        )
        n_mouse_genes = (adata.var["species"] == "mouse").sum()
        assert n_mouse_genes == 100 + len(genes)
    plain = simulate(20, 100, seed=0, second_species=True, **SMALL)
    assert (_pairs(plain)["homology"] == "one2one").all() and plain.shape[1] == 200


def test_summed_paralogs_track_the_human_genes_programme():
    human, mouse, _ = simulate_two_species(
        800, 100, seed=1, one_to_many_fraction=0.3, markers_per_type=6, n_cell_types=4, n_modules=4
    )
    pairs = _pairs(human)
    split = pairs[pairs["homology"] == "one2many"].groupby("human")["mouse"].agg(list)
    split = split[human.var.loc[split.index, "marker_of"].to_numpy() != ""]  # strong per-type profiles
    assert len(split) >= 3
    cell_types = list(human.obs["cell_type"].cat.categories)
    human_profile = _type_means(human, [[g] for g in split.index], cell_types)
    summed = _type_means(mouse, list(split), cell_types)
    first = _type_means(mouse, [[m[0]] for m in split], cell_types)
    second = _type_means(mouse, [[m[1]] for m in split], cell_types)
    unrelated = np.roll(human_profile, 1, axis=0)  # another marker gene's human profile

    def corr(a, b):
        return np.array([np.corrcoef(x, y)[0, 1] for x, y in zip(a, b)])

    own, other = corr(summed, human_profile), corr(summed, unrelated)
    print(
        f"{len(split)} one-to-many markers: corr(sum of paralogs, own human gene) {own.round(2)}, "
        f"with another gene {other.round(2)}; first paralog {corr(first, human_profile).round(2)}, "
        f"second {corr(second, human_profile).round(2)}"
    )
    assert (own > 0.9).all() and (own > other).all()
    assert (corr(first, human_profile) > 0.7).all() and (corr(second, human_profile) > 0.7).all()


def test_simulate_two_species_gives_two_anndata_and_an_ortholog_table(tmp_path):
    human, mouse, orthologs = simulate_two_species(150, 60, seed=2, **SMALL)
    assert human.n_obs == mouse.n_obs == 150
    assert human.n_vars == 60 and mouse.n_vars > 60  # the default one_to_many_fraction=0.1 adds paralogs
    assert not set(human.var_names) & set(mouse.var_names)
    assert list(human.obs["cell_type"].cat.categories) == list(mouse.obs["cell_type"].cat.categories)
    assert (human.obs["species"] == "human").all() and (mouse.obs["species"] == "mouse").all()
    for adata in (human, mouse):
        assert adata.X.format == "csr" and np.array_equal(adata.X.data, np.round(adata.X.data))
        assert (adata.X.data > 0).all() and adata.var["gene_ids"].is_unique
    assert human.var_names.str.isupper().all() and mouse.var_names.str.istitle().all()
    assert list(orthologs.columns) == ["human", "mouse"] and not orthologs.duplicated().any()
    assert orthologs["human"].isin(human.var_names).all() and orthologs["mouse"].isin(mouse.var_names).all()
    assert orthologs["human"].duplicated().any() and orthologs["mouse"].is_unique  # one-to-many rows
    path = tmp_path / "orthologs.tsv"
    orthologs.to_csv(path, sep="\t", index=False)
    pd.testing.assert_frame_equal(pd.read_csv(path, sep="\t"), orthologs)
    tiny_human, tiny_mouse, _ = simulate_two_species(3, 60, seed=2, **SMALL)  # fewer cells than types
    assert tiny_human.n_obs == tiny_mouse.n_obs == 3
    assert list(tiny_mouse.obs["cell_type"].cat.categories) == list(human.uns["simulation"]["cell_types"])
    with pytest.raises(ValueError, match="second_species"):
        simulate_two_species(10, 60, second_species=False, **SMALL)


def test_simulate_two_species_is_deterministic_and_one_to_many_keeps_the_cells():
    a = simulate_two_species(100, 60, seed=5, **SMALL)
    b = simulate_two_species(100, 60, seed=5, **SMALL)
    c = simulate_two_species(100, 60, seed=6, **SMALL)
    for x, y in zip(a[:2], b[:2]):
        assert (x.X != y.X).nnz == 0 and x.obs.equals(y.obs) and x.var.equals(y.var)
    assert a[2].equals(b[2])
    assert (a[0].X != c[0].X).nnz > 0 or a[0].shape != c[0].shape
    # one-to-many changes mouse genes only: the same cells (types, libraries) and human plan
    plain = simulate_two_species(100, 60, seed=5, one_to_many_fraction=0.0, **SMALL)
    assert plain[0].obs.equals(a[0].obs) and plain[1].obs.equals(a[1].obs)
    assert plain[0].var.equals(a[0].var) and plain[1].n_vars == 60 < a[1].n_vars



def test_linear_trajectory_is_unchanged_by_the_branching_setting():
    """Pinned: the counts of a linear trajectory as the simulator drew them before branching
    trajectories existed (branch draws come from streams of their own)."""
    import hashlib

    adata = simulate(300, 60, seed=3, trajectory=True, n_cell_types=3, markers_per_type=4)
    assert hashlib.sha256(adata.X.toarray().tobytes()).hexdigest()[:16] == "46c93905394aad14"
    assert "branch" not in adata.obs and "branch_a_slope" not in adata.var


def test_branching_trajectory_moves_each_branch_genes_only_past_the_fork_on_that_branch():
    linear = simulate(3000, 100, seed=1, trajectory=True, **SMALL)
    adata = simulate(3000, 100, seed=1, trajectory=True, trajectory_shape="branching", **SMALL)
    obs, var = adata.obs, adata.var
    # same cells otherwise: pseudotime, types and library sizes come from the same draws
    np.testing.assert_array_equal(obs["pseudotime"], linear.obs["pseudotime"])
    np.testing.assert_array_equal(obs["true_library_size"], linear.obs["true_library_size"])
    branch, time = obs["branch"].to_numpy(), obs["pseudotime"].to_numpy()
    assert list(obs["branch"].cat.categories) == ["stem", "branch_a", "branch_b"]
    assert ((branch == "stem") == (time < 0.5)).all()
    assert 0.4 < (branch == "branch_a").sum() / (time >= 0.5).sum() < 0.6
    a_genes, b_genes = (var["branch_a_slope"] != 0).to_numpy(), (var["branch_b_slope"] != 0).to_numpy()
    assert a_genes.sum() == b_genes.sum() == 10 and not (a_genes & b_genes).any()
    assert not ((var["trajectory_slope"] != 0).to_numpy() & (a_genes | b_genes)).any()
    normalised = np.log1p(adata.X.toarray() / adata.X.sum(1).A * 1e4)
    # a branch's rising genes, signed by their slope: track pseudotime on that branch, not elsewhere
    for name, genes, other in (("branch_a", a_genes, "branch_b"), ("branch_b", b_genes, "branch_a")):
        score = normalised[:, genes] @ np.sign(var.loc[genes, f"{name}_slope"].to_numpy())
        on, off, stem = branch == name, branch == other, branch == "stem"
        assert np.corrcoef(time[on], score[on])[0, 1] > 0.5
        assert abs(np.corrcoef(time[off], score[off])[0, 1]) < 0.15
        assert abs(np.corrcoef(time[stem], score[stem])[0, 1]) < 0.15
    # linear trajectory genes follow pseudotime in every cell
    moving = (var["trajectory_slope"] != 0).to_numpy()
    score = normalised[:, moving] @ np.sign(var.loc[moving, "trajectory_slope"].to_numpy())
    assert np.corrcoef(time, score)[0, 1] > 0.5


def test_branching_needs_a_trajectory():
    with pytest.raises(ValueError, match="needs trajectory=True"):
        simulate(10, 60, trajectory_shape="branching", **SMALL)
    with pytest.raises(ValueError, match="trajectory_shape must be one of"):
        simulate(10, 60, trajectory=True, trajectory_shape="tree", **SMALL)
