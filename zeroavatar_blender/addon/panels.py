"""The "ZeroAvatar" tab of the 3D viewport's sidebar: one-click generate, progress, guided steps,
export, and the last error with what to do about it. Drawing only reads scene properties."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import bpy

from . import client, jobs

_previews: Any = None  # bpy.utils.previews collection for the photo thumbnail


def photo_icon(path: str) -> int:
    """Icon id of a thumbnail of ``path`` (0 when there is none)."""
    if _previews is None or not path:
        return 0
    full = bpy.path.abspath(path)
    if not Path(full).is_file():
        return 0
    if full not in _previews:
        _previews.load(full, full, "IMAGE")
    return _previews[full].icon_id


def wrap(layout: bpy.types.UILayout, text: str, width_px: int, icon: str = "NONE") -> None:
    """Labels do not wrap: split long messages into lines that fit the sidebar."""
    chars = max(20, int(width_px / 7))
    first = True
    for paragraph in text.splitlines() or [""]:
        for line in textwrap.wrap(paragraph, chars) or [""]:
            layout.label(text=line, icon=icon if first else "BLANK1")
            first = False


def _width(context: bpy.types.Context) -> int:
    region = getattr(context, "region", None)
    return region.width if region is not None else 300


class ZeroAvatarPanel:
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "ZeroAvatar"


class VIEW3D_PT_zeroavatar(ZeroAvatarPanel, bpy.types.Panel):
    bl_idname = "VIEW3D_PT_zeroavatar"
    bl_label = "ZeroAvatar"

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        props = context.scene.zeroavatar
        icon = photo_icon(props.photo_path)
        if icon:
            layout.template_icon(icon_value=icon, scale=6.0)
        layout.prop(props, "quality")
        layout.prop(props, "height")
        row = layout.row()
        row.scale_y = 1.6
        row.operator("zeroavatar.generate", icon="OUTLINER_OB_ARMATURE")
        running = client.active_job(context.scene) is not None
        if running:
            draw_progress(layout, props)
            layout.operator("zeroavatar.cancel", icon="CANCEL")
        elif props.message and props.status in ("DONE", "CANCELLED", "INTERRUPTED"):
            layout.label(text=props.message, icon="CHECKMARK" if props.status == "DONE" else "INFO")
            if props.status != "DONE":
                layout.operator("zeroavatar.resume", icon="PLAY")
        if props.mesh is not None and props.avatar_height > 0:
            draw_height(layout, props, context.scene, _width(context))
        if props.error_message:
            draw_error(layout, props, _width(context))


def draw_height(layout: bpy.types.UILayout, props: Any, scene: bpy.types.Scene, width: int) -> None:
    """The avatar's standing height; an estimate says so, since a photo cannot tell size from
    distance and the user may know better."""
    system = scene.unit_settings.system if scene.unit_settings.system != "NONE" else "METRIC"

    def length(metres: float) -> str:
        return bpy.utils.units.to_string(system, "LENGTH", metres, precision=3)

    asked = jobs.height_in_metres(props.height, scene.unit_settings.scale_length)
    text = f"Avatar height {length(props.avatar_height)}"
    if asked is not None and (props.height_estimated or abs(asked - props.avatar_height) > 0.01):
        wrap(layout, f"{text}: Height is now {length(asked)}; fit the body again (or generate) to use it",
             width, icon="ERROR")
    elif props.height_estimated:
        wrap(layout, text + " (estimated from the photo: set Height above if you know it)", width, icon="INFO")
    else:
        layout.label(text=text, icon="EMPTY_SINGLE_ARROW")


def draw_progress(layout: bpy.types.UILayout, props: Any) -> None:
    col = layout.column(align=True)
    text = props.stage.capitalize() or "Starting"
    if props.total:
        text += f"  {props.step}/{props.total}"
    col.progress(factor=props.progress, type="BAR", text=text)
    if props.message:
        col.label(text=props.message)
    details = [f"{jobs.format_seconds(props.elapsed)} elapsed"] if props.elapsed > 0 else []
    if props.eta >= 0:
        details.append(f"{jobs.format_seconds(props.eta)} left")
    if props.has_loss:
        details.append(f"loss {props.loss:.4g}")
    if details:
        col.label(text=", ".join(details))
    if props.silent > 30:
        col.label(text=f"No news from the engine for {jobs.format_seconds(props.silent)}", icon="TIME")


def draw_error(layout: bpy.types.UILayout, props: Any, width: int) -> None:
    box = layout.box()
    wrap(box, props.error_message, width, icon="ERROR")
    if props.error_hint:
        wrap(box, props.error_hint, width, icon="INFO")
    if props.log_tail:
        col = box.column(align=True)
        col.scale_y = 0.7
        for line in props.log_tail.splitlines()[-8:]:
            col.label(text=line[:120])
    row = box.row()
    row.operator("zeroavatar.dismiss_error", icon="X")
    row.operator("zeroavatar.open_job_folder", icon="FILE_FOLDER")


class VIEW3D_PT_zeroavatar_steps(ZeroAvatarPanel, bpy.types.Panel):
    bl_idname = "VIEW3D_PT_zeroavatar_steps"
    bl_label = "Guided Steps"
    bl_parent_id = "VIEW3D_PT_zeroavatar"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        props = context.scene.zeroavatar
        layout.prop(props, "photo_path")
        layout.prop(props, "person")
        layout.prop(props, "height")
        col = layout.column(align=True)
        col.operator("zeroavatar.fit_body", text="1. Fit Body", icon="ARMATURE_DATA")
        col.operator("zeroavatar.edit_pose", text="2. Adjust Pose", icon="POSE_HLT")
        col.operator("zeroavatar.optimise", text="3. Optimise", icon="SHADERFX")
        col.operator("zeroavatar.finalise", text="4. Finalise", icon="CHECKMARK")
        layout.label(text="5. Export below", icon="EXPORT")


class VIEW3D_PT_zeroavatar_export(ZeroAvatarPanel, bpy.types.Panel):
    bl_idname = "VIEW3D_PT_zeroavatar_export"
    bl_label = "Export"
    bl_parent_id = "VIEW3D_PT_zeroavatar"

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        props = context.scene.zeroavatar
        layout.prop(props, "export_preset")
        if props.export_preset == "unity":
            layout.prop(props, "export_lods")
        op = layout.operator("zeroavatar.export_fbx", icon="EXPORT")
        op.preset = props.export_preset
        op.lods = props.export_lods if props.export_preset == "unity" else 0
        layout.operator("zeroavatar.export_gltf", icon="EXPORT")


class VIEW3D_PT_zeroavatar_job(ZeroAvatarPanel, bpy.types.Panel):
    bl_idname = "VIEW3D_PT_zeroavatar_job"
    bl_label = "Job"
    bl_parent_id = "VIEW3D_PT_zeroavatar"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        props = context.scene.zeroavatar
        col = layout.column(align=True)
        col.label(text=f"Status: {props.status.capitalize()} ({props.job_kind or 'none'})")
        if props.job_dir:
            col.label(text=Path(props.job_dir).name, icon="FILE_FOLDER")
        if props.garbage_lines:
            col.label(text=f"{props.garbage_lines} unreadable engine lines skipped", icon="ERROR")
        row = layout.row()
        row.operator("zeroavatar.open_job_folder", icon="FILE_FOLDER")
        row.operator("zeroavatar.resume", icon="PLAY")


CLASSES = (VIEW3D_PT_zeroavatar, VIEW3D_PT_zeroavatar_steps, VIEW3D_PT_zeroavatar_export, VIEW3D_PT_zeroavatar_job)


def register() -> None:
    global _previews
    import bpy.utils.previews

    _previews = bpy.utils.previews.new()
    for cls in CLASSES:
        bpy.utils.register_class(cls)


def unregister() -> None:
    global _previews
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
    if _previews is not None:
        bpy.utils.previews.remove(_previews)
        _previews = None
