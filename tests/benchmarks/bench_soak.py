"""Soak test: many short jobs back to back in ONE engine process (`batch`), watching for leaks.

    python -m tests.benchmarks.bench_soak --jobs 50 [--write-docs]

Runs ``cli.main(["batch", ...])`` on copies of a few synthetic photos (fast quality, no export),
so the body model and the detector load once and are reused, as in a studio batch. After each
job the batch collects garbage, trims the heap and records the process's resident memory (VmRSS)
and open file descriptors in batch.json; this prints them job by job, their growth after the
first (warm-up) job, and whether every result is a complete bundle. ``--write-docs`` puts the
figures into docs/BENCHMARKS.md (its own "## Soak test" section only; ``--from-json`` reuses an
earlier run's ``--json``). tests/engine/test_soak.py runs the short form in CI.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "BENCHMARKS.md"
START, END = "<!-- bench:soak:start -->", "<!-- bench:soak:end -->"
HEADING = "## Soak test"
SUBJECTS = ("standing_f", "walking_m", "arms_raised_f")


@dataclass
class JobSample:
    """One job of the batch, as its job folder tells it."""

    index: int
    job: str
    code: int
    seconds: float  # started -> done
    rss_mb: float  # VmRSS after the job (batch.json: after the batch's between-job clean-up)
    open_fds: int  # /proc/self/fd after the job
    complete: bool  # done ok, and result/ loads as a whole, checked bundle
    problem: str = ""


def make_photos(folder: Path, n: int, subjects: tuple[str, ...] = SUBJECTS, size: int = 256) -> list[Path]:
    """``n`` photo files cycling through a few synthetic subjects (rendered once each)."""
    from PIL import Image

    from zeroavatar_blender.engine.body import load_body
    from zeroavatar_blender.evaluation.synthetic import default_subjects, make_case

    folder.mkdir(parents=True, exist_ok=True)
    body = load_body("anny")
    specs = {s.name: s for s in default_subjects()}
    distinct = []
    for name in subjects:
        spec = specs[name]
        spec.size = size
        path = folder / f"subject_{name}.png"
        Image.fromarray(make_case(body, spec).photo).save(path)
        distinct.append(path)
    photos = []
    for i in range(n):
        dst = folder / f"soak_{i:03d}.png"
        shutil.copyfile(distinct[i % len(distinct)], dst)
        photos.append(dst)
    return photos


def run_soak(photos: list[Path], out: Path, extra_args: tuple[str, ...] = ()) -> tuple[int, list[JobSample]]:
    """Run the batch in this process; (exit code, one sample per job). Signal handlers that the
    engine installs for its cancel are put back afterwards."""
    from zeroavatar_blender.engine import cli

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = cli.main(["batch", *map(str, photos), "--out", str(out), "--no-export", "--progress", "none",
                         *extra_args])
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    return code, read_samples(out)


def read_samples(out: Path) -> list[JobSample]:
    from zeroavatar_blender import protocol
    from zeroavatar_blender.engine.avatar import AvatarBundle
    from zeroavatar_blender.engine.errors import EngineError

    summary = json.loads((out / "batch.json").read_text())["jobs"]
    samples = []
    for i, item in enumerate(summary):
        root = out / item["job"]
        events = list(protocol.iter_events(root / "events.jsonl"))
        started = next((e for e in events if e["type"] == "started"), None)
        done = next((e for e in reversed(events) if e["type"] == "done"), None)
        problem = ""
        if done is None or started is None:
            problem = "no started/done event"
        elif done.get("status") != "ok":
            problem = f"status {done.get('status')}: " + "; ".join(e.get("message", "") for e in events
                                                                   if e["type"] == "error")
        else:
            try:
                AvatarBundle.load(root / "result")
            except EngineError as exc:
                problem = f"incomplete result: {exc}"
            if (root / "result.partial").exists():
                problem = problem or "a result.partial folder was left behind"
        samples.append(JobSample(
            i, item["job"], int(item["code"]),
            round(done["time"] - started["time"], 2) if done and started else float("nan"),
            float(item.get("rss_mb", float("nan"))), int(item.get("open_fds", -1)), not problem, problem))
    return samples


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 for fewer than two points)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def growth(samples: list[JobSample], warmup: int = 1) -> dict[str, float]:
    """Memory and file-descriptor growth after ``warmup`` jobs (model loading, first-call caches).

    rss_growth_mb / fd_growth: the largest rise over the value at the end of the warm-up;
    rss_slope_mb_per_job: the trend over the remaining jobs (a leak shows as a steady slope).
    """
    after = samples[warmup - 1:] if warmup > 0 else samples
    base = after[0]
    rest = after[1:] or after
    return {
        "jobs": len(samples),
        "rss_first_mb": samples[0].rss_mb,
        "rss_after_warmup_mb": base.rss_mb,
        "rss_last_mb": samples[-1].rss_mb,
        "rss_growth_mb": round(max(s.rss_mb for s in rest) - base.rss_mb, 1),
        "rss_slope_mb_per_job": round(_slope([s.index for s in after], [s.rss_mb for s in after]), 3),
        "fds_after_warmup": base.open_fds,
        "fd_growth": max(s.open_fds for s in rest) - base.open_fds,
        "seconds_per_job": round(sum(s.seconds for s in samples[warmup:] or samples)
                                 / max(1, len(samples[warmup:] or samples)), 2),
        "complete": sum(s.complete for s in samples),
    }


def report(samples: list[JobSample], stats: dict[str, float], wall: float) -> list[str]:
    import torch

    cpu = platform.processor() or platform.machine()
    lines = [
        f"_Generated by `python -m tests.benchmarks.bench_soak --jobs {len(samples)}` on "
        f"{time.strftime('%Y-%m-%d')}: {cpu}, {_cores()} cores, torch {torch.__version__}, quality fast, "
        f"no export, {len(SUBJECTS)} synthetic 256 px photos cycled, one `batch` process._",
        "",
        "| jobs | complete | wall s | s/job after warm-up | RSS after job 1 MB | RSS last MB | max RSS rise after job 1 MB "
        "| RSS trend MB/job | open fds after job 1 | max fd rise |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {stats['jobs']} | {stats['complete']}/{stats['jobs']} | {wall:.0f} | {stats['seconds_per_job']} "
        f"| {stats['rss_after_warmup_mb']} | {stats['rss_last_mb']} | {stats['rss_growth_mb']} "
        f"| {stats['rss_slope_mb_per_job']} | {stats['fds_after_warmup']} | {stats['fd_growth']} |",
        "",
        "RSS (MB) after each job (the batch collects garbage and trims the heap between jobs): "
        + ", ".join(f"{s.rss_mb:.0f}" for s in samples) + ".",
        "",
        "Open file descriptors after each job: " + ", ".join(str(s.open_fds) for s in samples) + ".",
        "",
        "RSS trend: the least-squares slope over jobs 1 to N; max rise: the largest RSS after a later job "
        "minus the RSS after job 1 (the first job loads the body model and the detector).",
    ]
    failed = [s for s in samples if not s.complete]
    if failed:
        lines += ["", "**Incomplete jobs:** " + "; ".join(f"{s.job}: {s.problem}" for s in failed)]
    return lines


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)


def write_docs(lines: list[str], path: Path = DOCS) -> None:
    """Replace this benchmark's section of BENCHMARKS.md (between its markers), or append it."""
    block = "\n".join([START, "", *lines, "", END])
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n{HEADING}\n\n" + block + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--work", type=Path, default=None, help="folder for photos and jobs (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the samples and figures as JSON")
    parser.add_argument("--write-docs", action="store_true", help="update the Soak test section of docs/BENCHMARKS.md")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="report (and --write-docs) the figures of an earlier run's --json instead of running")
    parser.add_argument("--note", default="", help="a sentence to add under the table (e.g. how busy the machine was)")
    args = parser.parse_args(argv)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        samples = [JobSample(**s) for s in saved["samples"]]
        stats, wall, code, work = growth(samples), float(saved["wall_s"]), 0, None
    else:
        work = args.work or Path(tempfile.mkdtemp(prefix="zeroavatar_soak_"))
        photos = make_photos(work / "photos", args.jobs)
        started = time.time()
        code, samples = run_soak(photos, work / "jobs")
        wall = time.time() - started
        stats = growth(samples)
    print(f"{'job':>4} {'code':>4} {'s':>7} {'RSS MB':>8} {'fds':>4}  complete")
    for s in samples:
        print(f"{s.index:4d} {s.code:4d} {s.seconds:7.2f} {s.rss_mb:8.1f} {s.open_fds:4d}  "
              f"{'yes' if s.complete else 'NO: ' + s.problem}")
    print(json.dumps(stats, indent=1))
    lines = report(samples, stats, wall)
    if args.note:
        lines += ["", args.note]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"stats": stats, "wall_s": wall,
                                         "samples": [s.__dict__ for s in samples]}, indent=1))
    if args.write_docs:
        write_docs(lines)
    if work is not None and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if code == 0 and stats["complete"] == len(samples) else 1


if __name__ == "__main__":
    sys.exit(main())
