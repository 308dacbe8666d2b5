"""Where an optimisation step's time goes: `python -m tests.benchmarks.profile_step --job FITTED_JOB`.

Builds the optimiser exactly as a run does (``build_problem``, ``Optimiser``, body distillation)
on a copy of a fitted job, runs ``--warmup`` steps, then times ``--steps`` steps (rounded up to
whole occupancy-grid refresh periods, 16 steps) twice: once with
a per-part wall-clock breakdown (reference-view render, novel-view render, the novel views' body
render (made in the step on a CPU, waited for on a GPU, novel_views.py), SDS,
body prior; the device is synchronised around each part, so the parts add up), once under
``torch.profiler`` for the top operators. For `full`, pass the weights as for the engine
(``--sd-weights``/``--controlnet-weights``; ``bench_full_gpu.save_random_sd15`` makes full-size
random ones). Works on the CPU too (slowly), which is how the script itself is checked.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch


REST = "rest (losses, backward, Adam, read-backs)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(name: str, fn, totals: dict[str, float], device: torch.device):
    def wrapper(*a, **k):
        _sync(device)
        t = time.perf_counter()
        with torch.profiler.record_function(name):
            out = fn(*a, **k)
        _sync(device)
        totals[name] += time.perf_counter() - t
        return out
    return wrapper


# ATen ops that make the host wait for the device on CUDA: a result size known only on the device
# (nonzero: boolean indexing, masked_select, repeat_interleave without output_size) or a value
# read back (.item(), int(), bool(), float() of a tensor). They dispatch on the CPU too, so
# ``host_waits_by_line`` counts them without a GPU; .tolist() and .cpu() read-backs do not
# dispatch on the CPU and are missing there (on CUDA, ``count_cuda_syncs`` counts everything).
SYNC_OPS = ("aten::nonzero", "aten::_local_scalar_dense", "aten::unique", "aten::_unique2")


def _part_of(event, parts: set[str], default: str) -> tuple[str, bool]:
    """(the step part an event ran in, whether it was called from another ATen op)."""
    part, parent, nested = default, event.cpu_parent, False
    while parent is not None:
        nested |= parent.name.startswith("aten::")
        if parent.name in parts:
            part = parent.name
        parent = parent.cpu_parent
    return part, nested


def launches_by_part(events, parts: set[str]) -> dict[str, int]:
    """Top-level ATen ops (not called from another ATen op) by the step part they ran in."""
    counts: dict[str, int] = defaultdict(int)
    for e in events:
        if not e.name.startswith("aten::"):
            continue
        part, nested = _part_of(e, parts, REST)
        if not nested:
            counts[part] += 1
    return dict(counts)


def host_waits_by_line(fn) -> dict[str, int]:
    """The calls in ``fn()`` on this thread that wait for the device on a GPU (``SYNC_OPS`` and
    boolean-mask indexing, which runs nonzero inside), by the engine's innermost code line."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    counts: dict[str, int] = defaultdict(int)

    def boolean_index(args) -> bool:
        idx = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
        return any(getattr(a, "dtype", None) == torch.bool for a in idx)

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.name().split(".")[0]
            if name in SYNC_OPS or name == "aten::masked_select" or (name.startswith("aten::index") and boolean_index(args)):
                stack = traceback.extract_stack()
                if not any("/torch/optim/" in f.filename for f in stack):
                    frames = [f for f in stack if "zeroavatar_blender" in f.filename]
                    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "torch"
                    counts[f"{name} at {where}"] += 1
            return func(*args, **(kwargs or {}))

    with Watch():
        fn()
    return dict(counts)


def count_cuda_syncs(fn) -> int:
    """Synchronising CUDA calls made by ``fn()``, as torch's sync debug mode reports them."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def main(argv: list[str] | None = None) -> int:
    from zeroavatar_blender.engine import optimise as opt_mod
    from zeroavatar_blender.engine.job import Job
    from zeroavatar_blender.engine.pipeline import JobSettings, resolve_device

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--job", type=Path, required=True)
    p.add_argument("--quality", choices=("standard", "full"), default="standard")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--at-step", type=float, default=0.5, help="profile as if at this fraction of the run "
                   "(schedules such as the novel-view size depend on it)")
    p.add_argument("--sd-weights", default=None)
    p.add_argument("--controlnet-weights", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="OptimiseConfig override")
    p.add_argument("--views-ahead", action="store_true",
                   help="make the novel views on a thread a step ahead, as a GPU run does (the default on CUDA)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="za_profile_")) / "job"
    shutil.copytree(args.job, work, ignore=shutil.ignore_patterns("checkpoints", "meshes", "result", "exports"))
    job = Job(work)
    job.open()
    settings = JobSettings.load(job)
    settings.quality, settings.device = args.quality, args.device
    settings.sd_weights, settings.controlnet_weights = args.sd_weights, args.controlnet_weights
    settings.extra["allow_slow_full"] = True  # a few steps of `full` on the CPU check this script
    device = resolve_device(settings.device)
    config = opt_mod.OptimiseConfig.for_quality(args.quality, device, None, settings.seed)
    for item in args.set:  # e.g. the CUDA speed knobs: tf32=true, grid_blend=sum, channels_last=true
        key, value = item.split("=", 1)
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        config = dataclasses.replace(config, **{key: parsed})
    guidance = prompts = None
    if args.quality == "full":
        guidance, prompts = opt_mod.load_guidance(job, settings, device, config)
    variant = {k: getattr(config, k) for k in opt_mod.LATER_SETTINGS}
    problem, _, _ = opt_mod.build_problem(job, settings, config)
    opt = opt_mod.Optimiser(job, problem, guidance, prompts)
    if args.views_ahead and not opt.views.ahead:
        from zeroavatar_blender.engine.novel_views import NovelViews

        opt.views.close()
        opt.views = NovelViews(problem, opt.views.resolution, ahead=True)
    dev = torch.device(device)
    t = time.perf_counter()
    opt.initialise()
    _sync(dev)
    init_s = time.perf_counter() - t
    opt.step = int(args.at_step * config.steps)

    totals: dict[str, float] = defaultdict(float)
    renders = {"n": 0}
    plain_render = opt.renderer.render

    def render(field, rays, **k):  # the first render of a step is the reference view
        renders["n"] += 1
        name = "render_reference" if renders["n"] % (1 + config.novel_views) == 1 else "render_novel"
        return _timed(name, plain_render, totals, dev)(field, rays, **k)

    opt.renderer.render = render
    # the body render at the novel views: made there and then on a CPU run, waited for on a GPU run
    opt.views.get = _timed("novel_views", opt.views.get, totals, dev)
    from zeroavatar_blender.engine.field import body_prior as body_prior_mod  # train_step imports it per call

    body_prior_mod.prior_loss = _timed("body_prior", body_prior_mod.prior_loss, totals, dev)
    opt.renderer.update = _timed("grid_update", opt.renderer.update, totals, dev)
    if guidance is not None:
        opt.guidance = _timed("sds", opt.guidance, totals, dev)

    for _ in range(args.warmup):
        opt.train_step()
    # The occupancy grid is refreshed every `update_every` steps (~0.4 s a refresh on the 2-core
    # CPU): time whole periods, so the refresh is counted at its true per-step share.
    every = max(1, opt.renderer.config.occupancy.update_every)
    steps = -(-args.steps // every) * every
    totals.clear()
    _sync(dev)
    t = time.perf_counter()
    for _ in range(steps):
        opt.train_step()
    _sync(dev)
    step_s = (time.perf_counter() - t) / steps
    parts = {k: v / steps for k, v in totals.items()}
    parts[REST] = step_s - sum(parts.values())
    print(f"{args.quality} on {device} ({variant}), {steps} steps up to step {opt.step} of {config.steps}: "
          f"{1000 * step_s:.1f} ms per step "
          f"({1 / step_s:.2f} steps/s); distillation {init_s:.1f} s")
    for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {k:45s} {1000 * v:8.1f} ms  {100 * v / step_s:5.1f} %")

    activities = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiled = max(1, args.steps // 4)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(profiled):
            opt.train_step()
        _sync(dev)
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    print(averages.table(sort_by=key, row_limit=25))
    ops = launches_by_part(prof.events(), set(totals))
    print(f"top-level ATen ops per step (each at least one kernel launch on a GPU): "
          f"{sum(ops.values()) / profiled:.0f}")
    for k, v in sorted(ops.items(), key=lambda kv: -kv[1]):
        print(f"  {k:45s} {v / profiled:8.0f}")
    waits = host_waits_by_line(opt.train_step)
    print(f"host waits in one step on the main thread, by code line (Adam's CPU step counters left out): "
          f"{sum(waits.values())}")
    for k, v in sorted(waits.items(), key=lambda kv: -kv[1]):
        print(f"  {v:3d}  {k}")
    cuda_syncs = None
    if dev.type == "cuda":  # the device's own count, read-backs included
        cuda_syncs = count_cuda_syncs(opt.train_step)
        print(f"CUDA synchronisations in one step (torch.cuda sync debug mode): {cuda_syncs}")
    busy = None
    if dev.type == "cuda":  # kernel time per step against the unprofiled step: the rest the GPU waits on Python
        kernel_s = kernel_seconds(averages, set(totals)) / profiled
        busy = kernel_s / step_s
        print(f"GPU busy {100 * busy:.0f} % of a step ({1000 * kernel_s:.1f} ms of kernels in {1000 * step_s:.1f} ms)")
    if args.json:
        args.json.write_text(json.dumps({"quality": args.quality, "device": device, "step_ms": 1000 * step_s,
                                         "parts_ms": {k: 1000 * v for k, v in parts.items()},
                                         "distill_s": init_s, "gpu_busy_share": busy, "variant": variant,
                                         "aten_ops_per_step": {k: v / profiled for k, v in ops.items()},
                                         "cuda_syncs_per_step": cuda_syncs, "host_waits_by_line": waits, "config": dataclasses.asdict(config)},
                                        indent=1, default=str))
    opt.close()
    return 0


def kernel_seconds(averages, skip: set[str]) -> float:
    """GPU kernel time in a profile's averages, each kernel once. An ATen op's row also carries
    its kernels' time as its own "self" device time, so summing every row counted it twice (the
    2026-11-27 H100 profile read "GPU busy 112 %"); ``skip``: the parts' own ranges."""
    from torch.autograd import DeviceType

    return sum(e.self_device_time_total for e in averages
               if e.device_type == DeviceType.CUDA and e.key not in skip) / 1e6


if __name__ == "__main__":
    sys.exit(main())
