import numpy as np
import pytest
import torch

from zeroavatar_blender.engine.cameras import Camera, intrinsics, look_at
from zeroavatar_blender.engine.render.raster import interpolate, rasterize, render_mesh, sample_texture


def brute_force(vertices_cam: np.ndarray, faces: np.ndarray, K: np.ndarray, W: int, H: int):
    """Per-pixel reference in float64: nearest inside triangle, plus how clear-cut the pixel is."""
    face_id = np.full((H, W), -1)
    depth = np.full((H, W), np.inf)
    margin = np.full((H, W), np.inf)  # distance from an ambiguous case (edge or depth tie)
    tri = vertices_cam[faces]
    p = tri @ K.T
    xy = p[..., :2] / p[..., 2:3]
    for y in range(H):
        for x in range(W):
            hits, edge_gap = [], np.inf
            for f in range(len(faces)):
                (x0, y0), (x1, y1), (x2, y2) = xy[f]
                area = (x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0)
                if abs(area) < 1e-12:
                    continue
                w = np.array([(x2 - x1) * (y - y1) - (y2 - y1) * (x - x1),
                              (x0 - x2) * (y - y2) - (y0 - y2) * (x - x2),
                              (x1 - x0) * (y - y0) - (y1 - y0) * (x - x0)]) / area
                edge_gap = min(edge_gap, abs(w.min()))
                if w.min() < 0:
                    continue
                hits.append((1.0 / (w / tri[f, :, 2]).sum(), f))
            margin[y, x] = edge_gap
            if hits:
                hits.sort()
                z, f = hits[0]
                face_id[y, x], depth[y, x] = f, z
                if len(hits) > 1:
                    margin[y, x] = min(edge_gap, hits[1][0] - z)
    return face_id, depth, margin


def random_mesh(seed: int, n_faces: int = 12):
    rng = np.random.default_rng(seed)
    centres = rng.uniform([-0.6, -0.5, 2.0], [0.6, 0.5, 4.0], (n_faces, 1, 3))
    verts = (centres + rng.normal(0, 0.35, (n_faces, 3, 3))).reshape(-1, 3)
    verts[:, 2] = np.maximum(verts[:, 2], 0.5)
    return verts, np.arange(3 * n_faces).reshape(-1, 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_on_random_triangles(seed):
    W, H = 40, 30
    K = intrinsics(W, H, focal_px=35.0)
    verts, faces = random_mesh(seed)
    ref_face, ref_depth, margin = brute_force(verts, faces, K, W, H)
    r = rasterize(torch.tensor(verts), torch.tensor(faces), torch.tensor(K), W, H)
    clear = margin > 1e-6
    assert (ref_face >= 0).sum() > 100  # the scene is not empty
    np.testing.assert_array_equal(r.face_id.numpy()[clear], ref_face[clear])
    covered = clear & (ref_face >= 0)
    np.testing.assert_allclose(r.depth.numpy()[covered], ref_depth[covered], rtol=1e-9)
    assert np.isinf(r.depth.numpy()[clear & (ref_face < 0)]).all()
    # Only genuinely ambiguous pixels may differ.
    assert (r.face_id.numpy() != ref_face).sum() <= (~clear).sum()


def test_float32_and_small_chunks_agree():
    verts, faces = random_mesh(3, 40)
    K = torch.tensor(intrinsics(64, 48, 60.0))
    a = rasterize(torch.tensor(verts), torch.tensor(faces), K, 64, 48)
    b = rasterize(torch.tensor(verts, dtype=torch.float32), torch.tensor(faces), K.float(), 64, 48, chunk=700)
    same = a.face_id == b.face_id
    assert same.float().mean() > 0.995
    assert torch.allclose(a.depth[same & a.mask].float(), b.depth[same & b.mask], rtol=1e-5)


def square(z: float, half: float, x0: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    v = np.array([[x0 - half, -half, z], [x0 + half, -half, z], [x0 + half, half, z], [x0 - half, half, z]])
    return v, np.array([[0, 1, 2], [0, 2, 3]])


def test_nearer_surface_wins_whatever_the_order():
    far, f_far = square(3.0, 0.5)
    near, f_near = square(2.0, 0.2, x0=0.1)
    K = torch.tensor(intrinsics(64, 64, 60.0))
    for order in (0, 1):
        parts = [(far, f_far), (near, f_near)][:: 1 if order == 0 else -1]
        verts = np.concatenate([parts[0][0], parts[1][0]])
        faces = np.concatenate([parts[0][1], parts[1][1] + 4])
        r = rasterize(torch.tensor(verts), torch.tensor(faces), K, 64, 64)
        near_faces = {2, 3} if order == 0 else {0, 1}
        centre = r.face_id[32, 34].item()
        assert centre in near_faces and abs(r.depth[32, 34].item() - 2.0) < 1e-9
        assert r.face_id[24, 24].item() not in near_faces | {-1} and abs(r.depth[24, 24].item() - 3.0) < 1e-9
        assert r.face_id[5, 5].item() == -1


def test_plane_projected_area_and_cube_depth():
    f, z, half = 100.0, 4.0, 0.5
    W = H = 101
    K = torch.tensor(intrinsics(W, H, f))
    verts, faces = square(z, half)
    r = rasterize(torch.tensor(verts), torch.tensor(faces), K, W, H)
    side = f * 2 * half / z  # 25 px
    assert abs(r.mask.sum().item() - side ** 2) <= 4 * side + 4  # one pixel row of slack around
    # A unit cube in front of the camera: its front face hides the rest.
    c = np.array([[x, y, zz] for x in (-half, half) for y in (-half, half) for zz in (z, z + 1)])
    cube_faces = np.array([[0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3], [0, 1, 3], [0, 3, 2],
                           [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1], [2, 3, 7], [2, 7, 6]])
    rc = rasterize(torch.tensor(c), torch.tensor(cube_faces), K, W, H)
    assert rc.mask.sum().item() == r.mask.sum().item()
    assert torch.allclose(rc.depth[rc.mask], torch.full_like(rc.depth[rc.mask], z))
    assert set(rc.face_id[45:56, 45:56].unique().tolist()) <= {0, 1}


def test_perspective_correct_barycentrics_on_a_tilted_plane():
    verts = np.array([[-1.0, -1.0, 2.0], [1.5, -1.0, 5.0], [0.0, 1.2, 3.0]])
    faces = np.array([[0, 1, 2]])
    W, H = 80, 60
    K = intrinsics(W, H, 50.0)
    r = rasterize(torch.tensor(verts), torch.tensor(faces), torch.tensor(K), W, H)
    # Interpolating camera-space positions must land on the pixel's own ray at the raster depth.
    p = interpolate(r, torch.tensor(verts), torch.tensor(faces))[r.mask]
    ys, xs = torch.nonzero(r.mask, as_tuple=True)
    assert len(xs) > 500
    np.testing.assert_allclose(p[:, 2], r.depth[r.mask], rtol=1e-9)
    np.testing.assert_allclose(p[:, 0] / p[:, 2] * K[0, 0] + K[0, 2], xs.double(), atol=1e-8)
    np.testing.assert_allclose(p[:, 1] / p[:, 2] * K[1, 1] + K[1, 2], ys.double(), atol=1e-8)
    # Screen-space (affine) weights would not: the depths differ by 2.5x across the triangle.
    assert (r.bary[r.mask].sum(-1) - 1).abs().max() < 1e-12


def test_interpolate_gradients_and_background():
    verts, faces = square(2.0, 0.5)
    K = torch.tensor(intrinsics(32, 32, 40.0))
    r = rasterize(torch.tensor(verts), torch.tensor(faces), K, 32, 32)
    attr = torch.tensor([[1.0], [2.0], [3.0], [4.0]], dtype=torch.float64, requires_grad=True)
    img = interpolate(r, attr, torch.tensor(faces))
    assert (img[~r.mask] == 0).all()
    img.sum().backward()
    # d(sum)/d(attr_v) = total barycentric weight of vertex v over covered pixels.
    expected = torch.zeros(4, dtype=torch.float64)
    fid = r.face_id[r.mask]
    expected.index_add_(0, torch.tensor(faces)[fid].reshape(-1), r.bary[r.mask].reshape(-1))
    assert torch.allclose(attr.grad[:, 0], expected)
    corner = torch.zeros(2, 3, 2, dtype=torch.float64)
    corner[1] = 1.0
    per_corner = interpolate(r, corner)
    assert torch.allclose(per_corner[r.mask][:, 0], (fid == 1).double())


def test_degenerate_and_behind_camera_inputs():
    K = torch.tensor(intrinsics(16, 16, 20.0))
    empty = rasterize(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.long), K, 16, 16)
    assert not empty.mask.any() and torch.isinf(empty.depth).all()
    behind, faces = square(-2.0, 0.5)
    assert not rasterize(torch.tensor(behind), torch.tensor(faces), K, 16, 16).mask.any()
    line = torch.tensor([[0.0, 0, 2], [0.1, 0, 2], [0.2, 0, 2]])
    assert not rasterize(line, torch.tensor([[0, 1, 2]]), K, 16, 16).mask.any()
    with pytest.raises(ValueError):
        rasterize(line, torch.tensor([[0, 1, 5]]), K, 16, 16)


def test_render_mesh_texture_orientation_and_shading():
    # A square facing the camera with u to the right and v up: a texture red on top, blue below.
    verts = torch.tensor([[-0.5, 0.0, -0.5], [0.5, 0.0, -0.5], [0.5, 0.0, 0.5], [-0.5, 0.0, 0.5]])
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    uv = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], dtype=np.float32)[faces]
    tex = np.zeros((8, 8, 3), np.uint8)
    tex[:4, :, 0] = 255
    tex[4:, :, 2] = 255
    cam = Camera(intrinsics(40, 40, 40.0), look_at(np.array([0.0, -2.0, 0.0]), np.zeros(3)), 40, 40)
    out = render_mesh(verts, faces, cam, corner_uv=uv, texture=tex)
    rgb, mask = out["rgb"], out["mask"]
    assert mask[20, 20] and not mask[0, 0]
    assert rgb[12, 20, 0] > 0.99 and rgb[12, 20, 2] < 0.01  # upper half red (image y down, v up)
    assert rgb[28, 20, 2] > 0.99 and rgb[28, 20, 0] < 0.01
    assert out["uv"][20, 28, 0] > 0.85 and out["uv"][20, 12, 0] < 0.15  # u grows to the right
    assert torch.allclose(out["normal"][20, 20].abs(), torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)
    assert torch.allclose(out["depth"][mask], torch.full_like(out["depth"][mask], 2.0), atol=1e-6)
    lit = render_mesh(verts, faces, cam, vertex_colors=torch.ones(4, 3), light_dir=np.array([0.0, -1.0, 0.0]))
    assert torch.allclose(lit["rgb"][20, 20], torch.ones(3), atol=1e-6)  # normal (-Y) faces the light
    side = render_mesh(verts, faces, cam, vertex_colors=torch.ones(4, 3), light_dir=np.array([1.0, 0.0, 0.0]))
    assert torch.allclose(side["rgb"][20, 20], torch.full((3,), 0.3), atol=1e-6)  # ambient only


def test_sample_texture_is_differentiable():
    tex = torch.rand(4, 4, 3, requires_grad=True)
    uv = torch.tensor([[0.125, 0.875]])  # the centre of the top-left texel
    out = sample_texture(tex, uv)
    assert torch.allclose(out[0], tex[0, 0])
    out.sum().backward()
    assert tex.grad[0, 0].sum() == 3 and tex.grad.sum() == 3


def test_anny_body_renders_closed_silhouette(anny_body):
    with torch.no_grad():
        v = anny_body.forward(anny_body.zero_params()).vertices[0]
    centre = ((v.max(0).values + v.min(0).values) / 2).numpy().astype(np.float64)
    cam = Camera(intrinsics(128, 192), look_at(centre + np.array([0.0, -4.0, 0.0]), centre), 128, 192)
    out = render_mesh(v, anny_body.faces, cam)
    mask = out["mask"].numpy()
    # A closed body has no pinholes: every row of the torso is one solid run of pixels.
    row = mask[96]
    runs = np.flatnonzero(np.diff(row.astype(int)))
    assert row.sum() > 10 and len(runs) == 2
    # Normals on the visible surface face the camera.
    n_cam = out["normal_cam"][out["mask"]]
    assert (n_cam[:, 2] < 0).float().mean() > 0.97


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    verts, faces = random_mesh(5, 60)
    K = torch.tensor(intrinsics(96, 64, 80.0), dtype=torch.float32)
    v = torch.tensor(verts, dtype=torch.float32)
    a = rasterize(v, torch.tensor(faces), K, 96, 64)
    b = rasterize(v.cuda(), torch.tensor(faces).cuda(), K.cuda(), 96, 64)
    assert (a.face_id == b.face_id.cpu()).float().mean() > 0.999
    same = a.mask & (a.face_id == b.face_id.cpu())
    assert torch.allclose(a.depth[same], b.depth.cpu()[same], rtol=1e-5)
