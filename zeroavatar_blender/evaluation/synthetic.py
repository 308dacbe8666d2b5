"""Synthetic ground truth: Anny subjects in clothes-like textures (and real garments), rendered.

Deterministic from a seed, never downloaded. Each case is a folder:
    photo.png            the input: a front-ish view with a background, 512 x 512 by default
    gt.json              camera (OpenCV), body params, COCO keypoints (world and photo pixels),
                         the side/back view cameras, the garment, the pose name
    gt_mesh.npz          the outer visible surface (body + garments), world frame
    body_mesh.npz        the bare posed body, world frame
    views/{front,side,back}_rgb.png, views/*_mask.png   renders without background
Textures are painted in the body's rest pose from body regions (shirt, trousers, shoes, hair,
skin) with patterns whose back differs from their front, so back-view errors mean something.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..engine.body.base import BodyModel, BodyParams, linear_blend_skinning
from ..engine.cameras import Camera, intrinsics, look_at
from .poses import pose_array

GARMENTS = ("skirt", "jacket", "long_hair", "hat_backpack")


@dataclass
class SubjectSpec:
    name: str
    seed: int
    shape: list[float]  # Anny phenotype: gender, age, muscle, weight, height, proportions
    pose: str
    framing: str = "full"  # "full" | "half"
    garment: str | None = None
    azimuth: float = 0.0  # degrees, 0 = front
    elevation: float = 4.0
    distance: float = 3.3
    size: int = 512
    extra: dict = field(default_factory=dict)


def default_subjects() -> list[SubjectSpec]:
    """The evaluation set: 12 painted-clothes subjects + 4 wearing real garments (issue 7)."""
    spec = [
        ("standing_f", [0.1, 0.45, 0.5, 0.5, 0.5, 0.5], "standing", "full", None, 0),
        ("walking_m", [0.9, 0.5, 0.6, 0.45, 0.6, 0.5], "walking", "full", None, -12),
        ("arms_raised_f", [0.2, 0.35, 0.4, 0.35, 0.45, 0.6], "arms_raised", "full", None, 8),
        ("kick_m", [0.85, 0.3, 0.8, 0.4, 0.55, 0.5], "kick", "full", None, 15),
        ("crouch_f", [0.15, 0.55, 0.45, 0.65, 0.4, 0.4], "crouching", "full", None, -5),
        ("sitting_m", [0.95, 0.7, 0.4, 0.75, 0.5, 0.5], "sitting", "full", None, 20),
        ("half_body_m", [0.8, 0.5, 0.5, 0.5, 0.5, 0.5], "standing", "half", None, 5),
        ("tpose_heavy", [0.6, 0.6, 0.3, 0.95, 0.45, 0.5], "t_pose", "full", None, 0),
        ("hips_teen", [0.3, 0.15, 0.4, 0.4, 0.3, 0.5], "hands_on_hips", "full", None, -8),
        ("waving_old", [0.7, 0.95, 0.3, 0.6, 0.4, 0.5], "waving", "full", None, 10),
        ("stride_tall", [0.75, 0.4, 0.7, 0.3, 0.95, 0.6], "stride", "full", None, -18),
        ("contra_short", [0.25, 0.45, 0.5, 0.55, 0.1, 0.4], "contrapposto", "full", None, 3),
        ("skirt_f", [0.1, 0.4, 0.5, 0.45, 0.5, 0.5], "standing", "full", "skirt", 6),
        ("jacket_m", [0.85, 0.45, 0.5, 0.45, 0.55, 0.5], "walking", "full", "jacket", -6),
        ("hair_f", [0.15, 0.35, 0.45, 0.4, 0.5, 0.5], "contrapposto", "full", "long_hair", 10),
        ("hat_backpack_m", [0.8, 0.4, 0.55, 0.5, 0.5, 0.5], "standing", "full", "hat_backpack", -10),
    ]
    return [SubjectSpec(name, 1000 + i, shape, pose, framing, garment, az)
            for i, (name, shape, pose, framing, garment, az) in enumerate(spec)]


# -- painting ------------------------------------------------------------------------------
def _palette(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Colours of one outfit. A garment's back is the same fabric as its front (real clothes are
    cut from one cloth) but carries a different pattern: a solid back with a printed logo behind
    a striped front, pockets on trousers, so back views test more than a copy of the front."""
    def colour(lo: float, hi: float) -> np.ndarray:
        return rng.uniform(lo, hi, 3)

    def same_fabric(c: np.ndarray) -> np.ndarray:
        return np.clip(c * rng.uniform(0.9, 1.05) + rng.normal(0, 0.02, 3), 0, 1)

    skin_tones = np.array([[0.96, 0.80, 0.69], [0.87, 0.67, 0.52], [0.67, 0.47, 0.34], [0.45, 0.31, 0.22]])
    hair = np.array([[0.10, 0.07, 0.05], [0.35, 0.22, 0.10], [0.75, 0.6, 0.35], [0.5, 0.5, 0.5]])
    shirt_a, shirt_b = colour(0.3, 0.95), colour(0.05, 0.6)
    trousers, garment_a = colour(0.05, 0.5), colour(0.4, 1.0)
    return {
        "skin": skin_tones[rng.integers(len(skin_tones))],
        "hair": hair[rng.integers(len(hair))],
        "shirt_a": shirt_a, "shirt_b": shirt_b, "shirt_back": same_fabric(shirt_a if rng.random() < 0.5 else shirt_b),
        "logo": colour(0.6, 1.0),
        "trousers": trousers, "trousers_back": same_fabric(trousers), "shoes": colour(0.02, 0.25),
        "garment_a": garment_a, "garment_b": colour(0.0, 0.5), "garment_back": same_fabric(garment_a),
    }


def _landmarks(body: BodyModel, rest_keypoints: np.ndarray) -> dict[str, float]:
    k = rest_keypoints
    return {
        "neck_z": float((k[5, 2] + k[6, 2]) / 2 + 0.06), "shoulder_z": float((k[5, 2] + k[6, 2]) / 2),
        "shoulder_x": float(k[5, 0]), "elbow_x": float(k[7, 0]), "wrist_x": float(k[9, 0]),
        "hip_z": float((k[11, 2] + k[12, 2]) / 2), "knee_z": float((k[13, 2] + k[14, 2]) / 2),
        "ankle_z": float((k[15, 2] + k[16, 2]) / 2), "nose_z": float(k[0, 2]), "ear_z": float(k[3, 2]),
    }


def paint_points(p: np.ndarray, lm: dict[str, float], pal: dict[str, np.ndarray], garment: str | None) -> np.ndarray:
    """Colour of rest-pose surface points (N,3) -> (N,3) in [0,1]. Front is -Y, back +Y."""
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    ax = np.abs(x)
    front = y < -0.005
    out = np.tile(pal["skin"], (len(p), 1))
    torso = (z < lm["neck_z"] - 0.02) & (z > lm["hip_z"] - 0.06) & (ax < lm["shoulder_x"] + 0.03)
    sleeve = (ax >= lm["shoulder_x"] + 0.03) & (ax < lm["elbow_x"] - 0.02) & (z > lm["hip_z"])
    shirt = torso | sleeve
    stripes = (np.floor((z - lm["hip_z"]) / 0.045) % 2 == 0)[:, None]
    shirt_front = np.where(stripes, pal["shirt_a"], pal["shirt_b"])
    logo = ((x - 0.0) ** 2 + (z - (lm["shoulder_z"] - 0.15)) ** 2 < 0.07 ** 2)[:, None]
    shirt_back = np.where(logo, pal["logo"], pal["shirt_back"])
    out = np.where((shirt & front)[:, None], shirt_front, out)
    out = np.where((shirt & ~front)[:, None], shirt_back, out)
    legs = (z <= lm["hip_z"] - 0.06) & (z > lm["ankle_z"] + 0.03)
    seam = (np.abs(ax - 0.09) < 0.006)[:, None]
    pockets = ((np.abs(ax - 0.08) < 0.045) & (z < lm["hip_z"] - 0.08) & (z > lm["hip_z"] - 0.2))[:, None]
    out = np.where((legs & front)[:, None], np.where(seam, pal["trousers"] * 0.6, pal["trousers"]), out)
    out = np.where((legs & ~front)[:, None], np.where(pockets, pal["trousers_back"] * 0.55, pal["trousers_back"]), out)
    out = np.where((z <= lm["ankle_z"] + 0.03)[:, None], pal["shoes"], out)
    hair = (z > lm["ear_z"] + 0.02) | ((z > lm["nose_z"] - 0.06) & (y > 0.02) & (z > lm["neck_z"] + 0.05))
    out = np.where(hair[:, None], pal["hair"], out)
    if garment == "jacket":
        check = ((np.floor(z / 0.08) + np.floor(x / 0.08)) % 2 == 0)[:, None]
        jacket_front = np.where(check, pal["garment_a"], pal["garment_a"] * 0.7)
        zone = (z < lm["neck_z"] + 0.08) & (z > lm["hip_z"] - 0.12) & (ax < lm["wrist_x"] - 0.04)
        out = np.where((zone & front)[:, None], jacket_front, out)
        out = np.where((zone & ~front)[:, None], pal["garment_back"], out)
    if garment == "long_hair":
        zone = (y > -0.03) & (z > lm["shoulder_z"] - 0.3) & (ax < 0.2)
        out = np.where(zone[:, None] & ((z > lm["neck_z"] - 0.05) | (y > 0.0))[:, None], pal["hair"], out)
    return np.clip(out, 0, 1)


def paint_texture(body: BodyModel, rest_vertices: np.ndarray, lm: dict[str, float], pal: dict[str, np.ndarray],
                  garment: str | None, size: int = 1024) -> np.ndarray:
    """A UV texture (S,S,3) uint8 painted from the rest-pose position of each texel."""
    from ..engine.texture import texel_surface_map

    face_id, bary = texel_surface_map(body.faces, body.corner_uv, size)
    on = face_id >= 0
    tri = rest_vertices[body.faces[face_id[on]]]
    points = (tri * bary[on][:, :, None]).sum(1)
    img = np.zeros((size, size, 3), np.float64)
    img[on] = paint_points(points, lm, pal, garment)
    # pad the atlas so bilinear lookups at seams do not pull in black
    from scipy.ndimage import distance_transform_edt

    _, (ri, ci) = distance_transform_edt(~on, return_indices=True)
    img = img[ri, ci]
    return (img * 255 + 0.5).astype(np.uint8)


# -- garments ------------------------------------------------------------------------------
def _displacement(rest: np.ndarray, normals: np.ndarray, lm: dict[str, float], garment: str) -> np.ndarray:
    """Per-vertex outward offsets (metres) that turn the body into body + a close garment."""
    x, y, z = rest[:, 0], rest[:, 1], rest[:, 2]
    ax = np.abs(x)
    d = np.zeros(len(rest))
    if garment == "jacket":
        zone = (z < lm["neck_z"] + 0.02) & (z > lm["hip_z"] - 0.12) & (ax < lm["wrist_x"] - 0.06)
        d[zone] = 0.045
        collar = (z >= lm["neck_z"] - 0.04) & (z < lm["neck_z"] + 0.12) & (ax < 0.12)
        d[collar] = np.maximum(d[collar], 0.05)
        hood = (z > lm["neck_z"]) & (y > 0.0) & (z < lm["ear_z"] + 0.05)
        d[hood] = np.maximum(d[hood], 0.06)
    elif garment == "long_hair":
        head = z > lm["ear_z"]
        d[head] = 0.025
        back = (y > -0.02) & (z > lm["shoulder_z"] - 0.32) & (ax < 0.2) & (z < lm["ear_z"] + 0.1)
        d[back] = np.maximum(d[back], 0.05 + 0.04 * np.clip((lm["neck_z"] - z[back]) / 0.3, 0, 1))
    return d


def _smooth_on_mesh(values: np.ndarray, faces: np.ndarray, iterations: int = 6) -> np.ndarray:
    """Average over neighbours so garment edges taper instead of stepping."""
    import scipy.sparse as sp

    n = len(values)
    i = np.concatenate([faces[:, 0], faces[:, 1], faces[:, 2], faces[:, 1], faces[:, 2], faces[:, 0]])
    j = np.concatenate([faces[:, 1], faces[:, 2], faces[:, 0], faces[:, 0], faces[:, 1], faces[:, 2]])
    A = sp.coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n)).tocsr()
    A.data[:] = 1.0
    deg = np.asarray(A.sum(1)).ravel().clip(1)
    for _ in range(iterations):
        values = 0.5 * values + 0.5 * (A @ values) / deg
    return values


def _skirt_mesh(lm: dict[str, float], rest: np.ndarray, segments: int = 72, rings: int = 14):
    """A closed, flared skirt (frustum) around the hips in the rest pose, with vertex colours later."""
    hips = rest[np.abs(rest[:, 2] - lm["hip_z"]) < 0.03]
    cx, cy = hips[:, 0].mean(), hips[:, 1].mean()
    r_top = float(np.percentile(np.hypot(hips[:, 0] - cx, hips[:, 1] - cy), 95)) + 0.02
    z_top, z_bottom = lm["hip_z"] + 0.08, lm["knee_z"] - 0.04
    verts, faces = [], []
    for r in range(rings + 1):
        t = r / rings
        z = z_top + (z_bottom - z_top) * t
        radius = r_top * (1 + 0.75 * t ** 1.2)
        for s in range(segments):
            a = 2 * math.pi * s / segments
            verts.append([cx + radius * math.sin(a), cy - radius * math.cos(a), z])
    for r in range(rings):
        for s in range(segments):
            a, b = r * segments + s, r * segments + (s + 1) % segments
            c, d = a + segments, b + segments
            faces += [[a, c, b], [b, c, d]]
    top_c, bot_c = len(verts), len(verts) + 1
    verts += [[cx, cy, z_top], [cx, cy, z_bottom]]
    last = rings * segments
    for s in range(segments):
        faces.append([top_c, s, (s + 1) % segments])
        faces.append([bot_c, last + (s + 1) % segments, last + s])
    return np.array(verts), np.array(faces, dtype=np.int64)


def _box(center, size):
    import trimesh

    m = trimesh.creation.box(extents=size)
    return np.asarray(m.vertices) + np.asarray(center), np.asarray(m.faces, dtype=np.int64)


def _cylinder(center, radius, height, sections=48):
    import trimesh

    m = trimesh.creation.cylinder(radius=radius, height=height, sections=sections)
    return np.asarray(m.vertices) + np.asarray(center), np.asarray(m.faces, dtype=np.int64)


def _accessories(garment: str, rest: np.ndarray, lm: dict[str, float], pal) -> list[dict]:
    """Rigid or skinned extra meshes in the rest pose: dict(vertices, faces, colors, bone)."""
    top = rest[:, 2].max()
    head = rest[rest[:, 2] > lm["ear_z"]]
    hx, hy = head[:, 0].mean(), head[:, 1].mean()
    items = []
    if garment == "skirt":
        v, f = _skirt_mesh(lm, rest)
        ang = np.arctan2(v[:, 0], -v[:, 1])
        front = v[:, 1] < rest[:, 1].mean()
        stripes = (np.floor((ang + math.pi) / (2 * math.pi) * 24) % 2 == 0)
        col = np.where((front & stripes)[:, None], pal["garment_a"], pal["garment_b"])
        col = np.where((~front)[:, None], pal["garment_back"], col)
        items.append(dict(vertices=v, faces=f, colors=col, bone="root"))
    if garment == "hat_backpack":
        v, f = _cylinder([hx, hy, top + 0.04], 0.105, 0.12)
        items.append(dict(vertices=v, faces=f, colors=np.tile(pal["garment_a"], (len(v), 1)), bone="head"))
        v, f = _cylinder([hx, hy - 0.02, top - 0.015], 0.2, 0.012)
        items.append(dict(vertices=v, faces=f, colors=np.tile(pal["garment_b"], (len(v), 1)), bone="head"))
        back_y = rest[(rest[:, 2] > lm["hip_z"] + 0.1) & (rest[:, 2] < lm["shoulder_z"]) & (np.abs(rest[:, 0]) < 0.1), 1].max()
        v, f = _box([0.0, back_y + 0.09, (lm["shoulder_z"] + lm["hip_z"]) / 2 + 0.05], [0.3, 0.18, 0.4])
        items.append(dict(vertices=v, faces=f, colors=np.tile(pal["garment_back"], (len(v), 1)), bone="spine02"))
    return items


# -- rendering -----------------------------------------------------------------------------
def _composite(layers: list[dict], background: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Depth-composite render_mesh outputs; returns (rgb float (H,W,3), mask bool)."""
    depth = torch.stack([l["depth"] for l in layers]).float()
    best = depth.argmin(0)
    rgb = torch.stack([l["rgb"].float() for l in layers])
    out = torch.gather(rgb, 0, best[None, ..., None].expand(1, *best.shape, 3))[0].numpy()
    mask = torch.isfinite(depth.min(0).values).numpy()
    if background is not None:
        out = np.where(mask[..., None], out, background)
    return out, mask


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    rows = np.linspace(0, 1, size)[:, None, None]
    wall = rng.uniform(0.55, 0.9, 3)
    floor = rng.uniform(0.25, 0.55, 3)
    horizon = 0.62
    bg = np.where(rows < horizon, wall * (0.9 + 0.1 * rows), floor * (0.8 + 0.2 * rows))
    bg = np.broadcast_to(bg, (size, size, 3)).copy()
    bg += rng.normal(0, 0.01, bg.shape)
    return np.clip(bg, 0, 1)


@dataclass
class SyntheticCase:
    spec: SubjectSpec
    photo: np.ndarray  # (S,S,3) uint8
    camera: Camera
    params: BodyParams
    keypoints3d: np.ndarray  # (17,3) world
    keypoints2d: np.ndarray  # (17,2) photo px
    gt_vertices: np.ndarray
    gt_faces: np.ndarray
    body_vertices: np.ndarray
    body_faces: np.ndarray
    views: dict[str, dict]  # name -> {"rgb": uint8, "mask": bool, "camera": Camera}
    texture: np.ndarray


def make_case(body: BodyModel, spec: SubjectSpec, *, gt_resolution: float = 0.006) -> SyntheticCase:
    from ..engine.render.raster import render_mesh
    from .voxel import outer_surface

    rng = np.random.default_rng(spec.seed)
    params = body.zero_params()
    params.pose = torch.as_tensor(pose_array(spec.pose, body.bone_names), dtype=body.dtype)[None]
    params.shape = torch.as_tensor([spec.shape], dtype=body.dtype)
    with torch.no_grad():
        out = body.forward(params)
        rest_v = out.rest_vertices[0].double().numpy()
        # stand on the floor at z = 0 after posing: shift the whole posed body
        posed = out.vertices[0].double().numpy()
        params.transl = torch.tensor([[0.0, 0.0, -posed[:, 2].min()]], dtype=body.dtype)
        out = body.forward(params)
    posed = out.vertices[0].double().numpy()
    transforms = out.bone_transforms
    rest_kp = torch.einsum("kv,vd->kd", body._coco_weights.double(), out.rest_vertices[0].double()).numpy() \
        if hasattr(body, "_coco_weights") else out.keypoints[0].double().numpy()
    lm = _landmarks(body, rest_kp)
    pal = _palette(rng)
    texture = paint_texture(body, rest_v, lm, pal, spec.garment)
    faces = body.faces
    body_mesh_v = posed
    meshes_for_gt = []
    layers_geo = []  # (vertices, faces, kwargs)
    if spec.garment in ("jacket", "long_hair"):
        normals = _vertex_normals_np(rest_v, faces)
        disp = _smooth_on_mesh(_displacement(rest_v, normals, lm, spec.garment), faces)
        dressed_rest = rest_v + normals * disp[:, None]
        with torch.no_grad():
            dressed = linear_blend_skinning(torch.as_tensor(dressed_rest, dtype=body.dtype)[None], transforms,
                                            body.skin_indices, body.skin_weights)[0].double().numpy()
        layers_geo.append((dressed, faces, {"corner_uv": body.corner_uv, "texture": texture}))
        meshes_for_gt.append((dressed, faces))
    else:
        layers_geo.append((posed, faces, {"corner_uv": body.corner_uv, "texture": texture}))
        meshes_for_gt.append((posed, faces))
    for item in _accessories(spec.garment or "", rest_v, lm, pal):
        b = body.bone_names.index(item["bone"])
        T = transforms[0, b].double().numpy()
        v = item["vertices"] @ T[:3, :3].T + T[:3, 3]
        layers_geo.append((v, item["faces"], {"vertex_colors": torch.as_tensor(item["colors"])}))
        meshes_for_gt.append((v, item["faces"]))

    # the photo camera: look at the body centre (or the upper body for a half-body framing)
    lo, hi = posed.min(0), posed.max(0)
    target = (lo + hi) / 2
    distance = spec.distance * (hi[2] - lo[2]) / 1.75
    K = intrinsics(spec.size, spec.size)
    if spec.framing == "half":
        target = np.array([target[0], target[1], hi[2] - 0.42])
        distance = 1.5
    def camera_at(az: float, el: float) -> Camera:
        a, e = math.radians(az), math.radians(el)
        eye = target + distance * np.array([math.sin(a) * math.cos(e), -math.cos(a) * math.cos(e), math.sin(e)])
        return Camera(K.copy(), look_at(eye, target), spec.size, spec.size)

    photo_cam = camera_at(spec.azimuth, spec.elevation)
    background = _background(spec.size, rng)

    def render(cam: Camera, bg: np.ndarray | None):
        # a key light above and to the side of each camera, so every view is lit alike
        to_cam = cam.center - target
        light = to_cam / np.linalg.norm(to_cam) + np.array([0.0, 0.0, 0.9]) + 0.3 * np.cross(to_cam / np.linalg.norm(to_cam), [0, 0, 1])
        layers = [render_mesh(torch.as_tensor(v), f, cam, light_dir=light, ambient=0.45, **kw) for v, f, kw in layers_geo]
        return _composite(layers, bg)

    rgb, _ = render(photo_cam, background)
    photo = (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)
    views = {}
    for name, az in (("front", spec.azimuth), ("side", spec.azimuth + 90), ("back", spec.azimuth + 180)):
        cam = camera_at(az, spec.elevation)
        rgb, mask = render(cam, None)
        views[name] = {"rgb": (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8), "mask": mask, "camera": cam}
    if len(meshes_for_gt) == 1 and spec.garment is None:
        gt_v, gt_f = posed, faces
    else:
        gt_v, gt_f = outer_surface(meshes_for_gt, gt_resolution)
    kp3 = out.keypoints[0].double().numpy()
    return SyntheticCase(spec, photo, photo_cam, params.detach(), kp3, photo_cam.project(kp3), gt_v, gt_f,
                         body_mesh_v, faces, views, texture)


def _vertex_normals_np(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    n = np.zeros_like(v)
    fn = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    for k in range(3):
        np.add.at(n, f[:, k], fn)
    return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)


def save_case(case: SyntheticCase, folder: Path) -> Path:
    from PIL import Image

    folder = Path(folder)
    (folder / "views").mkdir(parents=True, exist_ok=True)
    Image.fromarray(case.photo).save(folder / "photo.png")
    Image.fromarray(case.texture).save(folder / "texture.png")
    for name, view in case.views.items():
        Image.fromarray(view["rgb"]).save(folder / "views" / f"{name}_rgb.png")
        Image.fromarray((view["mask"] * 255).astype(np.uint8)).save(folder / "views" / f"{name}_mask.png")
    np.savez_compressed(folder / "gt_mesh.npz", vertices=case.gt_vertices.astype(np.float32), faces=case.gt_faces.astype(np.int32))
    np.savez_compressed(folder / "body_mesh.npz", vertices=case.body_vertices.astype(np.float32), faces=case.body_faces.astype(np.int32))
    meta = {
        "spec": asdict(case.spec), "camera": case.camera.to_json(), "params": case.params.to_json(),
        "keypoints3d": case.keypoints3d.tolist(), "keypoints2d": case.keypoints2d.tolist(),
        "views": {n: v["camera"].to_json() for n, v in case.views.items()},
    }
    (folder / "gt.json").write_text(json.dumps(meta, indent=1))
    return folder


def load_case_meta(folder: Path) -> dict:
    return json.loads((Path(folder) / "gt.json").read_text())


def generate_set(body: BodyModel, out: Path, subjects: list[SubjectSpec] | None = None) -> list[Path]:
    """Write every case (skipping ones already complete with the same spec)."""
    folders = []
    for spec in subjects or default_subjects():
        folder = Path(out) / spec.name
        meta = folder / "gt.json"
        if meta.exists() and json.loads(meta.read_text()).get("spec") == asdict(spec):
            folders.append(folder)
            continue
        folders.append(save_case(make_case(body, spec), folder))
    return folders
