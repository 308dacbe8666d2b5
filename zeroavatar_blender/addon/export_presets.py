"""Export an avatar (armature + skinned mesh) for game engines with Blender's own exporters.

Presets:
  unity   FBX, metres with "FBX Units Scale" applied to all (Unity imports at scale 1, no
          100x root), -Z forward / Y up, deform bones only, the photo's pose as a one-frame take.
          Optionally levels of detail: the mesh at full, 1/2, 1/4, ... of its triangles, named
          NAME_LOD0, NAME_LOD1, ... (Unity's importer makes a LOD Group of them), all skinned.
  unreal  FBX in centimetres (the avatar is ~170 units tall), a single root bone named "root"
          (added when the skeleton lacks one), the armature node named "Armature" (Unreal's
          importer drops that node instead of making it an extra bone).
  godot   FBX for Godot 4's ufbx importer (metres, Y up). glTF is Godot's preferred format:
          the "gltf" preset's GLB imports without any settings and is the better choice.
  gltf    GLB: texture embedded, skins with at most 4 normalised influences per vertex,
          deform bones only, rest pose as bind pose, the photo's pose as an animation.

Only the avatar's two objects are exported (use_selection); the user's selection is restored.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import bpy
from mathutils import Vector

PRESETS = ("unity", "unreal", "godot", "gltf")
LOD_PRESETS = ("unity",)  # whose importer builds a LOD group from NAME_LOD0, NAME_LOD1, ... meshes
MAX_LODS = 3  # levels beyond LOD0, each half the triangles of the one before


@dataclass(frozen=True)
class FbxPreset:
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    root_bone: str | None = None  # ensure a single root bone of this name
    armature_node_name: str | None = None  # name the armature object this while exporting


_FBX_COMMON: dict[str, Any] = {
    "use_selection": True,
    "object_types": {"ARMATURE", "MESH"},
    "add_leaf_bones": False,
    "use_armature_deform_only": True,
    "primary_bone_axis": "Y",
    "secondary_bone_axis": "X",
    "armature_nodetype": "NULL",
    "use_mesh_modifiers": True,  # the exporter leaves armature modifiers out of skinned meshes
    "mesh_smooth_type": "FACE",
    "path_mode": "COPY",
    "embed_textures": True,
    "axis_forward": "-Z",
    "axis_up": "Y",
    "bake_space_transform": False,  # documented as broken with armatures
    "bake_anim": True,
    "bake_anim_use_all_bones": True,
    "bake_anim_use_nla_strips": False,
    "bake_anim_use_all_actions": False,  # only the avatar's own pose action
    "bake_anim_force_startend_keying": True,
    "bake_anim_simplify_factor": 0.0,
    "use_metadata": True,
    "check_existing": False,
}

FBX_PRESETS: dict[str, FbxPreset] = {
    "unity": FbxPreset("unity", {**_FBX_COMMON, "global_scale": 1.0, "apply_unit_scale": True,
                                 "apply_scale_options": "FBX_SCALE_ALL"}),
    "unreal": FbxPreset("unreal", {**_FBX_COMMON, "global_scale": 1.0, "apply_unit_scale": True,
                                   "apply_scale_options": "FBX_SCALE_NONE"},
                        root_bone="root", armature_node_name="Armature"),
    "godot": FbxPreset("godot", {**_FBX_COMMON, "global_scale": 1.0, "apply_unit_scale": True,
                                 "apply_scale_options": "FBX_SCALE_UNITS"}),
}

GLTF_OPTIONS: dict[str, Any] = {
    "export_format": "GLB",
    "use_selection": True,
    "export_yup": True,
    "export_apply": False,
    "export_texcoords": True,
    "export_normals": True,
    "export_materials": "EXPORT",
    "export_image_format": "AUTO",
    "export_skins": True,
    "export_influence_nb": 4,
    "export_all_influences": False,
    "export_def_bones": True,
    "export_leaf_bone": False,
    "export_rest_position_armature": True,
    "export_animations": True,
    "export_animation_mode": "ACTIONS",
    "export_force_sampling": True,
    "export_bake_animation": False,
    "export_cameras": False,
    "export_lights": False,
    "check_existing": False,
}


class ExportError(RuntimeError):
    """An exporter failed or the avatar objects are not exportable; the message says which."""


def preset_filename(subject: str, preset: str) -> str:
    """<subject>_<preset>.fbx, or <subject>.glb for glTF. The subject is made file-name safe."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in subject).strip("._") or "avatar"
    return f"{safe}.glb" if preset == "gltf" else f"{safe}_{preset}.fbx"


def _check_objects(armature: bpy.types.Object, mesh: bpy.types.Object) -> None:
    if armature is None or armature.type != "ARMATURE":
        raise ExportError("export needs the avatar's armature object")
    if mesh is None or mesh.type != "MESH":
        raise ExportError("export needs the avatar's mesh object")
    view_layer = bpy.context.view_layer
    view_layer.update()  # newly linked objects join view_layer.objects only on a sync
    for obj in (armature, mesh):
        if obj.name not in view_layer.objects:
            raise ExportError(f"{obj.name!r} is not in the active view layer; link it to the scene to export")


@contextmanager
def _user_state(objects: list[bpy.types.Object]) -> Iterator[None]:
    """Object mode, ``objects`` unhidden; the user's mode, selection, active object and hidden
    flags come back afterwards, whatever happens."""
    view_layer = bpy.context.view_layer
    user_obj = bpy.context.object
    user_mode = user_obj.mode if user_obj is not None else "OBJECT"
    if user_mode != "OBJECT":  # exporters read object-mode data (edit-mode changes flushed)
        bpy.ops.object.mode_set(mode="OBJECT")
    selected = [o for o in view_layer.objects if o.select_get()]
    active = view_layer.objects.active
    hidden = [o for o in objects if o.hide_get()]
    try:
        for o in hidden:
            o.hide_set(False)
        yield
    finally:
        for o in view_layer.objects:
            if o.select_get():
                o.select_set(False)
        for o in hidden:
            o.hide_set(True)
        for o in selected:
            if o.name in view_layer.objects:
                o.select_set(True)
        view_layer.objects.active = active
        if user_mode != "OBJECT" and user_obj is not None and view_layer.objects.active == user_obj:
            bpy.ops.object.mode_set(mode=user_mode)


def _select_only(objects: list[bpy.types.Object]) -> None:
    """What use_selection exports: exactly ``objects``, the first one active."""
    view_layer = bpy.context.view_layer
    for o in view_layer.objects:
        if o.select_get():
            o.select_set(False)
    for o in objects:
        o.select_set(True)
    view_layer.objects.active = objects[0]


@contextmanager
def _action_frame_range(scene: bpy.types.Scene, armature: bpy.types.Object) -> Iterator[None]:
    """The FBX exporter bakes the active action over the scene's frame range: use the action's."""
    start, end = scene.frame_start, scene.frame_end
    anim = armature.animation_data
    try:
        if anim is not None and anim.action is not None:
            a, b = anim.action.frame_range
            # a one-frame range exports no take at all, so bake at least two (constant) frames
            scene.frame_start, scene.frame_end = int(a), max(int(a) + 1, int(b))
        yield
    finally:
        scene.frame_start, scene.frame_end = start, end


@contextmanager
def _lod_copies(armature: bpy.types.Object, mesh: bpy.types.Object, levels: int) -> Iterator[list[bpy.types.Object]]:
    """Temporary copies of ``mesh`` named NAME_LOD0..NAME_LODn, level i decimated (collapse, which
    keeps UVs and interpolates the vertex-group weights) to 2**-i of the triangles before the
    armature deforms it; the user's objects are never edited. Yields the meshes to export."""
    if levels <= 0:
        yield [mesh]
        return
    collection = bpy.context.scene.collection
    copies: list[bpy.types.Object] = []
    clashes: list[tuple[bpy.types.Object, str]] = []
    try:
        for level in range(levels + 1):
            name = f"{mesh.name}_LOD{level}"
            clash = bpy.data.objects.get(name)
            if clash is not None:  # Unity needs the exact names: move a same-named object aside
                clashes.append((clash, clash.name))
                clash.name = clash.name + "_zeroavatar_tmp"
            copy = mesh.copy()  # shares the mesh data; the modifiers are the copy's own
            copy.name = name
            collection.objects.link(copy)
            copies.append(copy)
            copy.parent = armature
            copy.matrix_parent_inverse = mesh.matrix_parent_inverse.copy()
            if level:
                mod = copy.modifiers.new("ZeroAvatar LOD", "DECIMATE")
                mod.decimate_type = "COLLAPSE"
                mod.ratio = 0.5 ** level
                mod.use_collapse_triangulate = True
                copy.modifiers.move(copy.modifiers.find(mod.name), 0)  # decimate the rest shape, then deform
        bpy.context.view_layer.update()
        yield copies
    finally:
        for copy in copies:
            bpy.data.objects.remove(copy)
        for clash, name in clashes:
            clash.name = name


@contextmanager
def _unreal_copies(armature: bpy.types.Object, mesh: bpy.types.Object, preset: FbxPreset) -> Iterator[tuple]:
    """Temporary copies with a single root bone and the armature node named for Unreal; the
    user's objects are never edited. Yields (armature, mesh) to export."""
    roots = [b for b in armature.data.bones if b.parent is None]
    needs_root = preset.root_bone is not None and not (len(roots) == 1 and roots[0].name == preset.root_bone)
    needs_name = preset.armature_node_name is not None and armature.name != preset.armature_node_name
    if not needs_root and not needs_name:
        yield armature, mesh
        return
    collection = bpy.context.scene.collection
    arm_copy = mesh_copy = arm_data = clash = None
    clash_name = ""
    try:
        arm_data = armature.data.copy()
        arm_copy = armature.copy()
        arm_copy.data = arm_data
        mesh_copy = mesh.copy()
        collection.objects.link(arm_copy)
        collection.objects.link(mesh_copy)
        bpy.context.view_layer.update()
        mesh_copy.parent = arm_copy
        mesh_copy.matrix_parent_inverse = mesh.matrix_parent_inverse.copy()
        for mod in mesh_copy.modifiers:
            if mod.type == "ARMATURE" and mod.object == armature:
                mod.object = arm_copy
        if needs_root:
            _add_root_bone(arm_copy, preset.root_bone, [b.name for b in roots])
        if preset.armature_node_name is not None:
            clash = bpy.data.objects.get(preset.armature_node_name)  # may be the user's own armature
            if clash is not None:
                clash_name = clash.name
                clash.name = clash_name + "_zeroavatar_tmp"
            arm_copy.name = preset.armature_node_name
        yield arm_copy, mesh_copy
    finally:
        for obj in (mesh_copy, arm_copy):
            if obj is not None:
                bpy.data.objects.remove(obj)
        if arm_data is not None:
            bpy.data.armatures.remove(arm_data)
        if clash is not None:
            clash.name = clash_name


def _add_root_bone(armature: bpy.types.Object, name: str, children: list[str]) -> None:
    """A root bone at the armature origin (Unreal's root-motion bone) parenting the old roots.
    An existing non-root bone of that name is renamed first (vertex groups follow the rename)."""
    view_layer = bpy.context.view_layer
    view_layer.objects.active = armature
    bpy.ops.object.mode_set(mode="EDIT")
    try:
        ebs = armature.data.edit_bones
        if name in ebs:
            ebs[name].name = name + "_orig"
            children = [c + "_orig" if c == name else c for c in children]
        root = ebs.new(name)
        root.head = Vector((0.0, 0.0, 0.0))
        root.tail = Vector((0.0, 0.1, 0.0))
        root.use_deform = True
        for c in children:
            ebs[c].parent = root
    finally:
        bpy.ops.object.mode_set(mode="OBJECT")


def export_fbx(armature: bpy.types.Object, mesh: bpy.types.Object, path: Path | str, preset: str = "unity",
               lods: int = 0) -> Path:
    """Write an FBX for a game engine (see the module docstring for the presets). ``lods``: levels
    of detail beyond the full mesh (Unity preset only)."""
    if preset not in FBX_PRESETS:
        raise ExportError(f"unknown FBX preset {preset!r}; choose one of {sorted(FBX_PRESETS)}")
    check_lods(preset, lods)
    _check_objects(armature, mesh)
    spec = FBX_PRESETS[preset]
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    scene = bpy.context.scene
    with _user_state([armature, mesh]), _unreal_copies(armature, mesh, spec) as (arm, me), \
            _lod_copies(arm, me, lods) as meshes, _action_frame_range(scene, arm):
        _select_only([arm, *meshes])
        result = bpy.ops.export_scene.fbx(filepath=str(path), **spec.options)
    if "FINISHED" not in result or not path.is_file():
        raise ExportError(f"Blender's FBX exporter did not write {path} ({result})")
    return path


def check_lods(preset: str, lods: int) -> None:
    """ExportError unless ``lods`` levels make sense for ``preset``."""
    if not 0 <= int(lods) <= MAX_LODS:
        raise ExportError(f"{lods} levels of detail: choose 0 to {MAX_LODS}")
    if lods and preset not in LOD_PRESETS:
        raise ExportError(f"levels of detail are for the {', '.join(LOD_PRESETS)} preset (its importer groups "
                          f"NAME_LOD0, NAME_LOD1, ... meshes); {preset} would import them as separate meshes. "
                          "Unreal and Godot build LODs on import")


def export_glb(armature: bpy.types.Object, mesh: bpy.types.Object, path: Path | str) -> Path:
    """Write a binary glTF 2.0 (see the module docstring)."""
    _check_objects(armature, mesh)
    path = Path(path).resolve()
    if path.suffix.lower() != ".glb":
        raise ExportError(f"a GLB file name must end in .glb: {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _user_state([armature, mesh]):
        _select_only([armature, mesh])
        result = bpy.ops.export_scene.gltf(filepath=str(path), **GLTF_OPTIONS)
    if "FINISHED" not in result or not path.is_file():
        raise ExportError(f"Blender's glTF exporter did not write {path} ({result})")
    return path


def export_preset(armature: bpy.types.Object, mesh: bpy.types.Object, out_dir: Path | str, preset: str,
                  subject: str, lods: int = 0) -> Path:
    """Export one preset into ``out_dir`` under its conventional file name (``lods`` levels of
    detail where the preset takes them, see LOD_PRESETS)."""
    if preset not in PRESETS:
        raise ExportError(f"unknown export preset {preset!r}; choose from {', '.join(PRESETS)}")
    path = Path(out_dir) / preset_filename(subject, preset)
    if preset == "gltf":
        return export_glb(armature, mesh, path)
    return export_fbx(armature, mesh, path, preset, lods if preset in LOD_PRESETS else 0)
