"""Parametric bodies behind one interface (see base.BodyModel)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .base import COCO17, COCO17_MIRROR, BodyModel, BodyOutput, BodyParams

BODY_CHOICES = ("anny", "smpl", "smplx")


def load_body(name: str = "anny", model_path: str | Path | None = None, *, device: str = "cpu",
              dtype: torch.dtype = torch.float32, on_message: Callable[[str], None] | None = None,
              allow_pickle: bool = False) -> BodyModel:
    """The body model a job asked for. SMPL-family models need the user's own model file."""
    if name == "anny":
        from .anny_body import load_anny

        return load_anny(device=device, dtype=dtype, on_message=on_message)
    if name in ("smpl", "smplx"):
        from .smpl_body import load_smpl

        return load_smpl(name, model_path, device=device, dtype=dtype, allow_pickle=allow_pickle)
    raise ValueError(f"unknown body model {name!r}; choose one of {', '.join(BODY_CHOICES)}")


__all__ = ["BODY_CHOICES", "COCO17", "COCO17_MIRROR", "BodyModel", "BodyOutput", "BodyParams", "load_body"]
