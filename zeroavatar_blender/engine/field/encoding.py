"""Multiresolution hash-grid encoding (Instant-NGP, Mueller et al. 2022) in plain PyTorch.

Why plain PyTorch: it runs (and trains) on the CPU machines that most users and CI have. On a
CUDA device with tiny-cuda-nn installed, ``make_hash_grid`` swaps in its fused HashGrid, which is
the same encoding (same levels, table size, features, growth factor) at a fraction of the cost.

Conventions (as tiny-cuda-nn): inputs in [0, 1]^3; level l has resolution
floor(base_resolution * b^l) with b = exp((ln max_resolution - ln base_resolution) / (L - 1));
a level whose dense grid fits the table is indexed densely, the others through the spatial hash
``(x * 1) xor (y * 2654435761) xor (z * 805459861) mod T``; features are blended trilinearly,
so the encoding is continuous and differentiable in both the inputs and the tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

_PRIMES = (1, 2654435761, 805459861)


@dataclass
class HashGridConfig:
    """One hash-grid encoding. Defaults are Instant-NGP's; CPU runs want smaller tables."""

    n_levels: int = 16  # L
    n_features_per_level: int = 2  # F
    log2_hashmap_size: int = 19  # T = 2^log2_hashmap_size entries per level at most
    base_resolution: int = 16  # N_min, cells along the unit cube's side at the coarsest level
    max_resolution: int = 2048  # N_max at the finest level
    init_scale: float = 1e-4  # tables start uniform in [-init_scale, init_scale]
    implementation: Literal["auto", "torch", "tcnn"] = "auto"  # auto: tcnn on CUDA when importable
    # How CUDA blends the 8 corners (the CPU always uses "matmul"): millions of 1x8 by 8xF products
    # are an odd shape for cuBLAS (`aten::bmm`, ~8 % of an H100 step); `profile_step --set grid_blend=sum`
    blend: Literal["matmul", "sum"] = "matmul"

    def __post_init__(self) -> None:
        if self.n_levels < 1 or self.n_features_per_level < 1:
            raise ValueError("a hash grid needs at least one level and one feature per level")
        if not 4 <= self.log2_hashmap_size <= 30:
            raise ValueError(f"log2_hashmap_size must be in [4, 30], got {self.log2_hashmap_size}")
        if self.base_resolution < 1 or self.max_resolution < self.base_resolution:
            raise ValueError("need 1 <= base_resolution <= max_resolution")
        if self.blend not in ("matmul", "sum"):
            raise ValueError(f"blend must be 'matmul' or 'sum', got {self.blend!r}")

    @property
    def growth_factor(self) -> float:
        """b, the per-level scale."""
        if self.n_levels == 1:
            return 1.0
        return math.exp((math.log(self.max_resolution) - math.log(self.base_resolution)) / (self.n_levels - 1))

    @property
    def out_dim(self) -> int:
        return self.n_levels * self.n_features_per_level

    @property
    def table_size(self) -> int:
        return 1 << self.log2_hashmap_size


def level_resolutions(config: HashGridConfig) -> list[int]:
    """Cells along the unit cube's side at each level: floor(N_min * b^l)."""
    b = config.growth_factor
    return [int(math.floor(config.base_resolution * b**level + 1e-6)) for level in range(config.n_levels)]


def level_table_sizes(config: HashGridConfig) -> list[int]:
    """Entries per level: the dense grid (res+1)^3 when it fits T (rounded up to 8), else T."""
    sizes = []
    for res in level_resolutions(config):
        dense = (res + 1) ** 3
        sizes.append(min(config.table_size, (dense + 7) // 8 * 8))
    return sizes


def spatial_hash(coords: torch.Tensor) -> torch.Tensor:
    """Instant-NGP's hash of integer grid coordinates. (..., 3) int64 -> (...,) int64 (>= 0).

    Products of coordinates below 2^20 with the primes fit int64; their low bits equal
    tiny-cuda-nn's uint32 arithmetic, so ``mod T`` (T a power of two) agrees with it.
    """
    h = coords[..., 0] * _PRIMES[0]
    h = torch.bitwise_xor(h, coords[..., 1] * _PRIMES[1])
    return torch.bitwise_xor(h, coords[..., 2] * _PRIMES[2])


def _outer3(a: torch.Tensor, op: str) -> torch.Tensor:
    """Combine per-axis terms of the lower/upper corner into the 8 corners. (..., 3, 2) -> (..., 8);
    corner i has offsets (i & 1, (i >> 1) & 1, (i >> 2) & 1) along (x, y, z)."""
    x, y, z = a[..., 0, :], a[..., 1, :], a[..., 2, :]
    x, y, z = x[..., None, None, :], y[..., None, :, None], z[..., :, None, None]
    if op == "xor":
        out = torch.bitwise_xor(torch.bitwise_xor(x, y), z)
    elif op == "add":
        out = x + y + z
    else:
        out = x * y * z
    return out.reshape(*a.shape[:-2], 8)


def dense_rows(base: torch.Tensor, resolutions: torch.Tensor) -> torch.Tensor:
    """Table rows of the 8 corners on densely indexed levels (x + y*(R+1) + z*(R+1)^2).

    base (N, L, 3) int64 lower cell corners, resolutions (L,) -> (N, L, 8) int32 (level-local).
    The far corner at x == 1 is clamped into the grid (it carries zero weight).
    """
    side = (resolutions + 1)[None, :, None, None]
    c = torch.minimum(torch.stack([base, base + 1], -1), side - 1)  # (N, L, 3, 2)
    strides = torch.cat([torch.ones_like(side), side, side * side], 2)  # (1, L, 3, 1)
    return _outer3((c * strides).int(), "add")


def hashed_rows(base: torch.Tensor, table_sizes: torch.Tensor) -> torch.Tensor:
    """Table rows of the 8 corners on hashed levels: per-axis ``(c * prime) mod T`` xor-ed over
    the corners (xor commutes with the mod of a power of two), 8x fewer multiplications than
    hashing each corner. base (N, L, 3) int64, table_sizes (L,) powers of two -> (N, L, 8) int32."""
    c = torch.stack([base, base + 1], -1)  # (N, L, 3, 2)
    primes = torch.tensor(_PRIMES, dtype=torch.int64, device=base.device).reshape(1, 1, 3, 1)
    mask = (table_sizes - 1)[None, :, None, None]
    return _outer3(torch.bitwise_and(c * primes, mask).int(), "xor")


def corner_indices(corners: torch.Tensor, resolutions: torch.Tensor, table_sizes: torch.Tensor,
                   offsets: torch.Tensor, hashed: torch.Tensor) -> torch.Tensor:
    """Reference (per-corner) version of ``dense_rows``/``hashed_rows`` plus level offsets, for
    explicit corners; the tests check the factored versions against it.

    corners (N, L, 8, 3) int64 -> (N, L, 8) int64 row indices into the stacked tables.
    """
    side = (resolutions + 1)[None, :, None]
    dense = corners[..., 0] + corners[..., 1] * side + corners[..., 2] * side * side
    index = torch.where(hashed[None, :, None], spatial_hash(corners), dense)
    return torch.remainder(index, table_sizes[None, :, None]) + offsets[None, :, None]


class _GatherRows(torch.autograd.Function):
    """``table.index_select(0, rows)`` whose CPU backward scatters one feature column at a time.

    ATen's CPU ``index_add_`` into a 2-D table adds each index's row slice as its own tensor
    operation: 10x slower than into a 1-D column (``bench_field --only gather``), and it was 60 %
    of a CPU optimisation step. The sums are the same, in the same order, bit for bit. CUDA keeps
    the native kernel.
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(rows)
        ctx.table_shape = table.shape
        return table.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (rows,) = ctx.saved_tensors
        return scatter_rows(grad, rows, ctx.table_shape[0]), None


def scatter_rows(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Sum ``values`` (M, F) into an (n_rows, F) table at ``rows`` (M,): the adjoint of index_select."""
    if values.device.type != "cpu":
        return values.new_zeros(n_rows, values.shape[1]).index_add(0, rows, values)
    # Strided columns, not a transposed copy: the copy costs more than the scatter saves.
    return torch.stack([values.new_zeros(n_rows).index_add(0, rows, values[:, f]) for f in range(values.shape[1])], 1)


def gather_rows(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(T, F) table, (M,) int rows -> (M, F), differentiable in the table (see _GatherRows)."""
    return _GatherRows.apply(table, rows)


def trilinear_weights(frac: torch.Tensor) -> torch.Tensor:
    """Weights of the 8 corners for fractional positions. (N, L, 3) -> (N, L, 8), summing to 1."""
    return _outer3(torch.stack([1 - frac, frac], -1), "mul")


def blend_corners(weights: torch.Tensor, feats: torch.Tensor, how: str = "matmul") -> torch.Tensor:
    """Trilinear blend of the 8 corners' features. (N, L, 8), (N, L, 8, F) -> (N, L, F).
    "matmul" is a batched matmul (1.8x faster than "sum", multiply-and-add, on the CPU)."""
    if how == "sum":
        return (weights.unsqueeze(-1) * feats).sum(-2)
    return (weights.unsqueeze(-2) @ feats).squeeze(-2)


class HashGridEncoding(nn.Module):
    """Pure-PyTorch hash grid: (N, 3) in [0, 1] -> (N, L * F) features (level-major)."""

    def __init__(self, config: HashGridConfig) -> None:
        super().__init__()
        self.config = config
        res = level_resolutions(config)
        sizes = level_table_sizes(config)
        offsets = [0]
        for s in sizes[:-1]:
            offsets.append(offsets[-1] + s)
        self.register_buffer("resolutions", torch.tensor(res, dtype=torch.int64), persistent=False)
        self.register_buffer("table_sizes", torch.tensor(sizes, dtype=torch.int64), persistent=False)
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.int64), persistent=False)
        hashed = [(r + 1) ** 3 > s for r, s in zip(res, sizes)]
        self.register_buffer("hashed", torch.tensor(hashed, dtype=torch.bool), persistent=False)
        self.register_buffer("offsets32", torch.tensor(offsets, dtype=torch.int32), persistent=False)
        # Resolutions grow with the level, so the dense levels come first.
        self.n_dense = sum(1 for h in hashed if not h)
        if any(hashed[: self.n_dense]):
            raise AssertionError("dense levels must precede hashed ones")
        table = torch.empty(sum(sizes), config.n_features_per_level)
        nn.init.uniform_(table, -config.init_scale, config.init_scale)
        self.embeddings = nn.Parameter(table)

    @property
    def out_dim(self) -> int:
        return self.config.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, 3) in [0, 1] (clamped) -> (N, L * F) in the table's dtype."""
        if x.dim() != 2 or x.shape[-1] != 3:
            raise ValueError(f"hash grid expects (N, 3) positions, got {tuple(x.shape)}")
        x = x.clamp(0.0, 1.0).to(self.embeddings.dtype)
        pos = x[:, None, :] * self.resolutions.to(x.dtype)[None, :, None]  # (N, L, 3)
        base = pos.floor()
        frac = pos - base
        base = base.long()
        k = self.n_dense  # levels [0, k) are dense, [k, L) hashed
        parts = []
        if k > 0:
            parts.append(dense_rows(base[:, :k], self.resolutions[:k]))
        if k < self.config.n_levels:
            parts.append(hashed_rows(base[:, k:], self.table_sizes[k:]))
        rows = (torch.cat(parts, 1) if len(parts) > 1 else parts[0]) + self.offsets32[None, :, None]
        # A gather, not nn.Embedding: its backward is a plain scatter-add (20x faster on CPU), and
        # gather_rows makes that scatter column-wise on the CPU (see _GatherRows).
        feats = gather_rows(self.embeddings, rows.reshape(-1)).reshape(*rows.shape, -1)  # (N, L, 8, F)
        out = blend_corners(trilinear_weights(frac), feats, self.config.blend if feats.is_cuda else "matmul")
        return out.reshape(x.shape[0], -1)


class TcnnHashGrid(nn.Module):
    """tiny-cuda-nn's fused HashGrid with the same configuration (CUDA only)."""

    def __init__(self, config: HashGridConfig) -> None:
        super().__init__()
        import tinycudann as tcnn  # guarded by make_hash_grid

        self.config = config
        self.encoding = tcnn.Encoding(3, {
            "otype": "HashGrid", "n_levels": config.n_levels,
            "n_features_per_level": config.n_features_per_level,
            "log2_hashmap_size": config.log2_hashmap_size,
            "base_resolution": config.base_resolution, "per_level_scale": config.growth_factor,
        })

    @property
    def out_dim(self) -> int:
        return self.config.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoding(x.clamp(0.0, 1.0)).float()


def tcnn_available(device: torch.device | str) -> bool:
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        import tinycudann  # noqa: F401
    except Exception:  # ImportError, or a build that fails to load its CUDA library
        return False
    return True


def make_hash_grid(config: HashGridConfig, device: torch.device | str = "cpu") -> nn.Module:
    """The encoding for ``device``: tiny-cuda-nn's when asked or (auto) available, else PyTorch."""
    if config.implementation == "tcnn" and not tcnn_available(device):
        raise RuntimeError("hash grid implementation 'tcnn' needs a CUDA device and the tinycudann package; "
                           "use implementation='torch' or 'auto'")
    if config.implementation == "tcnn" or (config.implementation == "auto" and tcnn_available(device)):
        return TcnnHashGrid(config).to(device)
    return HashGridEncoding(config).to(device)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
