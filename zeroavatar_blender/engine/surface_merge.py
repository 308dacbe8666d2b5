"""The final surface as the union of the optimised field and the fitted body where the field is there.

Why: at the resolution a field reaches in minutes (CPU `standard`), its level set near the body
is the body blurred plus noise: pits in the head, holes at the hands, an eroded nose and ears.
Snapping vertices onto the body afterwards cannot restore a part the level set lost, and it folds
triangles where the field sits inside the body. The fitted body is the better estimate of the
skin, so inside the field's neighbourhood the surface is the union of both (field for garments
and hair beyond the body, body wherever the field is thinner than it); where the field has no
density at all near a body part (the photo's silhouette removed a wrongly fitted limb), the body
is not put back. Both become signed "inside" distances on the marching-cubes grid and the union
is their maximum.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter, maximum_filter

from .field.body_prior import grid_surface_distance, inside_grid


def body_inside_distance(axes: list[np.ndarray], vertices: np.ndarray, faces: np.ndarray, *,
                         band_cells: int = 2, n_samples: int = 300_000, seed: int = 0) -> np.ndarray:
    """Distance to the body's surface on a grid, positive inside; exact to about a millimetre
    within ``band_cells`` nodes of the surface and +-``band_cells`` cells beyond, where only its
    sign matters (marching cubes interpolates only across a sign change, and both ends of such
    an edge lie within a cell of the surface). -> (X, Y, Z) float32.

    Why a band: the full distance transform of a 320-cell grid costs seconds per finalise; the
    band (a few per cent of the nodes) costs a KD-tree query."""
    v = np.asarray(vertices, np.float64)
    f = np.asarray(faces, np.int64)
    inside = inside_grid(v, f, axes)
    dist = grid_surface_distance(axes, v, f, n_samples=n_samples, band_cells=band_cells, seed=seed, band_only=True)
    return np.where(inside, dist, -dist).astype(np.float32)


def field_inside_distance(density: np.ndarray, level: float, sharpness: float, eps: float = 1e-4) -> np.ndarray:
    """A field density as an approximate signed distance (positive inside, metres).

    The field starts as ``2 * level * sigmoid(-sharpness * sdf)`` (the body prior it is distilled
    from), so the inverse of that profile turns density back into distance near the surface:
    ``logit(density / (2 * level)) / sharpness``, zero on the level set. -> same shape, float32."""
    p = np.clip(np.asarray(density, np.float64) / (2.0 * level), eps, 1.0 - eps)
    return (np.log(p / (1.0 - p)) / sharpness).astype(np.float32)


def field_presence(density: np.ndarray, level: float, ratio: float = 0.05, cells: int = 2) -> np.ndarray:
    """Grid nodes within ``cells`` nodes of some field density above ``ratio * level``: where the
    field still holds the body (however blurred), as opposed to space it emptied. -> bool."""
    present = np.asarray(density) >= ratio * level
    return maximum_filter(present, size=2 * cells + 1, mode="constant", cval=False)


def union_with_body(field_density: np.ndarray, level: float, body_inside: np.ndarray, *, sharpness: float,
                    presence_ratio: float = 0.05, presence_cells: int = 2,
                    allowed: np.ndarray | None = None, smooth_cells: float = 0.0) -> np.ndarray:
    """Signed inside distance of (field) union (body where the field is present); level 0.

    ``allowed`` (bool grid) restricts the body further: the finalise passes "inside the photo's
    person mask", because the field moved a limb the fit put outside it (a foot, a hand) and
    only the field's version belongs in the result. ``smooth_cells``: the standard deviation of a
    Gaussian blur of the field's distance before the union (see ``FinaliseConfig.smooth_m``).
    field_density, body_inside (X, Y, Z) on the same grid -> (X, Y, Z) float32."""
    if field_density.shape != body_inside.shape or (allowed is not None and allowed.shape != body_inside.shape):
        raise ValueError(f"grids differ: field {field_density.shape}, body {body_inside.shape}")
    d_field = field_inside_distance(field_density, level, sharpness)
    if smooth_cells > 0:
        d_field = gaussian_filter(d_field, smooth_cells, mode="nearest")
    gate = field_presence(field_density, level, presence_ratio, presence_cells)
    if allowed is not None:
        gate &= allowed
    return np.maximum(d_field, np.where(gate, body_inside, -np.inf)).astype(np.float32)
