"""Just-in-time build of the CUDA rungs.

Each rung is one extension: ``csrc/<rung>.cu`` plus ``csrc/binding.cpp`` compiled with
``-DFLASHCORE_RUNG=<rung>``, built by ``torch.utils.cpp_extension`` with ninja for this GPU's
own architecture (sm_90a on H100/H200). The shared library is cached under
``$FLASHCORE_CACHE_DIR`` (default ``~/.cache/flashcore``) in a folder keyed by a hash of the
sources, the flags, the GPU arch and the torch/CUDA versions, so a later process only loads it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

CSRC = Path(__file__).parent / "csrc"
CUDA_RUNGS = ("baseline", "wmma", "hopper")

_CUDA_FLAGS = ("-O3", "-std=c++17", "-lineinfo", "-Xptxas=-warn-spills,-warn-lmem-usage")
_CXX_FLAGS = ("-O3", "-std=c++17")


class BuildError(RuntimeError):
    """A rung failed to compile; the message carries the compiler's own output."""


def cache_dir() -> Path:
    if "FLASHCORE_CACHE_DIR" in os.environ:
        return Path(os.environ["FLASHCORE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flashcore"


def arch_flag(capability: tuple[int, int]) -> str:
    """The -gencode for one GPU: Hopper gets sm_90a, whose wgmma/setmaxnreg need the 'a'."""
    major, minor = capability
    arch = f"{major}{minor}" + ("a" if major == 9 else "")
    return f"-gencode=arch=compute_{arch},code=sm_{arch}"


def build_key(rung: str, capability: tuple[int, int]) -> str:
    """Hash of everything that changes the binary: sources, flags, arch, torch and CUDA."""
    digest = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    for part in (rung, arch_flag(capability), *_CUDA_FLAGS, *_CXX_FLAGS,
                 torch.__version__, str(torch.version.cuda)):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Library:
    rung: str
    path: Path  # the shared library that registered torch.ops.flashcore.<rung>_fwd
    module: ModuleType  # the same library as a Python module: module.forward is the op's function


@functools.cache
def load(rung: str) -> Library:
    """Compiles (first use) or loads (cached) one CUDA rung and registers its op's fake."""
    if rung not in CUDA_RUNGS:
        raise ValueError(f"no CUDA rung named {rung!r}; CUDA rungs are {', '.join(CUDA_RUNGS)}")
    if not torch.cuda.is_available():
        raise RuntimeError(f"building rung {rung!r} needs a CUDA GPU, and torch sees none")
    capability = torch.cuda.get_device_capability()
    build_dir = cache_dir() / f"{rung}-sm{capability[0]}{capability[1]}-{build_key(rung, capability)}"
    name = f"flashcore_{rung}"
    path = build_dir / f"{name}.so"
    if path.exists():
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # loading it registers the op
    else:
        module = _compile(rung, name, build_dir, capability)
    _register_fake(rung)
    return Library(rung, path, module)


def _compile(rung: str, name: str, build_dir: Path, capability: tuple[int, int]) -> ModuleType:
    from torch.utils.cpp_extension import load as load_extension

    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        return load_extension(
            name=name,
            sources=[str(CSRC / f"{rung}.cu"), str(CSRC / "binding.cpp")],
            extra_cflags=[*_CXX_FLAGS, f"-DFLASHCORE_RUNG={rung}"],
            extra_cuda_cflags=[*_CUDA_FLAGS, arch_flag(capability)],
            build_directory=str(build_dir),
            is_python_module=True,
            verbose=False,
        )
    except (RuntimeError, subprocess.CalledProcessError) as error:
        raise BuildError(f"building FlashCore rung {rung!r} failed:\n{error}") from error


def _register_fake(rung: str) -> None:
    """Shapes-only implementation, so torch.compile can trace the op without running it."""

    @torch.library.register_fake(f"flashcore::{rung}_fwd")
    def _(q, k, v, scale, causal, return_lse):
        lse_shape = (q.shape[0], q.shape[1], q.shape[2]) if return_lse else (0,)
        return torch.empty_like(q), q.new_empty(lse_shape, dtype=torch.float32)


# ---- resource report (python -m flashcore build) ----------------------------------------------

@dataclass(frozen=True)
class KernelResources:
    kernel: str
    registers: int
    shared_bytes: int  # static shared memory; dynamic shared memory is set at launch
    stack_bytes: int   # non-zero means local memory: spills or a runtime-indexed array


def cuobjdump() -> str | None:
    """CUDA's cuobjdump: from the toolkit torch builds with, the PATH, or Triton's package."""
    from torch.utils.cpp_extension import CUDA_HOME

    candidates = [Path(CUDA_HOME) / "bin" / "cuobjdump"] if CUDA_HOME else []
    candidates.append(Path(shutil.which("cuobjdump") or "/nonexistent"))
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump")
    except ImportError:
        pass
    return next((str(c) for c in candidates if c.is_file()), None)


def resource_usage(library: Path) -> list[KernelResources]:
    """Registers, static shared memory and stack of every kernel in a built rung."""
    tool = cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found (CUDA toolkit or Triton package)")
    text = subprocess.run([tool, "--dump-resource-usage", str(library)], check=True,
                          capture_output=True, text=True).stdout
    pattern = re.compile(r"Function (\S+):\s*REG:(\d+) STACK:(\d+) SHARED:(\d+)")
    return [KernelResources(_demangle(m[1]), int(m[2]), int(m[4]), int(m[3]))
            for m in pattern.finditer(text)]


def _demangle(symbol: str) -> str:
    tool = shutil.which("c++filt")
    if tool is None:
        return symbol
    name = subprocess.run([tool, symbol], capture_output=True, text=True).stdout.strip()
    return re.sub(r"flashcore::\(anonymous namespace\)::|\(flashcore::AttnParams\)", "", name)
