"""Each step's novel views: the same whether made ahead on a thread, when asked, or after a resume."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import trimesh

from zeroavatar_blender.engine.novel_views import NovelViews, make_views, novel_resolution
from zeroavatar_blender.engine.optimise import OptimiseConfig


def _problem(device: str = "cpu", novel_views: int = 2) -> SimpleNamespace:
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    faces = torch.as_tensor(np.asarray(sphere.faces), dtype=torch.long)
    rng = np.random.default_rng(0)
    texture = torch.from_numpy(rng.random((64, 64, 4))).float()
    texture[..., 3] = (texture[..., 3] > 0.3).float()  # a known flag, as the baked texture has
    return SimpleNamespace(
        config=OptimiseConfig(steps=100, seed=3, novel_views=novel_views, novel_resolution=((0, 32), (0.5, 48))),
        device=torch.device(device), body_vertices=torch.as_tensor(np.asarray(sphere.vertices), dtype=torch.float32).to(device),
        body_faces=faces.to(device), corner_uv=torch.from_numpy(rng.random((len(faces), 3, 2))).float().to(device),
        uv_texture=texture.to(device), target=np.zeros(3), radius=2.5, focal_ratio=1.2)


def _same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x.azimuth, x.elevation) == (y.azimuth, y.elevation)
        assert np.allclose(x.camera.K, y.camera.K) and np.allclose(x.camera.R, y.camera.R)
        for key in ("rgb", "known", "mask", "depth"):
            assert torch.equal(x.prior[key].cpu(), y.prior[key].cpu()), key


def test_views_made_ahead_on_a_thread_equal_views_made_when_asked_and_after_a_resume() -> None:
    p = _problem()
    res = lambda step: novel_resolution(p.config, step, 1.0)  # noqa: E731
    ahead, inline = NovelViews(p, res, ahead=True), NovelViews(p, res, ahead=False)
    try:
        got = [ahead.get(step, res(step)) for step in range(45, 55)]  # the size grows over these steps
        assert ahead._pending is not None and ahead._pending[0] == (55, res(55))  # the next step's, underway
        for step, views in zip(range(45, 55), got):
            _same(views, inline.get(step, res(step)))
            _same(views, NovelViews(p, res, ahead=False).get(step, res(step)))  # a resumed run's
        assert res(45) < res(54) and got[0][0].prior["rgb"].shape == (res(45), res(45), 3)
        assert got[-1][0].prior["rgb"].shape == (res(54), res(54), 3)
        # the views differ from step to step and between the step's two views
        assert got[0][0].azimuth != got[1][0].azimuth and got[0][0].azimuth != got[0][1].azimuth
        assert bool(got[0][0].prior["mask"].any()) and bool(got[0][0].prior["known"].any())
    finally:
        ahead.close()
        inline.close()


def test_a_step_asked_for_at_another_size_is_made_there_and_then() -> None:
    """After a GPU out-of-memory the loop retries the step with smaller views than were made ahead."""
    p = _problem(novel_views=1)
    views = NovelViews(p, lambda step: 32, ahead=True)
    try:
        views.get(10, 32)
        assert views._pending[0] == (11, 32)
        smaller = views.get(11, 16)
        assert smaller[0].prior["rgb"].shape == (16, 16, 3)
        _same(smaller, make_views(p, 11, 16, {"vertices": p.body_vertices, "faces": p.body_faces,
                                              "corner_uv": p.corner_uv, "texture": p.uv_texture}))
    finally:
        views.close()
    assert views._pool is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_views_made_ahead_on_the_cpu_equal_views_rendered_on_the_gpu() -> None:
    p = _problem("cuda")
    res = lambda step: 32  # noqa: E731
    ahead = NovelViews(p, res)  # a CUDA run: ahead by default
    try:
        assert ahead.ahead
        for step in range(3):
            got = ahead.get(step, 32)
            assert got[0].prior["rgb"].device.type == "cuda"
            on_gpu = NovelViews(p, res, ahead=False).get(step, 32)
            for x, y in zip(got, on_gpu):
                assert (x.prior["mask"] != y.prior["mask"]).float().mean() < 0.002  # edge pixels may differ
                both = x.prior["mask"] & y.prior["mask"]
                assert torch.allclose(x.prior["depth"][both], y.prior["depth"][both], atol=1e-4)
    finally:
        ahead.close()
