"""The Triton rung launches a compiled kernel straight through its C launcher, skipping Triton's
per-call Python (flashcore.triton_rung._Launcher). That is safe only if it never reuses a kernel
compiled for different arguments: its key must split calls exactly where Triton's own
specialisation does. The grid and padding arithmetic around it must agree with Triton's."""

from __future__ import annotations

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
    """What Triton's JIT compiles separately for (its native binder, as `JITFunction.run` calls it)."""
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
