"""The loader of transformers' common tests: a failed download is a one-line failure, never a
silent skip, and the stand-ins for the modules the sdist lacks are ours."""

import subprocess

import pytest
import transformers

import transformers_common


def test_a_failed_download_fails_with_a_one_line_reason(monkeypatch, tmp_path):
    def pip_cannot_reach_the_index(command, **kwargs):
        raise subprocess.CalledProcessError(
            1, command, stderr="Looking in indexes: https://pypi.org/simple\nERROR: No matching distribution found\n"
        )

    monkeypatch.setattr(transformers_common, "cache_root", lambda version=transformers.__version__: tmp_path / version)
    monkeypatch.setattr(transformers_common.subprocess, "run", pip_cannot_reach_the_index)
    with pytest.raises(transformers_common.TransformersTestsUnavailable) as raised:
        transformers_common.load()
    message = str(raised.value)
    assert "\n" not in message
    assert f"transformers=={transformers.__version__}" in message and "No matching distribution found" in message
    assert not (tmp_path / transformers.__version__ / transformers_common.PACKAGE).exists()


def test_the_stand_ins_are_ours():
    transformers_common.load()
    from transformers_common_tests.exporters.test_export import ExportTesterMixin
    from transformers_common_tests.generation.test_utils import GenerationTesterMixin
    from transformers_common_tests.utils.test_configuration_utils import config_common_kwargs

    assert ExportTesterMixin is transformers_common.ExportTesterMixin
    assert [name for name in vars(GenerationTesterMixin) if not name.startswith("__")] == []
    assert config_common_kwargs is transformers_common.CONFIG_COMMON_KWARGS
    defaults = transformers.PreTrainedConfig()
    for name, value in config_common_kwargs.items():
        if name != "dtype":
            assert getattr(defaults, name) != value, name
