"""The float64 reference every kernel is checked against (and the `reference` backend).

Plain PyTorch on any device and dtype. GQA is handled by broadcasting the query heads of a
group against their shared K/V head (no repeat), and the query rows are processed in chunks
so that the score block stays small even at S = 16k.
"""

from __future__ import annotations

import math

import torch

_CHUNK_ELEMENTS = 1 << 26  # score elements per chunk: 512 MB in float64


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
    compute_dtype: torch.dtype = torch.float64,
):
    """softmax(q·kᵀ·scale, masked)·v computed in ``compute_dtype``; the result is in that dtype.

    Semantics match :func:`flashcore.attention`: (B, H, S, D) layout, GQA when k/v have fewer
    heads, bottom-right causal masking, and rows that see no key give 0 with LSE = -inf.
    With a 16-bit ``compute_dtype`` the matmuls run in it and the softmax in float32: this is
    how PyTorch's own low-precision attention rounds, the yardstick for kernel tolerances.
    """
    batch, heads_q, seqlen_q, dim = q.shape
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    softmax_dtype = torch.promote_types(compute_dtype, torch.float32)
    group = heads_q // heads_kv if heads_kv else 1

    qg = q.to(compute_dtype).reshape(batch, heads_kv, group, seqlen_q, dim)
    kt = k.to(compute_dtype).unsqueeze(2).transpose(-1, -2)  # (B, Hkv, 1, D, Sk)
    vg = v.to(compute_dtype).unsqueeze(2)
    out = torch.empty(batch, heads_kv, group, seqlen_q, dim, dtype=compute_dtype, device=q.device)
    lse = torch.empty(batch, heads_kv, group, seqlen_q, dtype=softmax_dtype, device=q.device)
    keys = torch.arange(seqlen_k, device=q.device)

    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, batch * heads_q * seqlen_k))
    for start in range(0, seqlen_q, rows_per_chunk):
        rows = slice(start, min(seqlen_q, start + rows_per_chunk))
        scores = (qg[..., rows, :] @ kt).to(softmax_dtype) * scale
        if causal:
            queries = torch.arange(rows.start, rows.stop, device=q.device)
            hidden = keys[None, :] > queries[:, None] + (seqlen_k - seqlen_q)
            scores = scores.masked_fill(hidden, -math.inf)
        row_lse = torch.logsumexp(scores, dim=-1)
        no_key = row_lse == -math.inf  # shift by 0 there, so every probability is exp(-inf) = 0
        probs = torch.exp(scores - torch.where(no_key, 0.0, row_lse).unsqueeze(-1))
        out[..., rows, :] = probs.to(compute_dtype) @ vg
        lse[..., rows] = row_lse

    out = out.reshape(batch, heads_q, seqlen_q, dim)
    return (out, lse.reshape(batch, heads_q, seqlen_q)) if return_lse else out
