"""Evaluation metrics, as the single-image human reconstruction literature reports them.

Joints: MPJPE after root alignment and PA-MPJPE (after a similarity Procrustes), in mm.
Surfaces: Chamfer distance (cm), normal consistency and F-score at 1 and 2 cm, after a
similarity alignment (monocular reconstructions have a scale/depth ambiguity).
Images: PSNR, SSIM and mask IoU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree


def mpjpe(pred: np.ndarray, gt: np.ndarray, root: np.ndarray | None = None) -> float:
    """Mean per-joint error (same units as input) after aligning the root (mean of ``root`` joints)."""
    if root is None:
        root = np.arange(len(gt))
    p = pred - pred[root].mean(0)
    g = gt - gt[root].mean(0)
    return float(np.linalg.norm(p - g, axis=-1).mean())


def umeyama(src: np.ndarray, dst: np.ndarray, with_scale: bool = True) -> tuple[float, np.ndarray, np.ndarray]:
    """Least-squares similarity (s, R, t) with dst ~ s R src + t."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    cov = xd.T @ xs / len(src)
    U, S, Vt = np.linalg.svd(cov)
    D = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        D[2, 2] = -1
    R = U @ D @ Vt
    var = (xs ** 2).sum() / len(src)
    s = float(np.trace(np.diag(S) @ D) / var) if with_scale and var > 0 else 1.0
    return s, R, mu_d - s * R @ mu_s


def pa_mpjpe(pred: np.ndarray, gt: np.ndarray) -> float:
    s, R, t = umeyama(pred, gt)
    return float(np.linalg.norm((s * pred @ R.T + t) - gt, axis=-1).mean())


@dataclass
class SurfaceMetrics:
    chamfer_cm: float  # mean of both directions' mean distances
    normal_consistency: float  # in [0, 1]
    fscore_1cm: float
    fscore_2cm: float
    scale: float  # the similarity scale applied to the prediction

    def as_dict(self) -> dict[str, float]:
        return {k: round(float(v), 5) for k, v in self.__dict__.items()}


def sample_surface(vertices: np.ndarray, faces: np.ndarray, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Area-weighted points and their face normals, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    tri = vertices[faces]
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    area = np.linalg.norm(cross, axis=1)
    valid = area > 0
    if not valid.any():
        raise ValueError("the mesh has no area")
    prob = np.where(valid, area, 0) / area[valid].sum()
    face = rng.choice(len(faces), size=count, p=prob)
    r1, r2 = rng.random(count), rng.random(count)
    s = np.sqrt(r1)
    bary = np.stack([1 - s, s * (1 - r2), s * r2], 1)
    points = (tri[face] * bary[:, :, None]).sum(1)
    normals = cross[face] / np.maximum(area[face, None], 1e-20)
    return points, normals


def closest_point_on_triangles(p: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Closest points on triangles (a,b,c) to points p, all (N,3) (Ericson, Real-Time Collision Detection 5.1.5)."""
    ab, ac, ap = b - a, c - a, p - a
    d1, d2 = (ab * ap).sum(-1), (ac * ap).sum(-1)
    bp = p - b
    d3, d4 = (ab * bp).sum(-1), (ac * bp).sum(-1)
    cp = p - c
    d5, d6 = (ab * cp).sum(-1), (ac * cp).sum(-1)
    va = d3 * d6 - d5 * d4
    vb = d5 * d2 - d1 * d6
    vc = d1 * d4 - d3 * d2
    with np.errstate(divide="ignore", invalid="ignore"):
        denom = 1.0 / (va + vb + vc)
        v = vb * denom
        w = vc * denom
        out = a + ab * v[:, None] + ac * w[:, None]  # inside the face
        # edges
        t_ab = d1 / (d1 - d3)
        t_ac = d2 / (d2 - d6)
        t_bc = (d4 - d3) / ((d4 - d3) + (d5 - d6))
    conds = [
        ((vc <= 0) & (d1 >= 0) & (d3 <= 0), a + ab * np.nan_to_num(t_ab)[:, None]),
        ((vb <= 0) & (d2 >= 0) & (d6 <= 0), a + ac * np.nan_to_num(t_ac)[:, None]),
        ((va <= 0) & ((d4 - d3) >= 0) & ((d5 - d6) >= 0), b + (c - b) * np.nan_to_num(t_bc)[:, None]),
        ((d6 >= 0) & (d5 <= d6), c),
        ((d3 >= 0) & (d4 <= d3), b),
        ((d1 <= 0) & (d2 <= 0), a),
    ]
    for cond, value in conds:  # later entries (vertices) take precedence over edges
        out = np.where(cond[:, None], value, out)
    return out


def point_mesh_distance(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray, k: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Exact-enough distance from points to a mesh surface: (distance (N,), nearest face (N,)).
    Candidates are the k faces with the nearest centroids (exact for reasonably even meshes)."""
    tri = vertices[faces]
    tree = cKDTree(tri.mean(1))
    k = min(k, len(faces))
    _, cand = tree.query(points, k=k)
    cand = cand.reshape(len(points), k)
    best_d = np.full(len(points), np.inf)
    best_f = np.zeros(len(points), dtype=np.int64)
    for j in range(k):
        f = cand[:, j]
        q = closest_point_on_triangles(points, tri[f, 0], tri[f, 1], tri[f, 2])
        d = np.linalg.norm(points - q, axis=1)
        better = d < best_d
        best_d[better], best_f[better] = d[better], f[better]
    return best_d, best_f


def align_similarity_icp(src: np.ndarray, dst: np.ndarray, iterations: int = 20) -> tuple[float, np.ndarray, np.ndarray]:
    """Similarity ICP of point set ``src`` onto ``dst``, initialised by centroids and RMS radius."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    scale = np.sqrt(((dst - mu_d) ** 2).sum(1).mean() / max(((src - mu_s) ** 2).sum(1).mean(), 1e-20))
    s, R, t = scale, np.eye(3), mu_d - scale * mu_s
    tree = cKDTree(dst)
    for _ in range(iterations):
        moved = s * src @ R.T + t
        _, idx = tree.query(moved)
        s_new, R_new, t_new = umeyama(src, dst[idx])
        converged = abs(s_new - s) < 1e-6 and np.allclose(R_new, R, atol=1e-7) and np.allclose(t_new, t, atol=1e-7)
        s, R, t = s_new, R_new, t_new
        if converged:
            break
    return s, R, t


def surface_metrics(pred_v: np.ndarray, pred_f: np.ndarray, gt_v: np.ndarray, gt_f: np.ndarray, *,
                    samples: int = 20000, align: bool = True, seed: int = 0) -> SurfaceMetrics:
    """Compare two meshes in metres. ``align`` applies a similarity ICP first."""
    if len(pred_f) == 0 or len(pred_v) == 0:
        raise ValueError("the predicted mesh is empty")
    p, pn = sample_surface(np.asarray(pred_v, np.float64), np.asarray(pred_f), samples, seed)
    g, gn = sample_surface(np.asarray(gt_v, np.float64), np.asarray(gt_f), samples, seed + 1)
    s = 1.0
    if align:
        s, R, t = align_similarity_icp(p, g)
        p = s * p @ R.T + t
        pn = pn @ R.T
        pred_v = s * np.asarray(pred_v, np.float64) @ R.T + t
    gt_v = np.asarray(gt_v, np.float64)
    # Point-to-surface distances both ways (not point-to-point: sampling density would bias them).
    d_pg, f_pg = point_mesh_distance(p, gt_v, np.asarray(gt_f))
    d_gp, f_gp = point_mesh_distance(g, np.asarray(pred_v), np.asarray(pred_f))
    chamfer = 0.5 * (d_pg.mean() + d_gp.mean())
    gt_fn = _face_normals(gt_v, np.asarray(gt_f))
    pr_fn = _face_normals(np.asarray(pred_v), np.asarray(pred_f))
    nc = 0.5 * (np.abs((pn * gt_fn[f_pg]).sum(1)).mean() + np.abs((gn * pr_fn[f_gp]).sum(1)).mean())

    def fscore(th: float) -> float:
        precision, recall = (d_pg < th).mean(), (d_gp < th).mean()
        return float(2 * precision * recall / (precision + recall)) if precision + recall > 0 else 0.0

    return SurfaceMetrics(chamfer * 100.0, float(nc), fscore(0.01), fscore(0.02), float(s))


def _face_normals(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    n = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-20)


def psnr(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR of float images in [0, 1] (optionally inside a mask)."""
    diff = (np.asarray(pred, np.float64) - np.asarray(gt, np.float64)) ** 2
    if mask is not None:
        m = np.asarray(mask, bool)
        if not m.any():
            return float("nan")
        mse = diff[m].mean()
    else:
        mse = diff.mean()
    return float(10 * np.log10(1.0 / max(mse, 1e-12)))


def ssim(pred: np.ndarray, gt: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(np.asarray(pred, np.float64), np.asarray(gt, np.float64), channel_axis=-1,
                                       data_range=1.0))


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a) > 0.5, np.asarray(b) > 0.5
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0
