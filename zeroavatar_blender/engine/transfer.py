"""Uploads to the GPU that do not make the host wait for it.

A plain ``tensor.to("cuda")`` from ordinary (pageable) memory copies and then synchronises the
stream: the host waits until every kernel queued before it has run. A training step makes a
dozen small uploads (random draws taken on the CPU generator so that every device draws the same
pixels and views, camera matrices, timesteps, noise), each of which stopped the host from running
ahead of the GPU. From pinned memory the copy is queued like a kernel instead; the values are the
same.
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``tensor.to(device, dtype)``, queued without a host wait when it is a CPU -> CUDA copy."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device, dtype) if dtype is not None else tensor.to(device)
    if dtype is not None:
        tensor = tensor.to(dtype)
    return tensor.pin_memory().to(device, non_blocking=True)
