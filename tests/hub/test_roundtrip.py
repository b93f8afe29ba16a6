"""Publish → load by repo id against the local Hub server (the real Hub is unreachable from CI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import WITHOUT_PACKAGE
from hub_server import LABELS, cells, local_hub, tiny_run  # noqa: F401 - fixtures
from huggingface_hub import hf_hub_download
from transformers import AutoFeatureExtractor, AutoModel, AutoModelForSequenceClassification, Trainer, TrainingArguments

from scrnalf_hf import ScrnaLongformerProcessor
from scrnalf_cli import main as scrnalf
from scrnalf_hf.hub import export_hub_folder

REPO_ID = "org/scrna-longformer-tiny"

# Runs with `python -I` from an empty folder: scrnalf_hf is neither installed on this path nor
# importable from the repo, and the assertion below proves it before anything loads.
LOAD_WITHOUT_PACKAGE = WITHOUT_PACKAGE + textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import torch
    from transformers import AutoFeatureExtractor, AutoModel, pipeline

    repo_id, revision, counts_file, out_dir = sys.argv[1:5]
    counts = np.load(counts_file)
    genes = [f"GENE{i}" for i in range(counts.shape[1])]
    # Eager kernels: bit-identical in every process (compiled ones may differ in the last bit).
    model = AutoModel.from_pretrained(repo_id, trust_remote_code=True, revision=revision, kernel_implementation="eager").eval()
    processor = AutoFeatureExtractor.from_pretrained(repo_id, trust_remote_code=True, revision=revision)
    inputs = processor(counts, gene_names=genes)
    with torch.no_grad():
        output = model(**inputs)
    np.save(f"{out_dir}/cell_embedding.npy", output.cell_embedding.numpy())
    np.save(f"{out_dir}/last_hidden_state.npy", output.last_hidden_state.numpy())
    classify = pipeline(model=repo_id, revision=revision, trust_remote_code=True)
    predictions = classify(counts, gene_names=genes, top_k=3)
    json.dump(
        {
            "model_module": type(model).__module__,
            "processor_module": type(processor).__module__,
            "pipeline_module": type(classify).__module__,
            "predictions": predictions,
        },
        open(f"{out_dir}/loaded.json", "w"),
    )
    """
)


@pytest.fixture
def hub_folder(tiny_run: Path, tmp_path: Path) -> Path:
    return export_hub_folder(tiny_run, tmp_path / "scrna-longformer-tiny", repo_id=REPO_ID)


def push(capsys, *args: str) -> str:
    assert scrnalf(["push", *args]) == 0
    commit = capsys.readouterr().out.strip().splitlines()[-1]
    assert len(commit) == 40 and int(commit, 16) >= 0
    return commit


def test_push_then_load_by_commit_without_package_gives_identical_outputs(local_hub, hub_folder, tmp_path, capsys):
    commit = push(capsys, "--model-dir", str(hub_folder), "--repo-id", REPO_ID)
    assert local_hub.repo(REPO_ID).branches["main"] == commit
    # One commit on top of the repo's initial commit carries every file of the folder.
    assert len(local_hub.repo(REPO_ID).commits) == 2
    assert set(local_hub.repo(REPO_ID).commits[commit].files) >= {
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "README.md",
        "configuration_scrnalf.py",
        "modeling_scrnalf.py",
        "processing_scrnalf.py",
        "pipeline_scrnalf.py",
    }

    counts, _, genes = cells(9, seed=7)
    np.save(tmp_path / "counts.npy", counts)
    child_dir = tmp_path / "child"
    child_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            LOAD_WITHOUT_PACKAGE,
            REPO_ID,
            commit,
            str(tmp_path / "counts.npy"),
            str(child_dir),
        ],
        cwd=child_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    loaded = json.loads((child_dir / "loaded.json").read_text())
    assert all(
        loaded[key].startswith("transformers_modules.")
        for key in ("model_module", "processor_module", "pipeline_module")
    )
    reference = AutoModel.from_pretrained(hub_folder, kernel_implementation="eager").eval()
    processor_inputs = ScrnaLongformerProcessor.from_pretrained(hub_folder)(counts, gene_names=genes)
    with torch.no_grad():
        expected = reference(**processor_inputs)
    np.testing.assert_array_equal(np.load(child_dir / "cell_embedding.npy"), expected.cell_embedding.numpy())
    np.testing.assert_array_equal(np.load(child_dir / "last_hidden_state.npy"), expected.last_hidden_state.numpy())

    classifier = AutoModelForSequenceClassification.from_pretrained(hub_folder).eval()
    with torch.no_grad():
        probabilities = torch.softmax(classifier(**processor_inputs).logits, dim=-1).numpy()
    for cell, ranked in enumerate(loaded["predictions"]):
        assert [entry["label"] for entry in ranked] == [LABELS[i] for i in np.argsort(-probabilities[cell])]
        np.testing.assert_allclose([entry["score"] for entry in ranked], np.sort(probabilities[cell])[::-1], rtol=1e-6)


def test_pinned_commit_keeps_serving_the_old_files_after_a_new_push(local_hub, hub_folder, capsys):
    first = push(capsys, "--model-dir", str(hub_folder), "--repo-id", REPO_ID)
    (hub_folder / "README.md").write_text((hub_folder / "README.md").read_text() + "\nA second version.\n")
    second = push(capsys, "--model-dir", str(hub_folder), "--repo-id", REPO_ID, "--commit-message", "Card update")

    assert first != second
    assert "A second version." not in Path(hf_hub_download(REPO_ID, "README.md", revision=first)).read_text()
    assert "A second version." in Path(hf_hub_download(REPO_ID, "README.md")).read_text()
    assert local_hub.repo(REPO_ID).commits[second].title == "Card update"


def test_push_to_a_branch_leaves_main_untouched(local_hub, hub_folder, capsys):
    commit = push(
        capsys, "--model-dir", str(hub_folder), "--repo-id", REPO_ID, "--revision", "v0.1-candidate", "--private"
    )
    repo = local_hub.repo(REPO_ID)
    assert repo.private
    assert repo.branches["v0.1-candidate"] == commit
    assert set(repo.commits[repo.branches["main"]].files) == {".gitattributes"}


def test_finetune_a_model_loaded_by_repo_id_with_trainer(local_hub, hub_folder, tmp_path, capsys):
    commit = push(capsys, "--model-dir", str(hub_folder), "--repo-id", REPO_ID)
    model = AutoModelForSequenceClassification.from_pretrained(REPO_ID, revision=commit, trust_remote_code=True)
    processor = AutoFeatureExtractor.from_pretrained(REPO_ID, revision=commit, trust_remote_code=True)
    counts, labels, genes = cells(32, seed=3)
    inputs = processor(counts, gene_names=genes)
    train_dataset = [
        {"expression": inputs["expression"][i], "attention_mask": inputs["attention_mask"][i], "labels": int(labels[i])}
        for i in range(len(labels))
    ]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path / "finetune"),
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train_dataset, processing_class=processor)
    result = trainer.train()

    assert result.global_step == 4 and np.isfinite(result.training_loss)
    changed = [name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert "classifier.weight" in changed and any(name.startswith("scrna_longformer.") for name in changed)
    trainer.save_model(tmp_path / "finetuned")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "finetuned", trust_remote_code=True).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
