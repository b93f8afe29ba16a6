"""The model: Auto classes, kNN == dense, sparse memory, masking, heads, losses, loading across heads
and bad input."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

import scrnalf_hf  # noqa: F401  (registers the Auto classes)
from scrnalf_hf import (
    ScrnaLongformerConfig,
    ScrnaLongformerForCellClassification,
    ScrnaLongformerForMaskedGeneModeling,
    ScrnaLongformerForTrajectory,
    ScrnaLongformerModel,
)
from scrnalf_hf.modeling_scrnalf import linear_attention


def small_config(**overrides) -> ScrnaLongformerConfig:
    settings = dict(
        n_genes=48, d_model=16, depth=2, n_heads=2, knn_k=6, hidden_dropout=0.0, id2label={0: "B", 1: "T", 2: "NK"}
    )
    settings.update(overrides)
    return ScrnaLongformerConfig(**settings)


def random_graph(n_genes: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """A random (G, k) table: itself first, random distinct neighbours, and -1 padding in some rows."""
    rows = []
    for gene in range(n_genes):
        others = [g for g in torch.randperm(n_genes, generator=generator).tolist() if g != gene]
        n_real = int(torch.randint(1, k + 1, (1,), generator=generator))
        rows.append([gene] + others[: n_real - 1] + [-1] * (k - n_real))
    return torch.tensor(rows)


def test_auto_classes_resolve_to_project_classes():
    config = AutoConfig.for_model("scrna_longformer", n_genes=20, d_model=8, n_heads=2, knn_k=4)
    assert isinstance(config, ScrnaLongformerConfig)
    assert type(AutoModel.from_config(config)) is ScrnaLongformerModel
    assert type(AutoModelForMaskedLM.from_config(config)) is ScrnaLongformerForMaskedGeneModeling
    assert type(AutoModelForSequenceClassification.from_config(config)) is ScrnaLongformerForCellClassification


@pytest.mark.parametrize(("seed", "implementation"), [(0, "compiled"), (0, "eager"), (1, "eager"), (2, "compiled")])
def test_knn_matches_dense_forward_and_backward_with_cls_and_padding(seed, implementation):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    config = small_config(kernel_implementation=implementation)
    model = ScrnaLongformerForCellClassification(config).eval()
    model.scrna_longformer.set_gene_graph(random_graph(config.n_genes, config.knn_k, generator))
    expression = torch.rand(4, config.n_genes, generator=generator) * 6
    attention_mask = (torch.rand(4, config.n_genes, generator=generator) > 0.3).long()
    labels = torch.tensor([0, 1, 2, 1])

    results = {}
    for attention_type in ("knn", "dense"):
        model.config.attention_type = attention_type
        model.zero_grad()
        output = model(expression, attention_mask=attention_mask, labels=labels, output_attentions=True)
        output.loss.backward()
        gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results[attention_type] = (output, gradients)

    knn, dense = results["knn"], results["dense"]
    torch.testing.assert_close(knn[0].logits, dense[0].logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(knn[0].cell_embedding, dense[0].cell_embedding, rtol=1e-5, atol=1e-5)
    for layer_knn, layer_dense in zip(knn[0].attentions, dense[0].attentions):
        assert layer_knn.shape == (4, config.n_heads, config.n_genes, config.knn_k + 1)
        torch.testing.assert_close(layer_knn, layer_dense, rtol=1e-5, atol=1e-6)
    assert knn[1].keys() == dense[1].keys() and len(knn[1]) > 10
    for name in knn[1]:
        torch.testing.assert_close(knn[1][name], dense[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_attention_never_reaches_unmeasured_genes_or_padding():
    torch.manual_seed(0)
    config = small_config(depth=1)
    model = ScrnaLongformerModel(config).eval()
    graph = random_graph(config.n_genes, config.knn_k, torch.Generator().manual_seed(3))
    model.set_gene_graph(graph)
    attention_mask = torch.ones(2, config.n_genes, dtype=torch.long)
    attention_mask[:, ::3] = 0
    with torch.no_grad():
        output = model(torch.rand(2, config.n_genes), attention_mask=attention_mask, output_attentions=True)
    weights = output.attentions[0]
    neighbor_weights = weights[..., :-1]  # (b, h, G, k)
    unmeasured = (attention_mask[:, graph.clamp(min=0)] == 0) | (graph < 0)  # (b, G, k)
    assert float(neighbor_weights.masked_select(unmeasured[:, None].expand_as(neighbor_weights)).abs().max()) == 0.0
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operator produces, and every tensor with two or more
    dimensions of at least ``n_genes`` (a gene × gene tensor)."""

    def __init__(self, n_genes: int):
        super().__init__()
        self.n_genes = n_genes
        self.largest = 0
        self.largest_shape = None
        self.gene_by_gene_shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(tensor, torch.Tensor) and tensor.numel() > self.largest:
                self.largest, self.largest_shape = tensor.numel(), tuple(tensor.shape)
            if isinstance(tensor, torch.Tensor) and sum(size >= self.n_genes for size in tensor.shape) >= 2:
                self.gene_by_gene_shapes.append(tuple(tensor.shape))
        return result


@pytest.mark.parametrize("graph", ["window", "scattered"])
def test_knn_forward_at_16000_genes_allocates_only_order_g_k_d(graph):
    """A local window graph and neighbours scattered over the whole panel cost the same. The
    eager kernel is tracked, as it materialises every intermediate; the compiled one fuses the
    gathers away and so allocates less."""
    n_genes, k, d_model = 16_000, 16, 32
    config = ScrnaLongformerConfig(
        n_genes=n_genes, d_model=d_model, depth=1, n_heads=2, knn_k=k, mlp_ratio=2, kernel_implementation="eager"
    )
    model = ScrnaLongformerModel(config).eval()
    if graph == "scattered":
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(n_genes - 1, generator=torch.Generator().manual_seed(0))[: k - 1] + 1])
        model.set_gene_graph((torch.arange(n_genes).unsqueeze(1) + offsets) % n_genes)
    expression = torch.rand(1, n_genes)
    with torch.inference_mode(), LargestTensor(n_genes) as tracker:
        model(expression)
    bound = 2 * (n_genes + 1) * k * d_model  # O(G·k·d), batch 1, with a factor of 2 of slack
    assert tracker.largest <= bound, f"largest tensor {tracker.largest_shape} has {tracker.largest:,} elements"
    assert tracker.gene_by_gene_shapes == []


def test_memory_tracker_catches_the_dense_gene_by_gene_mask():
    """The tracker above can fail: dense attention does build a (1 + G)² tensor."""
    n_genes = 1_000
    config = ScrnaLongformerConfig(n_genes=n_genes, d_model=16, depth=1, n_heads=2, knn_k=8, attention_type="dense")
    model = ScrnaLongformerModel(config).eval()
    with torch.inference_mode(), LargestTensor(n_genes) as tracker:
        model(torch.rand(1, n_genes))
    assert tracker.largest >= n_genes * n_genes
    assert (1, 1, n_genes + 1, n_genes + 1) in tracker.gene_by_gene_shapes


def test_linear_attention_equals_explicit_kernel_attention():
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 11, 3, 3, 4, generator=generator)  # (b, T, 3, h, dh)
    query, key, value = qkv.unbind(2)
    key_mask = torch.ones(2, 11, dtype=torch.bool)
    key_mask[1, 5:] = False
    output, weights = linear_attention(qkv, torch.zeros(10, 2, dtype=torch.long), key_mask)
    q, k, v = (tensor.transpose(1, 2) for tensor in (query, key, value))  # (b, h, T, dh)
    similarity = (torch.nn.functional.elu(q) + 1) @ (torch.nn.functional.elu(k) + 1).transpose(-1, -2)
    similarity = similarity * key_mask[:, None, None, :]
    expected = ((similarity / similarity.sum(-1, keepdim=True)) @ v).transpose(1, 2)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    assert weights is None
    with pytest.raises(ValueError, match="linear"):
        linear_attention(qkv, torch.zeros(10, 2, dtype=torch.long), key_mask, output_attentions=True)


def test_linear_model_trains():
    torch.manual_seed(0)
    model = ScrnaLongformerForCellClassification(small_config(attention_type="linear"))
    output = model(torch.rand(3, 48), labels=torch.tensor([0, 1, 2]))
    output.loss.backward()
    assert torch.isfinite(output.loss) and model.classifier.weight.grad.abs().sum() > 0


def test_masked_gene_modelling_hides_masked_values_from_the_input():
    torch.manual_seed(0)
    config = small_config()
    model = ScrnaLongformerForMaskedGeneModeling(config).eval()
    expression = torch.rand(2, config.n_genes) * 4
    masked = torch.zeros(2, config.n_genes, dtype=torch.bool)
    masked[:, 5:15] = True
    changed = expression.clone()
    changed[masked] = changed[masked] + 3.0  # change only the hidden values
    first = model(expression, masked_positions=masked, labels=expression)
    second = model(changed, masked_positions=masked, labels=expression)
    torch.testing.assert_close(first.logits, second.logits)
    torch.testing.assert_close(first.loss, second.loss)
    # and the unmasked values do reach the model
    unmasked_change = expression.clone()
    unmasked_change[:, 30] += 3.0
    assert not torch.allclose(model(unmasked_change, masked_positions=masked).logits, first.logits)


def test_masked_gene_modelling_scores_only_masked_genes():
    torch.manual_seed(0)
    config = small_config()
    model = ScrnaLongformerForMaskedGeneModeling(config).eval()
    expression = torch.rand(2, config.n_genes)
    masked = torch.zeros(2, config.n_genes, dtype=torch.bool)
    masked[:, :4] = True
    labels = expression.clone()
    loss = model(expression, masked_positions=masked, labels=labels).loss
    labels[:, 10:] += 100.0  # unscored genes
    torch.testing.assert_close(model(expression, masked_positions=masked, labels=labels).loss, loss)
    labels[:, 0] += 100.0  # a scored gene
    assert model(expression, masked_positions=masked, labels=labels).loss > loss + 100


@pytest.mark.parametrize(
    "attention_type, kernel_implementation",
    [("knn", "eager"), ("knn", "compiled"), ("dense", "eager"), ("linear", "eager")],
)
def test_training_on_masked_genes_only_gives_the_full_loss_and_gradients(attention_type, kernel_implementation):
    """In training mode the last layer and the head run at the masked genes only (the compiled
    knn case runs on the C kernels where they build); loss and every gradient must equal the
    full forward's, and the masked genes' predictions too."""
    torch.manual_seed(0)
    config = small_config(
        n_genes=40, d_model=32, n_heads=2, knn_k=8, attention_type=attention_type,
        kernel_implementation=kernel_implementation,
    )
    model = ScrnaLongformerForMaskedGeneModeling(config).train()
    model.scrna_longformer.set_gene_graph(random_graph(40, 8, torch.Generator().manual_seed(1)))
    expression = torch.rand(3, 40) * 4
    attention_mask = torch.ones(3, 40, dtype=torch.long)
    attention_mask[1, 30:] = 0
    masked = (torch.rand(3, 40, generator=torch.Generator().manual_seed(2)) < 0.15) & attention_mask.bool()
    masked[2] = False  # a cell with nothing to score
    results = {}
    for predict_all_genes in (True, None):
        model.zero_grad()
        output = model(
            expression, attention_mask=attention_mask, masked_positions=masked, labels=expression,
            predict_all_genes=predict_all_genes,
        )
        output.loss.backward()
        gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results[predict_all_genes] = output, gradients
    (full, full_gradients), (sparse, sparse_gradients) = results[True], results[None]
    assert sparse.cell_embedding is None and full.cell_embedding is not None
    assert torch.isnan(sparse.logits[~masked]).all()
    torch.testing.assert_close(sparse.logits[masked], full.logits[masked], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse.loss, full.loss, rtol=1e-5, atol=1e-6)
    assert sparse_gradients.keys() == full_gradients.keys() == {name for name, _ in model.named_parameters()}
    for name in full_gradients:
        torch.testing.assert_close(sparse_gradients[name], full_gradients[name], rtol=1e-4, atol=1e-6, msg=name)


def test_masked_gene_modelling_predicts_every_gene_outside_training():
    model = ScrnaLongformerForMaskedGeneModeling(small_config()).eval()
    output = model(torch.rand(2, 48))
    assert output.logits.shape == (2, 48) and torch.isfinite(output.logits).all()
    assert output.cell_embedding.shape == (2, 16)


def test_class_weights_change_the_classification_loss():
    torch.manual_seed(0)
    unweighted = ScrnaLongformerForCellClassification(small_config()).eval()
    weighted = ScrnaLongformerForCellClassification(small_config(class_weights=[1.0, 1.0, 10.0])).eval()
    weighted.load_state_dict(unweighted.state_dict())
    expression, labels = torch.rand(6, 48), torch.tensor([0, 1, 2, 0, 1, 2])
    logits = unweighted(expression).logits
    expected = torch.nn.functional.cross_entropy(logits, labels, weight=torch.tensor([1.0, 1.0, 10.0]))
    torch.testing.assert_close(weighted(expression, labels=labels).loss, expected)
    assert not torch.allclose(unweighted(expression, labels=labels).loss, expected)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = ScrnaLongformerForCellClassification(small_config())
    expression, labels = torch.rand(3, 48), torch.tensor([0, 1, 2])
    model(expression, labels=labels).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(plain) > 10
    model.zero_grad()
    model.activation_checkpointing_enable()
    assert model.scrna_longformer.encoder.layers[0].gradient_checkpointing
    model(expression, labels=labels).loss.backward()
    for name, gradient in plain.items():
        torch.testing.assert_close(model.get_parameter(name).grad, gradient, msg=name)


def test_a_fresh_model_runs_with_its_default_gene_graph():
    model = AutoModel.from_config(small_config())
    graph = model.gene_neighbors
    assert graph.shape == (48, 6)
    assert all(gene in graph[gene].tolist() for gene in range(48))
    output = model(torch.rand(2, 48))
    assert output.last_hidden_state.shape == (2, 49, 16) and output.cell_embedding.shape == (2, 16)


def test_gene_graph_is_saved_and_loaded_with_the_weights(tmp_path):
    model = ScrnaLongformerForCellClassification(small_config()).eval()
    graph = random_graph(48, 6, torch.Generator().manual_seed(7))
    model.scrna_longformer.set_gene_graph(graph)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.scrna_longformer.gene_neighbors, graph)
    expression = torch.rand(2, 48)
    torch.testing.assert_close(loaded(expression).logits, model(expression).logits)


@pytest.mark.parametrize(
    ("expression", "error", "message"),
    [
        (torch.ones(2, 48, dtype=torch.long), TypeError, "floating-point"),
        (torch.ones(2, 47), ValueError, r"shape \(batch, n_genes=48\)"),
        (torch.ones(48), ValueError, "shape"),
        (torch.full((2, 48), float("nan")), ValueError, "NaN"),
        (torch.full((2, 48), float("inf")), ValueError, "infinite"),
        (-torch.ones(2, 48), ValueError, "negative"),
    ],
)
def test_bad_expression_is_rejected_with_a_named_problem(expression, error, message):
    model = ScrnaLongformerModel(small_config())
    with pytest.raises(error, match=message):
        model(expression)


@pytest.mark.parametrize(
    ("graph", "message"),
    [
        (torch.full((48, 6), 48), "out of range"),
        (torch.full((48, 6), -2), "out of range"),
        (torch.zeros(48, 5, dtype=torch.long), "shape"),
        (torch.zeros(48, 6), "integers"),
        (torch.tensor([[0, 1, 1, 2, 3, 4]] * 48), "same neighbour twice"),
    ],
)
def test_bad_gene_graph_is_rejected(graph, message):
    model = ScrnaLongformerModel(small_config())
    with pytest.raises(ValueError, match=message):
        model.set_gene_graph(graph)


def test_bad_labels_and_masks_are_rejected():
    model = ScrnaLongformerForCellClassification(small_config())
    with pytest.raises(ValueError, match="class ids"):
        model(torch.rand(2, 48), labels=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.rand(2, 48), attention_mask=torch.ones(2, 40))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(d_model=10, n_heads=3), "multiple of n_heads"),
        (dict(mask_ratio=1.5), "mask_ratio"),
        (dict(class_weights=[1.0]), "class_weights"),
    ],
)
def test_bad_config_is_rejected(overrides, message):
    with pytest.raises(Exception, match=message):
        small_config(**overrides)


def test_inference_in_chunks_of_cells_equals_the_whole_batch(monkeypatch):
    """Without gradients the batch runs in cache-sized chunks of cells; every output, per layer
    included, is the whole-batch forward's, in the same order."""
    import scrnalf_hf.modeling_scrnalf as modeling

    torch.manual_seed(0)
    config = small_config(kernel_implementation="eager")
    model = ScrnaLongformerModel(config).eval()
    expression = torch.rand(5, config.n_genes) * 4
    attention_mask = (torch.rand(5, config.n_genes) > 0.2).long()
    whole = model(expression, attention_mask=attention_mask, output_attentions=True, output_hidden_states=True)
    widest = max(3 * config.d_model, config.intermediate_size)
    monkeypatch.setattr(modeling, "_INFERENCE_CHUNK_FLOATS", 2 * (config.n_genes + 1) * widest)
    assert model.inference_chunk_cells() == 2
    with torch.no_grad():
        chunked = model(expression, attention_mask=attention_mask, output_attentions=True, output_hidden_states=True)
    for name in ("last_hidden_state", "cell_embedding"):
        torch.testing.assert_close(chunked[name], whole[name].detach(), rtol=1e-5, atol=1e-6)
    for key in ("hidden_states", "attentions"):
        assert len(chunked[key]) == len(whole[key])
        for got, expected in zip(chunked[key], whole[key]):
            torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-6)


MODEL_CLASSES = (
    ScrnaLongformerModel, ScrnaLongformerForMaskedGeneModeling, ScrnaLongformerForCellClassification, ScrnaLongformerForTrajectory,
)


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
@pytest.mark.parametrize("keyword", ["protein", "batch_ids"])
def test_unknown_keyword_arguments_are_rejected_by_name(model_class, keyword):
    model = model_class(small_config())
    with pytest.raises(TypeError, match=keyword):
        model(torch.rand(2, 48), **{keyword: torch.zeros(2)})


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_species_are_refused_by_a_model_without_species_and_required_by_one_with_several(model_class):
    with pytest.raises(ValueError, match="knows no species"):
        model_class(small_config())(torch.rand(2, 48), species=torch.zeros(2, dtype=torch.long))
    two = model_class(small_config(species=["human", "mouse"]))
    with pytest.raises(ValueError, match=r"knows the species \['human', 'mouse'\]"):
        two(torch.rand(2, 48))
    with pytest.raises(ValueError, match=r"species ids must lie in \[0, 2\)"):
        two(torch.rand(2, 48), species=torch.tensor([0, 2]))


def test_species_adapters_start_as_the_identity_and_learn_per_species():
    """Zero-initialised species token and adapter: a fresh two-species model reads a cell the same
    whichever species it is said to be; after a step on human cells only, the mouse adapter is
    untouched and the two differ."""
    torch.manual_seed(0)
    model = ScrnaLongformerForCellClassification(small_config(species=["human", "mouse"], hidden_dropout=0.0)).eval()
    expression = torch.rand(3, 48)
    human = model(expression, species=torch.zeros(3, dtype=torch.long)).logits
    mouse = model(expression, species=torch.ones(3, dtype=torch.long)).logits
    torch.testing.assert_close(human, mouse)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(expression, species=torch.zeros(3, dtype=torch.long), labels=torch.tensor([0, 1, 0])).loss.backward()
    scale = model.scrna_longformer.embeddings.species_scale.weight
    assert scale.grad[0].abs().sum() > 0 and scale.grad[1].abs().sum() == 0
    optimizer.step()
    model.eval()
    assert not torch.allclose(
        model(expression, species=torch.zeros(3, dtype=torch.long)).logits,
        model(expression, species=torch.ones(3, dtype=torch.long)).logits,
    )


def test_labels_without_masked_positions_are_rejected():
    model = ScrnaLongformerForMaskedGeneModeling(small_config())
    expression = torch.rand(2, 48)
    with pytest.raises(ValueError, match="masked_positions"):
        model(expression, labels=expression)


def test_only_a_model_with_a_mask_token_takes_masked_positions():
    config = small_config()
    masked = torch.zeros(2, 48, dtype=torch.bool)
    masked[:, ::4] = True
    for model in (ScrnaLongformerModel(config), ScrnaLongformerForCellClassification(config).scrna_longformer):
        assert model.embeddings.mask_embedding is None
        with pytest.raises(ValueError, match="no mask token"):
            model(torch.rand(2, 48), masked_positions=masked)
    with_mask_token = ScrnaLongformerModel(config, use_mask_token=True).eval()
    assert with_mask_token.embeddings.mask_embedding.shape == (16,)
    expression = torch.rand(2, 48)
    hidden = with_mask_token(expression, masked_positions=masked).last_hidden_state
    assert not torch.allclose(hidden, with_mask_token(expression).last_hidden_state)
    assert ScrnaLongformerForMaskedGeneModeling(config).scrna_longformer.embeddings.mask_embedding is not None


def test_masked_gene_modelling_without_labels_has_no_loss_and_is_deterministic():
    torch.manual_seed(0)
    model = ScrnaLongformerForMaskedGeneModeling(small_config(hidden_dropout=0.1)).eval()
    expression = torch.rand(3, 48)
    masked = torch.rand(3, 48) < 0.3
    first, second = model(expression, masked_positions=masked), model(expression, masked_positions=masked)
    assert first.loss is None
    assert torch.equal(first.logits, second.logits) and torch.equal(first.cell_embedding, second.cell_embedding)
    unmasked = model(expression)
    assert unmasked.loss is None and torch.equal(unmasked.logits, model(expression).logits)


def test_classification_loss_follows_the_problem_type():
    torch.manual_seed(0)
    expression = torch.rand(4, 48)

    def model_for(**overrides):
        torch.manual_seed(0)
        return ScrnaLongformerForCellClassification(small_config(**overrides)).eval()

    # One label and float targets: regression, the real mean squared error.
    regression = model_for(id2label=None, num_labels=1)
    targets = torch.tensor([0.5, 2.0, -1.0, 3.0])
    output = regression(expression, labels=targets)
    expected = F.mse_loss(output.logits.squeeze(-1), targets)
    assert expected > 0.1
    torch.testing.assert_close(output.loss, expected)
    # Float labels over several classes: multi-label classification.
    multi_label = model_for()
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    output = multi_label(expression, labels=targets)
    torch.testing.assert_close(output.loss, F.binary_cross_entropy_with_logits(output.logits, targets))
    # The problem type in the config wins over the labels' dtype.
    regression_of_three = model_for(problem_type="regression")
    output = regression_of_three(expression, labels=targets)
    torch.testing.assert_close(output.loss, F.mse_loss(output.logits, targets))
    # Class ids: cross-entropy with the config's class weights and label smoothing.
    single_label = model_for(class_weights=[1.0, 2.0, 5.0], label_smoothing=0.1)
    ids = torch.tensor([0, 1, 2, 2])
    output = single_label(expression, labels=ids)
    expected = F.cross_entropy(output.logits, ids, weight=torch.tensor([1.0, 2.0, 5.0]), label_smoothing=0.1)
    torch.testing.assert_close(output.loss, expected)
    assert not torch.allclose(output.loss, F.cross_entropy(output.logits, ids))


def parameters_without_gradient(model) -> list[str]:
    return [name for name, parameter in model.named_parameters() if parameter.grad is None or not parameter.grad.any()]


@pytest.mark.parametrize(
    ("attention_type", "kernel_implementation"),
    [("knn", "eager"), ("knn", "compiled"), ("dense", "eager"), ("linear", "eager")],
)
@pytest.mark.parametrize("predict_all_genes", [None, True])
def test_every_parameter_gets_a_gradient_from_each_heads_loss(attention_type, kernel_implementation, predict_all_genes):
    """So that DDP runs with find_unused_parameters=False: no parameter of a head may sit out its
    loss, in training mode with dropout, on the masked-genes-only path and the full one."""
    torch.manual_seed(0)
    config = small_config(
        attention_type=attention_type, kernel_implementation=kernel_implementation, hidden_dropout=0.1
    )
    expression = torch.rand(3, 48) * 4
    masked = torch.zeros(3, 48, dtype=torch.bool)
    masked[:, 3::7] = True
    masked_gene_model = ScrnaLongformerForMaskedGeneModeling(config).train()
    masked_gene_model(
        expression, masked_positions=masked, labels=expression, predict_all_genes=predict_all_genes
    ).loss.backward()
    assert parameters_without_gradient(masked_gene_model) == []
    classifier = ScrnaLongformerForCellClassification(config).train()
    classifier(expression, labels=torch.tensor([0, 1, 2])).loss.backward()
    assert parameters_without_gradient(classifier) == []


def test_checkpoints_of_any_head_load_into_any_other_without_unexpected_keys(tmp_path):
    config = small_config()
    head_keys = {
        ScrnaLongformerModel: set(),
        ScrnaLongformerForMaskedGeneModeling: {
            "scrna_longformer.embeddings.mask_embedding", "prediction_transform.weight", "prediction_transform.bias",
            "prediction_norm.weight", "prediction_norm.bias", "prediction_head.weight", "prediction_head.bias",
        },
        ScrnaLongformerForCellClassification: {"classifier.weight", "classifier.bias"},
        ScrnaLongformerForTrajectory: {"regressor.weight", "regressor.bias"},
    }
    for source_class in MODEL_CLASSES:
        folder = tmp_path / source_class.__name__
        source = source_class(config)
        source.save_pretrained(folder)
        for target_class in MODEL_CLASSES:
            target, info = target_class.from_pretrained(folder, output_loading_info=True)
            assert info["unexpected_keys"] == set(), (source_class.__name__, target_class.__name__)
            # Only the target head's own weights that the source lacks are new.
            assert set(info["missing_keys"]) == head_keys[target_class] - head_keys[source_class], (
                source_class.__name__, target_class.__name__,
            )
            source_base = source if source_class is ScrnaLongformerModel else source.scrna_longformer
            target_base = target if target_class is ScrnaLongformerModel else target.scrna_longformer
            assert torch.equal(target_base.encoder.layers[0].attention.qkv.weight,
                               source_base.encoder.layers[0].attention.qkv.weight)


def test_weights_of_no_head_are_still_reported_as_unexpected(tmp_path):
    """The ignore list covers the other heads' weights, not everything."""
    from safetensors.torch import load_file, save_file

    ScrnaLongformerModel(small_config()).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["pooler_norm.weight"] = torch.ones(16)  # an older model's cell-embedding LayerNorm
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    _, info = ScrnaLongformerModel.from_pretrained(tmp_path, output_loading_info=True)
    assert info["unexpected_keys"] == {"pooler_norm.weight"}


def test_saved_config_maps_every_auto_class_to_its_head(tmp_path, monkeypatch):
    import json

    expected = {
        "AutoConfig": "configuration_scrnalf.ScrnaLongformerConfig",
        "AutoModel": "modeling_scrnalf.ScrnaLongformerModel",
        "AutoModelForMaskedLM": "modeling_scrnalf.ScrnaLongformerForMaskedGeneModeling",
        "AutoModelForSequenceClassification": "modeling_scrnalf.ScrnaLongformerForCellClassification",
        "AutoModelForTimeSeriesPrediction": "modeling_scrnalf.ScrnaLongformerForTrajectory",
        "AutoModelForTokenClassification": "modeling_scrnalf.ScrnaLongformerForProteinPrediction",
    }
    for model_class in MODEL_CLASSES:
        model_class(small_config()).save_pretrained(tmp_path / model_class.__name__)
        auto_map = json.loads((tmp_path / model_class.__name__ / "config.json").read_text())["auto_map"]
        assert auto_map == expected, model_class.__name__
    # Where two classes claim one Auto class, the saved model's own class wins.
    monkeypatch.setattr(ScrnaLongformerModel, "_auto_class", "AutoModelForSequenceClassification")
    for model_class in (ScrnaLongformerModel, ScrnaLongformerForCellClassification):
        model_class(small_config()).save_pretrained(tmp_path / f"claimed-{model_class.__name__}")
        auto_map = json.loads((tmp_path / f"claimed-{model_class.__name__}" / "config.json").read_text())["auto_map"]
        assert auto_map["AutoModelForSequenceClassification"] == f"modeling_scrnalf.{model_class.__name__}"


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_input_embeddings_are_the_gene_embeddings(model_class):
    model = model_class(small_config()).eval()
    base = model if model_class is ScrnaLongformerModel else model.scrna_longformer
    assert model.get_input_embeddings() is base.embeddings.gene_embeddings
    expression = torch.rand(2, 48)
    before = model(expression)[0]
    replacement = torch.nn.Embedding(48, 16)
    model.set_input_embeddings(replacement)
    assert model.get_input_embeddings() is replacement
    assert not torch.allclose(model(expression)[0], before, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_accepts_float32_expression(dtype):
    torch.manual_seed(0)
    model = ScrnaLongformerForCellClassification(small_config(kernel_implementation="eager")).eval()
    expression = torch.rand(2, 48)
    reference = model(expression).logits
    half = model.to(dtype)
    logits = half(expression).logits
    assert logits.dtype == dtype
    torch.testing.assert_close(logits.float(), reference, rtol=0.1, atol=0.1)


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_return_dict_false_returns_the_outputs_as_a_tuple(model_class):
    model = model_class(small_config()).eval()
    expression = torch.rand(2, 48)
    as_dict = model(expression, output_hidden_states=True)
    as_tuple = model(expression, output_hidden_states=True, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(as_dict.to_tuple())
    for got, expected in zip(as_tuple, as_dict.to_tuple()):
        if isinstance(got, tuple):
            assert all(torch.equal(a, b) for a, b in zip(got, expected))
        else:
            assert torch.equal(got, expected)


@pytest.mark.parametrize("kernel_implementation", ["eager", "compiled"])
def test_returned_attention_weights_are_on_the_autograd_graph(kernel_implementation):
    """Their gradient exists and is the same for knn and dense (at the graph's real neighbours
    and CLS; padding has no weight to speak of): the output is computed from them."""
    torch.manual_seed(0)
    config = small_config(kernel_implementation=kernel_implementation)
    model = ScrnaLongformerModel(config)
    graph = random_graph(48, 6, torch.Generator().manual_seed(5))
    model.set_gene_graph(graph)
    expression = torch.rand(3, 48) * 4
    attention_mask = (torch.rand(3, 48) > 0.2).long()
    gradients = {}
    for attention_type in ("knn", "dense"):
        model.config.attention_type = attention_type
        output = model(expression, attention_mask=attention_mask, output_attentions=True)
        weights = output.attentions[0]
        weights.retain_grad()
        output.last_hidden_state.square().sum().backward(retain_graph=True)
        assert weights.grad is not None and weights.grad.abs().sum() > 0
        gradients[attention_type] = weights.grad
    real = torch.cat([graph >= 0, torch.ones(48, 1, dtype=torch.bool)], dim=1).expand_as(gradients["knn"])
    torch.testing.assert_close(gradients["knn"][real], gradients["dense"][real], rtol=1e-4, atol=1e-5)


def test_compiled_backward_can_retain_the_graph():
    torch.manual_seed(0)
    model = ScrnaLongformerForMaskedGeneModeling(small_config(kernel_implementation="compiled")).train()
    expression = torch.rand(3, 48) * 4
    masked = torch.zeros(3, 48, dtype=torch.bool)
    masked[:, ::5] = True
    loss = model(expression, masked_positions=masked, labels=expression).loss
    loss.backward(retain_graph=True)
    first = model.prediction_head.weight.grad.clone()
    loss.backward()
    torch.testing.assert_close(model.prediction_head.weight.grad, 2 * first)
