"""FlashCore latency benchmark: `python benchmarks/benchmark_latency.py --shape mission --iters 100`.

The same options as `python -m flashcore bench` (see flashcore/bench.py), runnable from a checkout.
"""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import flashcore.bench  # noqa: E402  (needs the repository root on sys.path first)

raise SystemExit(flashcore.bench.main())
