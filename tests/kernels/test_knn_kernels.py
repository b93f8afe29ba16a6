"""The knn kernel gives dense attention's result on any graph — local, local in a shuffled
panel order, or scattered — run eagerly or compiled; the C kernels give the PyTorch kernel's
outputs and gradients; the attention registry picks the C kernels exactly where they apply; and
compiled and C forms fall back cleanly, one model at a time."""

import logging

import pytest
import torch

import scrnalf_hf.kernels_scrnalf as kernels
from scrnalf_hf import ScrnaLongformerConfig, ScrnaLongformerModel
from scrnalf_hf.kernels_scrnalf import C_KNN_ATTENTION, CompiledFunction, c_kernels_available, custom_ops
from scrnalf_hf.modeling_scrnalf import (
    ATTENTION_FUNCTIONS,
    default_gene_neighbors,
    dense_attention,
    knn_attention,
    resolve_attention_function,
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
    """A local graph whose genes are listed in a random panel order."""
    relabel = torch.randperm(n_genes, generator=torch.Generator().manual_seed(seed))
    window = default_gene_neighbors(n_genes, k)
    table = torch.empty_like(window)
    table[relabel] = relabel[window]
    return table


def attention_inputs(n_genes: int, seed: int):
    """qkv (2, 1 + G, 3, 3 heads, 4) token-major, requiring gradients, and a key mask with
    unmeasured genes."""
    generator = torch.Generator().manual_seed(seed)
    qkv = torch.randn(2, n_genes + 1, 3, 3, 4, generator=generator, requires_grad=True)
    key_mask = torch.rand(2, n_genes + 1, generator=generator) > 0.2
    key_mask[:, 0] = True
    return qkv, key_mask


GRAPHS = {
    "window": lambda: default_gene_neighbors(150, 8),
    "shuffled window": lambda: shuffled_window_graph(150, 8, seed=1),
    "scattered": lambda: random_graph(150, 8, seed=0),
}


@pytest.mark.parametrize("graph_name", list(GRAPHS))
def test_knn_equals_dense_eager_and_compiled_with_weights_and_gradients(graph_name):
    graph = GRAPHS[graph_name]()
    functions = {"eager": knn_attention, "compiled": CompiledFunction(knn_attention), "dense": dense_attention}
    results = {}
    for name, function in functions.items():
        qkv, key_mask = attention_inputs(150, seed=2)
        output, weights = function(qkv, graph, key_mask, 0.0, True)
        (output.square().sum() + weights.square().sum()).backward()
        results[name] = (output, weights, qkv.grad)
    assert not functions["compiled"].unavailable
    for name in ("eager", "compiled"):
        for got, expected in zip(results[name], results["dense"]):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_compiled_function_falls_back_to_eager_when_compilation_fails(monkeypatch, caplog):
    def broken_compile(function, **kwargs):
        def run(*args):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

        return run

    monkeypatch.setattr(kernels.torch, "compile", broken_compile)
    function = CompiledFunction(knn_attention)
    graph = random_graph(30, 4, seed=0)
    qkv, key_mask = attention_inputs(30, seed=0)
    with caplog.at_level(logging.WARNING):
        output, _ = function(qkv, graph, key_mask, 0.0, False)
        function(qkv, graph, key_mask, 0.0, False)
    assert function.unavailable
    assert caplog.text.count("no working C++ compiler") == 1
    torch.testing.assert_close(output, knn_attention(qkv, graph, key_mask)[0])


def test_compiled_function_lets_the_callers_own_errors_through():
    def strict(value):
        raise ValueError("bad input")

    function = CompiledFunction(strict)
    with pytest.raises(ValueError, match="bad input"):
        function(torch.ones(2))
    assert not function.unavailable


def compiled_wrappers(model: ScrnaLongformerModel) -> list[CompiledFunction]:
    return [model.compiled_embeddings, model.compiled_pool_and_normalize, model.encoder.layers[0].compiled_forward]


def test_a_compile_failure_makes_only_that_model_eager(monkeypatch, caplog):
    config = ScrnaLongformerConfig(n_genes=40, d_model=32, depth=2, n_heads=2, knn_k=8, hidden_dropout=0.0)
    broken, healthy = ScrnaLongformerModel(config).eval(), ScrnaLongformerModel(config).eval()
    healthy.load_state_dict(broken.state_dict())
    assert broken.encoder.layers[0].compiled_forward is broken.encoder.layers[1].compiled_forward
    assert broken.encoder.layers[0].compiled_forward is not healthy.encoder.layers[0].compiled_forward
    real_compile = torch.compile

    def broken_compile(function, **kwargs):
        def run(*args):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

        return run

    expression = torch.rand(3, 40)
    monkeypatch.setattr(kernels.torch, "compile", broken_compile)
    with caplog.at_level(logging.WARNING), torch.no_grad():
        broken_output = broken(expression).last_hidden_state
        warnings = caplog.text.count("no working C++ compiler")
        broken(expression)
    assert 1 <= warnings <= 3 and caplog.text.count("no working C++ compiler") == warnings
    assert all(wrapper.unavailable for wrapper in compiled_wrappers(broken))
    monkeypatch.setattr(kernels.torch, "compile", real_compile)
    with torch.no_grad():
        healthy_output = healthy(expression).last_hidden_state
    assert not any(wrapper.unavailable for wrapper in compiled_wrappers(healthy))
    assert all(wrapper.compiled is not None for wrapper in compiled_wrappers(healthy))
    torch.testing.assert_close(broken_output, healthy_output, rtol=1e-5, atol=1e-5)


def test_a_model_copy_compiles_anew_and_keeps_its_state():
    import copy

    model = ScrnaLongformerModel(ScrnaLongformerConfig(n_genes=40, d_model=32, depth=2, n_heads=2, knn_k=8)).eval()
    with torch.no_grad():
        expected = model(torch.ones(2, 40)).last_hidden_state
    copied = copy.deepcopy(model)
    wrapper = copied.encoder.layers[0].compiled_forward
    assert wrapper is not model.encoder.layers[0].compiled_forward and wrapper.compiled is None
    assert copied.encoder.layers[1].compiled_forward is wrapper  # still shared by the copy's layers
    with torch.no_grad():
        torch.testing.assert_close(copied(torch.ones(2, 40)).last_hidden_state, expected)


needs_c_kernel = pytest.mark.skipif(
    kernels.kernel_library(4, 16, 16) is None, reason="the C kNN kernel needs AVX-512 and a C compiler"
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
    expected, _ = knn_attention(qkv, graph, key_mask)
    got = custom_ops().knn_attention_c(qkv, graph, key_mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


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
            output, _ = knn_attention(leaf, graph, key_mask)
        else:
            output = custom_ops().knn_attention_c(leaf, graph, key_mask)
        (output * upstream).sum().backward()
        gradients[name] = leaf.grad
    torch.testing.assert_close(gradients["c"], gradients["pytorch"], rtol=1e-4, atol=1e-5)


@needs_c_kernel
def test_models_on_the_c_kernels_match_eager_in_outputs_and_gradients():
    torch.manual_seed(0)
    config = ScrnaLongformerConfig(n_genes=150, d_model=32, depth=2, n_heads=2, knn_k=8, hidden_dropout=0.0)
    compiled = ScrnaLongformerModel(config)
    compiled.set_gene_graph(random_graph(150, 8, seed=4))
    eager = ScrnaLongformerModel(ScrnaLongformerConfig(**{**config.to_dict(), "kernel_implementation": "eager"}))
    eager.load_state_dict(compiled.state_dict())
    expression = torch.rand(5, 150) * 4
    assert compiled.attention_function(False) is C_KNN_ATTENTION
    assert compiled.attention_function(True).name == "knn"  # attention weights asked for
    assert eager.attention_function(False).name == "knn"
    with torch.no_grad():
        got, expected = compiled.eval()(expression), eager.eval()(expression)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.cell_embedding, expected.cell_embedding, rtol=1e-5, atol=1e-5)
    for model in (compiled.train(), eager.train()):
        output = model(expression)
        (output.cell_embedding.square().sum() + output.last_hidden_state[:, :7].sum()).backward()
    for (name, parameter), other in zip(compiled.named_parameters(), eager.parameters()):
        # Gradients are sums over 5 cells × 151 tokens, accumulated in another order: float rounding.
        torch.testing.assert_close(parameter.grad, other.grad, rtol=1e-4, atol=1e-4, msg=lambda message, name=name: f"{name}: {message}")


def uses_c_kernel_before(config, device, dtype, training, output_attentions, k) -> bool:
    """When the C kernels ran before the registry existed (``ScrnaLongformerLayer.uses_c_kernel``
    of the model file that held them), on a CPU where they build."""
    return (
        config.kernel_implementation == "compiled"
        and config.attention_type == "knn"
        and not output_attentions
        and not (training and config.attention_dropout > 0)
        and device.type == "cpu"
        and dtype == torch.float32
        and k <= 16
    )


@needs_c_kernel
def test_the_registry_picks_the_c_kernels_exactly_where_they_ran_before():
    checked = 0
    for kernel_implementation in ("compiled", "eager"):
        for attention_type in ("knn", "dense", "linear"):
            for attention_dropout in (0.0, 0.1):
                config = ScrnaLongformerConfig(
                    n_genes=40, d_model=32, n_heads=2, knn_k=8, attention_type=attention_type,
                    kernel_implementation=kernel_implementation, attention_dropout=attention_dropout,
                )
                for device in (torch.device("cpu"), torch.device("cuda")):
                    for dtype in (torch.float32, torch.float64, torch.bfloat16):
                        for training in (False, True):
                            for output_attentions in (False, True):
                                for k in (8, 16, 17):
                                    settings = (config, device, dtype, training, output_attentions, k)
                                    resolved = resolve_attention_function(*settings)
                                    assert (resolved is C_KNN_ATTENTION) == uses_c_kernel_before(*settings), settings
                                    if resolved is not C_KNN_ATTENTION:
                                        assert resolved.name == attention_type
                                    checked += 1
    assert checked == 2 * 3 * 2 * 2 * 3 * 2 * 2 * 3
    assert [function.name for function in ATTENTION_FUNCTIONS] == ["knn-c", "knn", "dense", "linear"]
    # Around the C kernels the compiled layer code is elementwise and runs on every thread.
    assert [function.multithreaded_graphs for function in ATTENTION_FUNCTIONS] == [True, False, False, False]


@needs_c_kernel
def test_c_dropout_masks_keep_the_expected_share_and_follow_the_seed():
    like = torch.empty(300_000)
    ops = custom_ops()
    first = ops.dropout_keep(like, 0.1, torch.tensor(7))
    assert first.dtype == torch.bool and first.shape == like.shape
    assert abs(first.float().mean().item() - 0.9) < 0.003
    assert torch.equal(first, ops.dropout_keep(like, 0.1, torch.tensor(7)))
    assert not torch.equal(first, ops.dropout_keep(like, 0.1, torch.tensor(8)))
    assert ops.dropout_keep(like, 0.0, torch.tensor(7)).all()


@needs_c_kernel
def test_compiled_training_draws_dropout_masks_with_the_c_kernel(monkeypatch):
    library = kernels.kernel_library(*kernels._DROPOUT_LIBRARY)
    calls = []
    draw = library.dropout_keep
    monkeypatch.setattr(library, "dropout_keep", lambda *args: calls.append(args[1]) or draw(*args))
    config = ScrnaLongformerConfig(n_genes=40, d_model=32, depth=1, n_heads=2, knn_k=8, hidden_dropout=0.2)
    model = ScrnaLongformerModel(config).train()
    assert model.attention_function(False) is C_KNN_ATTENTION
    model(torch.rand(2, 40)).last_hidden_state.sum().backward()
    # The embeddings (2 x 41 x 32 values) and the layer's attention and feed-forward residuals.
    assert calls == [2 * 41 * 32] * 3


@needs_c_kernel
def test_without_a_c_compiler_inference_warns_once_and_runs_the_pytorch_kernel(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("SCRNALF_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(kernels, "_LIBRARIES", {})
    model = ScrnaLongformerModel(ScrnaLongformerConfig(n_genes=40, d_model=32, depth=1, n_heads=2, knn_k=8)).eval()
    with caplog.at_level(logging.WARNING), torch.no_grad():
        first, second = model(torch.rand(2, 40)), model(torch.rand(2, 40))
    assert caplog.text.count("C kNN attention kernel could not be built") == 1
    assert kernels._LIBRARIES == {(2, 16, 8): None}
    assert model.attention_function(False).name == "knn"
    assert torch.isfinite(first.cell_embedding).all() and torch.isfinite(second.cell_embedding).all()


def test_c_kernels_report_their_availability():
    assert c_kernels_available() == (kernels.kernel_library(*kernels._DROPOUT_LIBRARY) is not None)


def test_a_model_serves_several_threads_at_once():
    """The compiled wrappers are built under a lock on first use, by whichever thread comes first."""
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(0)
    config = ScrnaLongformerConfig(n_genes=40, d_model=32, depth=2, n_heads=2, knn_k=8, hidden_dropout=0.0)
    model = ScrnaLongformerModel(config).eval()
    reference = ScrnaLongformerModel(ScrnaLongformerConfig(**{**config.to_dict(), "kernel_implementation": "eager"}))
    reference.load_state_dict(model.state_dict())
    cells = [torch.rand(2, 40) * 4 for _ in range(6)]
    with ThreadPoolExecutor(max_workers=3) as pool, torch.no_grad():
        outputs = list(pool.map(lambda expression: model(expression).last_hidden_state, cells))
    assert not any(wrapper.unavailable for wrapper in compiled_wrappers(model))
    with torch.no_grad():
        for expression, output in zip(cells, outputs):
            torch.testing.assert_close(output, reference.eval()(expression).last_hidden_state, rtol=1e-5, atol=1e-5)


@needs_c_kernel
def test_a_second_copy_of_the_kernels_file_reuses_the_registered_ops():
    """A checkpoint's remote-code copy of kernels_scrnalf.py imported beside the package: its ops
    are the ones already registered, and its C kernel entry computes the same attention."""
    import importlib.util

    specification = importlib.util.spec_from_file_location("remote_copy_of_kernels", kernels.__file__)
    copy = importlib.util.module_from_spec(specification)
    specification.loader.exec_module(copy)
    assert copy.custom_ops() is custom_ops()
    config = ScrnaLongformerConfig(n_genes=150, d_model=32, n_heads=2, knn_k=8)
    assert copy.C_KNN_ATTENTION.supports(config, torch.device("cpu"), torch.float32, False, False, 8)
    qkv, key_mask = c_kernel_inputs(2, 16, torch.Generator().manual_seed(6))
    graph = GRAPHS["scattered"]()
    expected, _ = knn_attention(qkv, graph, key_mask)
    torch.testing.assert_close(copy.C_KNN_ATTENTION(qkv, graph, key_mask, 0.0, False)[0], expected, rtol=1e-5, atol=1e-6)


def test_running_under_a_dispatch_mode_does_not_stop_later_compilation():
    """torch.compile declines to run under a Python dispatch mode (a memory tracer, say) and then
    never compiles that function again in the process; such calls must run eagerly instead."""
    from torch._dynamo.utils import counters
    from torch.utils._python_dispatch import TorchDispatchMode

    class Tracer(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    def shifted_sine(values):
        return torch.sin(values) + 1

    function = CompiledFunction(shifted_sine)
    with Tracer():
        traced = function(torch.ones(3))
    compiled_before = counters["frames"]["ok"]
    torch.testing.assert_close(function(torch.ones(3)), traced)
    assert counters["frames"]["ok"] == compiled_before + 1
    assert not function.unavailable
