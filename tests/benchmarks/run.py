"""`python3 build.py bench [--quick]`: the ground-truth benchmark and the results gallery.

Generates the synthetic set (cached), runs every quality mode that can run on this machine on
every case, writes the tables into docs/BENCHMARKS.md (between markers) and gallery PNGs into
docs/gallery/. Exits non-zero if any case failed: a missing result is reported, never skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
START, END = "<!-- bench:quality:start -->", "<!-- bench:quality:end -->"
QUICK_CASES = ("standing_f", "half_body_m", "skirt_f")


def available_qualities() -> list[str]:
    import torch

    qualities = ["fast", "standard"]
    if torch.cuda.is_available():
        try:
            from zeroavatar_blender.engine.guidance.weights import find_guidance_weights

            find_guidance_weights()
            qualities.append("full")
        except Exception as exc:  # noqa: BLE001 - say why full is not measured
            print(f"full quality not measured: {str(exc).splitlines()[0]}")
    else:
        print("full quality not measured: no CUDA GPU on this machine")
    return qualities


def fmt(v: float | None, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}"


def table(results: list, garment: bool) -> list[str]:
    rows = [r for r in results if (r.garment is not None) == garment]
    if not rows:
        return []
    head = ("| case | quality | MPJPE mm | PA-MPJPE mm | Chamfer cm | NC | F@1cm | F@2cm | front PSNR | "
            "front SSIM | side PSNR | back PSNR | back SSIM | side IoU | back IoU | time s | peak MB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        m = r.metrics
        if not r.ok:
            lines.append(f"| {r.case} | {r.quality} | **FAILED**: {r.error} |" + " |" * 14)
            continue
        lines.append(
            f"| {r.case} | {r.quality} | {fmt(m.get('mpjpe_mm'), 1)} | {fmt(m.get('pa_mpjpe_mm'), 1)} | "
            f"{fmt(m.get('chamfer_cm'))} | {fmt(m.get('normal_consistency'), 3)} | {fmt(m.get('fscore_1cm'), 3)} | "
            f"{fmt(m.get('fscore_2cm'), 3)} | {fmt(m.get('front_psnr'), 1)} | {fmt(m.get('front_ssim'), 3)} | "
            f"{fmt(m.get('side_psnr'), 1)} | {fmt(m.get('back_psnr'), 1)} | {fmt(m.get('back_ssim'), 3)} | "
            f"{fmt(m.get('side_iou'), 3)} | {fmt(m.get('back_iou'), 3)} | {fmt(r.seconds.get('total'), 1)} | "
            f"{fmt(r.memory.get('peak_rss_mb'), 0)} |")
    return lines


def summary(results: list) -> list[str]:
    keys = ("mpjpe_mm", "chamfer_cm", "fscore_2cm", "front_psnr", "side_psnr", "back_psnr", "back_ssim")
    lines = ["| set | quality | cases | " + " | ".join(keys) + " | mean time s |",
             "|" + "---|" * (len(keys) + 4)]
    for garment in (False, True):
        for quality in dict.fromkeys(r.quality for r in results):
            rows = [r for r in results if r.quality == quality and (r.garment is not None) == garment and r.ok]
            if not rows:
                continue
            means = [np.nanmean([r.metrics.get(k, np.nan) for r in rows]) for k in keys]
            t = np.mean([r.seconds.get("total", np.nan) for r in rows])
            name = "garments" if garment else "painted clothes"
            lines.append(f"| {name} | {quality} | {len(rows)} | " + " | ".join(fmt(v) for v in means) + f" | {fmt(t, 1)} |")
    return lines


def gallery(case_dir: Path, jobs: dict[str, Path], out: Path) -> Path:
    """Rows: the input photo and the ground-truth front/side/back renders; then, per quality, the
    avatar rendered at the same cameras (after the similarity alignment the metrics use)."""
    from PIL import Image

    size = 256

    def tile(path: Path) -> np.ndarray:
        if not path.exists():
            return np.full((size, size, 3), 255, np.uint8)
        return np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR))

    rows = [np.concatenate([tile(case_dir / "photo.png")] +
                           [tile(case_dir / "views" / f"{v}_rgb.png") for v in ("front", "side", "back")], 1)]
    for job in jobs.values():
        blank = np.full((size, size, 3), 255, np.uint8)
        rows.append(np.concatenate([blank] + [tile(job / "eval" / f"{v}.png") for v in ("front", "side", "back")], 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, 0)).save(out, optimize=True)
    return out


def write_report(results: list, machine: dict, quick: bool, path: Path, steps: int | None = None) -> None:
    command = "python3 build.py bench --quick" if quick else "python3 build.py bench"
    if steps is not None and not quick:
        command = f"python -m tests.benchmarks.run --steps {steps}"
    body = [START, "",
            f"_Generated by `{command}` on {machine['date']}: "
            f"{machine['cpu']} ({machine['cores']} cores), device {machine['device']}, torch {machine['torch']}._",
            "", "Means over cases (painted-clothes subjects and garment subjects separately):", "", *summary(results), "",
            "### Painted-clothes subjects", "", *table(results, False), "",
            "### Subjects with garments (skirt, puffy jacket, long hair, hat + backpack)", "", *table(results, True), "",
            "Metrics: MPJPE after pelvis alignment and PA-MPJPE of the 17 COCO joints; Chamfer (point-to-surface, "
            "both ways, mean), normal consistency and F-score after a similarity ICP of the posed avatar onto the "
            "ground-truth outer surface (both in the photo camera's frame); PSNR/SSIM of unlit textured renders "
            "at the ground-truth cameras against the ground-truth renders (inside the union of both masks) and "
            "mask IoU. `fast` is the bare fitted body with the photo's texture: the floor the optimiser must beat.",
            "", END]
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if START in text and END in text:
        text = text[:text.index(START)] + "\n".join(body) + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n## Quality on the synthetic ground-truth set\n\n" + "\n".join(body) + "\n"
    path.write_text(text)


def merged_results(previous: Path, new: list) -> list:
    """The last run's results with the (case, quality) pairs in ``new`` replaced, in the last
    run's order (new pairs at the end): rerunning one case after a fix that only touches it."""
    from zeroavatar_blender.evaluation.benchmark import CaseResult

    if not previous.exists():
        return new
    fresh = {(r.case, r.quality): r for r in new}
    old = [CaseResult(**d) for d in json.loads(previous.read_text())["results"]]
    out = [fresh.pop((r.case, r.quality), r) for r in old]
    return out + list(fresh.values())


def subject_height(case_dir: Path) -> float:
    """The ground-truth subject's standing height in metres (its Anny body's rest height)."""
    import torch

    from tests.benchmarks.bench_fit_shape import true_height
    from zeroavatar_blender.engine.body import load_body

    shape = json.loads((case_dir / "gt.json").read_text())["spec"]["shape"]
    return true_height(load_body("anny"), torch.tensor(shape, dtype=torch.float64))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_CASES)}, standard with fewer steps")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_output")
    parser.add_argument("--cases", nargs="*", default=None)
    parser.add_argument("--qualities", nargs="*", default=None)
    parser.add_argument("--steps", type=int, default=None, help="optimisation steps for standard/full")
    parser.add_argument("--no-docs", action="store_true", help="do not touch docs/")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other cases' rows of the last run (OUT/results.json) and replace only these")
    parser.add_argument("--known-height", action="store_true",
                        help="give the engine each subject's true standing height (generate --height), as a user "
                             "who knows it would; rows QUALITY+height in OUT/results_height.json, docs untouched")
    args = parser.parse_args(argv)
    if args.known_height:
        args.no_docs = True

    from zeroavatar_blender.engine.body import load_body
    from zeroavatar_blender.evaluation.benchmark import machine_description, run_case
    from zeroavatar_blender.evaluation.synthetic import default_subjects, generate_set

    subjects = default_subjects()
    names = args.cases or (list(QUICK_CASES) if args.quick else [s.name for s in subjects])
    subjects = [s for s in subjects if s.name in names]
    started = time.time()
    print(f"ground truth: {len(subjects)} cases in {args.out / 'gt'}", flush=True)
    folders = generate_set(load_body("anny"), args.out / "gt", subjects)
    qualities = args.qualities or available_qualities()
    steps = args.steps or (150 if args.quick else None)
    results = []
    for folder in folders:
        jobs = {}
        extra, variant = [], ""
        if args.known_height:
            extra, variant = ["--height", f"{subject_height(folder):.4f}"], "height"
        for quality in qualities:
            r = run_case(folder, args.out / "jobs", quality, steps=None if quality == "fast" else steps,
                         extra_args=extra, variant=variant)
            results.append(r)
            jobs[quality] = args.out / "jobs" / f"{folder.name}_{quality}"
            status = "ok" if r.ok else f"FAILED ({r.error})"
            print(f"{folder.name:16s} {quality:8s} {status} {json.dumps(r.metrics)} {r.seconds.get('total', 0):.1f}s", flush=True)
        if not args.no_docs:
            if args.merge:  # the qualities this run did not redo stay in the picture, in the table's order
                kept = {q: args.out / "jobs" / f"{folder.name}_{q}" for q in available_qualities()}
                jobs = {q: jobs.get(q, kept[q]) for q in kept if q in jobs or (kept[q] / "eval").is_dir()}
            gallery(folder, jobs, DOCS / "gallery" / f"{folder.name}.png")
    machine = machine_description()
    name = "results_height.json" if args.known_height else "results.json"
    if args.merge:
        results = merged_results(args.out / name, results)
    (args.out / name).write_text(json.dumps({"machine": machine, "results": [r.__dict__ for r in results]}, indent=1))
    if args.known_height:
        print("\n".join(summary(results)))
    if not args.no_docs:
        write_report(results, machine, args.quick, DOCS / "BENCHMARKS.md", steps)
    failed = [r for r in results if not r.ok]
    print(f"{len(results) - len(failed)}/{len(results)} runs ok in {time.time() - started:.0f} s")
    for r in failed:
        print(f"FAILED {r.case} {r.quality}: {r.error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
