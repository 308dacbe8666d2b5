"""The field-body union on analytic shapes: a ball field with a pit, a body of one or two balls."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from zeroavatar_blender.engine.extract import marching_cubes
from zeroavatar_blender.engine.field.body_prior import grid_axes, sdf_to_density
from zeroavatar_blender.engine.surface_merge import (body_inside_distance, field_inside_distance, field_presence,
                                                     union_with_body)

LEVEL, SHARPNESS, R = 50.0, 400.0, 0.3


def _grid(res: int = 48):
    axes = grid_axes(np.array([[-0.5, -0.5, -0.5], [0.9, 0.5, 0.5]]), res)
    pts = np.stack(np.meshgrid(*axes, indexing="ij"), -1)
    return axes, pts


def _ball_field(pts: np.ndarray, pit: bool) -> np.ndarray:
    """Density of a ball of radius R at the origin as the body prior makes it, optionally with a
    5-cm-deep pit carved in at +x (what a blurred field does to a nose or a hand)."""
    sdf = np.linalg.norm(pts, axis=-1) - R
    if pit:
        sdf = np.maximum(sdf, -(np.linalg.norm(pts - np.array([R, 0, 0]), axis=-1) - 0.05))
    return sdf_to_density(torch.from_numpy(sdf), LEVEL, SHARPNESS).numpy()


def _sphere(centre, radius=R) -> trimesh.Trimesh:
    s = trimesh.creation.icosphere(subdivisions=4, radius=radius)
    s.apply_translation(centre)
    return s


def _radial_error(verts: np.ndarray, centre=(0, 0, 0)) -> np.ndarray:
    return np.abs(np.linalg.norm(verts - np.asarray(centre), axis=1) - R)


def test_field_distance_inverts_the_prior_profile():
    sdf = np.linspace(-0.015, 0.015, 31)
    density = sdf_to_density(torch.from_numpy(sdf), LEVEL, SHARPNESS).numpy()
    np.testing.assert_allclose(field_inside_distance(density, LEVEL, SHARPNESS), -sdf, atol=1e-6)


def test_body_inside_distance_has_the_sign_and_size_of_the_ball():
    axes, pts = _grid()
    ball = _sphere((0, 0, 0))
    d = body_inside_distance(axes, ball.vertices, ball.faces, band_cells=2)
    truth = R - np.linalg.norm(pts, axis=-1)
    h = axes[0][1] - axes[0][0]
    band = np.abs(truth) < 1.5 * h
    assert np.abs(d - truth)[band].max() < 0.25 * h  # exact near the surface (up to the icosphere's facets)
    far = np.abs(truth) > 0.25 * h
    assert (np.sign(d) == np.sign(truth))[far].all()  # the right side everywhere
    assert np.abs(d).max() <= 2 * h + 1e-6  # beyond the band only the sign is kept


def test_union_restores_a_pit_the_field_dug_into_the_body():
    axes, pts = _grid()
    origin, h = np.array([a[0] for a in axes]), float(axes[0][1] - axes[0][0])
    density = _ball_field(pts, pit=True)
    field_only = marching_cubes(density, LEVEL, origin, h)
    assert _radial_error(field_only.vertices).max() > 0.03  # the pit is there without the body

    ball = _sphere((0, 0, 0))
    merged = union_with_body(density, LEVEL, body_inside_distance(axes, ball.vertices, ball.faces),
                             sharpness=SHARPNESS)
    mesh = marching_cubes(merged, 0.0, origin, h)
    assert _radial_error(mesh.vertices).max() < 0.5 * h


def test_union_keeps_the_field_beyond_the_body():
    """A garment: the field is a bigger ball than the body; the union is the field's surface."""
    axes, pts = _grid()
    origin, h = np.array([a[0] for a in axes]), float(axes[0][1] - axes[0][0])
    sdf = np.linalg.norm(pts, axis=-1) - (R + 0.06)
    density = sdf_to_density(torch.from_numpy(sdf), LEVEL, SHARPNESS).numpy()
    ball = _sphere((0, 0, 0))
    mesh = marching_cubes(union_with_body(density, LEVEL, body_inside_distance(axes, ball.vertices, ball.faces),
                                          sharpness=SHARPNESS), 0.0, origin, h)
    assert np.abs(np.linalg.norm(mesh.vertices, axis=1) - (R + 0.06)).max() < 0.5 * h


def test_body_parts_the_field_emptied_stay_out():
    """A second body ball where the field has no density (a wrongly fitted limb the photo's
    silhouette removed) is not put back."""
    axes, pts = _grid()
    origin, h = np.array([a[0] for a in axes]), float(axes[0][1] - axes[0][0])
    density = _ball_field(pts, pit=False)
    body = trimesh.util.concatenate([_sphere((0, 0, 0)), _sphere((0.6, 0, 0), 0.15)])
    body_in = body_inside_distance(axes, body.vertices, body.faces)
    assert (body_in > 0)[pts[..., 0] > 0.5].any()  # the second ball is in the body's distance
    mesh = marching_cubes(union_with_body(density, LEVEL, body_in, sharpness=SHARPNESS), 0.0, origin, h)
    assert mesh.vertices[:, 0].max() < R + h


def test_presence_reaches_only_the_given_number_of_cells():
    density = np.zeros((9, 9, 9))
    density[4, 4, 4] = LEVEL
    present = field_presence(density, LEVEL, ratio=0.05, cells=2)
    assert present[2, 4, 4] and present[4, 6, 6] and not present[1, 4, 4]


def test_grids_must_match():
    with pytest.raises(ValueError, match="grids differ"):
        union_with_body(np.zeros((4, 4, 4)), LEVEL, np.zeros((4, 4, 5)), sharpness=SHARPNESS)


def test_blurring_the_field_irons_out_crumples_but_not_the_body():
    """A ball whose field surface is crumpled by +-1.5 cm at a 12-cm wavelength (what a CPU field
    does where only it makes the surface) comes out close to round after the blur; where the
    body takes part, the body's surface is kept exactly."""
    axes, pts = _grid(64)
    h = axes[0][1] - axes[0][0]
    k = 2 * np.pi / 0.12
    crumple = 0.015 * np.sin(k * pts[..., 0]) * np.sin(k * pts[..., 1]) * np.sin(k * pts[..., 2])
    sdf = np.linalg.norm(pts, axis=-1) - R + crumple
    density = sdf_to_density(torch.from_numpy(sdf), LEVEL, SHARPNESS).numpy()
    no_body = np.full(density.shape, -1.0, np.float32)
    origin = np.array([a[0] for a in axes])

    def radial_error(values):
        mesh = marching_cubes(values, 0.0, origin, h)
        return np.linalg.norm(mesh.vertices, axis=1) - R  # signed: + outside the true ball

    raw = radial_error(union_with_body(density, LEVEL, no_body, sharpness=SHARPNESS))
    smooth = radial_error(union_with_body(density, LEVEL, no_body, sharpness=SHARPNESS, smooth_cells=0.025 / h))
    assert raw.std() > 0.004 and smooth.std() < 0.35 * raw.std()  # 4.7 mm -> 1.1 mm when written
    assert abs(np.median(smooth)) < 0.25 * h  # not shrunk away (a blurred ball loses ~sigma^2 / R)

    ball = _sphere((0, 0, 0))
    body = body_inside_distance(axes, ball.vertices, ball.faces)
    merged = union_with_body(density, LEVEL, body, sharpness=SHARPNESS, smooth_cells=0.025 / h)
    mesh = marching_cubes(merged, 0.0, origin, h)
    inward = np.linalg.norm(mesh.vertices, axis=1) < R - 0.25 * h
    assert not inward.any()  # the blur never pulls the surface inside the body
