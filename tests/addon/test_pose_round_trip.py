"""Blender pose -> engine body, for any edited pose: random bone rotations set on the avatar's
armature in Blender, read back with pose_io, turned into body parameters by the engine's
load_pose_edit, give an engine body equal to Blender's armature-deformed mesh within 1 mm per
vertex. For Anny and for SMPL / SMPL-X (a synthetic model of our own in the official format)."""

from __future__ import annotations

import json

import bpy
import numpy as np
import pytest
import torch
from mathutils import Quaternion, Vector

from tests.engine.body.synthetic_smpl import write_model_folder
from zeroavatar_blender.addon import pose_io, scene
from zeroavatar_blender.engine.avatar import build_body_avatar
from zeroavatar_blender.engine.body import load_body
from zeroavatar_blender.engine.pose_edit import load_pose_edit

TOLERANCE_M = 1e-3
N_POSES = 4


@pytest.fixture(scope="module", params=["anny", "smpl", "smplx"])
def body(request, tmp_path_factory):
    if request.param == "anny":
        return load_body("anny")
    folder = tmp_path_factory.mktemp(f"{request.param}_model")
    return load_body(request.param, write_model_folder(folder, request.param, "npz"))


def fitted_params(body, seed: int = 0):
    """A fitted-looking body: a moderate pose of the fit bones, a shape, turned and moved."""
    g = torch.Generator().manual_seed(seed)
    params = body.zero_params(1)
    params.pose[:, body.fit_bones] = (torch.rand(1, len(body.fit_bones), 3, generator=g, dtype=body.dtype) - 0.5) * 0.6
    params.shape = 0.5 * torch.randn(1, body.shape_dim, generator=g, dtype=body.dtype)
    params.global_orient = torch.tensor([[0.1, -0.2, 0.3]], dtype=body.dtype)
    params.transl = torch.tensor([[0.2, -0.1, 0.9]], dtype=body.dtype)
    return params


def random_rotation(rng: np.random.Generator, max_angle: float) -> Quaternion:
    axis = rng.normal(size=3)
    return Quaternion(axis / np.linalg.norm(axis), float(rng.uniform(-max_angle, max_angle)))


def pose_randomly(arm: bpy.types.Object, rng: np.random.Generator, fraction: float = 0.5) -> int:
    """Rotate a random half of the pose bones (the root too, sometimes, and move it) the way a
    user does in Pose Mode: rotation_quaternion on top of the current pose. -> bones changed."""
    changed = 0
    for i, pb in enumerate(arm.pose.bones):
        if rng.random() > fraction:
            continue
        pb.rotation_mode = "QUATERNION"
        pb.rotation_quaternion = pb.rotation_quaternion @ random_rotation(rng, 0.7)
        if i == 0:
            pb.location = pb.location + Vector(rng.normal(scale=0.05, size=3).tolist())
        changed += 1
    bpy.context.view_layer.update()
    return changed


def test_any_edited_pose_round_trips_within_1mm(body, fresh_scene, tmp_path):
    job = tmp_path / "job"
    fitted = fitted_params(body)
    texture = np.full((64, 64, 3), 160, np.uint8)
    build_body_avatar(body, fitted, texture, camera=None, subject="round_trip").save(job / "fit_body")
    offset = np.asarray(json.loads((job / "fit_body" / "avatar.json").read_text())["pose_frame"]["offset"])
    arm, mesh = scene.build_avatar(job / "fit_body")
    assert len(arm.pose.bones) == body.num_bones
    rng = np.random.default_rng(7)
    worst = 0.0
    for trial in range(N_POSES):
        before = scene.evaluated_vertices(mesh)
        assert pose_randomly(arm, rng) > body.num_bones // 4
        blender = scene.evaluated_vertices(mesh)  # Blender's armature deform, bundle frame
        assert np.linalg.norm(blender - before, axis=1).max() > 0.05, "the random pose changed nothing"

        pose_io.write_pose_edit(job, arm)
        params = load_pose_edit(job / "pose_edit.json", body, fitted)
        with torch.no_grad():
            engine = body.forward(params).vertices[0].double().numpy() + offset
        err = np.linalg.norm(engine - blender, axis=1)
        worst = max(worst, float(err.max()))
        assert err.max() < TOLERANCE_M, (
            f"{body.id} pose {trial}: the engine body is {err.max() * 1000:.3f} mm from Blender's mesh "
            f"(vertex {int(err.argmax())})")
        np.testing.assert_allclose(params.shape.numpy(), fitted.shape.numpy(), atol=1e-6)
    print(f"\n{body.id}: {N_POSES} random poses, worst vertex {worst * 1000:.4f} mm")
