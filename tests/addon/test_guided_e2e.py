"""The guided Blender workflow end to end, from the extension zip a user installs, with the real
engine as a subprocess: Fit Body -> a pose edit in Pose Mode -> Optimise (streamed previews) ->
Cancel -> Resume -> Finalise -> every export preset, read back by independent readers.

Module mode has no timers, so the test pumps ``client.poll_all`` (the add-on's timer function)
in a loop. The optimisation is made tiny through ZEROAVATAR_ENGINE_EXTRA_ARGS (the engine's
``--steps`` / ``--set``), so the whole path takes a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import bpy
import numpy as np
import pytest
import torch
from bpy_extras.object_utils import world_to_camera_view
from mathutils import Quaternion, Vector

from tests.tools import assimp_info, validate_gltf
from zeroavatar_blender import protocol
from zeroavatar_blender.blender_jobs import package
from zeroavatar_blender.engine.body import load_body
from zeroavatar_blender.engine.body.base import BodyParams

REPO_MODULE = "zeroavatar_e2e"  # the temporary user extension repository
ADDON = f"bl_ext.{REPO_MODULE}.zeroavatar_blender"
STEPS = 90  # enough that the cancel below lands before the run ends, however fast the steps are
# The engine's tiny settings (as tests/engine/test_faults.py), with enough body distillation that
# the field has a surface from the first step (fewer steps leave it empty for a while: no previews).
TINY = {"n_levels": 6, "log2_hashmap_size": 12, "max_resolution": 128, "n_samples": 24, "ref_resolution": 64,
        "ref_rays": 256, "novel_resolution": 24, "distill_steps": 60, "mesh_every": 3, "mesh_resolution": 32,
        "checkpoint_every": 3}
# The pose edit: (bone, axis in the bone's frame, angle): an arm raised, an elbow and a knee bent.
EDITS = (("upperarm01.L", (0.0, 0.0, 1.0), 0.6), ("lowerarm01.L", (1.0, 0.0, 0.0), 0.5),
         ("lowerleg01.R", (1.0, 0.0, 0.0), -0.6))
MM = 1e-3

pytestmark = pytest.mark.usefixtures("require_validator", "require_assimp")


def pump(timeout: float, until=None, on_call=None) -> None:
    """Call poll_all like Blender's timer until ``until()`` or until no job is left."""
    client = sys.modules[f"{ADDON}.addon.client"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        interval = client.poll_all()
        if on_call is not None:
            on_call()
        if interval is None or (until is not None and until()):
            return
        time.sleep(client.POLL_INTERVAL_S)
    client.stop_all(timeout=2.0)
    props = bpy.context.scene.zeroavatar
    raise AssertionError(f"timed out after {timeout} s: {props.status} {props.stage} {props.message} "
                         f"{props.error_message} {props.log_tail}")


def assert_done(props) -> None:
    assert props.status == "DONE", (props.job_kind, props.error_message, props.error_hint, props.log_tail)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The extension as a user gets it: built into a zip, installed with Blender's extension
    installer into a fresh user repository, enabled. Yields its modules; removed afterwards."""
    import addon_utils

    zip_path = package.build_zip(tmp_path_factory.mktemp("dist"))
    assert package.check_zip(zip_path) == []
    if bpy.context.preferences.addons.get("zeroavatar_blender") is not None:  # the checkout's copy
        addon_utils.disable("zeroavatar_blender", default_set=True)
    bpy.ops.wm.read_homefile(use_empty=True, use_factory_startup=True)
    repo_dir = tmp_path_factory.mktemp("extensions")
    repo = bpy.context.preferences.extensions.repos.new(name="ZeroAvatar E2E", module=REPO_MODULE,
                                                        custom_directory=str(repo_dir), source="USER")
    try:
        result = bpy.ops.extensions.package_install_files(filepath=str(zip_path), repo=REPO_MODULE,
                                                          enable_on_install=True)
        assert result == {"FINISHED"}
        assert bpy.context.preferences.addons.get(ADDON) is not None, "installed but not enabled"
        installed_dir = repo_dir / "zeroavatar_blender"
        modules = SimpleNamespace(**{name: importlib.import_module(f"{ADDON}.addon.{name}")
                                     for name in ("client", "jobs", "scene", "pose_io", "bundle_io")})
        assert Path(modules.jobs.PACKAGE_DIR) == installed_dir  # really the installed copy
        yield SimpleNamespace(dir=installed_dir, repo_dir=repo_dir, **vars(modules))
    finally:
        modules_client = sys.modules.get(f"{ADDON}.addon.client")
        if modules_client is not None:
            modules_client.stop_all(timeout=2.0)
        if bpy.context.preferences.addons.get(ADDON) is not None:
            addon_utils.disable(ADDON, default_set=True)
        bpy.context.preferences.extensions.repos.remove(repo)


@pytest.fixture(scope="module")
def photo(anny_body, tmp_path_factory) -> Path:
    from PIL import Image

    from tests.engine.photos import arm_pose, render_person

    render = render_person(anny_body, 384, 480, pose=arm_pose(anny_body))
    path = tmp_path_factory.mktemp("photo") / "guided person.png"
    Image.fromarray(render.rgb).save(path)
    return path


def bundle_offset(bundle_dir: Path) -> np.ndarray:
    return np.asarray(json.loads((bundle_dir / "avatar.json").read_text())["pose_frame"]["offset"], dtype=np.float64)


def check_photo_camera(ext, job: Path, props, scene: bpy.types.Scene, bundle: str) -> None:
    """The scene camera is the fitted camera in the frame of the avatar shown (built from
    JOB/``bundle``), with the engine's copy of the photo behind it."""
    cam = props.camera
    assert cam is not None and scene.camera == cam and cam.type == "CAMERA"
    bg = cam.data.background_images
    assert cam.data.show_background_images and len(bg) == 1
    assert Path(bpy.path.abspath(bg[0].image.filepath)) == Path(ext.jobs.job_photo(job)) and bg[0].image.size[0] > 0
    fit = json.loads((job / "fit.json").read_text())["camera"]
    assert (scene.render.resolution_x, scene.render.resolution_y) == (fit["width"], fit["height"])
    # The fitted camera (photo world), moved into the fit body's frame, projects like Blender's.
    K, w2c = np.asarray(fit["K"]), np.asarray(fit["world_to_cam"])
    shift = np.eye(4)
    shift[:3, 3] = -bundle_offset(job / bundle)
    w2c = w2c @ shift
    verts = ext.scene.evaluated_vertices(props.mesh)[::400]
    cam_pts = verts @ w2c[:3, :3].T + w2c[:3, 3]
    expected = (cam_pts @ K.T)[:, :2] / cam_pts[:, 2:]
    W, H = fit["width"], fit["height"]
    got = []
    for p in verts:
        ndc = world_to_camera_view(scene, cam, Vector(p))
        got.append((ndc.x * W - 0.5, (1.0 - ndc.y) * H - 0.5))
    err = np.abs(np.asarray(got) - expected).max()
    assert err < 0.05, f"the scene camera projects {err:.3f} px away from the fitted camera"
    inside = (expected[:, 0] > 0) & (expected[:, 0] < W) & (expected[:, 1] > 0) & (expected[:, 1] < H)
    assert inside.mean() > 0.95, "the fitted body is not in the photo camera's frame"


def edit_pose(arm: bpy.types.Object) -> None:
    """What a user does after Adjust Pose: rotate bones in Pose Mode."""
    assert bpy.ops.zeroavatar.edit_pose() == {"FINISHED"}
    assert bpy.context.object == arm and arm.mode == "POSE"
    for name, axis, angle in EDITS:
        pb = arm.pose.bones[name]
        pb.rotation_mode = "QUATERNION"
        pb.rotation_quaternion = pb.rotation_quaternion @ Quaternion(axis, angle)
    bpy.context.view_layer.update()


def engine_body(body, bundle_dir: Path) -> np.ndarray:
    """The engine's posed body of a bundle (its body_params), in the bundle's frame."""
    params = BodyParams.from_json(json.loads((bundle_dir / "avatar.json").read_text())["body_params"], body.dtype)
    with torch.no_grad():
        return body.forward(params).vertices[0].double().numpy() + bundle_offset(bundle_dir)


def stage_times(job: Path) -> str:
    """Seconds per engine command and stage, from the job's events (for the test's printout)."""
    parts, command, last, stage = [], "", 0.0, ""
    for e in protocol.iter_events(job / "events.jsonl"):
        if e["type"] in ("started", "stage", "done"):
            if stage:
                parts.append(f"{command}/{stage} {e['time'] - last:.0f}")
            command = e.get("command", command)
            stage = e.get("stage", "") if e["type"] == "stage" else ("start" if e["type"] == "started" else "")
            last = e["time"]
    return ", ".join(parts)


def test_guided_workflow_from_the_installed_zip(installed, photo, tmp_path, monkeypatch):
    ext = installed
    started = time.monotonic()
    timings: dict[str, float] = {}
    extra = [f"--steps {STEPS}", "--texture-size 512"] + [f"--set {k}={json.dumps(v)}" for k, v in TINY.items()]
    monkeypatch.setenv("ZEROAVATAR_ENGINE_EXTRA_ARGS", " ".join(extra))
    monkeypatch.delenv("ZEROAVATAR_JOBS_DIR", raising=False)
    prefs = bpy.context.preferences.addons[ADDON].preferences
    prefs.auto_detect = False
    prefs.engine_python = sys.executable  # this environment has the engine's packages
    prefs.device = "cpu"
    scene = bpy.context.scene
    props = scene.zeroavatar

    # 1. Fit Body -------------------------------------------------------------------------------
    assert not bpy.ops.zeroavatar.fit_body.poll()  # no photo yet
    props.photo_path = str(photo)
    assert bpy.ops.zeroavatar.fit_body() == {"FINISHED"}
    job = Path(props.job_dir)
    assert job.parts[-5:-1] == (".user", REPO_MODULE, "zeroavatar_blender", "jobs")  # the extension's user folder
    assert props.status == "RUNNING" and props.job_kind == "fit" and bpy.ops.zeroavatar.cancel.poll()
    pump(600)
    assert_done(props)
    timings["fit"] = time.monotonic() - started
    arm, body_mesh = props.armature, props.mesh
    assert arm.type == "ARMATURE" and len(arm.data.bones) == 104
    assert Path(arm[ext.scene.PROP_BUNDLE]) == job / "fit_body"
    assert body_mesh.type == "MESH" and body_mesh.parent == arm and len(body_mesh.data.vertices) == 13718
    assert any(m.type == "ARMATURE" and m.object == arm for m in body_mesh.modifiers)
    assert len(body_mesh.vertex_groups) == 104
    fit_bundle = ext.bundle_io.read_bundle(job / "fit_body")
    fitted = ext.scene.evaluated_vertices(body_mesh)
    assert np.linalg.norm(fitted - fit_bundle.posed_vertices, axis=1).max() < MM
    check_photo_camera(ext, job, props, scene, "fit_body")

    # 2. Adjust Pose ----------------------------------------------------------------------------
    edit_pose(arm)
    edited = ext.scene.evaluated_vertices(body_mesh)  # Blender's deformed body, fit_body frame
    moved = np.linalg.norm(edited - fitted, axis=1)
    assert moved.max() > 0.1 and (moved < 1e-6).mean() > 0.3, "the edit should move the arm and a leg only"
    scene.frame_set(scene.frame_current + 5)  # scrubbing the timeline keeps the edit (the fit is not keyed)
    assert np.abs(ext.scene.evaluated_vertices(body_mesh) - edited).max() < 1e-6

    # 3. Optimise: previews stream into one preview object ---------------------------------------
    props.quality = "standard"
    t0 = time.monotonic()
    assert bpy.ops.zeroavatar.optimise() == {"FINISHED"}  # still in Pose Mode, as a user would be
    edit = protocol.read_pose_edit(job / "pose_edit.json")
    assert edit["bundle"] == "fit_body" and edit["bone_names"] == fit_bundle.bone_names
    edit_bones = np.asarray(edit["bone_pose"])
    active = next(j for j in ext.client.ACTIVE.values() if j.kind == "optimise")
    seen: list[tuple[int, int, int, float]] = []  # (object, mesh, previews applied, checksum of positions)

    def watch() -> None:
        obj = props.preview
        if obj is not None and (not seen or seen[-1][2] != active.previews_applied):
            co = np.empty(len(obj.data.vertices) * 3, dtype=np.float32)
            obj.data.attributes["position"].data.foreach_get("vector", co)
            seen.append((obj.as_pointer(), obj.data.as_pointer(), active.previews_applied, float(co.sum())))

    pump(600, until=lambda: active.previews_applied >= 3, on_call=watch)
    assert props.status == "RUNNING", "the optimisation ended before it could be cancelled"
    preview = props.preview
    assert len({s[0] for s in seen}) == 1 and len({s[1] for s in seen}) == 1, "the preview was not updated in place"
    assert len({s[3] for s in seen}) >= 3, "the streamed meshes did not change the preview"
    assert preview.name in scene.objects and preview.data.color_attributes.get("Color") is not None
    colours = preview.data.color_attributes["Color"]
    assert colours.domain == "POINT" and len(colours.data) == len(preview.data.vertices) > 100
    with np.load(active.mesh_applied) as streamed:  # the newest file shown is what the engine wrote
        assert len(streamed["vertices"]) == len(preview.data.vertices)
    assert preview.data.validate(verbose=False) is False

    # 4. Cancel: the engine stops at its next step and keeps a checkpoint -------------------------
    assert bpy.ops.zeroavatar.cancel() == {"FINISHED"}
    pump(120)
    timings["optimise until cancelled"] = time.monotonic() - t0
    assert props.status == "CANCELLED" and "Resume" in props.message
    assert not active.client.is_alive and active.client.state.exit_code == protocol.EXIT_CANCELLED
    events = list(protocol.iter_events(job / "events.jsonl"))
    assert events[-1]["type"] == "done" and events[-1]["status"] == "cancelled"
    checkpoints = sorted((job / "checkpoints").glob("step_*.pt"))
    cancelled_at = int(checkpoints[-1].stem.split("_")[1])
    assert checkpoints and 0 < cancelled_at < STEPS
    assert props.preview is not None  # the last preview stays until there is a result
    assert bpy.ops.zeroavatar.resume.poll() and not bpy.ops.zeroavatar.cancel.poll()

    # 5. Resume to the end (the engine finishes the optimisation and builds the avatar) ------------
    t0 = time.monotonic()
    assert bpy.ops.zeroavatar.resume() == {"FINISHED"}
    pump(900)
    timings["resume"] = time.monotonic() - t0
    assert_done(props)
    events = list(protocol.iter_events(job / "events.jsonl"))
    run = events[max(i for i, e in enumerate(events) if e["type"] == "started"):]
    resumed = [e["message"] for e in run if e["type"] == "message" and e["message"].startswith("Resuming from step")]
    assert resumed and int(resumed[0].split()[3]) == cancelled_at
    steps = [e["step"] for e in run if e["type"] == "progress" and e["stage"] == "optimise"]
    assert steps[0] == cancelled_at + 1 and steps[-1] == STEPS
    assert props.preview is None and "preview" not in " ".join(o.name for o in scene.objects)
    assert Path(props.armature[ext.scene.PROP_BUNDLE]) == job / "result"
    assert len([o for o in scene.objects if o.type == "ARMATURE"]) == 1  # the fit body was replaced
    assert any(e["type"] == "export" for e in run)  # the engine's own exports of job.json ran too

    # 6. Finalise: the rigged avatar in the edited pose ------------------------------------------
    t0 = time.monotonic()
    assert bpy.ops.zeroavatar.finalise() == {"FINISHED"}
    pump(900)
    timings["finalise"] = time.monotonic() - t0
    assert_done(props)
    arm, mesh = props.armature, props.mesh
    result = ext.bundle_io.read_bundle(job / "result")
    assert result.meta["quality"] == "standard" and result.meta["optimised_steps"] == STEPS
    assert result.num_bones == 104 and mesh.data.materials[0] is not None
    deformed = ext.scene.evaluated_vertices(mesh)
    err = np.linalg.norm(deformed - result.posed_vertices, axis=1).max()
    assert err < MM, f"Blender's deformed avatar is {err * 1000:.3f} mm from the engine's posed avatar"
    # The engine's posed body is the body Blender showed after the edit (frames differ by offsets).
    body = load_body("anny")
    engine_edited = engine_body(body, job / "result") - bundle_offset(job / "result") + bundle_offset(job / "fit_body")
    err = np.linalg.norm(engine_edited - edited, axis=1)
    assert err.max() < MM, f"the engine's body is {err.max() * 1000:.3f} mm from Blender's edited body"
    unedited = engine_body(body, job / "fit_body")  # the fitted pose, as the fit bundle has it
    assert np.linalg.norm(unedited - fitted, axis=1).max() < MM
    assert np.linalg.norm(unedited - engine_edited, axis=1).max() > 0.1
    # The final armature holds the edited bone matrices (in its own frame).
    final_bones = ext.pose_io.read_bone_pose(arm).copy()
    final_bones[:, :3, 3] += bundle_offset(job / "fit_body") - bundle_offset(job / "result")
    assert np.abs(final_bones[:, :3, :3] - edit_bones[:, :3, :3]).max() < 1e-3
    assert np.abs(final_bones[:, :3, 3] - edit_bones[:, :3, 3]).max() < MM
    assert len([o for o in scene.objects if o.type == "CAMERA"]) == 1
    check_photo_camera(ext, job, props, scene, "result")  # the camera followed the avatar's frame

    # 7. Export presets, read by independent tools -----------------------------------------------
    t0 = time.monotonic()
    out = tmp_path / "exports"
    for preset in ("unity", "unreal", "godot"):
        path = out / f"avatar_{preset}.fbx"
        assert bpy.ops.zeroavatar.export_fbx(filepath=str(path), preset=preset) == {"FINISHED"}
        info = assimp_info(path)
        assert info.counts["Meshes"] == 1 and info.counts["Bones"] == result.num_bones, (preset, info.counts)
        assert set(result.bone_names) <= set(info.nodes), preset
        assert not any(n.endswith("_end") for n in info.nodes)
        (_, _, bones, faces), = info.meshes
        assert bones == result.num_bones and faces == len(result.faces)
        lo, hi = info.bounds
        scale = 100.0 if preset == "unreal" else 1.0
        assert hi[1] - lo[1] == pytest.approx(np.ptp(result.vertices[:, 2]) * scale, rel=1e-3)
        if preset == "unreal":
            assert info.nodes[:2] == ["Armature", "root"]
    glb = out / "avatar.glb"
    assert bpy.ops.zeroavatar.export_gltf(filepath=str(glb)) == {"FINISHED"}
    report = validate_gltf(glb)
    assert report["issues"]["numErrors"] == 0, [m for m in report["issues"]["messages"] if m["severity"] == 0]
    assert report["info"]["hasSkins"] and report["info"]["hasTextures"] and report["info"]["maxInfluences"] <= 4
    timings["exports"] = time.monotonic() - t0
    assert arm.mode == "OBJECT" or arm.mode == "POSE"  # the user's mode survives exporting
    import addon_utils

    assert addon_utils.check(ADDON) == (True, True), "the extension should still be enabled"
    timings["total"] = time.monotonic() - started
    print("\nguided workflow timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    print("engine stages (s): " + stage_times(job))
