"""The avatar's surface in two layers: the fitted body's own mesh, and the field's shell where it
stands off the body (a skirt, a jacket, hair).

Why: the union surface (surface_merge.py) comes from marching cubes at about a centimetre and is
then decimated, so where it is the body it samples the body at that spacing: lips, nostrils and
fingers became a few large flat facets, shaded as broken planes in any lit scene, where the body
model has six times the triangles (measured on a portrait: a fifth of the face's triangles more
than 30 degrees off the body's normals). Where the field agrees with the body, the body's own
triangles are the answer; the field's surface is kept only where it stands more than about a
centimetre off the body, the way a game character's clothes are a layer over its body.
"""

from __future__ import annotations

import numpy as np

from .extract import MeshData, _subset, boundary_edges, drop_small_pieces, face_components


def body_layer(body_v: np.ndarray, body_f: np.ndarray, surface: MeshData, *, hide: float,
               min_hole: int = 64, rings: int = 2) -> MeshData:
    """The body's faces that ``body_faces_kept`` keeps, as a mesh."""
    keep = body_faces_kept(body_v, body_f, surface, hide=hide, min_hole=min_hole, rings=rings)
    return _subset(MeshData(np.asarray(body_v, np.float64), np.asarray(body_f, np.int64)), keep)


def body_faces_kept(body_v: np.ndarray, body_f: np.ndarray, surface: MeshData, *, hide: float,
                    min_hole: int = 64, rings: int = 2) -> np.ndarray:
    """(F,) bool: the body's faces where the united surface (``surface``: closed, faces
    outward) lies on it. Each body vertex measures its signed distance to that surface (by the
    outward normal of the nearest surface triangle): more than ``hide`` inside the volume, it is
    under a garment (or a leg inside a skirt); more than ``hide`` outside, the photo's silhouette
    emptied that space (fit error) and the field's own surface stands elsewhere; a face whose corners all lie that far off,
    either way, is dropped. Within ``hide`` the body stays, being the finer answer. Inside
    counts only where the nearest surface point is itself more than ``hide`` off the body (a
    garment): the body's own inner parts (the mouth's cavity behind the lips) are as deep under
    the surface, and dropped they opened the lips onto the inside of the head.

    Dropped pieces under ``min_hole`` faces are kept after all: the shell over them would be a
    piece as small, which ``shell_layer`` drops as noise, and the avatar would have a hole there,
    seen through to its far side (on a portrait: 164 such faces, in pieces under 64). So are
    strips narrower than about ``2 * rings`` faces (``open_face_set``): a crease of the body lies
    more than ``hide`` under the centimetre surface that bridges it, and dropped it is a crack
    (keeping them: Chamfer crouch_f 1.81 -> 1.79 cm, sitting_m 1.92 -> 1.90)."""
    from .mesh_rig import closest_body_points

    v = np.asarray(body_v, np.float64)
    f = np.asarray(body_f, np.int64)
    sv, sf = surface.vertices.astype(np.float64), np.asarray(surface.faces, np.int64)
    face, bary, _ = closest_body_points(v, sv, sf, k=8)
    tri = sv[sf[face]]
    closest = (tri * bary[:, :, None]).sum(1)
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normal /= np.linalg.norm(normal, axis=1, keepdims=True).clip(1e-12)
    signed = ((v - closest) * normal).sum(1)  # + outside the united volume
    under = signed < -hide
    if under.any():  # under a garment only if what covers it stands off the body itself
        _, _, cover_off = closest_body_points(closest[under], v, f, k=8)
        under[under] = cover_off > hide
    off = under | (signed > hide)
    drop = open_face_set(f, off[f].all(1), len(v), rings)
    if drop.any() and min_hole > 1:
        piece = face_components(MeshData(v, f[drop]))
        small = np.bincount(piece)[piece] < min_hole
        drop[np.nonzero(drop)[0][small]] = False
    return ~drop


def open_face_set(faces: np.ndarray, chosen: np.ndarray, num_vertices: int, rings: int) -> np.ndarray:
    """Morphological opening of a set of faces over the mesh: shrink it by ``rings`` rings of
    faces (through shared vertices), grow what is left back inside the set. Strips and specks
    thinner than about ``2 * rings`` faces leave the set; wide regions keep their outline."""
    f = np.asarray(faces, np.int64)
    core = np.asarray(chosen, bool).copy()
    for _ in range(rings):
        touches_other = np.zeros(num_vertices, bool)
        touches_other[f[~core].ravel()] = True
        core &= ~touches_other[f].any(1)
    for _ in range(rings):
        near = np.zeros(num_vertices, bool)
        near[f[core].ravel()] = True
        core = chosen & near[f].any(1)
    return core


def shell_layer(surface: MeshData, body: MeshData, *, hide: float, min_faces: int = 64) -> MeshData:
    """The faces of ``surface`` (the union's marching cubes) with a corner more than ``hide`` from
    the body layer, without pieces under ``min_faces`` faces (noise)."""
    from .mesh_rig import closest_body_points

    if surface.num_faces == 0:
        return surface
    if body.num_faces:
        _, _, dist = closest_body_points(surface.vertices.astype(np.float64), body.vertices.astype(np.float64),
                                         body.faces, k=6)
        off = dist > hide
    else:
        off = np.ones(surface.num_vertices, bool)
    shell = _subset(surface, off[surface.faces].any(1))  # any: the layers overlap by a face instead of leaving a gap
    return drop_small_pieces(shell, min_faces)


def layers(body_v: np.ndarray, body_f: np.ndarray, surface: MeshData, *, hide: float, flap_faces: int = 256,
           flap_off: float = 0.03) -> tuple[MeshData, MeshData]:
    """The body layer and the shell (body_faces_kept, shell_layer), without flaps: shell pieces
    under ``flap_faces`` faces lying all within ``flap_off`` of the body. A flap is the union's
    surface a centimetre or two off the body over a small patch (a crease the blur bridged, the
    groin under a suit); its open edge shows as a sliver in any render, and the body under it is
    the better surface. The body faces near a flap are kept, then the flap goes. Measured: the
    pieces the benchmark's garments make have 2226-7080 faces and stand 3.8-10 cm off; the flaps
    on the astronaut portrait, jacket_m and hair_f had 69-195 faces, all within 2.8 cm."""
    v, f = np.asarray(body_v, np.float64), np.asarray(body_f, np.int64)
    keep = body_faces_kept(v, f, surface, hide=hide)
    shell = shell_layer(surface, _subset(MeshData(v, f), keep), hide=hide)
    flaps = flap_faces_of(shell, v, f, flap_faces, flap_off) if flap_faces > 0 else np.zeros(shell.num_faces, bool)
    if not flaps.any():
        return _subset(MeshData(v, f), keep), shell
    from scipy.spatial import cKDTree

    near, _ = cKDTree(shell.vertices[np.unique(shell.faces[flaps])]).query(v, distance_upper_bound=flap_off)
    keep |= np.isfinite(near)[f].any(1)
    body = _subset(MeshData(v, f), keep)
    shell = shell_layer(surface, body, hide=hide)
    return body, _subset(shell, ~flap_faces_of(shell, v, f, flap_faces, flap_off))


def flap_faces_of(shell: MeshData, body_v: np.ndarray, body_f: np.ndarray, max_faces: int,
                  max_off: float) -> np.ndarray:
    """(F,) bool: the shell's faces in pieces of under ``max_faces`` faces whose vertices all lie
    within ``max_off`` of the whole body's surface."""
    from .mesh_rig import closest_body_points

    if shell.num_faces == 0:
        return np.zeros(0, bool)
    piece = face_components(shell)
    size = np.bincount(piece)
    _, _, dist = closest_body_points(shell.vertices.astype(np.float64), body_v, body_f, k=6)
    far = np.zeros(len(size), bool)
    np.logical_or.at(far, piece, (dist[shell.faces] > max_off).any(1))
    return (size < max_faces)[piece] & ~far[piece]


def rim_vertices(mesh: MeshData) -> np.ndarray:
    """(V,) bool: the vertices on the mesh's open edges (`extract.boundary_edges`)."""
    rim = np.zeros(mesh.num_vertices, bool)
    rim[boundary_edges(mesh.faces, mesh.num_vertices).ravel()] = True
    return rim


def tuck_rim(shell: MeshData, body_v: np.ndarray, body_f: np.ndarray, *, depth: float, reach: float) -> MeshData:
    """The shell with its open edge pushed ``depth`` under the body's surface where it comes
    within ``reach`` of it. The shell ends where it meets the body, about a centimetre off it
    (``hide``), over the body layer's edge: rendered, that centimetre is a dark slit into the
    avatar along the garment's edge (Cycles, flat grey texture: the long hair's and the skirt's
    outlines drawn as cracks). Under the skin the two layers meet in a crease instead."""
    from .mesh_rig import closest_body_points

    rim = np.nonzero(rim_vertices(shell))[0]
    if len(rim) == 0 or len(body_f) == 0:
        return shell
    bv, bf = np.asarray(body_v, np.float64), np.asarray(body_f, np.int64)
    face, bary, dist = closest_body_points(shell.vertices[rim].astype(np.float64), bv, bf, k=8)
    near = dist < reach
    tri = bv[bf[face[near]]]
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normal /= np.linalg.norm(normal, axis=1, keepdims=True).clip(1e-12)
    v = shell.vertices.astype(np.float64).copy()
    v[rim[near]] = (tri * bary[near, :, None]).sum(1) - depth * normal
    return MeshData(v, shell.faces)


def join(a: MeshData, b: MeshData) -> MeshData:
    """Both meshes as one (separate pieces, as a character's clothes are over its body)."""
    return MeshData(np.concatenate([a.vertices, b.vertices]).astype(np.float64),
                    np.concatenate([a.faces, b.faces + a.num_vertices]).astype(np.int64))
