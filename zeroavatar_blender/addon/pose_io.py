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
from .scene import PROP_BODY_MODEL, PROP_SHAPE, PROP_SUBJECT, read_matrices, armature_bone_names

POSE_EDIT_VERSION = 1


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


def read_pose_edit(armature: bpy.types.Object) -> dict[str, Any]:
    """The pose/shape edit as a JSON-able dict: {"v", "subject", "body_model", "bones",
    "bone_pose" (J x 4 x 4 lists, bundle frame), "shape" (list or null)}."""
    names = armature_bone_names(armature)
    pose = read_bone_pose(armature, names)
    shape = armature.get(PROP_SHAPE)
    return {
        "v": POSE_EDIT_VERSION,
        "subject": str(armature.get(PROP_SUBJECT, "")),
        "body_model": str(armature.get(PROP_BODY_MODEL, "")),
        "bones": names,
        "bone_pose": pose.tolist(),
        "shape": [float(s) for s in shape] if shape is not None else None,
    }


def write_pose_edit(job_root: Path | str, armature: bpy.types.Object) -> Path:
    """Write pose_edit.json into a job folder atomically (temp file, then rename), so the engine
    never reads half a file."""
    path = protocol.JobLayout(Path(job_root)).pose_edit
    data = json.dumps(read_pose_edit(armature), allow_nan=False)
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
    names = data.get("bones")
    pose = np.asarray(data.get("bone_pose"), dtype=np.float64)
    if not isinstance(names, list) or pose.shape != (len(names), 4, 4) or not np.isfinite(pose).all():
        raise ValueError("pose edit needs 'bones' (list) and 'bone_pose' (J x 4 x 4 finite numbers)")
    shape = data.get("shape")
    return names, pose, (np.asarray(shape, dtype=np.float64) if shape is not None else None)
