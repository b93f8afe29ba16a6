"""The processor: gene alignment, normalisation, the gene graph, and bad input."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
import torch
from transformers import AutoFeatureExtractor

import scrnalf_hf  # noqa: F401
from scrnalf_hf import ScrnaLongformerProcessor

SYMBOLS = ["CD3E", "MS4A1", "NKG7", "LYZ", "GNLY", "CD8A"]
IDS = ["ENSG00000198851.9", "ENSG00000156738", "ENSG00000105374", "ENSG00000090382", "ENSG00000115523", "ENSG00000153563"]


def counts_anndata(n_cells: int = 5, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    counts = rng.poisson(3.0, size=(n_cells, len(SYMBOLS))).astype(np.float32)
    var = pd.DataFrame({"gene_ids": IDS}, index=SYMBOLS)
    return ad.AnnData(X=sp.csr_matrix(counts), var=var, obs=pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)]))


def test_counts_are_normalised_like_scanpy():
    adata = counts_anndata()
    processor = ScrnaLongformerProcessor.from_anndata(adata)
    expected = adata.copy()
    sc.pp.normalize_total(expected, target_sum=1e4)
    sc.pp.log1p(expected)
    batch = processor(adata)
    np.testing.assert_allclose(batch["expression"].numpy(), expected.X.toarray(), rtol=1e-5)
    assert batch["expression"].dtype == torch.float32
    assert batch["attention_mask"].dtype == torch.int64 and bool(batch["attention_mask"].all())


def test_genes_are_aligned_by_symbol_case_insensitively_and_missing_genes_zero_filled():
    processor = ScrnaLongformerProcessor(gene_symbols=SYMBOLS, input_kind="log1p", min_gene_overlap=0.5)
    matrix = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]], dtype=np.float32)
    names = ["lyz", "Cd3e", "NOT_IN_PANEL", "gnly"]
    batch = processor(matrix, gene_names=names, return_tensors="np")
    expected = np.zeros((2, 6), dtype=np.float32)
    expected[:, 3], expected[:, 0], expected[:, 4] = matrix[:, 0], matrix[:, 1], matrix[:, 3]
    np.testing.assert_array_equal(batch["expression"], expected)
    np.testing.assert_array_equal(batch["attention_mask"][0], [1, 0, 0, 1, 1, 0])
    alignment = processor.align_genes(names)
    assert alignment.n_matched == 3 and alignment.fraction == 0.5 and alignment.matched_by == "gene_symbols"
    assert alignment.missing == ["MS4A1", "NKG7", "CD8A"]


def test_genes_are_aligned_by_ensembl_id_ignoring_versions():
    processor = ScrnaLongformerProcessor(gene_symbols=SYMBOLS, gene_ids=IDS, input_kind="log1p")
    reordered = [IDS[5], "ENSG00000156738.17", IDS[0].split(".")[0], IDS[3]]
    alignment = processor.align_genes(reordered)
    assert alignment.matched_by == "gene_ids"
    np.testing.assert_array_equal(alignment.vocab_index, [5, 1, 0, 3])
    # symbols that disagree with the ids do not matter when ids are given
    alignment = processor.align_genes(["x1", "x2", "x3", "x4"], gene_ids=reordered)
    np.testing.assert_array_equal(alignment.vocab_index, [5, 1, 0, 3])


def test_low_gene_overlap_is_an_error_that_reports_the_overlap():
    processor = ScrnaLongformerProcessor(gene_symbols=SYMBOLS, input_kind="log1p", min_gene_overlap=0.5)
    with pytest.raises(ValueError, match=r"gene overlap too low: 2/6 panel genes"):
        processor(np.ones((2, 3)), gene_names=["CD3E", "LYZ", "FOO"])


def test_repeated_input_symbols_are_made_unique_and_the_first_is_matched(caplog):
    processor = ScrnaLongformerProcessor(gene_symbols=SYMBOLS, input_kind="log1p", min_gene_overlap=0.0)
    values = np.array([[1.0, 2.0, 3.0, 4.0]])
    batch = processor(values, gene_names=["CD3E", "cd3e", "LYZ", "GNLY"], return_tensors="np")
    assert "repeats gene symbols ['cd3e']" in caplog.text
    panel = dict(zip(SYMBOLS, batch["expression"][0]))
    assert panel["CD3E"] == 1.0 and panel["LYZ"] == 3.0 and panel["GNLY"] == 4.0


def test_panel_symbols_may_repeat_only_where_ids_tell_the_genes_apart():
    with pytest.raises(ValueError, match="duplicate gene symbols in the panel"):
        ScrnaLongformerProcessor(gene_symbols=["CD3E", "Cd3e"])
    panel = ScrnaLongformerProcessor(gene_symbols=["Rp1", "Rp1", "Actb"], gene_ids=["ENSMUSG1", "ENSMUSG2", "ENSMUSG3"])
    by_id = panel.align_genes(["Rp1", "Rp1", "Actb"], gene_ids=["ENSMUSG2", "ENSMUSG1", "ENSMUSG3"])
    np.testing.assert_array_equal(by_id.vocab_index, [1, 0, 2])
    by_symbol = panel.align_genes(["Rp1", "Actb"], min_gene_overlap=0.0)  # no ids: Rp1 is ambiguous in the panel
    np.testing.assert_array_equal(by_symbol.vocab_index, [-1, 2])
    assert by_symbol.missing == ["Rp1", "Rp1"]
    with pytest.raises(ValueError, match="duplicate gene ids in the input"):
        panel.align_genes(["a", "b"], gene_ids=["ENSMUSG1", "ENSMUSG1.2"])


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (np.array([[1.0, np.nan, 0, 0, 0, 0]]), "NaN"),
        (np.array([[1.0, np.inf, 0, 0, 0, 0]]), "infinite"),
        (np.array([[1.0, -2.0, 0, 0, 0, 0]]), "negative"),
        (np.array([[1.5, 2.0, 0, 0, 0, 0]]), "non-integer"),
        (np.array([["a", "b", "c", "d", "e", "f"]]), "numeric"),
        (np.ones((2, 6, 1)), "2-D"),
        (np.ones((2, 5)), "needs gene_names"),
    ],
)
def test_bad_values_are_rejected_with_a_named_problem(values, message):
    processor = ScrnaLongformerProcessor(gene_symbols=SYMBOLS)
    with pytest.raises(ValueError, match=message):
        processor(values)


def test_sparse_dense_and_torch_inputs_agree():
    adata = counts_anndata()
    processor = ScrnaLongformerProcessor.from_anndata(adata)
    dense = adata.X.toarray()
    reference = processor(adata)["expression"]
    for matrix in (dense, sp.csc_matrix(dense), torch.from_numpy(dense)):
        torch.testing.assert_close(processor(matrix, gene_names=SYMBOLS)["expression"], reference)


def test_library_size_counts_genes_outside_the_panel():
    processor = ScrnaLongformerProcessor(gene_symbols=["A", "B"], min_gene_overlap=1.0)
    batch = processor(np.array([[1.0, 1.0, 8.0]]), gene_names=["A", "B", "C"], return_tensors="np")
    np.testing.assert_allclose(batch["expression"], np.log1p([[1e4 / 10, 1e4 / 10]]), rtol=1e-6)


def test_processor_reads_the_recorded_matrix_and_else_where_convert_looks_for_counts():
    adata = counts_anndata()
    adata.layers["counts"] = adata.X.copy()
    adata.X = sp.csr_matrix(np.full(adata.shape, 0.5, dtype=np.float32))  # not counts
    expected = ScrnaLongformerProcessor(gene_symbols=SYMBOLS)(adata.layers["counts"], gene_names=SYMBOLS)["expression"]
    recorded = ScrnaLongformerProcessor.from_anndata(adata, layer="counts")
    assert recorded.gene_id_key == "gene_ids"
    torch.testing.assert_close(recorded(adata)["expression"], expected)
    unrecorded = ScrnaLongformerProcessor(gene_symbols=SYMBOLS)  # counts: layers['counts'], .raw, X
    assert unrecorded.anndata_matrix(adata) == "counts"
    torch.testing.assert_close(unrecorded(adata)["expression"], expected)
    with pytest.raises(ValueError, match=r"no such layer; it has X \(--layer X\), layers\['counts'\]"):
        recorded(adata, layer="missing")


def test_reading_the_wrong_matrix_names_the_flag_that_fixes_it():
    adata = counts_anndata()
    adata.X = adata.X * 20  # counts of a deeper library, well above any log1p value
    adata.raw = adata.copy()
    adata.X = sp.csr_matrix(np.where(adata.X.toarray() > 0, -1.5, 0.0).astype(np.float32))  # scaled, like pbmc68k
    log_model = ScrnaLongformerProcessor(gene_symbols=SYMBOLS, input_kind="log1p", layer="X")
    with pytest.raises(ValueError, match=r"X contains negative values .* looks scaled .*\.raw \(--use-raw\)"):
        log_model(adata)
    with pytest.raises(ValueError, match=r"look like raw counts"):
        log_model(adata, use_raw=True)  # .raw holds counts here, and the model reads log1p values


def test_processor_save_and_load_round_trip(tmp_path):
    processor = ScrnaLongformerProcessor(gene_symbols=SYMBOLS, gene_ids=IDS, input_kind="log1p", target_sum=5e3)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "processing_scrnalf.py").is_file()
    loaded = AutoFeatureExtractor.from_pretrained(tmp_path)
    assert type(loaded) is ScrnaLongformerProcessor
    assert loaded.gene_symbols == SYMBOLS and loaded.gene_ids == IDS
    assert loaded.input_kind == "log1p" and loaded.target_sum == 5e3


def planted_modules(n_cells: int = 400, n_modules: int = 4, genes_per_module: int = 8, seed: int = 0):
    """Cells × genes where genes of one module rise and fall together."""
    rng = np.random.default_rng(seed)
    activity = rng.gamma(1.0, 1.0, size=(n_cells, n_modules))
    module_of_gene = np.repeat(np.arange(n_modules), genes_per_module)
    noise = rng.gamma(5.0, 0.02, size=(n_cells, n_modules * genes_per_module))
    return (activity[:, module_of_gene] * noise).astype(np.float32), module_of_gene


def test_gene_graph_links_co_expressed_genes_includes_self_and_is_symmetric():
    expression, module_of_gene = planted_modules()
    n_genes = expression.shape[1]
    processor = ScrnaLongformerProcessor(gene_symbols=[f"g{i}" for i in range(n_genes)], input_kind="log1p")
    table = processor.build_gene_graph(expression, k=8)
    assert table.shape == (n_genes, 8) and table.dtype == np.int64
    for gene in range(n_genes):
        neighbours = table[gene][table[gene] >= 0]
        assert neighbours[0] == gene
        assert len(set(neighbours.tolist())) == len(neighbours)
        assert (module_of_gene[neighbours] == module_of_gene[gene]).all()
    edges = {(g, int(n)) for g in range(n_genes) for n in table[g] if n >= 0}
    assert all((n, g) in edges for g, n in edges)


def test_gene_graph_pads_unexpressed_genes_and_small_panels():
    expression, _ = planted_modules(genes_per_module=2)
    expression = np.concatenate([expression, np.zeros((expression.shape[0], 1), dtype=np.float32)], axis=1)
    processor = ScrnaLongformerProcessor(gene_symbols=[f"g{i}" for i in range(9)], input_kind="log1p")
    table = processor.build_gene_graph(expression, k=12)
    assert table.shape == (9, 12)
    np.testing.assert_array_equal(table[8], [8] + [-1] * 11)
    assert (table[:8] != 8).all()
    assert ((table[:8] >= 0).sum(1) == 8).all()  # every expressed gene, no more


def test_gene_graph_loads_into_a_model():
    expression, _ = planted_modules()
    processor = ScrnaLongformerProcessor(gene_symbols=[f"g{i}" for i in range(32)], input_kind="log1p")
    model = scrnalf_hf.ScrnaLongformerModel(scrnalf_hf.ScrnaLongformerConfig(n_genes=32, d_model=8, n_heads=2, knn_k=5))
    model.set_gene_graph(processor.build_gene_graph(expression, k=5))
    assert model(torch.from_numpy(expression[:3])).cell_embedding.shape == (3, 8)


def test_gene_graph_by_correlation_links_co_varying_genes_whatever_their_level_or_sign():
    rng = np.random.default_rng(0)
    activity = rng.uniform(0, 1, size=300)
    steady = 5.5 + 0.05 * rng.standard_normal((300, 2))
    constant = np.full(300, 2.0)
    # regulator, a high-level gene that follows it, one that opposes it, two steady high-level genes, a constant one
    expression = np.column_stack([activity, 5 + activity, 6 - activity, steady, constant]).astype(np.float32)
    processor = ScrnaLongformerProcessor(gene_symbols=[f"g{i}" for i in range(6)], input_kind="log1p")
    by_correlation = processor.build_gene_graph(expression, k=3, metric="correlation")
    assert by_correlation[1, 0] == 1 and set(by_correlation[1, 1:].tolist()) == {0, 2}
    np.testing.assert_array_equal(by_correlation[5], [5, -1, -1])  # constant: no correlation with anything
    by_cosine = processor.build_gene_graph(expression, k=3)
    assert set(by_cosine[1, 1:].tolist()) != {0, 2}  # level, not co-variation, decides the cosine graph
    with pytest.raises(ValueError, match="metric must be"):
        processor.build_gene_graph(expression, k=3, metric="spearman")
