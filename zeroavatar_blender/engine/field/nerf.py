"""The avatar's radiance field: hash grid -> small MLP -> density + geometry features -> colour.

Colour is view-independent on purpose. The optimiser sees one photo and otherwise only
diffusion guidance, which has no consistent notion of specular highlights; a view-dependent head
lets it "paint" different colours for different views (Janus-like artefacts and floaters), and
the result is baked into a diffuse texture for Blender anyway. Albedo-like colour is what the
avatar needs.

The field lives in an axis-aligned box around the posed body (world = Blender frame, metres):
density is zero outside it. Positions are normalised with ONE scale (the box's longest side), so
hash-grid cells are cubes in world space whatever the box's proportions.

A density prior (e.g. the body's density, see body_prior.py) can be attached and is ADDED to the
field's density with a weight the optimiser fades out over the steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol, runtime_checkable

import torch
from torch import nn

from .encoding import HashGridConfig, count_parameters, make_hash_grid

DensityFn = Callable[[torch.Tensor], torch.Tensor]  # (N, 3) world -> (N,) density (1/m)


class _TruncExp(torch.autograd.Function):
    """exp with a gradient clamped at exp(15): the Instant-NGP density activation."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(max=15.0))


def trunc_exp(x: torch.Tensor) -> torch.Tensor:
    return _TruncExp.apply(x)


@dataclass
class FieldOutputs:
    """What a radiance field returns for N points."""

    density: torch.Tensor  # (N,) >= 0, in 1/metre
    rgb: torch.Tensor  # (N, 3) in [0, 1]
    geo_features: torch.Tensor | None = None  # (N, G) features shared with the colour head


@runtime_checkable
class RadianceField(Protocol):
    """What the renderers and the mesh extraction need from a field (NeRFField, analytic fields)."""

    def density(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3) world -> (N,) density."""

    def __call__(self, x: torch.Tensor) -> FieldOutputs:
        """(N, 3) world -> density and colour."""


@dataclass
class NeRFFieldConfig:
    """The field: encoding, the two MLPs, the density activation and its surface level."""

    encoding: HashGridConfig = field(default_factory=HashGridConfig)
    hidden_dim: int = 64  # density MLP width
    n_hidden_layers: int = 1
    geo_feat_dim: int = 15
    color_hidden_dim: int = 64
    color_hidden_layers: int = 1
    density_activation: Literal["trunc_exp", "softplus"] = "trunc_exp"
    density_bias: float = 0.0  # added to the raw density before the activation
    surface_density: float = 50.0  # density (1/m) of the surface level set: masks and mesh extraction


def mlp(in_dim: int, hidden_dim: int, n_hidden_layers: int, out_dim: int) -> nn.Sequential:
    """ReLU MLP with ``n_hidden_layers`` hidden layers and a linear output."""
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(n_hidden_layers):
        layers += [nn.Linear(dim, hidden_dim), nn.ReLU(inplace=True)]
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*layers)


def normalize_aabb(x: torch.Tensor, aabb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """World points -> unit-cube coordinates (one scale: the longest side) and an inside mask.

    x (N, 3), aabb (2, 3) -> ((N, 3) in [0, 1] for points in the box, (N,) bool inside).
    """
    lo, hi = aabb[0], aabb[1]
    centre = (lo + hi) / 2
    scale = (hi - lo).max()
    unit = (x - centre) / scale + 0.5
    inside = ((x >= lo) & (x <= hi)).all(-1)
    return unit, inside


def density_normals(density_fn: DensityFn, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """Outward unit normals -grad(density)/|grad| by autograd. (N, 3) -> (N, 3).

    ``create_graph=True`` when a loss on the normals must train the field (orientation, smoothness).
    """
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        sigma = density_fn(xg)
        (grad,) = torch.autograd.grad(sigma.sum(), xg, create_graph=create_graph)
    return -grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-10)


class NeRFField(nn.Module):
    """Hash-grid NeRF in a world-space box. Call it on (N, 3) world points -> FieldOutputs."""

    def __init__(self, aabb: torch.Tensor, config: NeRFFieldConfig | None = None,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.config = config or NeRFFieldConfig()
        aabb = torch.as_tensor(aabb, dtype=torch.float32)
        if aabb.shape != (2, 3) or not bool((aabb[1] > aabb[0]).all()):
            raise ValueError(f"aabb must be (2, 3) [min, max] with max > min, got {aabb.tolist()}")
        self.register_buffer("aabb", aabb.to(device))
        c = self.config
        self.encoding = make_hash_grid(c.encoding, device)
        self.density_mlp = mlp(self.encoding.out_dim, c.hidden_dim, c.n_hidden_layers, 1 + c.geo_feat_dim).to(device)
        self.color_mlp = mlp(c.geo_feat_dim, c.color_hidden_dim, c.color_hidden_layers, 3).to(device)
        self.prior: DensityFn | None = None
        self.prior_weight = 0.0

    # -- density prior hook --------------------------------------------------------------------
    def set_density_prior(self, prior: DensityFn | None, weight: float = 1.0) -> None:
        """Attach (or detach with None) a density added to the field's as ``weight * prior(x)``.

        The optimiser lowers ``prior_weight`` along a schedule (body_prior.FadingWeight) so the
        body guides early steps and the learned field takes over.
        """
        self.prior = prior
        self.prior_weight = float(weight)

    def density_prior(self, x: torch.Tensor) -> torch.Tensor:
        """The prior's contribution at x: ``prior_weight * prior(x)``, zeros without a prior. (N,)."""
        if self.prior is None or self.prior_weight == 0.0:
            return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        return self.prior_weight * self.prior(x)

    # -- queries -------------------------------------------------------------------------------
    def raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pre-activation density, geometry features and inside-box mask. (N,3) -> (N,), (N,G), (N,)."""
        unit, inside = normalize_aabb(x, self.aabb)
        h = self.density_mlp(self.encoding(unit))
        return h[:, 0] + self.config.density_bias, h[:, 1:], inside

    def activate(self, raw: torch.Tensor) -> torch.Tensor:
        if self.config.density_activation == "trunc_exp":
            return trunc_exp(raw)
        return nn.functional.softplus(raw)

    def field_density(self, x: torch.Tensor) -> torch.Tensor:
        """The learned density alone (no prior), zero outside the box. (N, 3) -> (N,)."""
        raw, _, inside = self.raw(x)
        return self.activate(raw) * inside

    def density(self, x: torch.Tensor) -> torch.Tensor:
        """Learned density plus the weighted prior, zero outside the box. (N, 3) -> (N,)."""
        return self.field_density(x) + self.density_prior(x)

    def forward(self, x: torch.Tensor) -> FieldOutputs:
        raw, geo, inside = self.raw(x)
        sigma = self.activate(raw) * inside + self.density_prior(x)
        rgb = torch.sigmoid(self.color_mlp(geo))
        return FieldOutputs(density=sigma, rgb=rgb, geo_features=geo)

    def normals(self, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        return density_normals(self.density, x, create_graph)

    def parameter_counts(self) -> dict[str, int]:
        return {"encoding": count_parameters(self.encoding), "density_mlp": count_parameters(self.density_mlp),
                "color_mlp": count_parameters(self.color_mlp), "total": count_parameters(self)}
