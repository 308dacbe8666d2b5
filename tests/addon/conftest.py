"""Blender-side test set-up: a private HOME before bpy is imported, fresh scenes, test bundles."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

# `import bpy` writes its user config under $HOME; test modules import bpy at collection time,
# so HOME must point somewhere private before any of them is imported.
_BPY_HOME = tempfile.mkdtemp(prefix="zeroavatar-bpy-home-")
os.environ["HOME"] = _BPY_HOME


@pytest.fixture(scope="session", autouse=True)
def bpy_home():
    """The private HOME that bpy writes to; removed after the session."""
    yield _BPY_HOME
    shutil.rmtree(_BPY_HOME, ignore_errors=True)


@pytest.fixture
def fresh_scene():
    """An empty factory scene for each test (no cube, camera or light)."""
    import bpy

    bpy.ops.wm.read_factory_settings(use_empty=True)
    yield bpy.context.scene
    bpy.ops.wm.read_factory_settings(use_empty=True)


@pytest.fixture(scope="session")
def anny_bundle(anny_body, tmp_path_factory):
    """A complete avatar bundle made from a posed Anny body (see bundle_factory)."""
    from .bundle_factory import make_anny_bundle

    return make_anny_bundle(anny_body, tmp_path_factory.mktemp("bundle") / "result")


# -- the add-on's UI and engine client (tests/addon/test_client.py, test_operators.py) ----------

# A stand-in engine: a real process that writes the protocol's events the way the engine does
# (appended JSON lines), and misbehaves on request. Standard library + numpy only.
FAKE_ENGINE = r'''
import json, os, shutil, signal, subprocess, sys, time

mode, job = sys.argv[1], sys.argv[2]
opts = sys.argv[3:]
EVENTS = os.path.join(job, "events.jsonl")
COMMANDS = os.path.join(job, "commands.jsonl")


def raw(data):
    fd = os.open(EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, data)
    os.close(fd)


def emit(event_type, **fields):
    raw((json.dumps({"v": 1, "type": event_type, "time": time.time(), **fields}) + "\n").encode())


def cancel_asked():
    try:
        with open(COMMANDS) as f:
            return any('"cancel"' in line for line in f)
    except FileNotFoundError:
        return False


def opt(name, default=None):
    return opts[opts.index(name) + 1] if name in opts else default


emit("started", pid=os.getpid(), command=mode, version="fake", argv=sys.argv[1:])
print("fake engine", mode, flush=True)
if mode == "ok":
    emit("stage", stage="fit", message="Fitting the body")
    total = int(opt("--steps", "5"))
    for step in range(1, total + 1):
        time.sleep(float(opt("--sleep", "0.02")))
        emit("progress", stage="fit", step=step, total=total, loss=1.0 / step, elapsed=0.1 * step,
             eta=0.1 * (total - step))
    import numpy as np
    os.makedirs(os.path.join(job, "meshes"), exist_ok=True)
    tmp = os.path.join(job, "meshes", ".tmp_step_000005.npz")
    np.savez(tmp, vertices=np.array([[0, 0, 0], [1, 0, 0], [0, 0, 1]], np.float32),
             faces=np.array([[0, 1, 2]], np.int32), colors=np.full((3, 3), 0.5, np.float32))
    os.replace(tmp, os.path.join(job, "meshes", "step_000005.npz"))
    emit("mesh", step=5, path="meshes/step_000005.npz")
    time.sleep(float(opt("--mesh-pause", "0")))
    if opt("--bundle"):
        shutil.copytree(opt("--bundle"), os.path.join(job, "result"), dirs_exist_ok=True)
        emit("result", path="result", kind=opt("--kind", "avatar"))
    emit("done", status="ok", code=0)
elif mode == "garbage":
    raw(b"not json at all\n")
    raw(b"[1, 2, 3]\n")
    raw(b'{"type": "no_such_event"}\n')
    raw(b"\xff\xfe\x00 binary\n")
    half = (json.dumps({"v": 1, "type": "progress", "stage": "fit", "step": 3, "total": 9}) + "\n").encode()
    raw(half[:17])
    time.sleep(0.4)
    raw(half[17:])
    emit("mesh", step=1, path="../../etc/passwd")
    emit("result", path="/etc")
    emit("done", status="ok", code=0)
elif mode == "silent":
    time.sleep(float(opts[0]))
    emit("done", status="ok", code=0)
elif mode == "early_exit":
    print("Traceback (most recent call last):\nValueError: the fake engine fell over", file=sys.stderr, flush=True)
    sys.exit(3)
elif mode == "zero_no_done":
    sys.exit(0)
elif mode == "error":
    emit("error", code=4, message="no usable person in photo.png", hint="use a photo with one whole person")
    emit("done", status="failed", code=4)
    sys.exit(4)
elif mode == "cooperative":
    for step in range(1, 2001):
        if cancel_asked():
            emit("error", code=6, message="cancelled by the user", hint="resume the job")
            emit("done", status="cancelled", code=6)
            sys.exit(6)
        emit("progress", stage="optimise", step=step, total=2000, elapsed=step * 0.05)
        time.sleep(0.05)
    sys.exit(1)
elif mode == "term_only":
    def on_term(signum, frame):
        emit("done", status="cancelled", code=6)
        sys.exit(6)
    signal.signal(signal.SIGTERM, on_term)
    while True:
        time.sleep(0.05)
elif mode == "hang":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(os.path.join(job, "child.pid"), "w") as f:
        f.write(str(child.pid))
    while True:
        time.sleep(0.05)
elif mode == "linger":
    emit("done", status="ok", code=0)
    time.sleep(60)
'''


@pytest.fixture(scope="session")
def fake_engine(tmp_path_factory):
    """Path of the stand-in engine script (run it with sys.executable)."""
    path = tmp_path_factory.mktemp("fake_engine") / "fake_engine.py"
    path.write_text(FAKE_ENGINE)
    return path


@pytest.fixture
def addon():
    """The add-on enabled the way Blender enables it (so its preferences exist), in an empty
    scene. read_homefile keeps add-ons enabled; read_factory_settings would disable them."""
    import addon_utils
    import bpy

    from zeroavatar_blender.addon import client

    if bpy.context.preferences.addons.get("zeroavatar_blender") is None:
        assert addon_utils.enable("zeroavatar_blender", default_set=True) is not None
    bpy.ops.wm.read_homefile(use_empty=True, use_factory_startup=True)
    yield bpy.context.preferences.addons["zeroavatar_blender"].preferences
    client.stop_all(timeout=1.0)
