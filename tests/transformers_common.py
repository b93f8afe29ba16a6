"""transformers' own common model and config tests (``ModelTesterMixin``, ``ConfigTester``), the ones
every model in transformers is held to, loaded from the sdist of the installed transformers.

The sdist ships ``tests/test_modeling_common.py`` and ``tests/test_configuration_common.py`` but
not three modules they import. ``load()`` downloads the sdist once per user into
``~/.cache/scrnalf-hf/transformers-tests/<version>/``, extracts the two files into a package named
``transformers_common_tests`` (so that it never clashes with our own ``tests``) and writes
stand-ins for the missing modules, which take their contents from this file:

- ``generation/test_utils.py``: ``GenerationTesterMixin``, an empty class (our models do not
  generate);
- ``utils/test_configuration_utils.py``: ``config_common_kwargs`` = ``CONFIG_COMMON_KWARGS``;
- ``exporters/test_export.py``: ``ExportTesterMixin``, our own ``torch.export`` tests.

If the sdist cannot be had, ``load()`` raises ``TransformersTestsUnavailable`` with a one-line
reason, and the tests that need it fail with it: they never skip silently.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch
import transformers
from torch.utils._pytree import tree_leaves

PACKAGE = "transformers_common_tests"
COMMON_FILES = ("test_modeling_common.py", "test_configuration_common.py")

# Values of PreTrainedConfig's common fields that differ from their defaults; ConfigTester
# checks that a config built with them keeps every one.
CONFIG_COMMON_KWARGS = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["ScrnaLongformerForCellClassification"],
    "id2label": {0: "B cell", 1: "T cell"},
    "label2id": {"B cell": 0, "T cell": 1},
    "problem_type": "single_label_classification",
}

SHIMS = {
    "generation/test_utils.py": (
        '"""Stand-in written by scrnalf-hf\'s tests/transformers_common.py: our models do not generate."""\n\n\n'
        "class GenerationTesterMixin:\n    pass\n"
    ),
    "utils/test_configuration_utils.py": (
        '"""Stand-in written by scrnalf-hf\'s tests/transformers_common.py."""\n\n'
        "from transformers_common import CONFIG_COMMON_KWARGS as config_common_kwargs  # noqa: F401\n"
    ),
    "exporters/test_export.py": (
        '"""Stand-in written by scrnalf-hf\'s tests/transformers_common.py."""\n\n'
        "from transformers_common import ExportTesterMixin  # noqa: F401\n"
    ),
}


class TransformersTestsUnavailable(RuntimeError):
    """transformers' common tests could not be loaded; the message says why, in one line."""


def cache_root(version: str = transformers.__version__) -> Path:
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache_home) / "scrnalf-hf" / "transformers-tests" / version


def load():
    """The package ``transformers_common_tests`` for the installed transformers version,
    downloaded on first use."""
    version = transformers.__version__
    root = cache_root(version)
    package = root / PACKAGE
    if not all((package / name).is_file() for name in COMMON_FILES):
        _download_common_tests(version, root)
    for name, text in SHIMS.items():
        shim = package / name
        shim.parent.mkdir(exist_ok=True)
        (shim.parent / "__init__.py").touch()
        if not shim.is_file() or shim.read_text() != text:
            shim.write_text(text)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(PACKAGE)


def _download_common_tests(version: str, root: Path) -> None:
    """Fetch transformers' sdist with pip and extract the two common test files into
    ``root/transformers_common_tests`` (renamed into place whole, so concurrent runs are safe)."""
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as work:
        command = [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
            f"transformers=={version}", "--dest", work,
        ]
        try:
            subprocess.run(command, check=True, capture_output=True, text=True, timeout=900)
            (sdist,) = Path(work).glob("transformers-*.tar.gz")
        except (OSError, ValueError, subprocess.SubprocessError) as error:
            detail = (getattr(error, "stderr", None) or str(error) or type(error).__name__).strip().splitlines()
            raise TransformersTestsUnavailable(
                f"cannot load transformers' common model tests: `pip download --no-binary :all: "
                f"transformers=={version}` failed ({detail[-1] if detail else type(error).__name__})"
            ) from None
        package = Path(work) / PACKAGE
        package.mkdir()
        (package / "__init__.py").touch()
        with tarfile.open(sdist) as archive:
            for name in COMMON_FILES:
                try:
                    member = archive.extractfile(f"{sdist.name[: -len('.tar.gz')]}/tests/{name}")
                except KeyError:
                    member = None
                if member is None:
                    raise TransformersTestsUnavailable(
                        f"cannot load transformers' common model tests: {sdist.name} has no tests/{name}"
                    )
                (package / name).write_bytes(member.read())
        try:
            os.rename(package, root / PACKAGE)
        except OSError:  # another process put it there first, or a broken copy is in the way
            if not all((root / PACKAGE / name).is_file() for name in COMMON_FILES):
                shutil.rmtree(root / PACKAGE, ignore_errors=True)
                os.rename(package, root / PACKAGE)


class ExportTesterMixin:
    """``torch.export`` of every model class: the exported program must give the eager model's
    outputs on the tester's inputs. A test class may export several variants of its config by
    overriding ``export_variants`` (name -> config)."""

    def export_variants(self, config) -> dict:
        return {"": config}

    def test_torch_export(self):
        if not self.test_torch_exportable:
            self.skipTest(reason="test_torch_exportable is False")
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for variant, variant_config in self.export_variants(config).items():
            for model_class in self.all_model_classes:
                with self.subTest(model_class=model_class.__name__, variant=variant):
                    self.check_torch_export(model_class(variant_config).eval(), model_class)

    def check_torch_export(self, model, model_class):
        """Export ``model`` (eval mode) with the tester's inputs for ``model_class``; returns the
        exported program after comparing its outputs with the model's."""
        _, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        inputs = self._prepare_for_class(inputs_dict, model_class)
        with torch.no_grad():
            expected = model(**inputs)
            program = torch.export.export(model, args=(), kwargs=inputs, strict=False)
            exported = program.module()(**inputs)
        expected_leaves = [leaf for leaf in tree_leaves(expected) if isinstance(leaf, torch.Tensor)]
        exported_leaves = [leaf for leaf in tree_leaves(exported) if isinstance(leaf, torch.Tensor)]
        self.assertEqual(len(exported_leaves), len(expected_leaves))
        self.assertGreater(len(expected_leaves), 0)
        for got, want in zip(exported_leaves, expected_leaves):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        return program
