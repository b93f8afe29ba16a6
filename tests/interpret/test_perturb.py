"""In-silico perturbation on tiny models: what a deletion can reach, overexpression, targets, errors."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import scrnalf_hf  # noqa: F401  (registers the Auto classes)
from scrnalf_hf import (
    ScrnaLongformerConfig,
    ScrnaLongformerForCellClassification,
    ScrnaLongformerForMaskedGeneModeling,
    ScrnaLongformerModel,
    ScrnaLongformerProcessor,
)
from scrnalf_hf.interpret.perturb import PerturbationResult, perturb, plot_perturbation, rank_perturbations

N_GENES = 12
GENES = [f"G{i}" for i in range(N_GENES)]
CLASSES = {0: "alpha", 1: "beta", 2: "gamma"}
# A hand-made gene graph: gene g attends to itself, g + 1 and g + 3 (mod G).
GRAPH = torch.tensor([[g, (g + 1) % N_GENES, (g + 3) % N_GENES] for g in range(N_GENES)])


def build(model_class, **changes):
    settings = dict(n_genes=N_GENES, knn_k=3, d_model=8, n_heads=2, depth=2, kernel_implementation="eager", id2label=CLASSES)
    model = model_class(ScrnaLongformerConfig.from_preset("tiny", **{**settings, **changes}))
    model.base_model.set_gene_graph(GRAPH)
    return model.eval()


def cells(n_cells=8, seed=0) -> ad.AnnData:
    counts = np.random.default_rng(seed).poisson(4.0, (n_cells, N_GENES)).astype(np.float32)
    counts[:, 11] = 0  # G11 is never expressed
    obs = pd.DataFrame({"group": ["a", "b"] * (n_cells // 2)}, index=[f"c{i}" for i in range(n_cells)])
    return ad.AnnData(counts, var=pd.DataFrame(index=GENES), obs=obs)


@pytest.fixture(scope="module")
def processor():
    return ScrnaLongformerProcessor(gene_symbols=GENES)


def readers_of(gene: int) -> set[int]:
    """Genes whose neighbour list holds ``gene``: all a one-layer model's deletion of it can reach."""
    return {g for g in range(N_GENES) if gene in GRAPH[g].tolist()} - {gene}


@pytest.mark.parametrize("model_class", [ScrnaLongformerModel, ScrnaLongformerForMaskedGeneModeling])
def test_deleting_a_gene_moves_exactly_the_genes_that_read_it_in_a_one_layer_model(model_class, processor):
    # One layer: CLS enters it as a constant, so a gene's output sees only its neighbours' inputs.
    torch.manual_seed(0)
    model = build(model_class, depth=1)
    result = perturb(model, processor, cells(), ["G4"], progress=False)
    moved = set(np.flatnonzero(np.nan_to_num(np.abs(result.gene_shift)) > 1e-12).tolist())
    assert moved == readers_of(4) == {1, 3}
    assert np.isnan(result.gene_shift[4])
    kind = "predicted_expression" if model_class is ScrnaLongformerForMaskedGeneModeling else "token_state_cosine"
    assert result.gene_shift_kind == kind
    assert (result.embedding_shift > 0).all()
    frame = result.to_frame()
    assert list(frame.columns) == ["gene", "shift", "abs_shift", "rank"]
    assert set(frame["gene"].head(2)) == {"G1", "G3"} and frame["gene"].iloc[-1] == "G4"


def test_deleting_a_gene_that_no_cell_expresses_changes_nothing(processor):
    torch.manual_seed(0)
    classifier = build(ScrnaLongformerForCellClassification)
    result = perturb(classifier, processor, cells(), ["G11"], target_label="beta", progress=False)
    assert isinstance(result, PerturbationResult)
    assert np.abs(result.embedding_shift).max() < 1e-12 and np.all(result.probability_shift == 0)
    assert np.all(result.target_shift == 0) and np.nanmax(np.abs(result.gene_shift)) < 1e-12
    masked_gene_model = build(ScrnaLongformerForMaskedGeneModeling)
    assert np.nansum(np.abs(perturb(masked_gene_model, processor, cells(), ["G11"], progress=False).gene_shift)) == 0


def test_overexpression_sets_a_high_level_of_the_gene_and_differs_from_deletion(processor):
    torch.manual_seed(0)
    classifier = build(ScrnaLongformerForCellClassification)
    adata = cells()
    expression = processor(adata, return_tensors="pt")["expression"][:, 2].numpy()
    overexpressed = perturb(classifier, processor, adata, ["G2"], mode="overexpress", progress=False)
    assert overexpressed.values[0] == pytest.approx(np.quantile(expression[expression > 0], 0.99), rel=1e-5)
    deleted = perturb(classifier, processor, adata, ["G2"], mode="delete", progress=False)
    assert deleted.values[0] == 0
    assert not np.allclose(overexpressed.probabilities_after, deleted.probabilities_after)
    fixed = perturb(classifier, processor, adata, ["G2"], mode="overexpress", overexpress_value=7.5, progress=False)
    assert fixed.values[0] == 7.5
    np.testing.assert_allclose(fixed.probabilities_before, deleted.probabilities_before)
    with pytest.raises(ValueError, match="G11 is expressed in none of these cells"):
        perturb(classifier, processor, adata, ["G11"], mode="overexpress", progress=False)


def test_target_shifts_are_the_probability_gain_or_the_move_toward_the_target_cells(processor):
    torch.manual_seed(0)
    classifier = build(ScrnaLongformerForCellClassification)
    adata = cells()
    result = perturb(classifier, processor, adata, ["G0", "G5"], group_by="group", group="a", target_label="gamma", progress=False)
    assert len(result.embedding_shift) == 4 and list(result.cell_names) == ["c0", "c2", "c4", "c6"]
    np.testing.assert_allclose(result.target_shift, result.probability_shift[:, 2], atol=1e-7)
    toward = perturb(classifier, processor, adata, ["G0"], group_by="group", group="a", target_group="b", progress=False)
    batch = processor(adata, return_tensors="pt")
    with torch.no_grad():
        embeddings = classifier(**batch).cell_embedding
        edited = batch["expression"].clone()
        edited[:, 0] = 0
        after = classifier(expression=edited, attention_mask=batch["attention_mask"]).cell_embedding
    centre = embeddings[1::2].mean(0, keepdim=True)
    distance = lambda e: 1 - torch.nn.functional.cosine_similarity(e, centre)  # noqa: E731
    np.testing.assert_allclose(toward.target_shift, (distance(embeddings) - distance(after))[0::2].numpy(), atol=1e-6)


def test_rank_perturbations_orders_genes_by_their_move_toward_the_target(processor):
    torch.manual_seed(0)
    classifier = build(ScrnaLongformerForCellClassification)
    table = rank_perturbations(classifier, processor, cells(), ["G0", "G3", "G11"], target_label="beta", progress=False)
    assert list(table.columns) == ["gene", "target_shift", "fraction_toward_target", "embedding_shift", "rank"]
    assert table["target_shift"].is_monotonic_decreasing and table["rank"].tolist() == [1, 2, 3]
    single = perturb(classifier, processor, cells(), ["G3"], target_label="beta", progress=False)
    assert table.set_index("gene").loc["G3", "target_shift"] == pytest.approx(single.target_shift.mean(), abs=1e-7)
    assert table.set_index("gene").loc["G11", "target_shift"] == 0
    untargeted = rank_perturbations(classifier, processor, cells(), ["G0", "G3"], progress=False)
    assert "target_shift" not in untargeted and untargeted["embedding_shift"].is_monotonic_decreasing


def test_perturbation_errors_say_what_to_fix(processor):
    torch.manual_seed(0)
    classifier = build(ScrnaLongformerForCellClassification)
    masked_gene_model = build(ScrnaLongformerForMaskedGeneModeling)
    adata = cells()
    with pytest.raises(ValueError, match=r"genes not in the model's 12-gene panel: \['CD19'\]; choose genes of processor.gene_symbols"):
        perturb(classifier, processor, adata, ["G1", "CD19"])
    with pytest.raises(ValueError, match=r"no cells with obs\['group'\] == 'c'; its values are \['a', 'b'\]"):
        perturb(classifier, processor, adata, ["G1"], group_by="group", group="c")
    with pytest.raises(ValueError, match="mode must be one of"):
        perturb(classifier, processor, adata, ["G1"], mode="knockdown")
    with pytest.raises(ValueError, match="unknown class 'delta'"):
        perturb(classifier, processor, adata, ["G1"], target_label="delta", progress=False)
    with pytest.raises(ValueError, match="target_label='beta' needs a classification head"):
        perturb(masked_gene_model, processor, adata, ["G1"], target_label="beta", progress=False)
    with pytest.raises(ValueError, match="either target_label"):
        perturb(classifier, processor, adata, ["G1"], target_label="beta", group_by="group", target_group="a", progress=False)
    with pytest.raises(ValueError, match="no gene shifts"):
        perturb(classifier, processor, adata, ["G1"], gene_shifts=False, progress=False).to_frame()


def test_plot_perturbation_writes_a_png(processor, tmp_path):
    torch.manual_seed(0)
    result = perturb(build(ScrnaLongformerForMaskedGeneModeling), processor, cells(), ["G4"], progress=False)
    path = plot_perturbation(result, tmp_path / "perturbation.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_graph_readers_count_the_other_genes_that_list_a_gene_and_unread_genes_are_warned_about(processor, caplog):
    from scrnalf_hf.interpret.perturb import graph_readers

    model = build(ScrnaLongformerModel, depth=1)
    np.testing.assert_array_equal(graph_readers(model, range(N_GENES)), [len(readers_of(g)) for g in range(N_GENES)])
    lonely = GRAPH.clone()
    lonely[lonely == 5] = -1  # nobody lists G5, not even G5 itself
    lonely[5, 0] = 5
    model.base_model.set_gene_graph(lonely)
    assert graph_readers(model, [5]).tolist() == [0]
    with caplog.at_level("WARNING", logger="scrnalf_hf.interpret.perturb"):
        perturb(model, processor, cells(), ["G5"], progress=False, gene_shifts=False)
    assert "G5: no other gene lists it" in caplog.text and "gene_graph_metric=correlation" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="scrnalf_hf.interpret.perturb"):
        perturb(model, processor, cells(), ["G4"], progress=False, gene_shifts=False)
    assert "no other gene lists" not in caplog.text
