"""Blender-side timings: `python -m tests.benchmarks.bench_blender [--quick] [--out DIR]`.

Measures (wall seconds, and CPU seconds of this process where the work is in-process):
build_avatar from an Anny bundle, update_preview_mesh for ~20k and ~50k vertices (new topology
and positions-only updates), each export preset, and turntable seconds per view with Cycles
(512 px, 64 samples, denoised; --quick: 256 px, 16 samples) and Workbench. On a shared machine
wall time includes waiting for the CPU; the CPU column is the steadier number.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("ZEROAVATAR_ANNY_CACHE", str(ROOT / ".cache" / "anny"))
if "bpy" not in sys.modules and not os.environ.get("ZEROAVATAR_KEEP_HOME"):
    os.environ["HOME"] = tempfile.mkdtemp(prefix="zeroavatar-bench-home-")  # bpy writes under HOME
    atexit.register(shutil.rmtree, os.environ["HOME"], True)


def _timed(fn: Callable[[], Any], repeat: int = 1) -> tuple[float, float, Any]:
    """(median wall s, median CPU s, last result)."""
    walls, cpus, result = [], [], None
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return float(np.median(walls)), float(np.median(cpus)), result


def grid_mesh(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An n x n vertex sheet: (n*n,3) vertices, 2(n-1)^2 triangles, random colours."""
    y, x = np.mgrid[0:n, 0:n]
    v = np.stack([x.ravel() / n, y.ravel() / n, 0.1 * np.sin(x.ravel() / 5)], 1).astype(np.float32)
    i = (y[:-1, :-1] * n + x[:-1, :-1]).ravel()
    f = np.concatenate([np.stack([i, i + 1, i + n + 1], 1), np.stack([i, i + n + 1, i + n], 1)]).astype(np.int32)
    return v, f, np.random.default_rng(0).random((n * n, 3)).astype(np.float32)


def bench_scene(bundle_dir: Path, out_dir: Path) -> dict[str, Any]:
    import bpy

    from zeroavatar_blender.addon import export_presets, scene

    results: dict[str, Any] = {}
    bpy.ops.wm.read_factory_settings(use_empty=True)

    def build():
        bpy.ops.wm.read_factory_settings(use_empty=True)
        return scene.build_avatar(bundle_dir)

    wall, cpu, (arm, mesh) = _timed(build, repeat=3)
    results["build_avatar"] = {"wall_s": wall, "cpu_s": cpu, "vertices": len(mesh.data.vertices),
                               "bones": len(arm.data.bones)}
    for preset in export_presets.PRESETS:
        wall, cpu, _ = _timed(lambda: export_presets.export_preset(arm, mesh, out_dir, preset, "bench"))
        results[f"export_{preset}"] = {"wall_s": wall, "cpu_s": cpu}

    for n, label in ((142, "20k"), (224, "50k")):
        v, f, c = grid_mesh(n)
        obj = scene.update_preview_mesh(f"bench_{label}", v, f, c)
        shrink = iter(range(1, 100))
        wall_t, cpu_t, _ = _timed(lambda: scene.update_preview_mesh(obj, v, f[: len(f) - next(shrink)], c), 7)
        step = iter(range(1, 100))
        wall_p, cpu_p, _ = _timed(lambda: scene.update_preview_mesh(obj, v + 1e-3 * next(step), f, c), 7)
        results[f"preview_{label}"] = {"vertices": len(v), "faces": len(f),
                                       "new_topology_wall_ms": 1000 * wall_t, "new_topology_cpu_ms": 1000 * cpu_t,
                                       "positions_wall_ms": 1000 * wall_p, "positions_cpu_ms": 1000 * cpu_p}
    return results


def bench_turntable(bundle_dir: Path, out_dir: Path, quick: bool) -> dict[str, Any]:
    """The job as users run it (a subprocess); its own per-view timings."""
    size, samples, views = (256, 16, 2) if quick else (512, 64, 3)
    results = {}
    for engine in ("cycles", "workbench"):
        cmd = [sys.executable, "-m", "zeroavatar_blender.blender_jobs.turntable", "--bundle", str(bundle_dir),
               "--out", str(out_dir / engine), "--views", str(views), "--size", str(size), "--engine", engine,
               "--samples", str(samples)]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        wall = time.perf_counter() - t0
        lines = [json.loads(x) for x in proc.stdout.splitlines() if x.strip()]
        summary = next((e for e in lines if e.get("type") == "turntable"), None)
        if proc.returncode != 0 or summary is None:
            results[engine] = {"error": proc.stderr[-500:]}
            continue
        per_view = [e["seconds"] for e in lines if e.get("type") == "render"]
        results[engine] = {"size": size, "samples": samples if engine == "cycles" else None, "views": views,
                           "first_view_s": per_view[0], "later_views_s": float(np.mean(per_view[1:] or per_view)),
                           "job_wall_s": wall}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="zeroavatar-bench-blender-"))
    out.mkdir(parents=True, exist_ok=True)

    from tests.addon.bundle_factory import make_anny_bundle
    from zeroavatar_blender.engine.body import load_body

    bundle_dir = make_anny_bundle(load_body("anny"), out / "bundle" / "result")
    results = {"scene": bench_scene(bundle_dir, out / "exports"),
               "turntable": bench_turntable(bundle_dir, out / "turntable", args.quick)}
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
