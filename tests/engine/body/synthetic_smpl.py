"""A small synthetic SMPL / SMPL-X model of our own (no MPI data) in the official file formats.

A coarse humanoid of capped tubes around the SMPL skeleton (SMPL frame: metres, Y up, facing +Z,
+X the subject's left), left-right symmetric, with every array smplx's loaders read:
v_template, f, shapedirs, posedirs, J_regressor, weights, kintree_table (+ SMPL-X's hand PCA,
landmarks, vt/ft and a dict-valued member as the real .npz has). Saved as .npz and as a .pkl
that mimics the official Python 2 files: latin1 strings, ``chumpy.ch.Ch`` arrays (a stand-in class
that exists only while pickling) and an old-style ``scipy.sparse.csc`` J_regressor.
"""

from __future__ import annotations

import contextlib
import pickle
import struct
import sys
import types
from pathlib import Path
from typing import Iterator

import numpy as np
import scipy.sparse as sp

SMPL_PARENTS = [-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21]
SMPL_JOINTS = np.array([
    (0.0, -0.22, 0.02), (0.06, -0.31, 0.01), (-0.06, -0.31, 0.01), (0.0, -0.11, -0.01),
    (0.10, -0.69, 0.01), (-0.10, -0.69, 0.01), (0.0, 0.03, 0.0), (0.09, -1.09, -0.03),
    (-0.09, -1.09, -0.03), (0.0, 0.09, 0.02), (0.12, -1.15, 0.09), (-0.12, -1.15, 0.09),
    (0.0, 0.29, -0.01), (0.08, 0.20, 0.0), (-0.08, 0.20, 0.0), (0.0, 0.36, 0.04),
    (0.17, 0.23, -0.01), (-0.17, 0.23, -0.01), (0.43, 0.21, -0.03), (-0.43, 0.21, -0.03),
    (0.68, 0.22, -0.03), (-0.68, 0.22, -0.03), (0.76, 0.21, -0.04), (-0.76, 0.21, -0.04),
])
# (radius along e1 ~ forward, radius along e2, ring count, vertices per ring) per bone.
_TORSO = (0.10, 0.15, 3, 12)
_SMPL_SEGMENTS = {
    0: _TORSO, 3: _TORSO, 6: (0.10, 0.16, 3, 12), 9: (0.09, 0.16, 3, 12), 12: (0.05, 0.05, 3, 8),
    15: (0.10, 0.09, 4, 12), 1: (0.08, 0.08, 3, 8), 4: (0.055, 0.055, 3, 8), 7: (0.045, 0.045, 3, 8),
    10: (0.035, 0.04, 3, 8), 13: (0.05, 0.05, 3, 8), 16: (0.05, 0.05, 3, 8), 18: (0.04, 0.04, 3, 8),
    20: (0.035, 0.02, 3, 8), 22: (0.03, 0.015, 3, 8),
}
# Where a leaf bone's tube ends (SMPL frame offset from its joint).
_LEAF_END = {15: (0.0, 0.22, 0.0), 10: (0.0, -0.01, 0.07), 22: (0.09, 0.0, 0.0)}
_FORWARD, _UP = np.array([0.0, 0.0, 1.0]), np.array([0.0, 1.0, 0.0])


def mirror_joint(j: int, joints: np.ndarray) -> int:
    """The joint at the mirrored position (itself for central joints)."""
    target = joints[j] * np.array([-1.0, 1.0, 1.0])
    return int(np.argmin(((joints - target) ** 2).sum(1)))


def smplx_skeleton() -> tuple[list[int], np.ndarray, dict]:
    """SMPL-X's 55 joints: the SMPL body without its hand joints, jaw, eyes, 2 x 15 finger joints."""
    parents = SMPL_PARENTS[:22] + [15, 15, 15]
    joints = list(SMPL_JOINTS[:22]) + [np.array([0.0, 0.37, 0.05]), np.array([0.03, 0.45, 0.10]),
                                       np.array([-0.03, 0.45, 0.10])]
    segments = {k: v for k, v in _SMPL_SEGMENTS.items() if k < 22}
    segments.update({22: (0.03, 0.04, 2, 6), 23: (0.012, 0.012, 2, 4), 24: (0.012, 0.012, 2, 4)})
    segments[20] = (0.045, 0.015, 3, 8)  # palm, wrist -> middle finger
    leaf_end = {15: _LEAF_END[15], 10: _LEAF_END[10], 22: (0.0, -0.03, 0.06), 23: (0.0, 0.0, 0.02),
                24: (0.0, 0.0, 0.02)}
    # index, middle, pinky, ring, thumb (SMPL-X order); base offset from the wrist and direction.
    fingers = (((0.09, 0.0, 0.03), (1, 0, 0)), ((0.095, 0.0, 0.01), (1, 0, 0)), ((0.08, 0.0, -0.035), (1, 0, 0)),
               ((0.09, 0.0, -0.012), (1, 0, 0)), ((0.03, -0.01, 0.04), (0.6, -0.2, 0.6)))
    for side, wrist in ((1.0, 20), (-1.0, 21)):
        flip = np.array([side, 1.0, 1.0])
        for base, direction in fingers:
            d = np.asarray(direction, float) / np.linalg.norm(direction) * flip
            p = joints[wrist] + np.asarray(base) * flip
            parent = wrist
            for k, length in enumerate((0.035, 0.025, 0.02)):
                j = len(joints)
                joints.append(p)
                parents.append(parent)
                segments[j] = (0.009, 0.008, 2, 4)
                if k == 2:
                    leaf_end[j] = tuple(d * length)
                p, parent = p + d * length, j
    # reflect the left leaf ends for the right side
    joints_a = np.array(joints)
    for j in list(leaf_end):
        m = mirror_joint(j, joints_a)
        leaf_end.setdefault(m, tuple(np.asarray(leaf_end[j]) * np.array([-1.0, 1.0, 1.0])))
    return parents, joints_a, {"segments": segments, "leaf_end": leaf_end}


def _tube(start: np.ndarray, end: np.ndarray, r1: float, r2: float, rings: int, n: int,
          profile: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A capped elliptic tube from start to end; ring 0 is centred on ``start`` (the joint).
    -> vertices (R*n+2,3), faces, per-vertex t along the tube, per-vertex radial offset."""
    axis = end - start
    a = axis / np.linalg.norm(axis)
    ref = _UP if abs(a @ _FORWARD) > 0.9 else _FORWARD
    e1 = ref - (ref @ a) * a
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(a, e1)
    ts = np.linspace(0.0, 0.9, rings)
    scale = np.ones(rings) if profile is None else profile
    theta = 2 * np.pi * np.arange(n) / n
    verts, t_of, radial = [], [], []
    for i, t in enumerate(ts):
        off = scale[i] * (r1 * np.cos(theta)[:, None] * e1 + r2 * np.sin(theta)[:, None] * e2)
        verts.append(start + t * axis + off)
        radial.append(off)
        t_of += [t] * n
    verts += [start - 0.05 * axis, start + 0.97 * axis]
    radial += [np.zeros((2, 3))]
    t_of += [0.0, 0.9]
    faces = []
    for i in range(rings - 1):
        for k in range(n):
            a0, b0 = i * n + k, i * n + (k + 1) % n
            a1, b1 = a0 + n, b0 + n
            faces += [(a0, b0, b1), (a0, b1, a1)]
    s, e = rings * n, rings * n + 1
    last = (rings - 1) * n
    for k in range(n):
        faces += [(s, (k + 1) % n, k), (e, last + k, last + (k + 1) % n)]
    return np.vstack(verts), np.array(faces), np.array(t_of), np.vstack(radial)


def build_model(kind: str = "smpl", seed: int = 0) -> dict[str, np.ndarray]:
    """The model's arrays as the official files name them (float64, as they are)."""
    rng = np.random.default_rng(seed)
    if kind == "smpl":
        parents, joints, segments, leaf_end = SMPL_PARENTS, SMPL_JOINTS, dict(_SMPL_SEGMENTS), dict(_LEAF_END)
        for j in list(leaf_end):
            leaf_end.setdefault(mirror_joint(j, joints), tuple(np.asarray(leaf_end[j]) * [-1.0, 1.0, 1.0]))
    else:
        parents, joints, extra = smplx_skeleton()
        segments, leaf_end = extra["segments"], extra["leaf_end"]
    J = len(parents)
    children = {j: [c for c in range(J) if parents[c] == j] for j in range(J)}
    for j in range(J):  # right-side segments copy the left ones
        if j not in segments:
            segments[j] = segments[mirror_joint(j, joints)]
    torso = [0, 3, 6, 9]
    verts, faces, weights, ring0, radial = [], [], [], {}, []
    for j in range(J):
        r1, r2, rings, n = segments[j]
        kids = children[j]
        central = [c for c in kids if abs(joints[c][0]) < 1e-9]
        if kind == "smplx" and j in (20, 21):
            tail = kids[1]  # the middle finger
        elif j == 15:
            tail = None
        else:
            tail = (central or kids or [None])[0]
        end = joints[tail] if tail is not None else joints[j] + np.asarray(leaf_end[j])
        profile = np.array([0.55, 1.0, 1.0, 0.8]) if j == 15 else None
        v, f, t, rad = _tube(joints[j], end, r1, r2, rings, n, profile)
        base = sum(len(x) for x in verts)
        ring0[j] = base + np.arange(n)
        w = np.zeros((len(v), J))
        w[:, j] = 1.0
        if parents[j] >= 0:
            w[:, parents[j]] += 0.5 * np.clip(1 - t / 0.35, 0, 1)
        if tail is not None:
            w[:, tail] += 0.5 * np.clip((t - 0.55) / 0.35, 0, 1)
        if j in torso:  # small extra influences: more than 4 per vertex, as real models have
            w[:, [b for b in torso + [12] if w[0, b] == 0]] += 0.02
        verts.append(v)
        faces.append(f + base)
        weights.append(w / w.sum(1, keepdims=True))
        radial.append(rad)
    v_template = np.vstack(verts)
    V = len(v_template)
    J_regressor = np.zeros((J, V))
    for j, ids in ring0.items():
        J_regressor[j, ids] = 1.0 / len(ids)

    # Shape space: height (scale about the pelvis), girth, then smooth symmetric fields.
    n_shape, n_expr = 10, (10 if kind == "smplx" else 0)
    shapedirs = np.zeros((V, 3, n_shape + n_expr))
    shapedirs[:, :, 0] = 0.06 * (v_template - joints[0])
    shapedirs[:, :, 1] = 0.15 * np.vstack(radial)
    sym = np.column_stack([np.abs(v_template[:, 0]), v_template[:, 1:]])
    sign = np.sign(v_template[:, 0])
    head_bones = [15] + ([22, 23, 24] if kind == "smplx" else [])
    is_head = np.isin(np.vstack(weights).argmax(1), head_bones)
    for k in range(2, n_shape + n_expr):
        omega, phase = rng.normal(0, 4, (3, 3)), rng.uniform(0, 2 * np.pi, 3)
        field = (0.01 if k < n_shape else 0.004) * np.sin(sym @ omega + phase)
        field[:, 0] *= sign
        shapedirs[:, :, k] = field if k < n_shape else field * is_head[:, None]
    model = {
        "v_template": v_template,
        "f": np.vstack(faces).astype(np.uint32),
        "weights": np.vstack(weights),
        "J_regressor": J_regressor,
        "kintree_table": np.array([[4294967295] + list(parents[1:]), list(range(J))], dtype=np.int64),
        "shapedirs": shapedirs,
        "posedirs": rng.normal(0, 1e-3, (V, 3, 9 * (J - 1))),
        "J": J_regressor @ v_template,
    }
    if kind == "smplx":
        F = len(model["f"])
        bary = rng.uniform(0.1, 1, (51, 3))
        model.update({
            "hands_componentsl": np.linalg.qr(rng.normal(size=(45, 45)))[0],
            "hands_componentsr": np.linalg.qr(rng.normal(size=(45, 45)))[0],
            "hands_meanl": rng.normal(0, 0.1, 45), "hands_meanr": rng.normal(0, 0.1, 45),
            "lmk_faces_idx": rng.integers(0, F, 51).astype(np.int64),
            "lmk_bary_coords": bary / bary.sum(1, keepdims=True),
            "vt": (v_template[:, :2] - v_template[:, :2].min(0)) / np.ptp(v_template[:, :2], 0).max(),
            "ft": model["f"].astype(np.int64),
        })
    return model


def save_npz(model: dict[str, np.ndarray], path: Path, *, with_object_member: bool = True) -> Path:
    """As the official SMPL-X .npz: plain arrays plus dict-valued object members (joint2num)."""
    extra = {}
    if with_object_member:
        extra["joint2num"] = np.array({"pelvis": 0, "left_hip": 1}, dtype=object)
    np.savez(path, **model, **extra)
    return path


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler, so bytes can be written as Python 2 str
    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: bytes) -> None:
        if self.bin:
            n = len(obj)
            head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
            self.write(head + obj)
        else:
            self.write(pickle.STRING + repr(obj)[1:].encode("ascii") + b"\n")
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


@contextlib.contextmanager
def fake_chumpy() -> Iterator[type]:
    """A stand-in ``chumpy.ch.Ch`` registered only while pickling, so the pickle names it as the
    official files do. Its state is what chumpy's __getstate__ leaves: x plus bookkeeping."""

    class Ch:
        def __init__(self, x: np.ndarray) -> None:
            self.x = np.asarray(x, np.float64)
            self._dirty_vars: set = set()
            self._itr = None
            self._depends_on_deps: dict = {}
            self._make_dense = False
            self._make_sparse = False

    Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
    pkg, mod = types.ModuleType("chumpy"), types.ModuleType("chumpy.ch")
    mod.Ch, pkg.ch, pkg.Ch = Ch, mod, Ch
    saved = {k: sys.modules.get(k) for k in ("chumpy", "chumpy.ch")}
    sys.modules.update({"chumpy": pkg, "chumpy.ch": mod})
    try:
        yield Ch
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def save_official_pkl(model: dict[str, np.ndarray], path: Path, *, protocol: int = 2) -> Path:
    """As the official Python 2 .pkl: chumpy v_template/shapedirs, a scipy.sparse.csc J_regressor,
    strings and a training-info dict."""
    import io

    with fake_chumpy() as Ch:
        data = dict(model)
        data["v_template"] = Ch(model["v_template"])
        data["shapedirs"] = Ch(model["shapedirs"])
        data["J_regressor"] = sp.csc_matrix(model["J_regressor"])
        data.update({"bs_style": "lbs", "bs_type": "lrotmin", "pose_training_info": {"subjects": 3}})
        buf = io.BytesIO()
        _Py2Pickler(buf, protocol=protocol).dump(data)
    raw = buf.getvalue().replace(b"scipy.sparse._csc\ncsc_matrix", b"scipy.sparse.csc\ncsc_matrix")
    path.write_bytes(raw)
    return path


def write_model_folder(folder: Path, kind: str = "smpl", fmt: str = "npz", seed: int = 0) -> Path:
    """SMPL_NEUTRAL.{npz,pkl} / SMPLX_NEUTRAL.{npz,pkl} in ``folder``; returns the file."""
    folder.mkdir(parents=True, exist_ok=True)
    model = build_model(kind, seed)
    stem = "SMPL_NEUTRAL" if kind == "smpl" else "SMPLX_NEUTRAL"
    if fmt == "npz":
        return save_npz(model, folder / f"{stem}.npz")
    return save_official_pkl(model, folder / f"{stem}.pkl")
