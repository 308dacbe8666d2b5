"""Run the engine on the synthetic ground-truth set and measure what it made.

Each (case, quality) runs the real command line in a subprocess (``generate --no-export``), so
timings and peak memory are what users get. A case whose output is missing or empty is a
failure, never a silent skip: ``evaluate_job`` raises and the report marks it.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import protocol
from ..engine.cameras import Camera
from .metrics import mask_iou, mpjpe, pa_mpjpe, psnr, ssim, surface_metrics, umeyama

PACKAGE_PARENT = Path(__file__).resolve().parents[2]


class MissingOutputError(RuntimeError):
    """The engine ran but did not produce what the benchmark must measure."""


@dataclass
class CaseResult:
    case: str
    quality: str
    garment: str | None
    ok: bool
    error: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)


def run_engine(photo: Path, job: Path, quality: str, *, steps: int | None = None, seed: int = 0,
               timeout: float = 3600, extra_args: list[str] | None = None) -> tuple[int, float]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(PACKAGE_PARENT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "zeroavatar_blender.engine", "generate", str(photo), "--out", str(job),
           "--quality", quality, "--no-export", "--progress", "none", "--seed", str(seed)]
    if steps is not None:
        cmd += ["--steps", str(steps)]
    cmd += extra_args or []
    started = time.time()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout)
    if proc.returncode != 0:
        (job / "bench_stderr.log").write_bytes(proc.stderr[-20000:])
    return proc.returncode, time.time() - started


def last_run(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events of the newest engine process: a reused job folder keeps its earlier runs'
    events (a client may be tailing the file), and they must not count in this run's times."""
    starts = [i for i, e in enumerate(events) if e["type"] == "started"]
    return events[starts[-1]:] if starts else events


def stage_seconds(events: list[dict[str, Any]]) -> dict[str, float]:
    """Wall time per stage from the event stream (a stage lasts until the next stage or done)."""
    out: dict[str, float] = {}
    marks = [(e["time"], e["stage"]) for e in events if e["type"] == "stage"]
    end = next((e["time"] for e in reversed(events) if e["type"] == "done"), None)
    if end is None:
        return out
    for i, (t, name) in enumerate(marks):
        t_next = marks[i + 1][0] if i + 1 < len(marks) else end
        key = {"texture": "finalise", "preview": "finalise"}.get(name, name)
        out[key] = round(out.get(key, 0.0) + (t_next - t), 3)
    start = next(e["time"] for e in events if e["type"] == "started")
    out["total"] = round(end - start, 3)
    return out


def _load_ply(path: Path) -> np.ndarray:
    import trimesh

    mesh = trimesh.load(path, process=False)
    return np.asarray(mesh.vertices, np.float64)


def render_bundle(vertices: np.ndarray, bundle, camera: Camera) -> tuple[np.ndarray, np.ndarray]:
    """(rgb float (H,W,3), mask) of an avatar's mesh at a camera, textured and unlit."""
    from ..engine.render.raster import render_mesh

    out = render_mesh(torch.as_tensor(np.ascontiguousarray(vertices), dtype=torch.float32),
                      np.asarray(bundle.faces, np.int64), camera,
                      corner_uv=np.asarray(bundle.corner_uv), texture=np.array(bundle.texture))
    return out["rgb"].numpy().astype(np.float64), out["mask"].numpy()


def evaluate_job(job: Path, case_dir: Path) -> dict[str, float]:
    """Metrics of one finished job against its ground truth. Raises MissingOutputError."""
    from PIL import Image

    from ..engine.avatar import AvatarBundle

    meta = json.loads((case_dir / "gt.json").read_text())
    gt_cam = Camera.from_json(meta["camera"])
    fit_path = job / "fit.json"
    ply = job / "exports" / "avatar_posed.ply"
    for path in (fit_path, ply, job / "result" / "avatar.json"):
        if not path.exists() or path.stat().st_size == 0:
            raise MissingOutputError(f"{path} is missing or empty")
    fit = json.loads(fit_path.read_text())
    bundle = AvatarBundle.load(job / "result")
    posed_cam = _load_ply(ply)  # the avatar in the photo camera's OpenCV frame
    if len(posed_cam) == 0 or len(bundle.faces) == 0:
        raise MissingOutputError(f"{ply} has no geometry")
    if len(posed_cam) != len(bundle.vertices):
        raise MissingOutputError(f"{ply} does not match the avatar bundle ({len(posed_cam)} vs {len(bundle.vertices)} vertices)")

    m: dict[str, float] = {}
    # joints, in the ground-truth camera frame (mm)
    kp_gt = gt_cam.to_cam(np.asarray(meta["keypoints3d"]))
    kp_fit = np.asarray(fit["keypoints3d_cam"], np.float64)
    hips = np.array([11, 12])
    m["mpjpe_mm"] = 1000 * mpjpe(kp_fit, kp_gt, hips)
    m["pa_mpjpe_mm"] = 1000 * pa_mpjpe(kp_fit, kp_gt)
    if "silhouette_iou" in fit.get("metrics", {}):
        m["fit_iou"] = float(fit["metrics"]["silhouette_iou"])
    # surfaces, after a similarity alignment (monocular scale/depth ambiguity)
    gt = np.load(case_dir / "gt_mesh.npz")
    gt_v_cam = gt_cam.to_cam(gt["vertices"].astype(np.float64))
    sm = surface_metrics(posed_cam, bundle.faces, gt_v_cam, gt["faces"], samples=20000, seed=0)
    m.update({"chamfer_cm": sm.chamfer_cm, "normal_consistency": sm.normal_consistency,
              "fscore_1cm": sm.fscore_1cm, "fscore_2cm": sm.fscore_2cm})
    # views: align the prediction to the ground truth (world), then render at the GT cameras
    from .metrics import align_similarity_icp, sample_surface

    p, _ = sample_surface(posed_cam, np.asarray(bundle.faces), 20000, 0)
    g, _ = sample_surface(gt_v_cam, gt["faces"], 20000, 1)
    s, R, t = align_similarity_icp(p, g)
    aligned_cam = s * posed_cam @ R.T + t
    R_wc, t_wc = gt_cam.R, gt_cam.t
    aligned_world = (aligned_cam - t_wc) @ R_wc  # camera -> world
    for view in ("front", "side", "back"):
        cam = Camera.from_json(meta["views"][view])
        gt_rgb = np.asarray(Image.open(case_dir / "views" / f"{view}_rgb.png"), np.float64) / 255
        gt_mask = np.asarray(Image.open(case_dir / "views" / f"{view}_mask.png")) > 127
        rgb, mask = render_bundle(aligned_world, bundle, cam)
        (job / "eval").mkdir(exist_ok=True)
        Image.fromarray((np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)).save(job / "eval" / f"{view}.png")
        union = gt_mask | mask
        m[f"{view}_psnr"] = psnr(rgb, gt_rgb, union)
        m[f"{view}_ssim"] = ssim(rgb * union[..., None], gt_rgb * union[..., None])
        m[f"{view}_iou"] = mask_iou(mask, gt_mask)
    return {k: (round(float(v), 4) if math.isfinite(float(v)) else float("nan")) for k, v in m.items()}


def machine_description() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = "CPU"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    return {"cpu": cpu, "cores": str(os.cpu_count()), "device": device, "torch": torch.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


def run_case(case_dir: Path, out: Path, quality: str, *, steps: int | None = None, seed: int = 0,
             extra_args: list[str] | None = None, variant: str = "") -> CaseResult:
    """One engine run of a case and its metrics. ``variant`` names a run with ``extra_args``
    (job folder CASE_QUALITY_VARIANT, quality label QUALITY+VARIANT)."""
    meta = json.loads((case_dir / "gt.json").read_text())
    job = out / (f"{case_dir.name}_{quality}" + (f"_{variant}" if variant else ""))
    label = quality + (f"+{variant}" if variant else "")
    result = CaseResult(case_dir.name, label, meta["spec"].get("garment"), ok=False)
    rc, wall = run_engine(case_dir / "photo.png", job, quality, steps=steps, seed=seed, extra_args=extra_args)
    events = last_run(list(protocol.iter_events(job / "events.jsonl")) if (job / "events.jsonl").exists() else [])
    result.seconds = stage_seconds(events)
    result.seconds.setdefault("total", round(wall, 3))
    done = next((e for e in reversed(events) if e["type"] == "done"), {})
    result.memory = {k: done[k] for k in ("peak_rss_mb", "cuda_peak_mb", "cuda_reserved_peak_mb") if k in done}
    if rc != 0:
        err = next((e for e in reversed(events) if e["type"] == "error"), {})
        result.error = f"engine exit {rc}: {err.get('message', 'see bench_stderr.log')}"
        return result
    try:
        result.metrics = evaluate_job(job, case_dir)
        result.ok = True
    except MissingOutputError as exc:
        result.error = str(exc)
    return result
