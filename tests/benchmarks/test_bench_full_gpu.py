"""The GPU run's summary, checked on an event stream made here (the run itself needs CUDA)."""

from __future__ import annotations

from tests.benchmarks.bench_full_gpu import step_windows


def _progress(step: int, elapsed: float, spr: float) -> dict:
    return {"type": "progress", "stage": "optimise", "step": step, "elapsed": elapsed, "samples_per_ray": spr,
            "occupied": spr / 100}


def test_step_windows_follow_the_pace_and_skip_a_resume_restart():
    events = [_progress(s, 0.1 * s, 20.0) for s in range(1, 501)]  # 100 ms a step
    events += [_progress(s, 0.2 * (s - 500), 40.0) for s in range(501, 751)]  # resumed: clock restarts, 200 ms
    rows = step_windows(events, every=250)
    assert [r["steps"] for r in rows] == ["1-250", "250-500", "501-750"]
    assert [r["ms_per_step"] for r in rows] == [100.0, 100.0, 200.0]
    assert rows[-1]["samples_per_ray"] == 40.0 and rows[-1]["occupied"] == 0.4
