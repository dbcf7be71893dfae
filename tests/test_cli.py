"""The command line works without a GPU: it says so and exits 0."""

from __future__ import annotations

import pytest
import torch

from flashcore.__main__ import main


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
@pytest.mark.parametrize("argv", [["bench", "--shape", "mission", "--iters", "5"], ["build"]])
def test_without_a_gpu_the_cli_explains_and_exits_0(argv, capsys):
    assert main(argv) == 0
    assert "No CUDA GPU" in capsys.readouterr().out


def test_a_sweep_point_times_no_backend_before_every_backend_has_run_once(monkeypatch):
    """Triton autotunes on its first call at a shape; whatever is timed right after that read
    8–10% low, so each point first calls every backend once, then times them."""
    from flashcore import bench

    events = []

    def candidate(name):
        return bench.Candidate(name, call=lambda: events.append(("call", name)) or torch.zeros(1, 1, 4, 8))

    monkeypatch.setattr(bench, "make_inputs", lambda shape, dtype: (torch.zeros(shape),) * 3)
    monkeypatch.setattr(bench, "candidates", lambda names, *args: [candidate(n) for n in names])
    monkeypatch.setattr(bench, "bench_ms", lambda fn, leaves: events.append(("time",)) or 1.0)
    monkeypatch.setattr(bench, "peak_mib", lambda fn, leaves: 0.0)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    rows = bench.sweep_point((1, 1, 4, 8), False, torch.float32, ["a", "b", "c"], backward=False)
    assert [r["backend"] for r in rows] == ["a", "b", "c"] and all(r["error"] is None for r in rows)
    first_time = events.index(("time",))
    assert {e for e in events[:first_time]} == {("call", "a"), ("call", "b"), ("call", "c")}
