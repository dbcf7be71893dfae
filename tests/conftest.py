"""Shared test helpers: fresh random inputs, the error metric, GPU marks."""

from __future__ import annotations

import contextlib
import os
import random

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # no GPU (CI): the Triton rung's kernels run under Triton's CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import flashcore  # noqa: E402

SEED = int(os.environ.get("FLASHCORE_TEST_SEED", random.randrange(2**31)))
ATOL = {torch.float16: 1e-4, torch.bfloat16: 1e-3}
# The `hopper` rung's kernels, (head dim, consumer warpgroups, keys per K/V tile, query rows per
# thread), each for fp16 and bf16: test_cuda_sources checks the compiled code against it,
# test_hopper_protocol models it.
HOPPER_KERNELS = [*((dim, consumers, 128, rows) for dim in (64, 80, 96, 128)
                    for consumers, rows in ((2, 2), (2, 1), (3, 2))),
                  (128, 2, 176, 2), (160, 2, 80, 2), (256, 2, 80, 2)]
LSE_ATOL = 1e-3
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


def with_scores_far_below_zero(q, k):
    """q, k with one head dimension set to +32 and -32: every score is -1024·scale plus the other
    dimensions' O(√D) spread, so the LSE lies far below the log of the smallest float while the
    softmax stays as spread out as for random inputs."""
    q, k = q.clone(), k.clone()
    q[..., 0], k[..., 0] = 32, -32
    return q, k


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere in out gives NaN, which fails every bound."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def poisoned_call(q, k, v, **kwargs):
    """flashcore.attention run on NaN-filled output memory, so an unwritten element reads NaN.

    The op allocates its own output, so this empties PyTorch's allocator cache, NaN-fills blocks
    of exactly the output's (and LSE's) size, frees them, and checks the op's outputs landed in
    those blocks: the poisoning is verified, not hoped for. On CPU (the Triton interpreter) the
    allocations themselves are NaN-filled (`nan_filled_allocations`).
    """
    if not q.is_cuda:
        with nan_filled_allocations():
            return flashcore.attention(q, k, v, **kwargs)
    flashcore.attention(q, k, v, **kwargs)  # first calls allocate while initialising: not here
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


@contextlib.contextmanager
def nan_filled_allocations():
    """Every floating-point tensor allocated uninitialised through torch.empty/empty_like in the
    block starts NaN-filled (on any device, stream-ordered before the kernels that fill it), so
    an element a kernel leaves unwritten reads NaN. The Triton rung allocates its outputs, Δ, dQ,
    dK and dV this way: their poisoning holds by construction, whatever the caching allocator
    hands out. Allocations in C++ (the CUDA rungs' ops) are out of its reach: poisoned_call."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = lambda *a, **kw: poisoned(empty(*a, **kw))
    torch.empty_like = lambda *a, **kw: poisoned(empty_like(*a, **kw))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def check_forward(rung, q, k, v, causal):
    """Runs `rung` on poisoned memory; output and LSE must match float64 within the bound.

    The bound is flash-attention's: at most twice PyTorch's own low-precision error on the same
    inputs (matmuls in fp16/bf16, softmax in fp32) plus a small absolute term.
    """
    reason = flashcore.backends.BACKENDS[rung].why_not(q, k, v, causal)
    if reason is not None:
        pytest.skip(reason)
    out, lse = poisoned_call(q, k, v, causal=causal, backend=rung, return_lse=True)
    ref, ref_lse = flashcore.reference_attention(q, k, v, causal=causal, return_lse=True)
    low_precision = flashcore.reference_attention(q, k, v, causal=causal, compute_dtype=q.dtype)

    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    bound = 2 * rel_error(low_precision, ref) + ATOL[q.dtype]
    err = rel_error(out, ref)
    assert err <= bound, f"{rung}: relative error {err:.2e} > bound {bound:.2e}"
    # Rows that see no key have LSE -inf in both; everywhere else LSE must agree closely.
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    assert not lse.isnan().any()
    finite = torch.isfinite(ref_lse)
    lse_err = (lse[finite].double() - ref_lse[finite]).abs().max().item() if finite.any() else 0.0
    assert lse_err <= LSE_ATOL, f"{rung}: LSE error {lse_err:.2e}"


def check_backward(rung, q, k, v, causal):
    """dQ, dK, dV of loss = Σ out·dO + Σ lse·dLSE against float64 autograd, same bound; the
    rung's forward and backward run on NaN-filled allocations.

    The LSE term is left out where some row sees no key (its LSE is -inf; the reference's
    gradient there is NaN by definition, the kernel's 0)."""
    with_lse = not (causal and q.shape[2] > k.shape[2])
    dout = torch.randn_like(q)
    dlse = torch.randn(q.shape[:3], device=q.device) if with_lse else None

    def grads(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out, lse = fn(*leaves)
        loss = (out * dout.to(out.dtype)).sum()
        if with_lse:
            loss = loss + (lse * dlse.to(lse.dtype)).sum()
        return torch.autograd.grad(loss, leaves)

    def reference(dtype):
        return lambda q, k, v: flashcore.reference_attention(
            q, k, v, causal=causal, return_lse=True, compute_dtype=dtype)

    with nan_filled_allocations():
        got = grads(lambda q, k, v: flashcore.attention(q, k, v, causal=causal, backend=rung,
                                                        return_lse=True), q.dtype)
    ref = grads(reference(torch.float64), torch.float64)
    low = grads(reference(q.dtype), q.dtype)
    # Absolute term: one rounding of the gradient's dtype (its unit roundoff), as in
    # flash-attention's tests; fp32 accumulation orders differ between kernel and reference.
    atol = torch.finfo(q.dtype).eps / 2
    for name, g, r, lo in zip(("dq", "dk", "dv"), got, ref, low):
        assert g.shape == r.shape and g.dtype == q.dtype
        bound = 2 * rel_error(lo, r) + atol
        err = rel_error(g, r)
        assert err <= bound, f"{rung} {name}: relative error {err:.2e} > bound {bound:.2e}"


def check_sum_loss_gradients(rung, q, k, v):
    """Gradients of out.sum() and lse.sum() arrive as expanded (stride-0) tensors."""
    for use_out in (False, True):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out, lse = flashcore.attention(*leaves, backend=rung, return_lse=True)
        (lse.sum() + (out.float().sum() if use_out else 0)).backward()
        ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref, ref_lse = flashcore.reference_attention(*ref_leaves, return_lse=True)
        (ref_lse.sum() + (ref.sum() if use_out else 0)).backward()
        used = leaves if use_out else leaves[:2]  # the LSE does not depend on v
        for leaf, ref_leaf in zip(used, ref_leaves):
            assert rel_error(leaf.grad, ref_leaf.grad) < 1e-2


def check_deterministic_backward(rung, q, k, v, causal):
    """Two backward passes on the same inputs give bit-identical gradients."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    dout = torch.randn_like(q)
    first, second = (torch.autograd.grad(flashcore.attention(*leaves, causal=causal, backend=rung),
                                         leaves, dout) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)
