"""The avatar's surface in two layers: the body's own mesh, and the field's shell off it."""

from __future__ import annotations

import numpy as np
import trimesh

from zeroavatar_blender.engine.extract import MeshData
from zeroavatar_blender.engine.surface_layers import (
    body_layer, join, open_face_set, rim_vertices, shell_layer, tuck_rim,
)


def _sphere(radius: float, subdivisions: int = 4) -> tuple[np.ndarray, np.ndarray]:
    m = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    return np.asarray(m.vertices, np.float64), np.asarray(m.faces, np.int64)


def _capped(radius: float, cap_from: float, cap_radius: float) -> MeshData:
    """A sphere whose top (z > cap_from) stands out to ``cap_radius``: a hat on a head."""
    v, f = _sphere(radius, 3)
    top = v[:, 2] > cap_from
    v[top] *= cap_radius / radius
    return MeshData(v, f)


def test_the_body_stays_where_the_surface_lies_on_it_and_goes_under_a_garment():
    body_v, body_f = _sphere(0.1)
    surface = _capped(0.1, 0.05, 0.13)  # 3 cm of hat over the top, the body everywhere else
    body = body_layer(body_v, body_f, surface, hide=0.01)
    kept_z = body.vertices[:, 2]
    assert kept_z.min() < -0.09  # the bottom stays
    assert kept_z.max() < 0.08  # the top is under the hat (the brim's ring, on the body, stays)
    # exactly the body's own triangles where it stays (no resampling)
    from scipy.spatial import cKDTree

    assert cKDTree(body_v).query(body.vertices)[0].max() < 1e-6  # float32 storage

    shell = shell_layer(surface, body, hide=0.01, min_faces=8)
    assert shell.num_faces > 0
    assert shell.vertices[:, 2].min() > 0.03  # only the hat, and the faces that join it to the body
    both = join(body, shell)
    assert both.num_faces == body.num_faces + shell.num_faces
    assert np.allclose(both.vertices[both.faces[-1]], shell.vertices[shell.faces[-1]])


def test_a_body_part_outside_the_surface_is_dropped():
    # the surface ends 4 cm short of the body's bottom (the photo's silhouette carved a
    # wrongly fitted limb): the body's faces there are outside the united volume
    body_v, body_f = _sphere(0.1)
    sv, sf = _sphere(0.1, 3)
    low = sv[:, 2] < -0.04
    sv[low, 2] = -0.04 - (sv[low, 2] + 0.04) * 0.1  # flattened bottom
    body = body_layer(body_v, body_f, MeshData(sv, sf), hide=0.01)
    assert body.vertices[:, 2].min() > -0.07
    assert body.vertices[:, 2].max() > 0.09


def test_a_small_bulge_leaves_no_hole_in_the_body():
    # a bump on the surface, 2 cm out over a few of the body's faces: its shell would be a piece
    # under min_faces (dropped as noise), so the body under it stays rather than leave a crack
    body_v, body_f = _sphere(0.1)
    sv, sf = _sphere(0.1, 4)
    d = np.linalg.norm(sv - [0.0, 0.0, 0.1], axis=1)
    sv *= (1 + 0.25 * np.clip(1 - d / 0.03, 0, 1))[:, None]  # a cone, 2.5 cm high at the top
    body = body_layer(body_v, body_f, MeshData(sv, sf), hide=0.01, min_hole=64, rings=0)
    assert body.num_faces == len(body_f)
    holed = body_layer(body_v, body_f, MeshData(sv, sf), hide=0.01, min_hole=1, rings=0)
    assert 0 < len(body_f) - holed.num_faces < 64



def test_opening_drops_thin_strips_and_keeps_wide_regions():
    v, f = _sphere(0.1, 4)
    centre = v[f].mean(1)
    cap = centre[:, 2] > 0.06  # a wide region (a garment's footprint)
    strip = np.abs(centre[:, 0]) < 0.004  # a band about one face wide (a crease)
    opened = open_face_set(f, cap | strip, len(v), 2)
    assert (opened[cap] == True).mean() > 0.97  # noqa: E712 - the cap keeps its outline
    assert not opened[strip & ~cap & (centre[:, 2] < 0.03)].any()
    assert (open_face_set(f, cap | strip, len(v), 0) == (cap | strip)).all()


def test_the_bodys_inner_parts_stay_unless_a_garment_covers_them():
    # a mouth's cavity lies deep under the surface too, but what covers it is the body's own
    # skin (the lips), not a garment: dropped, it would open the lips onto the inside of the head
    outer_v, outer_f = _sphere(0.1)
    inner_v, inner_f = _sphere(0.03, 2)
    body_v = np.concatenate([outer_v, inner_v + [0.0, 0.0, 0.04]])
    body_f = np.concatenate([outer_f, inner_f + len(outer_v)])
    kept = body_layer(body_v, body_f, MeshData(outer_v, outer_f), hide=0.01)
    assert kept.num_faces == len(body_f)
    coat_v, coat_f = _sphere(0.13, 3)  # a garment all round: both are under it
    assert body_layer(body_v, body_f, MeshData(coat_v, coat_f), hide=0.01).num_faces == 0


def _bumped(radius: float, subdivisions: int, bumps: list[tuple[np.ndarray, float, float]]) -> MeshData:
    """A sphere with bumps: (direction, angular radius in radians, height in metres) each."""
    v, f = _sphere(radius, subdivisions)
    unit = v / np.linalg.norm(v, axis=1, keepdims=True)
    for direction, width, height in bumps:
        angle = np.arccos(np.clip(unit @ (direction / np.linalg.norm(direction)), -1, 1))
        v += unit * (height * (angle < width))[:, None]
    return MeshData(v, f)


def test_a_flap_goes_and_the_body_under_it_stays():
    """A small patch of the surface 1.5 cm off the body (a crease the blur bridged) is a flap:
    its open edge would show as a sliver. layers() keeps the body there and drops the flap; a
    wide garment 5 cm off stays shell, with the body under it gone."""
    from zeroavatar_blender.engine.surface_layers import layers

    body_v, body_f = _sphere(0.1, 5)
    flap_dir, garment_dir = np.array([1.0, 0, 0]), np.array([0, 0, 1.0])
    surface = _bumped(0.1, 5, [(flap_dir, 0.15, 0.015), (garment_dir, 0.9, 0.05)])
    plain_body = body_layer(body_v, body_f, surface, hide=0.01)
    plain_shell = shell_layer(surface, plain_body, hide=0.01)
    body, shell = layers(body_v, body_f, surface, hide=0.01)

    def toward(mesh: MeshData, direction: np.ndarray) -> np.ndarray:
        unit = mesh.vertices / np.linalg.norm(mesh.vertices, axis=1, keepdims=True)
        return unit @ direction > np.cos(0.12)

    assert toward(plain_shell, flap_dir).any()  # without the rule: a shell patch over the flap
    assert not toward(shell, flap_dir).any() and toward(shell, garment_dir).any()
    assert toward(body, flap_dir).sum() >= toward(MeshData(body_v, body_f), flap_dir).sum()  # no hole
    assert not toward(body, garment_dir).any()  # under the garment: no body
    off = layers(body_v, body_f, surface, hide=0.01, flap_faces=0)  # switched off: as before
    assert off[1].num_faces == plain_shell.num_faces and off[0].num_faces == plain_body.num_faces


def test_the_shells_open_edge_goes_under_the_body_and_nothing_else_moves():
    """A hat's shell over a head ends a centimetre off it (the layers' seam): rendered, a dark slit
    along the hat's edge. Tucked, its edge lies 4 mm under the head's surface; the rest of the
    shell, and an edge too far from the body to be a seam, stay where they were."""
    body_v, body_f = _sphere(0.1)
    surface = _capped(0.108, 0.054, 0.13)  # 8 mm off the head (within ``hide``), 3 cm over its top
    body = body_layer(body_v, body_f, surface, hide=0.01)
    shell = shell_layer(surface, body, hide=0.01, min_faces=8)
    rim = rim_vertices(shell)
    assert rim.sum() > 10 and not rim.all()
    gap = np.linalg.norm(shell.vertices[rim], axis=1) - 0.1
    assert gap.min() > 0.005  # the edge stands off the head: the slit
    tucked = tuck_rim(shell, body_v, body_f, depth=0.004, reach=0.03)
    depth = 0.1 - np.linalg.norm(tucked.vertices[rim], axis=1)
    assert np.allclose(depth, 0.004, atol=0.0015)  # under the (faceted) sphere's surface
    assert np.array_equal(tucked.vertices[~rim], shell.vertices[~rim]) and np.array_equal(tucked.faces, shell.faces)
    far = tuck_rim(shell, body_v, body_f, depth=0.004, reach=0.005)  # the edge is further than this: left alone
    assert np.array_equal(far.vertices, shell.vertices)
    closed = MeshData(*_sphere(0.13, 2))
    assert not rim_vertices(closed).any() and np.array_equal(tuck_rim(closed, body_v, body_f, depth=0.004,
                                                                       reach=0.05).vertices, closed.vertices)
