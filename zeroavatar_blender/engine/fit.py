"""Fit the parametric body (shape, pose, camera) to the photo's 2D keypoints and person mask.

The camera keeps a fixed rotation (``cameras.FRONT_VIEW_R``) and the photo's focal length; the
body's ``global_orient`` carries the viewing angle. Steps:
  1. initialise: depth from the torso's size in pixels, then a rigid fit of the natural-pose
     body's torso and face to their keypoints from several starting turns (front, three-quarter,
     back) and both left/right labellings; a visible face decides front from back, the given
     labels break ties;
  2. pose (Adam): every fitted bone, with a robust (Geman-McClure) reprojection loss, a pose prior
     toward a natural standing pose and joint limits (knees, elbows, hips, shoulders). Two pose
     hypotheses run as one batch (limbs at rest, limbs flexed forward), since a foreshortened limb
     may point toward or away from the camera; each limb keeps the better one. A second start
     joins the batch when step 1 was a near-tie. Where the detector gave 3D keypoints, a
     one-sided term (fit_losses.tilt_terms, in every stage) keeps each limb on the side of the
     image plane the detector saw it on: the hypotheses settle the amount, the detector the side
     (a squat's thighs and shins; bench_fit_shape MPJPE 89.5 -> 80.3 mm, crouch 214 -> 60 mm);
  3. pose + shape + silhouette (L-BFGS, which walks the flat, depth-ambiguous directions much
     faster than Adam): vertices off the mask (distance transform) and mask pixels no vertex comes
     near (coverage), on an evenly spread vertex subset; a prior holds the upper arms near the
     torso's frontal plane where the 2D evidence is flat. Shape barely moves here: its effect on
     the silhouette is a few pixels against the pose's tens, so the steps go to the pose;
  3a/3c. shape refinement before and after step 3, pose held: shape and translation alone, in
     steps scaled to move the silhouette about a pixel each, with a two-sided contour term (the
     body's rendered silhouette edge against the mask's edge, see fit_losses.contour_loss) that
     pulls a too-thin body out as hard as a too-wide one in. The one-sided outside and coverage
     terms could not: the outside term pushes in from zero distance, coverage only pulls beyond
     half a vertex spacing (about 4 px), so bodies came out thin.
A known standing height (``height_m``) moves the shape prior to a body of that height
(pose_prior.prior_for_height) and holds it through steps 3a-3c; step 2 still runs on the average
body, which is then grown to the height along the camera's rays (the same picture).
Joints with zero confidence (a half-body photo's legs) are left to the prior: they hang straight.
Afterwards the translation is moved into the camera, so the body's root is at the world origin.
Weights and priors are tuned on tests/benchmarks/bench_fit.py, the shape refinement also on the
benchmark photos (tests/benchmarks/bench_fit_shape.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import fit_losses as L
from . import pose_prior as P
from .body.base import COCO17, COCO17_MIRROR, BodyModel, BodyParams, rest_height, rotvec_to_matrix
from .cameras import FRONT_VIEW_R, Camera, intrinsics, project_torch, scaled_intrinsics
from .errors import BadInputError, NoPersonError

FIT_FORMAT = "zeroavatar.fit"
FIT_VERSION = 1

_SH_L, _SH_R, _HIP_L, _HIP_R = 5, 6, 11, 12
_TORSO = (5, 6, 11, 12)
_FACE = (0, 1, 2, 3, 4)
_VISIBLE = 0.2  # confidence above which a keypoint counts as seen


@dataclass
class BodyFit:
    body: str  # "anny" | "smpl" | "smplx"
    body_model_path: str | None
    params: BodyParams  # batch 1
    camera: Camera  # for the ORIGINAL photo size (K in original px, OpenCV world_to_cam)
    keypoints3d_cam: np.ndarray  # (17,3) COCO keypoints in camera space, metres
    keypoints2d: np.ndarray  # (17,2) their projections in original photo px
    metrics: dict = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FIT_FORMAT, "version": FIT_VERSION,
            "body": self.body, "body_model_path": self.body_model_path,
            "params": self.params.to_json(),
            "camera": self.camera.to_json(),
            "keypoint_names": list(COCO17),
            "keypoints3d_cam": np.asarray(self.keypoints3d_cam, dtype=np.float64).round(6).tolist(),
            "keypoints2d": np.asarray(self.keypoints2d, dtype=np.float64).round(3).tolist(),
            "metrics": _plain(self.metrics),
        }

    def save(self, path: str | Path) -> None:
        from .job import atomic_write_json

        atomic_write_json(Path(path), self.to_json())

    @staticmethod
    def load(path: str | Path) -> "BodyFit":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise BadInputError(f"no body fit at {path}", "run the fit stage first (`fit` or `generate`)") from exc
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadInputError(f"the body fit {path} is unreadable: {exc}", "rerun the fit stage") from exc
        return BodyFit.from_json(data, source=str(path))

    @staticmethod
    def from_json(data: Any, source: str = "fit.json") -> "BodyFit":
        hint = "rerun the fit stage to write a new one"
        if not isinstance(data, dict) or data.get("format") != FIT_FORMAT:
            raise BadInputError(f"{source} is not a ZeroAvatar body fit", hint)
        if int(data.get("version", 0)) > FIT_VERSION:
            raise BadInputError(f"{source} was written by a newer ZeroAvatar (fit version {data['version']})",
                                "update the add-on and engine")
        try:
            params = BodyParams.from_json(data["params"])
            camera = Camera.from_json(data["camera"])
            kp3 = np.asarray(data["keypoints3d_cam"], dtype=np.float64).reshape(17, 3)
            kp2 = np.asarray(data["keypoints2d"], dtype=np.float64).reshape(17, 2)
            fit = BodyFit(str(data["body"]), data.get("body_model_path"), params, camera, kp3, kp2,
                          dict(data.get("metrics", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise BadInputError(f"{source} is damaged ({type(exc).__name__}: {exc})", hint) from exc
        if params.pose.dim() != 3 or params.pose.shape[0] != 1 or params.shape.dim() != 2:
            raise BadInputError(f"{source} is damaged (pose/shape arrays have the wrong shape)", hint)
        return fit


def _plain(obj: Any) -> Any:
    """JSON-safe copy (numpy scalars, tuples, non-finite floats -> None)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_plain(v) for v in (obj.tolist() if isinstance(obj, np.ndarray) else obj)]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


@dataclass
class FitConfig:
    """Weights and schedule. Distances are in torso lengths (see fit_losses)."""

    rigid_iterations: int = 60
    pose_iterations: int = 40  # stage 2: keypoints only
    full_iterations: int = 80  # stage 3: + shape + silhouette (L-BFGS evaluations)
    lr_pose: float = 0.05
    lr_orient: float = 0.03
    lr_transl: float = 0.03  # metres
    lr_shape: float = 0.1  # shape standard deviations
    sigma_kp: float = 0.15
    w_pose: float = 0.004
    w_limit: float = 1.0
    w_upright: float = 0.02
    w_shape: float = 0.005
    w_outside: float = 5.0
    w_cover: float = 5.0
    sigma_sil: float = 0.1
    vertex_subset: int = 1200
    full_optimizer: str = "lbfgs"  # or "adam" (needs about twice the iterations for the same accuracy)
    tie_margin: float = 0.25  # carry a second start when its rigid loss is within this ratio
    w_arm_depth: float = 0.05  # stage 3: upper arms near the torso's frontal plane (see _arm_depth_loss)
    shape_pre_iterations: int = 15  # stage 3a: shape refinement before stage 3 (L-BFGS evaluations)
    shape_post_iterations: int = 20  # stage 3c: shape refinement after stage 3
    w_contour: float = 5.0  # stages 3a/3c: silhouette edge against the mask's edge
    sigma_contour: float = 0.1  # torso lengths
    contour_points: int = 1500  # silhouette edge pixels sampled (evenly along the edge)
    # Phenotypes held during the shape refinement: Anny's "proportions" mostly trades shin length,
    # torso length and shoulder width, which is what a held pose's errors look like (measured on
    # bench_fit: half_body MPJPE 28 -> 56 mm when it moved, 36 mm when held).
    shape_held: tuple[str, ...] = ("proportions",)
    # Limb tilt from the detector's 3D keypoints (fit_losses.tilt_terms), all stages: which way a
    # foreshortened limb points is what 2D keypoints cannot tell (a squat's thighs came out pointing
    # back, a backward lean). Bones the detector sees tilted less than ``tilt_min`` (sine) are left
    # alone: there it was often wrong about the side.
    w_tilt: float = 0.1
    tilt_min: float = 0.3
    tilt_share: float = 0.3
    # A known standing height (fit_body's ``height_m``) holds the body's rest height within about
    # ``sigma_height`` metres while the shape stages move the other values.
    w_height: float = 1.0
    sigma_height: float = 0.005
    # With a known height, stage 2 (which picks each limb's hypothesis) still runs on the average
    # body, which is then grown or shrunk to the height and moved along the camera's rays by the
    # same ratio (the same picture): the height settles size and distance, never which way a limb
    # points. bench_fit_shape --known-height, MPJPE / PA-MPJPE means: 53.9 / 33.5 mm this way,
    # 55.2 / 33.9 with stage 2 on the body of that height (single cases move by +-15 mm either way).
    height_pose_at_average: bool = True
    # Apparent age (bodies with an "age" value: Anny). A child differs from an adult in
    # proportions a photo shows (Anny's ear-to-ear span is 12 % of the height at age 0.15, 9 % at
    # 0.5), and the size follows from the age. But the fit starts from the adult mean, and the
    # size prior holds age near it: a 0.88 m child was fitted 1.43 m tall at age 0.41. When the
    # first fit's age ends ``young_lean`` prior deviations or more under the mean, stage 3 is
    # run again from each of ``young_starts`` (the body shrunk to it, as far from the camera by
    # the same ratio), and the one with the lowest objective is kept if it beats the first by
    # ``young_margin``. bench_fit_shape, the 16 photos: MPJPE 81.8 -> 69.3 mm; three lean, two keep
    # a young start (the child 184 -> 44 mm; see docs/BENCHMARKS.md). Empty: off.
    young_starts: tuple[float, ...] = (0.15, 0.3)
    young_lean: float = 0.1
    # A young start must lower the objective by this share to be kept: a near tie keeps the adult,
    # the likelier subject (a synthetic crouch, its legs foreshortened like a child's, tied within 0.1 %).
    young_margin: float = 0.03


@dataclass
class _Target:
    kp: torch.Tensor  # (2,17,2) as given and with left/right swapped
    conf: torch.Tensor  # (2,17)
    scale_px: float
    K: torch.Tensor
    R: torch.Tensor  # (3,3) world -> camera rotation
    face_seen: float
    tilt: torch.Tensor  # (2,8) the detector's bone tilts (fit_losses.TILT_BONES), as given and swapped
    tilt_w: torch.Tensor  # (2,8) 1 where a tilt is to be trusted, else 0


@contextmanager
def _one_thread() -> Iterator[None]:
    """torch's multi-threaded CPU kernels sum in an order that varies from run to run; L-BFGS
    turns those last-bit differences into poses up to 0.03 rad apart (measured: two fits of one
    photo in one process). One thread makes the fit repeatable for ~15 % more time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fit_body(perception: Any, body: BodyModel, *, focal_px: float | None = None, iterations: int | None = None,
             on_progress: Callable[[int, int, float], None] | None = None,
             check_cancel: Callable[[], None] | None = None, seed: int = 0,
             config: FitConfig | None = None, height_m: float | None = None) -> BodyFit:
    """Fit ``body`` to a Perception (keypoints and mask in the original photo's pixels).

    ``height_m``: the person's standing height when the user knows it. A photo cannot tell a short
    person near the camera from a tall one further away, so the fit otherwise takes an average
    size; given, the body keeps that rest height (``FitConfig.sigma_height``) and the distance
    follows from it. BadInputError when the body model cannot stand that tall or short.

    ``iterations``: the pose and silhouette stages' steps together (default 120), split as in
    ``FitConfig``. ``on_progress(step, total, loss)`` and ``check_cancel()`` are called once per
    step (per objective evaluation in the L-BFGS stage). ``seed`` picks the mask pixels the
    coverage term samples; the fit is otherwise deterministic (bit for bit on one machine).
    """
    with _one_thread():
        return _fit_body(perception, body, focal_px=focal_px, iterations=iterations, on_progress=on_progress,
                         check_cancel=check_cancel, seed=seed, config=config, height_m=height_m)


def _fit_body(perception: Any, body: BodyModel, *, focal_px: float | None, iterations: int | None,
              on_progress: Callable[[int, int, float], None] | None, check_cancel: Callable[[], None] | None,
              seed: int, config: FitConfig | None, height_m: float | None) -> BodyFit:
    started = time.perf_counter()
    cfg = config or FitConfig()
    if iterations is not None:
        cfg = _split_iterations(cfg, iterations)
    kp, conf, mask, mask_scale, (W, H) = _check_perception(perception)
    dtype, device = body.dtype, body.device
    prior = _prior(body, height_m, cfg)
    K = intrinsics(W, H, focal_px)
    target = _make_target(kp, conf, K, prior, dtype, device, _keypoints3d(perception), cfg)
    stage3 = cfg.shape_pre_iterations + cfg.full_iterations + cfg.shape_post_iterations
    total_steps = cfg.pose_iterations + stage3
    step = 0
    age_start: float | None = None  # the young start the fit kept (see FitConfig.young_starts)

    def tick(loss: float) -> None:
        nonlocal step
        step += 1
        if check_cancel is not None:
            check_cancel()
        if on_progress is not None:  # L-BFGS's line search may take a few evaluations more
            on_progress(min(step, total_steps), total_steps, loss)

    if check_cancel is not None:
        check_cancel()
    pose_prior = P.body_prior(body) if height_m is not None and cfg.height_pose_at_average else prior
    starts = _rigid_starts(target, pose_prior, cfg)
    var, label, chosen = _fit_pose(body, pose_prior, target, starts, cfg, tick)
    if pose_prior is not prior:
        var = _rescaled(body, var, pose_prior, prior)
    if stage3:
        sil = L.silhouette_target(mask, mask_scale, seed=seed, dtype=dtype)
        sil.outside, sil.points, sil.signed = sil.outside.to(device), sil.points.to(device), sil.signed.to(device)
        start = var.select(0)
        var, loss = _fit_full(body, prior, target, sil, var, label, cfg, tick, height_m)
        first_loss = loss
        if height_m is None:
            young = _young_starts(body, prior, var, cfg)
            total_steps += len(young) * stage3
            for age in young:
                trial_prior = _with_age(body, prior, age)
                trial_start = _rescaled(body, start, prior, trial_prior)
                trial, trial_loss = _fit_full(body, trial_prior, target, sil, trial_start, label, cfg, tick, None)
                if trial_loss < (1.0 - cfg.young_margin) * first_loss and trial_loss < loss:
                    var, loss, age_start = trial, trial_loss, age
    metrics = {"start": chosen, "starts_tried": len(starts.scores), "left_right_swapped": bool(label),
               "height_given_m": height_m, "age_start": age_start}
    return _finish(body, var, label, target, K, (W, H), mask, mask_scale, started, step, metrics)


def _rescaled(body: BodyModel, var: "_Variables", old: P.BodyPrior, new: P.BodyPrior) -> "_Variables":
    """``var`` (at ``old``'s mean shape) moved to ``new``'s mean shape, with the body pushed along
    the camera's rays by the ratio of their heights: a body s times as large, s times as far from
    the camera, projects to the same picture."""
    params = body.zero_params(2)
    params.shape = torch.stack([old.shape_mean, new.shape_mean])
    with torch.no_grad():
        h = rest_height(body.forward(params).rest_vertices)
    ratio = float(h[1] / h[0])
    return _Variables(body, new, var.orient, var.transl * ratio, var.pose)


def _young_starts(body: BodyModel, prior: P.BodyPrior, var: "_Variables", cfg: FitConfig) -> list[float]:
    """The ages to fit again from: those of ``cfg.young_starts`` under the prior's mean, when the
    first fit leaned young (see ``FitConfig.young_starts``); none for a body without an age."""
    if "age" not in body.shape_names or not cfg.young_starts:
        return []
    i = body.shape_names.index("age")
    if float(var.shape_z.detach()[0, i]) > -cfg.young_lean:
        return []
    return [float(a) for a in cfg.young_starts if float(a) < float(prior.shape_mean[i])]


def _with_age(body: BodyModel, prior: P.BodyPrior, age: float) -> P.BodyPrior:
    """``prior`` centred on a body of that age, the other shape values as they were. Its rest
    keypoints stay the adult's on purpose: they set the arm-depth and silhouette terms' lengths,
    and the trials' final objectives are compared, so they must measure alike. With the young
    body's own (``pose_prior.centred_on``), kick_m took its 0.3 start (MPJPE 63 -> 32 mm) but
    hair_f's 1.47 m teen became a 1.08 m child (62 -> 134 mm): 16-photo mean 69.3 -> 71.6 mm
    (bench_fit_shape, 2026-11-27)."""
    mean = prior.shape_mean.clone()
    mean[body.shape_names.index("age")] = age
    return dataclasses.replace(prior, shape_mean=mean)


def _prior(body: BodyModel, height_m: float | None, cfg: FitConfig) -> P.BodyPrior:
    if height_m is None:
        return P.body_prior(body)
    try:
        return P.prior_for_height(body, height_m, cfg.shape_held)
    except P.HeightOutOfRange as exc:
        span = (f"between {exc.reachable[0]:.2f} and {exc.reachable[1]:.2f} m" if exc.reachable is not None else
                "this body model can take")
        raise BadInputError(f"the {body.id} body cannot be {height_m:.2f} m tall",
                            f"give a standing height {span}, or none to estimate it from the photo") from exc


def _split_iterations(cfg: FitConfig, iterations: int) -> FitConfig:
    """The stages' shares of ``iterations`` steps, in the default proportions (pose at least one)."""
    names = ("pose_iterations", "shape_pre_iterations", "full_iterations", "shape_post_iterations")
    counts = [getattr(cfg, n) for n in names]
    total = max(sum(counts), 1)
    split = [round(iterations * c / total) for c in counts]
    split[0] = max(1, split[0])
    split[2] = max(0, iterations - split[0] - split[1] - split[3])  # the joint stage takes the rounding
    if split[0] + split[1] + split[2] + split[3] > iterations:  # too few steps for every stage
        split[1] = split[3] = 0
        split[2] = max(0, iterations - split[0])
    return dataclasses.replace(cfg, **dict(zip(names, split)))


# -- input ------------------------------------------------------------------------------------
def _check_perception(p: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, tuple[int, int]]:
    hint = "rerun the perception stage (the job's perception.npz does not match this engine)"
    try:
        kp = np.asarray(p.keypoints, dtype=np.float64)
        conf = np.asarray(p.confidence, dtype=np.float64)
        mask = np.asarray(p.mask, dtype=np.float32)
        mask_scale = float(p.mask_scale)
        W, H = (int(v) for v in p.image_size)
    except (AttributeError, TypeError, ValueError) as exc:
        raise BadInputError(f"the perception result is incomplete ({exc})", hint) from exc
    if kp.shape != (17, 2) or conf.shape != (17,):
        raise BadInputError(f"expected 17 COCO keypoints, got {kp.shape} and confidences {conf.shape}", hint)
    if mask.ndim != 2 or min(mask.shape) < 2 or not mask_scale > 0 or W < 2 or H < 2:
        raise BadInputError(f"bad person mask {mask.shape} (scale {mask_scale}) for a {W}x{H} photo", hint)
    conf = np.where(np.isfinite(conf) & np.isfinite(kp).all(1), np.clip(conf, 0, 1), 0.0)
    kp = np.nan_to_num(kp)
    seen = conf > _VISIBLE
    torso_seen = int(seen[list(_TORSO)].sum())
    if torso_seen < 2 or int(seen.sum()) < 4:
        raise NoPersonError(f"too little of the person is visible to fit a body ({int(seen.sum())} of 17 keypoints, "
                            f"{torso_seen} of 4 on the torso)",
                            "use a photo that shows at least the head and shoulders, or choose another person")
    return kp, conf, mask, mask_scale, (W, H)


def _keypoints3d(p: Any) -> np.ndarray | None:
    """The detector's (17,3) 3D keypoints when the perception has usable ones (older files do not)."""
    kp3 = getattr(p, "keypoints3d", None)
    if kp3 is None:
        return None
    kp3 = np.asarray(kp3, dtype=np.float64)
    return kp3 if kp3.shape == (17, 3) and np.isfinite(kp3).all() else None


def _torso_scale_px(kp: np.ndarray, conf: np.ndarray, rest_kp: np.ndarray) -> tuple[float, float]:
    """The person's size: (torso length in px, px per metre at their depth from the least
    foreshortened of the torso and head segments)."""
    seen = conf > _VISIBLE

    def mid(a: int, b: int, pts: np.ndarray) -> np.ndarray | None:
        if seen[a] and seen[b]:
            return (pts[a] + pts[b]) / 2
        return pts[a] if seen[a] else pts[b] if seen[b] else None

    segments = []
    for a2, b2 in (((_SH_L, _SH_R), (_HIP_L, _HIP_R)),):
        p, q = mid(*a2, kp), mid(*b2, kp)
        if p is not None and q is not None:
            segments.append((np.linalg.norm(p - q), np.linalg.norm(mid(*a2, rest_kp) - mid(*b2, rest_kp))))
    for a, b in ((_SH_L, _SH_R), (_HIP_L, _HIP_R), (3, 4)):
        if seen[a] and seen[b]:
            segments.append((np.linalg.norm(kp[a] - kp[b]), np.linalg.norm(rest_kp[a] - rest_kp[b])))
    sh = mid(_SH_L, _SH_R, kp)
    if seen[0] and sh is not None:
        segments.append((np.linalg.norm(kp[0] - sh), np.linalg.norm(rest_kp[0] - mid(_SH_L, _SH_R, rest_kp))))
    px_per_m = max((l2 / l3 for l2, l3 in segments if l3 > 1e-3), default=0.0)
    if px_per_m <= 0:
        raise NoPersonError("cannot tell the person's size from the keypoints",
                            "use a photo where the shoulders or hips are visible")
    torso_m = np.linalg.norm(rest_kp[[5, 6]].mean(0) - rest_kp[[11, 12]].mean(0))
    return float(px_per_m * torso_m), float(px_per_m)


def _make_target(kp: np.ndarray, conf: np.ndarray, K: np.ndarray, prior: P.BodyPrior, dtype: torch.dtype,
                 device: torch.device, kp3: np.ndarray | None, cfg: FitConfig) -> _Target:
    scale_px, _ = _torso_scale_px(kp, conf, prior.rest_keypoints.cpu().double().numpy())
    mirror = list(COCO17_MIRROR)
    kps = torch.tensor(np.stack([kp, kp[mirror]]), dtype=dtype, device=device)
    confs = torch.tensor(np.stack([conf, conf[mirror]]), dtype=dtype, device=device)
    face = conf[[0, 1, 2]]
    face_seen = float(face[0] > 0.5 and (face[1] > 0.5 or face[2] > 0.5))
    nb = len(L.TILT_BONES)
    tilt, tilt_w = torch.zeros(2, nb, dtype=dtype, device=device), torch.zeros(2, nb, dtype=dtype, device=device)
    if kp3 is not None:
        # Swapping the labels moves the detector's depths with them, as it moves the 2D keypoints.
        pts = torch.tensor(np.stack([kp3, kp3[mirror]]), dtype=dtype, device=device)
        tilt = L.bone_tilt(pts)
        ends = torch.tensor(L.TILT_BONES, device=device)
        seen = (confs[:, ends[:, 0]] > 0.5) & (confs[:, ends[:, 1]] > 0.5)
        tilt_w = (seen & (tilt.abs() >= cfg.tilt_min)).to(dtype)
    return _Target(kps, confs, scale_px, torch.tensor(K, dtype=dtype, device=device),
                   torch.tensor(FRONT_VIEW_R, dtype=dtype, device=device), face_seen, tilt, tilt_w)


# -- step 1: rigid starts ---------------------------------------------------------------------
@dataclass
class _Starts:
    orient: torch.Tensor  # (C,3)
    transl: torch.Tensor  # (C,3)
    labels: torch.Tensor  # (C,) 0 as given, 1 left/right swapped
    scores: list[float]


def _axis_angle(axis: tuple[float, float, float], angle: float) -> np.ndarray:
    return np.asarray(axis, dtype=np.float64) * angle


def _compose(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rotation vector of R(a) @ R(b)."""
    from scipy.spatial.transform import Rotation

    return (Rotation.from_rotvec(a) * Rotation.from_rotvec(b)).as_rotvec()


def _rigid_starts(t: _Target, prior: P.BodyPrior, cfg: FitConfig) -> _Starts:
    """Rigid fits of the rest body from several turns and both labellings, best first."""
    dtype, device = t.K.dtype, t.K.device
    rest = prior.rest_keypoints
    kp0, conf0 = t.kp[0].double().cpu().numpy(), t.conf[0].double().cpu().numpy()
    _, px_per_m = _torso_scale_px(kp0, conf0, rest.double().cpu().numpy())
    depth = float(t.K[0, 0]) / px_per_m
    # In-plane lean from the 2D torso axis (image up = world +Z, image right = world +X).
    seen = conf0 > _VISIBLE
    roll = 0.0
    if seen[[5, 6]].any() and seen[[11, 12]].any():
        up = kp0[[5, 6]][seen[[5, 6]]].mean(0) - kp0[[11, 12]][seen[[11, 12]]].mean(0)
        roll = math.atan2(up[0], -up[1])
    yaws = (0.0, -math.pi / 3, math.pi / 3, math.pi)
    orients, labels = [], []
    for label in (0, 1):
        for yaw in yaws:
            orients.append(_compose(_axis_angle((0, 1, 0), roll), _axis_angle((0, 0, 1), yaw)))
            labels.append(label)
    orient = torch.tensor(np.stack(orients), dtype=dtype, device=device)
    lab = torch.tensor(labels, dtype=torch.long, device=device)
    # Place the rest torso centre on the ray through the 2D torso centre at the estimated depth.
    idx = [i for i in _TORSO if seen[i]]
    c2 = kp0[idx].mean(0)
    ray = np.linalg.solve(t.K.double().cpu().numpy(), np.array([c2[0], c2[1], 1.0]))
    centre_world = FRONT_VIEW_R.T @ (ray * depth)
    centre_rest = rest[idx].mean(0)
    transl = torch.tensor(centre_world, dtype=dtype, device=device) - \
        (rotvec_to_matrix(orient) @ centre_rest.to(dtype))  # (C,3)
    weights = torch.zeros(17, dtype=dtype, device=device)
    weights[list(_TORSO)] = 1.0
    weights[list(_FACE)] = 0.3
    kp_t, conf_t = t.kp[lab], t.conf[lab] * weights
    orient.requires_grad_(True)
    transl.requires_grad_(True)
    opt = torch.optim.Adam([{"params": [orient], "lr": 0.05}, {"params": [transl], "lr": 0.05}])
    for i in range(cfg.rigid_iterations):
        pts = (rotvec_to_matrix(orient) @ rest.T).transpose(1, 2) + transl[:, None]
        uv, _ = project_torch(pts, t.K, _world_to_cam(t.R))
        loss = L.keypoint_loss(uv, kp_t, conf_t, t.scale_px, 0.3)
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
    with torch.no_grad():
        pts = (rotvec_to_matrix(orient) @ rest.T).transpose(1, 2) + transl[:, None]
        uv, _ = project_torch(pts, t.K, _world_to_cam(t.R))
        loss = L.keypoint_loss(uv, kp_t, conf_t, t.scale_px, 0.3)
        # The body faces -Y, the camera looks along +Y: R[1,1] is the cosine of "facing the camera",
        # which a visible face asks for. The labels as given win ties.
        away = (-rotvec_to_matrix(orient)[:, 1, 1]).clamp_min(0)
        score = loss + 0.5 * t.face_seen * away + 0.01 * lab.to(dtype)
    order = torch.argsort(score).tolist()
    return _Starts(orient.detach()[order], transl.detach()[order], lab[order], [float(score[i]) for i in order])


def _world_to_cam(R: torch.Tensor) -> torch.Tensor:
    M = torch.eye(4, dtype=R.dtype, device=R.device)
    M[:3, :3] = R
    return M


# -- steps 2 and 3 ------------------------------------------------------------------------------
def _pick_starts(starts: _Starts, cfg: FitConfig) -> list[int]:
    """The best start, plus the best clearly different one when it is nearly as good."""
    best = [0]
    R = rotvec_to_matrix(starts.orient)
    for i in range(1, len(starts.scores)):
        angle = torch.arccos(((R[0].T @ R[i]).diagonal().sum() - 1).clamp(-2, 2) / 2).item()
        if angle > 0.5 and starts.scores[i] <= starts.scores[0] * (1 + cfg.tie_margin) + 0.01:
            best.append(i)
            break
    return best


class _Variables:
    """The optimised tensors of a batch of candidate fits: fitted bones, orientation, translation,
    and shape in the model's standard deviations (so one step size suits every shape space)."""

    def __init__(self, body: BodyModel, prior: P.BodyPrior, orient: torch.Tensor, transl: torch.Tensor,
                 pose: torch.Tensor, shape_z: torch.Tensor | None = None) -> None:
        B = orient.shape[0]
        self.prior = prior
        self.bones = torch.as_tensor(body.fit_bones, dtype=torch.long, device=orient.device)
        self.pose = pose.detach().clone().requires_grad_(True)  # (B, len(fit_bones), 3)
        self.orient = orient.detach().clone().requires_grad_(True)
        self.transl = transl.detach().clone().requires_grad_(True)
        self.shape_z = (shape_z.detach().clone() if shape_z is not None else
                        orient.new_zeros(B, body.shape_dim)).requires_grad_(True)

    def params(self) -> BodyParams:
        B = self.orient.shape[0]
        full = self.prior.mean.expand(B, -1, -1).index_copy(1, self.bones, self.pose)
        shape = self.prior.shape_mean + self.shape_z * self.prior.shape_std
        return BodyParams(full, shape, self.orient, self.transl)

    def select(self, i: int) -> "_Variables":
        """Candidate ``i`` alone (batch 1)."""
        out = _Variables.__new__(_Variables)
        out.prior, out.bones = self.prior, self.bones
        for name in ("pose", "orient", "transl", "shape_z"):
            setattr(out, name, getattr(self, name).detach()[i:i + 1].clone().requires_grad_(True))
        return out

    def clamp_shape(self) -> None:
        if self.prior.shape_bounds is not None:
            lo, hi = self.prior.shape_bounds
            with torch.no_grad():
                shape = (self.prior.shape_mean + self.shape_z * self.prior.shape_std).clamp(lo, hi)
                self.shape_z.copy_((shape - self.prior.shape_mean) / self.prior.shape_std)


def _prior_terms(params: BodyParams, prior: P.BodyPrior, cfg: FitConfig) -> torch.Tensor:
    return (cfg.w_pose * P.pose_prior_loss(params.pose, prior)
            + cfg.w_limit * P.limit_loss(params.pose, prior.limits)
            + cfg.w_upright * P.upright_loss(params.global_orient)
            + cfg.w_shape * P.shape_prior_loss(params.shape, prior))


def _arm_depth_loss(kp: torch.Tensor, prior: P.BodyPrior) -> torch.Tensor:
    """Squared swing of the upper arms out of the torso's frontal plane beyond the natural pose's
    own: (B,17,3) world keypoints -> (B,). The silhouette stage walks the flat depth directions
    freely, and a detector's elbow a little off the model's (a shorter-looking upper arm) was
    explained by swinging the arm 10-25 cm toward or away from the camera (measured on the
    benchmark photos). Only in stage 3: stage 2's pose hypotheses must stay free to try either."""
    rest = L.upper_arm_depth(prior.rest_keypoints[None].to(kp.dtype))
    return (L.upper_arm_depth(kp) - rest).square().sum(-1)


def _tilt_terms(kp: torch.Tensor, t: _Target, labels: torch.Tensor | int, cfg: FitConfig) -> torch.Tensor:
    """The tilt prior's per-bone terms, weighted: (B,17,3) world keypoints -> (B,8)."""
    if isinstance(labels, int):
        labels = torch.tensor([labels], device=kp.device)
    tilt = L.bone_tilt(kp @ t.R.T)
    return cfg.w_tilt * L.tilt_terms(tilt, t.tilt[labels], t.tilt_w[labels], cfg.tilt_share)


def _schedule(opt: torch.optim.Optimizer, base: list[float], i: int, n: int) -> None:
    """Cosine decay to 10 % over a stage."""
    f = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / max(n, 1)))
    for g, lr in zip(opt.param_groups, base):
        g["lr"] = lr * f


def _fit_pose(body: BodyModel, prior: P.BodyPrior, t: _Target, starts: _Starts, cfg: FitConfig,
              tick: Callable[[float], None]) -> tuple["_Variables", int, int]:
    """Keypoints and priors only, from one or two starts, each with two pose hypotheses (limbs
    as at rest, limbs flexed forward): a foreshortened limb points toward or away from the camera,
    and the joint limits only tell the two apart once both have been tried. Each limb then takes
    the hypothesis that explains it better. -> (variables, labelling, start index)."""
    pick = _pick_starts(starts, cfg)
    bones = body.fit_bones
    hyp = torch.stack([prior.mean[bones], prior.flexed[bones]])  # (2, n, 3)
    n_h = hyp.shape[0]
    idx = torch.tensor(pick, device=hyp.device).repeat_interleave(n_h)
    var = _Variables(body, prior, starts.orient[idx], starts.transl[idx], hyp.repeat(len(pick), 1, 1))
    labels = starts.labels[idx]
    kp_t, conf_t = t.kp[labels], t.conf[labels]
    groups = [{"params": [var.pose], "lr": cfg.lr_pose}, {"params": [var.orient], "lr": cfg.lr_orient},
              {"params": [var.transl], "lr": cfg.lr_transl}]
    opt = torch.optim.Adam(groups)
    base = [g["lr"] for g in groups]
    W2C = _world_to_cam(t.R)

    def objective() -> torch.Tensor:
        params = var.params()
        kp3 = body.forward(params).keypoints
        uv, _ = project_torch(kp3, t.K, W2C)
        return (L.keypoint_loss(uv, kp_t, conf_t, t.scale_px, cfg.sigma_kp) + _prior_terms(params, prior, cfg)
                + _tilt_terms(kp3, t, labels, cfg).sum(-1))

    for i in range(cfg.pose_iterations):
        _schedule(opt, base, i, cfg.pose_iterations)
        loss = objective()
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
        tick(float(loss.detach().min()))

    with torch.no_grad():
        merged = _merge_limbs(body, prior, t, cfg, var, labels, n_h)
        lab = labels[::n_h]
        params = merged.params()
        kp3 = body.forward(params).keypoints
        uv, _ = project_torch(kp3, t.K, W2C)
        loss = (L.keypoint_loss(uv, t.kp[lab], t.conf[lab], t.scale_px, cfg.sigma_kp) + _prior_terms(params, prior, cfg)
                + _tilt_terms(kp3, t, lab, cfg).sum(-1))
        best = int(torch.argmin(loss))
    return merged.select(best), int(lab[best]), pick[best]


def _merge_limbs(body: BodyModel, prior: P.BodyPrior, t: _Target, cfg: FitConfig, var: _Variables,
                 labels: torch.Tensor, n_h: int) -> _Variables:
    """Per start (n_h consecutive rows), each limb from the hypothesis with the lower loss on that
    limb's keypoints and bones; the rest of the body from the first hypothesis."""
    params = var.params()
    kp3 = body.forward(params).keypoints
    uv, _ = project_torch(kp3, t.K, _world_to_cam(t.R))
    kp_terms = L.keypoint_terms(uv, t.kp[labels], t.conf[labels], t.scale_px, cfg.sigma_kp)  # (B,17)
    kp_terms = kp_terms + L.tilt_by_keypoint(_tilt_terms(kp3, t, labels, cfg))
    bone_terms = cfg.w_pose * P.pose_prior_terms(params.pose, prior)  # (B,J)
    bone_terms.index_add_(1, prior.limits.bones, cfg.w_limit * P.limit_terms(params.pose, prior.limits))
    pose = var.pose.detach().clone()
    slot = {b: i for i, b in enumerate(body.fit_bones)}
    for first in range(0, pose.shape[0], n_h):
        rows = slice(first, first + n_h)
        for limb in prior.limbs:
            cost = kp_terms[rows, limb.keypoints].sum(-1) + bone_terms[rows, limb.bones].sum(-1)
            cols = [slot[b] for b in limb.bones]
            pose[first, cols] = var.pose[first + int(torch.argmin(cost)), cols]
    keep = slice(0, pose.shape[0], n_h)
    return _Variables(body, prior, var.orient[keep], var.transl[keep], pose[keep])


def _fit_full(body: BodyModel, prior: P.BodyPrior, t: _Target, sil: L.SilhouetteTarget, var: _Variables,
              label: int, cfg: FitConfig, tick: Callable[[float], None],
              height_m: float | None) -> tuple["_Variables", float]:
    """Stages 3a (shape), 3 (pose + shape), 3c (shape), each from where the last one ended.
    -> (variables, the final objective: what tells two such fits of one photo apart)."""
    subset = _vertex_subset(body, cfg.vertex_subset)
    kp_t, conf_t = t.kp[label:label + 1], t.conf[label:label + 1]
    margin = _subset_spacing_px(body, prior, subset, t)
    W2C = _world_to_cam(t.R)
    edge: list[_Edge] = []  # the contour term's points while a shape stage runs

    def objective() -> torch.Tensor:
        params = var.params()
        out = body.forward(params)
        uv, _ = project_torch(out.keypoints, t.K, W2C)
        vuv, _ = project_torch(out.vertices[:, subset], t.K, W2C)
        loss = (L.keypoint_loss(uv, kp_t, conf_t, t.scale_px, cfg.sigma_kp)
                + cfg.w_outside * L.outside_loss(vuv, sil, t.scale_px, cfg.sigma_sil)
                + cfg.w_cover * L.coverage_loss(vuv, sil, t.scale_px, margin, cfg.sigma_sil)
                + _prior_terms(params, prior, cfg) + cfg.w_arm_depth * _arm_depth_loss(out.keypoints, prior)
                + _tilt_terms(out.keypoints, t, label, cfg).sum(-1))
        if edge:
            cuv, _ = project_torch(edge[0].points(out.vertices), t.K, W2C)
            loss = loss + cfg.w_contour * L.contour_loss(cuv, sil, t.scale_px, cfg.sigma_contour)
        if height_m is not None:
            loss = loss + cfg.w_height * ((rest_height(out.rest_vertices) - height_m) / cfg.sigma_height).square()
        return loss.sum()

    def refine_shape(n: int) -> None:
        if n:
            edge[:] = [_silhouette_edge(body, var.params(), t, sil, cfg.contour_points)]
            _refine_shape(body, var, t, subset, objective, n, tick, cfg.shape_held)
            edge.clear()

    refine_shape(cfg.shape_pre_iterations)
    if cfg.full_iterations:
        if cfg.full_optimizer == "lbfgs":
            _run_lbfgs([var.pose, var.orient, var.transl, var.shape_z], objective, cfg.full_iterations, tick)
        else:
            _run_adam(var, objective, cfg, tick)
        var.clamp_shape()
    refine_shape(cfg.shape_post_iterations)
    with torch.no_grad():
        return var, float(objective())


def _run_lbfgs(tensors: list[torch.Tensor], objective: Callable[[], torch.Tensor], n: int,
               tick: Callable[[float], None]) -> None:
    # Quasi-Newton: the depth-ambiguous directions (limb swing toward the camera, turn, size)
    # are long flat valleys that first-order steps crawl along.
    opt = torch.optim.LBFGS(tensors, lr=1.0, max_iter=n, max_eval=n, history_size=20, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective()
        loss.backward()
        tick(float(loss.detach()))
        return loss

    opt.step(closure)


def _run_adam(var: _Variables, objective: Callable[[], torch.Tensor], cfg: FitConfig,
              tick: Callable[[float], None]) -> None:
    groups = [{"params": [var.pose], "lr": cfg.lr_pose * 0.5}, {"params": [var.orient], "lr": cfg.lr_orient * 0.5},
              {"params": [var.transl], "lr": cfg.lr_transl * 0.5}, {"params": [var.shape_z], "lr": cfg.lr_shape}]
    opt = torch.optim.Adam(groups)
    base = [g["lr"] for g in groups]
    for i in range(cfg.full_iterations):
        _schedule(opt, base, i, cfg.full_iterations)
        loss = objective()
        opt.zero_grad()
        loss.backward()
        opt.step()
        var.clamp_shape()
        tick(float(loss.detach()))


@dataclass
class _Edge:
    """Surface points that rendered on the body's silhouette edge: fixed corners and barycentrics,
    so they move with the body while a stage runs (the edge is found again for the next one)."""

    corners: torch.Tensor  # (P,3) vertex indices
    bary: torch.Tensor  # (P,3)

    def points(self, vertices: torch.Tensor) -> torch.Tensor:
        """(B,V,3) -> (B,P,3)."""
        return (vertices[:, self.corners] * self.bary[None, :, :, None]).sum(-2)


def _silhouette_edge(body: BodyModel, params: BodyParams, t: _Target, sil: L.SilhouetteTarget, limit: int) -> _Edge:
    """The body's silhouette edge at the mask's resolution, at most ``limit`` points evenly along it."""
    from .render.raster import rasterize

    faces = torch.as_tensor(body.faces, dtype=torch.long, device=t.K.device)
    with torch.no_grad():
        verts = body.forward(params.detach()).vertices[0]
        K = scaled_intrinsics(t.K, sil.mask_scale)  # the mask's pixels
        r = rasterize(verts @ t.R.T, faces, K, sil.size[0], sil.size[1])
        pix = L.silhouette_edge(r.face_id)
        if len(pix) > limit:
            pix = pix[torch.linspace(0, len(pix) - 1, limit, device=pix.device).round().long()]
        return _Edge(faces[r.face_id[pix[:, 0], pix[:, 1]]], r.bary[pix[:, 0], pix[:, 1]].to(verts.dtype))


def _unit_steps(body: BodyModel, var: _Variables, t: _Target, subset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How far each shape value (in prior standard deviations) and each translation axis (metres)
    must move to shift the projected vertex sample by one pixel (RMS), by finite differences:
    (S,), (3,). Shape and translation act on the silhouette at scales a hundred times apart, and
    L-BFGS, which starts with a plain gradient step, needs them on one footing."""
    S = var.shape_z.shape[1]
    h_shape, h_transl = 0.1, 0.01
    with torch.no_grad():
        base = var.params().detach()
        B = 1 + S + 3
        z = var.shape_z.detach().expand(B, S).clone()
        z[1:S + 1] += h_shape * torch.eye(S, dtype=z.dtype, device=z.device)
        transl = base.transl.expand(B, 3).clone()
        transl[S + 1:] += h_transl * torch.eye(3, dtype=z.dtype, device=z.device)
        shape = var.prior.shape_mean + z * var.prior.shape_std
        out = body.forward(BodyParams(base.pose.expand(B, -1, -1), shape, base.global_orient.expand(B, 3), transl))
        uv, _ = project_torch(out.vertices[:, subset], t.K, _world_to_cam(t.R))
        px = (uv[1:] - uv[:1]).square().sum(-1).mean(-1).sqrt().clamp_min(1e-6)  # (S+3,) px per step
    return h_shape / px[:S], h_transl / px[S:]


def _refine_shape(body: BodyModel, var: _Variables, t: _Target, subset: torch.Tensor,
                  objective: Callable[[], torch.Tensor], n: int, tick: Callable[[float], None],
                  held: tuple[str, ...]) -> None:
    """Shape and translation with the pose held, in steps of about one silhouette pixel (a shape
    step at most one prior standard deviation: a value that barely shows must not leap)."""
    shape_step, transl_step = _unit_steps(body, var, t, subset)
    shape_step = shape_step.clamp_max(1.0)
    for i, name in enumerate(body.shape_names):
        if name in held:
            shape_step[i] = 0.0
    z0, transl0 = var.shape_z.detach().clone(), var.transl.detach().clone()
    dz, dt = torch.zeros_like(z0, requires_grad=True), torch.zeros_like(transl0, requires_grad=True)
    pose, orient = var.pose, var.orient
    var.pose, var.orient = pose.detach(), orient.detach()  # held: no gradients to compute

    def move() -> None:
        var.shape_z, var.transl = z0 + dz * shape_step, transl0 + dt * transl_step

    def shifted() -> torch.Tensor:
        move()
        return objective()

    try:
        _run_lbfgs([dz, dt], shifted, n, tick)
    finally:
        with torch.no_grad():
            move()
        var.shape_z = var.shape_z.detach().requires_grad_(True)
        var.transl = var.transl.detach().requires_grad_(True)
        var.pose, var.orient = pose, orient
    var.clamp_shape()


_SUBSETS: "weakref.WeakKeyDictionary[BodyModel, dict[int, torch.Tensor]]" = weakref.WeakKeyDictionary()


def _vertex_subset(body: BodyModel, n: int) -> torch.Tensor:
    cache = _SUBSETS.setdefault(body, {})
    if n not in cache:
        with torch.no_grad():
            rest = body.forward(body.zero_params()).vertices[0].double().cpu().numpy()
        cache[n] = torch.as_tensor(L.farthest_point_subset(rest, n), device=body.device)
    return cache[n]


def _subset_spacing_px(body: BodyModel, prior: P.BodyPrior, subset: torch.Tensor, t: _Target) -> float:
    """Half the typical distance between neighbouring subset vertices, in px at the person's scale."""
    with torch.no_grad():
        rest = body.forward(body.zero_params()).vertices[0, subset]
        d = torch.cdist(rest, rest)
        d.fill_diagonal_(float("inf"))
        spacing_m = float(d.amin(1).median())
    torso_m = float((prior.rest_keypoints[[5, 6]].mean(0) - prior.rest_keypoints[[11, 12]].mean(0)).norm())
    return 0.5 * spacing_m * t.scale_px / torso_m


# -- result -------------------------------------------------------------------------------------
def _finish(body: BodyModel, var: _Variables, lab: int, t: _Target, K: np.ndarray,
            size: tuple[int, int], mask: np.ndarray, mask_scale: float, started: float, steps: int,
            extra: dict[str, Any]) -> BodyFit:
    with torch.no_grad():
        params = var.params().detach()
        out = body.forward(params)
    R = FRONT_VIEW_R.astype(np.float64)
    # Move the translation into the camera: the body's root sits at the world origin.
    transl = params.transl[0].double().cpu().numpy()
    world_to_cam = np.eye(4)
    world_to_cam[:3, :3] = R
    world_to_cam[:3, 3] = R @ transl
    params.transl = torch.zeros_like(params.transl)
    camera = Camera(K.astype(np.float64), world_to_cam, int(size[0]), int(size[1]))
    kp_world = out.keypoints[0].double().cpu().numpy() - transl
    kp_cam = camera.to_cam(kp_world)
    kp2d = camera.project(kp_world)
    target = t.kp[lab].double().cpu().numpy()
    conf = t.conf[lab].double().cpu().numpy()
    seen = conf > _VISIBLE
    err = np.linalg.norm(kp2d - target, axis=1)
    verts = out.vertices[0].double().cpu().numpy() - transl
    iou = _fitted_iou(camera, verts, body.faces, mask, mask_scale)
    metrics = {
        "silhouette_iou": round(iou, 4),
        "keypoint_error_px": round(float((err * conf)[seen].sum() / max(conf[seen].sum(), 1e-9)), 3),
        "keypoint_error_torso_lengths": round(float((err * conf)[seen].sum() / max(conf[seen].sum(), 1e-9))
                                              / t.scale_px, 4),
        "keypoints_used": int(seen.sum()),
        "seconds": round(time.perf_counter() - started, 3),
        "iterations": int(steps),
        "torso_px": round(t.scale_px, 2),
        "height_m": round(float(rest_height(out.rest_vertices)[0]), 4),
        **extra,
    }
    return BodyFit(body.id, _model_path(body), params, camera, kp_cam, kp2d, metrics)


def _model_path(body: BodyModel) -> str | None:
    path = getattr(body, "model_path", None)
    return str(path) if path else None


def _fitted_iou(camera: Camera, verts_world: np.ndarray, faces: np.ndarray, mask: np.ndarray,
                mask_scale: float) -> float:
    """Silhouette IoU of the fitted body with the person mask, at the mask's resolution."""
    from .render.raster import rasterize

    h, w = mask.shape
    cam = camera.scaled(mask_scale)
    vc = torch.as_tensor(camera.to_cam(verts_world), dtype=torch.float32)
    r = rasterize(vc, torch.as_tensor(faces), torch.as_tensor(cam.K, dtype=torch.float32), w, h)
    return L.silhouette_iou(r.mask.cpu().numpy(), mask > 0.5)
