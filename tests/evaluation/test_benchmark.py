"""The benchmark's bookkeeping: no silent skips, times from this run only."""

from __future__ import annotations

import json

import numpy as np
import pytest

from zeroavatar_blender import protocol
from zeroavatar_blender.engine.cameras import Camera, intrinsics
from zeroavatar_blender.evaluation.benchmark import MissingOutputError, evaluate_job, last_run, stage_seconds


def _ev(kind: str, t: float, **k) -> dict:
    return {"type": kind, "time": t, **k}


def test_times_come_from_the_newest_run_of_a_reused_job_folder():
    old = [_ev("started", 0.0), _ev("stage", 1.0, stage="fit"), _ev("done", 500.0)]
    new = [_ev("started", 1000.0), _ev("stage", 1001.0, stage="perceive"), _ev("stage", 1002.0, stage="fit"),
           _ev("stage", 1006.0, stage="texture"), _ev("done", 1008.0)]
    seconds = stage_seconds(last_run(old + new))
    assert seconds == {"perceive": 1.0, "fit": 4.0, "finalise": 2.0, "total": 8.0}
    assert last_run([]) == []


def _fake_case(tmp_path):
    case = tmp_path / "case"
    case.mkdir()
    camera = Camera(intrinsics(4, 4), np.eye(4), 4, 4)
    (case / "gt.json").write_text(json.dumps({"camera": camera.to_json()}))
    return case


@pytest.mark.parametrize("what", ["nothing", "empty ply", "no bundle"])
def test_a_missing_or_empty_output_is_refused_not_skipped(tmp_path, what):
    job = tmp_path / "job"
    layout = protocol.JobLayout(job)
    job.mkdir()
    if what != "nothing":
        (job / "fit.json").write_text("{}")
        (job / "exports").mkdir()
        (job / "exports" / "avatar_posed.ply").write_bytes(b"" if what == "empty ply" else b"ply\n")
        if what == "empty ply":
            (job / "result").mkdir()
            (job / "result" / "avatar.json").write_text("{}")
    assert layout.root == job
    with pytest.raises(MissingOutputError, match="missing or empty"):
        evaluate_job(job, _fake_case(tmp_path))
