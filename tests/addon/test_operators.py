"""The add-on inside Blender (module mode): registration, panels, operators, and poll_all applying
a job's output to the scene, against the stand-in engine and, end to end, the real engine."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import bpy
import numpy as np
import pytest

from zeroavatar_blender import protocol
from zeroavatar_blender.addon import client, jobs, panels

ROOT = Path(__file__).resolve().parents[2]


def pump_all(timeout: float = 30.0, until=None) -> list[float]:
    """Call poll_all like Blender's timer (timers never fire in module mode); returns call times."""
    times = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        interval = client.poll_all()
        times.append(time.perf_counter() - t0)
        if (until is None and interval is None) or (until is not None and until()):
            return times
        time.sleep(0.02)
    client.stop_all(timeout=1.0)
    raise AssertionError(f"jobs still running after {timeout} s: {bpy.context.scene.zeroavatar.status}")


def launch_fake(fake_engine: Path, mode: str, job: Path, *extra: str, kind: str = "generate",
                photo: str = "") -> client.ActiveJob:
    env = client.engine_env(jobs.package_parent())
    return client.launch(bpy.context.scene, kind, [str(fake_engine), mode, str(job), *extra], job,
                         sys.executable, env, "Subject", photo)


def test_registered(addon):
    for name in ("VIEW3D_PT_zeroavatar", "VIEW3D_PT_zeroavatar_steps", "VIEW3D_PT_zeroavatar_export",
                 "VIEW3D_PT_zeroavatar_job"):
        panel = getattr(bpy.types, name)
        assert panel.bl_category == "ZeroAvatar" and panel.bl_space_type == "VIEW_3D" and panel.bl_region_type == "UI"
    for op in ("generate", "fit_body", "edit_pose", "optimise", "finalise", "resume", "cancel", "export_fbx",
               "export_gltf", "install_engine", "dismiss_error", "open_job_folder", "check_setup"):
        assert hasattr(bpy.types, f"ZEROAVATAR_OT_{op}"), op
    assert bpy.ops.zeroavatar.generate.poll()
    assert not bpy.ops.zeroavatar.cancel.poll()
    assert not bpy.ops.zeroavatar.optimise.poll() and not bpy.ops.zeroavatar.finalise.poll()
    assert not bpy.ops.zeroavatar.export_fbx.poll() and not bpy.ops.zeroavatar.export_gltf.poll()
    assert addon.default_quality == "fast" and addon.auto_detect


@pytest.mark.parametrize("name, message", [("missing.png", "does not exist"), ("notes.txt", "not a supported image")])
def test_generate_refuses_bad_photos(addon, tmp_path, name, message):
    path = tmp_path / name
    if name.endswith(".txt"):
        path.write_text("hello")
    with pytest.raises(RuntimeError, match=message):
        bpy.ops.zeroavatar.generate(filepath=str(path))
    assert bpy.context.scene.zeroavatar.status == "IDLE" and not client.ACTIVE


def test_missing_engine_python_is_a_clear_error(addon, tmp_path, monkeypatch):
    photo = tmp_path / "p.png"
    photo.write_bytes(b"\x89PNG\r\n\x1a\n")
    monkeypatch.setenv("ZEROAVATAR_JOBS_DIR", str(tmp_path / "jobs"))
    addon.auto_detect = False
    addon.engine_python = str(tmp_path / "no" / "python")
    try:
        with pytest.raises(RuntimeError, match="does not exist"):
            bpy.ops.zeroavatar.generate(filepath=str(photo))
    finally:
        addon.auto_detect = True
        addon.engine_python = ""
    props = bpy.context.scene.zeroavatar
    assert "does not exist" in props.error_message and "Install the engine" in props.error_hint


def test_result_builds_the_avatar_and_replaces_the_preview(addon, fake_engine, tmp_path, anny_bundle):
    job = tmp_path / "job"
    launch_fake(fake_engine, "ok", job, "--bundle", str(anny_bundle), "--mesh-pause", "0.6")
    props = bpy.context.scene.zeroavatar
    assert props.status == "RUNNING" and props.job_dir == str(job.absolute())
    assert not bpy.ops.zeroavatar.generate.poll() and bpy.ops.zeroavatar.cancel.poll()
    pump_all(until=lambda: props.preview is not None)
    assert len(props.preview.data.vertices) == 3 and props.preview.data.color_attributes
    times = pump_all()
    assert props.status == "DONE" and props.message == "Avatar ready" and props.progress == 1.0
    assert props.step == 5 and props.total == 5 and props.has_loss
    assert props.armature.type == "ARMATURE" and props.mesh.type == "MESH"
    assert props.preview is None and "Subject_preview" not in bpy.data.objects
    assert props.mesh.data.materials[0] is not None
    assert props.armature["zeroavatar_job"] == str(job.absolute())
    assert bpy.ops.zeroavatar.generate.poll() and not client.ACTIVE
    assert max(times) < 5.0  # loose: the real numbers are in the report, not asserted here


def test_fit_result_adds_the_photo_camera(addon, fake_engine, tmp_path, anny_bundle):
    photo = tmp_path / "photo.png"
    photo.write_bytes((anny_bundle / "texture.png").read_bytes())
    launch_fake(fake_engine, "ok", tmp_path / "job", "--bundle", str(anny_bundle), "--kind", "fit_body",
                kind="fit", photo=str(photo))
    pump_all()
    scene = bpy.context.scene
    cam = scene.zeroavatar.camera
    assert cam is not None and cam.type == "CAMERA" and scene.camera == cam
    assert cam.data.background_images[0].image.filepath == str(photo)
    assert (scene.render.resolution_x, scene.render.resolution_y) == (640, 960)


def test_rerun_of_a_job_replaces_its_avatar(addon, fake_engine, tmp_path, anny_bundle):
    job = tmp_path / "job"
    for _ in range(2):
        launch_fake(fake_engine, "ok", job, "--bundle", str(anny_bundle), kind="finalise")
        pump_all()
    assert sum(o.type == "ARMATURE" for o in bpy.data.objects) == 1
    assert sum(o.type == "MESH" for o in bpy.data.objects) == 1


def test_engine_failure_shows_error_and_hint(addon, fake_engine, tmp_path):
    launch_fake(fake_engine, "error", tmp_path / "job")
    pump_all()
    props = bpy.context.scene.zeroavatar
    assert props.status == "FAILED" and props.error_code == 4
    assert props.error_message == "no usable person in photo.png"
    assert props.error_hint == "use a photo with one whole person"
    bpy.ops.zeroavatar.dismiss_error()
    assert props.error_message == ""


def test_crash_log_reaches_the_panel(addon, fake_engine, tmp_path):
    launch_fake(fake_engine, "early_exit", tmp_path / "job")
    pump_all()
    props = bpy.context.scene.zeroavatar
    assert props.status == "FAILED" and "exit code 3" in props.error_message
    assert "the fake engine fell over" in props.log_tail


def test_broken_result_does_not_raise(addon, fake_engine, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "avatar.json").write_text("{not json")
    launch_fake(fake_engine, "ok", tmp_path / "job", "--bundle", str(broken))
    pump_all()  # poll_all must swallow the error
    props = bpy.context.scene.zeroavatar
    assert props.status == "FAILED"
    assert "could not apply" in props.error_message and "avatar.json" in props.error_message
    assert not client.ACTIVE


def test_cancel_operator(addon, fake_engine, tmp_path):
    job = launch_fake(fake_engine, "cooperative", tmp_path / "job")
    props = bpy.context.scene.zeroavatar
    pump_all(until=lambda: props.step >= 2)
    assert props.status == "RUNNING" and 0 < props.progress < 0.01
    bpy.ops.zeroavatar.cancel()
    pump_all(timeout=15)
    assert props.status == "CANCELLED" and not job.client.is_alive
    assert bpy.ops.zeroavatar.resume.poll() is False  # the stand-in wrote no job.json


def test_renaming_the_scene_keeps_the_job(addon, fake_engine, tmp_path):
    job = launch_fake(fake_engine, "cooperative", tmp_path / "job")
    scene = bpy.context.scene
    scene.name = "Renamed"
    pump_all(until=lambda: scene.zeroavatar.step >= 2)
    assert job.client.is_alive and job.scene_name == "Renamed"
    assert bpy.ops.zeroavatar.cancel.poll()
    client.stop_all(timeout=1.0)


def test_loading_a_file_stops_engines_and_marks_saved_jobs_interrupted(addon, fake_engine, tmp_path):
    job = launch_fake(fake_engine, "cooperative", tmp_path / "job")
    props = bpy.context.scene.zeroavatar
    pump_all(until=lambda: props.step >= 1)
    blend = tmp_path / "scene.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(blend))
    bpy.ops.wm.open_mainfile(filepath=str(blend))
    assert not job.client.is_alive and not client.ACTIVE
    props = bpy.context.scene.zeroavatar
    assert props.status == "INTERRUPTED" and "Resume" in props.message


def test_guided_optimise_sends_the_edited_pose(addon, fake_engine, tmp_path, anny_bundle):
    """Fit (stand-in) -> pose a bone -> Optimise writes pose_edit.json and starts the real engine
    on the job; this job folder has no job.json, so the engine refuses it, clearly."""
    job = tmp_path / "job"
    launch_fake(fake_engine, "ok", job, "--bundle", str(anny_bundle), "--kind", "fit_body", kind="fit")
    pump_all()
    assert not bpy.ops.zeroavatar.optimise.poll()  # no fit.json yet
    (job / "fit.json").write_text("{}")
    assert bpy.ops.zeroavatar.optimise.poll() and bpy.ops.zeroavatar.finalise.poll()
    assert bpy.ops.zeroavatar.edit_pose() == {"FINISHED"}
    arm = bpy.context.scene.zeroavatar.armature
    assert bpy.context.object == arm and arm.mode == "POSE"
    bone = arm.pose.bones["upperarm01.L"]
    bone.rotation_mode = "XYZ"
    bone.rotation_euler = (0.0, 0.0, 0.5)
    bpy.ops.object.mode_set(mode="OBJECT")
    assert bpy.ops.zeroavatar.optimise() == {"FINISHED"}
    edit = protocol.read_pose_edit(job / "pose_edit.json")  # the engine's reader: the contract
    names = edit["bone_names"]
    assert len(names) == len(arm.pose.bones) and np.asarray(edit["bone_pose"]).shape == (len(names), 4, 4)
    pump_all(timeout=120)
    props = bpy.context.scene.zeroavatar
    assert props.status == "FAILED" and props.job_kind == "optimise"
    assert "exit code 3" in props.error_message and "not a ZeroAvatar job folder" in props.log_tail


def test_known_height_goes_to_the_engine_in_metres(addon, tmp_path):
    """The Height property is a length in Blender units; the engine's --height is metres."""
    from zeroavatar_blender.addon import operators

    scene = bpy.context.scene
    props = scene.zeroavatar

    def height_arg() -> str | None:
        args = operators.photo_job_args(bpy.context, tmp_path / "p.png", tmp_path / "job")
        return args[args.index("--height") + 1] if "--height" in args else None

    assert props.height == 0 and height_arg() is None  # not known: the engine estimates it
    props.height = 1.8
    assert height_arg() == "1.8000"
    scene.unit_settings.scale_length = 0.01  # a centimetre scene: 180 units are 1.8 m
    props.height = 180.0
    assert height_arg() == "1.8000"


def test_install_engine_needs_online_access(addon):
    assert bpy.app.online_access is False  # module mode: Blender's default
    with pytest.raises(RuntimeError, match="Online access is off"):
        bpy.ops.zeroavatar.install_engine()


def test_install_plan():
    from zeroavatar_blender.addon.preferences import install_steps, requirements_files

    req, lock = requirements_files()
    assert req == ROOT / "requirements" / "engine.txt" and lock == ROOT / "requirements" / "engine-lock.txt"
    steps = install_steps("/usr/bin/python3", Path("/x/venv"), req, lock)
    assert [argv[:3] for _, argv in steps][0] == ["/usr/bin/python3", "-m", "venv"]
    assert steps[2][1][-4:] == ["-r", str(req), "-c", str(lock)]
    assert all(argv[0] == "/x/venv/bin/python" for _, argv in steps[1:])


# -- drawing: UILayout cannot exist headless, so record the calls and check them against RNA ---
class RecordingLayout:
    """Records what a panel draws and checks every call against bpy.types.UILayout's RNA: a
    misspelt property, operator, keyword or icon fails here instead of in the user's sidebar."""

    functions = bpy.types.UILayout.bl_rna.functions
    attributes = bpy.types.UILayout.bl_rna.properties

    def __init__(self, log: list) -> None:
        object.__setattr__(self, "log", log)

    def __setattr__(self, name, value):
        assert name in self.attributes, f"UILayout has no attribute {name!r}"

    def __getattr__(self, name):
        assert name in self.functions, f"UILayout has no function {name!r}"
        params = self.functions[name].parameters

        def call(*args, **kwargs):
            for key, value in kwargs.items():
                assert key in params, f"UILayout.{name} has no parameter {key!r}"
                if key == "icon":
                    assert value in params[key].enum_items, f"unknown icon {value!r}"
            if name == "prop":
                data, prop = args[0], args[1]
                assert prop in data.bl_rna.properties, f"{data} has no property {prop!r}"
            if name == "operator":
                module, op = args[0].split(".")
                assert hasattr(getattr(bpy.ops, module), op) and hasattr(bpy.types, f"{module.upper()}_OT_{op}"), args[0]
                self.log.append((name, args[0], kwargs.get("text")))
                return OperatorProps(getattr(getattr(bpy.ops, module), op))
            self.log.append((name, args, kwargs))
            if name in ("row", "column", "box", "split", "column_flow", "grid_flow"):
                return RecordingLayout(self.log)
            return None

        return call


class OperatorProps:
    def __init__(self, op) -> None:
        object.__setattr__(self, "props", op.get_rna_type().properties)

    def __setattr__(self, name, value):
        assert name in self.props, f"operator has no property {name!r}"


def draw(panel_cls, context) -> list:
    log: list = []

    class Self:
        layout = RecordingLayout(log)

    panel_cls.draw(Self(), context)
    return log


def test_panels_draw_every_state(addon, fake_engine, tmp_path, anny_bundle):
    ctx = bpy.context
    props = ctx.scene.zeroavatar
    every_panel = (panels.VIEW3D_PT_zeroavatar, panels.VIEW3D_PT_zeroavatar_steps, panels.VIEW3D_PT_zeroavatar_export,
                   panels.VIEW3D_PT_zeroavatar_job)
    for cls in every_panel:  # idle
        draw(cls, ctx)
    props.photo_path = str(anny_bundle / "texture.png")
    idle = draw(panels.VIEW3D_PT_zeroavatar, ctx)
    assert ("operator", "zeroavatar.generate", None) in idle
    # The thumbnail is loaded (headless Blender has no icons, so its icon id is 0 and it is not drawn).
    assert tuple(panels._previews[props.photo_path].image_size) == (256, 256)

    launch_fake(fake_engine, "cooperative", tmp_path / "job")
    pump_all(until=lambda: props.step >= 2)
    props.silent = 45.0
    running = draw(panels.VIEW3D_PT_zeroavatar, ctx)
    assert ("operator", "zeroavatar.cancel", None) in running
    progress = [e for e in running if e[0] == "progress"]
    assert progress and progress[0][2]["text"].startswith("Optimise") and "/2000" in progress[0][2]["text"]
    labels = " ".join(str(e[2].get("text")) for e in running if e[0] == "label")
    assert "elapsed" in labels and "left" not in labels and "No news from the engine" in labels
    client.stop_all(timeout=1.0)

    props.error_message = "x " * 200
    props.error_hint = "do this"
    props.log_tail = "line 1\nline 2"
    failed = draw(panels.VIEW3D_PT_zeroavatar, ctx)
    error_lines = [e for e in failed if e[0] == "label" and e[2].get("icon") in ("ERROR", "BLANK1")]
    assert len(error_lines) > 3  # long messages wrap
    for cls in every_panel:
        draw(cls, ctx)

    props.mesh = bpy.data.objects.new("avatar", bpy.data.meshes.new("avatar"))
    props.avatar_height, props.height_estimated = 1.62, True
    labels = " ".join(str(e[2].get("text")) for e in draw(panels.VIEW3D_PT_zeroavatar, ctx) if e[0] == "label")
    assert "Avatar height 1.62 m" in labels and "set Height" in labels
    props.height_estimated = False  # given by the user: no advice
    labels = " ".join(str(e[2].get("text")) for e in draw(panels.VIEW3D_PT_zeroavatar, ctx) if e[0] == "label")
    assert "Avatar height 1.62 m" in labels and "set Height" not in labels and "again" not in labels
    props.height = 1.8  # changed after the fit: the avatar does not have it yet
    labels = " ".join(str(e[2].get("text")) for e in draw(panels.VIEW3D_PT_zeroavatar, ctx) if e[0] == "label")
    assert "Height is now 1.8 m" in labels and "fit the body again" in labels
    props.height = 1.62
    labels = " ".join(str(e[2].get("text")) for e in draw(panels.VIEW3D_PT_zeroavatar, ctx) if e[0] == "label")
    assert "again" not in labels


def test_check_setup_asks_the_real_engine_and_the_preferences_show_its_report(addon):
    """Check Setup runs the engine's `check` with these preferences, in the background, and the
    preferences draw its report (what runs, what is missing and what to do)."""
    from zeroavatar_blender.addon import preferences

    addon.weights_source, addon.sd_folder = "FOLDER", "/nowhere/sd15"
    assert bpy.ops.zeroavatar.check_setup.poll()
    bpy.ops.zeroavatar.check_setup()
    assert not bpy.ops.zeroavatar.check_setup.poll()  # one at a time
    running = draw_preferences(addon)
    assert any(e[0] == "label" and str(e[2].get("text")).startswith("Checking") for e in running)
    deadline = time.monotonic() + 240
    while preferences.CHECKER.poll().status == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
    result = preferences.CHECKER.result
    assert result is not None, preferences.CHECKER.error
    assert result["can_run"]["fast"] and result["can_run"]["standard"] and not result["can_run"]["full"]
    weights = next(c for c in result["checks"] if c["name"].startswith("diffusion weights"))
    assert weights["status"] == "missing" and "/nowhere/sd15" in weights["detail"]  # the preference reached it
    shown = draw_preferences(addon)
    labels = [(str(e[2].get("text")), e[2].get("icon")) for e in shown if e[0] == "label"]
    assert any(t.startswith("person detection:") and icon == "CHECKMARK" for t, icon in labels)
    assert any(t.startswith("diffusion weights") and icon == "ERROR" for t, icon in labels)
    assert ("Can run: Fast yes, Standard yes, Full no", None) in labels
    assert ("operator", "zeroavatar.check_setup", "Prepare First Run") in shown


def draw_preferences(prefs) -> list:
    log: list = []

    class Self:
        layout = RecordingLayout(log)

        def __getattr__(self, name):
            return getattr(prefs, name)

    type(prefs).draw(Self(), bpy.context)
    return log


# -- end to end with the real engine ------------------------------------------------------------
@pytest.fixture(scope="module")
def person_photo(anny_body, tmp_path_factory) -> Path:
    from PIL import Image

    from tests.engine.photos import arm_pose, render_person

    render = render_person(anny_body, 384, 480, pose=arm_pose(anny_body))
    path = tmp_path_factory.mktemp("photo") / "synthetic person.png"
    Image.fromarray(render.rgb).save(path)
    return path


def test_generate_end_to_end_with_the_real_engine(addon, person_photo, tmp_path, monkeypatch):
    monkeypatch.setenv("ZEROAVATAR_JOBS_DIR", str(tmp_path / "jobs"))
    scene = bpy.context.scene
    props = scene.zeroavatar
    props.quality = "fast"
    props.height = 1.85  # metres (the photo's body is 1.63 m): the avatar must stand this tall
    assert bpy.ops.zeroavatar.generate(filepath=str(person_photo)) == {"FINISHED"}
    assert props.status == "RUNNING" and not bpy.ops.zeroavatar.generate.poll()
    times = pump_all(timeout=420)
    assert props.status == "DONE", (props.error_message, props.error_hint, props.log_tail)
    print(f"\npoll_all: {len(times)} calls, median {np.median(times) * 1e3:.2f} ms, "
          f"max {max(times) * 1e3:.1f} ms (the call that built the avatar)")
    arm, mesh = props.armature, props.mesh
    assert abs(props.avatar_height - 1.85) < 0.01 and not props.height_estimated  # the panel shows it
    assert arm.type == "ARMATURE" and len(arm.data.bones) > 50
    assert mesh.type == "MESH" and len(mesh.data.vertices) > 10000
    assert any(m.type == "ARMATURE" and m.object == arm for m in mesh.modifiers)
    material = mesh.data.materials[0]
    images = [n.image for n in material.node_tree.nodes if n.type == "TEX_IMAGE"]
    assert images and images[0].size[0] > 0

    def evaluated(obj):
        depsgraph = bpy.context.evaluated_depsgraph_get()
        ev = obj.evaluated_get(depsgraph)
        co = np.empty(len(ev.data.vertices) * 3)
        ev.data.vertices.foreach_get("co", co)
        return co.reshape(-1, 3)

    arm.data.pose_position = "REST"
    bpy.context.view_layer.update()
    rest_z = evaluated(mesh)[:, 2] * mesh.matrix_world.to_scale()[2]
    assert abs(float(rest_z.max() - rest_z.min()) - 1.85) < 0.02, float(rest_z.max() - rest_z.min())
    arm.data.pose_position = "POSE"
    bpy.context.view_layer.update()
    before = evaluated(mesh)
    bone = arm.pose.bones["upperarm01.L"] if "upperarm01.L" in arm.pose.bones else arm.pose.bones[5]
    bone.rotation_mode = "XYZ"
    bone.rotation_euler = (0.0, 0.0, 0.8)
    bpy.context.view_layer.update()
    moved = np.linalg.norm(evaluated(mesh) - before, axis=1)
    assert moved.max() > 0.05 and (moved < 1e-6).mean() > 0.3  # the arm moved, most of the body did not

    fbx, glb = tmp_path / "avatar.fbx", tmp_path / "avatar.glb"
    assert bpy.ops.zeroavatar.export_fbx(filepath=str(fbx), preset="unreal") == {"FINISHED"}
    assert bpy.ops.zeroavatar.export_gltf(filepath=str(glb)) == {"FINISHED"}
    for path, importer in ((fbx, bpy.ops.import_scene.fbx), (glb, bpy.ops.import_scene.gltf)):
        bpy.ops.wm.read_homefile(use_empty=True, use_factory_startup=True)
        importer(filepath=str(path))
        arms = [o for o in bpy.data.objects if o.type == "ARMATURE"]
        # (the glTF importer adds an "Icosphere" mesh as a bone display shape: count skinned meshes)
        meshes = [o for o in bpy.data.objects if o.type == "MESH" and any(m.type == "ARMATURE" for m in o.modifiers)]
        assert len(arms) == 1 and len(meshes) == 1, path
        assert len(meshes[0].vertex_groups) > 50 and len(arms[0].data.bones) > 50
