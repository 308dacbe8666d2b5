"""The fast-path UV texture: the photo projected onto the fitted body's UV layout.

This is the UV prior of the ZeroAvatar method. Every texel is traced to its point on the posed
body and looked up in the photo when that point is visible (not occluded, facing the camera,
inside the person mask). Texels the photo does not show take the colour of their left-right
mirror texel (x -> -x: left arm <-> right arm, never front <-> back) when that one was seen; the
back of the head takes the colour the photo shows on the crown (hair, a cap: `head_zones`); the
rest (the back, above all) is filled smoothly over the mesh surface, and the empty atlas space
is padded so that bilinear sampling and mipmaps never pull in black at UV seams.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .body.base import BodyModel
from .cameras import Camera
from .head_zones import crown_colour, hair_fall_zones, hair_reach, head_zones, long_hair_in_photo
from .render.raster import rasterize, vertex_normals

EMPTY, SEEN, MIRRORED, SMOOTHED, CROWN = 0, 1, 2, 3, 4  # UVTexture.source codes

MIN_FACING = 0.2  # cos of the view angle below which a texel is too grazing to trust
DEPTH_TOLERANCE_M = 0.015  # occlusion slack on top of a two-pixel depth footprint


@dataclass
class UVTexture:
    image: np.ndarray  # (S,S,3) uint8, v up (image row = (1 - v) * S)
    source: np.ndarray  # (S,S) uint8: EMPTY, SEEN, MIRRORED, SMOOTHED or CROWN
    confidence: np.ndarray  # (S,S) float32 in [0,1]: facing cosine of seen texels, 0 elsewhere
    crown: np.ndarray | None = None  # (3,) float in [0,255]: the crown's colour (`head_zones`), None if unseen
    long_hair: bool = False  # the photo shows hair of the crown's colour falling past the neck


def uv_to_texel(uv: np.ndarray, size: int) -> np.ndarray:
    """(...,2) uv -> (...,2) (column, row) texel coordinates, texel centres at integers."""
    return np.stack([uv[..., 0] * size - 0.5, (1.0 - uv[..., 1]) * size - 0.5], -1)


def bake_margin(size: int) -> float:
    """Texels around each chart that a baker fills from the chart's own faces: half the padding
    the packer leaves between charts (``mesh_rig.unwrap_uv``: size / 256), so neighbouring
    charts never compete for a texel."""
    return max(1.0, size / 512)


def texel_surface_map(faces: np.ndarray, corner_uv: np.ndarray, size: int,
                      margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise the UV layout: which face and where in it each texel centre lies.

    ``margin`` (texels): a texel centre no face covers but within that distance of one takes the
    nearest face, at the nearest point of it (barycentrics clamped to the triangle). Why: a face
    smaller than a texel (a sliver, a one-face chart) covers no texel centre, and the renderer's
    bilinear lookup reads the texels around a chart's edge; filled from the nearest *texel* they
    took whatever chart lay nearest in the atlas (measured: 237 charts of at most 3 faces on a
    portrait's avatar, each a speck of some other body part's colour). Bakers pass a margin; the
    layout's own maps (mirror, prior) keep the exact coverage.

    faces (F,3), corner_uv (F,3,2) -> (face_id (S,S) int64, -1 off the layout; bary (S,S,3) float32).
    """
    corner_uv = np.asarray(corner_uv, dtype=np.float64)
    if corner_uv.shape != (len(faces), 3, 2):
        raise ValueError(f"corner_uv must be (F,3,2) for {len(faces)} faces, got {corner_uv.shape}")
    xy = uv_to_texel(corner_uv.reshape(-1, 2), size)
    verts = torch.from_numpy(np.concatenate([xy, np.ones((len(xy), 1))], 1))  # z = 1: affine barycentrics
    tris = torch.arange(len(xy)).reshape(-1, 3)
    raster = rasterize(verts, tris, torch.eye(3, dtype=torch.float64), size, size)
    face_id, bary = raster.face_id.numpy(), raster.bary.numpy().astype(np.float32)
    if margin > 0 and len(faces):
        near_face, near_bary = nearest_faces(xy.reshape(-1, 3, 2), face_id < 0, margin)
        extra = near_face >= 0
        face_id = np.where(extra, near_face, face_id)
        bary[extra] = near_bary[extra]
    return face_id, bary


def _closest_on_triangles(p: np.ndarray, tri: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Closest point of 2D triangles to points: p (N,2), tri (N,3,2) -> (distance (N,), bary (N,3)).
    The points are outside their triangles (or on an edge), so the nearest point is on an edge."""
    best_d = np.full(len(p), np.inf)
    best_b = np.zeros((len(p), 3))
    for i in range(3):
        j = (i + 1) % 3
        a, e = tri[:, i], tri[:, j] - tri[:, i]
        t = np.clip(((p - a) * e).sum(1) / np.maximum((e * e).sum(1), 1e-18), 0.0, 1.0)
        d = np.linalg.norm(a + t[:, None] * e - p, axis=1)
        better = d < best_d
        best_d[better] = d[better]
        b = np.zeros((int(better.sum()), 3))
        b[:, i], b[:, j] = 1.0 - t[better], t[better]
        best_b[better] = b
    return best_d, best_b


def nearest_faces(xy: np.ndarray, empty: np.ndarray, margin: float,
                  chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """For the ``empty`` (S,S) texels within ``margin`` texels of a triangle of ``xy`` (F,3,2,
    texel coordinates): that nearest triangle and the barycentrics of its nearest point.
    -> (face (S,S) int64, -1 elsewhere; bary (S,S,3) float32)."""
    S = empty.shape[0]
    best = np.full(empty.shape, np.inf)
    face = np.full(empty.shape, -1, np.int64)
    bary = np.zeros((*empty.shape, 3), np.float32)
    for start in range(0, len(xy), chunk):
        t = xy[start:start + chunk]
        lo = np.clip(np.floor(t.min(1) - margin), 0, S - 1).astype(np.int64)
        hi = np.clip(np.ceil(t.max(1) + margin), 0, S - 1).astype(np.int64)
        w = hi - lo + 1
        n = w[:, 0] * w[:, 1]
        f = np.repeat(np.arange(len(t)), n)
        k = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        cx, cy = lo[f, 0] + k % w[f, 0], lo[f, 1] + k // w[f, 0]
        keep = empty[cy, cx]
        f, cx, cy = f[keep], cx[keep], cy[keep]
        d, b = _closest_on_triangles(np.stack([cx, cy], 1).astype(np.float64), t[f])
        near = d <= margin
        f, cx, cy, d, b = f[near], cx[near], cy[near], d[near], b[near]
        order = np.lexsort((d, cy * S + cx))  # by texel, nearest first
        key = (cy * S + cx)[order]
        first = order[np.r_[True, key[1:] != key[:-1]]] if len(key) else order
        f, cx, cy, d, b = f[first], cx[first], cy[first], d[first], b[first]
        better = d < best[cy, cx]
        cx, cy = cx[better], cy[better]
        best[cy, cx] = d[better]
        face[cy, cx] = f[better] + start
        bary[cy, cx] = b[better]
    return face, bary


def mirror_faces(faces: np.ndarray, vertex_mirror: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each face's left-right counterpart and the matching corners.

    -> (mirror_face (F,) int64, -1 where the mirrored vertices form no face; corner (F,3) int64:
    corner k of face f is corner ``corner[f, k]`` of ``mirror_face[f]``).
    """
    faces = np.asarray(faces, dtype=np.int64)
    n = int(max(faces.max(), vertex_mirror.max())) + 1

    def key(tri: np.ndarray) -> np.ndarray:  # an order-free id of a vertex triple
        s = np.sort(tri, 1)
        return (s[:, 0] * n + s[:, 1]) * n + s[:, 2]

    keys = key(faces)
    order = np.argsort(keys)
    mirrored = vertex_mirror[faces]
    mkeys = key(mirrored)
    pos = np.clip(np.searchsorted(keys[order], mkeys), 0, len(keys) - 1)
    found = keys[order][pos] == mkeys
    mirror_face = np.where(found, order[pos], -1)
    corner = np.argmax(faces[np.maximum(mirror_face, 0)][:, None, :] == mirrored[:, :, None], axis=2)
    return mirror_face, corner


def uv_mirror_map(faces: np.ndarray, corner_uv: np.ndarray, vertex_mirror: np.ndarray, size: int,
                  surface: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """(S,S,2) uv of each texel's left-right symmetric counterpart, NaN where undefined.

    The counterpart of a point with barycentrics b in face f is the point with the same
    barycentrics on the mirrored vertices, looked up in the mirror face's own UVs.
    """
    face_id, bary = surface if surface is not None else texel_surface_map(faces, corner_uv, size)
    mirror_face, corner = mirror_faces(faces, np.asarray(vertex_mirror, dtype=np.int64))
    out = np.full((size, size, 2), np.nan, dtype=np.float32)
    idx = np.nonzero(face_id.reshape(-1) >= 0)[0]
    f = face_id.reshape(-1)[idx]
    mf = mirror_face[f]
    ok = mf >= 0
    idx, f, mf = idx[ok], f[ok], mf[ok]
    uv = np.asarray(corner_uv, dtype=np.float32)[mf[:, None], corner[f]]  # (N,3,2) in f's corner order
    out.reshape(-1, 2)[idx] = (bary.reshape(-1, 3)[idx, :, None] * uv).sum(1)
    return out


_LAYOUT_CACHE: "weakref.WeakKeyDictionary[BodyModel, dict[int, tuple]]" = weakref.WeakKeyDictionary()


def body_uv_layout(body: BodyModel, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(face_id, bary, mirror_uv) for a body's UV layout, cached per body and size (topology only)."""
    per_body = _LAYOUT_CACHE.setdefault(body, {})
    if size not in per_body:
        surface = texel_surface_map(body.faces, body.corner_uv, size)
        mirror = uv_mirror_map(body.faces, body.corner_uv, body.vertex_mirror(), size, surface=surface)
        per_body.clear()  # keep one size: the maps take ~50 MB at 2048
        per_body[size] = (*surface, mirror)
    return per_body[size]


def sample_image(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear lookup at pixel coordinates (centres at integers, clamped at the border).
    image (H,W,C), x/y (N,) -> (N,C) float32."""
    H, W = image.shape[:2]
    x = np.clip(x, 0, W - 1)
    y = np.clip(y, 0, H - 1)
    x0 = np.minimum(np.floor(x).astype(np.int64), W - 2) if W > 1 else np.zeros(len(x), np.int64)
    y0 = np.minimum(np.floor(y).astype(np.int64), H - 2) if H > 1 else np.zeros(len(y), np.int64)
    x1, y1 = np.minimum(x0 + 1, W - 1), np.minimum(y0 + 1, H - 1)
    fx, fy = (x - x0)[:, None].astype(np.float32), (y - y0)[:, None].astype(np.float32)
    img = image.astype(np.float32, copy=False)
    top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
    bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def erode_mask(mask: np.ndarray, radius: int) -> np.ndarray:
    """Shrink a person mask by ``radius`` pixels (a disk), so background at its edge stays out."""
    if radius <= 0:
        return mask.astype(bool)
    t = torch.from_numpy(~mask.astype(bool)).float()[None, None]
    k = 2 * radius + 1
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    disk = torch.from_numpy((xx ** 2 + yy ** 2 <= radius * radius + 0.5).astype(np.float32))[None, None]
    grown = F.conv2d(t, disk, padding=k // 2)[0, 0] > 0.5
    return ~grown.numpy()


def fill_on_mesh(faces: np.ndarray, num_vertices: int, face_id: np.ndarray, bary: np.ndarray,
                 colors: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Smooth colours for the whole surface from the texels that have one.

    Harmonic interpolation on the mesh (a screened Laplace problem on the vertex graph): it
    follows the body across UV seams and islands, which a UV-space fill cannot. face_id (N,)
    and bary (N,3) of covered texels, colors (N,3), known (N,) bool -> (num_vertices, 3) colours.
    """
    from scipy.sparse import coo_matrix, diags
    from scipy.sparse.linalg import spsolve

    V = num_vertices
    corners = faces[face_id]  # (N,3)
    w_all = np.bincount(corners.reshape(-1), bary.reshape(-1).astype(np.float64), minlength=V)
    kc, kb = corners[known], bary[known].astype(np.float64)
    w_known = np.bincount(kc.reshape(-1), kb.reshape(-1), minlength=V)
    acc = np.stack([np.bincount(kc.reshape(-1), (kb[:, :, None] * colors[known][:, None, :]).reshape(-1, 3)[:, c],
                                minlength=V) for c in range(3)], 1)
    if not known.any():
        return np.full((V, 3), 127.0)
    mean = colors[known].mean(0)
    target = np.where(w_known[:, None] > 0, acc / np.maximum(w_known, 1e-12)[:, None], mean)
    fraction = np.where(w_all > 0, w_known / np.maximum(w_all, 1e-12), 0.0)
    lam = 50.0 * fraction + 1e-4  # known vertices pinned, the rest pulled gently to the mean
    i = faces[:, [0, 1, 2, 1, 2, 0]].reshape(-1)
    j = faces[:, [1, 2, 0, 0, 1, 2]].reshape(-1)
    A = coo_matrix((np.ones(len(i)), (i, j)), shape=(V, V)).tocsr()
    A.data[:] = 1.0  # an edge shared by two faces is still one edge
    L = diags(np.asarray(A.sum(1)).ravel()) - A
    system = (L + diags(lam)).tocsc()
    return np.asarray(spsolve(system, lam[:, None] * target)).reshape(V, 3)


def push_pull(image: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Fill texels of zero weight from a pyramid of weighted averages (pad across islands).
    image (S,S,C) float, weight (S,S) in [0,1] -> (S,S,C) with weighted texels unchanged."""
    img = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]
    w = torch.from_numpy(weight.astype(np.float32))[None, None]
    levels = [(img * w, w)]
    while min(levels[-1][1].shape[-2:]) > 1:
        cw, ww = levels[-1]
        if cw.shape[-1] % 2 or cw.shape[-2] % 2:  # odd sizes: pad with empty texels
            pad = (0, cw.shape[-1] % 2, 0, cw.shape[-2] % 2)
            cw, ww = F.pad(cw, pad), F.pad(ww, pad)
        levels.append((F.avg_pool2d(cw, 2), F.avg_pool2d(ww, 2)))
    cw, ww = levels[-1]
    out = cw / ww.clamp_min(1e-12)
    for cw, ww in reversed(levels[:-1]):
        up = F.interpolate(out, scale_factor=2, mode="bilinear", align_corners=False)[..., :cw.shape[-2], :cw.shape[-1]]
        out = torch.where(ww > 0, cw / ww.clamp_min(1e-12), up)
    return out[0].permute(1, 2, 0).numpy()


def project_texels(points: np.ndarray, normals: np.ndarray,
                   camera: Camera) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World points (N,3) and unit normals -> (pixels (N,2), camera z (N,), facing cosine (N,))."""
    cam = camera.to_cam(points)
    z = cam[:, 2]
    uvw = cam @ camera.K.T
    pix = uvw[:, :2] / np.where(np.abs(uvw[:, 2:3]) > 1e-9, uvw[:, 2:3], 1e-9)
    to_cam = camera.center[None] - points
    to_cam /= np.linalg.norm(to_cam, axis=1, keepdims=True).clip(1e-12)
    return pix, z, (normals * to_cam).sum(1)


def bake_photo_texture(photo_rgb: np.ndarray, camera: Camera, vertices_world: torch.Tensor | np.ndarray,
                       body: BodyModel, *, mask: np.ndarray | None = None, size: int = 1024,
                       mask_erode_px: int | None = None) -> UVTexture:
    """Project the photo onto the posed body's UV layout (seen -> mirrored -> smoothed, with the
    crown's colour behind the head -> padded).

    ``camera`` must describe ``photo_rgb``'s own size (pass ``camera.scaled(...)`` for a resized
    photo); ``vertices_world`` (V,3) is the body posed as in the photo; ``mask`` (H,W) is the
    person mask (bool, or soft in [0,1] cut at 0.5), eroded by ``mask_erode_px`` (default: about
    0.3 % of the image side, at least 2 px) so background colour at its edge does not bleed onto
    the body.
    """
    photo = np.asarray(photo_rgb)
    if photo.ndim != 3 or photo.shape[2] < 3:
        raise ValueError(f"bake_photo_texture: photo must be (H,W,3), got {photo.shape}")
    photo = photo[..., :3]
    H, W = photo.shape[:2]
    if (W, H) != (camera.width, camera.height):
        raise ValueError(f"bake_photo_texture: the camera is for {camera.width}x{camera.height} but the photo "
                         f"is {W}x{H}; pass camera.scaled(...) for the resized photo")
    if mask is not None and mask.shape[:2] != (H, W):
        raise ValueError(f"bake_photo_texture: mask {mask.shape[:2]} does not match the photo {(H, W)}")
    verts = torch.as_tensor(vertices_world).detach().to("cpu", torch.float64)
    faces = np.asarray(body.faces, dtype=np.int64)
    faces_t = torch.from_numpy(faces)

    face_id, bary, mirror_uv = body_uv_layout(body, size)
    covered = face_id >= 0
    flat = np.nonzero(covered.reshape(-1))[0]
    fid = face_id.reshape(-1)[flat]
    b = bary.reshape(-1, 3)[flat].astype(np.float64)

    # Where each texel is on the posed body, and whether the photo sees it there.
    tri = verts.numpy()[faces[fid]]  # (N,3,3)
    points = (b[:, :, None] * tri).sum(1)
    vn = vertex_normals(verts, faces_t).numpy()[faces[fid]]
    normals = (b[:, :, None] * vn).sum(1)
    normals /= np.linalg.norm(normals, axis=1, keepdims=True).clip(1e-12)
    pix, z, facing = project_texels(points, normals, camera)

    K, w2c = camera.torch(torch.float64)
    depth = rasterize(verts @ w2c[:3, :3].T + w2c[:3, 3], faces_t, K, W, H).depth.numpy()
    inside = (pix[:, 0] >= -0.5) & (pix[:, 0] <= W - 0.5) & (pix[:, 1] >= -0.5) & (pix[:, 1] <= H - 0.5) & (z > 0)
    px = np.clip(np.rint(pix[:, 0]), 0, W - 1).astype(np.int64)
    py = np.clip(np.rint(pix[:, 1]), 0, H - 1).astype(np.int64)
    footprint = 2.0 * z / float(camera.K[0, 0])
    visible = z <= depth[py, px] + DEPTH_TOLERANCE_M + footprint
    seen = inside & visible & (facing > MIN_FACING)
    person = np.ones((H, W), bool)
    if mask is not None:
        radius = mask_erode_px if mask_erode_px is not None else max(2, round(0.003 * max(H, W)))
        person = mask > 0.5 if np.issubdtype(mask.dtype, np.floating) else mask.astype(bool)  # soft masks too
        seen &= erode_mask(person, radius)[py, px]

    S = size
    colors = np.zeros((len(flat), 3), dtype=np.float64)
    colors[seen] = sample_image(photo, pix[seen, 0], pix[seen, 1])
    source = np.full(len(flat), SMOOTHED, dtype=np.uint8)
    source[seen] = SEEN
    confidence = np.zeros((S, S), dtype=np.float32)
    confidence.reshape(-1)[flat[seen]] = facing[seen].astype(np.float32)

    # Left-right mirror: an unseen texel whose counterpart was seen takes its colour.
    seen_img = np.zeros((S, S), dtype=np.float32)
    seen_img.reshape(-1)[flat[seen]] = 1.0
    color_img = np.zeros((S, S, 3), dtype=np.float32)
    color_img.reshape(-1, 3)[flat[seen]] = colors[seen]
    muv = mirror_uv.reshape(-1, 2)[flat]
    todo = np.nonzero(~seen & np.isfinite(muv[:, 0]))[0]
    if len(todo):
        mxy = uv_to_texel(muv[todo].astype(np.float64), S)
        wsum = sample_image(seen_img[..., None], mxy[:, 0], mxy[:, 1])[:, 0]
        csum = sample_image(color_img * seen_img[..., None], mxy[:, 0], mxy[:, 1])
        ok = wsum > 0.5
        colors[todo[ok]] = csum[ok] / wsum[ok, None]
        source[todo[ok]] = MIRRORED

    # Everything else: a smooth fill over the surface from what is known.
    known = source != SMOOTHED
    rest = ~known
    if rest.any():
        vertex_colors = fill_on_mesh(faces, verts.shape[0], fid, b, colors, known)
        colors[rest] = (b[rest, :, None] * vertex_colors[faces[fid[rest]]]).sum(1)

    # ... but the back of the head takes the crown's colour (hair continues round), blended into
    # the fill at the zone's edges; after the fill, so the hair does not bleed down the neck.
    back_v, crown_v = head_zones(body)
    hair = crown_colour(colors, seen, (b * crown_v[faces[fid]]).sum(1) > 0.5)
    long_hair = False
    if hair is not None:
        zone = back_v
        # long hair the photo shows falling past the neck lies on the upper back too, at least
        # down to the shoulders' level (a shell standing off the back may show it longer:
        # surface_colour); a lock is a few pixels wide: the person mask uneroded (and needed:
        # without it a background of the hair's colour would pass for hair)
        long_hair = mask is not None and long_hair_in_photo(
            photo.astype(np.float64) / 255.0, person, np.isfinite(depth), body, verts.numpy(), camera, hair / 255.0)
        if long_hair:
            _, fall, height = hair_fall_zones(body)
            zone = np.maximum(zone, hair_reach(fall, height, np.zeros(len(fall), bool)))
        w = np.where(rest, (b * zone[faces[fid]]).sum(1), 0.0)
        colors = colors + w[:, None] * (hair - colors)
        source[w > 0.5] = CROWN

    image = np.zeros((S, S, 3), dtype=np.float32)
    image.reshape(-1, 3)[flat] = colors
    image = push_pull(image, covered.astype(np.float32))
    src = np.zeros((S, S), dtype=np.uint8)
    src.reshape(-1)[flat] = source
    return UVTexture(np.clip(np.rint(image), 0, 255).astype(np.uint8), src, confidence, hair, long_hair)
