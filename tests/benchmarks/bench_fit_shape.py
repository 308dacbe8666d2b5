"""Body-shape benchmark of the fit on the ground-truth photo set: `python -m tests.benchmarks.bench_fit_shape`.

Refits the saved perceptions of the benchmark photos (``bench_output/jobs/CASE_fast/perception.npz``,
made by `python -m tests.benchmarks.run`, ground truth in ``bench_output/gt/CASE``) with the
engine's default lens, as the benchmark's engine runs do, and prints per case: the fit's silhouette
IoU, MPJPE (mid-hip aligned) and PA-MPJPE of the 17 COCO joints, PVE (mean vertex error after a
similarity alignment of the posed fitted body onto the bare ground-truth body, same Anny topology),
shape PVE (the same for both bodies in the natural pose: shape alone), the young start the fit
kept ("adult" when it kept its first fit; ``FitConfig.young_starts``) and the true and fitted
phenotypes. ``--set NAME=VALUE`` overrides a FitConfig field, for tuning (``--set
shape_pre_iterations=0 shape_post_iterations=0`` is the fit without its shape refinement).
``--known-height`` gives each fit the true body's standing height, as a user who knows it would
(``generate --height``); the rows then show what the photo's size ambiguity costs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from typing import Any

import numpy as np
import torch

from zeroavatar_blender.engine.body.base import BodyModel
from zeroavatar_blender.engine.fit import FitConfig

ROOT = Path(__file__).resolve().parents[2]
GARMENTS = ("skirt_f", "jacket_m", "hair_f", "hat_backpack_m")  # masks that include clothes or hair
CASES = ("standing_f", "walking_m", "arms_raised_f", "kick_m", "crouch_f", "sitting_m", "half_body_m", "tpose_heavy",
         "hips_teen", "waving_old", "stride_tall", "contra_short", "skirt_f", "jacket_m", "hair_f", "hat_backpack_m")


def aligned_vertex_error(pred: np.ndarray, true: np.ndarray) -> float:
    """Mean distance (same units) after the least-squares similarity of ``pred`` onto ``true``: (V,3), (V,3)."""
    from zeroavatar_blender.evaluation.metrics import umeyama

    s, R, t = umeyama(pred, true)
    return float(np.linalg.norm(s * pred @ R.T + t - true, axis=1).mean())


def natural_vertices(body: BodyModel, shape: torch.Tensor) -> np.ndarray:
    """The body of phenotypes ``shape`` (1,S) in the prior's natural pose, unturned: (V,3)."""
    from zeroavatar_blender.engine import pose_prior as P

    p = body.zero_params()
    p.pose = P.body_prior(body).mean[None].clone()
    p.shape = shape.to(p.shape.dtype).reshape(1, -1)
    with torch.no_grad():
        return body.forward(p).vertices[0].double().numpy()


def true_height(body: BodyModel, shape: torch.Tensor) -> float:
    """Standing (rest-pose) height in metres of the body of phenotypes ``shape`` (S,)."""
    from zeroavatar_blender.engine.body.base import rest_height

    p = body.zero_params()
    p.shape = shape.to(p.shape.dtype).reshape(1, -1)
    with torch.no_grad():
        return float(rest_height(body.forward(p).rest_vertices)[0])


def evaluate_case(body: BodyModel, case_dir: Path, perception_path: Path, config: FitConfig, seed: int = 0,
                  save: Path | None = None, known_height: bool = False) -> dict[str, Any]:
    """Fit one case's saved perception and measure it against the ground truth."""
    from zeroavatar_blender.engine.cameras import Camera
    from zeroavatar_blender.engine.fit import fit_body
    from zeroavatar_blender.engine.perception import Perception
    from zeroavatar_blender.evaluation.metrics import mpjpe, pa_mpjpe

    meta = json.loads((case_dir / "gt.json").read_text())
    gt_cam = Camera.from_json(meta["camera"])
    perception = Perception.load(perception_path)
    true_shape = torch.tensor(meta["spec"]["shape"], dtype=torch.float64)
    height = true_height(body, true_shape)
    cpu = time.process_time()
    fit = fit_body(perception, body, seed=seed, config=config, height_m=height if known_height else None)
    cpu = time.process_time() - cpu
    if save is not None:
        fit.save(save)
    kp_gt = gt_cam.to_cam(np.asarray(meta["keypoints3d"], np.float64))
    kp_fit = np.asarray(fit.keypoints3d_cam, np.float64)
    with torch.no_grad():
        verts = body.forward(fit.params).vertices[0].double().numpy()
    true_v = np.load(case_dir / "body_mesh.npz")["vertices"].astype(np.float64)
    return {
        "iou": float(fit.metrics["silhouette_iou"]),
        "mpjpe_mm": 1000 * mpjpe(kp_fit, kp_gt, np.array([11, 12])),
        "pa_mpjpe_mm": 1000 * pa_mpjpe(kp_fit, kp_gt),
        "pve_mm": 1000 * aligned_vertex_error(gt_cam.to_cam(verts), gt_cam.to_cam(true_v)),
        "shape_pve_mm": 1000 * aligned_vertex_error(natural_vertices(body, fit.params.shape),
                                                     natural_vertices(body, true_shape)),
        "height_true_m": height,
        "height_fit_m": float(fit.metrics["height_m"]),
        "shape_true": [round(float(v), 3) for v in true_shape],
        "shape_fit": [round(float(v), 3) for v in fit.params.shape[0]],
        "cpu_s": cpu,
        "age_start": fit.metrics.get("age_start"),  # the young start the fit kept (FitConfig.young_starts)
    }


def _override(config: FitConfig, items: list[str]) -> FitConfig:
    fields = {f.name: f for f in dataclasses.fields(config)}
    changes = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in fields:
            raise SystemExit(f"unknown FitConfig field {name!r}")
        kind = type(getattr(config, name))
        if kind is tuple:
            changes[name] = tuple(v for v in value.split(",") if v)
        elif kind is bool:
            changes[name] = value.lower() in ("1", "true", "yes")
        else:
            changes[name] = kind(value)
    return dataclasses.replace(config, **changes)


def main(argv: list[str] | None = None) -> int:
    from zeroavatar_blender.engine.body import load_body

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench_output", help="the benchmark's output folder")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="FitConfig overrides")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--seed", type=int, default=0, help="the fit's seed (the mask pixels it samples)")
    ap.add_argument("--save", type=Path, default=None, help="write each fit to SAVE/CASE.json")
    ap.add_argument("--known-height", action="store_true", help="give each fit the true standing height")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    config = _override(FitConfig(), args.set)
    body = load_body("anny")
    names = body.shape_names
    print(f"phenotypes: {', '.join(names)}; PVE after a similarity alignment; times are CPU seconds on one thread")
    print(f"{'case':15s} {'IoU':>6s} {'MPJPE':>6s} {'PA':>6s} {'PVE':>6s} {'sPVE':>6s} {'weight':>11s} "
          f"{'height m':>11s} {'cpu s':>6s} {'start':>5s}  true -> fitted phenotypes")
    rows = {}
    w = names.index("weight")
    warm = args.out / "jobs" / f"{args.cases.split(',')[0]}_fast" / "perception.npz"
    if warm.exists():  # the prior and vertex-subset caches, outside the timings
        from zeroavatar_blender.engine.fit import fit_body
        from zeroavatar_blender.engine.perception import Perception

        fit_body(Perception.load(warm), body, iterations=2, config=config)
    for name in args.cases.split(","):
        perception = args.out / "jobs" / f"{name}_fast" / "perception.npz"
        case_dir = args.out / "gt" / name
        if not perception.exists() or not (case_dir / "gt.json").exists():
            print(f"{name:15s} MISSING: run `python -m tests.benchmarks.run` first ({perception})")
            return 1
        if args.save:
            args.save.mkdir(parents=True, exist_ok=True)
        m = evaluate_case(body, case_dir, perception, config, seed=args.seed,
                          save=args.save / f"{name}.json" if args.save else None, known_height=args.known_height)
        rows[name] = m
        print(f"{name:15s} {m['iou']:6.3f} {m['mpjpe_mm']:6.1f} {m['pa_mpjpe_mm']:6.1f} {m['pve_mm']:6.1f} "
              f"{m['shape_pve_mm']:6.1f} {m['shape_true'][w]:5.2f}/{m['shape_fit'][w]:<5.2f} "
              f"{m['height_true_m']:5.2f}/{m['height_fit_m']:<5.2f} {m['cpu_s']:6.2f} "
              f"{'adult' if m['age_start'] is None else m['age_start']:>5}  "
              f"{m['shape_true']} -> {m['shape_fit']}", flush=True)
    keys = ("iou", "mpjpe_mm", "pa_mpjpe_mm", "pve_mm", "shape_pve_mm", "cpu_s")
    mean = {k: float(np.mean([r[k] for r in rows.values()])) for k in keys}
    mean["height_error_cm"] = float(np.mean([100 * abs(r["height_fit_m"] - r["height_true_m"]) for r in rows.values()]))
    err = np.abs(np.array([r["shape_fit"] for r in rows.values()]) - np.array([r["shape_true"] for r in rows.values()]))
    print(f"{'mean':15s} {mean['iou']:6.3f} {mean['mpjpe_mm']:6.1f} {mean['pa_mpjpe_mm']:6.1f} {mean['pve_mm']:6.1f} "
          f"{mean['shape_pve_mm']:6.1f} {'':11s} {mean['height_error_cm']:8.1f} cm {mean['cpu_s']:6.2f}")
    print("mean |fitted - true| per phenotype: " + ", ".join(f"{n} {e:.3f}" for n, e in zip(names, err.mean(0))))
    bare = [i for i, case in enumerate(rows) if case not in GARMENTS]
    if bare and len(bare) < len(rows):
        spve = np.mean([r["shape_pve_mm"] for case, r in rows.items() if case not in GARMENTS])
        print(f"  without garments ({len(bare)} cases): shape PVE {spve:.1f} mm; |fitted - true| "
              + ", ".join(f"{n} {e:.3f}" for n, e in zip(names, err[bare].mean(0))))
    if args.json:
        args.json.write_text(json.dumps({"config": dataclasses.asdict(config), "rows": rows, "mean": mean}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
