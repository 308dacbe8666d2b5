"""A default `full` run end to end on a GPU, with full-size random-weight SD1.5 + depth ControlNet:
`python -m tests.benchmarks.bench_full_gpu --job FITTED_JOB [--weights DIR] [--json OUT]`.

The run's speed does not depend on the weights' values, so the diffusion models are built from
SD1.5's and control_v11f1p_sd15_depth's configs (``bench_sds_gpu``) with random weights and saved
as diffusers folders (fp16, ~2.6 GB, once per ``--weights`` folder); the engine then loads them
through the same weight discovery users go through. ``FITTED_JOB`` is a job folder after `fit`
(any body); it is copied, so it can be reused. The engine runs as users run it
(the run's flags saved to the copy's job.json, then ``python -m zeroavatar_blender.engine resume
COPY``: optimise and finalise in one process, as ``generate`` runs them after the fit; no FBX/GLB
export: that needs Blender and is timed by the CPU benchmarks), and its event stream gives the
time per stage, SDS steps/s and peak GPU memory (``cuda_peak_mb`` of the ``done`` event).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tests.benchmarks.bench_sds_gpu import CLIP_L14_TEXT, SD15_CONTROLNET_DEPTH, SD15_UNET, SD_SCHEDULER, SD_VAE
from tests.engine.guidance.tiny_models import write_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def save_random_sd15(folder: Path, device: torch.device) -> tuple[Path, Path]:
    """Full-size random SD1.5 (diffusers pipeline folder) + depth ControlNet (model folder), fp16."""
    from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sd_dir, cn_dir = folder / "sd15", folder / "controlnet_depth"
    if (sd_dir / "model_index.json").is_file() and (cn_dir / "config.json").is_file():
        return sd_dir, cn_dir
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD15_UNET).half()
        controlnet = ControlNetModel(**SD15_CONTROLNET_DEPTH).half()
        vae = AutoencoderKL(**SD_VAE).half()
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L14_TEXT)).half()
    with tempfile.TemporaryDirectory() as tmp:  # a small BPE vocabulary: prompts still encode
        tokenizer = CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(Path(tmp))), local_files_only=True)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(sd_dir), safe_serialization=True)
    shutil.rmtree(sd_dir / "tokenizer")
    write_tiny_tokenizer(sd_dir / "tokenizer")
    controlnet.save_pretrained(str(cn_dir), safe_serialization=True)
    del pipe, unet, controlnet, vae, text_encoder
    torch.cuda.empty_cache() if device.type == "cuda" else None
    return sd_dir, cn_dir


def step_windows(progress: list[dict], every: int = 250) -> list[dict]:
    """The loop's pace through the run: for each window of ``every`` steps, its ms per step and
    what a step's cost follows (samples per ray, the grid's occupied share) at the window's end.
    A resumed run's first window after the restart is skipped (its clock restarted)."""
    rows, start = [], None
    for e in progress:
        if start is None or e["elapsed"] < start["elapsed"]:
            start = e
            continue
        if e["step"] // every > start["step"] // every:
            rows.append({"steps": f"{start['step']}-{e['step']}", "mid_step": 0.5 * (start["step"] + e["step"]),
                         "ms_per_step": round(1000 * (e["elapsed"] - start["elapsed"]) / (e["step"] - start["step"]), 1),
                         "samples_per_ray": e.get("samples_per_ray"), "occupied": e.get("occupied")})
            start = e
    return rows


def loop_timeline(events: list[dict]) -> dict:
    """Where an optimise stage's time went, from its events (the last run in the stream): the
    time to the first step (the models' load beside the problem build and distillation), the
    loop, its median step, and what the steps that also wrote a preview mesh or a checkpoint
    cost beyond a median step. A step's time is the gap to the progress event before it."""
    import statistics

    starts = [i for i, e in enumerate(events) if e["type"] == "stage" and e.get("stage") == "optimise"]
    if not starts:
        return {}
    run = events[starts[-1]:]
    gaps: dict[int, float] = {}
    writes: dict[int, set] = {}
    previous, pending = None, set()
    for e in run:
        if e["type"] == "progress" and e.get("stage") == "optimise":
            if previous is not None:
                gaps[e["step"]] = e["time"] - previous["time"]
                writes[e["step"]] = pending
            previous, pending = e, set()
        elif e["type"] in ("mesh", "checkpoint") and previous is not None:
            pending = pending | {e["type"]}
    progress = [e for e in run if e["type"] == "progress" and e.get("stage") == "optimise"]
    if len(progress) < 2:
        return {}
    plain = [g for s, g in gaps.items() if not writes[s]]
    median = statistics.median(plain) if plain else 0.0

    def extra(kind: str) -> float:
        steps = [s for s, w in writes.items() if kind in w]
        return round(sum(gaps[s] - median for s in steps), 2)

    return {"to_first_step_s": round(progress[0]["time"] - run[0]["time"], 2),
            "loop_s": round(progress[-1]["time"] - progress[0]["time"], 2),
            "median_step_ms": round(1000 * median, 1),
            "preview_extra_s": extra("mesh"), "checkpoint_extra_s": extra("checkpoint")}


def summarise(events: list[dict]) -> dict:
    """Stage wall times, optimisation steps/s and memory from a job's events."""
    from zeroavatar_blender.evaluation.benchmark import stage_seconds

    out: dict = {"stages_s": stage_seconds(events)}
    progress = [e for e in events if e["type"] == "progress" and e.get("stage") == "optimise"]
    if len(progress) >= 2:
        a, b = progress[0], progress[-1]
        if b["time"] > a["time"]:
            out["optimise_steps_per_s"] = (b["step"] - a["step"]) / (b["time"] - a["time"])
        out["last_step"] = b["step"]
        out["total_steps"] = b.get("total")
        out["windows"] = step_windows(progress)
        out["timeline"] = loop_timeline(events)
    dones = [e for e in events if e["type"] == "done"]  # one per engine process (optimise, finalise)
    for key in ("cuda_peak_mb", "cuda_reserved_peak_mb", "peak_rss_mb"):
        values = [e[key] for e in dones if key in e]
        if values:
            out[key] = max(values)
    if dones:
        out["status"] = [e["status"] for e in dones]
    out["meshes_streamed"] = sum(1 for e in events if e["type"] == "mesh")
    distilled = [e["message"] for e in events if e["type"] == "message" and "initialised from the body" in e["message"]]
    if distilled:
        out["distill_message"] = distilled[0]
    out["messages"] = [e["message"] for e in events if e["type"] in ("message", "stage")][:30]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--job", type=Path, required=True, help="a job folder after `fit`")
    p.add_argument("--weights", type=Path, default=Path(tempfile.gettempdir()) / "zeroavatar_random_sd15")
    p.add_argument("--steps", type=int, default=None, help="optimisation steps (default: full's default)")
    p.add_argument("--timeout", type=float, default=540, help="seconds before the run is stopped (then "
                   "the time of a whole run is extrapolated from the steps made)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="OptimiseConfig override passed to the engine (e.g. tf32=true)")
    p.add_argument("--keep", type=Path, default=None, help="copy the run's job folder here afterwards")
    p.add_argument("--prepare-only", action="store_true", help="only build and save the random weights")
    p.add_argument("--allow-cpu", action="store_true",
                   help="check the script without CUDA (give --weights a folder of small models and few --steps)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("bench_full_gpu needs a CUDA GPU; none is visible to torch here.", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    sd_dir, cn_dir = save_random_sd15(args.weights, torch.device("cuda" if cuda else "cpu"))
    weights_s = time.perf_counter() - t0
    if args.prepare_only:
        print(f"weights in {sd_dir} and {cn_dir} ({weights_s:.1f} s)")
        return 0
    work = Path(tempfile.mkdtemp(prefix="za_full_"))
    job = work / "job"
    shutil.copytree(args.job, job, ignore=shutil.ignore_patterns("checkpoints", "meshes", "result", "exports"))
    settings = json.loads((job / "job.json").read_text())
    settings["export"] = False
    (job / "job.json").write_text(json.dumps(settings, indent=1))
    (job / "events.jsonl").unlink(missing_ok=True)

    # the run's settings go into job.json through the engine's own argument handling, then one
    # `resume` process optimises and finalises, as `generate` does after the fit (two processes
    # would add a second start, ~7 s on the H100 machine, that users never wait for)
    from zeroavatar_blender.engine.cli import _settings_from_args, build_parser
    from zeroavatar_blender.engine.job import Job
    from zeroavatar_blender.engine.pipeline import JobSettings

    flags = ["--quality", "full", "--device", "cuda" if cuda else "cpu", "--allow-slow", "--sd-weights", str(sd_dir),
             "--controlnet-weights", str(cn_dir)]
    flags += ["--steps", str(args.steps)] if args.steps is not None else []
    flags += [f for item in args.set for f in ("--set", item)]
    run_job = Job(job)
    _settings_from_args(build_parser().parse_args(["optimise", str(job), *flags]), JobSettings.load(run_job)).save(run_job)
    command = [sys.executable, "-m", "zeroavatar_blender.engine", "resume", str(job), "--progress", "lines"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    print("running:", " ".join(command), "with", " ".join(flags), flush=True)
    started = time.perf_counter()
    rc, timed_out = None, False
    proc = subprocess.Popen(command, env=env)
    try:
        rc = proc.wait(timeout=max(args.timeout, 1))
    except subprocess.TimeoutExpired:  # as a user's cancel: the engine checkpoints and says so
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        rc, timed_out = None, True
    wall = time.perf_counter() - started
    events = [json.loads(line) for line in (job / "events.jsonl").read_text().splitlines() if line.strip()]
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "weights_build_s": weights_s,
              "returncode": rc, "timed_out": timed_out, "wall_s": wall, **summarise(events)}
    if timed_out and result.get("optimise_steps_per_s") and result.get("total_steps"):
        left = result["total_steps"] - result["last_step"]
        result["extrapolated_total_s"] = wall + left / result["optimise_steps_per_s"]
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.keep:
        shutil.copytree(job, args.keep, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("checkpoints", "*.pt"))
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
