"""`check`: what this machine can run, before a photo is spent on finding out.

Why: each quality needs other things (the body model for all; a CUDA GPU and the diffusion
weights for `full`; nvcc for `full`'s fast ray marcher), and a run that lacks one stops minutes
in, or, for the Anny cache and nerfacc's first compile, spends its first minutes building them.
Each check looks without loading anything large (the weights are found, not loaded); ``prepare``
builds the two first-use items ahead, so the first run is as fast as the next.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from .. import protocol
from .errors import EngineError

QUALITIES = ("fast", "standard", "full")


@dataclass
class Check:
    name: str
    status: str  # "ok", "note" (runs, with a cost or a limit worth knowing) or "missing"
    detail: str
    fix: str = ""
    blocks: tuple[str, ...] = ()  # the qualities that cannot run while this is missing
    code: int = protocol.EXIT_OK  # the exit code a run stopped by it would give

    @staticmethod
    def failed(name: str, exc: EngineError, blocks: tuple[str, ...]) -> "Check":
        return Check(name, "missing", exc.message, exc.hint, blocks, exc.code)


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)

    def can_run(self, quality: str) -> bool:
        return not any(quality in c.blocks for c in self.checks)

    def exit_code(self, quality: str) -> int:
        """The first blocking check's code for ``quality``, else 0."""
        return next((c.code for c in self.checks if quality in c.blocks), protocol.EXIT_OK)

    def lines(self) -> list[str]:
        mark = {"ok": "ok     ", "note": "note   ", "missing": "MISSING"}
        out = []
        for c in self.checks:
            out.append(f"{mark[c.status]} {c.name}: {c.detail}")
            if c.fix:
                out.append(f"        -> {c.fix}")
        out.append("can run: " + ", ".join(f"{q} {'yes' if self.can_run(q) else 'no'}" for q in QUALITIES))
        return out

    def to_json(self) -> dict:
        return {"checks": [asdict(c) for c in self.checks], "can_run": {q: self.can_run(q) for q in QUALITIES}}


def check_device(device: str, allow_slow: bool) -> Check:
    import torch

    from .optimise import full_on_this_device
    from .pipeline import resolve_device

    try:
        resolved = resolve_device(device)
    except EngineError as exc:
        return Check.failed("device", exc, QUALITIES)
    if resolved == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return Check("device", "ok", f"{props.name}, {props.total_memory / 2**30:.1f} GiB (torch {torch.__version__}, "
                     f"CUDA {torch.version.cuda}); a default full run needs about 7 GiB")
    detail = f"CPU, {torch.get_num_threads()} threads (torch {torch.__version__}): fast and standard run here"
    problem = full_on_this_device(resolved, allow_slow)
    if problem is None:
        return Check("device", "note", detail + "; full too, as --allow-slow asks, in many hours")
    return Check("device", "note", detail + "; full needs a CUDA GPU in practice", problem.hint, ("full",), problem.code)


def check_body(name: str, model_path: str | None, allow_pickle: bool) -> Check:
    label = f"body model ({name})"
    if name == "anny":
        try:
            import anny  # noqa: F401
        except ImportError as exc:
            return Check(label, "missing", f"cannot import anny ({exc})", "reinstall the engine's packages",
                         QUALITIES, protocol.EXIT_MISSING_MODEL)
        from .body.anny_body import anny_cache_dir, anny_cache_ready

        cache = anny_cache_dir()
        if anny_cache_ready(cache):
            return Check(label, "ok", f"cache ready in {cache}")
        return Check(label, "note", f"no cache in {cache} yet: the first run builds it (about 90 s and 800 MB)",
                     "build it now with `check --prepare`, or set ZEROAVATAR_ANNY_CACHE to another folder")
    from .body import load_body

    try:
        body = load_body(name, model_path, allow_pickle=allow_pickle)
    except EngineError as exc:
        return Check.failed(label, exc, QUALITIES)
    return Check(label, "ok", f"{body.num_vertices} vertices from {model_path}")


def check_perception() -> Check:
    from .perception import load_pose_model

    try:
        version = load_pose_model()
    except EngineError as exc:
        return Check.failed("person detection", exc, QUALITIES)
    return Check("person detection", "ok", f"MediaPipe BlazePose (mediapipe {version})")


def check_exports() -> Check:
    from .exports import blender_python

    python = blender_python()
    if python is None:
        return Check("FBX/glTF export", "note", "this Python has no `bpy`: command-line runs write the avatar bundle "
                     "but skip FBX/glTF (the Blender add-on exports in Blender itself)",
                     "pip install bpy==5.0.1 into the engine's environment, or set ZEROAVATAR_BLENDER_PYTHON")
    return Check("FBX/glTF export", "ok", f"Blender's exporters through {python}")


def check_weights(sd: str | None, controlnet: str | None) -> Check:
    from .guidance.weights import find_guidance_weights

    try:
        weights = find_guidance_weights(sd, controlnet)
    except EngineError as exc:
        return Check.failed("diffusion weights (full)", exc, ("full",))
    return Check("diffusion weights (full)", "ok", weights.description + " (found, not loaded)")


def check_ray_marcher() -> Check:
    from .render.cuda_marcher import cuda_marcher_readiness

    state, detail = cuda_marcher_readiness()
    if state in ("ready", "not needed"):
        return Check("GPU ray marcher (nerfacc)", "ok", detail)
    fix = "build it now with `check --prepare`" if state == "will compile" else ""
    return Check("GPU ray marcher (nerfacc)", "note", detail, fix)


def prepare(body: str, device: str, say: Callable[[str], None]) -> None:
    """Build the first-use items now: the Anny cache and nerfacc's CUDA ray marcher."""
    if body == "anny":
        from .body.anny_body import load_anny

        load_anny(on_message=say)
    from .pipeline import resolve_device

    if resolve_device(device) == "cuda":
        from .render.cuda_marcher import cuda_marcher_status

        usable, reason = cuda_marcher_status(on_message=say)
        say("GPU ray marcher ready" if usable else f"GPU ray marcher unavailable: {reason}")


def run_checks(*, device: str = "auto", body: str = "anny", body_model_path: str | None = None,
               allow_pickle: bool = False, sd_weights: str | None = None, controlnet_weights: str | None = None,
               allow_slow: bool = False) -> Report:
    return Report([check_device(device, allow_slow), check_body(body, body_model_path, allow_pickle),
                   check_perception(), check_exports(), check_weights(sd_weights, controlnet_weights),
                   check_ray_marcher()])
