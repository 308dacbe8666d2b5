"""The stages of a job, each reading and writing only the job folder, so any stage can be rerun.

perceive -> fit -> [pose edit from Blender] -> optimise (standard/full) -> finalise -> export
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import protocol
from .errors import BadInputError, NeedsChoiceError
from .job import Job, atomic_save, atomic_write_json, output_error

QUALITIES = ("fast", "standard", "full")


@dataclass
class JobSettings:
    """What the user asked for; saved as job.json so finalise/resume need no arguments."""

    photo: str = ""  # the copy inside the job folder (input/...), relative to the job
    source_photo: str = ""  # where the user's photo was
    subject: str = "avatar"
    body: str = "anny"
    body_model_path: str | None = None
    allow_pickle: bool = False
    person: int | None = None
    height_m: float | None = None  # the person's standing height when the user knows it
    quality: str = "fast"
    device: str = "auto"
    steps: int | None = None
    seed: int = 0
    prompt: str | None = None
    sd_weights: str | None = None
    controlnet_weights: str | None = None
    texture_size: int = 1024
    export: bool = True
    lods: int = 0  # levels of detail in the Unity FBX (avatar.fbx)
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, job: Job) -> None:
        atomic_write_json(job.layout.job_json, {"version": protocol.PROTOCOL_VERSION, **dataclasses.asdict(self)})

    @staticmethod
    def load(job: Job) -> "JobSettings":
        path = job.layout.job_json
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise BadInputError(f"{job.root} is not a ZeroAvatar job folder (no job.json)",
                                "run `generate` or `fit` first, or point at the right folder") from exc
        except (OSError, json.JSONDecodeError) as exc:
            raise BadInputError(f"{path} is unreadable: {exc}", "the job folder is damaged; start a new job") from exc
        names = {f.name for f in dataclasses.fields(JobSettings)}
        return JobSettings(**{k: v for k, v in data.items() if k in names})


def subject_name(photo: Path) -> str:
    """A file-name-safe subject name from the photo's name ("Jane Doe (2).JPG" -> "Jane_Doe_2")."""
    text = unicodedata.normalize("NFKD", photo.stem).encode("ascii", "ignore").decode()
    text = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")
    return text[:48] or "avatar"


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise NeedsChoiceError("--device cuda was asked for but this Python's torch sees no CUDA GPU",
                          "use --device auto or cpu, or install a CUDA build of torch in the engine environment")
    return requested


def load_job_body(job: Job, settings: JobSettings):
    from .body import load_body

    return load_body(settings.body, settings.body_model_path, on_message=job.info,
                     allow_pickle=settings.allow_pickle)


# -- stages -------------------------------------------------------------------------------
def reset_job_outputs(job: Job) -> None:
    """A new photo in a reused job folder: remove every artefact of the previous run first, so a
    failure can never leave an old result that looks like the new one's."""
    layout = job.layout
    for path in (layout.perception, layout.fit_json, layout.pose_edit):
        path.unlink(missing_ok=True)
    for folder in (layout.checkpoints, layout.meshes):
        for item in folder.glob("*"):
            if item.is_file():
                item.unlink()
    for folder in (layout.result, job.root / "fit_body", layout.exports):
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)


def stage_perceive(job: Job, settings: JobSettings, photo_path: Path) -> None:
    from .imageio import load_photo
    from .perception import perceive

    job.stage("perceive", f"Reading {photo_path.name}")
    photo = load_photo(photo_path)
    copy = job.layout.input_dir / ("photo" + (photo_path.suffix.lower() if len(photo_path.suffix) <= 6 else ""))
    if not (copy.exists() and copy.resolve() == photo_path.resolve()):  # a temp name, then renamed:
        atomic_save(copy, lambda tmp: shutil.copyfile(photo_path, tmp))  # a full disk leaves no half copy
    settings.photo = job.rel(copy)
    settings.source_photo = str(photo_path)
    job.check_cancel()
    job.stage("perceive", "Finding the person and their keypoints")
    started = time.time()
    perception = perceive(photo, person=settings.person, on_message=job.info)
    atomic_save(job.layout.perception, perception.save)  # a full disk leaves no half .npz for resume
    visible = int((perception.confidence > 0.3).sum())
    job.info(f"Person {perception.person_index + 1} of {perception.num_people}, {visible}/17 keypoints visible "
             f"({time.time() - started:.1f} s)")
    if photo.focal_px is not None:
        settings.extra["focal_px"] = photo.focal_px
    settings.save(job)


def stage_fit(job: Job, settings: JobSettings) -> None:
    from .fit import fit_body
    from .perception import Perception

    perception = Perception.load(job.layout.perception)
    job.stage("fit", f"Fitting the {settings.body} body to the photo")
    body = load_job_body(job, settings)
    started = time.time()

    def on_progress(step: int, total: int, loss: float) -> None:
        job.progress("fit", step, total, loss=loss, stage_started=started)

    fit = fit_body(perception, body, focal_px=settings.extra.get("focal_px"), on_progress=on_progress,
                   check_cancel=job.check_cancel, seed=settings.seed, height_m=settings.height_m)
    fit.save(job.layout.fit_json)
    iou = fit.metrics.get("silhouette_iou")
    height = fit.metrics.get("height_m")
    job.info(f"Body fitted in {time.time() - started:.1f} s" + (f", silhouette IoU {iou:.2f}" if iou is not None else "")
             + (f", standing height {height:.2f} m ({'as given' if settings.height_m else 'estimated'})"
                if height is not None else ""))
    if fit.metrics.get("age_start") is not None:
        job.info("The photo's proportions look younger than an adult's (a larger head for the body): the "
                 "fit started again from a younger body and kept it. If the size is wrong, give the standing "
                 "height (Height in the panel, --height on the command line)")


def stage_optimise(job: Job, settings: JobSettings, *, resume: bool = False) -> None:
    if settings.quality == "fast":
        return
    from .optimise import run_optimisation

    run_optimisation(job, settings, resume=resume)


def stage_finalise(job: Job, settings: JobSettings) -> Path:
    from .finalise import finalise_avatar

    job.stage("finalise", "Building the rigged, textured avatar")
    bundle_dir = finalise_avatar(job, settings)
    job.emit("result", path=job.rel(bundle_dir))
    return bundle_dir


def stage_export(job: Job, settings: JobSettings) -> None:
    from .exports import export_bundle

    job.stage("export", "Exporting FBX and glTF with Blender's exporters")
    try:
        for fmt, path in export_bundle(job, settings):
            job.emit("export", format=fmt, path=job.rel(path))
    except OSError as exc:  # its log file; the exporter's own failures come back as EngineError
        raise output_error(Path(exc.filename or job.layout.exports), exc) from exc


def stage_fit_preview(job: Job, settings: JobSettings) -> None:
    """After ``fit``: the fitted body with the photo's texture as a bundle (fit_body/), so Blender
    can show it for pose adjustment before optimising."""
    from .finalise import build_fit_preview

    job.stage("preview", "Texturing the fitted body for the preview")
    folder = build_fit_preview(job, settings)
    job.emit("result", path=job.rel(folder), bundle="fit_body")


def resume_steps(job: Job, settings: JobSettings) -> list:
    """What is left of an interrupted job, in order."""
    layout = job.layout
    steps: list = []
    if not layout.perception.exists():
        photo = job.root / settings.photo if settings.photo else Path(settings.source_photo)
        steps.append(lambda: stage_perceive(job, settings, photo))
    if not layout.fit_json.exists():
        steps.append(lambda: stage_fit(job, settings))
    if settings.quality != "fast":
        steps.append(lambda: stage_optimise(job, settings, resume=True))
    steps.append(lambda: stage_finalise(job, settings))
    if settings.export:
        steps.append(lambda: stage_export(job, settings))
    return steps
