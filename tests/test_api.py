"""flashcore.attention's contract: argument checks, empty inputs, layouts, backend choice."""

from __future__ import annotations

import pytest
import torch

import flashcore
from conftest import make_qkv, rel_error


def qkv(**kwargs):
    return make_qkv(**{**dict(batch=2, heads_q=4, heads_kv=2, seqlen_q=5, seqlen_k=7, dim=8,
                              dtype=torch.float32, device="cpu"), **kwargs})


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, "q must be 4-D"),
        (lambda q, k, v: (q, k.unsqueeze(0), v), ValueError, "k must be 4-D"),
        (lambda q, k, v: ("q", k, v), TypeError, "q must be a torch.Tensor"),
        (lambda q, k, v: (q.long(), k.long(), v.long()), TypeError, "floating-point"),
        (lambda q, k, v: (q, k.double(), v), TypeError, "share one dtype"),
        (lambda q, k, v: (q, k, v.half()), TypeError, "share one dtype"),
        (lambda q, k, v: (q[:1], k, v), ValueError, "batch and head_dim"),
        (lambda q, k, v: (q, k[..., :4], v), ValueError, "batch and head_dim"),
        (lambda q, k, v: (q, k, v[:, :, :3]), ValueError, "v must have k's heads and seq"),
        (lambda q, k, v: (q, k, v[..., :4]), ValueError, "q's head_dim"),
        (lambda q, k, v: (q[:, :3], k, v), ValueError, r"must divide the heads of q"),
        (lambda q, k, v: (q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3)), ValueError,
         "unit stride"),
    ],
)
def test_bad_input_is_named(mutate, error, match):
    with pytest.raises(error, match=match):
        flashcore.attention(*mutate(*qkv()))


def test_bad_options_are_named():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'baseline', 'wmma'"):
        flashcore.attention(q, k, v, backend="cutlass")
    with pytest.raises(TypeError, match="causal must be a bool"):
        flashcore.attention(q, k, v, causal=1)
    with pytest.raises(TypeError, match="scale must be a float"):
        flashcore.attention(q, k, v, scale="0.1")
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        flashcore.attention(q, k, v, return_lse=None)


def test_mismatched_devices_are_named():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="one device"):
        flashcore.attention(q, k.to("meta"), v)


@pytest.mark.parametrize("rung", [rung.name for rung in flashcore.ladder()])
def test_gpu_rung_on_cpu_tensors_says_why(rung, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=f"backend '{rung}' runs on CUDA tensors"):
        flashcore.attention(*qkv(dtype=torch.float16), backend=rung)


class FakeCudaTensor:
    """Enough of a CUDA tensor for why_not's device, dtype and head-dim checks, on a CPU."""

    def __init__(self, dtype, dim):
        self.device, self.dtype, self.shape = torch.device("cuda"), dtype, (1, 1, 1, dim)


@pytest.mark.parametrize("rung, dim, dtype, match", [
    ("wmma", 96, torch.float16, "supports head dims 64, 128, got 96"),
    ("baseline", 48, torch.bfloat16, "supports head dims 32, 64, 80, 96, 128, got 48"),
    ("wmma", 64, torch.float32, "takes float16 or bfloat16, got torch.float32"),
    ("triton", 20, torch.float16, "supports head dims 32 to 256 in steps of 8, got 20"),
    ("hopper", 264, torch.float16, "supports head dims 32 to 256 in steps of 8, got 264"),
    ("hopper", 100, torch.bfloat16, "supports head dims 32 to 256 in steps of 8, got 100"),
])
def test_rung_limits_are_explained(rung, dim, dtype, match):
    t = FakeCudaTensor(dtype, dim)
    assert match in flashcore.backends.BACKENDS[rung].why_not(t, t, t)


@pytest.mark.parametrize("shape", [(0, 4, 5, 8), (2, 0, 5, 8), (2, 4, 0, 8)])
def test_empty_inputs_give_empty_outputs(shape):
    b, h, s, d = shape
    q, k, v = make_qkv(b, h, h, s, s, d, dtype=torch.float32, device="cpu")
    out, lse = flashcore.attention(q, k, v, return_lse=True)
    assert out.shape == shape and lse.shape == shape[:3]


def test_no_keys_gives_zeros_and_minus_inf():
    q, k, v = qkv(seqlen_k=0)
    out, lse = flashcore.attention(q, k, v, return_lse=True)
    assert torch.all(out == 0) and torch.all(lse == -torch.inf)


def test_auto_uses_the_reference_on_cpu_in_q_dtype():
    q, k, v = qkv(dtype=torch.bfloat16)
    out, lse = flashcore.attention(q, k, v, causal=True, return_lse=True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    ref = flashcore.reference_attention(q, k, v, causal=True)
    assert rel_error(out, ref) < 1e-2


def test_bshd_views_are_accepted():
    q, k, v = qkv(layout="bshd")
    assert not q.is_contiguous()
    out = flashcore.attention(q, k, v)
    ref = flashcore.attention(q.contiguous(), k.contiguous(), v.contiguous())
    torch.testing.assert_close(out, ref)


def test_reference_backend_is_differentiable():
    q, k, v = (t.double().requires_grad_() for t in qkv())
    torch.autograd.gradcheck(lambda q, k, v: flashcore.attention(q, k, v, causal=True,
                                                                 backend="reference"), (q, k, v))
