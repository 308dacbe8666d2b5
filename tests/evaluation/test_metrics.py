"""The benchmark's metrics against answers known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import trimesh

from zeroavatar_blender.evaluation.metrics import (
    mask_iou, mpjpe, pa_mpjpe, point_mesh_distance, psnr, surface_metrics, umeyama)


def _rotation(axis, angle):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * K + (1 - math.cos(angle)) * K @ K


def test_mpjpe_is_root_aligned_and_pa_mpjpe_removes_a_similarity():
    rng = np.random.default_rng(0)
    gt = rng.normal(size=(17, 3))
    assert mpjpe(gt + [0.3, -0.2, 5.0], gt) == pytest.approx(0.0, abs=1e-12)  # a shift is not an error
    moved = 1.7 * gt @ _rotation([1, 2, 3], 0.8).T + [1, 2, 3]
    assert pa_mpjpe(moved, gt) == pytest.approx(0.0, abs=1e-9)
    s, R, t = umeyama(gt, moved)
    assert s == pytest.approx(1.7) and np.allclose(R, _rotation([1, 2, 3], 0.8))
    one_off = gt.copy()
    one_off[3] += [0.17, 0, 0]
    assert mpjpe(one_off, gt, root=np.array([11, 12])) == pytest.approx(0.01)  # 0.17 / 17 joints


def test_point_to_surface_distance_is_exact_for_a_plane():
    plane = trimesh.creation.box(extents=(2, 2, 0.0001))
    pts = np.array([[0.1, 0.2, 0.3], [0.5, -0.5, -0.05], [1.5, 0.0, 0.0]])
    d, _ = point_mesh_distance(pts, np.asarray(plane.vertices), np.asarray(plane.faces))
    assert d == pytest.approx([0.3 - 0.00005, 0.05 - 0.00005, 0.5], abs=1e-6)


def test_chamfer_of_concentric_spheres_is_their_gap():
    """Two spheres 1.5 cm apart, no alignment: Chamfer 1.5 cm, F-score 0 at 1 cm and 1 at 2 cm."""
    inner = trimesh.creation.icosphere(subdivisions=5, radius=0.300)
    outer = trimesh.creation.icosphere(subdivisions=5, radius=0.315)
    m = surface_metrics(outer.vertices, outer.faces, inner.vertices, inner.faces, samples=4000, align=False)
    assert m.chamfer_cm == pytest.approx(1.5, abs=0.02)
    assert m.fscore_2cm == 1.0 and m.fscore_1cm == 0.0
    assert m.normal_consistency > 0.99
    # with the similarity alignment, scale absorbs the gap
    aligned = surface_metrics(outer.vertices, outer.faces, inner.vertices, inner.faces, samples=4000)
    assert aligned.chamfer_cm < 0.05 and aligned.scale == pytest.approx(0.300 / 0.315, abs=0.005)


def test_empty_prediction_is_refused():
    sphere = trimesh.creation.icosphere(subdivisions=2)
    with pytest.raises(ValueError, match="empty"):
        surface_metrics(np.zeros((0, 3)), np.zeros((0, 3), int), sphere.vertices, sphere.faces)


def test_psnr_and_iou():
    a = np.zeros((8, 8, 3))
    b = a.copy()
    b[0, 0] = 1.0  # one pixel off by 1 in all channels
    assert psnr(b, a) == pytest.approx(10 * math.log10(64))
    mask = np.zeros((8, 8), bool)
    mask[0, :4] = True
    assert psnr(b, a, mask) == pytest.approx(10 * math.log10(4))
    assert math.isnan(psnr(b, a, np.zeros((8, 8), bool)))
    m2 = np.zeros((8, 8), bool)
    m2[0, 2:6] = True
    assert mask_iou(mask, m2) == pytest.approx(2 / 6)
