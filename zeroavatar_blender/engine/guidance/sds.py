"""Score Distillation Sampling with a depth-conditioned ControlNet (DreamFusion + ControlNet).

For a rendered view x the SDS gradient on its latents z = E(x) is

    dL/dz = w(t) * (eps_hat(z_t; y, c, t) - eps),   z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps,
    eps_hat = eps_uncond + s * (eps_cond - eps_uncond)            (classifier-free guidance)

where y is the view's prompt, c the depth map (through the ControlNet, whose residuals feed the
UNet in both CFG halves), s the guidance scale (large, 50-100, as SDS needs) and w(t) = 1 - abar_t
("sds") or 1 ("uniform"). The UNet Jacobian is skipped, so the diffusion models run without
autograd; only the VAE encoder is differentiated, back into the NeRF's pixels. The loss
``0.5 * ||z - sg(z - grad)||^2 / B`` has exactly ``grad / B`` as its gradient (threestudio's form).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import BadInputError
from ..transfer import to_device
from .prompts import PromptEmbeddings
from .schedules import ScheduleLike, value_at
from .weights import GuidancePipeline, GuidanceWeights, default_dtype, load_guidance_pipeline

WEIGHTINGS = ("sds", "uniform")


@dataclass
class SDSConfig:
    guidance_scale: ScheduleLike = 100.0  # CFG scale s; SDS needs far more than sampling's 7.5
    min_step_percent: ScheduleLike = 0.02  # timestep range as fractions of T (1000), per step
    max_step_percent: ScheduleLike = 0.98  # e.g. Schedule([(0, 0.98), (5000, 0.5)]) anneals it
    weighting: str = "sds"  # "sds": w(t) = 1 - abar_t; "uniform": w(t) = 1
    grad_clip: ScheduleLike | None = None  # elementwise clamp of the latent gradient (None: off)
    controlnet_conditioning_scale: ScheduleLike = 1.0
    resolution: int = 512  # renders are resized to this square before the VAE (latents res / 8)
    latent_sample: str = "mean"  # "mean" of the VAE posterior (deterministic) or a "sample" from it
    half_precision: bool = True  # fp16 weights on CUDA; CPU always runs fp32
    attention_slicing: bool = False  # lower peak memory in attention, a little slower
    vae_slicing: bool = False  # encode the batch one image at a time
    channels_last: bool = False  # NHWC convolutions (often faster on tensor cores)
    cuda_graphs: bool = False  # CUDA: the ControlNet + UNet pass replayed as one graph (cuda_graph.py)
    seed: int = 0  # for the default generator (timesteps and noise)

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.latent_sample not in ("mean", "sample"):
            raise ValueError(f"latent_sample must be 'mean' or 'sample', got {self.latent_sample!r}")
        if self.resolution <= 0 or self.resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8, got {self.resolution}")


def normalise_depth(depth: torch.Tensor, mask: torch.Tensor | None = None, *, disparity: bool = True,
                    floor: float = 0.2) -> torch.Tensor:
    """Camera depth -> the control image depth ControlNets expect: near = 1 (bright), background = 0.

    The depth ControlNets were trained on MiDaS-style maps: relative inverse depth (disparity)
    scaled to [0, 1] per image. Per image, the foreground's disparity is mapped linearly onto
    [floor, 1] (nearest pixel 1, farthest ``floor``, so the body stays distinct from the black
    background) and the result is multiplied by the mask (a soft alpha keeps soft edges).

    depth: (B,1,H,W) z-depth or ray distance, > 0 on the subject. mask: (B,1,H,W) bool or alpha
    in [0, 1]; None means depth > 0 and finite. Returns (B,1,H,W) float32 in [0, 1], no gradient.
    """
    if depth.ndim != 4 or depth.shape[1] != 1:
        raise ValueError(f"depth must be (B,1,H,W), got {tuple(depth.shape)}")
    z = depth.detach().float()
    valid = torch.isfinite(z) & (z > 0)
    if mask is None:
        alpha = valid.float()
    else:
        if mask.shape != depth.shape:
            raise ValueError(f"mask must match depth {tuple(depth.shape)}, got {tuple(mask.shape)}")
        alpha = mask.detach().float().clamp(0, 1) * valid
    fg = alpha > 0.5
    value = torch.where(valid, 1.0 / z.clamp_min(1e-8) if disparity else -z, torch.zeros_like(z))
    inf = torch.full_like(value, float("inf"))
    has_fg = fg.flatten(1).any(dim=1).view(-1, 1, 1, 1)
    vmin = torch.where(fg, value, inf).amin(dim=(1, 2, 3), keepdim=True)
    vmax = torch.where(fg, value, -inf).amax(dim=(1, 2, 3), keepdim=True)
    vmin = torch.where(has_fg, vmin, torch.zeros_like(vmin))
    span = torch.where(has_fg, vmax - vmin, torch.ones_like(vmin))
    unit = ((value - vmin) / span.clamp_min(1e-8)).clamp(0, 1)
    unit = torch.where(span <= 1e-8, torch.ones_like(unit), unit)  # a flat subject is all "near"
    return torch.where(has_fg, (floor + (1 - floor) * unit) * alpha, torch.zeros_like(unit))

class DepthControlledSDS:
    """SDS guidance from a frozen SD1.x UNet steered by a depth ControlNet.

    Call it with a batch of rendered views, their depth control maps and view-dependent prompt
    embeddings; back-propagate the returned loss into the renderer.
    """

    def __init__(self, pipeline: GuidancePipeline, config: SDSConfig | None = None) -> None:
        self.pipe = pipeline
        self.config = config or SDSConfig()
        self.generator = torch.Generator("cpu").manual_seed(self.config.seed)
        cfg = self.config
        if cfg.attention_slicing:
            pipeline.unet.set_attention_slice("auto")
            pipeline.controlnet.set_attention_slice("auto")
        if cfg.vae_slicing:
            pipeline.vae.enable_slicing()
        if cfg.channels_last:
            for m in (pipeline.unet, pipeline.controlnet, pipeline.vae):
                m.to(memory_format=torch.channels_last)
        self.graphed = None  # the captured diffusion pass, on CUDA with cfg.cuda_graphs
        self.graph_fallback = ""  # why the pass runs eagerly after all (a failed capture)
        self.load_parts: dict[str, float] = {}  # seconds of each part of loading it (optimise.start_guidance)
        self.reused_models = False  # from_weights took the last job's models (pipeline_cache)
        if cfg.cuda_graphs and torch.device(pipeline.device).type == "cuda":
            from .cuda_graph import GraphedPass

            self.graphed = GraphedPass(self._diffusion_pass)

    @classmethod
    def from_weights(cls, weights: GuidanceWeights, device: str | torch.device = "cpu",
                     config: SDSConfig | None = None, *, allow_unsafe: bool = False) -> "DepthControlledSDS":
        """The SDS on these weights; the models of the process's last job when they match
        (pipeline_cache: a batch loads them once). ``reused_models`` says which."""
        from .pipeline_cache import kept_or_loaded, weights_key

        config = config or SDSConfig()
        dtype = default_dtype(device, config.half_precision)
        key = weights_key(weights, str(torch.device(device)), dtype, allow_unsafe, config.attention_slicing,
                          config.vae_slicing, config.channels_last)
        pipe, reused = kept_or_loaded(key, lambda: load_guidance_pipeline(weights, device, dtype,
                                                                          allow_unsafe=allow_unsafe))
        sds = cls(pipe, config)
        sds.reused_models = reused
        return sds

    # --- step-dependent settings ----------------------------------------------------------
    def timestep_range(self, step: int) -> tuple[int, int]:
        """Inclusive [min_t, max_t] at ``step`` (threestudio: int(fraction * T))."""
        T = self.pipe.num_train_timesteps
        lo = int(T * value_at(self.config.min_step_percent, step))
        hi = int(T * value_at(self.config.max_step_percent, step))
        lo, hi = max(lo, 0), min(hi, T - 1)
        if lo > hi:
            raise ValueError(f"empty timestep range [{lo}, {hi}] at step {step}: min_step_percent > max_step_percent")
        return lo, hi

    def sample_timesteps(self, step: int, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(batch,) integer timesteps drawn uniformly from ``timestep_range(step)``, on the CPU."""
        lo, hi = self.timestep_range(step)
        return torch.randint(lo, hi + 1, (batch,), generator=generator or self.generator)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) timesteps -> (B,) w(t), float32."""
        if self.config.weighting == "uniform":
            return torch.ones(t.shape, device=self.pipe.device)
        return 1.0 - self.pipe.alphas_cumprod[t]

    # --- pieces -------------------------------------------------------------------------------
    def encode_rgb(self, rgb: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B,3,H,W) in [0,1] -> (B,4,R/8,R/8) scaled latents, float32, differentiable."""
        res = self.config.resolution
        x = rgb.to(self.pipe.device)
        if x.shape[-2:] != (res, res):
            x = F.interpolate(x, (res, res), mode="bilinear", align_corners=False)
        x = (x * 2 - 1).to(self.pipe.dtype)
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        posterior = self.pipe.vae.encode(x).latent_dist
        if self.config.latent_sample == "mean":
            z = posterior.mean
        else:
            gen = generator or self.generator
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(posterior.mean)
        return z.float() * self.pipe.vae.config.scaling_factor

    def control_image(self, depth_cond: torch.Tensor) -> torch.Tensor:
        """(B,1,H,W) normalised depth -> (B,3,R,R) ControlNet input (grey image in [0,1])."""
        res = self.config.resolution
        c = depth_cond.detach().to(self.pipe.device, torch.float32)
        if c.shape[-2:] != (res, res):
            c = F.interpolate(c, (res, res), mode="bilinear", align_corners=False)
        return c.clamp(0, 1).expand(-1, 3, -1, -1).to(self.pipe.dtype)

    @torch.no_grad()
    def predict_noise(self, noisy: torch.Tensor, t: torch.Tensor, emb: PromptEmbeddings, control: torch.Tensor,
                      guidance_scale: float, conditioning_scale: float) -> torch.Tensor:
        """Guided noise prediction eps_hat (B,4,h,w) float32, the ControlNet feeding both CFG halves."""
        dtype = self.pipe.dtype
        x = torch.cat([noisy, noisy]).to(dtype)
        tt = torch.cat([t, t])
        text = torch.cat([emb.uncond, emb.cond]).to(self.pipe.device, dtype)
        ctrl = torch.cat([control, control])
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        eps = None
        if self.graphed is not None:
            try:
                eps = self.graphed(x, tt, text, ctrl, conditioning_scale).float()
            except RuntimeError as exc:  # capture refused: run eagerly from now on, and say why
                self.graphed = None
                self.graph_fallback = f"CUDA graph capture failed, running the diffusion pass eagerly: {exc}"[:400]
        if eps is None:
            eps = self._diffusion_pass(x, tt, text, ctrl, conditioning_scale).float()
        eps_uncond, eps_cond = eps.chunk(2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

    def _diffusion_pass(self, x: torch.Tensor, tt: torch.Tensor, text: torch.Tensor, ctrl: torch.Tensor,
                        conditioning_scale: float) -> torch.Tensor:
        """ControlNet, then the UNet with its residuals: (2B,4,h,w) noise predictions, pipe dtype."""
        down, mid = self.pipe.controlnet(x, tt, encoder_hidden_states=text, controlnet_cond=ctrl,
                                         conditioning_scale=conditioning_scale, return_dict=False)
        return self.pipe.unet(x, tt, encoder_hidden_states=text, down_block_additional_residuals=down,
                              mid_block_additional_residual=mid, return_dict=False)[0]

    def _embeddings(self, emb: PromptEmbeddings, batch: int) -> PromptEmbeddings:
        if emb.cond.shape[0] == batch:
            return emb
        if emb.cond.shape[0] == 1:
            return PromptEmbeddings(emb.cond.expand(batch, -1, -1), emb.uncond.expand(batch, -1, -1))
        raise BadInputError(f"text embeddings for {emb.cond.shape[0]} views given for a batch of {batch}",
                            "pass one embedding per view (ViewPromptCache(azimuths)) or a single one")

    # --- the loss -------------------------------------------------------------------------------
    def loss_from_latents(self, latents: torch.Tensor, control: torch.Tensor, text_embeddings: PromptEmbeddings,
                          step: int, *, generator: torch.Generator | None = None, t: torch.Tensor | None = None,
                          noise: torch.Tensor | None = None) -> dict[str, Any]:
        """SDS on given latents (B,4,h,w) with a (B,3,R,R) control image. ``t`` (B,) and ``noise``
        override the random draws (from ``generator``, else the module's seeded one)."""
        B = latents.shape[0]
        cfg = self.config
        device = self.pipe.device
        gen = generator or self.generator
        emb = self._embeddings(text_embeddings, B)
        if t is None:
            t = self.sample_timesteps(step, B, gen)
        t = to_device(torch.as_tensor(t, dtype=torch.long).reshape(B), device)
        if noise is None:
            noise = torch.randn(latents.shape, generator=gen)
        noise = to_device(noise, device, torch.float32)

        with torch.no_grad():
            abar = self.pipe.alphas_cumprod[t].view(B, 1, 1, 1)
            noisy = abar.sqrt() * latents.detach() + (1 - abar).sqrt() * noise
            eps_hat = self.predict_noise(noisy, t, emb, control, value_at(cfg.guidance_scale, step),
                                         value_at(cfg.controlnet_conditioning_scale, step))
            grad = self.weight(t).view(B, 1, 1, 1) * (eps_hat - noise)
            grad = torch.nan_to_num(grad)
            if cfg.grad_clip is not None:
                clip = value_at(cfg.grad_clip, step)
                grad = grad.clamp(-clip, clip)
            target = latents.detach().float() - grad
        loss = 0.5 * F.mse_loss(latents.float(), target, reduction="sum") / B
        return {"loss": loss, "grad_norm": grad.norm(), "t": t}

    def __call__(self, rgb: torch.Tensor, depth_cond: torch.Tensor, text_embeddings: PromptEmbeddings, step: int,
                 *, generator: torch.Generator | None = None, t: torch.Tensor | None = None,
                 noise: torch.Tensor | None = None) -> dict[str, Any]:
        """rgb (B,3,H,W) in [0,1] from the renderer (with grad); depth_cond (B,1,H',W') from
        ``normalise_depth``. Returns {"loss": scalar with grad into rgb, "grad_norm": ||grad||,
        "t": (B,) timesteps}. d loss / d latents = w(t) (eps_hat - eps) / B, clipped."""
        if rgb.ndim != 4 or rgb.shape[1] != 3:
            raise BadInputError(f"rgb must be (B,3,H,W), got {tuple(rgb.shape)}", "render RGB channels first")
        if depth_cond.ndim != 4 or depth_cond.shape[1] != 1 or depth_cond.shape[0] != rgb.shape[0]:
            raise BadInputError(f"depth_cond must be (B,1,H,W) with B={rgb.shape[0]}, got {tuple(depth_cond.shape)}",
                                "pass one normalised depth map per view (normalise_depth)")
        latents = self.encode_rgb(rgb, generator)
        return self.loss_from_latents(latents, self.control_image(depth_cond), text_embeddings, step,
                                      generator=generator, t=t, noise=noise)
