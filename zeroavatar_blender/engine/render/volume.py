"""Volume rendering of a radiance field: rays -> samples -> field -> composited pixels.

Two samplers, one compositing rule (nerfacc's):

* CPU (``render_dense``): a pure-torch stratified sampler inside the field's box, ``n_samples``
  per ray (jittered when training), fed to nerfacc's dense ``[n_rays, n_samples]`` functions,
  which run and pass gradients on the CPU. Samples in cells that an optional ``DenseOccupancy``
  marks empty are not evaluated (density 0): the body fills a few percent of its box.
* CUDA (``OccupancyGridRenderer``): nerfacc's ``OccGridEstimator`` marches only through occupied
  cells of a grid kept up to date from the field's density; ``nerfacc.rendering`` composites the
  packed samples. nerfacc compiles its CUDA extension on first use (needs nvcc); where it cannot
  (no toolkit, a failed build: ``cuda_marcher.py``) a CUDA box takes the dense sampler on the GPU.

Both give RGB, opacity (the mask), expected depth (0 where nothing was hit) and, optionally,
weight-accumulated normals, composited over a background colour.
"""

from __future__ import annotations

from dataclasses import dataclass, field as dataclass_field
from collections.abc import Callable
from typing import Literal

import nerfacc
import torch

from ..cameras import camera_rays
from ..field.nerf import RadianceField
from ..transfer import to_device
from .cuda_marcher import cuda_marcher_status

BackgroundMode = Literal["random", "noise", "white", "black"]


@dataclass
class RayBundle:
    """N rays in world space (Blender frame)."""

    origins: torch.Tensor  # (N, 3)
    directions: torch.Tensor  # (N, 3) unit length

    def __len__(self) -> int:
        return int(self.origins.shape[0])

    def __getitem__(self, index: slice | torch.Tensor) -> "RayBundle":
        return RayBundle(self.origins[index], self.directions[index])

    @staticmethod
    def from_camera(K: torch.Tensor, world_to_cam: torch.Tensor, width: int, height: int) -> "RayBundle":
        """Rays through the pixel centres of an OpenCV camera, row-major (index = row * W + col)."""
        o, d = camera_rays(K, world_to_cam, width, height)
        return RayBundle(o.reshape(-1, 3).contiguous(), d.reshape(-1, 3).contiguous())


@dataclass
class RenderOutputs:
    """Per-ray results. Reshape with ``.image(H, W)`` for a camera's rays."""

    rgb: torch.Tensor  # (N, 3) composited over the background
    opacity: torch.Tensor  # (N, 1) accumulated weight, the soft mask
    depth: torch.Tensor  # (N, 1) expected termination distance along the ray given a hit, 0 without
    normals: torch.Tensor | None = None  # (N, 3) weight-accumulated outward normals (not renormalised)
    n_samples: int = 0  # field evaluations spent

    def image(self, height: int, width: int) -> "RenderOutputs":
        r = lambda t: None if t is None else t.reshape(height, width, -1)  # noqa: E731
        return RenderOutputs(r(self.rgb), r(self.opacity), r(self.depth), r(self.normals), self.n_samples)


def background_color(mode: BackgroundMode, n_rays: int, *, device: torch.device | str = "cpu",
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Background for compositing. -> (N, 3).

    ``random``: one random colour for the whole batch (an image), so the field cannot explain the
    background with fog; ``noise``: a random colour per ray; ``white``/``black``: constant.
    """
    if mode == "white":
        return torch.ones(n_rays, 3, device=device)
    if mode == "black":
        return torch.zeros(n_rays, 3, device=device)
    if mode == "random":
        return to_device(torch.rand(1, 3, generator=generator), device).expand(n_rays, 3)
    if mode == "noise":
        return to_device(torch.rand(n_rays, 3, generator=generator), device)
    raise ValueError(f"unknown background mode {mode!r}; choose random, noise, white or black")


def ray_aabb_intersect(origins: torch.Tensor, directions: torch.Tensor, aabb: torch.Tensor,
                       near: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slab test. (N,3), (N,3), (2,3) -> t_near (N,), t_far (N,), hit (N,) bool; t_near >= near."""
    inv = 1.0 / torch.where(directions.abs() < 1e-12, torch.full_like(directions, 1e-12), directions)
    t0 = (aabb[0] - origins) * inv
    t1 = (aabb[1] - origins) * inv
    t_near = torch.minimum(t0, t1).amax(-1).clamp_min(near)
    t_far = torch.maximum(t0, t1).amin(-1)
    hit = t_far > t_near
    return t_near, torch.where(hit, t_far, t_near), hit


def stratified_intervals(t_near: torch.Tensor, t_far: torch.Tensor, n_samples: int, *, jitter: bool,
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n_samples equal bins between t_near and t_far; one sample per bin, at its centre or (jitter)
    uniformly within it. (N,), (N,) -> t_starts (N,S), t_ends (N,S), t_mid (N,S).

    The intervals tile [t_near, t_far] exactly, so the composited opacity is the ray's
    1 - exp(-integral of density) up to the quadrature of the density along it.
    """
    u = torch.linspace(0.0, 1.0, n_samples + 1, device=t_near.device, dtype=t_near.dtype)
    edges = t_near[:, None] + (t_far - t_near)[:, None] * u[None]  # (N, S+1)
    t_starts, t_ends = edges[:, :-1], edges[:, 1:]
    if jitter:
        r = torch.rand(t_starts.shape, generator=generator).to(t_starts)
    else:
        r = torch.full_like(t_starts, 0.5)
    return t_starts, t_ends, t_starts + r * (t_ends - t_starts)


# Points per density call when a grid is refreshed. The pure-PyTorch hash grid holds about 4 KB
# a point while it looks up the 16 levels' 8 corners: one call over a 128^3 grid's 2.1M cells
# took ~8 GB (peak RSS on the CPU, 7987 MB; on the H100 the run's 11.0 GiB peak was that plus
# the 2.7 GiB of diffusion models), 2^18 points ~1.1 GB.
GRID_CHUNK = 1 << 18


def in_chunks(fn: Callable[[torch.Tensor], torch.Tensor], chunk: int | None = None
              ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` over (N, 3) points, at most ``chunk`` (default ``GRID_CHUNK``) points a call: the
    same values, since the density of a point does not depend on the others."""
    def call(x: torch.Tensor) -> torch.Tensor:
        size = chunk or GRID_CHUNK
        if len(x) <= size:
            return fn(x)
        return torch.cat([fn(x[i:i + size]) for i in range(0, len(x), size)])
    return call


class DenseOccupancy:
    """A torch-only occupancy grid for the CPU path: which cells of the box can hold density.

    Like nerfacc's grid: each ``update`` evaluates the density at one jittered point per cell
    (no gradient) and keeps a decaying maximum per cell, so coverage builds up over updates while
    cells the field has emptied fade out. Cells above ``threshold`` plus their neighbours are
    marched; the others are skipped (density 0), which spares most of the box around a body.
    """

    def __init__(self, aabb: torch.Tensor, resolution: int = 64, decay: float = 0.95) -> None:
        self.aabb = aabb
        self.resolution = resolution
        self.decay = decay
        self.values: torch.Tensor | None = None  # (R^3,) decayed max density per cell; None: unknown
        self.mask = torch.ones(resolution, resolution, resolution, dtype=torch.bool, device=aabb.device)

    def reset(self) -> None:
        self.values = None
        self.mask = torch.ones_like(self.mask)

    @torch.no_grad()
    def update(self, density_fn, threshold: float, *, rounds: int = 1, chunk: int | None = None,
               generator: torch.Generator | None = None, sample: float = 1.0) -> float:
        """Refresh the mask with ``rounds`` jittered points per cell; returns the occupied fraction.
        ``threshold`` is a density (1/m). ``sample`` < 1: once the grid is known, evaluate only the
        occupied cells and that share of the others (nerfacc's rule after its warm-up); the cells
        left out keep their decayed value, so an emptied cell still fades."""
        r = self.resolution
        idx = torch.stack(torch.meshgrid(*(torch.arange(r, device=self.aabb.device),) * 3, indexing="ij"), -1)
        idx = idx.reshape(-1, 3).float()
        cell = (self.aabb[1] - self.aabb[0]) / r
        for _ in range(rounds):
            cells = None
            if self.values is not None and sample < 1.0:
                draw = torch.rand(len(idx), generator=generator).to(self.values.device)
                cells = ((self.values > threshold) | (draw < sample)).nonzero().squeeze(1)
            chosen = idx if cells is None else idx[cells]
            jitter = torch.rand(chosen.shape, generator=generator).to(chosen)
            pts = self.aabb[0] + (chosen + jitter) * cell
            density = in_chunks(density_fn, chunk)(pts).float()
            if self.values is None:
                self.values = density
            elif cells is None:
                self.values = torch.maximum(self.values * self.decay, density)
            else:
                values = self.values * self.decay
                values[cells] = torch.maximum(values[cells], density)
                self.values = values
        occ = (self.values > threshold).reshape(1, 1, r, r, r).float()  # type: ignore[operator]
        self.mask = torch.nn.functional.max_pool3d(occ, 3, stride=1, padding=1)[0, 0] > 0
        return float(self.mask.float().mean())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3) -> (N,) bool: the point's cell may hold density."""
        r = self.resolution
        ijk = ((x - self.aabb[0]) / (self.aabb[1] - self.aabb[0]) * r).long().clamp(0, r - 1)
        return self.mask[ijk[:, 0], ijk[:, 1], ijk[:, 2]]


def _query(field: RadianceField, x: torch.Tensor, with_normals: bool, create_graph: bool
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if not with_normals:
        out = field(x)
        return out.density, out.rgb, None
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        out = field(xg)
        (grad,) = torch.autograd.grad(out.density.sum(), xg, create_graph=create_graph)
    normals = -grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-10)
    return out.density, out.rgb, normals


def render_dense(field: RadianceField, rays: RayBundle, aabb: torch.Tensor, *, n_samples: int = 128,
                 jitter: bool = False, background: torch.Tensor | None = None, near: float = 0.0,
                 occupancy: DenseOccupancy | None = None, with_normals: bool = False,
                 generator: torch.Generator | None = None) -> RenderOutputs:
    """Render a batch of rays with the stratified sampler (CPU path; works on CUDA too).

    Differentiable in the field's outputs. ``background`` (N, 3) or (3,); None means black.
    """
    n = len(rays)
    device = rays.origins.device
    t_near, t_far, hit = ray_aabb_intersect(rays.origins, rays.directions, aabb, near)
    t_starts, t_ends, t_mid = stratified_intervals(t_near, t_far, n_samples, jitter=jitter, generator=generator)
    x = rays.origins[:, None, :] + t_mid[..., None] * rays.directions[:, None, :]  # (N, S, 3)
    live = hit[:, None].expand(n, n_samples)
    if occupancy is not None:
        live = live & occupancy(x.reshape(-1, 3)).reshape(n, n_samples)
    flat = live.reshape(-1)
    sigmas = torch.zeros(n * n_samples, device=device)
    rgbs = torch.zeros(n * n_samples, 3, device=device)
    normals = torch.zeros(n * n_samples, 3, device=device) if with_normals else None
    n_eval = int(flat.sum())
    if n_eval:
        d, c, nrm = _query(field, x.reshape(-1, 3)[flat], with_normals, create_graph=torch.is_grad_enabled())
        sigmas = sigmas.index_put((flat,), d.to(sigmas.dtype))
        rgbs = rgbs.index_put((flat,), c.to(rgbs.dtype))
        if normals is not None and nrm is not None:
            normals = normals.index_put((flat,), nrm.to(normals.dtype))
    weights, _, _ = nerfacc.render_weight_from_density(t_starts, t_ends, sigmas.reshape(n, n_samples))
    rgb = nerfacc.accumulate_along_rays(weights, rgbs.reshape(n, n_samples, 3))
    opacity = nerfacc.accumulate_along_rays(weights, None)
    depth = nerfacc.accumulate_along_rays(weights, t_mid[..., None]) / opacity.clamp_min(1e-10)
    acc_normals = None
    if normals is not None:
        acc_normals = nerfacc.accumulate_along_rays(weights, normals.reshape(n, n_samples, 3))
    return _finish(rgb, opacity, depth, acc_normals, background, n_eval)


def _finish(rgb: torch.Tensor, opacity: torch.Tensor, depth: torch.Tensor, normals: torch.Tensor | None,
            background: torch.Tensor | None, n_eval: int) -> RenderOutputs:
    if background is not None:
        rgb = rgb + (1.0 - opacity) * background.to(rgb)
    depth = torch.where(opacity > 1e-6, depth, torch.zeros_like(depth))
    return RenderOutputs(rgb=rgb, opacity=opacity, depth=depth, normals=normals, n_samples=n_eval)


def cat_outputs(parts: list[RenderOutputs]) -> RenderOutputs:
    normals = None if parts[0].normals is None else torch.cat([p.normals for p in parts])  # type: ignore[misc]
    return RenderOutputs(torch.cat([p.rgb for p in parts]), torch.cat([p.opacity for p in parts]),
                         torch.cat([p.depth for p in parts]), normals, sum(p.n_samples for p in parts))


@dataclass
class OccupancyGridConfig:
    """nerfacc occupancy grid (CUDA path); ``update_every``, ``ema_decay`` and ``refresh_share``
    also drive the CPU path's DenseOccupancy."""

    resolution: int = 128
    render_step_size: float | None = None  # metres; None: the box's diagonal / 512
    occ_threshold: float = 0.01  # on density * step: a cell is occupied above this opacity
    alpha_threshold: float = 0.0  # skip samples with a lower opacity while marching
    early_stop_eps: float = 1e-4  # stop a ray once its transmittance falls below this
    update_every: int = 16  # steps between grid refreshes while training
    warmup_steps: int = 256  # refresh every cell (not a sample) during the first steps
    # CPU grid (filled in full after the body distillation): each refresh evaluates the occupied
    # cells and this share of the rest; the full refresh was a third of a late CPU step
    refresh_share: float = 0.25
    ema_decay: float = 0.95


class OccupancyGridRenderer:
    """CUDA path: nerfacc's occupancy grid marcher plus ``nerfacc.rendering`` on packed samples."""

    def __init__(self, aabb: torch.Tensor, config: OccupancyGridConfig | None = None) -> None:
        self.config = config or OccupancyGridConfig()
        self.aabb = aabb
        self.step_size = self.config.render_step_size or float((aabb[1] - aabb[0]).norm()) / 512
        self.estimator = nerfacc.OccGridEstimator(roi_aabb=aabb.reshape(-1), resolution=self.config.resolution,
                                                  levels=1).to(aabb.device)

    @torch.no_grad()
    def update(self, density_fn: Callable[[torch.Tensor], torch.Tensor], step: int) -> None:
        """Refresh the grid while training (every ``update_every`` steps; all cells in warm-up)."""
        c = self.config
        self.estimator.train()
        density = in_chunks(density_fn)  # nerfacc hands over every cell at once in its warm-up
        self.estimator.update_every_n_steps(step=step, occ_eval_fn=lambda x: density(x) * self.step_size,
                                            occ_thre=c.occ_threshold, ema_decay=c.ema_decay,
                                            warmup_steps=c.warmup_steps, n=c.update_every)

    @torch.no_grad()
    def fill(self, density_fn: Callable[[torch.Tensor], torch.Tensor], rounds: int = 4) -> None:
        """Build the grid from scratch for a fixed field (inference, or just after distillation):
        every cell at several jittered points, keeping each cell's maximum."""
        c = self.config
        est = self.estimator
        est.occs.zero_()
        density = in_chunks(density_fn)
        for _ in range(rounds):
            est._update(step=0, occ_eval_fn=lambda x: density(x) * self.step_size,
                        occ_thre=c.occ_threshold, ema_decay=1.0, warmup_steps=1)
        # One random point per cell and round can miss a surface that clips a cell's corner:
        # grow the occupied set by one cell so silhouettes are never cut (as DenseOccupancy does).
        grown = torch.nn.functional.max_pool3d(est.binaries.float()[:, None], 3, stride=1, padding=1)[:, 0] > 0
        est.binaries = grown

    def render(self, field: RadianceField, rays: RayBundle, *, jitter: bool = False,
               background: torch.Tensor | None = None, near: float = 0.0, with_normals: bool = False
               ) -> RenderOutputs:
        c = self.config
        o, d = rays.origins, rays.directions
        if o.device.type != "cuda":
            raise RuntimeError("the occupancy-grid renderer marches rays with nerfacc's CUDA extension; "
                               "use render_dense (VolumeRenderer picks it) for rays on the CPU")

        def sigma_fn(t_starts: torch.Tensor, t_ends: torch.Tensor, ray_indices: torch.Tensor) -> torch.Tensor:
            x = o[ray_indices] + d[ray_indices] * ((t_starts + t_ends) / 2)[:, None]
            return field.density(x)

        ray_indices, t_starts, t_ends = self.estimator.sampling(
            o, d, sigma_fn=sigma_fn, near_plane=near, render_step_size=self.step_size, stratified=jitter,
            alpha_thre=c.alpha_threshold, early_stop_eps=c.early_stop_eps)
        normals_holder: list[torch.Tensor] = []

        def rgb_sigma_fn(t_starts: torch.Tensor, t_ends: torch.Tensor, ray_indices: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
            x = o[ray_indices] + d[ray_indices] * ((t_starts + t_ends) / 2)[:, None]
            sigma, rgb, nrm = _query(field, x, with_normals, create_graph=torch.is_grad_enabled())
            if nrm is not None:
                normals_holder.append(nrm)
            return rgb, sigma

        n = len(rays)
        rgb, opacity, depth, extras = nerfacc.rendering(t_starts, t_ends, ray_indices, n_rays=n,
                                                        rgb_sigma_fn=rgb_sigma_fn)
        normals = None
        if with_normals:
            if normals_holder:
                normals = nerfacc.accumulate_along_rays(extras["weights"], normals_holder[0], ray_indices, n)
            else:
                normals = torch.zeros(n, 3, device=o.device)
        return _finish(rgb, opacity, depth, normals, background, int(t_starts.shape[0]))


@dataclass
class VolumeRendererConfig:
    n_samples: int = 128  # CPU path: samples per ray inside the box
    chunk_rays: int = 4096  # rays per field call (memory: chunk_rays * n_samples points on the CPU path)
    chunk_rays_grid: int = 1 << 16  # CUDA grid path: it packs only the marched samples, so whole
    # training views fit one call (each call's marching waits for the device once)
    near: float = 0.0
    use_occupancy_grid: bool = True  # CUDA: nerfacc's grid; CPU: DenseOccupancy skipping
    cpu_occupancy_resolution: int = 64
    occupancy: OccupancyGridConfig = dataclass_field(default_factory=OccupancyGridConfig)  # both paths


class VolumeRenderer:
    """Renders any RadianceField in a box on the CPU or CUDA path, in ray chunks.

    The path follows the box's device. The optimiser calls ``fill(field)`` once (after the body
    distillation), ``update(field, step)`` every step (keeps the skipping grid in sync with the
    changing density; it refreshes every ``occupancy.update_every`` steps) and ``render`` per view.
    """

    def __init__(self, aabb: torch.Tensor, config: VolumeRendererConfig | None = None,
                 on_message: Callable[[str], None] | None = None,
                 allowed: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.config = config or VolumeRendererConfig()
        self.aabb = aabb
        # (N,3) -> (N,) 0/1: where density may be; the grids keep every other cell empty
        # (priors.SilhouetteCone: outside the photo's person mask nothing can be)
        self.allowed = allowed
        c = self.config
        self.grid: OccupancyGridRenderer | None = None
        self.cpu_grid: DenseOccupancy | None = None
        self.fallback_reason = ""  # why a CUDA box renders with the dense sampler
        if aabb.device.type == "cuda" and c.use_occupancy_grid:
            usable, self.fallback_reason = cuda_marcher_status(on_message)
            if usable:
                self.grid = OccupancyGridRenderer(aabb, c.occupancy)
            else:
                if on_message is not None:
                    on_message(f"Rendering with the dense sampler on the GPU: {self.fallback_reason}")
                self.cpu_grid = DenseOccupancy(aabb, c.cpu_occupancy_resolution, c.occupancy.ema_decay)
        elif c.use_occupancy_grid:
            self.cpu_grid = DenseOccupancy(aabb, c.cpu_occupancy_resolution, c.occupancy.ema_decay)

    @property
    def backend(self) -> str:
        return "occupancy_grid" if self.grid is not None else "dense"

    @property
    def occupied(self) -> torch.Tensor | None:
        """The cells the renderer samples, (R, R, R) bool over the box (x, y, z order), or None
        before the grid knows the field: density elsewhere is never seen, so mesh extraction
        need not evaluate it (field_avatar.density_grid)."""
        if self.grid is not None:
            return self.grid.estimator.binaries[0]
        if self.cpu_grid is not None and self.cpu_grid.values is not None:
            return self.cpu_grid.mask
        return None

    def _cpu_threshold(self) -> float:
        """The CUDA grid's rule in density units: skip cells whose opacity over one sample step is
        below ``occ_threshold``."""
        step_len = float((self.aabb[1] - self.aabb[0]).norm()) / self.config.n_samples
        return self.config.occupancy.occ_threshold / step_len

    def _grid_density(self, field: RadianceField) -> Callable[[torch.Tensor], torch.Tensor]:
        """The density the grids see: the field's, zero where ``allowed`` says none can be."""
        if self.allowed is None:
            return field.density
        allowed = self.allowed
        return lambda x: field.density(x) * allowed(x).to(x.dtype)

    @torch.no_grad()
    def update(self, field: RadianceField, step: int) -> None:
        """Refresh the skipping grid from the field's current density (call once per step)."""
        if self.grid is not None:
            self.grid.update(self._grid_density(field), step)
        elif self.cpu_grid is not None and step % self.config.occupancy.update_every == 0:
            self.cpu_grid.update(self._grid_density(field), self._cpu_threshold(),
                                 sample=self.config.occupancy.refresh_share)

    @torch.no_grad()
    def fill(self, field: RadianceField, rounds: int = 4) -> None:
        """Build the skipping grid from scratch for the field as it is now."""
        if self.grid is not None:
            self.grid.fill(self._grid_density(field), rounds)
        elif self.cpu_grid is not None:
            self.cpu_grid.reset()
            self.cpu_grid.update(self._grid_density(field), self._cpu_threshold(), rounds=rounds)

    def render(self, field: RadianceField, rays: RayBundle, *, jitter: bool = False,
               background: torch.Tensor | None = None, with_normals: bool = False,
               generator: torch.Generator | None = None) -> RenderOutputs:
        c = self.config
        size = c.chunk_rays_grid if self.grid is not None else c.chunk_rays
        parts = []
        for i in range(0, len(rays), size):
            chunk = rays[i:i + size]
            bg = None
            if background is not None:
                bg = background if background.dim() == 1 else background[i:i + size]
            if self.grid is not None:
                parts.append(self.grid.render(field, chunk, jitter=jitter, background=bg, near=c.near,
                                              with_normals=with_normals))
            else:
                parts.append(render_dense(field, chunk, self.aabb, n_samples=c.n_samples, jitter=jitter,
                                          background=bg, near=c.near, occupancy=self.cpu_grid,
                                          with_normals=with_normals, generator=generator))
        return cat_outputs(parts)


def default_step_size(aabb: torch.Tensor, n_samples: int) -> float:
    """The marching step that gives about ``n_samples`` samples along the box's diagonal."""
    return float((aabb[1] - aabb[0]).norm()) / max(1, n_samples)


__all__ = [
    "BackgroundMode", "DenseOccupancy", "OccupancyGridConfig", "OccupancyGridRenderer", "RayBundle",
    "RenderOutputs", "VolumeRenderer", "VolumeRendererConfig", "background_color", "default_step_size",
    "ray_aabb_intersect", "render_dense", "stratified_intervals",
]
