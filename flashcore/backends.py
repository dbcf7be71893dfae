"""The registry of attention backends: the rungs of the ladder and the float64 reference.

Every backend takes the same arguments. ``why_not`` says in one sentence why a backend cannot
take given inputs (None when it can); ``auto`` picks the fastest rung whose answer is None.
"""

from __future__ import annotations

import functools

import torch

from . import jit
from .reference import reference_attention

_HALF_TYPES = (torch.float16, torch.bfloat16)
_VEC_BYTES = 16


class Backend:
    name: str
    has_backward: bool

    def why_not(self, q, k, v, causal: bool = False, needs_grad: bool = False) -> str | None:
        raise NotImplementedError

    def forward(self, q, k, v, scale: float, causal: bool, return_lse: bool):
        """Returns (out, lse); lse is a float32 (B, H, Sq) tensor when return_lse, else empty."""
        raise NotImplementedError


class Reference(Backend):
    """PyTorch float64 math: any float dtype, any device, differentiable. Materialises scores."""

    name = "reference"
    has_backward = True

    def why_not(self, q, k, v, causal=False, needs_grad=False):
        return None

    def forward(self, q, k, v, scale, causal, return_lse):
        out, lse = reference_attention(q, k, v, causal=causal, scale=scale, return_lse=True)
        lse = lse.float() if return_lse else lse.new_empty(0, dtype=torch.float32)
        return out.to(q.dtype), lse


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def rows_16b_aligned(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Data pointers 16-byte aligned and batch/head/sequence strides whole 16-byte multiples."""
    bits = q.data_ptr() | k.data_ptr() | v.data_ptr()
    for t in (q, k, v):
        size = t.element_size()
        b, h, s, _ = t.stride()
        bits |= (b | h | s) * size
    return bits & (_VEC_BYTES - 1) == 0


class CudaRung(Backend):
    """A CUDA C++ rung, built on first use (flashcore.jit) and called as a PyTorch op."""

    has_backward = False

    def __init__(self, name: str, head_dims: tuple[int, ...], min_capability: tuple[int, int],
                 needs_16b_rows: bool):
        self.name = name
        self.head_dims = head_dims
        self.min_capability = min_capability
        self.needs_16b_rows = needs_16b_rows

    def why_not(self, q, k, v, causal=False, needs_grad=False):
        if q.device.type != "cuda":
            return f"backend {self.name!r} runs on CUDA tensors, got {q.device.type} tensors"
        if q.dtype not in _HALF_TYPES:
            return f"backend {self.name!r} takes float16 or bfloat16, got {q.dtype}"
        if q.shape[-1] not in self.head_dims:
            dims = ", ".join(map(str, self.head_dims))
            return f"backend {self.name!r} supports head dims {dims}, got {q.shape[-1]}"
        if _capability(q.device) < self.min_capability:
            need = "sm_{}{}".format(*self.min_capability)
            return f"backend {self.name!r} needs a {need}+ GPU, this one is sm_{''.join(map(str, _capability(q.device)))}"
        if self.needs_16b_rows and not rows_16b_aligned(q, k, v):
            return (f"backend {self.name!r} needs 16-byte aligned rows (data pointers 16-byte "
                    "aligned, batch/head/sequence strides multiples of 8 elements)")
        if needs_grad:
            return (f"backend {self.name!r} has no backward; call it under torch.no_grad() or "
                    "use a backend with a backward (backend='reference')")
        return None

    @functools.cached_property
    def op(self):
        """The custom op torch.ops.flashcore.<name>_fwd, built or loaded on first access."""
        jit.load(self.name)
        return getattr(torch.ops.flashcore, f"{self.name}_fwd").default

    def forward(self, q, k, v, scale, causal, return_lse):
        return self.op(q, k, v, scale, causal, return_lse)


# The ladder, slowest rung first. `auto` tries it fastest first, then the reference.
_LADDER: tuple[CudaRung, ...] = (
    CudaRung("baseline", head_dims=(32, 64, 80, 96, 128), min_capability=(7, 0),
             needs_16b_rows=False),
    CudaRung("wmma", head_dims=(64, 128), min_capability=(8, 0), needs_16b_rows=True),
)
REFERENCE = Reference()
BACKENDS: dict[str, Backend] = {b.name: b for b in (*_LADDER, REFERENCE)}
AUTO_ORDER: tuple[Backend, ...] = (*reversed(_LADDER), REFERENCE)


def ladder() -> list[CudaRung]:
    """The GPU rungs in ladder order (baseline first)."""
    return list(_LADDER)
