#!/usr/bin/env python3
"""One entry point for developers and CI.

    python3 build.py setup   # engine + Blender-module environment (.venv), tools, Anny cache
    python3 build.py test    # the test suite (runs setup first if needed)
    python3 build.py demo    # photo -> rigged avatar, headless, through the add-on's operator
    python3 build.py build   # the extension zip in dist/, validated
    python3 build.py bench   # benchmarks -> docs/BENCHMARKS.md  (--quick for a short run)

Standard library only: it runs before any environment exists.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
TOOLS = ROOT / ".tools"
CACHE = ROOT / ".cache"
REQ = ROOT / "requirements"
STAMP = VENV / ".zeroavatar-setup"
# The environment is about 3.5 GB once installed (torch, bpy, diffusers, mediapipe), and pip
# unpacks the wheels in the temporary folder on the way, so a nearly full disk fails halfway.
SETUP_NEEDS_BYTES = 6 * 1024 ** 3


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def run(cmd: list[str], env: dict[str, str] | None = None, check: bool = True) -> int:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    rc = subprocess.call([str(c) for c in cmd], env=env, cwd=ROOT)
    if check and rc != 0:
        sys.exit(rc)
    return rc


def dev_env() -> dict[str, str]:
    """Environment for everything run from the checkout: offline hubs, local caches."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # Absolute: the engine runs in each job's folder, where a relative path would build a fresh
    # 800 MB cache (90 s) per job.
    env["ZEROAVATAR_ANNY_CACHE"] = str(Path(env.get("ZEROAVATAR_ANNY_CACHE") or CACHE / "anny").resolve())
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["DIFFUSERS_OFFLINE"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["PATH"] = str(TOOLS / "node_modules" / ".bin") + os.pathsep + env.get("PATH", "")
    return env


def _requirements_hash() -> str:
    h = hashlib.sha256()
    for name in ("engine.txt", "engine-lock.txt", "dev.txt"):
        h.update((REQ / name).read_bytes())
    return h.hexdigest()[:16]


def disk_space_problem(folders: list[Path], need_bytes: int) -> str | None:
    """Say which folder is short of space before pip fails halfway with ENOSPC."""
    short = []
    for folder in folders:
        probe = folder
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if free < need_bytes:
            short.append(f"{folder} has {free / 1024 ** 3:.1f} GB free")
    if not short:
        return None
    return (f"setup needs about {need_bytes / 1024 ** 3:.0f} GB free for the Python environment "
            f"and pip's unpacking: {'; '.join(short)}. Free some space (or point TMPDIR elsewhere) "
            "and run `python3 build.py setup` again.")


def setup(args: argparse.Namespace) -> None:
    started = time.time()
    want = _requirements_hash()
    if not venv_python().exists():
        run([sys.executable, "-m", "venv", str(VENV)])
    if not STAMP.exists() or STAMP.read_text().strip() != want:
        problem = disk_space_problem([VENV, Path(tempfile.gettempdir())], SETUP_NEEDS_BYTES)
        if problem:
            print("warning:", problem, flush=True)
        py = str(venv_python())
        run([py, "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=False)
        # The lock file pins every transitive package; torch is the CPU build (a CUDA build
        # would be several GB). The engine's GPU users install their own torch (see README).
        run([py, "-m", "pip", "install", "--quiet", "-r", str(REQ / "engine.txt"), "-r", str(REQ / "dev.txt"),
             "-c", str(REQ / "engine-lock.txt")])
        STAMP.write_text(want)
    else:
        print("engine environment up to date:", VENV)
    _setup_tools()
    _build_anny_cache()
    print(f"setup done in {time.time() - started:.0f} s")


def _setup_tools() -> None:
    """Independent readers for our exports: Khronos glTF-Validator (npm) and assimp (Debian)."""
    validator = TOOLS / "node_modules" / "gltf-validator"
    if not validator.exists() and shutil.which("npm"):
        TOOLS.mkdir(exist_ok=True)
        run(["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix", str(TOOLS),
             "gltf-validator@2.0.0-dev.3.10"], check=False)
    if not shutil.which("assimp"):
        apt = shutil.which("apt-get")
        if apt and hasattr(os, "geteuid") and os.geteuid() == 0:
            run([apt, "-qq", "update"], check=False)
            run([apt, "-qq", "install", "-y", "--no-install-recommends", "assimp-utils"], check=False)
        else:
            print("note: install 'assimp-utils' (Debian/Ubuntu) for the FBX reader checks")


def _build_anny_cache() -> None:
    env = dev_env()
    code = ("from zeroavatar_blender.engine.body.anny_body import load_anny;"
            "b = load_anny(on_message=print); print('Anny ready:', b.num_vertices, 'vertices')")
    run([str(venv_python()), "-c", code], env=env)


def ensure_setup() -> None:
    if not STAMP.exists() or STAMP.read_text().strip() != _requirements_hash():
        setup(argparse.Namespace())


def test(args: argparse.Namespace) -> None:
    ensure_setup()
    cmd = [str(venv_python()), "-m", "pytest", "-q", "-p", "no:cacheprovider", *args.pytest_args]
    if not args.pytest_args:
        cmd.append("tests")
    sys.exit(run(cmd, env=dev_env(), check=False))


def demo(args: argparse.Namespace) -> None:
    ensure_setup()
    out = Path(args.out).resolve()
    run([str(venv_python()), "-m", "zeroavatar_blender.blender_jobs.demo", "--out", str(out),
         "--quality", args.quality], env=dev_env())


def build(args: argparse.Namespace) -> None:
    ensure_setup()
    run([str(venv_python()), "-m", "zeroavatar_blender.blender_jobs.package", "--out", str(ROOT / "dist")],
        env=dev_env())


def bench(args: argparse.Namespace) -> None:
    ensure_setup()
    cmd = [str(venv_python()), "-m", "tests.benchmarks.run"]
    if args.quick:
        cmd.append("--quick")
    run(cmd, env=dev_env())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("setup", help="create .venv, tools and the Anny cache (idempotent)").set_defaults(func=setup)
    p = sub.add_parser("test", help="run the tests")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=test)
    p = sub.add_parser("demo", help="run the demo photos end to end")
    p.add_argument("--out", default=str(ROOT / "demo_output"))
    p.add_argument("--quality", default="fast", choices=("fast", "standard", "full"))
    p.set_defaults(func=demo)
    sub.add_parser("build", help="build the extension zip").set_defaults(func=build)
    p = sub.add_parser("bench", help="run the benchmarks")
    p.add_argument("--quick", action="store_true")
    p.set_defaults(func=bench)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
