"""The Triton kernels compile for sm_90 (offline, no GPU) into the instructions they are meant to
use: wgmma tensor-core MMAs, 16-byte cp.async pipelined loads (or, in the forward's TMA variant,
bulk tensor copies), no scalar 2-byte global loads; and the dQ kernel into no spills."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "inspect_triton.py"


def inspect(*args: str) -> tuple[str, dict[str, int]]:
    """The kernel's summary line (shared memory, registers, stack) and its instruction counts."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90", *args],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    summary, *lines = result.stdout.splitlines()
    return summary, {line.split()[1]: int(line.split()[0]) for line in lines}


def instruction_counts(*args: str) -> dict[str, int]:
    return inspect(*args)[1]


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


@pytest.mark.parametrize("kernel", ["dq", "dkdv"])
def test_backward_kernels_use_wgmma_and_async_copies(kernel):
    counts = instruction_counts("--kernel", kernel, "--dim", "128", "--causal")
    assert any(op.startswith("wgmma.mma_async") for op in counts), counts
    assert counts.get("cp.async.cg.shared.global", 0) > 0, counts
    assert "ld.global.b16" not in counts, counts


@pytest.mark.parametrize("dim", [64, 128])
def test_dq_kernel_keeps_its_tiles_in_registers(dim):
    """S, dP and dS stay in registers (dS is the A operand of dS·K): no stack frame, i.e. no
    spills, at the first config (the dK/dV kernel's best configs do spill; docs/notes.md)."""
    summary, _ = inspect("--kernel", "dq", "--dim", str(dim))
    assert " STACK:0 " in summary + " ", summary
