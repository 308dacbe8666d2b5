"""Exports go through Blender's own FBX/glTF exporters in a Blender-module subprocess.

The engine never imports bpy: it runs ``zeroavatar_blender.blender_jobs.export_avatar`` with a
Python that has the ``bpy`` module (the same one when it is installed beside the engine).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

from .errors import EngineError
from .job import Job
from .pipeline import JobSettings

PACKAGE_PARENT = Path(__file__).resolve().parents[2]


def blender_python() -> str | None:
    """A Python that can ``import bpy``: ZEROAVATAR_BLENDER_PYTHON, or this one if it has bpy."""
    explicit = os.environ.get("ZEROAVATAR_BLENDER_PYTHON")
    if explicit:
        return explicit
    if importlib.util.find_spec("bpy") is not None:
        return sys.executable
    return None


def export_bundle(job: Job, settings: JobSettings, timeout: float = 900) -> Iterator[tuple[str, Path]]:
    python = blender_python()
    if python is None:
        job.info("Skipping FBX/glTF export: this Python has no `bpy` module (pip install bpy==5.0.1, or set "
                 "ZEROAVATAR_BLENDER_PYTHON); Blender exports the avatar itself when used from the add-on",
                 level="warning")
        return
    env = dict(os.environ)
    env["PYTHONPATH"] = str(PACKAGE_PARENT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [python, "-m", "zeroavatar_blender.blender_jobs.export_avatar", "--bundle", str(job.layout.result),
           "--out", str(job.layout.exports), "--name", settings.subject]
    if settings.lods:
        cmd += ["--lods", str(settings.lods)]
    log = job.root / "export.log"
    with open(log, "wb") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, env=env, timeout=timeout, cwd=job.root)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-8:]
        raise EngineError("Blender's exporter failed:\n    " + "\n    ".join(tail),
                          f"see {log}; the avatar bundle in {job.layout.result} is complete and can be imported")
    for line in proc.stdout.decode("utf-8", "replace").splitlines():
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(item, dict) and "path" in item and "format" in item:
            yield item["format"], Path(item["path"])
