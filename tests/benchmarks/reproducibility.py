"""Two runs with the same seed must agree: `python -m tests.benchmarks.reproducibility [--cases ...]`.

Runs each (case, quality) twice through the real command line into separate job folders and
compares every metric of the two evaluations. The evaluation issue's bar: every geometric metric
within 1 % (relative). Prints a table, writes it into docs/BENCHMARKS.md between markers (unless
``--no-docs``) and exits 1 when a geometric metric differs by 1 % or more.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
START, END = "<!-- bench:repro:start -->", "<!-- bench:repro:end -->"
GEOMETRIC = ("mpjpe_mm", "pa_mpjpe_mm", "fit_iou", "chamfer_cm", "normal_consistency", "fscore_1cm", "fscore_2cm",
             "front_iou", "side_iou", "back_iou")
TOLERANCE = 0.01


def relative_difference(a: float, b: float) -> float:
    """|a - b| relative to their magnitude (0 when both are 0)."""
    scale = max(abs(a), abs(b))
    return 0.0 if scale == 0 else abs(a - b) / scale


def compare(m1: dict[str, float], m2: dict[str, float]) -> dict[str, float]:
    """Relative difference per metric present in both runs."""
    return {k: relative_difference(m1[k], m2[k]) for k in m1 if k in m2}


def write_docs(lines: list[str], path: Path) -> None:
    text = path.read_text()
    block = "\n".join([START, *lines, END])
    if START in text and END in text:
        text = text[:text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n## Reproducibility\n\n" + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    from zeroavatar_blender.engine.body import load_body
    from zeroavatar_blender.evaluation.benchmark import machine_description, run_case
    from zeroavatar_blender.evaluation.synthetic import default_subjects, generate_set

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="*", default=["standing_f", "skirt_f"])
    p.add_argument("--qualities", nargs="*", default=["fast", "standard"])
    p.add_argument("--steps", type=int, default=150, help="optimisation steps for standard")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "bench_output")
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args(argv)

    subjects = [s for s in default_subjects() if s.name in args.cases]
    folders = generate_set(load_body("anny"), args.out / "gt", subjects)
    rows, worst = [], 0.0
    for folder in folders:
        for quality in args.qualities:
            steps = None if quality == "fast" else args.steps
            runs = [run_case(folder, args.out / f"repro_{i}", quality, steps=steps, seed=args.seed) for i in (1, 2)]
            failed = [r for r in runs if not r.ok]
            if failed:
                print(f"FAILED {folder.name} {quality}: {failed[0].error}", file=sys.stderr)
                return 1
            diff = compare(runs[0].metrics, runs[1].metrics)
            geo = max((diff[k] for k in GEOMETRIC if k in diff), default=0.0)
            other = max((v for k, v in diff.items() if k not in GEOMETRIC), default=0.0)
            worst = max(worst, geo)
            key = max((k for k in GEOMETRIC if k in diff), key=lambda k: diff[k])
            rows.append(f"| {folder.name} | {quality} | {100 * geo:.3f} % ({key}) | {100 * other:.3f} % | "
                        f"{runs[0].metrics['chamfer_cm']:.4f} / {runs[1].metrics['chamfer_cm']:.4f} |")
            print(rows[-1], flush=True)
    m = machine_description()
    lines = ["", f"_`python -m tests.benchmarks.reproducibility --cases {' '.join(args.cases)} --qualities "
             f"{' '.join(args.qualities)} --steps {args.steps}` on {m['date']}, {m['cpu']}, device {m['device']}:"
             f" each case run twice with seed {args.seed} through the command line._", "",
             "| case | quality | largest geometric difference | largest other difference (PSNR, SSIM) | Chamfer cm, run 1 / run 2 |",
             "|---|---|---|---|---|", *rows, "",
             f"Bar: every geometric metric within {100 * TOLERANCE:.0f} %. "
             f"{'Met' if worst < TOLERANCE else 'NOT met'}: largest {100 * worst:.3f} %.", ""]
    if not args.no_docs:
        write_docs(lines, ROOT / "docs" / "BENCHMARKS.md")
    print("\n".join(lines))
    return 0 if worst < TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
