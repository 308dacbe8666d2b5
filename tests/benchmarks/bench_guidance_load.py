"""How long loading SD1.5 + the depth ControlNet takes, with and without accelerate's empty-weight
model building: `python -m tests.benchmarks.bench_guidance_load [--weights DIR] [--rounds N]`.

Full-size random weights (``bench_full_gpu.save_random_sd15``: fp16 diffusers folders, ~2.6 GB,
made once per ``--weights`` folder) go through the engine's own discovery and loader. The
baseline is the loader as it was without accelerate (``low_cpu_mem_usage=False``: diffusers first
fills every weight at random, then reads the file over it); both run in this process,
alternating, so disk cache and machine load are shared. Loading is part of every `full` run's
wall time (16.4 s of the H100 run of 2026-11-26, before accelerate).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def _load_once(weights, device: str, baseline: bool) -> float:
    from zeroavatar_blender.engine.guidance import weights as weights_mod

    plain = weights_mod.init_kwargs
    if baseline:
        weights_mod.init_kwargs = lambda: {"low_cpu_mem_usage": False}
    try:
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        pipe = weights_mod.load_guidance_pipeline(weights, device)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
    finally:
        weights_mod.init_kwargs = plain
    del pipe
    gc.collect()
    return seconds


def main(argv: list[str] | None = None) -> int:
    from tests.benchmarks.bench_full_gpu import save_random_sd15
    from zeroavatar_blender.engine.guidance.weights import find_guidance_weights, init_kwargs

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, default=Path(tempfile.gettempdir()) / "zeroavatar_random_sd15")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if init_kwargs():
        print("accelerate is not installed: nothing to compare (pip install accelerate)")
        return 1
    t = time.perf_counter()
    sd_dir, cn_dir = save_random_sd15(args.weights, torch.device(args.device))
    print(f"random full-size weights ready in {time.perf_counter() - t:.0f} s: {sd_dir}, {cn_dir}")
    weights = find_guidance_weights(str(sd_dir), str(cn_dir))
    _load_once(weights, args.device, baseline=False)  # warm the disk cache and the imports
    times: dict[str, list[float]] = {"random init (baseline)": [], "accelerate (empty init)": []}
    for _ in range(args.rounds):
        times["random init (baseline)"].append(_load_once(weights, args.device, baseline=True))
        times["accelerate (empty init)"].append(_load_once(weights, args.device, baseline=False))
    base = statistics.median(times["random init (baseline)"])
    print(f"{platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"device {args.device}{' ' + torch.cuda.get_device_name() if args.device == 'cuda' else ''}")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"  {name:26s} median {med:6.1f} s  ({', '.join(f'{v:.1f}' for v in values)})  "
              f"ratio to baseline {med / base:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"device": args.device, "seconds": times}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
