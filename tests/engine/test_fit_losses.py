"""The fit's loss terms as pure functions (fast: no body model)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from zeroavatar_blender.engine import fit_losses as L
from zeroavatar_blender.engine.body.base import rotvec_to_matrix


def _standing() -> torch.Tensor:
    """(1,17,3) COCO keypoints of a person facing -Y (Z up, +X their left), arms hanging."""
    kp = torch.zeros(17, 3, dtype=torch.float64)
    kp[5], kp[6] = torch.tensor([0.18, 0.0, 0.5]), torch.tensor([-0.18, 0.0, 0.5])  # shoulders
    kp[7], kp[8] = torch.tensor([0.18, 0.0, 0.2]), torch.tensor([-0.18, 0.0, 0.2])  # elbows
    kp[11], kp[12] = torch.tensor([0.1, 0.0, 0.0]), torch.tensor([-0.1, 0.0, 0.0])  # hips
    return kp[None]


def _swing(kp: torch.Tensor, side: int, angle: float) -> torch.Tensor:
    """The upper arm of ``side`` (0 left, 1 right) turned forward (toward -Y) by ``angle`` about its shoulder."""
    out = kp.clone()
    sh, el = (5, 7) if side == 0 else (6, 8)
    R = rotvec_to_matrix(torch.tensor([[-angle, 0.0, 0.0]], dtype=kp.dtype))[0]  # about -X: down -> forward
    out[0, el] = kp[0, sh] + R @ (kp[0, el] - kp[0, sh])
    return out


def test_body_forward_is_where_the_torso_faces():
    kp = _standing()
    assert torch.allclose(L.body_forward(kp), torch.tensor([[0.0, -1.0, 0.0]], dtype=kp.dtype), atol=1e-9)
    turn = rotvec_to_matrix(torch.tensor([[0.0, 0.0, math.pi / 2]], dtype=kp.dtype))[0]
    assert torch.allclose(L.body_forward(kp @ turn.T), (turn @ torch.tensor([0.0, -1.0, 0.0], dtype=kp.dtype))[None],
                          atol=1e-9)


@pytest.mark.parametrize("angle", [0.3, -0.5])
def test_upper_arm_depth_is_the_sine_of_the_swing(angle):
    kp = _standing()
    base = L.upper_arm_depth(kp)[0]
    moved = L.upper_arm_depth(_swing(kp, 0, angle))[0]
    assert float(base.abs().max()) < 1e-9
    assert float(moved[0]) == pytest.approx(math.sin(angle), abs=1e-6)  # positive: forward
    assert float(moved[1]) == pytest.approx(0.0, abs=1e-9)  # the other arm is untouched


def test_upper_arm_depth_ignores_the_view_and_the_swing_in_the_frontal_plane():
    """Measured against the torso, not the camera: turning the whole body changes nothing, and
    raising an arm sideways (seen in 2D) is not a depth swing."""
    kp = _swing(_standing(), 1, 0.4)
    turn = rotvec_to_matrix(torch.tensor([[0.2, -0.1, 1.1]], dtype=kp.dtype))[0]
    assert torch.allclose(L.upper_arm_depth(kp @ turn.T), L.upper_arm_depth(kp), atol=1e-9)
    side = _standing().clone()
    side[0, 7] = side[0, 5] + torch.tensor([0.3, 0.0, 0.0], dtype=kp.dtype)  # T-pose left arm
    assert float(L.upper_arm_depth(side)[0, 0]) == pytest.approx(0.0, abs=1e-9)


def test_upper_arm_depth_has_gradients_and_is_batched():
    kp = torch.cat([_standing(), _swing(_standing(), 0, 0.2)]).requires_grad_(True)
    d = L.upper_arm_depth(kp)
    assert d.shape == (2, 2)
    d.square().sum().backward()
    assert kp.grad is not None and np.isfinite(kp.grad.numpy()).all() and float(kp.grad.abs().sum()) > 0


def _square_mask(h: int = 40, w: int = 40, box: tuple[int, int, int, int] = (10, 10, 30, 30)) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    y0, x0, y1, x1 = box
    mask[y0:y1, x0:x1] = True
    return mask


def test_signed_edge_distance_is_half_a_pixel_at_the_border():
    d = L.signed_edge_distance(_square_mask())
    assert d[20, 10] == pytest.approx(-0.5) and d[20, 9] == pytest.approx(0.5)  # left border, inside / outside
    assert d[20, 29] == pytest.approx(-0.5) and d[20, 30] == pytest.approx(0.5)
    assert d[20, 20] == pytest.approx(-9.5) and d[20, 2] == pytest.approx(7.5)
    assert (L.signed_edge_distance(np.zeros((5, 5), bool)) == 0).all()
    assert (L.signed_edge_distance(np.ones((5, 5), bool)) == 0).all()


def test_silhouette_edge_skips_the_image_border():
    face_id = torch.full((20, 30), -1, dtype=torch.long)
    face_id[5:15, 10:20] = 7
    edge = {tuple(p) for p in L.silhouette_edge(face_id).tolist()}
    ring = {(y, x) for y in range(5, 15) for x in range(10, 20) if y in (5, 14) or x in (10, 19)}
    assert edge == ring
    face_id[5:, 10:20] = 7  # now cut by the image's bottom: that side has no edge
    edge = {tuple(p) for p in L.silhouette_edge(face_id).tolist()}
    assert (19, 15) not in edge and (19, 10) in edge and (5, 15) in edge


def test_contour_loss_pulls_both_ways_and_vanishes_on_the_edge():
    """A body edge inside the mask (too thin) costs as much as one outside it (too wide), and the
    gradient moves it toward the mask's edge either way."""
    target = L.silhouette_target(_square_mask(), 1.0, dtype=torch.float64)
    scale = 20.0

    def loss_and_grad(x: float) -> tuple[float, float]:
        uv = torch.tensor([[[x, 20.0]]], dtype=torch.float64, requires_grad=True)
        loss = L.contour_loss(uv, target, scale, 0.1)
        loss.sum().backward()
        return float(loss.detach()), float(uv.grad[0, 0, 0])

    on_edge, _ = loss_and_grad(10.0)  # the left border pixel's centre, like a body edge pixel's point
    assert on_edge == pytest.approx(0.0, abs=1e-12)
    inside, g_in = loss_and_grad(13.0)  # body edge 3 px inside the mask
    outside, g_out = loss_and_grad(7.0)  # 3 px outside
    assert inside == pytest.approx(outside, rel=1e-6) and inside > 0
    assert g_in > 0 > g_out  # descent moves x toward 10 from both sides
    assert L.contour_loss(torch.zeros(1, 0, 2, dtype=torch.float64), target, scale, 0.1).shape == (1,)


def test_bone_tilt_is_the_sine_out_of_the_image_plane():
    kp = torch.zeros(17, 3, dtype=torch.float64)
    kp[13] = torch.tensor([0.0, 0.4, 0.0])  # left knee straight below the hip (y down)
    kp[15] = kp[13] + torch.tensor([0.0, 0.3, 0.3])  # shin 45 degrees away from the camera
    tilt = L.bone_tilt(kp)
    bones = list(L.TILT_BONES)
    assert tilt[bones.index((11, 13))] == pytest.approx(0.0)
    assert tilt[bones.index((13, 15))] == pytest.approx(math.sqrt(0.5))


def test_tilt_terms_only_push_a_bone_across_to_the_detectors_side():
    ref = torch.tensor([[0.6, -0.6, 0.6]], dtype=torch.float64)
    weight = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    fitted = torch.tensor([[0.3, -0.2, -0.9], [-0.5, 0.5, -0.9]], dtype=torch.float64, requires_grad=True)
    terms = L.tilt_terms(fitted, ref, weight, share=0.3)
    # On the detector's side by at least 30 % of its tilt: nothing, whatever the amount.
    assert terms[0, :2].tolist() == [0.0, 0.0]
    # Across the image plane: the shortfall squared, and the gradient points to the detector's side.
    assert terms[1, 0].item() == pytest.approx((0.18 + 0.5) ** 2)
    assert terms[1, 1].item() == pytest.approx((0.18 + 0.5) ** 2)
    assert terms[:, 2].abs().sum() == 0  # weight 0: a bone the detector is unsure about
    terms.sum().backward()
    assert fitted.grad[1, 0] < 0 and fitted.grad[1, 1] > 0


def test_tilt_by_keypoint_lands_on_the_child_joint():
    terms = torch.arange(1.0, 9.0)[None]
    per_kp = L.tilt_by_keypoint(terms)
    assert per_kp.sum() == terms.sum()
    for i, (_, child) in enumerate(L.TILT_BONES):
        assert per_kp[0, child] == terms[0, i]
