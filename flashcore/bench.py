"""Benchmark every FlashCore rung against its peers: PyTorch SDPA and FlashAttention-4.

Single-shape mode (the mission shape B1 H8 S512 D64 by default) reports two
latencies per backend, because at small shapes the kernel is shorter than the
host work that launches it:

* GPU µs/call: 20 calls are captured in one CUDA graph; the graph is replayed
  --iters times, each replay timed with CUDA events, and the median replay is
  divided by 20. No host work is left inside, so this is the device time of
  the kernels back to back.
* loop µs/call: after a warm-up, 2,000 eager calls are issued back to back and
  synchronised once at the end; wall time / 2,000. This is what an eager model
  feels, Python and dispatch included. The SDPA peers forced to one kernel
  enter `sdpa_kernel` once around the whole loop (and around the graph
  capture), so that context manager's own cost is not charged to them.

`--sweep` runs the FlashAttention papers' grid (16k tokens, hidden 2048) with
`triton.testing.do_bench` (median), which is meaningful there because the
kernels run far longer than their launch. Every timing comes with the relative
error of the same backend's output against the float64 reference.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ContextManager

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from torch.nn.attention import SDPBackend, sdpa_kernel

import flashcore
from flashcore.backends import ladder

Shape = tuple[int, int, int, int]  # B, H, S, D
Row = dict[str, Any]

MISSION: Shape = (1, 8, 512, 64)
CPU_SHAPE: Shape = (1, 2, 64, 32)
GRAPH_CALLS, LOOP_CALLS, LOOP_WARMUP = 20, 2000, 500
SWEEP_TOKENS, SWEEP_HIDDEN = 16384, 2048
SWEEP_D = (64, 128)
SWEEP_S = (512, 1024, 2048, 4096, 8192, 16384)
BACKWARD_S = (1024, 4096, 16384)
BACKWARD_FLOP_FACTOR = 3.5
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
SDPA_PEERS: dict[str, SDPBackend | None] = {
    "sdpa": None,
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
}
FA4 = "fa4"
FLASHCORE_EXTRA = ("reference", "auto")  # accepted by --backends, not run by default

console = Console(width=None if sys.stdout.isatty() else 120)  # logs: wide enough for the sweep table


@dataclass
class Candidate:
    """One backend bound to one point's inputs; `call` is the bare forward call, nothing else."""

    name: str
    call: Callable[[], Any] | None = None
    unpack: Callable[[Any], torch.Tensor] = lambda out: out  # raw result -> (B, H, S, D) tensor
    context: Callable[[], ContextManager[Any]] = contextlib.nullcontext
    leaves: tuple[torch.Tensor, ...] = ()  # the tensors whose .grad a backward pass fills
    skip: str | None = None

    def output(self) -> torch.Tensor:
        assert self.call is not None
        return self.unpack(self.call())


@functools.cache
def _fa4() -> Callable[..., Any] | None:
    try:
        from flash_attn.cute import flash_attn_func
    except Exception:  # not installed, or an install that fails on import
        return None
    return flash_attn_func


def _fa4_output(out: Any) -> torch.Tensor:
    return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)


def candidates(names: Sequence[str], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               causal: bool) -> list[Candidate]:
    """Build the named backends for these inputs (a backward run when q requires grad)."""
    needs_grad = q.requires_grad
    rungs = {r.name: r for r in ladder()}
    result = []
    for name in names:
        if name in SDPA_PEERS:
            forced = SDPA_PEERS[name]
            result.append(Candidate(
                name, functools.partial(F.scaled_dot_product_attention, q, k, v, is_causal=causal),
                context=contextlib.nullcontext if forced is None else functools.partial(sdpa_kernel, forced),
                leaves=(q, k, v)))
        elif name == FA4:
            fa4 = _fa4()
            if fa4 is None:
                result.append(Candidate(name, skip="flash_attn.cute is not installed"))
                continue
            # FA4's native layout is (B, S, H, D): give it contiguous copies, made outside any timing.
            qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_(needs_grad)
                          for x in (q, k, v))
            result.append(Candidate(name, functools.partial(fa4, qt, kt, vt, causal=causal),
                                    unpack=_fa4_output, leaves=(qt, kt, vt)))
        else:
            rung = rungs.get(name)  # None for "reference" and "auto", which take anything
            result.append(Candidate(
                name, functools.partial(flashcore.attention, q, k, v, causal=causal, backend=name),
                leaves=(q, k, v), skip=None if rung is None else rung.why_not(q, k, v, causal, needs_grad)))
    return result


def graph_us(fn: Callable[[], Any], replays: int) -> float:
    """Device µs per call: GRAPH_CALLS calls in one CUDA graph, median replay / GRAPH_CALLS."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation, autotuning) outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_CALLS):
            fn()
    graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(replays)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) * 1e3 / GRAPH_CALLS


def loop_us(fn: Callable[[], Any]) -> float:
    """Wall-clock µs per call over LOOP_CALLS back-to-back eager calls, host cost included."""
    for _ in range(LOOP_WARMUP):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(LOOP_CALLS):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e6 / LOOP_CALLS


def bench_ms(fn: Callable[[], Any], grad_to_none: Sequence[torch.Tensor] = ()) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, grad_to_none=list(grad_to_none) or None, return_mode="median")


def peak_mib(fn: Callable[[], Any], grad_to_none: Sequence[torch.Tensor] = ()) -> float:
    """Peak memory one call allocates above what was live before it."""
    for t in grad_to_none:
        t.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def forward_flops(shape: Shape, causal: bool) -> float:
    b, h, s, d = shape
    return 4 * b * h * s * s * d / (2 if causal else 1)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.detach().double() - ref).norm() / ref.norm()).item()


def describe(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:160] if lines else ''}"


def measure(c: Candidate, ref: torch.Tensor, timings: Callable[[Candidate], Row], fields: Sequence[str] = (),
            grad: bool = False) -> Row:
    """Error check on a fresh call, then `timings` (which fills `fields`); a failure becomes `error`."""
    row: Row = {"backend": c.name, **dict.fromkeys(fields), "rel_err": None, "error": c.skip}
    if c.skip is None:
        try:
            with torch.inference_mode(not grad), c.context():
                row["rel_err"] = rel_err(c.output(), ref)
                row.update(timings(c))
        except Exception as exc:  # one failing backend must not sink the run
            row["error"] = describe(exc)
    return row


def make_inputs(shape: Shape, dtype: torch.dtype, device: str = "cuda") -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(shape, dtype=dtype, device=device) for _ in range(3))


def causal_values(choice: str) -> list[bool]:
    return {"both": [False, True], "no": [False], "yes": [True]}[choice]


def single_shape(args: argparse.Namespace, names: list[str]) -> list[Row]:
    rows: list[Row] = []
    for causal in causal_values(args.causal):
        q, k, v = make_inputs(args.shape, DTYPES[args.dtype])
        ref = flashcore.reference_attention(q, k, v, causal=causal)
        flops = forward_flops(args.shape, causal)

        def timings(c: Candidate) -> Row:
            gpu = graph_us(c.call, args.iters)
            return {"gpu_us": gpu, "loop_us": loop_us(c.call), "tflops": flops / gpu / 1e6}

        cands = candidates(names, q, k, v, causal)
        first_calls(cands, lambda c: c.output())
        fields = ("gpu_us", "loop_us", "tflops")
        group = [{"causal": causal} | measure(c, ref, timings, fields) for c in cands]
        anchor = next((r.get("gpu_us") for r in group if r["backend"] == "sdpa"), None)
        for r in group:
            r["speedup_vs_sdpa"] = anchor / r["gpu_us"] if anchor and r.get("gpu_us") else None
        rows += group
    return rows


def sweep_point(shape: Shape, causal: bool, dtype: torch.dtype, names: list[str],
                backward: bool) -> list[Row]:
    q, k, v = make_inputs(shape, dtype)
    ref = flashcore.reference_attention(q, k, v, causal=causal)  # shared by every backend and mode
    point: Row = dict(zip("BHSD", shape), causal=causal)
    flops = forward_flops(shape, causal)

    def timed(fn: Callable[[], Any], leaves: Sequence[torch.Tensor], factor: float) -> Row:
        peak = peak_mib(fn, leaves)
        ms = bench_ms(fn, leaves)
        return {"ms": ms, "tflops": factor * flops / ms / 1e9, "peak_mib": peak}

    def fwd_bwd(c: Candidate) -> Row:
        return timed(lambda: c.output().backward(dout), c.leaves, BACKWARD_FLOP_FACTOR)

    fields = ("ms", "tflops", "peak_mib")
    forward = candidates(names, q, k, v, causal)
    first_calls(forward, lambda c: c.output())
    rows = [point | {"mode": "fwd"} | measure(c, ref, lambda c: timed(c.call, (), 1.0), fields)
            for c in forward]
    if backward:
        dout = torch.randn_like(q)  # one fixed upstream gradient for every backend
        grad_inputs = [x.detach().requires_grad_() for x in (q, k, v)]
        both = candidates(names, *grad_inputs, causal)
        first_calls(both, lambda c: c.output().backward(dout), grad=True)
        rows += [point | {"mode": "fwd+bwd"} | measure(c, ref, fwd_bwd, fields, grad=True) for c in both]
    return rows


def first_calls(cands: Sequence[Candidate], call: Callable[[Candidate], Any], grad: bool = False) -> None:
    """Every backend's first call at a point before any backend there is timed: `triton`'s first
    call autotunes (compiling configurations while the GPU idles), and the backend timed right
    after it read 8–10% low (`hopper` at D=128, docs/notes.md). Errors are left to `measure`."""
    for c in cands:
        if c.skip is None:
            with contextlib.suppress(Exception), torch.inference_mode(not grad), c.context():
                call(c)
    torch.cuda.synchronize()


def sweep_points(causal: str) -> list[tuple[Shape, bool]]:
    """The grid's (shape, causal) points, D outermost: 16k tokens, hidden 2048, S in SWEEP_S."""
    return [((SWEEP_TOKENS // s, SWEEP_HIDDEN // d, s, d), c)
            for d in SWEEP_D for c in causal_values(causal) for s in SWEEP_S]


def sweep(args: argparse.Namespace, names: list[str]) -> list[Row]:
    points = sweep_points(args.causal)
    rows: list[Row] = []
    with Progress(console=console) as progress:
        task = progress.add_task("sweep", total=len(points))
        for shape, causal in points:
            _, _, s, d = shape
            progress.update(task, description=f"D={d} S={s} {'causal' if causal else 'non-causal'}")
            rows += sweep_point(shape, causal, DTYPES[args.dtype], names, args.backward and s in BACKWARD_S)
            torch.cuda.empty_cache()  # the point's tensors died with sweep_point's frame
            progress.advance(task)
    return rows


def fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def print_shape_rows(rows: list[Row], title: str) -> None:
    """The single-shape table, then each missing row's reason in full beneath it."""
    table = Table(title=title)
    for col in ("backend", "causal", "GPU µs", "loop µs", "TFLOP/s", "rel. err", "× SDPA"):
        table.add_column(col, justify="left" if col == "backend" else "right", no_wrap=True)
    for i, r in enumerate(rows):
        if i and r["causal"] != rows[i - 1]["causal"]:
            table.add_section()
        table.add_row(r["backend"], "yes" if r["causal"] else "no",
                      fmt(r.get("gpu_us"), ".2f"), fmt(r.get("loop_us"), ".2f"), fmt(r.get("tflops"), ".1f"),
                      fmt(r["rel_err"], ".1e"), fmt(r.get("speedup_vs_sdpa"), ".2f"))
    console.print(table)
    print_reasons(rows)


def print_reasons(rows: list[Row]) -> None:
    for label, error in dict.fromkeys((f"{r['backend']} {r.get('mode', '')}".rstrip(), r["error"])
                                      for r in rows if r["error"]):
        console.print(f"{label}: {error}", highlight=False, markup=False, soft_wrap=True)


def size_label(s: int) -> str:
    return f"{s // 1024}k" if s >= 1024 else str(s)


def sweep_table(rows: list[Row]) -> Table:
    table = Table(title="TFLOP/s by sequence length (—: failed or unsupported, reasons below)")
    for col in ("mode", "D", "causal", "backend", *map(size_label, SWEEP_S), "max rel. error"):
        table.add_column(col, justify="left" if col in ("mode", "backend") else "right")
    keys = dict.fromkeys((r["mode"], r["D"], r["causal"], r["backend"]) for r in rows)
    previous: tuple[Any, ...] = ()
    for key in sorted(keys, key=lambda key: key[0] != "fwd"):  # forward lines first, order kept
        if previous and key[:3] != previous[:3]:
            table.add_section()
        previous = key
        line = {r["S"]: r for r in rows if (r["mode"], r["D"], r["causal"], r["backend"]) == key}
        errs = [r["rel_err"] for r in line.values() if r["rel_err"] is not None]
        table.add_row(key[0], str(key[1]), "yes" if key[2] else "no", key[3],
                      *(fmt(line[s].get("tflops"), ".0f") if s in line else "" for s in SWEEP_S),
                      fmt(max(errs, default=None), ".1e"))
    return table


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds, causals = sorted({r["D"] for r in rows}), sorted({r["causal"] for r in rows})
    colors = {name: f"C{i}" for i, name in enumerate(dict.fromkeys(r["backend"] for r in rows))}
    fig, axes = plt.subplots(len(ds), len(causals), figsize=(6 * len(causals), 4.5 * len(ds)), squeeze=False)
    for (i, d), (j, causal) in ((a, b) for a in enumerate(ds) for b in enumerate(causals)):
        ax = axes[i][j]
        for mode, style in (("fwd", "-"), ("fwd+bwd", "--")):
            for name, color in colors.items():
                pts = [(r["S"], r["tflops"]) for r in rows if r.get("tflops")
                       and (r["D"], r["causal"], r["mode"], r["backend"]) == (d, causal, mode, name)]
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", color=color, label=f"{name} {mode}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(SWEEP_S, [size_label(s) for s in SWEEP_S])
        ax.set_ylim(bottom=0)
        ax.set(title=f"D={d}, {'causal' if causal else 'non-causal'}", xlabel="sequence length",
               ylabel="TFLOP/s")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ab_failure(row: Row) -> str | None:
    """Why a row of a benchmark script's A/B does not count: its error, or a relative error
    against float64 not below 2e-3 (fp16); None when it does."""
    if row["error"] or row["rel_err"] is None or not row["rel_err"] < 2e-3:
        return str(row["error"] or row["rel_err"])
    return None


def print_run(table: Table, failures: Sequence[str]) -> int:
    """A benchmark script's end: `table` captioned with this run's device, versions and date, then
    each failure; returns the exit status (1 if any failed)."""
    env = environment(datetime.now(timezone.utc))
    keys = ("device", "driver", "torch", "triton", "cudnn", "date")
    table.caption = ", ".join(f"{key} {env[key]}" for key in keys)
    Console(width=140).print(table)
    for failure in failures:
        print("FAILED", failure)
    return int(bool(failures))


def environment(now: datetime) -> Row:
    try:
        driver: str | None = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True).stdout.splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        driver = None
    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    props = torch.cuda.get_device_properties(0)
    return {"argv": list(getattr(sys, "orig_argv", sys.argv)), "date": now.isoformat(timespec="seconds"),
            "device": props.name, "sm_count": props.multi_processor_count, "driver": driver,
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
            "cudnn": torch.backends.cudnn.version(), "flashcore": flashcore.__version__}


def save(args: argparse.Namespace, stem: str, rows: list[Row]) -> Path:
    now = datetime.now(timezone.utc)
    device = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{stem}-{device}-{now:%Y%m%d-%H%M%S}.json"
    options = {key: value for key, value in vars(args).items() if not callable(value)}
    payload = environment(now) | {"options": options, "rows": rows}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def cpu_check(args: argparse.Namespace) -> int:
    """No GPU: show that the API answers, on the CPU reference path, without timing anything."""
    console.print("[yellow]No CUDA GPU found[/]: nothing to time. Checking the API on the CPU instead.")
    q, k, v = make_inputs(CPU_SHAPE, torch.float32, "cpu")
    rows = []
    for causal in causal_values(args.causal):
        ref = flashcore.reference_attention(q, k, v, causal=causal)
        rows += [{"causal": causal} | measure(c, ref, lambda c: {})
                 for c in candidates(FLASHCORE_EXTRA, q, k, v, causal)]
    print_shape_rows(rows, f"CPU API check, B,H,S,D = {CPU_SHAPE}, float32")
    return int(any(r["error"] for r in rows))


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    if not torch.cuda.is_available():
        return cpu_check(args)
    rungs = [r.name for r in ladder()]
    known = rungs + list(FLASHCORE_EXTRA) + list(SDPA_PEERS) + [FA4]
    names = args.backends or rungs + list(SDPA_PEERS) + ([FA4] if _fa4() else [])
    unknown = [n for n in names if n not in known]
    if unknown:
        console.print(f"[red]unknown backend(s) {', '.join(unknown)}[/]; choose from {', '.join(known)}")
        return 2
    if args.backward and not args.sweep:
        console.print("[yellow]--backward only applies with --sweep; ignored[/]")
    if not args.sweep:
        rows = single_shape(args, names)
        b, h, s, d = args.shape
        print_shape_rows(rows, f"{torch.cuda.get_device_name()}  B={b} H={h} S={s} D={d} {args.dtype}")
        stem = "mission" if args.shape == MISSION else f"b{b}h{h}s{s}d{d}"
        console.print(f"results: {save(args, stem, rows)}", soft_wrap=True)
        return 0
    rows = sweep(args, names)
    console.print(sweep_table(rows))
    print_reasons(rows)
    path = save(args, "sweep", rows)
    if not args.no_plot:
        plot(rows, path.with_suffix(".png"))
    console.print(f"results: {path}" + ("" if args.no_plot else f" and {path.with_suffix('.png')}"),
                  soft_wrap=True)
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def parse_shape(text: str) -> Shape:
    """"mission" or "B,H,S,D" (a command-line argument)."""
    if text == "mission":
        return MISSION
    parts = text.split(",")
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"expected 'mission' or B,H,S,D, got {text!r}")
    b, h, s, d = map(_positive, parts)
    return b, h, s, d


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", type=parse_shape, default=MISSION, metavar="mission|B,H,S,D",
                        help="single-shape mode's shape (default: mission = 1,8,512,64)")
    parser.add_argument("--iters", type=_positive, default=100,
                        help="CUDA-graph replays timed per backend in single-shape mode (default 100)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp16")
    parser.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    parser.add_argument("--backends", type=lambda s: [n.strip() for n in s.split(",") if n.strip()],
                        metavar="NAME,...", help="default: every ladder rung, then sdpa, sdpa-flash, "
                        "sdpa-cudnn and fa4 when installed; 'reference' and 'auto' also accepted")
    parser.add_argument("--sweep", action="store_true",
                        help="forward TFLOP/s over the 16k-token grid, D in {64,128}, S 512..16k")
    parser.add_argument("--backward", action="store_true",
                        help="with --sweep: also forward+backward at S in {1k,4k,16k}, with peak memory")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                        help="directory for the JSON (and PNG) results")
    parser.add_argument("--no-plot", action="store_true", help="with --sweep: skip the PNG")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
