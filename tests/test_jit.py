"""The JIT build's cache: where it lives and what its key covers."""

from __future__ import annotations

import pytest
import torch

from flashcore import jit


def test_cache_dir_is_overridable(monkeypatch, tmp_path):
    monkeypatch.setenv("FLASHCORE_CACHE_DIR", str(tmp_path))
    assert jit.cache_dir() == tmp_path
    monkeypatch.delenv("FLASHCORE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert jit.cache_dir() == tmp_path / "flashcore"


def test_hopper_builds_for_sm_90a():
    assert jit.arch_flag((9, 0)) == "-gencode=arch=compute_90a,code=sm_90a"
    assert jit.arch_flag((8, 0)) == "-gencode=arch=compute_80,code=sm_80"


def test_key_covers_rung_arch_sources_and_torch(monkeypatch, tmp_path):
    key = jit.build_key("wmma", (9, 0))
    assert key == jit.build_key("wmma", (9, 0))
    assert key != jit.build_key("baseline", (9, 0))
    assert key != jit.build_key("wmma", (8, 0))
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert key != jit.build_key("wmma", (9, 0))
    monkeypatch.undo()
    for path in jit.CSRC.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    (tmp_path / "wmma.cu").write_text((tmp_path / "wmma.cu").read_text() + "\n// edited\n")
    monkeypatch.setattr(jit, "CSRC", tmp_path)
    assert key != jit.build_key("wmma", (9, 0))


def test_unknown_rung_is_named():
    with pytest.raises(ValueError, match="no CUDA rung named 'cutlass'"):
        jit.load("cutlass")
