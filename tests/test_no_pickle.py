"""No pickle anywhere in the package: loading a pickle runs whatever code the file holds, and a
model or dataset from the Hub is untrusted. Weights go through safetensors, data through Arrow,
records through JSON.

The scan reads the syntax tree of every ``.py`` file of ``scrnalf_hf`` and ``scripts``, so
comments and strings that mention pickle do not count and an alias (``import torch as th``)
does not hide a call.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "shelve"}
# Files with a finding whose fix belongs to another area; strict, so the mark must go once fixed.
# Files allowed to fail the scan, each with the reason; empty: the package holds no pickle.
KNOWN_FINDINGS: dict[str, str] = {}


def _imported_names(tree: ast.AST) -> dict[str, str]:
    """Local name → the dotted name it stands for (``np`` → ``numpy``, ``load`` → ``torch.load``)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname is not None:
                    names[alias.asname] = alias.name
                else:
                    names[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.expr, names: dict[str, str]) -> str | None:
    if isinstance(node, ast.Name):
        return names.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        owner = _dotted(node.value, names)
        return None if owner is None else f"{owner}.{node.attr}"
    return None


def _is_constant(node: ast.expr | None, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def pickle_uses(source: str, filename: str = "<string>") -> list[str]:
    """Every pickle use in ``source``, as ``"FILE:LINE: what"``."""
    tree = ast.parse(source, filename=filename)
    names = _imported_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        else:
            modules = []
        found += [f"{filename}:{node.lineno}: import {m}" for m in modules if m.split(".")[0] in PICKLE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        target = _dotted(node.func, names) or ""
        keywords = {keyword.arg: keyword.value for keyword in node.keywords}
        problem = None
        if target == "torch.load" and not _is_constant(keywords.get("weights_only"), True):
            problem = "torch.load without weights_only=True"
        elif target == "torch.save":
            problem = "torch.save writes a pickle"
        elif target.startswith("numpy.") and target.rsplit(".", 1)[-1] in ("load", "save", "savez", "savez_compressed"):
            if "allow_pickle" in keywords and not _is_constant(keywords["allow_pickle"], False):
                problem = f"{target} with allow_pickle"
        elif target.rsplit(".", 1)[-1] in ("read_pickle", "to_pickle"):
            problem = target
        elif target in ("importlib.import_module", "__import__") and node.args:
            module = node.args[0]
            if isinstance(module, ast.Constant) and str(module.value).split(".")[0] in PICKLE_MODULES:
                problem = f"{target}({module.value!r})"
        if problem is not None:
            found.append(f"{filename}:{node.lineno}: {problem}")
    return found


PLANTED = [
    "import pickle",
    "import cPickle as p",
    "from dill import loads",
    "import joblib.numpy_pickle",
    "import torch\ntorch.load('w.pt')",
    "import torch as th\nth.load(f, weights_only=False)",
    "from torch import load\nload(f)",
    "import torch\nflag = True\ntorch.load(f, weights_only=flag)",
    "import numpy as np\nnp.load(f, allow_pickle=True)",
    "from numpy import load\nload(f, allow_pickle=True)",
    "import pandas as pd\npd.read_pickle(path)",
    "frame.to_pickle(path)",
    "import torch\ntorch.save(state, path)",
    "import importlib\nimportlib.import_module('pickle')",
]
SAFE = [
    "import torch\ntorch.load(f, weights_only=True)",
    "import numpy as np\nnp.load(f)\nnp.load(f, allow_pickle=False)",
    "from safetensors.torch import load_file\nload_file(path)",
    "import json\njson.load(f)",
    "message = 'never import pickle'  # nor torch.load(f)",
    "def load(f):\n    return f\nload(1)",
]


@pytest.mark.parametrize("source", PLANTED)
def test_the_scanner_finds_a_planted_pickle_use(source):
    found = pickle_uses(source)
    assert len(found) == 1 and found[0].startswith("<string>:"), found


@pytest.mark.parametrize("source", SAFE)
def test_the_scanner_lets_pickle_free_code_pass(source):
    assert pickle_uses(source) == []


def _python_files() -> list:
    files = sorted((REPO / "scrnalf_hf").rglob("*.py")) + sorted((REPO / "scripts").rglob("*.py"))
    params = []
    for path in files:
        relative = path.relative_to(REPO).as_posix()
        marks = [pytest.mark.xfail(strict=True, reason=KNOWN_FINDINGS[relative])] if relative in KNOWN_FINDINGS else []
        params.append(pytest.param(path, id=relative, marks=marks))
    return params


def test_the_scan_covers_the_package():
    assert len(_python_files()) > 20


@pytest.mark.parametrize("path", _python_files())
def test_no_pickle_in(path):
    assert pickle_uses(path.read_text(), str(path.relative_to(REPO))) == []
