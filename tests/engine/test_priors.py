"""The garment shape prior: silhouette excess and the offset body SDF."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zeroavatar_blender.engine.cameras import Camera, intrinsics, look_at
from zeroavatar_blender.engine.field.body_prior import SdfGrid
from zeroavatar_blender.engine.priors import excess_at_points, garment_proxy_sdf, run_extra_width, silhouette_excess


def disk(h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def test_no_excess_where_the_person_is_the_body():
    body = disk(64, 64, 32, 32, 12)
    excess = silhouette_excess(body, body, metres_per_pixel=0.01)
    assert excess.shape == body.shape and excess.max() == 0.0


def test_excess_grows_with_the_extra_silhouette_and_stays_inside_the_person():
    body = disk(96, 96, 48, 48, 8)
    person = disk(96, 96, 48, 48, 30)  # a wide skirt around a narrow body
    excess = silhouette_excess(person, body, metres_per_pixel=0.01, dead_zone=0.02, smooth_px=0)
    assert excess[48, 48] == pytest.approx((30 - 8) * 0.01 - 0.02, abs=0.015)
    assert excess[~person].max() == 0.0
    # beside the body it reaches across the gap to the pixel (22 and 29 px from the body's outline)
    # and beyond it in depth, less so towards the outline, like a rounded garment
    gap_mid, gap_edge = 0.22 - 0.08, 0.29 - 0.08
    assert excess[48, 70] > gap_mid and excess[48, 77] > gap_edge
    assert np.sqrt(excess[48, 77] ** 2 - gap_edge ** 2) < np.sqrt(excess[48, 70] ** 2 - gap_mid ** 2)
    small = silhouette_excess(disk(96, 96, 48, 48, 9), body, metres_per_pixel=0.01, dead_zone=0.02)
    assert small.max() < 0.01  # a pixel of fit error is not a garment (a few mm where runs are short)


def test_a_gap_the_fit_leaves_between_two_body_runs_is_not_a_garment():
    # an arm beside the torso: the body's silhouette leaves a 2 px armpit gap that the person's fills;
    # the joined run inflates far thicker than the arm or the torso, but only the gap is extra
    body = np.zeros((60, 80), bool)
    body[5:35, 10:22] = True  # arm
    body[5:55, 24:60] = True  # torso (taller than wide, as torsos are)
    person = body.copy()
    person[15:18, 22:24] = True  # the armpit rows where the photo's mask joins them
    extra = run_extra_width(person, body)
    assert extra[16, 30] == 2 and extra[10, 30] == 0 and extra[~person].max() == 0
    excess = silhouette_excess(person, body, metres_per_pixel=0.01, dead_zone=0.02, smooth_px=0)
    assert excess.max() == 0.0
    wide = person.copy()
    wide[15:18, 60:75] = True  # a real flap of cloth beside the torso on those rows is kept
    assert silhouette_excess(wide, body, metres_per_pixel=0.01, dead_zone=0.02, smooth_px=0)[16, 40] > 0.05


def test_mask_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ"):
        silhouette_excess(np.ones((4, 4), bool), np.ones((5, 4), bool), 0.01)


def sphere_grid(radius: float = 0.2, n: int = 41, half: float = 0.6) -> SdfGrid:
    axes = torch.linspace(-half, half, n, dtype=torch.float64)
    pts = torch.stack(torch.meshgrid(axes, axes, axes, indexing="ij"), -1)
    values = (pts.norm(dim=-1) - radius).float()
    return SdfGrid(values, torch.full((3,), -half), float(axes[1] - axes[0]))


def test_proxy_offsets_the_body_by_the_excess_where_the_camera_sees_it():
    sdf = sphere_grid()
    eye = np.array([0.0, -3.0, 0.0])
    cam = Camera(intrinsics(64, 64, 160.0), look_at(eye, np.zeros(3)), 64, 64)
    excess = np.zeros((64, 64), np.float32)
    excess[:, :32] = 0.1  # the subject's right half (image left) wears something 10 cm thick
    proxy = garment_proxy_sdf(sdf, cam, excess)
    assert proxy.shape == sdf.shape
    right = torch.tensor([[-0.27, 0.0, 0.0]])  # 7 cm outside the sphere, on the covered side
    left = torch.tensor([[0.27, 0.0, 0.0]])
    behind = torch.tensor([[-0.05, 0.27, 0.0]])  # behind the sphere on the covered side
    assert float(sdf(right)) > 0 and float(proxy(right)) < 0
    assert float(proxy(left)) == pytest.approx(float(sdf(left)), abs=1e-4)
    assert float(proxy(behind)) < 0  # the offset reaches around, not just the visible side
    far = torch.tensor([[-0.45, 0.0, 0.0]])
    assert float(proxy(far)) > 0


def test_proxy_checks_the_map_size():
    cam = Camera(intrinsics(64, 48, 100.0), look_at(np.array([0.0, -3.0, 0.0]), np.zeros(3)), 64, 48)
    with pytest.raises(ValueError, match="does not match"):
        garment_proxy_sdf(sphere_grid(), cam, np.zeros((64, 64), np.float32))


def test_excess_at_points_reads_the_map_along_each_ray():
    cam = Camera(intrinsics(64, 64, 160.0), look_at(np.array([0.0, -3.0, 0.0]), np.zeros(3)), 64, 64)
    excess = np.zeros((64, 64), np.float32)
    excess[:, :32] = 0.1
    pts = np.array([[-0.3, 0.0, 0.0], [-0.3, 0.5, 0.0], [0.3, 0.0, 0.0], [0.0, -4.0, 0.0]])  # image left, behind it, right, behind the camera
    e = excess_at_points(pts, cam, excess)
    left = cam.project(pts[:1])[0, 0] < 32
    assert left and e[0] == pytest.approx(0.1) and e[1] == pytest.approx(0.1)
    assert e[2] == 0.0 and e[3] == 0.0


def test_a_horizontal_arm_read_across_its_thickness_is_not_a_garment():
    """T-pose: the arm's rows are as long as the arm, so row runs would read the 2 px by which the
    mask is thicker than the fitted arm, and the fingertips past the fitted hand, as a garment a
    hand's length deep (fins along the arms). Across the arm (columns) the extra is 2 px. (The
    6 px of fingers past the fitted hand stay a small protrusion, as the silhouette shows.)"""
    body = np.zeros((120, 160), bool)
    body[20:110, 70:90] = True  # torso
    body[30:40, 20:70] = True  # a horizontal arm, 10 px thick
    person = body.copy()
    person[29:41, 14:70] = True  # the photo's arm: a pixel thicker each side, 6 px longer
    excess = silhouette_excess(person, body, metres_per_pixel=0.01, dead_zone=0.02, smooth_px=0)
    assert excess[25:45, 22:70].max() < 0.01
    skirt = body.copy()
    skirt[80:100, 55:105] = True  # a flare 15 px past each side of the torso: still a garment
    assert silhouette_excess(skirt, body, metres_per_pixel=0.01, dead_zone=0.02, smooth_px=0)[90, 100] > 0.1


def test_silhouette_cone_allows_the_person_mask_the_margin_and_what_the_photo_cannot_see():
    from zeroavatar_blender.engine.priors import SilhouetteCone

    cam = Camera(intrinsics(64, 64, 160.0), look_at(np.array([0.0, -3.0, 0.0]), np.zeros(3)), 64, 64)
    mask = torch.zeros(64, 64)
    mask[:, 20:30] = 1.0  # a vertical band left of the image centre
    pts = np.array([[-0.1, 0.0, 0.0],   # in the band
                    [-0.1, 1.5, 0.3],   # in the band, far behind the subject: the photo cannot tell
                    [0.3, 0.0, 0.0],    # right of the band: background in the photo
                    [2.0, 0.0, 0.0],    # off the image
                    [0.0, -4.0, 0.0]])  # behind the camera
    cols = cam.project(pts[:3])[:, 0]
    assert 20 <= cols[0] < 30 and 20 <= cols[1] < 30 and cols[2] > 40
    cone = SilhouetteCone(cam, mask, margin_px=0)
    np.testing.assert_array_equal(cone(torch.tensor(pts, dtype=torch.float32)).numpy(), [1, 1, 0, 1, 1])
    # 0.16 m right of the band's edge at 3 m is ~9 px: inside a 10 px margin, outside a 5 px one
    edge = torch.tensor([[-0.1 + 0.205, 0.0, 0.0]])
    assert 37 < cam.project(edge.numpy())[0, 0] < 39
    assert SilhouetteCone(cam, mask, margin_px=5)(edge).item() == 0
    assert SilhouetteCone(cam, mask, margin_px=10)(edge).item() == 1
    # a margin in metres at the body's depth: 0.06 m at 3 m with f = 160 is 4 px
    depth = torch.full((64, 64), float("inf"))
    depth[:, 20:30] = 3.0
    assert SilhouetteCone.for_reference(cam, mask, depth, 0.06).margin_px == 4
    assert 0.15 < SilhouetteCone(cam, mask, margin_px=0).share < 0.16


def test_a_sleeve_pressed_against_a_jacket_is_measured_per_body_part():
    """Arms hanging against a torso, both in a puffy jacket: each row of the person mask is one
    run from sleeve to sleeve. Read as one round cross-section it makes the chest as deep as the
    whole run is wide (the chest plate); measured per body part (the run cut where the nearest
    body pixel turns from arm to torso) the chest gets the jacket's own extra width. Rows with no
    arm (a skirt around the legs) are measured as before."""
    body = np.zeros((120, 160), bool)
    body[20:110, 60:100] = True  # torso, 40 px
    body[25:70, 48:60] = True  # arms, 12 px, touching its sides
    body[25:70, 100:112] = True
    arm = np.zeros_like(body)
    arm[25:70, 48:60] = arm[25:70, 100:112] = True
    person = body.copy()
    person[22:72, 42:118] = True  # the jacket: 6 px of puff past each sleeve
    person[80:100, 45:115] = True  # a skirt flaring 15 px past the hips
    kw = dict(metres_per_pixel=0.01, dead_zone=0.02, smooth_px=0)
    whole = silhouette_excess(person, body, **kw)
    parts = silhouette_excess(person, body, arm_mask=arm, **kw)
    chest = (slice(30, 65), slice(70, 90))
    assert whole[chest].mean() > 0.03  # the 76 px run read against the 64 px arms + torso: a plate
    assert parts[chest].max() == 0.0  # the torso part has no extra width of its own here
    assert parts[30:65, 42:48].max() > 0.05  # the sleeves' puff is still a garment
    np.testing.assert_array_equal(parts[75:110], whole[75:110])  # the skirt rows: no arm, no change


def test_arm_vertices_are_the_forearms_and_hands_of_the_body(anny_body):
    from zeroavatar_blender.engine.body.base import arm_vertices

    with torch.no_grad():
        out = anny_body.forward(anny_body.zero_params())
    arms = arm_vertices(anny_body.bone_parents, out.bone_posed[0, :, :3, 3].numpy(), out.keypoints[0].numpy(),
                        anny_body.skin_indices.numpy(), anny_body.skin_weights.numpy())
    v = out.vertices[0].numpy()
    wrists = out.keypoints[0, 9:11].numpy()
    near_wrist = np.linalg.norm(v[:, None] - wrists[None], axis=-1).min(1) < 0.05
    head = v[:, 2] > out.keypoints[0, 0, 2].item()  # above the nose
    shoulders = out.keypoints[0, 5:7].numpy()
    near_shoulder = np.linalg.norm(v[:, None] - shoulders[None], axis=-1).min(1) < 0.05
    assert 0.05 < arms.mean() < 0.35 and arms[near_wrist].mean() > 0.95
    assert not arms[head].any() and not arms[near_shoulder].any()
