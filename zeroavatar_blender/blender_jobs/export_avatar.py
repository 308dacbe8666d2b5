"""Export an avatar bundle for game engines, headless, with Blender's own exporters.

    python -m zeroavatar_blender.blender_jobs.export_avatar --bundle DIR --out DIR \\
        [--presets unity,unreal,godot,gltf] [--name SUBJECT] [--lods N] [--blend]

Runs where the ``bpy`` module is installed (the engine's environment has it). Builds the avatar
in a fresh empty scene, then writes avatar.glb and avatar.fbx (the Unity/generic FBX) plus one
file per preset named after the subject (<subject>.glb, <subject>_unity.fbx, ...; ``--name``
overrides the bundle's subject, as the engine's export stage does; ``--lods`` adds levels of detail to
the Unity FBX, and so to avatar.fbx). Prints one
JSON object a line: an ``export`` event per file, then ``done`` (or ``error``); the exit codes
are the engine's (protocol.EXIT_*).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from .. import protocol

DEFAULT_PRESETS = ("unity", "unreal", "godot", "gltf")


_json_out = sys.stdout


def emit(kind: str, **fields: Any) -> None:
    print(json.dumps(protocol.make_event(kind, **fields), allow_nan=False), file=_json_out, flush=True)


def keep_stdout_for_json() -> None:
    """Blender's exporters print progress on file descriptor 1; send all of that to stderr so
    stdout carries only our JSON lines (the engine parses them)."""
    global _json_out
    sys.stdout.flush()
    _json_out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from ..addon.export_presets import PRESETS

    parser = argparse.ArgumentParser(prog="python -m zeroavatar_blender.blender_jobs.export_avatar",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True, type=Path, help="the avatar bundle folder (result/) or a job folder")
    parser.add_argument("--out", required=True, type=Path, help="folder for the exported files")
    parser.add_argument("--presets", default=",".join(DEFAULT_PRESETS),
                        help=f"comma-separated, from {','.join(PRESETS)} (default: all)")
    parser.add_argument("--name", default=None,
                        help="subject name for the files and objects (default: the bundle's subject)")
    parser.add_argument("--lods", type=int, default=0, choices=range(0, 4), metavar="{0..3}",
                        help="levels of detail in the Unity FBX (NAME_LOD0..N, each half the triangles)")
    parser.add_argument("--blend", action="store_true", help="also save avatar.blend (texture packed)")
    args = parser.parse_args(argv)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown or not presets:
        parser.error(f"unknown presets {unknown}; choose from {','.join(PRESETS)}")
    args.presets = list(dict.fromkeys(presets))
    return args


def export_all(bundle_dir: Path, out_dir: Path, presets: list[str], save_blend: bool = False,
               name: str | None = None, lods: int = 0) -> list[dict[str, Any]]:
    """Build the avatar in a fresh scene and write every file; returns what was written."""
    import bpy

    from ..addon import export_presets, scene

    bpy.ops.wm.read_factory_settings(use_empty=True)
    started = time.perf_counter()
    armature, mesh = scene.build_avatar(bundle_dir, name=name or None)
    subject = name or str(armature.get(scene.PROP_SUBJECT) or armature.name)
    written: list[dict[str, Any]] = []

    def record(fmt: str, preset: str, path: Path, t0: float) -> None:
        item = {"format": fmt, "preset": preset, "path": str(path), "bytes": path.stat().st_size,
                "seconds": round(time.perf_counter() - t0, 3)}
        written.append(item)
        emit("export", **item)

    emit("message", level="info", message=f"built {subject!r} in {time.perf_counter() - started:.2f} s")
    out_dir.mkdir(parents=True, exist_ok=True)
    for preset in presets:
        t0 = time.perf_counter()
        path = export_presets.export_preset(armature, mesh, out_dir, preset, subject, lods)
        record("glb" if preset == "gltf" else "fbx", preset, path, t0)
    # The fixed names the job folder promises (protocol/ARCHITECTURE: exports/avatar.glb, avatar.fbx).
    for fixed, fmt, preset in (("avatar.glb", "glb", "gltf"), ("avatar.fbx", "fbx", "unity")):
        t0 = time.perf_counter()
        target = out_dir / fixed
        source = out_dir / export_presets.preset_filename(subject, preset)
        if preset in presets and source != target:
            shutil.copyfile(source, target)
        elif source != target:
            export_presets.export_preset(armature, mesh, out_dir, preset, subject, lods)
            shutil.move(source, target)
        record(fmt, preset, target, t0)
    if save_blend:
        t0 = time.perf_counter()
        target = (out_dir / "avatar.blend").resolve()
        bpy.ops.wm.save_as_mainfile(filepath=str(target), check_existing=False, compress=True)
        record("blend", "blend", target, t0)
    return written


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    keep_stdout_for_json()
    from ..addon.bundle_io import BundleError
    from ..addon.export_presets import ExportError

    try:
        written = export_all(args.bundle, args.out, args.presets, args.blend, args.name, args.lods)
    except BundleError as exc:
        emit("error", code=protocol.EXIT_BAD_INPUT, message=str(exc))
        return protocol.EXIT_BAD_INPUT
    except OSError as exc:
        emit("error", code=protocol.EXIT_IO, message=f"cannot write to {args.out}: {exc}",
             hint="choose a writable output folder with free space")
        return protocol.EXIT_IO
    except ExportError as exc:
        emit("error", code=protocol.EXIT_FAILED, message=str(exc))
        return protocol.EXIT_FAILED
    emit("done", status="ok", code=protocol.EXIT_OK, files=len(written))
    return protocol.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
