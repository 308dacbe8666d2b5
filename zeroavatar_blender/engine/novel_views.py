"""Each step's novel views: their cameras and the textured body rendered there, made a step ahead.

Why ahead, and on the CPU: the body render (the UV texture prior's target and ControlNet's body
depth) is a rasterisation whose buffer sizes depend on the data, so on a GPU each of its dozen
size read-backs makes the host wait until every queued kernel has run: about 20 waits a `full`
step (two views), in a loop that is bound by how fast the host queues work. The views depend
only on the run's seed and the step, never on the field, so on a GPU run the next step's views
are drawn and rasterised on a CPU thread while the current step runs, and uploaded from pinned
memory without a wait. On a CPU run they are made when asked for. Either way the values are the
same: the views come from their own generator, seeded from (seed, step), so they are the same
whether drawn early, late or after a resume.
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from .cameras import Camera, orbit_camera
from .transfer import to_device

_VIEW_STREAM = 0x5EED_0F_71E5  # keeps the views' generator apart from the step's own


@dataclass
class NovelView:
    camera: Camera
    azimuth: float  # degrees, 0 = the photo's side
    elevation: float  # degrees
    prior: dict[str, torch.Tensor]  # the body at this view: rgb, known (texel known), mask, depth


def view_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7919 + _VIEW_STREAM) % (2 ** 63)


def sample_novel_camera(problem: Any, step: int, generator: torch.Generator, resolution: int) -> tuple[Camera, float, float]:
    """A camera orbiting the subject at the fit's distance: azimuth all round, or within 45
    degrees of the photo's side with probability ``front_bias`` (a schedule); elevation in the
    configured range."""
    c = problem.config
    u = torch.rand(3, generator=generator).tolist()
    if u[0] < c.at(c.front_bias, step):
        azimuth = (u[1] - 0.5) * 90.0
    else:
        azimuth = u[1] * 360.0 - 180.0
    elevation = c.elevation_range[0] + u[2] * (c.elevation_range[1] - c.elevation_range[0])
    f = problem.focal_ratio * resolution
    K = np.array([[f, 0, (resolution - 1) / 2], [0, f, (resolution - 1) / 2], [0, 0, 1]])
    cam = orbit_camera(problem.target, problem.radius, azimuth, elevation, K, resolution, resolution)
    return cam, azimuth, elevation


def render_body_prior(body: dict[str, torch.Tensor], cam: Camera) -> dict[str, torch.Tensor]:
    """The UV-textured body at a view: rgb, known-texel mask, body mask and depth, on the device
    of ``body`` (vertices, faces, corner_uv, texture: its rgb + known flag)."""
    from .render.raster import interpolate, rasterize, sample_texture

    K, w2c = cam.torch(torch.float32, body["vertices"].device)
    v_cam = body["vertices"] @ w2c[:3, :3].T + w2c[:3, 3]
    raster = rasterize(v_cam, body["faces"], K, cam.width, cam.height)
    uv = interpolate(raster, body["corner_uv"])
    tex = sample_texture(body["texture"], uv)
    body_mask = raster.mask
    return {"rgb": tex[..., :3], "known": (tex[..., 3] > 0.5) & body_mask, "mask": body_mask, "depth": raster.depth}


def make_views(problem: Any, step: int, resolution: int, body: dict[str, torch.Tensor]) -> list[NovelView]:
    """The step's ``novel_views`` views at ``resolution``, with the body rendered on ``body``'s device."""
    gen = torch.Generator().manual_seed(view_seed(problem.config.seed, step))
    views = []
    for _ in range(problem.config.novel_views):
        cam, azimuth, elevation = sample_novel_camera(problem, step, gen, resolution)
        views.append(NovelView(cam, azimuth, elevation, render_body_prior(body, cam)))
    return views


class NovelViews:
    """Hands out each step's views; with ``ahead`` (default: on a CUDA run) it makes the next
    step's on a CPU thread as soon as a step's are handed out.

    ``resolution(step)`` is the novel-view size the loop will ask for at ``step``; a step asked
    for at another size (the loop shrank its views after running out of GPU memory) is made
    there and then."""

    def __init__(self, problem: Any, resolution: Callable[[int], int], ahead: bool | None = None) -> None:
        self.problem = problem
        self.device = torch.device(problem.device)
        self.resolution = resolution
        self.ahead = self.device.type == "cuda" if ahead is None else ahead
        source = {"vertices": problem.body_vertices, "faces": problem.body_faces,
                  "corner_uv": problem.corner_uv, "texture": problem.uv_texture}
        # made where they are rasterised: the CPU when ahead, else the run's device
        self.body = {k: (v.detach().cpu() if self.ahead else v) for k, v in source.items()}
        # one CPU thread for the raster: a second team of intra-op threads beside the loop's own
        # oversubscribes the cores (on the 2-core build machine the loop's step went from 105 to
        # 133 ms with it); torch's thread count is per thread, so the loop keeps its own
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="novel-views",
                                        initializer=torch.set_num_threads, initargs=(1,)) if self.ahead else None
        self._pending: tuple[tuple[int, int], Future] | None = None

    def _make(self, step: int, resolution: int) -> list[NovelView]:
        return make_views(self.problem, step, resolution, self.body)

    def get(self, step: int, resolution: int) -> list[NovelView]:
        key = (step, resolution)
        if self._pending is not None and self._pending[0] == key:
            views = self._pending[1].result()
        else:
            if self._pending is not None:
                self._pending[1].cancel()
            views = self._make(step, resolution)
        self._pending = None
        if self._pool is not None:
            nxt = (step + 1, self.resolution(step + 1))
            self._pending = (nxt, self._pool.submit(self._make, *nxt))
            for view in views:  # queued copies from pinned memory: no wait for the device
                view.prior = {k: to_device(v, self.device) for k, v in view.prior.items()}
        return views

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending = None


def novel_resolution(config: Any, step: int, oom_downscale: float) -> int:
    """The novel views' side at ``step``: the schedule, shrunk with the rays after a GPU OOM."""
    return max(16, int(config.at(config.novel_resolution, step) * math.sqrt(oom_downscale)))
