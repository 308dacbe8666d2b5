import hashlib
import io
import json

import numpy as np
import pytest
import torch

from zeroavatar_blender import protocol
from zeroavatar_blender.engine.avatar import (
    AvatarBundle, bone_lengths, build_body_avatar, lbs_numpy, skin_weights_top4, write_posed_ply,
)
from zeroavatar_blender.engine.body.base import BodyParams
from zeroavatar_blender.engine.cameras import Camera, intrinsics, look_at
from zeroavatar_blender.engine.errors import BadInputError


def fitted_params(body, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = body.zero_params()
    pose = torch.zeros_like(p.pose)
    pose[:, body.fit_bones] = (torch.rand(1, len(body.fit_bones), 3, generator=g) - 0.5) * 0.6
    return BodyParams(pose, torch.rand(1, body.shape_dim, generator=g), torch.tensor([[0.1, -0.05, 0.5]]),
                      torch.tensor([[0.4, -0.3, 0.7]]))


@pytest.fixture(scope="module")
def built(anny_body):
    params = fitted_params(anny_body)
    with torch.no_grad():
        posed_world = anny_body.forward(params).vertices[0].double().numpy()
    centre = posed_world.mean(0)
    cam = Camera(intrinsics(300, 400), look_at(centre + np.array([0.3, -3.5, 0.2]), centre), 300, 400)
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    bundle = build_body_avatar(anny_body, params, texture, camera=cam, subject="Ada",
                               extra_meta={"source_photo": "input/ada.jpg"})
    return dict(body=anny_body, params=params, bundle=bundle, camera=cam, posed_world=posed_world)


def test_rest_and_pose_frames(built):
    b, posed_world = built["bundle"], built["posed_world"]
    assert abs(b.vertices[:, 2].min()) < 1e-6  # feet on the ground
    assert abs(b.posed_vertices[:, 2].min()) < 1e-5
    # The posed root stands above the rest root.
    np.testing.assert_allclose(b.bone_pose[0, :2, 3], b.bone_rest[0, :2, 3], atol=1e-6)
    # Bones moved with the mesh: their heads keep their place relative to the vertices.
    with torch.no_grad():
        out = built["body"].forward(built["params"])
    rest = out.rest_vertices[0].double().numpy()
    lift = b.vertices.astype(np.float64) - rest
    np.testing.assert_allclose(lift, np.broadcast_to(lift[0], lift.shape), atol=1e-5)
    np.testing.assert_allclose(b.bone_rest[:, :3, 3] - out.bone_rest[0, :, :3, 3].numpy(),
                               np.broadcast_to(lift[0], (b.bone_rest.shape[0], 3)), atol=1e-5)
    # The photo pose is the fitted one, rotation kept, translated by the recorded offset only.
    offset = np.array(b.meta["pose_frame"]["offset"])
    np.testing.assert_allclose(b.posed_vertices, posed_world + offset, atol=2e-5)
    np.testing.assert_allclose(b.bone_pose[:, :3, :3], out.bone_posed[0, :, :3, :3].numpy(), atol=1e-6)


def test_posed_vertices_follow_the_bone_matrices(built):
    b = built["bundle"]
    skinning = b.bone_pose.astype(np.float64) @ np.linalg.inv(b.bone_rest.astype(np.float64))
    posed = lbs_numpy(b.vertices, skinning, b.skin_indices, b.skin_weights)
    assert np.abs(posed - b.posed_vertices).max() < 1e-5
    assert np.abs(b.posed_vertices - b.vertices).max() > 0.1  # it is really posed


def test_skin_weights_and_bones(built):
    b = built["bundle"]
    assert b.skin_indices.shape == (len(b.vertices), 4) and b.skin_indices.dtype == np.int32
    np.testing.assert_allclose(b.skin_weights.sum(1), 1, atol=1e-6)
    assert (b.skin_weights >= 0).all()
    assert (b.bone_length >= 0.01).all()
    names = b.bone_names
    up, low = names.index("upperleg02.L"), names.index("lowerleg01.L")
    expected = np.linalg.norm(b.bone_rest[low, :3, 3] - b.bone_rest[up, :3, 3])
    assert abs(b.bone_length[up] - expected) < 0.1 * expected  # the thigh reaches the knee
    assert b.bone_length[names.index("head")] > 0.03  # not a stub towards the off-axis eyes


def test_skin_weights_top4_keeps_the_largest():
    idx = np.array([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    w = np.array([[0.1, 0.5, 0.0, 0.2, 0.15, 0.05], [1, 1, 1, 1, 0, 0]], dtype=np.float64)
    i4, w4 = skin_weights_top4(idx, w)
    assert set(i4[0].tolist()) == {1, 3, 4, 0}
    np.testing.assert_allclose(w4.sum(1), 1, atol=1e-6)
    np.testing.assert_allclose(w4[0], np.array([0.5, 0.2, 0.15, 0.1]) / 0.95, atol=1e-6)
    i2, w2 = skin_weights_top4(idx[:, :2], np.array([[1.0, 3.0], [2.0, 2.0]]))
    assert i2.shape == (2, 4) and w2[0, 0] == pytest.approx(0.75) and w2[:, 2:].sum() == 0
    with pytest.raises(ValueError, match="no skin weight"):
        skin_weights_top4(idx, np.zeros_like(w))


def test_bone_lengths_fall_back_for_leaves():
    rest = np.tile(np.eye(4), (3, 1, 1))
    rest[1, 1, 3] = 0.3  # child 0.3 m along the root's Y axis
    rest[2, 1, 3] = 0.4  # a leaf with no vertices
    parents = np.array([-1, 0, 1])
    verts = np.zeros((1, 3))
    lengths = bone_lengths(rest, parents, verts, np.zeros((1, 4), int), np.array([[1.0, 0, 0, 0]]))
    np.testing.assert_allclose(lengths, [0.3, 0.1, 0.05], atol=1e-6)


def test_photo_camera_sees_the_posed_avatar_as_in_the_photo(built):
    b, cam = built["bundle"], built["camera"]
    assert b.camera is not None
    np.testing.assert_allclose(b.camera.project(b.posed_vertices.astype(np.float64)),
                               cam.project(built["posed_world"]), atol=5e-3)
    np.testing.assert_allclose(b.camera.K, cam.K)


def test_save_load_round_trip(built, tmp_path):
    b = built["bundle"]
    folder = tmp_path / "result"
    b.save(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["avatar.json", "avatar.npz", "texture.png"]
    with np.load(folder / "avatar.npz", allow_pickle=False) as npz:
        assert set(npz.files) == set(protocol.BUNDLE_ARRAYS)
        assert npz["faces"].dtype == np.int32 and npz["vertices"].dtype == np.float32
    doc = json.loads((folder / "avatar.json").read_text())
    assert doc["version"] == protocol.BUNDLE_VERSION and doc["bones"] == b.bone_names
    assert doc["texture"] == "texture.png" and doc["subject"] == "Ada" and doc["body_model"] == "anny"
    assert doc["source_photo"] == "input/ada.jpg" and doc["camera"]["convention"] == "opencv"
    back = AvatarBundle.load(folder)
    for key, value in b.arrays().items():
        np.testing.assert_array_equal(back.arrays()[key], value, err_msg=key)
    np.testing.assert_array_equal(back.texture, b.texture)
    assert back.bone_names == b.bone_names
    assert back.meta["camera"] == b.meta["camera"] and back.meta["quality"] == "fast"
    params = BodyParams.from_json(back.meta["body_params"])
    assert torch.allclose(params.pose, built["params"].pose)
    back.save(folder)  # overwriting an existing bundle works
    AvatarBundle.load(folder)


def rewrite(folder, **arrays):
    """Replace arrays in a saved bundle and re-vouch for them, as a buggy writer would."""
    with np.load(folder / "avatar.npz", allow_pickle=False) as npz:
        data = {k: npz[k] for k in npz.files}
    data.update(arrays)
    buf = io.BytesIO()
    np.savez(buf, **data)
    (folder / "avatar.npz").write_bytes(buf.getvalue())
    doc = json.loads((folder / "avatar.json").read_text())
    doc["files"]["avatar.npz"] = {"bytes": len(buf.getvalue()), "sha256": hashlib.sha256(buf.getvalue()).hexdigest()}
    (folder / "avatar.json").write_text(json.dumps(doc))


def test_broken_bundles_are_rejected_clearly(built, tmp_path):
    b = built["bundle"]
    folder = tmp_path / "result"
    with pytest.raises(BadInputError, match="avatar.json is missing"):
        AvatarBundle.load(folder)
    b.save(folder)
    npz = (folder / "avatar.npz").read_bytes()
    (folder / "avatar.npz").write_bytes(npz[: len(npz) // 2])  # half written
    with pytest.raises(BadInputError, match="avatar.npz does not match"):
        AvatarBundle.load(folder)
    (folder / "avatar.npz").write_bytes(npz)
    AvatarBundle.load(folder)
    (folder / "texture.png").unlink()
    with pytest.raises(BadInputError, match="texture.png is missing") as info:
        AvatarBundle.load(folder)
    assert "finalise the job again" in str(info.value) and str(folder) in str(info.value)
    b.save(folder)
    (folder / "avatar.json").write_text('{"version": 1, "bones": [')
    with pytest.raises(BadInputError, match="not readable JSON"):
        AvatarBundle.load(folder)

    cases = {
        "NaN": dict(vertices=np.full_like(b.vertices, np.nan)),
        "do not sum to 1": dict(skin_weights=b.skin_weights * 1.5),
        "bone_parents": dict(bone_parents=np.roll(b.bone_parents, 1)),
        "disagree with bone_pose": dict(posed_vertices=b.posed_vertices + 0.01),
        "not rotations": dict(bone_pose=b.bone_pose * 1.1),
        "faces index": dict(faces=b.faces + len(b.vertices)),
        "shape": dict(corner_uv=b.corner_uv[:10]),
    }
    for message, arrays in cases.items():
        b.save(folder)
        rewrite(folder, **arrays)
        with pytest.raises(BadInputError, match=message):
            AvatarBundle.load(folder)


def test_save_refuses_an_inconsistent_bundle(built, tmp_path):
    b = built["bundle"]
    broken = AvatarBundle(**{**b.__dict__, "posed_vertices": b.posed_vertices + 0.05})
    with pytest.raises(BadInputError, match="posed_vertices"):
        broken.save(tmp_path / "result")
    assert not (tmp_path / "result" / "avatar.json").exists()
    odd = AvatarBundle(**{**b.__dict__, "meta": {**b.meta, "when": object()}})
    with pytest.raises(ValueError, match="plain JSON"):
        odd.save(tmp_path / "result")
    assert not (tmp_path / "result").exists()


def test_posed_ply_is_in_the_photo_camera_frame(built, tmp_path):
    import trimesh

    b, cam = built["bundle"], built["camera"]
    write_posed_ply(built["posed_world"], b.faces, cam, tmp_path / "world.ply")
    write_posed_ply(b, path=tmp_path / "bundle.ply")
    a = trimesh.load(tmp_path / "world.ply", process=False)
    c = trimesh.load(tmp_path / "bundle.ply", process=False)
    assert a.vertices.shape == b.vertices.shape and a.faces.shape == b.faces.shape
    np.testing.assert_allclose(a.vertices, cam.to_cam(built["posed_world"]), atol=1e-5)
    np.testing.assert_allclose(c.vertices, a.vertices, atol=1e-4)
    assert (a.vertices[:, 2] > 0).all()  # in front of the camera (OpenCV z forward)
    assert (tmp_path / "world.ply").read_bytes().startswith(b"ply\nformat binary_little_endian")
