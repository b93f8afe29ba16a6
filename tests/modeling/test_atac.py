"""The RNA + ATAC model: the peak encoder attends along the genomic peak graph, RNA + ATAC runs
forward and backward, a cell without ATAC runs from RNA alone, and a classifier over peak tokens
alone learns a separable simulated problem."""

import numpy as np
import pytest
import torch

from scrnalf_hf import ScrnaLongformerConfig, ScrnaLongformerForCellClassification
from scrnalf_hf.data.atac import build_peak_graph, parse_peak_coordinates
from scrnalf_hf.data.simulation import simulate_multiome

N_GENES, N_PEAKS = 24, 30


def small_config(**overrides) -> ScrnaLongformerConfig:
    settings = dict(n_genes=N_GENES, d_model=16, depth=1, n_heads=2, knn_k=4, peak_knn_k=5, hidden_dropout=0.0,
                    kernel_implementation="eager", modalities={"atac": N_PEAKS}, num_labels=3)
    return ScrnaLongformerConfig(**{**settings, **overrides})


def random_peak_graph(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    names = [f"chr{c}:{s}-{s + 500}" for c, s in zip(rng.integers(1, 4, N_PEAKS), rng.choice(10**6, N_PEAKS, replace=False))]
    return build_peak_graph(parse_peak_coordinates(names), 5)


def test_a_peak_reaches_only_the_peaks_that_list_it_as_a_genomic_neighbour():
    torch.manual_seed(0)
    model = ScrnaLongformerForCellClassification(small_config()).eval()
    encoder = model.fusion.peak_encoder
    graph = random_peak_graph()
    encoder.set_peak_graph(graph)
    accessibility = (torch.rand(1, N_PEAKS) > 0.5).float()
    measured = torch.ones(1, N_PEAKS, dtype=torch.bool)
    flipped = accessibility.clone()
    flipped[0, 7] = 1 - flipped[0, 7]
    before = encoder(accessibility, measured).last_hidden_state[0, 1:]  # (P, d), one layer
    after = encoder(flipped, measured).last_hidden_state[0, 1:]
    changed = (before - after).abs().amax(-1) > 1e-6
    listing_seven = torch.from_numpy((graph == 7).any(1))
    assert changed.tolist() == listing_seven.tolist() and int(listing_seven.sum()) > 1


def test_rna_and_atac_run_forward_and_backward_and_a_cell_without_atac_runs_from_rna():
    torch.manual_seed(0)
    model = ScrnaLongformerForCellClassification(small_config())
    model.fusion.peak_encoder.set_peak_graph(random_peak_graph())
    expression = torch.rand(3, N_GENES) * 3
    accessibility = (torch.rand(3, N_PEAKS) > 0.5).float()
    peak_mask = torch.ones(3, N_PEAKS, dtype=torch.bool)
    peak_mask[2] = False  # the third cell has no ATAC
    output = model(expression, peak_accessibility=accessibility, peak_mask=peak_mask, labels=torch.tensor([0, 1, 2]))
    output.loss.backward()
    assert output.logits.shape == (3, 3) and torch.isfinite(output.logits).all()
    assert model.fusion.peak_encoder.embeddings.gene_embeddings.weight.grad.abs().sum() > 0
    model.eval()
    without_atac = model(expression[2:]).logits
    torch.testing.assert_close(model(expression[2:], peak_accessibility=accessibility[2:], peak_mask=peak_mask[2:]).logits,
                               without_atac)
    assert not torch.allclose(model(expression[:1], peak_accessibility=accessibility[:1]).logits, model(expression[:1]).logits)


def test_atac_inputs_are_checked():
    model = ScrnaLongformerForCellClassification(small_config()).eval()
    expression = torch.rand(2, N_GENES)
    with pytest.raises(ValueError, match="peak_accessibility must have shape"):
        model(expression, peak_accessibility=torch.zeros(2, N_PEAKS - 1))
    with pytest.raises(ValueError, match="binarised"):
        model(expression, peak_accessibility=torch.full((2, N_PEAKS), 3.0))
    rna_only = ScrnaLongformerForCellClassification(small_config(modalities=None))
    with pytest.raises(ValueError, match="reads no peaks"):
        rna_only(expression, peak_accessibility=torch.zeros(2, N_PEAKS))
    with pytest.raises(Exception, match="peak_names lists 2 peaks"):  # @strict wraps the ValueError
        small_config(peak_names=["chr1:1-2", "chr1:5-9"])


def test_a_classifier_over_peak_tokens_alone_learns_simulated_cell_types():
    """ATAC-only classification: the model's vocabulary is the peak panel and its graph the peak
    graph. Simulated cells (mechanics, not biology)."""
    torch.manual_seed(0)
    mdata = simulate_multiome(300, 100, 120, n_cell_types=3, seed=0)
    atac = mdata.mod["atac"]
    accessibility = torch.from_numpy((atac.X.toarray() > 0).astype(np.float32))
    labels = torch.from_numpy(atac.obs["cell_type"].cat.codes.to_numpy().astype(np.int64))
    config = ScrnaLongformerConfig(n_genes=120, d_model=16, depth=1, n_heads=2, knn_k=8, hidden_dropout=0.0,
                                   kernel_implementation="eager", num_labels=3)
    model = ScrnaLongformerForCellClassification(config)
    model.scrna_longformer.set_gene_graph(build_peak_graph(parse_peak_coordinates(atac.var_names, atac.var), 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train, test = slice(0, 200), slice(200, 300)
    for _ in range(15):
        for batch in torch.randperm(200).split(25):
            loss = model(accessibility[train][batch], labels=labels[train][batch]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(accessibility[test]).logits.argmax(-1) == labels[test]).float().mean().item()
    majority = np.bincount(labels[test].numpy()).max() / 100
    assert accuracy > majority + 0.25, (accuracy, majority)
