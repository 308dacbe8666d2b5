"""The ZeroAvatar optimisation loop: a body-initialised NeRF fitted to the photo and guided elsewhere.

Per step:
  * reference view (the fit's camera): RGB and mask losses on a random subset of the photo's
    pixels, and depth correlation (Pearson) with the fitted body's depth there;
  * a novel view orbiting the subject (front-biased early): the UV-guided texture prior (the body
    textured from the photo and its left-right mirror, rendered at that view) pulls the field's
    colour on the body's pixels where that texture is known, with a weight that decays;
  * quality ``full``: score distillation from Stable Diffusion through a depth ControlNet,
    conditioned on the body's rendered depth until ``depth_switch_step``, then on the field's own;
  * a fading body-density prior keeps unobserved space near the body; where the person's
    silhouette is wider than the fitted body's (a skirt, long hair) the prior is the body grown by
    that excess (priors.py), so a garment is as deep as it is wide instead of a sheet.
Every ``mesh_every`` steps a marching-cubes preview goes to meshes/ (Blender shows it); every
``checkpoint_every`` steps, and on cancel, a checkpoint. Each step seeds the RNGs from
(seed, step), so ``resume`` continues to the same result as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import protocol
from .cameras import Camera
from .errors import BadInputError, CancelledError, EngineError, NeedsChoiceError
from .guidance.schedules import Schedule, value_at
from .job import Job, atomic_save
from .novel_views import NovelViews, novel_resolution
from .transfer import to_device

CHECKPOINT_KEEP = 3


@dataclass
class OptimiseConfig:
    """All step-dependent settings of a run; saved in each checkpoint (resume checks it)."""

    quality: str = "standard"
    steps: int = 400
    seed: int = 0
    device: str = "cpu"
    # field
    log2_hashmap_size: int = 16
    n_levels: int = 12
    max_resolution: int = 512
    aabb_padding: float = 0.15
    distill_steps: int = 200
    lr_encoding: float = 1e-2
    lr_mlp: float = 2e-3
    # rendering
    n_samples: int = 64
    ref_resolution: int = 256  # long side of the reference image
    ref_rays: int = 2048  # reference pixels per step
    novel_resolution: Any = 40  # square novel views; a schedule allowed
    novel_views: int = 1
    elevation_range: tuple[float, float] = (-10.0, 30.0)
    front_bias: Any = ((0, 0.6), (0.5, 0.1))  # probability of a near-front view, fraction of steps
    # losses (weights may be schedules over the fraction of steps done)
    w_rgb: Any = 1.0
    w_mask: Any = 0.5
    w_depth_corr: Any = 0.05
    w_uv_prior: Any = ((0, 1.0), (0.7, 0.2))
    w_body_prior: Any = ((0, 0.05), (0.5, 0.02))
    garment_proxy: bool = True  # the body prior grows where the person's silhouette is wider than the body's (priors.py)
    w_sds: Any = 0.0
    depth_switch_step: float = 0.5  # full: ControlNet depth from the body until this fraction, then the field's
    guidance_scale: float = 50.0
    sds_resolution: int = 512
    # SDS timestep range as fractions of the 1000 diffusion steps, over the fraction of the run:
    # large t (shape) early, the upper end annealed to mid-range t (detail) by half-way (threestudio)
    sds_min_step: Any = 0.02
    sds_max_step: Any = ((0, 0.98), (0.5, 0.5))
    sds_grad_clip: Any = ((0, 0.5), (1.0, 2.0))  # elementwise clamp of the latent gradient; None: off
    # CUDA speed knobs, each off until a GPU benchmark shows it pays (`profile_step --set KEY=VALUE`)
    tf32: bool = False  # TF32 tensor cores for the field's fp32 matmuls
    grid_blend: str = "matmul"  # the hash grid's corner blend on CUDA: "matmul" or "sum" (HashGridConfig.blend)
    channels_last: bool = False  # NHWC UNet, ControlNet and VAE (SDSConfig.channels_last)
    # the SDS's ControlNet + UNet pass replayed as one CUDA graph (guidance/cuda_graph.py): on an
    # H100 the SDS step went 78 -> 43 ms and a whole `full` run's loop 137 -> 87 ms a median step, with
    # the same gradient to the bit (docs/BENCHMARKS.md, 2026-11-27); the CPU ignores it
    cuda_graphs: bool = True
    # the most GPU memory (GiB) PyTorch's allocator may hold in this run: it frees its cache
    # before going past it, and a step that still does not fit runs on fewer rays (None: the whole
    # card). To leave room for Blender's viewport on the same card, or to check a smaller card's fit
    gpu_memory_gib: float | None = None
    # metres the photo's person mask is grown by before the space outside it is kept empty
    # (priors.SilhouetteCone; 0: off): floaters there cost samples every step and cannot be right
    carve_margin: float = 0.04
    # the garment prior measures the photo's silhouette per body part, cut where a forearm or hand
    # meets the torso (priors.silhouette_excess arm_mask): a sleeve against a jacket is not a thick
    # chest (from the elbows only: the shoulders' joined runs give long hair its volume)
    arm_cut: bool = True
    # the garment proxy's outward offset as a multiple of the silhouette excess: the excess drops
    # a 2 cm dead zone (priors.DEAD_ZONE_M, the fit's error) from every thickness, so it under-
    # states garments. Standard on the 4 garment photos, Chamfer (cm): 0.7x worse on all, 1.0x
    # 2.65 / 2.71 / 3.01 / 3.87 (skirt, jacket, hair, hat), 1.3x 2.28 / 2.63 / 2.84 / 3.86, 1.6x
    # 2.10 / 2.65 / 2.76 / 3.97 (docs/BENCHMARKS.md)
    garment_depth: float = 1.3
    # streaming and checkpoints
    mesh_every: int = 50
    mesh_resolution: int = 72
    checkpoint_every: int = 100

    @staticmethod
    def for_quality(quality: str, device: str, steps: int | None = None, seed: int = 0) -> "OptimiseConfig":
        gpu = device == "cuda"
        if quality == "standard":
            cfg = OptimiseConfig(quality=quality, device=device, seed=seed)
            if gpu:
                cfg = dataclasses.replace(cfg, steps=1500, log2_hashmap_size=19, n_levels=16, max_resolution=2048,
                                          n_samples=128, ref_resolution=512, ref_rays=8192,
                                          novel_resolution=((0, 64), (0.5, 128)), novel_views=2, distill_steps=500,
                                          mesh_every=100, mesh_resolution=128, checkpoint_every=250)
        elif quality == "full":
            cfg = OptimiseConfig(
                quality=quality, device=device, seed=seed, steps=2500 if gpu else 300,
                log2_hashmap_size=19 if gpu else 16, n_levels=16 if gpu else 12, max_resolution=2048 if gpu else 512,
                n_samples=128 if gpu else 64, ref_resolution=512 if gpu else 256, ref_rays=8192 if gpu else 2048,
                novel_resolution=((0, 64), (0.4, 128)) if gpu else 40, novel_views=1, distill_steps=500 if gpu else 200,
                # threestudio's balance for SDS (loss summed over latents) against mean-reduced image losses
                w_rgb=1000.0, w_mask=100.0, w_depth_corr=5.0, w_uv_prior=((0, 500.0), (0.6, 20.0)),
                w_body_prior=((0, 5.0), (0.4, 0.0)), w_sds=1.0,
                mesh_every=100 if gpu else 25, mesh_resolution=128 if gpu else 64, checkpoint_every=250 if gpu else 50)
        else:
            raise ValueError(f"no optimisation for quality {quality!r}")
        if steps is not None:
            cfg.steps = int(steps)
        return cfg

    def at(self, value: Any, step: int) -> float:
        """A setting at ``step``: plain numbers, or (fraction-of-steps, value) points."""
        if isinstance(value, (int, float)):
            return float(value)
        points = [(float(f) * self.steps, float(v)) for f, v in value]
        return value_at(Schedule(points), step)

    def in_steps(self, value: Any) -> Any:
        """A setting as the guidance takes it: numbers (and None) as they are, (fraction-of-steps,
        value) points as a Schedule over step indices."""
        if value is None or isinstance(value, (int, float)):
            return value
        return Schedule([(float(f) * self.steps, float(v)) for f, v in value])

    def fingerprint(self) -> str:
        """What must match for a checkpoint to be resumed (not the step count: more steps may be asked)."""
        d = dataclasses.asdict(self)
        # how long, how the same SDS pass is launched and how much memory it may take: none
        # changes what a step computes
        for key in ("steps", "mesh_every", "checkpoint_every", "cuda_graphs", "gpu_memory_gib"):
            d.pop(key)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for key in LATER_SETTINGS:  # at their defaults, older checkpoints still resume
            if d.get(key) == defaults[key]:
                d.pop(key)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


# settings added after checkpoints were first written (session 6); left out of the fingerprint
# while at their OptimiseConfig defaults
LATER_SETTINGS = ("tf32", "grid_blend", "channels_last", "carve_margin", "sds_min_step",
                  "sds_max_step", "sds_grad_clip", "arm_cut", "garment_depth")


# -- checkpoints ----------------------------------------------------------------------------
def checkpoint_paths(job: Job) -> list[Path]:
    return sorted(job.layout.checkpoints.glob("step_*.pt"))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint is our own file, still read with weights_only=True (plain tensors and numbers)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def latest_checkpoint(job: Job, *, on_bad=None) -> dict[str, Any] | None:
    """The newest checkpoint that loads; a corrupt or half-written one is skipped (and reported)."""
    for path in reversed(checkpoint_paths(job)):
        try:
            ckpt = load_checkpoint(path)
            if "field" not in ckpt or "step" not in ckpt:
                raise ValueError("missing keys")
            ckpt["path"] = str(path)
            return ckpt
        except Exception as exc:  # noqa: BLE001 - any failure to read means: use the previous one
            if on_bad is not None:
                on_bad(path, exc)
    return None


def checkpoint_occupancy(ckpt: dict[str, Any]) -> torch.Tensor | None:
    """The cells the run's renderer sampled, (R, R, R) bool, from either path's grid (the CPU
    grid's mask or nerfacc's binaries); None in a checkpoint without one."""
    if "cpu_grid" in ckpt:
        return ckpt["cpu_grid"]
    binaries = (ckpt.get("cuda_grid") or {}).get("binaries")
    return None if binaries is None else binaries[0]


def clear_run(job: Job) -> None:
    """A fresh optimisation: drop the checkpoints and previews of an earlier run."""
    for path in checkpoint_paths(job) + sorted(job.layout.meshes.glob("step_*.npz")):
        path.unlink(missing_ok=True)


def save_checkpoint(job: Job, state: dict[str, Any]) -> Path:
    path = job.layout.checkpoints / f"step_{int(state['step']):06d}.pt"
    atomic_save(path, lambda tmp: torch.save(state, tmp))
    for old in checkpoint_paths(job)[:-CHECKPOINT_KEEP]:
        old.unlink(missing_ok=True)
    return path


# -- the problem: everything the loop needs, built once ---------------------------------------
@dataclass
class Problem:
    config: OptimiseConfig
    device: torch.device
    body_vertices: torch.Tensor  # (V,3) posed body, world
    body_faces: torch.Tensor  # (F,3)
    corner_uv: torch.Tensor  # (F,3,2)
    uv_texture: torch.Tensor  # (S,S,4): rgb + known flag in [0,1]
    ref_camera: Camera
    ref_rgb: torch.Tensor  # (H,W,3) in [0,1]
    ref_mask: torch.Tensor  # (H,W) in [0,1]
    ref_body_depth: torch.Tensor  # (H,W) +inf off the body
    target: np.ndarray  # orbit centre
    radius: float
    frame_offset: np.ndarray  # world -> the posed avatar frame Blender shows (bundle meta)
    focal_ratio: float  # focal / image side for novel views
    silhouette_excess: np.ndarray | None = None  # (H,W) metres the person is thicker than the body (ref view)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def excess_t(self) -> torch.Tensor | None:
        if self.silhouette_excess is None:
            return None
        if "excess_t" not in self.extra:
            self.extra["excess_t"] = torch.from_numpy(self.silhouette_excess).to(self.device)
        return self.extra["excess_t"]


def build_problem(job: Job, settings, config: OptimiseConfig) -> tuple[Problem, Any, Any]:
    """-> (problem, body, params)."""
    from .avatar import body_frame_offset
    from .finalise import fitted_params
    from .fit import BodyFit
    from .imageio import load_photo
    from .perception import Perception
    from .pipeline import load_job_body
    from .texture import EMPTY, SMOOTHED, bake_photo_texture

    device = torch.device(config.device)
    fit = BodyFit.load(job.layout.fit_json)
    body = load_job_body(job, settings)
    params = fitted_params(job, body, fit)
    with torch.no_grad():
        out = body.forward(params)
    posed = out.vertices[0].float()
    photo = load_photo(job.root / settings.photo)
    perception = Perception.load(job.layout.perception)
    work_cam = fit.camera.scaled(photo.scale)
    mask = perception.mask if perception.mask.shape[:2] == photo.rgb.shape[:2] else None
    tex = bake_photo_texture(photo.rgb, work_cam, posed, body, mask=mask, size=512)
    known = ((tex.source != EMPTY) & (tex.source != SMOOTHED)).astype(np.float32)
    uv_texture = torch.cat([torch.from_numpy(tex.image).float() / 255, torch.from_numpy(known)[..., None]], -1)

    faces = torch.as_tensor(body.faces, dtype=torch.long)
    ref_cam, ref_rgb, ref_mask, ref_depth, ref_faces = reference_view(photo.rgb, perception.mask, work_cam, posed,
                                                                      faces, config.ref_resolution)
    arms = reference_arm_pixels(ref_faces, body, out) if config.arm_cut else None
    excess = reference_excess(ref_mask, ref_depth, ref_cam, radius_guess(fit, posed), arms) \
        if config.garment_proxy else None

    lo, hi = posed.min(0).values.numpy(), posed.max(0).values.numpy()
    target = (lo + hi) / 2
    radius = float(np.linalg.norm(fit.camera.center - target))
    radius = float(np.clip(radius, 1.5, 8.0))
    problem = Problem(
        config=config, device=device, body_vertices=posed.to(device), body_faces=faces.to(device),
        corner_uv=torch.as_tensor(body.corner_uv, dtype=torch.float32, device=device),
        uv_texture=uv_texture.to(device), ref_camera=ref_cam, ref_rgb=ref_rgb.to(device),
        ref_mask=ref_mask.clamp(0, 1).to(device), ref_body_depth=ref_depth.to(device), target=target, radius=radius,
        frame_offset=body_frame_offset(body, params), focal_ratio=float(fit.camera.K[0, 0] / max(fit.camera.width, fit.camera.height)),
        silhouette_excess=excess,
    )
    return problem, body, params


def reference_view(photo_rgb: np.ndarray, mask: np.ndarray | None, work_cam: Camera, posed: torch.Tensor,
                   faces: torch.Tensor, resolution: int
                   ) -> tuple[Camera, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The photo at a working resolution (long side ``resolution``): (camera, rgb (H,W,3),
    person mask (H,W), the fitted body's depth (H,W), +inf off it, its face ids (H,W), -1 off it)."""
    from .render.raster import rasterize

    scale = resolution / max(photo_rgb.shape[:2])
    ref_cam = work_cam.scaled(scale)
    H, W = ref_cam.height, ref_cam.width
    rgb = torch.from_numpy(np.array(photo_rgb)).permute(2, 0, 1)[None].float() / 255
    ref_rgb = F.interpolate(rgb, size=(H, W), mode="area")[0].permute(1, 2, 0)
    pmask = mask if mask is not None else np.ones(photo_rgb.shape[:2], np.float32)
    ref_mask = F.interpolate(torch.from_numpy(np.asarray(pmask, np.float32))[None, None], size=(H, W), mode="area")[0, 0]
    K, w2c = ref_cam.torch(torch.float32)
    v_cam = posed @ w2c[:3, :3].T + w2c[:3, 3]
    raster = rasterize(v_cam, faces, K, W, H)
    return ref_cam, ref_rgb, ref_mask, raster.depth, raster.face_id


def reference_arm_pixels(face_id: torch.Tensor, body, out) -> np.ndarray:
    """The reference view's body pixels that are arms (body.base.arm_vertices). -> (H,W) bool."""
    from .body.base import arm_vertices

    arms = arm_vertices(body.bone_parents, out.bone_posed[0, :, :3, 3].detach().cpu().numpy(),
                        out.keypoints[0].detach().cpu().numpy(), body.skin_indices.cpu().numpy(),
                        body.skin_weights.cpu().numpy())
    fid = face_id.cpu().numpy()
    hit = fid >= 0
    pixels = np.zeros(fid.shape, bool)
    pixels[hit] = arms[np.asarray(body.faces)[fid[hit], 0]]
    return pixels


def reference_excess(ref_mask: torch.Tensor, ref_depth: torch.Tensor, ref_cam: Camera, fallback_depth: float,
                     arm_pixels: np.ndarray | None = None) -> np.ndarray:
    """Metres the person is thicker than the fitted body along each reference pixel (priors.py);
    ``arm_pixels`` (reference_arm_pixels): measured per body part."""
    from .priors import silhouette_excess

    body_px = torch.isfinite(ref_depth)
    z = float(ref_depth[body_px].median()) if bool(body_px.any()) else fallback_depth
    return silhouette_excess(ref_mask.numpy() > 0.5, body_px.numpy(), z / float(ref_cam.K[0, 0]), arm_mask=arm_pixels)


def level_set_points(sdf) -> np.ndarray | None:
    """Points on an SDF grid's zero level set (marching-cubes vertices), None when it has none."""
    from .extract import marching_cubes

    mesh = marching_cubes(-sdf.values.cpu().numpy(), 0.0, sdf.origin.cpu().numpy(), sdf.spacing)
    return mesh.vertices.astype(np.float64) if mesh.num_vertices else None


def radius_guess(fit, posed: torch.Tensor) -> float:
    """Distance from the fit's camera to the body's centre (metres)."""
    return float(np.linalg.norm(fit.camera.center - posed.mean(0).numpy()))


# -- losses (pure functions) -------------------------------------------------------------------
def pearson_depth_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """1 - Pearson correlation of two depth samples (scale- and shift-free, as monocular depth is),
    over the ``valid`` ones (all by default); 0 with fewer than 8. Masked by weights, not by
    indexing: on a GPU, picking the valid samples out would make the host wait for the device."""
    w = torch.ones_like(pred, dtype=torch.bool) if valid is None else valid
    n = w.sum()
    wf = w.to(pred.dtype)
    pred = torch.where(w, pred, torch.zeros_like(pred))
    target = torch.where(w, target, torch.zeros_like(target))
    p = (pred - pred.sum() / n.clamp_min(1)) * wf
    t = (target - target.sum() / n.clamp_min(1)) * wf
    corr = (p * t).sum() / (p.norm() * t.norm()).clamp_min(1e-8)
    return torch.where(n >= 8, 1 - corr, pred.sum() * 0)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean squared error over the ``mask``ed pixels (0 where there are none) and their count.
    (...,C), (...,C), (...) bool -> (scalar, scalar). No host wait on a GPU, as above."""
    count = mask.sum()
    sq = (pred - target) ** 2 * mask[..., None].to(pred.dtype)
    return sq.sum() / (count * pred.shape[-1]).clamp_min(1), count


def person_pixels(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices of the person mask dilated by 3 px (where half the reference rays go). (H,W) -> (K,) long."""
    dil = F.max_pool2d(mask[None, None], 7, stride=1, padding=3)[0, 0].reshape(-1) > 0.05
    return torch.nonzero(dil).squeeze(1)


def sample_reference_pixels(mask: torch.Tensor, n: int, generator: torch.Generator,
                            inside: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel indices: half inside the (dilated) person mask, half anywhere. (H,W) -> (n,) long.

    ``inside``: ``person_pixels(mask)`` when the caller has it (the loop computes it once: the
    mask is constant, and on a GPU ``nonzero`` waits for the device every step)."""
    H, W = mask.shape
    if inside is None:
        inside = person_pixels(mask)
    n_in = n // 2 if len(inside) else 0
    # draws on the (CPU) generator whatever the mask's device: the same pixels on every device
    pick_in = inside[to_device(torch.randint(len(inside), (n_in,), generator=generator), inside.device)] if n_in \
        else inside[:0]
    pick_any = to_device(torch.randint(H * W, (n - n_in,), generator=generator), inside.device)
    return torch.cat([pick_in, pick_any])


# -- the loop ------------------------------------------------------------------------------------
class Optimiser:
    def __init__(self, job: Job, problem: Problem, guidance=None, prompts=None) -> None:
        from .field.body_prior import BodyPrior, BodyPriorConfig
        from .field.encoding import HashGridConfig
        from .field.nerf import NeRFField, NeRFFieldConfig
        from .field.body_prior import body_aabb
        from .render.volume import VolumeRenderer, VolumeRendererConfig

        self.job = job
        self.problem = problem
        c = self.config = problem.config
        dev = problem.device
        body_np = problem.body_vertices.cpu().numpy()
        excess = problem.silhouette_excess
        grow = float(excess.max()) * c.garment_depth if excess is not None and excess.size else 0.0
        self.aabb = body_aabb(body_np, c.aabb_padding + grow).to(dev)
        enc = HashGridConfig(n_levels=c.n_levels, log2_hashmap_size=c.log2_hashmap_size, max_resolution=c.max_resolution,
                             blend=c.grid_blend)
        if dev.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = c.tf32
        torch.manual_seed(c.seed)
        self.field = NeRFField(self.aabb, NeRFFieldConfig(encoding=enc), device=dev)
        self.prior = BodyPrior.from_mesh(body_np, problem.body_faces.cpu().numpy(),
                                         BodyPriorConfig(grid_resolution=96 if dev.type == "cpu" else 128,
                                                         padding=0.1 + grow))
        if grow > 0:
            from .priors import garment_proxy_sdf

            self.prior = BodyPrior(garment_proxy_sdf(self.prior.sdf, problem.ref_camera, excess * c.garment_depth),
                                   self.prior.config)
        self.prior_is_proxy = grow > 0
        self.prior = self.prior.to(dev)
        allowed = None
        if c.carve_margin > 0:
            from .priors import SilhouetteCone

            allowed = SilhouetteCone.for_reference(problem.ref_camera, problem.ref_mask, problem.ref_body_depth,
                                                   c.carve_margin, dev)
        self.renderer = VolumeRenderer(self.aabb, VolumeRendererConfig(n_samples=c.n_samples), on_message=job.info,
                                       allowed=allowed)
        self.optimizer = torch.optim.Adam([
            {"params": self.field.encoding.parameters(), "lr": c.lr_encoding},
            {"params": list(self.field.density_mlp.parameters()) + list(self.field.color_mlp.parameters()), "lr": c.lr_mlp},
        ], betas=(0.9, 0.99), eps=1e-15)
        self.guidance = guidance
        self.prompts = prompts
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.oom_downscale = 1.0
        self.samples_per_ray = 0.0
        self.occupied_share = 1.0  # of the box's cells, in the renderer's grid
        self.views = NovelViews(problem, lambda step: novel_resolution(c, step, self.oom_downscale))

    def close(self) -> None:
        """Stops the thread that makes the next step's views (a GPU run's)."""
        self.views.close()

    # state ------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        grid = self.renderer.cpu_grid
        state = {"step": self.step, "field": self.field.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "config": json.dumps(dataclasses.asdict(self.config), default=str),
                 "fingerprint": self.config.fingerprint(), "aabb": self.aabb.cpu(),
                 "history": json.dumps(self.history[-2000:])}
        if grid is not None:  # the skipping grid's whole state, so a resume marches identically
            state["cpu_grid"] = grid.mask.cpu()
            if grid.values is not None:
                state["cpu_grid_values"] = grid.values.cpu()
        if self.renderer.grid is not None:
            state["cuda_grid"] = {k: v.cpu() for k, v in self.renderer.grid.estimator.state_dict().items()}
        return state

    def restore(self, ckpt: dict[str, Any]) -> None:
        if ckpt.get("fingerprint") != self.config.fingerprint():
            raise BadInputError("the checkpoint was made with other settings (quality, device or model size)",
                                "resume with the same --quality and --device, or start the optimisation again")
        self.field.load_state_dict(ckpt["field"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step = int(ckpt["step"])
        self.history = json.loads(ckpt.get("history", "[]"))
        grid = self.renderer.cpu_grid
        if grid is not None:
            if "cpu_grid" in ckpt:
                grid.mask = ckpt["cpu_grid"].to(self.problem.device)
                values = ckpt.get("cpu_grid_values")
                grid.values = None if values is None else values.to(self.problem.device)
            else:
                self.renderer.fill(self.field)
        if "cuda_grid" in ckpt and self.renderer.grid is not None:
            self.renderer.grid.estimator.load_state_dict({k: v.to(self.problem.device) for k, v in ckpt["cuda_grid"].items()})

    def initialise(self) -> None:
        """Distil the posed body's density into the field, so optimisation starts from the body."""
        from .field.body_prior import DistillConfig, distill_body_prior, sample_surface

        rng = np.random.default_rng(self.config.seed)
        surface = sample_surface(self.problem.body_vertices.cpu().numpy().astype(np.float64),
                                 self.problem.body_faces.cpu().numpy(), 50_000, rng)
        proxy = level_set_points(self.prior.sdf) if self.prior_is_proxy else None
        if proxy is not None:  # the garment proxy's surface, where its level set is decided
            surface = np.concatenate([surface, proxy[rng.choice(len(proxy), 50_000)]])
        report = distill_body_prior(self.field, self.prior, torch.from_numpy(surface).float(),
                                    DistillConfig(steps=self.config.distill_steps, seed=self.config.seed,
                                                  batch_size=1 << 13 if self.problem.device.type == "cpu" else 1 << 16),
                                    should_stop=lambda: self.job.cancel_requested)
        if report.stopped:
            raise CancelledError("cancelled while initialising the field from the body (before any checkpoint)",
                                 "start the optimisation again")
        if not math.isfinite(report.final_loss) or not all(bool(p.isfinite().all()) for p in self.field.parameters()):
            raise EngineError(f"initialising the field from the body failed (loss {report.final_loss}, "
                              f"{report.skipped} of {report.steps} steps not finite)",
                              "start the optimisation again with another --seed")
        self.renderer.fill(self.field)
        skipped = f"; {report.skipped} steps left out: loss not finite" if report.skipped else ""
        self.job.info(f"Field initialised from the body in {report.seconds:.1f} s (loss {report.final_loss:.3f}{skipped})")

    # one step ----------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        from .field.body_prior import prior_loss
        from .render.volume import RayBundle, background_color

        p, c, step = self.problem, self.config, self.step
        seed = (c.seed * 1_000_003 + step) % (2 ** 63)
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        dev = p.device
        self.renderer.update(self.field, step)
        if step % 16 == 0:  # a read-back (a device wait on a GPU), so not every step
            occupied = self.renderer.occupied
            self.occupied_share = 1.0 if occupied is None else float(occupied.float().mean())
        losses: dict[str, torch.Tensor] = {}

        # reference view: random pixels of the photo
        cam = p.ref_camera
        K, w2c = cam.torch(torch.float32, dev)
        rays_all, inside = self._reference_rays()
        n_rays = max(256, int(c.ref_rays * self.oom_downscale))
        idx = to_device(sample_reference_pixels(p.ref_mask, n_rays, gen, inside), dev)
        out = self.renderer.render(self.field, rays_all[idx], jitter=True, generator=gen)
        samples, rays = out.n_samples, len(idx)
        mask_t = p.ref_mask.reshape(-1)[idx][:, None]
        rgb_t = p.ref_rgb.reshape(-1, 3)[idx]
        # compare premultiplied colours: outside the person both colour and opacity go to zero
        losses["rgb"] = F.mse_loss(out.rgb, rgb_t * mask_t)
        losses["mask"] = F.mse_loss(out.opacity, mask_t)
        bd = p.ref_body_depth.reshape(-1)[idx]
        valid = torch.isfinite(bd) & (mask_t[:, 0] > 0.5) & (out.opacity[:, 0] > 0.5)
        if p.excess_t is not None:  # where a garment covers the body, the body's depth is not the surface's
            valid &= p.excess_t.reshape(-1)[idx] <= 0
        ray_z = (rays_all.directions[idx] @ w2c[2, :3])  # depth along the optical axis per unit ray length
        losses["depth_corr"] = pearson_depth_loss(out.depth[:, 0] * ray_z, bd, valid)

        # novel views: the UV-guided texture prior, and SDS in full quality
        res = novel_resolution(c, step, self.oom_downscale)
        uv_terms, uv_counts, sds_terms = [], [], []
        for view in self.views.get(step, res):
            ncam, prior = view.camera, view.prior
            nK, nw2c = ncam.torch(torch.float32, dev)
            bg = background_color("random", res * res, device=dev, generator=gen)
            nout = self.renderer.render(self.field, RayBundle.from_camera(nK, nw2c, res, res), jitter=True,
                                        background=bg, generator=gen).image(res, res)
            samples, rays = samples + nout.n_samples, rays + res * res
            term, count = masked_mse(nout.rgb, prior["rgb"], prior["known"])
            uv_terms.append(term)
            uv_counts.append(count)
            if self.guidance is not None and c.at(c.w_sds, step) > 0:
                sds_terms.append(self._sds(nout, prior, ncam, view.azimuth, view.elevation, step, gen))
        zero = torch.zeros((), device=dev)
        # the mean over the views that show known texels (no host wait to find out which)
        if uv_terms:
            seen = (torch.stack(uv_counts) > 0).float()
            losses["uv_prior"] = (torch.stack(uv_terms) * seen).sum() / seen.sum().clamp_min(1)
        else:
            losses["uv_prior"] = zero
        if sds_terms:
            losses["sds"] = torch.stack(sds_terms).mean()
        # fading body prior at fresh points in the box
        pts = self.aabb[0] + to_device(torch.rand(4096, 3, generator=gen), dev) * (self.aabb[1] - self.aabb[0])
        if c.at(c.w_body_prior, step) > 0:  # `full` lets go of the body at 40 %: no field pass for nothing
            losses["body_prior"] = prior_loss(self.field, self.prior, pts)

        weights = {"rgb": c.w_rgb, "mask": c.w_mask, "depth_corr": c.w_depth_corr, "uv_prior": c.w_uv_prior,
                   "body_prior": c.w_body_prior, "sds": c.w_sds}
        total = sum(c.at(weights[k], step) * v for k, v in losses.items())
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        self.step += 1
        # one read-back for all the numbers (each float() of a CUDA tensor waits for the device)
        names = list(losses) + ["total"]
        values = torch.stack([v.detach().float() for v in losses.values()] + [total.detach().float()]).tolist()
        record = dict(zip(names, values))
        self.history.append(record)
        self.samples_per_ray = samples / max(rays, 1)  # grows with floaters: the step's cost follows it
        return record

    def _reference_rays(self):
        """The reference view's rays (all pixels) and its person pixels, built once: both are
        constant over the run. -> (RayBundle, (K,) long on the CPU)."""
        from .render.volume import RayBundle

        if "ref_rays" not in self.problem.extra:
            p = self.problem
            K, w2c = p.ref_camera.torch(torch.float32, p.device)
            p.extra["ref_rays"] = RayBundle.from_camera(K, w2c, p.ref_camera.width, p.ref_camera.height)
            p.extra["person_pixels"] = person_pixels(p.ref_mask.cpu())
        return self.problem.extra["ref_rays"], self.problem.extra["person_pixels"]

    def _sds(self, nout, prior, ncam, azimuth, elevation, step, gen) -> torch.Tensor:
        from .guidance.sds import normalise_depth

        c = self.config
        rgb = nout.rgb.permute(2, 0, 1)[None]
        if step < c.depth_switch_step * c.steps:
            depth = prior["depth"]
            mask = prior["mask"]
        else:
            depth = torch.where(nout.opacity[..., 0] > 0.5, nout.depth[..., 0], torch.full_like(nout.depth[..., 0], float("inf")))
            mask = nout.opacity[..., 0] > 0.5
        depth_cond = normalise_depth(depth.detach()[None, None], mask[None, None])
        emb = self.prompts([azimuth], [elevation])
        out = self.guidance(rgb, depth_cond, emb, step, generator=gen)
        fallback = getattr(self.guidance, "graph_fallback", "")
        if fallback and not self.problem.extra.get("told_graph_fallback"):
            self.problem.extra["told_graph_fallback"] = True
            self.job.info(fallback, "warning")
        self.last_depth_source = "body" if step < c.depth_switch_step * c.steps else "field"
        return out["loss"]

    # streaming ---------------------------------------------------------------------------
    def stream_mesh(self) -> Path | None:
        """A preview mesh for Blender, made as the finalise makes its surface (field united with
        the body, field_avatar.surface_from_density) so the preview shows what the result will be."""
        from .extract import vertex_colors, write_preview_mesh
        from .field_avatar import density_grid, surface_from_density

        axes, density = density_grid(self.field, self.config.mesh_resolution, self.renderer.occupied)
        mesh = surface_from_density(density, self.field.config.surface_density, axes, self._preview_union(axes))
        if mesh.num_vertices == 0:
            return None
        mesh.colors = vertex_colors(self.field, mesh.vertices, device=self.aabb.device)
        path = self.job.layout.meshes / protocol.mesh_name(self.step)
        write_preview_mesh(path, mesh.vertices + self.problem.frame_offset, mesh.faces, mesh.colors)
        self.job.emit("mesh", step=self.step, path=self.job.rel(path), vertices=int(mesh.num_vertices))
        return path

    def _preview_union(self, axes: list):
        """The body's side of the preview's union, built on the first preview (the body, the
        grid and the photo's silhouette do not change during a run); None when switched off."""
        from .field_avatar import BodyUnion, FinaliseConfig, ReferenceSilhouette

        fc = self.problem.extra.get("finalise_config") or FinaliseConfig()
        if not fc.body_union:
            return None
        if "preview_union" not in self.problem.extra:
            p = self.problem
            silhouette = ReferenceSilhouette(p.ref_camera, p.ref_mask.detach().cpu().numpy(), p.silhouette_excess)
            p.extra["preview_union"] = BodyUnion.build(
                axes, p.body_vertices.detach().cpu().numpy().astype(np.float64), p.body_faces.cpu().numpy(), fc, silhouette)
        return self.problem.extra["preview_union"]

    def checkpoint(self) -> Path:
        path = save_checkpoint(self.job, self.state())
        self.job.emit("checkpoint", step=self.step, path=self.job.rel(path))
        return path


def sds_config(config: OptimiseConfig, seed: int):
    """The run's SDS settings (guidance scale, annealed timestep range, gradient clip, size, the
    CUDA knobs), schedules over the fraction of the run turned into schedules over steps."""
    from .guidance.sds import SDSConfig

    return SDSConfig(guidance_scale=config.guidance_scale, min_step_percent=config.in_steps(config.sds_min_step),
                     max_step_percent=config.in_steps(config.sds_max_step),
                     grad_clip=config.in_steps(config.sds_grad_clip), resolution=config.sds_resolution, seed=seed,
                     channels_last=config.channels_last, cuda_graphs=config.cuda_graphs)


def full_on_this_device(device: str, allow_slow: bool) -> NeedsChoiceError | None:
    """Why ``full`` should not start on ``device`` (the choices the user has), or None."""
    if device == "cuda" or allow_slow:
        return None
    return NeedsChoiceError(
        "quality 'full' runs Stable Diffusion at every step: about 45 s a step on this CPU, many hours a photo",
        "choose one: --quality standard (no diffusion, minutes on a CPU); run on a machine with a CUDA GPU; "
        "or add --allow-slow to run 'full' on the CPU anyway")


def start_guidance(job: Job, settings, device: str, config: OptimiseConfig | None = None):
    """Check that ``full`` can run and find its weights here (a missing weight or a CPU without
    --allow-slow fails before any work), then load them on a thread (background.py), which
    ``load_guidance`` waits for while it listens for a cancel. -> BackgroundCall of (guidance, prompts)."""
    from .background import BackgroundCall
    from .guidance.prompts import ViewPromptCache, build_prompt
    from .guidance.sds import DepthControlledSDS
    from .guidance.weights import find_guidance_weights, import_diffusion_libraries

    problem = full_on_this_device(device, bool(settings.extra.get("allow_slow_full")))
    if problem is not None:
        raise problem
    weights = find_guidance_weights(settings.sd_weights, settings.controlnet_weights)
    job.info(f"Guidance: {weights.description}")
    cfg = sds_config(config or OptimiseConfig.for_quality("full", device, settings.steps, settings.seed), settings.seed)

    def load() -> tuple[Any, Any]:
        # the parts' times go into the run's message (an H100, loading alone: imports 6.4 s,
        # weights to the GPU 4.8 s, prompts 1.1 s; 2026-11-27)
        started = time.perf_counter()
        import_diffusion_libraries()
        imported = time.perf_counter()
        guidance = DepthControlledSDS.from_weights(weights, device, cfg)
        if device == "cuda":
            torch.cuda.synchronize()
        loaded = time.perf_counter()
        prompts = ViewPromptCache(guidance.pipe.encode_text, build_prompt(settings.prompt))
        weights_part = "models kept from the last job" if guidance.reused_models else f"weights to {device}"
        guidance.load_parts = {"imports": imported - started, weights_part: loaded - imported,
                               "prompts": time.perf_counter() - loaded}
        return guidance, prompts

    return BackgroundCall(load, name="guidance-loader")


def cap_gpu_memory(gib: float, device: str) -> str:
    """Cap PyTorch's CUDA allocator for this process at ``gib`` GiB (before anything is loaded);
    says what it did, or "" on the CPU, where there is nothing to cap."""
    if not (isinstance(gib, (int, float)) and gib > 0):
        raise BadInputError(f"gpu_memory_gib={gib!r} is not a positive number of GiB", "e.g. --set gpu_memory_gib=11")
    if not device.startswith("cuda"):
        return ""
    dev = torch.device(device)
    index = dev.index if dev.index is not None else torch.cuda.current_device()  # torch wants an index
    total = torch.cuda.get_device_properties(index).total_memory
    fraction = min(1.0, gib * 2**30 / total)
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return f"GPU memory capped at {min(gib, total / 2**30):.1f} GiB of the card's {total / 2**30:.1f} GiB"


def load_guidance(job: Job, settings, device: str, config: OptimiseConfig | None = None) -> tuple[Any, Any]:
    """The diffusion models and prompts for ``full``, before anything else of the run is built, or
    the choice the user has (NeedsChoiceError). -> (guidance, prompts)

    Why not beside the problem build and the distillation, as from 2026-11-26: loading a model in
    fp16 switches torch's process-wide default dtype while the model is constructed (diffusers
    and transformers both do; a thread polling it saw float16), so tensors the main thread made
    meanwhile could come out fp16. accelerate's empty-weight loading patches nn.Module globally
    too. And the overlap did not pay: on an H100 the first step came as late as when the load ran
    first (23.4-25.6 s against 23.8 s; both threads are Python-bound), and one after the other
    the load and the distillation took 12.3 + 4.3 s against 19.0 and 9.5 s side by side. The load
    still runs on a thread, so a cancel is heard while it runs."""
    loading = start_guidance(job, settings, device, config)
    try:
        guidance, prompts = loading.result(should_stop=lambda: job.cancel_requested)
    except InterruptedError:
        raise CancelledError("cancelled while loading the diffusion models",
                             "start or resume the job again") from None
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in getattr(guidance, "load_parts", {}).items())
    job.info(f"Diffusion models loaded in {loading.seconds:.1f} s ({parts})")
    return guidance, prompts


def run_optimisation(job: Job, settings, *, resume: bool = False) -> None:
    from .field_avatar import finalise_config
    from .pipeline import resolve_device

    device = resolve_device(settings.device)
    config = OptimiseConfig.for_quality(settings.quality, device, settings.steps, settings.seed)
    overrides = settings.extra.get("optimise_overrides") or {}
    unknown = set(overrides) - {f.name for f in dataclasses.fields(OptimiseConfig)}
    if unknown:
        raise BadInputError(f"unknown optimisation settings: {', '.join(sorted(unknown))}",
                            "see OptimiseConfig in zeroavatar_blender/engine/optimise.py")
    config = dataclasses.replace(config, **overrides)
    if config.gpu_memory_gib is not None:
        message = cap_gpu_memory(config.gpu_memory_gib, device)
        if message:
            job.info(message)
    job.stage("optimise", f"Optimising the avatar ({settings.quality}, {config.steps} steps on {device})")
    guidance = None
    if settings.quality == "full":
        guidance = load_guidance(job, settings, device, config)
    problem, _, _ = build_problem(job, settings, config)
    problem.extra["finalise_config"] = finalise_config(settings)  # previews are made like the final surface
    opt = Optimiser(job, problem)
    try:
        ckpt = None if not resume else latest_checkpoint(job, on_bad=lambda p, e: job.info(f"Skipping unreadable checkpoint {p.name}: {e}", "warning"))
        if resume and ckpt is not None:
            opt.restore(ckpt)
            job.info(f"Resuming from step {opt.step} ({Path(ckpt['path']).name})")
        else:
            clear_run(job)
            opt.initialise()
            opt.stream_mesh()
        if guidance is not None:
            opt.guidance, opt.prompts = guidance
        started = time.time()
        first = opt.step
        while opt.step < config.steps:
            if job.cancel_requested:
                opt.checkpoint()
                raise CancelledError(f"cancelled at step {opt.step} of {config.steps}",
                                     "resume the job to continue from this checkpoint")
            try:
                record = opt.train_step()
            except torch.cuda.OutOfMemoryError:
                record = None  # leave the handler first: its traceback holds the step's tensors
            if record is None:
                opt.optimizer.zero_grad(set_to_none=True)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if opt.oom_downscale < 0.1:
                    raise EngineError("the GPU ran out of memory even at a sixteenth of the batch",
                                      "close other GPU programs or use --device cpu / --quality standard")
                opt.oom_downscale *= 0.5
                job.info(f"GPU out of memory: continuing with {opt.oom_downscale:.0%} of the rays and pixels", "warning")
                continue
            if not math.isfinite(record["total"]):
                raise EngineError(f"the optimisation diverged at step {opt.step} (loss {record['total']})",
                                  "resume from the last checkpoint, or try another --seed")
            job.progress("optimise", opt.step, config.steps, loss=record["total"], stage_started=started, done_before=first,
                         stats={"samples_per_ray": opt.samples_per_ray, "occupied": opt.occupied_share})
            if opt.step % config.mesh_every == 0 and opt.step < config.steps:
                opt.stream_mesh()
            if opt.step % config.checkpoint_every == 0 or opt.step == config.steps:
                opt.checkpoint()
        if not checkpoint_paths(job) or int(load_checkpoint(checkpoint_paths(job)[-1])["step"]) != opt.step:
            opt.checkpoint()
        opt.stream_mesh()
    finally:
        opt.close()
