"""UV unwrap speed, whole mesh against per body part: `python -m tests.benchmarks.bench_unwrap [JOB ...]`.

For each finished job (default: the benchmark's walking_m and skirt_f `standard` jobs in
bench_output/jobs) the avatar's rest-pose mesh is welded back at its UV seams and unwrapped by
``mesh_rig.unwrap_uv`` twice: as one mesh (the finalise before session 6) and per body part
(``unwrap_groups`` from the avatar's skin weights, what the finalise does now). Then the same for a
noisy 82k-face sphere in 8 slabs, the rough-surface case (a random-weight SDS field) where
xatlas's time grows fastest. Prints seconds, charts and the ratio, per mesh.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from zeroavatar_blender.engine.avatar import AvatarBundle
from zeroavatar_blender.engine.mesh_rig import unwrap_groups, unwrap_uv

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_JOBS = [ROOT / "bench_output" / "jobs" / f"{case}_standard" for case in ("walking_m", "skirt_f")]


def welded(bundle: AvatarBundle) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The bundle's mesh with the vertices its UV seams split merged again. -> (V, F, skin idx, skin w)."""
    key = np.round(bundle.vertices.astype(np.float64) / 1e-6).astype(np.int64)
    _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    faces = inverse.reshape(-1)[bundle.faces]
    keep = (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])
    return (bundle.vertices[first].astype(np.float64), faces[keep], bundle.skin_indices[first].astype(np.int64),
            bundle.skin_weights[first])


def timed(vertices: np.ndarray, faces: np.ndarray, groups: np.ndarray | None) -> dict:
    t = time.perf_counter()
    vmap, new_faces, uv = unwrap_uv(vertices, faces, groups)
    return {"seconds": round(time.perf_counter() - t, 2), "atlas_vertices": int(len(vmap)),
            "parts": 1 if groups is None else int(len(np.unique(groups)))}


def noisy_sphere(subdivisions: int = 6, noise: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    import trimesh

    mesh = trimesh.creation.icosphere(subdivisions=subdivisions)
    v = mesh.vertices * (1 + noise * np.random.default_rng(0).standard_normal((len(mesh.vertices), 1)))
    return v, np.asarray(mesh.faces, np.int64)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("jobs", nargs="*", type=Path, default=DEFAULT_JOBS)
    p.add_argument("--no-sphere", action="store_true", help="skip the noisy sphere (its whole unwrap takes ~50 s)")
    args = p.parse_args(argv)
    rows = []
    for job in args.jobs:
        bundle = AvatarBundle.load(job / "result")
        v, f, idx, w = welded(bundle)
        groups = unwrap_groups(f, idx, w, bundle.bone_parents)
        whole, parts = timed(v, f, None), timed(v, f, groups)
        rows.append({"mesh": job.name, "faces": int(len(f)), "whole": whole, "per_part": parts,
                     "speedup": round(whole["seconds"] / max(parts["seconds"], 1e-9), 2)})
        print(json.dumps(rows[-1]), flush=True)
    if not args.no_sphere:
        v, f = noisy_sphere()
        slabs = np.clip(((v[f].mean(1)[:, 2] + 1) / 2 * 8).astype(np.int64), 0, 7)
        whole, parts = timed(v, f, None), timed(v, f, slabs)
        rows.append({"mesh": "noisy sphere, 8 slabs", "faces": int(len(f)), "whole": whole, "per_part": parts,
                     "speedup": round(whole["seconds"] / max(parts["seconds"], 1e-9), 2)})
        print(json.dumps(rows[-1]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
