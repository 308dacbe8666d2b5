import numpy as np
import torch

from zeroavatar_blender.engine.body.base import BodyParams, rotvec_to_matrix, matrix_to_rotvec


def random_params(body, batch=2, scale=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = body.zero_params(batch)
    pose = torch.zeros_like(p.pose)
    pose[:, body.fit_bones] = (torch.rand(batch, len(body.fit_bones), 3, generator=g) - 0.5) * 2 * scale
    shape = torch.rand(batch, body.shape_dim, generator=g)
    glob = (torch.rand(batch, 3, generator=g) - 0.5)
    transl = torch.rand(batch, 3, generator=g)
    return BodyParams(pose, shape, glob, transl)


def test_rodrigues_round_trip():
    v = torch.tensor([[0.0, 0.0, 0.0], [1e-5, 0, 0], [0.3, -0.2, 0.1], [0, 3.0, 0]], dtype=torch.float64)
    R = rotvec_to_matrix(v)
    assert torch.allclose(R.transpose(-1, -2) @ R, torch.eye(3, dtype=torch.float64).expand_as(R), atol=1e-10)
    assert torch.allclose(matrix_to_rotvec(R), v, atol=1e-8)


def test_forward_shapes_and_frame(anny_body):
    out = anny_body.forward(anny_body.zero_params())
    V = anny_body.num_vertices
    assert out.vertices.shape == (1, V, 3) and out.keypoints.shape == (1, 17, 3)
    v = out.vertices[0]
    height = (v[:, 2].max() - v[:, 2].min()).item()
    assert 1.4 < height < 2.0  # metres, Z up
    kp = out.keypoints[0]
    assert kp[0, 2] > kp[11, 2] > kp[15, 2]  # nose above hips above ankles
    assert kp[5, 0] > 0 > kp[6, 0]  # left shoulder on +X
    assert kp[0, 1] < 0  # the face points to -Y
    assert out.bone_transforms.shape == (1, anny_body.num_bones, 4, 4)


def test_skin_weights_are_top4_normalised(anny_body):
    w = anny_body.skin_weights
    assert w.shape[1] == 4 and torch.allclose(w.sum(-1), torch.ones(len(w)), atol=1e-5)
    assert (w >= 0).all()


def test_pose_round_trip_through_bone_matrices(anny_body):
    params = random_params(anny_body)
    with torch.no_grad():
        out = anny_body.forward(params)
        back = anny_body.params_from_bone_posed(out.bone_posed, params.shape)
        out2 = anny_body.forward(back)
    err = (out2.vertices - out.vertices).norm(dim=-1).max().item()
    assert err < 1e-4, err
    assert torch.allclose(back.pose[:, anny_body.fit_bones], params.pose[:, anny_body.fit_bones], atol=1e-3)


def test_symmetry_maps(anny_body):
    m = anny_body.vertex_mirror()
    assert m.shape == (anny_body.num_vertices,)
    assert (m[m] == np.arange(len(m))).mean() > 0.95
    bm = anny_body.bone_mirror()
    names = anny_body.bone_names
    assert names[bm[names.index("upperarm01.L")]] == "upperarm01.R"
    assert bm[names.index("head")] == names.index("head")
