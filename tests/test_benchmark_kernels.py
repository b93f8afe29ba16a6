"""The knn kernel gives dense attention's result on any graph — local, local in a shuffled
panel order, or scattered — run eagerly or compiled; the C kernels give the PyTorch kernel's
outputs and gradients; and compiled and C forms fall back cleanly."""

import logging

import pytest
import torch

import scrnalf_hf.modeling_scrnalf as modeling
from scrnalf_hf.modeling_scrnalf import CompiledFunction, default_gene_neighbors, dense_attention, knn_attention


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
    """A local graph whose genes are listed in a random panel order."""
    relabel = torch.randperm(n_genes, generator=torch.Generator().manual_seed(seed))
    window = default_gene_neighbors(n_genes, k)
    table = torch.empty_like(window)
    table[relabel] = relabel[window]
    return table


def attention_inputs(n_genes: int, seed: int):
    """q, k, v (2, 1 + G, 3 heads, 4) token-major, and a key mask with unmeasured genes."""
    generator = torch.Generator().manual_seed(seed)
    query, key, value = (torch.randn(2, n_genes + 1, 3, 4, generator=generator, requires_grad=True) for _ in range(3))
    key_mask = torch.rand(2, n_genes + 1, generator=generator) > 0.2
    key_mask[:, 0] = True
    return query, key, value, key_mask


GRAPHS = {
    "window": lambda: default_gene_neighbors(150, 8),
    "shuffled window": lambda: shuffled_window_graph(150, 8, seed=1),
    "scattered": lambda: random_graph(150, 8, seed=0),
}


@pytest.mark.parametrize("graph_name", list(GRAPHS))
def test_knn_equals_dense_eager_and_compiled_with_weights_and_gradients(graph_name):
    graph = GRAPHS[graph_name]()
    kernels = {"eager": knn_attention, "compiled": CompiledFunction(knn_attention), "dense": dense_attention}
    results = {}
    for name, kernel in kernels.items():
        query, key, value, key_mask = attention_inputs(150, seed=2)
        output, weights = kernel(query, key, value, graph, key_mask, 0.0, True)
        (output.square().sum() + weights.sum()).backward()
        results[name] = (output, weights, query.grad, key.grad, value.grad)
    assert not kernels["compiled"].unavailable
    for name in ("eager", "compiled"):
        for got, expected in zip(results[name], results["dense"]):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_compiled_function_falls_back_to_eager_when_compilation_fails(monkeypatch, caplog):
    def broken_compile(function, **kwargs):
        def run(*args):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

        return run

    monkeypatch.setattr(modeling.torch, "compile", broken_compile)
    kernel = CompiledFunction(knn_attention)
    graph = random_graph(30, 4, seed=0)
    query, key, value, key_mask = attention_inputs(30, seed=0)
    with caplog.at_level(logging.WARNING):
        output, _ = kernel(query, key, value, graph, key_mask, 0.0, False)
    assert kernel.unavailable
    assert "no working C++ compiler" in caplog.text
    torch.testing.assert_close(output, knn_attention(query, key, value, graph, key_mask)[0])


def test_compiled_function_lets_the_callers_own_errors_through():
    def strict(value):
        raise ValueError("bad input")

    kernel = CompiledFunction(strict)
    with pytest.raises(ValueError, match="bad input"):
        kernel(torch.ones(2))
    assert not kernel.unavailable


needs_c_kernel = pytest.mark.skipif(
    not modeling.knn_kernel_available(4, 16, 16), reason="the C kNN kernel needs AVX-512 and a C compiler"
)


def c_kernel_inputs(heads: int, head_dim: int, generator: torch.Generator):
    """qkv (3 cells, 1 + 150 tokens, 3, heads, head_dim) and a key mask with unmeasured genes and
    one cell whose genes are all unmeasured (every gene then attends to CLS only)."""
    qkv = torch.randn(3, 151, 3, heads, head_dim, generator=generator)
    key_mask = torch.rand(3, 151, generator=generator) > 0.2
    key_mask[:, 0] = True
    key_mask[1, 1:] = False
    return qkv, key_mask


@needs_c_kernel
@pytest.mark.parametrize("graph_name", list(GRAPHS))
@pytest.mark.parametrize(("heads", "head_dim", "k"), [(4, 16, 8), (2, 32, 16), (1, 16, 5), (1, 8, 16), (3, 24, 8)])
def test_c_kernel_equals_the_pytorch_knn_kernel(graph_name, heads, head_dim, k):
    graph = GRAPHS[graph_name]()[:, :k].contiguous()
    qkv, key_mask = c_kernel_inputs(heads, head_dim, torch.Generator().manual_seed(3))
    query, key, value = qkv.unbind(2)
    expected, _ = knn_attention(query, key, value, graph, key_mask)
    got = torch.ops.scrnalf.knn_attention_c(qkv, graph, key_mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@needs_c_kernel
def test_models_on_the_c_kernels_match_eager_in_outputs_and_gradients():
    from scrnalf_hf import ScrnaLongformerConfig, ScrnaLongformerModel

    config = ScrnaLongformerConfig(n_genes=150, d_model=32, depth=2, n_heads=2, knn_k=8, hidden_dropout=0.0)
    compiled = ScrnaLongformerModel(config)
    compiled.set_gene_graph(random_graph(150, 8, seed=4))
    eager = ScrnaLongformerModel(ScrnaLongformerConfig(**{**config.to_dict(), "kernel_implementation": "eager"}))
    eager.load_state_dict(compiled.state_dict())
    expression = torch.rand(5, 150) * 4
    layer = compiled.encoder.layers[0]
    assert layer.uses_c_kernel(torch.zeros(1, 151, 32), compiled.gene_neighbors, False)
    assert not layer.uses_c_kernel(torch.zeros(1, 151, 32), compiled.gene_neighbors, True)  # attention weights asked
    with torch.no_grad():
        got, expected = compiled.eval()(expression), eager.eval()(expression)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.cell_embedding, expected.cell_embedding, rtol=1e-5, atol=1e-5)
    for model in (compiled.train(), eager.train()):
        output = model(expression)
        (output.cell_embedding.square().sum() + output.last_hidden_state[:, :7].sum()).backward()
    for (name, parameter), other in zip(compiled.named_parameters(), eager.parameters()):
        torch.testing.assert_close(parameter.grad, other.grad, rtol=1e-4, atol=1e-5, msg=lambda message: f"{name}: {message}")


@needs_c_kernel
def test_attention_dropout_in_training_runs_the_pytorch_kernel():
    from scrnalf_hf import ScrnaLongformerConfig, ScrnaLongformerModel

    model = ScrnaLongformerModel(ScrnaLongformerConfig(n_genes=40, d_model=32, depth=1, n_heads=2, knn_k=8, attention_dropout=0.1))
    layer = model.encoder.layers[0]
    assert not layer.train().uses_c_kernel(torch.zeros(1, 41, 32), model.gene_neighbors, False)
    assert layer.eval().uses_c_kernel(torch.zeros(1, 41, 32), model.gene_neighbors, False)


@needs_c_kernel
def test_c_dropout_masks_keep_the_expected_share_and_follow_the_seed():
    like = torch.empty(300_000)
    first = torch.ops.scrnalf.dropout_keep(like, 0.1, torch.tensor(7))
    assert first.dtype == torch.bool and first.shape == like.shape
    assert abs(first.float().mean().item() - 0.9) < 0.003
    assert torch.equal(first, torch.ops.scrnalf.dropout_keep(like, 0.1, torch.tensor(7)))
    assert not torch.equal(first, torch.ops.scrnalf.dropout_keep(like, 0.1, torch.tensor(8)))
    assert torch.ops.scrnalf.dropout_keep(like, 0.0, torch.tensor(7)).all()


@needs_c_kernel
def test_without_a_c_compiler_inference_warns_once_and_runs_the_pytorch_kernel(monkeypatch, tmp_path, caplog):
    import tempfile

    from scrnalf_hf import ScrnaLongformerConfig, ScrnaLongformerModel

    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(modeling, "_knn_kernels", {})
    model = ScrnaLongformerModel(ScrnaLongformerConfig(n_genes=40, d_model=32, depth=1, n_heads=2, knn_k=8)).eval()
    with caplog.at_level(logging.WARNING), torch.no_grad():
        first, second = model(torch.rand(2, 40)), model(torch.rand(2, 40))
    assert caplog.text.count("C kNN attention kernel could not be built") == 1
    assert modeling._knn_kernels == {(2, 16, 8): None}
    assert torch.isfinite(first.cell_embedding).all() and torch.isfinite(second.cell_embedding).all()


@needs_c_kernel
@pytest.mark.parametrize("graph_name", list(GRAPHS))
@pytest.mark.parametrize(("heads", "head_dim", "k"), [(4, 16, 8), (1, 8, 16), (3, 24, 8)])
def test_c_kernel_gradients_equal_the_pytorch_knn_kernels(graph_name, heads, head_dim, k):
    graph = GRAPHS[graph_name]()[:, :k].contiguous()
    generator = torch.Generator().manual_seed(5)
    qkv, key_mask = c_kernel_inputs(heads, head_dim, generator)
    upstream = torch.randn(3, 151, heads, head_dim, generator=generator)
    gradients = {}
    for name in ("pytorch", "c"):
        leaf = qkv.clone().requires_grad_(True)
        if name == "pytorch":
            output, _ = knn_attention(*leaf.unbind(2), graph, key_mask)
        else:
            output = torch.ops.scrnalf.knn_attention_c(leaf, graph, key_mask)
        (output * upstream).sum().backward()
        gradients[name] = leaf.grad
    torch.testing.assert_close(gradients["c"], gradients["pytorch"], rtol=1e-4, atol=1e-5)
