"""`scrnalf push` publishes only a folder that loads: config, processor and every weight tensor,
with shapes that fit the config; a broken folder is refused by name before any request."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import load_script
from hub_server import local_hub, tiny_run  # noqa: F401
from safetensors.torch import load_file, save_file

from scrnalf_cli import main as scrnalf
from scrnalf_hf.hub import HubFolderError, export_hub_folder, push_to_hub

REPO_ID = "org/scrna-longformer-tiny"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def exported(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    return export_hub_folder(tiny_run, tmp_path_factory.mktemp("export") / "scrna-longformer-tiny", repo_id=REPO_ID)


@pytest.fixture
def hub_folder(exported: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(exported, tmp_path / "scrna-longformer-tiny"))


def truncate(kept_bytes):
    def cut(folder: Path) -> None:
        weights = folder / "model.safetensors"
        content = weights.read_bytes()
        weights.write_bytes(content[: kept_bytes(len(content))])

    return cut


def edit_json(name: str, **changes):
    def edit(folder: Path) -> None:
        saved = json.loads((folder / name).read_text())
        saved.update({key: value(saved) if callable(value) else value for key, value in changes.items()})
        (folder / name).write_text(json.dumps(saved))

    return edit


def edit_weights(drop: str | None = None, add: str | None = None):
    def edit(folder: Path) -> None:
        tensors = load_file(folder / "model.safetensors")
        if drop is not None:
            del tensors[drop]
        if add is not None:
            tensors[add] = tensors["classifier.bias"].clone()
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

    return edit


def break_card_yaml(folder: Path) -> None:
    card = (folder / "README.md").read_text()
    (folder / "README.md").write_text(card.replace("license: mit\n", "license: mit\nfoo: bar: [baz\n", 1))


BROKEN_FOLDERS = {
    "weights cut in half": (truncate(lambda size: size // 2), r"model\.safetensors cannot be read.*truncated"),
    "weights cut to 100 bytes": (truncate(lambda size: 100), r"model\.safetensors cannot be read.*at 100 bytes"),
    "weights missing their last byte": (truncate(lambda size: size - 1), r"model\.safetensors cannot be read"),
    "config for a larger gene panel": (
        edit_json("config.json", n_genes=30),
        (
            r"model\.safetensors does not fit config\.json \(n_genes=30.*gene_embeddings\.weight has shape "
            r"\(24, \d+\) where the config gives \(30, \d+\)"
        ),
    ),
    "a tensor missing": (edit_weights(drop="classifier.bias"), r"model\.safetensors lacks .*'classifier\.bias'"),
    "a stray tensor": (edit_weights(add="leftover.weight"), r"model\.safetensors holds .*'leftover\.weight'"),
    "config not JSON": (lambda f: (f / "config.json").write_text("{not json"), r"config\.json is not valid JSON"),
    "config of another model type": (
        edit_json("config.json", model_type="bert"),
        r"config\.json does not load as a scRNA longformer config",
    ),
    "processor panel of another size": (
        edit_json("preprocessor_config.json", gene_symbols=lambda saved: saved["gene_symbols"][:-4]),
        r"preprocessor_config\.json holds a panel of 20 genes but config\.json has n_genes=24",
    ),
    "processor that does not load": (
        edit_json("preprocessor_config.json", input_kind="raw-ish"),
        r"preprocessor_config\.json does not load .*input_kind",
    ),
    "malformed card YAML": (break_card_yaml, r"README\.md has a malformed YAML metadata block.*line"),
}


@pytest.mark.parametrize("breakage", sorted(BROKEN_FOLDERS))
def test_a_folder_that_does_not_load_is_refused_before_any_request(local_hub, hub_folder, breakage, capsys):  # noqa: F811
    break_folder, message = BROKEN_FOLDERS[breakage]
    break_folder(hub_folder)
    with pytest.raises(HubFolderError, match=message):
        push_to_hub(hub_folder, REPO_ID)
    assert scrnalf(["push", "--model-dir", str(hub_folder), "--repo-id", REPO_ID]) == 1
    assert "scrnalf push: error:" in capsys.readouterr().err
    assert local_hub.requests == []


def test_a_folder_that_loads_is_published(local_hub, hub_folder):  # noqa: F811
    commit = push_to_hub(hub_folder, REPO_ID)
    assert local_hub.repo(REPO_ID).branches["main"] == commit


def shard(folder: Path) -> None:
    from scrnalf_hf import ScrnaLongformerForCellClassification

    model = ScrnaLongformerForCellClassification.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    model.save_pretrained(folder, max_shard_size="1KB")


def test_sharded_weights_are_read_shard_by_shard_against_their_index(local_hub, hub_folder):  # noqa: F811
    shard(hub_folder)
    index_path = hub_folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    assert len(set(index["weight_map"].values())) > 1
    push_to_hub(hub_folder, REPO_ID)
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"]["classifier.bias"] = next(s for s in shards if s != index["weight_map"]["classifier.bias"])
    index_path.write_text(json.dumps(index))
    with pytest.raises(HubFolderError, match=r"index\.json does not match its shards .*'classifier\.bias'"):
        push_to_hub(hub_folder, REPO_ID, revision="other")



@pytest.mark.slow
def test_push_killed_at_random_moments_leaves_main_whole_and_no_orphan(tmp_path):
    """Three kills of `scrnalf push` once it talks to the (local) Hub; the second pushes over a commit."""
    rounds = load_script("kill_test").push_rounds(tmp_path, kills=3, seed=1, n_genes=50, window="work")
    assert len(rounds) == 3
    assert [problem for result in rounds for problem in result.problems] == []
