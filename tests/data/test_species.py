"""Cross-species panels: each species read through its own genes onto one panel of ortholog
groups and species-specific tokens (``scrnalf_hf.data.species``, the processor, the collator)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scrnalf_hf import ScrnaLongformerProcessor
from scrnalf_hf.data.cells import open_cells, panel_matrix
from scrnalf_hf.data.collators import CellCollator
from scrnalf_hf.data.panel import fit_processor
from scrnalf_hf.data.simulation import simulate_two_species
from scrnalf_hf.data.species import with_species_setup


@pytest.fixture(scope="module")
def two_species(tmp_path_factory):
    """150 human and 150 mouse cells (120 genes each, one-to-many pairs, species-specific genes)
    and their ortholog table as a two-column TSV."""
    folder = tmp_path_factory.mktemp("species")
    human, mouse, table = simulate_two_species(150, 120, seed=0, one_to_many_fraction=0.2)
    paths = {}
    for name, adata in (("human", human), ("mouse", mouse)):
        paths[name] = folder / f"{name}.h5ad"
        adata.write_h5ad(paths[name])
    paths["orthologs"] = folder / "orthologs.tsv"
    table.to_csv(paths["orthologs"], sep="\t", index=False)
    return human, mouse, table, paths


@pytest.fixture(scope="module")
def human_processor(two_species):
    """A human+mouse processor fitted on the human cells only (mouse genes from the table)."""
    _, _, _, paths = two_species
    cells = open_cells(paths["human"], species="human", progress=False)
    cells = with_species_setup(cells, model_species="human,mouse", orthologs=str(paths["orthologs"]))
    return fit_processor(cells, np.arange(cells.n_cells))


def _normalised(counts: np.ndarray) -> np.ndarray:
    return np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)


def test_orthologs_share_a_token_paralogs_are_summed_and_specific_genes_are_masked(two_species, human_processor):
    human, mouse, table, _ = two_species
    processor = human_processor
    assert processor.species == ["human", "mouse"]
    one_to_many = table[table["human"].duplicated(keep=False)]
    gene = one_to_many["human"].iloc[0]
    paralogs = one_to_many.loc[one_to_many["human"] == gene, "mouse"].tolist()
    assert len(paralogs) == 2
    human_genes, mouse_genes = processor.species_genes["human"], processor.species_genes["mouse"]
    token = human_genes["tokens"][human_genes["gene_symbols"].index(gene)]
    assert [mouse_genes["tokens"][mouse_genes["gene_symbols"].index(p)] for p in paralogs] == [token, token]

    inputs = processor(mouse, species="mouse", return_tensors="np")
    counts = mouse.X.toarray()
    expected = np.log1p(sum(counts[:, list(mouse.var_names).index(p)] for p in paralogs) / counts.sum(1) * 1e4)
    np.testing.assert_allclose(inputs["expression"][:, token], expected, rtol=1e-5)
    one_to_one = table[~table["human"].duplicated(keep=False) & ~table["mouse"].duplicated(keep=False)].iloc[0]
    shared = human_genes["tokens"][human_genes["gene_symbols"].index(one_to_one["human"])]
    np.testing.assert_allclose(
        inputs["expression"][:, shared], _normalised(counts)[:, list(mouse.var_names).index(one_to_one["mouse"])], rtol=1e-5
    )
    # human genes without a mouse ortholog: measured in human cells, masked out in mouse cells
    specific = np.flatnonzero(processor.token_shapes() == "specific")
    assert len(specific) > 0
    assert (inputs["attention_mask"][:, specific] == 0).all()
    assert (processor(human, species="human", return_tensors="np")["attention_mask"][:, specific] == 1).all()
    assert (inputs["species"] == 1).all()


def test_the_collator_and_the_baselines_matrix_read_a_mixed_file_like_the_processor(two_species, tmp_path):
    """A file mixing species (genes side by side, a species column) trains one model: every
    route into it — processor, collator, baselines matrix — gives each cell the same values."""
    human, mouse, _, paths = two_species
    mixed = ad.concat([human, mouse], join="outer", fill_value=0)
    mixed.obs_names_make_unique()
    mixed.X = sp.csr_matrix(mixed.X)
    path = tmp_path / "mixed.h5ad"
    mixed.write_h5ad(path)
    cells = open_cells(path, species_key="species", progress=False)
    cells = with_species_setup(cells, species_key="species", orthologs=str(paths["orthologs"]))
    rows = np.arange(cells.n_cells)
    processor = fit_processor(cells, rows)
    assert processor.species == ["human", "mouse"]
    # the mouse-specific genes (no ortholog) went to mouse by expression, not to both species
    assert processor.species_report["mouse"]["n_specific"] > 0
    assert processor.species_report["human"]["n_genes"] == human.n_vars
    expected = np.concatenate([
        processor(human, species="human", return_tensors="np")["expression"],
        processor(mouse, species="mouse", return_tensors="np")["expression"],
    ])
    collator = CellCollator(processor, cells.genes, species=["human", "mouse"])
    order = np.random.default_rng(0).permutation(cells.n_cells)[:64]  # species interleaved in one batch
    batch = collator([cells.with_targets(None)[int(i)] for i in order])
    np.testing.assert_allclose(batch["expression"].numpy(), expected[order], rtol=1e-5, atol=1e-6)
    assert torch.equal(batch["species"], torch.from_numpy((order >= human.n_obs).astype(np.int64)))
    np.testing.assert_allclose(panel_matrix(cells, order, processor).toarray(), expected[order], rtol=1e-5, atol=1e-6)


def test_a_species_processor_saves_and_loads(tmp_path, human_processor):
    human_processor.save_pretrained(tmp_path)
    loaded = ScrnaLongformerProcessor.from_pretrained(tmp_path)
    assert loaded.species == human_processor.species
    assert loaded.species_genes == human_processor.species_genes
    assert loaded.orthologs["sha256"] == human_processor.orthologs["sha256"]
    assert list(loaded.token_shapes()) == list(human_processor.token_shapes())


def test_genes_of_the_wrong_species_are_refused(two_species, human_processor):
    """Human genes given as mouse: case-insensitive symbols would match (SIMG00001 ~ Simg00001 is
    not the issue here: the orthologs' numbers differ), but exact matches say human."""
    human, mouse, _, _ = two_species
    with pytest.raises(ValueError, match="look like human genes"):
        human_processor(human, species="mouse")
    with pytest.raises(ValueError, match="unknown species 'rat'"):
        human_processor(mouse, species="rat")
    with pytest.raises(ValueError, match="say which the cells are"):
        human_processor(mouse)


def test_mouse_symbols_that_differ_from_human_only_by_case_are_told_apart():
    """CD79A (human) and Cd79a (mouse) are one key to case-insensitive matching; the species check
    reads symbols with their case."""
    processor = ScrnaLongformerProcessor(
        gene_symbols=["CD79A|Cd79a", "MS4A1|Ms4a1", "LYZ|Lyz2", "CD3E|Cd3e"],
        species=["human", "mouse"],
        species_genes={
            "human": {"gene_symbols": ["CD79A", "MS4A1", "LYZ", "CD3E"], "gene_ids": None, "tokens": [0, 1, 2, 3]},
            "mouse": {"gene_symbols": ["Cd79a", "Ms4a1", "Lyz2", "Cd3e"], "gene_ids": None, "tokens": [0, 1, 2, 3]},
        },
    )
    human_cells = np.ones((2, 4))
    assert processor(human_cells, gene_names=["CD79A", "MS4A1", "LYZ", "CD3E"], species="human")["species"].tolist() == [0, 0]
    with pytest.raises(ValueError, match="look like human genes"):
        processor(human_cells, gene_names=["CD79A", "MS4A1", "LYZ", "CD3E"], species="mouse")
    mouse = processor(human_cells, gene_names=["Cd79a", "Ms4a1", "Lyz2", "Cd3e"], species="mouse")
    assert mouse["species"].tolist() == [1, 1]


def test_a_file_mixing_species_needs_a_species_column(two_species, tmp_path):
    human, mouse, _, paths = two_species
    mixed = ad.concat([human, mouse], join="outer", fill_value=0)
    mixed.obs_names_make_unique()
    path = tmp_path / "mixed.h5ad"
    mixed.write_h5ad(path)
    cells = open_cells(path, species="human", progress=False)
    cells = with_species_setup(cells, species="human", model_species="human,mouse", orthologs=str(paths["orthologs"]))
    with pytest.raises(ValueError, match="genes of several species"):
        fit_processor(cells, np.arange(cells.n_cells))


def test_a_stored_species_column_contradicting_species_is_refused(two_species, tmp_path):
    _, mouse, _, paths = two_species
    cells = open_cells(paths["mouse"], species_key="species", progress=False)
    with pytest.raises(ValueError, match="holds cells of species \\['mouse'\\]"):
        cells.with_species("human")
    assert list(pd.unique(cells.with_species("Mus_musculus").cell_species())) == ["mouse"]


def test_masking_hides_the_share_of_each_cells_own_measured_genes():
    """Cells of two species in one batch measure different tokens: each hides mask_ratio of its own."""
    from scrnalf_hf.data.collators import MaskSampler

    measured = torch.zeros(2, 20, dtype=torch.bool)
    measured[0, :16] = True  # a human cell
    measured[1, 10:14] = True  # a cell of a species with few tokens on this panel
    masked = MaskSampler(0.5, seed=0)(measured, ["a", "b"])
    assert masked.sum(1).tolist() == [8, 2]
    assert not (masked & ~measured).any()


def test_a_low_overlap_error_says_what_was_found_by_id_by_symbol_and_in_ortholog_groups():
    processor = ScrnaLongformerProcessor(
        gene_symbols=["CD79A|Cd79a", "MS4A1|Ms4a1", "LYZ|Lyz2", "XIST [human]", "Cd3e [mouse]"],
        species=["human", "mouse"],
        min_gene_overlap=0.9,
        species_genes={
            "human": {"gene_symbols": ["CD79A", "MS4A1", "LYZ", "XIST"], "gene_ids": None, "tokens": [0, 1, 2, 3]},
            "mouse": {
                "gene_symbols": ["Cd79a", "Ms4a1", "Lyz2", "Cd3e"],
                "gene_ids": ["ENSMUSG01", "ENSMUSG02", "ENSMUSG03", "ENSMUSG04"],
                "tokens": [0, 1, 2, 4],
            },
        },
    )
    # Cd79a by id, Ms4a1 by symbol (its id differs in this annotation release), Cd3e absent
    names, ids = ["Cd79a", "Ms4a1", "Lyz2"], ["ENSMUSG01", "ENSMUSG99", "ENSMUSG03"]
    alignment = processor.align_genes(names, ids, species="mouse", min_gene_overlap=0.0)
    assert (alignment.n_matched, alignment.n_by_symbol, alignment.n_shared) == (3, 1, 3)
    with pytest.raises(ValueError, match=r"3/4 of the model's mouse genes .*2 by id, 1 by symbol; 3 in ortholog groups"):
        processor.align_genes(names, ids, species="mouse")
