"""The avatar's neural field: hash-grid encoding, the NeRF, and the body prior it starts from.

Typical use (the optimiser)::

    aabb = body_aabb(posed_vertices, padding=0.1)
    field = NeRFField(aabb, NeRFFieldConfig())
    prior = BodyPrior.from_mesh(posed_vertices, body.faces)
    distill_body_prior(field, prior, surface_points)      # density starts as the body
    ... each step: loss += FadingWeight(...)(step) * prior_loss(field, prior, points)
"""

from .body_prior import (
    BodyPrior, BodyPriorConfig, DistillConfig, DistillReport, FadingWeight, SdfGrid, body_aabb, body_sdf_grid,
    distill_body_prior, prior_loss, sample_surface, sdf_to_density,
)
from .encoding import HashGridConfig, HashGridEncoding, count_parameters, make_hash_grid
from .nerf import FieldOutputs, NeRFField, NeRFFieldConfig, RadianceField, density_normals, trunc_exp

__all__ = [
    "BodyPrior", "BodyPriorConfig", "DistillConfig", "DistillReport", "FadingWeight", "FieldOutputs",
    "HashGridConfig", "HashGridEncoding", "NeRFField", "NeRFFieldConfig", "RadianceField", "SdfGrid",
    "body_aabb", "body_sdf_grid", "count_parameters", "density_normals", "distill_body_prior",
    "make_hash_grid", "prior_loss", "sample_surface", "sdf_to_density", "trunc_exp",
]
