"""Blender-side timings: `python -m tests.benchmarks.bench_blender [--quick] [--out DIR]`.

Measures (wall seconds, and CPU seconds of this process where the work is in-process):
build_avatar from an Anny bundle, update_preview_mesh for ~20k and ~50k vertices (new topology
and positions-only updates), each export preset, turntable seconds per view with Cycles
(512 px, 64 samples, denoised; --quick: 256 px, 16 samples) and Workbench, and the add-on's
polling callback (``client.poll_all``, Blender's timer) per call while a real subprocess streams
marching-cubes preview meshes of the engine's default streaming size (at most 40,000 vertices,
``extract.write_preview_mesh``), with a new topology every mesh as marching cubes gives. The goal
for one poll_all call is under 20 ms (a dropped frame or so at 60 fps). On a shared machine wall
time includes waiting for the CPU; the CPU column is the steadier number.
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


# A stand-in engine that streams pre-made preview meshes the way the engine does: copy to a temp
# name, rename into meshes/, append a "mesh" event; progress events in between. Stdlib only.
STREAMER = r'''
import json, os, shutil, sys, time
job, interval, count = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
sources = sys.argv[4:]
os.makedirs(os.path.join(job, "meshes"), exist_ok=True)
def emit(kind, **fields):
    line = json.dumps({"v": 1, "type": kind, "time": time.time(), **fields}) + "\n"
    fd = os.open(os.path.join(job, "events.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, line.encode())
    os.close(fd)
emit("started", pid=os.getpid(), command="optimise", version="bench")
emit("stage", stage="optimise", message="streaming")
for step in range(1, count + 1):
    time.sleep(interval)
    name = "step_%06d.npz" % step
    tmp = os.path.join(job, "meshes", "." + name + ".tmp")
    shutil.copyfile(sources[step % len(sources)], tmp)
    os.replace(tmp, os.path.join(job, "meshes", name))
    emit("progress", stage="optimise", step=step, total=count, loss=1.0 / step)
    emit("mesh", step=step, path="meshes/" + name)
emit("done", status="ok", code=0)
'''


def streaming_meshes(out_dir: Path, count: int = 6, resolution: int = 256) -> list[tuple[Path, int, int]]:
    """Preview files as the engine writes them: marching cubes of a blobby body (metaballs on the
    Anny joints) whose field changes a little each time, so every mesh has its own triangles,
    decimated by the engine's own writer to its default maximum of 40,000 vertices.
    -> [(path, vertices, faces)]."""
    import mcubes
    import torch

    from zeroavatar_blender.engine.body import load_body
    from zeroavatar_blender.engine.extract import write_preview_mesh

    body = load_body("anny")
    with torch.no_grad():
        out = body.forward(body.zero_params(1))
    joints = out.bone_posed[0, :, :3, 3].double().numpy()[::2]
    lo, hi = joints.min(0) - 0.15, joints.max(0) + 0.15
    cell = float((hi - lo).max()) / resolution
    axes = [np.arange(lo[a], hi[a] + cell, cell, dtype=np.float32) for a in range(3)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1)
    base = np.zeros(grid.shape[:3], np.float32)
    for j in joints:  # each ball only where it matters
        box = tuple(slice(max(0, int((j[a] - 0.2 - lo[a]) / cell)), int((j[a] + 0.2 - lo[a]) / cell) + 1)
                    for a in range(3))
        base[box] += np.exp(-((grid[box] - j) ** 2).sum(-1) / (2 * 0.05 ** 2))
    paths = []
    for k in range(count):
        field = base + 0.08 * np.sin(grid[..., 0] * (20 + k) + grid[..., 2] * 9 + k)
        v, f = mcubes.marching_cubes(field, 0.5)
        v = lo + v * cell
        colors = np.clip(0.5 + 0.5 * np.sin(v * 7.0 + k), 0, 1)
        path = out_dir / f"stream_{k}.npz"
        written = write_preview_mesh(path, v, f.astype(np.int64), colors)
        paths.append((path, written.num_vertices, len(written.faces)))
    return paths


def bench_polling(out_dir: Path, quick: bool) -> dict[str, Any]:
    """poll_all per call, as Blender's timer calls it (every client.POLL_INTERVAL_S), while a
    subprocess streams 40k-vertex meshes; calls that applied a mesh are reported separately."""
    import bpy  # noqa: I001 - bpy first: it puts addon_utils on the path

    import addon_utils
    from zeroavatar_blender.addon import client, jobs

    out_dir.mkdir(parents=True, exist_ok=True)
    meshes = streaming_meshes(out_dir)
    script = out_dir / "streamer.py"
    script.write_text(STREAMER)
    if bpy.context.preferences.addons.get("zeroavatar_blender") is None:
        addon_utils.enable("zeroavatar_blender", default_set=True)
    bpy.ops.wm.read_homefile(use_empty=True, use_factory_startup=True)
    count, interval = (12, 0.3) if quick else (40, 0.3)
    job = client.launch(bpy.context.scene, "optimise",
                        [str(script), str(out_dir / "job"), str(interval), str(count), *[str(p) for p, _, _ in meshes]],
                        out_dir / "job", sys.executable, client.engine_env(jobs.package_parent()), "bench")
    stages = ("read", "edges", "apply")
    calls: dict[str, list[float]] = {k: [] for k in ("all", "idle", *stages, *(s + "_cpu" for s in stages))}
    deadline = time.monotonic() + count * interval + 60
    while client.ACTIVE and time.monotonic() < deadline:
        read, applied, pending = job.mesh_applied, job.previews_applied, job.pending_preview
        w, c = time.perf_counter(), time.process_time()
        client.poll_all()
        wall, cpu = time.perf_counter() - w, time.process_time() - c
        calls["all"].append(wall)
        done = {"read": job.mesh_applied != read, "apply": job.previews_applied != applied,
                "edges": job.pending_preview is not None and job.pending_preview is not pending
                and job.pending_preview.edge_verts is not None}
        for name in stages:
            if done[name]:
                calls[name].append(wall)
                calls[name + "_cpu"].append(cpu)
        if not any(done.values()):
            calls["idle"].append(wall)
        time.sleep(client.POLL_INTERVAL_S)
    client.stop_all(timeout=1.0)
    preview = bpy.context.scene.zeroavatar.preview
    preview_vertices = len(preview.data.vertices) if preview else 0
    one_call = one_call_updates([p for p, _, _ in meshes], repeat=14 if quick else 28)

    def stats(xs: list[float]) -> dict[str, float]:
        a = np.asarray(xs) * 1000
        return {"calls": len(a), "median_ms": float(np.median(a)) if len(a) else float("nan"),
                "p95_ms": float(np.percentile(a, 95)) if len(a) else float("nan"),
                "max_ms": float(a.max()) if len(a) else float("nan")}

    return {"mesh_vertices": [v for _, v, _ in meshes], "mesh_faces": [f for _, _, f in meshes],
            "status": job.client.state.status, "preview_vertices": preview_vertices,
            "previews_applied": job.previews_applied, "meshes_streamed": count,
            **{name: stats(xs) for name, xs in calls.items()}, **{name: stats(xs) for name, xs in one_call.items()}}


def one_call_updates(paths: list[Path], repeat: int) -> dict[str, list[float]]:
    """The same meshes applied the way the add-on did before the update was spread over calls:
    load, check, write and let Blender find the edges, all in one call (for comparison)."""
    import bpy

    from zeroavatar_blender.addon import scene

    bpy.ops.wm.read_homefile(use_empty=True, use_factory_startup=True)
    obj = None
    walls, cpus = [], []
    for i in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        with np.load(paths[i % len(paths)], allow_pickle=False) as z:
            obj = scene.update_preview_mesh(obj or "one_call", z["vertices"], z["faces"], z["colors"])
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
        time.sleep(0.05)
    return {"one_call": walls, "one_call_cpu": cpus}


def polling_table(result: dict[str, Any]) -> str:
    rows = [("every call (wall)", result["all"]), ("no mesh work (wall)", result["idle"]),
            ("1 read + check (wall)", result["read"]), ("1 read + check (CPU)", result["read_cpu"]),
            ("2 edges (wall)", result["edges"]), ("2 edges (CPU)", result["edges_cpu"]),
            ("3 write into Blender (wall)", result["apply"]), ("3 write into Blender (CPU)", result["apply_cpu"]),
            ("before: all in one call (wall)", result["one_call"]),
            ("before: all in one call (CPU)", result["one_call_cpu"])]
    verts, faces = result["mesh_vertices"], result["mesh_faces"]
    lines = [f"poll_all with streamed meshes of {min(verts)}-{max(verts)} vertices, {min(faces)}-{max(faces)} faces; "
             f"{result['previews_applied']} of {result['meshes_streamed']} streamed meshes shown "
             "(goal: < 20 ms a call)",
             f"| {'':30} | calls | median ms | p95 ms | max ms |", f"|{'-' * 32}|-------|-----------|--------|--------|"]
    for name, st in rows:
        lines.append(f"| {name:30} | {st['calls']:5d} | {st['median_ms']:9.2f} | {st['p95_ms']:6.2f} "
                     f"| {st['max_ms']:6.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--only", choices=("all", "polling"), default="all",
                        help="polling: only the poll_all measurement (seconds, no renders)")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="zeroavatar-bench-blender-"))
    out.mkdir(parents=True, exist_ok=True)

    from tests.addon.bundle_factory import make_anny_bundle
    from zeroavatar_blender.engine.body import load_body

    results: dict[str, Any] = {}
    if args.only == "all":
        bundle_dir = make_anny_bundle(load_body("anny"), out / "bundle" / "result")
        results = {"scene": bench_scene(bundle_dir, out / "exports"),
                   "turntable": bench_turntable(bundle_dir, out / "turntable", args.quick)}
    results["polling"] = bench_polling(out / "polling", args.quick)
    print(json.dumps(results, indent=1))
    print(polling_table(results["polling"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
