"""The bad-input suite (issue 14): every bad input and fault a user can give ``scrnalf convert``,
``finetune``, ``pretrain``, ``compare``, ``predict``, ``embed``, ``push``, ``benchmark report``,
``scaling``, ``recommend``, ``search`` and the Python API, in one table.

Each case builds its bad input in a fresh folder and runs the command in-process
(``scrnalf_cli.main``) or the API call. What the user must get:

- the CLI: a non-zero exit and exactly one line on stderr, ``scrnalf <command>: error: ...``, no
  traceback, not flagged "unexpected" (a bug); the API: a ``ValueError`` / ``TypeError`` /
  ``OSError`` with a message;
- no silent wrong answer (exit 0 or no exception on a bad input);
- no corrupted or lost output: every file or folder that existed before is byte-identical
  afterwards, and no half-written output is left where the command would have written.

``docs/bad_inputs.md`` is generated from this table with what the user gets:

    python -m pytest tests/test_bad_inputs.py --bad-inputs-report docs/bad_inputs.md

and :func:`test_report_lists_every_case` keeps it from going stale.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from helpers import marker_adata, write_h5ad
from hub_server import point_client_at, tiny_run, unreachable_endpoint  # noqa: F401  (tiny_run: a fixture)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from scrnalf_cli import main

REPORT = Path(__file__).resolve().parent.parent / "docs" / "bad_inputs.md"
N_GENES = 60  # the panel of conftest's trained_tiny_folder: GENE0 ... GENE59
REPO_ID = "org/scrna-longformer-tiny"

# ---------------------------------------------------------------------------------------------
# Shared inputs, made once
# ---------------------------------------------------------------------------------------------


@dataclass
class World:
    """Good inputs the cases start from (never modified by a case: cases copy what they break)."""

    root: Path
    good: Path  # 30 cells × 60 genes GENE0..59, integer counts, obs["cell_type"] (3 types)
    classifier: Path  # a trained tiny classifier on the same 60 genes (conftest)
    masked: Path  # a masked-gene (pretraining) model on the same panel: no prediction head
    converted: Path  # `scrnalf convert` of `good`
    predicted: Path  # a `scrnalf predict` output of `good`
    hub: Path  # a Hub-ready folder (export_hub_folder)
    endpoint: str = ""
    orthologs: Path | None = None  # human GENE0..49 <-> mouse Gene0..49, one to one
    species_model: Path | None = None  # an (untrained) human+mouse classifier on that table


def cells_adata(n_cells: int = 30, n_genes: int = N_GENES, n_types: int = 3, seed: int = 0) -> ad.AnnData:
    return marker_adata(n_cells=n_cells, n_genes=n_genes, n_types=n_types, seed=seed)


@pytest.fixture(scope="module")
def world(tmp_path_factory, trained_tiny_folder, tiny_run) -> World:  # noqa: F811
    import torch

    from scrnalf_hf import ScrnaLongformerConfig, ScrnaLongformerProcessor
    from scrnalf_hf.hub import export_hub_folder
    from scrnalf_hf.modeling_scrnalf import ScrnaLongformerForMaskedGeneModeling

    root = tmp_path_factory.mktemp("bad_inputs")
    good = write_h5ad(cells_adata(), root, "cells.h5ad")
    torch.manual_seed(0)
    genes = [f"GENE{i}" for i in range(N_GENES)]
    masked = root / "masked_model"
    model = ScrnaLongformerForMaskedGeneModeling(ScrnaLongformerConfig.from_preset("tiny", n_genes=N_GENES, knn_k=8))
    model.save_pretrained(masked)
    ScrnaLongformerProcessor(gene_symbols=genes).save_pretrained(masked)
    converted = root / "converted"
    assert main(["convert", str(good), str(converted), "--label-key", "cell_type"]) == 0
    predicted = root / "predicted.h5ad"
    assert main(["predict", "--model", str(trained_tiny_folder), "--input", str(good), "--output", str(predicted)]) == 0
    hub = export_hub_folder(tiny_run, root / "hub" / "scrna-longformer-tiny", repo_id=REPO_ID)
    orthologs, species_model = species_inputs(root)
    return World(root, good, trained_tiny_folder, masked, converted, predicted, hub, "", orthologs, species_model)


def species_inputs(root: Path) -> tuple[Path, Path]:
    """A one-to-one human-mouse table of GENE0..49 / Gene0..49 (mouse symbols differ from human
    only by case, as CD79A / Cd79a do) and a human+mouse classifier on it."""
    from scrnalf_hf import ScrnaLongformerConfig, ScrnaLongformerProcessor
    from scrnalf_hf.data.orthologs import build_vocabulary, load_orthologs
    from scrnalf_hf.modeling_scrnalf import ScrnaLongformerForCellClassification

    orthologs = root / "orthologs.tsv"
    pd.DataFrame({"human": [f"GENE{i}" for i in range(50)], "mouse": [f"Gene{i}" for i in range(50)]}).to_csv(
        orthologs, sep="\t", index=False
    )
    table = load_orthologs(str(orthologs), species=["human", "mouse"])
    vocabulary = build_vocabulary({"human": ([f"GENE{i}" for i in range(N_GENES)], None)}, table, derive=["mouse"])
    processor = ScrnaLongformerProcessor(
        gene_symbols=vocabulary.tokens, species=vocabulary.species, species_genes=vocabulary.species_genes,
        orthologs=table.source, species_report=vocabulary.report,
    )
    config = ScrnaLongformerConfig.from_preset(
        "tiny", n_genes=processor.n_genes, knn_k=8, species=processor.species, id2label={0: "A", 1: "B", 2: "C"}
    )
    model_dir = root / "species_model"
    ScrnaLongformerForCellClassification(config).save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    return orthologs, model_dir


def species_table(t: Path, kind: str) -> Path:
    """An ortholog table broken one way."""
    path = t / f"{kind}.tsv"
    if kind == "missing_columns":
        path.write_text("gene\tsymbol\nGENE0\tGene0\n")
    elif kind == "duplicate_pair":
        path.write_text("human\tmouse\nGENE0\tGene0\nGENE1\tGene1\nGENE0\tGene0\n")
    elif kind == "conflicting_pair":
        path.write_text(
            "Gene stable ID\tGene name\tMouse gene stable ID\tMouse gene name\tMouse homology type\n"
            "ENSG00000000001\tGENE0\tENSMUSG00000000001\tGene0\tortholog_one2one\n"
            "ENSG00000000001\tGENE0\tENSMUSG00000000002\tGene1\tortholog_one2one\n"
        )
    else:
        raise KeyError(kind)
    return path


def mixed_species_adata() -> ad.AnnData:
    """Human and mouse cells side by side, genes of both species, no species column."""
    adata = cells_adata()
    adata.var_names = [f"GENE{i}" if i < 30 else f"Gene{i}" for i in range(N_GENES)]
    return adata


# ---------------------------------------------------------------------------------------------
# Builders of bad inputs
# ---------------------------------------------------------------------------------------------


def h5(t: Path, adata: ad.AnnData, name: str = "bad.h5ad") -> Path:
    return write_h5ad(adata, t, name)


def variant(kind: str) -> ad.AnnData:
    """The good cells, broken one way."""
    adata = cells_adata()
    x = adata.X
    if kind == "nan":
        x[3, 4] = np.nan
    elif kind == "inf":
        x[3, 4] = np.inf
    elif kind == "negative":
        x[3, 4] = -2.0
    elif kind == "log1p":
        adata.X = np.log1p(x / x.sum(1, keepdims=True) * 1e4).astype(np.float32)
    elif kind == "scaled":
        adata.X = ((x - x.mean(0)) / (x.std(0) + 1e-6)).astype(np.float32)
    elif kind == "zero_cells":
        adata = adata[:0].copy()
    elif kind == "zero_genes":
        adata = adata[:, :0].copy()
    elif kind == "empty_cell":
        x[5, :] = 0
    elif kind == "empty_gene":
        x[:, 50] = 0
    elif kind == "duplicate_cells":
        adata.obs_names = ["cell0"] * 2 + list(adata.obs_names[2:])
    elif kind == "duplicate_gene_ids":
        adata.var["gene_ids"] = [f"ENSG{i:011d}" for i in range(N_GENES)]
        adata.var.iloc[1, 0] = adata.var.iloc[0, 0]
    elif kind == "other_genes":
        adata.var_names = [f"OTHER{i}" for i in range(N_GENES)]
    elif kind == "low_overlap":
        adata.var_names = [f"GENE{i}" if i < 10 else f"OTHER{i}" for i in range(N_GENES)]
    elif kind == "one_cell_class":
        adata.obs["cell_type"] = adata.obs["cell_type"].cat.add_categories(["lonely"])
        adata.obs.iloc[0, 0] = "lonely"
    elif kind == "missing_labels":
        adata.obs["cell_type"] = adata.obs["cell_type"].cat.add_categories([])
        adata.obs.iloc[2, 0] = np.nan
    elif kind == "single_class":
        adata.obs["cell_type"] = pd.Categorical(["only"] * adata.n_obs)
    elif kind == "many_classes":
        adata = marker_adata(n_cells=32, n_genes=64, n_types=8)
    elif kind == "float64_counts_with_fraction":
        adata.X = x.astype(np.float64) + 0.5
    else:
        raise KeyError(kind)
    return adata


def renamed_labels() -> ad.AnnData:
    adata = cells_adata()
    adata.obs["cell_type"] = adata.obs["cell_type"].cat.rename_categories(["A", "B", "C"])
    return adata


def text_file(t: Path, name: str = "bad.h5ad", content: str = "cell,GENE0\ncell0,1\n") -> Path:
    path = t / name
    path.write_text(content)
    return path


def truncated(t: Path, source: Path, name: str = "truncated.h5ad") -> Path:
    path = t / name
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def hdf5_not_anndata(t: Path) -> Path:
    path = t / "plain.h5ad"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("matrix", data=np.ones((3, 3)))
    return path


def copy_folder(source: Path, t: Path, name: str | None = None) -> Path:
    return Path(shutil.copytree(source, t / (name or source.name)))


def model_copy(w: World, t: Path, breakage: str) -> Path:
    """The trained classifier's folder, broken one way."""
    folder = copy_folder(w.classifier, t, "model")
    weights = folder / "model.safetensors"
    if breakage == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif breakage == "no_weights":
        weights.unlink()
    elif breakage == "config_not_json":
        (folder / "config.json").write_text("{ this is not json")
    elif breakage == "foreign_config":
        (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    elif breakage == "no_processor":
        (folder / "preprocessor_config.json").unlink()
    elif breakage == "panel_mismatch":
        saved = json.loads((folder / "preprocessor_config.json").read_text())
        saved["gene_symbols"] = saved["gene_symbols"][:40]
        (folder / "preprocessor_config.json").write_text(json.dumps(saved))
    elif breakage == "no_config":
        (folder / "config.json").unlink()
    else:
        raise KeyError(breakage)
    return folder


def finished_run(w: World, t: Path) -> Path:
    """A folder as a finished finetune run leaves it: the saved model, its split.json and its card."""
    run = copy_folder(w.classifier, t, "run")
    (run / "split.json").write_text(json.dumps({"seed": 0, "n_cells": 90, "cells": "0123456789abcdef"}))
    (run / "README.md").write_text("---\nlibrary_name: transformers\n---\n# a finished run\n")
    return run


def hub_copy(w: World, t: Path, breakage: str | None = None) -> Path:
    folder = copy_folder(w.hub, t, "scrna-longformer-tiny")
    if breakage == "no_card":
        (folder / "README.md").unlink()
    elif breakage == "malformed_yaml":
        card = (folder / "README.md").read_text()
        (folder / "README.md").write_text(card.replace("---\n", "---\nlicense: [unclosed\n", 1))
    elif breakage == "no_weights":
        (folder / "model.safetensors").unlink()
    elif breakage == "truncated_weights":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif breakage == "no_config":
        (folder / "config.json").unlink()
    elif breakage == "config_not_json":
        (folder / "config.json").write_text("not json")
    elif breakage == "no_processor":
        (folder / "preprocessor_config.json").unlink()
    elif breakage == "pickled_weights":
        (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    elif breakage == "no_model_code":
        (folder / "modeling_scrnalf.py").unlink()
    elif breakage == "panel_mismatch":
        saved = json.loads((folder / "preprocessor_config.json").read_text())
        saved["gene_symbols"] = saved["gene_symbols"][:5]
        (folder / "preprocessor_config.json").write_text(json.dumps(saved))
    elif breakage == "foreign_weights":
        from safetensors.torch import save_file

        import torch

        save_file({"bert.weight": torch.zeros(2, 2)}, str(folder / "model.safetensors"))
    elif breakage is not None:
        raise KeyError(breakage)
    return folder


@contextlib.contextmanager
def read_only(folder: Path):
    """``folder`` refuses new files: chmod, or for root (which ignores modes) the immutable flag."""
    if os.geteuid() == 0 and shutil.which("chattr"):
        subprocess.run(["chattr", "+i", str(folder)], check=True)
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)


# ---------------------------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """What one case runs: ``argv`` for the CLI or ``call`` for the API; ``protect``: paths that
    exist before and must be byte-identical after; ``fresh``: outputs that must not be left."""

    argv: list | None = None
    call: Callable[[], object] | None = None
    protect: list = field(default_factory=list)
    fresh: list = field(default_factory=list)
    context: Callable[[], contextlib.AbstractContextManager] | None = None


@dataclass(frozen=True)
class Case:
    id: str
    command: str  # the CLI command, or "api"
    bad: str  # the bad input or fault, in words (the report's column)
    build: Callable  # (world, tmp folder, monkeypatch) -> Setup
    match: str | None = None  # a regex the message must contain


def cli(*argv, protect=(), fresh=(), context=None) -> Setup:
    return Setup(argv=[str(a) for a in argv], protect=list(protect), fresh=list(fresh), context=context)


def api(call, protect=(), fresh=()) -> Setup:
    return Setup(call=call, protect=list(protect), fresh=list(fresh))


TRAIN = ("--preset", "tiny", "--num_train_epochs", "1")


def ft(train, t, *extra, command="finetune", label=True):
    """A finetune / pretrain command line on ``train`` into ``t/out`` (which must not be left)."""
    label_args = ("--label-key", "cell_type") if label else ()
    return cli(command, "--train-file", train, *label_args, "--output-dir", t / "out", *extra, fresh=[t / "out"])


def ft_args(train, t, *extra, command="finetune", label=True):
    label_args = ("--label-key", "cell_type") if label else ()
    return [command, "--train-file", train, *label_args, "--output-dir", t / "out", *extra]


def pt(train, t, *extra):
    return ft(train, t, *extra, command="pretrain", label=False)


def cmp(train, t, *extra, label=True):
    label_args = ("--label-key", "cell_type") if label else ()
    return cli("compare", "--train-file", train, *label_args, "--output-dir", t / "cmp", "--methods", "logreg",
               "--cv", "3", *extra, fresh=[t / "cmp"])


def run_model(command, model, source, t, *extra, output=None, protect=()):
    output = t / "out.h5ad" if output is None else output
    fresh = [] if output.exists() or output in protect else [output]
    return cli(command, "--model", model, "--input", source, "--output", output, *extra, protect=protect, fresh=fresh)


def mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def with_existing(path: Path, content: str = "an earlier result\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    return path


def unreachable(mp, t):
    """The Hub cannot be reached; huggingface_hub's retries do not wait (the user would wait ~20 s)."""
    point_client_at(mp, unreachable_endpoint(), t / "hf_home", "hf_fake_token")
    import huggingface_hub.utils._http as http

    mp.setattr(http.time, "sleep", lambda seconds: None)


def processor():
    from scrnalf_hf import ScrnaLongformerProcessor

    return ScrnaLongformerProcessor(gene_symbols=[f"GENE{i}" for i in range(N_GENES)])


def api_predict(w, adata, model=None, **kwargs):
    from scrnalf_hf.inference import load_model, predict

    def call():
        loaded, proc = load_model(str(model or w.classifier))
        predict(adata, loaded, proc, **kwargs)

    return call


def api_embed(w, adata, **kwargs):
    from scrnalf_hf.inference import embed, load_model

    def call():
        loaded, proc = load_model(str(w.classifier), head=False)
        embed(adata, loaded, proc, **kwargs)

    return call


def _convert_cases() -> list[Case]:
    c = "convert"

    def conv(source, t, *extra):
        return cli(c, source, t / "out", "--label-key", "cell_type", *extra, fresh=[t / "out"])

    def data(kind):
        return lambda w, t, mp: conv(h5(t, variant(kind)), t)

    return [
        Case("convert-missing-input", c, "input file does not exist", lambda w, t, mp: conv(t / "nope.h5ad", t), "no AnnData file"),
        Case("convert-input-is-directory", c, "input is a folder, not a .h5ad", lambda w, t, mp: conv(t, t)),
        Case("convert-input-is-csv", c, "input is a CSV text file named .h5ad", lambda w, t, mp: conv(text_file(t), t)),
        Case("convert-input-empty-file", c, "input is an empty (0-byte) file", lambda w, t, mp: conv(text_file(t, content=""), t)),
        Case("convert-input-truncated", c, "input .h5ad truncated to half its bytes", lambda w, t, mp: conv(truncated(t, w.good), t)),
        Case("convert-input-hdf5-not-anndata", c, "input is HDF5 but not AnnData (no obs/var)", lambda w, t, mp: conv(hdf5_not_anndata(t), t)),
        Case("convert-missing-label-key", c, "--label-key names no obs column",
             lambda w, t, mp: cli(c, w.good, t / "out", "--label-key", "celltype", fresh=[t / "out"]), "not found"),
        Case("convert-label-with-missing-values", c, "label column has a missing value", data("missing_labels"), "missing value"),
        Case("convert-zero-cells", c, "AnnData with 0 cells", data("zero_cells"), "empty"),
        Case("convert-zero-genes", c, "AnnData with 0 genes", data("zero_genes"), "empty"),
        Case("convert-nan", c, "a NaN in X", data("nan"), "NaN"),
        Case("convert-inf", c, "an infinite value in X", data("inf"), "infinite"),
        Case("convert-negative", c, "a negative value in X", data("negative"), "negative"),
        Case("convert-scaled", c, "scaled (z-scored) values in X", data("scaled"), "negative"),
        Case("convert-log1p-as-counts", c, "log-normalised values where counts are required", data("log1p"), "non-integer"),
        Case("convert-fractional-counts", c, "float64 'counts' with fractions", data("float64_counts_with_fraction"), "non-integer"),
        Case("convert-empty-cell", c, "a cell with no expressed gene", data("empty_cell"), "no expressed gene"),
        Case("convert-empty-gene", c, "a gene zero in every cell (no --allow-empty-genes)", data("empty_gene"), "zero in every cell"),
        Case("convert-duplicate-cell-ids", c, "two cells share an id", data("duplicate_cells"), "more than once"),
        Case("convert-duplicate-gene-ids", c, "two genes share an Ensembl id", data("duplicate_gene_ids"), "repeats"),
        Case("convert-missing-layer", c, "--layer names no layer", lambda w, t, mp: conv(w.good, t, "--layer", "spliced"), "not found"),
        Case("convert-layer-and-use-raw", c, "--layer and --use-raw together",
             lambda w, t, mp: conv(w.good, t, "--layer", "X", "--use-raw"), "not both"),
        Case("convert-use-raw-without-raw", c, "--use-raw on an AnnData without .raw", lambda w, t, mp: conv(w.good, t, "--use-raw"), "no .raw"),
        Case("convert-missing-gene-id-key", c, "--gene-id-key names no var column",
             lambda w, t, mp: conv(w.good, t, "--gene-id-key", "ensembl"), "not a column"),
        Case("convert-missing-obs-key", c, "--obs-keys names no obs column", lambda w, t, mp: conv(w.good, t, "--obs-keys", "donor"), "not found"),
        Case("convert-missing-species-key", c, "--species-key names no obs column",
             lambda w, t, mp: conv(w.good, t, "--species-key", "organism")),
        Case("convert-missing-batch-key", c, "--batch-key names no obs column", lambda w, t, mp: conv(w.good, t, "--batch-key", "batch")),
        Case("convert-species-and-species-key", c, "--species and --species-key together (conflicting)",
             lambda w, t, mp: conv(w.good, t, "--species", "human", "--species-key", "cell_type"), "not both"),
        Case("convert-obs-key-twice", c, "--obs-keys names a column twice", lambda w, t, mp: conv(w.good, t, "--obs-keys", "cell_type", "cell_type"),
             "more than once"),
        Case("convert-chunk-size-zero", c, "--chunk-size 0", lambda w, t, mp: conv(w.good, t, "--chunk-size", "0"), ">= 1"),
        Case("convert-num-proc-zero", c, "--num-proc 0", lambda w, t, mp: conv(w.good, t, "--num-proc", "0"), ">= 1"),
        Case("convert-chunk-size-not-a-number", c, "--chunk-size ten", lambda w, t, mp: conv(w.good, t, "--chunk-size", "ten"), "invalid int"),
        Case("convert-output-exists", c, "output folder exists, no --overwrite",
             lambda w, t, mp: cli(c, w.good, copy_folder(w.converted, t), protect=[t / "converted"]), "already exists"),
        Case("convert-output-is-file", c, "output path is an existing file (with --overwrite)",
             lambda w, t, mp: cli(c, w.good, with_existing(t / "out"), "--overwrite", protect=[t / "out"]), "file"),
        Case("convert-output-is-input", c, "output path is the input file itself",
             lambda w, t, mp: cli(c, copy_folder(w.root, t, "d") / "cells.h5ad", t / "d" / "cells.h5ad", protect=[t / "d" / "cells.h5ad"])),
        Case("convert-overwrite-foreign-folder", c, "--overwrite on a folder convert did not write",
             lambda w, t, mp: cli(c, w.good, t / "mine", "--overwrite", protect=[with_existing(t / "mine" / "notes.txt").parent])),
        Case("convert-output-parent-is-file", c, "output's parent is a file",
             lambda w, t, mp: cli(c, w.good, with_existing(t / "parent") / "out", protect=[t / "parent"])),
        Case("convert-read-only-output-dir", c, "output folder's parent is read-only",
             lambda w, t, mp: cli(c, w.good, mkdir(t / "ro") / "out", fresh=[t / "ro" / "out"],
                                  context=lambda: read_only(t / "ro"))),
        Case("convert-unknown-option", c, "a misspelt option (--labelkey)", lambda w, t, mp: conv(w.good, t, "--labelkey", "x"), "unrecognised"),
    ]


def _finetune_cases() -> list[Case]:
    c = "finetune"

    def data(kind, *extra):
        return lambda w, t, mp: ft(h5(t, variant(kind)), t, *TRAIN, *extra)

    return [
        Case("finetune-missing-train-file", c, "--train-file does not exist", lambda w, t, mp: ft(t / "nope.h5ad", t, *TRAIN), "no AnnData file"),
        Case("finetune-train-file-is-csv", c, "--train-file is a CSV text file", lambda w, t, mp: ft(text_file(t, "cells.csv"), t, *TRAIN)),
        Case("finetune-train-file-truncated", c, "--train-file .h5ad truncated", lambda w, t, mp: ft(truncated(t, w.good), t, *TRAIN)),
        Case("finetune-train-folder-not-converted", c, "--train-file is a folder convert did not write",
             lambda w, t, mp: ft(with_existing(t / "folder" / "notes.txt").parent, t, *TRAIN)),
        Case("finetune-missing-label-key", c, "--label-key names no obs column",
             lambda w, t, mp: cli(c, "--train-file", w.good, "--label-key", "celltype", *TRAIN, "--output-dir", t / "out", fresh=[t / "out"]),
             "not found"),
        Case("finetune-no-label-key", c, "no --label-key for classification", lambda w, t, mp: ft(w.good, t, *TRAIN, label=False)),
        Case("finetune-label-key-not-in-converted", c, "--label-key not stored in a converted folder",
             lambda w, t, mp: cli(c, "--train-file", w.converted, "--label-key", "donor", *TRAIN, "--output-dir", t / "out", fresh=[t / "out"])),
        Case("finetune-one-cell-class", c, "a class with a single cell", data("one_cell_class"), "1 cell"),
        Case("finetune-single-class", c, "every cell has the same label", data("single_class")),
        Case("finetune-missing-labels", c, "label column has a missing value", data("missing_labels"), "missing value"),
        Case("finetune-more-classes-than-test-cells", c, "8 classes, 32 cells: test split smaller than the classes",
             data("many_classes"), "8 classes"),
        Case("finetune-zero-cells", c, "AnnData with 0 cells", data("zero_cells")),
        Case("finetune-zero-genes", c, "AnnData with 0 genes", data("zero_genes")),
        Case("finetune-nan", c, "a NaN in the counts", data("nan"), "NaN"),
        Case("finetune-negative", c, "negative values (scaled data)", data("scaled"), "negative"),
        Case("finetune-log1p-as-counts", c, "--input-kind counts on log-normalised values",
             lambda w, t, mp: ft(h5(t, variant("log1p")), t, *TRAIN, "--input-kind", "counts"), "non-integer"),
        Case("finetune-bad-input-kind", c, "--input-kind tpm (unknown)", lambda w, t, mp: ft(w.good, t, *TRAIN, "--input-kind", "tpm"), "input_kind"),
        Case("finetune-unknown-preset", c, "--preset huge (unknown)",
             lambda w, t, mp: ft(w.good, t, "--preset", "huge", "--num_train_epochs", "1"), "huge"),
        Case("finetune-no-preset-no-model", c, "neither --preset nor --model", lambda w, t, mp: ft(w.good, t), "--preset"),
        Case("finetune-preset-and-model", c, "both --preset and --model",
             lambda w, t, mp: ft(w.good, t, *TRAIN, "--model", w.classifier), "exactly one"),
        Case("finetune-missing-model-folder", c, "--model folder does not exist",
             lambda w, t, mp: ft(w.good, t, "--model", t / "no_model", "--num_train_epochs", "1"), "no model folder"),
        Case("finetune-model-without-config", c, "--model folder without config.json",
             lambda w, t, mp: ft(w.good, t, "--model", model_copy(w, t, "no_config"), "--num_train_epochs", "1"), "config.json"),
        Case("finetune-model-mistyped-repo-id", c, "--model repo id that does not exist (Hub unreachable)",
             lambda w, t, mp: unreachable(mp, t) or ft(w.good, t, "--model", "org/no-such-model", "--num_train_epochs", "1"), "org/no-such-model"),
        Case("finetune-model-no-gene-overlap", c, "--model whose panel shares no gene with the data",
             lambda w, t, mp: ft(h5(t, variant("other_genes")), t, "--model", w.classifier, "--num_train_epochs", "1"), "overlap"),
        Case("finetune-epochs-zero", c, "--num_train_epochs 0", lambda w, t, mp: ft(w.good, t, "--preset", "tiny", "--num_train_epochs", "0"), "positive"),
        Case("finetune-epochs-negative", c, "--num_train_epochs -1", lambda w, t, mp: ft(w.good, t, "--preset", "tiny", "--num_train_epochs", "-1"), "positive"),
        Case("finetune-validation-fraction-one", c, "--validation-fraction 1.0",
             lambda w, t, mp: ft(w.good, t, *TRAIN, "--validation_fraction", "1.0"), r"\[0, 1\)"),
        Case("finetune-validation-fraction-negative", c, "--validation-fraction -0.1",
             lambda w, t, mp: ft(w.good, t, *TRAIN, "--validation_fraction", "-0.1"), r"\[0, 1\)"),
        Case("finetune-test-fraction-one", c, "--test-fraction 1.0", lambda w, t, mp: ft(w.good, t, *TRAIN, "--test-fraction", "1.0"), r"\[0, 1\)"),
        Case("finetune-test-fraction-negative", c, "--test-fraction -0.5", lambda w, t, mp: ft(w.good, t, *TRAIN, "--test-fraction", "-0.5"), r"\[0, 1\)"),
        Case("finetune-unknown-task", c, "--task protien (unknown)", lambda w, t, mp: ft(w.good, t, *TRAIN, "--task", "protien"), "unknown task"),
        Case("finetune-unknown-class-weighting", c, "--class-weighting weighted (unknown)",
             lambda w, t, mp: ft(w.good, t, *TRAIN, "--class-weighting", "weighted"), "class_weighting"),
        Case("finetune-malformed-config-overrides", c, "--config-overrides without '='",
             lambda w, t, mp: ft(w.good, t, *TRAIN, "--config-overrides", "pooling"), "field=value"),
        Case("finetune-unknown-config-field", c, "--config-overrides names no config field",
             lambda w, t, mp: ft(w.good, t, *TRAIN, "--config-overrides", "poolin=cls"), "poolin"),
        Case("finetune-invalid-config-value", c, "--config-overrides knn_k=0 (a value the config refuses)",
             lambda w, t, mp: ft(w.good, t, *TRAIN, "--config-overrides", "knn_k=0"), "knn_k must be >= 1"),
        Case("finetune-n-top-genes-zero", c, "--n-top-genes 0", lambda w, t, mp: ft(w.good, t, *TRAIN, "--n-top-genes", "0")),
        Case("finetune-n-top-genes-with-model", c, "--n-top-genes with --model (conflicting)",
             lambda w, t, mp: ft(w.good, t, "--model", w.classifier, "--num_train_epochs", "1", "--n-top-genes", "20"), "n-top-genes"),
        Case("finetune-batch-size-zero", c, "--per-device-train-batch-size 0",
             lambda w, t, mp: ft(w.good, t, *TRAIN, "--per_device_train_batch_size", "0")),
        Case("finetune-max-train-cells-zero", c, "--max-train-cells 0", lambda w, t, mp: ft(w.good, t, *TRAIN, "--max-train-cells", "0")),
        Case("finetune-min-cells-drops-all", c, "--min-cells-per-label larger than every class",
             lambda w, t, mp: ft(w.good, t, *TRAIN, "--min-cells-per-label", "1000")),
        Case("finetune-missing-layer", c, "--layer names no layer", lambda w, t, mp: ft(w.good, t, *TRAIN, "--layer", "spliced"), "not found"),
        Case("finetune-epochs-not-a-number", c, "--num_train_epochs one", lambda w, t, mp: ft(w.good, t, "--preset", "tiny", "--num_train_epochs", "one")),
        Case("finetune-unknown-flag", c, "an unknown flag (--num-epochs)",
             lambda w, t, mp: ft(w.good, t, "--preset", "tiny", "--num-epochs", "1"), "num-epochs"),
        Case("finetune-output-is-file", c, "--output-dir is an existing file",
             lambda w, t, mp: cli(c, "--train-file", w.good, "--label-key", "cell_type", "--output-dir", with_existing(t / "out"),
                                  *TRAIN, protect=[t / "out"])),
        Case("finetune-output-parent-is-file", c, "--output-dir's parent is a file",
             lambda w, t, mp: cli(c, "--train-file", w.good, "--label-key", "cell_type", "--output-dir", with_existing(t / "parent") / "out",
                                  *TRAIN, protect=[t / "parent"])),
        Case("finetune-output-holds-finished-run", c, "--output-dir holds a finished run, no --overwrite",
             lambda w, t, mp: cli(c, "--train-file", w.good, "--label-key", "cell_type", "--output-dir", finished_run(w, t), *TRAIN,
                                  protect=[t / "run"]), "finished run"),
        Case("finetune-output-foreign-folder", c, "--output-dir is a folder of the user's own files",
             lambda w, t, mp: cli(c, "--train-file", w.good, "--label-key", "cell_type", "--output-dir",
                                  with_existing(t / "mine" / "README.md", "# my notes\n").parent, *TRAIN, protect=[t / "mine"]),
             "not written by scrnalf finetune/pretrain"),
        Case("finetune-resume-other-data", c, "--resume_from_checkpoint on a run of other cells",
             lambda w, t, mp: cli(c, "--train-file", w.good, "--label-key", "cell_type", "--output-dir",
                                  with_existing(t / "run" / "split.json", json.dumps({"n_cells": 5})).parent, *TRAIN,
                                  "--resume_from_checkpoint", "true", protect=[t / "run"])),
    ]


def _pretrain_cases() -> list[Case]:
    c = "pretrain"
    return [
        Case("pretrain-missing-train-file", c, "--train-file does not exist", lambda w, t, mp: pt(t / "nope.h5ad", t, *TRAIN), "no AnnData file"),
        Case("pretrain-train-file-truncated", c, "--train-file .h5ad truncated", lambda w, t, mp: pt(truncated(t, w.good), t, *TRAIN)),
        Case("pretrain-label-key", c, "--label-key given to masked gene modelling",
             lambda w, t, mp: ft(w.good, t, *TRAIN, command="pretrain"), "does not apply"),
        Case("pretrain-freeze-encoder", c, "--freeze-encoder (nothing left to train)", lambda w, t, mp: pt(w.good, t, *TRAIN, "--freeze-encoder")),
        Case("pretrain-class-weighting", c, "--class-weighting balanced (a classification option)",
             lambda w, t, mp: pt(w.good, t, *TRAIN, "--class-weighting", "balanced")),
        Case("pretrain-no-preset", c, "neither --preset nor --model", lambda w, t, mp: pt(w.good, t), "--preset"),
        Case("pretrain-unknown-preset", c, "--preset giant (unknown)", lambda w, t, mp: pt(w.good, t, "--preset", "giant", "--num_train_epochs", "1"), "giant"),
        Case("pretrain-nan", c, "a NaN in the counts", lambda w, t, mp: pt(h5(t, variant("nan")), t, *TRAIN), "NaN"),
        Case("pretrain-zero-cells", c, "AnnData with 0 cells", lambda w, t, mp: pt(h5(t, variant("zero_cells")), t, *TRAIN)),
        Case("pretrain-epochs-zero", c, "--num_train_epochs 0", lambda w, t, mp: pt(w.good, t, "--preset", "tiny", "--num_train_epochs", "0"), "positive"),
        Case("pretrain-validation-fraction-out-of-range", c, "--validation-fraction 1.5",
             lambda w, t, mp: pt(w.good, t, *TRAIN, "--validation_fraction", "1.5"), r"\[0, 1\)"),
        Case("pretrain-model-no-gene-overlap", c, "--model whose panel shares no gene with the data",
             lambda w, t, mp: pt(h5(t, variant("other_genes")), t, "--model", w.masked, "--num_train_epochs", "1"), "overlap"),
        Case("pretrain-output-holds-finished-run", c, "--output-dir holds a finished run, no --overwrite",
             lambda w, t, mp: cli(c, "--train-file", w.good, "--output-dir", finished_run(w, t), *TRAIN, protect=[t / "run"]),
             "finished run"),
        Case("pretrain-output-parent-is-file", c, "--output-dir's parent is a file",
             lambda w, t, mp: cli("pretrain", "--train-file", w.good, "--output-dir", with_existing(t / "parent") / "out", *TRAIN,
                                  protect=[t / "parent"])),
    ]


def _compare_cases() -> list[Case]:
    c = "compare"
    return [
        Case("compare-missing-train-file", c, "--train-file does not exist", lambda w, t, mp: cmp(t / "nope.h5ad", t), "no AnnData file"),
        Case("compare-unknown-method", c, "--methods logreg,svm (unknown)", lambda w, t, mp: cmp(w.good, t, "--methods", "logreg,svm"), "svm"),
        Case("compare-duplicate-method", c, "--methods logreg,logreg", lambda w, t, mp: cmp(w.good, t, "--methods", "logreg,logreg"), "twice"),
        Case("compare-empty-methods", c, "--methods '' (none)", lambda w, t, mp: cmp(w.good, t, "--methods", "")),
        Case("compare-cv-one", c, "--cv 1", lambda w, t, mp: cmp(w.good, t, "--cv", "1")),
        Case("compare-cv-zero", c, "--cv 0", lambda w, t, mp: cmp(w.good, t, "--cv", "0")),
        Case("compare-cv-more-than-cells", c, "--cv 50 with 10 cells per class", lambda w, t, mp: cmp(w.good, t, "--cv", "50")),
        Case("compare-fold-out-of-range", c, "--folds 7 with --cv 3", lambda w, t, mp: cmp(w.good, t, "--folds", "7"), "--folds"),
        Case("compare-folds-not-integers", c, "--folds a,b", lambda w, t, mp: cmp(w.good, t, "--folds", "a,b"), "--folds"),
        Case("compare-missing-label-key", c, "--label-key names no obs column",
             lambda w, t, mp: cli(c, "--train-file", w.good, "--label-key", "celltype", "--output-dir", t / "cmp", "--methods", "logreg",
                                  fresh=[t / "cmp"]), "not found"),
        Case("compare-no-label-key", c, "no --label-key for classification", lambda w, t, mp: cmp(w.good, t, label=False)),
        Case("compare-task-without-scores", c, "--task masked_genes (nothing to score)",
             lambda w, t, mp: cmp(w.good, t, "--task", "masked_genes", label=False), "makes none to score"),
        Case("compare-unknown-task", c, "--task protien (unknown)", lambda w, t, mp: cmp(w.good, t, "--task", "protien"), "unknown task"),
        Case("compare-ensemble-zero", c, "--ensemble 0", lambda w, t, mp: cmp(w.good, t, "--ensemble", "0"), "ensemble"),
        Case("compare-one-cell-class", c, "a class with a single cell", lambda w, t, mp: cmp(h5(t, variant("one_cell_class")), t), "1 cell"),
        Case("compare-many-classes-few-cells", c, "8 classes of 4 cells with --cv 5",
             lambda w, t, mp: cmp(h5(t, variant("many_classes")), t, "--cv", "5")),
        Case("compare-missing-test-file", c, "--test-file does not exist",
             lambda w, t, mp: cmp(w.good, t, "--test-file", t / "nope.h5ad"), "no AnnData file"),
        Case("compare-test-file-no-gene-overlap", c, "--test-file shares no gene with --train-file",
             lambda w, t, mp: cmp(w.good, t, "--test-file", h5(t, variant("other_genes"), "other.h5ad"))),
        Case("compare-test-file-without-label", c, "--test-file lacks the label column",
             lambda w, t, mp: cmp(w.good, t, "--test-file", h5(t, ad.AnnData(cells_adata().X, var=cells_adata().var), "nolabel.h5ad")),
             "not found"),
        Case("compare-test-file-nan", c, "--test-file holds a NaN",
             lambda w, t, mp: cmp(w.good, t, "--test-file", h5(t, variant("nan"), "nan.h5ad")), "NaN"),
        Case("compare-test-file-other-labels", c, "--test-file whose labels share none with --train-file",
             lambda w, t, mp: cmp(w.good, t, "--test-file", h5(t, renamed_labels(), "renamed.h5ad")), "none of the test labels"),
        Case("compare-validation-fraction-one", c, "--validation-fraction 1.0",
             lambda w, t, mp: cmp(w.good, t, "--methods", "tiny", "--validation-fraction", "1.0", "--num-train-epochs", "1"), r"\[0, 1\)"),
        Case("compare-malformed-config-overrides", c, "--config-overrides without '='",
             lambda w, t, mp: cmp(w.good, t, "--config-overrides", "pooling"), "field=value"),
        Case("compare-unknown-class-weighting", c, "--class-weighting weighted (not a choice)",
             lambda w, t, mp: cmp(w.good, t, "--class-weighting", "weighted"), "invalid choice"),
        Case("compare-n-top-genes-zero", c, "--n-top-genes 0", lambda w, t, mp: cmp(w.good, t, "--n-top-genes", "0")),
        Case("compare-log1p-as-counts", c, "--input-kind counts on log-normalised values",
             lambda w, t, mp: cmp(h5(t, variant("log1p")), t, "--input-kind", "counts"), "non-integer"),
        Case("compare-output-parent-is-file", c, "--output-dir's parent is a file",
             lambda w, t, mp: cli(c, "--train-file", w.good, "--label-key", "cell_type", "--output-dir", with_existing(t / "p") / "cmp",
                                  "--methods", "logreg", "--cv", "3", protect=[t / "p"])),
    ]


def _model_on_anndata_cases(c: str) -> list[Case]:
    """``scrnalf predict`` / ``scrnalf embed``."""

    def run(source, t, *extra, model=None, w=None, **kwargs):
        return run_model(c, model if model is not None else w.classifier, source, t, *extra, **kwargs)

    def data(kind):
        return lambda w, t, mp: run(h5(t, variant(kind)), t, w=w)

    def broken(breakage, match=None):
        return Case(f"{c}-model-{breakage.replace('_', '-')}", c, f"--model folder: {breakage.replace('_', ' ')}",
                    lambda w, t, mp: run(w.good, t, model=model_copy(w, t, breakage), w=w), match)

    cases = [
        Case(f"{c}-missing-input", c, "--input does not exist", lambda w, t, mp: run(t / "nope.h5ad", t, w=w), "no AnnData file"),
        Case(f"{c}-input-is-directory", c, "--input is a folder", lambda w, t, mp: run(w.converted, t, w=w)),
        Case(f"{c}-input-truncated", c, "--input .h5ad truncated", lambda w, t, mp: run(truncated(t, w.good), t, w=w)),
        Case(f"{c}-output-is-input", c, "--output is the --input file",
             lambda w, t, mp: run(h5(t, cells_adata()), t, w=w, output=t / "bad.h5ad", protect=[t / "bad.h5ad"]), "must differ"),
        Case(f"{c}-output-exists", c, "--output exists, no --overwrite",
             lambda w, t, mp: run(w.good, t, w=w, output=Path(shutil.copy(w.predicted, t / "old.h5ad")), protect=[t / "old.h5ad"]),
             "--overwrite"),
        Case(f"{c}-overwrite-foreign-file", c, "--overwrite of a file predict/embed did not write",
             lambda w, t, mp: run(w.good, t, "--overwrite", w=w, output=Path(shutil.copy(w.good, t / "raw.h5ad")), protect=[t / "raw.h5ad"]),
             "not an .h5ad that scrnalf"),
        Case(f"{c}-batch-size-zero", c, "--batch-size 0", lambda w, t, mp: run(w.good, t, "--batch-size", "0", w=w), "positive"),
        Case(f"{c}-model-missing", c, "--model folder does not exist", lambda w, t, mp: run(w.good, t, model=t / "models" / "nope", w=w)),
        Case(f"{c}-model-mistyped-repo-id", c, "--model repo id that does not exist (Hub unreachable)",
             lambda w, t, mp: unreachable(mp, t) or run(w.good, t, model="org/no-such-model", w=w), "org/no-such-model"),
        broken("no_config", "config.json"),
        broken("truncated_weights"),
        Case(f"{c}-nan", c, "a NaN in the input", data("nan"), "NaN"),
        Case(f"{c}-no-gene-overlap", c, "input shares no gene with the model's panel", data("other_genes"), "overlap"),
        Case(f"{c}-zero-genes", c, "input with 0 genes", data("zero_genes")),
    ]
    if c == "embed":
        return cases
    return cases + [
        Case(f"{c}-input-is-csv", c, "--input is a CSV text file", lambda w, t, mp: run(text_file(t), t, w=w)),
        Case(f"{c}-input-hdf5-not-anndata", c, "--input is HDF5 but not AnnData", lambda w, t, mp: run(hdf5_not_anndata(t), t, w=w)),
        Case(f"{c}-output-parent-missing", c, "--output in a folder that does not exist",
             lambda w, t, mp: run(w.good, t, w=w, output=t / "nowhere" / "out.h5ad"), "does not exist"),
        Case(f"{c}-output-parent-is-file", c, "--output's parent is a file",
             lambda w, t, mp: run(w.good, t, w=w, output=with_existing(t / "parent") / "out.h5ad", protect=[t / "parent"])),
        Case(f"{c}-output-is-directory", c, "--output is an existing folder",
             lambda w, t, mp: run(w.good, t, w=w, output=copy_folder(w.converted, t), protect=[t / "converted"])),
        Case(f"{c}-read-only-output-dir", c, "--output in a read-only folder",
             lambda w, t, mp: cli(c, "--model", w.classifier, "--input", w.good, "--output", mkdir(t / "ro") / "out.h5ad",
                                  fresh=[t / "ro" / "out.h5ad"], context=lambda: read_only(t / "ro"))),
        Case(f"{c}-batch-size-negative", c, "--batch-size -5", lambda w, t, mp: run(w.good, t, "--batch-size", "-5", w=w), "positive"),
        Case(f"{c}-model-is-file", c, "--model is a file", lambda w, t, mp: run(w.good, t, model=w.good, w=w), "is a file"),
        Case(f"{c}-model-not-ours", c, "--model is a folder that is not a model (a converted dataset)",
             lambda w, t, mp: run(w.good, t, model=w.converted, w=w), "config.json"),
        Case(f"{c}-model-invalid-repo-id", c, "--model 'not a//repo' (neither folder nor repo id)",
             lambda w, t, mp: run(w.good, t, model="not a//repo", w=w), "repo id"),
        broken("config_not_json"),
        broken("foreign_config"),
        broken("no_weights"),
        broken("no_processor"),
        broken("panel_mismatch"),
        Case(f"{c}-revision-with-local-folder", c, "--revision with a local --model folder (conflicting)",
             lambda w, t, mp: run(w.good, t, "--revision", "abc123", w=w), "local folder"),
        Case(f"{c}-masked-gene-model", c, "--model is a masked-gene (pretraining) model: no head",
             lambda w, t, mp: run(w.good, t, model=w.masked, w=w), "embed"),
        Case(f"{c}-missing-layer", c, "--layer names no layer", lambda w, t, mp: run(w.good, t, "--layer", "spliced", w=w), "layer"),
        Case(f"{c}-use-raw-without-raw", c, "--use-raw on an input without .raw", lambda w, t, mp: run(w.good, t, "--use-raw", w=w), "raw"),
        Case(f"{c}-layer-and-use-raw", c, "--layer and --use-raw together (conflicting)",
             lambda w, t, mp: run(w.good, t, "--layer", "X", "--use-raw", w=w), "not both"),
        Case(f"{c}-inf", c, "an infinite value in the input", data("inf"), "infinite"),
        Case(f"{c}-negative", c, "scaled (negative) values in the input", data("scaled"), "negative"),
        Case(f"{c}-log1p-for-counts-model", c, "log-normalised input for a model trained on counts", data("log1p"), "non-integer"),
        Case(f"{c}-low-gene-overlap", c, "input measures 10 of the 60 panel genes", data("low_overlap"), "overlap"),
        Case(f"{c}-zero-cells", c, "input with 0 cells", data("zero_cells")),
        Case(f"{c}-duplicate-gene-ids", c, "input genes share an Ensembl id", data("duplicate_gene_ids")),
        Case(f"{c}-disk-full", c, "fault: the disk fills while the output is written (earlier output kept)",
             lambda w, t, mp: disk_full(mp) or run(w.good, t, "--overwrite", w=w, output=Path(shutil.copy(w.predicted, t / "old.h5ad")),
                                                  protect=[t / "old.h5ad"])),
    ]


def _species_cases() -> list[Case]:
    """Cross-species models: species, ortholog tables, genes of the wrong species."""

    def species_ft(w, t, *extra):
        return ft(w.good, t, *TRAIN, "--species", "human", "--model-species", "human,mouse", "--orthologs", w.orthologs, *extra)

    def bad_table(kind):
        return lambda w, t, mp: ft(w.good, t, *TRAIN, "--species", "human", "--model-species", "human,mouse",
                                   "--orthologs", species_table(t, kind))

    def run(w, t, *extra, source=None, model=None):
        return run_model("predict", model or w.species_model, source or w.good, t, *extra)

    return [
        Case("species-finetune-unknown-species", "finetune", "--species rat for a human+mouse model",
             lambda w, t, mp: ft(w.good, t, *TRAIN, "--species", "rat", "--model-species", "human,mouse", "--orthologs",
                                 w.orthologs), "rat"),
        Case("species-finetune-no-vocabulary", "finetune", "--model-species human,zebrafish: no ortholog table has zebrafish",
             lambda w, t, mp: ft(w.good, t, *TRAIN, "--species", "human", "--model-species", "human,zebrafish"), "zebrafish"),
        Case("species-orthologs-missing", "finetune", "--orthologs names a file that does not exist",
             lambda w, t, mp: species_ft(w, t, "--orthologs", t / "nope.tsv")),
        Case("species-orthologs-missing-columns", "finetune", "ortholog table without species columns",
             bad_table("missing_columns"), "columns"),
        Case("species-orthologs-duplicate-pair", "finetune", "ortholog table listing a pair twice", bad_table("duplicate_pair"),
             "GENE0"),
        Case("species-orthologs-conflicting-pair", "finetune", "ortholog table: a one-to-one gene paired twice",
             bad_table("conflicting_pair"), "one2one"),
        Case("species-finetune-mixed-file-without-key", "finetune", "a file mixing human and mouse genes, --species human",
             lambda w, t, mp: ft(h5(t, mixed_species_adata()), t, *TRAIN, "--species", "human", "--model-species",
                                 "human,mouse", "--orthologs", w.orthologs), "--species-key"),
        Case("species-finetune-species-and-key", "finetune", "--species and --species-key together (conflicting)",
             lambda w, t, mp: species_ft(w, t, "--species-key", "cell_type"), "not both"),
        Case("species-finetune-missing-species-key", "finetune", "--species-key names no obs column",
             lambda w, t, mp: ft(w.good, t, *TRAIN, "--species-key", "organism", "--orthologs", w.orthologs), "organism"),
        Case("species-compare-test-species-missing", "compare", "--test-file of a cross-species compare without --test-species",
             lambda w, t, mp: cmp(w.good, t, "--species", "human", "--model-species", "human,mouse", "--orthologs", w.orthologs,
                                  "--test-file", w.good), "--test-species"),
        Case("species-predict-unknown-species", "predict", "--species rat for a human+mouse model",
             lambda w, t, mp: run(w, t, "--species", "rat"), "unknown species 'rat'"),
        Case("species-predict-species-missing", "predict", "no --species for a human+mouse model",
             lambda w, t, mp: run(w, t), "--species"),
        Case("species-predict-wrong-species-genes", "predict", "human genes given as --species mouse",
             lambda w, t, mp: run(w, t, "--species", "mouse"), "look like human genes"),
        Case("species-predict-species-for-one-vocabulary", "predict", "--species mouse for a model without species",
             lambda w, t, mp: run(w, t, "--species", "mouse", model=w.classifier), "knows no species"),
        Case("species-api-processor-unknown-species", "api", "processor(adata, species='zebrafish')",
             lambda w, t, mp: api(lambda: __import__("scrnalf_hf").ScrnaLongformerProcessor.from_pretrained(
                 str(w.species_model))(cells_adata(), species="zebrafish")), "zebrafish"),
    ]


def disk_full(mp):
    from scrnalf_hf import inference

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    mp.setattr(inference._FileWriter, "add", fail)


def _push_cases() -> list[Case]:
    c = "push"

    def push(folder, repo_id=REPO_ID, protect=True):
        return cli(c, "--model-dir", folder, "--repo-id", repo_id, protect=[folder] if protect and Path(folder).exists() else [])

    def broken(breakage, bad, match=None):
        return Case(f"push-{breakage.replace('_', '-')}", c, bad, lambda w, t, mp: unreachable(mp, t) or push(hub_copy(w, t, breakage)), match)

    return [
        Case("push-missing-folder", c, "--model-dir does not exist", lambda w, t, mp: push(t / "nope"), "does not exist"),
        Case("push-folder-is-file", c, "--model-dir is a file", lambda w, t, mp: push(with_existing(t / "model"))),
        broken("no_card", "the model card (README.md) is missing", "README.md"),
        broken("malformed_yaml", "README.md has malformed YAML metadata", "YAML"),
        broken("no_weights", "incomplete folder: no model.safetensors", "weights"),
        broken("truncated_weights", "model.safetensors truncated", "safetensors"),
        broken("no_config", "incomplete folder: no config.json", "config.json"),
        broken("config_not_json", "config.json is not JSON", "JSON"),
        broken("no_processor", "incomplete folder: no preprocessor_config.json", "preprocessor_config.json"),
        broken("pickled_weights", "pickled weights only (pytorch_model.bin)", "pickled"),
        broken("no_model_code", "remote code modeling_scrnalf.py missing", "modeling_scrnalf.py"),
        broken("panel_mismatch", "processor panel does not match config n_genes", "n_genes"),
        broken("foreign_weights", "weights of another model", "lacks"),
        Case("push-repo-id-no-namespace", c, "--repo-id without ORG/", lambda w, t, mp: push(hub_copy(w, t), "no-namespace"), "repo id"),
        Case("push-repo-id-two-slashes", c, "--repo-id org/two/slashes", lambda w, t, mp: push(hub_copy(w, t), "org/two/slashes"), "repo id"),
        Case("push-hub-unreachable", c, "fault: the Hub cannot be reached", lambda w, t, mp: unreachable(mp, t) or push(hub_copy(w, t))),
    ]


def _benchmark_cases() -> list[Case]:
    c = "benchmark"
    return [
        Case("benchmark-report-missing-folder", c, "report --output-dir does not exist",
             lambda w, t, mp: cli(c, "report", "--output-dir", t / "nope")),
        Case("benchmark-report-empty-folder", c, "report --output-dir holds no results",
             lambda w, t, mp: cli(c, "report", "--output-dir", t), "no inference"),
        Case("benchmark-report-corrupt-json", c, "report: inference.json is not JSON",
             lambda w, t, mp: cli(c, "report", "--output-dir", with_existing(t / "b" / "inference.json", "{oops").parent)),
        Case("benchmark-report-wrong-json", c, "report: inference.json of another shape",
             lambda w, t, mp: cli(c, "report", "--output-dir", with_existing(t / "b" / "inference.json", "[1, 2]").parent)),
        Case("benchmark-report-missing-readme", c, "report --readme does not exist",
             lambda w, t, mp: cli(c, "report", "--output-dir", REPO_BENCHMARKS, "--readme", t / "README.md", fresh=[t / "README.md"])),
        Case("benchmark-report-readme-without-markers", c, "report --readme without the targets markers",
             lambda w, t, mp: cli(c, "report", "--output-dir", REPO_BENCHMARKS, "--readme", with_existing(t / "README.md", "# Hi\n"),
                                  protect=[t / "README.md"])),
        Case("benchmark-unknown-benchmark", c, "benchmark speed (no such benchmark)", lambda w, t, mp: cli(c, "speed", "--output-dir", t), "invalid choice"),
    ]


def _presets_cases() -> list[Case]:
    c = "presets"
    return [
        Case("presets-n-genes-zero", c, "--n-genes 0", lambda w, t, mp: cli(c, "--n-genes", "0"), "positive"),
        Case("presets-num-labels-zero", c, "--num-labels 0 (a classifier of no class)", lambda w, t, mp: cli(c, "--num-labels", "0"), "positive"),
        Case("presets-n-genes-not-a-number", c, "--n-genes many", lambda w, t, mp: cli(c, "--n-genes", "many"), "invalid int"),
    ]


def scl(train, t, *extra):
    """A scaling command line on ``train`` into ``t/sc`` (which must not be left); later flags win."""
    return cli("scaling", "--train-file", train, "--label-key", "cell_type", "--output-dir", t / "sc", "--methods", "logreg",
               "--sizes", "12", "--repeats", "1", *extra, fresh=[t / "sc"])


def _finished_scaling(t: Path) -> Path:
    folder = t / "done"
    folder.mkdir()
    (folder / "scaling.json").write_text('{"settings": {}, "rows": []}\n')
    return folder


def _scaling_cases() -> list[Case]:
    c = "scaling"
    return [
        Case("scaling-size-larger-than-data", c, "--sizes 1000 with 30 cells", lambda w, t, mp: scl(w.good, t, "--sizes", "1000"), "exceed"),
        Case("scaling-size-smaller-than-classes", c, "--sizes 2 with 3 classes", lambda w, t, mp: scl(w.good, t, "--sizes", "2"), "too small"),
        Case("scaling-size-zero", c, "--sizes 0,12", lambda w, t, mp: scl(w.good, t, "--sizes", "0,12"), "positive"),
        Case("scaling-sizes-not-numbers", c, "--sizes small,large", lambda w, t, mp: scl(w.good, t, "--sizes", "small,large"), "--sizes"),
        Case("scaling-size-twice", c, "--sizes 12,12", lambda w, t, mp: scl(w.good, t, "--sizes", "12,12"), "twice"),
        Case("scaling-unknown-method", c, "--methods logreg,svm (unknown)", lambda w, t, mp: scl(w.good, t, "--methods", "logreg,svm"), "svm"),
        Case("scaling-missing-label-key", c, "--label-key names no obs column",
             lambda w, t, mp: scl(w.good, t, "--label-key", "celltype"), "not found"),
        Case("scaling-repeats-zero", c, "--repeats 0", lambda w, t, mp: scl(w.good, t, "--repeats", "0"), "--repeats"),
        Case("scaling-test-fraction-one", c, "--test-fraction 1.0", lambda w, t, mp: scl(w.good, t, "--test-fraction", "1.0"), "--test-fraction"),
        Case("scaling-epoch-budget-zero", c, "--epoch-budget-cells 0", lambda w, t, mp: scl(w.good, t, "--epoch-budget-cells", "0"), "budget"),
        Case("scaling-pretrained-missing", c, "--pretrained names no model",
             lambda w, t, mp: scl(w.good, t, "--pretrained", str(t / "nope")), "nope"),
        Case("scaling-output-has-results", c, "--output-dir holds an earlier scaling.json, no --resume",
             lambda w, t, mp: (lambda d: cli("scaling", "--train-file", w.good, "--label-key", "cell_type", "--output-dir", d,
                                              "--methods", "logreg", "--sizes", "12", protect=[d]))(_finished_scaling(t)), "--resume"),
    ]


def _recommend_cases() -> list[Case]:
    c = "recommend"

    def rec(*extra):
        question = {"--n-cells": "5000", "--n-genes": "2000", "--n-classes": "8"}
        for flag, value in zip(extra[::2], extra[1::2]):
            question[flag] = value
        return cli(c, *[item for pair in question.items() for item in pair])

    return [
        Case("recommend-n-cells-zero", c, "--n-cells 0", lambda w, t, mp: rec("--n-cells", "0"), "--n-cells"),
        Case("recommend-n-cells-negative", c, "--n-cells -100", lambda w, t, mp: rec("--n-cells", "-100"), "--n-cells"),
        Case("recommend-n-genes-zero", c, "--n-genes 0", lambda w, t, mp: rec("--n-genes", "0"), "--n-genes"),
        Case("recommend-one-class", c, "--n-classes 1", lambda w, t, mp: rec("--n-classes", "1"), "at least 2"),
        Case("recommend-budget-zero", c, "--budget-minutes 0", lambda w, t, mp: rec("--budget-minutes", "0"), "--budget-minutes"),
        Case("recommend-table-missing", c, "--table names no file", lambda w, t, mp: rec("--table", str(t / "nope.json")), "no measured"),
    ]


def _search_cases() -> list[Case]:
    c = "search"

    def srch(*extra):
        return lambda w, t, mp: cli(c, "--train-file", w.good, "--label-key", "cell_type", "--output-dir", t / "search",
                                    *extra, fresh=[t / "search"])

    return [
        Case("search-zero-trials", c, "--trials 0", srch("--trials", "0"), "--trials"),
        Case("search-unknown-attention", c, "--attention-types knn,sparse", srch("--attention-types", "knn,sparse"), "sparse"),
        Case("search-max-epochs-zero", c, "--max-epochs 0", srch("--max-epochs", "0"), "--max-epochs"),
        Case("search-unknown-base-preset", c, "--base-preset huge", srch("--base-preset", "huge"), "huge"),
        Case("search-missing-label-key", c, "--label-key names no obs column",
             lambda w, t, mp: cli(c, "--train-file", w.good, "--label-key", "celltype", "--output-dir", t / "search",
                                  fresh=[t / "search"]), "not found"),
    ]


REPO_BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks" / "cpu-2core"


def _api_cases() -> list[Case]:
    c = "api"

    def proc_call(matrix, **kwargs):
        return lambda w, t, mp: api(lambda: processor()(matrix, **kwargs))

    def open_cells_call(source, **kwargs):
        from scrnalf_hf.data import open_cells

        return lambda: open_cells(source, progress=False, **kwargs)

    counts = cells_adata().X
    nan = counts.copy()
    nan[0, 0] = np.nan
    return [
        Case("api-processor-nan", c, "ScrnaLongformerProcessor on a matrix with NaN", proc_call(nan), "NaN"),
        Case("api-processor-negative", c, "processor on negative values", proc_call(counts - 5), "negative"),
        Case("api-processor-fractional-counts", c, "processor (counts) on non-integer values", proc_call(counts + 0.5), "non-integer"),
        Case("api-processor-strings", c, "processor on a matrix of strings", proc_call(counts.astype(str)), "numeric"),
        Case("api-processor-3d", c, "processor on a 3-D array", proc_call(counts[None]), "2-D"),
        Case("api-processor-1d", c, "processor on a 1-D vector (one cell)", proc_call(counts[0]), "2-D"),
        Case("api-processor-wrong-gene-count", c, "processor on 40 genes without gene_names", proc_call(counts[:, :40]), "gene_names"),
        Case("api-processor-gene-names-length", c, "gene_names shorter than the matrix",
             proc_call(counts, gene_names=[f"GENE{i}" for i in range(10)]), "gene names"),
        Case("api-processor-no-overlap", c, "processor on genes outside the panel",
             proc_call(counts, gene_names=[f"OTHER{i}" for i in range(N_GENES)]), "overlap"),
        Case("api-processor-anndata-nan", c, "processor on an AnnData with NaN", lambda w, t, mp: api(lambda: processor()(variant("nan"))), "NaN"),
        Case("api-processor-anndata-missing-layer", c, "processor on an AnnData, layer= that does not exist",
             lambda w, t, mp: api(lambda: processor()(cells_adata(), layer="spliced")), "layer"),
        Case("api-processor-layer-and-use-raw", c, "processor on an AnnData with layer= and use_raw=True",
             lambda w, t, mp: api(lambda: processor()(cells_adata(), layer="X", use_raw=True)), "not both"),
        Case("api-processor-empty-panel", c, "ScrnaLongformerProcessor(gene_symbols=[])",
             lambda w, t, mp: api(lambda: type(processor())(gene_symbols=[])), "empty"),
        Case("api-processor-bad-input-kind", c, "ScrnaLongformerProcessor(input_kind='tpm')",
             lambda w, t, mp: api(lambda: type(processor())(gene_symbols=["A"], input_kind="tpm")), "input_kind"),
        Case("api-predict-masked-model", c, "inference.predict with a masked-gene model",
             lambda w, t, mp: api(api_predict(w, cells_adata(), model=w.masked)), "embed"),
        Case("api-predict-batch-size-zero", c, "inference.predict(batch_size=0)",
             lambda w, t, mp: api(api_predict(w, cells_adata(), batch_size=0)), "batch_size"),
        Case("api-predict-nan", c, "inference.predict on an AnnData with NaN", lambda w, t, mp: api(api_predict(w, variant("nan"))), "NaN"),
        Case("api-predict-no-overlap", c, "inference.predict on other genes", lambda w, t, mp: api(api_predict(w, variant("other_genes"))), "overlap"),
        Case("api-predict-use-raw-without-raw", c, "inference.predict(use_raw=True) without .raw",
             lambda w, t, mp: api(api_predict(w, cells_adata(), use_raw=True)), "raw"),
        Case("api-embed-log1p", c, "inference.embed of log-normalised values by a counts model",
             lambda w, t, mp: api(api_embed(w, variant("log1p"))), "non-integer"),
        Case("api-load-model-missing", c, "inference.load_model of a missing folder",
             lambda w, t, mp: api(lambda: __import__("scrnalf_hf.inference").inference.load_model(str(t / "nope"))), "no model folder"),
        Case("api-open-cells-bad-input-kind", c, "open_cells(input_kind='tpm')",
             lambda w, t, mp: api(open_cells_call(w.good, input_kind="tpm")), "input_kind"),
        Case("api-open-cells-kind-mismatch", c, "open_cells(converted counts folder, input_kind='log1p')",
             lambda w, t, mp: api(open_cells_call(w.converted, input_kind="log1p")), "log1p"),
        Case("api-convert-in-memory-negative", c, "convert_anndata of an in-memory AnnData with negative values",
             lambda w, t, mp: api(lambda: __import__("scrnalf_hf.data.convert").data.convert.convert_anndata(variant("negative"), t / "out"),
                                  fresh=[t / "out"]), "negative"),
        Case("api-config-unknown-preset", c, "ScrnaLongformerConfig.from_preset('huge')",
             lambda w, t, mp: api(lambda: __import__("scrnalf_hf").ScrnaLongformerConfig.from_preset("huge", n_genes=10)), "huge"),
        Case("api-config-invalid-value", c, "ScrnaLongformerConfig.from_preset('tiny', n_genes=0)",
             lambda w, t, mp: api(lambda: __import__("scrnalf_hf").ScrnaLongformerConfig.from_preset("tiny", n_genes=0)), "n_genes must be >= 1"),
        Case("api-model-wrong-expression-shape", c, "model(expression=) with the wrong number of genes",
             lambda w, t, mp: api(lambda: __import__("scrnalf_hf").inference.load_model(str(w.classifier))[0](
                 expression=__import__("torch").ones(2, 7))), "genes"),
        Case("api-push-invalid-repo-id", c, "push_to_hub(repo_id='no-namespace')",
             lambda w, t, mp: api(lambda: __import__("scrnalf_hf.hub.push").hub.push.push_to_hub(hub_copy(w, t), "no-namespace")), "repo id"),
    ]


def with_obs(adata: ad.AnnData, **columns) -> ad.AnnData:
    for name, values in columns.items():
        adata.obs[name] = values
    return adata


def _trajectory_cases() -> list[Case]:
    """``scrnalf finetune --task trajectory`` and ``scrnalf_hf.tl.pseudotime``."""
    c = "finetune"
    traj = ("--task", "trajectory", *TRAIN)

    def time_data(**columns):
        return lambda w, t, mp: ft(h5(t, with_obs(cells_adata(), **columns)), t, *traj, "--time-key", "time", label=False)

    return [
        Case("finetune-trajectory-time-key-missing", c, "--time-key names no obs column",
             lambda w, t, mp: ft(w.good, t, *traj, "--time-key", "day", label=False), "day"),
        Case("finetune-trajectory-no-time-key", c, "--task trajectory without --time-key",
             lambda w, t, mp: ft(w.good, t, *traj, label=False), "--time-key"),
        Case("finetune-trajectory-time-key-not-numeric", c, "--time-key column of words",
             time_data(time=["early", "late"] * 15), "numeric"),
        Case("finetune-trajectory-time-key-nan", c, "--time-key column with a missing time",
             time_data(time=[np.nan] + [float(i) for i in range(29)]), "NaN|missing"),
        Case("finetune-trajectory-time-point-key-missing", c, "--time-point-key names no obs column",
             lambda w, t, mp: ft(h5(t, with_obs(cells_adata(), time=[float(i) for i in range(30)])), t, *traj,
                                 "--time-key", "time", "--time-point-key", "day", label=False), "day"),
        Case("finetune-trajectory-time-point-key-not-numeric", c, "--time-point-key column of words",
             lambda w, t, mp: ft(h5(t, with_obs(cells_adata(), time=[float(i) for i in range(30)], day=["d0", "d7"] * 15)), t,
                                 *traj, "--time-key", "time", "--time-point-key", "day", label=False), "numeric"),
        Case("finetune-time-point-key-classification", c, "--time-point-key on a classification task",
             lambda w, t, mp: ft(h5(t, with_obs(cells_adata(), day=[float(i % 3) for i in range(30)])), t, *TRAIN,
                                 "--time-point-key", "day"), "trajectory"),
        Case("predict-time-point-key-classifier", "predict", "predict --time-point-key with a classifier (no time conditioning)",
             lambda w, t, mp: run_model("predict", w.classifier, h5(t, with_obs(cells_adata(), day=[float(i % 3) for i in range(30)])), t,
                                        "--time-point-key", "day"), "time points"),
        Case("predict-protein-key-rna-classifier", "predict", "predict --protein-key with a classifier that reads RNA only",
             lambda w, t, mp: run_model("predict", w.classifier, w.good, t, "--protein-key", "protein_expression"),
             "does not read proteins"),
        Case("api-pseudotime-classifier", "api", "tl.pseudotime with a classifier (no trajectory head)",
             lambda w, t, mp: api(lambda: __import__("scrnalf_hf").tl.pseudotime(cells_adata(), w.classifier)), "trajectory head"),
    ]


def _interpret_cases() -> list[Case]:
    """``scrnalf grn`` / ``explain`` / ``perturb`` (on the 60-gene tiny classifier)."""

    def grn(w, t, *extra, model=None, output=None):
        output = t / "edges.tsv" if output is None else output
        return cli("grn", "--model", model or w.classifier, "--input", w.good, "--output", output, *extra,
                   fresh=[output, output.with_suffix(".html"), output.with_suffix(".png")])

    def into(command, w, t, *extra, model=None):
        return cli(command, "--model", model or w.classifier, "--input", w.good, "--output-dir", t / "out", *extra, fresh=[t / "out"])

    return [
        Case("grn-missing-input", "grn", "--input does not exist",
             lambda w, t, mp: cli("grn", "--model", w.classifier, "--input", t / "nope.h5ad", "--output", t / "e.tsv", fresh=[t / "e.tsv"]),
             "no AnnData file"),
        Case("grn-unknown-group-key", "grn", "--group-by names no obs column", lambda w, t, mp: grn(w, t, "--group-by", "donor"), "donor"),
        Case("grn-output-exists", "grn", "--output exists, no --overwrite",
             lambda w, t, mp: cli("grn", "--model", w.classifier, "--input", w.good, "--output", with_existing(t / "edges.tsv"),
                                  protect=[t / "edges.tsv"]), "--overwrite"),
        Case("grn-heatmap-gene-not-in-panel", "grn", "--heatmap-genes outside the panel",
             lambda w, t, mp: grn(w, t, "--heatmap-genes", "GENE1,CD19"), "CD19"),
        Case("grn-layer-out-of-range", "grn", "--layers 7 of a 1-layer model", lambda w, t, mp: grn(w, t, "--layers", "7"), "layer"),
        Case("explain-masked-model", "explain", "--model without a classification head (masked-gene model)",
             lambda w, t, mp: into("explain", w, t, model=w.masked), "classification head"),
        Case("explain-label-key-missing", "explain", "--label-key names no obs column",
             lambda w, t, mp: into("explain", w, t, "--label-key", "donor"), "donor"),
        Case("explain-unknown-class", "explain", "--labels names a class the model does not know",
             lambda w, t, mp: into("explain", w, t, "--labels", "delta"), "delta"),
        Case("explain-n-top-zero", "explain", "--n-top 0", lambda w, t, mp: into("explain", w, t, "--n-top", "0"), "n_top"),
        Case("perturb-gene-not-in-panel", "perturb", "--genes names a gene outside the panel",
             lambda w, t, mp: into("perturb", w, t, "--genes", "GENE1,CD19"), "CD19"),
        Case("perturb-group-without-cells", "perturb", "--group selects no cells",
             lambda w, t, mp: into("perturb", w, t, "--genes", "GENE1", "--group-by", "cell_type", "--group", "type9"), "no cells"),
        Case("perturb-group-without-group-by", "perturb", "--group without --group-by",
             lambda w, t, mp: into("perturb", w, t, "--genes", "GENE1", "--group", "type0"), "--group-by"),
        Case("perturb-unknown-target-label", "perturb", "--target-label the model does not know",
             lambda w, t, mp: into("perturb", w, t, "--genes", "GENE1", "--target-label", "delta"), "delta"),
        Case("perturb-target-label-masked-model", "perturb", "--target-label on a model without a classifier",
             lambda w, t, mp: into("perturb", w, t, "--genes", "GENE1", "--target-label", "alpha", model=w.masked), "classif"),
        Case("perturb-rank-without-target", "perturb", "--rank-genes without --target-label",
             lambda w, t, mp: into("perturb", w, t, "--genes", "GENE1", "--rank-genes", "GENE2,GENE3"), "--target-label"),
    ]


def soma_store(t: Path, adata: ad.AnnData | None = None) -> Path:
    """A local SOMA experiment of ``adata`` (default: the 30 good cells) in ``t/store``."""
    from scrnalf_hf.data.soma import write_soma

    write_soma(cells_adata() if adata is None else adata, t / "store")
    return t / "store"


def _soma_cases() -> list[Case]:
    """``scrnalf pretrain / finetune --soma-uri`` (TileDB-SOMA streaming) and the stream's API."""
    if __import__("importlib").util.find_spec("tiledbsoma_ml") is None:
        return []
    c = "pretrain"

    def soma(w, t, *extra, store=None, command=c):
        store = soma_store(t) if store is None else store
        return cli(command, "--soma-uri", store, "--output-dir", t / "out", *TRAIN, *extra, fresh=[t / "out"])

    def too_many_processes(w, t, mp):
        from scrnalf_hf.data.soma import open_soma

        cells = open_soma(soma_store(t))
        mp.setenv("RANK", "0")
        mp.setenv("WORLD_SIZE", "64")
        return api(lambda: cells.with_targets(None).select(np.arange(cells.n_cells)))

    return [
        Case("soma-uri-missing", c, "--soma-uri does not exist",
             lambda w, t, mp: soma(w, t, store=t / "nope"), "does not exist"),
        Case("soma-uri-not-an-experiment", c, "--soma-uri is a folder but not a SOMA experiment (a convert folder)",
             lambda w, t, mp: soma(w, t, store=w.converted), "not a SOMA experiment"),
        Case("soma-measurement-missing", c, "--measurement names no measurement of the experiment",
             lambda w, t, mp: soma(w, t, "--measurement", "ATAC"), "ATAC"),
        Case("soma-obs-filter-no-cells", c, "--obs-filter selects no cells",
             lambda w, t, mp: soma(w, t, "--obs-filter", "cell_type == 'type9'"), "no cells"),
        Case("soma-obs-filter-malformed", c, "--obs-filter is not a valid SOMA value filter",
             lambda w, t, mp: soma(w, t, "--obs-filter", "cell_type =="), "filter"),
        Case("soma-var-filter-no-genes", c, "--var-filter selects no genes",
             lambda w, t, mp: soma(w, t, "--var-filter", "var_id == 'CD19'"), "no genes"),
        Case("soma-layer-missing", c, "--soma-layer names no X layer",
             lambda w, t, mp: soma(w, t, "--soma-layer", "normalized"), "normalized"),
        Case("soma-too-little-gene-overlap", c, "--model whose panel shares too few genes with the store's var",
             lambda w, t, mp: cli(c, "--soma-uri", soma_store(t, variant("other_genes")), "--model", w.masked,
                                  "--num_train_epochs", "1", "--output-dir", t / "out", fresh=[t / "out"]), "overlap"),
        Case("soma-and-train-file", c, "both --soma-uri and --train-file",
             lambda w, t, mp: soma(w, t, "--train-file", w.good), "exactly one source"),
        Case("soma-filter-without-uri", c, "--obs-filter with --train-file (no SOMA experiment)",
             lambda w, t, mp: pt(w.good, t, *TRAIN, "--obs-filter", "cell_type == 'type1'"), "--soma-uri"),
        Case("soma-finetune-label-key-missing", "finetune", "finetune --soma-uri with a --label-key the obs lacks",
             lambda w, t, mp: soma(w, t, "--label-key", "donor", command="finetune"), "donor"),
        Case("api-soma-world-size-above-cells", "api", "more processes (WORLD_SIZE 64) than streamed cells (30)",
             too_many_processes, "processes"),
        *_soma_inference_cases(),
    ]


def _soma_inference_cases() -> list[Case]:
    """``scrnalf embed / predict --soma-uri`` (one process per block of cells)."""
    c = "embed"

    def embed_soma(w, t, *extra, store=None):
        store = soma_store(t) if store is None else store
        return cli(c, "--model", w.classifier, "--soma-uri", store, "--output", t / "out.h5ad", *extra, fresh=[t / "out.h5ad"])

    def too_many_processes(w, t, mp):
        mp.setenv("RANK", "0")
        mp.setenv("WORLD_SIZE", "64")
        return embed_soma(w, t)

    return [
        Case("soma-embed-world-size-above-cells", c, "embed --soma-uri by more processes (WORLD_SIZE 64) than cells (30)",
             too_many_processes, "processes"),
        Case("soma-embed-obs-filter-no-cells", c, "embed --soma-uri with an --obs-filter that selects no cells",
             lambda w, t, mp: embed_soma(w, t, "--obs-filter", "cell_type == 'type9'"), "no cells"),
        Case("soma-embed-and-input", c, "embed with both --soma-uri and --input",
             lambda w, t, mp: embed_soma(w, t, "--input", w.good), "exactly one source"),
        Case("soma-predict-layer", "predict", "predict --soma-uri with --layer (an AnnData option)",
             lambda w, t, mp: cli("predict", "--model", w.classifier, "--soma-uri", soma_store(t), "--layer", "counts",
                                  "--output", t / "out.h5ad", fresh=[t / "out.h5ad"]), "--soma-layer"),
    ]


def cite_adata(proteins=None) -> ad.AnnData:
    """The good 30 cells with 4 proteins in ``obsm["protein_expression"]`` (a DataFrame indexed
    by the cell ids: anndata itself refuses any other index)."""
    adata = cells_adata()
    values = np.arange(120, dtype=np.float32).reshape(30, 4) % 17 if proteins is None else proteins
    columns = [f"CD{i}" for i in range(np.shape(values)[1])]
    adata.obsm["protein_expression"] = pd.DataFrame(values, index=adata.obs_names, columns=columns)
    return adata


def h5mu(t: Path, rna: ad.AnnData | None, prot: ad.AnnData | None, name: str = "cells.h5mu") -> Path:
    import mudata

    modalities = {name: modality for name, modality in (("rna", rna), ("prot", prot)) if modality is not None}
    path = t / name
    mudata.MuData(modalities).write_h5mu(path)
    return path


def prot_modality(index=None, n_proteins: int = 4, values=None) -> ad.AnnData:
    index = pd.Index([f"cell{i}" for i in range(30)]) if index is None else pd.Index(index)
    values = np.ones((len(index), n_proteins), dtype=np.float32) * 5 if values is None else values
    return ad.AnnData(values, obs=pd.DataFrame(index=index), var=pd.DataFrame(index=[f"CD{i}" for i in range(n_proteins)]))


def _multimodal_cases() -> list[Case]:
    """RNA + protein (CITE-seq) inputs of ``convert``, ``finetune --task protein`` and the processor."""
    protein_task = ("--task", "protein", *TRAIN)

    def conv(source, t, *extra):
        return cli("convert", source, t / "out", "--protein-key", "prot", *extra, fresh=[t / "out"])

    def protein_finetune(make_adata):
        return lambda w, t, mp: ft(h5(t, make_adata()), t, *protein_task, label=False)

    def nan_proteins():
        values = np.ones((30, 4), dtype=np.float32)
        values[3, 1] = np.nan
        return values

    def too_little_overlap():
        from scrnalf_hf import ScrnaLongformerProcessor

        panel = ScrnaLongformerProcessor(gene_symbols=["GENE0"], protein_names=[f"CD{i}" for i in range(10)])
        return lambda: panel.proteins(np.ones((2, 4)), ["CD0", "CD44", "CD45", "CD64"])

    return [
        Case("convert-h5mu-protein-cell-ids-differ", "convert", ".h5mu whose protein modality has other cell ids",
             lambda w, t, mp: conv(h5mu(t, cells_adata(), prot_modality([f"cell{i}" for i in range(1, 31)])), t),
             "cell ids of modality 'prot' differ"),
        Case("convert-h5mu-protein-ids-positional", "convert",
             ".h5mu whose protein cells are numbered by position (0, 1, ...) instead of the RNA's ids",
             lambda w, t, mp: conv(h5mu(t, cells_adata(), prot_modality([str(i) for i in range(30)])), t),
             "matched by id, never by position"),
        Case("convert-h5mu-no-rna", "convert", ".h5mu without an RNA modality",
             lambda w, t, mp: conv(h5mu(t, None, prot_modality()), t), "no RNA modality 'rna'"),
        Case("convert-h5mu-no-protein-modality", "convert", "--protein-key names no modality of the .h5mu",
             lambda w, t, mp: conv(h5mu(t, cells_adata(), None), t), "no protein modality 'prot'"),
        Case("convert-h5mu-zero-proteins", "convert", ".h5mu protein modality with zero proteins",
             lambda w, t, mp: conv(h5mu(t, cells_adata(), prot_modality(n_proteins=0)), t), "zero protein features"),
        Case("convert-h5mu-negative-proteins", "convert", ".h5mu protein counts with a negative value",
             lambda w, t, mp: conv(h5mu(t, cells_adata(), prot_modality(values=-np.ones((30, 4), dtype=np.float32))), t),
             "negative protein counts"),
        Case("finetune-protein-obsm-missing", "finetune", "--task protein, no obsm['protein_expression']",
             lambda w, t, mp: ft(w.good, t, *protein_task, label=False), "no obsm\\['protein_expression'\\]"),
        Case("finetune-protein-h5mu-ids-reordered-unmatched", "finetune",
             ".h5mu whose protein cells are reordered and renamed (no id matches the RNA's)",
             lambda w, t, mp: ft(h5mu(t, cells_adata(), prot_modality([f"barcode{i}" for i in reversed(range(30))])), t,
                                 *protein_task, label=False), "cell ids of modality 'prot' differ"),
        Case("finetune-protein-zero-features", "finetune", "obsm protein DataFrame with zero columns",
             protein_finetune(lambda: cite_adata(proteins=np.zeros((30, 0), dtype=np.float32))), "zero protein features"),
        Case("finetune-protein-nan", "finetune", "a NaN protein count", protein_finetune(lambda: cite_adata(proteins=nan_proteins())),
             "NaN"),
        Case("finetune-protein-negative", "finetune", "negative (CLR-normalised) protein values as counts",
             protein_finetune(lambda: cite_adata(proteins=np.full((30, 4), -0.5, dtype=np.float32))), "negative protein counts"),
        Case("finetune-protein-array-without-names", "finetune", "obsm protein array without uns['protein_names']",
             lambda w, t, mp: ft(h5(t, with_array_proteins(cells_adata())), t, *protein_task, "--protein-key", "adt",
                                 label=False), "protein_names"),
        Case("api-protein-panel-overlap-too-small", "api", "proteins overlapping the model's panel too little (1 of 10)",
             lambda w, t, mp: api(too_little_overlap()), "1 of the model's 10 panel proteins"),
    ]


def with_array_proteins(adata: ad.AnnData) -> ad.AnnData:
    adata.obsm["adt"] = np.ones((adata.n_obs, 3), dtype=np.float32)
    return adata


def atac_modality(index=None, peaks=None, values=None, var=None) -> ad.AnnData:
    """An ATAC modality of the good 30 cells: 4 peaks named chrom:start-end, fragment counts."""
    index = pd.Index([f"cell{i}" for i in range(30)]) if index is None else pd.Index(index)
    peaks = [f"chr1:{1000 * p}-{1000 * p + 500}" for p in range(4)] if peaks is None else peaks
    values = np.ones((len(index), len(peaks)), dtype=np.float32) if values is None else values
    var = pd.DataFrame(index=pd.Index(peaks, dtype=str)) if var is None else var
    return ad.AnnData(values, obs=pd.DataFrame(index=index), var=var)


def atac_h5mu(t: Path, atac: ad.AnnData | None, name: str = "multiome.h5mu") -> Path:
    import mudata

    modalities = {"rna": cells_adata(), **({"atac": atac} if atac is not None else {})}
    path = t / name
    mudata.MuData(modalities).write_h5mu(path)
    return path


def _atac_cases() -> list[Case]:
    """RNA + ATAC inputs: ``read_atac`` on a ``.h5mu`` file (protected: it must stay byte-identical)
    and the multimodal model's peak inputs."""

    def read(make_atac):
        def build(w, t, mp):
            from scrnalf_hf.data.atac import read_atac

            path = atac_h5mu(t, make_atac())
            return api(lambda: read_atac(path), protect=[path])

        return build

    def raw_counts_into_model():
        import torch

        from scrnalf_hf import ScrnaLongformerConfig, ScrnaLongformerForCellClassification

        config = ScrnaLongformerConfig(n_genes=N_GENES, d_model=8, n_heads=1, depth=1, knn_k=4, modalities={"atac": 4},
                                       kernel_implementation="eager", num_labels=2)
        model = ScrnaLongformerForCellClassification(config).eval()
        return lambda: model(torch.rand(2, N_GENES), peak_accessibility=torch.full((2, 4), 3.0))

    def conv(source, t):
        return cli("convert", source, t / "out", "--atac-key", "atac", fresh=[t / "out"])

    def with_atac(make_atac):
        return lambda w, t, mp: conv(atac_h5mu(t, make_atac()), t)

    def atac_finetune(*extra, label=True):
        return lambda w, t, mp: ft(atac_h5mu(t, atac_modality()), t, "--atac-key", "atac", *TRAIN, *extra, label=label)

    end_before_start = pd.DataFrame({"chrom": ["chr1"] * 4, "start": [500, 900, 2000, 3000], "end": [100, 1400, 2500, 3500]},
                                    index=[f"peak{p}" for p in range(4)])
    return [
        Case("api-atac-zero-peaks", "api", ".h5mu ATAC modality with zero peaks",
             read(lambda: atac_modality(peaks=[])), "zero peaks"),
        Case("api-atac-peaks-without-coordinates", "api", "ATAC peaks named peak0..3, no chrom/start/end columns",
             read(lambda: atac_modality(peaks=[f"peak{p}" for p in range(4)])), "without parseable coordinates"),
        Case("api-atac-peak-end-before-start", "api", "ATAC var columns with a peak whose end is before its start",
             read(lambda: atac_modality(peaks=list(end_before_start.index), var=end_before_start)), "end <= start"),
        Case("api-atac-no-atac-modality", "api", ".h5mu with RNA only, read as RNA + ATAC",
             read(lambda: None), "no ATAC modality 'atac'"),
        Case("api-atac-cell-ids-differ", "api", ".h5mu whose ATAC cells are numbered by position (0, 1, ...)",
             read(lambda: atac_modality(index=[str(i) for i in range(30)])), "cell ids of modality 'atac' differ"),
        Case("api-atac-negative-counts", "api", "negative ATAC fragment counts",
             read(lambda: atac_modality(values=-np.ones((30, 4), dtype=np.float32))), "negative values"),
        Case("api-atac-raw-counts-into-model", "api", "fragment counts (not binarised) as peak_accessibility",
             lambda w, t, mp: api(raw_counts_into_model()), "binarised"),
        Case("convert-atac-no-atac-modality", "convert", "--atac-key names no modality of the .h5mu",
             with_atac(lambda: None), "no ATAC modality 'atac'"),
        Case("convert-atac-zero-peaks", "convert", ".h5mu ATAC modality with zero peaks",
             with_atac(lambda: atac_modality(peaks=[])), "zero peaks"),
        Case("convert-atac-cell-ids-differ", "convert", ".h5mu whose ATAC cells have other ids than the RNA's",
             with_atac(lambda: atac_modality(index=[f"barcode{i}" for i in range(30)])), "cell ids of modality 'atac' differ"),
        Case("convert-atac-key-on-h5ad", "convert", "--atac-key on an .h5ad file (ATAC needs a .h5mu)",
             lambda w, t, mp: conv(w.good, t), "not one; give a MuData file"),
        Case("finetune-atac-key-on-h5ad", "finetune", "--atac-key on an .h5ad file (ATAC needs a .h5mu)",
             lambda w, t, mp: ft(w.good, t, "--atac-key", "atac", *TRAIN), "not one; give a MuData file"),
        Case("finetune-atac-no-atac-modality", "finetune", "--atac-key names no modality of the .h5mu",
             lambda w, t, mp: ft(atac_h5mu(t, None), t, "--atac-key", "atac", *TRAIN), "no ATAC modality 'atac'"),
        Case("finetune-atac-task-protein", "finetune", "--atac-key with --task protein (only classification reads ATAC)",
             atac_finetune("--task", "protein", label=False), "only cell classification reads ATAC"),
        Case("finetune-atac-task-trajectory", "finetune", "--atac-key with --task trajectory (only classification reads ATAC)",
             atac_finetune("--task", "trajectory", "--time-key", "time", label=False), "only cell classification reads ATAC"),
        Case("compare-atac-key-on-h5ad", "compare", "--atac-key on an .h5ad file (ATAC needs a .h5mu)",
             lambda w, t, mp: cmp(w.good, t, "--atac-key", "atac"), "not one; give a MuData file"),
        Case("finetune-atac-key-with-soma-uri", "finetune", "--atac-key with --soma-uri (ATAC needs a .h5mu)",
             lambda w, t, mp: cli("finetune", "--soma-uri", soma_store(t), "--label-key", "cell_type", "--atac-key", "atac",
                                  "--output-dir", t / "out", *TRAIN, fresh=[t / "out"]), "read as RNA only"),
    ]


CASES: list[Case] = [
    *_convert_cases(),
    *_finetune_cases(),
    *_pretrain_cases(),
    *_compare_cases(),
    *_model_on_anndata_cases("predict"),
    *_model_on_anndata_cases("embed"),
    *_species_cases(),
    *_trajectory_cases(),
    *_multimodal_cases(),
    *_atac_cases(),
    *_interpret_cases(),
    *_soma_cases(),
    *_push_cases(),
    *_benchmark_cases(),
    *_presets_cases(),
    *_api_cases(),
    *_scaling_cases(),
    *_recommend_cases(),
    *_search_cases(),
]

# ---------------------------------------------------------------------------------------------
# Running a case and judging what the user got
# ---------------------------------------------------------------------------------------------

CLEAR = "clear one-line error"
SILENT = "silent wrong answer"
DAMAGED = "corrupted or lost output"
UNCLEAR = "unclear error"
OUTCOMES = (CLEAR, SILENT, DAMAGED, UNCLEAR)
API_ERRORS = (ValueError, TypeError, OSError)

RESULTS: dict[str, dict] = {}


def fingerprint(path: Path) -> str | None:
    """A digest of a file, or of a folder's relative paths and file contents; None if absent."""
    path = Path(path)
    if not path.exists():
        return None
    digest = hashlib.sha256()
    items = [path] if path.is_file() else sorted(p for p in path.rglob("*"))
    for item in items:
        digest.update(str(item.relative_to(path) if item != path else "").encode())
        if item.is_file():
            digest.update(item.read_bytes())
    return digest.hexdigest()


def leftovers(path: Path) -> list[str]:
    """Half-written outputs: the output itself, or hidden staging siblings (``.NAME.*``)."""
    path = Path(path)
    found = [path.name] if path.exists() else []
    if path.parent.is_dir():
        found += [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]
    return found


# What a command may print on stderr before it fails: its progress bars and its own info lines.
PROGRESS_OR_INFO = re.compile(r"^(\r?\S[^:]*:\s+\d+%\|.*|converted .* for training|reading .*: \d+/\d+ panel genes.*|"
                              r"compare: fold .*|dropping \d+ class.*|cell-type classification with .*|SOMA .*: \d+ cells, .*)$")


def one_error_line(lines: list[str], prefix: str) -> bool:
    """The error is one line, the last, ``scrnalf <command>: error: ...``: no traceback, no usage
    block, not flagged as a bug ("unexpected"); any line before it is the command's progress or info."""
    if not lines or not lines[-1].startswith(prefix) or "unexpected; run with --debug" in lines[-1]:
        return False
    return all(PROGRESS_OR_INFO.match(line.split("\r")[-1]) for line in lines[:-1])


def run_case(case: Case, w: World, t: Path, mp, capsys) -> dict:
    setup = case.build(w, t, mp)
    before = {str(p): fingerprint(p) for p in setup.protect}
    assert all(before.values()), f"{case.id}: a protected path does not exist before the run"
    capsys.readouterr()
    status, message, error = None, "", None
    with setup.context() if setup.context else contextlib.nullcontext():
        if setup.argv is not None:
            try:
                status = main(setup.argv)
            except SystemExit as exit_:
                status = exit_.code
            except Exception as raised:  # noqa: BLE001 - escaping main is a failure the report names
                error = raised
            err = capsys.readouterr().err
            message = err.strip()
        else:
            try:
                setup.call()
                status = 0
            except API_ERRORS as raised:
                status, error = 1, raised
                message = f"{type(raised).__name__}: {' '.join(str(raised).split())}"
            except Exception as raised:  # noqa: BLE001
                status, error = 1, raised
                message = f"unexpected {type(raised).__name__}: {' '.join(str(raised).split())}"
    damaged = [p for p, digest in before.items() if fingerprint(Path(p)) != digest]
    left = [name for p in setup.fresh for name in leftovers(p)]
    problems = []
    if setup.argv is not None:
        lines = message.split("\n")  # not splitlines: a progress bar redraws itself with "\r"
        prefix = f"scrnalf {case.command}: error:" if case.command != "api" else ""
        if error is not None:
            problems.append(f"exception escaped main: {type(error).__name__}: {error}")
        if status in (0, None):
            outcome = SILENT
        elif not one_error_line(lines, prefix):
            outcome = UNCLEAR
            problems.append(f"stderr is not one clear error line: {message[:800]!r}")
        else:
            outcome = CLEAR
    else:
        if status == 0:
            outcome = SILENT
        elif message.startswith("unexpected") or not str(error).strip():
            outcome = UNCLEAR
            problems.append(message)
        else:
            outcome = CLEAR
    if outcome == CLEAR and case.match and not re.search(case.match, message):
        outcome = UNCLEAR
        problems.append(f"message does not say {case.match!r}: {message!r}")
    if damaged or left:
        outcome = DAMAGED
        problems.append(f"damaged: {damaged}; left behind: {left}")
    if status in (0, None) and outcome != DAMAGED:
        problems.append(f"no error (exit {status}); stderr: {message[:500]!r}")
    shown = message.split("\n")[-1] if message else ""
    for path, name in ((str(t), "<tmp>"), (str(w.root), "<data>"), (str(w.classifier), "<model>"), (str(REPO_BENCHMARKS), "<benchmarks>")):
        shown = shown.replace(path, name)
    shown = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:<port>", shown)
    shown = re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/[^/\s]+", "<tmp>", shown)
    return {"case": case, "outcome": outcome, "message": shown, "status": status, "problems": problems}


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch, tmp_path):
    """No case reaches the network: the Hub client points at a port nobody listens on."""
    point_client_at(monkeypatch, unreachable_endpoint(), tmp_path / "hf_home", None)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case, world, tmp_path, monkeypatch, capsys):
    result = run_case(case, world, tmp_path, monkeypatch, capsys)
    RESULTS[case.id] = result
    assert result["outcome"] == CLEAR, "; ".join(result["problems"])


def test_the_suite_is_large_and_ids_are_unique():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 100
    commands = {case.command for case in CASES}
    assert {"convert", "finetune", "pretrain", "compare", "predict", "embed", "push", "benchmark", "presets", "api"} <= commands


# ---------------------------------------------------------------------------------------------
# Property-based: random bad matrices into the processor are refused, never silently used
# ---------------------------------------------------------------------------------------------

N_PROPERTY_GENES = 12


def small_processor(input_kind="counts"):
    from scrnalf_hf import ScrnaLongformerProcessor

    return ScrnaLongformerProcessor(gene_symbols=[f"G{i}" for i in range(N_PROPERTY_GENES)], input_kind=input_kind)


def counts_matrices(min_cells=1):
    return hnp.arrays(np.float32, st.tuples(st.integers(min_cells, 6), st.just(N_PROPERTY_GENES)),
                      elements=st.integers(0, 50).map(float))


def _spoil(matrix, data, value):
    row = data.draw(st.integers(0, matrix.shape[0] - 1))
    column = data.draw(st.integers(0, matrix.shape[1] - 1))
    spoiled = matrix.copy()
    spoiled[row, column] = value
    return spoiled


PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(matrix=counts_matrices(), data=st.data(), value=st.sampled_from([np.nan, np.inf, -np.inf]),
       sparse=st.booleans(), kind=st.sampled_from(["counts", "log1p"]))
def test_processor_refuses_non_finite_values(matrix, data, value, sparse, kind):
    spoiled = _spoil(matrix, data, value)
    with pytest.raises(ValueError, match="NaN or infinite"):
        small_processor(kind)(sp.csr_matrix(spoiled) if sparse else spoiled)


@PROPERTY_SETTINGS
@given(matrix=counts_matrices(), data=st.data(), value=st.floats(-1e6, -1e-3), sparse=st.booleans(),
       kind=st.sampled_from(["counts", "log1p"]))
def test_processor_refuses_negative_values(matrix, data, value, sparse, kind):
    spoiled = _spoil(matrix, data, value)
    with pytest.raises(ValueError, match="negative"):
        small_processor(kind)(sp.csr_matrix(spoiled) if sparse else spoiled)


@PROPERTY_SETTINGS
@given(matrix=counts_matrices(), data=st.data(), fraction=st.floats(0.01, 0.99))
def test_counts_processor_refuses_non_integer_values(matrix, data, fraction):
    spoiled = _spoil(matrix, data, data.draw(st.integers(0, 30)) + fraction)
    with pytest.raises(ValueError, match="non-integer"):
        small_processor("counts")(spoiled)


@PROPERTY_SETTINGS
@given(cells=st.integers(0, 4), genes=st.integers(0, 30).filter(lambda g: g != N_PROPERTY_GENES))
def test_processor_refuses_matrices_of_the_wrong_width(cells, genes):
    with pytest.raises(ValueError, match="gene"):
        small_processor()(np.zeros((cells, genes), np.float32))


@PROPERTY_SETTINGS
@given(dtype=st.sampled_from(["U3", "S3", "O"]), cells=st.integers(1, 4))
def test_processor_refuses_non_numeric_matrices(dtype, cells):
    with pytest.raises((ValueError, TypeError)):
        small_processor()(np.full((cells, N_PROPERTY_GENES), "1", dtype=dtype))


@PROPERTY_SETTINGS
@given(matrix=counts_matrices())
def test_processor_accepts_good_counts_and_keeps_them_finite(matrix):
    """The control: good counts (empty cells included) give finite inputs of the panel's width."""
    features = small_processor()(matrix)
    assert features["expression"].shape == (matrix.shape[0], N_PROPERTY_GENES)
    assert np.isfinite(features["expression"].numpy()).all()


PROPERTY_TESTS = [
    ("processor: a random count matrix (dense or sparse) with one NaN/inf", "ValueError: ... contains NaN or infinite values."),
    ("processor: a random count matrix with one negative value", "ValueError: ... contains negative values ..."),
    ("processor (counts): a random count matrix with one fractional value", "ValueError: ... holds non-integer values ..."),
    ("processor: a matrix whose width is not the panel's, without gene_names", "ValueError: ... needs gene_names= ..."),
    ("processor: a matrix of strings / bytes / objects", "ValueError: the expression matrix must be numeric ..."),
]

# ---------------------------------------------------------------------------------------------
# docs/bad_inputs.md
# ---------------------------------------------------------------------------------------------


REPORT_WIDTH = int(os.environ.get("BAD_INPUTS_REPORT_WIDTH", "120"))  # characters of a message the table shows


def _cell(text: str, limit: int = REPORT_WIDTH) -> str:
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("|", "\\|").replace("\n", " ")


README = REPORT.parent.parent / "README.md"
README_START, README_END = "<!-- bad-inputs:start -->", "<!-- bad-inputs:end -->"


def command_label(command: str) -> str:
    return "Python API" if command == "api" else f"`scrnalf {command}`"


def summary_table(rows: list[tuple[str, str]]) -> str:
    """Per command (``rows``: (command label, outcome) per case): inputs tried and outcomes."""
    labels = list(dict.fromkeys(label for label, _ in rows))
    header = ["command", "inputs tried", "clear one-line errors", "silent wrong answers", "corrupted or lost outputs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def line(name, outcomes):
        counts = [len(outcomes)] + [sum(o == outcome for o in outcomes) for outcome in (CLEAR, SILENT, DAMAGED)]
        return f"| {name} | " + " | ".join(str(count) for count in counts) + " |"

    for label in labels:
        lines.append(line(label, [outcome for name, outcome in rows if name == label]))
    lines.append(line("**all**", [outcome for _, outcome in rows]))
    return "\n".join(lines) + "\n"


def update_readme(table: str, readme: Path = README) -> None:
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise RuntimeError(f"{readme} has no {README_START} … {README_END} markers for the bad-input summary.")
    before, rest = text.split(README_START, 1)
    _, after = rest.split(README_END, 1)
    readme.write_text(f"{before}{README_START}\n{table}{README_END}{after}")


def render_report(results: dict[str, dict]) -> str:
    rows = [results[case.id] for case in CASES]
    counts = {outcome: sum(r["outcome"] == outcome for r in rows) for outcome in OUTCOMES}
    lines = [
        "# Bad inputs and faults: what the user gets",
        "",
        "Generated by the bad-input test suite (`tests/test_bad_inputs.py`); do not edit by hand. Regenerate with",
        "",
        "```bash",
        "python -m pytest tests/test_bad_inputs.py --bad-inputs-report docs/bad_inputs.md",
        "```",
        "",
        "Each case builds its bad input in a fresh folder and runs the command in-process (`scrnalf_cli.main`) or "
        "the Python API call. A *clear one-line error* is a non-zero exit with exactly one line on stderr, "
        "`scrnalf <command>: error: ...`, no traceback (for the API: a `ValueError`, `TypeError` or `OSError` with a "
        "message). A *corrupted or lost output* is any file or folder that existed before and is not byte-identical "
        "afterwards, or a half-written output left behind. Paths are shown as `<tmp>` (the case's folder), "
        "`<data>` (the shared good inputs) and `<model>` (a trained tiny classifier).",
        "",
        f"- inputs tried: **{len(rows)}**",
        f"- clear one-line errors: **{counts[CLEAR]}**",
        f"- silent wrong answers: **{counts[SILENT]}**",
        f"- corrupted or lost outputs: **{counts[DAMAGED]}**",
        f"- unclear errors: **{counts[UNCLEAR]}**",
        "",
        summary_table([(command_label(r["case"].command), r["outcome"]) for r in rows]),
        "The CLI's message is shown after its `scrnalf <command>: error: ` prefix.",
        "",
        "| # | case | command | bad input or fault | what the user gets | outcome |",
        "|---|---|---|---|---|---|",
    ]
    for number, row in enumerate(rows, 1):
        case = row["case"]
        command = command_label(case.command)
        gets = row["message"].split(": error: ", 1)[-1] if case.command != "api" else row["message"]
        lines.append(f"| {number} | `{case.id}` | {command} | {_cell(case.bad)} | {_cell(gets)} | {row['outcome']} |")
    lines += [
        "",
        "## Property-based checks (hypothesis)",
        "",
        "Random matrices into `ScrnaLongformerProcessor` (25 examples each, dense and sparse): each bad one is refused, "
        "never turned into model inputs; good counts always give finite inputs.",
        "",
        "| property | what the user gets |",
        "|---|---|",
        *[f"| {_cell(what)} | {_cell(gets)} |" for what, gets in PROPERTY_TESTS],
        "",
    ]
    return "\n".join(lines)


@pytest.fixture(scope="module", autouse=True)
def _write_report(request):
    yield
    target = request.config.getoption("--bad-inputs-report", default=None)
    if not target:
        return
    if set(RESULTS) != {case.id for case in CASES}:
        missing = sorted({case.id for case in CASES} - set(RESULTS))
        raise RuntimeError(f"--bad-inputs-report needs every case to run; not run: {missing[:10]}")
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    Path(target).write_text(render_report(RESULTS))
    if Path(target).resolve() == REPORT:  # the committed report: the README quotes its summary
        update_readme(summary_table([(command_label(RESULTS[c.id]["case"].command), RESULTS[c.id]["outcome"]) for c in CASES]))


def test_report_lists_every_case(request):
    """docs/bad_inputs.md names exactly the cases of this suite, and quotes their counts."""
    if request.config.getoption("--bad-inputs-report", default=None):
        pytest.skip("the report is being regenerated by this run")
    text = REPORT.read_text()
    listed = re.findall(r"^\| \d+ \| `([^`]+)` \|", text, flags=re.MULTILINE)
    assert listed == [case.id for case in CASES], "docs/bad_inputs.md is stale: regenerate it (see its header)"
    assert f"- inputs tried: **{len(CASES)}**" in text
    assert "- silent wrong answers: **0**" in text and "- corrupted or lost outputs: **0**" in text
    outcomes = re.findall(r"^\| \d+ \| `[^`]+` \| ([^|]+) \|.*\| ([^|]+) \|$", text, flags=re.MULTILINE)
    table = summary_table([(label.strip(), outcome.strip()) for label, outcome in outcomes])
    assert table in text
    assert f"{README_START}\n{table}{README_END}" in README.read_text(), "the README's bad-input summary is stale: regenerate it"
