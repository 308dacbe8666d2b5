"""Finalise helpers of the field avatar: snapping the surface onto the body, settings."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh

from zeroavatar_blender.engine.errors import BadInputError
from zeroavatar_blender.engine.field_avatar import FinaliseConfig, finalise_config, snap_to_body
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
    assert finalise_config(settings) == FinaliseConfig()
    settings.extra = {"finalise": {"snap_outer": 0.0, "level_ratio": 0.5}}
    cfg = finalise_config(settings)
    assert cfg.snap_outer == 0.0 and cfg.level_ratio == 0.5
    settings.extra = {"finalise": {"snap_outter": 0.0}}
    with pytest.raises(BadInputError, match="snap_outter"):
        finalise_config(settings)
