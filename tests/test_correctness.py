"""Every GPU rung against the float64 reference, on a grid of awkward shapes.

The bound (conftest.check_forward/check_backward) is the flash-attention one: a kernel's error
against float64 may be at most twice PyTorch's own low-precision error on the same inputs,
plus a small absolute term. Outputs are NaN-poisoned before each run (conftest.poisoned_call;
gradients: conftest.nan_filled_allocations).
"""

from __future__ import annotations

import math

import pytest
import torch

import flashcore
from conftest import (ATOL, check_backward, check_deterministic_backward, check_forward,
                      check_sum_loss_gradients, make_qkv, poisoned_call, rel_error, requires_cuda,
                      with_scores_far_below_zero)

pytestmark = [pytest.mark.gpu, requires_cuda]

RUNGS = [rung.name for rung in flashcore.ladder()]
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
DTYPES = [torch.float16, torch.bfloat16]
HEAD_DIMS = [32, 64, 80, 96, 128, 160, 256]
TRAINABLE = [rung.name for rung in flashcore.ladder() if rung.has_backward]
SEQLENS = [(1, 1), (7, 7), (127, 127), (128, 128), (129, 129), (512, 512), (1000, 1000),
           (1, 1000), (127, 513), (1000, 7), (129, 64)]
@pytest.mark.parametrize("seqlens", SEQLENS, ids=lambda s: f"sq{s[0]}-sk{s[1]}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dim", HEAD_DIMS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("rung", RUNGS)
def test_matches_reference(rung, dtype, dim, causal, seqlens):
    q, k, v = make_qkv(2, 3, 3, *seqlens, dim, dtype=dtype, device="cuda")
    check_forward(rung, q, k, v, causal)


@pytest.mark.parametrize("dim", [40, 72, 88, 112, 144, 160, 200], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("rung", RUNGS)
def test_head_dims_between_kernels(rung, causal, dim):
    """Head dims no kernel is built for run the next wider one on `hopper` (64, 80, 96, 128, 160
    or 256), on columns that TMA fills with zeros and the output store leaves out; and D=160,
    whose rows take three 64-column chunks in shared memory, the last half padding."""
    q, k, v = make_qkv(2, 3, 3, 300, 700, dim, dtype=torch.float16, device="cuda")
    check_forward(rung, q, k, v, causal)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("heads", [(8, 2), (8, 1), (4, 4)], ids=["gqa8:2", "mqa8:1", "mha"])
@pytest.mark.parametrize("seqlens", [(127, 127), (512, 512), (200, 1000)],
                         ids=lambda s: f"sq{s[0]}-sk{s[1]}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("rung", RUNGS)
def test_gqa_and_strided_layouts(rung, dtype, causal, seqlens, heads, layout):
    q, k, v = make_qkv(2, *heads, *seqlens, 64, dtype=dtype, device="cuda", layout=layout)
    check_forward(rung, q, k, v, causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("rung", RUNGS)
def test_more_tiles_than_sms(rung, causal):
    """Persistent grids walk several tiles per CTA: 4·16 heads × 8 tiles of 128 rows = 512."""
    q, k, v = make_qkv(4, 16, 4, 1000, 1000, 128, dtype=torch.bfloat16, device="cuda")
    check_forward(rung, q, k, v, causal)


@pytest.mark.parametrize("dim, shape, causal", [(64, (4, 16, 4, 1000, 1000), False),
                                                (64, (4, 16, 4, 1000, 2100), True),
                                                (64, (1, 48, 48, 600, 8192), True),
                                                (64, (4, 16, 4, 1000, 7), False),
                                                (128, (2, 16, 4, 1000, 3000), False),
                                                (128, (4, 16, 4, 1000, 2100), True),
                                                (128, (1, 136, 8, 127, 2100), False),
                                                (128, (1, 40, 8, 1000, 5000), True),
                                                (96, (2, 16, 4, 1000, 3000), True),
                                                (80, (2, 16, 4, 1000, 3000), False)],
                         ids=["d64-full", "d64-causal", "d64-causal-dynamic", "d64-7-keys", "d128-full",
                              "d128-causal", "d128-sq127", "d128-long-keys", "d96-causal", "d80-full"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("rung", RUNGS)
def test_many_tiles_three_consumers(rung, dtype, dim, shape, causal):
    """Enough 192-row tiles to fill the GPU, where `hopper` runs three consumer warpgroups per
    CTA: at D=64 (in fp16 with each row's sum of P kept by the tensor cores, in P·V's columns
    past the output), and at D=80, 96 and 128 from 2k keys (each turn waits for its P·V before
    its S, which reuses P's registers; the output staged in Q; also 127 query rows, and rows
    that see over 4k keys, where the two-consumer kernel would take 176-key tiles): ragged S
    (the last tile's second and third consumers without rows), GQA; 7 keys (one ragged key tile:
    the sums of the fewest P, where rounding moves the LSE most); and causal tiles from the
    counter (K/V beyond L2)."""
    batch, heads_q, heads_kv, seqlen_q, seqlen_k = shape
    q, k, v = make_qkv(batch, heads_q, heads_kv, seqlen_q, seqlen_k, dim, dtype=dtype, device="cuda")
    check_forward(rung, q, k, v, causal)


@pytest.mark.parametrize("dim, shape", [(64, (1, 8, 8, 512, 512)), (64, (1, 16, 16, 512, 512)),
                                         (64, (1, 20, 4, 1000, 1000)), (64, (4, 16, 4, 1000, 1000)),
                                         (128, (2, 16, 4, 1000, 3000)), (256, (1, 8, 8, 512, 1000))],
                         ids=["d64-h8", "d64-h16", "d64-two-consumers", "d64-three-consumers",
                              "d128-three-consumers", "d256"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("rung", RUNGS)
def test_scores_rising_toward_the_first_keys(rung, dtype, causal, dim, shape):
    """Each key's score raised by 5/128 (log2 units) for every key after it, and by 20 more for
    the first 64. Random inputs settle a row's running max within a few key tiles; here it rises
    at every one (by ~5 per 128 keys, ~20 in the first, which `hopper` walks to last), so every
    tile rescales the output accumulated so far, in each kernel family of `hopper` (one query row
    per thread, shared rows, two and three consumers, D=256)."""
    batch, heads_q, heads_kv, seqlen_q, seqlen_k = shape
    q, k, v = make_qkv(batch, heads_q, heads_kv, seqlen_q, seqlen_k, dim, dtype=dtype, device="cuda")
    keys = torch.arange(seqlen_k, device="cuda")
    rise = 5 / 128 * (seqlen_k - 1 - keys) + 20 * (keys < 64)  # log2 units
    q[..., 0] = 4
    k[..., 0] = (rise / (4 * dim**-0.5 * math.log2(math.e))).to(dtype)
    check_forward(rung, q, k, v, causal)


@pytest.mark.parametrize("dim", [64, 128], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("rung", RUNGS)
def test_query_rows_ending_inside_a_tile(rung, causal, dim):
    """1050 query rows, 576 persistent tiles at D=128 (384 of 192 rows at D=64): the last tile of
    each head ends 26 rows into a consumer's 64, and the consumer whose rows all lie past the end
    (the second of two at D=128, the third of three at D=64) does no work there but keeps the
    ping-pong turns and hands each K/V stage back."""
    q, k, v = make_qkv(4, 16, 4, 1050, 1050, dim, dtype=torch.float16, device="cuda")
    check_forward(rung, q, k, v, causal)


@pytest.mark.parametrize("dim, heads, seqlens", [(64, 8, (512, 512)), (64, 16, (512, 512)),
                                                 (128, 8, (512, 512)), (128, 8, (500, 200)),
                                                 (64, 3, (1000, 100)), (64, 8, (512, 1800))],
                         ids=["d64-h8", "d64-h16", "d128-h8", "d128-h8-sk200", "d64-h3-sk100",
                              "d64-h8-sk1800"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("rung", RUNGS)
def test_launches_leaving_most_sms_idle(rung, dim, heads, seqlens, causal):
    """Too few tiles for the GPU's 132 SMs (one batch). Where even 64-row tiles would leave over
    half of them idle, `hopper` runs the kernels with one query row per thread: each consumer's
    64-row wgmma carries 32 query rows (the rest padding) so twice the CTAs share the work:
    32-row tiles whose two consumers split the keys (D=64: 8 heads × 512 rows, 1800 keys; D=128
    over 2 key tiles: 200 keys, 500 rows ending inside a tile), or 64-row tiles, 32 rows per
    consumer (D=128 over 4 key tiles; D=64 over one ragged key tile). 16 heads × 512
    rows fill 128 SMs with 64-row tiles, whose consumers split the keys with two rows each."""
    q, k, v = make_qkv(1, heads, heads, *seqlens, dim, dtype=torch.float16, device="cuda")
    check_forward(rung, q, k, v, causal)


@pytest.mark.parametrize("seqlens", [(256, 192), (256, 193), (300, 364), (300, 365)],
                         ids=lambda s: f"sq{s[0]}-sk{s[1]}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dim", [64, 128], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("rung", RUNGS)
def test_rows_seeing_half_a_key_tile(rung, dim, causal, seqlens):
    """Rows that see at most the first 64 keys of their first (highest) 128-key tile: `hopper`
    computes that tile's S and softmax over the half, P's other half zero. Either side of the
    bound: non-causal, 64 or 65 keys in the last key tile; causal (bottom-right), a 64-row
    consumer whose last row sees 64 or 65 keys into the diagonal tile."""
    q, k, v = make_qkv(2, 4, 2, *seqlens, dim, dtype=torch.float16, device="cuda")
    check_forward(rung, q, k, v, causal)


@pytest.mark.parametrize("dim", [64, 128, 160, 256], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("rung", RUNGS)
def test_tiles_with_and_without_keys_on_one_cta(rung, dim):
    """Causal with Sq > Sk over 1024 tiles (GQA): each persistent CTA walks tiles that see keys and
    tiles that see none (zeros), through one K/V ring and one ping-pong order; at D=160 and 256
    `hopper` stages each output in its tile's Q buffer (one of two at D=160), which a later
    tile's Q may only overwrite once the output is stored."""
    q, k, v = make_qkv(2, 64, 8, 1024, 300, dim, dtype=torch.float16, device="cuda")
    check_forward(rung, q, k, v, causal=True)


@pytest.mark.parametrize("dim", [40, 64, 88, 96, 128, 200], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("rung", RUNGS)
def test_few_query_tiles_many_keys(rung, causal, dim):
    """2 heads × 200 query rows against 8200 keys (GQA, ragged last key tile): too few tiles for
    the SMs, so `hopper` splits each tile's keys over a cluster of CTAs (at D ≤ 64 also between
    its two consumers, sharing 64-row tiles) and merges the parts in-kernel; D=40 and 88 run the
    D=64 and D=96 kernels on zero-padded columns, which the merge must not write; D=128 takes
    176-key tiles there. D=200 runs the D=256 kernel, which has no few-tile modes: one CTA per
    tile, every key."""
    q, k, v = make_qkv(1, 2, 1, 200, 8200, dim, dtype=torch.bfloat16, device="cuda")
    check_forward(rung, q, k, v, causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("rung", RUNGS)
def test_long_keys_over_many_tiles(rung, causal):
    """40 heads × 500 query rows against 5000 keys at D=128 (GQA, ragged ends): too few 192-row
    tiles to fill the GPU for three consumers, so `hopper` takes two with 176-key tiles and one Q
    buffer per CTA, in which each tile's output is staged; its 160 tiles of 128 rows take two
    rounds, so each next Q must wait for the previous output's store."""
    q, k, v = make_qkv(1, 40, 8, 500, 5000, 128, dtype=torch.float16, device="cuda")
    check_forward(rung, q, k, v, causal)


@pytest.mark.parametrize("seqlen_q", [1, 127])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("rung", RUNGS)
def test_few_rows_against_long_keys(rung, causal, seqlen_q):
    """1 or 127 query rows against 4500 keys at D=128 (bf16, GQA): `hopper` takes 176-key tiles
    (4500 is no multiple of 176) and, with one query tile per head, splits the keys over a
    cluster of CTAs that each hand their one Q buffer back before the merge."""
    q, k, v = make_qkv(1, 4, 2, seqlen_q, 4500, 128, dtype=torch.bfloat16, device="cuda")
    check_forward(rung, q, k, v, causal)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("rung", RUNGS)
def test_inputs_on_a_gpu_that_is_not_current(rung):
    """Inputs on cuda:1 while cuda:0 is current: the rung runs on the inputs' GPU (forward,
    and for a rung with a backward, the gradients). Correct results alone would not show it
    where GPU 0 can read GPU 1's memory (NVLink peers), so for `triton`, whose launches go
    to the current device, the kernel it launched must be the one compiled for cuda:1."""
    from flashcore import triton_rung

    assert torch.cuda.current_device() == 0
    q, k, v = make_qkv(1, 4, 2, 300, 700, 64, dtype=torch.float16, device="cuda:1")
    known = set(triton_rung._fwd.compiled)  # (tuning key, device, ...) of launched kernels
    check_forward(rung, q, k, v, True)
    if rung == "triton":
        assert {at[1] for at in set(triton_rung._fwd.compiled) - known} == {1}
    if flashcore.backends.BACKENDS[rung].has_backward:
        check_backward(rung, q, k, v, True)


@pytest.mark.parametrize("rung", RUNGS)
def test_causal_tiles_handed_out_dynamically(rung):
    """Causal, more tiles than SMs, and all heads' K/V beyond half of L2: `hopper` hands tiles out
    from a counter, longest first within sections of the heads that fit (the first one short)."""
    q, k, v = make_qkv(1, 60, 60, 300, 1024, 128, dtype=torch.float16, device="cuda")
    check_forward(rung, q, k, v, causal=True)


@pytest.mark.parametrize("shape, causal", [((1, 36, 36, 512, 512, 128), False),
                                           ((1, 60, 12, 300, 500, 96), False),
                                           ((1, 60, 60, 300, 1024, 128), True)],
                         ids=["d128-short-tiles", "d96-short-tiles-ragged-gqa", "causal-sections"])
@pytest.mark.parametrize("rung", RUNGS)
def test_calls_back_to_back_on_two_streams(rung, shape, causal):
    """Four calls back to back on each of two streams at once, each on its own inputs and into
    NaN-filled memory. Where `hopper` takes tiles from a counter (eager launches with more tiles
    than SMs: causal, and non-causal tiles of at most 4 key tiles above D=64), eager calls on one
    stream share one, which each launch's last CTA leaves at zero for the next: left anywhere
    else, the next launch would skip tiles and leave NaN."""
    inputs = [make_qkv(*shape, dtype=torch.float16, device="cuda") for _ in range(8)]
    reason = flashcore.backends.BACKENDS[rung].why_not(*inputs[0], causal)
    if reason is not None:
        pytest.skip(reason)
    flashcore.attention(*inputs[0], causal=causal, backend=rung)  # first-call allocations
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    poisoned = set()
    for stream in streams:  # blocks of the output's size, NaN-filled and freed on each stream
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            blocks = [torch.full(inputs[0][0].shape, float("nan"), dtype=torch.float16, device="cuda")
                      for _ in range(4)]
            poisoned |= {block.data_ptr() for block in blocks}
            del blocks
    outs = []
    for i, qkv in enumerate(inputs):
        with torch.cuda.stream(streams[i % 2]):
            outs.append(flashcore.attention(*qkv, causal=causal, backend=rung))
    torch.cuda.synchronize()
    assert {out.data_ptr() for out in outs} == poisoned, "the outputs did not land in the poisoned blocks"
    for out, qkv in zip(outs, inputs):
        assert rel_error(out, flashcore.reference_attention(*qkv, causal=causal)) < 2e-3


@pytest.mark.parametrize("rung", RUNGS)
def test_output_is_laid_out_like_q(rung):
    q, k, v = make_qkv(1, 4, 4, 64, 64, 64, dtype=torch.float16, device="cuda", layout="bshd")
    out = flashcore.attention(q, k, v, backend=rung)
    assert out.stride() == q.stride()


@pytest.mark.parametrize("rung", RUNGS)
def test_rows_that_see_no_key_are_zero(rung):
    """Causal with Sq > Sk: the first Sq − Sk queries see no key → output 0, LSE −inf."""
    q, k, v = make_qkv(1, 2, 2, 100, 30, 64, dtype=torch.float16, device="cuda")
    out, lse = poisoned_call(q, k, v, causal=True, backend=rung, return_lse=True)
    assert torch.all(out[:, :, :70] == 0)
    assert torch.all(torch.isneginf(lse[:, :, :70]))
    assert torch.isfinite(out[:, :, 70:]).all() and torch.isfinite(lse[:, :, 70:]).all()


@pytest.mark.parametrize("rung", RUNGS)
def test_no_keys_at_all(rung):
    q, k, v = make_qkv(1, 2, 2, 5, 0, 64, dtype=torch.float16, device="cuda")
    out, lse = poisoned_call(q, k, v, backend=rung, return_lse=True)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


@pytest.mark.parametrize("rung", RUNGS)
def test_nan_propagates_to_the_rows_it_touches(rung):
    q, k, v = make_qkv(1, 2, 2, 64, 64, 64, dtype=torch.float16, device="cuda")
    q[0, 0, 5, 3] = math.nan  # one query row of head 0
    out = flashcore.attention(q, k, v, backend=rung)
    assert out[0, 0, 5].isnan().all()
    assert not out[0, 0, :5].isnan().any() and not out[0, 1].isnan().any()


@pytest.mark.parametrize("rung", RUNGS)
def test_custom_scale(rung):
    q, k, v = make_qkv(1, 2, 2, 129, 129, 64, dtype=torch.float16, device="cuda")
    out = flashcore.attention(q, k, v, scale=0.3, backend=rung)
    ref = flashcore.reference_attention(q, k, v, scale=0.3)
    low = flashcore.reference_attention(q, k, v, scale=0.3, compute_dtype=q.dtype)
    assert rel_error(out, ref) <= 2 * rel_error(low, ref) + ATOL[q.dtype]


def test_auto_picks_the_fastest_rung_that_fits():
    """hopper on sm_90 for its head dims (32–256), triton elsewhere and for gradients."""
    for dim, expected in ((64, "hopper" if HOPPER else "triton"), (80, "hopper" if HOPPER else "triton"),
                          (160, "hopper" if HOPPER else "triton")):
        q, k, v = make_qkv(1, 2, 2, 64, 64, dim, dtype=torch.float16, device="cuda")
        assert flashcore.api._choose("auto", q, k, v, False, False).name == expected
        assert flashcore.api._choose("auto", q, k, v, False, True).name == "triton"
        assert rel_error(flashcore.attention(q, k, v), flashcore.reference_attention(q, k, v)) < 2e-3
    q, k, v = make_qkv(1, 2, 2, 64, 64, 24, dtype=torch.float16, device="cuda")
    assert flashcore.api._choose("auto", q, k, v, False, False).name == "reference"


@pytest.mark.parametrize("rung", [r.name for r in flashcore.ladder() if isinstance(r, flashcore.backends.CudaRung)])
def test_eager_calls_skip_the_dispatcher_and_dispatch_modes_see_the_op(rung, monkeypatch):
    """A CUDA rung's first eager call on plain tensors runs the op's C++ function directly and
    enables the rung's C++ entry for the whole common call, which later calls take (no Python
    past the entry's lookup); under a dispatch mode the op itself runs, where the mode sees it.
    All three give the same bits."""
    from torch.utils._python_dispatch import TorchDispatchMode

    q, k, v = make_qkv(1, 2, 2, 64, 64, 64, dtype=torch.float16, device="cuda")
    backend = flashcore.backends.BACKENDS[rung]
    if backend.why_not(q, k, v) is not None:
        pytest.skip(backend.why_not(q, k, v))
    monkeypatch.setattr(flashcore.api, "_fast", {})
    direct, direct_calls, seen = backend.direct, [], []
    monkeypatch.setattr(backend, "direct", lambda *args: direct_calls.append(1) or direct(*args))

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    plain = flashcore.attention(q, k, v, backend=rung)
    assert direct_calls == [1] and rung in flashcore.api._fast
    again = flashcore.attention(q, k, v, backend=rung)
    assert direct_calls == [1] and torch.equal(plain, again)
    with Record():
        recorded = flashcore.attention(q, k, v, backend=rung)
    assert direct_calls == [1] and f"flashcore.{rung}_fwd.default" in seen
    assert torch.equal(plain, recorded)


@pytest.mark.skipif(not HOPPER, reason="auto takes hopper on sm_90 only")
def test_the_fast_entry_takes_only_calls_the_python_path_gives_its_rung(monkeypatch):
    """After a call, `auto` and `hopper` hand common calls to the rung's C++ entry whole. It
    runs exactly the calls the Python path would give hopper unchanged, with the same bits, and
    answers None for every other, which then takes the Python path (named errors included)."""
    monkeypatch.setattr(flashcore.api, "_fast", {})
    q, k, v = make_qkv(1, 4, 2, 100, 130, 64, dtype=torch.bfloat16, device="cuda")
    out, lse = flashcore.attention(q, k, v, causal=True, return_lse=True)
    fast = flashcore.api._fast["auto"]
    again, again_lse = fast(q, k, v, True, None, True)
    assert torch.equal(out, again) and torch.equal(lse, again_lse)
    assert torch.equal(fast(q, k, v, False, 0.3, False),
                       flashcore.backends.BACKENDS["hopper"].direct(q, k, v, 0.3, False, False)[0])
    unaligned = torch.randn(1, 4, 100, 65, dtype=torch.bfloat16, device="cuda")[..., 1:]
    others = {
        "float32": (q.float(), k.float(), v.float(), False, None, False),
        "head dim 24": (q[..., :24], k[..., :24], v[..., :24], False, None, False),
        "heads not dividing": (q[:, :3], k, v, False, None, False),
        "k and v shapes differ": (q, k, v[:, :, :64], False, None, False),
        "unaligned rows": (unaligned, k, v, False, None, False),
        "a Parameter": (torch.nn.Parameter(q), k, v, False, None, False),
        "causal an int": (q, k, v, 1, None, False),
        "scale an int": (q, k, v, False, 1, False),
        "3-D": (q[0], k[0], v[0], False, None, False),
    }
    for name, call in others.items():
        assert fast(*call) is None, name
    needs_grad = q.detach().requires_grad_()
    assert fast(needs_grad, k, v, False, None, False) is None
    with torch.no_grad():
        assert fast(needs_grad, k, v, False, None, False) is not None
    with pytest.raises(ValueError, match="head dim"):
        flashcore.attention(q[..., :24].contiguous(), k[..., :24].contiguous(), v[..., :24].contiguous(),
                            backend="hopper")


def test_seed_build_form():
    for rung in ("baseline", "wmma"):
        ext = flashcore.build(rung)
        q, k, v = make_qkv(1, 8, 8, 512, 512, 64, dtype=torch.float16, device="cuda")
        out = ext.forward(q, k, v, 0.125)
        ref = flashcore.reference_attention(q, k, v, scale=0.125)
        assert rel_error(out, ref) < 2e-3


def test_gradients_through_a_forward_only_rung_are_refused():
    q, k, v = make_qkv(1, 2, 2, 64, 64, 64, dtype=torch.float16, device="cuda")
    q.requires_grad_()
    with pytest.raises(ValueError, match="no backward"):
        flashcore.attention(q, k, v, backend="wmma")
    with torch.no_grad():
        flashcore.attention(q, k, v, backend="wmma")


def test_unaligned_rows_fall_back_from_wmma():
    base = torch.randn(1, 2, 64, 65, dtype=torch.float16, device="cuda")
    q = base[..., 1:]  # 2-byte offset rows: fine for baseline, not for 16-byte vector loads
    k, v = q.clone(), q.clone()
    assert "16-byte" in flashcore.backends.BACKENDS["wmma"].why_not(q, k, v)
    out = flashcore.attention(q, k, v)
    assert rel_error(out, flashcore.reference_attention(q, k, v)) < 2e-3


@pytest.mark.parametrize("shape, causal", [((1, 8, 8, 512, 512, 64), False),
                                           ((1, 36, 36, 512, 512, 128), False),
                                           ((1, 60, 60, 300, 1024, 128), True)],
                         ids=["mission", "d128-short-tiles", "causal-sections"])
def test_cuda_graph_capture(shape, causal):
    """Replays see new inputs, and each replay starts its own schedule (a tile counter, if any,
    is the graph's own, zeroed inside it)."""
    q, k, v = make_qkv(*shape, dtype=torch.float16, device="cuda")
    for rung in RUNGS:
        flashcore.attention(q, k, v, causal=causal, backend=rung)  # warm up outside capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = flashcore.attention(q, k, v, causal=causal, backend=rung)
        for _ in range(2):
            q.copy_(torch.randn_like(q))
            graph.replay()
            assert rel_error(out, flashcore.reference_attention(q, k, v, causal=causal)) < 2e-3


@pytest.mark.parametrize("rung", RUNGS)
def test_a_call_waits_for_the_kernel_that_writes_its_inputs(rung):
    """Two calls back to back in one stream, the second reading the first's output. `hopper`
    launches while the kernel before it still runs (programmatic dependent launch) and must
    wait for it before it reads: the first call is long (32k keys) and its output lands in
    NaN-filled memory, so a read too early reads NaN."""
    q, k, v = make_qkv(1, 8, 8, 512, 32768, 64, dtype=torch.float16, device="cuda")
    first = poisoned_call(q, k, v, backend=rung)
    second = flashcore.attention(first, first, first, backend=rung)
    assert rel_error(first, flashcore.reference_attention(q, k, v)) < 2e-3
    assert rel_error(second, flashcore.reference_attention(first, first, first)) < 2e-3


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("shape", [(2, 4, 2, 128, 128), (1, 8, 2, 127, 513), (1, 4, 1, 1000, 1000),
                                   (2, 2, 2, 300, 100)], ids=lambda s: "b{}h{}:{}-sq{}-sk{}".format(*s))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dim", [64, 96, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("rung", TRAINABLE)
def test_gradients_match_reference(rung, dtype, dim, causal, shape, layout):
    b, hq, hkv, sq, sk = shape
    q, k, v = make_qkv(b, hq, hkv, sq, sk, dim, dtype=dtype, device="cuda", layout=layout)
    check_backward(rung, q, k, v, causal)


@pytest.mark.parametrize("seqlens", [(1, 300), (7, 7), (300, 7)],
                         ids=lambda s: f"sq{s[0]}-sk{s[1]}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dim", [32, 80])
@pytest.mark.parametrize("rung", TRAINABLE)
def test_gradients_at_tiny_sequences_and_odd_head_dims(rung, dim, causal, seqlens):
    """One query row, seven rows or keys, head dims 32 and 80. No single-key shape: a row that
    sees one key has dQ = dLSE·k·scale, whose error is one rounding of dS per row, too few for
    a relative bound (1×1 at 4 heads went over it for 1 seed in 40 on the CPU interpreter);
    causal, with more queries, dQ is 0 in exact arithmetic and the error is rounding over
    nothing."""
    q, k, v = make_qkv(1, 4, 2, *seqlens, dim, dtype=torch.bfloat16, device="cuda")
    check_backward(rung, q, k, v, causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("rung", TRAINABLE)
def test_gradients_when_every_score_is_far_below_zero(rung, causal):
    """Scores near -128 (LSE far below the log of the smallest float): a zero-filled key past a
    ragged end would get P = exp(-LSE) = inf, so padded keys must be masked, not zero-filled."""
    q, k, v = make_qkv(1, 4, 2, 200, 333, 64, dtype=torch.float16, device="cuda")
    check_backward(rung, *with_scores_far_below_zero(q, k), v, causal)


@pytest.mark.parametrize("rung", TRAINABLE)
def test_gradients_of_sum_losses(rung):
    check_sum_loss_gradients(rung, *make_qkv(2, 4, 2, 300, 200, 64, dtype=torch.float16,
                                             device="cuda"))


@pytest.mark.parametrize("rung", TRAINABLE)
def test_backward_is_deterministic(rung):
    check_deterministic_backward(rung, *make_qkv(2, 8, 2, 1000, 1000, 64, dtype=torch.float16,
                                                 device="cuda"), causal=True)


@pytest.mark.parametrize("rung", TRAINABLE)
def test_torch_compile_traces_without_graph_breaks(rung):
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 4, 2, 256, 256, 64, dtype=torch.bfloat16,
                                                      device="cuda"))
    compiled = torch.compile(lambda q, k, v: flashcore.attention(q, k, v, causal=True, backend=rung),
                             fullgraph=True)
    out = compiled(q, k, v)
    assert rel_error(out, flashcore.reference_attention(q, k, v, causal=True)) < 1e-2
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.skipif(not HOPPER, reason="the TMA path is Hopper's (sm_90)")
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("causal, seqlen_k", [(False, 1500), (True, 4100)],
                         ids=["full-1500", "causal-4100"])
@pytest.mark.parametrize("dim", [96, 128])
def test_long_keys_take_the_tma_path(dim, causal, seqlen_k, layout):
    """Head dim 128 (padded) with >= 1k keys (causal: >= 4k) loads through TMA descriptors:
    ragged ends zero-filled by the copy engine, per (batch, head) slice."""
    from flashcore import triton_rung

    q, k, v = make_qkv(2, 4, 2, 333, seqlen_k, dim, dtype=torch.bfloat16, device="cuda",
                       layout=layout)
    out = torch.empty_like(q)
    assert triton_rung._use_tma(q, k, v, out, causal)
    assert not triton_rung._use_tma(q, k[:, :, :1000], v[:, :, :1000], out, causal)
    check_forward("triton", q, k, v, causal)
    check_backward("triton", q, k, v, causal)
