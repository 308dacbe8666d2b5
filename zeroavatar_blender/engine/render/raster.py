"""A vectorised triangle rasteriser in plain PyTorch (CPU and CUDA), with a z-buffer.

Used wherever the engine needs a mesh as pixels: ControlNet depth, masks, UV-space texel maps,
the photo projection of the texture, synthetic ground truth and silhouette IoU. There is no
Python loop over triangles: every triangle is cut into pixel rows, each row into the exact span
of pixel centres it covers (half-plane intersection), and all (triangle, pixel) candidates are
resolved at once with ``scatter_reduce(amin)`` on a key that packs depth and face id.

Conventions: OpenCV camera space (x right, y down, z forward), pixel centres at integer
coordinates (``cameras.intrinsics``), triangles are two-sided, a pixel centre exactly on an edge
counts as inside. Triangles with a corner closer than ``near`` are dropped (no clipping): the
engine only renders bodies in front of the camera.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..cameras import Camera

_EMPTY = torch.iinfo(torch.int64).max
_EDGE_EPS = 1e-5  # pixels: spans and edge tests are inclusive up to this slack


@dataclass
class Raster:
    """Per-pixel visibility of a mesh."""

    face_id: torch.Tensor  # (H, W) int64, -1 where no triangle
    bary: torch.Tensor  # (H, W, 3) perspective-correct barycentrics, zeros in the background
    depth: torch.Tensor  # (H, W) camera-space z in metres, +inf in the background

    @property
    def mask(self) -> torch.Tensor:
        """(H, W) bool, True where a triangle covers the pixel centre."""
        return self.face_id >= 0


def project_triangles(vertices_cam: torch.Tensor, faces: torch.Tensor,
                      K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Corners in pixels and depth. (V,3), (F,3), (3,3) -> ((F,3,2) pixels, (F,3) z)."""
    tri = vertices_cam[faces]
    z = tri[..., 2]
    p = tri @ K.transpose(0, 1)
    return p[..., :2] / p[..., 2:3].clamp_min(1e-12), z


def _edge_values(xy: torch.Tensor, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Unnormalised screen barycentrics of points in their triangles.

    xy (N,3,2) triangle corners, px/py (N,) points -> (N,3): e_k is twice the signed area of the
    sub-triangle opposite corner k, so e / e.sum() are the screen-space barycentrics.
    """
    x0, y0 = xy[:, 0, 0], xy[:, 0, 1]
    x1, y1 = xy[:, 1, 0], xy[:, 1, 1]
    x2, y2 = xy[:, 2, 0], xy[:, 2, 1]
    e0 = (x2 - x1) * (py - y1) - (y2 - y1) * (px - x1)
    e1 = (x0 - x2) * (py - y2) - (y0 - y2) * (px - x2)
    e2 = (x1 - x0) * (py - y0) - (y1 - y0) * (px - x0)
    return torch.stack([e0, e1, e2], -1)


def _row_spans(xy: torch.Tensor, area: torch.Tensor, y: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last pixel column inside each triangle on the scanline ``y``.

    xy (R,3,2) the triangle of each row, area (R,) its signed doubled area, y (R,) the row's
    pixel-centre ordinate -> (lo, hi) int64 (R,), empty where hi < lo. Each edge is a half-plane
    ``a*x <= b`` on the row; intersecting the three gives the span.
    """
    s = torch.sign(area)
    lo = torch.full_like(y, -1e30)
    hi = torch.full_like(y, 1e30)
    for i, j in ((1, 2), (2, 0), (0, 1)):
        xi, yi = xy[:, i, 0], xy[:, i, 1]
        xj, yj = xy[:, j, 0], xy[:, j, 1]
        # inside: s * ((xj - xi) * (y - yi) - (yj - yi) * (x - xi)) >= 0
        a = s * (yj - yi)
        b = s * ((xj - xi) * (y - yi) + (yj - yi) * xi)
        bound = b / torch.where(a == 0, torch.ones_like(a), a)
        hi = torch.where(a > 0, torch.minimum(hi, bound), hi)
        lo = torch.where(a < 0, torch.maximum(lo, bound), lo)
        outside = (a == 0) & (b < -_EDGE_EPS * (xj - xi).abs())  # a horizontal edge above/below the row
        hi = torch.where(outside, torch.full_like(hi, -1e30), hi)
    lo = torch.ceil(lo - _EDGE_EPS).clamp(min=0, max=width)
    hi = torch.floor(hi + _EDGE_EPS).clamp(min=-1, max=width - 1)
    return lo.long(), hi.long()


def _depth_key(depth: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
    """Pack positive float32 depth and face id into one int64 that sorts by depth, then face."""
    bits = depth.to(torch.float32).view(torch.int32).to(torch.int64)
    return (bits << 32) | face


def _perspective(e: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Screen edge values (N,3) and corner depths (N,3) -> (bary (N,3), depth (N,)).
    1/z is affine in screen space, so attribute weights are (w_k / z_k) normalised."""
    w = e / e.sum(-1, keepdim=True)
    q = w / z
    qs = q.sum(-1)
    return q / qs[:, None], 1.0 / qs


def rasterize(vertices_cam: torch.Tensor, faces: torch.Tensor, K: torch.Tensor, width: int, height: int,
              *, near: float = 1e-3, chunk: int = 1 << 20) -> Raster:
    """Rasterise a camera-space mesh with a z-buffer.

    vertices_cam (V,3) OpenCV camera space, faces (F,3) int, K (3,3) pixels -> Raster of
    (height, width). ``chunk`` bounds the (triangle, pixel) candidates held at once. Not
    differentiable (barycentrics are detached); use ``interpolate`` for gradients to attributes.
    """
    W, H = int(width), int(height)
    if W <= 0 or H <= 0:
        raise ValueError(f"rasterize: bad image size {W}x{H}")
    device = vertices_cam.device
    with torch.no_grad():
        v = vertices_cam.detach()
        if v.dtype not in (torch.float32, torch.float64):
            v = v.float()
        faces = torch.as_tensor(faces, device=device).long()
        K = torch.as_tensor(K, dtype=v.dtype, device=device)
        face_id = torch.full((H, W), -1, dtype=torch.int64, device=device)
        bary = torch.zeros(H, W, 3, dtype=v.dtype, device=device)
        depth = torch.full((H, W), float("inf"), dtype=v.dtype, device=device)
        if faces.numel() == 0:
            return Raster(face_id, bary, depth)
        if faces.min() < 0 or faces.max() >= v.shape[0]:
            raise ValueError("rasterize: face indices out of range")

        xy, z = project_triangles(v, faces, K)
        area = (xy[:, 1, 0] - xy[:, 0, 0]) * (xy[:, 2, 1] - xy[:, 0, 1]) - \
               (xy[:, 1, 1] - xy[:, 0, 1]) * (xy[:, 2, 0] - xy[:, 0, 0])
        ymin = torch.ceil(xy[..., 1].amin(1) - _EDGE_EPS).clamp(min=0)
        ymax = torch.floor(xy[..., 1].amax(1) + _EDGE_EPS).clamp(max=H - 1)
        xmin, xmax = xy[..., 0].amin(1), xy[..., 0].amax(1)
        ok = ((z > near).all(1) & torch.isfinite(xy).all(2).all(1) & (area.abs() > 1e-12)
              & (ymax >= ymin) & (xmax >= -_EDGE_EPS) & (xmin <= W - 1 + _EDGE_EPS))
        fidx = ok.nonzero()[:, 0]
        if fidx.numel() == 0:
            return Raster(face_id, bary, depth)
        xy, z, area = xy[fidx], z[fidx], area[fidx]
        ymin = ymin[fidx].long()
        nrows = ymax[fidx].long() - ymin + 1

        # One item per (triangle, pixel row), with the exact span of covered pixel centres.
        row_tri = torch.repeat_interleave(torch.arange(len(fidx), device=device), nrows)
        row_start = torch.cumsum(nrows, 0) - nrows
        row_y = ymin[row_tri] + torch.arange(len(row_tri), device=device) - row_start[row_tri]
        lo, hi = _row_spans(xy[row_tri], area[row_tri], row_y.to(v.dtype), W)
        count = (hi - lo + 1).clamp_min(0)
        keep = count > 0
        row_tri, row_y, lo, count = row_tri[keep], row_y[keep], lo[keep], count[keep]

        zbuf = torch.full((H * W,), _EMPTY, dtype=torch.int64, device=device)
        ends = torch.cumsum(count, 0)
        start_row = 0
        while start_row < len(count):
            limit = (ends[start_row - 1] if start_row > 0 else 0) + chunk
            stop_row = max(start_row + 1, int(torch.searchsorted(ends, limit, right=True)))
            _splat(zbuf, xy, z, area, row_tri[start_row:stop_row], row_y[start_row:stop_row],
                   lo[start_row:stop_row], count[start_row:stop_row], W, v.dtype)
            start_row = stop_row

        hit = (zbuf != _EMPTY).nonzero()[:, 0]
        if hit.numel() == 0:
            return Raster(face_id, bary, depth)
        winner = zbuf[hit] & 0xFFFFFFFF  # index into fidx
        px = (hit % W).to(v.dtype)
        py = (hit // W).to(v.dtype)
        e = _edge_values(xy[winner], px, py) * torch.sign(area[winner])[:, None]
        b, d = _perspective(e.clamp_min(0), z[winner])
        face_id.view(-1)[hit] = fidx[winner]
        bary.view(-1, 3)[hit] = b
        depth.view(-1)[hit] = d
    return Raster(face_id, bary, depth)


def _splat(zbuf: torch.Tensor, xy: torch.Tensor, z: torch.Tensor, area: torch.Tensor, row_tri: torch.Tensor,
           row_y: torch.Tensor, lo: torch.Tensor, count: torch.Tensor, W: int, dtype: torch.dtype) -> None:
    """Depth-test one chunk of row spans into the flat key buffer ``zbuf`` (H*W,). On an exact
    depth tie the lower face index wins, so results do not depend on chunking or device."""
    device = zbuf.device
    n = int(count.sum())
    item = torch.repeat_interleave(torch.arange(len(count), device=device), count, output_size=n)
    offset = torch.arange(n, device=device) - (torch.cumsum(count, 0) - count)[item]
    tri = row_tri[item]
    px = lo[item] + offset
    py = row_y[item]
    e = _edge_values(xy[tri], px.to(dtype), py.to(dtype)) * torch.sign(area[tri])[:, None]
    inside = (e >= -_EDGE_EPS * area[tri].abs()[:, None]).all(-1)
    if not bool(inside.all()):
        e, tri, px, py = e[inside], tri[inside], px[inside], py[inside]
    _, d = _perspective(e.clamp_min(0), z[tri])
    key = _depth_key(d, tri)
    zbuf.scatter_reduce_(0, py * W + px, key, reduce="amin", include_self=True)


def interpolate(raster: Raster, attributes: torch.Tensor, faces: torch.Tensor | None = None) -> torch.Tensor:
    """Attributes at each pixel, zeros in the background.

    attributes (V,C) per vertex (needs ``faces`` (F,3)) or (F,3,C) per face corner -> (H,W,C).
    Differentiable with respect to the attributes (so to vertex positions through them), not
    through coverage.
    """
    if attributes.dim() == 2:
        if faces is None:
            raise ValueError("interpolate: per-vertex attributes need the faces")
        corners = attributes[torch.as_tensor(faces, device=attributes.device).long()]
    elif attributes.dim() == 3 and attributes.shape[1] == 3:
        corners = attributes
    else:
        raise ValueError(f"interpolate: attributes must be (V,C) or (F,3,C), got {tuple(attributes.shape)}")
    H, W = raster.face_id.shape
    face_id = raster.face_id.to(attributes.device).reshape(-1)
    hit = (face_id >= 0).nonzero()[:, 0]  # only covered pixels: bodies fill a fraction of the image
    bary = raster.bary.to(device=attributes.device, dtype=attributes.dtype).reshape(-1, 3)[hit]
    values = (bary[:, :, None] * corners[face_id[hit]]).sum(1)
    out = torch.zeros(H * W, corners.shape[-1], dtype=attributes.dtype, device=attributes.device)
    return out.index_put((hit,), values).reshape(H, W, -1)


def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted unit vertex normals. (V,3), (F,3) -> (V,3)."""
    faces = torch.as_tensor(faces, device=vertices.device).long()
    tri = vertices[faces]
    fn = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)
    vn = torch.zeros_like(vertices).index_add_(0, faces.reshape(-1), fn.repeat_interleave(3, 0))
    return vn / vn.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def sample_texture(texture: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear lookup with v up (image row = (1 - v) * S). texture (S,S,C), uv (...,2) -> (...,C)."""
    grid = torch.stack([uv[..., 0] * 2 - 1, 1 - uv[..., 1] * 2], -1).reshape(1, 1, -1, 2)
    img = texture.permute(2, 0, 1)[None]
    out = F.grid_sample(img, grid.to(img.dtype), mode="bilinear", padding_mode="border", align_corners=False)
    return out[0, :, 0].transpose(0, 1).reshape(*uv.shape[:-1], texture.shape[-1])


def render_mesh(vertices_world: torch.Tensor, faces: torch.Tensor | np.ndarray, camera: Camera, *,
                corner_uv: torch.Tensor | np.ndarray | None = None, texture: torch.Tensor | np.ndarray | None = None,
                vertex_colors: torch.Tensor | None = None, light_dir: torch.Tensor | np.ndarray | None = None,
                ambient: float = 0.3) -> dict[str, torch.Tensor | None]:
    """Images of a world-space mesh seen by ``camera``.

    Returns {"mask" (H,W) bool, "depth" (H,W) camera z (+inf background), "normal" (H,W,3) unit
    world-space normals, "normal_cam" (H,W,3) the same in OpenCV camera axes, "uv" (H,W,2) or
    None, "rgb" (H,W,3) in [0,1] or None, "face_id", "bary"}. ``texture`` is (S,S,3) uint8 or
    float in [0,1], sampled bilinearly at the corner UVs; otherwise ``vertex_colors`` (V,3) are
    interpolated. ``light_dir`` (world, pointing from the surface to the light) adds Lambert
    shading with ``ambient`` light; colours and normals stay differentiable.
    """
    v = torch.as_tensor(vertices_world)
    if v.dtype not in (torch.float32, torch.float64):
        v = v.float()
    device, dtype = v.device, v.dtype
    faces_t = torch.as_tensor(np.asarray(faces) if isinstance(faces, np.ndarray) else faces, device=device).long()
    K, w2c = camera.torch(dtype, device)
    v_cam = v @ w2c[:3, :3].T + w2c[:3, 3]
    raster = rasterize(v_cam, faces_t, K, camera.width, camera.height)
    mask = raster.mask
    normal = interpolate(raster, vertex_normals(v, faces_t), faces_t)
    normal = normal / normal.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    normal_cam = normal @ w2c[:3, :3].T
    uv = None
    if corner_uv is not None:
        uv = interpolate(raster, torch.as_tensor(corner_uv, dtype=dtype, device=device))
    rgb = None
    if texture is not None:
        if uv is None:
            raise ValueError("render_mesh: a texture needs corner_uv")
        tex = torch.as_tensor(texture, device=device)
        tex = tex.to(dtype) / 255.0 if tex.dtype == torch.uint8 else tex.to(dtype)
        rgb = sample_texture(tex, uv)
    elif vertex_colors is not None:
        rgb = interpolate(raster, torch.as_tensor(vertex_colors, dtype=dtype, device=device), faces_t)
    if rgb is not None:
        if light_dir is not None:
            light = torch.as_tensor(light_dir, dtype=dtype, device=device)
            light = light / light.norm().clamp_min(1e-12)
            shade = ambient + (1 - ambient) * (normal @ light).clamp_min(0)
            rgb = rgb * shade[..., None]
        rgb = torch.where(mask[..., None], rgb, torch.zeros_like(rgb))
    return {"mask": mask, "depth": raster.depth, "normal": normal, "normal_cam": normal_cam, "uv": uv,
            "rgb": rgb, "face_id": raster.face_id, "bary": raster.bary}
