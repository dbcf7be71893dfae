"""A/B timing of one CUDA rung built from several source trees, on one GPU in one call.

    git archive HEAD flashcore/csrc | tar x -C /tmp/base     # a tree to compare against
    python benchmarks/ab_sources.py /tmp/base/flashcore/csrc [OTHER_CSRC ...] [--passes 2]
                                    [--shapes B,H,S,D ...]

Every build registers torch.ops.flashcore.<rung>_fwd, so each runs in its own process, in the
order base, …, this tree, base, … so that clock or temperature drift falls on all. Per point of
the BENCH grid, or of the shapes given (forward, do_bench median), and, with the grid, at the
mission shape (CUDA-graph replay), it prints
each build's best pass and this tree's speed-up over the first; every output is checked against
the float64 reference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import flashcore  # noqa: E402
from flashcore import bench, jit  # noqa: E402


def worker(csrc: Path, rung: str, causal: str, shapes: list[bench.Shape]) -> None:
    """One build's timings, one JSON line per point, on stdout."""
    jit.CSRC = csrc
    torch.manual_seed(0)
    points = [(shape, c) for shape in shapes for c in bench.causal_values(causal)]
    for shape, is_causal in points or bench.sweep_points(causal):
        _, _, s, d = shape
        (row,) = bench.sweep_point(shape, is_causal, torch.float16, [rung], backward=False)
        print(json.dumps({"point": f"D={d} {'c ' if is_causal else 'nc'} S={s}",
                          "value": row["tflops"], "rel_err": row["rel_err"], "error": row["error"]}),
              flush=True)
        torch.cuda.empty_cache()
    for is_causal in [] if shapes else bench.causal_values(causal):
        q, k, v = bench.make_inputs(bench.MISSION, torch.float16)
        (c,) = bench.candidates([rung], q, k, v, is_causal)
        ref = flashcore.reference_attention(q, k, v, causal=is_causal)
        row = bench.measure(c, ref, lambda c: {"value": bench.graph_us(c.call, 200)}, ("value",))
        print(json.dumps({"point": f"mission {'c ' if is_causal else 'nc'} µs", "value": row["value"],
                          "rel_err": row["rel_err"], "error": row["error"]}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", type=Path, nargs="+", help="csrc directories to compare against")
    parser.add_argument("--rung", default="hopper")
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    parser.add_argument("--shapes", nargs="+", type=bench.parse_shape, default=[], metavar="B,H,S,D",
                        help="time these shapes instead of the BENCH grid and the mission shape")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.trees[0], args.rung, args.causal, args.shapes)
        return 0
    trees = {str(path): path.resolve() for path in args.trees} | {"this tree": jit.CSRC}
    results: dict[str, dict[str, list[float]]] = {name: {} for name in trees}
    failures = []
    shapes = [",".join(map(str, shape)) for shape in args.shapes]
    worker_args = ["--worker", "--rung", args.rung, "--causal", args.causal,
                   *(["--shapes", *shapes] if shapes else [])]
    for _ in range(args.passes):
        for name, csrc in trees.items():
            out = subprocess.run([sys.executable, __file__, str(csrc), *worker_args],
                                 check=True, capture_output=True, text=True).stdout
            for line in out.splitlines():
                row = json.loads(line)
                if (why := bench.ab_failure(row)) is not None:
                    failures.append(f"{name} {row['point']}: {why}")
                elif row["value"] is not None:
                    results[name].setdefault(row["point"], []).append(row["value"])
    table = Table(title=f"{args.rung}, best of {args.passes} passes")
    for col in ("point", *trees, "speed-up"):
        table.add_column(col, justify="left" if col == "point" else "right")
    for point in results["this tree"]:
        lower_is_better = point.endswith("µs")
        best = [(min if lower_is_better else max)(results[name].get(point, [float("nan")])) for name in trees]
        ratio = best[0] / best[-1] if lower_is_better else best[-1] / best[0]
        table.add_row(point, *(f"{x:.1f}" for x in best), f"{ratio:.3f}")
    return bench.print_run(table, failures)


if __name__ == "__main__":
    sys.exit(main())
