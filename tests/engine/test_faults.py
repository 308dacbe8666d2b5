"""Faults the engine must survive: SIGKILL mid-run, two engines on one job, cancel by signal."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zeroavatar_blender import protocol

ROOT = Path(__file__).resolve().parents[2]
TINY = {"n_levels": 6, "log2_hashmap_size": 12, "max_resolution": 128, "n_samples": 24, "ref_resolution": 64,
        "ref_rays": 256, "novel_resolution": 24, "distill_steps": 100, "mesh_every": 3, "mesh_resolution": 32,
        "checkpoint_every": 3}


def engine(*args: str) -> list[str]:
    cmd = [sys.executable, "-m", "zeroavatar_blender.engine", *args, "--progress", "none"]
    return cmd


def tiny_set() -> list[str]:
    out = []
    for k, v in TINY.items():
        out += ["--set", f"{k}={json.dumps(v)}"]
    return out


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


@pytest.fixture(scope="module")
def photo(tmp_path_factory, anny_body) -> Path:
    from zeroavatar_blender.evaluation.synthetic import default_subjects, make_case, save_case

    spec = next(s for s in default_subjects() if s.name == "walking_m")
    spec.size = 256
    return save_case(make_case(anny_body, spec), tmp_path_factory.mktemp("faults") / "case") / "photo.png"


def wait_for(events_path: Path, predicate, proc: subprocess.Popen, timeout: float = 300) -> dict:
    tail = protocol.JsonlTail(events_path)
    deadline = time.time() + timeout
    while time.time() < deadline:
        for event in tail.read(protocol.EVENT_TYPES):
            if predicate(event):
                return event
        if proc.poll() is not None:
            for event in tail.read(protocol.EVENT_TYPES):
                if predicate(event):
                    return event
            raise AssertionError(f"engine exited ({proc.returncode}) before the awaited event")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for an event")


def test_sigkill_then_resume_gives_a_complete_result(photo, tmp_path):
    job = tmp_path / "job"
    kill_at = random.Random(7).randint(4, 10)
    proc = subprocess.Popen(engine("generate", str(photo), "--out", str(job), "--quality", "standard", "--steps", "14",
                                   "--no-export", *tiny_set()), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(job / "events.jsonl", lambda e: e["type"] == "progress" and e["stage"] == "optimise"
                 and e["step"] >= kill_at, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (job / "result").exists()  # nothing that looks like a result
    assert (job / "engine.lock").exists()  # a stale lock from the dead process
    rc = subprocess.run(engine("resume", str(job)), env=env(), timeout=600).returncode
    assert rc == protocol.EXIT_OK
    events = list(protocol.iter_events(job / "events.jsonl"))
    resumed = [e for e in events if e["type"] == "message" and e["message"].startswith("Resuming from step")]
    assert resumed, "the resume did not start from a checkpoint"
    step = int(resumed[-1]["message"].split()[3])
    assert step >= kill_at - TINY["checkpoint_every"]  # lost at most one checkpoint interval
    assert (job / "result" / "avatar.json").exists()
    from zeroavatar_blender.engine.avatar import AvatarBundle

    bundle = AvatarBundle.load(job / "result")
    assert bundle.meta["quality"] == "standard" and bundle.meta["optimised_steps"] == 14


def test_second_engine_on_a_busy_job_is_refused_and_sigterm_cancels(photo, tmp_path):
    job = tmp_path / "job"
    proc = subprocess.Popen(engine("generate", str(photo), "--out", str(job), "--quality", "standard", "--steps", "400",
                                   "--no-export", *tiny_set()), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(job / "events.jsonl", lambda e: e["type"] == "progress" and e["stage"] == "optimise", proc)
        second = subprocess.run(engine("finalise", str(job)), env=env(), capture_output=True, text=True, timeout=120)
        assert second.returncode == protocol.EXIT_BUSY
        assert "in use" in second.stderr
        proc.send_signal(signal.SIGTERM)  # e.g. Blender quitting: a cooperative cancel with a checkpoint
        assert proc.wait(120) == protocol.EXIT_CANCELLED
    finally:
        if proc.poll() is None:
            proc.kill()
    events = list(protocol.iter_events(job / "events.jsonl"))
    assert events[-1]["type"] == "done" and events[-1]["status"] == "cancelled"
    assert any(e["type"] == "checkpoint" for e in events)
    assert not (job / "engine.lock").exists()


def test_batch_goes_on_after_a_bad_photo(photo, tmp_path):
    bad = tmp_path / "not a photo.jpg"
    bad.write_text("hello")
    out = tmp_path / "batch"
    heights = tmp_path / "heights.csv"  # the good photo's height by its file name; the bad one is not listed
    heights.write_text(f"photo,height_m\n{photo.name},1.9\n")
    rc = subprocess.run(engine("batch", str(bad), str(photo), "--out", str(out), "--no-export", "--heights",
                               str(heights)), env=env(), timeout=600).returncode
    assert rc == protocol.EXIT_BAD_INPUT
    summary = json.loads((out / "batch.json").read_text())["jobs"]
    assert [s["code"] for s in summary] == [protocol.EXIT_BAD_INPUT, protocol.EXIT_OK]
    assert [s["height_m"] for s in summary] == [None, 1.9]
    assert (out / summary[1]["job"] / "result" / "avatar.json").exists()
    assert not (out / summary[0]["job"] / "result").exists()
    fit = json.loads((out / summary[1]["job"] / "fit.json").read_text())
    assert abs(fit["metrics"]["height_m"] - 1.9) < 0.01
