"""Volume rendering against closed-form answers on analytic fields, and CPU vs CUDA paths."""

import math

import numpy as np
import pytest
import torch

from zeroavatar_blender.engine.cameras import intrinsics, look_at
from zeroavatar_blender.engine.field import HashGridConfig, NeRFField, NeRFFieldConfig
from zeroavatar_blender.engine.field.nerf import FieldOutputs
from zeroavatar_blender.engine.render.volume import (
    DenseOccupancy, OccupancyGridConfig, OccupancyGridRenderer, RayBundle, VolumeRenderer, VolumeRendererConfig, background_color,
    ray_aabb_intersect, render_dense,
)

BOX = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])


class Slab:
    """Density ``sigma`` where |x| < half_width (all y, z), a fixed colour."""

    def __init__(self, sigma: float, half_width: float, color=(0.2, 0.4, 0.6)) -> None:
        self.sigma, self.half_width, self.color = sigma, half_width, torch.tensor(color)

    def density(self, x: torch.Tensor) -> torch.Tensor:
        return self.sigma * (x[:, 0].abs() < self.half_width).to(x.dtype)

    def __call__(self, x: torch.Tensor) -> FieldOutputs:
        return FieldOutputs(self.density(x), self.color.to(x).expand(len(x), 3))


class Ball:
    """A smooth ball (density ``peak`` inside, falling over ~1/sharpness at radius r) whose colour
    varies with position, so the colour compositing is tested too."""

    def __init__(self, radius: float = 0.5, peak: float = 2000.0, sharpness: float = 300.0,
                 centre=(0.0, 0.0, 0.0)) -> None:
        self.radius, self.peak, self.sharpness = radius, peak, sharpness
        self.centre = torch.tensor(centre)

    def density(self, x: torch.Tensor) -> torch.Tensor:
        r = (x - self.centre.to(x)).norm(dim=-1)
        return self.peak * torch.sigmoid(-self.sharpness * (r - self.radius))

    def color(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([0.5 + 0.5 * torch.tanh(x[:, 0]), torch.full_like(x[:, 0], 0.3),
                            0.5 + 0.4 * torch.sin(3 * x[:, 2])], -1)

    def __call__(self, x: torch.Tensor) -> FieldOutputs:
        return FieldOutputs(self.density(x), self.color(x))


def front_camera_rays(size: int = 32, distance: float = 3.0, focal: float = 40.0,
                      device: str = "cpu") -> tuple[RayBundle, np.ndarray]:
    K = intrinsics(size, size, focal_px=focal)
    w2c = look_at(np.array([0.0, -distance, 0.0]), np.zeros(3))
    rays = RayBundle.from_camera(torch.tensor(K, dtype=torch.float32), torch.tensor(w2c, dtype=torch.float32),
                                 size, size)
    return RayBundle(rays.origins.to(device), rays.directions.to(device)), w2c


def ray_sphere(rays: RayBundle, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form first hit distance and hit mask of rays with a sphere at the origin."""
    b = (rays.origins * rays.directions).sum(-1)
    c = (rays.origins * rays.origins).sum(-1) - radius**2
    disc = b * b - c
    hit = disc > 0
    return -b - torch.sqrt(disc.clamp_min(0)), hit


def test_ray_aabb_intersect():
    o = torch.tensor([[-3.0, 0.0, 0.0], [-3.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    d = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    t0, t1, hit = ray_aabb_intersect(o, d, BOX)
    assert hit.tolist() == [True, False, True]
    assert t0[0].item() == pytest.approx(2.0) and t1[0].item() == pytest.approx(4.0)
    assert t0[2].item() == 0.0 and t1[2].item() == pytest.approx(1.0)  # starting inside: from the origin


@pytest.mark.parametrize("jitter", [False, True])
def test_uniform_density_box_opacity_is_exact(jitter):
    """Density 2 filling the box: opacity = 1 - exp(-2 * chord) whatever the sampling."""
    field = Slab(sigma=2.0, half_width=10.0)
    g = torch.Generator().manual_seed(0)
    o = torch.randn(64, 3, generator=g) * 0.3 + torch.tensor([0.0, -3.0, 0.0])
    target = torch.randn(64, 3, generator=g) * 0.4
    d = torch.nn.functional.normalize(target - o, dim=-1)
    rays = RayBundle(o, d)
    out = render_dense(field, rays, BOX, n_samples=7, jitter=jitter, generator=g)
    t0, t1, hit = ray_aabb_intersect(o, d, BOX)
    expected = 1 - torch.exp(-2.0 * (t1 - t0))
    assert hit.all()
    assert torch.allclose(out.opacity[:, 0], expected, atol=1e-5)


def test_slab_opacity_and_colour_over_background():
    """A slab of width 0.5 and density 3 crossed at right angles: 1 - exp(-1.5)."""
    field = Slab(sigma=3.0, half_width=0.25)
    y = torch.linspace(-0.9, 0.9, 10)
    o = torch.stack([torch.full_like(y, -2.0), y, y * 0.5], -1)
    rays = RayBundle(o, torch.tensor([[1.0, 0.0, 0.0]]).expand(10, 3))
    bg = torch.tensor([1.0, 1.0, 1.0])
    out = render_dense(field, rays, BOX, n_samples=400, background=bg)
    alpha = 1 - math.exp(-1.5)
    assert torch.allclose(out.opacity[:, 0], torch.full((10,), alpha), atol=1e-3)
    expected_rgb = field.color * alpha + bg * (1 - alpha)
    assert torch.allclose(out.rgb, expected_rgb.expand(10, 3), atol=1e-3)
    # Expected depth: the mean of the exponential distribution of termination inside the slab.
    s, length = 3.0, 0.5
    mean_in = 1 / s - length * math.exp(-s * length) / (1 - math.exp(-s * length))
    assert torch.allclose(out.depth[:, 0], torch.full((10,), 2.0 - 0.25 + mean_in), atol=5e-3)


def _grazing(rays: RayBundle, radius: float, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays' closest approach to the origin, and whether they pass within ``margin`` of the rim."""
    b = (rays.origins * rays.directions).sum(-1)
    miss_distance = ((rays.origins * rays.origins).sum(-1) - b * b).clamp_min(0).sqrt()
    return miss_distance, (miss_distance - radius).abs() <= margin


def test_sphere_mask_and_depth():
    """A hard ball (density 5000 within 0.2 mm of r): mask = the ray-sphere test, depth = the
    first intersection up to one sample step."""
    ball = Ball(radius=0.5, peak=5000.0, sharpness=5000.0)
    rays, _ = front_camera_rays(32)
    out = render_dense(ball, rays, BOX, n_samples=256, background=torch.zeros(3))
    t_hit, hit = ray_sphere(rays, 0.5)
    miss_distance, grazing = _grazing(rays, 0.5, 0.02)
    assert torch.equal(out.opacity[~grazing, 0] > 0.5, hit[~grazing])
    core = hit & (miss_distance < 0.45)
    assert core.sum() > 50
    step = 2.0 * math.sqrt(3) / 256  # the longest chord through the box over the samples
    assert (out.depth[core, 0] - t_hit[core]).abs().max().item() < step
    assert (out.depth[~hit & ~grazing] == 0).all() and (out.opacity[~hit & ~grazing] < 1e-6).all()


def test_sphere_colour_and_normals():
    """A soft ball: composited colour is the field's colour where rays stop, and accumulated
    normals are the sphere's."""
    ball = Ball(radius=0.5)
    rays, _ = front_camera_rays(32)
    out = render_dense(ball, rays, BOX, n_samples=256, with_normals=True, background=torch.zeros(3))
    t_hit, hit = ray_sphere(rays, 0.5)
    miss_distance, _ = _grazing(rays, 0.5, 0.02)
    core = hit & (miss_distance < 0.4)
    p = rays.origins[core] + t_hit[core, None] * rays.directions[core]
    assert (out.opacity[core] > 0.999).all()
    assert (out.rgb[core] - ball.color(p)).abs().max().item() < 0.02
    n = torch.nn.functional.normalize(out.normals[core], dim=-1)
    assert ((n * p / 0.5).sum(-1) > 0.99).all()


def test_occupancy_skipping_gives_the_same_image_with_fewer_evaluations():
    ball = Ball(radius=0.4, centre=(0.2, 0.1, -0.1))
    rays, _ = front_camera_rays(24)
    full = render_dense(ball, rays, BOX, n_samples=128)
    occ = DenseOccupancy(BOX, resolution=32)
    fraction = occ.update(ball.density, threshold=0.01, rounds=4)
    assert 0.02 < fraction < 0.3
    fast = render_dense(ball, rays, BOX, n_samples=128, occupancy=occ)
    assert fast.n_samples < full.n_samples / 3
    assert torch.allclose(fast.rgb, full.rgb, atol=1e-4) and torch.allclose(fast.opacity, full.opacity, atol=1e-4)


def test_sampled_refresh_evaluates_occupied_cells_and_a_share_of_the_rest():
    """After the full fill, a training refresh evaluates every occupied cell and a random share
    of the others (as nerfacc's grid does): a ball that moves is still found, the cells it left
    fade, and far fewer points are evaluated than a full refresh's."""
    r, threshold = 32, 0.01
    seen = []

    def counting(fn):
        def density(x):
            seen.append(len(x))
            return fn(x)
        return density

    occ = DenseOccupancy(BOX, resolution=r, decay=0.5)
    occ.update(Ball(radius=0.3).density, threshold, rounds=4)
    occupied = int((occ.values > threshold).sum())
    gen = torch.Generator().manual_seed(0)
    moved = Ball(radius=0.3, centre=(0.45, 0.0, 0.0))
    for _ in range(20):  # decay 0.5: 20 halvings take the old ball's 2000/m below the threshold
        seen.clear()
        occ.update(counting(moved.density), threshold, sample=0.25, generator=gen)
        assert sum(seen) < occupied + 0.35 * r ** 3
    ijk = torch.stack(torch.meshgrid(*(torch.arange(r),) * 3, indexing="ij"), -1).reshape(-1, 3)
    centres = BOX[0] + (ijk + 0.5) * (BOX[1] - BOX[0]) / r
    inside = moved.density(centres) > threshold
    assert inside.sum() > 300 and occ(centres[inside]).all()  # every cell the moved ball fills is marched
    left = Ball(radius=0.3).density(torch.tensor([[-0.25, 0.0, 0.0]]))
    assert left > 0 and not occ(torch.tensor([[-0.25, 0.0, 0.0]]))  # the cells the ball left have faded


def test_renderer_chunks_and_backgrounds():
    ball = Ball(radius=0.5)
    rays, _ = front_camera_rays(20)
    bg = background_color("noise", len(rays), generator=torch.Generator().manual_seed(1))
    renderer = VolumeRenderer(BOX, VolumeRendererConfig(n_samples=64, chunk_rays=37, use_occupancy_grid=False))
    assert renderer.backend == "dense"
    chunked = renderer.render(ball, rays, background=bg)
    whole = render_dense(ball, rays, BOX, n_samples=64, background=bg)
    assert torch.allclose(chunked.rgb, whole.rgb) and torch.allclose(chunked.depth, whole.depth)
    img = chunked.image(20, 20)
    assert img.rgb.shape == (20, 20, 3) and img.opacity.shape == (20, 20, 1)
    assert torch.equal(background_color("white", 3), torch.ones(3, 3))
    assert torch.equal(background_color("black", 2), torch.zeros(2, 3))
    rnd = background_color("random", 5)
    assert torch.equal(rnd, rnd[:1].expand(5, 3))  # one colour for the whole image
    with pytest.raises(ValueError, match="background"):
        background_color("pink", 3)  # type: ignore[arg-type]


def test_gradients_reach_the_nerf_field():
    torch.manual_seed(0)
    cfg = NeRFFieldConfig(encoding=HashGridConfig(n_levels=4, log2_hashmap_size=12, max_resolution=64),
                          hidden_dim=16, color_hidden_dim=16, density_bias=1.0)
    field = NeRFField(BOX, cfg)
    rays, _ = front_camera_rays(12)
    renderer = VolumeRenderer(BOX, VolumeRendererConfig(n_samples=32))
    renderer.fill(field)
    out = renderer.render(field, rays, jitter=True, background=background_color("random", len(rays)))
    (out.rgb.mean() + out.opacity.mean()).backward()
    for name, p in field.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_occupancy_grid_fill_covers_the_field():
    """The CUDA path's grid filling runs in plain torch: it must mark every cell the ball
    touches (and not much else); marching through it needs CUDA (tested below)."""
    ball = Ball(radius=0.5, peak=2000.0, sharpness=300.0)
    grid = OccupancyGridRenderer(BOX, OccupancyGridConfig(resolution=32, render_step_size=2.0 / 256))
    grid.fill(ball.density)
    occupied = grid.estimator.binaries[0]
    centres = (torch.stack(torch.meshgrid(*(torch.arange(32),) * 3, indexing="ij"), -1) + 0.5) / 32 * 2 - 1
    r = centres.norm(dim=-1)
    half_diagonal = math.sqrt(3) / 32
    assert occupied[r < 0.5 + half_diagonal].all()  # every cell reaching into the ball
    assert not occupied[r > 0.5 + 4 * half_diagonal].any()
    with pytest.raises(RuntimeError, match="CUDA"):
        grid.render(ball, front_camera_rays(4)[0])


def test_grid_refreshes_hand_the_field_a_bounded_number_of_points(monkeypatch):
    """nerfacc's grid gives its density function every cell at once in the fill and the warm-up
    (2.1M at 128^3, ~8 GB of hash-grid lookups); the renderer passes them on in chunks of
    GRID_CHUNK points, and the grid comes out the same."""
    from zeroavatar_blender.engine.render import volume

    ball = Ball(radius=0.5, peak=2000.0, sharpness=300.0)
    sizes: list[int] = []

    def density(x: torch.Tensor) -> torch.Tensor:
        sizes.append(len(x))
        return ball.density(x)

    grids = {}
    for chunk in (1 << 30, 4096):  # 32^3 = 32768 cells: one call, then 8 a refresh
        monkeypatch.setattr(volume, "GRID_CHUNK", chunk)
        torch.manual_seed(0)
        grid = OccupancyGridRenderer(BOX, OccupancyGridConfig(resolution=32, render_step_size=2.0 / 256))
        sizes.clear()
        grid.fill(density, rounds=2)
        for step in range(3):  # warm-up refreshes: every cell again
            grid.update(density, step * grid.config.update_every)
        assert max(sizes) == min(chunk, 32 ** 3) and len(sizes) == 5 * max(1, 32 ** 3 // chunk)
        grids[chunk] = (grid.estimator.occs.clone(), grid.estimator.binaries.clone())
    assert torch.equal(grids[1 << 30][0], grids[4096][0]) and torch.equal(grids[1 << 30][1], grids[4096][1])
    assert volume.in_chunks(lambda x: x.sum(1), 7)(torch.arange(60.0).reshape(20, 3)).tolist() == \
        torch.arange(60.0).reshape(20, 3).sum(1).tolist()


def _gpu() -> bool:
    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu(), reason="needs a CUDA GPU")
def test_cpu_sampler_and_cuda_occupancy_grid_render_the_same_image():
    """MUST HOLD (b): the same analytic field through both paths."""
    ball = Ball(radius=0.45, centre=(0.1, 0.0, 0.05))
    rays_cpu, _ = front_camera_rays(48)
    n_samples = 1024
    cpu = render_dense(ball, rays_cpu, BOX, n_samples=n_samples, background=torch.ones(3))
    box = BOX.cuda()
    step = 2.0 / n_samples  # about the CPU path's spacing along the box's inner rays
    renderer = VolumeRenderer(box, VolumeRendererConfig(
        occupancy=OccupancyGridConfig(resolution=64, render_step_size=step, early_stop_eps=1e-5)))
    assert renderer.backend == "occupancy_grid"
    cuda_ball = Ball(radius=0.45, centre=(0.1, 0.0, 0.05))
    cuda_ball.centre = cuda_ball.centre.cuda()
    renderer.fill(cuda_ball)
    rays_gpu = RayBundle(rays_cpu.origins.cuda(), rays_cpu.directions.cuda())
    gpu = renderer.render(cuda_ball, rays_gpu, background=torch.ones(3, device="cuda"))
    assert (gpu.rgb.cpu() - cpu.rgb).abs().max().item() < 0.02
    assert (gpu.opacity.cpu() - cpu.opacity).abs().max().item() < 0.02
    hit = cpu.opacity[:, 0] > 0.99
    assert (gpu.depth.cpu()[hit] - cpu.depth[hit]).abs().max().item() < 0.01
    assert gpu.n_samples < cpu.n_samples  # the grid skipped empty space


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu(), reason="needs a CUDA GPU")
def test_cuda_box_without_the_marcher_renders_with_the_dense_sampler_on_the_gpu(monkeypatch):
    """No nvcc (most artists' machines) or a failed nerfacc build: a CUDA run still renders, the
    same image as the CPU path, and says why it is slower."""
    from zeroavatar_blender.engine.render import volume

    monkeypatch.setattr(volume, "cuda_marcher_status", lambda on_message=None: (False, "no nvcc (test)"))
    told: list[str] = []
    renderer = VolumeRenderer(BOX.cuda(), VolumeRendererConfig(n_samples=256), on_message=told.append)
    assert renderer.backend == "dense" and renderer.fallback_reason == "no nvcc (test)"
    assert told and "no nvcc (test)" in told[0]
    ball = Ball(radius=0.45, centre=(0.1, 0.0, 0.05))
    ball.centre = ball.centre.cuda()
    renderer.fill(ball)
    rays_cpu, _ = front_camera_rays(32)
    gpu = renderer.render(ball, RayBundle(rays_cpu.origins.cuda(), rays_cpu.directions.cuda()),
                          background=torch.ones(3, device="cuda"))
    cpu = render_dense(Ball(radius=0.45, centre=(0.1, 0.0, 0.05)), rays_cpu, BOX, n_samples=256,
                       background=torch.ones(3))
    assert (gpu.rgb.cpu() - cpu.rgb).abs().max().item() < 0.02


def test_grids_keep_disallowed_space_empty_so_a_floater_there_is_never_sampled():
    """With ``allowed`` (the photo's silhouette cone in a run), the skipping grid leaves a
    floater outside it empty: no samples are spent on it and no image shows it."""
    body = Ball(radius=0.3, peak=2000.0, sharpness=300.0)
    floater = Ball(radius=0.15, peak=2000.0, sharpness=300.0, centre=(0.7, 0.0, 0.0))

    class Scene:
        def density(self, x):
            return body.density(x) + floater.density(x)

        def __call__(self, x):
            return FieldOutputs(self.density(x), body.color(x))

    scene = Scene()
    rays, _ = front_camera_rays(32)
    hits = {}
    for name, allowed in (("plain", None), ("carved", lambda x: (x[:, 0] < 0.45).float())):
        renderer = VolumeRenderer(BOX, VolumeRendererConfig(n_samples=64, cpu_occupancy_resolution=32), allowed=allowed)
        renderer.fill(scene)
        out = renderer.render(scene, rays)
        hits[name] = (out.opacity[:, 0] > 0.5).reshape(32, 32), out.n_samples
    (plain, plain_n), (carved, carved_n) = hits["plain"], hits["carved"]
    assert plain[:, 24:].any() and not carved[:, 24:].any()  # the floater's columns, right of the body
    assert torch.equal(plain[:, :18], carved[:, :18])  # the body is untouched
    assert carved_n < plain_n
    # the CUDA path's grid takes the same carved density (its fill runs in plain torch)
    carve = VolumeRenderer(BOX, allowed=lambda x: (x[:, 0] < 0.45).float())
    for carved, density in ((False, scene.density), (True, carve._grid_density(scene))):
        grid = OccupancyGridRenderer(BOX, OccupancyGridConfig(resolution=32, render_step_size=2.0 / 256))
        grid.fill(density)
        floater_cells = grid.estimator.binaries[0][27:, 14:18, 14:18]  # x in [0.69, 1]
        assert bool(floater_cells.any()) != carved
