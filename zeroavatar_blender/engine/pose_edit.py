"""The pose (and shape) the user set in Blender, back into body parameters.

Blender sends posed armature-space bone matrices in the frame of the bundle it showed
(protocol.read_pose_edit); that frame is the photo's world frame moved by a pure translation
(bundle meta "pose_frame.offset"), so undoing the offset and inverting the body's forward gives
parameters whose posed body equals Blender's deformed mesh.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .. import protocol
from .body.base import BodyModel, BodyParams
from .errors import BadInputError


def load_pose_edit(path: Path, body: BodyModel, fitted: BodyParams) -> BodyParams:
    path = Path(path)
    try:
        edit = protocol.read_pose_edit(path)
    except (OSError, ValueError) as exc:
        raise BadInputError(f"the pose edit {path} is unreadable: {exc}", "pose the armature again in Blender") from exc
    if list(edit["bone_names"]) != list(body.bone_names):
        raise BadInputError(f"the pose edit {path} is for another skeleton ({len(edit['bone_names'])} bones, "
                            f"the {body.id} body has {body.num_bones})", "re-run Fit Body with the same body model")
    meta_path = protocol.resolve_inside(path.parent, edit.get("bundle", "fit_body")) / "avatar.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        offset = np.asarray(meta["pose_frame"]["offset"], dtype=np.float64).reshape(3)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise BadInputError(f"the pose edit names the bundle {meta_path.parent}, which is missing or damaged",
                            "re-run Fit Body") from exc
    mats = np.asarray(edit["bone_pose"], dtype=np.float64)
    if not np.isfinite(mats).all():
        raise BadInputError(f"the pose edit {path} has non-finite numbers", "reset the pose in Blender")
    mats[:, :3, 3] -= offset
    shape = fitted.shape if edit.get("shape") is None else torch.tensor([edit["shape"]], dtype=body.dtype)
    if shape.shape[-1] != body.shape_dim:
        raise BadInputError(f"the pose edit {path} has {shape.shape[-1]} shape values, the body needs {body.shape_dim}",
                            "re-run Fit Body")
    with torch.no_grad():
        return body.params_from_bone_posed(torch.as_tensor(mats, dtype=body.dtype)[None], shape).detach()
