"""A tiny random-weight Stable Diffusion 1.x + depth ControlNet, saved the ways users have them.

The architectures are SD1.5's (four UNet/VAE levels, cross-attention on the first three, 768-wide
CLIP text features, the ControlNet's 8x hint encoder) with a handful of channels, so every real
code path runs (diffusers folders, the Hugging Face cache layout, original-format single
``.safetensors`` files converted by diffusers) in well under a second on a CPU.

Nothing here touches the network: the CLIP tokenizer is a byte-level BPE vocabulary written
here (all 256 byte symbols, their end-of-word forms and a few merges).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

SD_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
CONTROLNET_REPO = "lllyasviel/control_v11f1p_sd15_depth"
RESOLUTION = 64  # pixels; latents are 8x8
TEXT_DIM = 768  # SD1.x's CLIP ViT-L/14 width, so the family checks see an SD1.x model

UNET_CONFIG = dict(
    sample_size=RESOLUTION // 8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(8, 8, 16, 16),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=TEXT_DIM,
    attention_head_dim=2,
    norm_num_groups=4,
)
VAE_CONFIG = dict(
    sample_size=RESOLUTION,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=1,
    block_out_channels=(8, 8, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=4,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)
WORDS = ("a", "photo", "of", "person", "full", "body", "front", "side", "back", "overhead", "view")


@dataclass
class TinyComponents:
    unet: UNet2DConditionModel
    controlnet: ControlNetModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler


# --- tokenizer ------------------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_tiny_tokenizer(folder: Path) -> Path:
    """A CLIP BPE tokenizer (vocab.json, merges.txt, configs) that encodes any text."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(tok, len(vocab))
    merges: list[str] = []
    for word in WORDS:  # left-to-right merges, so these words become single tokens
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))
    merges = list(dict.fromkeys(merges))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>"}), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>"}), encoding="utf-8")
    return folder


# --- models ---------------------------------------------------------------------------------

def _wake_controlnet_(controlnet: ControlNetModel, generator: torch.Generator) -> None:
    """A fresh ControlNet is silent (zero convolutions) and random hint layers shrink the depth
    image to almost nothing. Give it He-initialised hint layers, a hint as large as the latent
    features, and non-zero output convolutions, so the depth image visibly steers the UNet, as a
    trained one does."""
    with torch.no_grad():
        for name, p in controlnet.controlnet_cond_embedding.named_parameters():
            if p.ndim == 4:
                gain = 10.0 if name.startswith("conv_out") else 1.0
                p.copy_(torch.randn(p.shape, generator=generator) * (2 / p[0].numel()) ** 0.5 * gain)
            else:
                p.zero_()
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.3)


def build_tiny_components(seed: int = 0) -> TinyComponents:
    """Random weights, reproducible from ``seed``, without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**UNET_CONFIG)
        controlnet = ControlNetModel.from_unet(unet)
        vae = AutoencoderKL(**VAE_CONFIG)
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(Path(tmp))), local_files_only=True)
        ids = tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=12, max_position_embeddings=77, projection_dim=TEXT_DIM,
            bos_token_id=ids[0], eos_token_id=ids[1], pad_token_id=ids[1]))
        gen = torch.Generator().manual_seed(seed + 1)
        _wake_controlnet_(controlnet, gen)
    for m in (unet, controlnet, vae, text_encoder):
        m.eval()
    return TinyComponents(unet, controlnet, vae, text_encoder, tokenizer, DDIMScheduler(**SCHEDULER_CONFIG))


# --- diffusers folders ------------------------------------------------------------------------

def save_diffusers(c: TinyComponents, sd_dir: Path, controlnet_dir: Path) -> tuple[Path, Path]:
    """SD as a diffusers pipeline folder (model_index.json + components), ControlNet as a model folder."""
    pipe = StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
                                   scheduler=c.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(sd_dir), safe_serialization=True)
    # The published SD1.5 repos ship vocab.json + merges.txt (no tokenizer.json): mirror them.
    shutil.rmtree(sd_dir / "tokenizer")
    write_tiny_tokenizer(sd_dir / "tokenizer")
    c.controlnet.save_pretrained(str(controlnet_dir), safe_serialization=True)
    return sd_dir, controlnet_dir


def to_hf_cache(folder: Path, hub: Path, repo_id: str, *, skip_weights: bool = False) -> Path:
    """Copy a folder into the Hugging Face cache layout (blobs + symlinked snapshot + refs/main),
    as ``huggingface_hub`` leaves it. Returns the snapshot folder."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for f in sorted(folder.rglob("*")):
        if not f.is_file() or (skip_weights and f.suffix in (".safetensors", ".bin")):
            continue
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


# --- original (LDM / A1111) single-file format ---------------------------------------------

_RESNET_TO_LDM = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                  ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))


def _unet_prefix_map(config: dict, *, decoder: bool = True) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) pairs for a UNet of any depth (the inverse of diffusers'
    ``convert_ldm_unet_checkpoint``)."""
    L = config["layers_per_block"]
    n = len(config["block_out_channels"])
    pairs = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
             ("conv_in.", "input_blocks.0.0."), ("mid_block.resnets.0.", "middle_block.0."),
             ("mid_block.attentions.0.", "middle_block.1."), ("mid_block.resnets.1.", "middle_block.2.")]
    for i in range(n):
        for j in range(L):
            k = 1 + i * (L + 1) + j
            pairs += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0."),
                      (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1.")]
        pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (L + 1)}.0.op."))
    if decoder:
        pairs += [("conv_norm_out.", "out.0."), ("conv_out.", "out.2.")]
        for i, kind in enumerate(config["up_block_types"]):
            for j in range(L + 1):
                pairs += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{i * (L + 1) + j}.0."),
                          (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{i * (L + 1) + j}.1.")]
            up = 2 if kind.startswith("CrossAttn") else 1
            pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{i * (L + 1) + L}.{up}."))
    return pairs


def _rename(key: str, pairs: list[tuple[str, str]]) -> str:
    for new, old in pairs:
        if key.startswith(new):
            rest = key[len(new):]
            if ".resnets." in new:
                for a, b in _RESNET_TO_LDM:
                    rest = rest.replace(a, b)
            return old + rest
    raise KeyError(f"no LDM name for {key}")


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    pairs = _unet_prefix_map(config)
    return {"model.diffusion_model." + _rename(k, pairs): v for k, v in state.items()}


def controlnet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    pairs = _unet_prefix_map(config, decoder=False) + [
        ("controlnet_mid_block.", "middle_block_out.0."), ("controlnet_cond_embedding.conv_in.", "input_hint_block.0.")]
    n_blocks = len(config["conditioning_embedding_out_channels"] or ()) * 2 - 2
    pairs += [(f"controlnet_cond_embedding.blocks.{m}.", f"input_hint_block.{2 * (m + 1)}.") for m in range(n_blocks)]
    pairs.append(("controlnet_cond_embedding.conv_out.", f"input_hint_block.{2 * (n_blocks + 1)}."))
    out = {}
    for k, v in state.items():
        if k.startswith("controlnet_down_blocks."):
            idx, rest = k[len("controlnet_down_blocks."):].split(".", 1)
            name = f"zero_convs.{idx}.0.{rest}"
        else:
            name = _rename(k, pairs)
        out["control_model." + name] = v
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    n = len(config["block_out_channels"])
    pairs = [("encoder.conv_norm_out.", "encoder.norm_out."), ("decoder.conv_norm_out.", "decoder.norm_out.")]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1."),
                  (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2."),
                  (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.")]
    for i in range(n):
        pairs += [(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."),
                  (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."),
                  (f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block."),
                  (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.")]
    attn = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out."))
    out = {}
    for k, v in state.items():
        name = k
        for new, old in pairs:
            if k.startswith(new):
                name = old + k[len(new):]
                break
        if ".mid.attn_1." in name:
            head, rest = name.split(".mid.attn_1.", 1)
            for a, b in attn:
                if rest.startswith(a):
                    rest = b + rest[len(a):]
                    break
            name = f"{head}.mid.attn_1.{rest}"
            if v.ndim == 2:
                v = v[:, :, None, None]  # LDM stores these as 1x1 convolutions
        name = name.replace("conv_shortcut", "nin_shortcut")
        out["first_stage_model." + name] = v
    return out


def clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        k = k if k.startswith("text_model.") else "text_model." + k
        out["cond_stage_model.transformer." + k] = v
    return out


def save_single_files(c: TinyComponents, folder: Path, *, dtype: torch.dtype = torch.float32) -> tuple[Path, Path]:
    """An A1111-style SD checkpoint and an original-format ControlNet, both ``.safetensors``."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = {**unet_to_ldm(c.unet.state_dict(), dict(c.unet.config)),
          **vae_to_ldm(c.vae.state_dict(), dict(c.vae.config)),
          **clip_to_ldm(c.text_encoder.state_dict())}
    cn = controlnet_to_ldm(c.controlnet.state_dict(), dict(c.controlnet.config))
    sd_file, cn_file = folder / "tiny-sd15.safetensors", folder / "tiny_control_sd15_depth.safetensors"
    save_file({k: v.detach().to(dtype).contiguous() for k, v in sd.items()}, str(sd_file))
    save_file({k: v.detach().to(dtype).contiguous() for k, v in cn.items()}, str(cn_file))
    return sd_file, cn_file


# --- everything at once ----------------------------------------------------------------------

@dataclass
class TinyLayouts:
    components: TinyComponents
    sd_dir: Path  # diffusers pipeline folder
    controlnet_dir: Path  # diffusers ControlNet folder
    hf_home: Path  # HF_HOME whose hub/ holds both repos, weights included
    config_home: Path  # HF_HOME whose hub/ holds only the SD repo's configs and tokenizer
    sd_file: Path  # A1111-style single checkpoint
    controlnet_file: Path  # original-format ControlNet checkpoint


def make_layouts(root: Path, seed: int = 0) -> TinyLayouts:
    c = build_tiny_components(seed)
    sd_dir, cn_dir = save_diffusers(c, root / "diffusers" / "sd15", root / "diffusers" / "controlnet_depth")
    to_hf_cache(sd_dir, root / "hf" / "hub", SD_REPO)
    to_hf_cache(cn_dir, root / "hf" / "hub", CONTROLNET_REPO)
    to_hf_cache(sd_dir, root / "hf_configs" / "hub", SD_REPO, skip_weights=True)
    sd_file, cn_file = save_single_files(c, root / "single")
    return TinyLayouts(c, sd_dir, cn_dir, root / "hf", root / "hf_configs", sd_file, cn_file)
