"""Where a head's hair usually is, so the back of the head can take the crown's colour.

A photo taken from the front shows the face and the top of the head, never the back of it. A
smooth fill from everything seen around it (the face's sides, the ears, the neck) gives a
bald, skin-coloured back of the head under hair or a cap. Hair, a cap or a bald scalp
continues from the crown round to the back down to about the ears' lower ends, so the back of
the head takes the colour the photo shows on the crown.

Both zones are placed on the body in its zero pose from its own COCO face keypoints, in units
of the ear-to-ear distance, so they hold for any body model and any shape. Measured on Anny's
zero pose (ear-to-ear 14.8 cm): the top of the head is 0.85 ear distances above the ears'
midpoint, the back of the skull 0.71 behind it, the eyes 0.2 above it. A front hairline is
taken to sit about 6 cm (0.4) above the eyes: an assumption, not measured here.

The crown's colour is read on the top and the upper sides of the head: a top-lit crown alone
reads brighter than the back of the same hair (on the synthetic benchmark's 16 photos the top
alone gave -0.04 dB back-view PSNR against the old fill, top and sides +0.00, the head's band of
the back view +0.5 dB; docs/BENCHMARKS.md).

Long hair goes further: it falls from the head down the upper back, where an optimised shell
stands off the body, and a front photo shows it only where it passes the neck and lies on the
shoulders. When the photo shows the crown's colour there, off the body's own silhouette
(`long_hair_shown`), the upper back behind the shoulders (`fall_zones_from_keypoints`) is taken
to be that hair rather than the shirt: the bare body down to the shoulders' level, and an
optimised shell standing off it down to its lower edge (`hair_reach`). On the synthetic set the crown-coloured area
beside the neck was 0.09-0.10 ear distances squared for the long-haired subject and at most 0.02
for the 15 others (caps, a hat's brim, a puffy jacket's collar, short hair): `MIN_HAIR_AREA` sits
between.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import numpy as np
import torch

from .body.base import BodyModel

HEAD_RADIUS = 1.0  # ear distances from the ears' midpoint: the head, not the shoulders
HEAD_BOTTOM = -0.6  # ... nor the neck below the jaw
BEHIND_EARS = 0.0  # the back zone starts behind this (ear distances along the face's forward axis)
NAPE = -0.3  # ... and above this (along the head's up axis): about where hair ends at the nape
RAMP = 0.15  # both edges blend into the fill over this width (2 cm on Anny)
CROWN_ABOVE = 0.35  # the crown zone: the head above this (over the eyes) ...
CROWN_BEHIND = 0.35  # ... and behind this (the forehead's skin in front): its top and upper sides
MIN_CROWN_TEXELS = 10  # fewer seen crown texels than this, or ...
MIN_CROWN_SHARE = 0.002  # ... a smaller share of the zone (whose back is never seen): too little shown
NECK_BOTTOM = -1.5  # the neck band, where long hair shows in a front photo: under the head down to
# just below the shoulders (1.25 ear distances under the ears on Anny)
SHOULDER_LEVEL = -1.25  # hair seen falling past the neck covers the back at least down to here ...
FALL_END = -3.0  # ... and at most to about here (the shoulder blades' lower half: `hair_reach`), ...
FALL_RAMP = 0.5  # ... fading out below over this
FALL_HALF_WIDTH = 0.9  # ... between the shoulder blades' outer edges (shoulders 1.04 out): not the arms
HAIR_TOLERANCE = 0.15  # RGB distance in [0,1] from the crown's colour that counts as the same hair
MIN_HAIR_AREA = 0.04  # ear distances squared of hair beside the neck that make long hair

class _Zones(NamedTuple):
    """A body topology's zones (from its zero pose) and its two ear vertices."""

    back: np.ndarray
    crown: np.ndarray
    neck: np.ndarray
    fall: np.ndarray
    height: np.ndarray
    ears: np.ndarray  # (2,) the vertices nearest the ear keypoints


_ZONES: "weakref.WeakKeyDictionary[BodyModel, _Zones]" = weakref.WeakKeyDictionary()


def smooth_ramp(x: np.ndarray) -> np.ndarray:
    """0 below 0, 1 above 1, smooth between."""
    t = np.clip(x, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _head_frame(keypoints: np.ndarray) -> tuple[np.ndarray, float, np.ndarray, np.ndarray] | None:
    """(ears' midpoint, ear-to-ear distance, up, forward) from COCO keypoints (17,3); None when
    the ears coincide."""
    ears = 0.5 * (keypoints[3] + keypoints[4])
    scale = float(np.linalg.norm(keypoints[3] - keypoints[4]))
    if not np.isfinite(scale) or scale <= 1e-6:
        return None
    up = ears - 0.5 * (keypoints[5] + keypoints[6])  # from the shoulders' midpoint
    up /= max(float(np.linalg.norm(up)), 1e-12)
    forward = keypoints[0] - ears  # toward the nose
    forward -= (forward @ up) * up
    forward /= max(float(np.linalg.norm(forward)), 1e-12)
    return ears, scale, up, forward


def zones_from_keypoints(vertices: np.ndarray, keypoints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(back, crown) of a body: back (V,) float in [0,1], how much of the crown's colour each
    vertex takes; crown (V,) bool, where the photo's crown colour is read. vertices (V,3),
    keypoints (17,3) COCO, any pose whose head is upright over the shoulders."""
    frame = _head_frame(keypoints)
    if frame is None:
        return np.zeros(len(vertices)), np.zeros(len(vertices), bool)
    ears, scale, up, forward = frame
    d = (vertices - ears) / scale
    height, ahead = d @ up, d @ forward
    head = (np.linalg.norm(d, axis=1) < HEAD_RADIUS) & (height > HEAD_BOTTOM)
    back = head * smooth_ramp((BEHIND_EARS - ahead) / RAMP) * smooth_ramp((height - NAPE) / RAMP)
    crown = head & (height > CROWN_ABOVE) & (ahead < CROWN_BEHIND)
    return back, crown


def fall_zones_from_keypoints(vertices: np.ndarray, keypoints: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(neck, fall, height) of a body: neck (V,) bool, the band under the head down to the
    shoulders where a front photo shows long hair passing; fall (V,) float in [0,1], the upper
    back behind the shoulders where long hair may lie (how far down it does is the caller's:
    `hair_reach`); height (V,) in ear distances above the ears. Same frame as `zones_from_keypoints`."""
    frame = _head_frame(keypoints)
    if frame is None:
        return np.zeros(len(vertices), bool), np.zeros(len(vertices)), np.zeros(len(vertices))
    ears, scale, up, forward = frame
    side = np.cross(up, forward)
    d = (vertices - ears) / scale
    height = d @ up
    neck = (height < HEAD_BOTTOM) & (height > NECK_BOTTOM)
    shoulders = (0.5 * (keypoints[5] + keypoints[6]) - ears) / scale
    behind = smooth_ramp(-((d - shoulders) @ forward) / (2 * RAMP))  # behind the shoulder joints' plane
    fall = (behind * smooth_ramp((NAPE - height) / RAMP) * smooth_ramp((height - FALL_END) / FALL_RAMP + 1.0)
            * smooth_ramp((FALL_HALF_WIDTH - np.abs(d @ side)) / (2 * RAMP)))
    return neck, fall, height


def hair_reach(fall: np.ndarray, height: np.ndarray, off_body: np.ndarray) -> np.ndarray:
    """How much of long hair's colour each surface point behind the upper back takes: all of it
    down to the lowest shell standing off the body there (the hair's lower edge: the back's
    shape is all a front photo gives of its length), or to the shoulders' level when nothing
    stands off, which the photo showed it reaching. fall, height (N,) of each point's nearest
    body point (`fall_zones_from_keypoints`), off_body (N,) bool -> (N,) in [0,1]."""
    shell = off_body & (fall > 0.5)
    end = SHOULDER_LEVEL
    if shell.any():
        end = max(min(end, float(np.quantile(height[shell], 0.02))), FALL_END)
    return fall * smooth_ramp((height - end) / FALL_RAMP + 1.0)


def _zones(body: BodyModel) -> _Zones:
    """All the zones of a body's topology, from its zero pose; cached per body."""
    if body not in _ZONES:
        with torch.no_grad():
            out = body.forward(body.zero_params())
        v = out.vertices[0].detach().cpu().double().numpy()
        kp = out.keypoints[0].detach().cpu().double().numpy()
        ears = np.array([np.argmin(np.linalg.norm(v - kp[k], axis=1)) for k in (3, 4)])
        _ZONES[body] = _Zones(*zones_from_keypoints(v, kp), *fall_zones_from_keypoints(v, kp), ears)
    return _ZONES[body]


def head_zones(body: BodyModel) -> tuple[np.ndarray, np.ndarray]:
    """(back, crown) of a body's topology (`zones_from_keypoints`), from its zero pose; cached per body."""
    z = _zones(body)
    return z.back, z.crown


def hair_fall_zones(body: BodyModel) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(neck, fall, height) of a body's topology (`fall_zones_from_keypoints`), from its zero pose; cached per body."""
    z = _zones(body)
    return z.neck, z.fall, z.height


def ear_distance(body: BodyModel, vertices: np.ndarray) -> float:
    """The ear-to-ear distance of a posed body (V,3): the unit of the zones, for its pixels."""
    i, j = _zones(body).ears
    return float(np.linalg.norm(vertices[i] - vertices[j]))


def long_hair_shown(photo: np.ndarray, person: np.ndarray, body_mask: np.ndarray, body_pixels: np.ndarray,
                    neck: np.ndarray, hair: np.ndarray, ear_px: float) -> bool:
    """Whether the photo shows hair of the crown's colour falling past the jaw: person pixels of
    that colour off the body's own silhouette (hair stands off the body; a shirt or a beard lies
    on it) whose nearest body vertex in the image is in the neck band (beside the neck, on the
    shoulders; not the head, whose own hair may stop at the ears). photo (H,W,3) in [0,1];
    person and body_mask (H,W) bool; body_pixels (V,2) the posed body's vertices in the photo;
    neck (V,) bool; hair (3,) the crown's colour; ear_px the ear-to-ear distance in pixels."""
    from scipy.spatial import cKDTree

    candidates = person & ~body_mask & (np.linalg.norm(photo - hair, axis=-1) < HAIR_TOLERANCE)
    ys, xs = np.nonzero(candidates)
    if len(ys) == 0 or not neck.any() or not np.isfinite(ear_px) or ear_px <= 0:
        return False
    ok = np.isfinite(body_pixels).all(1)
    _, nearest = cKDTree(body_pixels[ok]).query(np.stack([xs, ys], 1).astype(np.float64))
    return float(neck[ok][nearest].sum()) >= MIN_HAIR_AREA * ear_px ** 2


def long_hair_in_photo(photo: np.ndarray, person: np.ndarray, body_mask: np.ndarray, body: BodyModel,
                       vertices: np.ndarray, camera, hair: np.ndarray) -> bool:
    """`long_hair_shown` for a posed body (V,3) seen by ``camera`` (`cameras.Camera`) in the
    photo (H,W,3) in [0,1], with its person mask and the body's own silhouette (H,W) bool."""
    z = camera.to_cam(vertices)[:, 2]
    front = z > 1e-6
    if not front.any():
        return False
    pixels = np.full((len(z), 2), np.nan)
    pixels[front] = camera.project(vertices[front])
    ear_px = ear_distance(body, vertices) * float(camera.K[0, 0]) / float(np.median(z[front]))
    return long_hair_shown(photo, person, body_mask, pixels, hair_fall_zones(body)[0], hair, ear_px)


def crown_colour(colours: np.ndarray, seen: np.ndarray, on_crown: np.ndarray) -> np.ndarray | None:
    """The crown's colour (3,): the per-channel median of the seen texels on the crown (the odd
    highlight or background texel at the silhouette does not move it), or None when the photo
    shows too little of the crown. colours (N,3), seen and on_crown (N,) bool."""
    shown = seen & on_crown
    if int(shown.sum()) < MIN_CROWN_TEXELS or shown.sum() < MIN_CROWN_SHARE * on_crown.sum():
        return None
    return np.median(colours[shown], axis=0)
