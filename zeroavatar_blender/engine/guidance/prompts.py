"""View-dependent prompts and their cached text embeddings.

DreamFusion's trick against the "Janus" (faces everywhere) problem: tell the diffusion model
which side it is looking at by appending "front view" / "side view" / "back view" /
"overhead view" to the prompt, chosen from the camera's azimuth and elevation. Azimuths follow
``cameras.orbit_camera``: 0 = the subject's front (camera at -Y), 90 = the subject's left,
180 = the back. The text encoder runs once per view; each step only gathers rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..transfer import to_device

VIEWS = ("front", "side", "back", "overhead")
DEFAULT_SUBJECT = "a person"
DEFAULT_TEMPLATE = "a photo of {subject}, full body, high quality, detailed, realistic"
DEFAULT_NEGATIVE_PROMPT = ""  # SDS's unconditional branch: the empty prompt, as DreamFusion


@dataclass(frozen=True)
class ViewThresholds:
    """Degrees. Front within ``front`` of azimuth 0, back within ``back`` of 180, side between;
    any view whose elevation exceeds ``overhead`` is "overhead" (None: never)."""

    front: float = 45.0
    back: float = 45.0
    overhead: float | None = 60.0

    def __post_init__(self) -> None:
        if not (0 <= self.front and 0 <= self.back and self.front + self.back <= 180):
            raise ValueError(f"view thresholds need 0 <= front, back and front + back <= 180, got {self}")


def build_prompt(user_text: str | None = None, template: str = DEFAULT_TEMPLATE) -> str:
    """The base prompt: ``user_text`` describes the person ("a woman in a red coat") and fills
    the template's ``{subject}``; empty means "a person". A template without ``{subject}`` is a
    complete user prompt and is used as is."""
    subject = (user_text or "").strip() or DEFAULT_SUBJECT
    return template.replace("{subject}", subject) if "{subject}" in template else template.strip()


def view_prompt(prompt: str, view: str) -> str:
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; expected one of {VIEWS}")
    return f"{prompt}, {view} view"


def view_indices(azimuth_deg: torch.Tensor, elevation_deg: torch.Tensor | None = None,
                 thresholds: ViewThresholds = ViewThresholds()) -> torch.Tensor:
    """(B,) degrees -> (B,) long indices into ``VIEWS``."""
    az = torch.as_tensor(azimuth_deg, dtype=torch.float64).reshape(-1)
    wrapped = torch.remainder(az + 180.0, 360.0) - 180.0  # (-180, 180], 0 = front
    # selected with where, not masked assignment: no data-dependent sizes (free of host waits
    # should the angles ever live on a GPU)
    idx = torch.full(az.shape, VIEWS.index("side"), dtype=torch.long)
    idx = torch.where(wrapped.abs() <= thresholds.front, VIEWS.index("front"), idx)
    idx = torch.where(wrapped.abs() >= 180.0 - thresholds.back, VIEWS.index("back"), idx)
    if elevation_deg is not None and thresholds.overhead is not None:
        el = torch.as_tensor(elevation_deg, dtype=torch.float64).reshape(-1).expand_as(az)
        idx = torch.where(el > thresholds.overhead, VIEWS.index("overhead"), idx)
    return idx


def view_of(azimuth_deg: float, elevation_deg: float = 0.0, thresholds: ViewThresholds = ViewThresholds()) -> str:
    return VIEWS[int(view_indices(torch.tensor([azimuth_deg]), torch.tensor([elevation_deg]), thresholds)[0])]


@dataclass(frozen=True)
class PromptEmbeddings:
    """Text features for a batch of views: conditional and unconditional (negative) halves."""

    cond: torch.Tensor  # (B, L, D)
    uncond: torch.Tensor  # (B, L, D)

    def __post_init__(self) -> None:
        if self.cond.ndim != 3 or self.cond.shape != self.uncond.shape:
            raise ValueError(f"cond/uncond embeddings must both be (B, L, D), got {tuple(self.cond.shape)} "
                             f"and {tuple(self.uncond.shape)}")


class ViewPromptCache:
    """Encodes the prompt once per view (and the negative prompt once) and serves batches.

    ``encode`` maps a list of texts to (N, L, D) features, e.g. ``GuidancePipeline.encode_text``.
    With ``view_dependent=False`` every view gets the plain prompt.
    """

    def __init__(self, encode: Callable[[Sequence[str]], torch.Tensor], prompt: str,
                 negative_prompt: str = DEFAULT_NEGATIVE_PROMPT, *, thresholds: ViewThresholds = ViewThresholds(),
                 view_dependent: bool = True) -> None:
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.thresholds = thresholds
        self.view_dependent = view_dependent
        self.texts = {v: view_prompt(prompt, v) if view_dependent else prompt for v in VIEWS}
        with torch.no_grad():
            feats = encode([self.texts[v] for v in VIEWS] + [negative_prompt])
        if feats.ndim != 3 or feats.shape[0] != len(VIEWS) + 1:
            raise ValueError(f"encode() must return ({len(VIEWS) + 1}, L, D) features, got {tuple(feats.shape)}")
        self._cond = feats[: len(VIEWS)].detach()  # (4, L, D)
        self._uncond = feats[len(VIEWS):].detach()  # (1, L, D)

    def for_views(self, views: Sequence[str]) -> PromptEmbeddings:
        idx = torch.tensor([VIEWS.index(v) for v in views], device=self._cond.device)
        return self._gather(idx)

    def __call__(self, azimuth_deg: torch.Tensor | Sequence[float],
                 elevation_deg: torch.Tensor | Sequence[float] | None = None) -> PromptEmbeddings:
        """(B,) camera azimuths (and elevations) in degrees -> embeddings for those views."""
        el = None if elevation_deg is None else torch.as_tensor(elevation_deg)
        return self._gather(to_device(view_indices(torch.as_tensor(azimuth_deg), el, self.thresholds), self._cond.device))

    def _gather(self, idx: torch.Tensor) -> PromptEmbeddings:
        cond = self._cond.index_select(0, idx)
        return PromptEmbeddings(cond, self._uncond.expand_as(cond))
