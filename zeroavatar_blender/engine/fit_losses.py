"""Loss terms of the body fit, as small pure functions on tensors.

Distances are divided by ``scale_px`` (the person's torso length in pixels), so one set of
weights works for any photo size and camera distance. Batched over candidate fits (B).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def geman_mcclure(sq: torch.Tensor, sigma: float) -> torch.Tensor:
    """Robust penalty of squared residuals: quadratic below ``sigma``, saturating at 1 above, so a
    wrong keypoint or a stray mask blob cannot drag the whole body."""
    s2 = sigma * sigma
    return sq / (sq + s2)


def keypoint_terms(pred: torch.Tensor, target: torch.Tensor, conf: torch.Tensor, scale_px: float,
                   sigma: float) -> torch.Tensor:
    """Each keypoint's share of the confidence-weighted robust reprojection error.

    pred (B,17,2) px, target (B or 1,17,2) px, conf (B or 1,17) -> (B,17), summing to the mean.
    """
    sq = ((pred - target) / scale_px).square().sum(-1)
    return conf * geman_mcclure(sq, sigma) / conf.sum(-1, keepdim=True).clamp_min(1e-6)


def keypoint_loss(pred: torch.Tensor, target: torch.Tensor, conf: torch.Tensor, scale_px: float,
                  sigma: float) -> torch.Tensor:
    """Mean robust reprojection error over confident keypoints: (B,17,2) -> (B,)."""
    return keypoint_terms(pred, target, conf, scale_px, sigma).sum(-1)


@dataclass
class SilhouetteTarget:
    """A person mask prepared for fast differentiable comparison with projected vertices."""

    outside: torch.Tensor  # (1,1,h,w) distance to the mask in ORIGINAL px, 0 inside
    points: torch.Tensor  # (N,2) samples of mask pixels in ORIGINAL px (edge-heavy)
    mask_scale: float  # mask px per original px
    size: tuple[int, int]  # (w, h) of the mask
    signed: torch.Tensor  # (1,1,h,w) signed distance to the mask's edge in ORIGINAL px, negative inside


def silhouette_target(mask: np.ndarray, mask_scale: float, *, max_points: int = 900, seed: int = 0,
                      dtype: torch.dtype = torch.float32) -> SilhouetteTarget:
    """Distance transform outside the mask, the signed distance to its edge (for the contour
    term) and a sample of mask pixels (mostly along its edge, where coverage errors show; a sparse
    interior grid keeps holes from opening)."""
    from scipy import ndimage

    inside = np.asarray(mask, dtype=np.float32) > 0.5
    h, w = inside.shape
    if inside.any():
        outside = ndimage.distance_transform_edt(~inside).astype(np.float32) / mask_scale
    else:  # no mask: nothing to compare with (the keypoints still fit the body)
        outside = np.zeros(inside.shape, np.float32)
    signed = signed_edge_distance(inside) / mask_scale
    edge = inside & ~ndimage.binary_erosion(inside)
    interior = inside & ~edge
    rng = np.random.default_rng(seed)
    picks = []
    for region, share in ((edge, 0.6), (interior, 0.4)):
        ys, xs = np.nonzero(region)
        n = min(len(ys), int(max_points * share))
        if n:
            idx = rng.choice(len(ys), n, replace=False)
            picks.append(np.stack([xs[idx], ys[idx]], -1))
    pts = np.concatenate(picks, 0).astype(np.float32) if picks else np.zeros((0, 2), np.float32)
    pts = (pts + 0.5) / mask_scale - 0.5  # mask pixel centres -> original px
    return SilhouetteTarget(torch.as_tensor(outside, dtype=dtype)[None, None], torch.as_tensor(pts, dtype=dtype),
                            float(mask_scale), (w, h), torch.as_tensor(signed, dtype=dtype)[None, None])


def signed_edge_distance(inside: np.ndarray) -> np.ndarray:
    """Signed distance (px) from each pixel centre to the mask's edge, which runs half a pixel
    outside its border pixels: negative inside, positive outside, 0 everywhere for an empty or full
    mask (no edge to find). (h,w) bool -> (h,w) float32."""
    from scipy import ndimage

    inside = np.asarray(inside, bool)
    if inside.all() or not inside.any():
        return np.zeros(inside.shape, np.float32)
    out = ndimage.distance_transform_edt(~inside) - 0.5
    into = ndimage.distance_transform_edt(inside) - 0.5
    return np.where(inside, -into, out).astype(np.float32)


def sample_outside(target: SilhouetteTarget, uv: torch.Tensor) -> torch.Tensor:
    """Distance to the mask (original px) at projected points; 0 off the image, where nothing is
    known (a half-body photo's legs). uv (B,N,2) original px -> (B,N)."""
    return _sample(target.outside, target, uv)


def _sample(image: torch.Tensor, target: SilhouetteTarget, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of a (1,1,h,w) field at the mask's resolution, 0 off the image:
    uv (B,N,2) original px -> (B,N)."""
    w, h = target.size
    m = (uv + 0.5) * target.mask_scale - 0.5
    grid = torch.stack([m[..., 0] / max(w - 1, 1), m[..., 1] / max(h - 1, 1)], -1) * 2 - 1
    field = image.expand(uv.shape[0], -1, -1, -1)
    return F.grid_sample(field, grid[:, None], mode="bilinear", padding_mode="zeros", align_corners=True)[:, 0, 0]


def silhouette_edge(face_id: torch.Tensor) -> torch.Tensor:
    """Pixels on the edge of a rendered silhouette: covered pixels with an uncovered 4-neighbour
    inside the image (the image's own border is not an edge: a cropped body goes on beyond it).
    (h,w) int face ids, -1 uncovered -> (P,2) int64 (row, column)."""
    inside = face_id >= 0
    pad = F.pad(inside[None, None].float(), (1, 1, 1, 1), mode="replicate")[0, 0] > 0.5
    hole = ~pad[:-2, 1:-1] | ~pad[2:, 1:-1] | ~pad[1:-1, :-2] | ~pad[1:-1, 2:]
    return (inside & hole).nonzero()


def contour_loss(uv: torch.Tensor, target: SilhouetteTarget, scale_px: float, sigma: float) -> torch.Tensor:
    """The body's silhouette edge against the mask's edge, signed: a body too thin for its mask
    is pulled out as hard as a too-wide one is pulled in, which the one-sided outside and coverage
    terms cannot do within a vertex spacing. ``uv`` are surface points that rendered on the body's
    own edge pixels, half a pixel inside its edge like the mask's border pixels inside the mask's;
    off the image nothing is known (0). The robust penalty lets a skirt or a blob go.
    uv (B,P,2) original px -> (B,) robust mean."""
    if uv.shape[1] == 0:
        return uv.new_zeros(uv.shape[0])
    d = (_sample(target.signed, target, uv) + 0.5 / target.mask_scale) / scale_px
    return geman_mcclure(d.square(), sigma).mean(-1)


def outside_loss(uv: torch.Tensor, target: SilhouetteTarget, scale_px: float, sigma: float) -> torch.Tensor:
    """Vertices projected off the person: (B,N,2) -> (B,) robust mean distance to the mask."""
    d = sample_outside(target, uv) / scale_px
    return geman_mcclure(d.square(), sigma).mean(-1)


def coverage_loss(uv: torch.Tensor, target: SilhouetteTarget, scale_px: float, margin_px: float,
                  sigma: float) -> torch.Tensor:
    """Mask pixels that no projected vertex comes near: (B,N,2) -> (B,). ``margin_px`` is about
    half the spacing of the projected vertex sample, the distance an interior pixel always has."""
    if target.points.shape[0] == 0:
        return uv.new_zeros(uv.shape[0])
    d = torch.cdist(target.points[None].expand(uv.shape[0], -1, -1), uv).amin(-1)  # (B,P)
    d = (d - margin_px).clamp_min(0) / scale_px
    return geman_mcclure(d.square(), sigma).mean(-1)


def farthest_point_subset(points: np.ndarray, n: int, start: int = 0) -> np.ndarray:
    """Indices of ``n`` points spread evenly over a point cloud (the mesh's vertex density is very
    uneven: face and hands are dense). (V,3) -> (n,) int64."""
    V = len(points)
    n = min(n, V)
    chosen = np.empty(n, dtype=np.int64)
    chosen[0] = start
    dist = np.linalg.norm(points - points[start], axis=1)
    for i in range(1, n):
        chosen[i] = int(dist.argmax())
        dist = np.minimum(dist, np.linalg.norm(points - points[chosen[i]], axis=1))
    return chosen


def silhouette_iou(pred: np.ndarray, mask: np.ndarray) -> float:
    """IoU of two boolean images of the same size."""
    a, b = np.asarray(pred, bool), np.asarray(mask, bool)
    union = int((a | b).sum())
    return float((a & b).sum()) / union if union else 0.0


# COCO indices (left, right) for the frontal-plane prior.
_SHOULDERS, _ELBOWS, _HIPS = (5, 6), (7, 8), (11, 12)


def body_forward(kp: torch.Tensor) -> torch.Tensor:
    """The direction the torso faces, from 3D keypoints: (B,17,3) -> (B,3) unit.

    (left shoulder - right shoulder) x (hips -> shoulders): with Z up and +X the subject's left,
    a body facing -Y gives -Y."""
    across = kp[:, _SHOULDERS[0]] - kp[:, _SHOULDERS[1]]
    up = kp[:, list(_SHOULDERS)].mean(1) - kp[:, list(_HIPS)].mean(1)
    return F.normalize(torch.linalg.cross(across, up), dim=-1)


def upper_arm_depth(kp: torch.Tensor) -> torch.Tensor:
    """Sine of each upper arm's swing out of the torso's frontal plane (positive: forward):
    (B,17,3) -> (B,2) (left, right). A swing toward or away from the camera barely moves the 2D
    keypoints of a front view; this is what a prior on it measures."""
    arm = F.normalize(kp[:, list(_ELBOWS)] - kp[:, list(_SHOULDERS)], dim=-1)  # (B,2,3)
    return (arm * body_forward(kp)[:, None]).sum(-1)


# COCO (parent, child) bones whose tilt toward or away from the camera the detector's 3D keypoints
# vouch for: upper arms, forearms, thighs, shins. Not the torso: BlazePose's torso lean was off
# by up to 20 cm in depth on the benchmark photos (a crouch's forward lean seen as upright).
TILT_BONES = ((5, 7), (7, 9), (6, 8), (8, 10), (11, 13), (13, 15), (12, 14), (14, 16))


def bone_tilt(kp: torch.Tensor) -> torch.Tensor:
    """Sine of each TILT_BONES bone's angle out of the image plane, positive when its child is
    farther from the camera: (...,17,3) camera-space keypoints -> (...,8)."""
    parent, child = [b[0] for b in TILT_BONES], [b[1] for b in TILT_BONES]
    d = kp[..., child, :] - kp[..., parent, :]
    return d[..., 2] / d.norm(dim=-1).clamp_min(1e-9)


def tilt_terms(tilt: torch.Tensor, ref: torch.Tensor, weight: torch.Tensor, share: float) -> torch.Tensor:
    """Each bone's squared shortfall from pointing the way the detector saw it: at least ``share``
    of the detector's tilt on the detector's side of the image plane, nothing once it is. One-sided
    because the detector is right about the side far more often than about the amount; the 2D
    keypoints then settle the amount. tilt (B,8), ref and weight (B or 1,8) -> (B,8)."""
    side = torch.sign(ref)
    return weight * F.relu(share * ref.abs() - side * tilt).square()


def tilt_by_keypoint(terms: torch.Tensor) -> torch.Tensor:
    """Bone terms (B,8) gathered onto their child keypoints (B,17), for per-limb bookkeeping."""
    out = terms.new_zeros(terms.shape[0], 17)
    return out.index_add(1, torch.tensor([b[1] for b in TILT_BONES], device=terms.device), terms)
