"""The SDS gradient against its formula, computed here by calling the UNet and ControlNet directly."""

from __future__ import annotations

import pytest
import torch

from tests.engine.guidance import tiny_models as tm
from zeroavatar_blender.engine.errors import BadInputError
from zeroavatar_blender.engine.guidance import weights as W
from zeroavatar_blender.engine.guidance.prompts import (VIEWS, PromptEmbeddings, ViewPromptCache, ViewThresholds,
                                                        build_prompt, view_indices, view_of, view_prompt)
from zeroavatar_blender.engine.guidance.schedules import Schedule
from zeroavatar_blender.engine.guidance.sds import DepthControlledSDS, SDSConfig, normalise_depth

RES = tm.RESOLUTION


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models' ops are too small to split: extra threads only spin (4x slower on a busy box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> W.GuidancePipeline:
    lay = tm.make_layouts(tmp_path_factory.mktemp("tiny"))
    return W.load_guidance_pipeline(W.find_guidance_weights(str(lay.sd_dir), str(lay.controlnet_dir)), "cpu")


@pytest.fixture(scope="module")
def prompts(pipe) -> ViewPromptCache:
    return ViewPromptCache(pipe.encode_text, build_prompt("a woman in a red coat"), "blurry")


def depth_map(batch: int, seed: int) -> torch.Tensor:
    """A blob (the body) in front of an empty background, normalised for the ControlNet."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, RES), torch.linspace(-1, 1, RES), indexing="ij")
    maps = []
    for _ in range(batch):
        cx, cy, r = (torch.rand(3, generator=g) * torch.tensor([0.6, 0.6, 0.4]) + torch.tensor([-0.3, -0.3, 0.3]))
        d2 = (xs - cx) ** 2 + (ys - cy) ** 2
        maps.append(torch.where(d2 < r ** 2, 2.0 + d2, torch.zeros_like(d2)))
    return normalise_depth(torch.stack(maps)[:, None])


@torch.no_grad()
def expected_grad(pipe, latents, noise, t, emb: PromptEmbeddings, depth, *, scale, weighting, cond_scale=1.0,
                  controlnet=True):
    """w(t) (eps_hat - eps) from scratch: own noise schedule, one call per CFG half, ControlNet
    residuals handed to the UNet in each, no batching tricks shared with the module."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2  # SD's "scaled_linear"
    abar = torch.cumprod(1 - betas, 0)[t].float().view(-1, 1, 1, 1)
    noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    image = torch.nn.functional.interpolate(depth, (RES, RES)).repeat(1, 3, 1, 1)

    def eps(text):
        if not controlnet:
            return pipe.unet(noisy, t, encoder_hidden_states=text).sample
        down, mid = pipe.controlnet(noisy, t, encoder_hidden_states=text, controlnet_cond=image,
                                    return_dict=False)
        down = [d * cond_scale for d in down]
        return pipe.unet(noisy, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid * cond_scale).sample

    e_u, e_c = eps(emb.uncond), eps(emb.cond)
    e_hat = e_u + scale * (e_c - e_u)
    w = (1 - abar) if weighting == "sds" else torch.ones_like(abar)
    return w * (e_hat - noise)


def fixed_draws(batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 8, 8, generator=g)
    noise = torch.randn(batch, 4, 8, 8, generator=g)
    return latents, noise


def close(a, b, rel=1e-5, scale=None):
    """Equal up to float32 round-off relative to the gradient's size (CFG scales it up ~100x)."""
    scale = float(b.abs().max()) if scale is None else scale
    torch.testing.assert_close(a, b, rtol=rel, atol=rel * scale)


@pytest.mark.parametrize("scale,weighting,cond_scale,t", [
    (100.0, "sds", 1.0, [50, 730]),
    (7.5, "uniform", 1.0, [980, 20]),
    (50.0, "sds", 0.5, [400, 400]),
])
def test_gradient_matches_formula(pipe, prompts, scale, weighting, cond_scale, t):
    B = 2
    latents, noise = fixed_draws(B)
    depth = depth_map(B, seed=1)
    emb = prompts([0.0, 150.0])
    sds = DepthControlledSDS(pipe, SDSConfig(guidance_scale=scale, weighting=weighting,
                                             controlnet_conditioning_scale=cond_scale, resolution=RES))
    z = latents.clone().requires_grad_(True)
    t = torch.tensor(t)
    out = sds.loss_from_latents(z, sds.control_image(depth), emb, step=0, t=t, noise=noise)
    out["loss"].backward()
    want = expected_grad(pipe, latents, noise, t, emb, depth, scale=scale, weighting=weighting,
                         cond_scale=cond_scale)
    close(z.grad * B, want)  # the loss averages the per-view gradients over the batch
    close(out["loss"], 0.5 * (want ** 2).sum() / B)
    close(out["grad_norm"], want.norm())
    assert out["t"].tolist() == t.tolist()


def test_gradient_reaches_the_pixels_through_the_vae(pipe, prompts):
    B = 2
    g = torch.Generator().manual_seed(5)
    rgb = torch.rand(B, 3, 48, 48, generator=g, requires_grad=True)  # renders at another size: resized
    _, noise = fixed_draws(B, seed=6)
    depth = depth_map(B, seed=7)
    emb = prompts([30.0, 200.0])
    t = torch.tensor([300, 600])
    sds = DepthControlledSDS(pipe, SDSConfig(guidance_scale=100.0, resolution=RES))
    out = sds(rgb, depth, emb, step=0, t=t, noise=noise)
    out["loss"].backward()

    x = torch.nn.functional.interpolate(rgb.detach(), (RES, RES), mode="bilinear", align_corners=False)
    x.requires_grad_(True)
    latents = pipe.vae.encode(x * 2 - 1).latent_dist.mean * pipe.vae.config.scaling_factor
    want = expected_grad(pipe, latents.detach(), noise, t, emb, depth, scale=100.0, weighting="sds")
    (grad_x,) = torch.autograd.grad(latents, x, want / B)
    (want_rgb,) = torch.autograd.grad(torch.nn.functional.interpolate(
        rgb, (RES, RES), mode="bilinear", align_corners=False), rgb, grad_x)
    close(rgb.grad, want_rgb, rel=1e-4)
    assert rgb.grad.abs().sum() > 0


def test_gradient_clipping(pipe, prompts):
    B = 2
    latents, noise = fixed_draws(B, seed=3)
    depth = depth_map(B, seed=4)
    emb = prompts([0.0, 90.0])
    t = torch.tensor([500, 900])
    want = expected_grad(pipe, latents, noise, t, emb, depth, scale=100.0, weighting="sds")
    assert want.abs().max() > 1.0  # so the clip below bites
    sds = DepthControlledSDS(pipe, SDSConfig(guidance_scale=100.0, grad_clip=Schedule([(0, 0.5), (100, 1.0)]),
                                             resolution=RES))
    for step, clip in ((0, 0.5), (100, 1.0)):
        z = latents.clone().requires_grad_(True)
        out = sds.loss_from_latents(z, sds.control_image(depth), emb, step=step, t=t, noise=noise)
        out["loss"].backward()
        assert (z.grad * B).abs().max() <= clip + 1e-6
        close(z.grad * B, want.clamp(-clip, clip), scale=float(want.abs().max()))


def test_depth_conditioning_is_used(pipe, prompts):
    B = 1
    latents, noise = fixed_draws(B, seed=8)
    emb = prompts([0.0])
    t = torch.tensor([400])

    def grad(depth, cond_scale):
        sds = DepthControlledSDS(pipe, SDSConfig(guidance_scale=30.0, controlnet_conditioning_scale=cond_scale,
                                                 resolution=RES))
        z = latents.clone().requires_grad_(True)
        sds.loss_from_latents(z, sds.control_image(depth), emb, step=0, t=t, noise=noise)["loss"].backward()
        return z.grad

    a, b = grad(depth_map(1, seed=10), 1.0), grad(depth_map(1, seed=11), 1.0)
    assert (a - b).norm() > 0.1 * a.norm()  # another depth map, another gradient
    # conditioning scale 0 is the plain UNet: the residuals are what carried the depth
    close(grad(depth_map(1, seed=10), 0.0) * B,
          expected_grad(pipe, latents, noise, t, emb, depth_map(1, seed=10), scale=30.0, weighting="sds",
                        controlnet=False))


def test_timestep_annealing_follows_schedule(pipe, prompts):
    cfg = SDSConfig(min_step_percent=0.02, max_step_percent=Schedule([(0, 0.98), (1000, 0.5)]), resolution=RES)
    sds = DepthControlledSDS(pipe, cfg)
    assert sds.timestep_range(0) == (20, 980)
    assert sds.timestep_range(500) == (20, 740)
    assert sds.timestep_range(1000) == sds.timestep_range(10**6) == (20, 500)
    for step, (lo, hi) in ((0, (20, 980)), (1000, (20, 500))):
        t = sds.sample_timesteps(step, 4000)
        assert t.min() == lo and t.max() == hi  # uniform over the whole inclusive range
    latents, _ = fixed_draws(2)
    out = sds.loss_from_latents(latents.requires_grad_(True), sds.control_image(depth_map(2, 1)),
                                prompts([0.0, 180.0]), step=2000)
    assert ((out["t"] >= 20) & (out["t"] <= 500)).all()
    with pytest.raises(ValueError, match="empty timestep range"):
        DepthControlledSDS(pipe, SDSConfig(min_step_percent=0.6, max_step_percent=0.5)).timestep_range(0)


def test_deterministic_given_seed_or_generator(pipe, prompts):
    rgb = torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(0))
    depth, emb = depth_map(2, 2), prompts([0.0, 180.0])
    runs = [DepthControlledSDS(pipe, SDSConfig(resolution=RES, seed=s))(rgb, depth, emb, step=0) for s in (3, 3, 4)]
    assert torch.equal(runs[0]["t"], runs[1]["t"]) and torch.equal(runs[0]["loss"], runs[1]["loss"])
    assert not torch.equal(runs[0]["loss"], runs[2]["loss"])
    sds = DepthControlledSDS(pipe, SDSConfig(resolution=RES, latent_sample="sample"))
    a = sds(rgb, depth, emb, step=0, generator=torch.Generator().manual_seed(9))
    b = sds(rgb, depth, emb, step=0, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a["loss"], b["loss"])


def test_memory_options_keep_the_result(pipe, prompts, tmp_path):
    latents, noise = fixed_draws(2, seed=12)
    depth, emb, t = depth_map(2, 3), prompts([0.0, 90.0]), torch.tensor([100, 800])
    want = expected_grad(pipe, latents, noise, t, emb, depth, scale=100.0, weighting="sds")
    lay = tm.make_layouts(tmp_path)  # a private copy: the options change the modules in place
    own = W.load_guidance_pipeline(W.find_guidance_weights(str(lay.sd_dir), str(lay.controlnet_dir)), "cpu")
    sds = DepthControlledSDS(own, SDSConfig(resolution=RES, attention_slicing=True, vae_slicing=True,
                                            channels_last=True))
    z = latents.clone().requires_grad_(True)
    sds.loss_from_latents(z, sds.control_image(depth), emb, step=0, t=t, noise=noise)["loss"].backward()
    close(z.grad * 2, want, rel=1e-4)


def test_bad_inputs(pipe, prompts):
    sds = DepthControlledSDS(pipe, SDSConfig(resolution=RES))
    rgb, depth = torch.rand(2, 3, RES, RES), depth_map(2, 0)
    with pytest.raises(BadInputError, match="rgb"):
        sds(rgb[:, :1], depth, prompts([0.0, 0.0]), step=0)
    with pytest.raises(BadInputError, match="depth_cond"):
        sds(rgb, depth[:1], prompts([0.0, 0.0]), step=0)
    with pytest.raises(BadInputError, match="embeddings"):
        sds(rgb, depth, prompts([0.0, 0.0, 0.0]), step=0)
    out = sds(rgb, depth, prompts([0.0]), step=0)  # one embedding broadcasts over the batch
    assert out["t"].shape == (2,)
    with pytest.raises(ValueError):
        SDSConfig(weighting="fantasia")
    with pytest.raises(ValueError):
        SDSConfig(resolution=100)


# --- depth maps ---------------------------------------------------------------------------------

def test_normalise_depth_near_bright_far_dark_background_black():
    z = torch.tensor([[[[0.0, 2.0, 4.0], [3.0, float("inf"), 0.0]]], [[[5.0, 5.0, 0.0], [0.0, 0.0, 0.0]]]])
    out = normalise_depth(z, floor=0.2)
    a = out[0, 0]
    assert a[0, 1] == pytest.approx(1.0)  # nearest foreground pixel
    assert a[0, 2] == pytest.approx(0.2)  # farthest foreground pixel: the floor
    # disparity, not depth, is linear: 1/3 lies 1/3 of the way from 1/4 to 1/2
    assert a[1, 0] == pytest.approx(0.2 + 0.8 * (1 / 3 - 1 / 4) / (1 / 2 - 1 / 4))
    assert a[0, 0] == 0 and a[1, 1] == 0 and a[1, 2] == 0  # background, inf, empty
    assert out[1, 0, 0, 0] == 1.0 and out[1, 0, 0, 1] == 1.0 and out[1, 0, 1].sum() == 0  # flat: all near
    lin = normalise_depth(z, disparity=False, floor=0.0)[0, 0]
    assert lin[1, 0] == pytest.approx(0.5)  # depth 3 halfway between 2 and 4
    assert normalise_depth(torch.zeros(1, 1, 4, 4)).abs().sum() == 0


def test_normalise_depth_soft_mask():
    z = torch.full((1, 1, 2, 2), 2.0)
    z[0, 0, 0, 0] = 1.0
    alpha = torch.tensor([[[[1.0, 1.0], [0.6, 0.2]]]])
    out = normalise_depth(z, alpha, floor=0.0)
    assert out[0, 0, 0, 0] == 1.0 and out[0, 0, 0, 1] == 0.0
    assert out[0, 0, 1, 1] == pytest.approx(0.0)
    z[0, 0, 1, 1] = 1.5  # a soft edge pixel keeps its value times alpha
    assert normalise_depth(z, alpha, floor=0.0)[0, 0, 1, 1] == pytest.approx(0.2 * (1 / 1.5 - 0.5) / 0.5)
    with pytest.raises(ValueError):
        normalise_depth(z[0])


# --- prompts --------------------------------------------------------------------------------------

def test_view_of_azimuth_and_elevation():
    assert [view_of(a) for a in (0, 45, 46, 90, 134, 135, 180, -170, 270, 315, 360)] == [
        "front", "front", "side", "side", "side", "back", "back", "back", "side", "front", "front"]
    assert view_of(180, 70) == "overhead" and view_of(0, 60) == "front"
    assert view_of(100, 0, ViewThresholds(front=30, back=90)) == "back"
    assert view_of(0, 89, ViewThresholds(overhead=None)) == "front"
    idx = view_indices(torch.tensor([0.0, 90.0, 180.0, 10.0]), torch.tensor([0.0, 0.0, 0.0, 80.0]))
    assert [VIEWS[i] for i in idx] == ["front", "side", "back", "overhead"]
    with pytest.raises(ValueError):
        ViewThresholds(front=100, back=100)


def test_prompt_text():
    assert build_prompt() == "a photo of a person, full body, high quality, detailed, realistic"
    assert build_prompt("  a man in a blue suit ").startswith("a photo of a man in a blue suit, full body")
    assert build_prompt(template="a 3d scan of a dancer") == "a 3d scan of a dancer"
    assert view_prompt("a person", "back") == "a person, back view"
    with pytest.raises(ValueError):
        view_prompt("a person", "top")


def test_prompt_cache_encodes_once_and_gathers_by_view(pipe):
    calls = []

    def encode(texts):
        calls.append(list(texts))
        return pipe.encode_text(texts)

    cache = ViewPromptCache(encode, "a person", "ugly")
    assert len(calls) == 1 and calls[0] == [f"a person, {v} view" for v in VIEWS] + ["ugly"]
    emb = cache([180.0, 0.0, 90.0], [0.0, 0.0, 75.0])
    assert len(calls) == 1 and emb.cond.shape == (3, 77, tm.TEXT_DIM)
    want = pipe.encode_text(["a person, back view", "a person, front view", "a person, overhead view"])
    torch.testing.assert_close(emb.cond, want)
    torch.testing.assert_close(emb.uncond, pipe.encode_text(["ugly"]).expand(3, -1, -1))
    assert not torch.allclose(emb.cond[0], emb.cond[1])  # the view words change the features
    torch.testing.assert_close(cache.for_views(["side"]).cond, pipe.encode_text(["a person, side view"]))
    plain = ViewPromptCache(pipe.encode_text, "a person", view_dependent=False)
    torch.testing.assert_close(plain([0.0]).cond, plain([180.0]).cond)


# --- the diffusion pass as a CUDA graph ----------------------------------------------------------

def test_a_refused_graph_capture_falls_back_to_the_eager_pass_and_says_why(pipe, prompts):
    """On the CPU ``cuda_graphs`` does nothing; a capture that cannot run (here: CPU tensors)
    leaves the SDS on the eager pass, with the same gradient, and the reason kept for the user."""
    from zeroavatar_blender.engine.guidance.cuda_graph import GraphedPass

    latents, noise = fixed_draws(2, seed=5)
    depth, emb, t = depth_map(2, 4), prompts([0.0, 200.0]), torch.tensor([300, 600])
    eager = DepthControlledSDS(pipe, SDSConfig(resolution=RES))
    sds = DepthControlledSDS(pipe, SDSConfig(resolution=RES, cuda_graphs=True))
    assert sds.graphed is None  # CPU: no graph
    sds.graphed = GraphedPass(sds._diffusion_pass)
    a = eager.loss_from_latents(latents, eager.control_image(depth), emb, step=0, t=t, noise=noise)
    b = sds.loss_from_latents(latents, sds.control_image(depth), emb, step=0, t=t, noise=noise)
    assert sds.graphed is None and "CUDA graph capture failed" in sds.graph_fallback
    assert torch.equal(a["loss"], b["loss"])


def _cuda() -> bool:
    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
def test_cuda_graph_pass_equals_the_eager_pass(tmp_path):
    """The captured ControlNet + UNet pass gives the eager pass's noise prediction for new
    inputs at every replay, and captures again only when the shapes change."""
    lay = tm.make_layouts(tmp_path)
    cuda_pipe = W.load_guidance_pipeline(W.find_guidance_weights(str(lay.sd_dir), str(lay.controlnet_dir)), "cuda")
    cache = ViewPromptCache(cuda_pipe.encode_text, build_prompt("a person"))
    eager = DepthControlledSDS(cuda_pipe, SDSConfig(resolution=RES))
    graphed = DepthControlledSDS(cuda_pipe, SDSConfig(resolution=RES, cuda_graphs=True))
    assert graphed.graphed is not None
    for batch, seed in ((1, 0), (1, 1), (1, 2), (2, 3)):
        latents, noise = fixed_draws(batch, seed=seed)
        depth, emb = depth_map(batch, seed), cache([30.0 * seed] * batch)
        t = torch.tensor([100 + 200 * seed] * batch)
        want = eager.loss_from_latents(latents.cuda(), eager.control_image(depth), emb, step=0, t=t, noise=noise)
        got = graphed.loss_from_latents(latents.cuda(), graphed.control_image(depth), emb, step=0, t=t, noise=noise)
        assert not graphed.graph_fallback
        torch.testing.assert_close(got["grad_norm"], want["grad_norm"], rtol=2e-3, atol=1e-3)
    assert graphed.graphed.captures == 2  # batch 1, then batch 2
