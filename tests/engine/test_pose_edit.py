"""Blender's pose edit (bundle-frame bone matrices) back to body parameters, exactly."""

import json

import numpy as np
import pytest
import torch

from zeroavatar_blender import protocol
from zeroavatar_blender.engine.avatar import build_body_avatar
from zeroavatar_blender.engine.errors import BadInputError
from zeroavatar_blender.engine.pose_edit import load_pose_edit
from tests.engine.body.test_anny_body import random_params


def test_pose_edit_round_trip(anny_body, tmp_path):
    fitted = random_params(anny_body, batch=1, seed=3)
    texture = np.full((64, 64, 3), 128, np.uint8)
    bundle = build_body_avatar(anny_body, fitted, texture, camera=None, subject="t")
    bundle.save(tmp_path / "fit_body")
    # the user bends a knee: a new pose in the bundle frame, as Blender would report it
    edited = random_params(anny_body, batch=1, seed=4)
    edited.shape = fitted.shape
    edited.global_orient, edited.transl = fitted.global_orient, fitted.transl
    with torch.no_grad():
        out = anny_body.forward(edited)
    offset = np.asarray(json.loads((tmp_path / "fit_body" / "avatar.json").read_text())["pose_frame"]["offset"])
    mats = out.bone_posed[0].double().numpy().copy()
    mats[:, :3, 3] += offset
    (tmp_path / "pose_edit.json").write_text(json.dumps(protocol.make_pose_edit(anny_body.bone_names, mats.tolist())))
    params = load_pose_edit(tmp_path / "pose_edit.json", anny_body, fitted)
    with torch.no_grad():
        again = anny_body.forward(params).vertices
    assert (again - out.vertices).norm(dim=-1).max().item() < 1e-3


def test_pose_edit_for_another_skeleton_is_refused(anny_body, tmp_path):
    edit = protocol.make_pose_edit(["a", "b"], [np.eye(4).tolist()] * 2)
    (tmp_path / "pose_edit.json").write_text(json.dumps(edit))
    with pytest.raises(BadInputError, match="another skeleton"):
        load_pose_edit(tmp_path / "pose_edit.json", anny_body, anny_body.zero_params())


def test_pose_edit_bundle_name_cannot_escape(tmp_path):
    edit = protocol.make_pose_edit(["a"], [np.eye(4).tolist()])
    edit["bundle"] = "../../etc"
    (tmp_path / "pose_edit.json").write_text(json.dumps(edit))
    with pytest.raises(protocol.ProtocolError):
        protocol.read_pose_edit(tmp_path / "pose_edit.json")
