"""Finalise: the avatar bundle (result/) from the fit (fast path) or the optimised field.

Bundles are assembled in ``<name>.partial/`` and renamed into place, so a crash or a full disk
never leaves a folder that looks like a finished result.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch

from .job import Job, output_error
from .pipeline import JobSettings, load_job_body


LONG_HAIR_NOTE = "The photo shows hair falling past the neck: the upper back takes the hair's colour"


def publish_folder(partial: Path, final: Path) -> None:
    """Replace ``final`` by ``partial`` with renames only (the old one is removed after the swap)."""
    old = final.with_name(final.name + ".old")
    try:
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)
        os.replace(partial, final)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        raise output_error(final, exc) from exc


def save_bundle(bundle, final: Path) -> None:
    """Write into ``<final>.partial`` and publish; on any failure (a full disk) the partial folder
    is removed, so nothing half-written is left beside the job's other files."""
    partial = final.with_name(final.name + ".partial")
    try:
        if partial.exists():
            shutil.rmtree(partial)
        bundle.save(partial)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise output_error(partial, exc) from exc
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    publish_folder(partial, final)


def fitted_params(job: Job, body, fit):
    """The fit's parameters, or the pose the user edited in Blender when there is one."""
    params = fit.params
    if job.layout.pose_edit.exists():
        from .pose_edit import load_pose_edit

        params = load_pose_edit(job.layout.pose_edit, body, params)
        job.info("Using the pose edited in Blender")
    return params


def fast_bundle(job: Job, settings: JobSettings, body, params, fit):
    """The fitted body with the photo projected onto its UV layout: (bundle, posed world vertices)."""
    from .avatar import build_body_avatar
    from .imageio import load_photo
    from .perception import Perception
    from .texture import bake_photo_texture

    photo = load_photo(job.root / settings.photo)
    perception = Perception.load(job.layout.perception)
    camera = fit.camera.scaled(photo.scale)
    with torch.no_grad():
        out = body.forward(params)
    posed_world = out.vertices[0].cpu().numpy()
    mask = perception.mask if perception.mask.shape[:2] == photo.rgb.shape[:2] else None
    job.stage("texture", "Projecting the photo onto the body's UV layout")
    texture = bake_photo_texture(photo.rgb, camera, out.vertices[0], body, mask=mask, size=settings.texture_size)
    if texture.long_hair:
        job.info(LONG_HAIR_NOTE)
    job.check_cancel()
    bundle = build_body_avatar(body, params, texture.image, camera=fit.camera, subject=settings.subject,
                               quality="fast", extra_meta={"source_photo": settings.source_photo,
                                                           "texture_sources": _source_stats(texture.source)})
    return bundle, posed_world


def build_fit_preview(job: Job, settings: JobSettings) -> Path:
    from .fit import BodyFit

    fit = BodyFit.load(job.layout.fit_json)
    body = load_job_body(job, settings)
    bundle, _ = fast_bundle(job, settings, body, fit.params, fit)
    folder = job.root / "fit_body"
    save_bundle(bundle, folder)
    return folder


def finalise_avatar(job: Job, settings: JobSettings) -> Path:
    from .avatar import write_posed_ply
    from .fit import BodyFit

    fit = BodyFit.load(job.layout.fit_json)
    body = load_job_body(job, settings)
    params = fitted_params(job, body, fit)
    field_ckpt = None
    if settings.quality != "fast":
        from .optimise import latest_checkpoint

        field_ckpt = latest_checkpoint(job)
        if field_ckpt is None:
            job.info("No optimised field in this job: building the fast avatar", level="warning")
    job.check_cancel()
    if field_ckpt is not None:
        from .field_avatar import build_field_avatar

        bundle, posed_world = build_field_avatar(job, settings, body, params, fit, field_ckpt)
    else:
        bundle, posed_world = fast_bundle(job, settings, body, params, fit)
    save_bundle(bundle, job.layout.result)
    try:
        job.layout.exports.mkdir(exist_ok=True)
    except OSError as exc:
        raise output_error(job.layout.exports, exc) from exc
    write_posed_ply(posed_world, bundle.faces, fit.camera, job.layout.exports / "avatar_posed.ply")
    return job.layout.result


def _source_stats(source: np.ndarray) -> dict[str, float]:
    total = max(1, int((source > 0).sum()))
    return {name: round(float((source == code).sum()) / total, 4)
            for code, name in ((1, "photo"), (2, "mirror"), (3, "smooth"), (4, "crown"))}
