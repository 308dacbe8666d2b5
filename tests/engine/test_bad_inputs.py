"""Bad and awkward inputs end to end: ``python -m zeroavatar_blender.engine generate`` as a user
runs it, one process per case. Each case checks the outcome that docs/BAD_INPUTS.md documents:
the exit code, the error event's message and hint, and that nothing which looks like a result
was left behind; or, for the awkward photos that must work, a complete avatar bundle.

Faults of the machine are simulated for real, never mocked: a read-only folder (chmod; as root
the engine runs without the capabilities that let root ignore permissions), a full disk (a tiny
tmpfs when this process may mount one, otherwise a file-size limit on the engine process, which
fails the same writes with EFBIG), an unreadable photo.
"""

from __future__ import annotations

import ctypes
import io
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image

from tests.engine.photos import arm_pose, astronaut, render_person, side_by_side, write_huge_blank_png
from zeroavatar_blender import protocol

ROOT = Path(__file__).resolve().parents[2]
AWKWARD_NAME = "my 'best' \"photo\" ñandú 写真 (1).png"
AWKWARD_FOLDER = "out folder 'x' \"y\" Ñ 出力"


# -- running the engine ---------------------------------------------------------------------
@dataclass
class Outcome:
    code: int
    stderr: str
    events: list[dict]

    @property
    def error(self) -> dict | None:
        return next((e for e in reversed(self.events) if e["type"] == "error"), None)

    @property
    def done(self) -> dict | None:
        return next((e for e in reversed(self.events) if e["type"] == "done"), None)

    def messages(self) -> list[str]:
        return [e["message"] for e in self.events if e["type"] == "message"]


def engine(command: str, *args: str | Path, preexec_fn: Callable[[], None] | None = None,
           events_in: Path | None = None, timeout: float = 900) -> Outcome:
    argv = [sys.executable, "-m", "zeroavatar_blender.engine", command, *map(str, args), "--progress", "none"]
    proc = subprocess.run(argv, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          timeout=timeout, preexec_fn=preexec_fn, stdin=subprocess.DEVNULL)
    events_file = (events_in or Path()) / "events.jsonl"
    events = list(protocol.iter_events(events_file)) if events_in is not None and events_file.is_file() else []
    return Outcome(proc.returncode, proc.stderr, events)


def generate(photo: Path, out: Path, *args: str, **kwargs) -> Outcome:
    return engine("generate", photo, "--out", out, "--no-export", *args, events_in=out, **kwargs)


# Files that a reader (a person, Blender, a script) could take for a result.
RESULT_LOOKALIKES = ("avatar.json", "avatar.npz", "*.glb", "*.gltf", "*.fbx", "*.ply", "*.blend", "*.partial",
                     "*.old", ".tmp*", ".*.tmp*")


def assert_no_result(job: Path) -> None:
    if not job.exists():
        return
    assert not (job / "result").exists() and not (job / "fit_body").exists()
    leftovers = sorted(str(p.relative_to(job)) for pattern in RESULT_LOOKALIKES for p in job.rglob(pattern))
    assert not leftovers, f"left behind in {job}: {leftovers}"


def assert_failed(outcome: Outcome, code: int, *words: str) -> dict:
    """The run failed with ``code``, its error event names the problem (``words``) and has a
    hint, and its last event says so."""
    assert outcome.code == code, f"exit {outcome.code}, expected {code}\n{outcome.stderr[-3000:]}"
    error = outcome.error
    assert error is not None and error["code"] == code, outcome.events[-3:]
    text = f"{error['message']} {error['hint']}".lower()
    missing = [w for w in words if w.lower() not in text]
    assert not missing, f"{missing} not in: {error['message']!r} / hint {error['hint']!r}"
    assert error["hint"].strip()
    assert outcome.done == outcome.events[-1] and outcome.done["status"] == "failed" and outcome.done["code"] == code
    assert "Traceback" not in outcome.stderr
    return error


def assert_result(outcome: Outcome, job: Path):
    from zeroavatar_blender.engine.avatar import AvatarBundle

    assert outcome.code == protocol.EXIT_OK, f"exit {outcome.code}\n{outcome.stderr[-3000:]}\n{outcome.error}"
    assert outcome.done["status"] == "ok"
    assert any(e["type"] == "result" and e["path"] == "result" for e in outcome.events)
    bundle = AvatarBundle.load(job / "result")  # checks digests, array shapes, weights, texture
    height = float(bundle.vertices[:, 2].max() - bundle.vertices[:, 2].min())
    assert 1.3 < height < 2.2, f"rest-pose height {height:.2f} m"
    assert not list(job.rglob("*.partial")) and not list(job.rglob(".tmp*"))
    return bundle


# -- simulated machine faults ---------------------------------------------------------------
_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2


def _drop_root_file_powers() -> None:
    """In the child, before exec: root without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH obeys file
    permissions like any user (the engine then sees EACCES, as a user's engine would)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def permissions_apply() -> Callable[[], None] | None:
    """The preexec_fn that makes permissions bite for the engine (None when not root)."""
    return _drop_root_file_powers if os.geteuid() == 0 else None


def file_size_limit(limit: int) -> Callable[[], None]:
    """A preexec_fn: no file the engine writes may exceed ``limit`` bytes (EFBIG beyond it;
    Python ignores SIGXFSZ, so the write fails instead of killing the process)."""
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def _mount(*args: str) -> str | None:
    """Run mount/umount with an argument list; None on success, else why it failed."""
    if shutil.which(args[0]) is None:
        return f"no {args[0]} command"
    proc = subprocess.run(list(args), capture_output=True, text=True, stdin=subprocess.DEVNULL)
    return None if proc.returncode == 0 else (proc.stderr.strip() or f"{args[0]} exited {proc.returncode}")


def _unmount(target: Path) -> None:
    if _mount("umount", str(target)) is not None:
        _mount("umount", "-l", str(target))


def can_write(folder: Path, preexec_fn: Callable[[], None] | None) -> bool:
    """Whether a child process started like the engine can create a file in ``folder``."""
    try:
        probe = subprocess.run([sys.executable, "-c", f"open({str(folder / 'probe')!r}, 'w')"],
                               capture_output=True, preexec_fn=preexec_fn)
    except subprocess.SubprocessError as exc:  # prctl refused: no CAP_SETPCAP in this container
        pytest.fail(f"cannot simulate a read-only folder here: running as root and dropping the DAC "
                    f"capabilities failed ({exc})")
    return probe.returncode == 0


# -- photos -----------------------------------------------------------------------------------
def person_photo(anny_body, size: int = 256, name: str = "standing_f") -> tuple[np.ndarray, np.ndarray]:
    """A synthetic subject's photo (S, S, 3) uint8 and the person's mask (S, S) bool."""
    from zeroavatar_blender.evaluation.synthetic import default_subjects, make_case

    spec = next(s for s in default_subjects() if s.name == name)
    spec.size = size
    case = make_case(anny_body, spec)
    return case.photo, case.views["front"]["mask"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory, anny_body) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("bad_input_photos")
    out: dict[str, Any] = {}
    rgb, _ = person_photo(anny_body)
    out["person"] = folder / "person.png"
    Image.fromarray(rgb).save(out["person"])
    small = render_person(anny_body, 256, 320, pose=arm_pose(anny_body, 40))
    tall = render_person(anny_body, 512, 640, pose=arm_pose(anny_body, 20))
    pair, _ = side_by_side(small.rgb, tall.rgb, (205, 212, 220))
    out["pair"] = folder / "pair.png"
    Image.fromarray(pair).save(out["pair"])
    out["pair_left_width"] = small.rgb.shape[1]
    return out


# -- files that are not usable photos -----------------------------------------------------------
def _truncated_jpeg(path: Path, photos: dict) -> None:
    buf = io.BytesIO()
    Image.open(photos["person"]).save(buf, "JPEG", quality=92)
    path.write_bytes(buf.getvalue()[: int(len(buf.getvalue()) * 0.6)])


def _unreadable(path: Path, photos: dict) -> None:
    shutil.copyfile(photos["person"], path)
    path.chmod(0)


FILE_CASES: dict[str, tuple[str, Callable[[Path, dict], None], tuple[str, ...]]] = {
    # case: (file name, how to make it, words the error must contain)
    "text_named_jpg": ("notes.jpg", lambda p, _: p.write_text("shopping list: eggs, milk\n"),
                       ("notes.jpg", "not an image", "text file", "jpeg")),
    "one_pixel": ("dot.png", lambda p, _: Image.new("RGB", (1, 1)).save(p), ("dot.png", "1x1", "too small")),
    "truncated_jpeg": ("cut.jpg", _truncated_jpeg, ("cut.jpg", "truncated", "re-export")),
    "huge_png": ("huge.png", lambda p, _: write_huge_blank_png(p, 20000, 20000),
                 ("huge.png", "too large", "jpeg")),
    "video_named_jpg": ("clip.jpg", lambda p, _: p.write_bytes(b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2"
                                                               + b"\x00" * 64), ("clip.jpg", "video")),
    "empty": ("empty.jpg", lambda p, _: p.touch(), ("empty.jpg", "empty", "again")),
    "missing": ("nowhere.jpg", lambda p, _: None, ("nowhere.jpg", "not found")),
    "folder": ("holiday.jpg", lambda p, _: p.mkdir(), ("holiday.jpg", "folder")),
    "unreadable": ("locked.jpg", _unreadable, ("locked.jpg", "permission denied")),
}


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_unusable_photo_file(case, photos, tmp_path):
    name, make, words = FILE_CASES[case]
    photo = tmp_path / name
    make(photo, photos)
    job = tmp_path / "job"
    outcome = generate(photo, job, preexec_fn=permissions_apply() if case == "unreadable" else None)
    assert_failed(outcome, protocol.EXIT_BAD_INPUT, *words)
    assert_no_result(job)
    assert not any((job / "input").iterdir())  # the bad file is not copied into the job


# -- everyday formats the loader tests elsewhere do not cover (load level: cheap) ----------------
@pytest.mark.parametrize("fmt", ["webp", "bmp", "tiff", "one_bit_png", "broken_icc_png"])
def test_everyday_formats_load(fmt, tmp_path):
    from zeroavatar_blender.engine.imageio import load_photo

    a = astronaut()
    path = tmp_path / f"photo.{fmt.split('_')[-1]}"
    if fmt == "webp":
        Image.fromarray(a).save(path, lossless=True)
    elif fmt == "one_bit_png":
        Image.fromarray(a).convert("1").save(path)
        a = np.repeat(np.asarray(Image.open(path).convert("L"))[..., None], 3, axis=2)
    elif fmt == "broken_icc_png":
        Image.fromarray(a).save(path, icc_profile=b"this is not an ICC profile" * 8)
        assert Image.open(path).info.get("icc_profile")  # the broken profile really is in the file
    else:
        Image.fromarray(a).save(path)
    photo = load_photo(path)
    assert photo.rgb.shape == (512, 512, 3) and photo.alpha is None
    assert np.array_equal(photo.rgb, a)


# -- photos without a usable person -------------------------------------------------------------
def test_no_person(tmp_path):
    from skimage import data

    photo = tmp_path / "coffee.jpg"
    Image.fromarray(data.coffee()).save(photo, quality=92)
    job = tmp_path / "job"
    outcome = generate(photo, job)
    assert_failed(outcome, protocol.EXIT_NO_PERSON, "no person found", "coffee.jpg", "crop")
    assert_no_result(job)
    assert not (job / "perception.npz").exists() and not (job / "fit.json").exists()


@pytest.mark.parametrize("person, words", [
    ("3", ("person 3 from the left", "2 people", "pair.png", "--person 1 to 2")),
    ("0", ("--person 0", "numbered from 1")),
])
def test_person_number_that_does_not_exist(person, words, photos, tmp_path):
    job = tmp_path / "job"
    outcome = generate(photos["pair"], job, "--person", person)
    assert_failed(outcome, protocol.EXIT_BAD_INPUT, *words)
    assert_no_result(job)


@pytest.mark.parametrize("height, words", [
    ("175", ("--height 175", "not a person's height in metres", "--height 1.75")),
    ("nan", ("--height nan", "in metres, between 0.5 and 2.6")),
    ("2.55", ("cannot be 2.55 m tall", "standing height between")),  # the CLI allows it; the body cannot
])
def test_height_that_is_not_a_persons(height, words, photos, tmp_path):
    job = tmp_path / "job"
    outcome = generate(photos["person"], job, "--height", height)
    assert_failed(outcome, protocol.EXIT_BAD_INPUT, *words)
    assert_no_result(job)


# -- awkward photos that must work ---------------------------------------------------------------
def test_awkward_paths_and_a_chosen_person(photos, tmp_path):
    """Spaces, quotes and non-ASCII letters in the photo's path and in the output folder, and the
    left one of two people asked for with --person 1. Then a bad photo into the same job folder:
    the earlier result must not survive to pass for the new one's."""
    photo = tmp_path / "in 'dir' ü" / AWKWARD_NAME
    photo.parent.mkdir()
    shutil.copyfile(photos["pair"], photo)
    job = tmp_path / AWKWARD_FOLDER / "job ñ 1"
    outcome = generate(photo, job, "--person", "1")
    assert_result(outcome, job)
    assert "Person 1 of 2" in " ".join(outcome.messages())
    settings = json.loads((job / "job.json").read_text(encoding="utf-8"))
    assert settings["source_photo"] == str(photo) and settings["person"] == 0
    assert (job / settings["photo"]).read_bytes() == photo.read_bytes()
    from zeroavatar_blender.engine.perception import Perception

    perception = Perception.load(job / "perception.npz")
    assert perception.num_people == 2 and perception.person_index == 0
    assert perception.bbox[2] <= photos["pair_left_width"] + 8  # the left person's box

    bad = tmp_path / "in 'dir' ü" / "nøt a phöto.jpg"
    bad.write_text("hello")
    again = generate(bad, job)
    assert_failed(again, protocol.EXIT_BAD_INPUT, "not an image")
    assert_no_result(job)
    assert not (job / "perception.npz").exists() and not (job / "fit.json").exists()


def test_person_cut_off_at_the_chest(tmp_path):
    photo = tmp_path / "astronaut_chest.png"
    Image.fromarray(astronaut()[:330]).save(photo)  # head, shoulders and the top of the chest
    job = tmp_path / "job"
    outcome = generate(photo, job)
    assert_result(outcome, job)
    assert any("legs are not visible" in m for m in outcome.messages())


def test_photo_that_is_mostly_person(anny_body, tmp_path):
    """The person fills the frame and the edges cut off the top of the head, the hands and feet."""
    rgb, mask = person_photo(anny_body, 512)
    ys, xs = np.nonzero(mask)
    h, w = ys.max() - ys.min(), xs.max() - xs.min()
    crop = rgb[ys.min() + int(0.06 * h): ys.max() - int(0.06 * h), xs.min() + int(0.12 * w): xs.max() - int(0.12 * w)]
    photo = tmp_path / "closeup.png"
    Image.fromarray(crop).save(photo)
    job = tmp_path / "job"
    outcome = generate(photo, job)
    assert_result(outcome, job)


# A 20000 x 20000 JPEG showing a person, written directly: every 8x8 block is flat (DC only), so
# the file is a few megabytes and libjpeg's 1/8-scale decode returns exactly the small image.
_DC_BITS = bytes([0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
_DC_LEN = np.array([2, 3, 3, 3, 3, 3, 4, 5, 6, 7, 8, 9], np.int64)  # ITU T.81 K.3, by category
_DC_CODE = np.array([0b00, 0b010, 0b011, 0b100, 0b101, 0b110, 0b1110, 0b11110, 0b111110, 0b1111110, 0b11111110,
                     0b111111110], np.int64)
_AC_BITS = bytes([0, 2, 1, 3, 3, 2, 4, 3, 5, 5, 4, 4, 0, 0, 1, 0x7D])
_AC_VALS = bytes.fromhex(
    "01020300041105122131410613516107227114328191a1082342b1c11552d1f02433627282090a161718191a25262728292a"
    "3435363738393a434445464748494a535455565758595a636465666768696a737475767778797a838485868788898a929394"
    "95969798999aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4c5c6c7c8c9cad2d3d4d5d6d7d8d9dae1e2e3e4e5e6e7e8"
    "e9eaf1f2f3f4f5f6f7f8f9fa")


def write_block_jpeg(path: Path, blocks: np.ndarray) -> None:
    """Greyscale baseline JPEG of (8h, 8w) pixels whose 8x8 blocks are flat at ``blocks`` (h, w)
    uint8: each block is one DC difference (standard Huffman table, quantiser 1) and end-of-block."""
    dc = (np.asarray(blocks, np.int64).reshape(-1) - 128) * 8
    diff = np.diff(dc, prepend=0)
    mag = np.abs(diff)
    cat = np.zeros_like(mag)
    cat[mag > 0] = np.floor(np.log2(mag[mag > 0])).astype(np.int64) + 1
    value = np.where(diff >= 0, diff, diff + (1 << cat) - 1)
    code = (_DC_CODE[cat] << (cat + 4)) | (value << 4) | 0b1010  # 1010: end of block
    length = _DC_LEN[cat] + cat + 4
    aligned = (code.astype(np.uint64) << (32 - length).astype(np.uint64)).astype(">u4")
    first = np.arange(32, dtype=np.uint8)[None]
    chunks = []
    for a in range(0, len(code), 1 << 20):  # each block's leading `length` bits, in order
        bits = np.unpackbits(aligned[a:a + (1 << 20)].view(np.uint8)).reshape(-1, 32)
        chunks.append(bits[first < length[a:a + (1 << 20), None].astype(np.uint8)])
    bits = np.concatenate(chunks)
    bits = np.concatenate([bits, np.ones(-len(bits) % 8, np.uint8)])  # pad with 1s
    data = np.packbits(bits).tobytes().replace(b"\xff", b"\xff\x00")
    h, w = blocks.shape
    dqt = b"\xff\xdb" + struct.pack(">H", 67) + b"\x00" + b"\x01" * 64
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, h * 8, w * 8, 1) + b"\x01\x11\x00"
    dht = b"\xff\xc4" + struct.pack(">H", 2 + 17 + 12 + 17 + len(_AC_VALS)) + b"\x00" + _DC_BITS + bytes(range(12)) \
        + b"\x10" + _AC_BITS + _AC_VALS
    sos = b"\xff\xda" + struct.pack(">HB", 8, 1) + b"\x01\x00" + b"\x00\x3f\x00"
    Path(path).write_bytes(b"\xff\xd8" + dqt + sof + dht + sos + data + b"\xff\xd9")


def test_block_jpeg_writer_decodes_to_its_blocks(tmp_path):
    blocks = np.random.default_rng(0).integers(0, 256, (30, 44)).astype(np.uint8)
    write_block_jpeg(tmp_path / "b.jpg", blocks)
    with Image.open(tmp_path / "b.jpg") as im:
        assert im.size == (352, 240)
        full = np.asarray(im).astype(int)
    assert np.array_equal(full.reshape(30, 8, 44, 8), np.broadcast_to(blocks[:, None, :, None], (30, 8, 44, 8)))


def test_tiny_person_in_a_20000_pixel_jpeg(anny_body, tmp_path):
    """400 megapixels (over Pillow's bomb limit) with a person a tenth of its height, off centre."""
    r = render_person(anny_body, 200, 250, pose=arm_pose(anny_body, 30))
    canvas = np.full((2500, 2500), 200, np.uint8)
    canvas[1500:1750, 1700:1900] = np.round(r.rgb @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
    photo = tmp_path / "huge group 20000px.jpg"
    write_block_jpeg(photo, canvas)
    job = tmp_path / "job"
    outcome = generate(photo, job)
    assert_result(outcome, job)
    assert any("small" in m and "crop" in m for m in outcome.messages())
    from zeroavatar_blender.engine.perception import Perception

    perception = Perception.load(job / "perception.npz")
    assert tuple(perception.image_size) == (20000, 20000)
    truth = r.keypoints * 8 + np.array([1700 * 8, 1500 * 8])  # original pixels
    assert np.abs(perception.keypoints - truth).max() < 0.05 * r.height_px * 8
    # decoded at 1/8 scale: a full decode alone would take 1.2 GB
    assert outcome.done["peak_rss_mb"] < 2500


# -- the machine: folders that cannot be written, a full disk -------------------------------------
@pytest.mark.parametrize("where", ["inside", "is"])
def test_read_only_output_folder(where, photos, tmp_path):
    """--out inside a folder the user cannot write, or --out an existing read-only folder."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    preexec = permissions_apply()
    try:
        assert not can_write(locked, preexec), "the read-only folder is writable: the simulation did not work"
        job = locked / "job" if where == "inside" else locked
        outcome = generate(photos["person"], job, preexec_fn=preexec)
    finally:
        locked.chmod(0o755)
    assert outcome.code == protocol.EXIT_IO, outcome.stderr[-2000:]
    assert "permission denied" in outcome.stderr and "choose an output folder" in outcome.stderr
    assert "Traceback" not in outcome.stderr
    assert list(locked.iterdir()) == []  # nothing written, not even events


@pytest.fixture
def small_disk(tmp_path):
    """A 384 KiB file system for the job: enough for the photo copy, perception and fit, not for
    the avatar (about 1.2 MB). Yields (folder, make_room, how, preexec_fn); make_room() frees space.
    Without permission to mount, the engine gets a 384 KiB file-size limit instead."""
    disk = tmp_path / "small disk"
    disk.mkdir()
    reason = _mount("mount", "-t", "tmpfs", "-o", "size=384k,mode=0755", "zeroavatar_test", str(disk))
    if reason is None:
        try:
            yield disk, lambda: _mount("mount", "-o", "remount,size=64m", str(disk)), "tmpfs", None
        finally:
            _unmount(disk)
        return
    print(f"cannot mount a tmpfs ({reason}): simulating the full disk with RLIMIT_FSIZE instead")
    state = {"limit": file_size_limit(384 * 1024)}
    yield disk, lambda: state.update(limit=None), "rlimit", state


def test_full_disk_while_writing_the_result(small_disk, photos):
    disk, make_room, how, limit = small_disk
    job = disk / "job"
    outcome = generate(photos["person"], job, preexec_fn=limit["limit"] if limit else None)
    words = ("the disk is full", "free some space", "resume") if how == "tmpfs" else ("too large", "resume")
    error = assert_failed(outcome, protocol.EXIT_IO, *words)
    assert "result" in error["message"]  # it names where it was writing
    assert_no_result(job)
    assert (job / "perception.npz").is_file() and (job / "fit.json").is_file()  # kept for the resume
    assert make_room() is None
    resumed = engine("resume", job, events_in=job, preexec_fn=limit["limit"] if limit else None)
    assert_result(resumed, job)


def test_file_size_limit_on_the_photo_copy(photos, tmp_path):
    """The first big write of a job is the copy of the photo into it: a 20 KiB file-size limit
    stops it there (EFBIG) with a clear error, and no half copy stays."""
    job = tmp_path / "job"
    outcome = generate(photos["person"], job, preexec_fn=file_size_limit(20 * 1024))
    assert_failed(outcome, protocol.EXIT_IO, "too large", "photo", "ulimit")
    assert_no_result(job)
    assert not any((job / "input").iterdir())


@pytest.mark.parametrize("limit, where", [(1, "engine.lock"), (64, "events.jsonl")])
def test_no_room_even_for_the_events(limit, where, photos, tmp_path):
    """When not even the lock file or the first event can be written, the error still reaches
    the user, on stderr, with the exit code, and no traceback."""
    job = tmp_path / "job"
    outcome = generate(photos["person"], job, preexec_fn=file_size_limit(limit))
    assert outcome.code == protocol.EXIT_IO, outcome.stderr[-2000:]
    assert "Traceback" not in outcome.stderr
    assert f"cannot write {job / where}: the file is too large" in outcome.stderr
    assert "then resume the job" in outcome.stderr
    assert not (job / "engine.lock").exists()  # no lock left to block the next run
    assert_no_result(job)
