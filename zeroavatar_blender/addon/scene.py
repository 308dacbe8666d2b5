"""Build Blender objects from engine output: the rigged avatar, streamed preview meshes, the photo camera.

Plain functions taking paths and arrays and returning objects, so operators, command-line jobs
and tests share them. The maths (pose matrices, camera conversion) is numpy and done in one go,
never one depsgraph update per bone. Blender side only: bpy + numpy, never torch.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import bmesh
import bpy
import numpy as np
from mathutils import Matrix

from .bundle_io import AvatarBundleData, read_bundle

# Custom properties on the armature object, so the pose can be read back for the engine.
PROP_BONES = "zeroavatar_bones"
PROP_BUNDLE = "zeroavatar_bundle"
PROP_SUBJECT = "zeroavatar_subject"
PROP_BODY_MODEL = "zeroavatar_body_model"
PROP_SHAPE = "zeroavatar_shape"
PREVIEW_COLOR = "Color"
_PROP_FACES_CRC = "zeroavatar_faces_crc"


# -- small numpy helpers -------------------------------------------------------------------

def _to_blender_matrix(m: np.ndarray) -> Matrix:
    return Matrix(np.asarray(m, dtype=np.float64).tolist())


def rigid_inverse(m: np.ndarray) -> np.ndarray:
    """Inverse of rigid 4x4 matrices (...,4,4), exact up to rounding (no general inverse)."""
    R = np.swapaxes(m[..., :3, :3], -1, -2)
    out = np.zeros_like(m)
    out[..., :3, :3] = R
    out[..., :3, 3] = -(R @ m[..., :3, 3, None])[..., 0]
    out[..., 3, 3] = 1.0
    return out


def pose_basis(bone_rest: np.ndarray, bone_pose: np.ndarray, parents: np.ndarray) -> np.ndarray:
    """Blender's pose_bone.matrix_basis that makes each bone's armature-space matrix ``bone_pose``.

    Blender: pose_j = pose_p @ inv(rest_p) @ rest_j @ basis_j (full inheritance, unconnected), so
    basis_j = inv(rest_j) @ rest_p @ inv(pose_p) @ pose_j; for roots basis_j = inv(rest_j) @ pose_j.
    (J,4,4), (J,4,4), (J,) -> (J,4,4)
    """
    local_pose = bone_pose.copy()
    local_rest = bone_rest.copy()
    has_parent = parents >= 0
    p = parents[has_parent]
    local_pose[has_parent] = rigid_inverse(bone_pose[p]) @ bone_pose[has_parent]
    local_rest[has_parent] = rigid_inverse(bone_rest[p]) @ bone_rest[has_parent]
    return rigid_inverse(local_rest) @ local_pose


def read_matrices(collection: Any, attr: str) -> np.ndarray:
    """foreach_get of 4x4 matrices; Blender flattens them column-major. -> (N,4,4) float64."""
    flat = np.empty(len(collection) * 16, dtype=np.float32)
    collection.foreach_get(attr, flat)
    return flat.reshape(-1, 4, 4).transpose(0, 2, 1).astype(np.float64)


def write_matrices(collection: Any, attr: str, m: np.ndarray) -> None:
    collection.foreach_set(attr, np.ascontiguousarray(m.transpose(0, 2, 1), dtype=np.float32).ravel())


# -- armature ------------------------------------------------------------------------------

def _scene_collection(collection: bpy.types.Collection | None) -> bpy.types.Collection:
    return collection if collection is not None else bpy.context.scene.collection


def create_armature(name: str, bone_names: list[str], bone_rest: np.ndarray, bone_parents: np.ndarray,
                    bone_length: np.ndarray, collection: bpy.types.Collection | None = None) -> bpy.types.Object:
    """An armature whose bones' matrix_local equal ``bone_rest`` (Y along the bone).

    Bones are unconnected so a pose can move any bone's head (the engine's root carries the
    subject's translation) and inherit their parent's full transform, which pose_basis assumes.
    The collection must belong to the active view layer (edit mode needs an active object).
    """
    data = bpy.data.armatures.new(name)
    data.display_type = "OCTAHEDRAL"
    arm = bpy.data.objects.new(name, data)
    arm.show_in_front = True
    _scene_collection(collection).objects.link(arm)
    view_layer = bpy.context.view_layer
    if bpy.context.object is not None and bpy.context.object.mode != "OBJECT":
        bpy.ops.object.mode_set(mode="OBJECT")
    previous = view_layer.objects.active
    view_layer.objects.active = arm
    try:
        bpy.ops.object.mode_set(mode="EDIT")
    except RuntimeError as exc:
        bpy.data.objects.remove(arm)
        bpy.data.armatures.remove(data)
        raise ValueError(f"cannot edit the new armature {name!r}: its collection must be visible in the "
                         f"active view layer ({exc})") from exc
    try:
        edit_bones = []
        for j, bone_name in enumerate(bone_names):
            eb = data.edit_bones.new(bone_name)
            eb.head = (0.0, 0.0, 0.0)
            eb.tail = (0.0, float(bone_length[j]), 0.0)  # the matrix setter keeps this length
            eb.matrix = _to_blender_matrix(bone_rest[j])
            eb.use_connect = False
            eb.use_deform = True
            eb.inherit_scale = "FULL"
            eb.use_inherit_rotation = True
            eb.use_local_location = True
            edit_bones.append(eb)
        for j, p in enumerate(bone_parents):
            if p >= 0:
                edit_bones[j].parent = edit_bones[int(p)]
    finally:
        bpy.ops.object.mode_set(mode="OBJECT")
        if previous is not None and previous.name in view_layer.objects:
            view_layer.objects.active = previous
    arm[PROP_BONES] = list(bone_names)
    return arm


def armature_bone_names(armature: bpy.types.Object) -> list[str]:
    """The bundle's bone order (stored at build time), else Blender's own order."""
    stored = armature.get(PROP_BONES)
    if stored is not None:
        return [str(n) for n in stored]
    return [b.name for b in armature.data.bones]


def armature_rest(armature: bpy.types.Object, bone_names: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(rest (J,4,4) armature space as Blender holds it, parents (J,)) in ``bone_names`` order."""
    names = bone_names or armature_bone_names(armature)
    bones = armature.data.bones
    rest_all = read_matrices(bones, "matrix_local")
    index = {b.name: i for i, b in enumerate(bones)}
    missing = [n for n in names if n not in index]
    if missing:
        raise ValueError(f"armature {armature.name!r} has no bones {missing[:5]}")
    order = np.array([index[n] for n in names])
    position = {n: j for j, n in enumerate(names)}
    parents = np.array([position.get(bones[index[n]].parent.name, -1) if bones[index[n]].parent else -1
                        for n in names])
    return rest_all[order], parents


def set_armature_pose(armature: bpy.types.Object, bone_pose: np.ndarray, bone_names: list[str] | None = None) -> None:
    """Pose bones so their armature-space matrices (pose_bone.matrix) equal ``bone_pose`` (J,4,4).

    All matrix_basis values are computed in numpy and written in one foreach_set, so no
    per-bone depsgraph update happens (assigning pose_bone.matrix would evaluate each time).
    """
    names = bone_names or armature_bone_names(armature)
    bone_pose = np.asarray(bone_pose, dtype=np.float64)
    if bone_pose.shape != (len(names), 4, 4):
        raise ValueError(f"bone_pose has shape {bone_pose.shape}, expected ({len(names)}, 4, 4)")
    rest, parents = armature_rest(armature, names)
    basis = pose_basis(rest, bone_pose, parents)
    pose_bones = armature.pose.bones
    position = {n: j for j, n in enumerate(names)}
    order = [position.get(pb.name, -1) for pb in pose_bones]
    current = read_matrices(pose_bones, "matrix_basis")
    for i, j in enumerate(order):
        if j >= 0:
            current[i] = basis[j]
    for pb in pose_bones:
        pb.rotation_mode = "QUATERNION"
    write_matrices(pose_bones, "matrix_basis", current)
    armature.data.pose_position = "POSE"
    armature.update_tag()


def clear_pose(armature: bpy.types.Object) -> bpy.types.Action | None:
    """Back to the rest pose: identity matrix_basis, and the pose action unassigned (an assigned
    action would re-apply its keys on the next evaluation). The action is kept with a fake user
    and returned, so the photo's pose can be re-assigned from the Action editor."""
    action = None
    anim = armature.animation_data
    if anim is not None and anim.action is not None:
        action = anim.action
        action.use_fake_user = True
        anim.action = None
    pose_bones = armature.pose.bones
    write_matrices(pose_bones, "matrix_basis", np.broadcast_to(np.eye(4), (len(pose_bones), 4, 4)))
    armature.update_tag()
    return action


def store_pose_action(armature: bpy.types.Object, name: str, frame: int = 1) -> bpy.types.Action:
    """Key the current pose once (location, rotation, scale of every bone) as the active action,
    so the pose survives frame changes and exports as a one-frame animation."""
    action = bpy.data.actions.new(name)
    anim = armature.animation_data_create()
    anim.action = action
    for pb in armature.pose.bones:
        for path in ("location", "rotation_quaternion", "scale"):
            pb.keyframe_insert(path, frame=frame, group=pb.name)
    return action


# -- mesh ----------------------------------------------------------------------------------

def _fill_mesh(mesh: bpy.types.Mesh, vertices: np.ndarray, faces: np.ndarray) -> None:
    """Replace the mesh's geometry with triangles in place.

    Positions and corner vertices go through the generic attribute API, which copies the whole
    array at once (vertices.foreach_set("co") and loops.foreach_set("vertex_index") go item by
    item and are ~100x slower); face offsets have no attribute, so loop_start stays on polygons.
    """
    V, F = len(vertices), len(faces)
    mesh.clear_geometry()
    mesh.vertices.add(V)
    _set_positions(mesh, vertices)
    mesh.loops.add(3 * F)
    mesh.attributes[".corner_vert"].data.foreach_set("value", np.ascontiguousarray(faces, dtype=np.int32).ravel())
    mesh.polygons.add(F)
    mesh.polygons.foreach_set("loop_start", np.arange(0, 3 * F, 3, dtype=np.int32))


def _set_positions(mesh: bpy.types.Mesh, vertices: np.ndarray) -> None:
    mesh.attributes["position"].data.foreach_set("vector", np.ascontiguousarray(vertices, dtype=np.float32).ravel())


def create_skinned_mesh(name: str, armature: bpy.types.Object, bundle: AvatarBundleData,
                        collection: bpy.types.Collection | None = None) -> bpy.types.Object:
    """The body mesh in rest pose: corner UVs, smooth shading, vertex groups, Armature modifier."""
    mesh = bpy.data.meshes.new(name)
    _fill_mesh(mesh, bundle.vertices, bundle.faces)
    uv = mesh.uv_layers.new(name="UVMap")
    uv.data.foreach_set("uv", np.ascontiguousarray(bundle.corner_uv, dtype=np.float32).ravel())
    mesh.polygons.foreach_set("use_smooth", np.ones(len(bundle.faces), dtype=bool))
    mesh.update()
    if mesh.validate(verbose=False, clean_customdata=False):
        raise ValueError(f"the bundle's mesh for {name!r} had invalid geometry that Blender had to fix")
    obj = bpy.data.objects.new(name, mesh)
    _scene_collection(collection).objects.link(obj)
    obj.parent = armature
    obj.matrix_parent_inverse = Matrix.Identity(4)
    _assign_skin(obj, bundle.bone_names, bundle.skin_indices, bundle.skin_weights)
    mod = obj.modifiers.new("Armature", "ARMATURE")
    mod.object = armature
    mod.use_vertex_groups = True
    mod.use_bone_envelopes = False
    return obj


def _assign_skin(obj: bpy.types.Object, bone_names: list[str], indices: np.ndarray, weights: np.ndarray) -> None:
    """One vertex group per bone (all bones, so exporters see every joint) filled through bmesh's
    deform layer: about 3x faster than VertexGroup.add per vertex."""
    for n in bone_names:
        obj.vertex_groups.new(name=n)
    bm = bmesh.new()
    try:
        bm.from_mesh(obj.data)
        layer = bm.verts.layers.deform.verify()
        idx = indices.tolist()
        wts = weights.tolist()
        for v, vert in enumerate(bm.verts):
            d = vert[layer]
            for i, w in zip(idx[v], wts[v]):
                if w > 0.0:
                    d[i] = d.get(i, 0.0) + w
        bm.to_mesh(obj.data)
    finally:
        bm.free()


def _ensure_nodes(mat: bpy.types.Material) -> None:
    """Blender 5 gives every new material a node tree (use_nodes is deprecated); older ones need it."""
    if mat.node_tree is None:
        mat.use_nodes = True


def create_texture_material(name: str, texture_path: Path | None, *, pack: bool = True) -> bpy.types.Material:
    """Principled BSDF fed by the avatar's UV texture. Packing keeps the .blend self-contained
    (the bundle may live in a temporary job folder) and lets the FBX exporter embed it."""
    mat = bpy.data.materials.new(name)
    _ensure_nodes(mat)
    nodes, links = mat.node_tree.nodes, mat.node_tree.links
    bsdf = next(n for n in nodes if n.type == "BSDF_PRINCIPLED")
    bsdf.inputs["Roughness"].default_value = 0.8
    if texture_path is not None:
        image = bpy.data.images.load(str(texture_path), check_existing=False)
        image.name = name + "_texture"
        image.colorspace_settings.name = "sRGB"
        if pack:
            image.pack()
        tex = nodes.new("ShaderNodeTexImage")
        tex.image = image
        tex.interpolation = "Linear"
        tex.location = (bsdf.location.x - 400, bsdf.location.y)
        links.new(tex.outputs["Color"], bsdf.inputs["Base Color"])
    return mat


def build_avatar(bundle_dir: Path | str, *, name: str | None = None, collection: bpy.types.Collection | None = None,
                 apply_pose: bool = True, pack_texture: bool = True,
                 key_pose: bool = True) -> tuple[bpy.types.Object, bpy.types.Object]:
    """Rigged, textured avatar from a bundle folder: (armature, mesh).

    With ``apply_pose`` the photo's pose is set on the pose bones and, with ``key_pose``, keyed as
    a one-frame action "<name>_photo_pose" (it then survives frame changes and exports as a pose;
    unkeyed, a user's edits survive frame changes instead). The rest pose stays in the armature
    (``clear_pose`` or Rest Position).
    """
    bundle = read_bundle(bundle_dir)
    return build_avatar_from_data(bundle, name=name, collection=collection, apply_pose=apply_pose,
                                  pack_texture=pack_texture, key_pose=key_pose)


def build_avatar_from_data(bundle: AvatarBundleData, *, name: str | None = None,
                           collection: bpy.types.Collection | None = None, apply_pose: bool = True,
                           pack_texture: bool = True,
                           key_pose: bool = True) -> tuple[bpy.types.Object, bpy.types.Object]:
    name = name or bundle.subject
    arm = create_armature(name, bundle.bone_names, bundle.bone_rest, bundle.bone_parents, bundle.bone_length,
                          collection)
    arm[PROP_BUNDLE] = str(bundle.root)
    arm[PROP_SUBJECT] = bundle.subject
    arm[PROP_BODY_MODEL] = str(bundle.meta.get("body_model", ""))
    if bundle.shape is not None:
        arm[PROP_SHAPE] = bundle.shape
    mesh = create_skinned_mesh(name + "_body", arm, bundle, collection)
    mesh.data.materials.append(create_texture_material(name + "_material", bundle.texture_path, pack=pack_texture))
    if apply_pose:
        set_armature_pose(arm, bundle.bone_pose, bundle.bone_names)
        if key_pose:
            store_pose_action(arm, name + "_photo_pose")
    return arm, mesh


def evaluated_vertices(obj: bpy.types.Object, depsgraph: bpy.types.Depsgraph | None = None) -> np.ndarray:
    """(V,3) world-space vertices after modifiers (the armature deform), float64."""
    depsgraph = depsgraph or bpy.context.evaluated_depsgraph_get()
    depsgraph.update()
    ev = obj.evaluated_get(depsgraph)
    mesh = ev.to_mesh()
    try:
        co = np.empty(len(mesh.vertices) * 3, dtype=np.float32)
        mesh.vertices.foreach_get("co", co)
    finally:
        ev.to_mesh_clear()
    co = co.reshape(-1, 3).astype(np.float64)
    M = np.array(ev.matrix_world)
    return co @ M[:3, :3].T + M[:3, 3]


# -- streamed preview meshes ---------------------------------------------------------------

def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    """sRGB in [0,1] -> linear, exact (float64 maths)."""
    c = np.clip(c, 0.0, 1.0)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


# Preview colours are shown on screen at 8 bits anyway: a 4096-entry table is ~5x faster than pow.
_SRGB_LUT = srgb_to_linear(np.linspace(0.0, 1.0, 4096)).astype(np.float32)


def srgb_to_linear_fast(c: np.ndarray) -> np.ndarray:
    """Table lookup version of srgb_to_linear (error < 1e-3), for per-frame preview updates."""
    idx = np.clip(c, 0.0, 1.0) * 4095.0 + 0.5
    return _SRGB_LUT[idx.astype(np.int32)]


def _preview_material(name: str) -> bpy.types.Material:
    """Shows the vertex colours in Material Preview / renders (solid view uses the attribute)."""
    mat = bpy.data.materials.get(name)
    if mat is not None:
        return mat
    mat = bpy.data.materials.new(name)
    _ensure_nodes(mat)
    nodes, links = mat.node_tree.nodes, mat.node_tree.links
    bsdf = next(n for n in nodes if n.type == "BSDF_PRINCIPLED")
    bsdf.inputs["Roughness"].default_value = 0.8
    attr = nodes.new("ShaderNodeVertexColor")
    attr.layer_name = PREVIEW_COLOR
    attr.location = (bsdf.location.x - 300, bsdf.location.y)
    links.new(attr.outputs["Color"], bsdf.inputs["Base Color"])
    return mat


def show_vertex_colors_in_solid_view(screen: bpy.types.Screen | None = None) -> int:
    """Switch the open windows' 3D viewports (or one screen's) to show the active colour
    attribute in Solid shading. Returns how many viewports changed (0 without a UI)."""
    if screen is not None:
        screens = [screen]
    else:
        wm = bpy.context.window_manager
        screens = [w.screen for w in wm.windows] if wm is not None else []
    count = 0
    for sc in screens:
        for area in sc.areas:
            if area.type == "VIEW_3D":
                for space in area.spaces:
                    if space.type == "VIEW_3D" and space.shading.type == "SOLID":
                        space.shading.color_type = "VERTEX"
                        count += 1
    return count


@dataclass(frozen=True)
class PreviewMesh:
    """A streamed mesh checked and converted into the flat arrays Blender takes (numpy only).

    Preparing (this), finding its edges (``with_edges``) and applying it (``apply_preview_mesh``)
    are separate so the add-on's timer can spread them over calls, none holding the UI for long.
    """

    positions: np.ndarray  # (V*3,) float32
    corner_verts: np.ndarray  # (3F,) int32
    rgba: np.ndarray | None  # (V*4,) float32, linear
    topology: str  # "V:F:crc32 of the faces": equal topologies need only new positions
    edge_verts: np.ndarray | None = None  # (E*2,) int32, Blender's ".edge_verts"
    corner_edges: np.ndarray | None = None  # (3F,) int32, Blender's ".corner_edge"

    @property
    def num_vertices(self) -> int:
        return len(self.positions) // 3

    @property
    def num_faces(self) -> int:
        return len(self.corner_verts) // 3

    def with_edges(self) -> "PreviewMesh":
        edge_verts, corner_edges = triangle_edges(self.corner_verts, self.num_vertices)
        return replace(self, edge_verts=edge_verts, corner_edges=corner_edges)


def triangle_edges(corner_verts: np.ndarray, num_vertices: int) -> tuple[np.ndarray, np.ndarray]:
    """The unique edges of triangles and each corner's edge, as Blender stores them (a corner's
    edge joins its vertex to the next corner's). Done in numpy so Blender need not calculate them
    in the UI thread. (3F,) -> ((E*2,) int32, (3F,) int32)."""
    key_type = np.uint32 if num_vertices < 2**16 else np.int64  # 32-bit keys sort ~30% faster
    tri = np.asarray(corner_verts).reshape(-1, 3).astype(key_type)
    a, b = tri.ravel(), tri[:, [1, 2, 0]].ravel()
    keys, corner_edges = np.unique(np.minimum(a, b) * key_type(num_vertices) + np.maximum(a, b), return_inverse=True)
    edges = np.stack([keys // num_vertices, keys % num_vertices], 1)
    return edges.astype(np.int32).ravel(), corner_edges.astype(np.int32).ravel()


def prepare_preview_mesh(vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray | None = None) -> PreviewMesh:
    """Check an engine mesh (protocol.MESH_ARRAYS) and convert it for ``apply_preview_mesh``.

    vertices (V,3), faces (F,3) triangles, colors (V,3) or (V,4) sRGB in [0,1] or None.
    Raises ValueError on anything Blender could not take (it comes from another process);
    triangles that repeat a vertex are dropped (Blender would reject them).
    """
    vertices = np.asarray(vertices)
    faces = np.asarray(faces)
    if vertices.ndim != 2 or vertices.shape[1] != 3 or faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"preview mesh needs vertices (V,3) and faces (F,3), got {vertices.shape} and {faces.shape}")
    if vertices.dtype.kind not in "fiu" or faces.dtype.kind not in "iu":
        raise ValueError(f"preview mesh arrays must be numbers, got {vertices.dtype} and {faces.dtype}")
    V = len(vertices)
    if not np.isfinite(vertices).all():
        raise ValueError("preview mesh vertices contain NaN or infinite values")
    if len(faces) and (faces.min() < 0 or faces.max() >= V):
        raise ValueError("preview mesh faces index missing vertices")
    degenerate = (faces[:, 0] == faces[:, 1]) | (faces[:, 1] == faces[:, 2]) | (faces[:, 2] == faces[:, 0])
    if degenerate.any():
        faces = faces[~degenerate]
    rgba = None
    if colors is not None:
        colors = np.asarray(colors)
        if colors.ndim != 2 or colors.shape[0] != V or colors.shape[1] not in (3, 4):
            raise ValueError(f"preview mesh colors must be (V,3) or (V,4), got {colors.shape}")
        rgba = np.ones((V, 4), dtype=np.float32)
        rgba[:, :3] = srgb_to_linear_fast(colors[:, :3])
        if colors.shape[1] == 4:
            rgba[:, 3] = colors[:, 3]
        rgba = rgba.ravel()
    corner_verts = np.ascontiguousarray(faces, dtype=np.int32).ravel()
    topology = f"{V}:{len(faces)}:{zlib.crc32(corner_verts.tobytes()):08x}"
    return PreviewMesh(np.ascontiguousarray(vertices, dtype=np.float32).ravel(), corner_verts, rgba, topology)


def same_topology(obj: bpy.types.Object | None, prepared: PreviewMesh) -> bool:
    """Whether ``obj``'s mesh already has these triangles (then only positions and colours change)."""
    return (obj is not None and obj.type == "MESH" and obj.data.get(_PROP_FACES_CRC) == prepared.topology
            and len(obj.data.vertices) == prepared.num_vertices)


def apply_preview_mesh(obj_or_name: bpy.types.Object | str, prepared: PreviewMesh, *,
                       collection: bpy.types.Collection | None = None) -> bpy.types.Object:
    """Replace a preview object's mesh in place (same object, same mesh datablock) with a
    prepared mesh; creates the object when a name is given that does not exist yet.

    Runs inside the client's polling timer, so only bulk writes through the attribute API, plus
    the face offsets (the one per-item write, ~0.1 us a face). Equal triangles (same count and
    checksum) get new positions and colours only; new triangles use the prepared edges, or let
    Blender calculate them when there are none.
    """
    if isinstance(obj_or_name, str):
        obj = bpy.data.objects.get(obj_or_name)
        if obj is None:
            obj = bpy.data.objects.new(obj_or_name, bpy.data.meshes.new(obj_or_name))
            _scene_collection(collection).objects.link(obj)
            obj.data.materials.append(_preview_material("ZeroAvatar Preview"))
            show_vertex_colors_in_solid_view()
        elif not obj.users_collection:  # left over after the user deleted it from the scene
            _scene_collection(collection).objects.link(obj)
    else:
        obj = obj_or_name
    if obj.type != "MESH":
        raise ValueError(f"{obj.name!r} is not a mesh object")
    mesh = obj.data
    V, F = prepared.num_vertices, prepared.num_faces
    if same_topology(obj, prepared):
        mesh.attributes["position"].data.foreach_set("vector", prepared.positions)
    else:
        mesh.clear_geometry()  # also drops the colour attribute and every cache
        mesh.vertices.add(V)
        mesh.attributes["position"].data.foreach_set("vector", prepared.positions)
        if prepared.edge_verts is not None and prepared.corner_edges is not None:
            mesh.edges.add(len(prepared.edge_verts) // 2)
            mesh.attributes[".edge_verts"].data.foreach_set("value", prepared.edge_verts)
        mesh.loops.add(3 * F)
        mesh.attributes[".corner_vert"].data.foreach_set("value", prepared.corner_verts)
        if prepared.corner_edges is not None and len(mesh.edges):
            mesh.attributes[".corner_edge"].data.foreach_set("value", prepared.corner_edges)
        mesh.polygons.add(F)
        mesh.polygons.foreach_set("loop_start", np.arange(0, 3 * F, 3, dtype=np.int32))
        mesh[_PROP_FACES_CRC] = prepared.topology
    if prepared.rgba is not None:
        attr = mesh.color_attributes.get(PREVIEW_COLOR)
        if attr is None or attr.domain != "POINT" or attr.data_type != "FLOAT_COLOR":
            if attr is not None:
                mesh.color_attributes.remove(attr)
            attr = mesh.color_attributes.new(PREVIEW_COLOR, "FLOAT_COLOR", "POINT")
            mesh.color_attributes.active_color = attr
            mesh.color_attributes.render_color_index = mesh.color_attributes.active_color_index
        attr.data.foreach_set("color", prepared.rgba)
    mesh.update()  # calculates the edges when there are none
    return obj


def update_preview_mesh(obj_or_name: bpy.types.Object | str, vertices: np.ndarray, faces: np.ndarray,
                        colors: np.ndarray | None = None, *,
                        collection: bpy.types.Collection | None = None) -> bpy.types.Object:
    """prepare_preview_mesh + apply_preview_mesh in one call (scripts, tests)."""
    return apply_preview_mesh(obj_or_name, prepare_preview_mesh(vertices, faces, colors), collection=collection)


# -- the photo's camera --------------------------------------------------------------------

def opencv_to_blender_camera(K: np.ndarray, world_to_cam: np.ndarray, width: int, height: int,
                             sensor_width: float = 36.0) -> dict[str, Any]:
    """OpenCV pinhole -> Blender camera settings (horizontal sensor fit, square pixels).

    Blender cameras look down -Z with +Y up: flip the y and z rows of [R|t], invert for the world
    matrix. Shift moves the frame (in image widths with horizontal fit), so a principal point
    right of the centre is a frame shifted left; OpenCV pixel centres are integers, so the image
    centre is ((W-1)/2, (H-1)/2), and OpenCV's y points down.
    """
    K = np.asarray(K, dtype=np.float64)
    w2c = np.asarray(world_to_cam, dtype=np.float64)
    flip = np.diag([1.0, -1.0, -1.0, 1.0])
    w2c_blender = flip @ w2c
    matrix_world = rigid_inverse(w2c_blender)
    fx, cx, cy = K[0, 0], K[0, 2], K[1, 2]
    return {
        "matrix_world": matrix_world,
        "lens": float(fx * sensor_width / width),
        "sensor_width": float(sensor_width),
        "shift_x": float(((width - 1) / 2 - cx) / width),
        "shift_y": float((cy - (height - 1) / 2) / width),
        "width": int(width),
        "height": int(height),
    }


def add_photo_camera(camera_json: dict[str, Any], photo_path: str | None, *, name: str = "ZeroAvatar Camera",
                     collection: bpy.types.Collection | None = None, scene: bpy.types.Scene | None = None,
                     set_resolution: bool = True) -> bpy.types.Object:
    """The camera the engine fitted (avatar.json "camera"), with the photo as background image, made
    the scene camera; the render resolution is set to the photo's so the avatar lines up with it."""
    try:
        K = np.asarray(camera_json["K"], dtype=np.float64)
        w2c = np.asarray(camera_json["world_to_cam"], dtype=np.float64)
        width, height = int(camera_json["width"]), int(camera_json["height"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"camera needs K (3x3), world_to_cam (4x4), width and height: {exc}") from exc
    if K.shape != (3, 3) or w2c.shape != (4, 4) or width <= 0 or height <= 0 or not np.isfinite(K).all():
        raise ValueError("camera needs K (3x3), world_to_cam (4x4) and a positive width and height")
    settings = opencv_to_blender_camera(K, w2c, width, height)
    scene = scene or bpy.context.scene
    data = bpy.data.cameras.new(name)
    data.sensor_fit = "HORIZONTAL"
    data.sensor_width = settings["sensor_width"]
    data.lens = settings["lens"]
    data.shift_x = settings["shift_x"]
    data.shift_y = settings["shift_y"]
    data.clip_start = 0.01
    data.clip_end = 1000.0
    cam = bpy.data.objects.new(name, data)
    cam.matrix_world = _to_blender_matrix(settings["matrix_world"])
    _scene_collection(collection).objects.link(cam)
    if photo_path:
        image = bpy.data.images.load(str(photo_path), check_existing=True)
        bg = data.background_images.new()
        bg.image = image
        bg.frame_method = "STRETCH"  # the camera frame is the photo's frame
        bg.alpha = 1.0
        data.show_background_images = True
    scene.camera = cam
    if set_resolution:
        scene.render.resolution_x = width
        scene.render.resolution_y = height
        scene.render.resolution_percentage = 100
        scene.render.pixel_aspect_x = scene.render.pixel_aspect_y = 1.0
    return cam
