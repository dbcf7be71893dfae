"""Shared test helpers: fresh random inputs, the error metric, GPU marks."""

from __future__ import annotations

import os
import random

import pytest
import torch

import flashcore

SEED = int(os.environ.get("FLASHCORE_TEST_SEED", random.randrange(2**31)))
CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def pytest_report_header(config):
    return f"flashcore test seed: {SEED} (set FLASHCORE_TEST_SEED={SEED} to replay)"


@pytest.fixture(autouse=True)
def _seed(request):
    """Fresh inputs every session, reproducible from the seed printed in the header."""
    torch.manual_seed(SEED ^ (hash(request.node.nodeid) & 0x7FFFFFFF))


def make_qkv(batch, heads_q, heads_kv, seqlen_q, seqlen_k, dim, *, dtype, device, layout="bhsd"):
    """Random q, k, v in (B, H, S, D); with layout="bshd" they are transposed (B, S, H, D) views."""

    def tensor(heads, seqlen):
        if layout == "bshd":
            return torch.randn(batch, seqlen, heads, dim, dtype=dtype, device=device).transpose(1, 2)
        return torch.randn(batch, heads, seqlen, dim, dtype=dtype, device=device)

    return tensor(heads_q, seqlen_q), tensor(heads_kv, seqlen_k), tensor(heads_kv, seqlen_k)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere in out gives NaN, which fails every bound."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def poisoned_call(q, k, v, **kwargs):
    """flashcore.attention run on NaN-filled output memory, so an unwritten element reads NaN.

    The op allocates its own output, so this empties PyTorch's allocator cache, NaN-fills blocks
    of exactly the output's (and LSE's) size, frees them, and checks the op's outputs landed in
    those blocks: the poisoning is verified, not hoped for.
    """
    if not q.is_cuda:
        return flashcore.attention(q, k, v, **kwargs)
    torch.cuda.empty_cache()
    poison = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)
    lse_poison = torch.full(q.shape[:3], float("nan"), device=q.device)
    poisoned = poison.data_ptr(), lse_poison.data_ptr()
    del poison, lse_poison
    result = flashcore.attention(q, k, v, **kwargs)
    out, lse = result if kwargs.get("return_lse") else (result, None)
    assert out.data_ptr() == poisoned[0], "the output did not land in the poisoned block"
    assert lse is None or lse.data_ptr() == poisoned[1], "the LSE did not land in the poisoned block"
    return result
