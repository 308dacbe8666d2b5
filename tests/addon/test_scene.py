"""The avatar built in Blender deforms exactly like the engine's skinning, and the other scene
builders (preview meshes, photo camera, pose read-back) keep their promises."""

from __future__ import annotations

import json
import shutil

import bpy
import numpy as np
import pytest
from bpy_extras.object_utils import world_to_camera_view
from mathutils import Matrix, Quaternion, Vector

from zeroavatar_blender import protocol
from zeroavatar_blender.addon import pose_io, scene
from zeroavatar_blender.addon.bundle_io import BundleError, png_size, read_bundle, validate_arrays


@pytest.fixture
def bundle(anny_bundle):
    return read_bundle(anny_bundle)


@pytest.fixture
def avatar(fresh_scene, anny_bundle):
    return scene.build_avatar(anny_bundle)


# -- bundle_io ---------------------------------------------------------------------------

def test_read_bundle(anny_bundle, bundle):
    assert bundle.num_bones == 104 and bundle.num_vertices == 13718
    assert bundle.vertices.dtype == np.float64 and bundle.faces.dtype == np.int64
    assert bundle.subject == "test_subject" and bundle.camera is not None
    assert bundle.shape is not None and len(bundle.shape) > 0
    assert bundle.texture_path == anny_bundle / "texture.png" and png_size(bundle.texture_path) == (256, 256)
    assert read_bundle(anny_bundle.parent).root == anny_bundle  # a job folder holding result/ works too


def _arrays(bundle):
    return {k: getattr(bundle, k).copy() for k in ("vertices", "faces", "corner_uv", "skin_indices", "skin_weights",
                                                  "bone_rest", "bone_pose", "bone_parents", "bone_length",
                                                  "posed_vertices")}


@pytest.mark.parametrize("break_it, message", [
    (lambda a, n: a["faces"].__setitem__((0, 0), 10**6), "faces"),
    (lambda a, n: a["skin_weights"].__setitem__((0, 0), 3.0), "sum to 1"),
    (lambda a, n: a["skin_indices"].__setitem__((0, 0), len(n)), "skin_indices"),
    (lambda a, n: a["bone_parents"].__setitem__(0, 5), "root|cycle"),
    (lambda a, n: a["bone_rest"].__setitem__((3, 0, 0), 2.0), "rigid"),
    (lambda a, n: a["vertices"].__setitem__((1, 1), np.nan), "NaN"),
    (lambda a, n: a.__setitem__("corner_uv", a["corner_uv"][:-1]), "corner_uv"),
    (lambda a, n: n.__setitem__(1, n[2]), "duplicate"),
])
def test_validate_arrays_rejects_bad_bundles(bundle, break_it, message):
    arrays, names = _arrays(bundle), list(bundle.bone_names)
    break_it(arrays, names)
    with pytest.raises(BundleError, match=message):
        validate_arrays(arrays, names)


def test_read_bundle_rejects_broken_files(anny_bundle, tmp_path):
    with pytest.raises(BundleError, match="no avatar bundle"):
        read_bundle(tmp_path)
    broken = tmp_path / "result"
    shutil.copytree(anny_bundle, broken)
    with open(broken / "avatar.npz", "r+b") as f:  # truncated / from another save
        f.truncate(1000)
    with pytest.raises(BundleError, match="does not match"):
        read_bundle(broken)
    meta = json.loads((broken / "avatar.json").read_text())
    meta.pop("files")  # without digests the npz itself must be rejected
    (broken / "avatar.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="cannot read"):
        read_bundle(broken)
    arrays = dict(np.load(anny_bundle / "avatar.npz"))
    arrays["vertices"] = np.array([object()] * 3, dtype=object)  # a pickle must never be loaded
    np.savez(broken / "avatar.npz", **arrays)
    with pytest.raises(BundleError, match="allow_pickle"):
        read_bundle(broken)
    meta["texture"] = "../escape.png"
    (broken / "avatar.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="unsafe name"):
        read_bundle(broken)


# -- the rigged avatar -------------------------------------------------------------------

def test_rest_matrices_match_bundle(avatar, bundle):
    arm, _ = avatar
    rest, parents = scene.armature_rest(arm, bundle.bone_names)
    np.testing.assert_array_equal(parents, bundle.bone_parents)
    err_t = np.abs(rest[:, :3, 3] - bundle.bone_rest[:, :3, 3]).max()
    err_r = np.abs(rest[:, :3, :3] - bundle.bone_rest[:, :3, :3]).max((1, 2))
    assert err_t < 1e-6
    # Blender stores head/tail/roll in float32: the axis of a 1.6 cm bone 1.6 m from the origin
    # is good to ~2e-5; longer bones are good to 1e-5.
    long_bones = bundle.bone_length >= 0.02
    assert err_r[long_bones].max() < 1e-5, err_r[long_bones].max()
    assert err_r.max() < 5e-5, err_r.max()
    assert all(not b.use_connect for b in arm.data.bones)


def test_deformed_mesh_equals_posed_vertices(avatar, bundle):
    arm, mesh = avatar
    assert mesh.parent == arm and mesh.modifiers["Armature"].object == arm
    deformed = scene.evaluated_vertices(mesh)
    err = np.linalg.norm(deformed - bundle.posed_vertices, axis=1).max()
    assert err < 1e-4, f"Blender's deform differs from the engine's by {err * 1000:.3f} mm"
    arm.data.pose_position = "REST"
    rest = scene.evaluated_vertices(mesh)
    assert np.abs(rest - bundle.vertices).max() < 1e-5


def test_pose_is_a_one_frame_action_and_clear_pose_recovers_rest(avatar, bundle):
    arm, mesh = avatar
    action = arm.animation_data.action
    assert action is not None and action.name == "test_subject_photo_pose"
    assert tuple(action.frame_range) == (1.0, 1.0)
    bpy.context.scene.frame_set(7)  # the pose holds on any frame
    assert np.abs(scene.evaluated_vertices(mesh) - bundle.posed_vertices).max() < 1e-4
    kept = scene.clear_pose(arm)
    assert kept == action and kept.use_fake_user and arm.animation_data.action is None
    bpy.context.scene.frame_set(1)
    assert np.abs(scene.evaluated_vertices(mesh) - bundle.vertices).max() < 1e-5


def test_mesh_data(avatar, bundle):
    _, mesh = avatar
    me = mesh.data
    assert len(me.vertices) == bundle.num_vertices and len(me.polygons) == len(bundle.faces)
    corner_vert = np.empty(len(me.loops), dtype=np.int32)
    me.attributes[".corner_vert"].data.foreach_get("value", corner_vert)
    np.testing.assert_array_equal(corner_vert, bundle.faces.ravel())
    uv = np.empty(len(me.loops) * 2, dtype=np.float32)
    me.uv_layers["UVMap"].data.foreach_get("uv", uv)
    np.testing.assert_allclose(uv.reshape(-1, 3, 2), bundle.corner_uv, atol=1e-6)
    assert [g.name for g in mesh.vertex_groups] == bundle.bone_names
    for v in (0, 5000, 13717):  # the vertex groups hold the bundle's weights
        got = {g.group: g.weight for g in me.vertices[v].groups}
        want = {}
        for i, w in zip(bundle.skin_indices[v], bundle.skin_weights[v]):
            if w > 0:
                want[int(i)] = want.get(int(i), 0.0) + w
        assert got.keys() == want.keys()
        assert all(abs(got[k] - want[k]) < 1e-6 for k in want)
    mat = mesh.data.materials[0]
    tex = next(n for n in mat.node_tree.nodes if n.type == "TEX_IMAGE")
    assert tex.image.packed_file is not None and tuple(tex.image.size) == (256, 256)
    bsdf = next(n for n in mat.node_tree.nodes if n.type == "BSDF_PRINCIPLED")
    assert bsdf.inputs["Base Color"].links[0].from_node == tex


def test_posing_a_bone_moves_its_vertices_only(avatar, bundle):
    arm, mesh = avatar
    before = scene.evaluated_vertices(mesh)
    name = "lowerarm01.L"
    j = bundle.bone_names.index(name)
    arm.pose.bones[name].rotation_quaternion = Quaternion((1, 0, 0), 0.8) @ arm.pose.bones[name].rotation_quaternion
    after = scene.evaluated_vertices(mesh)
    moved = np.linalg.norm(after - before, axis=1)
    descendants = {j}
    for k, p in enumerate(bundle.bone_parents):  # parents come before children
        if p in descendants:
            descendants.add(k)
    influenced = np.isin(bundle.skin_indices, list(descendants)) & (bundle.skin_weights > 0)
    assert moved[influenced.any(1)].max() > 0.05
    assert moved[~influenced.any(1)].max() < 1e-6


def test_set_armature_pose_and_read_back(avatar, bundle):
    arm, mesh = avatar
    got = pose_io.read_bone_pose(arm)
    assert np.abs(got - bundle.bone_pose).max() < 5e-5
    # A new pose: rotate the left thigh's subtree by 30 degrees about its head.
    pose = bundle.bone_pose.copy()
    j = bundle.bone_names.index("upperleg01.L")
    pivot = pose[j, :3, 3].copy()
    R = np.array(Matrix.Rotation(0.5, 4, "X"))
    turn = np.eye(4)
    turn[:3, :3] = R[:3, :3]
    turn[:3, 3] = pivot - R[:3, :3] @ pivot
    subtree = {j}
    for k, p in enumerate(bundle.bone_parents):
        if p in subtree:
            subtree.add(k)
    for k in subtree:
        pose[k] = turn @ pose[k]
    scene.set_armature_pose(arm, pose)
    bpy.context.view_layer.update()
    assert np.abs(pose_io.read_bone_pose(arm) - pose).max() < 5e-5
    # The object's own transform is part of the pose in the bundle frame; scale is refused.
    arm.location = (0.5, 0.0, 0.0)
    bpy.context.view_layer.update()
    moved = pose_io.read_bone_pose(arm)
    assert np.abs(moved[:, :3, 3] - pose[:, :3, 3] - [0.5, 0, 0]).max() < 5e-5
    arm.scale = (2.0, 2.0, 2.0)
    bpy.context.view_layer.update()
    with pytest.raises(ValueError, match="scaled"):
        pose_io.read_bone_pose(arm)


def test_write_pose_edit(avatar, bundle, anny_bundle, tmp_path):
    arm, _ = avatar
    job = anny_bundle.parent  # the bundle is JOB/result
    path = pose_io.write_pose_edit(job, arm)
    assert path == job / "pose_edit.json" and not list(job.glob(".pose_edit*"))
    data = protocol.read_pose_edit(path)  # what the engine reads
    assert data["bundle"] == "result" and data["bone_names"] == bundle.bone_names
    names, pose, shape = pose_io.pose_edit_arrays(data)
    assert np.abs(pose - bundle.bone_pose).max() < 5e-5
    np.testing.assert_allclose(shape, bundle.shape)
    path.unlink()
    with pytest.raises(ValueError, match="not a bundle of the job"):
        pose_io.write_pose_edit(tmp_path, arm)


def test_pose_basis_inverts_blender_hierarchy():
    rng = np.random.default_rng(0)

    def rigid(n):
        q, r = np.linalg.qr(rng.normal(size=(n, 3, 3)))
        q *= np.sign(np.linalg.det(q))[:, None, None]  # proper rotations
        m = np.tile(np.eye(4), (n, 1, 1))
        m[:, :3, :3] = q
        m[:, :3, 3] = rng.normal(size=(n, 3))
        return m

    rest, pose = rigid(4), rigid(4)
    parents = np.array([-1, 0, 1, 0])
    basis = scene.pose_basis(rest, pose, parents)
    for j, p in enumerate(parents):  # Blender: pose_j = pose_p @ inv(rest_p) @ rest_j @ basis_j
        parent = pose[p] @ np.linalg.inv(rest[p]) if p >= 0 else np.eye(4)
        np.testing.assert_allclose(parent @ rest[j] @ basis[j], pose[j], atol=1e-12)


# -- preview meshes ----------------------------------------------------------------------

def _grid(n):
    y, x = np.mgrid[0:n, 0:n]
    v = np.stack([x.ravel() / n, y.ravel() / n, np.zeros(n * n)], 1).astype(np.float32)
    i = (y[:-1, :-1] * n + x[:-1, :-1]).ravel()
    f = np.concatenate([np.stack([i, i + 1, i + n + 1], 1), np.stack([i, i + n + 1, i + n], 1)]).astype(np.int32)
    return v, f


def _colors(mesh):
    attr = mesh.color_attributes["Color"]
    out = np.empty(len(attr.data) * 4, dtype=np.float32)
    attr.data.foreach_get("color", out)
    return out.reshape(-1, 4)


def test_update_preview_mesh_in_place(fresh_scene):
    v, f = _grid(20)
    c = np.random.default_rng(0).random((len(v), 3)).astype(np.float32)
    obj = scene.update_preview_mesh("Preview", v, f, c)
    mesh = obj.data
    assert obj.name in fresh_scene.objects and len(mesh.vertices) == 400 and len(mesh.polygons) == len(f)
    assert mesh.validate(verbose=False) is False  # nothing to fix: edges and corners are consistent
    np.testing.assert_allclose(_colors(mesh)[:, :3], scene.srgb_to_linear(c), atol=1e-3)
    assert mesh.color_attributes.active_color.name == "Color"

    same = scene.update_preview_mesh("Preview", v + 1.0, f, c)  # same triangles: positions only
    assert same == obj and same.data == mesh
    co = np.empty(400 * 3, dtype=np.float32)
    mesh.vertices.foreach_get("co", co)
    np.testing.assert_allclose(co.reshape(-1, 3), v + 1.0)

    v2, f2 = _grid(30)  # new topology, same mesh datablock
    scene.update_preview_mesh(obj, v2, f2, np.ones((len(v2), 3)))
    assert obj.data == mesh and len(mesh.vertices) == 900 and len(mesh.polygons) == len(f2)
    assert mesh.validate(verbose=False) is False
    corner_vert = np.empty(len(mesh.loops), dtype=np.int32)
    mesh.attributes[".corner_vert"].data.foreach_get("value", corner_vert)
    np.testing.assert_array_equal(corner_vert, f2.ravel())
    bpy.context.view_layer.update()
    assert len(scene.evaluated_vertices(obj)) == 900


def test_preview_shows_vertex_colors(fresh_scene):
    v, f = _grid(4)
    obj = scene.update_preview_mesh("Preview", v, f, np.ones((16, 3)))
    node = next(n for n in obj.active_material.node_tree.nodes if n.type == "VERTEX_COLOR")
    assert node.layer_name == "Color" and node.outputs["Color"].links
    screen = next(s for s in bpy.data.screens if any(a.type == "VIEW_3D" for a in s.areas))
    assert scene.show_vertex_colors_in_solid_view(screen) >= 1
    space = next(a for a in screen.areas if a.type == "VIEW_3D").spaces[0]
    assert space.shading.color_type == "VERTEX"


def test_update_preview_mesh_rejects_bad_arrays(fresh_scene):
    v, f = _grid(5)
    with pytest.raises(ValueError, match="faces"):
        scene.update_preview_mesh("P", v, f + 100, None)
    with pytest.raises(ValueError, match="colors"):
        scene.update_preview_mesh("P", v, f, np.ones((3, 3)))
    with pytest.raises(ValueError, match="vertices"):
        scene.update_preview_mesh("P", v[:, :2], f, None)
    with pytest.raises(ValueError, match="NaN"):
        scene.update_preview_mesh("P", v * np.nan, f, None)


# -- the photo camera --------------------------------------------------------------------

def test_photo_camera_projects_like_opencv(fresh_scene, bundle, tmp_path):
    cam_json = bundle.camera
    W, H = cam_json["width"], cam_json["height"]
    photo = tmp_path / "photo.png"
    img = bpy.data.images.new("photo", W, H)
    img.filepath_raw = str(photo)
    img.file_format = "PNG"
    img.save()
    cam = scene.add_photo_camera(cam_json, str(photo))
    assert fresh_scene.camera == cam and fresh_scene.render.resolution_x == W
    assert cam.data.show_background_images and cam.data.background_images[0].image.filepath_raw == str(photo)
    K = np.asarray(cam_json["K"])
    w2c = np.asarray(cam_json["world_to_cam"])
    pts = bundle.posed_vertices[::500]
    cam_pts = pts @ w2c[:3, :3].T + w2c[:3, 3]
    uv = cam_pts @ K.T
    expected = uv[:, :2] / uv[:, 2:]
    bpy.context.view_layer.update()
    got = []
    for p in pts:
        ndc = world_to_camera_view(fresh_scene, cam, Vector(p))
        got.append((ndc.x * W - 0.5, (1.0 - ndc.y) * H - 0.5))  # OpenCV pixel centres
    err = np.abs(np.array(got) - expected).max()
    assert err < 0.01, f"{err:.4f} px"
    # The photo-camera view sees the posed avatar inside the frame.
    assert (expected[:, 0] > 0).all() and (expected[:, 0] < W).all()


def test_opencv_to_blender_centred_camera():
    K = np.array([[1000.0, 0, 499.5], [0, 1000.0, 299.5], [0, 0, 1]])
    w2c = np.eye(4)
    s = scene.opencv_to_blender_camera(K, w2c, 1000, 600)
    assert s["lens"] == pytest.approx(36.0) and s["shift_x"] == pytest.approx(0) and s["shift_y"] == pytest.approx(0)
    # OpenCV looks along +Z with y down: the Blender camera (looking along its -Z) is turned 180 deg about X.
    np.testing.assert_allclose(s["matrix_world"], np.diag([1.0, -1.0, -1.0, 1.0]), atol=1e-12)
    with pytest.raises(ValueError):
        scene.add_photo_camera({"K": K.tolist()}, None)
