"""predict / embed into AnnData: files are streamed chunk by chunk into a copy renamed into place,
and give what the in-memory functions give; outputs are never half-written or clobbered."""

import anndata as ad
import h5py
import numpy as np
import pytest

from scrnalf_cli import main
from scrnalf_hf.inference import embed, load_model, predict, predict_file


@pytest.fixture
def data_file(trained_tiny_folder, tmp_path):
    inputs = np.load(trained_tiny_folder / "inputs.npz")
    adata = ad.AnnData(inputs["counts"].astype(np.float32))
    adata.var_names = [str(g) for g in inputs["genes"]]
    adata.obs_names = [f"cell{i}" for i in range(adata.n_obs)]
    adata.obs["donor"] = ["a", "b", "c"] * (adata.n_obs // 3)
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    return path


def test_streamed_file_equals_in_memory_predictions(trained_tiny_folder, data_file, tmp_path):
    output = tmp_path / "predicted.h5ad"
    predict_file(str(trained_tiny_folder), data_file, output, batch_size=7)  # chunks that do not divide the cells
    streamed = ad.read_h5ad(output)
    model, processor = load_model(str(trained_tiny_folder))
    in_memory = ad.read_h5ad(data_file)
    predict(in_memory, model, processor, batch_size=1000)
    assert list(streamed.obs["scrnalf_label"]) == list(in_memory.obs["scrnalf_label"])
    assert list(streamed.obs["scrnalf_label"].cat.categories) == ["alpha", "beta", "gamma"]
    np.testing.assert_allclose(streamed.obsm["scrnalf_probabilities"], in_memory.obsm["scrnalf_probabilities"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(streamed.obsm["X_scrnalf"], in_memory.obsm["X_scrnalf"], rtol=1e-5, atol=1e-6)
    assert list(streamed.obs["donor"]) == list(in_memory.obs["donor"])  # the input's annotations stay
    np.testing.assert_array_equal(streamed.X, in_memory.X)
    assert streamed.uns["scrnalf"]["gene_overlap"]["matched_genes"] == 60
    assert list(streamed.uns["scrnalf"]["labels"]) == ["alpha", "beta", "gamma"]
    assert not list(tmp_path.glob(".predicted.h5ad.incomplete-*"))


def test_a_partial_gene_overlap_is_reported_once_per_file_not_per_chunk(trained_tiny_folder, tmp_path, capsys):
    """The genes are aligned once per file and reused by every chunk: the low-overlap warning
    appears once, however many chunks the file is read in."""
    inputs = np.load(trained_tiny_folder / "inputs.npz")
    keep = np.arange(40)  # 40 of the 60 panel genes: above the 50% floor, below the 90% warning
    adata = ad.AnnData(inputs["counts"][:, keep].astype(np.float32))
    adata.var_names = [str(g) for g in inputs["genes"][keep]]
    path = tmp_path / "partial.h5ad"
    adata.write_h5ad(path)
    capsys.readouterr()
    assert main(["predict", "--model", str(trained_tiny_folder), "--input", str(path), "--output", str(tmp_path / "out.h5ad"),
                 "--batch-size", "5"]) == 0
    assert adata.n_obs > 5 * 3
    assert capsys.readouterr().err.count("only 40/60 panel genes found") == 1


def test_embed_writes_the_encoder_cell_embeddings(trained_tiny_folder, data_file, tmp_path):
    output = tmp_path / "embedded.h5ad"
    assert main(["embed", "--model", str(trained_tiny_folder), "--input", str(data_file), "--output", str(output)]) == 0
    embedded = ad.read_h5ad(output)
    model, processor = load_model(str(trained_tiny_folder), head=False)
    reference = ad.read_h5ad(data_file)
    embed(reference, model, processor)
    np.testing.assert_allclose(embedded.obsm["X_scrnalf"], reference.obsm["X_scrnalf"], rtol=1e-5, atol=1e-6)
    assert "scrnalf_label" not in embedded.obs and embedded.uns["scrnalf"]["task"] == "classification"


def test_an_existing_output_is_replaced_only_with_overwrite_and_only_if_ours(trained_tiny_folder, data_file, tmp_path, capsys):
    output = tmp_path / "out.h5ad"
    command = ["predict", "--model", str(trained_tiny_folder), "--input", str(data_file), "--output", str(output)]
    assert main(command) == 0
    first = output.read_bytes()
    assert main(command) == 1 and "exists; choose another --output or pass --overwrite" in capsys.readouterr().err
    assert output.read_bytes() == first
    assert main([*command, "--overwrite"]) == 0
    foreign = tmp_path / "notes.h5ad"
    foreign.write_text("my notes")
    assert main([*command[:-1], str(foreign), "--overwrite"]) == 1
    assert "is not an .h5ad that scrnalf predict/embed wrote" in capsys.readouterr().err
    assert foreign.read_text() == "my notes"


def test_a_failure_mid_stream_leaves_the_previous_output_and_no_partial_file(trained_tiny_folder, data_file, tmp_path, monkeypatch):
    output = tmp_path / "out.h5ad"
    predict_file(str(trained_tiny_folder), data_file, output)
    before = output.read_bytes()
    from scrnalf_hf.modeling_scrnalf import ScrnaLongformerForCellClassification

    calls = {"n": 0}
    forward = ScrnaLongformerForCellClassification.forward

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("No space left on device")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(ScrnaLongformerForCellClassification, "forward", failing)
    with pytest.raises(OSError, match="No space left"):
        predict_file(str(trained_tiny_folder), data_file, output, batch_size=10, overwrite=True)
    assert output.read_bytes() == before
    assert not list(tmp_path.glob(".out.h5ad.incomplete-*"))
    with h5py.File(output) as handle:  # still a complete, readable result
        assert handle["obsm"]["X_scrnalf"].shape[0] == 90


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--input", "missing.h5ad"], "no AnnData file at missing.h5ad"),
        (["--model", "no/such-model-here"], "no model folder at no/such-model-here"),
        (["--model", "not a repo id"], "is not a Hub repo id"),
        (["--batch-size", "0"], "--batch-size must be a positive number"),
    ],
)
def test_ordinary_mistakes_end_in_one_line(trained_tiny_folder, data_file, tmp_path, capsys, monkeypatch, arguments, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    base = {"--model": str(trained_tiny_folder), "--input": str(data_file), "--output": str(tmp_path / "o.h5ad")}
    base.update(dict(zip(arguments[::2], arguments[1::2])))
    assert main(["predict", *[item for pair in base.items() for item in pair]]) == 1
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "o.h5ad").exists()
