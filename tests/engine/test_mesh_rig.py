"""Rigging an arbitrary surface: the grouped UV unwrap."""

from __future__ import annotations

import numpy as np
import trimesh

from zeroavatar_blender.engine.mesh_rig import absorb_islands, head_part, unwrap_groups, unwrap_uv
from zeroavatar_blender.engine.texture import texel_surface_map


def test_unwrap_groups_follow_bone_chains_and_merge_small_parts():
    #      0            chains: 0 | 1-2 | 3 | 4
    #    /   \
    #   1     3
    #   |     |\
    #   2     4 5
    parents = np.array([-1, 0, 1, 0, 3, 3])
    dominant = np.array([0, 1, 2, 3, 4, 4, 4, 4, 5, 3, 3, 3])  # one vertex per entry
    skin_idx = np.stack([dominant, np.zeros_like(dominant)], 1)
    skin_w = np.tile([0.9, 0.1], (len(dominant), 1))
    faces = np.array([[i, (i + 1) % 12, (i + 2) % 12] for i in range(12)])  # face i: vertex i's part
    part = unwrap_groups(faces, skin_idx, skin_w, parents, min_share=0.0, min_island=1)
    assert part.tolist() == [0, 1, 1, 3, 4, 4, 4, 4, 5, 3, 3, 3]  # 1 and 2 are one chain
    part = unwrap_groups(faces, skin_idx, skin_w, parents, min_share=2 / 12, min_island=1)
    # bone 5's single face joins its parent's chain (3); the chain 1-2 has 2 faces and stays
    assert part.tolist() == [0, 1, 1, 3, 4, 4, 4, 4, 3, 3, 3, 3]
    part = unwrap_groups(faces, skin_idx, skin_w, parents, min_share=0.5, min_island=1)
    # small chains climb to their parents': 1-2 into the root's (which may stay small), 4 and 5 into 3's
    assert part.tolist() == [0, 0, 0] + [3] * 9


def test_grouped_unwrap_keeps_faces_and_packs_parts_apart():
    mesh = trimesh.creation.capsule(height=1.0, radius=0.25, count=[24, 24])
    v, f = np.asarray(mesh.vertices), np.asarray(mesh.faces, np.int64)
    groups = (v[f].mean(1)[:, 2] > 0).astype(np.int64)  # top and bottom halves
    vmap, new_faces, uv = unwrap_uv(v, f, groups)
    assert new_faces.shape == f.shape
    np.testing.assert_array_equal(vmap[new_faces], f)  # the same triangles, in the input's order
    assert uv.min() >= 0.0 and uv.max() <= 1.0
    # no texel is claimed by both halves: the parts are packed side by side, not on top
    size = 256
    face_id, _ = texel_surface_map(new_faces, uv[new_faces], size)
    covered = face_id >= 0
    assert covered.mean() > 0.2
    for g in (0, 1):
        mine = np.zeros(size * size, bool)
        ids = face_id.ravel()
        mine[ids >= 0] = groups[ids[ids >= 0]] == g
        assert mine.sum() > 0.05 * covered.sum()
    # and each half's charts stay inside that half's faces: no UV triangle of one group overlaps another's
    seen_by = [_coverage(new_faces[groups == g], uv, size) for g in (0, 1)]
    assert not (seen_by[0] & seen_by[1]).any()


def _coverage(faces: np.ndarray, uv: np.ndarray, size: int) -> np.ndarray:
    face_id, _ = texel_surface_map(faces, uv[faces], size)
    return face_id >= 0


def _uv_area(faces: np.ndarray, uv: np.ndarray) -> float:
    t = uv[faces]
    e1, e2 = t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]
    return float(0.5 * np.abs(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]).sum())


def test_a_scaled_group_gets_that_many_more_texels_and_charts_keep_their_padding():
    mesh = trimesh.creation.capsule(height=1.0, radius=0.25, count=[24, 24])
    v, f = np.asarray(mesh.vertices), np.asarray(mesh.faces, np.int64)
    groups = (v[f].mean(1)[:, 2] > 0).astype(np.int64)  # two halves of equal surface
    size = 256
    _, plain_faces, plain_uv = unwrap_uv(v, f, groups, size=size)
    _, new_faces, uv = unwrap_uv(v, f, groups, {1: 2.0}, size=size)
    plain = _uv_area(plain_faces[groups == 1], plain_uv) / _uv_area(plain_faces[groups == 0], plain_uv)
    scaled = _uv_area(new_faces[groups == 1], uv) / _uv_area(new_faces[groups == 0], uv)
    assert 0.8 < plain < 1.25
    assert 3.0 < scaled / plain < 5.0  # twice the texels per metre: about four times the area
    # padding (size / 256 = 1 texel here, 4 at 1024): grown by a texel, neither half's
    # texels touch the other's, so a bake's border texels never take the other half's colours
    from scipy.ndimage import binary_dilation

    _, faces4, uv4 = unwrap_uv(v, f, groups, size=size, padding=3)
    a, b = (_coverage(faces4[groups == g], uv4, size) for g in (0, 1))
    assert a.any() and b.any()
    assert not (binary_dilation(a, iterations=2) & b).any()


def test_head_part_is_the_group_at_the_head_points_unless_it_is_most_of_the_body():
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 2], [1, 0, 2], [0, 1, 2]], np.float64)
    f = np.array([[0, 1, 2]] * 9 + [[3, 4, 5]])
    groups = np.array([7] * 9 + [3])
    assert head_part(f, groups, v, np.array([[0.3, 0.3, 2.1]])) == 3
    assert head_part(f, groups, v, np.array([[0.3, 0.3, 0.1]])) is None  # 90 % of the faces: not a head


def test_islands_of_a_part_join_the_part_around_them():
    grid = trimesh.creation.box().subdivide().subdivide()  # a closed surface, 768 faces
    f = np.asarray(grid.faces, np.int64)
    centre = grid.vertices[f].mean(1)
    part = (centre[:, 2] > 0).astype(np.int64)  # top and bottom halves
    island = np.nonzero(part == 0)[0][5]
    part[island] = 1  # one face of the bottom labelled as the top, as interleaved labels do
    out = absorb_islands(f, part, min_faces=32)
    assert out[island] == 0
    assert (out == (centre[:, 2] > 0)).all()  # the halves themselves are large and stay
    assert (absorb_islands(f, part, min_faces=1) == part).all()
    # a separate piece of its own (an eye) borders no other part and keeps its label
    two = np.concatenate([f, f[:8] + len(grid.vertices)])
    labels = np.concatenate([part, [7] * 8])
    assert (absorb_islands(two, labels, min_faces=32)[-8:] == 7).all()

