"""The GPU run's summary, checked on an event stream made here, and the benchmark's whole path
(fitted job -> one engine process -> summary) on the CPU with tiny diffusion models."""

from __future__ import annotations

import json

from tests.benchmarks.bench_full_gpu import loop_timeline, main, step_windows
from tests.conftest import TINY


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


def test_loop_timeline_splits_the_run_and_charges_previews_and_checkpoints():
    """10 s to the first step, then 100 ms steps; the step that wrote a preview took 0.5 s more,
    the one that wrote a checkpoint 0.3 s more. An earlier run in the stream is ignored."""
    events = [{"type": "stage", "stage": "optimise", "time": 0.0},
              {"type": "progress", "stage": "optimise", "step": 1, "time": 1.0}]  # an earlier run
    t = 100.0
    events.append({"type": "stage", "stage": "optimise", "time": t})
    t += 10.0
    for step in range(1, 101):
        t += 0.1 + (0.5 if step == 40 else 0.0) + (0.3 if step == 80 else 0.0)
        if step in (40, 80):  # written after the step before it, so charged to this step
            events.append({"type": "mesh" if step == 40 else "checkpoint", "time": t - 0.05})
        events.append({"type": "progress", "stage": "optimise", "step": step, "time": t})
    tl = loop_timeline(events)
    assert tl["to_first_step_s"] == 10.1
    assert tl["loop_s"] == 10.7  # 99 gaps of 0.1 s, plus 0.5 and 0.3
    assert tl["median_step_ms"] == 100.0
    assert tl["preview_extra_s"] == 0.5 and tl["checkpoint_extra_s"] == 0.3
    assert loop_timeline([{"type": "stage", "stage": "fit", "time": 0.0}]) == {}


def test_the_benchmark_runs_optimise_and_finalise_in_one_engine_process(fitted_job, tmp_path):
    """What a GPU session relies on, at a size a CPU affords: the flags reach the copy's job.json,
    one `resume` process optimises and finalises, and the summary has the stages and timeline."""
    from tests.engine.guidance.tiny_models import make_layouts

    layouts = make_layouts(tmp_path / "weights")
    out = tmp_path / "summary.json"
    args = ["--job", str(fitted_job), "--allow-cpu", "--weights", str(layouts.sd_dir.parent), "--steps", "3",
            "--json", str(out), "--timeout", "600"]
    args += [a for k, v in {**TINY, "sds_resolution": 64}.items() for a in ("--set", f"{k}={v}")]
    assert main(args) == 0
    summary = json.loads(out.read_text())
    assert summary["status"] == ["ok"]  # one engine process: one done event
    assert summary["last_step"] == 3 and summary["meshes_streamed"] >= 2
    assert summary["stages_s"]["optimise"] > 0 and summary["stages_s"]["finalise"] > 0
    assert summary["timeline"]["loop_s"] > 0
    assert not list(fitted_job.glob("checkpoints/*.pt")) and not (fitted_job / "result").exists()  # left as it was
