"""The float64 reference itself: what every kernel is judged against must be right."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import flashcore
from conftest import make_qkv, rel_error


def naive(q, k, v, causal, scale):
    """Row by row, straight from the definition (bottom-right causal), in float64."""
    batch, heads_q, seqlen_q, _ = q.shape
    group = heads_q // k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads_q):
            for i in range(seqlen_q):
                keys = k.shape[2] if not causal else max(0, min(k.shape[2], i + 1 + k.shape[2] - seqlen_q))
                if keys == 0:
                    continue
                s = (k[b, h // group, :keys].double() @ q[b, h, i].double()) * scale
                out[b, h, i] = torch.softmax(s, 0) @ v[b, h // group, :keys].double()
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlens", [(1, 1), (5, 9), (9, 5), (16, 16)])
def test_matches_the_definition(causal, seqlens):
    q, k, v = make_qkv(2, 4, 2, *seqlens, 8, dtype=torch.float32, device="cpu")
    ref = flashcore.reference_attention(q, k, v, causal=causal)
    assert ref.dtype == torch.float64
    assert rel_error(ref, naive(q, k, v, causal, 8**-0.5)) < 1e-12


@pytest.mark.parametrize("causal", [False, True])
def test_matches_sdpa_when_sq_equals_sk(causal):
    q, k, v = make_qkv(2, 8, 2, 33, 33, 16, dtype=torch.float64, device="cpu")
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    assert rel_error(flashcore.reference_attention(q, k, v, causal=causal), sdpa) < 1e-12


def test_lse_is_the_log_normaliser():
    q, k, v = make_qkv(1, 2, 2, 6, 10, 8, dtype=torch.float64, device="cpu")
    _, lse = flashcore.reference_attention(q, k, v, scale=0.5, return_lse=True)
    expected = torch.logsumexp(q @ k.transpose(-1, -2) * 0.5, dim=-1)
    torch.testing.assert_close(lse, expected)


def test_chunked_rows_agree_with_one_block(monkeypatch):
    q, k, v = make_qkv(1, 2, 1, 37, 20, 8, dtype=torch.float64, device="cpu")
    whole = flashcore.reference_attention(q, k, v, causal=True)
    monkeypatch.setattr(flashcore.reference, "_CHUNK_ELEMENTS", 2 * 20 * 3)  # 3 rows a chunk
    assert rel_error(flashcore.reference_attention(q, k, v, causal=True), whole) < 1e-14


def test_rows_that_see_no_key_are_zero_with_lse_minus_inf():
    q, k, v = make_qkv(1, 1, 1, 8, 3, 4, dtype=torch.float64, device="cpu")
    out, lse = flashcore.reference_attention(q, k, v, causal=True, return_lse=True)
    assert torch.all(out[0, 0, :5] == 0) and torch.all(lse[0, 0, :5] == -math.inf)
    assert torch.isfinite(out).all() and torch.isfinite(lse[0, 0, 5:]).all()


def test_nan_input_propagates():
    q, k, v = make_qkv(1, 1, 1, 4, 4, 4, dtype=torch.float64, device="cpu")
    k[0, 0, 2, 1] = math.nan
    assert flashcore.reference_attention(q, k, v).isnan().all()


def test_low_precision_mode_rounds_like_pytorch():
    q, k, v = make_qkv(1, 2, 2, 64, 64, 32, dtype=torch.float16, device="cpu")
    ref = flashcore.reference_attention(q, k, v)
    low = flashcore.reference_attention(q, k, v, compute_dtype=torch.float16)
    assert low.dtype == torch.float16
    assert 1e-5 < rel_error(low, ref) < 5e-3
