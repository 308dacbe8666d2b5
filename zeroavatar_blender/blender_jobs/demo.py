"""Photo -> rigged avatar, headless, through the add-on's own "Generate Avatar from Image" operator.

    python -m zeroavatar_blender.blender_jobs.demo --out DIR [--quality fast|standard|full]
        [--views 8] [--turntable-engine cycles|workbench] [--only astronaut|synthetic]

Two photos: scikit-image's astronaut (Eileen Collins, NASA, public domain; half body) and a
full-body synthetic render of the Anny body (the evaluation module's "standing_f" subject). The
photos are made by the engine's Python in a subprocess (this process is the Blender side and
never imports torch). For each: register the add-on, run the operator, call the polling timer
function until the job ends (timers never fire in module mode), export FBX (Unity preset) and
GLB with the export operators, save the .blend, and render a turntable of the GLB with
turntable.py. Everything goes under DIR; the last line printed is DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PACKAGE_PARENT = Path(__file__).resolve().parents[2]
PHOTOS = ("astronaut", "synthetic")

# Runs in the engine's Python: writes the two demo photos as PNG.
_MAKE_PHOTOS = r"""
import sys
from pathlib import Path
from PIL import Image

out, which = Path(sys.argv[1]), sys.argv[2].split(",")
out.mkdir(parents=True, exist_ok=True)
if "astronaut" in which:
    from skimage import data
    Image.fromarray(data.astronaut()).save(out / "astronaut.png")
if "synthetic" in which:
    from zeroavatar_blender.engine.body import load_body
    from zeroavatar_blender.evaluation.synthetic import default_subjects, make_case
    spec = next(s for s in default_subjects() if s.name == "standing_f")
    Image.fromarray(make_case(load_body("anny"), spec).photo).save(out / "synthetic.png")
print("photos ready")
"""


def log(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def make_photos(out: Path, which: list[str], python: str) -> dict[str, Path]:
    """The demo photos, made once (kept between runs)."""
    missing = [w for w in which if not (out / f"{w}.png").is_file()]
    if missing:
        from ..addon.client import engine_env

        log(f"making photos: {', '.join(missing)}")
        proc = subprocess.run([python, "-c", _MAKE_PHOTOS, str(out), ",".join(missing)], env=engine_env(PACKAGE_PARENT),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"making the demo photos failed:\n{proc.stdout}{proc.stderr[-3000:]}")
    return {w: out / f"{w}.png" for w in which}


def run_job(name: str, photo: Path, out: Path, quality: str, timeout: float) -> dict[str, Any]:
    """Generate, export and save one avatar exactly as a user would with the sidebar."""
    import bpy

    from ..addon import client

    bpy.ops.wm.read_homefile(use_empty=True, use_factory_startup=True)
    props = bpy.context.scene.zeroavatar
    props.quality = quality
    started = time.monotonic()
    bpy.ops.zeroavatar.generate(filepath=str(photo))
    log(f"{name}: engine started in {props.job_dir}")
    last, last_time, calls, slowest = "", 0.0, 0, 0.0
    while True:
        t0 = time.perf_counter()
        more = client.poll_all()
        slowest = max(slowest, time.perf_counter() - t0)
        calls += 1
        head = f"{props.stage}: {props.message}"
        if head != last or time.monotonic() - last_time > 10:  # stage changes, else every 10 s
            steps = f" [{props.step}/{props.total}]" if props.total else ""
            log(f"{name}: {head}{steps}")
            last, last_time = head, time.monotonic()
        if more is None:
            break
        if time.monotonic() - started > timeout:
            client.stop_all()
            raise TimeoutError(f"{name}: no result after {timeout:.0f} s")
        time.sleep(0.1)
    report: dict[str, Any] = {"photo": str(photo), "job": props.job_dir, "status": props.status,
                              "seconds": round(time.monotonic() - started, 1), "poll_calls": calls,
                              "slowest_poll_ms": round(slowest * 1e3, 1)}
    if props.status != "DONE":
        report.update(error=props.error_message, hint=props.error_hint, log=props.log_tail)
        log(f"{name}: {props.status}: {props.error_message} ({props.error_hint})")
        return report
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    fbx, glb = folder / f"{name}_unity.fbx", folder / f"{name}.glb"
    bpy.ops.zeroavatar.export_fbx(filepath=str(fbx), preset="unity")
    bpy.ops.zeroavatar.export_gltf(filepath=str(glb))
    blend = folder / f"{name}.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(blend))
    report.update(fbx=str(fbx), glb=str(glb), blend=str(blend), bones=len(props.armature.data.bones),
                  vertices=len(props.mesh.data.vertices))
    log(f"{name}: avatar ready in {report['seconds']} s -> {glb.name}, {fbx.name}, {blend.name}")
    return report


def render_turntable(glb: Path, out: Path, views: int, engine: str) -> dict[str, Any]:
    """turntable.py in its own process: a clean scene, and a crash there cannot lose the avatar."""
    cmd = [sys.executable, "-m", "zeroavatar_blender.blender_jobs.turntable", "--glb", str(glb), "--out", str(out),
           "--views", str(views), "--engine", engine]
    env = dict(os.environ, PYTHONPATH=str(PACKAGE_PARENT))
    proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=1800)
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    summary = next((ln for ln in lines if ln.get("type") == "turntable"), None)
    if proc.returncode != 0 or summary is None:
        return {"error": f"turntable failed ({proc.returncode}): {proc.stderr[-1500:]}"}
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quality", choices=("fast", "standard", "full"), default="fast")
    parser.add_argument("--only", choices=PHOTOS, action="append", help="run only this photo (repeatable)")
    parser.add_argument("--views", type=int, default=8, help="turntable views (0: no turntable)")
    parser.add_argument("--turntable-engine", choices=("cycles", "workbench"), default="cycles")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed per photo")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    # Blender's user folders and the job folders go under --out, not the user's own Blender.
    os.environ.setdefault("BLENDER_USER_RESOURCES", str(out / "blender_user"))
    os.environ["ZEROAVATAR_JOBS_DIR"] = str(out / "jobs")

    import bpy  # before addon_utils, which only exists once bpy is imported

    import addon_utils

    from ..addon import client, jobs

    if bpy.context.preferences.addons.get(jobs.TOP_PACKAGE) is None and addon_utils.enable(jobs.TOP_PACKAGE) is None:
        print(f"error: cannot enable the add-on {jobs.TOP_PACKAGE}", file=sys.stderr)
        return 1
    from ..addon.preferences import find_engine, get_prefs

    try:
        engine = find_engine(get_prefs())
    except client.EngineNotFoundError as exc:
        print(f"error: {exc}\n  -> run `python3 build.py setup` or set ZEROAVATAR_ENGINE_PYTHON", file=sys.stderr)
        return 1
    log(f"engine Python ({engine.source}): {engine.path}")
    which = args.only or list(PHOTOS)
    photos = make_photos(out / "photos", which, engine.path)
    summary: dict[str, Any] = {"quality": args.quality, "results": {}}
    for name, photo in photos.items():
        try:
            report = run_job(name, photo, out, args.quality, args.timeout)
        except Exception as exc:  # noqa: BLE001 - report and go on with the next photo
            report = {"photo": str(photo), "status": "ERROR", "error": f"{type(exc).__name__}: {exc}"}
            log(f"{name}: {report['error']}")
        if report.get("glb") and args.views > 0:
            log(f"{name}: rendering a {args.views}-view turntable ({args.turntable_engine})")
            report["turntable"] = render_turntable(Path(report["glb"]), out / name / "turntable", args.views,
                                                   args.turntable_engine)
            if "error" in report["turntable"]:
                log(f"{name}: {report['turntable']['error']}")
        summary["results"][name] = report
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    ok = all(r.get("status") == "DONE" and "error" not in r.get("turntable", {}) for r in summary["results"].values())
    log("all avatars done" if ok else "some avatars failed: see summary.json")
    print(out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
