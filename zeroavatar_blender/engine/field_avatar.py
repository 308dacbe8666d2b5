"""Finalise an optimised field into the same rigged avatar bundle as the fast path.

High-resolution marching cubes of the field united with the fitted body where the field holds
it and the photo shows no garment (surface_merge.py: a blurred field loses noses, hands, patches
of skin) -> clean-up (largest component, small holes, Taubin smoothing) -> two layers
(surface_layers.py): the fitted body's own mesh wherever that surface lies on it (there the body
is the better estimate, at the body model's millimetres: lips, nostrils, fingers), and the
surface's shell where it stands off the body (a skirt, a jacket, hair), decimated to the face
budget (``layers=False``: the old single surface, snapped onto the body near it) -> skin weights
from the fitted body -> unposed to the body's rest pose -> UV unwrap -> texture: the photo where it sees
the surface, the body's UV texture near the body, the photo carried through to the back
elsewhere (surface_colour.py); quality ``full`` keeps the diffusion-guided field's colour there.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .job import Job


def load_field(ckpt: dict[str, Any], device: str = "cpu"):
    from .field.encoding import HashGridConfig
    from .field.nerf import NeRFField, NeRFFieldConfig

    cfg = json.loads(ckpt["config"])
    enc = HashGridConfig(n_levels=cfg["n_levels"], log2_hashmap_size=cfg["log2_hashmap_size"],
                         max_resolution=cfg["max_resolution"], blend=cfg.get("grid_blend", "matmul"))
    field = NeRFField(ckpt["aabb"], NeRFFieldConfig(encoding=enc), device=device)
    field.load_state_dict({k: v.to(device) for k, v in ckpt["field"].items()})
    field.eval()
    return field, cfg


STANDARD_SMOOTH_M = 0.025


@dataclass
class FinaliseConfig:
    """How the field becomes a mesh; ``settings.extra["finalise"]`` may override any of these."""

    resolution_cpu: int = 192  # marching-cubes cells along the box's longest side
    resolution_gpu: int = 320
    level_ratio: float = 1.0  # iso-level as a fraction of the field's surface density
    smooth_iterations: int = 5
    snap_inner: float = 0.02  # metres: closer to the body than this, the surface is the body's
    snap_outer: float = 0.05  # blending to the field's own surface at this distance (0: no snapping)
    garment_hold: float = 0.03  # metres of silhouette excess at which the field's surface is kept unsnapped (0: off)
    body_union: bool = True  # surface = field union body where the field is present (surface_merge.py)
    presence_ratio: float = 0.05  # ... "present": density above this share of the surface level
    presence_cells: int = 2  # ... within this many grid nodes
    union_excess: float = 0.015  # metres: no body where the photo shows a garment thicker than this (0: everywhere)
    # Gaussian blur (metres, standard deviation) of the field's inside distance before the union;
    # None: 0.025 for `standard`, 0 for `full`. Why: where only the field makes the surface (a
    # garment's unseen depth) a CPU field is crumpled and holed at the scale of a few cells. On
    # the garment benchmark cases it raised normal consistency by 0.01-0.07 (see BENCHMARKS.md).
    smooth_m: float | None = None
    colour: str = "photo"  # "photo": surface_colour.py; "field": the field's colour everywhere
    through_weight: float = 0.5  # unseen body surface: share of the photo carried through (rest: smooth fill)
    # The head's texels per metre against the rest of the atlas. Why: faces are what people look
    # at, and the body models' own UV layouts (the fast path's) give the head about twice the
    # density of the body; an even atlas left the standard avatar's face blurrier than the fast one's.
    head_texel_scale: float = 2.0
    # The surface in two layers (surface_layers.py): the body's own mesh where the field agrees
    # with it, the field's surface only where it stands more than ``layer_hide`` metres off the
    # body. False: the union's marching cubes everywhere, snapped onto the body near it.
    layers: bool = True
    layer_hide: float = 0.01  # about a marching-cubes cell: it bridges concavities finer than that
    flap_faces: int = 256  # shell pieces this small and within flap_off of the body go (surface_layers.layers)
    flap_off: float = 0.03
    rim_depth: float = 0.004  # the shell's open edge goes this far under the body's surface ...
    rim_reach: float = 0.03  # ... where it comes this close to it (surface_layers.tuck_rim)


def snap_to_body(vertices: np.ndarray, body_vertices: np.ndarray, body_faces: np.ndarray,
                 inner: float, outer: float, hold: np.ndarray | None = None) -> np.ndarray:
    """Move surface points near the body onto it: fully within ``inner`` metres, not at all
    beyond ``outer``, smoothly between. ``hold`` (N,) in [0,1]: the share of a point's own
    position kept whatever its distance (where the photo shows a garment). (N,3) -> (N,3)."""
    from .mesh_rig import closest_body_points

    if outer <= 0 or len(vertices) == 0:
        return vertices
    face, bary, dist = closest_body_points(vertices, body_vertices, body_faces, k=6)
    closest = (body_vertices[body_faces[face]] * bary[:, :, None]).sum(1)
    t = np.clip((dist - inner) / max(outer - inner, 1e-9), 0.0, 1.0)
    keep = t * t * (3 - 2 * t)  # smoothstep: no crease where snapping ends
    if hold is not None:
        keep = np.maximum(keep, np.clip(hold, 0.0, 1.0))
    return closest + (vertices - closest) * keep[:, None]


@dataclass
class ReferenceSilhouette:
    """The photo's person mask at the optimiser's reference view, with the body's excess over it."""

    camera: Any  # Camera of the reference view
    mask: np.ndarray  # (H, W) in [0, 1]
    excess: np.ndarray | None  # (H, W) metres the person is thicker than the body (priors.py)

    def mask_at(self, points: np.ndarray) -> np.ndarray:
        """The mask along each point's ray (bilinear), 1 off the image: the photo says nothing
        there (a half-body photo's legs), so the body stays the best guess, as in the fit.
        (N,3) world -> (N,)."""
        from .priors import points_to_pixels, sample_map

        pix, in_front = points_to_pixels(points, self.camera)
        H, W = self.mask.shape
        seen = in_front & (pix[:, 0] >= -0.5) & (pix[:, 0] <= W - 0.5) & (pix[:, 1] >= -0.5) & (pix[:, 1] <= H - 0.5)
        values = sample_map(torch.as_tensor(self.mask, dtype=torch.float32), pix)
        return torch.where(seen, values, 1.0).numpy()

    def excess_at(self, points: np.ndarray) -> np.ndarray:
        """The garment evidence (metres) along each point's ray, 0 without it. (N,3) -> (N,)."""
        from .priors import excess_at_points

        if self.excess is None:
            return np.zeros(len(points))
        return excess_at_points(points, self.camera, self.excess)


def reference_silhouette(photo, perception, fit, body, out, field_cfg: dict) -> ReferenceSilhouette:
    """The reference view exactly as the optimiser built it (same resolution, mask, body depth,
    garment measure: ``field_cfg`` is the run's saved OptimiseConfig; an older run's lacks
    ``arm_cut`` and was made without it). ``out``: the posed body (body.forward)."""
    from .optimise import radius_guess, reference_arm_pixels, reference_excess, reference_view

    posed = out.vertices[0].detach().float().cpu()
    faces = torch.as_tensor(np.asarray(body.faces), dtype=torch.long)
    cam, _, mask, depth, face_id = reference_view(photo.rgb, perception.mask, fit.camera.scaled(photo.scale), posed,
                                                  faces, int(field_cfg.get("ref_resolution", 256)))
    excess = None
    if field_cfg.get("garment_proxy", False):
        arms = reference_arm_pixels(face_id, body, out) if field_cfg.get("arm_cut", False) else None
        excess = reference_excess(mask, depth, cam, radius_guess(fit, posed), arms)
    return ReferenceSilhouette(cam, mask.clamp(0, 1).numpy(), excess)


def garment_hold(silhouette: ReferenceSilhouette, points: np.ndarray, full_at: float) -> np.ndarray | None:
    """Where the photo's silhouette shows more than the fitted body (priors.py), how much of the
    field's own surface to keep: 0 with no evidence, 1 where the excess reaches ``full_at``
    metres. None when the field was optimised without the garment prior. (N,3) -> (N,)."""
    if silhouette.excess is None or full_at <= 0:
        return None
    return np.clip(silhouette.excess_at(points) / full_at, 0.0, 1.0)


@dataclass
class BodyUnion:
    """The body's side of the union on one grid (surface_merge.py), built once per grid: the
    optimiser's streamed previews reuse it for every mesh, so Blender shows the surface the
    finalise will make."""

    axes: list  # [xs, ys, zs] grid node coordinates
    body_inside: np.ndarray  # (X, Y, Z) signed inside distance of the body
    allowed: np.ndarray | None  # (X, Y, Z) bool: the body may count here (photo mask, no garment)
    presence_ratio: float
    presence_cells: int
    smooth_cells: float = 0.0  # FinaliseConfig.smooth_m in this grid's cells

    @staticmethod
    def build(axes: list, body_v: np.ndarray, body_f: np.ndarray, fc: FinaliseConfig,
              silhouette: ReferenceSilhouette | None = None) -> "BodyUnion":
        from .surface_merge import body_inside_distance

        body_in = body_inside_distance(axes, body_v, body_f)
        spacing = float(axes[0][1] - axes[0][0])
        allowed = None
        if silhouette is not None:
            allowed = np.zeros(body_in.shape, bool)
            near = np.nonzero(body_in > -2 * spacing)  # only these nodes can put the body's surface into the result
            nodes = np.array([a[0] for a in axes]) + spacing * np.stack(near, 1)
            ok = silhouette.mask_at(nodes) > 0.25
            if fc.union_excess > 0 and silhouette.excess is not None:  # a garment's surface is the field's
                ok &= silhouette.excess_at(nodes) < fc.union_excess
            allowed[near] = ok
        return BodyUnion(axes, body_in, allowed, fc.presence_ratio, fc.presence_cells, (fc.smooth_m or 0.0) / spacing)


def density_grid(field, resolution: int, occupied: torch.Tensor | None = None) -> tuple[list, np.ndarray]:
    """The field's density (prior included) on the marching-cubes grid of its box with
    ``resolution`` cells along the longest side. ``occupied``: the renderer's occupancy mask
    (R, R, R) over the same box; nodes outside it, grown by one cell, are not evaluated (0): the
    renderer never samples there, and a CPU field is ~6 % occupied (a 192-cell grid in 1/10 of the
    time). -> (axes [xs, ys, zs], (X, Y, Z) float32)."""
    from .extract import evaluate_grid
    from .field.body_prior import grid_axes

    box = field.aabb.detach().cpu().numpy().astype(np.float64)
    axes = grid_axes(box, resolution)
    where = None if occupied is None else nodes_in_cells(axes, box, occupied)
    with torch.no_grad():
        return axes, evaluate_grid(field.density, axes, device=field.aabb.device, where=where)


def nodes_in_cells(axes: list, box: np.ndarray, occupied: torch.Tensor) -> np.ndarray:
    """Which grid nodes lie in an occupied cell of ``occupied`` (R, R, R bool over ``box``) or a
    neighbour of one. -> (X, Y, Z) bool."""
    grown = torch.nn.functional.max_pool3d(occupied.detach().cpu().float()[None, None], 3, stride=1, padding=1)[0, 0] > 0
    grown = grown.numpy()
    cells = [np.clip(((np.asarray(a) - box[0, i]) / (box[1, i] - box[0, i]) * grown.shape[i]).astype(np.int64),
                     0, grown.shape[i] - 1) for i, a in enumerate(axes)]
    return grown[np.ix_(*cells)]


def surface_from_density(density: np.ndarray, level: float, axes: list, union: BodyUnion | None):
    """Marching cubes of a density grid at ``level``, united with the body when ``union`` is given."""
    from .extract import marching_cubes
    from .field.body_prior import BodyPriorConfig
    from .surface_merge import union_with_body

    origin, spacing = np.array([a[0] for a in axes]), float(axes[0][1] - axes[0][0])
    if union is None:
        return marching_cubes(density, level, origin, spacing)
    values = union_with_body(density, level, union.body_inside, sharpness=BodyPriorConfig().sharpness,
                             presence_ratio=union.presence_ratio, presence_cells=union.presence_cells,
                             allowed=union.allowed, smooth_cells=union.smooth_cells)
    return marching_cubes(values, 0.0, origin, spacing)


def field_surface(field, fc: FinaliseConfig, resolution: int, body_v: np.ndarray, body_f: np.ndarray,
                  silhouette: ReferenceSilhouette | None = None, occupied: torch.Tensor | None = None):
    """Marching cubes of the field's level set, or of its union with the body (``fc.body_union``)
    where the field is present and, given ``silhouette``, the body projects into the person mask.
    ``occupied``: the run's occupancy mask (see ``density_grid``)."""
    axes, density = density_grid(field, resolution, occupied)
    union = BodyUnion.build(axes, body_v, body_f, fc, silhouette) if fc.body_union else None
    return surface_from_density(density, fc.level_ratio * field.config.surface_density, axes, union)


def layered_surface(surface, body_v: np.ndarray, body_f: np.ndarray, fc: FinaliseConfig, target_faces: int):
    """The body's mesh where the union's surface lies on it plus that surface's shell where it
    stands off it (surface_layers.py). ``target_faces`` (0: any): the shell gets what the body
    leaves of it (at least a third); over it still, the whole is decimated (a low-poly budget)."""
    from .extract import decimate
    from .surface_layers import join, layers, tuck_rim

    body, shell = layers(body_v, body_f, surface, hide=fc.layer_hide, flap_faces=fc.flap_faces, flap_off=fc.flap_off)
    if target_faces:
        budget = max(target_faces - body.num_faces, target_faces // 3)
        if shell.num_faces > budget:
            shell = decimate(shell, budget)
    if fc.rim_depth > 0:
        shell = tuck_rim(shell, body_v, body_f, depth=fc.rim_depth, reach=fc.rim_reach)
    both = join(body, shell)
    if not target_faces:
        return both
    return decimate(both, target_faces) if both.num_faces > target_faces else both


def finalise_config(settings) -> FinaliseConfig:
    overrides = (settings.extra or {}).get("finalise") or {}
    unknown = set(overrides) - {f.name for f in dataclasses.fields(FinaliseConfig)}
    if unknown:
        from .errors import BadInputError

        raise BadInputError(f"unknown finalise settings: {', '.join(sorted(unknown))}",
                            "see FinaliseConfig in zeroavatar_blender/engine/field_avatar.py")
    fc = dataclasses.replace(FinaliseConfig(), **overrides)
    if fc.smooth_m is None:
        fc.smooth_m = 0.0 if settings.quality == "full" else STANDARD_SMOOTH_M
    return fc


def build_field_avatar(job: Job, settings, body, params, fit, ckpt: dict[str, Any]):
    """-> (AvatarBundle, posed world vertices (V,3))."""
    from .avatar import assemble_avatar
    from .extract import CleanupConfig, clean_mesh, decimate, MeshData
    from .imageio import load_photo
    from .perception import Perception
    from .mesh_rig import bake_texture, head_part, transfer_skin_weights, unpose, unwrap_groups, unwrap_uv
    from .optimise import checkpoint_occupancy
    from .pipeline import resolve_device

    device = resolve_device(settings.device)
    fc = finalise_config(settings)
    field, cfg = load_field(ckpt, device)
    gpu = device == "cuda"
    started = time.time()
    job.stage("finalise", "Extracting the surface (marching cubes)")
    with torch.no_grad():
        out = body.forward(params)
    body_v = out.vertices[0].double().cpu().numpy()
    body_f = np.asarray(body.faces, np.int64)
    photo, perception = load_photo(job.root / settings.photo), Perception.load(job.layout.perception)
    silhouette = reference_silhouette(photo, perception, fit, body, out, cfg)
    mesh = field_surface(field, fc, fc.resolution_gpu if gpu else fc.resolution_cpu, body_v, body_f, silhouette,
                         checkpoint_occupancy(ckpt))
    if mesh.num_vertices == 0:
        from .errors import EngineError

        raise EngineError("the optimised field is empty (no surface)", "optimise again with another --seed or use --quality fast")
    job.check_cancel()
    target_faces = int(settings.extra.get("target_faces", 40_000))
    mesh = clean_mesh(mesh, CleanupConfig(target_faces=0, smooth_iterations=fc.smooth_iterations))
    if fc.layers:
        mesh = layered_surface(mesh, body_v, body_f, fc, target_faces)
    else:
        verts = mesh.vertices.astype(np.float64)
        hold = garment_hold(silhouette, verts, fc.garment_hold)
        mesh = MeshData(snap_to_body(verts, body_v, body_f, fc.snap_inner, fc.snap_outer, hold), mesh.faces)
        if target_faces:
            mesh = decimate(mesh, target_faces)
    posed_v, faces = mesh.vertices.astype(np.float64), mesh.faces.astype(np.int64)
    job.info(f"Surface: {len(posed_v)} vertices, {len(faces)} faces ({time.time() - started:.1f} s)")

    job.stage("finalise", "Rigging: skin weights from the body, rest pose")
    transforms = out.bone_transforms[0].double().cpu().numpy()
    idx, w = transfer_skin_weights(posed_v, faces, body_v, body_f, body.skin_indices.cpu().numpy(),
                                   body.skin_weights.cpu().numpy(), body.num_bones)
    rest_v = unpose(posed_v, idx, w.astype(np.float64), transforms)
    job.check_cancel()

    job.stage("finalise", "Unwrapping UVs and baking the texture")
    t = time.time()
    groups = unwrap_groups(faces, idx, w, np.asarray(body.bone_parents))
    head = head_part(faces, groups, posed_v, out.keypoints[0, :5].double().cpu().numpy())  # COCO nose, eyes, ears
    scale = {head: fc.head_texel_scale} if head is not None and fc.head_texel_scale != 1.0 else None
    vmap, new_faces, uv = unwrap_uv(rest_v, faces, groups, scale, size=settings.texture_size)
    job.info(f"UV atlas: {len(np.unique(groups))} body parts unwrapped in {time.time() - t:.1f} s")
    t = time.time()
    posed_v2, rest_v2 = posed_v[vmap], rest_v[vmap]
    idx2, w2 = idx[vmap], w[vmap]
    corner_uv = uv[new_faces]

    def field_colour(points: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return field(torch.as_tensor(points, dtype=torch.float32, device=device)).rgb.float().cpu().numpy()

    if fc.colour == "field":
        texture = bake_texture(posed_v2, new_faces, corner_uv, field_colour, size=settings.texture_size)
    else:
        priors = _colour_priors(photo, perception, settings, body, fit, out.vertices[0])
        if priors.hair is not None:
            from .finalise import LONG_HAIR_NOTE

            job.info(LONG_HAIR_NOTE)
        unseen = field_colour if settings.quality == "full" else None
        texture = bake_surface_texture(posed_v2, new_faces, corner_uv, priors, settings.texture_size, unseen,
                                       through_weight=fc.through_weight)
    job.info(f"Texture baked in {time.time() - t:.1f} s")
    bundle = assemble_avatar(body, params, rest_v2, new_faces, corner_uv, idx2, w2, texture, camera=fit.camera,
                             subject=settings.subject, quality=settings.quality,
                             extra_meta={"source_photo": settings.source_photo, "optimised_steps": int(ckpt["step"]),
                                         "field_config": cfg, "finalise": dataclasses.asdict(fc)})
    job.info(f"Avatar mesh ready in {time.time() - started:.1f} s")
    return bundle, posed_v2


def _colour_priors(photo, perception, settings, body, fit, posed_vertices):
    from .surface_colour import build_colour_priors

    mask = perception.mask if perception.mask.shape[:2] == photo.rgb.shape[:2] else None
    return build_colour_priors(photo.rgb, fit.camera.scaled(photo.scale), mask, body, posed_vertices,
                               texture_size=settings.texture_size)


def bake_surface_texture(posed_v: np.ndarray, faces: np.ndarray, corner_uv: np.ndarray, priors, size: int,
                         unseen_fn=None, through_weight: float = 0.5) -> np.ndarray:
    """The avatar's UV texture from the photo and its priors (surface_colour.py). -> (S,S,3) uint8."""
    from scipy.ndimage import distance_transform_edt

    from .render.raster import vertex_normals
    from .surface_colour import colour_surface
    from .texture import bake_margin, texel_surface_map

    face_id, bary = texel_surface_map(faces, corner_uv, size, margin=bake_margin(size))
    on = face_id >= 0
    img = np.zeros((size, size, 3), np.float64)
    if on.any():
        f = face_id[on]
        b = bary[on].astype(np.float64)
        points = (posed_v[faces[f]] * b[:, :, None]).sum(1)
        vn = vertex_normals(torch.as_tensor(posed_v), torch.as_tensor(faces)).numpy()
        normals = (vn[faces[f]] * b[:, :, None]).sum(1)
        normals /= np.linalg.norm(normals, axis=1, keepdims=True).clip(1e-12)
        img[on] = colour_surface(points, normals, posed_v, faces, priors, unseen_fn, through_weight)
        _, (ri, ci) = distance_transform_edt(~on, return_indices=True)
        img = img[ri, ci]
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
