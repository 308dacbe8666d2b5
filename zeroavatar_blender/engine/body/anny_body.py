"""Anny (NAVER, Apache-2.0 code, CC0 MakeHuman assets): the default body, free and offline.

Anny's own forward gives bone poses; we skin with the top-4 weights ourselves (see base.py) so
the exported avatar deforms identically in Blender. Pose convention: Anny's ``local-ref`` (each
bone's delta rotates it about its own joint in world-aligned axes carried by its parent).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import MissingModelError
from .base import (
    BodyModel, BodyOutput, BodyParams, linear_blend_skinning, matrix_to_rotvec, rigid,
    rotvec_to_matrix, skin_top_k,
)

# Bones the fitter moves. Fingers, toes, eyes keep their rest articulation.
_FIT_BONES = (
    "pelvis.L", "pelvis.R", "upperleg01.L", "upperleg01.R", "upperleg02.L", "upperleg02.R",
    "lowerleg01.L", "lowerleg01.R", "lowerleg02.L", "lowerleg02.R", "foot.L", "foot.R",
    "spine05", "spine04", "spine03", "spine02", "spine01", "clavicle.L", "clavicle.R",
    "shoulder01.L", "shoulder01.R", "upperarm01.L", "upperarm01.R", "upperarm02.L", "upperarm02.R",
    "lowerarm01.L", "lowerarm01.R", "lowerarm02.L", "lowerarm02.R", "wrist.L", "wrist.R",
    "neck01", "neck02", "neck03", "head",
)


def anny_cache_dir() -> Path:
    """Where Anny keeps its ~800 MB model cache: ZEROAVATAR_ANNY_CACHE, ANNY_CACHE_DIR, ~/.cache/anny."""
    for var in ("ZEROAVATAR_ANNY_CACHE", "ANNY_CACHE_DIR"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    return Path.home() / ".cache" / "anny"


def anny_cache_ready(cache: Path | None = None) -> bool:
    cache = cache or anny_cache_dir()
    return cache.is_dir() and any(p.is_file() and p.stat().st_size > 1 << 20 for p in cache.rglob("*"))


_MODEL_CACHE: dict[tuple, "AnnyBody"] = {}


def load_anny(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              on_message: Callable[[str], None] | None = None) -> "AnnyBody":
    key = (str(device), dtype, str(anny_cache_dir()))
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = AnnyBody(device=device, dtype=dtype, on_message=on_message)
    return _MODEL_CACHE[key]


class AnnyBody(BodyModel):
    id = "anny"
    # Hints for the fitter's shape prior: phenotype values live in [0, 1] around 0.5.
    shape_std = 0.5
    shape_bounds = (0.0, 1.0)

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 on_message: Callable[[str], None] | None = None) -> None:
        cache = anny_cache_dir()
        try:
            import anny
            import anny.paths
        except ImportError as exc:  # pragma: no cover - the engine environment always has it
            raise MissingModelError("the 'anny' package is not installed in the engine's Python",
                                    "run `python build.py setup` or the add-on's Install engine button") from exc
        anny.paths.set_anny_cache_path(cache)
        if not anny_cache_ready(cache) and on_message is not None:
            on_message(f"Building the Anny body-model cache in {cache} (first use only: about 90 s "
                       "and 800 MB; set ZEROAVATAR_ANNY_CACHE to put it elsewhere)")
        started = time.time()
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MissingModelError(f"cannot create the Anny cache folder {cache}: {exc.strerror}",
                                    "set ZEROAVATAR_ANNY_CACHE to a writable folder") from exc
        model = anny.Anny(skinning_method="lbs")
        model = model.to(device=device, dtype=dtype)
        self.build_seconds = time.time() - started
        self._model = model
        self.device = torch.device(device)
        self.dtype = dtype
        self.faces = model.faces.cpu().numpy().astype(np.int64)
        uv = model.texture_coordinates.cpu().numpy().astype(np.float32)
        self.corner_uv = uv[model.face_texture_coordinate_indices.cpu().numpy()]
        self.bone_names = list(model.bone_labels)
        self.bone_parents = np.asarray(model.bone_parents, dtype=np.int64)
        self.skin_indices, self.skin_weights = skin_top_k(model.vertex_bone_indices.to(self.device),
                                                          model.vertex_bone_weights.to(self.device, dtype))
        self.shape_names = list(model.phenotype_labels)
        self.shape_dim = len(self.shape_names)
        self.fit_bones = [self.bone_names.index(b) for b in _FIT_BONES]
        kp = anny.KeypointsRegressor.coco(model)
        self._coco_weights = kp.regression_weights[:17].to(self.device, dtype)  # (17, V)
        self._vertex_mirror: np.ndarray | None = None

    # -- shape ---------------------------------------------------------------------------
    def default_shape(self, batch: int = 1) -> torch.Tensor:
        return torch.full((batch, self.shape_dim), 0.5, dtype=self.dtype, device=self.device)

    # -- forward -------------------------------------------------------------------------
    def _anny_forward(self, pose: torch.Tensor, shape: torch.Tensor) -> dict[str, torch.Tensor]:
        B, J = pose.shape[:2]
        R = rotvec_to_matrix(pose)
        R = torch.cat([torch.eye(3, dtype=R.dtype, device=R.device).expand(B, 1, 3, 3), R[:, 1:]], 1)
        deltas = rigid(R, torch.zeros(B, J, 3, dtype=R.dtype, device=R.device))
        # Anny's forward minus its own skinning (we skin with the top-4 weights ourselves): the same
        # calls as anny.Anny.forward / RiggedModelWithLinearBlendShapes.forward in anny 0.6.2.
        m = self._model
        pose, phenotype, local, facial = m.get_tensor_inputs(deltas, shape.clamp(0, 1), None, None)
        out = m.get_rest_model(m._get_phenotype_blendshape_coefficients(phenotype, local, facial))
        _, bone_poses = m.get_bone_transforms(pose, out["rest_bone_poses"])
        out["bone_poses"] = bone_poses
        return out

    def forward(self, params: BodyParams) -> BodyOutput:
        out = self._anny_forward(params.pose, params.shape)
        B = params.pose.shape[0]
        rest_bones = out["rest_bone_poses"].expand(B, -1, -1, -1)
        G = rigid(rotvec_to_matrix(params.global_orient), params.transl)  # (B,4,4)
        transforms = G[:, None] @ out["bone_poses"] @ torch.linalg.inv(rest_bones)
        rest_vertices = out["rest_vertices"].expand(B, -1, -1)
        vertices = linear_blend_skinning(rest_vertices, transforms, self.skin_indices, self.skin_weights)
        keypoints = torch.einsum("kv,bvd->bkd", self._coco_weights, vertices)
        return BodyOutput(vertices, rest_vertices, rest_bones, transforms, keypoints)

    def pose_from_bone_transforms(self, transforms: torch.Tensor, shape: torch.Tensor) -> BodyParams:
        B = transforms.shape[0]
        zero = torch.zeros(B, self.num_bones, 3, dtype=self.dtype, device=self.device)
        rest_out = self._anny_forward(zero, shape)
        rest_bones = rest_out["rest_bone_poses"].expand(B, -1, -1, -1)
        world = transforms @ rest_bones
        # At a zero delta Anny's root pose is the identity, so the root's world matrix is G.
        G = world[:, 0] @ torch.linalg.inv(rest_out["bone_poses"][:, 0]).expand(B, 4, 4)
        anny_poses = torch.linalg.inv(G)[:, None] @ world
        local = self._model.get_pose_parameterization(
            {"rest_bone_poses": rest_bones, "bone_poses": anny_poses}, "local-ref")
        pose = matrix_to_rotvec(local[..., :3, :3])
        pose[:, 0] = 0
        return BodyParams(pose, shape.clone(), matrix_to_rotvec(G[:, :3, :3]), G[:, :3, 3].clone())

    # -- symmetry ------------------------------------------------------------------------
    def vertex_mirror(self) -> np.ndarray:
        if self._vertex_mirror is None:
            from scipy.spatial import cKDTree

            with torch.no_grad():
                rest = self.forward(self.zero_params()).rest_vertices[0].cpu().double().numpy()
            mirrored = rest * np.array([-1.0, 1.0, 1.0])
            _, idx = cKDTree(rest).query(mirrored)
            self._vertex_mirror = idx.astype(np.int64)
        return self._vertex_mirror

    def bone_mirror(self) -> np.ndarray:
        return mirror_by_name(self.bone_names)


def mirror_by_name(names: list[str]) -> np.ndarray:
    """Pair bones by their side marker: '.L'/'.R', 'left_'/'right_', 'L_'/'R_'."""
    pairs = ((".L", ".R"), ("left_", "right_"), ("L_", "R_"), ("_l", "_r"), ("Left", "Right"))
    index = {n: i for i, n in enumerate(names)}
    out = np.arange(len(names))
    for i, n in enumerate(names):
        for a, b in pairs:
            for x, y in ((a, b), (b, a)):
                if x in n:
                    other = n.replace(x, y)
                    if other in index:
                        out[i] = index[other]
    return out
