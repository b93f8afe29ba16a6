"""`scrnalf convert` under hostile conditions: killed runs, workers orphaned by a killed parent,
leftovers of interrupted runs, --overwrite of something that is not a dataset, repeated genes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from scrnalf_hf.data import convert_anndata, dataset_genes, simulate

REPO = Path(__file__).resolve().parents[2]


def small_counts(n_cells: int = 120, n_genes: int = 40, seed: int = 0) -> ad.AnnData:
    adata = simulate(n_cells, n_genes, seed=seed, n_cell_types=3, markers_per_type=3, n_modules=3)
    adata.obs_names = adata.obs_names.astype(str)
    return adata


def python_child(code: str) -> subprocess.Popen:
    """A Python process running ``code`` with this checkout's ``scrnalf_hf``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def slowed_conversion(source: Path, output: Path, seconds_per_chunk: float, num_proc: int) -> str:
    """Code for a child that converts ``source`` with every chunk delayed, so it can be caught mid-run."""
    return f"""
import time
from scrnalf_hf.data import convert
real_table = convert._cells_table
def slow_table(*args):
    time.sleep({seconds_per_chunk})
    return real_table(*args)
convert._cells_table = slow_table
convert.convert_anndata({str(source)!r}, {str(output)!r}, chunk_size=10, cells_per_shard=50,
                        num_proc={num_proc}, progress=False)
"""


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def staging_folders(parent: Path, name: str = "out") -> list[Path]:
    return sorted(p for p in parent.iterdir() if p.name.startswith(f".{name}.incomplete-"))


# -- repeated genes ---------------------------------------------------------------------------------


def with_genes(symbols: list[str], ids: list[str] | None) -> ad.AnnData:
    adata = small_counts(n_genes=len(symbols))
    adata.var_names = symbols
    adata.var = adata.var.drop(columns="gene_ids") if ids is None else adata.var.assign(gene_ids=ids)
    return adata


def finetune_processor(folder: Path):
    """The processor `scrnalf finetune --train-file FOLDER` builds: the dataset's genes as its panel."""
    from scrnalf_hf.training.cells import fit_processor, load_labelled_cells

    return fit_processor(load_labelled_cells(folder, "cell_type"))


def symbols_with_repeats(n: int) -> list[str]:
    return ["Rp1", "Sox17", "Rp1", "RP1"] + [f"G{i}" for i in range(n - 4)]


def test_repeated_symbols_are_fine_where_gene_ids_are_the_key(tmp_path, recwarn):
    symbols = symbols_with_repeats(40)
    ids = [f"ENSMUSG{i:011d}" for i in range(40)]
    convert_anndata(with_genes(symbols, ids), tmp_path / "out", label_key="cell_type", progress=False)
    genes = dataset_genes(tmp_path / "out")
    assert genes.gene_ids == ids
    assert genes.gene_symbols[:4] == ["Rp1", "Sox17", "Rp1-1", "RP1-2"]
    assert not [w for w in recwarn if "repeat" in str(w.message)]
    processor = finetune_processor(tmp_path / "out")
    assert processor.gene_ids == ids


def test_repeated_gene_ids_are_refused_naming_them(tmp_path):
    symbols = [f"G{i}" for i in range(40)]
    ids = [f"ENSMUSG{i:011d}" for i in range(40)]
    ids[7] = ids[3]
    ids[9] = ids[5] + ".2"  # the same gene in another Ensembl release
    with pytest.raises(ValueError, match=r"gene_ids.*ENSMUSG00000000003.*ENSMUSG00000000005.*gene_id_key"):
        convert_anndata(with_genes(symbols, ids), tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_repeated_symbols_without_ids_are_made_unique_with_a_warning(tmp_path):
    symbols = symbols_with_repeats(40)
    adata = with_genes(symbols, None)
    with pytest.warns(UserWarning, match=r"repeat.*var_names_make_unique.*'Rp1' → 'Rp1-1'"):
        convert_anndata(adata, tmp_path / "out", label_key="cell_type", progress=False)
    genes = dataset_genes(tmp_path / "out")
    assert genes.gene_ids is None
    assert genes.gene_symbols[:4] == ["Rp1", "Sox17", "Rp1-1", "RP1-2"] and len(set(genes.gene_symbols)) == 40
    processor = finetune_processor(tmp_path / "out")
    batch = processor(adata.X[:5], gene_names=genes.gene_symbols)
    np.testing.assert_array_equal(batch["attention_mask"].numpy(), 1)


def test_streamed_and_converted_gene_lists_agree_with_repeated_symbols(tmp_path):
    with_genes(symbols_with_repeats(40), None).write_h5ad(tmp_path / "in.h5ad")
    with pytest.warns(UserWarning, match="repeat"):
        convert_anndata(tmp_path / "in.h5ad", tmp_path / "out", progress=False, num_proc=2, cells_per_shard=40)
    with pytest.warns(UserWarning, match="repeat"):
        assert dataset_genes(tmp_path / "in.h5ad") == dataset_genes(tmp_path / "out")
