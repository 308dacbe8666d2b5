"""Inside/outside of triangle meshes on a grid by ray parity, voted over three axes.

Used to build the ground-truth outer surface of a body wearing garments: the union of
overlapping meshes is voxelised and re-extracted with marching cubes, so the metric sees only
the outer visible surface. Three axes and a majority vote tolerate small holes (eyes, mouth).
"""

from __future__ import annotations

import numpy as np


def _column_crossings(tri2: np.ndarray, depth: np.ndarray, gu: np.ndarray, gv: np.ndarray) -> tuple[np.ndarray, ...]:
    """Where columns at grid points (gu x gv) cross each triangle: (iu, iv, depth)."""
    du, dv = gu[1] - gu[0], gv[1] - gv[0]
    lo_u = np.ceil((tri2[:, :, 0].min(1) - gu[0]) / du).astype(np.int64).clip(0, len(gu))
    hi_u = np.floor((tri2[:, :, 0].max(1) - gu[0]) / du).astype(np.int64).clip(-1, len(gu) - 1)
    lo_v = np.ceil((tri2[:, :, 1].min(1) - gv[0]) / dv).astype(np.int64).clip(0, len(gv))
    hi_v = np.floor((tri2[:, :, 1].max(1) - gv[0]) / dv).astype(np.int64).clip(-1, len(gv) - 1)
    nu, nv = (hi_u - lo_u + 1).clip(0), (hi_v - lo_v + 1).clip(0)
    counts = nu * nv
    keep = counts > 0
    tri_id = np.repeat(np.nonzero(keep)[0], counts[keep])
    if len(tri_id) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    start = np.repeat(np.cumsum(counts[keep]) - counts[keep], counts[keep])
    local = np.arange(len(tri_id)) - start
    iu = lo_u[tri_id] + local % nu[tri_id]
    iv = lo_v[tri_id] + local // nu[tri_id]
    pu, pv = gu[iu], gv[iv]
    a, b, c = tri2[tri_id, 0], tri2[tri_id, 1], tri2[tri_id, 2]
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    w0 = (b[:, 0] - pu) * (c[:, 1] - pv) - (b[:, 1] - pv) * (c[:, 0] - pu)
    w1 = (c[:, 0] - pu) * (a[:, 1] - pv) - (c[:, 1] - pv) * (a[:, 0] - pu)
    w2 = area - w0 - w1
    with np.errstate(divide="ignore", invalid="ignore"):
        w0, w1, w2 = w0 / area, w1 / area, w2 / area
    inside = (w0 >= 0) & (w1 >= 0) & (w2 >= 0) & (np.abs(area) > 1e-18)
    d = depth[tri_id]
    z = w0 * d[:, 0] + w1 * d[:, 1] + w2 * d[:, 2]
    return iu[inside], iv[inside], z[inside]


def occupancy_parity(vertices: np.ndarray, faces: np.ndarray, axes: tuple[np.ndarray, np.ndarray, np.ndarray],
                     axis: int) -> np.ndarray:
    """(nx, ny, nz) bool: inside by the parity of crossings of rays cast along ``axis``."""
    others = [a for a in range(3) if a != axis]
    tri = vertices[faces]
    gu, gv, gw = axes[others[0]], axes[others[1]], axes[axis]
    iu, iv, z = _column_crossings(tri[:, :, others], tri[:, :, axis], gu, gv)
    k = np.searchsorted(gw, z)  # crossings below grid point k flip points k, k+1, ...
    flips = np.zeros((len(gu), len(gv), len(gw) + 1), dtype=np.int32)
    np.add.at(flips, (iu, iv, k), 1)
    inside = (np.cumsum(flips, axis=2)[:, :, :-1] % 2).astype(bool)
    order = [0, 0, 0]
    order[others[0]], order[others[1]], order[axis] = 0, 1, 2
    return np.transpose(inside, order)


def occupancy(vertices: np.ndarray, faces: np.ndarray, axes: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """Majority vote of parity along x, y and z. Grid axes should be offset from mesh features
    by a fraction of a cell (callers use jittered ranges) to avoid rays through vertices."""
    votes = sum(occupancy_parity(np.asarray(vertices, np.float64), np.asarray(faces), axes, a).astype(np.int8)
                for a in range(3))
    return votes >= 2


def grid_axes(lo: np.ndarray, hi: np.ndarray, resolution: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Axis samples covering [lo, hi] with a margin, offset by an irrational fraction of a cell."""
    out = []
    for a in range(3):
        n = int(np.ceil((hi[a] - lo[a]) / resolution)) + 5
        out.append(lo[a] - 2 * resolution + (np.arange(n) + 0.3819660113) * resolution)
    return tuple(out)  # type: ignore[return-value]


def outer_surface(meshes: list[tuple[np.ndarray, np.ndarray]], resolution: float = 0.006) -> tuple[np.ndarray, np.ndarray]:
    """The outer surface of a union of closed-ish meshes: voxelise each, OR, marching cubes."""
    import mcubes

    allv = np.concatenate([v for v, _ in meshes])
    axes = grid_axes(allv.min(0), allv.max(0), resolution)
    occ = np.zeros([len(a) for a in axes], dtype=bool)
    for v, f in meshes:
        occ |= occupancy(v, f, axes)
    field = occ.astype(np.float32)
    field = _smooth(field)
    verts, faces = mcubes.marching_cubes(field, 0.5)
    origin = np.array([axes[0][0], axes[1][0], axes[2][0]])
    verts = verts * resolution + origin
    return verts.astype(np.float64), faces.astype(np.int64)


def _smooth(field: np.ndarray) -> np.ndarray:
    """A light 3x3x3 blur so marching cubes does not show voxel steps."""
    from scipy.ndimage import uniform_filter

    return uniform_filter(field, size=3, mode="constant")
