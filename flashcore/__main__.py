"""python -m flashcore {build,bench}: prebuild the CUDA rungs, or benchmark against the peers."""

from __future__ import annotations

import argparse
import sys
import time

from rich.console import Console
from rich.table import Table


def _build(args: argparse.Namespace) -> int:
    import torch

    from . import jit

    console = Console()
    if not torch.cuda.is_available():
        console.print("No CUDA GPU: nothing to build (the reference backend needs no build).")
        return 0
    console.print(f"cache: {jit.cache_dir()}  GPU: {torch.cuda.get_device_name()}  "
                  f"{jit.arch_flag(torch.cuda.get_device_capability())}")
    table = Table("rung", "kernel", "registers", "static smem (B)", "stack (B)", "build (s)")
    for rung in args.rungs or jit.CUDA_RUNGS:
        start = time.perf_counter()
        library = jit.load(rung)
        seconds = f"{time.perf_counter() - start:.1f}"
        for res in jit.resource_usage(library.path):
            table.add_row(rung, res.kernel, str(res.registers), str(res.shared_bytes),
                          f"[red]{res.stack_bytes}[/red]" if res.stack_bytes else "0", seconds)
            seconds = ""
    console.print(table)
    console.print("stack > 0 means local memory (spills); dynamic shared memory is set at launch.")
    return 0


def main(argv: list[str] | None = None) -> int:
    from . import bench

    parser = argparse.ArgumentParser(prog="python -m flashcore", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="compile the CUDA rungs for this GPU and report "
                                "registers, shared memory and spills")
    build.add_argument("rungs", nargs="*", help="rungs to build (default: all)")
    build.set_defaults(run=_build)
    bench_parser = commands.add_parser("bench", help="time FlashCore's rungs beside PyTorch's "
                                       "attention backends")
    bench.add_arguments(bench_parser)
    bench_parser.set_defaults(run=bench.run)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
