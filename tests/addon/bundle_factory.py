"""Real avatar bundles for the Blender-side tests, made from a posed Anny body by the engine's own
bundle writer (engine code is used in tests only), so Blender's armature deform is checked
against the engine's skinning on exactly the files the product produces.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from zeroavatar_blender.engine.avatar import build_body_avatar
from zeroavatar_blender.engine.body.base import BodyParams
from zeroavatar_blender.engine.cameras import Camera, intrinsics, look_at


def checker_texture(size: int = 256) -> Image.Image:
    """A coloured checker, so a wrong UV mapping or a missing texture shows up in renders."""
    y, x = np.mgrid[0:size, 0:size]
    cells = ((x // 32) + (y // 32)) % 2
    img = np.zeros((size, size, 3), dtype=np.uint8)
    img[..., 0] = 60 + 180 * (x / size)
    img[..., 1] = 60 + 180 * (y / size)
    img[..., 2] = 200 * cells
    return Image.fromarray(img)


def posed_params(body, seed: int = 0, scale: float = 0.35) -> BodyParams:
    g = torch.Generator().manual_seed(seed)
    params = body.zero_params(1)
    params.pose[:, body.fit_bones] = (torch.rand(1, len(body.fit_bones), 3, generator=g) - 0.5) * 2 * scale
    params.global_orient = torch.tensor([[0.05, -0.1, 0.3]])
    params.transl = torch.tensor([[0.1, -0.05, 0.9]])
    return params


def make_anny_bundle(body, out_dir: Path, subject: str = "test_subject", seed: int = 0,
                     root_name: str | None = None) -> Path:
    """Write a complete bundle with the engine's own AvatarBundle.save and return its folder.
    ``root_name`` renames the root bone (Anny calls it "root"), e.g. to test the Unreal preset."""
    out_dir = Path(out_dir)
    params = posed_params(body, seed)
    W, H = 640, 960
    target = np.array([0.1, -0.05, 0.9])
    K = intrinsics(W, H)
    K[0, 2] += 12.0  # an off-centre principal point exercises the camera shift
    K[1, 2] -= 7.0
    camera = Camera(K, look_at(target + np.array([0.3, -4.0, 0.2]), target), W, H)
    bundle = build_body_avatar(body, params, np.asarray(checker_texture()), camera=camera, subject=subject,
                               quality="test")
    if root_name is not None:
        bundle.bone_names[0] = root_name
    bundle.save(out_dir)
    return out_dir
