"""FlashCore: fused attention kernels for NVIDIA GPUs, as an optimisation ladder.

    import flashcore
    out = flashcore.attention(q, k, v, causal=True)          # (B, H, S, D), like SDPA
    out, lse = flashcore.attention(q, k, v, backend="wmma", return_lse=True)
"""

from .api import attention, build
from .backends import ladder
from .jit import BuildError
from .reference import reference_attention

__version__ = "0.1.0"
__all__ = ["attention", "build", "ladder", "reference_attention", "BuildError", "__version__"]
