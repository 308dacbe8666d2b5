import os
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from zeroavatar_blender.engine.body import COCO17, load_body
from zeroavatar_blender.engine.body.base import BodyParams
from zeroavatar_blender.engine.body.convert import convert_smpl_to_npz, main as convert_main
from zeroavatar_blender.engine.body.smpl_body import SMPL_TO_WORLD, SMPLBody, bone_tails
from zeroavatar_blender.engine.errors import BadInputError, MissingModelError

from .synthetic_smpl import build_model, save_npz, save_official_pkl, write_model_folder

ROOT = Path(__file__).resolve().parents[3]
KP = {n: i for i, n in enumerate(COCO17)}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("smpl_models")
    return {(kind, fmt): write_model_folder(root / f"{kind}_{fmt}", kind, fmt)
            for kind in ("smpl", "smplx") for fmt in ("npz", "pkl")}


@pytest.fixture(scope="module", params=["smpl", "smplx"])
def body(request, files):
    return load_body(request.param, files[(request.param, "npz")].parent)


def random_params(body, batch=2, scale=0.5, seed=0, all_bones=False):
    g = torch.Generator().manual_seed(seed)
    p = body.zero_params(batch)
    bones = list(range(1, body.num_bones)) if all_bones else body.fit_bones
    p.pose[:, bones] = (torch.rand(batch, len(bones), 3, generator=g, dtype=body.dtype) - 0.5) * 2 * scale
    p.shape = torch.randn(batch, body.shape_dim, generator=g, dtype=body.dtype)
    p.global_orient = torch.rand(batch, 3, generator=g, dtype=body.dtype) - 0.5
    p.transl = torch.rand(batch, 3, generator=g, dtype=body.dtype)
    return p


@pytest.mark.parametrize("kind", ["smpl", "smplx"])
def test_npz_and_official_pkl_give_the_same_body(files, kind):
    a = load_body(kind, files[(kind, "npz")])
    b = load_body(kind, files[(kind, "pkl")])
    assert a is not b and a.num_bones == {"smpl": 24, "smplx": 55}[kind]
    assert load_body(kind, files[(kind, "npz")]) is a  # cached
    assert "chumpy" not in sys.modules
    params = random_params(a)
    with torch.no_grad():
        assert torch.allclose(a.forward(params).vertices, b.forward(params).vertices, atol=1e-6)
    assert np.array_equal(a.faces, b.faces)


@pytest.mark.parametrize("kind", ["smpl", "smplx"])
def test_matches_smplx_lbs_without_pose_correctives(files, kind):
    """Our forward = smplx's own lbs() with posedirs off and top-4 weights, turned into the world frame."""
    import smplx
    from smplx.lbs import lbs
    from smplx.utils import Struct

    body = load_body(kind, files[(kind, "npz")].parent)
    model = build_model(kind)
    ref = smplx.SMPL(model_path="", data_struct=Struct(**model), num_betas=10)  # smplx's own loader
    params = random_params(body, all_bones=True)
    params.global_orient.zero_()
    params.transl.zero_()
    full_pose = params.pose.clone()
    full_pose[:, 0] = 0
    W = torch.zeros_like(ref.lbs_weights).scatter_(1, body.skin_indices, body.skin_weights)
    with torch.no_grad():
        out = body.forward(params)
        args = (params.shape, full_pose.reshape(2, -1), ref.v_template, ref.shapedirs)
        expected, _ = lbs(*args, ref.posedirs * 0, ref.J_regressor, ref.parents, W)
        with_correctives, _ = lbs(*args, ref.posedirs, ref.J_regressor, ref.parents, W)
    C = torch.as_tensor(SMPL_TO_WORLD, dtype=torch.float32)
    assert torch.allclose(out.vertices, expected @ C.T, atol=1e-5)
    # the file's pose correctives are real (nonzero) and deliberately not applied
    assert (with_correctives - expected).abs().max() > 1e-3


def test_frame_conventions(body):
    with torch.no_grad():
        out = body.forward(body.zero_params())
    v, kp = out.vertices[0], out.keypoints[0]
    assert out.vertices.shape == (1, body.num_vertices, 3) and kp.shape == (17, 3)
    height = (v[:, 2].max() - v[:, 2].min()).item()
    assert 1.4 < height < 2.0  # metres, Z up
    pelvis = out.bone_rest[0, 0, :3, 3]
    assert kp[KP["nose"], 1] < pelvis[1] - 0.05  # the face points to -Y
    assert kp[KP["nose"], 2] > kp[KP["left_shoulder"], 2] > kp[KP["left_hip"], 2] > kp[KP["left_knee"], 2] \
        > kp[KP["left_ankle"], 2]  # head up, feet down
    for side in ("shoulder", "elbow", "wrist", "hip", "knee", "ankle", "eye", "ear"):
        assert kp[KP[f"left_{side}"], 0] > 0.02 > -0.02 > kp[KP[f"right_{side}"], 0]  # +X is the left
    assert torch.allclose(out.bone_transforms[0], torch.eye(4).expand_as(out.bone_transforms[0]), atol=1e-6)
    assert torch.allclose(out.vertices, out.rest_vertices, atol=1e-6)


def test_keypoints_are_sensible(body):
    with torch.no_grad():
        kp = body.forward(body.zero_params()).keypoints[0]
    nose, leye, reye, lear, rear = kp[:5]
    assert 0.01 < (leye - nose).norm() < 0.1 and 0.01 < (reye - nose).norm() < 0.1
    assert lear[0] > leye[0] > nose[0] > reye[0] > rear[0]
    assert nose[1] < leye[1] and nose[1] < lear[1]  # the nose is the most forward
    # keypoints follow the pose: bend the left elbow, the left wrist moves, the right one does not
    p = body.zero_params()
    p.pose[0, body.bone_names.index("left_elbow")] = torch.tensor([0.0, 1.2, 0.0])
    with torch.no_grad():
        bent = body.forward(p).keypoints[0]
    assert (bent[KP["left_wrist"]] - kp[KP["left_wrist"]]).norm() > 0.1
    assert torch.allclose(bent[KP["right_wrist"]], kp[KP["right_wrist"]], atol=1e-6)
    assert torch.allclose(bent[KP["left_elbow"]], kp[KP["left_elbow"]], atol=1e-6)


def test_official_topology_uses_smplx_vertex_ids():
    """A mesh with the official vertex count takes nose/eyes/ears from smplx.vertex_ids."""
    from smplx.vertex_ids import vertex_ids

    model = build_model("smpl")
    extra = 6890 - len(model["v_template"])
    pad = lambda a, axis=0: np.concatenate([a, np.zeros_like(a[:1]).repeat(extra, axis)], axis)  # noqa: E731
    model["v_template"] = np.concatenate([model["v_template"], np.linspace(-0.1, 0.1, extra * 3).reshape(-1, 3)])
    model["weights"] = np.concatenate([model["weights"], np.eye(24)[np.zeros(extra, int)]])
    model["shapedirs"] = pad(model["shapedirs"])
    model["posedirs"] = pad(model["posedirs"][:, :, :1])
    model["J_regressor"] = np.concatenate([model["J_regressor"], np.zeros((24, extra))], 1)
    body = SMPLBody("smpl", model)
    assert body.keypoint_source == "official vertex ids"
    with torch.no_grad():
        out = body.forward(body.zero_params())
    ids = [vertex_ids["smplh"][k] for k in ("nose", "leye", "reye", "lear", "rear")]
    assert torch.equal(out.keypoints[0, :5], out.vertices[0, ids])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pose_round_trip_through_bone_matrices(files, dtype):
    for kind in ("smpl", "smplx"):
        body = load_body(kind, files[(kind, "npz")], dtype=dtype)
        params = random_params(body, all_bones=True, scale=1.0)
        with torch.no_grad():
            out = body.forward(params)
            back = body.params_from_bone_posed(out.bone_posed, params.shape)
            again = body.forward(back)
        err = (again.vertices - out.vertices).norm(dim=-1).max().item()
        assert err < 1e-5, (kind, dtype, err)
        assert torch.allclose(back.pose[:, 1:], params.pose[:, 1:], atol=1e-4)
        assert torch.allclose(back.global_orient, params.global_orient, atol=1e-5)
        assert torch.allclose(back.transl, params.transl, atol=1e-5)


def test_bone_rest_matrices(body):
    params = random_params(body)
    with torch.no_grad():
        out = body.forward(params)
    rest = out.bone_rest
    R = rest[..., :3, :3]
    eye = torch.eye(3).expand_as(R)
    assert torch.allclose(R.transpose(-1, -2) @ R, eye, atol=1e-5)
    assert torch.allclose(torch.linalg.det(R), torch.ones(R.shape[:2]), atol=1e-5)
    heads = rest[..., :3, 3]
    tails = bone_tails(body.bone_names, body.bone_parents)
    for j, t in enumerate(tails):
        if t >= 0:  # Y along the bone, towards its main child
            d = heads[:, t] - heads[:, j]
            assert torch.allclose(R[:, j, :, 1], d / d.norm(dim=-1, keepdim=True), atol=1e-5)
    names = body.bone_names
    assert tails[names.index("pelvis")] == names.index("spine1")
    assert tails[names.index("spine3")] == names.index("neck")
    assert tails[names.index("head")] == -1
    # posed bone heads = posed joints (what Blender's pose bones hold)
    posed_heads = out.bone_posed[..., :3, 3]
    expect = (out.bone_transforms[..., :3, :3] @ heads[..., None])[..., 0] + out.bone_transforms[..., :3, 3]
    assert torch.allclose(posed_heads, expect, atol=1e-5)


def test_skinning_is_top4_and_differentiable(body):
    w = body.skin_weights
    assert w.shape == (body.num_vertices, 4) and body.skin_indices.shape == (body.num_vertices, 4)
    assert torch.allclose(w.sum(-1), torch.ones(len(w)), atol=1e-6) and (w >= 0).all()
    params = random_params(body, batch=1)
    for t in (params.pose, params.shape, params.global_orient, params.transl):
        t.requires_grad_(True)
    out = body.forward(params)
    (out.vertices.square().sum() + out.keypoints.square().sum()).backward()
    for t in (params.pose, params.shape, params.global_orient, params.transl):
        assert torch.isfinite(t.grad).all() and t.grad.abs().max() > 0


def test_uv_layout(files):
    smpl = load_body("smpl", files[("smpl", "npz")])
    assert smpl.uv_source.startswith("generated")
    uv = smpl.corner_uv
    assert uv.shape == (len(smpl.faces), 3, 2) and uv.dtype == np.float32
    assert uv.min() >= 0 and uv.max() <= 1
    e1, e2 = uv[:, 1] - uv[:, 0], uv[:, 2] - uv[:, 0]
    area = 0.5 * (e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0])
    assert (area > 1e-7).mean() > 0.95  # non-degenerate and consistently oriented
    # each body part gets its own rectangle of the atlas
    part = build_model("smpl")["weights"][smpl.faces].sum(1).argmax(-1)
    boxes = [(uv[part == p].reshape(-1, 2).min(0), uv[part == p].reshape(-1, 2).max(0)) for p in np.unique(part)]
    for i, (lo_a, hi_a) in enumerate(boxes):
        for lo_b, hi_b in boxes[i + 1:]:
            assert (hi_a <= lo_b).any() or (hi_b <= lo_a).any()

    smplx_body = load_body("smplx", files[("smplx", "npz")])
    model = build_model("smplx")
    assert smplx_body.uv_source.startswith("model file")
    assert np.allclose(smplx_body.corner_uv, model["vt"][model["ft"]])


def test_symmetry_maps(body):
    m = body.vertex_mirror()
    assert m.shape == (body.num_vertices,) and (m[m] == np.arange(len(m))).all()
    with torch.no_grad():
        rest = body.forward(body.zero_params()).rest_vertices[0].numpy()
    assert np.allclose(rest[m], rest * [-1, 1, 1], atol=1e-5)
    bm, names = body.bone_mirror(), body.bone_names
    assert names[bm[names.index("left_knee")]] == "right_knee"
    assert names[bm[names.index("right_collar")]] == "left_collar"
    assert bm[names.index("head")] == names.index("head")
    if body.id == "smplx":
        assert names[bm[names.index("left_index1")]] == "right_index1"


def test_prior_hints(body):
    assert body.shape_prior == "gaussian" and body.shape_bounds is None
    assert torch.equal(body.default_shape(2), torch.zeros(2, 10))
    assert np.allclose(body.pose_frame @ [0, 1, 0], [0, 0, 1])  # SMPL's up is the world's up
    p = body.zero_params()
    p.pose = torch.as_tensor(body.natural_pose(), dtype=body.dtype)[None]
    with torch.no_grad():
        kp = body.forward(p).keypoints[0]
    for side in ("left", "right"):  # arms down
        assert kp[KP[f"{side}_wrist"], 2] < kp[KP[f"{side}_shoulder"], 2] - 0.3
    from zeroavatar_blender.engine.pose_prior import body_prior

    prior = body_prior(body)
    limited = {body.bone_names[b] for b in prior.limits.bones.tolist()}
    assert {"left_knee", "right_elbow"} <= limited


def test_missing_model_errors(tmp_path, files):
    with pytest.raises(MissingModelError) as e:
        load_body("smpl", None)
    text = str(e.value)
    assert "https://smpl.is.tue.mpg.de" in text and "--body-model-path" in text and "preferences" in text
    with pytest.raises(MissingModelError, match="https://smpl-x.is.tue.mpg.de"):
        load_body("smplx", tmp_path / "nowhere.npz")
    with pytest.raises(MissingModelError, match="no SMPL-X model file in"):
        load_body("smplx", tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(BadInputError, match="unsupported body-model file type"):
        load_body("smpl", tmp_path / "notes.txt")
    with pytest.raises(BadInputError, match="expected .* for SMPL's 24 joints"):
        load_body("smpl", files[("smplx", "npz")])  # an SMPL-X file given as SMPL
    (tmp_path / "broken.pkl").write_bytes(b"\x80\x02}q\x00")
    with pytest.raises(BadInputError, match="cannot read the body-model file"):
        load_body("smpl", tmp_path / "broken.pkl")


def test_folder_layouts(tmp_path):
    model = build_model("smpl")
    (tmp_path / "smpl").mkdir()
    save_npz(model, tmp_path / "smpl" / "SMPL_FEMALE.npz")
    body = load_body("smpl", tmp_path)  # smplx.create's layout: <folder>/smpl/SMPL_*.npz
    assert body.source.name == "SMPL_FEMALE.npz"
    save_official_pkl(model, tmp_path / "smpl" / "SMPL_NEUTRAL.pkl")
    assert load_body("smpl", tmp_path).source.name == "SMPL_NEUTRAL.pkl"  # neutral first


def test_malicious_model_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    evil = dict(build_model("smpl"))
    evil["bs_style"] = Payload()
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "SMPL_NEUTRAL.pkl").write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(BadInputError, match="refusing to load 'posix.system'|refusing to load 'os.system'"):
        load_body("smpl", folder)
    assert convert_main([str(folder / "SMPL_NEUTRAL.pkl"), str(tmp_path / "out.npz")]) == BadInputError.code
    assert not marker.exists() and not (tmp_path / "out.npz").exists()


def test_allow_pickle_falls_back_for_a_trusted_file(tmp_path):
    trusted = dict(build_model("smpl"))
    trusted["stats"] = Counter(a=1)  # harmless, but not something a model file needs
    path = tmp_path / "SMPL_NEUTRAL.pkl"
    path.write_bytes(pickle.dumps(trusted, protocol=2))
    with pytest.raises(BadInputError, match="collections.Counter"):
        load_body("smpl", path)
    with pytest.warns(UserWarning, match="full unpickler"):
        body = load_body("smpl", path, allow_pickle=True)
    assert body.num_vertices == len(trusted["v_template"])


def test_converter_round_trip(tmp_path, files, capsys):
    for kind in ("smpl", "smplx"):
        src = files[(kind, "pkl")]
        dst = convert_smpl_to_npz(src, tmp_path / kind / f"{src.stem}.npz")
        model = build_model(kind)
        with np.load(dst, allow_pickle=False) as z:  # plain arrays only
            data = {k: z[k] for k in z.files}
        for key in ("v_template", "shapedirs", "posedirs", "J_regressor", "weights", "f", "kintree_table"):
            assert np.array_equal(data[key], model[key]), key
        assert "pose_training_info" not in data
        a, b = load_body(kind, src), load_body(kind, dst)
        params = random_params(a)
        with torch.no_grad():
            assert torch.equal(a.forward(params).vertices, b.forward(params).vertices)
        assert np.array_equal(a.corner_uv, b.corner_uv)
    assert convert_main([str(files[("smpl", "pkl")]), str(tmp_path / "cli.npz")]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "pose_training_info" in out
    assert convert_main([str(tmp_path / "missing.pkl"), str(tmp_path / "x.npz")]) == BadInputError.code


def test_converter_runs_as_a_module(tmp_path, files):
    dst = tmp_path / "SMPL_NEUTRAL.npz"
    proc = subprocess.run([sys.executable, "-m", "zeroavatar_blender.engine.body.convert",
                           str(files[("smpl", "pkl")]), str(dst)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert dst.is_file() and "wrote" in proc.stdout


def test_params_are_the_base_dataclass(body):
    p = body.zero_params(3)
    assert isinstance(p, BodyParams) and p.pose.shape == (3, body.num_bones, 3) and p.shape.shape == (3, 10)


def test_known_height_prior_reaches_the_height(body):
    """The fit's known-height prior works through the body interface alone (no Anny names)."""
    from zeroavatar_blender.engine import pose_prior as P
    from zeroavatar_blender.engine.body.base import rest_height

    with torch.no_grad():
        h0 = float(rest_height(body.forward(body.zero_params()).rest_vertices)[0])
    for ratio in (0.95, 1.08):
        prior = P.prior_for_height(body, ratio * h0)
        p = body.zero_params()
        p.shape = prior.shape_mean[None]
        with torch.no_grad():
            assert abs(float(rest_height(body.forward(p).rest_vertices)[0]) - ratio * h0) < P.HEIGHT_TOLERANCE_M
