"""The two paths of the knn kernel (blocks over a Cuthill–McKee order, neighbour gathering) give
dense attention's result; which one runs depends on the graph's locality."""

import torch

from scrnalf_hf.modeling_scrnalf import (
    _knn_attention_blocked,
    _knn_attention_gathered,
    choose_gene_block_layout,
    default_gene_neighbors,
    dense_attention,
)


def random_graph(n_genes: int, k: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for gene in range(n_genes):
        others = torch.randperm(n_genes, generator=generator)
        rows.append(torch.cat([torch.tensor([gene]), others[others != gene][: k - 1]]))
    table = torch.stack(rows)
    table[::5, k // 2 :] = -1  # padding in some rows
    return table


def shuffled_window_graph(n_genes: int, k: int, seed: int) -> torch.Tensor:
    """A local graph whose genes are listed in a random panel order: only a reordering finds it."""
    relabel = torch.randperm(n_genes, generator=torch.Generator().manual_seed(seed))
    window = default_gene_neighbors(n_genes, k)
    table = torch.empty_like(window)
    table[relabel] = relabel[window]
    return table


def attention_inputs(n_genes: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    query, key, value = (torch.randn(2, 3, n_genes + 1, 4, generator=generator, requires_grad=True) for _ in range(3))
    key_mask = torch.rand(2, n_genes + 1, generator=generator) > 0.2
    key_mask[:, 0] = True
    return query, key, value, key_mask


def test_layout_is_chosen_for_local_graphs_and_refused_for_random_ones():
    assert choose_gene_block_layout(shuffled_window_graph(300, 8, seed=0)) is not None
    assert choose_gene_block_layout(random_graph(300, 8, seed=0)) is None


def test_blocked_and_gathered_knn_equal_dense_with_weights_and_gradients():
    n_genes, k = 150, 8
    graph = shuffled_window_graph(n_genes, k, seed=1)
    graph[::7, k - 2 :] = -1
    layout = choose_gene_block_layout(graph)
    assert layout is not None
    results = []
    for kernel in (
        lambda *a: _knn_attention_blocked(*a[:3], layout, *a[3:]),
        _knn_attention_gathered,
        dense_attention,
    ):
        query, key, value, key_mask = attention_inputs(n_genes, seed=2)
        output, weights = kernel(query, key, value, graph, key_mask, 0.0, True)
        (output.square().sum() + weights.sum()).backward()
        results.append((output, weights, query.grad, key.grad, value.grad))
    for result in results[:2]:
        for got, expected in zip(result, results[2]):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
