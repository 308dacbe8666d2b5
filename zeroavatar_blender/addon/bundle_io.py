"""Read and check an avatar bundle (result/avatar.json + avatar.npz + texture.png) with numpy only.

The bundle comes from another process (the engine, maybe another machine), so everything is
checked before it reaches bpy: a bad array would otherwise crash or silently corrupt the scene.
Arrays are loaded with ``allow_pickle=False``; the texture is only sniffed (PNG header), Blender
itself decodes it.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import protocol

MAX_BONE_NAME_BYTES = 63  # Blender's bone / vertex-group name limit
MIN_BONE_LENGTH = 1e-3  # Blender deletes zero-length edit bones; length does not affect skinning


class BundleError(ValueError):
    """A missing, malformed or inconsistent avatar bundle. The message names the file and the fix."""


@dataclass(frozen=True)
class AvatarBundleData:
    """One avatar bundle, checked. Arrays are float64 / int64 for exact maths on the Blender side."""

    root: Path
    meta: dict[str, Any]
    bone_names: list[str]
    vertices: np.ndarray  # (V,3) rest pose
    faces: np.ndarray  # (F,3)
    corner_uv: np.ndarray  # (F,3,2)
    skin_indices: np.ndarray  # (V,4)
    skin_weights: np.ndarray  # (V,4)
    bone_rest: np.ndarray  # (J,4,4) armature space, Y along the bone
    bone_pose: np.ndarray  # (J,4,4) armature space, the photo's pose
    bone_parents: np.ndarray  # (J,) -1 for roots
    bone_length: np.ndarray  # (J,) clamped to MIN_BONE_LENGTH
    posed_vertices: np.ndarray  # (V,3)
    texture_path: Path | None

    @property
    def subject(self) -> str:
        return str(self.meta.get("subject") or "avatar")

    @property
    def camera(self) -> dict[str, Any] | None:
        cam = self.meta.get("camera")
        return cam if isinstance(cam, dict) else None

    @property
    def shape(self) -> list[float] | None:
        """The body-shape parameters of the fit (``body_params.shape[0]``, else ``shape``)."""
        params = self.meta.get("body_params")
        shape = params.get("shape") if isinstance(params, dict) else self.meta.get("shape")
        if isinstance(shape, list) and len(shape) == 1 and isinstance(shape[0], list):
            shape = shape[0]
        if isinstance(shape, list) and all(isinstance(s, (int, float)) for s in shape):
            return [float(s) for s in shape]
        return None

    @property
    def num_vertices(self) -> int:
        return int(self.vertices.shape[0])

    @property
    def num_bones(self) -> int:
        return len(self.bone_names)


def find_bundle_json(path: Path) -> Path:
    """Accept the bundle folder, its avatar.json, or a job folder holding result/avatar.json."""
    path = Path(path)
    for candidate in (path, path / "avatar.json", path / "result" / "avatar.json"):
        if candidate.is_file() and candidate.name == "avatar.json":
            return candidate
    raise BundleError(f"no avatar bundle at {path}: expected avatar.json there or in result/ "
                      "(run the engine's `finalise` step to make one)")


def read_bundle(path: Path | str) -> AvatarBundleData:
    """Load and validate a bundle. Raises BundleError with the file and problem named."""
    json_path = find_bundle_json(Path(path)).resolve()
    root = json_path.parent
    meta = _read_json(json_path)
    npz_path = root / _safe_file_name(json_path, meta.get("arrays", "avatar.npz"))
    texture = _texture_path(root, meta)
    _check_digests(root, json_path, meta)
    arrays = _read_npz(npz_path)
    names = meta.get("bones")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise BundleError(f"{json_path}: 'bones' must be a list of bone names")
    checked = validate_arrays(arrays, names, source=str(npz_path))
    return AvatarBundleData(root=root, meta=meta, bone_names=list(names), texture_path=texture, **checked)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"cannot read {path}: {exc}") from exc
    if not isinstance(meta, dict):
        raise BundleError(f"{path}: expected a JSON object")
    version = meta.get("version", protocol.BUNDLE_VERSION)
    if not isinstance(version, int) or version > protocol.BUNDLE_VERSION:
        raise BundleError(f"{path}: bundle version {version!r} is newer than this add-on understands "
                          f"({protocol.BUNDLE_VERSION}); update the add-on")
    return meta


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise BundleError(f"missing {path}: the bundle is incomplete (re-run the engine's `finalise`)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in protocol.BUNDLE_ARRAYS if k not in z.files]
            if missing:
                raise BundleError(f"{path}: missing arrays {missing}")
            return {k: np.asarray(z[k]) for k in protocol.BUNDLE_ARRAYS}
    except BundleError:
        raise
    except Exception as exc:  # zipfile.BadZipFile, ValueError (pickled objects), OSError
        raise BundleError(f"cannot read {path}: {exc}") from exc


def _shape(name: str, a: np.ndarray, shape: tuple[int | None, ...], source: str) -> None:
    if a.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, a.shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise BundleError(f"{source}: '{name}' has shape {a.shape}, expected {want}")


def _float(name: str, a: np.ndarray, source: str) -> np.ndarray:
    if a.dtype.kind not in "fiu":
        raise BundleError(f"{source}: '{name}' has dtype {a.dtype}, expected numbers")
    out = a.astype(np.float64)
    if not np.isfinite(out).all():
        raise BundleError(f"{source}: '{name}' contains NaN or infinite values")
    return out


def _int(name: str, a: np.ndarray, source: str) -> np.ndarray:
    if a.dtype.kind not in "iu":
        raise BundleError(f"{source}: '{name}' has dtype {a.dtype}, expected integers")
    return a.astype(np.int64)


def validate_arrays(arrays: dict[str, np.ndarray], bone_names: list[str],
                    source: str = "avatar.npz") -> dict[str, np.ndarray]:
    """Check shapes, dtypes, ranges and the skeleton's structure; return float64/int64 copies."""
    J = len(bone_names)
    if J == 0:
        raise BundleError(f"{source}: the skeleton has no bones")
    if len(set(bone_names)) != J:
        dup = sorted({n for n in bone_names if bone_names.count(n) > 1})
        raise BundleError(f"{source}: duplicate bone names {dup[:5]}")
    for n in bone_names:
        if not n or len(n.encode("utf-8")) > MAX_BONE_NAME_BYTES:
            raise BundleError(f"{source}: bone name {n!r} is empty or longer than {MAX_BONE_NAME_BYTES} bytes")

    a = {k: arrays[k] for k in protocol.BUNDLE_ARRAYS}
    V = a["vertices"].shape[0] if a["vertices"].ndim == 2 else -1
    F = a["faces"].shape[0] if a["faces"].ndim == 2 else -1
    _shape("vertices", a["vertices"], (None, 3), source)
    _shape("faces", a["faces"], (None, 3), source)
    _shape("corner_uv", a["corner_uv"], (F, 3, 2), source)
    _shape("skin_indices", a["skin_indices"], (V, None), source)
    _shape("skin_weights", a["skin_weights"], a["skin_indices"].shape, source)
    _shape("posed_vertices", a["posed_vertices"], (V, 3), source)
    for k in ("bone_rest", "bone_pose"):
        _shape(k, a[k], (J, 4, 4), source)
    _shape("bone_parents", a["bone_parents"], (J,), source)
    _shape("bone_length", a["bone_length"], (J,), source)
    if V < 3 or F < 1:
        raise BundleError(f"{source}: the mesh is empty ({V} vertices, {F} faces)")

    out = {k: _float(k, a[k], source) for k in
           ("vertices", "corner_uv", "skin_weights", "bone_rest", "bone_pose", "bone_length", "posed_vertices")}
    out.update({k: _int(k, a[k], source) for k in ("faces", "skin_indices", "bone_parents")})

    if out["faces"].min() < 0 or out["faces"].max() >= V:
        raise BundleError(f"{source}: 'faces' index vertices outside 0..{V - 1}")
    w, idx = out["skin_weights"], out["skin_indices"]
    if idx.min() < 0 or idx.max() >= J:
        raise BundleError(f"{source}: 'skin_indices' name bones outside 0..{J - 1}")
    if (w < -1e-6).any():
        raise BundleError(f"{source}: 'skin_weights' has negative weights")
    sums = w.sum(1)
    if np.abs(sums - 1).max() > 1e-3:
        worst = sums[np.argmax(np.abs(sums - 1))]
        raise BundleError(f"{source}: 'skin_weights' rows must sum to 1 (worst {worst:.4f})")
    for k in ("bone_rest", "bone_pose"):
        _check_rigid(k, out[k], source)
    _check_parents(out["bone_parents"], bone_names, source)
    out["bone_length"] = np.maximum(out["bone_length"], MIN_BONE_LENGTH)
    return out


def _check_rigid(name: str, m: np.ndarray, source: str) -> None:
    R = m[:, :3, :3]
    err = np.abs(np.einsum("jki,jkl->jil", R, R) - np.eye(3)).max()
    if err > 1e-3 or (np.linalg.det(R) <= 0).any() or np.abs(m[:, 3] - [0, 0, 0, 1]).max() > 1e-6:
        raise BundleError(f"{source}: '{name}' must hold rigid (rotation + translation) matrices")


def _check_parents(parents: np.ndarray, names: list[str], source: str) -> None:
    J = len(parents)
    if ((parents < -1) | (parents >= J)).any() or (parents == np.arange(J)).any():
        raise BundleError(f"{source}: 'bone_parents' must be -1 or another bone's index")
    if not (parents == -1).any():
        raise BundleError(f"{source}: the skeleton has no root bone (no parent -1)")
    for j in range(J):  # walk up; more than J steps means a cycle
        p, steps = j, 0
        while p != -1:
            p, steps = int(parents[p]), steps + 1
            if steps > J:
                raise BundleError(f"{source}: 'bone_parents' has a cycle through bone {names[j]!r}")


def _safe_file_name(json_path: Path, name: Any) -> str:
    try:
        return protocol.safe_name(name)
    except protocol.ProtocolError as exc:
        raise BundleError(f"{json_path}: {exc}") from exc


def _check_digests(root: Path, json_path: Path, meta: dict[str, Any]) -> None:
    """avatar.json vouches for the other files with sizes and SHA-256 (the engine writes it last);
    a mismatch means a half-written or mixed bundle."""
    files = meta.get("files")
    if files is None:
        return
    if not isinstance(files, dict):
        raise BundleError(f"{json_path}: 'files' must map file names to digests")
    for name, digest in files.items():
        path = root / _safe_file_name(json_path, name)
        if not isinstance(digest, dict) or not isinstance(digest.get("sha256"), str):
            raise BundleError(f"{json_path}: no SHA-256 for {name}")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BundleError(f"missing or unreadable {path}: the bundle is incomplete "
                              "(re-run the engine's `finalise`)") from exc
        if len(data) != digest.get("bytes", len(data)) or hashlib.sha256(data).hexdigest() != digest["sha256"]:
            raise BundleError(f"{path} does not match {json_path.name} (truncated, or from another save); "
                              "re-run the engine's `finalise`")


def _texture_path(root: Path, meta: dict[str, Any]) -> Path | None:
    name = meta.get("texture", "texture.png")
    if name is None:
        return None
    path = root / _safe_file_name(root / "avatar.json", name)
    if not path.is_file():
        raise BundleError(f"missing texture {path}: the bundle is incomplete (re-run the engine's `finalise`)")
    png_size(path)  # raises on a non-PNG
    return path


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; raises BundleError for anything else."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError as exc:
        raise BundleError(f"cannot read texture {path}: {exc}") from exc
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise BundleError(f"texture {path} is not a PNG image")
    width, height = struct.unpack(">II", head[16:24])
    if width == 0 or height == 0:
        raise BundleError(f"texture {path} has zero size")
    return int(width), int(height)
