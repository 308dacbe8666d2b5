"""Per-scene state saved in the .blend: the photo, the job folder, progress, the last error, the
avatar's objects. Transient process handles live in ``client.ACTIVE``, never here."""

from __future__ import annotations

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, PointerProperty, StringProperty

QUALITY_ITEMS = [
    ("fast", "Fast", "Textured body fitted to the photo (seconds, CPU)"),
    ("standard", "Standard", "Field optimisation without diffusion (minutes on a CPU)"),
    ("full", "Full", "ZeroAvatar with Stable Diffusion + depth ControlNet (needs the weights and a GPU)"),
]
SCENE_QUALITY_ITEMS = [("DEFAULT", "Default", "The default quality set in the add-on preferences"), *QUALITY_ITEMS]
BODY_ITEMS = [
    ("anny", "Anny", "Free Anny body (Apache-2.0 / CC0), works offline"),
    ("smpl", "SMPL", "SMPL model file you downloaded under the SMPL licence"),
    ("smplx", "SMPL-X", "SMPL-X model file you downloaded under the SMPL-X licence"),
]
STATUS_ITEMS = [
    ("IDLE", "Idle", "No job has run in this scene"),
    ("RUNNING", "Running", "The engine is working"),
    ("DONE", "Done", "The last job finished"),
    ("FAILED", "Failed", "The last job failed"),
    ("CANCELLED", "Cancelled", "The last job was cancelled; it can be resumed"),
    ("INTERRUPTED", "Interrupted", "Blender closed while the engine ran; the job can be resumed"),
]
EXPORT_PRESET_ITEMS = [
    ("unity", "Unity", "FBX for Unity: metres, imports at scale 1"),
    ("unreal", "Unreal", "FBX for Unreal Engine: centimetres, a single root bone"),
    ("godot", "Godot", "FBX for Godot 4 (glTF is Godot's preferred format)"),
]


def _is_armature(_self: bpy.types.PropertyGroup, obj: bpy.types.Object) -> bool:
    return obj.type == "ARMATURE"


def _is_mesh(_self: bpy.types.PropertyGroup, obj: bpy.types.Object) -> bool:
    return obj.type == "MESH"


class ZeroAvatarSceneProperties(bpy.types.PropertyGroup):
    photo_path: StringProperty(name="Photo", description="Photo of one person", subtype="FILE_PATH")
    job_dir: StringProperty(name="Job Folder", description="The engine's folder for this scene's avatar",
                            subtype="DIR_PATH")
    job_kind: StringProperty(name="Job", description="What the engine was asked to do")
    status: EnumProperty(name="Status", items=STATUS_ITEMS, default="IDLE")
    quality: EnumProperty(name="Quality", items=SCENE_QUALITY_ITEMS, default="DEFAULT")
    person: IntProperty(name="Person", description="Which person in a group photo, 1 = leftmost; 0 = the largest",
                        default=0, min=0, soft_max=20)
    height: FloatProperty(name="Height", description="The person's standing height, if you know it: the avatar "
                          "gets it, and the fit the right distance. 0 = estimate it (a photo cannot tell a short "
                          "person nearby from a tall one further away)",
                          default=0.0, min=0.0, soft_max=2.2, subtype="DISTANCE", unit="LENGTH")

    stage: StringProperty(name="Stage")
    message: StringProperty(name="Message")
    step: IntProperty(name="Step", min=0)
    total: IntProperty(name="Total", min=0)
    progress: FloatProperty(name="Progress", subtype="FACTOR", min=0.0, max=1.0)
    loss: FloatProperty(name="Loss")
    has_loss: BoolProperty(name="Has Loss")
    eta: FloatProperty(name="ETA", description="Seconds left in this stage (-1: unknown)", default=-1.0)
    elapsed: FloatProperty(name="Elapsed", description="Seconds spent in this stage")
    silent: FloatProperty(name="Silent", description="Seconds since the engine last reported")

    error_code: IntProperty(name="Error Code")
    error_message: StringProperty(name="Error")
    error_hint: StringProperty(name="Hint")
    log_tail: StringProperty(name="Engine Log", description="Last lines of the engine log of a failed run")
    garbage_lines: IntProperty(name="Unreadable Event Lines")

    avatar_name: StringProperty(name="Avatar Name")
    avatar_height: FloatProperty(name="Avatar Height", description="The fitted body's standing height in metres "
                                 "(0: not known)", default=0.0, min=0.0)
    height_estimated: BoolProperty(name="Height Estimated",
                                   description="The avatar's height was guessed from the photo, not given")
    armature: PointerProperty(name="Armature", type=bpy.types.Object, poll=_is_armature)
    mesh: PointerProperty(name="Mesh", type=bpy.types.Object, poll=_is_mesh)
    preview: PointerProperty(name="Preview", type=bpy.types.Object, poll=_is_mesh)
    camera: PointerProperty(name="Photo Camera", type=bpy.types.Object)
    export_preset: EnumProperty(name="Preset", items=EXPORT_PRESET_ITEMS, default="unity")
    export_lods: IntProperty(name="LODs", description="Levels of detail beyond the full mesh, each half the "
                             "triangles of the one before (NAME_LOD0, NAME_LOD1, ...: Unity makes a LOD Group)",
                             default=0, min=0, max=3)


CLASSES = (ZeroAvatarSceneProperties,)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.zeroavatar = PointerProperty(type=ZeroAvatarSceneProperties)


def unregister() -> None:
    if hasattr(bpy.types.Scene, "zeroavatar"):
        del bpy.types.Scene.zeroavatar
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
