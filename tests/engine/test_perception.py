"""perceive() against ground truth: synthetic Anny renders with known keypoints and silhouettes,
and the astronaut photo that ships with scikit-image. MediaPipe runs for real, offline."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from tests.engine.photos import arm_pose, astronaut, iou, render_person, side_by_side
from zeroavatar_blender.engine import perception as P
from zeroavatar_blender.engine.errors import BadInputError, NoPersonError
from zeroavatar_blender.engine.imageio import Photo, load_photo
from zeroavatar_blender.engine.perception import Perception, perceive

BACKGROUND = (205, 212, 220)


def as_photo(rgb: np.ndarray, name: str = "test.png", alpha: np.ndarray | None = None) -> Photo:
    return Photo(np.ascontiguousarray(rgb), 1.0, (rgb.shape[1], rgb.shape[0]), name, None, alpha)


def kp_error(perc: Perception, truth: np.ndarray, height_px: float, offset=(0.0, 0.0)) -> np.ndarray:
    """Per-keypoint error as a fraction of the body's height on the image."""
    return np.linalg.norm(perc.keypoints - (truth + np.asarray(offset)), axis=1) / height_px


@pytest.fixture(scope="module")
def full_body(anny_body):
    return render_person(anny_body, 512, 640, pose=arm_pose(anny_body, 20))


@pytest.fixture(scope="module")
def small_body(anny_body):
    return render_person(anny_body, 256, 320, pose=arm_pose(anny_body, 40))


def test_full_body_render_keypoints_and_mask(full_body):
    messages = []
    p = perceive(as_photo(full_body.rgb), on_message=messages.append)
    assert p.keypoints.shape == (17, 2) and p.keypoints.dtype == np.float32
    assert p.confidence.shape == (17,) and p.confidence.dtype == np.float32
    assert p.mask.shape == full_body.rgb.shape[:2] and p.mask.dtype == np.float32
    assert 0 <= p.mask.min() and p.mask.max() <= 1
    assert (p.num_people, p.person_index, p.image_size, p.mask_scale) == (1, 0, (512, 640), 1.0)
    assert (p.confidence > 0.5).all()
    err = kp_error(p, full_body.keypoints, full_body.height_px)
    assert err.max() < 0.05, err
    assert iou(p.mask > 0.5, full_body.silhouette) > 0.9
    ys, xs = np.nonzero(full_body.silhouette)
    x0, y0, x1, y1 = p.bbox
    assert abs(x0 - xs.min()) < 8 and abs(x1 - xs.max() - 1) < 8 and abs(y0 - ys.min()) < 8 and abs(y1 - ys.max() - 1) < 8
    assert not messages  # one person, legs visible: nothing to say
    # The detector's own 3D guess: metres, hip-centred, y down, the subject's left on the image's right.
    kp3 = p.keypoints3d
    assert kp3 is not None and kp3.shape == (17, 3) and kp3.dtype == np.float32
    assert np.abs(kp3[[11, 12]].mean(0)).max() < 0.05
    assert 1.0 < kp3[[15, 16], 1].mean() - kp3[[5, 6], 1].mean() < 1.6  # shoulders to ankles
    assert kp3[5, 0] > kp3[6, 0]


def test_keypoints_are_in_original_pixels(tmp_path, anny_body):
    r = render_person(anny_body, 600, 750, pose=arm_pose(anny_body, 20), supersample=1)
    path = tmp_path / "big render.png"
    Image.fromarray(r.rgb).save(path)
    photo = load_photo(path, max_side=300)
    p = perceive(photo)
    assert p.mask.shape == photo.rgb.shape[:2] == (300, 240)
    assert p.mask_scale == pytest.approx(0.4) and p.image_size == (600, 750)
    assert kp_error(p, r.keypoints, r.height_px).max() < 0.05
    small_sil = np.asarray(Image.fromarray(r.silhouette).resize((240, 300))) > 0
    assert iou(p.mask > 0.5, small_sil) > 0.85


def test_exif_rotated_photo_is_upright(tmp_path, full_body):
    exif = Image.Exif()
    exif[0x0112] = 8
    path = tmp_path / "sideways.jpg"
    Image.fromarray(full_body.rgb).transpose(Image.Transpose.ROTATE_270).save(path, quality=95, exif=exif)
    p = perceive(load_photo(path))
    assert p.image_size == (512, 640)
    assert kp_error(p, full_body.keypoints, full_body.height_px).max() < 0.05


def test_grayscale_photo(full_body):
    grey = np.asarray(Image.fromarray(full_body.rgb).convert("L").convert("RGB"))
    p = perceive(as_photo(grey))
    assert kp_error(p, full_body.keypoints, full_body.height_px).max() < 0.05


def test_half_body_astronaut():
    messages = []
    p = perceive(as_photo(astronaut(), "astronaut.png"), on_message=messages.append)
    assert p.num_people == 1
    assert (p.confidence[:7] > 0.8).all()  # face and shoulders
    assert (p.confidence[13:] < 0.3).all()  # knees and ankles are out of frame
    nose, l_sh, r_sh = p.keypoints[0], p.keypoints[5], p.keypoints[6]
    assert 180 < nose[0] < 260 and 90 < nose[1] < 170  # her face, by eye
    assert l_sh[0] > nose[0] > r_sh[0] and l_sh[1] > nose[1]  # facing us: her left on the right
    assert p.mask[130, 220] > 0.9 and p.mask[40, 470] < 0.1  # face in, shuttle model out
    assert any("legs" in m for m in messages)


def test_helmet_is_not_a_second_person():
    """At 2048 px, once the astronaut is greyed out, a 0.3 threshold 'finds' the helmet she holds."""
    big = np.asarray(Image.fromarray(astronaut()).resize((2048, 2048), Image.Resampling.LANCZOS))
    assert perceive(as_photo(big)).num_people == 1


def test_two_people_numbered_left_to_right(full_body, small_body):
    canvas, (_, right_x) = side_by_side(small_body.rgb, full_body.rgb, BACKGROUND)
    photo = as_photo(canvas, "pair.png")
    messages = []
    default = perceive(photo, on_message=messages.append)
    assert default.num_people == 2 and default.person_index == 1  # the larger one, on the right
    assert any("2 people" in m and "person 2 from the left" in m for m in messages)
    dy = canvas.shape[0] - full_body.rgb.shape[0]
    assert kp_error(default, full_body.keypoints, full_body.height_px, (right_x, dy)).max() < 0.05

    left = perceive(photo, person=0)
    dy = canvas.shape[0] - small_body.rgb.shape[0]
    assert left.person_index == 0
    assert kp_error(left, small_body.keypoints, small_body.height_px, (0, dy)).max() < 0.05
    truth = np.zeros(canvas.shape[:2], bool)
    truth[dy:, :small_body.rgb.shape[1]] = small_body.silhouette
    assert iou(left.mask > 0.5, truth) > 0.85

    with pytest.raises(BadInputError) as info:
        perceive(photo, person=2)
    text = str(info.value)
    assert "person 3 from the left" in text and "2 people" in text and "pair.png" in text and "1 to 2" in text


def test_overlapping_people_get_separate_masks(full_body):
    shift = 330
    h, w = full_body.rgb.shape[:2]
    canvas = np.empty((h, w + shift, 3), np.uint8)
    canvas[:] = BACKGROUND
    canvas[:, :w] = full_body.rgb
    front = canvas[:, shift:]
    front[full_body.silhouette] = full_body.rgb[full_body.silhouette]
    right = np.zeros(canvas.shape[:2], bool)
    right[:, shift:] = full_body.silhouette
    left = np.zeros(canvas.shape[:2], bool)
    left[:, :w] = full_body.silhouette
    left &= ~right
    photo = as_photo(canvas, "hands.png")
    for index, truth in ((0, left), (1, right)):
        p = perceive(photo, person=index)
        assert p.num_people == 2
        assert iou(p.mask > 0.5, truth) > 0.9
        assert kp_error(p, full_body.keypoints, full_body.height_px, (shift * index, 0)).max() < 0.05


def test_small_person_in_large_frame(anny_body):
    r = render_person(anny_body, 160, 200, pose=arm_pose(anny_body, 30))
    canvas = np.full((1080, 1920, 3), 210, np.uint8)
    canvas[700:900, 1400:1560] = r.rgb
    messages = []
    p = perceive(as_photo(canvas, "wide.png"), on_message=messages.append)
    assert p.num_people == 1
    assert kp_error(p, r.keypoints, r.height_px, (1400, 700)).max() < 0.05
    assert any("small" in m for m in messages)


def test_group_photo_that_the_whole_frame_misses(anny_body):
    """DESIGN.md's case: a wide 1280x720 group that whole-frame detection does not find."""
    canvas = np.full((720, 1280, 3), 200, np.uint8)
    renders = []
    for i in range(4):
        r = render_person(anny_body, 240, 300, pose=arm_pose(anny_body, 30 + 5 * i))
        canvas[380:680, 60 + 300 * i:300 + 300 * i] = r.rgb
        renders.append(r)
    assert P._detect(canvas, (0, 0, 1280, 720)) is None  # the case really is hard
    photo = as_photo(canvas, "group.png")
    p = perceive(photo, person=2)
    assert p.num_people == 4 and p.person_index == 2
    assert kp_error(p, renders[2].keypoints, renders[2].height_px, (660, 380)).max() < 0.05


@pytest.mark.parametrize("name", ["grey", "chelsea", "coffee", "noise"])
def test_no_person(name):
    from skimage import data

    if name == "grey":
        rgb = np.full((480, 640, 3), 128, np.uint8)
    elif name == "noise":
        rgb = np.random.default_rng(0).integers(0, 256, (480, 640, 3)).astype(np.uint8)
    else:
        rgb = getattr(data, name)()[..., :3]
    with pytest.raises(NoPersonError) as info:
        perceive(as_photo(rgb, f"{name} photo.jpg"))
    assert f"{name} photo.jpg" in str(info.value) and "crop" in str(info.value)


def test_cutout_alpha_is_the_mask(full_body):
    alpha = full_body.silhouette.astype(np.float32)
    rgb = np.where(full_body.silhouette[..., None], full_body.rgb, 255).astype(np.uint8)
    p = perceive(as_photo(rgb, "cutout.png", alpha=alpha))
    assert np.array_equal(p.mask, alpha)


def test_save_load_round_trip(tmp_path, full_body):
    p = perceive(as_photo(full_body.rgb))
    path = tmp_path / "perception.npz"
    p.save(path)
    q = Perception.load(path)
    for name in ("keypoints", "confidence", "mask", "bbox", "keypoints3d"):
        assert np.array_equal(getattr(p, name), getattr(q, name)), name
    assert (q.mask_scale, q.image_size, q.person_index, q.num_people) == (p.mask_scale, p.image_size, 0, 1)
    with np.load(path, allow_pickle=False) as z:
        assert z["mask"].dtype == np.uint8
        older = {k: z[k] for k in z.files if k != "keypoints3d"}
    older["version"] = np.int64(1)  # a job folder from before the 3D keypoints
    np.savez(path, **older)
    assert Perception.load(path).keypoints3d is None


def test_load_refuses_pickles_and_junk(tmp_path):
    pickled = tmp_path / "evil.npz"
    np.savez(pickled, keypoints=np.array([object()], dtype=object))
    with pytest.raises(BadInputError):
        Perception.load(pickled)
    junk = tmp_path / "junk.npz"
    junk.write_text("not a zip")
    with pytest.raises(BadInputError):
        Perception.load(junk)


def test_model_is_cached_and_reopens_after_close():
    with P._LOCK:
        a = P._pose_model()
        assert P._pose_model() is a
    P.close_models()
    assert not P._MODELS
    p = perceive(as_photo(astronaut()))
    assert p.num_people == 1 and P._MODELS


def test_mediapipe_noise_is_silenced(capfd):
    P.close_models()  # creating the graph again is what prints most of the noise
    perceive(as_photo(astronaut()))
    err = capfd.readouterr().err
    assert "TensorFlow Lite" not in err and "W0000" not in err and "absl::InitializeLog" not in err, err


def test_real_errors_still_reach_stderr(capfd):
    with P.quiet_native_logs():
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
        os.write(2, b"W0000 00:00:1.0 1 calc.cc:1] chatter\n")
        os.write(2, b"E0000 00:00:1.0 1 graph.cc:9] Calculator failed: out of memory\n")
    err = capfd.readouterr().err
    assert "out of memory" in err and "chatter" not in err and "XNNPACK" not in err
