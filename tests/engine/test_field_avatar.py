"""Finalise helpers of the field avatar: snapping the surface onto the body, settings."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh

from zeroavatar_blender.engine.errors import BadInputError
from zeroavatar_blender.engine.field_avatar import STANDARD_SMOOTH_M, FinaliseConfig, finalise_config, snap_to_body
from zeroavatar_blender.engine.pipeline import JobSettings


def test_snap_moves_near_points_onto_the_body_and_leaves_far_ones():
    sphere = trimesh.creation.icosphere(subdivisions=5, radius=0.3)
    v, f = np.asarray(sphere.vertices), np.asarray(sphere.faces)
    direction = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.6, 0.8]])
    radii = np.array([0.305, 0.2925, 0.3175, 0.36])  # 5 mm out, 7.5 mm in, 17.5 mm out, 6 cm out
    points = direction * radii[:, None]
    out = snap_to_body(points, v, f, inner=0.01, outer=0.025)
    r = np.linalg.norm(out, axis=1)
    assert r[0] == pytest.approx(0.3, abs=1e-3) and r[1] == pytest.approx(0.3, abs=1e-3)
    assert 0.3 + 1e-3 < r[2] < 0.3175  # halfway: partly pulled in
    assert np.allclose(out[3], points[3])  # a garment 6 cm out keeps its shape
    assert np.allclose(snap_to_body(points, v, f, inner=0.0, outer=0.0), points)  # off


def test_hold_keeps_a_garment_close_to_the_body_where_the_photo_shows_one():
    sphere = trimesh.creation.icosphere(subdivisions=5, radius=0.3)
    v, f = np.asarray(sphere.vertices), np.asarray(sphere.faces)
    points = np.array([[0.0, 0.0, 0.31], [0.31, 0.0, 0.0], [0.0, 0.31, 0.0]])  # 1 cm out: snapped without evidence
    out = snap_to_body(points, v, f, inner=0.02, outer=0.05, hold=np.array([0.0, 1.0, 0.5]))
    r = np.linalg.norm(out, axis=1)
    assert r[0] == pytest.approx(0.3, abs=1e-3)
    assert np.allclose(out[1], points[1])
    assert 0.3 + 2e-3 < r[2] < 0.31 - 2e-3


def test_finalise_settings_override_and_reject_unknown_names():
    settings = JobSettings()
    settings.quality = "standard"
    assert finalise_config(settings) == FinaliseConfig(smooth_m=STANDARD_SMOOTH_M)
    settings.quality = "full"  # SDS fields are not blurred (nothing measured says they need it)
    assert finalise_config(settings) == FinaliseConfig(smooth_m=0.0)
    settings.extra = {"finalise": {"snap_outer": 0.0, "level_ratio": 0.5, "smooth_m": 0.01}}
    cfg = finalise_config(settings)
    assert cfg.snap_outer == 0.0 and cfg.level_ratio == 0.5 and cfg.smooth_m == 0.01
    settings.extra = {"finalise": {"snap_outter": 0.0}}
    with pytest.raises(BadInputError, match="snap_outter"):
        finalise_config(settings)


class _TwoBallField:
    """An analytic field with the attributes finalise reads: two balls with the body prior's
    density profile, each with a 5-cm pit dug in at the top (a blurred nose or hand)."""

    def __init__(self) -> None:
        import torch

        from zeroavatar_blender.engine.field.nerf import NeRFFieldConfig

        self.aabb = torch.tensor([[-0.5, -0.5, -0.5], [1.0, 0.5, 0.5]])
        self.config = NeRFFieldConfig()
        self.centres = torch.tensor([[0.0, 0.0, 0.0], [0.65, 0.0, 0.0]])
        self.radii = torch.tensor([0.3, 0.2])

    def density(self, x):
        import torch

        from zeroavatar_blender.engine.field.body_prior import sdf_to_density

        sdf = (torch.cdist(x, self.centres) - self.radii).min(1).values
        for c, r in zip(self.centres, self.radii):  # the pits
            sdf = torch.maximum(sdf, -((x - (c + torch.tensor([0.0, 0.0, float(r)]))).norm(dim=1) - 0.05))
        return sdf_to_density(sdf, self.config.surface_density, 400.0)


def _balls(*spheres):
    parts = []
    for centre, radius in spheres:
        s = trimesh.creation.icosphere(subdivisions=4, radius=radius)
        s.apply_translation(centre)
        parts.append(s)
    body = trimesh.util.concatenate(parts)
    return np.asarray(body.vertices), np.asarray(body.faces)


def test_field_surface_is_the_union_with_the_body_inside_the_person_mask():
    """The body fills the field's pits where the photo's mask covers it, not elsewhere; without
    the union (the old behaviour) the pits stay."""
    from zeroavatar_blender.engine.cameras import Camera, intrinsics, look_at
    from zeroavatar_blender.engine.field_avatar import ReferenceSilhouette, field_surface

    field = _TwoBallField()
    body_v, body_f = _balls(((0.0, 0.0, 0.0), 0.3), ((0.65, 0.0, 0.0), 0.2))
    cam = Camera(intrinsics(160, 160, 200.0), look_at(np.array([0.3, -4.0, 0.0]), np.array([0.3, 0.0, 0.0])), 160, 160)
    px = cam.project(np.array([[0.3, 0.0, 0.0]]))[0]  # the image column between the balls
    mask = np.zeros((160, 160))
    mask[:, : int(px[0])] = 1.0  # the person mask covers only the first ball
    silhouette = ReferenceSilhouette(cam, mask, None)

    def top_of(mesh, centre, radius):
        near = np.linalg.norm(mesh.vertices[:, :2] - np.asarray(centre)[:2], axis=1) < 0.02
        return mesh.vertices[near, 2].max() - radius

    fc = FinaliseConfig()
    merged = field_surface(field, fc, 96, body_v, body_f, silhouette)
    plain = field_surface(field, FinaliseConfig(body_union=False), 96, body_v, body_f, silhouette)
    h = 1.5 / 96
    assert abs(top_of(merged, (0, 0), 0.3)) < h  # the pit in the masked ball is filled by the body
    assert top_of(plain, (0, 0), 0.3) < -0.03  # ... which the field alone leaves open
    assert top_of(merged, (0.65, 0), 0.2) < -0.03  # the ball outside the mask keeps the field's pit


def test_reference_mask_counts_off_image_points_as_unknown_not_empty():
    """A half-body photo's legs lie off the image: the union keeps the body there (mask 1), while
    on the image an empty mask pixel still rules the body out."""
    from zeroavatar_blender.engine.cameras import Camera, intrinsics, look_at
    from zeroavatar_blender.engine.field_avatar import ReferenceSilhouette

    cam = Camera(intrinsics(64, 64, 80.0), look_at(np.array([0.0, -4.0, 0.0]), np.zeros(3)), 64, 64)
    mask = np.zeros((64, 64))
    mask[:, :32] = 1.0
    sil = ReferenceSilhouette(cam, mask, None)
    points = np.array([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -9.0], [9.0, 0.0, 0.0]])
    uv = cam.project(points)
    assert uv[0, 0] < 31 and 33 < uv[1, 0] < 63 and (uv[2, 1] > 64 or uv[2, 1] < 0) and uv[3, 0] > 64
    np.testing.assert_allclose(sil.mask_at(points), [1.0, 0.0, 1.0, 1.0], atol=1e-6)


def test_density_grid_skips_unoccupied_cells_and_keeps_the_surface():
    """Evaluating only the renderer's occupied cells (grown by one) gives the same surface as the
    whole grid, with far fewer field evaluations."""
    import torch

    from zeroavatar_blender.engine.field_avatar import density_grid, field_surface
    from zeroavatar_blender.engine.render.volume import DenseOccupancy

    field = _TwoBallField()
    calls = {"points": 0}
    plain_density = field.density

    def counted(x):
        calls["points"] += len(x)
        return plain_density(x)

    field.density = counted
    grid = DenseOccupancy(field.aabb, 32)
    grid.update(plain_density, threshold=0.5, rounds=2, generator=torch.Generator().manual_seed(0))
    assert 0.05 < grid.mask.float().mean() < 0.6  # the two balls, not the whole box

    axes, full = density_grid(field, 64)
    full_calls, calls["points"] = calls["points"], 0
    _, masked = density_grid(field, 64, grid.mask)
    assert calls["points"] < 0.7 * full_calls
    evaluated = masked != 0
    np.testing.assert_allclose(masked[evaluated], full[evaluated], rtol=1e-6)
    # everything left out is empty space: far below the presence level of the union
    assert full[~evaluated].max() < 0.05 * field.config.surface_density
    body_v, body_f = _balls(((0.0, 0.0, 0.0), 0.3), ((0.65, 0.0, 0.0), 0.2))
    fc = FinaliseConfig()
    a = field_surface(field, fc, 64, body_v, body_f)
    b = field_surface(field, fc, 64, body_v, body_f, occupied=grid.mask)
    assert len(a.vertices) == len(b.vertices) and np.allclose(a.vertices, b.vertices)
