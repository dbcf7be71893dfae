"""Compile the Triton rung's forward kernel for a GPU arch offline (no GPU needed) and count the
instructions that matter: async/bulk copies, global loads/stores by width, wgmma/mma.

Pointers and sequence strides are specialised as 16-byte aligned, as Triton's JIT does at run
time for contiguous fp16/bf16 tensors with head dims that are multiples of 8.

    python benchmarks/inspect_triton.py [--dim 128] [--causal] [--config 128,64,8,3] [--arch 90]
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flashcore import triton_rung  # noqa: E402

WATCH = ("cp.async", "ld.global", "st.global", "wgmma.mma", "mma.sync", "ld.shared", "mbarrier",
         "tensormap")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--config", default="128,64,8,3", help="BLOCK_M,BLOCK_N,warps,stages")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--tma", action="store_true", help="the TMA-descriptor variant (sm_90+)")
    args = parser.parse_args()
    block_m, block_n, warps, stages = (int(x) for x in args.config.split(","))

    fn = triton_rung._fwd_kernel.fn
    constexprs = {"HEAD_DIM": args.dim, "BLOCK_D": triton_rung._head_block(args.dim),
                  "CAUSAL": args.causal, "TMA": args.tma, "BLOCK_M": block_m, "BLOCK_N": block_n}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("Q", "K", "V", "O"):
            signature[name] = "*fp16"
        elif name == "LSE":
            signature[name] = "*fp32"
        else:
            signature[name] = "fp32" if name == "scale_log2" else "i32"
    aligned = [i for i, n in enumerate(fn.arg_names)
               if n in ("Q", "K", "V", "O", "LSE") or re.fullmatch(r"stride_\w[bhs]", n)]
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                       attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    kernel = triton.compile(source, target=GPUTarget("cuda", args.arch, 32),
                            options={"num_warps": warps, "num_stages": stages})
    ops = Counter(op for op in re.findall(r"^\s*(?:@%p\d+\s+)?([a-z][\w.]*)", kernel.asm["ptx"], re.M)
                  if op.startswith(WATCH))
    print(f"_fwd_kernel D={args.dim} causal={args.causal} tma={args.tma} config={args.config} sm_{args.arch}: "
          f"{kernel.metadata.shared} B shared memory")
    for op, count in sorted(ops.items()):
        print(f"  {count:4d}  {op}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
