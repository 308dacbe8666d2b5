"""The contract between the Blender side and the engine: job-folder layout, events, commands.

Standard library only: both processes import this module, and Blender's Python has no torch
while the engine never imports bpy. Everything that crosses the process boundary is plain JSON
or an ``.npz`` of plain arrays (never a pickle), so neither side can run the other's code.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

PROTOCOL_VERSION = 1
BUNDLE_VERSION = 1

# Exit codes of ``python -m zeroavatar_blender.engine``; the Blender side maps them to messages.
EXIT_OK = 0
EXIT_FAILED = 1  # an unexpected engine error (a bug): the log names it
EXIT_USAGE = 2  # bad command-line arguments (argparse's own code)
EXIT_BAD_INPUT = 3  # unreadable / not an image / corrupt file
EXIT_NO_PERSON = 4  # the photo was read but no usable person was found
EXIT_MISSING_MODEL = 5  # body-model file or diffusion weights missing
EXIT_CANCELLED = 6  # a cancel command or SIGINT/SIGTERM; a checkpoint is kept
EXIT_IO = 7  # output folder not writable, disk full
EXIT_BUSY = 8  # the job folder is already used by another live engine
EXIT_NEEDS_CHOICE = 9  # e.g. quality "full" asked without a GPU: the message lists choices

EXIT_MEANINGS = {
    EXIT_OK: "finished",
    EXIT_FAILED: "engine error",
    EXIT_USAGE: "bad arguments",
    EXIT_BAD_INPUT: "unreadable input",
    EXIT_NO_PERSON: "no usable person in the photo",
    EXIT_MISSING_MODEL: "missing model file or weights",
    EXIT_CANCELLED: "cancelled",
    EXIT_IO: "cannot write the output",
    EXIT_BUSY: "job folder in use",
    EXIT_NEEDS_CHOICE: "needs a choice",
}

# Event types the engine writes, one JSON object per line of events.jsonl.
EVENT_TYPES = frozenset(
    {
        "started",  # {pid, argv, version}
        "stage",  # {stage, message}
        "progress",  # {stage, step, total, loss?, elapsed, eta?, samples_per_ray?, occupied? (optimise: the grid's share of the box)}
        "message",  # {level: info|warning, message}
        "mesh",  # {step, path}: an intermediate mesh to preview (relative to the job)
        "checkpoint",  # {step, path}
        "result",  # {path}: the avatar bundle folder (relative to the job)
        "export",  # {format, path}
        "error",  # {code, message, hint?}
        "done",  # {status: ok|cancelled|failed, code}
    }
)

COMMAND_TYPES = frozenset({"cancel", "pose"})

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ProtocolError(ValueError):
    """A malformed event, command or unsafe path coming from the other process."""


def safe_name(name: str) -> str:
    """Validate a single file/folder name from the other side (no separators, no '..')."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or ".." in name:
        raise ProtocolError(f"unsafe name in job folder: {name!r}")
    return name


def resolve_inside(root: Path, relative: str) -> Path:
    """Resolve a relative path named by an event, refusing anything outside ``root``."""
    if not isinstance(relative, str) or not relative or relative.startswith(("/", "\\")):
        raise ProtocolError(f"bad relative path: {relative!r}")
    parts = relative.replace("\\", "/").split("/")
    for part in parts:
        safe_name(part)
    root = Path(root).resolve()
    path = (root / Path(*parts)).resolve()
    if root != path and root not in path.parents:
        raise ProtocolError(f"path escapes the job folder: {relative!r}")
    return path


@dataclass(frozen=True)
class JobLayout:
    """Where each artefact of a job lives. One job = one folder; stages communicate only here."""

    root: Path

    @property
    def events(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def commands(self) -> Path:
        return self.root / "commands.jsonl"

    @property
    def lock(self) -> Path:
        return self.root / "engine.lock"

    @property
    def log(self) -> Path:
        return self.root / "engine.log"

    @property
    def job_json(self) -> Path:
        return self.root / "job.json"

    @property
    def input_dir(self) -> Path:
        return self.root / "input"

    @property
    def perception(self) -> Path:
        return self.root / "perception.npz"

    @property
    def fit_json(self) -> Path:
        return self.root / "fit.json"

    @property
    def pose_edit(self) -> Path:
        """The user's pose/shape edit from Blender (JSON), read by the optimiser."""
        return self.root / "pose_edit.json"

    @property
    def meshes(self) -> Path:
        return self.root / "meshes"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def result(self) -> Path:
        return self.root / "result"

    @property
    def exports(self) -> Path:
        return self.root / "exports"

    @property
    def bundle_json(self) -> Path:
        return self.result / "avatar.json"

    @property
    def bundle_npz(self) -> Path:
        return self.result / "avatar.npz"

    @property
    def bundle_texture(self) -> Path:
        return self.result / "texture.png"


def make_event(kind: str, **fields: Any) -> dict[str, Any]:
    if kind not in EVENT_TYPES:
        raise ProtocolError(f"unknown event type {kind!r}")
    return {"v": PROTOCOL_VERSION, "type": kind, "time": time.time(), **fields}


def make_command(kind: str, **fields: Any) -> dict[str, Any]:
    if kind not in COMMAND_TYPES:
        raise ProtocolError(f"unknown command type {kind!r}")
    return {"v": PROTOCOL_VERSION, "type": kind, "time": time.time(), **fields}


def append_jsonl(path: Path, obj: dict[str, Any]) -> None:
    """Append one JSON line; a single ``write`` of a short line keeps readers from seeing halves."""
    line = json.dumps(obj, separators=(",", ":"), allow_nan=False) + "\n"
    data = line.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        written = 0
        try:
            while written < len(data):
                n = os.write(fd, data[written:])
                if n <= 0:
                    raise OSError(28, "no space left on device")
                written += n
        except OSError:
            # never leave half a line that the next event would be glued onto
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass
            raise
    finally:
        os.close(fd)


@dataclass
class JsonlTail:
    """Incrementally read a JSON-lines file another process appends to.

    Partial trailing lines are kept for the next call; garbage lines are reported, not raised,
    so a misbehaving writer cannot crash the reader (Blender's main thread).
    """

    path: Path
    offset: int = 0
    _partial: bytes = b""
    bad_lines: list[str] = field(default_factory=list)
    max_bytes_per_read: int = 4 << 20

    def read(self, allowed_types: frozenset[str] | None = None) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read(self.max_bytes_per_read)
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > self.max_bytes_per_read:  # a runaway line without newline
            self.bad_lines.append(self._partial[:200].decode("utf-8", "replace"))
            self._partial = b""
        out = []
        for raw in lines:
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                self.bad_lines.append(raw[:200].decode("utf-8", "replace"))
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
                self.bad_lines.append(raw[:200].decode("utf-8", "replace"))
                continue
            if allowed_types is not None and obj["type"] not in allowed_types:
                self.bad_lines.append(raw[:200].decode("utf-8", "replace"))
                continue
            out.append(obj)
        return out


def iter_events(path: Path) -> Iterator[dict[str, Any]]:
    """All well-formed events of a finished (or running) job, in order."""
    yield from JsonlTail(Path(path)).read(EVENT_TYPES)


# Avatar bundle (result/): avatar.json + avatar.npz + texture.png.
# avatar.npz arrays (float32 unless noted; Blender frame: metres, Z up, subject faces -Y):
#   vertices (V,3) rest pose; faces (F,3) int32; corner_uv (F,3,2);
#   skin_indices (V,4) int32 and skin_weights (V,4) normalised (at most 4 influences);
#   bone_rest (J,4,4) armature-space rest matrices (Y along the bone, Blender convention);
#   bone_pose (J,4,4) armature-space matrices of the photo's pose; bone_parents (J,) int32;
#   bone_length (J,); posed_vertices (V,3) the photo's pose (for checking Blender's deform).
# avatar.json: {"version", "subject", "body_model", "bones": [names], "texture": "texture.png",
#   "camera": {"K": 3x3, "world_to_cam": 4x4 (OpenCV), "width", "height"}, "quality", ...}
BUNDLE_ARRAYS = (
    "vertices",
    "faces",
    "corner_uv",
    "skin_indices",
    "skin_weights",
    "bone_rest",
    "bone_pose",
    "bone_parents",
    "bone_length",
    "posed_vertices",
)

# Streamed preview meshes (meshes/step_XXXXXX.npz): vertices (V,3) float32 in the Blender frame,
# faces (F,3) int32, colors (V,3) float32 in [0,1]. Written to a temp name, then renamed.
MESH_ARRAYS = ("vertices", "faces", "colors")


def mesh_name(step: int) -> str:
    return f"step_{int(step):06d}.npz"


# The user's pose/shape edit (JOB/pose_edit.json), written by Blender before Optimise/Finalise:
#   {"version": 1, "bundle": "fit_body" | "result" (whose frame the matrices are in),
#    "bone_names": [...], "bone_pose": J x 4 x 4 armature-space matrices (like bundle bone_pose),
#    "shape": [...] | null (body shape parameters; null keeps the fit's)}
def make_pose_edit(bone_names: list[str], bone_pose: list, bundle: str = "fit_body",
                   shape: list[float] | None = None) -> dict[str, Any]:
    safe_name(bundle)
    if len(bone_pose) != len(bone_names):
        raise ProtocolError("pose edit: one matrix per bone is needed")
    return {"version": PROTOCOL_VERSION, "bundle": bundle, "bone_names": list(bone_names),
            "bone_pose": [[[float(x) for x in row] for row in m] for m in bone_pose],
            "shape": None if shape is None else [float(s) for s in shape]}


def read_pose_edit(path: Path) -> dict[str, Any]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("bone_names"), list):
        raise ProtocolError(f"{path}: not a pose edit")
    safe_name(data.get("bundle", "fit_body"))
    mats = data.get("bone_pose")
    if not isinstance(mats, list) or len(mats) != len(data["bone_names"]):
        raise ProtocolError(f"{path}: bone_pose must hold one 4x4 matrix per bone")
    for m in mats:
        if not (isinstance(m, list) and len(m) == 4 and all(isinstance(r, list) and len(r) == 4 for r in m)):
            raise ProtocolError(f"{path}: bone_pose entries must be 4x4 matrices")
    return data
