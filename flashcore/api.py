"""flashcore.attention: the one public entry point."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from . import jit
from .backends import AUTO_ORDER, BACKENDS, REFERENCE, Backend, CudaRung

_NAMES = "(batch, heads, seq, head_dim)"
_choices: dict[tuple, Backend] = {}
# Per backend name, the C++ entry of the CUDA rung it ran on: the common call whole, None for
# any other (CudaRung.fast_path). Set once a call has taken the Python path to that rung.
_fast: dict[str, object] = {}


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "auto",
    return_lse: bool = False,
):
    """Fused scaled-dot-product attention, ``softmax(q·kᵀ·scale)·v``.

    Args:
        q: (B, Hq, Sq, D) queries. Any strides with a unit last stride: a (B, S, H, D) tensor
            passed as ``x.transpose(1, 2)`` is used in place, without a copy.
        k, v: (B, Hkv, Sk, D); Hkv must divide Hq (GQA/MQA: query head h reads K/V head
            h // (Hq // Hkv)). Sk may differ from Sq.
        causal: bottom-right aligned causal mask (the FlashAttention convention): query i sees
            keys j <= i + Sk - Sq; equal to SDPA's ``is_causal`` when Sq == Sk. A query that
            sees no key (Sq > Sk) gets a zero output row and LSE = -inf, never NaN.
        scale: softmax scale; defaults to 1/sqrt(D).
        backend: "auto" (the fastest rung that supports the inputs on this device; the
            reference on CPU), a rung ("baseline", "wmma", "triton", "hopper"), or "reference" (float64
            PyTorch math, any device and float dtype). "triton" and "reference" are
            differentiable; asking for gradients through a forward-only rung raises.
        return_lse: also return the natural-log log-sum-exp of each row, (B, Hq, Sq) float32.

    Returns:
        The (B, Hq, Sq, D) output in q's dtype (laid out like q), or (output, lse).

    Raises:
        TypeError / ValueError: a bad argument, named, with what is allowed, before any kernel
            runs. A rung named explicitly that cannot take the inputs raises ValueError saying
            why.
    """
    fast = _fast.get(backend)
    if fast is not None and not torch.compiler.is_compiling():
        result = fast(q, k, v, causal, scale, return_lse)
        if result is not None:
            return result
    key = _common_call_key(q, k, v, causal, scale, return_lse, backend)
    if key is None:  # an unusual call, a wrong one (named errors), or one torch.compile traces
        _check_inputs_in_detail(q, k, v, causal, scale, return_lse, backend)
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    else:
        needs_grad = key[-1]
    chosen = _select(key, backend, q, k, v, causal, needs_grad)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, lse = chosen.forward(q, k, v, scale, causal, return_lse, needs_grad)
    # Later common calls of this backend go to the rung's C++ entry; for "auto" only if nothing
    # precedes the rung in the order (a call it takes is then a call auto gives it).
    if (key is not None and not needs_grad and isinstance(chosen, CudaRung)
            and (backend != "auto" or chosen is AUTO_ORDER[0])):
        _fast[backend] = chosen.fast_path(q.device)
    return (out, lse) if return_lse else out


def _common_call_key(q, k, v, causal, scale, return_lse, backend) -> tuple | None:
    """For a valid call of the common form, the key its backend choice is memoised under
    (everything a why_not answer depends on); else None.

    One combined test and a few attribute reads: host time per call matters at small shapes.
    Anything it does not accept goes through the detailed checks, which either name the problem
    or accept an unusual but valid call. None too while torch.compile traces (data_ptr() has no
    meaning there).
    """
    if torch.compiler.is_compiling():
        return None
    try:
        qs, ks = q.shape, k.shape
        (qb, qh, qm, qd), (kb, kh, km, kd), (vb, vh, vm, vd) = q.stride(), k.stride(), v.stride()
        if not (len(qs) == 4 and len(ks) == 4 and ks == v.shape and qs[0] == ks[0]
                and qs[3] == ks[3] and qs[3] > 0 and ks[1] > 0 and qs[1] % ks[1] == 0
                and q.dtype == k.dtype == v.dtype and q.is_floating_point()
                and q.device == k.device == v.device and qd == 1 and kd == 1 and vd == 1
                and type(causal) is bool and type(return_lse) is bool and type(backend) is str
                and (scale is None or type(scale) is float)):
            return None
    except (AttributeError, TypeError, ValueError):  # ValueError: not 4 strides to unpack
        return None
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    # The low 4 bits of the pointers and row strides in bytes: finer than rows_16b_aligned (which
    # the rungs ask), and read from the strides already at hand.
    low_bits = (q.data_ptr() | k.data_ptr() | v.data_ptr()
                | (qb | qh | qm | kb | kh | km | vb | vh | vm) * q.element_size()) & 15
    return (backend, q.device, q.dtype, qs[3], causal, low_bits, needs_grad)


def _select(key: tuple | None, backend: str, q, k, v, causal: bool, needs_grad: bool) -> Backend:
    """The backend to run: memoised under the call's key, if it has one."""
    chosen = _choices.get(key) if key is not None else None
    if chosen is None:
        chosen = _choose(backend, q, k, v, causal, needs_grad)
        if key is not None:
            _choices[key] = chosen
    return chosen


def _choose(backend: str, q, k, v, causal: bool, needs_grad: bool) -> Backend:
    if backend == "auto":
        if q.device.type != "cuda":
            return REFERENCE
        return next(b for b in AUTO_ORDER if b.why_not(q, k, v, causal, needs_grad) is None)
    chosen = BACKENDS.get(backend)
    if chosen is None:
        allowed = ", ".join(repr(n) for n in ("auto", *BACKENDS))
        raise ValueError(f"backend must be one of {allowed}, got {backend!r}")
    reason = chosen.why_not(q, k, v, causal, needs_grad)
    if reason is not None:
        raise ValueError(reason)
    return chosen


def _check_inputs_in_detail(q, k, v, causal, scale, return_lse, backend) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D {_NAMES}, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name} must have a unit stride in its last (head_dim) dim, got "
                             f"strides {t.stride()}; call .contiguous() first")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    (batch, heads_q, _, dim), (kb, heads_kv, seqlen_k, kd) = q.shape, k.shape
    if (kb, kd) != (batch, dim) or v.shape[0] != batch:
        raise ValueError(f"q, k, v must share batch and head_dim {_NAMES}, got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if v.shape[1:3] != (heads_kv, seqlen_k) or v.shape[3] != dim:
        raise ValueError(f"v must have k's heads and seq length and q's head_dim, got k "
                         f"{tuple(k.shape)}, v {tuple(v.shape)}")
    if dim == 0:
        raise ValueError("head_dim must be at least 1, got 0")
    if heads_kv == 0 and heads_q != 0 or heads_kv and heads_q % heads_kv:
        raise ValueError(f"the heads of k and v ({heads_kv}) must divide the heads of q "
                         f"({heads_q})")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")


@dataclass(frozen=True)
class CompiledRung:
    """A built CUDA rung, callable in the seed's form: ``build("wmma").forward(q, k, v, scale)``."""

    name: str
    library: Path

    def forward(self, q, k, v, scale=None):
        return attention(q, k, v, scale=scale, backend=self.name)


def build(rung: str) -> CompiledRung:
    """Compiles (first use) or loads (cached) a CUDA rung: "baseline", "wmma" or "hopper"."""
    return CompiledRung(rung, jit.load(rung).path)
