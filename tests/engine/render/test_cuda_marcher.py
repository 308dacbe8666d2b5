"""The CUDA ray marcher's availability check: it must say why it cannot run, never raise."""

from __future__ import annotations

import torch

from zeroavatar_blender.engine.render import cuda_marcher


def _fresh(monkeypatch, *, cuda: bool, nvcc: str | None):
    cuda_marcher._status.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(cuda_marcher.shutil, "which", lambda name: nvcc if name == "nvcc" else None)


def test_no_cuda_device(monkeypatch):
    _fresh(monkeypatch, cuda=False, nvcc=None)
    told: list[str] = []
    assert cuda_marcher.cuda_marcher_status(told.append) == (False, "no CUDA device")
    assert told == []  # nothing is compiled, nothing announced
    cuda_marcher._status.cache_clear()


def test_gpu_without_toolkit_names_what_to_install(monkeypatch):
    _fresh(monkeypatch, cuda=True, nvcc=None)
    usable, reason = cuda_marcher.cuda_marcher_status()
    assert not usable
    assert "nvcc" in reason and "CUDA toolkit" in reason
    cuda_marcher._status.cache_clear()


def test_failed_build_is_a_reason_not_a_crash(monkeypatch):
    """A toolkit nerfacc cannot build with: the compiler's error becomes the reason."""
    import builtins

    _fresh(monkeypatch, cuda=True, nvcc="/usr/local/cuda/bin/nvcc")
    monkeypatch.setattr(cuda_marcher, "_built_before", lambda: False)
    real_import = builtins.__import__

    def failing_import(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "nerfacc" and fromlist and "csrc" in fromlist:
            raise ImportError("no prebuilt kernels")
        if name == "nerfacc.cuda._backend":
            raise RuntimeError("Error building extension 'nerfacc_cuda'\nninja: build stopped")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", failing_import)
    told: list[str] = []
    usable, reason = cuda_marcher.cuda_marcher_status(told.append)
    assert not usable
    assert "failed to compile" in reason and "Error building extension 'nerfacc_cuda'" in reason
    assert told == [cuda_marcher.BUILD_MESSAGE]  # the user heard a build was starting
    cuda_marcher._status.cache_clear()
