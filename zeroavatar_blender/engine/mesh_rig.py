"""Turn an arbitrary posed mesh (the optimised field's surface) into a rigged avatar mesh.

Skin weights come from the fitted body (nearest surface point, then smoothed over the new mesh,
top-4); the mesh is unposed to the body's rest pose with the inverse of each vertex's blended
bone transform; UVs come from a proper unwrap (xatlas, one body part at a time, packed into one
atlas) and the texture is baked from a colour function of posed world points (the field's colour).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import scipy.sparse as sp
import torch
from scipy.spatial import cKDTree

from .body.base import skin_top_k


def closest_body_points(points: np.ndarray, body_v: np.ndarray, body_f: np.ndarray, k: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each point: the nearest body face, the barycentrics of the closest point on it, the distance."""
    from ..evaluation.metrics import closest_point_on_triangles  # pure numpy geometry, shared

    tri = body_v[body_f]
    _, cand = cKDTree(tri.mean(1)).query(points, k=min(k, len(body_f)))
    cand = cand.reshape(len(points), -1)
    best_d = np.full(len(points), np.inf)
    best_f = np.zeros(len(points), np.int64)
    best_q = np.zeros_like(points)
    for j in range(cand.shape[1]):
        f = cand[:, j]
        q = closest_point_on_triangles(points, tri[f, 0], tri[f, 1], tri[f, 2])
        d = np.linalg.norm(points - q, axis=1)
        better = d < best_d
        best_d[better], best_f[better], best_q[better] = d[better], f[better], q[better]
    bary = barycentric(best_q, tri[best_f])
    return best_f, bary, best_d


def barycentric(p: np.ndarray, tri: np.ndarray) -> np.ndarray:
    """(N,3) points on (N,3,3) triangles -> (N,3) barycentrics (clipped to the triangle)."""
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    v0, v1, v2 = b - a, c - a, p - a
    d00, d01, d11 = (v0 * v0).sum(1), (v0 * v1).sum(1), (v1 * v1).sum(1)
    d20, d21 = (v2 * v0).sum(1), (v2 * v1).sum(1)
    den = np.maximum(d00 * d11 - d01 * d01, 1e-20)
    v = (d11 * d20 - d01 * d21) / den
    w = (d00 * d21 - d01 * d20) / den
    bary = np.stack([1 - v - w, v, w], 1).clip(0, 1)
    return bary / bary.sum(1, keepdims=True)


def dense_weights(indices: np.ndarray, weights: np.ndarray, num_bones: int) -> sp.csr_matrix:
    rows = np.repeat(np.arange(len(indices)), indices.shape[1])
    return sp.csr_matrix((weights.ravel(), (rows, indices.ravel())), shape=(len(indices), num_bones))


def mesh_adjacency(faces: np.ndarray, n: int) -> sp.csr_matrix:
    i = np.concatenate([faces[:, 0], faces[:, 1], faces[:, 2]])
    j = np.concatenate([faces[:, 1], faces[:, 2], faces[:, 0]])
    A = sp.coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n))
    A = ((A + A.T) > 0).astype(np.float64)
    return A.tocsr()


def transfer_skin_weights(mesh_v: np.ndarray, mesh_f: np.ndarray, body_v: np.ndarray, body_f: np.ndarray,
                          body_idx: np.ndarray, body_w: np.ndarray, num_bones: int, *,
                          smooth_iterations: int = 10, k: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Weights of the nearest body surface point, diffused over the new mesh, top-k normalised.

    Smoothing matters for loose geometry (a skirt, hair) whose nearest body point jumps between
    bones; it is stronger far from the body. -> (indices (N,k) int64, weights (N,k) float32).
    """
    face, bary, dist = closest_body_points(mesh_v, body_v, body_f)
    W_body = dense_weights(body_idx, body_w, num_bones)
    corners = body_f[face]  # (N,3)
    W = sum(W_body[corners[:, c]].multiply(bary[:, c:c + 1]) for c in range(3))
    W = sp.csr_matrix(W)
    A = mesh_adjacency(mesh_f, len(mesh_v))
    deg = np.asarray(A.sum(1)).ravel().clip(1)
    # points far from the body are steered by neighbours more than by their own nearest bone
    keep = np.exp(-np.maximum(dist - 0.02, 0) / 0.05)[:, None]
    W0 = W.toarray() if num_bones * len(mesh_v) < 60_000_000 else None
    if W0 is None:  # pragma: no cover - huge meshes: skip smoothing rather than run out of memory
        dense = W
    else:
        dense = W0
        for _ in range(smooth_iterations):
            neighbour = (A @ dense) / deg[:, None]
            dense = keep * (0.5 * dense + 0.5 * neighbour) + (1 - keep) * neighbour
    dense_t = torch.as_tensor(np.asarray(dense), dtype=torch.float64)
    idx = torch.arange(num_bones).expand(len(mesh_v), -1)
    top_idx, top_w = skin_top_k(idx, dense_t, k)
    return top_idx.numpy().astype(np.int64), top_w.numpy().astype(np.float32)


def unpose(posed_v: np.ndarray, idx: np.ndarray, w: np.ndarray, transforms: np.ndarray) -> np.ndarray:
    """Inverse LBS: rest = (sum_k w_k T_k)^-1 posed. transforms (J,4,4) rest -> posed."""
    blended = (w[:, :, None, None] * transforms[idx]).sum(1)  # (N,4,4)
    inv = np.linalg.inv(blended)
    return (inv[:, :3, :3] @ posed_v[:, :, None])[:, :, 0] + inv[:, :3, 3]


def unwrap_groups(faces: np.ndarray, skin_idx: np.ndarray, skin_w: np.ndarray, parents: np.ndarray,
                  min_share: float = 0.02, min_island: int = 32) -> np.ndarray:
    """A body part per face for the unwrap: the bone chain (``bone_chains``) of the dominant bone
    of the face's first corner, a part under ``min_share`` of the faces merged into its parent
    chain's, and islands under ``min_island`` faces merged into the part around them
    (``absorb_islands``). Seams then run at the joints, where an artist would cut. -> (F,) part ids."""
    from .body.base import bone_chains, dominant_chains

    chain = bone_chains(np.asarray(parents, np.int64))
    part = dominant_chains(skin_idx, skin_w, parents)[faces[:, 0]]
    counts = np.bincount(part, minlength=len(chain))
    while True:
        small = [c for c in np.nonzero(counts)[0] if counts[c] < min_share * len(faces) and parents[c] >= 0]
        if not small:
            return absorb_islands(faces, part, min_island)
        c = min(small, key=lambda c: counts[c])
        into = chain[parents[c]]
        part[part == c] = into
        counts[into] += counts[c]
        counts[c] = 0


def edge_neighbours(faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of faces that share an edge: (a (P,), b (P,))."""
    f = np.asarray(faces, np.int64)
    edges = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), 1)
    owner = np.tile(np.arange(len(f)), 3)
    key = edges[:, 0] * (int(f.max()) + 1) + edges[:, 1]
    order = np.argsort(key, kind="stable")
    key, owner = key[order], owner[order]
    same = np.nonzero(key[1:] == key[:-1])[0]
    return owner[same], owner[same + 1]


def absorb_islands(faces: np.ndarray, part: np.ndarray, min_faces: int, rounds: int = 4) -> np.ndarray:
    """Give each connected island of a part under ``min_faces`` faces to the part it borders most.

    Why: the part comes from one corner's dominant bone, so where two parts meet the labels
    interleave, leaving one-face islands; each became its own chart, a speck smaller than a texel
    that took a neighbouring chart's colours (237 charts of at most 3 faces on a portrait's
    avatar). A piece of mesh of its own (an eye, a small garment piece) borders no other part and
    keeps its label."""
    from scipy.sparse.csgraph import connected_components

    part = np.asarray(part, np.int64).copy()
    if len(faces) == 0 or min_faces <= 1:
        return part
    a, b = edge_neighbours(faces)
    src, dst = np.concatenate([a, b]), np.concatenate([b, a])
    n, labels = len(faces), int(part.max()) + 1
    for _ in range(rounds):
        same = part[a] == part[b]
        graph = sp.coo_matrix((np.ones(int(same.sum())), (a[same], b[same])), shape=(n, n))
        _, comp = connected_components(graph, directed=False)
        small = np.bincount(comp)[comp] < min_faces
        border = small[src] & (part[src] != part[dst])
        if not border.any():
            break
        key, count = np.unique(comp[src[border]] * labels + part[dst[border]], return_counts=True)
        island, into = key // labels, key % labels
        order = np.lexsort((-count, island))  # per island, the most shared edges first
        first = order[np.r_[True, island[order][1:] != island[order][:-1]]]
        target = np.full(comp.max() + 1, -1, np.int64)
        target[island[first]] = into[first]
        t = target[comp]
        change = small & (t >= 0)
        part[change] = t[change]
    return part


def unwrap_uv(vertices: np.ndarray, faces: np.ndarray, groups: np.ndarray | None = None,
              texel_scale: dict[int, float] | None = None, size: int = 1024,
              padding: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """xatlas unwrap, one atlas mesh per face group (``unwrap_groups``), packed into one atlas.

    Why groups: xatlas's chart solve grows faster than the piece it is given (a noisy 82k-face
    sphere: 53 s whole, 6 s in 8 slabs; ``bench_unwrap``), and whole it can crash (a regular
    82k-face sphere, xatlas 0.0.11); separate meshes also go to separate threads.
    ``texel_scale``: group -> texels per metre relative to the rest (the packer sizes charts by
    their surface, so a group is handed over scaled by it; ``head_part`` for the face).
    Charts are packed for the texture's ``size`` with ``padding`` texels between them (default
    size / 256: 4 at 1024). Why: xatlas's default packs at its own resolution (~1200 for a 40k-face
    avatar) with one texel between charts, less than one at the bake's 1024, so a chart's border
    texels could take a neighbouring chart's colours (and a game engine's mipmaps need more).
    -> (vertex_map (N',) into the input vertices, new faces (F,3) in the input's face order,
    uv (N',2) v up)."""
    import xatlas

    groups = np.zeros(len(faces), np.int64) if groups is None else np.asarray(groups)
    texel_scale = texel_scale or {}
    atlas, pieces = xatlas.Atlas(), []
    for g in np.unique(groups):
        sel = np.nonzero(groups == g)[0]
        used, local = np.unique(faces[sel], return_inverse=True)
        atlas.add_mesh(np.ascontiguousarray(vertices[used] * float(texel_scale.get(int(g), 1.0)), dtype=np.float32),
                       np.ascontiguousarray(local.reshape(-1, 3), dtype=np.uint32))
        pieces.append((sel, used))
    pack = xatlas.PackOptions()
    pack.resolution = int(size)
    pack.padding = max(1, int(size) // 256) if padding is None else int(padding)
    pack.bilinear = True
    atlas.generate(pack_options=pack)
    vmaps, uvs, new_faces, offset = [], [], np.empty((len(faces), 3), np.int64), 0
    for i, (sel, used) in enumerate(pieces):
        vmap, piece_faces, uv = atlas[i]  # xatlas keeps each mesh's face order
        vmaps.append(used[vmap.astype(np.int64)])
        uvs.append(uv)
        new_faces[sel] = piece_faces.astype(np.int64) + offset
        offset += len(vmap)
    return np.concatenate(vmaps), new_faces, np.concatenate(uvs).astype(np.float32)


def head_part(faces: np.ndarray, groups: np.ndarray, vertices: np.ndarray, head_points: np.ndarray,
              max_share: float = 0.2) -> int | None:
    """The unwrap group (``unwrap_groups``) that holds the face: the commonest group of the faces
    nearest ``head_points`` (e.g. the posed body's COCO nose, eyes and ears), or None when that group is
    more than ``max_share`` of the faces (a rig whose head chain was merged into the torso's:
    enlarging it would not be enlarging the face). faces (F,3), groups (F,), vertices (V,3)
    posed, head_points (K,3) in the same frame."""
    from scipy.spatial import cKDTree

    centres = np.asarray(vertices, np.float64)[np.asarray(faces)].mean(1)
    _, nearest = cKDTree(centres).query(np.asarray(head_points, np.float64))
    values, counts = np.unique(np.asarray(groups)[np.atleast_1d(nearest)], return_counts=True)
    head = int(values[np.argmax(counts)])
    return head if np.mean(groups == head) <= max_share else None


def bake_texture(posed_v: np.ndarray, faces: np.ndarray, corner_uv: np.ndarray,
                 colour_fn: Callable[[np.ndarray], np.ndarray], size: int = 1024, chunk: int = 1 << 16) -> np.ndarray:
    """Evaluate ``colour_fn`` (posed world points (N,3) -> (N,3) in [0,1]) at every texel's surface
    point and pad the atlas. -> (S,S,3) uint8."""
    from scipy.ndimage import distance_transform_edt

    from .texture import bake_margin, texel_surface_map

    face_id, bary = texel_surface_map(faces, corner_uv, size, margin=bake_margin(size))
    on = face_id >= 0
    tri = posed_v[faces[face_id[on]]]
    points = (tri * bary[on][:, :, None]).sum(1)
    colours = np.concatenate([colour_fn(points[i:i + chunk]) for i in range(0, len(points), chunk)]) \
        if len(points) else np.zeros((0, 3))
    img = np.zeros((size, size, 3), np.float64)
    img[on] = colours
    if on.any():
        _, (ri, ci) = distance_transform_edt(~on, return_indices=True)
        img = img[ri, ci]
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
