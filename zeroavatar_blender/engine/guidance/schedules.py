"""Step-dependent settings as piecewise-linear (or piecewise-constant) schedules.

threestudio anneals the SDS timestep range, loss weights and render resolution with small
step -> value tables; this is the same idea without its config magic. A schedule is a sorted
list of ``(step, value)`` points, held constant before the first and after the last point::

    max_t = Schedule([(0, 0.98), (1000, 0.5)])      # anneal from 0.98 to 0.5 over 1000 steps
    max_t(500) == 0.74
    res = Schedule([(0, 64), (2000, 128)], interpolation="step")  # 64 until step 2000, then 128
    Schedule.constant(7.5)(123) == 7.5

Two points at the same step make a jump: at that step and after, the later point's value holds.
Schedules round-trip through JSON (``to_json`` / ``from_json``) so a job can save its settings.
"""

from __future__ import annotations

import bisect
import math
from typing import Any, Literal, Sequence, Union

Interpolation = Literal["linear", "step"]


class Schedule:
    """A value that depends on the optimisation step."""

    __slots__ = ("steps", "values", "interpolation")

    def __init__(self, points: Sequence[tuple[float, float]] | float, interpolation: Interpolation = "linear") -> None:
        if isinstance(points, (int, float)):
            points = [(0, float(points))]
        pts = [(float(s), float(v)) for s, v in points]
        if not pts:
            raise ValueError("a schedule needs at least one (step, value) point")
        for s, v in pts:
            if not (math.isfinite(s) and math.isfinite(v)):
                raise ValueError(f"schedule points must be finite numbers, got ({s}, {v})")
        if any(b[0] < a[0] for a, b in zip(pts, pts[1:])):
            raise ValueError(f"schedule steps must not decrease: {[s for s, _ in pts]}")
        if interpolation not in ("linear", "step"):
            raise ValueError(f"interpolation must be 'linear' or 'step', got {interpolation!r}")
        self.steps = tuple(s for s, _ in pts)
        self.values = tuple(v for _, v in pts)
        self.interpolation: Interpolation = interpolation

    @classmethod
    def constant(cls, value: float) -> "Schedule":
        return cls([(0, value)])

    def __call__(self, step: float) -> float:
        i = bisect.bisect_right(self.steps, float(step))  # points at or before `step`: [0, i)
        if i == 0:
            return self.values[0]
        if i == len(self.steps) or self.interpolation == "step":
            return self.values[i - 1]
        s0, s1 = self.steps[i - 1], self.steps[i]
        v0, v1 = self.values[i - 1], self.values[i]
        return v0 + (v1 - v0) * (float(step) - s0) / (s1 - s0)  # s1 > s0: equal steps are passed by bisect_right

    def at_int(self, step: float) -> int:
        """The value rounded to the nearest integer (resolutions, sample counts)."""
        return int(round(self(step)))

    @property
    def is_constant(self) -> bool:
        return len(set(self.values)) == 1

    def to_json(self) -> dict[str, Any]:
        return {"points": [[s, v] for s, v in zip(self.steps, self.values)], "interpolation": self.interpolation}

    @classmethod
    def from_json(cls, data: Any) -> "Schedule":
        """Accepts ``to_json`` output, a bare list of ``[step, value]`` pairs, or a number."""
        if isinstance(data, dict):
            return cls([tuple(p) for p in data["points"]], data.get("interpolation", "linear"))
        if isinstance(data, (int, float)):
            return cls.constant(float(data))
        return cls([tuple(p) for p in data])

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Schedule) and self.steps == other.steps and self.values == other.values
                and self.interpolation == other.interpolation)

    def __hash__(self) -> int:
        return hash((self.steps, self.values, self.interpolation))

    def __repr__(self) -> str:
        pts = ", ".join(f"({s:g}, {v:g})" for s, v in zip(self.steps, self.values))
        extra = "" if self.interpolation == "linear" else f", interpolation={self.interpolation!r}"
        return f"Schedule([{pts}]{extra})"


ScheduleLike = Union[float, int, Schedule, Sequence[tuple[float, float]]]


def as_schedule(value: ScheduleLike) -> Schedule:
    """A number (constant), a list of (step, value) points, or a Schedule -> Schedule."""
    if isinstance(value, Schedule):
        return value
    if isinstance(value, bool):
        raise TypeError("a schedule value must be a number, not a bool")
    if isinstance(value, (int, float)):
        return Schedule.constant(float(value))
    return Schedule(value)


def value_at(value: ScheduleLike, step: float) -> float:
    """Evaluate a number or a schedule at ``step``."""
    return as_schedule(value)(step)
