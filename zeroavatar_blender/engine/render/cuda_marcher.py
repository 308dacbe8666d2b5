"""Whether nerfacc's CUDA ray marcher can run here, and why not when it cannot.

nerfacc ships its CUDA kernels as source and compiles them on first use with the CUDA toolkit's
``nvcc``. Most artists' machines have a GPU driver but no toolkit, and a compile can fail on a
toolkit nerfacc was not written for. Neither may stop a run: the volume renderer then takes the
dense sampler on the GPU (the same pure-torch path as on the CPU, slower per step) and the reason
is told to the user once.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from functools import lru_cache

import torch

BUILD_MESSAGE = ("Compiling nerfacc's CUDA ray marcher with nvcc (first use only: a few minutes; "
                 "later runs load it from the torch extensions cache)")


def _built_before() -> bool:
    """True when torch's extension cache already holds a nerfacc build (loading it is quick)."""
    from torch.utils.cpp_extension import _get_build_directory

    try:
        folder = _get_build_directory("nerfacc_cuda", verbose=False)
    except OSError:
        return False
    return os.path.isdir(folder) and bool(os.listdir(folder))


def _packaged_kernels() -> bool:
    """A nerfacc wheel built with its kernels: nothing to compile."""
    try:
        from nerfacc import csrc  # noqa: F401
    except ImportError:
        return False
    return True


def _no_nvcc() -> str:
    return ("nerfacc's CUDA ray marcher needs the CUDA toolkit's nvcc to compile on first use, and none is on "
            f"PATH (GPU runs use the slower dense sampler); install the CUDA toolkit matching your PyTorch build "
            f"(CUDA {torch.version.cuda}) for faster GPU runs")


@lru_cache(maxsize=1)
def _status() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    if _packaged_kernels():
        return True, ""
    if shutil.which("nvcc") is None:
        return False, _no_nvcc()
    try:
        from nerfacc.cuda._backend import _C
    except Exception as exc:  # a compiler error: the toolkit is there but cannot build nerfacc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return False, f"nerfacc's CUDA ray marcher failed to compile ({first[:300]})"
    if _C is None:
        return False, "nerfacc found no CUDA toolkit to compile its ray marcher"
    return True, ""


def cuda_marcher_status(on_message: Callable[[str], None] | None = None) -> tuple[bool, str]:
    """(usable, reason when not). Compiles the extension on the first call in a fresh cache,
    announcing it through ``on_message`` first so a long first step is not a silent hang."""
    if _status.cache_info().currsize == 0 and on_message is not None and torch.cuda.is_available() \
            and shutil.which("nvcc") is not None and not _built_before():
        on_message(BUILD_MESSAGE)
    return _status()


def cuda_marcher_readiness() -> tuple[str, str]:
    """Without compiling: ("ready" | "will compile" | "unavailable" | "not needed", detail), for
    ``check``. "will compile": the first GPU run spends about a minute on it unless it is built
    ahead (``check --prepare``)."""
    if not torch.cuda.is_available():
        return "not needed", "no CUDA device: CPU runs use the dense sampler"
    if _status.cache_info().currsize:
        usable, reason = _status()
        return ("ready", "built") if usable else ("unavailable", reason)
    if _packaged_kernels():
        return "ready", "nerfacc wheel with its CUDA kernels"
    if shutil.which("nvcc") is None:
        return "unavailable", _no_nvcc()
    if _built_before():
        return "ready", "built before (torch extensions cache)"
    return "will compile", "not built yet: the first GPU run compiles it (about a minute)"
