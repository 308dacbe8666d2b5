"""Rigging an arbitrary surface: the grouped UV unwrap."""

from __future__ import annotations

import numpy as np
import trimesh

from zeroavatar_blender.engine.mesh_rig import unwrap_groups, unwrap_uv
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
    part = unwrap_groups(faces, skin_idx, skin_w, parents, min_share=0.0)
    assert part.tolist() == [0, 1, 1, 3, 4, 4, 4, 4, 5, 3, 3, 3]  # 1 and 2 are one chain
    part = unwrap_groups(faces, skin_idx, skin_w, parents, min_share=2 / 12)
    # bone 5's single face joins its parent's chain (3); the chain 1-2 has 2 faces and stays
    assert part.tolist() == [0, 1, 1, 3, 4, 4, 4, 4, 3, 3, 3, 3]
    part = unwrap_groups(faces, skin_idx, skin_w, parents, min_share=0.5)
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
