"""How well the detector's 3D keypoints know limb depth: `python -m tests.benchmarks.bench_detector_depth`.

On the benchmark photos' saved perceptions (``bench_output/jobs/CASE_fast/perception.npz``, from
`python -m tests.benchmarks.run`) against the ground truth (``bench_output/gt/CASE``), and the
fast job's fit (``fit.json``): for every limb bone tilted more than 5 cm out of the image plane in
the truth, whether the detector and the fit put its child joint on the right side, and each one's
mean hip-relative depth error over the 17 joints. This is what the fit's tilt term
(fit_losses.tilt_terms) rests on: the side, not the amount.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
BONES = ((5, 7), (7, 9), (6, 8), (8, 10), (11, 13), (13, 15), (12, 14), (14, 16), (5, 11), (6, 12))


def hip_relative_depth(kp: np.ndarray) -> np.ndarray:
    return kp[:, 2] - kp[[11, 12], 2].mean()


def main(argv: list[str] | None = None) -> int:
    from zeroavatar_blender.engine.cameras import Camera
    from zeroavatar_blender.engine.perception import Perception

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench_output", help="the benchmark's output folder")
    args = ap.parse_args(argv)
    total = detector_right = fit_right = 0
    print(f"{'case':15s} {'bones':>5s} {'detector':>8s} {'fit':>4s} {'depth err detector / fit cm':>28s}")
    for case_dir in sorted(p for p in (args.out / "gt").iterdir() if (p / "gt.json").exists()):
        job = args.out / "jobs" / f"{case_dir.name}_fast"
        meta = json.loads((case_dir / "gt.json").read_text())
        truth = Camera.from_json(meta["camera"]).to_cam(np.asarray(meta["keypoints3d"], np.float64))
        fit = np.asarray(json.loads((job / "fit.json").read_text())["keypoints3d_cam"], np.float64)
        detector = Perception.load(job / "perception.npz").keypoints3d
        if detector is None:
            print(f"{case_dir.name:15s} no 3D keypoints (perception.npz from before version 2): rerun the benchmark")
            continue
        n = d_ok = f_ok = 0
        for a, b in BONES:
            true_dz = truth[b, 2] - truth[a, 2]
            if abs(true_dz) < 0.05:
                continue
            n += 1
            d_ok += np.sign(detector[b, 2] - detector[a, 2]) == np.sign(true_dz)
            f_ok += np.sign(fit[b, 2] - fit[a, 2]) == np.sign(true_dz)
        err_d = np.abs(hip_relative_depth(detector) - hip_relative_depth(truth)).mean() * 100
        err_f = np.abs(hip_relative_depth(fit) - hip_relative_depth(truth)).mean() * 100
        print(f"{case_dir.name:15s} {n:5d} {d_ok:8d} {f_ok:4d} {err_d:14.1f} / {err_f:.1f}")
        total, detector_right, fit_right = total + n, detector_right + d_ok, fit_right + f_ok
    print(f"right side: detector {detector_right} of {total}, fit {fit_right} of {total}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
