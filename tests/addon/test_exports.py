"""Exports are checked by readers that are not Blender's own (Khronos glTF-Validator, assimp) and
re-imported into a fresh Blender scene, where the exported pose must reproduce the engine's
posed mesh. Also the command-line jobs (export_avatar, turntable) end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import bpy
import numpy as np
import pytest
from scipy.spatial import cKDTree

from tests.tools import assimp_info, validate_gltf
from zeroavatar_blender import protocol
from zeroavatar_blender.addon import export_presets, scene
from zeroavatar_blender.addon.bundle_io import read_bundle

ROOT = Path(__file__).resolve().parents[2]
needs_validator = pytest.mark.usefixtures("require_validator")
needs_assimp = pytest.mark.usefixtures("require_assimp")


@pytest.fixture(scope="module")
def bundle(anny_bundle):
    return read_bundle(anny_bundle)


@pytest.fixture(scope="module")
def exported(anny_bundle, tmp_path_factory):
    """Every preset of one avatar, exported once for the module: {preset: path}."""
    bpy.ops.wm.read_factory_settings(use_empty=True)
    arm, mesh = scene.build_avatar(anny_bundle)
    out = tmp_path_factory.mktemp("exports")
    paths = {p: export_presets.export_preset(arm, mesh, out, p, "test_subject") for p in export_presets.PRESETS}
    bpy.ops.wm.read_factory_settings(use_empty=True)
    return paths


def _import(path: Path) -> tuple[list, list]:
    bpy.ops.wm.read_factory_settings(use_empty=True)
    if path.suffix == ".glb":
        bpy.ops.import_scene.gltf(filepath=str(path), disable_bone_shape=True)
    else:
        bpy.ops.import_scene.fbx(filepath=str(path))
    objs = list(bpy.context.scene.objects)
    return [o for o in objs if o.type == "ARMATURE"], [o for o in objs if o.type == "MESH"]


def _posed_after_import(arm, mesh) -> np.ndarray:
    action = arm.animation_data.action if arm.animation_data else None
    assert action is not None, "the photo's pose was not exported as an animation"
    bpy.context.scene.frame_set(int(action.frame_range[0]))
    return scene.evaluated_vertices(mesh)


def test_preset_filenames():
    assert export_presets.preset_filename("Ada Lovelace", "unity") == "Ada_Lovelace_unity.fbx"
    assert export_presets.preset_filename("../x", "gltf") == "x.glb"
    with pytest.raises(export_presets.ExportError, match="unknown"):
        export_presets.export_preset(None, None, ".", "maya", "x")


@needs_validator
def test_glb_passes_khronos_validator(exported):
    report = validate_gltf(exported["gltf"])
    errors = [m for m in report["issues"]["messages"] if m["severity"] == 0]
    assert report["issues"]["numErrors"] == 0, errors
    info = report["info"]
    assert info["hasSkins"] and info["hasTextures"] and info["maxInfluences"] <= 4
    assert info["animationCount"] == 1  # the photo's pose
    assert any(r.get("mimeType") == "image/png" and r["storage"] == "buffer-view" for r in info["resources"])


@needs_assimp
@pytest.mark.parametrize("preset", ["unity", "unreal", "godot"])
def test_fbx_read_by_assimp(exported, bundle, preset):
    info = assimp_info(exported[preset])
    assert info.counts["Meshes"] == 1 and info.counts["Bones"] == bundle.num_bones
    assert info.counts["Textures (embed.)"] == 1 and info.counts["Animations"] == 1
    assert set(bundle.bone_names) <= set(info.nodes)
    assert not any(n.endswith("_end") for n in info.nodes)  # no leaf bones
    (name, verts, bones, faces), = info.meshes
    assert faces == len(bundle.faces) and bones == bundle.num_bones
    lo, hi = info.bounds
    height = hi[1] - lo[1]  # Y up in the file
    rest_height = np.ptp(bundle.vertices[:, 2])
    scale = 100.0 if preset == "unreal" else 1.0  # Unreal works in centimetres
    assert height == pytest.approx(rest_height * scale, rel=1e-3)
    if preset == "unreal":
        assert info.nodes[0] == "Armature" and info.nodes[1] == "root"


@pytest.mark.parametrize("preset", ["gltf", "unity", "unreal", "godot"])
def test_reimport_reproduces_pose(exported, bundle, preset):
    arms, meshes = _import(exported[preset])
    assert len(arms) == 1 and len(meshes) == 1
    arm, mesh = arms[0], meshes[0]
    assert len(arm.data.bones) == bundle.num_bones
    assert {b.name for b in arm.data.bones} == set(bundle.bone_names)
    posed = _posed_after_import(arm, mesh)
    if preset == "gltf":  # glTF splits vertices along UV seams
        corners = np.concatenate([bundle.faces.reshape(-1, 1), np.round(bundle.corner_uv.reshape(-1, 2), 6)], 1)
        assert len(mesh.data.vertices) == len(np.unique(corners, axis=0))
        d_out, _ = cKDTree(bundle.posed_vertices).query(posed)
        d_in, _ = cKDTree(posed).query(bundle.posed_vertices)
        err = max(d_out.max(), d_in.max())
    else:  # FBX keeps the control points in order
        assert len(mesh.data.vertices) == bundle.num_vertices
        err = np.linalg.norm(posed - bundle.posed_vertices, axis=1).max()
    assert err < 1e-4, f"{preset}: the re-imported pose is off by {err * 1000:.3f} mm"
    assert mesh.data.materials and any(img.size[0] == 256 for img in bpy.data.images)


def test_export_keeps_user_scene(fresh_scene, anny_bundle, tmp_path):
    arm, mesh = scene.build_avatar(anny_bundle)
    other = bpy.data.objects.new("Other", None)
    fresh_scene.collection.objects.link(other)
    bpy.context.view_layer.update()
    other.select_set(True)
    bpy.context.view_layer.objects.active = arm
    bpy.ops.object.mode_set(mode="POSE")  # the user is posing the avatar
    export_presets.export_fbx(arm, mesh, tmp_path / "a.fbx", "unreal")
    export_presets.export_glb(arm, mesh, tmp_path / "a.glb")
    assert other.select_get() and not mesh.select_get()
    assert bpy.context.view_layer.objects.active == arm and arm.mode == "POSE"
    assert arm.name == "test_subject" and "Armature" not in bpy.data.objects  # the copy is gone
    assert len(bpy.data.armatures) == 1 and len(bpy.data.objects) == 3


@needs_assimp
def test_unreal_preset_adds_root_bone(fresh_scene, anny_body, tmp_path):
    from .bundle_factory import make_anny_bundle

    folder = make_anny_bundle(anny_body, tmp_path / "hips", root_name="hips")
    arm, mesh = scene.build_avatar(folder)
    arm.name = "Armature"  # the name the exported node needs is taken by the user's own object
    path = export_presets.export_fbx(arm, mesh, tmp_path / "u.fbx", "unreal")
    assert arm.data.bones[0].name == "hips" and "root" not in arm.data.bones  # user's rig untouched
    assert arm.name == "Armature" and len(bpy.data.objects) == 2 and len(bpy.data.armatures) == 1
    info = assimp_info(path)
    assert info.nodes[:3] == ["Armature", "root", "hips"]
    arms, meshes = _import(path)
    assert len(arms[0].data.bones) == 105 and arms[0].data.bones["hips"].parent.name == "root"
    posed = _posed_after_import(arms[0], meshes[0])
    assert np.linalg.norm(posed - read_bundle(folder).posed_vertices, axis=1).max() < 1e-4


@needs_assimp
def test_unity_levels_of_detail(fresh_scene, anny_bundle, bundle, tmp_path):
    """LODs: NAME_LOD0..2 in one FBX (Unity's LOD-group convention), halving the triangles, each
    skinned to the one skeleton with its UVs, reproducing the photo's pose; the scene is as it was."""
    arm, mesh = scene.build_avatar(anny_bundle)
    objects = {o.name for o in bpy.data.objects}
    path = export_presets.export_fbx(arm, mesh, tmp_path / "lod.fbx", "unity", lods=2)
    assert {o.name for o in bpy.data.objects} == objects and len(bpy.data.meshes) == 1
    assert [m.type for m in mesh.modifiers] == ["ARMATURE"]  # the user's mesh is untouched
    info = assimp_info(path)
    assert info.counts["Meshes"] == 3  # (assimp counts bones per mesh)
    nodes = [n.split(" (")[0] for n in info.nodes if "_LOD" in n]  # Unity groups the nodes by name
    assert nodes == [f"{mesh.name}_LOD{i}" for i in range(3)], info.nodes
    faces = [f for _, _, _, f in info.meshes]  # in the nodes' order
    assert faces[0] == len(bundle.faces)
    for level in (1, 2):
        assert abs(faces[level] / faces[0] - 0.5 ** level) < 0.05, faces
    arms, meshes = _import(path)
    assert len(arms) == 1 and len(meshes) == 3 and len(arms[0].data.bones) == bundle.num_bones
    for m in meshes:
        assert len(m.vertex_groups) > 50 and m.data.uv_layers and m.find_armature() == arms[0]
        posed = _posed_after_import(arms[0], m)
        d, _ = cKDTree(bundle.posed_vertices).query(posed)
        assert np.percentile(d, 95) < 0.01, (m.name, np.percentile(d, 95))  # on the posed body, within 1 cm
    with pytest.raises(export_presets.ExportError, match="levels of detail are for the unity preset"):
        export_presets.export_fbx(arm, mesh, tmp_path / "u.fbx", "unreal", lods=1)
    with pytest.raises(export_presets.ExportError, match="choose 0 to 3"):
        export_presets.export_fbx(arm, mesh, tmp_path / "u.fbx", "unity", lods=4)


# -- command-line jobs -------------------------------------------------------------------

def _run_job(module: str, *args: str, timeout: float = 300) -> tuple[int, list[dict]]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout, check=False)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]  # stdout is JSON only
    return proc.returncode, lines


def test_export_avatar_job(anny_bundle, tmp_path):
    out = tmp_path / "exports"
    rc, lines = _run_job("zeroavatar_blender.blender_jobs.export_avatar", "--bundle", str(anny_bundle),
                         "--out", str(out), "--presets", "gltf,unreal")
    assert rc == protocol.EXIT_OK, lines
    assert lines[-1]["type"] == "done" and lines[-1]["status"] == "ok"
    written = {Path(e["path"]).name: e for e in lines if e["type"] == "export"}
    assert set(written) == {"test_subject.glb", "test_subject_unreal.fbx", "avatar.glb", "avatar.fbx"}
    for name, event in written.items():
        assert (out / name).stat().st_size == event["bytes"] > 100_000
    assert (out / "avatar.glb").read_bytes()[:4] == b"glTF"


@needs_assimp
def test_export_avatar_job_levels_of_detail(anny_bundle, tmp_path):
    """--lods reaches the Unity FBX, and so avatar.fbx (what `generate --lods` asks for)."""
    out = tmp_path / "exports"
    rc, lines = _run_job("zeroavatar_blender.blender_jobs.export_avatar", "--bundle", str(anny_bundle),
                         "--out", str(out), "--presets", "unity", "--lods", "1")
    assert rc == protocol.EXIT_OK, lines
    for name in ("test_subject_unity.fbx", "avatar.fbx"):
        info = assimp_info(out / name)
        assert info.counts["Meshes"] == 2 and [n for n in info.nodes if "_LOD" in n][1].startswith("test_subject_body_LOD1")


def test_export_avatar_job_errors(tmp_path):
    rc, lines = _run_job("zeroavatar_blender.blender_jobs.export_avatar", "--bundle", str(tmp_path),
                         "--out", str(tmp_path / "o"))
    assert rc == protocol.EXIT_BAD_INPUT
    assert lines[-1]["type"] == "error" and "no avatar bundle" in lines[-1]["message"]
    rc, _ = _run_job("zeroavatar_blender.blender_jobs.export_avatar", "--bundle", str(tmp_path),
                     "--out", str(tmp_path), "--presets", "maya")
    assert rc == protocol.EXIT_USAGE


def test_blender_side_never_imports_torch_or_the_engine():
    modules = ["zeroavatar_blender.blender_jobs.export_avatar", "zeroavatar_blender.blender_jobs.turntable",
               "zeroavatar_blender.addon.scene", "zeroavatar_blender.addon.pose_io",
               "zeroavatar_blender.addon.export_presets"]
    code = (f"import sys, importlib; [importlib.import_module(m) for m in {modules!r}];"
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('zeroavatar_blender.engine')];"
            "print(bad); sys.exit(1 if bad else 0)")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255


@pytest.mark.parametrize("engine, extra", [("workbench", []), ("cycles", ["--samples", "4", "--no-denoise"])])
def test_turntable_job(anny_bundle, tmp_path, engine, extra):
    views, size = (3, 64) if engine == "workbench" else (1, 48)
    rc, lines = _run_job("zeroavatar_blender.blender_jobs.turntable", "--bundle", str(anny_bundle),
                         "--out", str(tmp_path), "--views", str(views), "--size", str(size), "--engine", engine, *extra)
    assert rc == 0, lines
    renders = [e for e in lines if e["type"] == "render"]
    assert [e["azimuth"] for e in renders] == [360.0 * i / views for i in range(views)]
    for e in renders:
        img = _png(Path(e["path"]))
        assert img.shape == (size, size, 3)
        background = img[0, 0]
        subject = np.abs(img - background).sum(-1) > 0.1
        assert 0.02 < subject.mean() < 0.6, "the avatar should fill part of the frame"
    summary = next(e for e in lines if e["type"] == "turntable")
    cols = int(np.ceil(np.sqrt(views)))
    sheet = _png(Path(summary["contact_sheet"]))
    assert sheet.shape == (int(np.ceil(views / cols)) * size, cols * size, 3)
    np.testing.assert_allclose(sheet[:size, :size], _png(Path(renders[0]["path"])), atol=1 / 255)


def test_turntable_of_a_glb(exported, tmp_path):
    rc, lines = _run_job("zeroavatar_blender.blender_jobs.turntable", "--glb", str(exported["gltf"]),
                         "--out", str(tmp_path), "--views", "1", "--size", "48", "--engine", "workbench")
    assert rc == 0, lines
    img = _png(Path(lines[0]["path"]))
    assert (np.abs(img - img[0, 0]).sum(-1) > 0.1).mean() > 0.02
    rc, lines = _run_job("zeroavatar_blender.blender_jobs.turntable", "--glb", str(tmp_path / "none.glb"),
                         "--out", str(tmp_path))
    assert rc == protocol.EXIT_BAD_INPUT and lines[-1]["type"] == "error"
