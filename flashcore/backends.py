"""The registry of attention backends: the rungs of the ladder and the float64 reference.

Every backend takes the same arguments. ``why_not`` says in one sentence why a backend cannot
take given inputs (None when it can); ``auto`` picks the fastest rung whose answer is None.
"""

from __future__ import annotations

import functools
import os

import torch

from . import jit
from .reference import reference_attention

_HALF_TYPES = (torch.float16, torch.bfloat16)
_VEC_BYTES = 16
_HEAD_DIMS_32_TO_256 = tuple(range(32, 257, 8))  # triton and hopper (padded to a kernel's)


class Backend:
    name: str
    has_backward: bool

    def why_not(self, q, k, v, causal: bool = False, needs_grad: bool = False) -> str | None:
        raise NotImplementedError

    def forward(self, q, k, v, scale: float, causal: bool, return_lse: bool, needs_grad: bool):
        """Returns (out, lse); lse is the float32 (B, H, Sq) LSE when return_lse is true.
        needs_grad: autograd will differentiate the call (only backends with a backward)."""
        raise NotImplementedError


class Reference(Backend):
    """PyTorch float64 math: any float dtype, any device, differentiable. Materialises scores."""

    name = "reference"
    has_backward = True

    def why_not(self, q, k, v, causal=False, needs_grad=False):
        return None

    def forward(self, q, k, v, scale, causal, return_lse, needs_grad):
        out, lse = reference_attention(q, k, v, causal=causal, scale=scale, return_lse=True)
        lse = lse.float() if return_lse else lse.new_empty(0, dtype=torch.float32)
        return out.to(q.dtype), lse


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def rows_16b_aligned(*tensors: torch.Tensor) -> bool:
    """Data pointers 16-byte aligned and batch/head/sequence strides whole 16-byte multiples.

    Unknown while torch.compile traces (fake tensors have no address): then False."""
    if torch.compiler.is_compiling():
        return False
    bits = 0
    for t in tensors:
        b, h, s, _ = t.stride()
        bits |= t.data_ptr() | (b | h | s) * t.element_size()
    return bits & (_VEC_BYTES - 1) == 0


class GpuRung(Backend):
    """A rung of the ladder: fp16/bf16 kernels for a set of head dims on sm_XY+ GPUs."""

    has_backward = False
    needs_16b_rows = False
    interpretable = False  # also runs on CPU tensors under TRITON_INTERPRET=1
    head_dims: tuple[int, ...]
    min_capability: tuple[int, int]
    max_capability: tuple[int, int] = (99, 99)

    def why_not(self, q, k, v, causal=False, needs_grad=False):
        name = repr(self.name)
        interpreted = (self.interpretable and q.device.type == "cpu"
                       and os.environ.get("TRITON_INTERPRET") == "1")
        if q.device.type != "cuda" and not interpreted:
            also = " (or CPU tensors under TRITON_INTERPRET=1)" if self.interpretable else ""
            return f"backend {name} runs on CUDA tensors{also}, got {q.device.type} tensors"
        if q.dtype not in _HALF_TYPES:
            return f"backend {name} takes float16 or bfloat16, got {q.dtype}"
        if q.shape[-1] not in self.head_dims:
            dims = self.head_dims
            steps = {b - a for a, b in zip(dims, dims[1:])}
            listed = (f"{dims[0]} to {dims[-1]} in steps of {steps.pop()}"
                      if len(dims) > 6 and len(steps) == 1 else ", ".join(map(str, dims)))
            return f"backend {name} supports head dims {listed}, got {q.shape[-1]}"
        if not interpreted and not (self.min_capability <= _capability(q.device)
                                    <= self.max_capability):
            low, high, have = ("".join(map(str, c)) for c in (
                self.min_capability, self.max_capability, _capability(q.device)))
            need = f"sm_{low}" + ("+" if high == "9999" else f" to sm_{high}")
            return f"backend {name} needs an {need} GPU, this one is sm_{have}"
        if self.needs_16b_rows and not rows_16b_aligned(q, k, v):
            return (f"backend {name} needs 16-byte aligned rows (data pointers 16-byte "
                    "aligned, batch/head/sequence strides multiples of 8 elements)")
        if needs_grad and not self.has_backward:
            return (f"backend {name} has no backward; call it under torch.no_grad() or "
                    "use a backend with a backward (backend='triton' or 'reference')")
        return None


class CudaRung(GpuRung):
    """A CUDA C++ rung, built on first use (flashcore.jit) and called as a PyTorch op."""

    def __init__(self, name: str, head_dims: tuple[int, ...], min_capability: tuple[int, int],
                 needs_16b_rows: bool, max_capability: tuple[int, int] = (99, 99)):
        self.name = name
        self.head_dims = head_dims
        self.min_capability = min_capability
        self.max_capability = max_capability
        self.needs_16b_rows = needs_16b_rows

    @functools.cached_property
    def op(self):
        """The custom op torch.ops.flashcore.<name>_fwd, built or loaded on first access."""
        jit.load(self.name)
        return getattr(torch.ops.flashcore, f"{self.name}_fwd").default

    @functools.cached_property
    def direct(self):
        """The op's C++ function called straight from Python (no dispatcher on the way)."""
        return jit.load(self.name).module.forward

    @functools.cache
    def fast_path(self, device: torch.device):
        """The module's fast_forward, enabled for `device` (once): flashcore.attention's common
        call (plain tensors, no gradients, no dispatch mode) on inputs this rung takes, run whole
        in C++ (checks, output, launch); None for any other call. Host time is most of a small
        call: the Python checks cost more than the launch."""
        module = jit.load(self.name).module
        module.allow_fast_path(list(self.head_dims), self.needs_16b_rows, device.index)
        return module.fast_forward

    def forward(self, q, k, v, scale, causal, return_lse, needs_grad):
        # Plain tensors in eager mode call the function directly; tensor subclasses (fake
        # tensors), dispatch modes and torch.compile see the op.
        if (type(q) is torch.Tensor and type(k) is torch.Tensor and type(v) is torch.Tensor
                and not torch._C._len_torch_dispatch_stack() and not torch.compiler.is_compiling()):
            return self.direct(q, k, v, scale, causal, return_lse)
        return self.op(q, k, v, scale, causal, return_lse)


class TritonRung(GpuRung):
    """Fused FlashAttention-2 in Triton, forward and backward (flashcore/triton_rung.py)."""

    name = "triton"
    has_backward = True
    interpretable = True
    head_dims = _HEAD_DIMS_32_TO_256
    min_capability = (8, 0)

    @functools.cached_property
    def module(self):
        """flashcore.triton_rung, imported on first use (it registers flashcore::triton_fwd)."""
        from . import triton_rung

        return triton_rung

    def forward(self, q, k, v, scale, causal, return_lse, needs_grad):
        # torch.compile traces the custom op; eager calls skip its dispatch layers (host time
        # matters at small shapes): autograd.Function when gradients are needed, else the launch.
        if torch.compiler.is_compiling():
            return self.module.triton_fwd(q, k, v, scale, causal)
        if needs_grad:
            return self.module.Attention.apply(q, k, v, scale, causal)
        return self.module.forward(q, k, v, scale, causal)


# The ladder, slowest rung first. `auto` tries it fastest first, then the reference.
_LADDER: tuple[Backend, ...] = (
    CudaRung("baseline", head_dims=(32, 64, 80, 96, 128), min_capability=(7, 0),
             needs_16b_rows=False),
    CudaRung("wmma", head_dims=(64, 128), min_capability=(8, 0), needs_16b_rows=True),
    TritonRung(),
    # wgmma and setmaxnreg exist on sm_90a only; TMA needs 16-byte aligned rows. Head dims other
    # than 64, 80, 96, 128, 160 and 256 run the next wider kernel, TMA zero-filling the rest.
    CudaRung("hopper", head_dims=_HEAD_DIMS_32_TO_256, min_capability=(9, 0),
             max_capability=(9, 0), needs_16b_rows=True),
)
REFERENCE = Reference()
BACKENDS: dict[str, Backend] = {b.name: b for b in (*_LADDER, REFERENCE)}
AUTO_ORDER: tuple[Backend, ...] = (*reversed(_LADDER), REFERENCE)


def ladder() -> list[Backend]:
    """The GPU rungs in ladder order (baseline first)."""
    return list(_LADDER)
