"""Independent readers of our exports: the Khronos glTF-Validator and assimp, run as subprocesses.

Both are installed by ``python3 build.py setup`` (npm package in .tools/, Debian's assimp-utils);
``validator_available()`` / ``assimp_available()`` let tests skip with the reason when they are not.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VALIDATOR_SCRIPT = Path(__file__).with_name("validate_gltf.mjs")
VALIDATOR_DIR = ROOT / ".tools" / "node_modules" / "gltf-validator"


def validator_available() -> bool:
    return shutil.which("node") is not None and (VALIDATOR_DIR / "module.mjs").is_file()


def validate_gltf(path: Path, timeout: float = 120) -> dict:
    """The validator's JSON report for one .glb/.gltf (raises if the validator itself failed)."""
    proc = subprocess.run(["node", str(VALIDATOR_SCRIPT), str(path), str(VALIDATOR_DIR)],
                          capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"glTF-Validator could not run on {path}: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def assimp_available() -> bool:
    return shutil.which("assimp") is not None


@dataclass
class AssimpInfo:
    """What `assimp info` says about a file: its summary counts and the node names."""

    counts: dict[str, int] = field(default_factory=dict)
    nodes: list[str] = field(default_factory=list)
    meshes: list[tuple[str, int, int, int]] = field(default_factory=list)  # (name, verts, bones, faces)
    bounds: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    text: str = ""


_COUNT = re.compile(r"^([A-Za-z][A-Za-z .()]*?):\s+(\d+)\s*$")
_NODE = re.compile(r"[├└]╴(.+?)\s*$")
_MESH = re.compile(r"^\s*\d+ \((.*)\): \[(\d+) / (\d+) / (\d+) \|")
_POINT = re.compile(r"^(Minimum|Maximum) point\s+\(([-\d.e ]+)\)")


def assimp_info(path: Path, timeout: float = 120) -> AssimpInfo:
    proc = subprocess.run(["assimp", "info", str(path)], capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"assimp could not read {path}: {proc.stderr.strip() or proc.stdout[-500:]}")
    info = AssimpInfo(text=proc.stdout)
    lo = hi = None
    for line in proc.stdout.splitlines():
        if m := _COUNT.match(line):
            info.counts[m.group(1).strip()] = int(m.group(2))
        elif m := _NODE.search(line):
            info.nodes.append(m.group(1))
        elif m := _MESH.match(line):
            info.meshes.append((m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))))
        elif m := _POINT.match(line):
            values = tuple(float(x) for x in m.group(2).split())
            lo, hi = (values, hi) if m.group(1) == "Minimum" else (lo, values)
    if lo is not None and hi is not None:
        info.bounds = (lo, hi)
    return info
