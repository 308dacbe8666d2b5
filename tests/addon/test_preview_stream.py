"""Streamed previews in small pieces: edges found in numpy equal Blender's own, a preview is read,
given its edges and written over separate timer calls, and the last one of a finished job is
still shown. Also the advanced extra engine arguments of the operators."""

from __future__ import annotations

import sys
import time

import bpy
import numpy as np
import pytest

from zeroavatar_blender.addon import client, jobs, operators, scene


def blobby_mesh(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A closed marching-cubes surface (two overlapping balls), as the engine streams them."""
    import mcubes

    g = np.linspace(-1.0, 1.0, 40)
    x, y, z = np.meshgrid(g, g, g, indexing="ij")
    shift = 0.1 * seed
    field = np.exp(-((x - 0.3 - shift) ** 2 + y**2 + z**2) * 6) + np.exp(-((x + 0.3) ** 2 + y**2 + z**2) * 6)
    v, f = mcubes.marching_cubes(field, 0.5)
    return v / 20.0, f.astype(np.int32), np.clip(0.5 + 0.5 * np.sin(v), 0, 1)


def edge_set(mesh: bpy.types.Mesh) -> set[tuple[int, int]]:
    ev = np.empty(len(mesh.edges) * 2, dtype=np.int32)
    mesh.attributes[".edge_verts"].data.foreach_get("value", ev)
    return set(map(tuple, np.sort(ev.reshape(-1, 2), axis=1).tolist()))


def test_numpy_edges_equal_blenders(fresh_scene):
    v, f, c = blobby_mesh()
    prepared = scene.prepare_preview_mesh(v, f, c)
    by_blender = scene.apply_preview_mesh("Blender edges", prepared)
    with_edges = prepared.with_edges()
    by_numpy = scene.apply_preview_mesh("Numpy edges", with_edges)
    assert len(by_numpy.data.edges) == len(with_edges.edge_verts) // 2 == len(by_blender.data.edges)
    assert edge_set(by_numpy.data) == edge_set(by_blender.data)
    assert by_numpy.data.validate(verbose=False) is False  # nothing for Blender to fix
    corner_edge = np.empty(len(by_numpy.data.loops), dtype=np.int32)
    by_numpy.data.attributes[".corner_edge"].data.foreach_get("value", corner_edge)
    ev = with_edges.edge_verts.reshape(-1, 2)
    tri = f.reshape(-1, 3)
    ends = np.stack([tri.ravel(), tri[:, [1, 2, 0]].ravel()], 1)  # a corner's edge: to the next corner
    np.testing.assert_array_equal(np.sort(ev[corner_edge], axis=1), np.sort(ends, axis=1))
    # A new topology replaces the old one in place, edges included.
    v2, f2, c2 = blobby_mesh(seed=2)
    again = scene.apply_preview_mesh(by_numpy, scene.prepare_preview_mesh(v2, f2, c2).with_edges())
    assert again == by_numpy and len(again.data.vertices) == len(v2) and again.data.validate(verbose=False) is False


def test_degenerate_triangles_are_dropped(fresh_scene):
    v, f, _ = blobby_mesh()
    bad = np.concatenate([f, [[0, 0, 1], [2, 3, 3]]]).astype(np.int32)
    prepared = scene.prepare_preview_mesh(v, bad)
    assert prepared.num_faces == len(f)
    assert scene.apply_preview_mesh("P", prepared.with_edges()).data.validate(verbose=False) is False
    with pytest.raises(ValueError, match="numbers"):
        scene.prepare_preview_mesh(v.astype(object), f)


def _launch(fake_engine, tmp_path, *extra: str) -> client.ActiveJob:
    return client.launch(bpy.context.scene, "optimise", [str(fake_engine), "ok", str(tmp_path / "job"), *extra],
                         tmp_path / "job", sys.executable, client.engine_env(jobs.package_parent()), "Subject")


def test_a_preview_takes_three_short_calls(addon, fake_engine, tmp_path):
    job = _launch(fake_engine, tmp_path, "--mesh-pause", "3")
    deadline = time.monotonic() + 30
    while job.pending_preview is None:  # call 1 reads and checks the file
        client.poll_all()
        assert time.monotonic() < deadline and job.previews_applied == 0
        time.sleep(0.02)
    assert job.mesh_applied.name == "step_000005.npz" and job.pending_preview.edge_verts is None
    assert bpy.context.scene.zeroavatar.preview is None
    client.poll_all()  # call 2: the edges
    assert job.pending_preview is not None and job.pending_preview.edge_verts is not None
    assert job.previews_applied == 0
    client.poll_all()  # call 3: into the scene
    preview = bpy.context.scene.zeroavatar.preview
    assert job.pending_preview is None and job.previews_applied == 1
    assert len(preview.data.vertices) == 3 and preview.data.color_attributes.get("Color") is not None
    client.stop_all(timeout=1.0)


def test_the_last_preview_of_a_finished_job_is_shown(addon, fake_engine, tmp_path):
    job = _launch(fake_engine, tmp_path)  # the mesh and "done" come at once
    deadline = time.monotonic() + 30
    while client.poll_all() is not None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert job.client.state.status == "done" and job.previews_applied == 1
    assert bpy.context.scene.zeroavatar.preview is not None and not client.ACTIVE


def test_extra_engine_arguments(monkeypatch):
    monkeypatch.setenv(operators.EXTRA_ARGS_ENV, "--steps 12 --set 'prompt=a person' --set n_samples=24")
    assert operators.extra_engine_args() == ["--steps", "12", "--set", "prompt=a person", "--set", "n_samples=24"]
    monkeypatch.setenv(operators.EXTRA_ARGS_ENV, "--set 'unclosed")
    with pytest.raises(ValueError, match=operators.EXTRA_ARGS_ENV):
        operators.extra_engine_args()
    monkeypatch.delenv(operators.EXTRA_ARGS_ENV)
    assert operators.extra_engine_args() == []


def _job_to_optimise(tmp_path, quality: str):
    """A job folder the Optimise button accepts (a fit.json), set as the scene's job."""
    job = tmp_path / "job"
    job.mkdir()
    (job / "fit.json").write_text("{}")
    props = bpy.context.scene.zeroavatar
    props.job_dir = str(job)
    props.quality = quality
    return job


def test_optimise_refuses_broken_extra_arguments_and_fast_means_standard(addon, tmp_path, monkeypatch):
    job = _job_to_optimise(tmp_path, "fast")
    monkeypatch.setenv(operators.EXTRA_ARGS_ENV, "--steps '3")
    with pytest.raises(RuntimeError, match="not valid shell quoting"):
        bpy.ops.zeroavatar.optimise()
    assert not client.ACTIVE
    monkeypatch.setenv(operators.EXTRA_ARGS_ENV, "--steps 3")
    assert bpy.ops.zeroavatar.optimise() == {"FINISHED"}
    assert len(client.ACTIVE) == 1
    header = [line for line in (job / "engine.log").read_text().splitlines() if line.startswith("=== ")][-1]
    argv = header.split(" ", 3)[3]  # "=== date time argv": the command line the engine got
    assert " -m zeroavatar_blender.engine optimise " in argv
    assert argv.endswith(f"{job} --quality standard --steps 3 --progress none --device auto")
    client.stop_all(timeout=2.0)


def test_the_gpu_memory_limit_reaches_the_engine(addon, tmp_path, monkeypatch):
    """The preference becomes the engine's allocator cap (`fast` optimises nothing and gets none);
    a studio's extra --set still comes last, so it wins."""
    job = _job_to_optimise(tmp_path, "standard")
    monkeypatch.delenv(operators.EXTRA_ARGS_ENV, raising=False)
    addon.gpu_memory_limit = 0.0
    assert operators.quality_args(bpy.context) == ["--quality", "standard"]
    addon.gpu_memory_limit = 10.5
    try:
        monkeypatch.setenv(operators.EXTRA_ARGS_ENV, "--set n_samples=24")
        assert operators.quality_args(bpy.context) == ["--quality", "standard", "--set", "gpu_memory_gib=10.5",
                                                       "--set", "n_samples=24"]
        assert operators.quality_args(bpy.context, "fast") == ["--quality", "fast", "--set", "n_samples=24"]
        monkeypatch.delenv(operators.EXTRA_ARGS_ENV)
        assert bpy.ops.zeroavatar.optimise() == {"FINISHED"}
        header = [line for line in (job / "engine.log").read_text().splitlines() if line.startswith("=== ")][-1]
        assert header.endswith(f"{job} --quality standard --set gpu_memory_gib=10.5 --progress none --device auto")
    finally:
        addon.gpu_memory_limit = 0.0
        client.stop_all(timeout=2.0)
