"""Named poses for the synthetic ground truth, in Anny's ``local-ref`` convention.

Each bone's rotation vector is about its own joint, in world-aligned axes (X = subject's left,
Y = backwards, Z = up) carried by its parent. Zero is Anny's A-pose (arms ~45 degrees down).
Signs, worked out once: a leg swings forward with a negative X rotation, a knee bends with a
positive X rotation; the left arm rises with a negative Y rotation, the right with a positive.
"""

from __future__ import annotations

import math

import numpy as np

D = math.pi / 180.0

# bone name -> rotation vector (radians)
POSES: dict[str, dict[str, tuple[float, float, float]]] = {
    "standing": {
        "upperarm01.L": (0, 8 * D, 0), "upperarm01.R": (0, -8 * D, 0),
        "lowerarm01.L": (-10 * D, 0, 0), "lowerarm01.R": (-10 * D, 0, 0),
    },
    "walking": {
        "upperleg01.L": (-25 * D, 0, 0), "upperleg01.R": (18 * D, 0, 0),
        "lowerleg01.L": (10 * D, 0, 0), "lowerleg01.R": (30 * D, 0, 0),
        "upperarm01.L": (20 * D, 15 * D, 0), "upperarm01.R": (-20 * D, -15 * D, 0),
        "lowerarm01.L": (-15 * D, 0, 0), "lowerarm01.R": (-25 * D, 0, 0),
        "spine03": (0, 0, 5 * D),
    },
    "arms_raised": {
        "upperarm01.L": (0, -95 * D, 0), "upperarm01.R": (0, 95 * D, 0),
        "lowerarm01.L": (0, -20 * D, 0), "lowerarm01.R": (0, 20 * D, 0),
        "upperleg01.L": (0, 0, 0), "upperleg01.R": (0, 0, 0),
    },
    "kick": {
        "upperleg01.R": (-70 * D, 0, 0), "lowerleg01.R": (25 * D, 0, 0),
        "upperleg01.L": (5 * D, 0, 0),
        "upperarm01.L": (0, -40 * D, 0), "upperarm01.R": (0, 40 * D, 0),
        "spine03": (8 * D, 0, 0),
    },
    "crouching": {
        "upperleg01.L": (-80 * D, 0, -10 * D), "upperleg01.R": (-80 * D, 0, 10 * D),
        "lowerleg01.L": (110 * D, 0, 0), "lowerleg01.R": (110 * D, 0, 0),
        "foot.L": (-30 * D, 0, 0), "foot.R": (-30 * D, 0, 0),
        "spine04": (-25 * D, 0, 0),
        "upperarm01.L": (-40 * D, 20 * D, 0), "upperarm01.R": (-40 * D, -20 * D, 0),
        "lowerarm01.L": (-40 * D, 0, 0), "lowerarm01.R": (-40 * D, 0, 0),
    },
    "sitting": {
        "upperleg01.L": (-88 * D, 0, -5 * D), "upperleg01.R": (-88 * D, 0, 5 * D),
        "lowerleg01.L": (88 * D, 0, 0), "lowerleg01.R": (88 * D, 0, 0),
        "upperarm01.L": (-20 * D, 25 * D, 0), "upperarm01.R": (-20 * D, -25 * D, 0),
        "lowerarm01.L": (-45 * D, 0, 0), "lowerarm01.R": (-45 * D, 0, 0),
    },
    "t_pose": {
        "upperarm01.L": (0, -42 * D, 0), "upperarm01.R": (0, 42 * D, 0),
        "lowerarm01.L": (0, 0, 0), "lowerarm01.R": (0, 0, 0),
    },
    "hands_on_hips": {
        "upperarm01.L": (0, -10 * D, -30 * D), "upperarm01.R": (0, 10 * D, 30 * D),
        "lowerarm01.L": (0, 0, 80 * D), "lowerarm01.R": (0, 0, -80 * D),
    },
    "waving": {
        "upperarm01.R": (0, 100 * D, 0), "lowerarm01.R": (0, 50 * D, 0),
        "upperarm01.L": (0, 10 * D, 0),
        "head": (0, 0, 10 * D),
    },
    "stride": {
        "upperleg01.L": (-35 * D, 0, -5 * D), "upperleg01.R": (25 * D, 0, 5 * D),
        "lowerleg01.R": (40 * D, 0, 0),
        "upperarm01.L": (30 * D, 10 * D, 0), "upperarm01.R": (-35 * D, -10 * D, 0),
        "lowerarm01.R": (-40 * D, 0, 0),
    },
    "contrapposto": {
        "upperleg01.L": (-8 * D, 0, -6 * D), "lowerleg01.L": (15 * D, 0, 0),
        "spine03": (0, 5 * D, 0), "neck01": (0, -5 * D, 0),
        "upperarm01.L": (0, 10 * D, 0), "upperarm01.R": (0, -5 * D, 0),
    },
    "reaching": {
        "upperarm01.L": (-80 * D, -20 * D, 0), "upperarm01.R": (-50 * D, 20 * D, 0),
        "spine04": (-10 * D, 0, 0),
    },
}


def pose_array(name: str, bone_names: list[str]) -> np.ndarray:
    """(J, 3) rotation vectors for a named pose."""
    if name not in POSES:
        raise KeyError(f"unknown pose {name!r}; known: {', '.join(sorted(POSES))}")
    pose = np.zeros((len(bone_names), 3), dtype=np.float64)
    index = {n: i for i, n in enumerate(bone_names)}
    for bone, rotvec in POSES[name].items():
        pose[index[bone]] = rotvec
    return pose
