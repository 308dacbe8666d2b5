"""What a plausible body looks like, for the fit: per-bone pose freedom, joint limits, shape scale.

Built through the ``BodyModel`` interface plus bone-name tables (Anny and SMPL names), so a body
with other names still gets a sane default (every fitted bone equally free, no limits).

Optional per-model attributes a backend may provide (all have defaults here):
  ``pose_frame``    (3,3) rotation from the axes its pose rotation vectors use at rest to the
                    Blender world frame. Default identity: true for Anny's ``local-ref`` (each
                    bone's delta rotates about its own joint in world-aligned axes carried by its
                    parent). An SMPL backend that turns SMPL's Y-up frame into Z-up by a fixed
                    rotation should give that rotation here.
  ``natural_pose()`` (J,3) the pose a missing limb should take (standing, arms down). Default: zero.
  ``shape_std``     a float or (S,) spread of each shape value in the population, the unit of
                    the shape prior and of its step size. Default 1.0 (SMPL betas are N(0,1)).
                    Values that mostly rescale the body are tightened further (see _build_prior).
  ``shape_bounds``  (lo, hi) the valid range of each shape value, applied after each step.
                    Default: none.
Anny does not carry the last two (yet); ``_MODEL_DEFAULTS`` holds its values meanwhile.
"""

from __future__ import annotations

import dataclasses
import itertools
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from .body.base import BodyModel, matrix_to_rotvec, rest_height, rotvec_to_matrix

# Bone freedom in radians (one standard deviation), by bone name without its side marker.
# Anny spreads one anatomical joint over several bones; the helpers ("...02", pelvis.L/R) mostly
# twist, which no keypoint can see, so they are held nearly still.
_BONE_STD = {
    # Anny
    "pelvis": 0.05, "upperleg01": 0.6, "upperleg02": 0.05, "lowerleg01": 1.0, "lowerleg02": 0.05,
    "foot": 0.25, "spine05": 0.12, "spine04": 0.12, "spine03": 0.12, "spine02": 0.12, "spine01": 0.12,
    "clavicle": 0.15, "shoulder01": 0.25, "upperarm01": 0.9, "upperarm02": 0.08, "lowerarm01": 1.2,
    "lowerarm02": 0.08, "wrist": 0.3, "neck01": 0.12, "neck02": 0.12, "neck03": 0.12, "head": 0.3,
    # SMPL / SMPL-X
    "hip": 0.6, "knee": 1.0, "ankle": 0.25, "spine1": 0.2, "spine2": 0.2, "spine3": 0.2, "neck": 0.2,
    "collar": 0.25, "shoulder": 0.9, "elbow": 1.2,
}
_DEFAULT_STD = 0.3
# Per-model values a backend may override with attributes of the same name (see the docstring).
# Anny's phenotypes live in [0, 1] (0.5 the average); people spread about +-0.2 around it.
_SIZE_SPREAD_M = 0.03  # metres of mean vertex motion one shape standard deviation may cause
_MODEL_DEFAULTS: dict[str, dict[str, object]] = {
    "anny": {"shape_std": 0.5, "shape_bounds": (0.0, 1.0)},
}

_FORWARD = (0.0, -1.0, 0.0)  # the subject faces -Y (Blender frame)
_BACKWARD = (0.0, 1.0, 0.0)


@dataclass(frozen=True)
class _LimitSpec:
    parent: str | None  # COCO keypoint above the joint ("hip"), None: use the world's down axis
    joint: str
    child: str
    flex_dir: tuple[float, float, float]  # where flexion moves the child at rest (world)
    lo: float  # total flexion range in radians, the rest pose's own bend included
    hi: float
    hinge: bool  # also hold the other two axes (knees and elbows only bend one way)


_LIMITS = {
    "lowerleg01": _LimitSpec("hip", "knee", "ankle", _BACKWARD, -0.1, 2.6, True),
    "knee": _LimitSpec("hip", "knee", "ankle", _BACKWARD, -0.1, 2.6, True),
    "lowerarm01": _LimitSpec("shoulder", "elbow", "wrist", _FORWARD, -0.1, 2.7, True),
    "elbow": _LimitSpec("shoulder", "elbow", "wrist", _FORWARD, -0.1, 2.7, True),
    "upperleg01": _LimitSpec(None, "hip", "knee", _FORWARD, -0.45, 2.4, False),
    "hip": _LimitSpec(None, "hip", "knee", _FORWARD, -0.45, 2.4, False),
    "upperarm01": _LimitSpec(None, "shoulder", "elbow", _FORWARD, -1.0, 3.3, False),
    "shoulder": _LimitSpec(None, "shoulder", "elbow", _FORWARD, -1.0, 3.3, False),
}
# The other answer to a foreshortened limb: extra flexion (radians) each limited bone starts with
# in the second pose hypothesis (thighs and upper arms forward, knees and elbows bent).
_FLEXED_START = {"upperleg01": 0.9, "hip": 0.9, "lowerleg01": 0.9, "knee": 0.9,
                 "upperarm01": 0.9, "shoulder": 0.9, "lowerarm01": 0.6, "elbow": 0.6}
_COCO_INDEX = {("left", n): i for i, n in ((5, "shoulder"), (7, "elbow"), (9, "wrist"), (11, "hip"),
                                             (13, "knee"), (15, "ankle"))}
_NEXT = {"knee": "ankle", "elbow": "wrist"}
_COCO_INDEX.update({("right", n): i + 1 for (s, n), i in list(_COCO_INDEX.items())})
_SIDE_MARKERS = ((".L", "left"), (".R", "right"), ("left_", "left"), ("right_", "right"),
                 ("L_", "left"), ("R_", "right"), ("_l", "left"), ("_r", "right"))


def split_side(name: str) -> tuple[str, str | None]:
    """'upperleg01.L' -> ('upperleg01', 'left'); 'left_knee' -> ('knee', 'left'); 'head' -> ('head', None)."""
    for marker, side in _SIDE_MARKERS:
        if marker.startswith((".", "_")) and name.endswith(marker):
            return name[: -len(marker)], side
        if not marker.startswith((".", "_")) and name.startswith(marker):
            return name[len(marker):], side
    return name, None


@dataclass
class JointLimits:
    """Hinge decomposition of limited bones, axes in the pose parameter frame. L limits."""

    bones: torch.Tensor  # (L,) bone index
    flex_axis: torch.Tensor  # (L,3)
    side_axis: torch.Tensor  # (L,3) the axis a hinge cannot turn about
    twist_axis: torch.Tensor  # (L,3) along the child segment
    rest_flex: torch.Tensor  # (L,) the natural pose's own bend (Anny's elbows: about 44 degrees)
    offset: torch.Tensor  # (L,3) the natural pose of the bone, where the axes were measured
    lo: torch.Tensor  # (L,)
    hi: torch.Tensor  # (L,)
    hinge: torch.Tensor  # (L,) 1 for knees and elbows


@dataclass
class Limb:
    """A leg or an arm: the bones that move it (its top limited bone and everything below) and
    the two keypoints it carries. Limbs are chosen between pose hypotheses one by one."""

    bones: list[int]  # indices into the model's bones, all fitted
    keypoints: list[int]  # COCO indices (knee and ankle, elbow and wrist)


@dataclass
class BodyPrior:
    mean: torch.Tensor  # (J,3) natural pose
    inv_std: torch.Tensor  # (J,) 1/std for fitted bones, 0 elsewhere
    limits: JointLimits
    flexed: torch.Tensor  # (J,3) the second hypothesis' start: limbs flexed forward
    limbs: list[Limb]
    shape_mean: torch.Tensor  # (S,) the model's default shape
    shape_std: torch.Tensor  # (S,)
    shape_bounds: tuple[float, float] | None
    rest_keypoints: torch.Tensor  # (17,3) COCO keypoints in the natural pose, default shape
    # (S,) bool: the values that mostly rescale the whole body (Anny's age and height), whose
    # prior _build_prior tightened to people's spread in size. None: not measured.
    size_values: torch.Tensor | None = None


_CACHE: "weakref.WeakKeyDictionary[BodyModel, BodyPrior]" = weakref.WeakKeyDictionary()
_HEIGHT_CACHE: "weakref.WeakKeyDictionary[BodyModel, dict[tuple, BodyPrior]]" = weakref.WeakKeyDictionary()
HEIGHT_TOLERANCE_M = 0.005  # how close the known-height prior's body comes to the height asked for


def body_prior(body: BodyModel) -> BodyPrior:
    """The prior of one body model (built once: two small forward passes)."""
    prior = _CACHE.get(body)
    if prior is None:
        prior = _build_prior(body)
        _CACHE[body] = prior
    return prior


class HeightOutOfRange(ValueError):
    """No body of the model's shape space stands that tall (or that short)."""

    def __init__(self, height_m: float, reachable: tuple[float, float] | None) -> None:
        span = f" ({reachable[0]:.2f}-{reachable[1]:.2f} m)" if reachable is not None else ""
        super().__init__(f"{height_m:.2f} m is outside the heights this body model can take{span}")
        self.height_m, self.reachable = height_m, reachable


def prior_for_height(body: BodyModel, height_m: float, held: tuple[str, ...] = ()) -> BodyPrior:
    """The prior of a person whose standing height is known: its shape mean moved to a body of
    that height by the smallest change in the prior's own units (Gauss-Newton on the minimum-norm
    step) of the values that rescale the body (``BodyPrior.size_values``; gender also changes
    height, and the height must not decide it), and its rest keypoints, which give the fit its
    first guess of size and distance, taken from that body. Values named in ``held`` stay. A
    photo cannot tell a short person near the camera from a tall one further away; the height
    settles it. HeightOutOfRange when the model cannot reach it."""
    key = (round(float(height_m), 4), tuple(held))
    cache = _HEIGHT_CACHE.setdefault(body, {})
    if key not in cache:
        cache[key] = _height_prior(body, float(height_m), held)
    return cache[key]


def _height_prior(body: BodyModel, height_m: float, held: tuple[str, ...]) -> BodyPrior:
    base = body_prior(body)
    lo, hi = base.shape_bounds if base.shape_bounds is not None else (-float("inf"), float("inf"))
    free = _height_values(body, base, held).to(base.shape_std.dtype)
    params = body.zero_params()
    params.pose = base.mean[None].clone()

    def height_of(z: torch.Tensor) -> torch.Tensor:
        params.shape = (base.shape_mean + z * base.shape_std).clamp(lo, hi)[None]
        return rest_height(body.forward(params).rest_vertices)[0]

    z = torch.zeros_like(base.shape_mean)
    for _ in range(16):
        z.requires_grad_(True)
        h = height_of(z)
        (grad,) = torch.autograd.grad(h, z)
        z = z.detach()
        err = height_m - float(h.detach())
        if abs(err) < 0.1 * HEIGHT_TOLERANCE_M:
            break
        shape = base.shape_mean + z * base.shape_std
        # Values at a bound that the step would push further out are spent: leave them there.
        outward = ((shape <= lo + 1e-6) & (grad * err < 0)) | ((shape >= hi - 1e-6) & (grad * err > 0))
        g = grad * free * (~outward).to(grad.dtype)
        norm = float(g.square().sum())
        if norm < 1e-12:
            break
        z = (base.shape_mean + (z + g * err / norm) * base.shape_std).clamp(lo, hi)
        z = (z - base.shape_mean) / base.shape_std
    with torch.no_grad():
        params.shape = (base.shape_mean + z * base.shape_std).clamp(lo, hi)[None]
        out = body.forward(params)
    reached = float(rest_height(out.rest_vertices)[0])
    if abs(reached - height_m) > HEIGHT_TOLERANCE_M:
        raise HeightOutOfRange(height_m, _reachable_heights(body, base, held))
    return centred_on(body, base, params.shape[0])


def centred_on(body: BodyModel, prior: BodyPrior, shape_mean: torch.Tensor) -> BodyPrior:
    """``prior`` centred on another body: its shape mean, and the rest keypoints of that body in
    the natural pose, which give the fit its first guess of size and distance and the lengths its
    arm-depth and silhouette terms measure with. (The young-start trials keep the adult's on
    purpose: fit._with_age says why.)"""
    params = body.zero_params()
    params.pose = prior.mean[None].clone()
    params.shape = shape_mean.detach()[None].to(prior.shape_mean)
    with torch.no_grad():
        out = body.forward(params)
    return dataclasses.replace(prior, shape_mean=params.shape[0].clone(),
                               rest_keypoints=out.keypoints[0].detach().clone())


def _height_values(body: BodyModel, base: BodyPrior, held: tuple[str, ...]) -> torch.Tensor:
    """(S,) bool: the shape values a known height may move."""
    free = torch.tensor([name not in held for name in body.shape_names], device=base.shape_std.device)
    if base.size_values is not None and bool((free & base.size_values).any()):
        free = free & base.size_values
    return free


def _reachable_heights(body: BodyModel, base: BodyPrior, held: tuple[str, ...]) -> tuple[float, float] | None:
    """The shortest and tallest rest heights over the corners of the shape bounds' box in the
    values a height may move (a handful: all corners are tried); None for an unbounded space."""
    if base.shape_bounds is None:
        return None
    lo, hi = base.shape_bounds
    free = torch.nonzero(_height_values(body, base, held)).flatten().tolist()
    corners = torch.tensor(list(itertools.product((lo, hi), repeat=len(free))), dtype=base.shape_mean.dtype,
                           device=base.shape_mean.device)
    shape = base.shape_mean.expand(len(corners), -1).clone()
    shape[:, free] = corners
    params = body.zero_params(len(corners))
    params.pose = base.mean.expand(len(corners), -1, -1).clone()
    params.shape = shape
    with torch.no_grad():
        h = rest_height(body.forward(params).rest_vertices)
    return float(h.min()), float(h.max())


def _build_prior(body: BodyModel) -> BodyPrior:
    dtype, device = body.dtype, body.device
    J, S = body.num_bones, body.shape_dim
    inv_std = torch.zeros(J, dtype=dtype, device=device)
    for b in body.fit_bones:
        base, _ = split_side(body.bone_names[b])
        inv_std[b] = 1.0 / _BONE_STD.get(base, _DEFAULT_STD)
    natural = getattr(body, "natural_pose", None)
    mean = (torch.as_tensor(natural(), dtype=dtype, device=device).reshape(J, 3) if callable(natural)
            else torch.zeros(J, 3, dtype=dtype, device=device))
    frame = torch.as_tensor(np.asarray(getattr(body, "pose_frame", np.eye(3))), dtype=dtype, device=device)
    defaults = _MODEL_DEFAULTS.get(getattr(body, "id", ""), {})
    shape_std = torch.as_tensor(getattr(body, "shape_std", defaults.get("shape_std", 1.0)), dtype=dtype,
                                device=device).expand(S).clone()
    bounds = getattr(body, "shape_bounds", defaults.get("shape_bounds"))
    shape0 = body.default_shape(1)[0]
    # How far one unit of each shape value moves the vertices (central differences): a value that
    # rescales the whole body (Anny's age and height) gets a prior no looser than people's spread
    # in size, since a photo cannot tell a tall person far away from a short one nearby.
    step = 0.25 * shape_std
    params = body.zero_params(2 * S + 1)
    params.pose = mean.expand(2 * S + 1, J, 3).clone()
    params.shape = shape0.expand(2 * S + 1, S).clone()
    params.shape[1:S + 1] += torch.diag(step)
    params.shape[S + 1:] -= torch.diag(step)
    with torch.no_grad():
        out = body.forward(params)
    v = out.vertices
    motion = ((v[1:S + 1] - v[S + 1:]).norm(dim=-1).mean(-1) / (2 * step)).clamp_min(1e-6)  # (S,) m per unit
    size_values = _SIZE_SPREAD_M / motion < 0.5 * shape_std
    shape_std = torch.minimum(shape_std, _SIZE_SPREAD_M / motion)
    rest_kp = out.keypoints[0]
    limits = _joint_limits(body, rest_kp, out.bone_transforms[0, :, :3, :3], frame, mean)
    # The second hypothesis: each limited bone turned further about its flexion axis, after its
    # natural pose (rotations composed, since SMPL's natural arms-down pose is far from zero).
    flexed = mean.clone()
    for b, axis in zip(limits.bones.tolist(), limits.flex_axis):
        turn = rotvec_to_matrix(axis * _FLEXED_START.get(split_side(body.bone_names[b])[0], 0.0))
        flexed[b] = matrix_to_rotvec(turn @ rotvec_to_matrix(mean[b]))
    return BodyPrior(mean, inv_std, limits, flexed, _limbs(body), shape0.clone(), shape_std,
                     tuple(bounds) if bounds is not None else None, rest_kp.clone(), size_values)


def _limbs(body: BodyModel) -> list[Limb]:
    fitted = set(body.fit_bones)
    children: dict[int, list[int]] = {}
    for b, parent in enumerate(body.bone_parents.tolist()):
        children.setdefault(parent, []).append(b)
    limbs = []
    for b, name in enumerate(body.bone_names):
        base, side = split_side(name)
        spec = _LIMITS.get(base)
        if spec is None or spec.parent is not None or side is None or b not in fitted:
            continue  # limbs start at the hips and shoulders (limits without a parent segment)
        bones, todo = [], [b]
        while todo:
            c = todo.pop()
            if c in fitted:
                bones.append(c)
            todo.extend(children.get(c, []))
        limbs.append(Limb(sorted(bones), [_COCO_INDEX[(side, spec.child)], _COCO_INDEX[(side, _NEXT[spec.child])]]))
    return limbs


def _joint_limits(body: BodyModel, kp: torch.Tensor, turned: torch.Tensor, frame: torch.Tensor,
                  mean: torch.Tensor) -> JointLimits:
    """Axes from the keypoints of the natural pose ``kp`` (arms down for SMPL too: at a T-pose the
    shoulder's flexion axis would be the arm's own twist axis). ``turned`` (J,3,3): each bone's
    rotation in that pose, since a bone's axes are carried by its parent."""
    rows = []
    fitted = set(body.fit_bones)
    for b, name in enumerate(body.bone_names):
        base, side = split_side(name)
        spec = _LIMITS.get(base)
        if spec is None or side is None or b not in fitted:
            continue
        joint = kp[_COCO_INDEX[(side, spec.joint)]]
        child = kp[_COCO_INDEX[(side, spec.child)]]
        u = (joint - kp[_COCO_INDEX[(side, spec.parent)]]) if spec.parent else kp.new_tensor([0.0, 0.0, -1.0])
        u = u / u.norm()
        c = child - joint
        c = c / c.norm()
        d = kp.new_tensor(spec.flex_dir)
        d = d - (d @ u) * u
        h = torch.linalg.cross(u, d)
        h = h / h.norm()
        t = c - (c @ h) * h
        t = t / t.norm()
        s = torch.linalg.cross(h, t)
        rest = torch.atan2(torch.linalg.cross(u, c) @ h, u @ c)
        # World axes -> the parent's carried axes -> parameter axes (rotation vectors are vectors).
        to_param = frame.T @ turned[int(body.bone_parents[b])].T
        rows.append((b, to_param @ h, to_param @ s, to_param @ t, rest, mean[b], spec.lo, spec.hi, float(spec.hinge)))
    if not rows:
        z = kp.new_zeros((0, 3))
        e = kp.new_zeros(0)
        return JointLimits(torch.zeros(0, dtype=torch.long, device=kp.device), z, z, z, e, z, e, e, e)
    cols = list(zip(*rows))
    return JointLimits(torch.tensor(cols[0], dtype=torch.long, device=kp.device),
                       *(torch.stack(c) for c in cols[1:6]), *(kp.new_tensor(c) for c in cols[6:]))


# -- losses ---------------------------------------------------------------------------------
def pose_prior_terms(pose: torch.Tensor, prior: BodyPrior) -> torch.Tensor:
    """Squared distance to the natural pose in standard deviations, per bone. (B,J,3) -> (B,J)."""
    return ((pose - prior.mean) * prior.inv_std[:, None]).square().sum(-1)


def pose_prior_loss(pose: torch.Tensor, prior: BodyPrior) -> torch.Tensor:
    return pose_prior_terms(pose, prior).sum(-1)


def limit_terms(pose: torch.Tensor, limits: JointLimits, side_std: float = 0.1,
                twist_std: float = 0.25) -> torch.Tensor:
    """Knees and elbows bending the wrong way, hips and shoulders over-extending, per limit:
    (B,J,3) -> (B,L), radians^2 out of range (side/twist of hinges in standard deviations)."""
    theta = pose[:, limits.bones] - limits.offset  # (B,L,3), small-angle about the natural pose
    flex = limits.rest_flex + (theta * limits.flex_axis).sum(-1)
    out = (limits.lo - flex).clamp_min(0).square() + (flex - limits.hi).clamp_min(0).square()
    side = (theta * limits.side_axis).sum(-1) / side_std
    twist = (theta * limits.twist_axis).sum(-1) / twist_std
    return out + limits.hinge * (side.square() + twist.square())


def limit_loss(pose: torch.Tensor, limits: JointLimits) -> torch.Tensor:
    return limit_terms(pose, limits).sum(-1)


def shape_prior_loss(shape: torch.Tensor, prior: BodyPrior) -> torch.Tensor:
    """Shape away from the model's average in the model's own spreads. (B,S) -> (B,)."""
    return ((shape - prior.shape_mean) / prior.shape_std).square().sum(-1)


def upright_loss(global_orient: torch.Tensor) -> torch.Tensor:
    """1 - cos of the body's tilt from the world's up axis: most photos are taken roughly level,
    which matters when the hips or legs are not seen. (B,3) -> (B,)."""
    return 1.0 - rotvec_to_matrix(global_orient)[:, 2, 2]

