import math

import pytest
import torch

from zeroavatar_blender.engine.field.encoding import (
    HashGridConfig, HashGridEncoding, blend_corners, corner_indices, count_parameters, dense_rows, gather_rows, hashed_rows,
    level_resolutions, level_table_sizes, make_hash_grid, spatial_hash, trilinear_weights,
)

_CORNERS = torch.tensor([[(i >> 0) & 1, (i >> 1) & 1, (i >> 2) & 1] for i in range(8)])


def test_levels_grow_geometrically_from_base_to_max():
    cfg = HashGridConfig(n_levels=16, base_resolution=16, max_resolution=2048, log2_hashmap_size=19)
    res = level_resolutions(cfg)
    assert res[0] == 16 and res[-1] == 2048
    assert cfg.growth_factor == pytest.approx(math.exp(math.log(2048 / 16) / 15))
    assert all(b > a for a, b in zip(res, res[1:]))
    sizes = level_table_sizes(cfg)
    assert sizes[0] == (17**3 + 7) // 8 * 8  # coarse levels are dense
    assert sizes[-1] == 2**19  # fine levels are hashed into T entries
    enc = HashGridEncoding(cfg)
    assert count_parameters(enc) == sum(sizes) * 2
    assert enc.out_dim == 32


def test_spatial_hash_is_instant_ngp_hash():
    c = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [3, 5, 7]])
    expected = [0, 1, 2654435761, 3 ^ (5 * 2654435761) ^ (7 * 805459861)]
    assert spatial_hash(c).tolist() == expected


@pytest.mark.parametrize("log2t", [10, 14])
def test_factored_corner_rows_match_per_corner_indices(log2t):
    """The per-axis hashing/indexing used in forward equals hashing each of the 8 corners."""
    cfg = HashGridConfig(n_levels=6, base_resolution=4, max_resolution=300, log2_hashmap_size=log2t)
    enc = HashGridEncoding(cfg)
    x = torch.rand(500, 3)
    base = (x[:, None, :] * enc.resolutions[None, :, None]).floor().long()
    corners = base[:, :, None, :] + _CORNERS[None, None]
    ref = corner_indices(corners, enc.resolutions, enc.table_sizes, enc.offsets, enc.hashed)
    k = enc.n_dense
    assert 0 < k < cfg.n_levels  # both kinds of level are exercised
    got = torch.cat([dense_rows(base[:, :k], enc.resolutions[:k]),
                     hashed_rows(base[:, k:], enc.table_sizes[k:])], 1).long() + enc.offsets[None, :, None]
    assert torch.equal(got, ref)


def test_trilinear_weights_sum_to_one_and_pick_corners():
    frac = torch.rand(10, 3, 3)
    w = trilinear_weights(frac)
    assert torch.allclose(w.sum(-1), torch.ones(10, 3))
    at_corner = trilinear_weights(torch.tensor([[[1.0, 0.0, 1.0]]]))
    assert at_corner[0, 0].argmax().item() == 1 + 4  # corner (1, 0, 1)


def test_both_corner_blends_agree_in_value_and_gradient():
    torch.manual_seed(0)
    w = torch.rand(50, 4, 8, requires_grad=True)
    f = torch.randn(50, 4, 8, 2, requires_grad=True)
    grads = []
    for how in ("matmul", "sum"):
        out = blend_corners(w, f, how)
        (gw, gf) = torch.autograd.grad((out * torch.linspace(-1, 1, 2)).sum(), (w, f))
        grads.append((out.detach(), gw, gf))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    # the blend is the weighted sum of the corners: a corner with all the weight gives its features
    one = torch.zeros(1, 1, 8)
    one[0, 0, 5] = 1.0
    torch.testing.assert_close(blend_corners(one, f[:1, :1]), f[:1, :1, 5].detach())


def test_dense_level_interpolates_a_linear_function_exactly():
    cfg = HashGridConfig(n_levels=1, n_features_per_level=1, base_resolution=8, max_resolution=8,
                         log2_hashmap_size=12)
    enc = HashGridEncoding(cfg).double()
    r = 8
    i, j, k = torch.meshgrid(*(torch.arange(r + 1),) * 3, indexing="ij")
    table = torch.zeros_like(enc.embeddings)
    table[(i + j * (r + 1) + k * (r + 1) ** 2).reshape(-1), 0] = (i + 2 * j - 3 * k).reshape(-1).double()
    with torch.no_grad():
        enc.embeddings.copy_(table)
    x = torch.rand(200, 3, dtype=torch.float64)
    expected = r * (x[:, 0] + 2 * x[:, 1] - 3 * x[:, 2])
    assert torch.allclose(enc(x)[:, 0], expected, atol=1e-9)


def test_gradients_in_inputs_and_tables():
    cfg = HashGridConfig(n_levels=4, base_resolution=4, max_resolution=64, log2_hashmap_size=10, init_scale=1.0)
    enc = HashGridEncoding(cfg).double()
    x = (torch.rand(8, 3, dtype=torch.float64) * 0.9 + 0.05).requires_grad_(True)
    assert torch.autograd.gradcheck(enc, (x,), eps=1e-7, atol=1e-5)
    enc(x).square().sum().backward()
    g = enc.embeddings.grad
    assert g is not None and 0 < int((g != 0).any(-1).sum()) <= 8 * 8 * 4  # sparse: only touched rows


def test_gather_rows_gradient_is_the_native_scatter_bit_for_bit():
    # Repeated rows: their gradients add up in the same order as ATen's 2-D index_add_ (the runs'
    # resume and reproducibility checks compare results bit for bit).
    g = torch.Generator().manual_seed(0)
    table = torch.randn(50, 3, generator=g, requires_grad=True)
    rows = torch.randint(0, 50, (4000,), generator=g, dtype=torch.int32)
    upstream = torch.randn(4000, 3, generator=g)
    out = gather_rows(table, rows)
    assert torch.equal(out, table.detach().index_select(0, rows))
    (out * upstream).sum().backward()
    assert torch.equal(table.grad, torch.zeros(50, 3).index_add_(0, rows, upstream))
    assert not table.grad[torch.bincount(rows.long(), minlength=50) == 0].any()


def test_gather_rows_is_twice_differentiable():
    table = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    rows = torch.tensor([0, 3, 3, 5, 1, 0])
    assert torch.autograd.gradcheck(lambda t: gather_rows(t, rows).square(), (table,))
    assert torch.autograd.gradgradcheck(lambda t: gather_rows(t, rows).square(), (table,))


def test_encoding_fits_a_function():
    torch.manual_seed(0)
    enc = HashGridEncoding(HashGridConfig(n_levels=6, base_resolution=4, max_resolution=64, log2_hashmap_size=12))
    head = torch.nn.Linear(enc.out_dim, 1)
    opt = torch.optim.Adam(list(enc.parameters()) + list(head.parameters()), lr=1e-2)

    def target(x):
        return torch.sin(6 * x[:, 0]) * torch.cos(4 * x[:, 1]) + x[:, 2]

    x_test = torch.rand(2000, 3)
    before = (head(enc(x_test))[:, 0] - target(x_test)).square().mean().item()
    for _ in range(150):
        x = torch.rand(2048, 3)
        loss = (head(enc(x))[:, 0] - target(x)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = (head(enc(x_test))[:, 0] - target(x_test)).square().mean().item()
    assert after < before / 50, (before, after)


def test_make_hash_grid_on_cpu_and_errors():
    enc = make_hash_grid(HashGridConfig(n_levels=2, log2_hashmap_size=8, max_resolution=32), "cpu")
    assert isinstance(enc, HashGridEncoding)
    with pytest.raises(RuntimeError, match="tinycudann"):
        make_hash_grid(HashGridConfig(implementation="tcnn"), "cpu")
    with pytest.raises(ValueError, match="log2_hashmap_size"):
        HashGridConfig(log2_hashmap_size=40)
    with pytest.raises(ValueError, match="base_resolution"):
        HashGridConfig(base_resolution=64, max_resolution=32)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        enc(torch.rand(4, 2))
