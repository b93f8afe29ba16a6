"""Compiled kernel libraries live in a private per-user cache and are loaded only if nobody else
can have written them and they are the bytes that were built; anything else is rebuilt. Old
builds are pruned.

A planted library's constructor writes a marker file when the library is loaded: the marker
must never appear."""

import hashlib
import logging
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest
import torch

import scrnalf_hf.kernels_scrnalf as kernels
from scrnalf_hf import ScrnaLongformerConfig, ScrnaLongformerModel
from scrnalf_hf.kernels_scrnalf import KernelUnavailable, kernel_cache_dir, library_path, load_kernel_library

COMPILER = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
needs_compiler = pytest.mark.skipif(COMPILER is None, reason="building kernel libraries needs a C compiler")
as_root = pytest.mark.skipif(os.getuid() != 0, reason="giving a file to another user needs root (CI runs as root)")

SHAPE = (1, 16, 4)  # (heads, head_dim, k) of the libraries these tests build
STRANGER = 12345  # a uid that is not ours

PLANTED_SOURCE = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *marker = fopen(MARKER, "w");
    if (marker) { fputs("loaded\n", marker); fclose(marker); }
}
"""


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def plant(directory, marker) -> str:
    """A library that writes ``marker`` when loaded, under the cache name of ``SHAPE``, with its
    true sha256 recorded and safe permissions: the tests then spoil one thing at a time."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    source = os.path.join(directory, "planted.c")
    with open(source, "w") as handle:
        handle.write(PLANTED_SOURCE)
    library = library_path(str(directory), *SHAPE)
    subprocess.run([COMPILER, "-shared", "-fPIC", f'-DMARKER="{marker}"', source, "-o", library], check=True)
    os.unlink(source)
    os.chmod(library, 0o700)
    with open(library + ".sha256", "w") as handle:
        handle.write(sha256(library) + "\n")
    return library


def assert_rebuilt(library: str, marker) -> None:
    assert not os.path.exists(marker), "the planted library was loaded"
    with open(library + ".sha256") as handle:
        assert handle.read().strip() == sha256(library)
    assert os.stat(library).st_uid == os.getuid()
    assert kernels._distrust(library) is None


@needs_compiler
def test_a_safe_planted_library_is_loaded_so_the_marker_can_show_a_load(tmp_path):
    """The control for the tests below: a library that passes every check is loaded as is."""
    marker = tmp_path / "marker"
    library = plant(tmp_path / "cache", marker)
    with pytest.raises(AttributeError):  # loaded, but it is not a kernel library
        load_kernel_library(*SHAPE, directory=str(tmp_path / "cache"))
    assert marker.read_text() == "loaded\n"
    assert os.path.exists(library)


@needs_compiler
@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(lambda library: os.chmod(library, 0o770), id="group-writable"),
        pytest.param(lambda library: os.chmod(library, 0o702), id="world-writable"),
        pytest.param(lambda library: Path(library + ".sha256").write_text("0" * 64 + "\n"), id="wrong-content"),
        pytest.param(lambda library: os.unlink(library + ".sha256"), id="no-recorded-hash"),
        pytest.param(lambda library: os.chmod(library + ".sha256", 0o666), id="hash-writable-by-others"),
    ],
)
def test_a_planted_library_that_may_have_been_tampered_with_is_rebuilt_not_loaded(tmp_path, spoil, caplog):
    marker = tmp_path / "marker"
    library = plant(tmp_path / "cache", marker)
    spoil(library)
    with caplog.at_level(logging.WARNING):
        loaded = load_kernel_library(*SHAPE, directory=str(tmp_path / "cache"))
    assert_rebuilt(library, marker)
    assert loaded.path == library
    assert "not loading the cached C kernel library" in caplog.text


@needs_compiler
def test_a_symbolic_link_in_the_cache_is_not_followed(tmp_path):
    marker = tmp_path / "marker"
    elsewhere = plant(tmp_path / "elsewhere", marker)
    library = library_path(str(tmp_path / "cache"), *SHAPE)
    os.makedirs(tmp_path / "cache", mode=0o700)
    os.symlink(elsewhere, library)
    shutil.copy(elsewhere + ".sha256", library + ".sha256")
    load_kernel_library(*SHAPE, directory=str(tmp_path / "cache"))
    assert not os.path.islink(library)
    assert_rebuilt(library, marker)


@needs_compiler
@as_root
@pytest.mark.parametrize("owned_by_stranger", ["library", "recorded hash"])
def test_a_library_of_another_user_is_rebuilt_not_loaded(tmp_path, owned_by_stranger):
    marker = tmp_path / "marker"
    library = plant(tmp_path / "cache", marker)
    os.chown(library if owned_by_stranger == "library" else library + ".sha256", STRANGER, STRANGER)
    load_kernel_library(*SHAPE, directory=str(tmp_path / "cache"))
    assert_rebuilt(library, marker)
    assert os.stat(library + ".sha256").st_uid == os.getuid()


@needs_compiler
@pytest.mark.parametrize("unsafe", ["world-writable", "another user's"])
def test_nothing_is_loaded_from_a_directory_others_can_write(tmp_path, unsafe):
    if unsafe == "another user's" and os.getuid() != 0:
        pytest.skip("giving a directory to another user needs root (CI runs as root)")
    marker = tmp_path / "marker"
    cache = tmp_path / "cache"
    plant(cache, marker)
    if unsafe == "world-writable":
        os.chmod(cache, 0o777)
    else:
        os.chown(cache, STRANGER, STRANGER)
    with pytest.raises(KernelUnavailable, match="unsafe"):
        load_kernel_library(*SHAPE, directory=str(cache))
    assert not marker.exists()


@needs_compiler
def test_an_unsafe_cache_makes_the_model_warn_once_and_run_the_pytorch_kernel(tmp_path, monkeypatch, caplog):
    cache = tmp_path / "shared"
    cache.mkdir()
    os.chmod(cache, 0o777)
    monkeypatch.setenv("SCRNALF_KERNEL_CACHE", str(cache))
    monkeypatch.setattr(kernels, "_LIBRARIES", {})
    model = ScrnaLongformerModel(ScrnaLongformerConfig(n_genes=40, d_model=32, depth=1, n_heads=2, knn_k=8)).eval()
    with caplog.at_level(logging.WARNING), torch.no_grad():
        model(torch.rand(2, 40))
        model(torch.rand(2, 40))
    assert model.attention_function(False).name == "knn"
    assert caplog.text.count("writable by group or others") == 1
    assert os.listdir(cache) == []


@needs_compiler
def test_a_fresh_cache_is_private_and_records_the_hash_of_what_it_built(tmp_path):
    cache = tmp_path / "new" / "kernels"
    library = load_kernel_library(*SHAPE, directory=str(cache))
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    assert library.path == library_path(str(cache), *SHAPE)
    with open(library.path + ".sha256") as handle:
        assert handle.read().strip() == sha256(library.path)
    assert stat.S_IMODE(os.stat(library.path).st_mode) & 0o022 == 0
    assert sorted(os.listdir(cache)) == sorted([os.path.basename(library.path), os.path.basename(library.path) + ".sha256"])


def test_the_cache_is_per_user_and_never_the_shared_temporary_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("SCRNALF_KERNEL_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert kernel_cache_dir() == str(tmp_path / "home" / ".cache" / "scrnalf-hf" / "kernels")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert kernel_cache_dir() == str(tmp_path / "xdg" / "scrnalf-hf" / "kernels")
    monkeypatch.setenv("SCRNALF_KERNEL_CACHE", str(tmp_path / "chosen"))
    assert kernel_cache_dir() == str(tmp_path / "chosen")
    import inspect

    assert "gettempdir" not in inspect.getsource(kernels)


def age(path, days: float) -> None:
    then = time.time() - days * 24 * 3600
    os.utime(path, (then, then))


def test_libraries_unused_for_30_days_are_pruned(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    for name, days in [("knn_attention_old.so", 31), ("knn_attention_recent.so", 29)]:
        (cache / name).write_bytes(b"\x7fELF")
        (cache / (name + ".sha256")).write_text("0" * 64)
        age(cache / name, days)
    (cache / "knn_attention_gone.so.sha256").write_text("0" * 64)  # its library was deleted
    (cache / ".build-interrupted").mkdir()
    age(cache / ".build-interrupted", 31)
    (cache / ".build-running").mkdir()
    deleted = kernels.prune_kernel_cache(str(cache))
    assert sorted(os.path.basename(path) for path in deleted) == [
        ".build-interrupted", "knn_attention_gone.so.sha256", "knn_attention_old.so", "knn_attention_old.so.sha256",
    ]
    assert sorted(os.listdir(cache)) == [".build-running", "knn_attention_recent.so", "knn_attention_recent.so.sha256"]


@needs_compiler
def test_loading_a_library_marks_it_used_so_it_is_not_pruned(tmp_path):
    cache = str(tmp_path / "cache")
    library = load_kernel_library(*SHAPE, directory=cache).path
    age(library, 20)
    load_kernel_library(*SHAPE, directory=cache)
    assert kernels.prune_kernel_cache(cache, max_age_seconds=10 * 24 * 3600) == []
    age(library, 20)
    assert kernels.prune_kernel_cache(cache, max_age_seconds=10 * 24 * 3600) == [library, library + ".sha256"]
