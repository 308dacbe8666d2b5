"""Operators: start engine jobs (one click or guided steps), cancel them, export the avatar.

Every operator that starts the engine returns at once; ``client.poll_all`` (a timer) applies the
results. Operators that need a running job / a fitted body / an avatar say so in ``poll`` so the
buttons grey out instead of failing.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

import bpy
from bpy.props import EnumProperty, IntProperty, StringProperty
from bpy_extras.io_utils import ExportHelper

from . import client, jobs
from .preferences import body_args, engine_env_extra, find_engine, get_prefs, gpu_memory_args, weights_args
from .properties import EXPORT_PRESET_ITEMS

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# Advanced (studios, tests): extra arguments for the engine's commands that optimise (generate,
# optimise), shell-quoted, e.g. "--steps 200 --set n_samples=96" (see `--set` in the engine CLI).
EXTRA_ARGS_ENV = "ZEROAVATAR_ENGINE_EXTRA_ARGS"
IMAGE_GLOB = ";".join("*" + e for e in IMAGE_EXTENSIONS)


def scene_props(context: bpy.types.Context) -> Any:
    return context.scene.zeroavatar


def is_running(context: bpy.types.Context) -> bool:
    return client.active_job(context.scene) is not None


def job_dir(context: bpy.types.Context) -> Path | None:
    path = scene_props(context).job_dir
    return Path(bpy.path.abspath(path)) if path else None


def check_photo(path: str) -> Path:
    """A readable image file by name; the engine checks its content."""
    if not path:
        raise ValueError("choose a photo first")
    photo = Path(bpy.path.abspath(path))
    if not photo.is_file():
        raise ValueError(f"the photo does not exist: {photo}")
    if photo.suffix.lower() not in IMAGE_EXTENSIONS:
        raise ValueError(f"{photo.name} is not a supported image ({', '.join(IMAGE_EXTENSIONS)})")
    return photo


def resolved_quality(context: bpy.types.Context) -> str:
    quality = scene_props(context).quality
    return get_prefs(context).default_quality if quality == "DEFAULT" else quality


def find_engine_or_report(op: bpy.types.Operator, context: bpy.types.Context) -> client.EnginePython | None:
    """The engine's Python, or None after telling the user (panel and report) what to do."""
    if jobs.PACKAGE_DIR.name != "zeroavatar_blender":
        op.report({"ERROR"}, f"The add-on folder must be named zeroavatar_blender (it is {jobs.PACKAGE_DIR.name}); "
                             "install it as an extension from the release zip")
        return None
    try:
        return find_engine(get_prefs(context))
    except client.EngineNotFoundError as exc:
        hint = "Install the engine in the add-on preferences, or set Engine Python"
        scene_props(context).error_message = str(exc)
        scene_props(context).error_hint = hint
        op.report({"ERROR"}, f"{exc}. {hint}")
        return None


def start_engine(op: bpy.types.Operator, context: bpy.types.Context, engine: client.EnginePython, kind: str,
                 args: list[str], job: Path, avatar_name: str, photo: str = "") -> set[str]:
    """Spawn the engine for this scene; report a clear error instead of raising."""
    env = client.engine_env(jobs.package_parent(), engine_env_extra(get_prefs(context)))
    try:
        client.launch(context.scene, kind, client.engine_command(kind, *args), job, engine.path, env,
                      avatar_name, photo)
    except OSError as exc:
        op.report({"ERROR"}, f"Cannot start the engine {engine.path}: {exc}")
        return {"CANCELLED"}
    op.report({"INFO"}, f"ZeroAvatar: {kind} started in {job}")
    return {"FINISHED"}


def photo_job_args(context: bpy.types.Context, photo: Path, job: Path) -> list[str]:
    prefs = get_prefs(context)
    props = scene_props(context)
    args = [str(photo), "--out", str(job), *body_args(prefs), "--device", prefs.device, "--progress", "none"]
    if props.person > 0:
        args += ["--person", str(props.person)]
    height_m = jobs.height_in_metres(props.height, context.scene.unit_settings.scale_length)
    if height_m is not None:
        args += ["--height", f"{height_m:.4f}"]
    return args


def extra_engine_args() -> list[str]:
    """``ZEROAVATAR_ENGINE_EXTRA_ARGS`` split like a shell would (no shell runs); ValueError when
    the quoting is broken."""
    text = os.environ.get(EXTRA_ARGS_ENV, "")
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise ValueError(f"{EXTRA_ARGS_ENV} is not valid shell quoting ({exc}): {text!r}") from exc


def quality_args(context: bpy.types.Context, quality: str | None = None) -> list[str]:
    """--quality (and the weights for full), the GPU memory limit, then the advanced extra
    arguments (last, so a studio's --set wins)."""
    quality = quality or resolved_quality(context)
    prefs = get_prefs(context)
    args = ["--quality", quality]
    if quality == "full":
        args += weights_args(prefs)
    if quality != "fast":
        args += gpu_memory_args(prefs)
    return args + extra_engine_args()


class ZEROAVATAR_OT_generate(bpy.types.Operator):
    bl_idname = "zeroavatar.generate"
    bl_label = "Generate Avatar from Image"
    bl_description = "Choose a photo of one person and build a rigged, textured avatar from it"
    bl_options = {"REGISTER"}

    filepath: StringProperty(subtype="FILE_PATH", options={"SKIP_SAVE"})
    filter_glob: StringProperty(default=IMAGE_GLOB, options={"HIDDEN"})
    filter_image: bpy.props.BoolProperty(default=True, options={"HIDDEN"})
    filter_folder: bpy.props.BoolProperty(default=True, options={"HIDDEN"})

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        if is_running(context):
            cls.poll_message_set("A ZeroAvatar job is running in this scene")
            return False
        return True

    def invoke(self, context: bpy.types.Context, event: bpy.types.Event) -> set[str]:
        if not self.filepath and scene_props(context).photo_path:
            self.filepath = bpy.path.abspath(scene_props(context).photo_path)
        context.window_manager.fileselect_add(self)
        return {"RUNNING_MODAL"}

    def execute(self, context: bpy.types.Context) -> set[str]:
        try:
            photo = check_photo(self.filepath)
        except ValueError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        scene_props(context).photo_path = str(photo)
        engine = find_engine_or_report(self, context)
        if engine is None:
            return {"CANCELLED"}
        try:
            optimise_args = quality_args(context)
        except ValueError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        job = jobs.new_job_dir(photo)
        args = [*photo_job_args(context, photo, job), *optimise_args, "--no-export"]
        return start_engine(self, context, engine, "generate", args, job, jobs.subject_from_photo(photo), str(photo))


class ZEROAVATAR_OT_fit_body(bpy.types.Operator):
    bl_idname = "zeroavatar.fit_body"
    bl_label = "Fit Body"
    bl_description = "Fit the body to the photo and show it with the photo camera, ready for pose adjustment"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        if is_running(context):
            cls.poll_message_set("A ZeroAvatar job is running in this scene")
            return False
        if not scene_props(context).photo_path:
            cls.poll_message_set("Choose a photo first")
            return False
        return True

    def execute(self, context: bpy.types.Context) -> set[str]:
        try:
            photo = check_photo(scene_props(context).photo_path)
        except ValueError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        engine = find_engine_or_report(self, context)
        if engine is None:
            return {"CANCELLED"}
        job = jobs.new_job_dir(photo)
        return start_engine(self, context, engine, "fit", photo_job_args(context, photo, job), job,
                            jobs.subject_from_photo(photo), str(photo))


def send_pose_edit(op: bpy.types.Operator, context: bpy.types.Context, job: Path) -> bool:
    """Write the job's armature pose as JOB/pose_edit.json (the user may have corrected the fit
    in Pose Mode); False after reporting when it cannot be written."""
    arm = scene_props(context).armature
    if arm is None or arm.get("zeroavatar_job") != str(job):
        return True
    from . import pose_io

    try:
        context.view_layer.update()  # pose_bone.matrix is current only after an evaluation
        pose_io.write_pose_edit(job, arm)
    except Exception as exc:  # noqa: BLE001 - show it, do not start with a stale pose
        op.report({"ERROR"}, f"Cannot save the pose edit: {exc}")
        return False
    return True


def _fitted(cls: type, context: bpy.types.Context) -> bool:
    if is_running(context):
        cls.poll_message_set("A ZeroAvatar job is running in this scene")
        return False
    if not jobs.has_fit(scene_props(context).job_dir):
        cls.poll_message_set("Fit the body first")
        return False
    return True


class ZEROAVATAR_OT_optimise(bpy.types.Operator):
    bl_idname = "zeroavatar.optimise"
    bl_label = "Optimise"
    bl_description = ("Optimise the avatar (Standard / Full quality; Fast has nothing to optimise, so it runs "
                      "Standard) using the body's current pose; adjust the pose in Pose Mode first if the fit is off")

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return _fitted(cls, context)

    def execute(self, context: bpy.types.Context) -> set[str]:
        props = scene_props(context)
        job = job_dir(context)
        quality = resolved_quality(context)
        if quality == "fast":  # the engine would finish at once with nothing done
            quality = "standard"
            self.report({"INFO"}, "Fast quality has no optimisation: optimising at Standard quality")
        try:
            args = [str(job), *quality_args(context, quality), "--progress", "none",
                    "--device", get_prefs(context).device]
        except ValueError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        engine = find_engine_or_report(self, context)
        if engine is None:
            return {"CANCELLED"}
        if not send_pose_edit(self, context, job):
            return {"CANCELLED"}
        return start_engine(self, context, engine, "optimise", args, job, props.avatar_name or job.name,
                            props.photo_path)


class ZEROAVATAR_OT_edit_pose(bpy.types.Operator):
    bl_idname = "zeroavatar.edit_pose"
    bl_label = "Adjust Pose"
    bl_description = "Select the fitted body's armature and enter Pose Mode to correct the fitted pose"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        arm = scene_props(context).armature
        if arm is None or arm.name not in context.view_layer.objects:
            cls.poll_message_set("Fit the body first")
            return False
        return not is_running(context)

    def execute(self, context: bpy.types.Context) -> set[str]:
        arm = scene_props(context).armature
        if context.object is not None and context.object.mode != "OBJECT":
            bpy.ops.object.mode_set(mode="OBJECT")
        for obj in context.selected_objects:
            obj.select_set(False)
        arm.select_set(True)
        context.view_layer.objects.active = arm
        bpy.ops.object.mode_set(mode="POSE")
        return {"FINISHED"}


class ZEROAVATAR_OT_finalise(bpy.types.Operator):
    bl_idname = "zeroavatar.finalise"
    bl_label = "Finalise"
    bl_description = "Build the rigged, textured avatar from the fitted (and optimised) job"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return _fitted(cls, context)

    def execute(self, context: bpy.types.Context) -> set[str]:
        props = scene_props(context)
        job = job_dir(context)
        engine = find_engine_or_report(self, context)
        if engine is None or not send_pose_edit(self, context, job):
            return {"CANCELLED"}
        return start_engine(self, context, engine, "finalise", [str(job), "--no-export", "--progress", "none"],
                            job, props.avatar_name or job.name, props.photo_path)


class ZEROAVATAR_OT_resume(bpy.types.Operator):
    bl_idname = "zeroavatar.resume"
    bl_label = "Resume"
    bl_description = "Continue a cancelled or interrupted job from its last checkpoint"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        props = scene_props(context)
        if is_running(context) or props.status not in ("CANCELLED", "INTERRUPTED", "FAILED"):
            return False
        return jobs.has_job(props.job_dir)

    def execute(self, context: bpy.types.Context) -> set[str]:
        props = scene_props(context)
        job = job_dir(context)
        engine = find_engine_or_report(self, context)
        if engine is None:
            return {"CANCELLED"}
        return start_engine(self, context, engine, "resume", [str(job), "--progress", "none"], job,
                            props.avatar_name or job.name, props.photo_path)


class ZEROAVATAR_OT_cancel(bpy.types.Operator):
    bl_idname = "zeroavatar.cancel"
    bl_label = "Cancel"
    bl_description = "Stop the engine at its next step (a checkpoint is kept for Resume)"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return is_running(context)

    def execute(self, context: bpy.types.Context) -> set[str]:
        job = client.active_job(context.scene)
        if job is not None:
            job.client.cancel()
            scene_props(context).message = "Cancelling..."
        return {"FINISHED"}


class ZEROAVATAR_OT_dismiss_error(bpy.types.Operator):
    bl_idname = "zeroavatar.dismiss_error"
    bl_label = "Dismiss"
    bl_description = "Hide the last error"

    def execute(self, context: bpy.types.Context) -> set[str]:
        props = scene_props(context)
        props.error_message = props.error_hint = props.log_tail = ""
        props.error_code = 0
        return {"FINISHED"}


class ZEROAVATAR_OT_open_job_folder(bpy.types.Operator):
    bl_idname = "zeroavatar.open_job_folder"
    bl_label = "Open Job Folder"
    bl_description = "Show the job folder (engine log, intermediate files) in the file manager"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        path = job_dir(context)
        return path is not None and path.is_dir()

    def execute(self, context: bpy.types.Context) -> set[str]:
        bpy.ops.wm.path_open(filepath=str(job_dir(context)))
        return {"FINISHED"}


def _has_avatar(cls: type, context: bpy.types.Context) -> bool:
    props = scene_props(context)
    if props.armature is None or props.mesh is None:
        cls.poll_message_set("Generate an avatar first")
        return False
    return True


class ZEROAVATAR_OT_export_fbx(bpy.types.Operator, ExportHelper):
    bl_idname = "zeroavatar.export_fbx"
    bl_label = "Export FBX"
    bl_description = "Export the avatar (armature + skinned mesh + texture) as FBX for a game engine"

    filename_ext = ".fbx"
    filter_glob: StringProperty(default="*.fbx", options={"HIDDEN"})
    preset: EnumProperty(name="Preset", items=EXPORT_PRESET_ITEMS, default="unity")
    lods: IntProperty(name="LODs", description="Levels of detail beyond the full mesh (Unity preset)",
                      default=0, min=0, max=3)

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return _has_avatar(cls, context)

    def invoke(self, context: bpy.types.Context, event: bpy.types.Event) -> set[str]:
        self.preset = scene_props(context).export_preset
        self.lods = scene_props(context).export_lods if self.preset == "unity" else 0
        return ExportHelper.invoke(self, context, event)

    def execute(self, context: bpy.types.Context) -> set[str]:
        from . import export_presets

        props = scene_props(context)
        try:
            export_presets.export_fbx(props.armature, props.mesh, Path(self.filepath), self.preset, self.lods)
        except Exception as exc:  # noqa: BLE001 - the exporter's own errors, shown to the user
            self.report({"ERROR"}, f"FBX export failed: {exc}")
            return {"CANCELLED"}
        self.report({"INFO"}, f"Exported {self.filepath}")
        return {"FINISHED"}


class ZEROAVATAR_OT_export_gltf(bpy.types.Operator, ExportHelper):
    bl_idname = "zeroavatar.export_gltf"
    bl_label = "Export glTF"
    bl_description = "Export the avatar as binary glTF 2.0 (GLB) with the texture embedded"

    filename_ext = ".glb"
    filter_glob: StringProperty(default="*.glb", options={"HIDDEN"})

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return _has_avatar(cls, context)

    def execute(self, context: bpy.types.Context) -> set[str]:
        from . import export_presets

        props = scene_props(context)
        try:
            export_presets.export_glb(props.armature, props.mesh, Path(self.filepath))
        except Exception as exc:  # noqa: BLE001
            self.report({"ERROR"}, f"glTF export failed: {exc}")
            return {"CANCELLED"}
        self.report({"INFO"}, f"Exported {self.filepath}")
        return {"FINISHED"}


CLASSES = (
    ZEROAVATAR_OT_generate,
    ZEROAVATAR_OT_fit_body,
    ZEROAVATAR_OT_edit_pose,
    ZEROAVATAR_OT_optimise,
    ZEROAVATAR_OT_finalise,
    ZEROAVATAR_OT_resume,
    ZEROAVATAR_OT_cancel,
    ZEROAVATAR_OT_dismiss_error,
    ZEROAVATAR_OT_open_job_folder,
    ZEROAVATAR_OT_export_fbx,
    ZEROAVATAR_OT_export_gltf,
)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)


def unregister() -> None:
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
