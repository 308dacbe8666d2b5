"""Diffusion guidance for the ZeroAvatar optimiser: local SD1.x + depth-ControlNet weights, SDS.

weights.py finds and loads the models without downloading; sds.py computes the depth-controlled
Score Distillation Sampling loss; prompts.py builds view-dependent prompts and caches their
embeddings; schedules.py holds the piecewise-linear step schedules the optimiser also uses.
"""

from .prompts import (DEFAULT_TEMPLATE, VIEWS, PromptEmbeddings, ViewPromptCache, ViewThresholds, build_prompt,
                      view_of, view_prompt)
from .schedules import Schedule, as_schedule, value_at
from .sds import DepthControlledSDS, SDSConfig, normalise_depth
from .weights import (GuidancePipeline, GuidanceWeights, default_dtype, find_guidance_weights, list_installed_models,
                      load_guidance_pipeline)

__all__ = [
    "DEFAULT_TEMPLATE", "VIEWS", "PromptEmbeddings", "ViewPromptCache", "ViewThresholds", "build_prompt", "view_of",
    "view_prompt", "Schedule", "as_schedule", "value_at", "DepthControlledSDS", "SDSConfig", "normalise_depth",
    "GuidancePipeline", "GuidanceWeights", "default_dtype", "find_guidance_weights", "list_installed_models",
    "load_guidance_pipeline",
]
