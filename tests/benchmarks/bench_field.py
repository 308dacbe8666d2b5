"""Neural-field benchmark: `python -m tests.benchmarks.bench_field [--threads N] [--default-field] [--only gather]`.

On the posed Anny body: the hash grid's forward + backward against the native scatter, SDF-grid build, distillation (time, occupancy IoU at 64^3), CPU volume
rendering of 64x64 and 128x128 views (rays/s, inference and a training forward+backward, with and
without empty-space skipping), marching cubes at 128 and 256 cells along the body box's longest
side (density grid, marching, colours), parameter counts. A shared machine skews every number:
the first line times a fixed elementwise workload so runs can be compared.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from zeroavatar_blender.engine.cameras import intrinsics, orbit_camera
from zeroavatar_blender.engine.extract import evaluate_grid, extract_mesh, marching_cubes, vertex_colors
from zeroavatar_blender.engine.field import (
    BodyPrior, BodyPriorConfig, NeRFField, NeRFFieldConfig, body_aabb, distill_body_prior, sample_surface,
)
from zeroavatar_blender.engine.field.nerf import normalize_aabb
from zeroavatar_blender.engine.field.body_prior import grid_axes, inside_grid
from zeroavatar_blender.engine.render.volume import RayBundle, VolumeRenderer, VolumeRendererConfig
from tests.engine.field.distilled import SMALL_DISTILL, SMALL_FIELD, posed_anny


def calibration() -> float:
    a = torch.rand(1 << 20)
    t = time.perf_counter()
    for _ in range(50):
        a = a * 1.0001
    return time.perf_counter() - t


def occupancy_iou(field: NeRFField, vertices: np.ndarray, faces: np.ndarray) -> float:
    box = field.aabb.numpy()
    axes = [np.linspace(box[0][a], box[1][a], 64) for a in range(3)]
    body = inside_grid(vertices, faces, axes)
    pts = torch.tensor(np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3), dtype=torch.float32)
    with torch.no_grad():
        occ = (field.density(pts) > field.config.surface_density).numpy().reshape(body.shape)
    return float((occ & body).sum() / (occ | body).sum())


def bench_render(field: NeRFField, centre: np.ndarray, size: int, skipping: bool) -> dict:
    renderer = VolumeRenderer(field.aabb, VolumeRendererConfig(n_samples=128, use_occupancy_grid=skipping))
    t = time.perf_counter()
    renderer.fill(field)
    fill_s = time.perf_counter() - t
    cam = orbit_camera(centre, 3.0, 30.0, 10.0, intrinsics(size, size, focal_px=size * 1.3), size, size)
    rays = RayBundle.from_camera(*cam.torch(), size, size)
    t = time.perf_counter()
    with torch.no_grad():
        out = renderer.render(field, rays, background=torch.ones(3))
    infer = time.perf_counter() - t
    t = time.perf_counter()
    out2 = renderer.render(field, rays, jitter=True, background=torch.ones(3))
    out2.rgb.mean().backward()
    train = time.perf_counter() - t
    field.zero_grad(set_to_none=True)
    n = size * size
    return {"size": size, "skipping": skipping, "grid_fill_s": round(fill_s, 3),
            "infer_s": round(infer, 3), "infer_rays_per_s": round(n / infer),
            "train_s": round(train, 3), "train_rays_per_s": round(n / train),
            "field_evals": out.n_samples, "mean_opacity": round(float(out.opacity.mean()), 4)}


def bench_extract(field: NeRFField, resolution: int) -> dict:
    box = field.aabb.numpy().astype(np.float64)
    axes = grid_axes(box, resolution)
    t0 = time.perf_counter()
    grid = evaluate_grid(field.density, axes)
    t1 = time.perf_counter()
    mesh = marching_cubes(grid, field.config.surface_density, np.array([a[0] for a in axes]),
                          float(axes[0][1] - axes[0][0]))
    t2 = time.perf_counter()
    vertex_colors(field, mesh.vertices)
    t3 = time.perf_counter()
    return {"resolution": resolution, "grid": list(grid.shape), "density_grid_s": round(t1 - t0, 3),
            "marching_cubes_s": round(t2 - t1, 3), "colours_s": round(t3 - t2, 3), "total_s": round(t3 - t0, 3),
            "vertices": mesh.num_vertices, "faces": mesh.num_faces}


def bench_gather(vertices: np.ndarray, faces: np.ndarray, n_points: int = 100_000, repeats: int = 5) -> dict:
    """The hash grid's forward + backward on points near the body (CPU standard-mode encoding),
    with the table gradient scattered by ``scatter_rows`` and by ATen's 2-D ``index_add_`` (the
    baseline, same process, same points): the ratio is what ``_GatherRows`` buys."""
    from zeroavatar_blender.engine.field import encoding as enc_mod

    cfg = enc_mod.HashGridConfig(n_levels=12, log2_hashmap_size=16, max_resolution=512)
    torch.manual_seed(0)
    grid = enc_mod.HashGridEncoding(cfg)
    aabb = body_aabb(vertices, 0.1)
    pts = sample_surface(vertices, faces, n_points, np.random.default_rng(0))
    pts = pts + np.random.default_rng(1).normal(0, 0.02, pts.shape)
    unit, _ = normalize_aabb(torch.tensor(pts, dtype=torch.float32), torch.as_tensor(aabb, dtype=torch.float32))
    native = enc_mod.scatter_rows

    def timed() -> tuple[float, torch.Tensor]:
        best = float("inf")
        for _ in range(repeats):
            grid.embeddings.grad = None
            t = time.perf_counter()
            grid(unit).square().sum().backward()
            best = min(best, time.perf_counter() - t)
        return best, grid.embeddings.grad.clone()

    fast_s, fast_grad = timed()
    enc_mod.scatter_rows = lambda v, r, n: v.new_zeros(n, v.shape[1]).index_add(0, r, v)
    try:
        base_s, base_grad = timed()
    finally:
        enc_mod.scatter_rows = native
    return {"points": n_points, "levels": cfg.n_levels, "table_rows": int(grid.embeddings.shape[0]),
            "forward_backward_s": round(fast_s, 4), "baseline_index_add_2d_s": round(base_s, 4),
            "speedup": round(base_s / fast_s, 2), "same_gradient": bool(torch.equal(fast_grad, base_grad))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--only", choices=("gather",), default=None, help="run one part only")
    parser.add_argument("--default-field", action="store_true",
                        help="also count and distil the default (Instant-NGP sized) field")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict = {"threads": torch.get_num_threads(), "calibration_s": round(calibration(), 4)}
    vertices, faces = posed_anny()
    report["gather"] = bench_gather(vertices, faces)
    if args.only == "gather":
        print(json.dumps(report, indent=1))
        return
    t = time.perf_counter()
    prior = BodyPrior.from_mesh(vertices, faces, BodyPriorConfig(grid_resolution=128))
    report["sdf_grid_128_s"] = round(time.perf_counter() - t, 3)
    aabb = body_aabb(vertices, 0.1)
    surface = sample_surface(vertices, faces, 100_000, np.random.default_rng(0))
    configs = {"small": SMALL_FIELD}
    if args.default_field:
        configs["default"] = NeRFFieldConfig()
    report["parameters"] = {name: NeRFField(aabb, cfg).parameter_counts() for name, cfg in configs.items()}
    fields = {}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        field = NeRFField(aabb, cfg)
        rep = distill_body_prior(field, prior, surface, SMALL_DISTILL)
        field.eval()
        fields[name] = field
        report[f"distill_{name}"] = {"steps": rep.steps, "batch": SMALL_DISTILL.batch_size,
                                     "seconds": round(rep.seconds, 2), "final_loss": round(rep.final_loss, 5),
                                     "iou_64": round(occupancy_iou(field, vertices, faces), 4)}
    field = fields["small"]
    centre = vertices.mean(0)
    report["render"] = [bench_render(field, centre, size, skipping) for skipping in (False, True) for size in (64, 128)]
    report["extract"] = [bench_extract(field, res) for res in (128, 256)]
    t = time.perf_counter()
    extract_mesh(field, resolution=128)
    report["extract_mesh_128_s"] = round(time.perf_counter() - t, 3)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
