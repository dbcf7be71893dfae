"""The Triton forward compiles for sm_90 (offline, no GPU) into the instructions it is meant to
use: wgmma tensor-core MMAs, 16-byte cp.async pipelined loads, no scalar 2-byte global loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "inspect_triton.py"


@pytest.mark.parametrize("dim, causal", [(64, False), (128, True)])
def test_forward_uses_wgmma_and_async_copies(dim, causal):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--dim", str(dim), "--arch", "90",
                             *(["--causal"] if causal else [])],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    counts = {line.split()[1]: int(line.split()[0]) for line in result.stdout.splitlines()[1:]}
    assert any(op.startswith("wgmma.mma_async") for op in counts), result.stdout
    assert counts.get("cp.async.cg.shared.global", 0) > 0, result.stdout
    assert "ld.global.b16" not in counts, result.stdout
