"""Gene networks from attention: edges on the graph in the right direction, grouping, the
gradient variant, baselines, AUPRC, the edge file and the heatmap."""

import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from scrnalf_hf import (
    ScrnaLongformerConfig,
    ScrnaLongformerForCellClassification,
    ScrnaLongformerForMaskedGeneModeling,
    ScrnaLongformerModel,
    ScrnaLongformerProcessor,
)
from scrnalf_hf.interpret.attention import attention_edges, gene_attention, write_edges
from scrnalf_hf.interpret.grn import (
    attention_heatmap,
    correlation_edges,
    edge_auprc,
    genie3_edges,
    knn_graph_edges,
    random_edges,
)

# Rows list each gene's neighbours (itself first); -1 pads. Gene 3 is a neighbour of genes 0, 2 and 7.
GRAPH = [[0, 1, 3], [1, 2, -1], [2, 3, 4], [3, 4, -1], [4, 5, 6], [5, 6, -1], [6, 7, 0], [7, 3, -1]]


def _cells(n_cells=24, n_genes=8, seed=0) -> ad.AnnData:
    counts = np.random.default_rng(seed).poisson(4.0, (n_cells, n_genes)).astype(np.float32)
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(["B", "T", "NK"] * (n_cells // 3), categories=["B", "T", "NK", "unused"])},
        index=[f"cell{i}" for i in range(n_cells)],
    )
    return ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(n_genes)]))


def _model(model_class=ScrnaLongformerForCellClassification, graph=GRAPH, seed=0, **config):
    torch.manual_seed(seed)
    settings = {"n_genes": len(graph), "d_model": 8, "depth": 2, "n_heads": 2, "knn_k": len(graph[0]),
                "kernel_implementation": "eager", "hidden_dropout": 0.0, "num_labels": 3, **config}
    model = model_class(ScrnaLongformerConfig(**settings))
    model.base_model.set_gene_graph(torch.tensor(graph))
    return model.eval()


@pytest.fixture(scope="module")
def cells():
    return _cells()


@pytest.fixture(scope="module")
def processor(cells):
    return ScrnaLongformerProcessor.from_anndata(cells)


def _pairs(edges: pd.DataFrame) -> set[tuple[str, str]]:
    return set(zip(edges["source"].astype(str), edges["target"].astype(str)))


def test_every_gene_attending_to_one_gene_gives_edges_out_of_that_gene(cells, processor):
    # One layer whose query is the same for every token and whose key is large only for gene 3:
    # every gene with gene 3 in its row puts ~all its attention on it.
    model = _model(depth=1, n_heads=1, d_model=4)
    with torch.no_grad():
        embeddings = model.base_model.embeddings
        embeddings.value_bins.weight.zero_()  # tokens = gene embeddings, whatever the expression
        embeddings.cls_embedding.zero_()
        embeddings.gene_embeddings.weight.copy_(torch.tensor([-1.0, 1.0, -1.0, 1.0]).repeat(8, 1))
        embeddings.gene_embeddings.weight[3] = torch.tensor([1.0, -1.0, 1.0, -1.0])
        qkv = model.base_model.encoder.layers[0].attention.qkv
        qkv.weight.zero_()
        qkv.bias.zero_()
        qkv.bias[0] = 10.0  # query = 10·e0 for every token
        qkv.weight[4, 0] = 1.0  # key[0] = the normalised token's first channel: +1 for gene 3, -1 elsewhere
    edges = attention_edges(model, processor, cells, progress=False)

    graph_pairs = {(f"G{n}", f"G{g}") for g, row in enumerate(GRAPH) for n in row if n >= 0 and n != g}
    assert _pairs(edges) == graph_pairs  # exactly the graph's edges, neighbour → attending gene
    top = edges.nsmallest(3, "rank")
    assert _pairs(top) == {("G3", "G0"), ("G3", "G2"), ("G3", "G7")}
    assert (top["score"] > 0.98).all() and (edges["score"].iloc[3:] < 0.01).all()
    assert list(edges["rank"]) == list(range(1, len(edges) + 1))
    with_self = attention_edges(model, processor, cells, progress=False, include_self=True)
    assert len(with_self) == len(edges) + 8


def test_knn_and_dense_attention_give_the_same_edges(cells, processor):
    model = _model()
    knn = attention_edges(model, processor, cells, group_by="cell_type", progress=False)
    model.config.attention_type = "dense"
    dense = attention_edges(model, processor, cells, group_by="cell_type", progress=False)
    pd.testing.assert_frame_equal(knn[["group", "source", "target"]], dense[["group", "source", "target"]])
    np.testing.assert_allclose(knn["score"], dense["score"], atol=1e-6)


def test_each_group_is_ranked_on_its_own_cells_only(cells, processor):
    model = _model()
    grouped = attention_edges(model, processor, cells, group_by="cell_type", progress=False, batch_size=5)
    assert list(grouped["group"].cat.categories) == ["B", "T", "NK"]  # the unused category has no block
    for name, block in grouped.groupby("group", observed=True):
        assert list(block["rank"]) == list(range(1, len(block) + 1))
        assert block["score"].is_monotonic_decreasing
        alone = attention_edges(model, processor, cells[cells.obs["cell_type"] == name], progress=False)
        merged = block.merge(alone, on=["source", "target"], suffixes=("", "_alone"), validate="one_to_one")
        np.testing.assert_allclose(merged["score"], merged["score_alone"], rtol=1e-6)
    chosen = gene_attention(model, processor, cells, group_by="cell_type", groups=["T"], progress=False)
    assert chosen.groups == ["T"] and chosen.n_cells.tolist() == [8]
    # the CLS column completes each gene's attention: its weights on neighbours and CLS sum to 1
    totals = chosen.scores[0].sum(1)
    np.testing.assert_allclose(totals, 1.0, rtol=1e-6)
    assert chosen.cls_attention().shape == (8, 1)


def test_all_layers_average_the_single_layers(cells, processor):
    model = _model()
    every, first, last = (gene_attention(model, processor, cells, layers=layers, progress=False)
                          for layers in ("all", [0], -1))
    assert (every.layers, first.layers, last.layers) == ([0, 1], [0], [1])
    np.testing.assert_allclose(every.scores, (first.scores + last.scores) / 2, rtol=1e-6)
    assert not np.allclose(first.scores, last.scores)


@pytest.mark.parametrize("model_class", [ScrnaLongformerForCellClassification, ScrnaLongformerForMaskedGeneModeling, ScrnaLongformerModel])
def test_gradient_scores_are_per_cell_and_do_not_depend_on_the_batch(cells, processor, model_class):
    model = _model(model_class)
    few = cells[:6]
    one = attention_edges(model, processor, few, method="gradient", batch_size=1, progress=False)
    many = attention_edges(model, processor, few, method="gradient", batch_size=6, progress=False)
    pd.testing.assert_frame_equal(one[["source", "target"]], many[["source", "target"]])
    np.testing.assert_allclose(one["score"], many["score"], rtol=1e-4, atol=1e-9)
    assert (one["score"] >= 0).all() and one["score"].max() > 0
    assert all(p.grad is None for p in model.parameters())  # the user's model is left as it was


def test_gradient_of_a_gene_with_no_effect_on_the_output_is_zero(cells, processor):
    # The attention output is projected to zero: attention cannot change what the model outputs.
    model = _model(depth=1)
    with torch.no_grad():
        model.base_model.encoder.layers[0].attention.output.weight.zero_()
        model.base_model.encoder.layers[0].attention.output.bias.zero_()
    edges = attention_edges(model, processor, cells, method="gradient", progress=False)
    assert edges["score"].max() == 0.0
    assert attention_edges(model, processor, cells, progress=False)["score"].max() > 0


def test_a_2000_gene_panel_stays_fast():
    n_genes, k = 2000, 16
    graph = torch.stack([(torch.arange(n_genes) + shift) % n_genes for shift in range(k)], dim=1)
    model = _model(graph=graph.tolist(), depth=1, n_heads=1, d_model=8)
    counts = np.random.default_rng(0).poisson(1.0, (16, n_genes)).astype(np.float32)
    big = ad.AnnData(counts, var=pd.DataFrame(index=[f"G{i}" for i in range(n_genes)]))
    started = time.perf_counter()
    edges = attention_edges(model, ScrnaLongformerProcessor.from_anndata(big), big, progress=False)
    assert time.perf_counter() - started < 20  # a G×G pass per cell would take minutes on 2 cores
    assert len(edges) == n_genes * (k - 1)


def test_bad_inputs_are_one_line_errors(cells, processor):
    model = _model()
    cases = [
        (dict(group_by="tissue"), "group_by 'tissue' is not a column"),
        (dict(group_by="cell_type", groups=["unused"]), r"group\(s\) \['unused'\].*have no cells"),
        (dict(groups=["B"]), "give group_by as well"),
        (dict(method="saliency"), "method must be one of"),
        (dict(layers=[2]), r"layers must be indices in \[-2, 2\)"),
        (dict(layers="last"), "layers must be 'all'"),
        (dict(batch_size=0), "batch_size must be >= 1"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            attention_edges(model, processor, cells, progress=False, **options)
    with pytest.raises(ValueError, match="has no cells"):
        attention_edges(model, processor, cells[:0], progress=False)
    linear = _model(attention_type="linear")
    with pytest.raises(ValueError, match="attention_type='linear'"):
        attention_edges(linear, processor, cells, progress=False)
    with pytest.raises(ValueError, match="panel has 40 genes but the model has 8"):
        attention_edges(model, ScrnaLongformerProcessor(gene_symbols=[f"X{i}" for i in range(40)]), cells, progress=False)


def test_write_edges_leaves_the_old_file_when_writing_fails(cells, processor, tmp_path, monkeypatch):
    edges = attention_edges(_model(), processor, cells, progress=False)
    path = write_edges(edges, tmp_path / "out" / "edges.tsv")
    written = pd.read_csv(path, sep="\t")
    assert list(written.columns) == ["source", "target", "score", "rank"] and len(written) == len(edges)
    (tmp_path / "plain.txt").write_text("")
    assert path.stat().st_mode == (tmp_path / "plain.txt").stat().st_mode  # not a private temporary file's
    before = path.read_text()

    def fail_midway(self, handle, **kwargs):
        handle.write("source\ttarget\n")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        write_edges(edges, path)
    assert path.read_text() == before
    assert [p.name for p in path.parent.iterdir()] == ["edges.tsv"]  # no temporary file left
    with pytest.raises(ValueError, match="source, target and score"):
        write_edges(edges.drop(columns="score"), tmp_path / "x.tsv")


GENES = [f"G{i}" for i in range(30)]
TRUTH = pd.DataFrame({"source": ["G0", "G0", "G1", "G5"], "target": ["G1", "G2", "G3", "G9"]})


def test_auprc_is_one_for_perfect_scores_and_near_the_share_of_true_edges_for_random_ones():
    assert edge_auprc(TRUTH.assign(score=1.0), TRUTH, GENES) == pytest.approx(1.0)
    # the true edges reversed are wrong directed, right undirected
    reversed_ = TRUTH.rename(columns={"source": "target", "target": "source"}).assign(score=1.0)
    assert edge_auprc(reversed_, TRUTH, GENES) < 0.01
    assert edge_auprc(reversed_, TRUTH, GENES, directed=False) == pytest.approx(1.0)
    many_genes = [f"G{i}" for i in range(100)]
    pairs = np.random.default_rng(0).choice(100 * 100, 400, replace=False)
    truth = pd.DataFrame({"source": [f"G{p // 100}" for p in pairs], "target": [f"G{p % 100}" for p in pairs]})
    truth = truth[truth["source"] != truth["target"]]
    prevalence = len(truth) / (100 * 99)
    random_scores = [edge_auprc(random_edges(many_genes, seed=s), truth, many_genes) for s in range(3)]
    assert np.mean(random_scores) == pytest.approx(prevalence, rel=0.2)
    # unscored pairs rank last: one true edge scored on top, the rest tied at the bottom
    one = TRUTH.iloc[:1].assign(score=1.0)
    expected = 0.25 + 0.75 * (len(TRUTH) / (30 * 29))
    assert edge_auprc(one, TRUTH, GENES) == pytest.approx(expected, rel=0.05)


def test_auprc_within_a_graph_counts_only_its_pairs():
    graph = pd.DataFrame({"source": ["G0", "G0", "G4", "G7"], "target": ["G1", "G6", "G5", "G8"]})
    scores = pd.DataFrame({"source": ["G0", "G0", "G4", "G7"], "target": ["G1", "G6", "G5", "G8"],
                           "score": [0.9, 0.1, 0.2, 0.3]})
    assert edge_auprc(scores, TRUTH, GENES, within=graph) == pytest.approx(1.0)  # G0→G1 first of 4
    assert edge_auprc(scores, TRUTH, GENES) < 0.5  # the other true edges are unscored
    grouped = scores.assign(group=["a", "b", "a", "b"])
    with pytest.raises(ValueError, match="2 groups"):
        edge_auprc(grouped, TRUTH, GENES)
    with pytest.raises(ValueError, match="genes outside"):
        edge_auprc(scores.assign(source="NOPE"), TRUTH, GENES)
    with pytest.raises(ValueError, match="no true edge"):
        edge_auprc(scores, TRUTH, GENES, within=graph.iloc[1:])


def test_baselines_find_a_planted_regulator():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(300, 6))
    values[:, 4] = 2.0 * values[:, 1] + 0.1 * rng.normal(size=300)  # G1 drives G4
    genes = GENES[:6]
    correlation = correlation_edges(values, genes)
    assert len(correlation) == 30 and _pairs(correlation.iloc[:2]) == {("G1", "G4"), ("G4", "G1")}
    genie3 = genie3_edges(values, genes, n_trees=20, progress=False)
    top_for_g4 = genie3[genie3["target"] == "G4"].iloc[0]
    assert top_for_g4["source"] == "G1" and top_for_g4["score"] > 0.5
    assert len(random_edges(genes)) == 30


def test_knn_graph_edges_read_the_graph_as_attention_does(cells, processor):
    model = _model()
    graph = knn_graph_edges(model, processor.gene_symbols)
    assert _pairs(graph) == _pairs(attention_edges(model, processor, cells, progress=False))
    order = graph.set_index(["source", "target"])["score"]
    assert order[("G1", "G0")] > order[("G3", "G0")]  # nearer neighbours first
    expression = processor(cells)["expression"]
    cosine = knn_graph_edges(np.array(GRAPH), processor.gene_symbols, matrix=expression)
    unit = expression / expression.norm(dim=0)
    assert cosine.set_index(["source", "target"])["score"][("G3", "G7")] == pytest.approx(float(unit[:, 3] @ unit[:, 7]))


def test_heatmap_writes_a_self_contained_html_and_a_png(cells, processor, tmp_path):
    edges = attention_edges(_model(), processor, cells, progress=False)
    html, png = attention_heatmap(edges, ["G0", "G3", "G7", "G2"], tmp_path / "h.html", tmp_path / "h.png", title="T")
    text = html.read_text()
    assert "G7" in text and "plotly.js" in text.lower() and 'src="https://cdn.plot.ly' not in text
    assert len(text) > 1_000_000  # plotly.js itself is inside: it opens offline
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="groups"):
        grouped = attention_edges(_model(), processor, cells, group_by="cell_type", progress=False)
        attention_heatmap(grouped, ["G0"], tmp_path / "g.html")


@pytest.mark.slow
def test_benchmark_script_prints_the_auprc_of_every_method(tmp_path, capsys):
    from helpers import load_script

    script = load_script("grn")
    record = script.run(script.parse_args([
        "--output-dir", str(tmp_path), "--n-cells", "300", "--n-genes", "100", "--preset", "tiny",
        "--pretrain-epochs", "1", "--finetune-epochs", "1", "--edge-cells", "100", "--genie3-trees", "5",
    ]))
    printed = capsys.readouterr().out
    for name in ("masked-gene model: attention", "classifier: gradient", "random (mean of 10 draws)", "absolute Pearson",
                 "GENIE3"):
        assert 0.0 <= record["auprc"][name]["within_graph"] <= 1.0
        assert f"| {name} | {record['auprc'][name]['all_pairs']:.4f} |" in printed
    for name in ("grn.json", "grn.md", "edges_mgm_attention.tsv", "attention_heatmap.html", "attention_heatmap.png"):
        assert (tmp_path / name).is_file(), name
