"""EngineClient against real subprocesses that speak the protocol and misbehave on purpose."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from zeroavatar_blender import protocol
from zeroavatar_blender.addon.client import (
    CommandChain,
    EngineClient,
    EngineNotFoundError,
    engine_python_candidates,
    find_engine_python,
    python_has_torch,
    tail_lines,
)

ROOT = Path(__file__).resolve().parents[2]


def run_fake(fake_engine: Path, job: Path, mode: str, *extra: str, **client_kwargs) -> EngineClient:
    client = EngineClient(sys.executable, **client_kwargs)
    client.start([str(fake_engine), mode, str(job), *extra], job)
    return client


def pump(client: EngineClient, timeout: float = 20.0, until=None) -> list[dict]:
    """Poll like Blender's timer would until the job is finished (or ``until(state)``)."""
    events = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new, state = client.poll()
        events.extend(new)
        if state.finished or (until is not None and until(state)):
            return events
        time.sleep(0.02)
    client.stop(timeout=1.0)
    raise AssertionError(f"the engine did not finish in {timeout} s: {client.state}")


def pid_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A zombie whose parent is gone is reaped by init; check its state where /proc exists.
        stat = Path(f"/proc/{pid}/stat")
        if stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z":
            return True
        time.sleep(0.05)
    return False


def test_normal_run_reports_progress_mesh_and_result(fake_engine, tmp_path, anny_bundle):
    job = tmp_path / "job"
    client = run_fake(fake_engine, job, "ok", "--bundle", str(anny_bundle))
    events = pump(client)
    state = client.state
    assert state.status == "done" and state.exit_code == 0
    assert [e["type"] for e in events][:2] == ["started", "stage"]
    assert [e["step"] for e in events if e["type"] == "progress"] == [1, 2, 3, 4, 5]
    assert state.step == 5 and state.total == 5 and state.fraction == 1.0
    assert state.loss == pytest.approx(0.2)
    assert state.mesh_path == (job / "meshes" / "step_000005.npz").resolve()
    assert state.result_path == (job / "result").resolve()
    assert state.garbage_lines == 0 and not state.error_message
    assert (job / "engine.log").read_text().count("fake engine ok") == 1
    assert not client.is_alive


def test_garbage_partial_lines_and_unsafe_paths(fake_engine, tmp_path):
    job = tmp_path / "job"
    client = run_fake(fake_engine, job, "garbage")
    events = pump(client)
    state = client.state
    assert state.status == "done"
    # The progress line written in two halves 0.4 s apart arrives whole, once.
    progress = [e for e in events if e["type"] == "progress"]
    assert len(progress) == 1 and progress[0]["step"] == 3 and progress[0]["total"] == 9
    # 4 garbage lines + 2 events naming paths outside the job folder.
    assert state.garbage_lines == 6
    unsafe = [e for e in events if e["type"] in ("mesh", "result")]
    assert len(unsafe) == 2 and all(e["_path"] is None for e in unsafe)
    assert state.mesh_path is None and state.result_path is None


def test_silence_is_not_a_failure(fake_engine, tmp_path):
    client = run_fake(fake_engine, tmp_path / "job", "silent", "1.5")
    pump(client, until=lambda st: st.silent_for() > 1.0)
    assert client.state.status == "running" and client.is_alive
    pump(client)
    assert client.state.status == "done"


def test_early_exit_without_done_shows_the_log(fake_engine, tmp_path):
    client = run_fake(fake_engine, tmp_path / "job", "early_exit")
    pump(client)
    state = client.state
    assert state.status == "failed" and state.exit_code == 3
    assert "exit code 3" in state.error_message and "unreadable input" in state.error_message
    assert any("the fake engine fell over" in line for line in state.log_tail)
    assert str(tmp_path / "job" / "engine.log") in state.error_hint


def test_clean_exit_without_done_is_a_failure(fake_engine, tmp_path):
    client = run_fake(fake_engine, tmp_path / "job", "zero_no_done")
    pump(client)
    assert client.state.status == "failed"
    assert "without finishing" in client.state.error_message


def test_engine_error_event_keeps_message_and_hint(fake_engine, tmp_path):
    client = run_fake(fake_engine, tmp_path / "job", "error")
    pump(client)
    state = client.state
    assert state.status == "failed" and state.exit_code == protocol.EXIT_NO_PERSON
    assert state.error_code == 4
    assert state.error_message == "no usable person in photo.png"
    assert state.error_hint == "use a photo with one whole person"


def test_killed_engine_is_reported(fake_engine, tmp_path):
    client = run_fake(fake_engine, tmp_path / "job", "cooperative")
    pump(client, until=lambda st: st.step >= 2)
    os.kill(client.pid, signal.SIGKILL)
    pump(client)
    state = client.state
    assert state.status == "failed" and state.exit_code == -signal.SIGKILL
    assert "killed (SIGKILL)" in state.error_message


def test_cancel_is_cooperative_first(fake_engine, tmp_path):
    job = tmp_path / "job"
    client = run_fake(fake_engine, job, "cooperative")
    pump(client, until=lambda st: st.step >= 2)
    client.cancel()
    pump(client, timeout=10)
    assert client.state.status == "cancelled" and client.state.exit_code == protocol.EXIT_CANCELLED
    commands = [json.loads(line) for line in (job / "commands.jsonl").read_text().splitlines()]
    assert [c["type"] for c in commands] == ["cancel"]


def test_cancel_escalates_to_sigterm(fake_engine, tmp_path):
    client = run_fake(fake_engine, tmp_path / "job", "term_only", term_after_s=0.3, kill_after_s=20)
    pump(client, until=lambda st: st.message == "Engine started")
    client.cancel()
    pump(client, timeout=10)
    assert client.state.status == "cancelled" and client.state.exit_code == protocol.EXIT_CANCELLED


def test_cancel_escalates_to_sigkill_of_the_whole_group(fake_engine, tmp_path):
    job = tmp_path / "job"
    client = run_fake(fake_engine, job, "hang", term_after_s=0.2, kill_after_s=0.8)
    pump(client, until=lambda st: (job / "child.pid").exists() and (job / "child.pid").read_text())
    child = int((job / "child.pid").read_text())
    client.cancel()
    pump(client, timeout=10)
    assert client.state.status == "cancelled" and client.state.exit_code == -signal.SIGKILL
    assert pid_gone(child), "the engine's own child process survived the group kill"


def test_stop_is_bounded(fake_engine, tmp_path):
    job = tmp_path / "job"
    client = run_fake(fake_engine, job, "hang")
    pump(client, until=lambda st: (job / "child.pid").exists() and (job / "child.pid").read_text())
    started = time.monotonic()
    client.stop(timeout=0.5)
    assert time.monotonic() - started < 3.0
    assert not client.is_alive


def test_done_but_lingering_engine_is_not_waited_for(fake_engine, tmp_path):
    client = run_fake(fake_engine, tmp_path / "job", "linger", linger_after_done_s=0.3)
    pump(client, timeout=10)
    assert client.state.status == "done" and client.is_alive
    client.stop(timeout=0.5)
    assert not client.is_alive


def test_earlier_runs_events_are_ignored(fake_engine, tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    protocol.append_jsonl(job / "events.jsonl", protocol.make_event("error", code=3, message="old run"))
    protocol.append_jsonl(job / "events.jsonl", protocol.make_event("done", status="failed", code=3))
    client = run_fake(fake_engine, job, "ok")
    events = pump(client)
    assert client.state.status == "done" and not client.state.error_message
    assert events[0]["type"] == "started"


def test_missing_interpreter_raises_oserror(tmp_path):
    client = EngineClient(str(tmp_path / "no_python"))
    with pytest.raises(OSError):
        client.start(["-c", "pass"], tmp_path / "job")


def test_tail_lines_reads_only_the_new_part(tmp_path):
    log = tmp_path / "engine.log"
    log.write_text("old 1\nold 2\n")
    start = log.stat().st_size
    with open(log, "a") as f:
        f.write("\n".join(f"line {i}" for i in range(40)) + "\n")
    tail = tail_lines(log, start, max_lines=5)
    assert tail == [f"line {i}" for i in range(35, 40)]
    assert tail_lines(tmp_path / "missing.log") == []


# -- finding the engine's Python -----------------------------------------------------------
def test_engine_python_order(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEROAVATAR_ENGINE_PYTHON", "/env/python")
    cands = engine_python_candidates("/prefs/python", tmp_path / "venv", ROOT)
    assert [s for _, s in cands] == ["preferences", "ZEROAVATAR_ENGINE_PYTHON", "installed engine",
                                     "checkout .venv", "Blender's Python"]


def test_find_engine_python(tmp_path, monkeypatch):
    monkeypatch.delenv("ZEROAVATAR_ENGINE_PYTHON", raising=False)
    with pytest.raises(EngineNotFoundError, match="does not exist"):
        find_engine_python(str(tmp_path / "nope"), None, ROOT)
    found = find_engine_python("", tmp_path / "no_venv", ROOT)
    assert found.source == "checkout .venv" and Path(found.path).is_file()
    # Outside a checkout the running Python counts only if it has torch (this one has).
    found = find_engine_python("", tmp_path / "no_venv", tmp_path)
    assert found.source == "Blender's Python" and found.path == sys.executable
    monkeypatch.setenv("ZEROAVATAR_ENGINE_PYTHON", sys.executable)
    assert find_engine_python("", None, tmp_path).source == "ZEROAVATAR_ENGINE_PYTHON"


def test_torch_probe_answers_no_for_a_python_without_torch(tmp_path):
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
    bare = tmp_path / "bare" / "bin" / "python"
    assert python_has_torch(str(bare)) is False
    assert python_has_torch(sys.executable) is True


# -- the background command chain ("Install engine") ---------------------------------------
def _pump_chain(chain: CommandChain, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = chain.poll()
        if st.status != "running":
            return st
        time.sleep(0.02)
    raise AssertionError("chain did not finish")


def test_command_chain_runs_in_order_and_stops_at_a_failure(tmp_path):
    out = tmp_path / "order.txt"
    step = "open({!r}, 'a').write('{}\\n')"
    ok = CommandChain([(f"step {i}", [sys.executable, "-c", step.format(str(out), i)]) for i in range(3)],
                      tmp_path / "install.log")
    ok.start()
    st = _pump_chain(ok)
    assert st.status == "done" and st.step == 3 and out.read_text().split() == ["0", "1", "2"]

    bad = CommandChain([("first", [sys.executable, "-c", "print('fine')"]),
                        ("second", [sys.executable, "-c", "import sys; print('pip said no'); sys.exit(5)"]),
                        ("third", [sys.executable, "-c", "raise SystemExit('must not run')"])],
                       tmp_path / "bad.log")
    bad.start()
    st = _pump_chain(bad)
    assert st.status == "failed" and st.step == 2 and st.exit_code == 5
    assert st.last_line == "pip said no"
    assert "must not run" not in (tmp_path / "bad.log").read_text()


# -- the Blender side never imports torch --------------------------------------------------
def test_addon_import_and_register_never_import_torch(tmp_path):
    code = textwrap.dedent("""
        import sys
        import bpy
        import zeroavatar_blender
        zeroavatar_blender.register()
        from zeroavatar_blender.addon import client, jobs, operators, panels, preferences, properties
        zeroavatar_blender.unregister()
        bad = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "zeroavatar_blender.engine")))
        print("BAD", bad)
        sys.exit(1 if bad else 0)
    """)
    env = dict(os.environ, HOME=str(tmp_path), PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
