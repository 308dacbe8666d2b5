"""``python -m zeroavatar_blender.engine``: the engine as a command-line program.

    generate PHOTO --out JOB     the whole pipeline: perceive, fit, [optimise], finalise, export
    fit PHOTO --out JOB          perception and body fit only (writes fit.json and a body preview)
    optimise JOB                 field optimisation (quality standard/full), reads pose_edit.json
    finalise JOB                 the rigged avatar bundle and its exports
    resume JOB                   continue an interrupted job from its last checkpoint
    batch PHOTO... --out DIR     many photos in one process (one job folder each, models loaded once)
    check [--prepare]            what this machine can run (body model, GPU, weights); --prepare builds
                                 the first-use items (Anny cache, nerfacc's GPU ray marcher) now

Exit codes are protocol.EXIT_*; every run appends JSON events to JOB/events.jsonl.
"""

from __future__ import annotations

import argparse
import csv
import errno
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Callable

from .. import __version__, protocol
from .errors import BadInputError, EngineError
from .job import Job, install_signal_cancel, output_error
from .pipeline import QUALITIES, JobSettings, subject_name


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", choices=("auto", "bar", "lines", "json", "none"), default="auto",
                   help="terminal output: a progress bar (auto on a terminal), log lines, JSON events, or nothing")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="where to optimise (default auto)")


def _add_photo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("photo", type=Path, help="photo of one person (JPEG, PNG, ...)")
    p.add_argument("--out", type=Path, required=True, help="job folder to create (or reuse)")
    from .body import BODY_CHOICES

    p.add_argument("--body", choices=BODY_CHOICES, default="anny",
                   help="parametric body: anny (default, free, offline) or smpl/smplx (your own model file)")
    p.add_argument("--body-model-path", default=None, help="SMPL/SMPL-X model file (.npz, or .pkl) or folder")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow loading a .pkl body model you trust with Python's pickle (default: safe loader)")
    p.add_argument("--person", type=int, default=None,
                   help="which person in a group photo, 1 = leftmost (default: the largest)")
    _add_height_arg(p)
    p.add_argument("--seed", type=int, default=0)


def _add_lods_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lods", type=int, default=None, choices=range(0, 4), metavar="{0..3}",
                   help="levels of detail in the Unity FBX (exports/avatar.fbx): NAME_LOD0..N, each half the "
                        "triangles of the one before; Unity makes a LOD Group of them (default 0)")


def _add_height_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--height", type=float, default=None, metavar="METRES",
                   help="the person's standing height, if you know it (e.g. 1.75): the avatar gets it, and the fit "
                        "the right distance (default: estimated, since a photo cannot tell size from distance)")


def _add_optimise_args(p: argparse.ArgumentParser, default_quality: str | None) -> None:
    p.add_argument("--quality", choices=QUALITIES, default=default_quality,
                   help="fast: textured body; standard: field optimisation without diffusion (CPU, minutes); "
                        "full: ZeroAvatar with Stable Diffusion + depth ControlNet (needs the weights, a GPU)")
    p.add_argument("--steps", type=int, default=None, help="optimisation steps (default depends on quality)")
    p.add_argument("--prompt", default=None, help="text prompt for full quality (default: describes a person)")
    p.add_argument("--sd-weights", default=None, help="Stable Diffusion 1.5 weights: HF repo id in your cache, folder or .safetensors")
    p.add_argument("--controlnet-weights", default=None, help="depth ControlNet: HF repo id in your cache, folder or .safetensors")
    p.add_argument("--texture-size", type=int, default=None, choices=(512, 1024, 2048, 4096))
    p.add_argument("--allow-slow", action="store_true", help="run quality full without a GPU (hours)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="advanced: override an optimisation setting (see OptimiseConfig), e.g. --set n_samples=96")


def _add_reuse_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow Python's pickle for the job's .pkl body model, which you trust (never taken "
                        "from job.json: a job folder may come from elsewhere)")
    _add_common(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m zeroavatar_blender.engine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"zeroavatar {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("generate", help="photo -> rigged, textured avatar (whole pipeline)")
    _add_photo_args(p)
    _add_optimise_args(p, "fast")
    p.add_argument("--no-export", action="store_true", help="write the avatar bundle only (no FBX/GLB)")
    _add_lods_arg(p)
    _add_common(p)
    p = sub.add_parser("fit", help="perception and body fit only")
    _add_photo_args(p)
    _add_common(p)
    p = sub.add_parser("optimise", aliases=["optimize"], help="optimise the field of a fitted job")
    p.add_argument("job", type=Path)
    _add_optimise_args(p, None)
    _add_reuse_args(p)
    p = sub.add_parser("finalise", aliases=["finalize"], help="build the avatar bundle and exports of a job")
    p.add_argument("job", type=Path)
    p.add_argument("--no-export", action="store_true")
    _add_lods_arg(p)
    _add_reuse_args(p)
    p = sub.add_parser("resume", help="continue an interrupted job from its last checkpoint")
    p.add_argument("job", type=Path)
    _add_reuse_args(p)
    p = sub.add_parser("batch", help="many photos, one job folder each under --out")
    p.add_argument("photos", type=Path, nargs="+", help="photos, or folders of photos")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--body", choices=("anny", "smpl", "smplx"), default="anny")
    p.add_argument("--body-model-path", default=None)
    p.add_argument("--allow-pickle", action="store_true")
    _add_height_arg(p)
    p.add_argument("--heights", type=Path, default=None, metavar="CSV",
                   help="each person's standing height: a CSV of `photo file name,metres` rows (photos it does not "
                        "list take --height, or are estimated)")
    p.add_argument("--seed", type=int, default=0)
    _add_optimise_args(p, "fast")
    p.add_argument("--no-export", action="store_true")
    _add_lods_arg(p)
    _add_common(p)
    p = sub.add_parser("check", help="what this machine can run, before a photo is spent on it")
    p.add_argument("--quality", choices=QUALITIES, default="fast", help="the exit code says whether this one can run")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--body", choices=("anny", "smpl", "smplx"), default="anny")
    p.add_argument("--body-model-path", default=None)
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--sd-weights", default=None)
    p.add_argument("--controlnet-weights", default=None)
    p.add_argument("--allow-slow", action="store_true", help="count quality full as runnable on the CPU")
    p.add_argument("--prepare", action="store_true",
                   help="build the Anny cache and nerfacc's CUDA ray marcher now, not in the first run")
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON")
    return parser


def run_check(args: argparse.Namespace) -> int:
    from .setup_check import prepare, run_checks

    try:
        if args.prepare:
            prepare(args.body, args.device, lambda text: print(text, file=sys.stderr, flush=True))
        report = run_checks(device=args.device, body=args.body, body_model_path=args.body_model_path,
                            allow_pickle=args.allow_pickle, sd_weights=args.sd_weights,
                            controlnet_weights=args.controlnet_weights, allow_slow=args.allow_slow)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)  # the message, then its hint
        return exc.code
    print("\n".join(report.lines()))
    if args.json is not None:
        from .job import atomic_write_json

        try:
            atomic_write_json(args.json, report.to_json())
        except (OSError, EngineError) as exc:
            print(f"error: cannot write {args.json}: {exc}", file=sys.stderr)
            return protocol.EXIT_IO
    return report.exit_code(args.quality)


def _settings_from_args(args: argparse.Namespace, settings: JobSettings) -> JobSettings:
    for name in ("body", "body_model_path", "allow_pickle", "seed", "quality", "steps", "prompt", "sd_weights",
                 "controlnet_weights", "texture_size", "device", "lods"):
        value = getattr(args, name, None)
        if value is not None and value is not False:
            setattr(settings, name, value)
    height = getattr(args, "height", None)
    if height is not None:
        settings.height_m = checked_height(height)
    if getattr(args, "person", None) is not None:
        if args.person < 1:
            raise BadInputError(f"--person {args.person}: people are numbered from 1 (leftmost)", "use --person 1, 2, ...")
        settings.person = args.person - 1
    if getattr(args, "no_export", False):
        settings.export = False
    if getattr(args, "allow_slow", False):
        settings.extra["allow_slow_full"] = True
    overrides = dict(settings.extra.get("optimise_overrides") or {})
    for item in getattr(args, "set", None) or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BadInputError(f"--set {item!r}: expected KEY=VALUE", "e.g. --set n_samples=96")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    if overrides:
        settings.extra["optimise_overrides"] = overrides
    return settings


HEIGHT_RANGE_M = (0.5, 2.6)


def checked_height(height: float) -> float:
    """A standing height in metres, or BadInputError naming the unit mistake it most likely is."""
    lo, hi = HEIGHT_RANGE_M
    if not lo <= height <= hi:  # NaN fails too
        hint = (f"the height is in metres: --height {height / 100:.2f}" if 50 <= height <= 260 else
                f"give the standing height in metres, between {lo} and {hi}")
        raise BadInputError(f"--height {height:g} is not a person's height in metres", hint)
    return float(height)


def settings_for_existing_job(args: argparse.Namespace, settings: JobSettings) -> JobSettings:
    """A job's saved settings with this command's overrides. The full-unpickler opt-in is the one
    setting never taken from job.json: it must come from the user running this command."""
    settings.allow_pickle = False
    return _settings_from_args(args, settings)


def _resources() -> dict[str, float]:
    """Peak and current memory and open files of this engine process (and the GPU's peak when one
    was used): for benchmarks, and so a batch's soak test can see leaks job by job."""
    out: dict[str, float] = {}
    try:
        import resource

        out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    except (ImportError, OSError):
        pass
    out.update(_process_now())
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        # what the card must hold: the caching allocator's reserve, CUDA-graph pools included
        out["cuda_reserved_peak_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    return out


def _process_now() -> dict[str, float]:
    """Resident memory (MB) and open file descriptors of this process now; Linux only (elsewhere
    an empty dict)."""
    out: dict[str, float] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_mb"] = round(int(line.split()[1]) / 1024, 1)
        out["open_fds"] = len(os.listdir("/proc/self/fd")) - 1  # less the one listdir itself holds
    except (OSError, ValueError, IndexError):
        pass
    return out


def _release_memory() -> None:
    """Between batch jobs: collect reference cycles and hand freed heap back to the OS (glibc's
    malloc_trim), so a long batch holds what is live, not what fragmentation kept."""
    import gc

    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def run(args: argparse.Namespace) -> int:
    from . import pipeline
    from .progress import TerminalProgress

    command = {"optimize": "optimise", "finalize": "finalise"}.get(args.command, args.command)
    job_root = args.out if command in ("generate", "fit") else args.job
    if command not in ("generate", "fit") and not (job_root / "job.json").exists():
        print(f"error: {job_root} is not a ZeroAvatar job folder (no job.json)", file=sys.stderr)
        return protocol.EXIT_BAD_INPUT
    job = Job(job_root)
    job.progress_hook = TerminalProgress(args.progress)
    try:
        job.open()
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    install_signal_cancel(job)
    try:
        job.emit("started", pid=os.getpid(), command=command, version=__version__, argv=sys.argv[1:])
        if command in ("generate", "fit"):
            photo = args.photo.expanduser()
            settings = _settings_from_args(args, JobSettings(subject=subject_name(photo)))
            if command == "fit":
                settings.quality = "fast"
            pipeline.reset_job_outputs(job)
            settings.save(job)
            steps: list[Callable[[], object]] = [
                lambda: pipeline.stage_perceive(job, settings, photo),
                lambda: pipeline.stage_fit(job, settings),
            ]
            if command == "fit":
                steps.append(lambda: pipeline.stage_fit_preview(job, settings))
            else:
                steps += [lambda: pipeline.stage_optimise(job, settings),
                          lambda: pipeline.stage_finalise(job, settings)]
                if settings.export:
                    steps.append(lambda: pipeline.stage_export(job, settings))
        else:
            settings = settings_for_existing_job(args, JobSettings.load(job))
            settings.save(job)
            if command == "optimise":
                steps = [lambda: pipeline.stage_optimise(job, settings)]
            elif command == "finalise":
                steps = [lambda: pipeline.stage_finalise(job, settings)]
                if settings.export:
                    steps.append(lambda: pipeline.stage_export(job, settings))
            else:  # resume: whatever is missing, from the last checkpoint
                steps = pipeline.resume_steps(job, settings)
        for step in steps:
            job.check_cancel()
            step()
        job.emit("done", status="ok", code=protocol.EXIT_OK, **_resources())
        return protocol.EXIT_OK
    except EngineError as exc:
        status = "cancelled" if exc.code == protocol.EXIT_CANCELLED else "failed"
        return _finish(job, exc.code, status, exc.message, exc.hint)
    except KeyboardInterrupt:
        return _finish(job, protocol.EXIT_CANCELLED, "cancelled")
    except MemoryError:
        return _finish(job, protocol.EXIT_FAILED, "failed", "out of memory",
                       "close other programs, lower --texture-size, or use quality fast")
    except OSError as exc:
        if exc.errno in WRITE_ERRNOS:  # a write that no stage wrapped: still the disk's fault, not a bug
            err = output_error(Path(exc.filename or job.root), exc)
            return _finish(job, err.code, "failed", err.message, err.hint)
        return _bug(job, exc)
    except Exception as exc:  # noqa: BLE001
        if _is_cuda_oom(exc):
            return _finish(job, protocol.EXIT_FAILED, "failed", f"the GPU ran out of memory: {str(exc).splitlines()[0]}",
                           "close other programs that use the GPU, raise the GPU Memory Limit (--set gpu_memory_gib) "
                           "if you set one, use --quality standard or --device cpu, or lower --texture-size; "
                           "then resume the job")
        return _bug(job, exc)
    finally:
        job.close()


# Write failures that mean "the output cannot be written here", whichever stage hit them.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def _finish(job: Job, code: int, status: str, message: str = "", hint: str = "") -> int:
    """The last events of a run. If even they cannot be written (disk full, folder gone), the
    error goes to stderr instead of a traceback."""
    try:
        if message:
            job.emit("error", code=code, message=message, hint=hint)
        job.emit("done", status=status, code=code, **_resources())
    except EngineError as exc:
        if message:
            print(f"error: {message}" + (f"\n  -> {hint}" if hint else ""), file=sys.stderr)
        print(f"error: {exc}", file=sys.stderr)
    return code


def _bug(job: Job, exc: BaseException) -> int:
    """An unexpected exception: say it is a bug, keep the traceback in the log."""
    trace = traceback.format_exc()
    try:
        with open(job.layout.log, "a", encoding="utf-8") as f:
            f.write(trace)
    except OSError:
        pass
    sys.stderr.write(trace)
    return _finish(job, protocol.EXIT_FAILED, "failed", f"engine error: {type(exc).__name__}: {exc}",
                   f"this is a bug; the traceback is in {job.layout.log}")


def _is_cuda_oom(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError from any stage (the optimiser handles its own steps), without
    importing torch here."""
    torch = sys.modules.get("torch")
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None) if torch is not None else None
    return isinstance(oom, type) and isinstance(exc, oom)


PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


def read_heights(path: Path) -> dict[str, float]:
    """``--heights``: photo file name (or its name without the extension) -> standing height in
    metres, from CSV rows ``name,metres``; a header row, blank lines and ``#`` comments are
    skipped. BadInputError naming the line of anything else."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"cannot read the heights file {path}: {exc}", "give a UTF-8 CSV of `photo,metres` rows") from exc
    heights: dict[str, float] = {}
    for number, row in enumerate(csv.reader(text.splitlines()), 1):
        cells = [c.strip() for c in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        where = f"{path.name} line {number}"
        if len(cells) != 2 or not cells[0]:
            raise BadInputError(f"{where}: expected `photo,metres`, got {row!r}", "one photo and its height a line")
        try:
            value = float(cells[1])
        except ValueError:
            if number == 1:  # a header
                continue
            raise BadInputError(f"{where}: {cells[1]!r} is not a number", "heights are in metres, e.g. 1.75") from None
        try:
            heights[cells[0]] = checked_height(value)
        except BadInputError as exc:
            raise BadInputError(f"{where}: {exc.message}", exc.hint) from None
    return heights


def run_batch(args: argparse.Namespace) -> int:
    """One job per photo, in this process (the body model, the detector and the diffusion models
    load once: guidance/pipeline_cache.py). A photo that fails is reported and the batch goes on;
    the exit code is the first failure's, or 0."""
    photos: list[Path] = []
    for item in args.photos:
        if item.is_dir():
            photos += sorted(p for p in item.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
        else:
            photos.append(item)
    if not photos:
        print("error: no photos given (or the folders hold none)", file=sys.stderr)
        return protocol.EXIT_BAD_INPUT
    try:
        heights = read_heights(args.heights) if args.heights is not None else {}
        if args.height is not None:
            checked_height(args.height)
    except BadInputError as exc:
        print(f"error: {exc.message}\n  -> {exc.hint}", file=sys.stderr)
        return exc.code
    unused = set(heights) - {p.name for p in photos} - {p.stem for p in photos}
    if unused:
        print(f"warning: {args.heights.name} lists photos not in this batch: {', '.join(sorted(unused))}",
              file=sys.stderr)
    summary, first_failure, used = [], 0, set()
    for photo in photos:
        name = subject_name(photo)
        while name in used:
            name += "_"
        used.add(name)
        job_args = argparse.Namespace(**vars(args))
        job_args.command, job_args.photo, job_args.out, job_args.person = "generate", photo, args.out / name, None
        job_args.height = heights.get(photo.name, heights.get(photo.stem, args.height))
        code = run(job_args)
        _release_memory()
        summary.append({"photo": str(photo), "job": name, "code": code, "status": protocol.EXIT_MEANINGS.get(code, "?"),
                        "height_m": job_args.height, **_process_now()})  # memory and files: a leak shows here
        first_failure = first_failure or code
        if code == protocol.EXIT_CANCELLED:
            break
    from .job import atomic_write_json

    problem: EngineError | None = None
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out / "batch.json", {"jobs": summary})
    except OSError as exc:
        problem = output_error(args.out, exc)
    except EngineError as exc:
        problem = exc
    ok = sum(1 for s in summary if s["code"] == 0)
    if problem is not None:
        print(f"error: cannot write the batch summary: {problem}", file=sys.stderr)
        print(f"batch: {ok}/{len(summary)} photos done", file=sys.stderr)
        return first_failure or problem.code
    print(f"batch: {ok}/{len(summary)} photos done; summary in {args.out / 'batch.json'}", file=sys.stderr)
    return first_failure


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    if args.command == "batch":
        return run_batch(args)
    if args.command == "check":
        return run_check(args)
    return run(args)
