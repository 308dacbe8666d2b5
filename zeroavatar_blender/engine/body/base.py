"""One interface over parametric bodies (Anny, SMPL, SMPL-X).

Every stage talks to a body through this: fit (posed vertices, COCO keypoints), texture (UVs,
symmetry), rig (skeleton, skin weights), Blender round trip (bone matrices <-> pose).

Conventions (the Blender frame): metres, Z up, the subject faces -Y, +X is the subject's left.
Skinning always uses the same top-4 normalised weights that the exported avatar carries, so the
engine's posed body and Blender's armature-deformed mesh are the same numbers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

COCO17 = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
    "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)
# COCO index of each keypoint's left/right counterpart.
COCO17_MIRROR = (0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15)


@dataclass
class BodyParams:
    """Parameters of a batch of bodies (torch, batch B).

    pose: (B, J, 3) axis-angle per bone in the model's own local convention (bone 0 unused:
    the global rotation is ``global_orient``); shape: (B, S); global_orient: (B, 3) axis-angle
    about the world origin; transl: (B, 3) world translation added after the rotation.
    """

    pose: torch.Tensor
    shape: torch.Tensor
    global_orient: torch.Tensor
    transl: torch.Tensor

    def detach(self) -> "BodyParams":
        return BodyParams(*(t.detach().clone() for t in (self.pose, self.shape, self.global_orient, self.transl)))

    def to_json(self) -> dict:
        return {k: getattr(self, k).detach().cpu().double().tolist() for k in ("pose", "shape", "global_orient", "transl")}

    @staticmethod
    def from_json(d: dict, dtype: torch.dtype = torch.float32) -> "BodyParams":
        return BodyParams(*(torch.tensor(d[k], dtype=dtype) for k in ("pose", "shape", "global_orient", "transl")))


@dataclass
class BodyOutput:
    """A posed batch of bodies. All world-space (Blender frame)."""

    vertices: torch.Tensor  # (B, V, 3) posed
    rest_vertices: torch.Tensor  # (B, V, 3) canonical rest pose, unposed, untranslated
    bone_rest: torch.Tensor  # (B, J, 4, 4) rest bone matrices, Y along the bone (Blender)
    bone_transforms: torch.Tensor  # (B, J, 4, 4) LBS transforms rest -> posed world
    keypoints: torch.Tensor  # (B, 17, 3) COCO-17 in world space

    @property
    def bone_posed(self) -> torch.Tensor:
        """Posed armature-space bone matrices, what Blender's ``pose_bone.matrix`` holds."""
        return self.bone_transforms @ self.bone_rest


def bone_chains(parents: np.ndarray) -> np.ndarray:
    """Group bones into unbranched chains (a leg from the hip to the ankle, the spine, an arm
    from the clavicle to the wrist): a bone joins its parent's chain when it is that parent's only
    child. (J,) parents -> (J,) chain id (the chain's first bone)."""
    children = np.bincount(parents[parents >= 0], minlength=len(parents))
    chain = np.arange(len(parents))
    for j in range(len(parents)):  # parents come before children in the body models' order
        p = parents[j]
        if p >= 0 and children[p] == 1:
            chain[j] = chain[p]
    return chain


def dominant_bones(skin_idx: np.ndarray, skin_w: np.ndarray) -> np.ndarray:
    """Each vertex's most weighted bone. (V,K) indices, (V,K) weights -> (V,) bone ids."""
    return np.asarray(skin_idx)[np.arange(len(skin_idx)), np.asarray(skin_w).argmax(1)]


def dominant_chains(skin_idx: np.ndarray, skin_w: np.ndarray, parents: np.ndarray) -> np.ndarray:
    """The bone chain (``bone_chains``) of each vertex's most weighted bone: the body part it
    belongs to. (V,K) indices, (V,K) weights, (J,) parents -> (V,) chain ids."""
    return bone_chains(np.asarray(parents, np.int64))[dominant_bones(skin_idx, skin_w)]


def arm_vertices(bone_parents: np.ndarray, bone_heads: np.ndarray, keypoints: np.ndarray,
                 skin_idx: np.ndarray, skin_w: np.ndarray, start: tuple[int, int] = (7, 8)) -> np.ndarray:
    """Which vertices belong to the arms from the COCO keypoints ``start`` on (default the
    elbows: forearms and hands), for any rig: the bones whose heads are nearest those keypoints,
    and all their descendants. (J,) parents, (J,3) posed bone heads, (17,3) keypoints, (V,K)
    skin -> (V,) bool."""
    parents = np.asarray(bone_parents, np.int64)
    heads = np.asarray(bone_heads, np.float64)
    roots = {int(np.argmin(np.linalg.norm(heads - np.asarray(keypoints)[k], axis=1))) for k in start}
    arm = np.zeros(len(parents), bool)
    for j in range(len(parents)):  # parents come before children in the body models' order
        arm[j] = j in roots or (parents[j] >= 0 and arm[parents[j]])
    return arm[dominant_bones(skin_idx, skin_w)]


def skin_top_k(indices: torch.Tensor, weights: torch.Tensor, k: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the k largest influences per vertex and renormalise. (V, N) -> (V, k)."""
    w, order = weights.sort(dim=-1, descending=True)
    idx = indices.gather(1, order[:, :k])
    w = w[:, :k].clamp_min(0)
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
    return idx, w


def linear_blend_skinning(rest_vertices: torch.Tensor, transforms: torch.Tensor,
                          indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """rest_vertices (B,V,3), transforms (B,J,4,4), indices/weights (V,K) -> (B,V,3)."""
    T = transforms[:, indices]  # (B,V,K,4,4)
    blended = (weights[None, :, :, None, None] * T).sum(2)  # (B,V,4,4)
    return (blended[..., :3, :3] @ rest_vertices[..., None])[..., 0] + blended[..., :3, 3]


def rest_height(rest_vertices: torch.Tensor) -> torch.Tensor:
    """Standing height (metres) of bodies in their rest pose: the crown-to-sole extent along Z,
    the frame's up axis. Both Anny's and SMPL's rest poses stand straight with the arms below
    the head. (B,V,3) -> (B,)."""
    z = rest_vertices[..., 2]
    return z.amax(-1) - z.amin(-1)


def rotvec_to_matrix(rotvec: torch.Tensor) -> torch.Tensor:
    """Rodrigues with a safe small-angle branch. (..., 3) -> (..., 3, 3)."""
    theta2 = (rotvec * rotvec).sum(-1, keepdim=True)
    theta = torch.sqrt(theta2 + 1e-16)
    small = theta2 < 1e-8
    a = torch.where(small, 1 - theta2 / 6, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24, (1 - torch.cos(theta)) / theta2.clamp_min(1e-16))
    x, y, z = rotvec.unbind(-1)
    zero = torch.zeros_like(x)
    K = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(*rotvec.shape[:-1], 3, 3)
    eye = torch.eye(3, dtype=rotvec.dtype, device=rotvec.device).expand_as(K)
    return eye + a[..., None] * K + b[..., None] * (K @ K)


def matrix_to_rotvec(R: torch.Tensor) -> torch.Tensor:
    """Inverse of rotvec_to_matrix, robust near 0 and pi (via quaternions). (...,3,3) -> (...,3)."""
    import roma  # anny's own dependency, always installed with the engine

    return roma.rotmat_to_rotvec(R)


def rigid(R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(...,3,3), (...,3) -> (...,4,4)."""
    M = torch.zeros(*R.shape[:-2], 4, 4, dtype=R.dtype, device=R.device)
    M[..., :3, :3] = R
    M[..., :3, 3] = t
    M[..., 3, 3] = 1
    return M


class BodyModel(ABC):
    """What every stage needs from a parametric body. Buffers are numpy or torch on ``device``."""

    id: str  # "anny", "smpl", "smplx"
    faces: np.ndarray  # (F, 3) int64 triangles
    corner_uv: np.ndarray  # (F, 3, 2) float32 UV per face corner (seams kept), v up
    bone_names: list[str]
    bone_parents: np.ndarray  # (J,) int64, -1 for the root
    skin_indices: torch.Tensor  # (V, 4) int64
    skin_weights: torch.Tensor  # (V, 4) normalised
    shape_dim: int
    shape_names: list[str]
    fit_bones: list[int]  # bones the fitter optimises; the others stay at zero
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")

    @property
    def num_vertices(self) -> int:
        return int(self.skin_indices.shape[0])

    @property
    def num_bones(self) -> int:
        return len(self.bone_names)

    @abstractmethod
    def default_shape(self, batch: int = 1) -> torch.Tensor:
        """(B, S) the average body."""

    def zero_params(self, batch: int = 1) -> BodyParams:
        z = lambda *s: torch.zeros(batch, *s, dtype=self.dtype, device=self.device)  # noqa: E731
        return BodyParams(z(self.num_bones, 3), self.default_shape(batch), z(3), z(3))

    @abstractmethod
    def forward(self, params: BodyParams) -> BodyOutput:
        """Pose and shape a batch of bodies."""

    @abstractmethod
    def pose_from_bone_transforms(self, transforms: torch.Tensor, shape: torch.Tensor) -> BodyParams:
        """Inverse of forward for the pose: LBS transforms (B,J,4,4) -> params that reproduce them.
        Used when the user edited the pose in Blender (rotations only; bone lengths come from shape)."""

    @abstractmethod
    def vertex_mirror(self) -> np.ndarray:
        """(V,) index of each vertex's left-right counterpart (x -> -x) on the rest mesh."""

    @abstractmethod
    def bone_mirror(self) -> np.ndarray:
        """(J,) index of each bone's left-right counterpart."""

    def params_from_bone_posed(self, bone_posed: torch.Tensor, shape: torch.Tensor) -> BodyParams:
        """Blender round trip: posed armature-space matrices (B,J,4,4) -> params."""
        params = self.zero_params(shape.shape[0])
        params.shape = shape
        rest = self.forward(params).bone_rest
        transforms = bone_posed @ torch.linalg.inv(rest)
        return self.pose_from_bone_transforms(transforms, shape)
