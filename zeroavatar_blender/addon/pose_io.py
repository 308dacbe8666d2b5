"""Read the user's pose (and the body shape) off an avatar armature as plain arrays for the engine.

The engine works in the bundle frame (the world the avatar was built in, where the photo camera
lives) and in the bundle's bone order; Blender keeps bones in its own order and lets the user
move the armature object. Both are undone here, in numpy, from one foreach_get.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import bpy
import numpy as np

from .. import protocol
from .scene import PROP_BUNDLE, PROP_SHAPE, armature_bone_names, read_matrices


def read_bone_pose(armature: bpy.types.Object, bone_names: list[str] | None = None,
                   include_object_transform: bool = True) -> np.ndarray:
    """(J,4,4) posed bone matrices in the bundle frame and bone order (the inverse of set_armature_pose).

    With ``include_object_transform`` the armature object's world matrix is applied, so moving the
    whole armature relative to the photo camera counts as part of the pose. Only rigid object
    transforms are accepted: a scaled armature has no meaning for the body model.
    Reads the evaluated armature (brought up to date first), so actions, drivers and constraints
    such as IK count, exactly as the user sees the pose.
    """
    if armature is None or armature.type != "ARMATURE":
        raise ValueError("read_bone_pose needs an armature object")
    names = bone_names or armature_bone_names(armature)
    evaluated = armature.evaluated_get(bpy.context.evaluated_depsgraph_get())  # current, constraints included
    pose_bones = evaluated.pose.bones
    matrices = read_matrices(pose_bones, "matrix")
    index = {pb.name: i for i, pb in enumerate(pose_bones)}
    missing = [n for n in names if n not in index]
    if missing:
        raise ValueError(f"armature {armature.name!r} lacks bones {missing[:5]}; was it renamed?")
    out = matrices[[index[n] for n in names]]
    if include_object_transform:
        world = np.array(evaluated.matrix_world, dtype=np.float64)
        scale = np.linalg.norm(world[:3, :3], axis=0)
        if np.abs(scale - 1.0).max() > 1e-4:
            raise ValueError(f"armature {armature.name!r} is scaled {np.round(scale, 4).tolist()}: apply or "
                             "clear its scale (Ctrl+A) before sending the pose to the engine")
        out = world @ out
    return out


def bundle_folder(armature: bpy.types.Object, job_root: Path | str) -> str:
    """The job sub-folder ("fit_body", "result") the avatar was built from: its frame is the one
    the pose is in, and the engine reads that bundle's frame offset."""
    stored = armature.get(PROP_BUNDLE)
    if not stored:
        raise ValueError(f"{armature.name!r} was not built from an avatar bundle, so its pose has no engine frame")
    root, job = Path(str(stored)).resolve(), Path(job_root).resolve()
    if root.parent != job:
        raise ValueError(f"{armature.name!r} was built from {root}, which is not a bundle of the job {job}")
    return protocol.safe_name(root.name)


def read_pose_edit(armature: bpy.types.Object, bundle: str = "fit_body") -> dict[str, Any]:
    """The pose/shape edit as protocol.make_pose_edit's dict: bone names in bundle order, posed
    matrices in the frame of the job's ``bundle`` folder, the shape stored on the armature."""
    names = armature_bone_names(armature)
    pose = read_bone_pose(armature, names)
    shape = armature.get(PROP_SHAPE)
    return protocol.make_pose_edit(names, pose.tolist(), bundle,
                                   [float(s) for s in shape] if shape is not None else None)


def write_pose_edit(job_root: Path | str, armature: bpy.types.Object) -> Path:
    """Write pose_edit.json into the job folder the avatar was built from, atomically (temp file,
    then rename), so the engine never reads half a file."""
    path = protocol.JobLayout(Path(job_root)).pose_edit
    data = json.dumps(read_pose_edit(armature, bundle_folder(armature, job_root)), allow_nan=False)
    fd, tmp = tempfile.mkstemp(prefix=".pose_edit.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def pose_edit_arrays(data: dict[str, Any]) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """Parse a pose edit dict back to (bone names, bone_pose (J,4,4), shape (S,) or None)."""
    names = data.get("bone_names")
    pose = np.asarray(data.get("bone_pose"), dtype=np.float64)
    if not isinstance(names, list) or pose.shape != (len(names), 4, 4) or not np.isfinite(pose).all():
        raise ValueError("pose edit needs 'bone_names' (list) and 'bone_pose' (J x 4 x 4 finite numbers)")
    shape = data.get("shape")
    return names, pose, (np.asarray(shape, dtype=np.float64) if shape is not None else None)
