import os

import numpy as np
import pytest
import torch
import trimesh

from zeroavatar_blender import protocol
from zeroavatar_blender.engine.extract import (
    CleanupConfig, MeshData, boundary_loops, clean_mesh, decimate, drop_small_pieces, extract_mesh, fill_small_holes,
    keep_largest_component, marching_cubes, read_preview_mesh, signed_volume, taubin_smooth, write_preview_mesh,
)
from zeroavatar_blender.engine.field.nerf import FieldOutputs
from zeroavatar_blender.evaluation.metrics import point_mesh_distance, sample_surface

from .field.distilled import distilled_anny


class ColouredBall:
    """Density 100 inside radius 0.3 (smooth edge), colour a function of position."""

    aabb = torch.tensor([[-0.5, -0.5, -0.5], [0.5, 0.5, 0.5]])

    def density(self, x: torch.Tensor) -> torch.Tensor:
        return 100.0 * torch.sigmoid(-200.0 * (x.norm(dim=-1) - 0.3))

    def color(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x[:, 0] + 0.5, x[:, 1] * 0 + 0.25, x[:, 2] + 0.5], -1).clamp(0, 1)

    def __call__(self, x: torch.Tensor) -> FieldOutputs:
        return FieldOutputs(self.density(x), self.color(x))


def sphere_mesh(subdivisions: int = 4, radius: float = 0.3, offset=(0.0, 0.0, 0.0)) -> MeshData:
    s = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    return MeshData(s.vertices + np.asarray(offset), s.faces, np.full((len(s.vertices), 3), 0.5))


def is_watertight(mesh: MeshData) -> bool:
    return trimesh.Trimesh(mesh.vertices, mesh.faces, process=False).is_watertight


def test_marching_cubes_of_a_ball_is_the_ball_with_outward_faces_and_colours():
    ball = ColouredBall()
    mesh = extract_mesh(ball, resolution=64, threshold=50.0, aabb=ball.aabb)
    r = np.linalg.norm(mesh.vertices, axis=1)
    assert np.abs(r - 0.3).max() < 2e-3
    assert signed_volume(mesh.vertices, mesh.faces) == pytest.approx(4 / 3 * np.pi * 0.3**3, rel=0.02)
    assert is_watertight(mesh)
    expected = ball.color(torch.tensor(mesh.vertices)).numpy()
    assert mesh.colors is not None and np.abs(mesh.colors - expected).max() < 1e-5


def test_marching_cubes_closes_surfaces_at_the_grid_border():
    values = np.ones((8, 8, 8), dtype=np.float32)  # everything inside
    mesh = marching_cubes(values, 0.5, np.zeros(3), 0.1)
    assert is_watertight(mesh) and signed_volume(mesh.vertices, mesh.faces) > 0
    assert mesh.vertices.min() >= -0.1 and mesh.vertices.max() <= 0.8


def test_distilled_field_mesh_is_close_to_the_body():
    """MUST HOLD (c): Chamfer < 2 cm between the distilled field's mesh and the posed body."""
    d = distilled_anny()
    mesh = extract_mesh(d.field, resolution=128)
    assert mesh.num_faces > 5000 and mesh.colors is not None
    assert mesh.colors.shape == (mesh.num_vertices, 3) and (mesh.colors >= 0).all() and (mesh.colors <= 1).all()
    pred, _ = sample_surface(mesh.vertices.astype(np.float64), mesh.faces, 20000, seed=0)
    gt, _ = sample_surface(d.vertices, d.faces, 20000, seed=1)
    to_body = point_mesh_distance(pred, d.vertices, d.faces)[0]
    to_mesh = point_mesh_distance(gt, mesh.vertices.astype(np.float64), mesh.faces)[0]
    chamfer = 0.5 * (to_body.mean() + to_mesh.mean())
    assert chamfer < 0.02, chamfer
    assert to_body.mean() < 0.01 and to_mesh.mean() < 0.01  # both directions, not just on average


def test_preview_mesh_round_trips_with_a_vertex_cap(tmp_path):
    mesh = sphere_mesh(5)  # 10k vertices
    mesh.colors = np.random.default_rng(0).random((mesh.num_vertices, 3)).astype(np.float32)
    path = tmp_path / protocol.mesh_name(200)
    written = write_preview_mesh(path, mesh.vertices, mesh.faces, mesh.colors, max_vertices=50_000)
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temp files left behind
    with np.load(path, allow_pickle=False) as data:
        assert tuple(data.files) == protocol.MESH_ARRAYS
        assert data["vertices"].dtype == np.float32 and data["faces"].dtype == np.int32
        assert data["colors"].dtype == np.float32
    back = read_preview_mesh(path)
    assert np.array_equal(back.vertices, written.vertices) and np.array_equal(back.faces, written.faces)
    assert np.allclose(back.colors, mesh.colors)
    capped = write_preview_mesh(tmp_path / "capped.npz", mesh.vertices, mesh.faces, mesh.colors, max_vertices=2000)
    assert 1000 < capped.num_vertices <= 2000
    assert read_preview_mesh(tmp_path / "capped.npz").num_vertices == capped.num_vertices
    uncoloured = write_preview_mesh(tmp_path / "grey.npz", mesh.vertices, mesh.faces)
    assert uncoloured.colors is not None and uncoloured.colors.shape == (mesh.num_vertices, 3)
    with pytest.raises(ValueError, match="not a preview mesh"):
        np.savez(tmp_path / "bad.npz", vertices=mesh.vertices)
        read_preview_mesh(tmp_path / "bad.npz")


def test_keep_largest_component_drops_floaters():
    big, small = sphere_mesh(3, 0.3), sphere_mesh(1, 0.05, offset=(1.0, 0.0, 0.0))
    both = MeshData(np.concatenate([small.vertices, big.vertices]),
                    np.concatenate([small.faces, big.faces + small.num_vertices]),
                    np.concatenate([small.colors, big.colors]))
    kept = keep_largest_component(both)
    assert kept.num_faces == big.num_faces and kept.num_vertices == big.num_vertices
    assert np.allclose(np.sort(kept.vertices, axis=0), np.sort(big.vertices.astype(np.float32), axis=0))


def test_fill_small_holes_closes_them_and_leaves_large_ones():
    sphere = sphere_mesh(3)
    top = sphere.vertices[sphere.faces].mean(1)[:, 2]
    small_hole = MeshData(sphere.vertices, sphere.faces[top < top.max() - 1e-9], sphere.colors)  # 2 holes, 1 vertex
    assert not is_watertight(small_hole)
    assert [len(loop) for loop in boundary_loops(small_hole.faces, small_hole.num_vertices)] == [4, 4]
    filled = fill_small_holes(small_hole, max_hole_edges=16)
    assert is_watertight(filled)
    assert trimesh.Trimesh(filled.vertices, filled.faces, process=False).is_winding_consistent
    assert signed_volume(filled.vertices, filled.faces) > 0
    open_half = MeshData(sphere.vertices, sphere.faces[top < 0], sphere.colors)  # a 40-edge rim
    assert fill_small_holes(open_half, max_hole_edges=16).num_faces == open_half.num_faces
    assert is_watertight(fill_small_holes(open_half, max_hole_edges=100))


def test_taubin_smoothing_removes_noise_without_shrinking():
    sphere = sphere_mesh(4)
    rng = np.random.default_rng(0)
    noisy = MeshData(sphere.vertices * (1 + rng.normal(0, 0.02, (sphere.num_vertices, 1))), sphere.faces)
    smooth = taubin_smooth(noisy, iterations=10)
    r_noisy, r_smooth = (np.linalg.norm(m.vertices, axis=1) for m in (noisy, smooth))
    assert r_smooth.std() < r_noisy.std() / 2
    assert r_smooth.mean() == pytest.approx(0.3, rel=0.01)


@pytest.mark.parametrize("method", ["quadric", "cluster"])
def test_decimation_reaches_the_target_and_keeps_the_shape(method):
    sphere = sphere_mesh(5)  # 20480 faces
    small = decimate(sphere, 2000, method=method)
    assert 1500 <= small.num_faces <= 2000
    assert small.colors is not None and small.colors.shape == (small.num_vertices, 3)
    assert signed_volume(small.vertices, small.faces) == pytest.approx(signed_volume(sphere.vertices, sphere.faces),
                                                                       rel=0.03)
    assert np.abs(np.linalg.norm(small.vertices, axis=1) - 0.3).max() < 0.01
    assert decimate(sphere, 10 ** 6) is sphere
    with pytest.raises(ValueError):
        decimate(sphere, 2)


def test_clean_mesh_pipeline_on_the_distilled_body():
    d = distilled_anny()
    mesh = extract_mesh(d.field, resolution=96)
    floater = sphere_mesh(1, 0.02, offset=d.vertices.max(0) + 0.05)
    noisy = MeshData(np.concatenate([mesh.vertices, floater.vertices]),
                     np.concatenate([mesh.faces, floater.faces + mesh.num_vertices]),
                     np.concatenate([mesh.colors, floater.colors]))
    clean = clean_mesh(noisy, CleanupConfig(target_faces=5000, smooth_iterations=5))
    assert clean.num_faces <= 5000 and clean.num_faces > 4000
    assert np.linalg.norm(clean.vertices - floater.vertices.mean(0), axis=1).min() > 0.03  # floater gone
    assert signed_volume(clean.vertices, clean.faces) == pytest.approx(signed_volume(mesh.vertices, mesh.faces),
                                                                       rel=0.05)


def test_small_pieces_are_dropped_and_large_ones_kept():
    big = trimesh.creation.icosphere(subdivisions=2, radius=0.1)
    small = trimesh.creation.box(extents=(0.01, 0.01, 0.01))
    mesh = MeshData(np.concatenate([big.vertices, np.asarray(small.vertices) + 1.0]),
                    np.concatenate([big.faces, np.asarray(small.faces) + len(big.vertices)]))
    kept = drop_small_pieces(mesh, min_faces=20)
    assert kept.num_faces == len(big.faces)
    assert kept.vertices.max() < 0.5
