"""The engine seen from Blender: spawn it, read its events, cancel it; never block the UI.

``EngineClient`` is plain stdlib + protocol (no bpy) so it can be tested against any process
that speaks the protocol. ``poll_all`` is the one function Blender calls repeatedly (a
``bpy.app.timers`` timer; tests and headless scripts call it in a loop, since timers never fire
in module mode): it drains every running job's events into its scene and never raises.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import protocol

log = logging.getLogger(__name__)

# Event types that name a file inside the job folder.
_PATH_EVENTS = frozenset({"mesh", "checkpoint", "result", "export"})
_FINAL_STATUSES = frozenset({"done", "failed", "cancelled"})
LOG_TAIL_LINES = 15


class EngineNotFoundError(RuntimeError):
    """No Python with the engine's packages: the message says what was tried and what to do."""


@dataclass
class EngineState:
    """What the UI shows about one engine run; updated by ``EngineClient.poll``."""

    status: str = "idle"  # idle | running | done | failed | cancelled
    stage: str = ""
    message: str = ""
    step: int = 0
    total: int = 0
    loss: float | None = None
    eta: float | None = None
    elapsed: float = 0.0
    pid: int | None = None
    exit_code: int | None = None
    error_code: int | None = None
    error_message: str = ""
    error_hint: str = ""
    log_tail: list[str] = field(default_factory=list)
    garbage_lines: int = 0
    last_event: float = 0.0  # time.monotonic() of the last well-formed event
    result_path: Path | None = None
    mesh_path: Path | None = None
    exports: list[tuple[str, Path]] = field(default_factory=list)
    done_status: str | None = None  # the engine's own "done" verdict, if it wrote one

    @property
    def finished(self) -> bool:
        return self.status in _FINAL_STATUSES

    @property
    def fraction(self) -> float:
        return min(1.0, max(0.0, self.step / self.total)) if self.total > 0 else 0.0

    def silent_for(self, now: float | None = None) -> float:
        """Seconds since the last event: the UI says "no news" instead of looking frozen."""
        return (time.monotonic() if now is None else now) - self.last_event


def tail_lines(path: Path, start: int = 0, max_lines: int = LOG_TAIL_LINES, max_bytes: int = 16384) -> list[str]:
    """The last lines of a log written after byte ``start`` (reads at most ``max_bytes``)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(start, size - max_bytes))
            data = f.read()
    except OSError:
        return []
    lines = [ln.rstrip() for ln in data.decode("utf-8", "replace").splitlines()]
    return [ln for ln in lines if ln.strip()][-max_lines:]


class EngineClient:
    """One engine subprocess working on one job folder.

    The engine is started in its own session (process group) with stdout/stderr going to
    ``JOB/engine.log``, so it never writes into Blender's console and can be signalled as a
    group. Only events appended after ``start`` are read: a job folder reused by ``optimise``
    keeps the earlier runs' events.
    """

    def __init__(self, python: str, *, env: dict[str, str] | None = None,
                 term_after_s: float = 10.0, kill_after_s: float = 30.0, linger_after_done_s: float = 5.0) -> None:
        self.python = str(python)
        self.env = env
        self.term_after_s = term_after_s
        self.kill_after_s = kill_after_s
        self.linger_after_done_s = linger_after_done_s
        self.job_dir: Path | None = None
        self.layout: protocol.JobLayout | None = None
        self.state = EngineState()
        self._proc: subprocess.Popen | None = None
        self._tail: protocol.JsonlTail | None = None
        self._log_start = 0
        self._cancel_at: float | None = None
        self._termed = False
        self._killed = False
        self._done_at: float | None = None
        self._started_at = 0.0

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, args: list[str], job_dir: Path) -> None:
        """Spawn ``python -m zeroavatar_blender.engine *args`` (or ``python *args`` when ``args[0]``
        is a script path) with ``job_dir`` as its working folder."""
        if self._proc is not None:
            raise RuntimeError("this client already started an engine; make a new one")
        job_dir = Path(job_dir).absolute()
        job_dir.mkdir(parents=True, exist_ok=True)
        self.job_dir = job_dir
        self.layout = protocol.JobLayout(job_dir)
        try:
            offset = self.layout.events.stat().st_size
        except FileNotFoundError:
            offset = 0
        self._tail = protocol.JsonlTail(self.layout.events, offset=offset)
        argv = [self.python, *[str(a) for a in args]]
        with open(self.layout.log, "ab") as logf:
            logf.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
            logf.flush()
            self._log_start = logf.tell()
            kwargs: dict[str, Any] = {}
            if os.name == "nt":
                kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
            else:
                kwargs["start_new_session"] = True
            self._proc = subprocess.Popen(argv, cwd=job_dir, env=self.env, stdin=subprocess.DEVNULL,
                                          stdout=logf, stderr=subprocess.STDOUT, close_fds=True, **kwargs)
        now = time.monotonic()
        self._started_at = now
        self.state = EngineState(status="running", pid=self._proc.pid, last_event=now, message="Starting the engine")

    @property
    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def cancel(self) -> None:
        """Ask the engine to stop at its next step (it keeps a checkpoint); ``poll`` escalates to
        SIGTERM after ``term_after_s`` and SIGKILL after ``kill_after_s`` if it does not."""
        if self.layout is None or self.state.finished or self._cancel_at is not None:
            return
        self._cancel_at = time.monotonic()
        try:
            protocol.append_jsonl(self.layout.commands, protocol.make_command("cancel"))
        except OSError as exc:  # cannot write the command file: go straight to the signal
            log.warning("cannot write the cancel command (%s); signalling the engine", exc)
            self._signal(signal.SIGTERM)
            self._termed = True
        self.state.message = "Cancelling..."

    def stop(self, timeout: float = 2.0) -> None:
        """Stop now (Blender quits, a file is loaded, the add-on is disabled): cancel, SIGTERM,
        wait up to ``timeout`` seconds, then SIGKILL. Blocks for at most ``timeout``."""
        if not self.is_alive:
            return
        self.cancel()
        self._signal(signal.SIGTERM)
        self._termed = True
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL if hasattr(signal, "SIGKILL") else signal.SIGTERM)
            self._killed = True
            try:
                self._proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                log.error("engine process %s did not die", self._proc.pid)

    def _signal(self, sig: int) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        try:
            if os.name == "nt":  # no process groups to signal; terminate() is TerminateProcess
                proc.terminate()
            else:
                os.killpg(proc.pid, sig)  # the whole group: workers the engine spawned die too
        except (ProcessLookupError, PermissionError):
            pass
        except OSError as exc:
            log.warning("cannot signal engine %s: %s", proc.pid, exc)

    # -- polling -----------------------------------------------------------------------------
    def poll(self) -> tuple[list[dict[str, Any]], EngineState]:
        """New events since the last call and the updated state. Never blocks, never raises on
        bad engine output (garbage lines are counted, unsafe paths dropped)."""
        if self._proc is None or self._tail is None:
            return [], self.state
        if self.state.finished:
            return [], self.state
        now = time.monotonic()
        exit_code = self._proc.poll()  # before reading: once it has exited, everything is on disk
        events = self._read_events(drain=exit_code is not None)
        for event in events:
            self._apply(event, now)
        self.state.garbage_lines = len(self._tail.bad_lines)
        if exit_code is None and self._cancel_at is not None:
            self._escalate(now)
        if exit_code is not None:
            self._finish(exit_code)
        elif self.state.done_status is not None:
            self._done_at = self._done_at or now
            if now - self._done_at > self.linger_after_done_s:  # done but lingering: stop waiting
                self._finish(None)
        return events, self.state

    def _read_events(self, drain: bool) -> list[dict[str, Any]]:
        events = self._tail.read(protocol.EVENT_TYPES)
        while drain:  # the process is gone: read everything that is left
            more = self._tail.read(protocol.EVENT_TYPES)
            if not more and self._tail.offset >= _size(self._tail.path):
                break
            events.extend(more)
        return events

    def _apply(self, event: dict[str, Any], now: float) -> None:
        st = self.state
        kind = event["type"]
        if kind in _PATH_EVENTS:
            try:
                event["_path"] = protocol.resolve_inside(self.job_dir, event.get("path"))
            except protocol.ProtocolError as exc:
                self._tail.bad_lines.append(f"{kind}: {exc}")
                event["_path"] = None
        st.last_event = now
        if kind == "stage":
            st.stage = str(event.get("stage", st.stage))
            st.message = str(event.get("message", ""))
            st.step, st.total, st.loss, st.eta = 0, 0, None, None
        elif kind == "progress":
            st.stage = str(event.get("stage", st.stage))
            st.step = _as_int(event.get("step"), st.step)
            st.total = _as_int(event.get("total"), st.total)
            st.loss = _as_float(event.get("loss"))
            st.eta = _as_float(event.get("eta"))
            st.elapsed = _as_float(event.get("elapsed")) or st.elapsed
        elif kind == "message":
            st.message = str(event.get("message", ""))
        elif kind == "mesh" and event["_path"] is not None:
            st.mesh_path = event["_path"]
        elif kind == "result" and event["_path"] is not None:
            st.result_path = event["_path"]
        elif kind == "export" and event["_path"] is not None:
            st.exports.append((str(event.get("format", "")), event["_path"]))
        elif kind == "error":
            st.error_code = _as_int(event.get("code"), protocol.EXIT_FAILED)
            st.error_message = str(event.get("message", "engine error"))
            st.error_hint = str(event.get("hint", "") or "")
        elif kind == "done":
            st.done_status = str(event.get("status", "failed"))
        elif kind == "started":
            st.message = "Engine started"

    def _escalate(self, now: float) -> None:
        waited = now - self._cancel_at
        if waited >= self.kill_after_s and not self._killed:
            self._signal(signal.SIGKILL if hasattr(signal, "SIGKILL") else signal.SIGTERM)
            self._killed = True
        elif waited >= self.term_after_s and not self._termed:
            self._signal(signal.SIGTERM)
            self._termed = True

    def _finish(self, exit_code: int | None) -> None:
        """Decide the final status from the engine's own verdict, its exit code, and our cancel."""
        st = self.state
        st.exit_code = exit_code
        cancelled_by_us = self._cancel_at is not None
        if st.done_status == "ok" and exit_code in (None, protocol.EXIT_OK):
            st.status = "done"
        elif st.done_status == "cancelled" or exit_code == protocol.EXIT_CANCELLED or (
                cancelled_by_us and (exit_code is None or exit_code < 0 or st.done_status is None)):
            st.status = "cancelled"
            st.message = "Cancelled"
        else:
            st.status = "failed"
            if not st.error_message:
                st.error_code = exit_code if exit_code and exit_code > 0 else protocol.EXIT_FAILED
                st.error_message = _exit_message(exit_code, st.done_status)
                st.error_hint = "see the engine log below and in " + str(self.layout.log)
        if st.status == "failed" or (exit_code not in (None, protocol.EXIT_OK) and st.status != "cancelled"):
            st.log_tail = tail_lines(self.layout.log, self._log_start)
        if st.status != "done":
            st.message = st.message if st.status == "cancelled" else "Failed"


def _exit_message(exit_code: int | None, done_status: str | None) -> str:
    if exit_code is not None and exit_code < 0:
        name = signal.Signals(-exit_code).name if -exit_code in signal.valid_signals() else str(-exit_code)
        return f"the engine was killed ({name}) before it finished"
    if exit_code == protocol.EXIT_OK:
        return "the engine exited without finishing the job" if done_status is None else "the engine reported a failure"
    meaning = protocol.EXIT_MEANINGS.get(exit_code, "unknown exit code")
    return f"the engine stopped with exit code {exit_code} ({meaning})"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _as_int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _as_float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if out == out and abs(out) != float("inf") else None


# -- finding the engine's Python --------------------------------------------------------------
@dataclass(frozen=True)
class EnginePython:
    path: str
    source: str  # where it came from, shown in the preferences


_TORCH_PROBE: dict[str, bool] = {}


def venv_python(venv: Path) -> Path:
    return Path(venv) / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def python_has_torch(python: str, timeout: float = 10.0) -> bool:
    """Whether ``python`` can import torch, asked in a subprocess (find_spec: no torch import,
    about 50 ms) and cached per path, so Blender's own Python is asked at most once."""
    if python in _TORCH_PROBE:
        return _TORCH_PROBE[python]
    code = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('torch') else 3)"
    try:
        rc = subprocess.run([python, "-c", code], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, timeout=timeout).returncode
        ok = rc == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    _TORCH_PROBE[python] = ok
    return ok


def engine_python_candidates(configured: str, user_venv: Path | None, package_parent: Path) -> list[tuple[str, str]]:
    """(path, source) in the order tried: explicit setting, environment, installed engine,
    the checkout's .venv, Blender's own Python."""
    out: list[tuple[str, str]] = []
    if configured:
        out.append((configured, "preferences"))
    env = os.environ.get("ZEROAVATAR_ENGINE_PYTHON", "")
    if env:
        out.append((env, "ZEROAVATAR_ENGINE_PYTHON"))
    if user_venv is not None:
        out.append((str(venv_python(user_venv)), "installed engine"))
    if (package_parent / "zeroavatar_blender" / "engine").is_dir():
        out.append((str(venv_python(package_parent / ".venv")), "checkout .venv"))
    if sys.executable:
        out.append((sys.executable, "Blender's Python"))
    return out


def find_engine_python(configured: str, user_venv: Path | None, package_parent: Path) -> EnginePython:
    """The first usable candidate. An explicit path must exist; Blender's own Python must have
    torch (it usually has not); the others only need to exist."""
    tried = []
    for path, source in engine_python_candidates(configured, user_venv, package_parent):
        exists = Path(path).is_file()
        if source in ("preferences", "ZEROAVATAR_ENGINE_PYTHON") and not exists:
            raise EngineNotFoundError(f"the engine Python set by {source} does not exist: {path}")
        if not exists:
            tried.append(f"{source} ({path}): missing")
            continue
        if source == "Blender's Python" and not python_has_torch(path):
            tried.append(f"{source} ({path}): no torch")
            continue
        return EnginePython(path, source)
    raise EngineNotFoundError("no Python with the ZeroAvatar engine was found; tried " + "; ".join(tried))


def engine_command(command: str, *args: str) -> list[str]:
    """Arguments after the interpreter for ``EngineClient.start``."""
    return ["-m", "zeroavatar_blender.engine", command, *args]


def engine_env(package_parent: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The engine's environment: only our package on PYTHONPATH (not Blender's paths), unbuffered
    output for a live log, offline model hubs."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = str(package_parent)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    if extra:
        env.update(extra)
    return env


# -- the running jobs of this Blender session ---------------------------------------------------
@dataclass
class ActiveJob:
    client: EngineClient
    scene_name: str
    kind: str  # generate | fit | optimise | finalise | resume
    avatar_name: str
    photo_path: str = ""
    built: bool = False
    mesh_applied: Path | None = None  # the newest preview file read (applied, or pending)
    preview_due: float = 0.0  # time.monotonic() before which no new preview is read
    pending_preview: Any = None  # scene.PreviewMesh being prepared over timer calls (jobs.apply_poll)
    preview_seconds: float = 0.0  # time spent preparing the pending preview
    previews_applied: int = 0


ACTIVE: dict[str, ActiveJob] = {}  # job folder -> job
POLL_INTERVAL_S = 0.1


def active_job(scene: Any) -> ActiveJob | None:
    """The running job of a scene (the registry is the truth; a saved 'running' status is not)."""
    for job in ACTIVE.values():
        if job.scene_name == scene.name and not job.client.state.finished:
            return job
    return None


def launch(scene: Any, kind: str, args: list[str], job_dir: Path, python: str, env: dict[str, str],
           avatar_name: str, photo_path: str = "") -> ActiveJob:
    """Start an engine for ``scene`` and register it for ``poll_all``."""
    client = EngineClient(python, env=env)
    client.start(args, job_dir)
    job = ActiveJob(client, scene.name, kind, avatar_name, photo_path)
    ACTIVE[str(client.job_dir)] = job
    from . import jobs as _jobs

    _jobs.mark_started(scene, job)
    ensure_timer()
    return job


def ensure_timer() -> None:
    try:
        import bpy

        if not bpy.app.timers.is_registered(poll_all):
            bpy.app.timers.register(poll_all, first_interval=POLL_INTERVAL_S, persistent=True)
    except Exception:  # noqa: BLE001 - never stop a job from starting because of the UI timer
        log.exception("cannot register the ZeroAvatar timer")


def poll_all() -> float | None:
    """Drain every running job into its scene. The add-on's timer; never raises.

    Returns the next interval while jobs run, None (unregister) when none is left.
    """
    for key, job in list(ACTIVE.items()):
        try:
            from . import jobs as _jobs

            events, state = job.client.poll()
            _jobs.apply_poll(job, events, state)
        except Exception as exc:  # noqa: BLE001 - a bug here must not take Blender down
            log.exception("ZeroAvatar: applying engine events failed")
            job.pending_preview, job.mesh_applied = None, job.client.state.mesh_path  # do not retry it
            _fail_job(job, exc)
        if job.client.state.finished and not _preview_pending(job):
            ACTIVE.pop(key, None)
    return POLL_INTERVAL_S if ACTIVE else None


def _preview_pending(job: ActiveJob) -> bool:
    try:
        from . import jobs as _jobs

        return _jobs.preview_pending(job)
    except Exception:  # noqa: BLE001 - never keep a finished job because of a preview
        return False


def _fail_job(job: ActiveJob, exc: BaseException) -> None:
    try:
        job.client.stop(timeout=1.0)
    except Exception:  # noqa: BLE001
        log.exception("cannot stop the engine")
    st = job.client.state
    st.status = "failed"
    st.error_message = f"the add-on could not apply the engine's output: {type(exc).__name__}: {exc}"
    st.error_hint = "this is a bug; the traceback is in Blender's console"
    try:
        from . import jobs as _jobs

        _jobs.write_state(job, st)
    except Exception:  # noqa: BLE001
        log.exception("cannot show the failure")


def stop_all(timeout: float = 2.0) -> None:
    """Stop every engine this session started (quit, file load, add-on disabled)."""
    for key, job in list(ACTIVE.items()):
        try:
            job.client.stop(timeout=timeout)
            job.client.poll()
        except Exception:  # noqa: BLE001
            log.exception("cannot stop engine %s", key)
        ACTIVE.pop(key, None)


# -- a background chain of commands (the engine installer) -------------------------------------
@dataclass
class ChainState:
    status: str = "idle"  # idle | running | done | failed | cancelled
    step: int = 0  # 1-based index of the running command
    total: int = 0
    label: str = ""
    last_line: str = ""
    exit_code: int | None = None


class CommandChain:
    """Run commands one after another in the background, output appended to one log file.

    ``poll`` starts the next command when one finishes and never blocks; the first failure
    stops the chain. Used by "Install engine" (venv, pip, check), which takes minutes.
    """

    def __init__(self, steps: list[tuple[str, list[str]]], log_path: Path, *, cwd: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.steps = steps
        self.log_path = Path(log_path)
        self.cwd = cwd
        self.env = env
        self.state = ChainState(total=len(steps))
        self._proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.state.status = "running"
        self._next()

    def _next(self) -> None:
        label, argv = self.steps[self.state.step]
        self.state.step += 1
        self.state.label = label
        with open(self.log_path, "ab") as logf:
            logf.write(f"\n=== {time.strftime('%H:%M:%S')} [{self.state.step}/{self.state.total}] {label}: "
                       f"{' '.join(argv)}\n".encode())
            logf.flush()
            kwargs: dict[str, Any] = {"start_new_session": True} if os.name != "nt" else {}
            try:
                self._proc = subprocess.Popen(argv, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                                              stdout=logf, stderr=subprocess.STDOUT, **kwargs)
            except OSError as exc:
                logf.write(f"cannot start: {exc}\n".encode())
                self.state.status = "failed"
                self.state.last_line = f"cannot start {argv[0]}: {exc}"

    def poll(self) -> ChainState:
        st = self.state
        if st.status != "running" or self._proc is None:
            return st
        lines = tail_lines(self.log_path, max_lines=1, max_bytes=2048)
        st.last_line = lines[-1][:200] if lines else ""
        rc = self._proc.poll()
        if rc is None:
            return st
        st.exit_code = rc
        if rc != 0:
            st.status = "failed"
        elif st.step >= st.total:
            st.status = "done"
        else:
            self._next()
        return st

    def cancel(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            try:
                if os.name == "nt":
                    self._proc.terminate()
                else:
                    os.killpg(self._proc.pid, signal.SIGTERM)
            except OSError:
                pass
        if self.state.status == "running":
            self.state.status = "cancelled"
