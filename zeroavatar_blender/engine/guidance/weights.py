"""Find Stable Diffusion 1.x and depth-ControlNet weights already on this machine, and load them.

Nothing here downloads: Hugging Face repo ids are looked up only in the local cache (parsed
from its on-disk layout), every loader gets ``local_files_only=True``, and single-file
checkpoints get their component configs from a local folder so diffusers never falls back to
the hub. Pickle-based files (.ckpt/.pt/.pth/.bin) are refused unless the caller allows them.

Where weights can come from, in order:
  * an explicit local diffusers folder or single ``.safetensors`` file (``--sd-weights`` /
    ``--controlnet-weights`` or the add-on preferences),
  * an explicit repo id, looked up in the cache,
  * the known SD1.5 / depth-ControlNet repo ids in the cache, then any other cached SD1.x
    pipeline / depth ControlNet (a fine-tune works as a drop-in).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..errors import BadInputError, MissingModelError

SD_REPOS = (
    "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "runwayml/stable-diffusion-v1-5",
    "benjamin-paine/stable-diffusion-v1-5",
    "CompVis/stable-diffusion-v1-4",
)
DEPTH_CONTROLNET_REPOS = ("lllyasviel/control_v11f1p_sd15_depth", "lllyasviel/sd-controlnet-depth")
SD1_TEXT_DIM = 768  # CLIP ViT-L/14 width: what makes a UNet an SD1.x one (SD2 uses 1024)

SAFE_SUFFIXES = (".safetensors",)
UNSAFE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")  # pickle containers

SD_DOWNLOAD = ('hf download stable-diffusion-v1-5/stable-diffusion-v1-5 --include "*.json" "*.txt" '
               '"unet/*.fp16.safetensors" "vae/*.fp16.safetensors" "text_encoder/*.fp16.safetensors"')
SD_CONFIG_DOWNLOAD = 'hf download stable-diffusion-v1-5/stable-diffusion-v1-5 --include "*.json" "*.txt"'
CONTROLNET_DOWNLOAD = 'hf download lllyasviel/control_v11f1p_sd15_depth --include "*.json" "*.safetensors"'

# Weight files per component, best first: (file name, diffusers/transformers variant).
_DIFFUSERS_WEIGHTS = (("diffusion_pytorch_model.safetensors", None), ("diffusion_pytorch_model.fp16.safetensors", "fp16"),
                      ("diffusion_pytorch_model.safetensors.index.json", None))
_DIFFUSERS_UNSAFE = (("diffusion_pytorch_model.bin", None), ("diffusion_pytorch_model.fp16.bin", "fp16"))
_TRANSFORMERS_WEIGHTS = (("model.safetensors", None), ("model.fp16.safetensors", "fp16"),
                         ("model.safetensors.index.json", None))
_TRANSFORMERS_UNSAFE = (("pytorch_model.bin", None), ("pytorch_model.fp16.bin", "fp16"))
_WEIGHT_FILES = {"unet": (_DIFFUSERS_WEIGHTS, _DIFFUSERS_UNSAFE), "vae": (_DIFFUSERS_WEIGHTS, _DIFFUSERS_UNSAFE),
                 "text_encoder": (_TRANSFORMERS_WEIGHTS, _TRANSFORMERS_UNSAFE), "": (_DIFFUSERS_WEIGHTS, _DIFFUSERS_UNSAFE)}


@dataclass
class GuidanceWeights:
    sd_path: Path  # a diffusers pipeline folder or a single checkpoint file
    controlnet_path: Path  # a diffusers ControlNet folder or a single checkpoint file
    sd_kind: str  # "folder" | "single_file"
    controlnet_kind: str  # "folder" | "single_file"
    description: str
    # For a single-file SD checkpoint: a diffusers-format folder with the component configs and
    # the CLIP tokenizer (a checkpoint carries neither). None for folders.
    sd_config_path: Path | None = None


# --- the Hugging Face cache, read from disk ----------------------------------------------------

def hub_cache_dir(hf_home: Path | None = None) -> Path:
    """The hub cache folder huggingface_hub would use, read from the environment at call time."""
    if hf_home is not None:
        return Path(hf_home).expanduser() / "hub"
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def cached_snapshot(repo_id: str, cache: Path) -> Path | None:
    """The snapshot folder of ``repo_id`` in the cache: the one refs/main names, else the newest."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    ref = repo / "refs" / "main"
    if ref.is_file():
        snap = snapshots / ref.read_text(encoding="utf-8").strip()
        if snap.is_dir():
            return snap
    if snapshots.is_dir():
        found = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
        if found:
            return found[0]
    return None


def _cached_repos(cache: Path) -> Iterator[tuple[str, Path]]:
    if not cache.is_dir():
        return
    for repo in sorted(cache.glob("models--*")):
        repo_id = "/".join(repo.name.split("--")[1:])
        snap = cached_snapshot(repo_id, cache)
        if snap is not None:
            yield repo_id, snap


# --- what a usable folder holds ----------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _has_weights(folder: Path, component: str, allow_unsafe: bool = True) -> bool:
    safe, unsafe = _WEIGHT_FILES[component]
    names = safe + (unsafe if allow_unsafe else ())
    return any((folder / name).is_file() for name, _ in names)  # is_file() follows (and drops broken) symlinks


def _tokenizer_missing(folder: Path) -> list[str]:
    if (folder / "tokenizer.json").is_file() or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        return []
    return [f"{folder.name}/vocab.json", f"{folder.name}/merges.txt"]


def sd_config_missing(folder: Path) -> list[str]:
    """Config and tokenizer files a single-file SD checkpoint needs from ``folder`` (none = usable)."""
    need = ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
            "scheduler/scheduler_config.json"]
    missing = [n for n in need if not (folder / n).is_file()]
    return missing + _tokenizer_missing(folder / "tokenizer")


def sd_folder_missing(folder: Path) -> list[str]:
    """Files a diffusers SD pipeline folder lacks (none = usable)."""
    missing = sd_config_missing(folder)
    for comp in ("unet", "vae", "text_encoder"):
        if not _has_weights(folder / comp, comp):
            missing.append(f"{comp}/{_WEIGHT_FILES[comp][0][0][0]}")
    return missing


def controlnet_folder_missing(folder: Path) -> list[str]:
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    if not _has_weights(folder, ""):
        missing.append(_DIFFUSERS_WEIGHTS[0][0])
    return missing


def is_sd1_pipeline(folder: Path) -> bool:
    """An SD1.x text-to-image pipeline: 4-channel UNet (not inpainting) with 768-wide text features."""
    index = _read_json(folder / "model_index.json") or {}
    unet = _read_json(folder / "unet" / "config.json") or {}
    return (index.get("_class_name") in ("StableDiffusionPipeline", "StableDiffusionControlNetPipeline")
            and unet.get("in_channels") == 4 and unet.get("cross_attention_dim") == SD1_TEXT_DIM
            and not unet.get("addition_embed_type"))


def is_sd1_depth_controlnet(folder: Path, name: str) -> bool:
    cfg = _read_json(folder / "config.json") or {}
    return (cfg.get("_class_name") == "ControlNetModel" and cfg.get("cross_attention_dim") == SD1_TEXT_DIM
            and "depth" in name.lower())


def list_installed_models(hf_home: Path | None = None) -> dict[str, list[str]]:
    """Complete SD1.x pipelines and SD1.x depth ControlNets in the local cache (for preferences)."""
    cache = hub_cache_dir(hf_home)
    out: dict[str, list[str]] = {"stable_diffusion": [], "depth_controlnet": []}
    for repo_id, snap in _cached_repos(cache):
        if is_sd1_pipeline(snap) and not sd_folder_missing(snap):
            out["stable_diffusion"].append(repo_id)
        elif is_sd1_depth_controlnet(snap, repo_id) and not controlnet_folder_missing(snap):
            out["depth_controlnet"].append(repo_id)
    rank = {r: i for i, r in enumerate(SD_REPOS + DEPTH_CONTROLNET_REPOS)}
    for key in out:
        out[key].sort(key=lambda r: (rank.get(r, len(rank)), r))
    return out


# --- discovery ---------------------------------------------------------------------------------

def _where_hint(flag: str, cache: Path, command: str) -> str:
    return (f"on a machine with internet run `{command}` (older huggingface_hub: `huggingface-cli download ...`) "
            f"and copy the cache to {cache} here (or set HF_HOME / HF_HUB_CACHE to where it is); or pass {flag} "
            "with a local diffusers folder or a .safetensors file (also settable in the add-on preferences)")


def _looks_like_repo_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~")) and "\\" not in spec


def _single_file_kind(path: Path, what: str) -> str:
    suffix = path.suffix.lower()
    if suffix in SAFE_SUFFIXES or suffix in UNSAFE_SUFFIXES:
        return "single_file"
    raise BadInputError(f"{path} is not a {what} checkpoint (expected a .safetensors file or a diffusers folder)",
                        "choose the model's .safetensors file or its diffusers folder")


def _resolve_sd(spec: str | None, cache: Path) -> tuple[Path, str, str]:
    flag = "--sd-weights"
    if spec is None:
        incomplete = []
        for repo_id in SD_REPOS:
            snap = cached_snapshot(repo_id, cache)
            if snap is not None:
                missing = sd_folder_missing(snap)
                if not missing:
                    return snap, "folder", f"{repo_id} (Hugging Face cache)"
                incomplete.append(f"{repo_id} is cached but incomplete (missing {', '.join(missing)})")
        for repo_id, snap in _cached_repos(cache):
            if repo_id not in SD_REPOS and is_sd1_pipeline(snap) and not sd_folder_missing(snap):
                return snap, "folder", f"{repo_id} (Hugging Face cache, SD1.x-compatible)"
        detail = "; ".join(incomplete) or "none of them is there"
        raise MissingModelError(
            f"no Stable Diffusion 1.5 weights found: looked for {', '.join(SD_REPOS)} (or another SD1.x pipeline) "
            f"in the Hugging Face cache {cache}; {detail}",
            _where_hint(flag, cache, SD_DOWNLOAD))
    path = Path(spec).expanduser()
    if path.is_dir():
        missing = sd_folder_missing(path)
        if missing:
            raise MissingModelError(f"the Stable Diffusion folder {path} is incomplete: missing {', '.join(missing)}",
                                    "point --sd-weights at a complete diffusers folder (with model_index.json, unet/, "
                                    "vae/, text_encoder/, tokenizer/, scheduler/) or at a .safetensors checkpoint")
        return path, "folder", f"{path} (diffusers folder)"
    if path.is_file():
        return path, _single_file_kind(path, "Stable Diffusion"), f"{path} (single file)"
    if _looks_like_repo_id(spec):
        snap = cached_snapshot(spec, cache)
        if snap is None:
            raise MissingModelError(f"Stable Diffusion weights {spec} are not in the Hugging Face cache {cache}",
                                    _where_hint(flag, cache, f"hf download {spec}"))
        missing = sd_folder_missing(snap)
        if missing:
            raise MissingModelError(f"{spec} is in the Hugging Face cache ({snap}) but incomplete: missing "
                                    f"{', '.join(missing)}", _where_hint(flag, cache, f"hf download {spec}"))
        return snap, "folder", f"{spec} (Hugging Face cache)"
    raise MissingModelError(f"Stable Diffusion weights not found: {spec} is neither a file, a folder nor a repo id",
                            _where_hint(flag, cache, SD_DOWNLOAD))


def _resolve_controlnet(spec: str | None, cache: Path) -> tuple[Path, str, str]:
    flag = "--controlnet-weights"
    if spec is None:
        incomplete = []
        for repo_id in DEPTH_CONTROLNET_REPOS:
            snap = cached_snapshot(repo_id, cache)
            if snap is not None:
                missing = controlnet_folder_missing(snap)
                if not missing:
                    return snap, "folder", f"{repo_id} (Hugging Face cache)"
                incomplete.append(f"{repo_id} is cached but incomplete (missing {', '.join(missing)})")
        for repo_id, snap in _cached_repos(cache):
            if (repo_id not in DEPTH_CONTROLNET_REPOS and is_sd1_depth_controlnet(snap, repo_id)
                    and not controlnet_folder_missing(snap)):
                return snap, "folder", f"{repo_id} (Hugging Face cache, SD1.x depth ControlNet)"
        detail = "; ".join(incomplete) or "none of them is there"
        raise MissingModelError(
            f"no depth ControlNet for Stable Diffusion 1.5 found: looked for {', '.join(DEPTH_CONTROLNET_REPOS)} "
            f"in the Hugging Face cache {cache}; {detail}",
            _where_hint(flag, cache, CONTROLNET_DOWNLOAD))
    path = Path(spec).expanduser()
    if path.is_dir():
        missing = controlnet_folder_missing(path)
        if missing:
            raise MissingModelError(f"the ControlNet folder {path} is incomplete: missing {', '.join(missing)}",
                                    "point --controlnet-weights at a diffusers ControlNet folder or a .safetensors file")
        return path, "folder", f"{path} (diffusers folder)"
    if path.is_file():
        return path, _single_file_kind(path, "ControlNet"), f"{path} (single file)"
    if _looks_like_repo_id(spec):
        snap = cached_snapshot(spec, cache)
        missing = ["everything"] if snap is None else controlnet_folder_missing(snap)
        if missing:
            where = "not in" if snap is None else f"incomplete (missing {', '.join(missing)}) in"
            raise MissingModelError(f"the ControlNet {spec} is {where} the Hugging Face cache {cache}",
                                    _where_hint(flag, cache, f'hf download {spec} --include "*.json" "*.safetensors"'))
        return snap, "folder", f"{spec} (Hugging Face cache)"
    raise MissingModelError(f"ControlNet weights not found: {spec} is neither a file, a folder nor a repo id",
                            _where_hint(flag, cache, CONTROLNET_DOWNLOAD))


def _find_sd_config(sd_file: Path, sd_config: str | None, cache: Path) -> Path:
    """A local diffusers-format folder with configs + tokenizer for a single-file checkpoint."""
    if sd_config is not None:
        folder = Path(sd_config).expanduser()
        if not folder.is_dir() and _looks_like_repo_id(sd_config):
            folder = cached_snapshot(sd_config, cache) or folder
        missing = sd_config_missing(folder) if folder.is_dir() else ["the folder itself"]
        if missing:
            raise MissingModelError(f"the config folder {sd_config} for {sd_file.name} lacks {', '.join(missing)}",
                                    f"on a machine with internet run `{SD_CONFIG_DOWNLOAD}` (a few MB) and copy the "
                                    f"cache to {cache}")
        return folder
    candidates = [(r, cached_snapshot(r, cache)) for r in SD_REPOS]
    candidates += [(r, s) for r, s in _cached_repos(cache) if r not in SD_REPOS and is_sd1_pipeline(s)]
    for _, snap in candidates:
        if snap is not None and not sd_config_missing(snap):
            return snap
    raise MissingModelError(
        f"{sd_file.name} is a single-file checkpoint, which carries no CLIP tokenizer or component configs, and "
        f"no SD1.5 config folder was found: looked for {', '.join(SD_REPOS)} in the Hugging Face cache {cache}",
        f"on a machine with internet run `{SD_CONFIG_DOWNLOAD}` (a few MB, no weights) and copy the cache to "
        f"{cache} here; or use a full diffusers folder via --sd-weights")


def find_guidance_weights(sd: str | None = None, controlnet: str | None = None, *, hf_home: Path | None = None,
                          sd_config: str | None = None) -> GuidanceWeights:
    """Locate SD1.x and depth-ControlNet weights on this machine; never touches the network.

    ``sd`` / ``controlnet``: a local diffusers folder, a single checkpoint file, or a repo id looked
    up in the local Hugging Face cache; None tries the known repos, then any compatible cached one.
    ``sd_config`` (single-file SD only): a folder or cached repo id with the configs and tokenizer.
    Raises MissingModelError naming what is missing, where it was looked for and how to get it.
    """
    cache = hub_cache_dir(hf_home)
    sd_path, sd_kind, sd_desc = _resolve_sd(sd, cache)
    cn_path, cn_kind, cn_desc = _resolve_controlnet(controlnet, cache)
    sd_config_path = _find_sd_config(sd_path, sd_config, cache) if sd_kind == "single_file" else None
    desc = f"Stable Diffusion: {sd_desc}; depth ControlNet: {cn_desc}"
    if sd_config_path is not None:
        desc += f"; configs and tokenizer from {sd_config_path}"
    return GuidanceWeights(sd_path, cn_path, sd_kind, cn_kind, desc, sd_config_path)


# --- loading ------------------------------------------------------------------------------------

@dataclass
class GuidancePipeline:
    """The frozen diffusion components SDS needs, on one device in one dtype."""

    unet: Any  # diffusers UNet2DConditionModel
    controlnet: Any  # diffusers ControlNetModel
    vae: Any  # diffusers AutoencoderKL
    text_encoder: Any  # transformers CLIPTextModel
    tokenizer: Any  # transformers CLIPTokenizer
    scheduler: Any  # diffusers DDPMScheduler (only its noise schedule is used)
    weights: GuidanceWeights
    device: torch.device
    dtype: torch.dtype
    alphas_cumprod: torch.Tensor = field(init=False)  # (T,) float32 on device

    def __post_init__(self) -> None:
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device, torch.float32)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Prompts -> CLIP token features (N, 77, D), as SD conditions on them."""
        tok = self.tokenizer(list(texts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        out = self.text_encoder(tok.input_ids.to(self.device))
        return out[0].to(self.dtype)


def default_dtype(device: str | torch.device, half_precision: bool = True) -> torch.dtype:
    """fp16 on CUDA (SD1.5's native inference precision), fp32 elsewhere (CPU fp16 is slow)."""
    return torch.float16 if half_precision and torch.device(device).type == "cuda" else torch.float32


def _check_safe(path: Path, allow_unsafe: bool) -> None:
    if path.suffix.lower() in UNSAFE_SUFFIXES and not allow_unsafe:
        raise BadInputError(
            f"{path} is a pickle-based checkpoint ({path.suffix}), which can run code when loaded; refused",
            "use the model's .safetensors version (most models publish one), or allow unsafe files explicitly "
            "(allow_unsafe=True) if you trust its source")


def _pick_weights(folder: Path, component: str, dtype: torch.dtype, allow_unsafe: bool) -> tuple[str | None, bool]:
    """(variant, use_safetensors) for a component folder; fp16 files preferred when loading fp16."""
    safe, unsafe = _WEIGHT_FILES[component]
    present = [(n, v) for n, v in safe if (folder / n).is_file()]
    if present:
        if dtype == torch.float16 and any(v == "fp16" for _, v in present):
            return "fp16", True
        return present[0][1], True
    present = [(n, v) for n, v in unsafe if (folder / n).is_file()]
    if present and allow_unsafe:
        return present[0][1], False
    if present:
        _check_safe(folder / present[0][0], allow_unsafe)
    raise MissingModelError(f"no weights in {folder}", f"expected {safe[0][0]} there")


def _load(what: str, path: Path, fn, *args, **kwargs):
    """Run a diffusers/transformers loader, turning its errors into one that names the file."""
    try:
        return fn(*args, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise BadInputError(f"could not load the {what} from {path}: {type(exc).__name__}: {exc}",
                            f"the file may be incomplete, corrupt or not an SD1.x {what}; re-download it or choose "
                            "another") from exc


def _controlnet_config_from_unet(unet_config: dict[str, Any]) -> dict[str, Any]:
    """The ControlNet config matching a UNet (what ``ControlNetModel.from_unet`` builds), for
    original-format ControlNet files that come without one."""
    from diffusers import ControlNetModel

    accepted = set(inspect.signature(ControlNetModel.__init__).parameters) - {"self"}
    cfg = {k: v for k, v in unet_config.items() if k in accepted}
    cfg.update(_class_name="ControlNetModel", controlnet_conditioning_channel_order="rgb",
               conditioning_embedding_out_channels=[16, 32, 96, 256], conditioning_channels=3)
    return cfg


def _check_compatible(unet_cfg: dict, cn_cfg: dict, text_dim: int, weights: GuidanceWeights) -> None:
    for key in ("cross_attention_dim", "block_out_channels", "layers_per_block"):
        a, b = unet_cfg.get(key), cn_cfg.get(key)
        if (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
            raise MissingModelError(
                f"the ControlNet {weights.controlnet_path} does not fit the Stable Diffusion model {weights.sd_path} "
                f"({key}: {b} vs {a}); it was trained for a different base model",
                f"use a depth ControlNet for SD1.5 (e.g. {DEPTH_CONTROLNET_REPOS[0]}) with an SD1.x model")
    if unet_cfg.get("cross_attention_dim") != text_dim:
        raise MissingModelError(f"the text encoder of {weights.sd_path} ({text_dim} wide) does not fit its UNet "
                                f"({unet_cfg.get('cross_attention_dim')})", "the model folder is inconsistent")


def import_diffusion_libraries() -> None:
    """Import diffusers and transformers, the latter's import-time warnings hushed: it warns about
    image processors SD never uses (no torchvision), noise in the user's log. Only its warnings,
    and only when the user has not chosen a verbosity."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import diffusers  # noqa: F401
    import transformers  # noqa: F401


def load_guidance_pipeline(weights: GuidanceWeights, device: str | torch.device = "cpu",
                           dtype: torch.dtype | None = None, *, allow_unsafe: bool = False) -> GuidancePipeline:
    """Load the UNet, VAE, CLIP text encoder, tokenizer, noise schedule and ControlNet, frozen.

    ``dtype`` None: fp16 on CUDA, fp32 otherwise. Pickle-based files are refused unless
    ``allow_unsafe`` (even then they are read with ``torch.load(weights_only=True)``).
    """
    import_diffusion_libraries()
    from diffusers import (AutoencoderKL, ControlNetModel, DDPMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):  # our own progress is on the job's events
        getattr(lib, "disable_progress_bar", lambda: None)()
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    for path, kind in ((weights.sd_path, weights.sd_kind), (weights.controlnet_path, weights.controlnet_kind)):
        if kind == "single_file":
            _check_safe(Path(path), allow_unsafe)
    sd = Path(weights.sd_path)

    if weights.sd_kind == "folder":
        def component(cls, sub: str, what: str, **extra):
            variant, safetensors = _pick_weights(sd / sub, sub, dtype, allow_unsafe)
            return _load(what, sd / sub, cls.from_pretrained, str(sd), subfolder=sub, variant=variant,
                         use_safetensors=safetensors, local_files_only=True, **extra)

        quiet = {} if importlib.util.find_spec("accelerate") else {"low_cpu_mem_usage": False}
        unet = component(UNet2DConditionModel, "unet", "UNet", torch_dtype=dtype, **quiet)
        vae = component(AutoencoderKL, "vae", "VAE", torch_dtype=dtype, **quiet)
        text_encoder = component(CLIPTextModel, "text_encoder", "text encoder", dtype=dtype)
        config_dir = sd
    elif weights.sd_kind == "single_file":
        if weights.sd_config_path is None:
            raise MissingModelError(f"{sd.name} needs a config folder (configs + tokenizer)",
                                    f"find the weights with find_guidance_weights(), or run `{SD_CONFIG_DOWNLOAD}`")
        config_dir = Path(weights.sd_config_path)
        pipe = _load("Stable Diffusion checkpoint", sd, StableDiffusionPipeline.from_single_file, str(sd),
                     config=str(config_dir), local_files_only=True, torch_dtype=dtype, safety_checker=None,
                     feature_extractor=None, requires_safety_checker=False)
        unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
    else:
        raise ValueError(f"unknown sd_kind {weights.sd_kind!r}")
    tokenizer = _load("tokenizer", config_dir / "tokenizer", CLIPTokenizer.from_pretrained, str(config_dir),
                      subfolder="tokenizer", local_files_only=True)
    scheduler = _load("noise schedule", config_dir / "scheduler", DDPMScheduler.from_pretrained, str(config_dir),
                      subfolder="scheduler", local_files_only=True)
    if scheduler.config.get("prediction_type", "epsilon") != "epsilon":
        raise MissingModelError(f"{sd} predicts {scheduler.config.prediction_type!r}, not noise (epsilon)",
                                "use an SD1.x model (SD2-v style models are not supported)")

    cn = Path(weights.controlnet_path)
    unet_cfg = dict(unet.config)
    if weights.controlnet_kind == "folder":
        variant, safetensors = _pick_weights(cn, "", dtype, allow_unsafe)
        cn_cfg = _read_json(cn / "config.json") or {}
        _check_compatible(unet_cfg, cn_cfg, text_encoder.config.hidden_size, weights)
        quiet = {} if importlib.util.find_spec("accelerate") else {"low_cpu_mem_usage": False}
        controlnet = _load("ControlNet", cn, ControlNetModel.from_pretrained, str(cn), variant=variant,
                           use_safetensors=safetensors, local_files_only=True, torch_dtype=dtype, **quiet)
    else:
        sibling = _read_json(cn.parent / "config.json")
        cn_cfg = sibling if sibling and sibling.get("_class_name") == "ControlNetModel" else \
            _controlnet_config_from_unet(unet_cfg)
        _check_compatible(unet_cfg, cn_cfg, text_encoder.config.hidden_size, weights)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "config.json").write_text(json.dumps(cn_cfg), encoding="utf-8")
            controlnet = _load("ControlNet", cn, ControlNetModel.from_single_file, str(cn), config=tmp,
                               local_files_only=True, torch_dtype=dtype)

    for m in (unet, vae, text_encoder, controlnet):
        m.requires_grad_(False)
        m.eval()
        m.to(device)  # already in `dtype`: the loaders cast
    return GuidancePipeline(unet, controlnet, vae, text_encoder, tokenizer, scheduler, weights, device, dtype)
