"""Find the person in a photo: a soft mask and 17 COCO keypoints with confidences.

MediaPipe's legacy BlazePose (0.10.21, bundled ``model_complexity=1``, offline) finds ONE person
per call. Photos hold several, or one small in a big frame, so we search:

1. the whole frame, greying out each person found and asking again, until nobody new turns up;
2. if that found nobody, overlapping square crops (the detector sees a 224 px letterbox of
   its input, so small people only show up on crops), each hit re-run on a crop around it;
3. the chosen person once more, with everyone else greyed out, so neighbours do not bleed into
   its mask; pixels a neighbour's mask claims and whose skeleton is nearer go to the neighbour.

People are numbered left to right; the largest (mask area) is the default.
"""

from __future__ import annotations

import atexit
import math
import os
import re
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .errors import BadInputError, MissingModelError, NoPersonError
from .imageio import Photo

# BlazePose's 33 landmarks -> COCO-17 (both use the subject's left/right).
MEDIAPIPE_TO_COCO = np.array([0, 2, 5, 7, 8, 11, 12, 13, 14, 15, 16, 23, 24, 25, 26, 27, 28])
# COCO-17 limbs, for the skeleton that decides who owns a contested pixel.
COCO_EDGES = ((0, 1), (0, 2), (1, 3), (2, 4), (0, 5), (0, 6), (5, 6), (5, 7), (7, 9), (6, 8), (8, 10),
              (5, 11), (6, 12), (11, 12), (11, 13), (13, 15), (12, 14), (14, 16))
# DESIGN.md: a wide group photo found nobody at MediaPipe's default 0.5 but did at 0.3; the
# landmark model's own presence threshold (0.5) and _plausible() keep false positives out. Crops
# are upscaled, and there 0.3 and 0.5 both "found" people in skimage's cat and rocket photos;
# 0.7 found none of those and still every synthetic small person.
# Once someone is found and greyed out, 0.3 finds props (the helmet in skimage's astronaut photo
# at 2048 px) but 0.5 does not.
MIN_DETECTION_CONFIDENCE = 0.3
MORE_DETECTION_CONFIDENCE = 0.5
CROP_DETECTION_CONFIDENCE = 0.7
MIN_PRESENCE = 0.5
MAX_PEOPLE = 8
MIN_CROP_SIDE = 96
ERASE_GREY = 127
PERCEPTION_VERSION = 2  # 2: adds the detector's 3D keypoints (files of version 1 load without them)


@dataclass
class Perception:
    keypoints: np.ndarray  # (17, 2) float32 COCO-17 in ORIGINAL photo pixels (pixel centres at integers)
    confidence: np.ndarray  # (17,) float32 in [0, 1]; 0 outside the image or not detected
    mask: np.ndarray  # (h, w) float32 in [0, 1], the chosen person at the working resolution
    mask_scale: float  # mask px per original px
    image_size: tuple[int, int]  # (W, H) original
    bbox: np.ndarray  # (4,) x0, y0, x1, y1 of the person in original px
    person_index: int  # which person was chosen (0-based, left to right)
    num_people: int
    # (17,3) float32 metres, the detector's own 3D guess of the COCO-17 keypoints: hip-centred, x
    # right, y down, z away from the camera (as BlazePose's world landmarks). Coarse (5-15 cm off
    # in depth on the benchmark photos) but it knows which way a foreshortened limb points, which
    # 2D keypoints cannot tell. None when unknown (an older perception file).
    keypoints3d: np.ndarray | None = None

    def save(self, path: str | Path) -> None:
        """An .npz of plain arrays (no pickle); the mask is stored as exact uint8 levels."""
        np.savez_compressed(
            path, version=np.int64(PERCEPTION_VERSION),
            keypoints=self.keypoints.astype(np.float32), confidence=self.confidence.astype(np.float32),
            mask=quantise_mask(self.mask), mask_scale=np.float64(self.mask_scale),
            image_size=np.asarray(self.image_size, np.int64), bbox=self.bbox.astype(np.float32),
            person_index=np.int64(self.person_index), num_people=np.int64(self.num_people),
            **({} if self.keypoints3d is None else {"keypoints3d": self.keypoints3d.astype(np.float32)}))

    @staticmethod
    def load(path: str | Path) -> "Perception":
        try:
            with np.load(path, allow_pickle=False) as z:
                p = Perception(
                    keypoints=z["keypoints"].astype(np.float32), confidence=z["confidence"].astype(np.float32),
                    mask=z["mask"].astype(np.float32) / 255.0, mask_scale=float(z["mask_scale"]),
                    image_size=(int(z["image_size"][0]), int(z["image_size"][1])), bbox=z["bbox"].astype(np.float32),
                    person_index=int(z["person_index"]), num_people=int(z["num_people"]),
                    keypoints3d=z["keypoints3d"].astype(np.float32) if "keypoints3d" in z.files else None)
        except (OSError, KeyError, ValueError, IndexError) as exc:
            raise BadInputError(f"cannot read the perception file {path}: {exc}",
                                "run the perception stage again (it rewrites the file)") from exc
        if (p.keypoints.shape != (17, 2) or p.confidence.shape != (17,) or p.mask.ndim != 2 or p.bbox.shape != (4,)
                or (p.keypoints3d is not None and p.keypoints3d.shape != (17, 3))):
            raise BadInputError(f"the perception file {path} has unexpected array shapes",
                                "run the perception stage again (it rewrites the file)")
        return p


def quantise_mask(mask: np.ndarray) -> np.ndarray:
    """(h, w) [0,1] -> uint8; perceive() returns masks already on these levels, so saving is exact."""
    return np.clip(np.round(mask * 255.0), 0, 255).astype(np.uint8)


# -- MediaPipe, quietly and once per process ----------------------------------------------------

_NOISE = re.compile(
    r"^(INFO: |WARNING: All log messages before absl::InitializeLog|[IW]\d{4} |I\d{8} |W\d{8} )")
_LOCK = threading.RLock()
_MODELS: dict[tuple[float, float], Any] = {}


@contextmanager
def quiet_native_logs() -> Iterator[None]:
    """Swallow MediaPipe/TF Lite's info and warning chatter on fd 2; pass errors through.

    Its C++ logging ignores GLOG_minloglevel before absl::InitializeLog, so the only reliable
    switch is the file descriptor itself. Lines that are not known noise are written back.
    """
    try:
        sys.stderr.flush()
    except (AttributeError, ValueError):
        pass
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all (a detached process): nothing to protect
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().decode("utf-8", "replace").splitlines()
                    if line.strip() and not _NOISE.match(line)]
            if kept:
                os.write(2, ("\n".join(kept) + "\n").encode("utf-8"))


def _pose_model(min_detection: float = MIN_DETECTION_CONFIDENCE, min_presence: float = MIN_PRESENCE) -> Any:
    """The cached BlazePose graph (creating one costs a model load); call with _LOCK held."""
    key = (min_detection, min_presence)
    model = _MODELS.get(key)
    if model is None:
        os.environ.setdefault("GLOG_minloglevel", "2")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        try:
            from mediapipe.python.solutions import pose as mp_pose
        except ImportError as exc:
            raise MissingModelError(f"cannot import mediapipe ({exc})",
                                    "reinstall the engine (mediapipe==0.10.21 carries the pose model)") from exc
        with quiet_native_logs():
            model = mp_pose.Pose(static_image_mode=True, model_complexity=1, enable_segmentation=True,
                                 min_detection_confidence=min_detection, min_tracking_confidence=min_presence)
        if not _MODELS:
            atexit.register(close_models)
        _MODELS[key] = model
    return model


def load_pose_model() -> str:
    """Load BlazePose as ``perceive`` does (MissingModelError when it cannot), for ``check``.
    -> mediapipe's version."""
    with _LOCK, quiet_native_logs():
        _pose_model()
        close_models()  # TF Lite announces itself on the first use and at the close: both hushed here
    import mediapipe

    return str(getattr(mediapipe, "__version__", "?"))


def close_models() -> None:
    """Release the MediaPipe graphs (also run at exit)."""
    with _LOCK:
        for model in _MODELS.values():
            model.close()
        _MODELS.clear()


def _run_pose(rgb: np.ndarray, min_detection: float) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """One BlazePose call: ((33, 3) normalised x, y, visibility; (h, w) mask; (33, 3) world
    landmarks in metres or None) or None."""
    image = np.ascontiguousarray(rgb, dtype=np.uint8)
    with _LOCK:
        model = _pose_model(min_detection)
        with quiet_native_logs():
            result = model.process(image)
    if result.pose_landmarks is None:
        return None
    lm = np.array([(p.x, p.y, p.visibility) for p in result.pose_landmarks.landmark], dtype=np.float64)
    world = None
    if result.pose_world_landmarks is not None:
        world = np.array([(p.x, p.y, p.z) for p in result.pose_world_landmarks.landmark], dtype=np.float64)
    mask = result.segmentation_mask
    if mask is None:
        mask = np.zeros(image.shape[:2], np.float32)
    return lm, np.asarray(mask, np.float32), world


# -- people in working-image pixels -------------------------------------------------------------

@dataclass
class _Person:
    points: np.ndarray  # (33, 2) working px, continuous (pixel edges at integers)
    visibility: np.ndarray  # (33,)
    mask: np.ndarray  # (h, w) float32, zero outside the region it was found in
    region: tuple[int, int, int, int]  # x0, y0, x1, y1 of the crop it was found in
    world: np.ndarray | None = None  # (33, 3) BlazePose world landmarks, metres, hip-centred

    def coco_confidence(self, w: int, h: int) -> np.ndarray:
        pts = self.points[MEDIAPIPE_TO_COCO]
        inside = (pts[:, 0] >= 0) & (pts[:, 0] <= w) & (pts[:, 1] >= 0) & (pts[:, 1] <= h)
        return np.where(inside, np.clip(self.visibility[MEDIAPIPE_TO_COCO], 0, 1), 0.0)

    @property
    def area(self) -> float:
        return float((self.mask > 0.5).sum())

    def bbox(self, w: int, h: int) -> np.ndarray:
        """x0, y0, x1, y1 in working px from the mask, widened to confident keypoints."""
        on = self.mask > 0.5
        xs, ys = np.nonzero(on.any(0))[0], np.nonzero(on.any(1))[0]
        conf = self.coco_confidence(w, h)
        pts = self.points[MEDIAPIPE_TO_COCO][conf > 0.5]
        xs_all = np.concatenate([xs.astype(np.float64), xs + 1.0, pts[:, 0]])
        ys_all = np.concatenate([ys.astype(np.float64), ys + 1.0, pts[:, 1]])
        if not len(xs_all):
            return np.zeros(4)
        return np.array([max(0.0, xs_all.min()), max(0.0, ys_all.min()), min(float(w), xs_all.max()),
                         min(float(h), ys_all.max())])


def _detect(image: np.ndarray, region: tuple[int, int, int, int],
            min_detection: float = MIN_DETECTION_CONFIDENCE) -> _Person | None:
    x0, y0, x1, y1 = region
    out = _run_pose(image[y0:y1, x0:x1], min_detection)
    if out is None:
        return None
    lm, crop_mask, world = out
    points = lm[:, :2] * np.array([x1 - x0, y1 - y0]) + np.array([x0, y0])
    mask = np.zeros(image.shape[:2], np.float32)
    mask[y0:y1, x0:x1] = crop_mask[: y1 - y0, : x1 - x0]
    return _Person(points, lm[:, 2], mask, region, world)


def _plausible(p: _Person, w: int, h: int) -> bool:
    """A person we can build an avatar of: a visible head and shoulders, backed by the mask."""
    conf = p.coco_confidence(w, h)
    if (conf[:7] > 0.5).sum() < 4 or min(conf[5], conf[6]) < 0.3:
        return False
    if p.area < max(64.0, 2e-4 * w * h):
        return False
    x0, y0, x1, y1 = p.bbox(w, h).astype(int)
    box = p.mask[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)]
    # A real person's mask is mostly decided (near 0 or 1); hallucinations are grey mush.
    undecided = float(((p.mask > 0.1) & (p.mask < 0.9)).sum()) / p.area
    return float(box.mean()) > 0.15 and undecided < 0.75


def _same_person(a: _Person, b: _Person, w: int, h: int) -> bool:
    """Whether ``a`` is ``b`` found again: most of a's confident keypoints lie on b's mask."""
    conf = a.coco_confidence(w, h)
    pts = a.points[MEDIAPIPE_TO_COCO][conf > 0.5]
    if not len(pts):
        return True
    xi = np.clip(pts[:, 0].astype(int), 0, w - 1)
    yi = np.clip(pts[:, 1].astype(int), 0, h - 1)
    return float((b.mask[yi, xi] > 0.5).mean()) >= 0.5


def _erase(image: np.ndarray, region: np.ndarray) -> None:
    np.copyto(image, np.uint8(ERASE_GREY), where=region[..., None])


def _erase_region(p: _Person, w: int, h: int) -> np.ndarray:
    """What to grey out so the search moves on: the convex hull of the person's mask and head,
    grown a little. A hull, because a grey person-shaped silhouette is itself found as a person.
    Worked out on a coarse grid (hull and dilation at full size take most of a second)."""
    from scipy.ndimage import binary_dilation
    from skimage.morphology import convex_hull_image

    step = max(1, max(w, h) // 256)
    region = p.mask[::step, ::step] > 0.3
    gh, gw = region.shape
    conf = p.coco_confidence(w, h)
    head = p.points[MEDIAPIPE_TO_COCO][:5][conf[:5] > 0.3]
    if len(head):
        shoulders = p.points[MEDIAPIPE_TO_COCO][[5, 6]]
        r = max(4.0, 0.6 * float(np.linalg.norm(shoulders[0] - shoulders[1]))) / step
        c = head.mean(0) / step
        yy, xx = np.ogrid[:gh, :gw]
        region |= (xx + 0.5 - c[0]) ** 2 + (yy + 0.5 - c[1]) ** 2 <= r * r
    if not region.any():
        return np.zeros((h, w), bool)
    grow = 1 + int(0.01 * math.hypot(w, h) / step)
    region = binary_dilation(convex_hull_image(region), iterations=grow)
    return region[np.arange(h)[:, None] // step, np.arange(w)[None, :] // step]


def _square_tiles(w: int, h: int, side: int) -> list[tuple[int, int, int, int]]:
    """Square crops of ``side`` px covering the image with at least half a crop of overlap."""
    def starts(length: int) -> list[int]:
        if length <= side:
            return [0]
        n = math.ceil((length - side) / (side / 2)) + 1
        return sorted({round(i * (length - side) / (n - 1)) for i in range(n)})

    return [(x, y, min(w, x + side), min(h, y + side)) for y in starts(h) for x in starts(w)]


def _around(p: _Person, w: int, h: int, grow: float = 1.3) -> tuple[int, int, int, int]:
    """A square crop around all 33 predicted landmarks (the model predicts off-crop ones too)."""
    lo, hi = p.points.min(0), p.points.max(0)
    centre = (lo + hi) / 2
    half = max(hi - lo) * grow / 2 + 8
    x0, y0 = int(max(0, centre[0] - half)), int(max(0, centre[1] - half))
    x1, y1 = int(min(w, centre[0] + half)), int(min(h, centre[1] + half))
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def find_people(rgb: np.ndarray) -> tuple[list[_Person], bool]:
    """Everybody MediaPipe can find, in working px, and whether crops were needed."""
    h, w = rgb.shape[:2]
    work = rgb.copy()
    people: list[_Person] = []

    def consider(p: _Person | None) -> bool:
        """Keep p if new and plausible; grey it out either way. False when nothing was found."""
        if p is None:
            return False
        known = any(_same_person(p, q, w, h) for q in people)
        if not known and _plausible(p, w, h):
            people.append(p)
        _erase(work, _erase_region(p, w, h))
        return True

    for _ in range(MAX_PEOPLE + 2):
        threshold = MORE_DETECTION_CONFIDENCE if people else MIN_DETECTION_CONFIDENCE
        if len(people) >= MAX_PEOPLE or not consider(_detect(work, (0, 0, w, h), threshold)):
            break
    if people:
        return people, False

    # Two finer scales: the frame's short side (or half a square frame), then half of that.
    first = min(w, h) if max(w, h) > 1.2 * min(w, h) else max(w, h) // 2
    for side in (first, first // 2):
        if people or side < MIN_CROP_SIDE:
            break
        for tile in _square_tiles(w, h, side):
            for _ in range(3):  # a crop may hold several people
                if len(people) >= MAX_PEOPLE:
                    break
                hit = _detect(work, tile, CROP_DETECTION_CONFIDENCE)
                if hit is None:
                    break
                better = _detect(work, _around(hit, w, h), CROP_DETECTION_CONFIDENCE)
                if better is not None and _plausible(better, w, h) and _same_person(hit, better, w, h):
                    hit = better
                consider(hit)
    return people, True


def _skeleton_distance(p: _Person, w: int, h: int, step: int) -> np.ndarray:
    """(ceil(h/step), ceil(w/step)) distance, in grid cells, to the person's visible limbs."""
    from scipy.ndimage import distance_transform_edt

    gh, gw = -(-h // step), -(-w // step)
    grid = np.ones((gh, gw), bool)
    conf = p.coco_confidence(w, h)
    pts = p.points[MEDIAPIPE_TO_COCO] / step
    for a, b in COCO_EDGES:
        if conf[a] < 0.3 or conf[b] < 0.3:
            continue
        n = int(np.linalg.norm(pts[a] - pts[b]) * 2) + 2
        seg = pts[a] + np.linspace(0, 1, n)[:, None] * (pts[b] - pts[a])
        grid[np.clip(seg[:, 1].astype(int), 0, gh - 1), np.clip(seg[:, 0].astype(int), 0, gw - 1)] = False
    if grid.all():
        return np.full((gh, gw), np.inf)
    return distance_transform_edt(grid)


def _territories(people: list[_Person], w: int, h: int) -> np.ndarray:
    """(h, w) index of the person whose skeleton is nearest each pixel."""
    step = max(1, max(w, h) // 256)
    d = np.stack([_skeleton_distance(p, w, h, step) for p in people])
    owner = d.argmin(0)
    return owner[np.arange(h)[:, None] // step, np.arange(w)[None, :] // step]


def _isolate(rgb: np.ndarray, people: list[_Person], index: int) -> _Person:
    """The chosen person re-detected with everyone else greyed out, and its mask made exclusive."""
    h, w = rgb.shape[:2]
    chosen = people[index]
    if len(people) == 1:
        return chosen
    owner = _territories(people, w, h)
    others = np.zeros((h, w), bool)
    for j, p in enumerate(people):
        if j != index:
            others |= (p.mask > 0.5) & (owner == j)
    from scipy.ndimage import binary_dilation

    work = rgb.copy()
    _erase(work, binary_dilation(others, iterations=2))
    again = _detect(work, chosen.region, MIN_DETECTION_CONFIDENCE)
    if again is not None and _plausible(again, w, h) and _same_person(again, chosen, w, h):
        chosen = again
    chosen.mask = np.where(others, 0.0, chosen.mask).astype(np.float32)
    return chosen


# -- the stage ---------------------------------------------------------------------------------

def perceive(photo: Photo, person: int | None = None,
             on_message: Callable[[str], None] | None = None) -> Perception:
    """Keypoints and mask of one person in ``photo``: the largest, or ``person`` (0 = leftmost).

    Messages count people from 1, like the command line's ``--person`` and the add-on."""
    say = on_message or (lambda _msg: None)
    rgb = photo.rgb
    h, w = rgb.shape[:2]
    name = Path(photo.path).name or photo.path
    people, used_crops = find_people(rgb)
    if not people:
        raise NoPersonError(
            f"no person found in {photo.path}",
            "use a photo where one person is clearly visible, at least head and shoulders, facing the "
            "camera and not too dark; if they are small in the frame, crop the photo around them")
    people.sort(key=lambda p: float(np.mean(p.bbox(w, h)[[0, 2]])))
    n = len(people)
    if person is None:
        index = int(np.argmax([p.area for p in people]))
    elif not 0 <= person < n:
        found = "only 1 person was" if n == 1 else f"{n} people were"
        raise BadInputError(f"person {person + 1} from the left was asked for, but {found} found in {photo.path}",
                            f"choose --person 1 to {n} (1 = leftmost), or leave it out to take the largest")
    else:
        index = int(person)
    if n > 1:
        how = "as asked" if person is not None else "the largest; choose another with --person 1..%d" % n
        say(f"Found {n} people in {name}; using person {index + 1} from the left ({how})")
    if used_crops:
        say(f"The person is small in {name}; cropping the photo around them gives a better avatar")
    chosen = _isolate(rgb, people, index)

    mask = chosen.mask
    if photo.alpha is not None and photo.alpha.shape == mask.shape:
        # The user's own cut-out beats the model's mask; keep it to the chosen person's territory.
        mask = photo.alpha if n == 1 else np.where(_territories(people, w, h) == index, photo.alpha, 0.0)
    mask = quantise_mask(mask).astype(np.float32) / 255.0
    chosen.mask = mask

    W, H = photo.original_size
    sx, sy = w / W, h / H  # per axis: the working size was rounded
    conf = chosen.coco_confidence(w, h).astype(np.float32)
    kp = chosen.points[MEDIAPIPE_TO_COCO] / np.array([sx, sy]) - 0.5
    bbox = chosen.bbox(w, h) / np.array([sx, sy, sx, sy])
    legs = conf[13:17]
    if legs.mean() < 0.3:
        say(f"The legs are not visible in {name}: the avatar's legs will be guessed from the body model")
    kp3 = None if chosen.world is None else chosen.world[MEDIAPIPE_TO_COCO].astype(np.float32)
    return Perception(kp.astype(np.float32), conf, mask, float(photo.scale), (int(W), int(H)),
                      bbox.astype(np.float32), index, n, kp3)
