import pytest
import torch

from zeroavatar_blender.engine.field import (
    FieldOutputs, HashGridConfig, NeRFField, NeRFFieldConfig, RadianceField, density_normals, trunc_exp,
)
from zeroavatar_blender.engine.field.nerf import normalize_aabb

AABB = torch.tensor([[-0.5, -0.25, -1.0], [0.5, 0.25, 1.0]])
SMALL = NeRFFieldConfig(encoding=HashGridConfig(n_levels=4, log2_hashmap_size=12, max_resolution=64),
                        hidden_dim=16, color_hidden_dim=16)


def test_outputs_shapes_ranges_and_box():
    field = NeRFField(AABB, SMALL)
    assert isinstance(field, RadianceField)
    x = torch.rand(100, 3) * (AABB[1] - AABB[0]) + AABB[0]
    out = field(x)
    assert isinstance(out, FieldOutputs)
    assert out.density.shape == (100,) and out.rgb.shape == (100, 3) and out.geo_features.shape == (100, 15)
    assert (out.density > 0).all() and ((out.rgb > 0) & (out.rgb < 1)).all()
    outside = torch.tensor([[0.6, 0.0, 0.0], [0.0, 0.3, 0.0], [0.0, 0.0, -1.1]])
    assert (field.density(outside) == 0).all()
    counts = field.parameter_counts()
    assert counts["total"] == counts["encoding"] + counts["density_mlp"] + counts["color_mlp"]


def test_normalisation_uses_one_scale():
    unit, inside = normalize_aabb(torch.tensor([[0.5, 0.25, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 2.0]]), AABB)
    assert torch.allclose(unit[0], torch.tensor([0.75, 0.625, 1.0]))  # longest side (2 m) maps to 1
    assert torch.allclose(unit[1], torch.full((3,), 0.5))
    assert inside.tolist() == [True, True, False]
    with pytest.raises(ValueError, match="aabb"):
        NeRFField(torch.tensor([[0.0, 0, 0], [0.0, 1, 1]]), SMALL)


def test_trunc_exp_clamps_the_gradient():
    x = torch.tensor([1.0, 20.0], requires_grad=True)
    trunc_exp(x).sum().backward()
    assert x.grad[0].item() == pytest.approx(torch.e, rel=1e-6)
    assert x.grad[1].item() == pytest.approx(float(torch.exp(torch.tensor(15.0))), rel=1e-6)


def test_softplus_activation():
    field = NeRFField(AABB, NeRFFieldConfig(encoding=SMALL.encoding, density_activation="softplus", density_bias=-1.0))
    raw, _, _ = field.raw(torch.zeros(5, 3))
    assert torch.allclose(field.field_density(torch.zeros(5, 3)), torch.nn.functional.softplus(raw))


def test_density_prior_hook_adds_weighted_prior():
    field = NeRFField(AABB, SMALL)
    x = torch.rand(50, 3) * 0.4 - 0.2
    base = field.density(x).detach()
    field.set_density_prior(lambda p: 100.0 * (p.norm(dim=-1) < 0.1).float(), weight=0.5)
    expected = base + 50.0 * (x.norm(dim=-1) < 0.1).float()
    assert torch.allclose(field.density(x), expected, atol=1e-5)
    assert torch.allclose(field(x).density, expected, atol=1e-5)
    assert torch.allclose(field.field_density(x), base)
    field.prior_weight = 0.0
    assert torch.allclose(field.density(x), base)
    field.set_density_prior(None)
    assert torch.allclose(field.density(x), base)


def test_density_normals_point_outward_on_a_ball():
    def ball(x):
        return 100.0 * torch.sigmoid(-50.0 * (x.norm(dim=-1) - 0.3))

    x = torch.nn.functional.normalize(torch.randn(20, 3), dim=-1) * 0.3
    n = density_normals(ball, x)
    assert torch.allclose(n, x / 0.3, atol=1e-4)
    field = NeRFField(AABB, SMALL)
    n2 = field.normals(torch.rand(10, 3) * 0.2, create_graph=True)
    assert n2.requires_grad and torch.allclose(n2.norm(dim=-1), torch.ones(10), atol=1e-4)


def test_checkpoint_round_trip_with_weights_only_load(tmp_path):
    field = NeRFField(AABB, SMALL)
    path = tmp_path / "field.pt"
    torch.save(field.state_dict(), path)
    other = NeRFField(AABB * 2, SMALL)  # different box and random init: both come from the file
    other.load_state_dict(torch.load(path, weights_only=True))
    x = torch.rand(64, 3) - 0.5
    assert torch.equal(other.aabb, field.aabb)
    assert torch.equal(other(x).density, field(x).density) and torch.equal(other(x).rgb, field(x).rgb)
