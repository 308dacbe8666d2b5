"""Finalise an optimised field into the same rigged avatar bundle as the fast path.

High-resolution marching cubes -> clean-up (largest component, small holes, Taubin smoothing,
decimation) -> skin weights from the fitted body -> unposed to the body's rest pose -> UV unwrap
-> texture baked from the field's colour at the posed surface.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import torch

from .job import Job


def load_field(ckpt: dict[str, Any], device: str = "cpu"):
    from .field.encoding import HashGridConfig
    from .field.nerf import NeRFField, NeRFFieldConfig

    cfg = json.loads(ckpt["config"])
    enc = HashGridConfig(n_levels=cfg["n_levels"], log2_hashmap_size=cfg["log2_hashmap_size"],
                         max_resolution=cfg["max_resolution"])
    field = NeRFField(ckpt["aabb"], NeRFFieldConfig(encoding=enc), device=device)
    field.load_state_dict({k: v.to(device) for k, v in ckpt["field"].items()})
    field.eval()
    return field, cfg


def build_field_avatar(job: Job, settings, body, params, fit, ckpt: dict[str, Any]):
    """-> (AvatarBundle, posed world vertices (V,3))."""
    from .avatar import assemble_avatar
    from .extract import CleanupConfig, clean_mesh, extract_mesh
    from .mesh_rig import bake_texture, transfer_skin_weights, unpose, unwrap_uv
    from .pipeline import resolve_device

    device = resolve_device(settings.device)
    field, cfg = load_field(ckpt, device)
    gpu = device == "cuda"
    started = time.time()
    job.stage("finalise", "Extracting the surface (marching cubes)")
    with torch.no_grad():
        mesh = extract_mesh(field, resolution=320 if gpu else 192, with_colors=False)
    if mesh.num_vertices == 0:
        from .errors import EngineError

        raise EngineError("the optimised field is empty (no surface)", "optimise again with another --seed or use --quality fast")
    job.check_cancel()
    target_faces = int(settings.extra.get("target_faces", 40_000))
    mesh = clean_mesh(mesh, CleanupConfig(target_faces=target_faces))
    posed_v, faces = mesh.vertices.astype(np.float64), mesh.faces.astype(np.int64)
    job.info(f"Surface: {len(posed_v)} vertices, {len(faces)} faces ({time.time() - started:.1f} s)")

    job.stage("finalise", "Rigging: skin weights from the body, rest pose")
    with torch.no_grad():
        out = body.forward(params)
    body_v = out.vertices[0].double().cpu().numpy()
    transforms = out.bone_transforms[0].double().cpu().numpy()
    idx, w = transfer_skin_weights(posed_v, faces, body_v, np.asarray(body.faces), body.skin_indices.cpu().numpy(),
                                   body.skin_weights.cpu().numpy(), body.num_bones)
    rest_v = unpose(posed_v, idx, w.astype(np.float64), transforms)
    job.check_cancel()

    job.stage("finalise", "Unwrapping UVs and baking the texture from the field")
    vmap, new_faces, uv = unwrap_uv(rest_v, faces)
    posed_v2, rest_v2 = posed_v[vmap], rest_v[vmap]
    idx2, w2 = idx[vmap], w[vmap]
    corner_uv = uv[new_faces]

    def colour(points: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return field(torch.as_tensor(points, dtype=torch.float32, device=device)).rgb.float().cpu().numpy()

    texture = bake_texture(posed_v2, new_faces, corner_uv, colour, size=settings.texture_size)
    bundle = assemble_avatar(body, params, rest_v2, new_faces, corner_uv, idx2, w2, texture, camera=fit.camera,
                             subject=settings.subject, quality=settings.quality,
                             extra_meta={"source_photo": settings.source_photo, "optimised_steps": int(ckpt["step"]),
                                         "field_config": cfg})
    job.info(f"Avatar mesh ready in {time.time() - started:.1f} s")
    return bundle, posed_v2
