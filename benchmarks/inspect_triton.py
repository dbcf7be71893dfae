"""Compile one of the Triton rung's kernels for a GPU arch offline (no GPU needed), count the
instructions that matter (async/bulk copies, global loads/stores by width, wgmma/mma) and read
its resource use (registers, stack frame: spills) from the cubin.

Pointers and sequence strides are specialised as 16-byte aligned, as Triton's JIT does at run
time for contiguous fp16/bf16 tensors with head dims that are multiples of 8. The config
defaults to the kernel's first candidate (what FLASHCORE_TRITON_AUTOTUNE=0 takes where it fits).

    python benchmarks/inspect_triton.py [--kernel fwd|dq|dkdv] [--dim 128] [--causal]
                                        [--config 128,64,8,3] [--arch 90] [--tma]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flashcore import jit, triton_rung  # noqa: E402

WATCH = ("cp.async", "ld.global", "st.global", "wgmma.mma", "mma.sync", "ld.shared", "mbarrier",
         "tensormap")


KERNELS = {"fwd": triton_rung._fwd_kernel, "dq": triton_rung._bwd_dq_kernel,
           "dkdv": triton_rung._bwd_dkdv_kernel}
FP32_POINTERS = ("LSE", "DLSE", "Delta")


def resource_usage(cubin: bytes) -> str:
    """cuobjdump's per-kernel line: REG (registers a thread), STACK (bytes: spills), SHARED…"""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run([jit.cuobjdump(), "--dump-resource-usage", f.name], capture_output=True,
                                text=True, check=True).stdout
    return " ".join(re.findall(r"(?:REG|STACK|SHARED|LOCAL):\d+", report))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", choices=KERNELS, default="fwd")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--config", help="BLOCK_M,BLOCK_N,warps,stages (default: the first listed)")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--tma", action="store_true", help="the forward's TMA-descriptor variant (sm_90+)")
    args = parser.parse_args()
    autotuned = KERNELS[args.kernel]
    if args.config:
        block_m, block_n, warps, stages = (int(x) for x in args.config.split(","))
    else:
        first = autotuned.configs[0]
        block_m, block_n = first.kwargs["BLOCK_M"], first.kwargs["BLOCK_N"]
        warps, stages = first.num_warps, first.num_stages

    fn = autotuned.fn
    constexprs = {"HEAD_DIM": args.dim, "BLOCK_D": triton_rung._head_block(args.dim),
                  "CAUSAL": args.causal, "TMA": args.tma, "HAS_DLSE": False,
                  "BLOCK_M": block_m, "BLOCK_N": block_n}
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name[0].isupper():  # tensors
            signature[name] = "*fp32" if name in FP32_POINTERS else "*fp16"
        else:
            signature[name] = "fp32" if name.startswith("scale") else "i32"
    aligned = [i for i, n in enumerate(fn.arg_names)
               if n[0].isupper() or re.fullmatch(r"stride_\w+[bhs]", n)]
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                       attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    kernel = triton.compile(source, target=GPUTarget("cuda", args.arch, 32),
                            options={"num_warps": warps, "num_stages": stages})
    ops = Counter(op for op in re.findall(r"^\s*(?:@%p\d+\s+)?([a-z][\w.]*)", kernel.asm["ptx"], re.M)
                  if op.startswith(WATCH))
    print(f"{fn.__name__} D={args.dim} causal={args.causal} tma={args.tma} "
          f"config={block_m},{block_n},{warps},{stages} sm_{args.arch}: "
          f"{kernel.metadata.shared} B shared memory; {resource_usage(kernel.asm['cubin'])}")
    for op, count in sorted(ops.items()):
        print(f"  {count:4d}  {op}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
