"""SMPL / SMPL-X (MPI) from the user's own model file, under its licence; never shipped.

The file is read safely (``convert.read_model_arrays``: .npz without pickle, .pkl through the
restricted unpickler), then smplx's own SMPL / SMPLX classes build the buffers and smplx's
``lbs`` functions do the body maths.

Conventions behind ``BodyModel`` (see base.py):
- Frame: SMPL is Y up, facing +Z, +X the subject's left. World (Blender) = ``SMPL_TO_WORLD`` @ smpl,
  i.e. (x, y, z) -> (x, -z, y), a +90 degree turn about X.
- Pose: per-joint axis-angle in SMPL's own frame and convention (smplx's ``body_pose``: a joint's
  rotation composes along the chain in the rest frame); ``pose[:, 0]`` is unused: the root is
  ``global_orient``, a world rotation about the world origin (as Anny), then ``transl``.
- Pose-corrective blend shapes (``posedirs``) are OFF: a game-engine skinned mesh cannot carry
  them, so the posed body here equals Blender's armature deformation. Shape blend shapes (betas)
  make the rest mesh. Expressions (SMPL-X) stay at zero.
- Shape: betas, a standard-normal prior (``shape_prior = "gaussian"``, default zeros, no bounds),
  unlike Anny's bounded [0, 1] phenotypes.
- Skinning: top-4 normalised weights, as everywhere.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import BadInputError, MissingModelError
from .anny_body import mirror_by_name
from .base import (
    BodyModel, BodyOutput, BodyParams, linear_blend_skinning, matrix_to_rotvec, rigid,
    rotvec_to_matrix, skin_top_k,
)
from .convert import MODEL_URLS, REQUIRED_KEYS, missing_keys, read_model_arrays

SMPL_TO_WORLD = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
_LABEL = {"smpl": "SMPL", "smplx": "SMPL-X"}
_NUM_JOINTS = {"smpl": 24, "smplx": 55}
# Vertex count of the official meshes, for which smplx's vertex ids of the face keypoints hold.
_OFFICIAL_VERTICES = {"smpl": 6890, "smplx": 10475}
_FILE_STEMS = {
    "smpl": ("SMPL_NEUTRAL", "SMPL_MALE", "SMPL_FEMALE", "basicmodel_neutral_lbs_10_207_0_v1.1.0",
             "basicmodel_m_lbs_10_207_0_v1.1.0", "basicmodel_f_lbs_10_207_0_v1.1.0",
             "basicModel_m_lbs_10_207_0_v1.0.0", "basicModel_f_lbs_10_207_0_v1.0.0"),
    "smplx": ("SMPLX_NEUTRAL", "SMPLX_MALE", "SMPLX_FEMALE"),
}
# COCO-17 from SMPL joints (by name) and face vertices (smplx.vertex_ids keys).
_COCO_FACE = ("nose", "leye", "reye", "lear", "rear")
_COCO_JOINTS = ("left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
                "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle")
# A standing pose with the arms down (SMPL's rest is a T-pose): shoulders turned about SMPL's Z.
_NATURAL = {"left_shoulder": (0.0, 0.0, -1.2), "right_shoulder": (0.0, 0.0, 1.2)}


def smpl_joint_names(name: str) -> list[str]:
    from smplx.joint_names import JOINT_NAMES

    return list(JOINT_NAMES[:22]) + ["left_hand", "right_hand"] if name == "smpl" else list(JOINT_NAMES[:55])


# -- finding and loading the file ---------------------------------------------------------------
def _missing(name: str, problem: str) -> MissingModelError:
    label = _LABEL[name]
    stem = _FILE_STEMS[name][0]
    return MissingModelError(
        problem,
        f"download {label} from {MODEL_URLS[name]} (free registration, under its licence; ZeroAvatar never "
        f"ships it), then give the file or its folder ({stem}.npz or .pkl; MALE/FEMALE also work) with "
        "--body-model-path or in the add-on preferences")


def resolve_model_file(name: str, model_path: str | Path | None) -> Path:
    """The model file for ``name`` from a file or a folder (also its ``smpl``/``smplx`` subfolder,
    smplx.create's layout). Neutral first, .npz before .pkl."""
    label = _LABEL[name]
    if model_path is None or str(model_path).strip() == "":
        raise _missing(name, f"the {label} body needs your own {label} model file, and none was given")
    path = Path(model_path).expanduser()
    if path.is_dir():
        for folder in (path, path / name):
            for stem in _FILE_STEMS[name]:
                for ext in (".npz", ".pkl"):
                    if (folder / f"{stem}{ext}").is_file():
                        return folder / f"{stem}{ext}"
        raise _missing(name, f"no {label} model file in {path} (looked for {_FILE_STEMS[name][0]}.npz/.pkl "
                             f"and the MALE/FEMALE files, also in its '{name}' subfolder)")
    if not path.is_file():
        raise _missing(name, f"{label} model file not found: {path}")
    return path


_MODEL_CACHE: dict[tuple, "SMPLBody"] = {}


def load_smpl(name: str, model_path: str | Path | None, *, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32, allow_pickle: bool = False, num_betas: int = 10) -> "SMPLBody":
    """An SMPL ("smpl") or SMPL-X ("smplx") body from the user's model file or folder.

    .pkl files are read with the restricted unpickler (safe); ``allow_pickle`` only lets a file it
    refuses fall back to Python's full unpickler (a file the user made and trusts)."""
    if name not in _LABEL:
        raise ValueError(f"unknown SMPL-family model {name!r}; choose 'smpl' or 'smplx'")
    path = resolve_model_file(name, model_path)
    stat = path.stat()
    key = (name, str(path.resolve()), stat.st_mtime_ns, stat.st_size, str(device), dtype, allow_pickle, num_betas)
    if key not in _MODEL_CACHE:
        arrays, _ = read_model_arrays(path, allow_pickle=allow_pickle)
        _MODEL_CACHE[key] = SMPLBody(name, arrays, source=path, device=device, dtype=dtype, num_betas=num_betas)
    return _MODEL_CACHE[key]


def check_model_arrays(name: str, arrays: dict[str, np.ndarray], source: Path | str) -> None:
    """Clear errors for a wrong or damaged file before smplx meets it."""
    label = _LABEL[name]
    missing = missing_keys(arrays, name)
    if missing:
        raise BadInputError(f"{source} is not an {label} model file: it has no {', '.join(missing)}",
                            f"use the {label} model from {MODEL_URLS[name]} (SMPL and SMPL-X files differ)")
    v, f, w = arrays["v_template"], arrays["f"], arrays["weights"]
    jreg, kin, sd = arrays["J_regressor"], arrays["kintree_table"], arrays["shapedirs"]
    V = v.shape[0] if v.ndim == 2 else -1
    J = _NUM_JOINTS[name]
    problems = []
    if v.ndim != 2 or v.shape[1] != 3:
        problems.append(f"v_template has shape {v.shape}, expected (V, 3)")
    if w.shape != (V, J):
        problems.append(f"weights has shape {w.shape}, expected ({V}, {J}) for {label}'s {J} joints")
    if jreg.shape != (J, V):
        problems.append(f"J_regressor has shape {jreg.shape}, expected ({J}, {V})")
    if kin.shape != (2, J):
        problems.append(f"kintree_table has shape {kin.shape}, expected (2, {J})")
    elif not all(0 <= kin[0, j] < j for j in range(1, J)):
        problems.append("kintree_table does not list each joint after its parent")
    if sd.ndim != 3 or sd.shape[:2] != (V, 3):
        problems.append(f"shapedirs has shape {sd.shape}, expected ({V}, 3, K)")
    if f.ndim != 2 or f.shape[1] != 3 or (f.size and (f.min() < 0 or f.max() >= V)):
        problems.append("faces 'f' are not (F, 3) indices into the vertices")
    if problems:
        raise BadInputError(f"{source} does not look like an {label} model: {'; '.join(problems)}",
                            f"use the {label} model file from {MODEL_URLS[name]}")


def build_smplx_module(name: str, arrays: dict[str, np.ndarray], dtype: torch.dtype, num_betas: int) -> torch.nn.Module:
    """smplx's own model class, fed from arrays we already read safely. SMPL takes them directly
    (``data_struct``); SMPLX only reads files, so it gets a temporary .npz that holds plain arrays
    alone (smplx opens .npz with allow_pickle=True; ours contains no pickles)."""
    import smplx
    from smplx.utils import Struct

    quiet = contextlib.redirect_stdout(io.StringIO())  # smplx prints a warning for 10-beta files
    if name == "smpl":
        with quiet:
            return smplx.SMPL(model_path="", data_struct=Struct(**arrays), num_betas=num_betas, dtype=dtype)
    needed = {k: v for k, v in arrays.items() if k in REQUIRED_KEYS["smplx"]}
    with tempfile.TemporaryDirectory(prefix="zeroavatar_smplx_") as tmp:
        file = Path(tmp) / "SMPLX_NEUTRAL.npz"
        with open(file, "wb") as f:
            np.savez(f, **needed)
        with quiet:
            return smplx.SMPLX(str(file), ext="npz", num_betas=num_betas, use_pca=False, flat_hand_mean=True,
                               dtype=dtype)


# -- pure helpers (shapes in docstrings) ------------------------------------------------------
def bone_tails(names: list[str], parents: np.ndarray) -> np.ndarray:
    """The child joint each bone's Y axis points at, -1 to continue its parent's direction.
    The main child: the central one (spine over hips, neck over collars), the middle finger for
    a wrist; the head points up (along the neck), not at the jaw or eyes. -> (J,) int64."""
    out = np.full(len(names), -1, dtype=np.int64)
    for j, name in enumerate(names):
        children = [c for c in range(len(names)) if parents[c] == j]
        if not children or name == "head":
            continue
        central = [c for c in children if not names[c].startswith(("left_", "right_"))]
        middle = [c for c in children if "middle" in names[c]]
        out[j] = (central or middle or children)[0]
    return out


def bone_frames(joints: torch.Tensor, parents: torch.Tensor, tails: torch.Tensor) -> torch.Tensor:
    """Rest bone matrices with Y along the bone (Blender), X = Y x up (or Y x forward for bones
    that point up or down), Z = X x Y. joints (B,J,3) world -> (B,J,4,4)."""
    has_tail = (tails >= 0)[None, :, None]
    to_tail = joints[:, tails.clamp_min(0)] - joints
    from_parent = joints - joints[:, parents.clamp_min(0)]
    y = torch.where(has_tail, to_tail, from_parent)
    y = y / y.norm(dim=-1, keepdim=True).clamp_min(1e-9)
    up = y.new_tensor([0.0, 0.0, 1.0]).expand_as(y)
    forward = y.new_tensor([0.0, -1.0, 0.0]).expand_as(y)
    ref = torch.where(y[..., 2:3].abs() > 0.9, forward, up)
    x = torch.linalg.cross(y, ref)
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-9)
    z = torch.linalg.cross(x, y)
    return rigid(torch.stack([x, y, z], -1), joints)


def face_keypoint_vertices(vertices: np.ndarray, dominant_bone: np.ndarray, head_bones: list[int]) -> np.ndarray:
    """Nose, eyes and ears picked on the head for a mesh that is not the official topology (custom
    or synthetic models): the nose is the most forward central head vertex, the eyes and ears the
    head vertices nearest to points placed from the head's width. vertices (V,3) world rest ->
    (5,) ids in _COCO_FACE order."""
    idx = np.flatnonzero(np.isin(dominant_bone, head_bones))
    if idx.size < 5:
        raise BadInputError("the model's head has too few vertices to place face keypoints on",
                            "use the official SMPL / SMPL-X model file")
    head = vertices[idx]
    nose = head[np.argmax(-head[:, 1] - 2.0 * np.abs(head[:, 0]))]
    half_width = 0.5 * (head[:, 0].max() - head[:, 0].min())
    centre = 0.5 * (head.min(0) + head.max(0))
    targets = [nose]
    for side in (1.0, -1.0):  # left (+X) first, as COCO
        targets.append(nose + np.array([0.35 * side * half_width, 0.3 * half_width, 0.35 * half_width]))
    for side in (1.0, -1.0):
        targets.append(np.array([centre[0] + side * half_width, centre[1], nose[2] + 0.3 * half_width]))
    return np.array([idx[np.argmin(((head - t) ** 2).sum(1))] for t in targets], dtype=np.int64)


def cylinder_atlas_uv(vertices: np.ndarray, faces: np.ndarray, face_part: np.ndarray, centres: np.ndarray,
                      axes: np.ndarray, margin: float = 0.01) -> np.ndarray:
    """A simple UV layout for a model without one: each body part (faces grouped by their main
    bone) is unrolled around its bone axis (the seam at the back, the front continuous), scaled
    in metres so texel density is even, and the parts are shelf-packed into the unit square.
    vertices (V,3) world rest, faces (F,3), face_part (F,), centres/axes (J,3) -> (F,3,2) in [0,1]."""
    corner_uv = np.zeros((*faces.shape, 2), dtype=np.float64)
    rects = []  # (part, face ids, local uv (n,3,2), width, height)
    forward, up = np.array([0.0, -1.0, 0.0]), np.array([0.0, 0.0, 1.0])
    for part in np.unique(face_part):
        fids = np.flatnonzero(face_part == part)
        a = axes[part] / max(np.linalg.norm(axes[part]), 1e-9)
        ref = up if abs(a @ forward) > 0.9 else forward
        e1 = ref - (ref @ a) * a
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(a, e1)
        d = vertices[faces[fids]] - centres[part]  # (n,3,3)
        height = d @ a
        radial = d - height[..., None] * a
        r = np.linalg.norm(radial, axis=-1)
        r_mean = max(float(r.mean()), 1e-4)
        u = np.arctan2(radial @ e2, radial @ e1) / (2 * np.pi)  # (-0.5, 0.5], front at 0
        wrap = (u.max(1) - u.min(1)) > 0.5
        u[wrap] += (u[wrap] < 0)
        pole = r < 0.1 * r_mean
        valid = ~pole
        mean_u = (u * valid).sum(1) / np.maximum(valid.sum(1), 1)
        u = np.where(pole & valid.any(1, keepdims=True), mean_u[:, None], u)
        uv = np.stack([u * 2 * np.pi * r_mean, height], -1)
        uv -= uv.reshape(-1, 2).min(0)
        w, h = uv.reshape(-1, 2).max(0)
        rects.append((fids, uv, max(w, 1e-6), max(h, 1e-6)))
    # Shelf packing, tallest first.
    total = sum(w * h for _, _, w, h in rects)
    side = 1.15 * np.sqrt(total)
    pad = 0.02 * np.sqrt(total / max(len(rects), 1))
    x = y = shelf = 0.0
    extent = np.zeros(2)
    for fids, uv, w, h in sorted(rects, key=lambda r: -r[3]):
        if x > 0 and x + w > side:
            x, y, shelf = 0.0, y + shelf + pad, 0.0
        corner_uv[fids] = uv + np.array([x, y])
        extent = np.maximum(extent, [x + w, y + h])
        x += w + pad
        shelf = max(shelf, h)
    return (margin + (1 - 2 * margin) * corner_uv / extent.max()).astype(np.float32)


# -- the body ------------------------------------------------------------------------------
class SMPLBody(BodyModel):
    """SMPL (24 joints) or SMPL-X (55 joints) behind the BodyModel interface."""

    shape_prior = "gaussian"  # betas ~ N(0, I); Anny's phenotypes are bounded to [0, 1] instead
    shape_bounds = None

    def __init__(self, name: str, arrays: dict[str, np.ndarray], *, source: Path | str = "<arrays>",
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, num_betas: int = 10) -> None:
        if name not in _LABEL:
            raise ValueError(f"unknown SMPL-family model {name!r}")
        check_model_arrays(name, arrays, source)
        try:
            module = build_smplx_module(name, arrays, dtype, num_betas)
        except ImportError as exc:  # pragma: no cover - the engine environment always has it
            raise MissingModelError("the 'smplx' package is not installed in the engine's Python",
                                    "run `python build.py setup` or the add-on's Install engine button") from exc
        self.id = name
        self.source = Path(source)
        self.device = torch.device(device)
        self.dtype = dtype
        dev = dict(device=self.device, dtype=dtype)
        # Only what the avatar path uses; posedirs (pose correctives) are left behind on purpose.
        self._v_template = module.v_template.to(**dev)  # (V,3) SMPL frame
        self._shapedirs = module.shapedirs.to(**dev)  # (V,3,S)
        self._J_regressor = module.J_regressor.to(**dev)  # (J,V)
        self._parents = module.parents.to(self.device)  # (J,)
        lbs_weights = module.lbs_weights.to(**dev)  # (V,J)
        del module
        V, J = lbs_weights.shape
        self.shape_dim = int(self._shapedirs.shape[-1])
        self.shape_names = [f"beta{i}" for i in range(self.shape_dim)]
        self.bone_names = smpl_joint_names(name)
        self.bone_parents = self._parents.cpu().numpy().astype(np.int64)
        self.bone_parents[0] = -1
        self.faces = np.asarray(arrays["f"]).astype(np.int64)
        all_bones = torch.arange(J, device=self.device).expand(V, J)
        self.skin_indices, self.skin_weights = skin_top_k(all_bones, lbs_weights)
        self.fit_bones = list(range(1, 24 if name == "smpl" else 22))  # SMPL-X: not jaw, eyes, fingers
        self._C = torch.as_tensor(SMPL_TO_WORLD, **dev)
        self._C4 = rigid(self._C, torch.zeros(3, **dev))
        self.pose_frame = SMPL_TO_WORLD.copy()  # pose rotation vectors are in SMPL axes
        self._tails = torch.as_tensor(bone_tails(self.bone_names, self.bone_parents), device=self.device)

        with torch.no_grad():
            rest_v, rest_j = self._rest_world(torch.zeros(1, self.shape_dim, **dev))
            frames = bone_frames(rest_j, self._parents, self._tails)[0]
        rest_v = rest_v[0].cpu().double().numpy()
        dominant = lbs_weights.argmax(-1).cpu().numpy()
        self._kp_joints = torch.as_tensor([self.bone_names.index(n) for n in _COCO_JOINTS], device=self.device)
        self.keypoint_source = "official vertex ids" if V == _OFFICIAL_VERTICES[name] else "picked on the head"
        if V == _OFFICIAL_VERTICES[name]:
            from smplx.vertex_ids import vertex_ids

            face_ids = np.array([vertex_ids["smplh" if name == "smpl" else "smplx"][k] for k in _COCO_FACE])
        else:
            head = [j for j, n in enumerate(self.bone_names) if n in ("head", "jaw", "left_eye_smplhf", "right_eye_smplhf")]
            face_ids = face_keypoint_vertices(rest_v, dominant, head)
        self._kp_vertices = torch.as_tensor(face_ids, device=self.device)

        vt, ft = arrays.get("vt"), arrays.get("ft")
        if vt is not None and ft is not None and ft.shape == self.faces.shape and vt.ndim == 2 and vt.shape[1] >= 2 \
                and ft.size and 0 <= ft.min() and ft.max() < len(vt):
            self.corner_uv = np.asarray(vt, np.float32)[:, :2][np.asarray(ft, np.int64)]
            self.uv_source = "model file (vt/ft)"
        else:
            face_part = lbs_weights.cpu().numpy()[self.faces].sum(1).argmax(-1)
            frames_np = frames.cpu().double().numpy()
            self.corner_uv = cylinder_atlas_uv(rest_v, self.faces, face_part, frames_np[:, :3, 3], frames_np[:, :3, 1])
            self.uv_source = "generated (per-part cylindrical unwrap)"
        self._vertex_mirror: np.ndarray | None = None

    # -- shape ---------------------------------------------------------------------------
    def default_shape(self, batch: int = 1) -> torch.Tensor:
        return torch.zeros(batch, self.shape_dim, dtype=self.dtype, device=self.device)

    def natural_pose(self) -> np.ndarray:
        """(J,3) standing with the arms down, for limbs the photo does not show (pose_prior)."""
        pose = np.zeros((self.num_bones, 3))
        for n, v in _NATURAL.items():
            pose[self.bone_names.index(n)] = v
        return pose

    # -- forward -------------------------------------------------------------------------
    def _rest_smpl(self, betas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shaped rest vertices and joints in the SMPL frame. (B,S) -> (B,V,3), (B,J,3)."""
        from smplx.lbs import blend_shapes, vertices2joints

        v_shaped = self._v_template + blend_shapes(betas, self._shapedirs)
        return v_shaped, vertices2joints(self._J_regressor, v_shaped)

    def _rest_world(self, betas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v, j = self._rest_smpl(betas)
        return v @ self._C.T, j @ self._C.T

    def forward(self, params: BodyParams) -> BodyOutput:
        from smplx.lbs import batch_rigid_transform

        pose = params.pose
        B = pose.shape[0]
        v_shaped, joints = self._rest_smpl(params.shape.expand(B, -1))
        R = rotvec_to_matrix(pose)
        R = torch.cat([torch.eye(3, dtype=R.dtype, device=R.device).expand(B, 1, 3, 3), R[:, 1:]], 1)
        _, A = batch_rigid_transform(R, joints, self._parents, dtype=self.dtype)  # (B,J,4,4) SMPL frame
        G = rigid(rotvec_to_matrix(params.global_orient), params.transl)  # (B,4,4) world
        transforms = G[:, None] @ self._C4 @ A @ self._C4.T
        rest_vertices = v_shaped @ self._C.T
        rest_joints = joints @ self._C.T
        vertices = linear_blend_skinning(rest_vertices, transforms, self.skin_indices, self.skin_weights)
        posed_joints = (transforms[..., :3, :3] @ rest_joints[..., None])[..., 0] + transforms[..., :3, 3]
        keypoints = torch.cat([vertices[:, self._kp_vertices], posed_joints[:, self._kp_joints]], 1)
        bone_rest = bone_frames(rest_joints, self._parents, self._tails)
        return BodyOutput(vertices, rest_vertices, bone_rest, transforms, keypoints)

    def pose_from_bone_transforms(self, transforms: torch.Tensor, shape: torch.Tensor) -> BodyParams:
        """Rotations only. The root's local pose is the identity, so its transform is
        G = rigid(global_orient, transl) itself; below it, R_world(j) = R_G C R_chain(j) C^T, so
        SMPL's local rotation R_chain(parent)^T R_chain(j) = C^T R_world(parent)^T R_world(j) C."""
        R = self._C.T @ transforms[..., :3, :3] @ self._C  # (B,J,3,3)
        local = R[:, self._parents.clamp_min(0)].transpose(-1, -2) @ R
        pose = matrix_to_rotvec(local)
        pose[:, 0] = 0
        G = transforms[:, 0]
        return BodyParams(pose, shape.clone(), matrix_to_rotvec(G[:, :3, :3]), G[:, :3, 3].clone())

    # -- symmetry ------------------------------------------------------------------------
    def vertex_mirror(self) -> np.ndarray:
        if self._vertex_mirror is None:
            from scipy.spatial import cKDTree

            with torch.no_grad():
                rest = self._rest_world(self.default_shape())[0][0].cpu().double().numpy()
            _, idx = cKDTree(rest).query(rest * np.array([-1.0, 1.0, 1.0]))
            self._vertex_mirror = idx.astype(np.int64)
        return self._vertex_mirror

    def bone_mirror(self) -> np.ndarray:
        return mirror_by_name(self.bone_names)
