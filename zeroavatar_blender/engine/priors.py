"""A shape prior for what the fitted body lacks: garments and hair, guessed from the silhouette.

The body prior pulls unobserved space towards the bare body, so a skirt that the photo shows
stays a thin sheet in the reference view and vanishes from the side. Here the person mask and
the body's own silhouette are "inflated" alike (each horizontal run of the silhouette taken as a
round cross-section, the guess of sketch-based modelling: a skirt is as deep as it is wide), and
where the person is thicker than the body the difference becomes an outward offset of the body:

    proxy(x) = sdf_body(x) - excess(project(x))

Beside the body's silhouette the offset also spans the lateral gap, so the proxy fills the whole
extra silhouette. A skirt flaring 20 cm past the legs thus also reaches about 20 cm in front of
and behind them, while a subject whose clothes are painted on (mask = body silhouette) keeps the
body. A dead zone absorbs the centimetre or two by which a good fit still misses the mask.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt, gaussian_filter

from .cameras import Camera, project_torch
from .field.body_prior import SdfGrid

DEAD_ZONE_M = 0.02  # excess thickness below this is fit error, not clothing
MAX_EXCESS_M = 0.35  # no garment sticks out further from the body than this


def row_half_depth(mask: np.ndarray) -> np.ndarray:
    """Half-depth of each mask pixel if the silhouette's horizontal runs were circular cross-sections
    (an upright person's limbs and clothes are): sqrt(distance to the run's left edge * distance to
    its right edge), in pixels. (H,W) bool -> (H,W) float, 0 outside the mask."""
    m = np.asarray(mask, bool)
    H, W = m.shape
    idx = np.broadcast_to(np.arange(W), (H, W))
    last_out_left = np.maximum.accumulate(np.where(m, -1, idx), axis=1)  # -1: the image border
    first_out_right = W - 1 - np.maximum.accumulate(np.where(m, -1, W - 1 - idx)[:, ::-1], axis=1)[:, ::-1]
    left = idx - last_out_left - 0.5
    right = first_out_right - idx - 0.5
    return np.where(m, np.sqrt(np.clip(left, 0, None) * np.clip(right, 0, None)), 0.0)


def run_extra_width(person: np.ndarray, body: np.ndarray) -> np.ndarray:
    """For each person pixel, how many pixels of its horizontal run of the person mask the body
    does not cover (the run's extra width). Where a run merely joins two body runs across a gap
    of a pixel or two (the armpit, the crotch: the fit misses the mask there) this is small, even
    though the joined run's inflation is far thicker than either body run's.
    (H,W) bool -> (H,W) float, 0 outside the person mask."""
    m = np.asarray(person, bool)
    H, W = m.shape
    starts = m & ~np.pad(m, ((0, 0), (1, 0)))[:, :-1]
    run = np.cumsum(starts.ravel()).reshape(H, W) * m  # 0 outside runs, ids from 1
    n = int(run.max()) + 1
    total = np.bincount(run.ravel(), minlength=n)
    covered = np.bincount(run.ravel(), weights=(m & np.asarray(body, bool)).ravel(), minlength=n)
    return np.where(m, (total - covered)[run], 0.0).astype(np.float64)


def _transposed(measure, *masks: np.ndarray) -> np.ndarray:
    """A per-pixel run measure taken along columns instead of rows."""
    return measure(*(np.ascontiguousarray(np.asarray(m).T) for m in masks)).T


def nearest_body_label(body: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Each pixel's label (0/1) of the nearest body pixel in its own row, -1 in rows without
    body. (H,W) bool, (H,W) bool -> (H,W) int8."""
    body = np.asarray(body, bool)
    out = np.full(body.shape, -1, np.int8)
    if not body.any():
        return out
    # a huge spacing between rows makes the distance transform one nearest search per row
    _, (ni, nj) = distance_transform_edt(~body, sampling=(1e6, 1.0), return_indices=True)
    rows = body.any(axis=1)
    out[rows] = np.asarray(label, bool)[ni, nj][rows].astype(np.int8)
    return out


def cut_at_label_changes(masks: tuple[np.ndarray, ...], labels: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each mask with the pixel where ``labels`` (nearest_body_label) changes along a row taken
    out, so row runs end where an arm meets the torso."""
    change = np.zeros(labels.shape, bool)
    change[:, 1:] = (labels[:, 1:] != labels[:, :-1]) & (labels[:, 1:] >= 0) & (labels[:, :-1] >= 0)
    return tuple(np.asarray(m, bool) & ~change for m in masks)


def silhouette_excess(person_mask: np.ndarray, body_mask: np.ndarray, metres_per_pixel: float, *,
                      dead_zone: float = DEAD_ZONE_M, max_excess: float = MAX_EXCESS_M,
                      smooth_px: float = 1.5, arm_mask: np.ndarray | None = None) -> np.ndarray:
    """How far (metres) from the fitted body the person's surface may reach along each pixel's ray.

    On the body's silhouette: how much thicker the person is there than the body (difference of
    the two silhouettes' inflations). Beside it (a skirt's flare, hair): the distance to the body's
    silhouette combined with the person's own inflation there, so the offset body covers the
    whole extra silhouette and is as deep as it is wide. The extra thickness of a row's run is
    capped by that run's extra width, so two body runs joined across a gap the fit leaves (the
    armpits) are not a garment. Zero outside the person mask, and where the person is within
    ``dead_zone`` of the body (fit error, painted-on clothes).
    ``arm_mask``: the body's pixels of an arm part (the optimiser passes forearms and hands,
    ``body.base.arm_vertices``). Runs are then measured per body part: a run is cut where its
    nearest body pixel enters or leaves that part, so a sleeve pressed against a jacket's side
    does not inflate the chest as one wide round section (the chest plate).
    person_mask, body_mask (H,W) bool; ``metres_per_pixel`` at the subject's depth. -> (H,W) float32.
    """
    person = np.asarray(person_mask, bool)
    body = np.asarray(body_mask, bool)
    if person.shape != body.shape:
        raise ValueError(f"person mask {person.shape} and body mask {body.shape} differ")
    # Runs along rows suit upright limbs, torsos and skirts; a horizontal limb (a T-pose's arms)
    # needs runs along columns, or its rows (as long as the arm) read as a thick garment. Each
    # pixel measures across the body's thinner direction there (beside the body: the nearest body
    # pixel's).
    if body.any():
        beside_px, (ni, nj) = distance_transform_edt(~body, return_indices=True)
        across_rows = row_half_depth(body) <= _transposed(row_half_depth, body)
        across_rows = across_rows[ni, nj]
    else:
        beside_px, across_rows = np.zeros(body.shape), np.ones(body.shape, bool)

    rows_cut = cols_cut = {"person": person, "body": body}  # the masks each direction measures
    if arm_mask is not None and body.any():
        arm = np.asarray(arm_mask, bool) & body
        p_rows, b_rows = cut_at_label_changes((person, body), nearest_body_label(body, arm))
        p_cols, b_cols = cut_at_label_changes((person.T, body.T), nearest_body_label(body.T, arm.T))
        rows_cut, cols_cut = {"person": p_rows, "body": b_rows}, {"person": p_cols.T, "body": b_cols.T}

    def across(measure, *names):
        by_rows = measure(*(rows_cut[n] for n in names))
        return np.where(across_rows, by_rows, _transposed(measure, *(cols_cut[n] for n in names)))

    h_person = across(row_half_depth, "person") * metres_per_pixel
    h_body = across(row_half_depth, "body") * metres_per_pixel
    beside = beside_px * metres_per_pixel
    # extra half-thickness along the ray, at most the run's extra width (see run_extra_width)
    extra = across(run_extra_width, "person", "body") * metres_per_pixel
    depth = np.maximum(np.minimum(h_person - h_body, extra) - dead_zone, 0.0)
    reach = np.where(body, depth, np.where(depth > 0, np.hypot(beside, depth), 0.0))
    reach = np.clip(reach, 0.0, max_excess) * person
    if smooth_px > 0:
        reach = gaussian_filter(reach, smooth_px) * person
    return reach.astype(np.float32)


def sample_map(image: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Bilinear lookup of a (H,W) map at (N,2) pixel coordinates (centres at integers), 0 outside."""
    H, W = image.shape
    g = torch.stack([(pixels[:, 0] + 0.5) / W * 2 - 1, (pixels[:, 1] + 0.5) / H * 2 - 1], -1)
    out = torch.nn.functional.grid_sample(image[None, None].to(g.dtype), g.reshape(1, 1, -1, 2), mode="bilinear",
                                          padding_mode="zeros", align_corners=False)
    return out.reshape(-1)


def garment_proxy_sdf(sdf: SdfGrid, camera: Camera, excess: np.ndarray | torch.Tensor) -> SdfGrid:
    """The body's SDF grid offset outward by the silhouette excess seen from ``camera`` (whose
    image size is the excess map's). Not a true distance away from the body, but negative inside
    the proxy, positive outside, and equal to the body's SDF wherever the excess is zero."""
    excess_t = torch.as_tensor(excess, dtype=torch.float32)
    if tuple(excess_t.shape) != (camera.height, camera.width):
        raise ValueError(f"excess map {tuple(excess_t.shape)} does not match the camera's "
                         f"{camera.height}x{camera.width} image")
    X, Y, Z = sdf.shape
    axes = [sdf.origin[i].item() + sdf.spacing * torch.arange(n, dtype=torch.float64) for i, n in enumerate((X, Y, Z))]
    pts = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    pix, in_front = points_to_pixels(pts, camera)
    offset = sample_map(excess_t, pix) * in_front
    values = sdf.values.cpu() - offset.reshape(X, Y, Z)
    return SdfGrid(values.to(sdf.values.device), sdf.origin, sdf.spacing)


def excess_at_points(points: np.ndarray, camera: Camera, excess: np.ndarray) -> np.ndarray:
    """The silhouette excess (metres) along each point's ray in ``camera`` (whose image is the
    map's): the evidence the photo gives of a garment at and behind that pixel.
    (N,3) world -> (N,) float, 0 outside the image or behind the camera."""
    pix, in_front = points_to_pixels(points, camera)
    return (sample_map(torch.as_tensor(excess, dtype=torch.float32), pix) * in_front).numpy()


def points_to_pixels(points: np.ndarray, camera: Camera) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,3) world -> (N,2) float32 pixel coordinates in ``camera`` and (N,) bool "in front of it"."""
    K, w2c = camera.torch(torch.float64)
    pix, z = project_torch(torch.as_tensor(np.asarray(points, np.float64)), K, w2c)
    return pix.float(), z > 0


class SilhouetteCone:
    """Where the photo lets the person be: the points whose reference-view pixel is in the person
    mask (grown by ``margin_px``), or off the image, or behind the camera (the photo says nothing
    there: a half-body photo's legs). Anything else would show as person where the photo shows
    background, so a density there is a floater by definition; the renderer's occupancy grids
    leave such cells empty (never sampled, so no step pays for them and no mesh shows them).

    Callable on the device the mask is on: (N,3) world -> (N,) float 0/1.
    """

    def __init__(self, camera: Camera, mask: torch.Tensor, margin_px: int, device: torch.device | str = "cpu") -> None:
        person = (torch.as_tensor(mask, dtype=torch.float32).cpu() > 0.05).float()
        if margin_px > 0:
            k = 2 * int(margin_px) + 1
            person = torch.nn.functional.max_pool2d(person[None, None], k, stride=1, padding=int(margin_px))[0, 0]
        self.inside = person.to(device)
        self.K, self.w2c = camera.torch(torch.float32, device)
        self.margin_px = int(margin_px)

    @staticmethod
    def for_reference(camera: Camera, mask: torch.Tensor, body_depth: torch.Tensor, margin_m: float,
                      device: torch.device | str = "cpu") -> "SilhouetteCone":
        """``margin_m`` metres at the body's median depth (the mask's soft edge, stray hair)."""
        depth = torch.as_tensor(body_depth)
        hit = torch.isfinite(depth)
        z = float(depth[hit].median()) if bool(hit.any()) else 3.0
        return SilhouetteCone(camera, mask, int(np.ceil(margin_m * float(camera.K[0, 0]) / z)), device)

    @property
    def share(self) -> float:
        """The image's share the cone covers (a fully masked photo carves nothing)."""
        return float(self.inside.mean())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        pix, z = project_torch(x.to(self.K.dtype), self.K, self.w2c)
        H, W = self.inside.shape
        col, row = torch.round(pix[:, 0]).long(), torch.round(pix[:, 1]).long()
        on_image = (z > 1e-6) & (col >= 0) & (col < W) & (row >= 0) & (row < H)
        seen = self.inside[row.clamp(0, H - 1), col.clamp(0, W - 1)]
        return torch.where(on_image, seen, torch.ones_like(seen))
