"""Body-fit benchmark on synthetic ground truth: `python -m tests.benchmarks.bench_fit [--cases a,b]`.

Each case poses Anny (named poses, varied shape and turn), looks at it with a known camera,
projects the COCO keypoints (with pixel noise) and rasterises the silhouette; the fit sees only
that Perception. Printed per case: MPJPE after root (mid-hip) alignment in mm, silhouette IoU,
2D keypoint error and seconds. The tests (tests/engine/test_fit.py) reuse these cases.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from zeroavatar_blender.engine.body.base import BodyModel, BodyParams
from zeroavatar_blender.engine.cameras import Camera, intrinsics, look_at
from zeroavatar_blender.engine.perception import Perception
from zeroavatar_blender.engine.render.raster import rasterize

# Named poses as Anny local-ref rotation vectors (radians, world-aligned axes at rest: +X is the
# subject's left, -Y their front, +Z up; e.g. a thigh turning about -X swings forward). Elbows
# bend about their hinge axis only: (-0.76, 0, -0.65) on the left, (-0.76, 0, 0.65) on the right.
POSES: dict[str, dict[str, tuple[float, float, float]]] = {
    "standing": {
        "upperarm01.L": (0.0, 0.45, 0.0), "upperarm01.R": (0.0, -0.45, 0.0),
        "lowerarm01.L": (-0.23, 0.0, -0.2), "lowerarm01.R": (-0.23, 0.0, 0.2),
        "upperleg01.L": (0.0, 0.08, 0.0), "upperleg01.R": (0.0, -0.08, 0.0),
        "neck02": (0.1, 0.0, 0.0),
    },
    "walking": {
        "upperleg01.L": (-0.45, 0.05, 0.0), "lowerleg01.L": (0.25, 0.0, 0.0),
        "upperleg01.R": (0.35, -0.05, 0.0), "lowerleg01.R": (0.55, 0.0, 0.0),
        "upperarm01.L": (0.35, 0.35, 0.0), "upperarm01.R": (-0.4, -0.35, 0.0),
        "lowerarm01.R": (-0.3, 0.0, 0.26), "spine03": (0.05, 0.0, 0.1),
    },
    "arms_raised": {
        "clavicle.L": (0.0, -0.25, 0.0), "clavicle.R": (0.0, 0.25, 0.0),
        "upperarm01.L": (0.0, -1.7, 0.0), "upperarm01.R": (0.0, 1.7, 0.0),
        "lowerarm01.L": (-0.23, 0.0, -0.2), "lowerarm01.R": (-0.23, 0.0, 0.2),
        "upperleg01.L": (0.0, -0.12, 0.0), "upperleg01.R": (0.0, 0.12, 0.0),
    },
    "kick": {
        "upperleg01.R": (-1.2, -0.1, 0.0), "lowerleg01.R": (0.35, 0.0, 0.0),
        "upperleg01.L": (0.1, 0.0, 0.0), "lowerleg01.L": (0.15, 0.0, 0.0),
        "spine03": (0.15, 0.0, 0.0), "spine02": (0.1, 0.0, 0.0),
        "upperarm01.L": (0.0, -0.7, 0.0), "upperarm01.R": (0.5, 0.6, 0.0),
        "lowerarm01.R": (-0.45, 0.0, 0.39),
    },
    "crouching": {  # as the benchmark photos' crouch (evaluation.poses): thighs forward, shins back
        "upperleg01.L": (-1.4, 0.0, -0.17), "upperleg01.R": (-1.4, 0.0, 0.17),
        "lowerleg01.L": (1.92, 0.0, 0.0), "lowerleg01.R": (1.92, 0.0, 0.0),
        "foot.L": (-0.52, 0.0, 0.0), "foot.R": (-0.52, 0.0, 0.0), "spine04": (-0.44, 0.0, 0.0),
        "upperarm01.L": (-0.7, 0.35, 0.0), "upperarm01.R": (-0.7, -0.35, 0.0),
        "lowerarm01.L": (-0.7, 0.0, 0.0), "lowerarm01.R": (-0.7, 0.0, 0.0),
    },
    "half_body": {
        "upperarm01.L": (0.0, 0.3, 0.0), "upperarm01.R": (-0.3, -0.2, 0.0),
        "lowerarm01.R": (-0.68, 0.0, 0.59), "head": (0.1, 0.0, 0.15),
    },
}


@dataclass
class Case:
    name: str
    pose: str
    shape: dict[str, float] = field(default_factory=dict)  # phenotype name -> value (others 0.5)
    yaw_deg: float = 0.0  # the subject's turn about the vertical; 0 faces the camera
    distance: float = 3.0  # metres from the camera to the aim point
    camera_height: float = 0.3  # metres above the pelvis (Anny's root is at the pelvis)
    aim: tuple[float, float, float] = (0.0, 0.0, -0.05)
    size: tuple[int, int] = (512, 512)
    focal_px: float | None = None  # None: the engine's default lens (and no EXIF)
    mask_scale: float = 1.0
    noise_px: float = 1.5
    seed: int = 0
    # The detector's 3D keypoints (Perception.keypoints3d) as the truth with its depth scaled by
    # this (BlazePose's are on the right side but often too shallow); None: no 3D keypoints.
    detector_depth: float | None = None


CASES: dict[str, Case] = {c.name: c for c in (
    Case("standing", "standing", {"gender": 0.2, "weight": 0.6}, yaw_deg=10, distance=3.0),
    Case("walking", "walking", {"gender": 0.8, "muscle": 0.65, "height": 0.6}, yaw_deg=-25, distance=3.5, seed=1),
    Case("arms_raised", "arms_raised", {"weight": 0.35, "proportions": 0.6}, yaw_deg=5, distance=4.0, seed=2),
    Case("kick", "kick", {"gender": 0.6, "height": 0.45, "weight": 0.55}, yaw_deg=30, distance=3.5, seed=3),
    Case("landscape", "walking", {"gender": 0.3, "age": 0.55}, yaw_deg=15, distance=3.2, size=(960, 540),
         focal_px=620.0, aim=(0.6, 0.0, -0.05), mask_scale=0.5, seed=4),
    Case("close", "standing", {"gender": 0.7, "weight": 0.45}, yaw_deg=-10, distance=2.5, camera_height=0.1,
         size=(480, 640), seed=5),
    Case("heavy", "walking", {"gender": 0.1, "weight": 0.9, "muscle": 0.3}, yaw_deg=-5, distance=3.2, seed=7),
)}
CROUCH = Case("crouch", "crouching", {"gender": 0.3}, yaw_deg=0, distance=3.0, seed=8, detector_depth=0.6)
HALF_BODY = Case("half_body", "half_body", {"gender": 0.4}, yaw_deg=-5, distance=1.5, camera_height=0.45,
                 aim=(0.0, 0.0, 0.35), seed=6)


@dataclass
class Truth:
    params: BodyParams
    camera: Camera
    keypoints_cam: np.ndarray  # (17,3)
    keypoints2d: np.ndarray  # (17,2) without noise
    mask: np.ndarray  # (h,w) bool at the mask resolution


def case_params(body: BodyModel, case: Case) -> BodyParams:
    p = body.zero_params()
    for bone, rv in POSES[case.pose].items():
        p.pose[0, body.bone_names.index(bone)] = torch.tensor(rv, dtype=p.pose.dtype)
    for name, value in case.shape.items():
        p.shape[0, body.shape_names.index(name)] = value
    p.global_orient[0] = torch.tensor([0.0, 0.0, math.radians(case.yaw_deg)])
    return p


def make_case(body: BodyModel, case: Case) -> tuple[Perception, Truth]:
    """The Perception a perfect detector would give for this case, and the ground truth."""
    params = case_params(body, case)
    W, H = case.size
    K = intrinsics(W, H, case.focal_px)
    aim = np.asarray(case.aim)
    eye = aim + np.array([0.0, -case.distance, case.camera_height])
    camera = Camera(K, look_at(eye, aim), W, H)
    with torch.no_grad():
        out = body.forward(params)
    verts = out.vertices[0].double().numpy()
    kp = out.keypoints[0].double().numpy()
    kp2d = camera.project(kp)
    rng = np.random.default_rng(case.seed)
    noisy = kp2d + rng.normal(0, case.noise_px, kp2d.shape)
    inside = (noisy[:, 0] >= 0) & (noisy[:, 0] <= W - 1) & (noisy[:, 1] >= 0) & (noisy[:, 1] <= H - 1)
    conf = np.where(inside, rng.uniform(0.75, 1.0, 17), 0.0).astype(np.float32)
    mcam = camera.scaled(case.mask_scale)
    r = rasterize(torch.as_tensor(camera.to_cam(verts), dtype=torch.float32), torch.as_tensor(body.faces),
                  torch.as_tensor(mcam.K, dtype=torch.float32), mcam.width, mcam.height)
    mask = r.mask.numpy()
    ys, xs = np.nonzero(mask)
    bbox = np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float32) / case.mask_scale
    kp_cam = camera.to_cam(kp)
    kp3 = None
    if case.detector_depth is not None:
        kp3 = ((kp_cam - kp_cam[[11, 12]].mean(0)) * np.array([1.0, 1.0, case.detector_depth])).astype(np.float32)
    perception = Perception(np.where(inside[:, None], noisy, 0).astype(np.float32), conf, mask.astype(np.float32),
                            float(case.mask_scale), (W, H), bbox, 0, 1, kp3)
    return perception, Truth(params, camera, kp_cam, kp2d, mask)


def mpjpe_mm(pred_cam: np.ndarray, true_cam: np.ndarray, *, scale: bool = False) -> float:
    """Mean joint error after aligning the mid-hips (root), in millimetres. ``scale`` also fits the
    best overall size, taking out the one thing a single photo cannot tell (tall and far vs short
    and near), to show how much of the error that is."""
    p = pred_cam - pred_cam[[11, 12]].mean(0)
    t = true_cam - true_cam[[11, 12]].mean(0)
    if scale:
        p = p * (p * t).sum() / (p * p).sum()
    return float(np.linalg.norm(p - t, axis=1).mean() * 1000)


def fitted_mask(body: BodyModel, fit, truth: Truth, mask_scale: float) -> np.ndarray:
    """The fitted body's silhouette at the truth mask's resolution, from the saved camera and params."""
    with torch.no_grad():
        verts = body.forward(fit.params).vertices[0].double().numpy()
    cam = fit.camera.scaled(mask_scale)
    h, w = truth.mask.shape
    r = rasterize(torch.as_tensor(fit.camera.to_cam(verts), dtype=torch.float32), torch.as_tensor(body.faces),
                  torch.as_tensor(cam.K, dtype=torch.float32), w, h)
    return r.mask.numpy()


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / max(int((a | b).sum()), 1)


def evaluate(body: BodyModel, case: Case, fit, perception: Perception, truth: Truth) -> dict[str, float]:
    pred = fitted_mask(body, fit, truth, case.mask_scale)
    seen = perception.confidence > 0
    err2d = np.linalg.norm(fit.keypoints2d - truth.keypoints2d, axis=1)[seen].mean()
    return {"mpjpe_mm": mpjpe_mm(fit.keypoints3d_cam, truth.keypoints_cam),
            "mpjpe_scaled_mm": mpjpe_mm(fit.keypoints3d_cam, truth.keypoints_cam, scale=True),
            "iou": iou(pred, truth.mask), "kp_err_px": float(err2d), "seconds": float(fit.metrics["seconds"])}


def main(argv: list[str] | None = None) -> int:
    import os

    from zeroavatar_blender.engine.body import load_body
    from zeroavatar_blender.engine.fit import FitConfig, fit_body

    cases = {**CASES, HALF_BODY.name: HALF_BODY, CROUCH.name: CROUCH}
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(cases), help="comma-separated, from: " + ", ".join(cases))
    ap.add_argument("--iterations", type=int, default=None, help="pose + full iterations (default: the fit's)")
    ap.add_argument("--optimizer", choices=("lbfgs", "adam"), default="lbfgs", help="for the silhouette stage")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = FitConfig(full_optimizer=args.optimizer)
    body = load_body("anny")
    fit_body(make_case(body, cases["standing"])[0], body, iterations=2)  # warm-up: priors, caches
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}, "
          f"{os.cpu_count()} CPUs; MPJPE after root alignment (S: and best scale)")
    print(f"{'case':12s} {'size':>9s} {'MPJPE mm':>9s} {'S mm':>6s} {'IoU':>6s} {'2D px':>6s} "
          f"{'wall s':>7s} {'cpu s':>6s}")
    rows = []
    for name in args.cases.split(","):
        case = cases[name]
        perception, truth = make_case(body, case)
        wall, cpu = time.perf_counter(), time.process_time()
        fit = fit_body(perception, body, focal_px=case.focal_px, iterations=args.iterations, seed=case.seed,
                       config=config)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        m = {**evaluate(body, case, fit, perception, truth), "wall": wall, "cpu": cpu}
        rows.append(m)
        print(f"{name:12s} {case.size[0]:4d}x{case.size[1]:<4d} {m['mpjpe_mm']:9.1f} {m['mpjpe_scaled_mm']:6.1f} "
              f"{m['iou']:6.3f} {m['kp_err_px']:6.2f} {wall:7.2f} {cpu:6.2f}", flush=True)
    if rows:
        mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        print(f"{'mean':12s} {'':9s} {mean['mpjpe_mm']:9.1f} {mean['mpjpe_scaled_mm']:6.1f} {mean['iou']:6.3f} "
              f"{mean['kp_err_px']:6.2f} {mean['wall']:7.2f} {mean['cpu']:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
