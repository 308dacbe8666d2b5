"""A job folder seen from the engine: events out, commands in, atomic artefacts, one owner.

Every artefact is written to a temporary name and renamed, so a reader (Blender, a resumed
engine) never sees half a file, and a crash never leaves something that looks like a result.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from .. import protocol
from .errors import BusyError, CancelledError, OutputError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise output_error(path, exc) from exc


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, allow_nan=False).encode("utf-8"))


def atomic_save(path: Path, writer: Callable[[Path], None]) -> None:
    """Let ``writer`` fill a temporary file (np.savez, PIL save...), then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".tmp{os.getpid()}_{path.name}")
    try:
        writer(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise output_error(path, exc) from exc
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def output_error(path: Path, exc: OSError) -> OutputError:
    """The OSError of a write as an error that says what is wrong with the output and what to do."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "the disk is full" if exc.errno == errno.ENOSPC else "the disk quota is used up"
        return OutputError(f"{what} while writing {path}",
                           "free some space (or choose an output folder on another drive), then resume the job")
    if exc.errno == errno.EFBIG:
        return OutputError(f"cannot write {path}: the file is too large for this system (a file-size limit such as "
                           "`ulimit -f`, or the drive's format)",
                           "raise the limit or choose an output folder on another drive, then resume the job")
    if exc.errno == errno.EROFS:
        return OutputError(f"cannot write {path}: the drive is read-only", "choose an output folder on a writable drive")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return OutputError(f"cannot write {path}: permission denied", "choose an output folder you can write to")
    return OutputError(f"cannot write {path}: {exc.strerror or exc}", "check the output folder")


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Job:
    """The engine's handle on one job folder.

    Owns the folder for its lifetime (a lock file naming our pid), appends events, and watches
    the command file so a cancel takes effect at the next ``check_cancel()`` (once per step).
    """

    def __init__(self, root: Path, *, quiet: bool = True) -> None:
        self.root = Path(root).absolute()
        self.layout = protocol.JobLayout(self.root)
        self.quiet = quiet
        self._commands = protocol.JsonlTail(self.layout.commands)
        self._cancel_requested = False
        self._pending_commands: list[dict[str, Any]] = []
        self._locked = False
        self.started = time.time()
        self.progress_hook: Callable[[dict[str, Any]], None] | None = None

    # -- ownership -------------------------------------------------------------------------
    def open(self) -> "Job":
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for sub in (self.layout.meshes, self.layout.checkpoints, self.layout.input_dir):
                sub.mkdir(exist_ok=True)
        except OSError as exc:
            raise output_error(self.root, exc) from exc
        self._acquire_lock()
        # Commands written before this run started (an old cancel) must not cancel it.
        try:
            self._commands.offset = self.layout.commands.stat().st_size
        except FileNotFoundError:
            pass
        return self

    def _acquire_lock(self) -> None:
        lock = self.layout.lock
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    other = int(lock.read_text().strip() or "0")
                except (OSError, ValueError):
                    other = 0
                if other and other != os.getpid() and pid_alive(other):
                    raise BusyError(
                        f"the job folder {self.root} is in use by engine process {other}",
                        "wait for it to finish, cancel it, or use another output folder",
                    )
                _unlink_quietly(lock)  # stale lock from a killed engine
                continue
            except OSError as exc:
                raise output_error(lock, exc) from exc
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(str(os.getpid()))
            except OSError as exc:  # a full disk: no lock file without our pid in it
                _unlink_quietly(lock)
                raise output_error(lock, exc) from exc
            self._locked = True
            return
        raise BusyError(f"could not lock the job folder {self.root}", "try again")

    def close(self) -> None:
        if self._locked:
            _unlink_quietly(self.layout.lock)
            self._locked = False

    def __enter__(self) -> "Job":
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- events ----------------------------------------------------------------------------
    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = protocol.make_event(kind, **fields)
        try:
            protocol.append_jsonl(self.layout.events, event)
        except OSError as exc:
            raise output_error(self.layout.events, exc) from exc
        if self.progress_hook is not None:
            self.progress_hook(event)
        return event

    def stage(self, stage: str, message: str) -> None:
        self.emit("stage", stage=stage, message=message)

    def info(self, message: str, level: str = "info") -> None:
        self.emit("message", level=level, message=message)

    def progress(self, stage: str, step: int, total: int, *, loss: float | None = None,
                 stage_started: float | None = None, done_before: int = 0,
                 stats: dict[str, float] | None = None) -> None:
        """``done_before``: steps finished before this run started (a resumed job), for the ETA.
        ``stats``: extra numbers for benchmarks and bug reports (e.g. samples per ray)."""
        now = time.time()
        elapsed = now - (stage_started or self.started)
        done = step - done_before
        eta = elapsed / done * (total - step) if done > 0 else None
        fields: dict[str, Any] = {"stage": stage, "step": int(step), "total": int(total),
                                  "elapsed": round(elapsed, 3)}
        if eta is not None:
            fields["eta"] = round(eta, 2)
        if loss is not None and loss == loss and abs(loss) != float("inf"):
            fields["loss"] = float(loss)
        for key, value in (stats or {}).items():
            fields.setdefault(key, round(float(value), 3))
        self.emit("progress", **fields)

    def rel(self, path: Path) -> str:
        return Path(path).absolute().relative_to(self.root).as_posix()

    # -- commands --------------------------------------------------------------------------
    def poll_commands(self) -> list[dict[str, Any]]:
        cmds = self._commands.read(protocol.COMMAND_TYPES)
        for cmd in cmds:
            if cmd["type"] == "cancel":
                self._cancel_requested = True
            else:
                self._pending_commands.append(cmd)
        return cmds

    def request_cancel(self) -> None:
        self._cancel_requested = True

    @property
    def cancel_requested(self) -> bool:
        self.poll_commands()
        return self._cancel_requested

    def check_cancel(self) -> None:
        if self.cancel_requested:
            raise CancelledError("cancelled by the user", "resume the job to continue from its last checkpoint")

    def take_commands(self) -> list[dict[str, Any]]:
        self.poll_commands()
        cmds, self._pending_commands = self._pending_commands, []
        return cmds

    # -- reading back ----------------------------------------------------------------------
    def events(self) -> Iterator[dict[str, Any]]:
        return protocol.iter_events(self.layout.events)


def install_signal_cancel(job: Job) -> None:
    """SIGTERM/SIGINT become a cooperative cancel, so the engine stops at a step boundary
    with a checkpoint instead of dying mid-write. A second signal exits at once."""

    def handler(signum: int, frame: Any) -> None:  # noqa: ARG001
        if job._cancel_requested:
            sys.exit(protocol.EXIT_CANCELLED)
        job.request_cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(sig, handler)
        except (ValueError, OSError):  # not the main thread
            pass
