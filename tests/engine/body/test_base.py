"""The body models' shared skeleton helpers."""

from __future__ import annotations

import numpy as np

from zeroavatar_blender.engine.body.base import bone_chains


def test_bone_chains_follow_unbranched_runs():
    #      0
    #    /   \
    #   1     3
    #   |    / \
    #   2   4   5
    parents = np.array([-1, 0, 1, 0, 3, 3])
    chain = bone_chains(parents)
    assert chain[2] == chain[1] == 1  # 1 is 0's child among two: starts a chain that 2 continues
    assert chain[4] == 4 and chain[5] == 5 and chain[3] == 3 and chain[0] == 0
