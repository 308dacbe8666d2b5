"""Speed of depth-controlled SDS at full SD1.5 size on a GPU: `python -m tests.benchmarks.bench_sds_gpu`.

Builds SD1.5's UNet, the control_v11f1p_sd15_depth ControlNet, the SD VAE and CLIP ViT-L/14's
text encoder from the configs written below, with random weights (nothing is downloaded; the
speed of a step does not depend on the weights' values), in fp16 on CUDA, and times
``DepthControlledSDS`` at 512 px (64x64 latents): VAE encode, ControlNet + UNet on the CFG batch,
backward through the VAE encoder into the pixels, exactly what the optimiser runs per step.

Prints, per batch size: SDS steps/s, a per-part breakdown, peak GPU memory, and the SDS share of
a default `full` run (``--full-steps`` SDS iterations). The last line is the same as JSON.
Needs CUDA: without it, says so and exits with status 2 (``--allow-cpu`` runs it anyway, slowly,
to check the script, e.g. ``--allow-cpu --resolution 64 --steps 1 --warmup 0``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

# --- full-size architectures (diffusers / transformers configs) --------------------------------
SD15_UNET = dict(  # stable-diffusion-v1-5/stable-diffusion-v1-5 unet/config.json
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
SD15_CONTROLNET_DEPTH = dict(  # lllyasviel/control_v11f1p_sd15_depth config.json
    in_channels=4, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    only_cross_attention=False, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, downsample_padding=1,
    mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768,
    attention_head_dim=8, use_linear_projection=False, class_embed_type=None, num_class_embeds=None,
    upcast_attention=False, resnet_time_scale_shift="default", projection_class_embeddings_input_dim=None,
    controlnet_conditioning_channel_order="rgb", conditioning_embedding_out_channels=[16, 32, 96, 256],
)
SD_VAE = dict(  # stable-diffusion-v1-5 vae/config.json
    in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2, act_fn="silu",
    block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=32, scaling_factor=0.18215,
)
CLIP_L14_TEXT = dict(  # openai/clip-vit-large-patch14 text tower (SD1.5's text_encoder)
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def build_pipeline(device: torch.device, dtype: torch.dtype):
    """Random-weight full-size components as a GuidancePipeline (parameters made on the device)."""
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from zeroavatar_blender.engine.guidance.weights import GuidancePipeline, GuidanceWeights

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD15_UNET)
        controlnet = ControlNetModel(**SD15_CONTROLNET_DEPTH)
        vae = AutoencoderKL(**SD_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L14_TEXT))
    for m in (unet, controlnet, vae, text_encoder):
        m.requires_grad_(False).eval().to(dtype)
    weights = GuidanceWeights(Path("<random SD1.5>"), Path("<random depth ControlNet>"), "folder", "folder",
                              "random full-size weights (benchmark)")
    return GuidancePipeline(unet, controlnet, vae, text_encoder, None, DDPMScheduler(**SD_SCHEDULER), weights,
                            device, dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_batch(sds, text, batch: int, steps: int, warmup: int) -> dict[str, float]:
    """Steps/s of full SDS steps (forward + backward), then the time of each part."""
    from zeroavatar_blender.engine.guidance.prompts import PromptEmbeddings
    from zeroavatar_blender.engine.guidance.sds import normalise_depth

    device, res = sds.pipe.device, sds.config.resolution
    g = torch.Generator(device="cpu").manual_seed(batch)
    rgb = torch.rand(batch, 3, res, res, generator=g).to(device).requires_grad_(True)  # stands in for the render
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, res), torch.linspace(-1, 1, res), indexing="ij")
    depth = torch.where(xs ** 2 / 0.1 + ys ** 2 / 0.8 < 1, 3.0 + 0.3 * xs ** 2, 0.0)
    depth_cond = normalise_depth(depth.expand(batch, 1, res, res).contiguous()).to(device)
    emb = PromptEmbeddings(text[1:2].expand(batch, -1, -1), text[:1].expand(batch, -1, -1))

    def step(i: int):
        rgb.grad = None
        out = sds(rgb, depth_cond, emb, step=i)
        out["loss"].backward()
        return out

    for i in range(warmup):
        step(i)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(steps):
        out = step(i)
    _sync(device)
    total = time.perf_counter() - t0
    if not torch.isfinite(out["loss"]) or not torch.isfinite(rgb.grad).all():
        raise RuntimeError(f"non-finite SDS loss or gradient at batch {batch}")
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    reserved = torch.cuda.max_memory_reserved(device) / 2 ** 30 if device.type == "cuda" else None

    parts = {"vae_encode": 0.0, "controlnet_unet": 0.0, "backward": 0.0}
    for i in range(steps):
        rgb.grad = None
        _sync(device); a = time.perf_counter()
        latents = sds.encode_rgb(rgb)
        _sync(device); b = time.perf_counter()
        out = sds.loss_from_latents(latents, sds.control_image(depth_cond), emb, i)
        _sync(device); c = time.perf_counter()
        out["loss"].backward()
        _sync(device); d = time.perf_counter()
        parts["vae_encode"] += b - a
        parts["controlnet_unet"] += c - b
        parts["backward"] += d - c
    return {"batch": batch, "steps_per_s": steps / total, "s_per_step": total / steps, "peak_gib": peak,
            "reserved_gib": reserved,
            **{f"{k}_s": v / steps for k, v in parts.items()}}


def graph_agreement(eager, graphed, text, batch: int, draws: int = 3) -> float:
    """Largest relative difference of the SDS gradient's norm between the eager and the graphed
    diffusion pass on the same latents, timesteps and noise (new inputs at each replay)."""
    from zeroavatar_blender.engine.guidance.prompts import PromptEmbeddings

    device, res = eager.pipe.device, eager.config.resolution
    emb = PromptEmbeddings(text[1:2].expand(batch, -1, -1), text[:1].expand(batch, -1, -1))
    worst = 0.0
    for seed in range(draws):
        g = torch.Generator(device="cpu").manual_seed(100 + seed)
        latents = torch.randn(batch, 4, res // 8, res // 8, generator=g).to(device)
        noise = torch.randn(batch, 4, res // 8, res // 8, generator=g)
        control = torch.rand(batch, 1, res, res, generator=g).to(device)
        t = torch.randint(20, 980, (batch,), generator=g)
        a = eager.loss_from_latents(latents, eager.control_image(control), emb, 0, t=t, noise=noise)["grad_norm"]
        b = graphed.loss_from_latents(latents, graphed.control_image(control), emb, 0, t=t, noise=noise)["grad_norm"]
        worst = max(worst, float((a - b).abs() / a.abs().clamp_min(1e-6)))
    return worst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,2", help="comma-separated batch sizes (views per SDS step)")
    p.add_argument("--steps", type=int, default=20, help="timed SDS steps per batch size")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--resolution", type=int, default=512, help="pixels fed to the VAE (latents are /8)")
    p.add_argument("--full-steps", type=int, default=10000,
                   help="SDS iterations of a default `full` run, for the run-time estimate")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--attention-slicing", action="store_true")
    p.add_argument("--fp32", action="store_true", help="fp32 weights instead of fp16")
    p.add_argument("--compare-graphs", action="store_true",
                   help="also time the CUDA-graph diffusion pass (cuda_graphs) in this process, eager again "
                        "after it, check that both give the same gradient, and print the ratio")
    p.add_argument("--allow-cpu", action="store_true", help="run without CUDA (slow; checks the script only)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = p.parse_args(argv)

    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif args.allow_cpu:
        device = torch.device("cpu")
    else:
        print("bench_sds_gpu needs a CUDA GPU (a full-size SD1.5 SDS step takes ~45 s on 2 CPU cores); "
              "none is visible to torch here. Run it on a GPU machine, or pass --allow-cpu to check the script.",
              file=sys.stderr)
        return 2

    from diffusers.utils import logging as diffusers_logging

    from zeroavatar_blender.engine.guidance.sds import DepthControlledSDS, SDSConfig

    diffusers_logging.set_verbosity_error()  # its "cast with to()" notes are about loading, not us
    dtype = torch.float32 if args.fp32 or device.type == "cpu" else torch.float16
    t0 = time.perf_counter()
    pipe = build_pipeline(device, dtype)
    _sync(device)
    build_s = time.perf_counter() - t0
    config = SDSConfig(resolution=args.resolution, channels_last=args.channels_last,
                       attention_slicing=args.attention_slicing)
    sds = DepthControlledSDS(pipe, config)
    with torch.no_grad():  # the real run encodes the prompts once (ViewPromptCache); random tokens here
        ids = torch.randint(0, CLIP_L14_TEXT["vocab_size"] - 2, (2, 77), generator=torch.Generator().manual_seed(0))
        text = pipe.text_encoder(ids.to(device))[0].to(dtype)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; dtype {str(dtype).removeprefix('torch.')}; {args.resolution} px "
          f"({args.resolution // 8}x{args.resolution // 8} latents); models built in {build_s:.1f} s; "
          f"torch {torch.__version__}")
    results = []
    graphed = None
    if args.compare_graphs:
        if device.type != "cuda":
            print("--compare-graphs needs CUDA", file=sys.stderr)
            return 2
        from dataclasses import replace

        graphed = DepthControlledSDS(pipe, replace(config, cuda_graphs=True))
    for batch in (int(b) for b in args.batches.split(",")):
        r = bench_batch(sds, text, batch, args.steps, args.warmup)
        if graphed is not None:  # eager, graphed, eager again: the ratio is against both eager runs' mean
            g = bench_batch(graphed, text, batch, args.steps, args.warmup)
            again = bench_batch(sds, text, batch, args.steps, args.warmup)
            eager_s = 0.5 * (r["s_per_step"] + again["s_per_step"])
            r["graphs"] = {"s_per_step": g["s_per_step"], "controlnet_unet_s": g["controlnet_unet_s"],
                           "reserved_gib": g["reserved_gib"], "eager_again_s_per_step": again["s_per_step"],
                           "speedup": eager_s / g["s_per_step"], "fallback": graphed.graph_fallback,
                           "max_rel_grad_norm_diff": graph_agreement(sds, graphed, text, batch)}
            x = r["graphs"]
            print(f"batch {batch}: CUDA graph {1000 * x['s_per_step']:.1f} ms a step (ControlNet+UNet "
                  f"{1000 * x['controlnet_unet_s']:.1f}) against eager {1000 * r['s_per_step']:.1f} and "
                  f"{1000 * again['s_per_step']:.1f}: {x['speedup']:.2f}x; reserved {x['reserved_gib']:.2f} GiB; "
                  f"gradient norms within {x['max_rel_grad_norm_diff']:.1e}{'; FELL BACK: ' + x['fallback'] if x['fallback'] else ''}")
        r["full_run_sds_min"] = args.full_steps / r["steps_per_s"] / 60
        results.append(r)
        peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        print(f"batch {batch}: {r['steps_per_s']:.2f} SDS steps/s ({1000 * r['s_per_step']:.0f} ms: VAE encode "
              f"{1000 * r['vae_encode_s']:.0f}, ControlNet+UNet (CFG batch {2 * batch}) "
              f"{1000 * r['controlnet_unet_s']:.0f}, backward {1000 * r['backward_s']:.0f}); peak "
              f"{peak} GiB; SDS part of a full run ({args.full_steps} steps): "
              f"{r['full_run_sds_min']:.1f} min")
    summary = {"device": name, "dtype": str(dtype), "resolution": args.resolution, "build_s": build_s,
               "full_steps": args.full_steps, "channels_last": args.channels_last,
               "attention_slicing": args.attention_slicing, "results": results}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
