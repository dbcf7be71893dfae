"""One backend against a peer at chosen points, repeated and alternated, on one GPU in one call.

Single sweep points move by a few percent between runs and processes (docs/notes.md), the size
of the gaps left at the short ones. Here each point is timed several times: per repetition both
backends on fresh inputs, in alternating order, every output checked against float64
(bench.sweep_point, relative error below 2e-3); then each backend's median TFLOP/s and the
median ratio with its range.

    python benchmarks/ratio_reps.py [--backend hopper] [--peer sdpa-cudnn] [--reps 6]
                                    [--points B,H,S,D[,c] ...]   # default: the grid's S <= 1k
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flashcore import bench  # noqa: E402


def parse_point(text: str) -> tuple[bench.Shape, bool]:
    """B,H,S,D with an optional ",c" for causal."""
    shape, causal = (text[:-2], True) if text.endswith(",c") else (text, False)
    return bench.parse_shape(shape), causal


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="hopper")
    parser.add_argument("--peer", default="sdpa-cudnn")
    parser.add_argument("--reps", type=int, default=6)
    short = [(shape, c) for shape, c in bench.sweep_points("both") if shape[2] <= 1024]
    parser.add_argument("--points", nargs="+", type=parse_point, metavar="B,H,S,D[,c]", default=short)
    args = parser.parse_args()
    table = Table(title=f"{args.backend} against {args.peer}, fp16 forward, {args.reps} repetitions")
    columns = ("point", f"{args.backend} TFLOP/s", f"{args.peer} TFLOP/s", "ratio (median)", "range")
    for col in columns:
        table.add_column(col, justify="left" if col == "point" else "right")
    failures = []
    for shape, causal in args.points:
        label = f"B={shape[0]} H={shape[1]} S={shape[2]} D={shape[3]}{' causal' if causal else ''}"
        tflops: dict[str, list[float]] = {args.backend: [], args.peer: []}
        ratios = []
        for rep in range(args.reps):
            names = [args.backend, args.peer][:: 1 if rep % 2 == 0 else -1]
            rows = {row["backend"]: row
                    for row in bench.sweep_point(shape, causal, torch.float16, names, backward=False)}
            bad = [f"{label} {name}: {why}" for name, row in rows.items()
                   if (why := bench.ab_failure(row)) is not None]
            if bad:
                failures += bad
                continue
            for name in tflops:
                tflops[name].append(rows[name]["tflops"])
            ratios.append(rows[args.backend]["tflops"] / rows[args.peer]["tflops"])
            torch.cuda.empty_cache()
        if ratios:
            spread = [f"{statistics.median(v):.0f} ({min(v):.0f}–{max(v):.0f})" for v in tflops.values()]
            table.add_row(label, *spread, f"{statistics.median(ratios):.3f}",
                          f"{min(ratios):.3f}–{max(ratios):.3f}")
    return bench.print_run(table, failures)


if __name__ == "__main__":
    sys.exit(main())
