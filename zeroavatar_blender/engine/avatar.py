"""The rigged avatar bundle (result/): what the Blender side turns into an armature and a mesh.

Format (see ``protocol.BUNDLE_ARRAYS``): ``avatar.npz`` (plain arrays, no pickle), ``texture.png``
and ``avatar.json`` (names, camera, provenance, and the size and SHA-256 of the other two files).
The JSON is written last and names the exact files it belongs to, so a half-written or mixed
bundle is rejected on load instead of producing a broken avatar.

Frames. Rest pose: the body's canonical rest (A-pose for Anny) for the fitted shape, moved up so
the feet stand on z = 0. Photo pose (``bone_pose``, ``posed_vertices``): the fitted pose with
its body rotation kept, moved by a pure translation (``meta["pose_frame"]["offset"]``) so the
posed root stands above the rest root and the lowest posed vertex touches z = 0. Photo-world
points map to the posed avatar frame by ``p + offset``; ``meta["camera"]`` is the photo camera
re-expressed in that frame, so a camera placed from it sees the posed avatar as in the photo.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import protocol
from .body.base import BodyModel, BodyParams
from .cameras import Camera
from .errors import BadInputError
from .job import atomic_write_bytes, output_error

NPZ_NAME = "avatar.npz"
JSON_NAME = "avatar.json"
TEXTURE_NAME = "texture.png"
MIN_BONE_LENGTH = 0.01  # metres
ROOT_BONE_LENGTH = 0.1  # a root that moves no vertices and points at no child
WEIGHT_SUM_TOLERANCE = 1e-3
POSED_TOLERANCE_M = 1e-3  # posed_vertices vs LBS of the stored matrices
_RESERVED_JSON_KEYS = ("bones", "texture", "arrays", "files", "counts")


def lbs_numpy(vertices: np.ndarray, matrices: np.ndarray, indices: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Linear blend skinning, as Blender's armature modifier does it (matrices blended, not
    quaternions). vertices (V,3), matrices (J,4,4) rest -> posed, indices/weights (V,K) -> (V,3) float64."""
    M = np.asarray(matrices, dtype=np.float64)[np.asarray(indices, dtype=np.int64)]  # (V,K,4,4)
    blended = (np.asarray(weights, dtype=np.float64)[:, :, None, None] * M).sum(1)
    v = np.asarray(vertices, dtype=np.float64)
    return np.einsum("vij,vj->vi", blended[:, :3, :3], v) + blended[:, :3, 3]


def skin_weights_top4(indices: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Any number of influences (V,N) -> the 4 largest, normalised ((V,4) int32, (V,4) float32).
    Fewer than 4 are padded with bone 0 at weight 0."""
    idx = np.asarray(indices, dtype=np.int64)
    w = np.clip(np.asarray(weights, dtype=np.float64), 0, None)
    if idx.shape != w.shape or idx.ndim != 2:
        raise ValueError(f"skin indices {idx.shape} and weights {w.shape} must be the same (V,N)")
    if idx.shape[1] < 4:
        pad = 4 - idx.shape[1]
        idx = np.concatenate([idx, np.zeros((len(idx), pad), np.int64)], 1)
        w = np.concatenate([w, np.zeros((len(w), pad))], 1)
    order = np.argsort(-w, axis=1, kind="stable")[:, :4]
    idx = np.take_along_axis(idx, order, 1)
    w = np.take_along_axis(w, order, 1)
    total = w.sum(1, keepdims=True)
    if (total <= 0).any():
        raise ValueError(f"{int((total <= 0).sum())} vertices have no skin weight")
    return idx.astype(np.int32), (w / total).astype(np.float32)


def bone_lengths(bone_rest: np.ndarray, parents: np.ndarray, vertices: np.ndarray, skin_indices: np.ndarray,
                 skin_weights: np.ndarray) -> np.ndarray:
    """A length for each bone's tail in Blender (its Y axis): the reach to the farthest child head
    that lies along the bone; for bones without one (leaves, the head with its off-axis eyes), the
    reach of the vertices it mainly moves; else half the parent's length (10 cm for a root); at
    least 1 cm.
    bone_rest (J,4,4), parents (J,) -> (J,) float32."""
    J = len(parents)
    heads = bone_rest[:, :3, 3]
    axes = bone_rest[:, :3, 1]
    dominant = np.asarray(skin_indices)[np.arange(len(skin_indices)), np.argmax(skin_weights, 1)]
    out = np.zeros(J)
    for j in range(J):  # parents come first (checked by the caller), so out[parent] is ready
        children = np.nonzero(parents == j)[0]
        offsets = heads[children] - heads[j]
        along = offsets @ axes[j]
        aligned = along[(along >= MIN_BONE_LENGTH) & (along >= 0.9 * np.linalg.norm(offsets, axis=1))]
        if len(aligned):
            out[j] = aligned.max()
            continue
        own = vertices[dominant == j]
        reach = np.percentile((own - heads[j]) @ axes[j], 95) if len(own) else 0.0
        if reach >= MIN_BONE_LENGTH:
            out[j] = reach
        elif parents[j] >= 0:
            out[j] = 0.5 * out[parents[j]]
        else:
            out[j] = ROOT_BONE_LENGTH
    return np.maximum(out, MIN_BONE_LENGTH).astype(np.float32)


def _translation(offset: np.ndarray) -> np.ndarray:
    M = np.eye(4)
    M[:3, 3] = offset
    return M


@dataclass
class AvatarBundle:
    """A rigged, textured avatar. Arrays as in ``protocol.BUNDLE_ARRAYS`` (Blender frame, metres)."""

    vertices: np.ndarray  # (V,3) float32 rest pose, feet on z = 0
    faces: np.ndarray  # (F,3) int32
    corner_uv: np.ndarray  # (F,3,2) float32, v up
    skin_indices: np.ndarray  # (V,4) int32
    skin_weights: np.ndarray  # (V,4) float32, rows sum to 1
    bone_names: list[str]
    bone_parents: np.ndarray  # (J,) int32, -1 for roots, parents before children
    bone_rest: np.ndarray  # (J,4,4) float32 armature-space rest matrices, Y along the bone
    bone_pose: np.ndarray  # (J,4,4) float32 armature-space matrices of the photo's pose
    bone_length: np.ndarray  # (J,) float32 metres
    posed_vertices: np.ndarray  # (V,3) float32 = LBS(vertices, bone_pose @ inv(bone_rest))
    texture: np.ndarray  # (S,S,3) uint8
    meta: dict[str, Any] = field(default_factory=dict)

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "vertices": np.asarray(self.vertices, np.float32), "faces": np.asarray(self.faces, np.int32),
            "corner_uv": np.asarray(self.corner_uv, np.float32),
            "skin_indices": np.asarray(self.skin_indices, np.int32),
            "skin_weights": np.asarray(self.skin_weights, np.float32),
            "bone_rest": np.asarray(self.bone_rest, np.float32), "bone_pose": np.asarray(self.bone_pose, np.float32),
            "bone_parents": np.asarray(self.bone_parents, np.int32),
            "bone_length": np.asarray(self.bone_length, np.float32),
            "posed_vertices": np.asarray(self.posed_vertices, np.float32),
        }

    @property
    def camera(self) -> Camera | None:
        """The photo camera in the posed avatar's frame, when the avatar came from a photo."""
        cam = self.meta.get("camera")
        return Camera.from_json(cam) if cam else None

    def save(self, folder: Path) -> None:
        """Write avatar.npz, texture.png, then avatar.json (which vouches for the other two).
        The old avatar.json goes first, so a crash midway leaves no bundle rather than a mixed one."""
        folder = Path(folder)
        arrays = self.arrays()
        validate_arrays(arrays, list(self.bone_names), np.asarray(self.texture), folder)
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        npz = buf.getvalue()
        png = _encode_png(np.asarray(self.texture))
        doc = {key: value for key, value in self.meta.items() if key not in _RESERVED_JSON_KEYS}
        doc.update({
            "version": protocol.BUNDLE_VERSION,
            "bones": list(self.bone_names),
            "texture": TEXTURE_NAME,
            "arrays": NPZ_NAME,
            "counts": {"vertices": int(len(self.vertices)), "faces": int(len(self.faces)),
                       "bones": int(len(self.bone_names)), "texture_size": int(self.texture.shape[0])},
            "files": {NPZ_NAME: _digest(npz), TEXTURE_NAME: _digest(png)},
        })
        try:
            doc_bytes = json.dumps(doc, indent=1, allow_nan=False).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise ValueError(f"avatar meta is not plain JSON: {exc}") from exc
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / JSON_NAME).unlink(missing_ok=True)
        except OSError as exc:
            raise output_error(folder, exc) from exc
        atomic_write_bytes(folder / NPZ_NAME, npz)
        atomic_write_bytes(folder / TEXTURE_NAME, png)
        atomic_write_bytes(folder / JSON_NAME, doc_bytes)

    @staticmethod
    def load(folder: Path) -> "AvatarBundle":
        """Read and check a bundle; BadInputError names what is wrong with a broken one."""
        folder = Path(folder)
        path = folder / JSON_NAME
        if not path.is_file():
            raise _bad(folder, f"{JSON_NAME} is missing (not a bundle, or its writing was interrupted)")
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _bad(folder, f"{JSON_NAME} is not readable JSON ({exc})") from exc
        if not isinstance(doc, dict):
            raise _bad(folder, f"{JSON_NAME} is not a JSON object")
        version = doc.get("version")
        if not isinstance(version, int) or version > protocol.BUNDLE_VERSION or version < 1:
            raise _bad(folder, f"bundle version {version!r} is not supported (this engine reads up to "
                               f"{protocol.BUNDLE_VERSION})")
        files = doc.get("files")
        if not isinstance(files, dict):
            raise _bad(folder, f"{JSON_NAME} lists no files")
        blobs = {name: _read_checked(folder, name, files.get(name)) for name in (NPZ_NAME, TEXTURE_NAME)}
        try:
            with np.load(io.BytesIO(blobs[NPZ_NAME]), allow_pickle=False) as npz:
                missing = [k for k in protocol.BUNDLE_ARRAYS if k not in npz.files]
                if missing:
                    raise _bad(folder, f"{NPZ_NAME} lacks the arrays {', '.join(missing)}")
                arrays = {k: npz[k] for k in protocol.BUNDLE_ARRAYS}
        except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as exc:
            raise _bad(folder, f"{NPZ_NAME} is not a readable array file ({exc})") from exc
        texture = _decode_png(blobs[TEXTURE_NAME], folder)
        names = doc.get("bones")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise _bad(folder, f"{JSON_NAME} has no list of bone names")
        validate_arrays(arrays, names, texture, folder)
        meta = {k: v for k, v in doc.items() if k not in _RESERVED_JSON_KEYS}
        if meta.get("camera"):
            try:
                cam = Camera.from_json(meta["camera"])
            except (KeyError, TypeError, ValueError) as exc:
                raise _bad(folder, f"the camera in {JSON_NAME} is malformed ({exc})") from exc
            if cam.K.shape != (3, 3) or cam.world_to_cam.shape != (4, 4) or not (
                    np.isfinite(cam.K).all() and np.isfinite(cam.world_to_cam).all()):
                raise _bad(folder, f"the camera in {JSON_NAME} is malformed")
        return AvatarBundle(
            arrays["vertices"], arrays["faces"], arrays["corner_uv"], arrays["skin_indices"], arrays["skin_weights"],
            list(names), arrays["bone_parents"], arrays["bone_rest"], arrays["bone_pose"], arrays["bone_length"],
            arrays["posed_vertices"], texture, meta)


def _bad(folder: Path, problem: str) -> BadInputError:
    return BadInputError(f"the avatar bundle in {folder} is broken: {problem}",
                         "finalise the job again to rebuild it (the fit and checkpoints are kept)")


def _digest(data: bytes) -> dict[str, Any]:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _read_checked(folder: Path, name: str, expected: Any) -> bytes:
    if not isinstance(expected, dict) or "sha256" not in expected:
        raise _bad(folder, f"{JSON_NAME} has no checksum for {name}")
    try:
        data = (folder / name).read_bytes()
    except FileNotFoundError:
        raise _bad(folder, f"{name} is missing") from None
    except OSError as exc:
        raise _bad(folder, f"{name} cannot be read ({exc.strerror})") from exc
    if _digest(data) != {"bytes": expected.get("bytes"), "sha256": expected["sha256"]}:
        raise _bad(folder, f"{name} does not match {JSON_NAME} (truncated, or from another save)")
    return data


def _encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _decode_png(data: bytes, folder: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise _bad(folder, f"{TEXTURE_NAME} is not a readable PNG ({exc})") from exc


def validate_arrays(arrays: dict[str, np.ndarray], bone_names: list[str], texture: np.ndarray, folder: Path) -> None:
    """Shapes, dtypes, finiteness, index ranges, weights, hierarchy, rigid bones and the
    posed_vertices/bone_pose consistency the Blender side relies on."""
    def fail(problem: str) -> BadInputError:
        return _bad(folder, problem)

    V = arrays["vertices"].shape[0] if arrays["vertices"].ndim == 2 else -1
    F_ = arrays["faces"].shape[0] if arrays["faces"].ndim == 2 else -1
    J = len(bone_names)
    expected = {
        "vertices": (V, 3), "faces": (F_, 3), "corner_uv": (F_, 3, 2), "skin_indices": (V, 4),
        "skin_weights": (V, 4), "bone_rest": (J, 4, 4), "bone_pose": (J, 4, 4), "bone_parents": (J,),
        "bone_length": (J,), "posed_vertices": (V, 3),
    }
    for key, shape in expected.items():
        a = arrays[key]
        if a.shape != shape:
            raise fail(f"{key} has shape {a.shape}, expected {shape}")
        integer = key in ("faces", "skin_indices", "bone_parents")
        if integer != np.issubdtype(a.dtype, np.integer) or (not integer and not np.issubdtype(a.dtype, np.floating)):
            raise fail(f"{key} has dtype {a.dtype}")
        if not integer and not np.isfinite(a).all():
            raise fail(f"{key} contains NaN or infinite values")
    if V < 3 or F_ < 1 or J < 1:
        raise fail(f"it is empty ({V} vertices, {F_} faces, {J} bones)")
    if len(set(bone_names)) != J or not all(bone_names):
        raise fail("bone names are empty or repeated")
    faces = arrays["faces"]
    if faces.min() < 0 or faces.max() >= V:
        raise fail("faces index vertices that do not exist")
    idx, w = arrays["skin_indices"], arrays["skin_weights"]
    if idx.min() < 0 or idx.max() >= J:
        raise fail("skin_indices name bones that do not exist")
    if (w < 0).any() or np.abs(w.sum(1) - 1).max() > WEIGHT_SUM_TOLERANCE:
        raise fail("skin_weights are negative or do not sum to 1")
    parents = arrays["bone_parents"]
    if (parents < -1).any() or (parents >= np.arange(J)).any():
        raise fail("bone_parents must name an earlier bone or -1 (a cycle or a forward reference)")
    if (arrays["bone_length"] <= 0).any():
        raise fail("bone_length must be positive")
    for key in ("bone_rest", "bone_pose"):
        M = arrays[key].astype(np.float64)
        R = M[:, :3, :3]
        if (np.abs(M[:, 3] - [0, 0, 0, 1]).max() > 1e-5
                or np.abs(R.transpose(0, 2, 1) @ R - np.eye(3)).max() > 1e-3 or (np.linalg.det(R) <= 0).any()):
            raise fail(f"{key} holds matrices that are not rotations plus translations")
    skinning = arrays["bone_pose"].astype(np.float64) @ np.linalg.inv(arrays["bone_rest"].astype(np.float64))
    posed = lbs_numpy(arrays["vertices"], skinning, idx, w)
    err = float(np.abs(posed - arrays["posed_vertices"]).max())
    if err > POSED_TOLERANCE_M:
        raise fail(f"posed_vertices disagree with bone_pose by {err * 1000:.1f} mm")
    if texture.ndim != 3 or texture.shape[2] != 3 or texture.shape[0] != texture.shape[1] or texture.dtype != np.uint8:
        raise fail(f"the texture must be a square RGB 8-bit image, got {texture.shape} {texture.dtype}")


def build_body_avatar(body: BodyModel, params: BodyParams, texture: np.ndarray, *, camera: Camera | None,
                      subject: str, quality: str = "fast", extra_meta: dict[str, Any] | None = None) -> AvatarBundle:
    """The avatar of a fitted parametric body: its rest mesh and rig, the photo's pose, a texture.

    ``params`` is a batch of one (the fit); ``camera`` is the photo camera in the fit's world (it
    is re-expressed for the posed avatar, see the module docstring); ``texture`` is (S,S,3) uint8
    (or a ``texture.UVTexture``).
    """
    if params.pose.shape[0] != 1:
        raise ValueError(f"build_body_avatar: expected one body, got a batch of {params.pose.shape[0]}")
    with torch.no_grad():
        out = body.forward(params)
    skin_indices, skin_weights = skin_weights_top4(body.skin_indices.cpu().numpy(), body.skin_weights.cpu().numpy())
    return assemble_avatar(body, params, out.rest_vertices[0].double().cpu().numpy(), np.asarray(body.faces),
                           np.asarray(body.corner_uv), skin_indices, skin_weights, texture, camera=camera,
                           subject=subject, quality=quality, extra_meta=extra_meta)


def assemble_avatar(body: BodyModel, params: BodyParams, rest_vertices: np.ndarray, faces: np.ndarray,
                    corner_uv: np.ndarray, skin_indices: np.ndarray, skin_weights: np.ndarray, texture: np.ndarray, *,
                    camera: Camera | None, subject: str, quality: str, extra_meta: dict[str, Any] | None = None) -> AvatarBundle:
    """Any mesh rigged to the fitted body's skeleton: ``rest_vertices`` in the body's rest frame
    (e.g. the optimised surface unposed with transferred weights), skinned by top-4 weights."""
    image = np.asarray(getattr(texture, "image", texture))
    parents = np.asarray(body.bone_parents, dtype=np.int64)
    if (parents >= np.arange(len(parents))).any():
        raise ValueError(f"body {body.id}: bone parents must come before their children")
    with torch.no_grad():
        out = body.forward(params)
    body_rest = out.rest_vertices[0].double().cpu().numpy()
    bone_rest_world = out.bone_rest[0].double().cpu().numpy()
    bone_posed_world = out.bone_posed[0].double().cpu().numpy()
    posed_world = out.vertices[0].double().cpu().numpy()

    lift = np.array([0.0, 0.0, -float(np.asarray(rest_vertices)[:, 2].min())])
    vertices = (np.asarray(rest_vertices, np.float64) + lift).astype(np.float32)
    bone_rest = (_translation(lift) @ bone_rest_world).astype(np.float32)
    offset = posed_frame_offset(bone_rest_world, bone_posed_world, posed_world)
    bone_pose = (_translation(offset) @ bone_posed_world).astype(np.float32)
    skinning = bone_pose.astype(np.float64) @ np.linalg.inv(bone_rest.astype(np.float64))
    posed_vertices = lbs_numpy(vertices, skinning, skin_indices, skin_weights).astype(np.float32)

    meta: dict[str, Any] = {
        "version": protocol.BUNDLE_VERSION,
        "subject": subject,
        "body_model": body.id,
        "quality": quality,
        "camera": None,
        "source_photo": None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "pose_frame": {"rest_lift": lift.tolist(), "offset": offset.tolist(),
                       "note": "posed avatar = photo-world body + offset (body rotation kept)"},
        "body_params": params.to_json(),
    }
    if camera is not None:
        w2c = np.asarray(camera.world_to_cam, dtype=np.float64) @ _translation(-offset)
        meta["camera"] = Camera(np.asarray(camera.K, np.float64), w2c, camera.width, camera.height).to_json()
    meta.update(extra_meta or {})
    return AvatarBundle(
        vertices=vertices, faces=np.asarray(faces, np.int32), corner_uv=np.asarray(corner_uv, np.float32),
        skin_indices=np.asarray(skin_indices, np.int32), skin_weights=np.asarray(skin_weights, np.float32),
        bone_names=list(body.bone_names),
        bone_parents=parents.astype(np.int32), bone_rest=bone_rest, bone_pose=bone_pose,
        bone_length=bone_lengths(bone_rest.astype(np.float64), parents, vertices.astype(np.float64),
                                 np.asarray(skin_indices), np.asarray(skin_weights)),
        posed_vertices=posed_vertices, texture=np.ascontiguousarray(image, dtype=np.uint8), meta=meta)


def posed_frame_offset(bone_rest_world: np.ndarray, bone_posed_world: np.ndarray, posed_world: np.ndarray) -> np.ndarray:
    """The translation from the photo's world to the posed avatar frame: the posed root above
    the rest root, the lowest posed vertex on z = 0. (J,4,4), (J,4,4), (V,3) -> (3,)."""
    offset = np.zeros(3)
    offset[:2] = bone_rest_world[0, :2, 3] - bone_posed_world[0, :2, 3]
    offset[2] = -float(np.asarray(posed_world)[:, 2].min())
    return offset


def body_frame_offset(body: BodyModel, params: BodyParams) -> np.ndarray:
    """``posed_frame_offset`` for a fitted body (what a bundle built from it records)."""
    with torch.no_grad():
        out = body.forward(params)
    return posed_frame_offset(out.bone_rest[0].double().cpu().numpy(), out.bone_posed[0].double().cpu().numpy(),
                              out.vertices[0].double().cpu().numpy())


def write_posed_ply(bundle_or_vertices: AvatarBundle | np.ndarray | torch.Tensor, faces: np.ndarray | None = None,
                    camera: Camera | None = None, path: Path | None = None) -> None:
    """The posed mesh in the photo camera's OpenCV frame (metres), as binary PLY, for tools that
    compare against the photo. From a bundle: its posed vertices with its own ``meta["camera"]``;
    from photo-world vertices (V,3): with the photo camera of the fit."""
    from trimesh.exchange.ply import export_ply
    import trimesh

    if path is None:
        raise ValueError("write_posed_ply: a path is needed")
    if isinstance(bundle_or_vertices, AvatarBundle):
        vertices = bundle_or_vertices.posed_vertices
        faces = bundle_or_vertices.faces if faces is None else faces
        camera = bundle_or_vertices.camera if camera is None else camera
    else:
        vertices = bundle_or_vertices.detach().cpu().numpy() if isinstance(bundle_or_vertices, torch.Tensor) \
            else np.asarray(bundle_or_vertices)
    if faces is None or camera is None:
        raise ValueError("write_posed_ply: faces and a camera are needed (the bundle has no photo camera)")
    cam_points = camera.to_cam(np.asarray(vertices, dtype=np.float64))
    mesh = trimesh.Trimesh(cam_points, np.asarray(faces, dtype=np.int64), process=False)
    atomic_write_bytes(Path(path), export_ply(mesh, encoding="binary"))
