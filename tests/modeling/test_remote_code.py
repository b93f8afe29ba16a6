"""Saved folders load through trust_remote_code without scrnalf_hf, and by repo id offline."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import torch
from transformers import AutoFeatureExtractor, AutoModelForSequenceClassification

import scrnalf_hf  # noqa: F401
from scrnalf_hf.kernels_scrnalf import c_kernels_available

LOAD_AND_EMBED = textwrap.dedent(
    """
    import sys
    import numpy as np
    from transformers import AutoFeatureExtractor, AutoModel, AutoProcessor

    source, output, block_package = sys.argv[1], sys.argv[2], sys.argv[3] == "block"
    if block_package:
        sys.modules["scrnalf_hf"] = None  # any import of the package now fails
    else:
        import scrnalf_hf  # registers the local classes
    kwargs = {"trust_remote_code": True} if block_package else {}
    # Eager kernels give bit-identical numbers in every process; compiled ones may differ in the
    # last bit, as torch.compile's code can depend on the shapes compiled before in a process.
    model = AutoModel.from_pretrained(source, kernel_implementation="eager", **kwargs).eval()
    compiled_model = AutoModel.from_pretrained(source, **kwargs).eval()
    processor = AutoFeatureExtractor.from_pretrained(source, **kwargs)
    inputs = np.load(sys.argv[4])
    batch = processor(inputs["counts"], gene_names=list(inputs["genes"]))
    import torch

    with torch.no_grad():  # inference, as local_embedding computes it
        embedding = model(**batch).cell_embedding.numpy()
        compiled_embedding = compiled_model(**batch).cell_embedding.numpy()
    auto_processor = AutoProcessor.from_pretrained(source, **kwargs)
    attention_function = compiled_model.attention_function(False)
    np.savez(output, embedding=embedding, compiled_embedding=compiled_embedding, model_module=type(model).__module__,
             processor_module=type(processor).__module__, auto_processor_module=type(auto_processor).__module__,
             attention_function=attention_function.name, attention_module=attention_function.forward.__module__)
    """
)


def run_loader(tmp_path, source: str, block_package: bool, env_overrides: dict | None = None) -> dict:
    script = tmp_path / "load_and_embed.py"
    script.write_text(LOAD_AND_EMBED)
    output = tmp_path / "embedding.npz"
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env.update(env_overrides or {})
    inputs = tmp_path / "inputs.npz"
    completed = subprocess.run(
        [sys.executable, str(script), source, str(output), "block" if block_package else "allow", str(inputs)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return dict(np.load(output))


def local_embedding(folder, kernel_implementation: str = "eager") -> np.ndarray:
    model = AutoModelForSequenceClassification.from_pretrained(folder, kernel_implementation=kernel_implementation).eval()
    processor = AutoFeatureExtractor.from_pretrained(folder)
    inputs = np.load(folder / "inputs.npz")
    with torch.no_grad():
        return model.scrna_longformer(**processor(inputs["counts"], gene_names=list(inputs["genes"]))).cell_embedding.numpy()


def test_saved_folder_has_weights_config_processor_and_remote_code(trained_tiny_folder):
    files = {path.name for path in trained_tiny_folder.iterdir()}
    assert {"model.safetensors", "config.json", "preprocessor_config.json"} <= files
    assert {"configuration_scrnalf.py", "modeling_scrnalf.py", "kernels_scrnalf.py", "processing_scrnalf.py"} <= files
    auto_map = json.loads((trained_tiny_folder / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_scrnalf.ScrnaLongformerModel"
    assert auto_map["AutoModelForMaskedLM"] == "modeling_scrnalf.ScrnaLongformerForMaskedGeneModeling"
    assert auto_map["AutoModelForSequenceClassification"] == "modeling_scrnalf.ScrnaLongformerForCellClassification"
    processor_map = json.loads((trained_tiny_folder / "preprocessor_config.json").read_text())["auto_map"]
    assert processor_map["AutoFeatureExtractor"] == "processing_scrnalf.ScrnaLongformerProcessor"


def test_folder_loads_with_trust_remote_code_where_scrnalf_hf_cannot_be_imported(trained_tiny_folder, tmp_path):
    shutil.copy(trained_tiny_folder / "inputs.npz", tmp_path / "inputs.npz")
    result = run_loader(tmp_path, str(trained_tiny_folder), block_package=True)
    assert str(result["model_module"]).startswith("transformers_modules")
    assert str(result["processor_module"]).startswith("transformers_modules")
    assert str(result["auto_processor_module"]).startswith("transformers_modules")
    np.testing.assert_array_equal(result["embedding"], local_embedding(trained_tiny_folder))
    compiled = local_embedding(trained_tiny_folder, "compiled")
    np.testing.assert_allclose(result["compiled_embedding"], compiled, rtol=1e-5, atol=1e-6)
    # The remote copy of the kernels file runs the C kernels wherever the package would.
    local = AutoModelForSequenceClassification.from_pretrained(trained_tiny_folder).scrna_longformer.eval()
    assert str(result["attention_function"]) == local.attention_function(False).name
    assert str(result["attention_module"]).startswith("transformers_modules")
    assert str(result["attention_module"]).endswith(".kernels_scrnalf") == c_kernels_available()


def lay_out_hub_cache(folder, cache, repo_id: str, commit: str) -> None:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot, ignore=shutil.ignore_patterns("inputs.npz"))


def test_repo_id_loads_offline_from_the_hub_cache(trained_tiny_folder, tmp_path):
    cache = tmp_path / "hub_cache"
    lay_out_hub_cache(trained_tiny_folder, cache, "org/scrna-longformer-tiny", "a" * 40)
    shutil.copy(trained_tiny_folder / "inputs.npz", tmp_path / "inputs.npz")
    offline = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf_home")}
    expected = local_embedding(trained_tiny_folder)
    with_package = run_loader(tmp_path, "org/scrna-longformer-tiny", block_package=False, env_overrides=offline)
    assert str(with_package["model_module"]) == "scrnalf_hf.modeling_scrnalf"
    np.testing.assert_array_equal(with_package["embedding"], expected)
    remote = run_loader(tmp_path, "org/scrna-longformer-tiny", block_package=True, env_overrides=offline)
    np.testing.assert_array_equal(remote["embedding"], expected)
    np.testing.assert_allclose(remote["compiled_embedding"], expected, rtol=1e-5, atol=1e-6)
