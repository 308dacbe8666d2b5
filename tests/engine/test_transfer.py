"""Uploads without a host wait: same values, same dtype, on every path."""

from __future__ import annotations

import pytest
import torch

from zeroavatar_blender.engine.transfer import to_device


def test_cpu_targets_are_plain_conversions():
    t = torch.arange(6, dtype=torch.int64)
    assert to_device(t, "cpu") is t  # nothing to copy
    f = to_device(t, torch.device("cpu"), torch.float32)
    assert f.dtype == torch.float32 and torch.equal(f, t.float())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_uploads_are_queued_and_equal():
    g = torch.Generator().manual_seed(0)
    values = [torch.rand(4096, 3, generator=g) for _ in range(8)]
    on_gpu = [to_device(v, "cuda") for v in values]  # queued one after another, no host wait between
    for v, d in zip(values, on_gpu):
        assert d.device.type == "cuda" and torch.equal(d.cpu(), v)
    half = to_device(values[0], "cuda", torch.float16)
    assert half.dtype == torch.float16 and torch.equal(half.cpu(), values[0].half())
    assert to_device(on_gpu[0], "cuda") is on_gpu[0]
