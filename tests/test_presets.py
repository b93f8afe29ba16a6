"""Preset sizes: the README's table is what the code builds."""

import re
from pathlib import Path

from transformers import AutoConfig

import scrnalf_hf  # noqa: F401
from scrnalf_hf import ScrnaLongformerConfig
from scrnalf_hf.presets import preset_parameter_counts

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_parameter_counts_match_the_presets():
    rows = re.findall(r"^\| (tiny|default|large) \|.*\| ([\d,]+) \|$", README.read_text(), flags=re.MULTILINE)
    documented = {name: int(count.replace(",", "")) for name, count in rows}
    assert documented == preset_parameter_counts(n_genes=500, num_labels=9)


def test_presets_are_close_to_the_roadmap_sizes():
    counts = preset_parameter_counts(n_genes=500, num_labels=9)
    for name, roadmap in {"tiny": 4_577, "default": 132_809, "large": 330_633}.items():
        assert abs(counts[name] - roadmap) / roadmap < 0.05, (name, counts[name])


def test_presets_load_by_name_and_by_path():
    by_name = ScrnaLongformerConfig.from_preset("default", n_genes=765)
    assert (by_name.d_model, by_name.depth, by_name.n_heads, by_name.n_genes) == (64, 2, 4, 765)
    by_path = AutoConfig.from_pretrained(str(Path(__file__).resolve().parents[1] / "hub_configs" / "large.json"))
    assert isinstance(by_path, ScrnaLongformerConfig) and by_path.d_model == 128


def test_unknown_preset_lists_the_available_ones():
    import pytest

    with pytest.raises(ValueError, match=r"unknown preset 'huge'.*'default', 'large', 'tiny'"):
        ScrnaLongformerConfig.from_preset("huge")


def test_configs_saved_before_the_reserved_fields_existed_still_load(tmp_path):
    import json

    ScrnaLongformerConfig(n_genes=5, d_model=8, n_heads=2, knn_k=2).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for reserved in ("species", "modalities", "class_weights", "value_encoding", "pooling"):
        saved.pop(reserved)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.species is None and loaded.modalities is None and loaded.n_genes == 5
