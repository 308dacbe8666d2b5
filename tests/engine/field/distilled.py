"""One posed Anny body and a small field distilled from it, built once per test session.

Shared by the body-prior tests (occupancy IoU) and the extraction tests (Chamfer), so the
distillation (about 10 s on 2 cores) runs once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from zeroavatar_blender.engine.field import (
    BodyPrior, BodyPriorConfig, DistillConfig, DistillReport, HashGridConfig, NeRFField, NeRFFieldConfig,
    body_aabb, distill_body_prior, sample_surface,
)

# A small field: enough for a body at ~1 cm, cheap to train on a CPU.
SMALL_FIELD = NeRFFieldConfig(
    encoding=HashGridConfig(n_levels=8, n_features_per_level=2, log2_hashmap_size=15, base_resolution=16,
                            max_resolution=256),
    hidden_dim=32, color_hidden_dim=32,
)
SMALL_DISTILL = DistillConfig(steps=200, batch_size=4096, lr=2e-2)


@dataclass
class Distilled:
    vertices: np.ndarray  # (V, 3) posed body, float64
    faces: np.ndarray  # (F, 3)
    prior: BodyPrior
    field: NeRFField
    report: DistillReport


def posed_params(body, seed: int = 3, scale: float = 0.35):
    """A fixed, clearly non-rest pose (limbs and spine moved) with a small global turn."""
    g = torch.Generator().manual_seed(seed)
    params = body.zero_params(1)
    pose = torch.zeros_like(params.pose)
    pose[:, body.fit_bones] = (torch.rand(1, len(body.fit_bones), 3, generator=g) - 0.5) * 2 * scale
    params.pose = pose
    params.global_orient = torch.tensor([[0.0, 0.0, 0.4]])
    params.transl = torch.tensor([[0.1, -0.2, 0.05]])
    return params


@functools.lru_cache(maxsize=1)
def posed_anny() -> tuple[np.ndarray, np.ndarray]:
    from zeroavatar_blender.engine.body import load_body

    body = load_body("anny")
    with torch.no_grad():
        out = body.forward(posed_params(body))
    return out.vertices[0].double().numpy(), np.asarray(body.faces)


@functools.lru_cache(maxsize=1)
def distilled_anny() -> Distilled:
    vertices, faces = posed_anny()
    torch.manual_seed(0)
    prior = BodyPrior.from_mesh(vertices, faces, BodyPriorConfig(grid_resolution=128))
    field = NeRFField(body_aabb(vertices, padding=0.1), SMALL_FIELD)
    surface = sample_surface(vertices, faces, 100_000, np.random.default_rng(0))
    report = distill_body_prior(field, prior, surface, SMALL_DISTILL)
    field.eval()
    return Distilled(vertices, faces, prior, field, report)
