"""The H100 `full` runs as a picture for docs/BENCHMARKS.md: `python -m tests.benchmarks.plot_gpu_runs`.

Reads the event records in docs/gpu_runs (progress thinned to every 10th or 25th step) and draws
the loop's pace, ms a step over 100-step windows, for each run, beside the end-to-end parts of
the two dated runs. Needs matplotlib (in the dev environment; not an engine dependency).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tests.benchmarks.bench_full_gpu import step_windows

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "docs" / "gpu_runs"

# (label, events file, colour)
PACE = [("2026-11-26, eager (session 6)", "2026-11-26_h100_full_run_events.jsonl", "#999999"),
        ("2026-11-27, eager", "2026-11-27_h100_full_run_eager_events.jsonl", "#d95f02"),
        ("2026-11-27, CUDA graph (default)", "2026-11-27_h100_full_run_graphs_events.jsonl", "#1b9e77"),
        ("2026-11-27 (session 16), chunked grid, one process", "2026-11-27_h100_s16_one_process_events.jsonl", "#7570b3")]

# End-to-end parts in seconds, from docs/BENCHMARKS.md's H100 tables: the engine's process
# starts (and, in session 15's run, the gap between the benchmark's two processes), its start to
# the end of the first step, the loop (2026-11-26: with its 102 resumed steps), the finalise (and,
# in session 16's run, the last checkpoint and preview after the loop), perceive + fit on the
# 2-core build machine, and the FBX/glTF export (2.4 s on the 2-core build machine, session 16;
# none of the GPU runs exports, since that needs Blender: added to each row alike).
PARTS = ["process starts (benchmark)", "to the first step: load, build, distil", "optimisation loop", "finalise",
         "perceive + fit (CPU)", "export (CPU)"]
TOTALS = {"2026-11-26": [7.0, 16.4 + 7.4, 371.0, 80.5, 7.0, 2.4],
          "2026-11-27": [4.9 + 0.8 + 6.8, 27.1, 228.5, 27.3, 7.4, 2.4],
          "2026-11-27 s16": [4.9, 23.7, 217.8, 22.4, 7.4, 2.4]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "gallery" / "gpu_full_run_h100.png")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1.4, 1]})
    for label, name, colour in PACE:
        events = [json.loads(line) for line in (RUNS / name).read_text().splitlines() if line.strip()]
        rows = step_windows([e for e in events if e["type"] == "progress" and e.get("stage") == "optimise"], every=100)
        left.plot([r["mid_step"] for r in rows], [r["ms_per_step"] for r in rows], label=label, color=colour, lw=2)
    left.set_xlabel("optimisation step")
    left.set_ylabel("ms a step (100-step windows)")
    left.set_ylim(0, None)
    left.set_title("The loop's pace on one H100 (random-weight SD1.5 + ControlNet)")
    left.legend(loc="lower right", fontsize=8)
    left.grid(alpha=0.3)

    colours = ["#bbbbbb", "#7570b3", "#1b9e77", "#e6ab02", "#666666", "#a6761d"]
    names = list(TOTALS)
    for row, name in enumerate(names):
        x = 0.0
        for part, seconds, colour in zip(PARTS, TOTALS[name], colours):
            right.barh(row, seconds, left=x, color=colour, label=part if row == 0 else None)
            x += seconds
        right.text(x + 5, row, f"{x:.0f} s", va="center", bbox=dict(facecolor="white", edgecolor="none", pad=1))
    right.axvline(300, color="black", ls="--", lw=1)
    right.text(304, -0.55, "5-min goal", fontsize=8)
    right.set_yticks(range(len(names)), names)
    right.set_xlabel("seconds, end to end (default `full` run)")
    right.set_xlim(0, 700)
    right.set_ylim(-0.7, len(names) + 1.5)
    right.legend(loc="upper right", fontsize=7, framealpha=1.0)
    right.set_title("Where the time goes")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
