"""Job folders and what a running job does to its scene.

A job folder lives in the extension's user folder (kept across add-on upgrades), or, when the
add-on runs from a checkout / as a plain module, in Blender's user data folder. The scene names
its folder (``scene.zeroavatar.job_dir``) so a saved .blend can resume or re-export it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import bpy
import numpy as np

from .. import protocol
from .client import ActiveJob, EngineState

log = logging.getLogger(__name__)

TOP_PACKAGE = __package__.rpartition(".")[0]  # "zeroavatar_blender" or "bl_ext.<repo>.zeroavatar_blender"
PACKAGE_DIR = Path(__file__).resolve().parents[1]
PREVIEW_MIN_INTERVAL_S = 0.5
STATUS_BY_STATE = {"running": "RUNNING", "done": "DONE", "failed": "FAILED", "cancelled": "CANCELLED", "idle": "IDLE"}


def package_parent() -> Path:
    """The folder holding the ``zeroavatar_blender`` package: the engine's PYTHONPATH. An installed
    extension's folder is named by its id, so this works for a checkout and an extension alike."""
    return PACKAGE_DIR.parent


def user_dir(sub: str = "", create: bool = True) -> Path:
    """A writable folder of this add-on that survives upgrades."""
    try:
        path = Path(bpy.utils.extension_path_user(TOP_PACKAGE, path=sub, create=create))
    except ValueError:  # not running as an extension (checkout, module mode)
        base = bpy.utils.user_resource("DATAFILES", path="zeroavatar_blender", create=create)
        path = Path(base) / sub if sub else Path(base)
        if create:
            path.mkdir(parents=True, exist_ok=True)
    return path


def jobs_root() -> Path:
    """``ZEROAVATAR_JOBS_DIR`` (scripts, the demo) or the add-on's user folder."""
    env = os.environ.get("ZEROAVATAR_JOBS_DIR")
    if env:
        path = Path(env).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        return path
    return user_dir("jobs")


def subject_from_photo(photo: Path) -> str:
    text = re.sub(r"[^A-Za-z0-9]+", "_", Path(photo).stem).strip("_")
    return text[:40] or "avatar"


def new_job_dir(photo: Path, root: Path | None = None) -> Path:
    """A fresh folder named after the time and the photo (names are protocol-safe)."""
    root = Path(root) if root is not None else jobs_root()
    base = f"{time.strftime('%Y%m%d-%H%M%S')}_{subject_from_photo(photo)}"
    path = root / base
    n = 1
    while path.exists():
        n += 1
        path = root / f"{base}_{n}"
    path.mkdir(parents=True)
    return path


def read_job_settings(job_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads(protocol.JobLayout(Path(job_dir)).job_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def job_photo(job_dir: Path, fallback: str = "") -> str:
    """The engine's copy of the photo (input/...), else the user's original."""
    rel = read_job_settings(job_dir).get("photo")
    if isinstance(rel, str) and rel:
        try:
            path = protocol.resolve_inside(Path(job_dir), rel)
            if path.is_file():
                return str(path)
        except protocol.ProtocolError:
            pass
    return bpy.path.abspath(fallback) if fallback else ""


def has_fit(job_dir: str) -> bool:
    return bool(job_dir) and protocol.JobLayout(Path(bpy.path.abspath(job_dir))).fit_json.is_file()


def has_job(job_dir: str) -> bool:
    return bool(job_dir) and protocol.JobLayout(Path(bpy.path.abspath(job_dir))).job_json.is_file()


# -- scene side of a running job ------------------------------------------------------------
def mark_started(scene: bpy.types.Scene, job: ActiveJob) -> None:
    props = scene.zeroavatar
    props.job_dir = str(job.client.job_dir)
    props.job_kind = job.kind
    props.avatar_name = job.avatar_name
    props.error_message = props.error_hint = props.log_tail = ""
    props.error_code = 0
    props.garbage_lines = 0
    write_state(job, job.client.state)


def find_scene(job: ActiveJob) -> bpy.types.Scene | None:
    """The job's scene by name, or, if it was renamed, by the job folder it names."""
    scene = bpy.data.scenes.get(job.scene_name)
    if scene is not None:
        return scene
    for scene in bpy.data.scenes:
        if scene.zeroavatar.job_dir == str(job.client.job_dir):
            job.scene_name = scene.name
            return scene
    return None


def write_state(job: ActiveJob, state: EngineState) -> None:
    """Copy the client's state into the scene's properties (what the panel draws)."""
    scene = find_scene(job)
    if scene is None:
        return
    p = scene.zeroavatar
    _set(p, "status", STATUS_BY_STATE.get(state.status, "FAILED"))
    _set(p, "stage", state.stage)
    _set(p, "message", state.message[:1024])
    _set(p, "step", max(0, state.step))
    _set(p, "total", max(0, state.total))
    _set(p, "progress", state.fraction)
    _set(p, "has_loss", state.loss is not None)
    if state.loss is not None:
        _set(p, "loss", state.loss)
    _set(p, "eta", -1.0 if state.eta is None else state.eta)
    _set(p, "elapsed", state.elapsed)
    _set(p, "silent", 0.0 if state.finished else float(int(state.silent_for())))  # whole seconds: fewer writes
    _set(p, "garbage_lines", state.garbage_lines)
    if state.error_message:
        _set(p, "error_code", state.error_code or 0)
        _set(p, "error_message", state.error_message[:1024])
        _set(p, "error_hint", state.error_hint[:1024])
    if state.log_tail:
        _set(p, "log_tail", "\n".join(state.log_tail)[-4000:])


def _set(props: Any, name: str, value: Any) -> None:
    """Assign only on change: every write tags the scene for redraw and undo."""
    if getattr(props, name) != value:
        setattr(props, name, value)


def apply_poll(job: ActiveJob, events: list[dict[str, Any]], state: EngineState) -> None:
    """What ``poll_all`` does with one job's news: progress, the newest preview mesh, the avatar.

    A new preview mesh is spread over three timer calls, so that none holds the UI for long (a
    40k-vertex mesh costs ~20 ms of CPU in all): read and check the file, find its edges (numpy),
    write it into the preview object (bpy). Previews are spaced so they take at most ~5% of the
    UI's time.
    """
    scene = find_scene(job)
    if scene is None:  # the scene was deleted: nobody is watching this job
        job.client.stop(timeout=1.0)
        return
    results = [e for e in events if e["type"] == "result" and e.get("_path") is not None]
    if results:
        job.pending_preview = None
        _build_result(scene, job, results[-1])
    elif not job.built:
        if job.pending_preview is not None:
            _advance_preview(scene, job)
        elif state.mesh_path not in (None, job.mesh_applied) and (
                time.monotonic() >= job.preview_due or state.finished):
            _read_preview(job, state.mesh_path)
    write_state(job, state)
    if state.finished:
        _finished(scene, job, state)
    _status_text(_status_line(scene.zeroavatar, state) if not state.finished else None)
    redraw()


def preview_pending(job: ActiveJob) -> bool:
    """Whether the newest streamed mesh is not shown yet (poll_all keeps a finished job until it is)."""
    return not job.built and (job.pending_preview is not None
                              or job.client.state.mesh_path not in (None, job.mesh_applied))


def _read_preview(job: ActiveJob, path: Path) -> None:
    """Load and check the engine's file (numpy only); ``_advance_preview`` does the rest."""
    from . import scene as scene_ops

    started = time.monotonic()
    job.mesh_applied = path
    try:
        with np.load(path, allow_pickle=False) as z:
            colors = np.asarray(z["colors"]) if "colors" in z.files else None
            job.pending_preview = scene_ops.prepare_preview_mesh(z["vertices"], z["faces"], colors)
    except Exception as exc:  # noqa: BLE001 - a half-written or bad preview is skipped, not fatal
        log.warning("skipping preview mesh %s: %s", path, exc)
        job.pending_preview = None
    job.preview_seconds = time.monotonic() - started


def _advance_preview(scene: bpy.types.Scene, job: ActiveJob) -> None:
    """The next step of a pending preview: its edges (numpy) when the triangles are new, else
    writing it into the scene's preview object, in place."""
    from . import scene as scene_ops

    prepared = job.pending_preview
    started = time.monotonic()
    preview = scene.zeroavatar.preview
    if prepared.edge_verts is None and not scene_ops.same_topology(preview, prepared):
        job.pending_preview = prepared.with_edges()
        job.preview_seconds += time.monotonic() - started
        return
    job.pending_preview = None
    name = preview.name if preview is not None else f"{job.avatar_name}_preview"
    obj = scene_ops.apply_preview_mesh(name, prepared, collection=scene.collection)
    if preview != obj:
        scene.zeroavatar.preview = obj
    job.previews_applied += 1
    spent = job.preview_seconds + time.monotonic() - started
    job.preview_due = time.monotonic() + max(PREVIEW_MIN_INTERVAL_S, 20 * spent)


def _build_result(scene: bpy.types.Scene, job: ActiveJob, event: dict[str, Any]) -> None:
    from . import scene as scene_ops

    props = scene.zeroavatar
    fitted_body = job.kind == "fit" or event["_path"].name == "fit_body"
    _remove_job_objects(scene, job)
    # The fitted body is there to be posed by hand: its pose is not keyed, so a frame change does
    # not silently undo the user's edit (the final avatar's pose is keyed, for exports).
    armature, mesh = scene_ops.build_avatar(event["_path"], name=job.avatar_name, collection=scene.collection,
                                            key_pose=not fitted_body)
    for obj in (armature, mesh):
        obj["zeroavatar_job"] = str(job.client.job_dir)
    props.armature, props.mesh = armature, mesh
    props.avatar_height, props.height_estimated = fitted_height(job.client.job_dir)
    job.built = True
    if props.preview is not None:
        preview = props.preview
        props.preview = None
        bpy.data.objects.remove(preview, do_unlink=True)
    camera = props.camera
    if fitted_body or (camera is not None and camera.get("zeroavatar_job") == str(job.client.job_dir)):
        _add_camera(scene, job, event["_path"])  # a later bundle of the job has its own frame: follow it


def height_in_metres(value: float, scale_length: float) -> float | None:
    """The Height property in metres (a length property holds Blender units, each
    ``scale_length`` metres), None when it is 0: not known."""
    return value * (scale_length or 1.0) if value > 0 else None


def fitted_height(job_dir: Path) -> tuple[float, bool]:
    """The job's fitted standing height in metres (0 when unknown) and whether it was estimated
    rather than given by the user, from fit.json."""
    try:
        metrics = json.loads(protocol.JobLayout(job_dir).fit_json.read_text(encoding="utf-8")).get("metrics") or {}
        height = float(metrics.get("height_m") or 0.0)
    except (OSError, ValueError, AttributeError, TypeError):
        return 0.0, False
    return height, height > 0 and not metrics.get("height_given_m")


def _add_camera(scene: bpy.types.Scene, job: ActiveJob, bundle_dir: Path) -> None:
    from . import scene as scene_ops

    try:
        meta = json.loads((Path(bundle_dir) / "avatar.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = {}
    camera = meta.get("camera") if isinstance(meta, dict) else None
    if not isinstance(camera, dict):
        try:
            camera = json.loads(protocol.JobLayout(job.client.job_dir).fit_json.read_text(encoding="utf-8")).get("camera")
        except (OSError, ValueError, AttributeError):
            camera = None
    if not isinstance(camera, dict):
        log.warning("no camera in %s; the photo camera is not added", bundle_dir)
        return
    old = scene.zeroavatar.camera
    cam = scene_ops.add_photo_camera(camera, job_photo(job.client.job_dir, job.photo_path),
                                     collection=scene.collection, scene=scene)
    if old is not None and old != cam and old.get("zeroavatar_job") == str(job.client.job_dir):
        name = old.name
        bpy.data.objects.remove(old, do_unlink=True)
        cam.name = name
    cam["zeroavatar_job"] = str(job.client.job_dir)
    scene.zeroavatar.camera = cam


def _remove_job_objects(scene: bpy.types.Scene, job: ActiveJob) -> None:
    """A rerun of the same job (fit -> finalise) replaces its avatar instead of adding another."""
    props = scene.zeroavatar
    for attr in ("armature", "mesh"):
        obj = getattr(props, attr)
        if obj is not None and obj.get("zeroavatar_job") == str(job.client.job_dir):
            setattr(props, attr, None)
            data = obj.data
            bpy.data.objects.remove(obj, do_unlink=True)
            if data is not None and data.users == 0:
                (bpy.data.armatures if attr == "armature" else bpy.data.meshes).remove(data)


def _finished(scene: bpy.types.Scene, job: ActiveJob, state: EngineState) -> None:
    props = scene.zeroavatar
    if state.status == "done":
        props.message = "Avatar ready" if job.built else "Finished"
        props.progress = 1.0
    elif state.status == "cancelled":
        props.message = "Cancelled; Resume continues from the last checkpoint"


def _status_line(props: Any, state: EngineState) -> str:
    text = f"ZeroAvatar: {state.stage or 'starting'}"
    if state.total:
        text += f" {state.step}/{state.total}"
    if state.eta is not None:
        text += f", {format_seconds(state.eta)} left"
    return text


def _status_text(text: str | None) -> None:
    """Blender's status bar, where a window exists (not in module mode without a UI)."""
    try:
        workspace = bpy.context.workspace
        if workspace is not None:
            workspace.status_text_set(text)
    except (AttributeError, RuntimeError, TypeError):
        pass


def redraw() -> None:
    wm = getattr(bpy.context, "window_manager", None)
    if wm is None:
        return
    for window in wm.windows:
        screen = window.screen
        if screen is None:
            continue
        for area in screen.areas:
            if area.type in ("VIEW_3D", "PREFERENCES"):
                area.tag_redraw()


def format_seconds(seconds: float) -> str:
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"
