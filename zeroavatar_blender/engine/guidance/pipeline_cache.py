"""The last loaded diffusion models, kept for the next job in this process.

Why: ``batch --quality full`` runs one job after another in one engine process, and each job
loaded SD + ControlNet again (16-19 s on an H100, 2026-11-27, against a ~300 s run). The models
are frozen and the SDS keeps its own state (noise generator, CUDA graph) outside them, so a later
job can take them as they are. One set is kept: a job with other weights or settings replaces it.
A weight file changed on disk since (its size or time) counts as other weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .weights import GuidancePipeline, GuidanceWeights

_KEPT: dict[tuple, GuidancePipeline] = {}


def files_signature(path: Path) -> tuple:
    """(relative name, size, mtime) of a weight file, or of every file under a weight folder
    (symlinks followed: Hugging Face snapshots link to their blobs)."""
    path = Path(path)
    if path.is_file():
        st = path.stat()
        return (("", st.st_size, st.st_mtime_ns),)
    out = []
    for root, _, names in os.walk(path, followlinks=True):
        for name in sorted(names):
            file = Path(root) / name
            try:
                st = file.stat()
            except OSError:  # a dangling link: its absence is the signature
                continue
            out.append((str(file.relative_to(path)), st.st_size, st.st_mtime_ns))
    return tuple(sorted(out))


def weights_key(weights: GuidanceWeights, *settings: object) -> tuple:
    """What must match for kept models to serve a new job: the weights' paths and files, and the
    settings that change the loaded modules (device, dtype, slicing, memory layout)."""
    paths = (weights.sd_path, weights.controlnet_path, weights.sd_config_path)
    return (weights.sd_kind, weights.controlnet_kind,
            *(None if p is None else (str(p), files_signature(p)) for p in paths), *settings)


def kept_or_loaded(key: tuple, load: Callable[[], GuidancePipeline]) -> tuple[GuidancePipeline, bool]:
    """The kept models for ``key``, else ``load()``'s, kept in their place. -> (models, reused)."""
    if key in _KEPT:
        return _KEPT[key], True
    _KEPT.clear()  # the old set goes before the new one loads: never two in memory
    pipe = load()
    _KEPT[key] = pipe
    return pipe, False


def forget() -> None:
    """Drop the kept models (their memory goes once nothing else holds them)."""
    _KEPT.clear()
