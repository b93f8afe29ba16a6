"""What a new user does in the first hour, on the bundled data, as the README says it.

Train with ``--use-raw`` on pbmc68k_reduced, push the output folder as it is to the local Hub,
and predict on the same file with no flag: through ``scrnalf predict`` and through
``pipeline(...)`` in a process where ``scrnalf_hf`` cannot be imported. Then the ordinary
mistakes of that hour: each ends in one line on stderr and exit status 1.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
from helpers import WITHOUT_PACKAGE
from hub_server import local_hub  # noqa: F401 - fixture

from scrnalf_cli import main as scrnalf

REPO_ID = "org/pbmc-first-hour"

PIPELINE_WITHOUT_PACKAGE = WITHOUT_PACKAGE + textwrap.dedent(
    """
    import json, sys
    import anndata as ad
    from transformers import pipeline

    repo_id, revision, h5ad, out = sys.argv[1:5]
    classify = pipeline(model=repo_id, revision=revision, trust_remote_code=True)
    predictions = classify(ad.read_h5ad(h5ad))
    json.dump({"module": type(classify).__module__, "labels": [p["label"] for p in predictions]}, open(out, "w"))
    """
)


@pytest.fixture(scope="module")
def pbmc_file(tmp_path_factory) -> Path:
    """pbmc68k_reduced as a user writes it: scaled values in .X, log-normalised values in .raw."""
    path = tmp_path_factory.mktemp("pbmc") / "pbmc68k_reduced.h5ad"
    sc.datasets.pbmc68k_reduced().write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def use_raw_run(pbmc_file, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("runs") / "tiny"
    command = ["finetune", "--train-file", str(pbmc_file), "--use-raw", "--label-key", "bulk_labels",
               "--preset", "tiny", "--output-dir", str(output), "--num-train-epochs", "2", "--seed", "0"]
    assert scrnalf(command) == 0
    return output


@pytest.mark.slow
def test_finetune_output_pushes_as_it_is_and_predicts_without_flags_where_the_package_is_absent(
    use_raw_run, pbmc_file, local_hub, tmp_path, capsys  # noqa: F811
):
    capsys.readouterr()
    assert scrnalf(["push", "--model-dir", str(use_raw_run), "--repo-id", REPO_ID]) == 0
    commit = capsys.readouterr().out.strip()
    assert len(commit) == 40 and int(commit, 16) >= 0  # only the commit id on stdout, for $(...)

    out = tmp_path / "loaded.json"
    completed = subprocess.run(
        [sys.executable, "-I", "-c", PIPELINE_WITHOUT_PACKAGE, REPO_ID, commit, str(pbmc_file), str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    loaded = json.loads(out.read_text())
    assert loaded["module"].startswith("transformers_modules.")  # the pipeline file pushed with the weights
    with_package = ad.read_h5ad(pbmc_file)
    assert len(loaded["labels"]) == with_package.n_obs
    assert set(loaded["labels"]) <= set(with_package.obs["bulk_labels"].cat.categories)

    predicted = tmp_path / "labelled.h5ad"
    assert scrnalf(["predict", "--model", str(use_raw_run), "--input", str(pbmc_file), "--output", str(predicted)]) == 0
    labelled = ad.read_h5ad(predicted)
    # Both paths read .raw, as the processor recorded: the same labels from the same weights.
    assert list(labelled.obs["scrnalf_label"].astype(str)) == loaded["labels"]
    accuracy = np.mean(labelled.obs["scrnalf_label"].astype(str) == labelled.obs["bulk_labels"].astype(str))
    assert accuracy > 0.34  # above the majority class (CD8+ Cytotoxic T: 0.34 of the cells)


@pytest.mark.slow
def test_predicting_the_scaled_matrix_names_the_flag_that_fixes_it(use_raw_run, pbmc_file, tmp_path, capsys):
    scaled = ad.read_h5ad(pbmc_file)
    del scaled.raw  # only the scaled, negative .X is left: the matrix the model was not trained on
    path = tmp_path / "scaled.h5ad"
    scaled.write_h5ad(path)
    capsys.readouterr()
    assert scrnalf(["predict", "--model", str(use_raw_run), "--input", str(path), "--output", str(tmp_path / "o.h5ad")]) == 1
    error = capsys.readouterr().err
    assert "Traceback" not in error and len(error.strip().splitlines()) == 1, error
    assert ".raw" in error and not (tmp_path / "o.h5ad").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing input", "no AnnData file at"),
        ("missing model", "no model folder at"),
        ("NaN values", "NaN"),
        ("negative values", "negative"),
    ],
)
def test_ordinary_mistakes_end_in_one_line(use_raw_run, pbmc_file, tmp_path, capsys, monkeypatch, case, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    model, data = str(use_raw_run), str(pbmc_file)
    if case == "missing input":
        data = "pbmc_typo.h5ad"
    elif case == "missing model":
        model = "runs/tinyy"
    else:
        adata = ad.read_h5ad(pbmc_file)
        raw = adata.raw.to_adata()
        raw.X = raw.X.toarray()
        raw.X[0, :5] = np.nan if case == "NaN values" else -1.0
        adata.raw = raw  # the matrix the model reads
        data = str(tmp_path / "bad.h5ad")
        adata.write_h5ad(data)
    capsys.readouterr()
    assert scrnalf(["predict", "--model", model, "--input", data, "--output", "out.h5ad"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("scrnalf predict: error:") and message in error, error
    assert "Traceback" not in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "out.h5ad").exists()


def test_help_imports_nothing_heavy():
    """``scrnalf --help`` must answer before torch could even be imported."""
    started = time.perf_counter()
    help_run = subprocess.run([sys.executable, "-c", "import sys; from scrnalf_cli import main; main(['--help'])"],
                              capture_output=True, text=True)
    help_seconds = time.perf_counter() - started
    assert help_run.returncode == 0 and "scrnalf demo" in help_run.stdout
    probe = subprocess.run([sys.executable, "-X", "importtime", "-c", "from scrnalf_cli import main; main(['--help'])"],
                           capture_output=True, text=True)
    imported = {line.split("|")[-1].strip() for line in probe.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "transformers", "scanpy", "anndata", "datasets", "scrnalf_hf"}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    assert help_seconds < time.perf_counter() - started
