"""Discovery and loading of SD1.x + depth-ControlNet weights, through the paths users take."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
import torch

from tests.engine.guidance import tiny_models as tm
from zeroavatar_blender import protocol
from zeroavatar_blender.engine.errors import BadInputError, MissingModelError
from zeroavatar_blender.engine.guidance import weights as W


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models' ops are too small to split: extra threads only spin (4x slower on a busy box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tm.TinyLayouts:
    return tm.make_layouts(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection attempt (a hub lookup) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for var in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)


INPUTS = dict(x=torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)),
              t=torch.tensor([10, 700]),
              text=torch.randn(2, 77, tm.TEXT_DIM, generator=torch.Generator().manual_seed(2)),
              image=torch.rand(2, 3, tm.RESOLUTION, tm.RESOLUTION, generator=torch.Generator().manual_seed(3)))


@torch.no_grad()
def outputs(unet, controlnet, vae, text_encoder, tokenizer) -> list[torch.Tensor]:
    """Every loaded component's output on fixed inputs (so wrong or missing weights show)."""
    x, t, text, image = INPUTS["x"], INPUTS["t"], INPUTS["text"], INPUTS["image"]
    down, mid = controlnet(x, t, encoder_hidden_states=text, controlnet_cond=image, return_dict=False)
    eps = unet(x, t, encoder_hidden_states=text, down_block_additional_residuals=down,
               mid_block_additional_residual=mid).sample
    latents = vae.encode(image * 2 - 1).latent_dist.mean
    decoded = vae.decode(latents).sample
    ids = tokenizer(["a photo of a person, back view"], padding="max_length", max_length=77,
                    return_tensors="pt").input_ids
    return [eps, mid, latents, decoded, ids.float(), text_encoder(ids)[0]]


def assert_same_models(pipe: W.GuidancePipeline, tiny: tm.TinyLayouts) -> None:
    c = tiny.components
    got = outputs(pipe.unet, pipe.controlnet, pipe.vae, pipe.text_encoder, pipe.tokenizer)
    want = outputs(c.unet, c.controlnet, c.vae, c.text_encoder, c.tokenizer)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
    assert pipe.num_train_timesteps == 1000
    torch.testing.assert_close(pipe.alphas_cumprod, c.scheduler.alphas_cumprod.float())
    assert not any(p.requires_grad for m in (pipe.unet, pipe.controlnet, pipe.vae, pipe.text_encoder)
                   for p in m.parameters())


def test_diffusers_folders(tiny):
    w = W.find_guidance_weights(str(tiny.sd_dir), str(tiny.controlnet_dir))
    assert (w.sd_kind, w.controlnet_kind) == ("folder", "folder")
    assert w.sd_path == tiny.sd_dir and w.sd_config_path is None
    pipe = W.load_guidance_pipeline(w, "cpu")
    assert pipe.dtype == torch.float32 and pipe.vae_scale_factor == 8
    assert_same_models(pipe, tiny)
    assert pipe.encode_text(["a", "b c"]).shape == (2, 77, tm.TEXT_DIM)


def test_hf_cache_defaults_and_listing(tiny, monkeypatch):
    w = W.find_guidance_weights(hf_home=tiny.hf_home)
    assert w.sd_kind == "folder" and tm.SD_REPO in w.description and tm.CONTROLNET_REPO in w.description
    assert w.sd_path.parent.parent.name == "models--stable-diffusion-v1-5--stable-diffusion-v1-5"
    assert (w.sd_path / "unet" / "diffusion_pytorch_model.safetensors").is_symlink()  # real cache layout
    assert_same_models(W.load_guidance_pipeline(w, "cpu"), tiny)
    assert W.list_installed_models(tiny.hf_home) == {"stable_diffusion": [tm.SD_REPO],
                                                      "depth_controlnet": [tm.CONTROLNET_REPO]}
    assert W.list_installed_models(tiny.config_home) == {"stable_diffusion": [], "depth_controlnet": []}
    # explicit repo ids, and the cache found through HF_HOME like huggingface_hub does
    monkeypatch.setenv("HF_HOME", str(tiny.hf_home))
    w2 = W.find_guidance_weights(tm.SD_REPO, tm.CONTROLNET_REPO)
    assert w2.sd_path == w.sd_path and w2.controlnet_path == w.controlnet_path
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("HF_HUB_CACHE", str(tiny.hf_home / "hub"))
    assert W.find_guidance_weights().sd_path == w.sd_path


def test_other_cached_sd1_models_are_found(tiny, tmp_path):
    tm.to_hf_cache(tiny.sd_dir, tmp_path / "hub", "someone/my-sd15-finetune")
    tm.to_hf_cache(tiny.controlnet_dir, tmp_path / "hub", "someone/controlnet-depth-sd15")
    tm.to_hf_cache(tiny.controlnet_dir, tmp_path / "hub", "someone/controlnet-canny-sd15")  # not depth
    w = W.find_guidance_weights(hf_home=tmp_path)
    assert "someone/my-sd15-finetune" in w.description and "someone/controlnet-depth-sd15" in w.description
    assert W.list_installed_models(tmp_path) == {"stable_diffusion": ["someone/my-sd15-finetune"],
                                                  "depth_controlnet": ["someone/controlnet-depth-sd15"]}


def test_single_safetensors_files(tiny):
    w = W.find_guidance_weights(str(tiny.sd_file), str(tiny.controlnet_file), hf_home=tiny.config_home)
    assert (w.sd_kind, w.controlnet_kind) == ("single_file", "single_file")
    assert w.sd_config_path is not None and "configs and tokenizer from" in w.description
    assert_same_models(W.load_guidance_pipeline(w, "cpu"), tiny)


def test_diffusers_format_controlnet_file(tiny, tmp_path):
    """A ControlNet's diffusion_pytorch_model.safetensors copied out alone, under another name."""
    f = tmp_path / "depth_cn.safetensors"
    shutil.copy(tiny.controlnet_dir / "diffusion_pytorch_model.safetensors", f)
    w = W.find_guidance_weights(str(tiny.sd_dir), str(f))
    assert w.controlnet_kind == "single_file"
    assert_same_models(W.load_guidance_pipeline(w, "cpu"), tiny)


def test_fp16_variant_only_folder(tiny, tmp_path):
    """`hf download --include "*.fp16.safetensors"` leaves only variant files."""
    sd = tmp_path / "sd"
    shutil.copytree(tiny.sd_dir, sd)
    for sub, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")):
        (sd / sub / f"{name}.safetensors").rename(sd / sub / f"{name}.fp16.safetensors")
    w = W.find_guidance_weights(str(sd), str(tiny.controlnet_dir))
    assert_same_models(W.load_guidance_pipeline(w, "cpu"), tiny)


def test_missing_everything_names_what_and_where(tmp_path):
    with pytest.raises(MissingModelError) as err:
        W.find_guidance_weights(hf_home=tmp_path)
    text = str(err.value)
    for needle in ("stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5",
                   str(tmp_path / "hub"), "hf download stable-diffusion-v1-5/stable-diffusion-v1-5",
                   "--sd-weights", ".safetensors", "preferences"):
        assert needle in text, needle
    assert err.value.code == protocol.EXIT_MISSING_MODEL


def test_missing_controlnet_names_it(tiny, tmp_path):
    tm.to_hf_cache(tiny.sd_dir, tmp_path / "hub", tm.SD_REPO)
    with pytest.raises(MissingModelError) as err:
        W.find_guidance_weights(hf_home=tmp_path)
    text = str(err.value)
    for needle in ("lllyasviel/control_v11f1p_sd15_depth", "lllyasviel/sd-controlnet-depth", str(tmp_path / "hub"),
                   "hf download lllyasviel/control_v11f1p_sd15_depth", "--controlnet-weights"):
        assert needle in text, needle


def test_incomplete_cache_says_which_files(tiny):
    with pytest.raises(MissingModelError, match=r"incomplete.*unet/diffusion_pytorch_model.safetensors"):
        W.find_guidance_weights(hf_home=tiny.config_home)  # configs only, no weights
    with pytest.raises(MissingModelError, match="not in the Hugging Face cache"):
        W.find_guidance_weights("someone/absent-model", hf_home=tiny.hf_home)
    with pytest.raises(MissingModelError, match="neither a file, a folder nor a repo id"):
        W.find_guidance_weights("./no/such/place", hf_home=tiny.hf_home)


def test_single_file_without_configs_explains_the_tokenizer(tiny, tmp_path):
    with pytest.raises(MissingModelError) as err:
        W.find_guidance_weights(str(tiny.sd_file), str(tiny.controlnet_file), hf_home=tmp_path)
    assert "tokenizer" in str(err.value) and W.SD_CONFIG_DOWNLOAD in str(err.value)
    # an explicit config folder works instead of the cache
    w = W.find_guidance_weights(str(tiny.sd_file), str(tiny.controlnet_file), hf_home=tmp_path,
                                sd_config=str(tiny.sd_dir))
    assert w.sd_config_path == tiny.sd_dir


def test_pickle_checkpoints_refused_unless_allowed(tiny, tmp_path):
    ckpt = tmp_path / "model.ckpt"
    from safetensors.torch import load_file
    torch.save({"state_dict": load_file(str(tiny.sd_file))}, ckpt)  # A1111's .ckpt layout
    w = W.find_guidance_weights(str(ckpt), str(tiny.controlnet_dir), hf_home=tiny.config_home)
    assert w.sd_kind == "single_file"
    with pytest.raises(BadInputError, match="pickle"):
        W.load_guidance_pipeline(w, "cpu")
    # opted in: read with torch.load(weights_only=True) by diffusers
    assert_same_models(W.load_guidance_pipeline(w, "cpu", allow_unsafe=True), tiny)
    bin_cn = tmp_path / "cn"
    shutil.copytree(tiny.controlnet_dir, bin_cn)
    (bin_cn / "diffusion_pytorch_model.safetensors").unlink()
    (bin_cn / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(BadInputError, match="pickle"):
        W.load_guidance_pipeline(W.find_guidance_weights(str(tiny.sd_dir), str(bin_cn)), "cpu")


def test_bad_files_get_clear_errors(tiny, tmp_path):
    txt = tmp_path / "weights.txt"
    txt.write_text("hello")
    with pytest.raises(BadInputError, match="not a Stable Diffusion checkpoint"):
        W.find_guidance_weights(str(txt), str(tiny.controlnet_dir))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 64)
    w = W.find_guidance_weights(str(tiny.sd_dir), str(broken))
    with pytest.raises(BadInputError, match="broken.safetensors"):
        W.load_guidance_pipeline(w, "cpu")


def test_controlnet_for_another_base_model_is_refused(tiny, tmp_path):
    import json
    cn = tmp_path / "sd21_depth"
    shutil.copytree(tiny.controlnet_dir, cn)
    cfg = json.loads((cn / "config.json").read_text())
    cfg["cross_attention_dim"] = 1024
    (cn / "config.json").write_text(json.dumps(cfg))
    w = W.find_guidance_weights(str(tiny.sd_dir), str(cn))
    with pytest.raises(MissingModelError, match="does not fit"):
        W.load_guidance_pipeline(w, "cpu")


def test_hub_cache_dir_follows_environment(monkeypatch, tmp_path):
    assert W.hub_cache_dir(tmp_path) == tmp_path / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert W.hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert W.hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert W.hub_cache_dir() == tmp_path / "c"
