"""Gene importance: integrated gradients (captum) and attention rollout on tiny models."""

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
    ScrnaLongformerProcessor,
)
from scrnalf_hf.interpret.importance import attention_rollout, integrated_gradients, plot_importance, top_genes
from scrnalf_hf.modeling_scrnalf import graph_attention_mask

N_GENES = 12
GENES = [f"G{i}" for i in range(N_GENES)]
CLASSES = {0: "alpha", 1: "beta", 2: "gamma"}


def tiny_config(**changes) -> ScrnaLongformerConfig:
    settings = dict(n_genes=N_GENES, knn_k=4, d_model=8, n_heads=2, depth=2, kernel_implementation="eager", id2label=CLASSES)
    return ScrnaLongformerConfig.from_preset("tiny", **{**settings, **changes})


def cells(n_cells=6, seed=0, genes=GENES) -> ad.AnnData:
    counts = np.random.default_rng(seed).poisson(3.0, (n_cells, len(genes))).astype(np.float32)
    counts[0, :3] = 0  # some genes unexpressed in the first cell
    return ad.AnnData(counts, var=pd.DataFrame(index=genes), obs=pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]))


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    return ScrnaLongformerForCellClassification(tiny_config()).eval()


@pytest.fixture(scope="module")
def processor():
    return ScrnaLongformerProcessor(gene_symbols=GENES)


def outputs_at(model, processor, adata, zero_input=False):
    batch = processor(adata, return_tensors="pt")
    if zero_input:
        batch["expression"] = torch.zeros_like(batch["expression"])
    with torch.no_grad():
        return model(**batch).logits


def test_integrated_gradients_sum_to_the_output_change_from_the_unexpressed_baseline(processor):
    torch.manual_seed(0)
    model = ScrnaLongformerForCellClassification(tiny_config()).eval()
    torch.nn.init.normal_(model.classifier.weight, std=1.0)  # logits of order 1, not 0.01
    adata = cells()
    change = (outputs_at(model, processor, adata) - outputs_at(model, processor, adata, zero_input=True))[:, 1].numpy()
    errors = []
    for n_steps in (16, 256):
        attributions, delta = integrated_gradients(
            model, processor, adata, target="beta", n_steps=n_steps, progress=False, return_convergence_delta=True
        )
        assert attributions.shape == (adata.n_obs, N_GENES) and attributions.dtype == np.float32
        np.testing.assert_allclose(delta, attributions.sum(1) - change, atol=1e-4)  # captum's delta is that gap
        assert np.all(attributions[0, :3] == 0)  # unexpressed in that cell: nothing to attribute
        errors.append(np.abs(delta).max())
    # The value encoding is piecewise linear, so the integration error shrinks like 1 / n_steps.
    assert errors[1] < errors[0] / 4 and errors[1] < 0.02 * np.abs(change).max()


def test_integrated_gradients_explain_each_cells_predicted_class_by_default(classifier, processor):
    adata = cells()
    predicted = outputs_at(classifier, processor, adata).argmax(-1).numpy()
    by_default = integrated_gradients(classifier, processor, adata, n_steps=16, progress=False)
    for class_id in np.unique(predicted):
        chosen = predicted == class_id
        explicit = integrated_gradients(classifier, processor, adata[chosen], target=int(class_id), n_steps=16, progress=False)
        np.testing.assert_allclose(by_default[chosen], explicit, atol=1e-6)


def test_integrated_gradients_of_a_single_output_head_need_no_target(processor):
    torch.manual_seed(1)
    model = ScrnaLongformerForCellClassification(tiny_config(id2label={0: "time"}, problem_type="regression")).eval()
    adata = cells()
    attributions = integrated_gradients(model, processor, adata, n_steps=64, progress=False, batch_size=4)
    change = outputs_at(model, processor, adata)[:, 0] - outputs_at(model, processor, adata, zero_input=True)[:, 0]
    np.testing.assert_allclose(attributions.sum(1), change.numpy(), atol=2e-3)
    with pytest.raises(ValueError, match="one output per cell; leave target=None"):
        integrated_gradients(model, processor, adata, target=0, progress=False)


def test_integrated_gradients_refuse_models_and_targets_they_cannot_explain(classifier, processor):
    adata = cells()
    masked_gene_model = ScrnaLongformerForMaskedGeneModeling(tiny_config())
    with pytest.raises(ValueError, match="needs a classification head"):
        integrated_gradients(masked_gene_model, processor, adata, progress=False)
    with pytest.raises(ValueError, match="unknown class 'delta'; this model's classes are"):
        integrated_gradients(classifier, processor, adata, target="delta", progress=False)
    with pytest.raises(ValueError, match="class id 3 is out of range"):
        integrated_gradients(classifier, processor, adata, target=3, progress=False)
    with pytest.raises(ValueError, match="baseline must be one of"):
        integrated_gradients(classifier, processor, adata, baseline="noise", progress=False)


def dense_rollout(model, batch) -> np.ndarray:
    """Reference: every layer's full (1 + G)² attention from its normalised input, chained densely."""
    base = model.base_model
    with torch.no_grad():
        hidden_states = base(**batch, output_hidden_states=True).hidden_states
    gene_mask = batch["attention_mask"].bool()
    key_mask = torch.cat([torch.ones_like(gene_mask[:, :1]), gene_mask], 1)
    allowed = graph_attention_mask(base.gene_neighbors, key_mask)  # (b, 1, 1 + G, 1 + G)
    n_tokens = N_GENES + 1
    chain = torch.eye(n_tokens).expand(len(gene_mask), -1, -1)
    heads, head_dim = model.config.n_heads, model.config.head_dim
    for layer, hidden in zip(base.encoder.layers, hidden_states[:-1]):
        with torch.no_grad():
            qkv = layer.attention.qkv(layer.attention_norm(hidden)).view(len(hidden), n_tokens, 3, heads, head_dim)
        query, key = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # (b, h, T, dh)
        scores = (query @ key.transpose(-1, -2)) / head_dim**0.5
        attention = scores.masked_fill(~allowed, float("-inf")).softmax(-1).mean(1)  # (b, T, T)
        chain = (0.5 * attention + 0.5 * torch.eye(n_tokens)) @ chain
    if model.config.pooling == "cls":
        summary = torch.zeros(len(gene_mask), n_tokens)
        summary[:, 0] = 1
    else:
        summary = torch.cat([torch.zeros(len(gene_mask), 1), gene_mask.float() / gene_mask.sum(1, keepdim=True)], 1)
    return (summary.unsqueeze(1) @ chain)[:, 0, 1:].numpy()


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_attention_rollout_equals_the_dense_computation(pooling, processor):
    torch.manual_seed(2)
    model = ScrnaLongformerForCellClassification(tiny_config(pooling=pooling, depth=3)).eval()
    graph = torch.tensor([[(g + offset) % N_GENES for offset in (0, 1, 5, 7)] for g in range(N_GENES)])
    graph[2, 3] = -1  # a padded slot
    model.base_model.set_gene_graph(graph)
    adata = cells(genes=GENES[:-1])  # the last panel gene is not measured: masked out
    rollout = attention_rollout(model, processor, adata, batch_size=4, progress=False)
    batch = processor(adata, return_tensors="pt")
    assert batch["attention_mask"][:, -1].sum() == 0
    np.testing.assert_allclose(rollout, dense_rollout(model, batch), atol=1e-5)
    assert rollout.shape == (adata.n_obs, N_GENES) and (rollout >= 0).all() and (rollout.sum(1) <= 1 + 1e-5).all()


def trained_marker_classifier():
    """A tiny classifier trained for a few seconds on 3 types, each raising its own 3 marker genes."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    labels = np.arange(90) % 3
    rates = np.full((3, N_GENES), 2.0)
    for t in range(3):
        rates[t, 3 * t : 3 * t + 3] = 20.0
    adata = ad.AnnData(
        rng.poisson(rates[labels]).astype(np.float32), var=pd.DataFrame(index=GENES),
        obs=pd.DataFrame({"cell_type": pd.Categorical(np.array(list(CLASSES.values()))[labels])}, index=[f"c{i}" for i in range(90)]),
    )
    processor = ScrnaLongformerProcessor(gene_symbols=GENES)
    batch = processor(adata, return_tensors="pt")
    model = ScrnaLongformerForCellClassification(tiny_config(hidden_dropout=0.0))
    model.base_model.set_gene_graph(processor.build_gene_graph(batch["expression"], k=4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    for _ in range(40):
        optimizer.zero_grad()
        model(**batch, labels=torch.from_numpy(labels)).loss.backward()
        optimizer.step()
    return model.eval(), processor, adata


def test_top_genes_are_the_planted_markers_of_each_class(tmp_path):
    model, processor, adata = trained_marker_classifier()
    tables = {}
    for t, label in CLASSES.items():
        table = top_genes(model, adata, label, processor=processor, label_key="cell_type", n=3, n_steps=16, progress=False)
        assert list(table.columns) == ["gene", "score", "rank"] and table["rank"].tolist() == [1, 2, 3]
        assert set(table["gene"]) == set(GENES[3 * t : 3 * t + 3]), (label, table)
        tables[label] = table
    by_prediction = top_genes(model, adata, "beta", processor=processor, n=3, n_steps=16, progress=False)
    assert set(by_prediction["gene"]) == set(GENES[3:6])
    rollout = top_genes(model, adata, "beta", processor=processor, method="attention_rollout", n=5, progress=False)
    assert len(rollout) == 5 and (rollout["score"] > 0).all()
    assert plot_importance(tables, tmp_path / "importance.png").stat().st_size > 0


def test_top_genes_errors(classifier, processor):
    adata = cells()
    adata.obs["cell_type"] = "alpha"
    with pytest.raises(ValueError, match="no cells with obs\\['cell_type'\\] == 'beta'"):
        top_genes(classifier, adata, "beta", processor=processor, label_key="cell_type", progress=False)
    with pytest.raises(ValueError, match="needs its processor="):
        top_genes(classifier, adata, "beta")
    with pytest.raises(ValueError, match="method must be one of"):
        top_genes(classifier, adata, "beta", processor=processor, method="saliency")
    with pytest.raises(ValueError, match="obs has no column 'louvain'"):
        top_genes(classifier, adata, "beta", processor=processor, label_key="louvain")


@pytest.mark.slow
def test_integrated_gradients_of_a_pbmc_classifier_find_canonical_markers(tmp_path, capsys):
    """scripts/markers.py end to end (a few minutes): each class's top 20 holds a canonical marker."""
    from helpers import load_script

    report = load_script("markers").run(tmp_path)
    found = report["markers_found"]["integrated_gradients"]
    with capsys.disabled():
        print(f"\ncanonical markers in the integrated-gradients top 20: {found}")
    assert all(found.values()), f"a class without a canonical marker in its top 20: {found}; top genes {report['top_genes']}"
    assert (tmp_path / "markers.png").is_file() and (tmp_path / "markers.md").is_file()
