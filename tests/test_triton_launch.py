"""The Triton rung launches a compiled kernel straight through its C launcher, skipping Triton's
per-call Python (flashcore.triton_rung._Launcher). That is safe only if it never reuses a kernel
compiled for different arguments: its key must split calls exactly where Triton's own
specialisation does. The grid and padding arithmetic around it must agree with Triton's."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import triton
from hypothesis import given
from hypothesis import strategies as st
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend

from conftest import check_forward, make_qkv, requires_cuda
from flashcore.triton_rung import _cdiv, _head_block, _specialisation


def triton_specialisation(arg):
    """What Triton's JIT compiles separately for (its native binder, as `JITFunction.run`
    calls it)."""
    return native_specialize_impl(BaseBackend, arg, False, True, True)


# Integer arguments are strides, sizes and counts: below 2**63 (Triton's u64 range is not ours).
EDGES = [0, 1, 2, 15, 16, 17, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, -2**31, -2**31 - 16]
integers = st.one_of(st.sampled_from(EDGES), st.integers(-2**62, 2**62))


@given(integers, integers)
def test_integers_share_a_key_exactly_when_triton_compiles_one_kernel(a, b):
    same_key = _specialisation((a,)) == _specialisation((b,))
    assert same_key == (triton_specialisation(a) == triton_specialisation(b))


@given(st.sampled_from([torch.float16, torch.bfloat16, torch.float32]), st.integers(0, 15),
       st.sampled_from([torch.float16, torch.bfloat16, torch.float32]), st.integers(0, 15))
def test_tensors_share_a_key_exactly_when_triton_compiles_one_kernel(dtype_a, offset_a,
                                                                     dtype_b, offset_b):
    a = torch.empty(64, dtype=dtype_a)[offset_a:]  # offsets move the pointer off 16 bytes
    b = torch.empty(64, dtype=dtype_b)[offset_b:]
    same_key = _specialisation((a,)) == _specialisation((b,))
    assert same_key == (triton_specialisation(a) == triton_specialisation(b))


def test_floats_and_flags_do_not_split_keys():
    assert _specialisation((0.125, True)) == _specialisation((3.5, False))


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """The same values one element past a 16-byte boundary."""
    storage = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    return storage[1:].view(t.shape).copy_(t)


@requires_cuda
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_calls_alternating_between_specialisations_stay_correct(causal):
    """Each case compiles a different kernel (pointer alignment, a stride not divisible by 16,
    one key: the constant 1, a GQA group); the second round runs every case from the launcher's
    cache, interleaved, each checked against the reference on poisoned output memory."""
    cases = [make_qkv(1, 4, 4, 200, 200, 64, dtype=torch.float16, device="cuda"),
             [_misaligned(t) for t in make_qkv(1, 4, 4, 200, 200, 64, dtype=torch.float16,
                                               device="cuda")],
             make_qkv(1, 4, 4, 200, 200, 40, dtype=torch.float16, device="cuda"),
             make_qkv(1, 4, 4, 7, 1, 64, dtype=torch.float16, device="cuda"),
             make_qkv(1, 4, 2, 200, 200, 64, dtype=torch.float16, device="cuda")]
    for _ in range(2):
        for q, k, v in cases:
            check_forward("triton", q, k, v, causal)


@given(st.integers(0, 1 << 20), st.sampled_from([16, 32, 64, 128]), st.integers(1, 512))
def test_host_integer_helpers_agree_with_triton(a, block, dim):
    """The launch path computes grids and padded head dims in plain Python (Triton's own
    helpers cost microseconds per call from Python); they must give Triton's answers."""
    assert _cdiv(a, block) == triton.cdiv(a, block)
    assert _head_block(dim) == max(16, triton.next_power_of_2(dim))


class _FakeCompiled:
    """A compiled kernel as _Launcher sees it: a C launcher (`run`) and its handles."""

    function, packed_metadata = "function", "metadata"

    def __init__(self):
        self.launches = []

    def run(self, *args):
        self.launches.append(args)


class _FakeJit:
    """A JIT function as _Launcher sees it: parameters, and `run`, which compiles or loads."""

    def __init__(self):
        self.arg_names = ["X", "n", "HEAD", "BLOCK"]
        self.params = [SimpleNamespace(name=name, is_constexpr=name.isupper() and name != "X")
                       for name in self.arg_names]
        self.runs = []

    def run(self, *args, grid, warmup, **kwargs):
        self.runs.append((args, kwargs))
        return _FakeCompiled()


class _FakeAutotuner:
    def __init__(self):
        self.fn = _FakeJit()
        self.best_config = triton.Config({"BLOCK": 64}, num_warps=4, num_stages=2)
        self.tuned = 0

    def __getitem__(self, grid):
        def tune_and_launch(*args, **kwargs):
            self.tuned += 1
        return tune_and_launch


@pytest.fixture
def launcher(monkeypatch):
    """A _Launcher over fakes, on its GPU path (CI runs Triton's interpreter, no GPU)."""
    from flashcore import triton_rung

    monkeypatch.setattr(triton_rung, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 7, raising=False)
    return triton_rung._Launcher(_FakeAutotuner())


def test_launcher_tunes_then_compiles_then_launches_directly(launcher):
    x = torch.zeros(64, dtype=torch.float16)
    grid = lambda meta: (1000 // meta["BLOCK"] + 1, 3)  # noqa: E731
    launcher(grid, "key", x, 32, HEAD=128)  # tunes (the autotuner launches)
    launcher(grid, "key", x, 32, HEAD=128)  # Triton's JIT: compiles or loads, launches
    assert launcher.autotuner.tuned == 1 and len(launcher.autotuner.fn.runs) == 1
    ((kernel, config),) = launcher.compiled.values()
    launcher(grid, "key", x, 32, HEAD=128)
    launcher(grid, "key", x, 48, HEAD=128)  # same specialisation: still direct
    assert len(launcher.autotuner.fn.runs) == 1
    # Grid from the chosen config, the current stream, no launch metadata or hooks, then every
    # parameter in order: arguments, then constexprs (the caller's and the config's).
    assert kernel.launches == [(16, 3, 1, 7, "function", "metadata", None, None, None,
                                x, n, 128, 64) for n in (32, 48)]
    assert config["num_warps"] == 4


def test_launcher_goes_back_through_triton_for_a_new_specialisation(launcher):
    x = torch.zeros(64, dtype=torch.float16)
    grid = lambda meta: (1, 1)  # noqa: E731
    for args in [(x, 32), (x, 32), (x, 33), (x[1:], 32), (x, 1)]:
        launcher(grid, "key", *args, HEAD=128)
    # n=33 (not divisible by 16), a misaligned pointer and n=1 are each a kernel of their own.
    assert len(launcher.autotuner.fn.runs) == 4 and len(launcher.compiled) == 4


@pytest.mark.parametrize("chain", ["launch_enter_hook", "launch_exit_hook"])
def test_launch_hooks_keep_every_call_on_tritons_path(launcher, chain):
    from triton import knobs

    def hook(metadata):
        pass

    x = torch.zeros(64, dtype=torch.float16)
    hooks = getattr(knobs.runtime, chain)
    hooks.add(hook)
    try:
        for _ in range(4):
            launcher(lambda meta: (1, 1), "key", x, 32, HEAD=128)
    finally:
        hooks.remove(hook)
    assert launcher.autotuner.tuned == 1 and len(launcher.autotuner.fn.runs) == 3
    assert not launcher.compiled
