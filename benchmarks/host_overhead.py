"""Where the host time of one flashcore.attention call goes, stage by stage (needs a GPU).

On a tiny problem (B=1, H=1, S=16, D=64: the kernel runs in ~2 µs), back-to-back calls are
host-bound, so wall time per call is host time. Each stage is timed alone after a warm-up:
argument checks, backend choice, the bare custom op, the rung's C++ entry for the common call
(which flashcore.attention takes once a call has run on the rung), and the whole public call,
beside PyTorch's own SDPA for scale. Then a training step (forward + backward through autograd) of
each differentiable rung beside SDPA's: its loop µs, and the step's GPU µs from one profiled
step, so a host-bound step shows as loop µs far above GPU µs.

    python benchmarks/host_overhead.py [--shape 1,8,512,64]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import flashcore  # noqa: E402
from flashcore import api  # noqa: E402
from flashcore.bench import graph_us, loop_us  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1,1,16,64", help="B,H,S,D (default 1,1,16,64)")
    shape = tuple(int(x) for x in parser.parse_args().shape.split(","))
    if not torch.cuda.is_available():
        print("No CUDA GPU: host overhead is only meaningful beside a GPU kernel.")
        return 0
    q, k, v = (torch.randn(shape, dtype=torch.float16, device="cuda") for _ in range(3))
    table = Table("stage", "µs / call", title=f"host cost per call, shape {shape}, fp16")
    key = api._common_call_key(q, k, v, False, None, False, "auto")
    stages = {
        "argument checks and memo key": lambda: api._common_call_key(q, k, v, False, None, False, "auto"),
        "backend choice (memoised)": lambda: api._select(key, "auto", q, k, v, False, False),
        "SDPA (PyTorch)": lambda: F.scaled_dot_product_attention(q, k, v),
        "torch.empty_like(q) (an output's allocation)": lambda: torch.empty_like(q),
    }
    for rung in flashcore.ladder():
        if hasattr(rung, "op"):  # the CUDA rungs' bare TORCH_LIBRARY op, and its function
            stages[f"torch.ops.flashcore.{rung.name}_fwd"] = (
                lambda op=rung.op: op(q, k, v, 0.125, False, False))
            stages[f"{rung.name}: the op's function, direct"] = (
                lambda fn=rung.direct: fn(q, k, v, 0.125, False, False))
        stages[f"flashcore.attention(backend={rung.name!r})"] = (
            lambda name=rung.name: flashcore.attention(q, k, v, backend=name))
    stages["flashcore.attention() (auto)"] = lambda: flashcore.attention(q, k, v)
    for rung in flashcore.ladder():  # a first call enables each CUDA rung's C++ entry
        if hasattr(rung, "op") and rung.why_not(q, k, v) is None:
            flashcore.attention(q, k, v, backend=rung.name)
            stages[f"{rung.name}: its C++ entry for the whole call"] = (
                lambda fn=api._fast[rung.name]: fn(q, k, v, False, None, False))
    for name, fn in stages.items():
        table.add_row(name, f"{loop_us(fn):.2f}")
    Console().print(table)
    Console().print(training_steps(shape))
    # The device side's floor, timed as the mission benchmark's "GPU µs": a one-element kernel.
    one = torch.zeros(1, device="cuda")
    print(f"GPU floor: a one-element kernel takes {graph_us(lambda: one.add_(1), 100):.2f} µs per "
          "call in a CUDA graph (flashcore.bench.graph_us)")
    return 0


def training_steps(shape) -> Table:
    """Loop µs of `attention(q, k, v).backward(dout)` and the GPU µs of one such step (the sum
    of its kernels' durations in a torch.profiler trace)."""
    q, k, v = (torch.randn(shape, dtype=torch.float16, device="cuda", requires_grad=True)
               for _ in range(3))
    dout = torch.randn_like(q)
    steps = {"SDPA (PyTorch)": lambda: F.scaled_dot_product_attention(q, k, v).backward(dout)}
    for rung in flashcore.ladder():
        if rung.has_backward:
            steps[f"flashcore.attention(backend={rung.name!r})"] = (
                lambda name=rung.name: flashcore.attention(q, k, v, backend=name).backward(dout))
    table = Table("fwd+bwd step", "loop µs / step", "GPU µs / step (profiled)",
                  title=f"training step, shape {shape}, fp16")
    for name, step in steps.items():
        loop = loop_us(step)
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            step()
            torch.cuda.synchronize()
        gpu = sum(e.self_device_time_total for e in prof.key_averages())  # each kernel once
        table.add_row(name, f"{loop:.1f}", f"{gpu:.1f}")
    return table


if __name__ == "__main__":
    raise SystemExit(main())
