"""The body as a density: an SDF grid of the posed body, its density, distillation and fading.

ZeroAvatar starts the radiance field from the fitted body rather than from a blob, so the first
diffusion steps already see a person in the right pose. Steps:

1. ``body_sdf_grid``: signed distance of the posed body mesh on a regular grid (once, ~1-3 s):
   the sign from integer winding numbers counted along grid lines (signed ray crossings, robust
   to the self-intersections that posing creates, and the eyes inside the head), the magnitude
   from a KD-tree over dense surface samples. Looked up trilinearly in torch afterwards.
2. ``BodyPrior``: SDF -> density ``2 * surface_density * sigmoid(-sharpness * sdf)``: exactly
   ``surface_density`` on the body surface, so the field's surface level set starts on the body.
3. ``distill_body_prior``: fit the field's density to the prior's for a few hundred steps.
4. During optimisation: ``prior_loss`` with a ``FadingWeight`` (or the field's additive density
   prior hook with a fading weight) keeps the shape near the body early, then lets go.

Conventions: world = Blender frame (metres); SDF negative inside.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field as dataclass_field

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import nn

from .nerf import NeRFField

# ---------------------------------------------------------------------------------------------
# Geometry helpers (numpy, run once per body)
# ---------------------------------------------------------------------------------------------


def body_aabb(vertices: np.ndarray | torch.Tensor, padding: float = 0.1) -> torch.Tensor:
    """Axis-aligned box around the body with ``padding`` metres on every side (room for hair,
    clothes). (V, 3) -> (2, 3) float32 [min, max]."""
    v = torch.as_tensor(np.asarray(vertices.detach().cpu() if isinstance(vertices, torch.Tensor) else vertices),
                        dtype=torch.float32)
    return torch.stack([v.min(0).values - padding, v.max(0).values + padding])


def grid_axes(aabb: np.ndarray, resolution: int) -> list[np.ndarray]:
    """Node coordinates of a grid with cubic cells and ``resolution`` cells along the box's
    longest side; the other sides get as many cells as cover them. -> [xs, ys, zs]."""
    lo, hi = np.asarray(aabb, dtype=np.float64)
    h = float((hi - lo).max()) / resolution
    return [lo[a] + h * np.arange(int(math.ceil((hi[a] - lo[a]) / h - 1e-9)) + 1) for a in range(3)]


def sample_surface(vertices: np.ndarray, faces: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n points uniformly by area on a triangle mesh. -> (n, 3)."""
    tri = vertices[faces]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    face = rng.choice(len(faces), size=n, p=area / area.sum())
    r1, r2 = rng.random(n), rng.random(n)
    s = np.sqrt(r1)
    b = np.stack([1 - s, s * (1 - r2), s * r2], 1)
    return (tri[face] * b[:, :, None]).sum(1)


def _winding_along_axis(vertices: np.ndarray, faces: np.ndarray, axes: list[np.ndarray], axis: int) -> np.ndarray:
    """Integer winding number of every grid node, counted by casting rays along +``axis``.

    A ray from a node crosses the surface; each crossing counts +1 where the surface's normal
    points along the ray (leaving a solid) and -1 against it. Their sum over the crossings beyond
    the node is its winding number. Per grid line: crossings are binned by node, then summed
    from the far end. Returns (X, Y, Z) int32.
    """
    u_ax, v_ax = (axis + 1) % 3, (axis + 2) % 3  # cyclic, so det(u, v) has the normal's sign
    tri = vertices[faces]  # (F, 3, 3)
    pu, pv, pa = tri[:, :, u_ax], tri[:, :, v_ax], tri[:, :, axis]
    us, vs, as_ = axes[u_ax], axes[v_ax], axes[axis]
    hu, hv = us[1] - us[0], vs[1] - vs[0]
    iu0 = np.clip(np.ceil((pu.min(1) - us[0]) / hu), 0, len(us)).astype(np.int64)
    iu1 = np.clip(np.floor((pu.max(1) - us[0]) / hu), -1, len(us) - 1).astype(np.int64)
    iv0 = np.clip(np.ceil((pv.min(1) - vs[0]) / hv), 0, len(vs)).astype(np.int64)
    iv1 = np.clip(np.floor((pv.max(1) - vs[0]) / hv), -1, len(vs) - 1).astype(np.int64)
    nu, nv = np.maximum(iu1 - iu0 + 1, 0), np.maximum(iv1 - iv0 + 1, 0)
    count = nu * nv
    f = np.repeat(np.arange(len(faces)), count)  # one entry per (triangle, grid line) candidate
    local = np.arange(len(f)) - np.repeat(np.cumsum(count) - count, count)
    iu = iu0[f] + local // nv[f]
    iv = iv0[f] + local % nv[f]
    qu, qv = us[iu], vs[iv]
    a_u, a_v = pu[f, 0], pv[f, 0]
    b_u, b_v = pu[f, 1], pv[f, 1]
    c_u, c_v = pu[f, 2], pv[f, 2]
    det = (b_u - a_u) * (c_v - a_v) - (c_u - a_u) * (b_v - a_v)
    w1 = ((qu - a_u) * (c_v - a_v) - (c_u - a_u) * (qv - a_v))
    w2 = ((b_u - a_u) * (qv - a_v) - (qu - a_u) * (b_v - a_v))
    sgn = np.sign(det)
    w1, w2 = w1 * sgn, w2 * sgn
    w0 = np.abs(det) - w1 - w2
    hit = (w0 >= 0) & (w1 >= 0) & (w2 >= 0) & (np.abs(det) > 1e-14)
    f, iu, iv, sgn = f[hit], iu[hit], iv[hit], sgn[hit]
    w0, w1, w2, det = w0[hit], w1[hit], w2[hit], np.abs(det[hit])
    depth = (w0 * pa[f, 0] + w1 * pa[f, 1] + w2 * pa[f, 2]) / det
    # Nodes strictly before the crossing see it: bin = number of nodes with coordinate < depth.
    b = np.searchsorted(as_, depth, side="left")
    na = len(as_)
    hist = np.bincount((iu * len(vs) + iv) * (na + 1) + b, weights=sgn, minlength=len(us) * len(vs) * (na + 1))
    hist = hist.reshape(len(us), len(vs), na + 1)
    winding = np.cumsum(hist[:, :, ::-1], axis=2)[:, :, ::-1][:, :, 1:]  # sum over bins > node index
    winding = np.rint(winding).astype(np.int32)  # (U, V, A)
    # Back to (X, Y, Z) order.
    order = [u_ax, v_ax, axis]
    return np.transpose(winding, np.argsort(order))


def inside_grid(vertices: np.ndarray, faces: np.ndarray, axes: list[np.ndarray]) -> np.ndarray:
    """Inside/outside of every grid node: a majority vote of the winding numbers counted along X,
    Y and Z (a grid line through an edge or vertex can miscount on one axis, rarely on two).
    -> (X, Y, Z) bool."""
    votes = sum((_winding_along_axis(vertices, faces, axes, a) > 0).astype(np.int8) for a in range(3))
    return votes >= 2


def grid_surface_distance(axes: list[np.ndarray], vertices: np.ndarray, faces: np.ndarray, *,
                          n_samples: int = 300_000, band_cells: float = 3.0, seed: int = 0,
                          band_only: bool = False) -> np.ndarray:
    """Unsigned distance from every grid node to the surface. -> (X, Y, Z).

    Near the surface (within ``band_cells`` cells) it is the distance to the nearest of dense
    area-uniform surface samples plus the vertices (a millimetre-level floor for ~300k samples on
    a body); farther away, the distance to a surface sample at the nearest surface node, found
    by a Euclidean distance transform. Nearest-neighbour queries far from a surface point cloud
    are slow (every sample is almost equally near), so the KD-tree only answers the band.
    ``band_only``: no distance transform (seconds on a fine grid); beyond the band every node
    reads ``band_cells`` cells, for callers that only need the band and the sign.
    """
    from scipy.ndimage import binary_dilation, distance_transform_edt

    rng = np.random.default_rng(seed)
    cloud = np.concatenate([vertices, sample_surface(vertices, faces, n_samples, rng)])
    origin = np.array([a[0] for a in axes])
    h = float(axes[0][1] - axes[0][0])
    shape = tuple(len(a) for a in axes)
    node = np.clip(np.rint((cloud - origin) / h).astype(np.int64), 0, np.array(shape) - 1)
    empty = np.ones(shape, dtype=bool)
    empty[node[:, 0], node[:, 1], node[:, 2]] = False  # nodes nearest to some surface sample
    if band_only:
        far = band_cells * h
        band = np.nonzero(binary_dilation(~empty, iterations=int(band_cells)))
        dist = np.full(shape, far)
        near, _ = cKDTree(cloud).query(origin + h * np.stack(band, 1), k=1, workers=-1)
        dist[band] = np.minimum(near, far)
        return dist
    representative = np.zeros(shape + (3,))
    representative[node[:, 0], node[:, 1], node[:, 2]] = cloud  # one surface sample per such node
    coarse, (ni, nj, nk) = distance_transform_edt(empty, return_indices=True)
    # Far away: the distance to the surface sample of the nearest surface node (error second
    # order in the cell size); near: nearest of all samples.
    dist = np.linalg.norm(np.stack(np.meshgrid(*axes, indexing="ij"), -1) - representative[ni, nj, nk], axis=-1)
    band = coarse <= band_cells
    pts = np.stack(np.meshgrid(*axes, indexing="ij"), -1)[band]
    near, _ = cKDTree(cloud).query(pts, k=1, workers=-1, distance_upper_bound=(band_cells + 1.0) * h)
    dist[band] = np.minimum(near, dist[band])
    return dist


# ---------------------------------------------------------------------------------------------
# SDF grid and density (torch)
# ---------------------------------------------------------------------------------------------


@dataclass
class SdfGrid:
    """A signed distance sampled on grid nodes; trilinear lookups, differentiable in the points."""

    values: torch.Tensor  # (X, Y, Z) signed distance in metres, negative inside
    origin: torch.Tensor  # (3,) world position of node (0, 0, 0)
    spacing: float  # metres between nodes (cubic cells)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.values.shape)  # type: ignore[return-value]

    @property
    def aabb(self) -> torch.Tensor:
        size = torch.tensor(self.shape, dtype=self.values.dtype, device=self.values.device) - 1
        return torch.stack([self.origin, self.origin + size * self.spacing])

    def to(self, device: torch.device | str) -> "SdfGrid":
        return SdfGrid(self.values.to(device), self.origin.to(device), self.spacing)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3) world -> (N,) signed distance; clamped to the border value outside the grid."""
        size = torch.tensor(self.shape, dtype=x.dtype, device=x.device) - 1
        g = (x - self.origin.to(x.dtype)) / self.spacing / size * 2 - 1  # [-1, 1] over the nodes
        # grid_sample indexes (D, H, W) = (X, Y, Z) with coordinates in (W, H, D) = (z, y, x) order.
        grid = g.flip(-1).reshape(1, -1, 1, 1, 3)
        vol = self.values.to(x.dtype)[None, None]
        out = nn.functional.grid_sample(vol, grid, mode="bilinear", padding_mode="border", align_corners=True)
        return out.reshape(-1)


def body_sdf_grid(vertices: np.ndarray | torch.Tensor, faces: np.ndarray, *, resolution: int = 128,
                  padding: float = 0.1, n_surface_samples: int = 300_000, seed: int = 0) -> SdfGrid:
    """SDF of a closed (possibly self-intersecting) triangle mesh on a grid with ``resolution``
    cubic cells along the longest side of the mesh's box grown by ``padding`` metres."""
    v = vertices.detach().cpu().numpy() if isinstance(vertices, torch.Tensor) else np.asarray(vertices)
    v = v.astype(np.float64)
    f = np.asarray(faces, dtype=np.int64)
    if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3 or len(f) == 0:
        raise ValueError(f"expected vertices (V, 3) and faces (F, 3), got {v.shape} and {f.shape}")
    if f.min() < 0 or f.max() >= len(v):
        raise ValueError("faces index vertices that do not exist")
    lo, hi = v.min(0) - padding, v.max(0) + padding
    axes = grid_axes(np.stack([lo, hi]), resolution)
    inside = inside_grid(v, f, axes)
    dist = grid_surface_distance(axes, v, f, n_samples=n_surface_samples, seed=seed)
    sdf = np.where(inside, -dist, dist).astype(np.float32)
    spacing = float(axes[0][1] - axes[0][0])
    return SdfGrid(torch.from_numpy(sdf), torch.tensor([a[0] for a in axes], dtype=torch.float32), spacing)


def sdf_to_density(sdf: torch.Tensor, surface_density: float, sharpness: float) -> torch.Tensor:
    """Density that equals ``surface_density`` on the surface, tends to twice that deep inside and
    to 0 outside over about 4 / sharpness metres. (...) -> (...)."""
    return 2.0 * surface_density * torch.sigmoid(-sharpness * sdf)


@dataclass
class BodyPriorConfig:
    grid_resolution: int = 128  # SDF grid cells along the longest side (~1.5 cm for a standing body)
    padding: float = 0.1  # metres of grid around the body
    surface_density: float = 50.0  # keep equal to NeRFFieldConfig.surface_density
    sharpness: float = 400.0  # 1/m: density falls from 88 % to 12 % of 2*surface over 1 cm
    n_surface_samples: int = 300_000


class BodyPrior:
    """The posed body as a density field: callable (N, 3) world -> (N,) density."""

    def __init__(self, sdf: SdfGrid, config: BodyPriorConfig | None = None) -> None:
        self.sdf = sdf
        self.config = config or BodyPriorConfig()

    @staticmethod
    def from_mesh(vertices: np.ndarray | torch.Tensor, faces: np.ndarray,
                  config: BodyPriorConfig | None = None) -> "BodyPrior":
        config = config or BodyPriorConfig()
        grid = body_sdf_grid(vertices, faces, resolution=config.grid_resolution, padding=config.padding,
                             n_surface_samples=config.n_surface_samples)
        return BodyPrior(grid, config)

    def to(self, device: torch.device | str) -> "BodyPrior":
        return BodyPrior(self.sdf.to(device), self.config)

    def density(self, x: torch.Tensor) -> torch.Tensor:
        return sdf_to_density(self.sdf(x), self.config.surface_density, self.config.sharpness)

    def occupancy(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3) -> (N,) bool, inside the body."""
        return self.sdf(x) < 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.density(x)


# ---------------------------------------------------------------------------------------------
# Distillation and the fading prior term
# ---------------------------------------------------------------------------------------------


def log_density_loss(pred: torch.Tensor, target: torch.Tensor, floor: float) -> torch.Tensor:
    """Mean squared difference of log(density + floor).

    Log space weighs "empty" as much as "solid": a linear loss would let faint fog outside the
    body survive (invisible in the loss, visible as floaters). ``floor`` sets where densities
    count as empty. (N,), (N,) -> ().
    """
    return (torch.log(pred + floor) - torch.log(target + floor)).square().mean()


def sample_prior_points(aabb: torch.Tensor, n: int, surface_points: torch.Tensor,
                        surface_fraction: float, surface_noise: float, generator: torch.Generator) -> torch.Tensor:
    """Training points: uniform in the box plus jittered body-surface points, where the level set
    is decided. -> (n, 3) on aabb's device."""
    n_surf = int(n * surface_fraction)
    device = aabb.device
    u = torch.rand(n - n_surf, 3, generator=generator).to(device)
    uniform = aabb[0] + u * (aabb[1] - aabb[0])
    pick = torch.randint(len(surface_points), (n_surf,), generator=generator)
    noise = torch.randn(n_surf, 3, generator=generator) * surface_noise
    near = surface_points[pick] + noise.to(surface_points.device)
    return torch.cat([uniform, near.to(device)])


@dataclass
class DistillConfig:
    steps: int = 300
    batch_size: int = 1 << 13
    lr: float = 1e-2
    surface_fraction: float = 0.5  # share of the batch drawn near the body surface
    surface_noise: float = 0.01  # metres, std of the jitter around surface points
    floor_ratio: float = 1e-3  # log floor as a fraction of surface_density
    seed: int = 0


@dataclass
class DistillReport:
    steps: int
    seconds: float
    losses: list[float] = dataclass_field(default_factory=list)
    stopped: bool = False  # ``should_stop`` ended it early (a cancel): the field is half-initialised
    skipped: int = 0  # steps whose loss was not finite, left out of the update

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")


def distill_body_prior(field: NeRFField, prior: BodyPrior, surface_points: torch.Tensor | np.ndarray,
                       config: DistillConfig | None = None, should_stop: Callable[[], bool] | None = None
                       ) -> DistillReport:
    """Fit the field's learned density (not the prior hook) to the body's, in place.

    ``surface_points`` (S, 3): body surface samples (e.g. ``sample_surface`` or the posed
    vertices) where half the batch concentrates. Only the encoding and density MLP move; the colour
    head is left for the optimiser. ``should_stop`` is asked before every step (a cancel must not
    wait for the minutes this takes on a CPU).
    """
    config = config or DistillConfig()
    device = field.aabb.device
    gen = torch.Generator().manual_seed(config.seed)
    surface = torch.as_tensor(np.asarray(surface_points, dtype=np.float32) if isinstance(surface_points, np.ndarray)
                              else surface_points.detach().float().cpu())
    params = list(field.encoding.parameters()) + list(field.density_mlp.parameters())
    opt = torch.optim.Adam(params, lr=config.lr, betas=(0.9, 0.99), eps=1e-15)
    floor = config.floor_ratio * prior.config.surface_density
    prior = prior.to(device)
    report = DistillReport(steps=config.steps, seconds=0.0)
    start = time.perf_counter()
    was_training = field.training
    field.train()
    for _ in range(config.steps):
        if should_stop is not None and should_stop():
            report.stopped = True
            break
        x = sample_prior_points(field.aabb, config.batch_size, surface, config.surface_fraction,
                                config.surface_noise, gen)
        with torch.no_grad():
            target = prior.density(x)
        loss = log_density_loss(field.field_density(x), target, floor)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        value = float(loss.detach())
        if not math.isfinite(value):
            # An overflowing density (exp of a raw value past ~88 in fp32) gives an inf or NaN loss
            # and gradient, and one such step turns Adam's moments, then the whole field, into NaN
            # (a NaN initialisation was seen once in CI, its cause not established). Left out, as
            # AMP's gradient scaler leaves out such steps; a finite loss has finite gradients.
            report.skipped += 1
            continue
        opt.step()
        report.losses.append(value)
    field.train(was_training)
    report.seconds = time.perf_counter() - start
    return report


def prior_loss(field: NeRFField, prior: BodyPrior, x: torch.Tensor, floor_ratio: float = 1e-3) -> torch.Tensor:
    """The body-prior regulariser for the optimisation loop: the distillation loss at points x
    (e.g. the render's sample points or fresh uniform ones). Multiply by ``FadingWeight(step)``."""
    with torch.no_grad():
        target = prior.density(x)
    return log_density_loss(field.field_density(x), target, floor_ratio * prior.config.surface_density)


@dataclass
class FadingWeight:
    """Piecewise-linear weight: ``start`` until ``hold_steps``, linearly to ``end`` at
    ``fade_steps``, then ``end``. Used for the prior loss or the field's prior hook weight."""

    start: float = 1.0
    end: float = 0.0
    hold_steps: int = 0
    fade_steps: int = 1000

    def __post_init__(self) -> None:
        if self.fade_steps < self.hold_steps:
            raise ValueError("fade_steps must be >= hold_steps")

    def __call__(self, step: int) -> float:
        if step <= self.hold_steps:
            return self.start
        if step >= self.fade_steps:
            return self.end
        t = (step - self.hold_steps) / (self.fade_steps - self.hold_steps)
        return self.start + t * (self.end - self.start)
