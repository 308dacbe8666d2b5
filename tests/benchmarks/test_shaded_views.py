"""The geometry figure's renderer: a sphere shades as a lit disc of the right size."""

from __future__ import annotations

import numpy as np
import trimesh

from tests.benchmarks.shaded_views import shade


def test_a_sphere_is_a_shaded_disc_of_the_projected_size():
    s = trimesh.creation.icosphere(subdivisions=4, radius=0.3)
    img = shade(np.asarray(s.vertices), np.asarray(s.faces), np.zeros(3), 0.0, size=128, distance=3.2)
    covered = img > 0
    # radius in pixels: focal (1.9 * size) * 0.3 / 3.2 (the silhouette of a sphere, nearly)
    expected = np.pi * (1.9 * 128 * 0.3 / 3.2) ** 2
    assert abs(covered.sum() - expected) / expected < 0.08
    assert img[covered].min() >= 0.15 and img.max() <= 1.0
    assert img[covered].std() > 0.1  # shaded by the normals, not flat
    side = shade(np.asarray(s.vertices), np.asarray(s.faces), np.zeros(3), 90.0, size=128, distance=3.2)
    assert abs((side > 0).sum() - covered.sum()) / expected < 0.05  # a sphere looks the same from the side
