"""Every CUDA kernel file compiles with nvcc alone for sm_80 and sm_90a, without spills.

Reads ptxas's own report (-Xptxas -v) for each kernel instantiation. Skipped, with the
reason, where nvcc is not installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from flashcore import jit

NVCC = shutil.which("nvcc")
SOURCES = sorted(jit.CSRC.glob("*.cu"))
TARGETS = {"sm_80": (8, 0), "sm_90a": (9, 0)}


def ptxas_report(source: Path, capability: tuple[int, int], tmp_path: Path) -> dict[str, str]:
    """{kernel symbol: its 'N bytes stack frame, N bytes spill stores, ...' line}."""
    result = subprocess.run(
        [NVCC, "-c", *jit._CUDA_FLAGS, jit.arch_flag(capability), "-Xptxas=-v",
         str(source), "-o", str(tmp_path / "kernel.o")],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    kernels = re.findall(r"Function properties for (\w+)\n\s*(.*)", result.stderr)
    assert kernels, f"no kernel found in ptxas output:\n{result.stderr}"
    return dict(kernels)


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_compiles_without_spills(source, target, tmp_path):
    report = ptxas_report(source, TARGETS[target], tmp_path)
    spilling = {k: line for k, line in report.items()
                if not line.startswith("0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads")}
    assert not spilling, f"{source.name} for {target} uses local memory: {spilling}"
