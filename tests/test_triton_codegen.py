"""The Triton forward compiles for sm_90 (offline, no GPU) into the instructions it is meant to
use: wgmma tensor-core MMAs, 16-byte cp.async pipelined loads (or, in its TMA variant, bulk
tensor copies), no scalar 2-byte global loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "inspect_triton.py"


def instruction_counts(*args: str) -> dict[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90", *args],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    return {line.split()[1]: int(line.split()[0]) for line in result.stdout.splitlines()[1:]}


@pytest.mark.parametrize("dim, causal", [(64, False), (128, True)])
def test_forward_uses_wgmma_and_async_copies(dim, causal):
    counts = instruction_counts("--dim", str(dim), *(["--causal"] if causal else []))
    assert any(op.startswith("wgmma.mma_async") for op in counts), counts
    assert counts.get("cp.async.cg.shared.global", 0) > 0, counts
    assert "ld.global.b16" not in counts, counts


def test_tma_variant_loads_with_the_copy_engine():
    counts = instruction_counts("--dim", "128", "--tma")
    assert any(op.startswith("cp.async.bulk.tensor") for op in counts), counts
    assert any(op.startswith("wgmma.mma_async") for op in counts), counts
    assert "cp.async.cg.shared.global" not in counts and "ld.global.b16" not in counts, counts
