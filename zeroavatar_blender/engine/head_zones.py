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
"""

from __future__ import annotations

import weakref

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

_ZONES: "weakref.WeakKeyDictionary[BodyModel, tuple[np.ndarray, np.ndarray]]" = weakref.WeakKeyDictionary()


def _ramp(x: np.ndarray) -> np.ndarray:
    """0 below 0, 1 above 1, smooth between."""
    t = np.clip(x, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def zones_from_keypoints(vertices: np.ndarray, keypoints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(back, crown) of a body: back (V,) float in [0,1], how much of the crown's colour each
    vertex takes; crown (V,) bool, where the photo's crown colour is read. vertices (V,3),
    keypoints (17,3) COCO, any pose whose head is upright over the shoulders."""
    ears = 0.5 * (keypoints[3] + keypoints[4])
    scale = float(np.linalg.norm(keypoints[3] - keypoints[4]))
    if not np.isfinite(scale) or scale <= 1e-6:
        return np.zeros(len(vertices)), np.zeros(len(vertices), bool)
    up = ears - 0.5 * (keypoints[5] + keypoints[6])  # from the shoulders' midpoint
    up /= max(float(np.linalg.norm(up)), 1e-12)
    forward = keypoints[0] - ears  # toward the nose
    forward -= (forward @ up) * up
    forward /= max(float(np.linalg.norm(forward)), 1e-12)
    d = (vertices - ears) / scale
    height, ahead = d @ up, d @ forward
    head = (np.linalg.norm(d, axis=1) < HEAD_RADIUS) & (height > HEAD_BOTTOM)
    back = head * _ramp((BEHIND_EARS - ahead) / RAMP) * _ramp((height - NAPE) / RAMP)
    crown = head & (height > CROWN_ABOVE) & (ahead < CROWN_BEHIND)
    return back, crown


def head_zones(body: BodyModel) -> tuple[np.ndarray, np.ndarray]:
    """(back, crown) of a body's topology (`zones_from_keypoints`), from its zero pose; cached per body."""
    if body not in _ZONES:
        with torch.no_grad():
            out = body.forward(body.zero_params())
        _ZONES[body] = zones_from_keypoints(out.vertices[0].detach().cpu().double().numpy(),
                                            out.keypoints[0].detach().cpu().double().numpy())
    return _ZONES[body]


def crown_colour(colours: np.ndarray, seen: np.ndarray, on_crown: np.ndarray) -> np.ndarray | None:
    """The crown's colour (3,): the per-channel median of the seen texels on the crown (the odd
    highlight or background texel at the silhouette does not move it), or None when the photo
    shows too little of the crown. colours (N,3), seen and on_crown (N,) bool."""
    shown = seen & on_crown
    if int(shown.sum()) < MIN_CROWN_TEXELS or shown.sum() < MIN_CROWN_SHARE * on_crown.sum():
        return None
    return np.median(colours[shown], axis=0)
