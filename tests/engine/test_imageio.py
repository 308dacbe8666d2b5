"""load_photo on the photos users really send, and on the files they send by mistake."""

from __future__ import annotations

import io
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from tests.engine.photos import astronaut, write_huge_blank_png, write_huge_grey_jpeg, write_png16
from zeroavatar_blender.engine.errors import BadInputError
from zeroavatar_blender.engine.imageio import ALPHA_BACKGROUND, load_photo

ORIENT_TRANSPOSE = {  # what to store so that applying the EXIF orientation gives the original back
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,  # stored turned left; the viewer turns it right
    8: Image.Transpose.ROTATE_270,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
}


def _bad(path, *words):
    with pytest.raises(BadInputError) as info:
        load_photo(path)
    text = str(info.value)
    assert str(path.name) in text, text
    for w in words:
        assert w in text.lower(), text
    return text


def test_astronaut_ships_offline_and_loads(tmp_path):
    a = astronaut()
    assert a.shape == (512, 512, 3) and a.dtype == np.uint8
    path = tmp_path / "astronaut.png"
    Image.fromarray(a).save(path)
    photo = load_photo(path)
    assert photo.rgb.dtype == np.uint8 and photo.rgb.flags.c_contiguous
    assert np.array_equal(photo.rgb, a)
    assert photo.scale == 1.0 and photo.original_size == (512, 512)
    assert photo.path == str(path) and photo.focal_px is None and photo.alpha is None


def test_downscales_to_max_side(tmp_path):
    path = tmp_path / "wide.png"
    Image.fromarray(astronaut()).resize((1500, 1000)).save(path, compress_level=1)
    photo = load_photo(path, max_side=512)
    assert photo.rgb.shape == (341, 512, 3)
    assert photo.original_size == (1500, 1000)
    assert photo.scale == pytest.approx(512 / 1500)


@pytest.mark.parametrize("orientation", sorted(ORIENT_TRANSPOSE))
def test_exif_orientation_is_applied(tmp_path, orientation):
    a = np.asarray(Image.fromarray(astronaut()).resize((320, 240)))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"rot{orientation}.jpg"
    Image.fromarray(a).transpose(ORIENT_TRANSPOSE[orientation]).save(path, quality=95, exif=exif)
    photo = load_photo(path)
    assert photo.original_size == (320, 240)
    assert np.abs(photo.rgb.astype(int) - a).mean() < 4  # JPEG noise only


def test_exif_rotation_with_jpeg_draft_downscale(tmp_path):
    a = np.asarray(Image.fromarray(astronaut()).resize((1600, 1200)))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated_big.jpg"
    Image.fromarray(a).transpose(Image.Transpose.ROTATE_90).save(path, quality=95, exif=exif)
    photo = load_photo(path, max_side=400)
    assert photo.original_size == (1600, 1200) and photo.rgb.shape == (300, 400, 3)
    ref = np.asarray(Image.fromarray(a).resize((400, 300), Image.Resampling.LANCZOS)).astype(int)
    assert np.abs(photo.rgb.astype(int) - ref).mean() < 6


def test_focal_length_from_35mm_equivalent(tmp_path):
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0xA405] = 28
    path = tmp_path / "phone.jpg"
    Image.fromarray(astronaut()).resize((400, 300)).save(path, exif=exif)
    photo = load_photo(path, max_side=200)
    assert photo.focal_px == pytest.approx(28 / math.hypot(36, 24) * 500.0)  # ORIGINAL pixels


def test_focal_length_from_focal_plane_resolution(tmp_path):
    exif = Image.Exif()
    ifd = exif.get_ifd(0x8769)
    ifd[0x920A] = 4.0  # mm
    ifd[0xA20E] = 1000.0  # px per cm (unit 3)
    ifd[0xA210] = 3
    ifd[0xA002], ifd[0xA003] = 800, 600  # the camera's pixels; the file was halved
    path = tmp_path / "camera.jpg"
    Image.fromarray(astronaut()).resize((400, 300)).save(path, exif=exif)
    assert load_photo(path).focal_px == pytest.approx(4.0 * 100.0 * 0.5)


def test_implausible_focal_is_ignored(tmp_path):
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0xA405] = 50000
    path = tmp_path / "odd.jpg"
    Image.fromarray(astronaut()).save(path, exif=exif)
    assert load_photo(path).focal_px is None


def test_grayscale(tmp_path):
    path = tmp_path / "grey.png"
    Image.fromarray(astronaut()).convert("L").save(path)
    rgb = load_photo(path).rgb
    assert rgb.shape == (512, 512, 3)
    assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])


def test_rgba_composited_on_white_and_alpha_kept(tmp_path):
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3] = (200, 30, 40)
    rgba[16:48, 16:48, 3] = 255
    path = tmp_path / "cutout.png"
    Image.fromarray(rgba).save(path)
    photo = load_photo(path)
    assert tuple(photo.rgb[0, 0]) == ALPHA_BACKGROUND
    assert tuple(photo.rgb[32, 32]) == (200, 30, 40)
    assert photo.alpha is not None and photo.alpha.dtype == np.float32
    assert photo.alpha[32, 32] == 1.0 and photo.alpha[0, 0] == 0.0


def test_opaque_rgba_has_no_alpha(tmp_path):
    path = tmp_path / "opaque.png"
    Image.fromarray(astronaut()).convert("RGBA").save(path)
    photo = load_photo(path)
    assert photo.alpha is None and np.array_equal(photo.rgb, astronaut())


def test_palette_with_transparency(tmp_path):
    im = Image.fromarray(astronaut()).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    im.info["transparency"] = int(np.asarray(im)[0, 0])
    path = tmp_path / "palette.png"
    im.save(path, transparency=im.info["transparency"])
    photo = load_photo(path)
    assert tuple(photo.rgb[0, 0]) == ALPHA_BACKGROUND and photo.alpha[0, 0] == 0.0
    assert photo.alpha.mean() > 0.5


def test_plain_palette(tmp_path):
    path = tmp_path / "palette.gif"
    Image.fromarray(astronaut()).convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(path)
    photo = load_photo(path)
    assert photo.alpha is None and np.abs(photo.rgb.astype(int) - astronaut()).mean() < 10


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (48, 1))
    path = tmp_path / "grey16.png"
    write_png16(path, ramp)
    assert Image.open(path).mode.startswith("I;16")
    rgb = load_photo(path).rgb
    assert np.array_equal(rgb[..., 0], (ramp >> 8).astype(np.uint8))


def test_16bit_rgb_png(tmp_path):
    px = np.random.default_rng(0).integers(0, 65536, (40, 50, 3)).astype(np.uint16)
    path = tmp_path / "rgb16.png"
    write_png16(path, px)
    assert np.array_equal(load_photo(path).rgb, (px >> 8).astype(np.uint8))


def test_float_tiff(tmp_path):
    f = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (40, 1))
    path = tmp_path / "float.tif"
    Image.fromarray(f).save(path)
    rgb = load_photo(path).rgb
    assert rgb[0, 0, 0] == 0 and rgb[0, -1, 0] == 255


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (64, 64), (255, 0, 0, 0)).save(path, quality=95)  # pure cyan ink
    r, g, b = load_photo(path).rgb[32, 32].astype(int)
    assert r < 40 and g > 215 and b > 215


def test_embedded_srgb_profile(tmp_path):
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    path = tmp_path / "srgb.png"
    Image.fromarray(astronaut()).save(path, icc_profile=icc)
    assert np.abs(load_photo(path).rgb.astype(int) - astronaut()).max() <= 3


def test_huge_jpeg_decodes_reduced(tmp_path):
    path = tmp_path / "huge.jpg"
    write_huge_grey_jpeg(path, 20000, 20000, level=90)  # 400 MP: over Pillow's bomb limit
    photo = load_photo(path)
    assert photo.original_size == (20000, 20000)
    assert photo.rgb.shape == (2048, 2048, 3) and photo.scale == pytest.approx(2048 / 20000)
    assert np.abs(photo.rgb.astype(int) - 90).max() <= 1


def test_huge_png_is_refused_clearly(tmp_path):
    path = tmp_path / "huge.png"
    write_huge_blank_png(path, 20000, 20000)
    _bad(path, "too large", "downscale")


def test_one_pixel(tmp_path):
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1)).save(path)
    _bad(path, "1x1", "too small")


def test_truncated_jpeg(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(astronaut()).save(buf, "JPEG", quality=90)
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    _bad(path, "truncated")
    path.write_bytes(buf.getvalue()[:200])  # cut inside the header
    _bad(path, "damaged")


def test_corrupt_png_pixel_data(tmp_path):
    path = tmp_path / "bitflip.png"
    Image.fromarray(astronaut()).save(path)
    data = bytearray(path.read_bytes())
    data[5000] ^= 0xFF  # inside the compressed pixels: zlib may still decode it, to garbage
    path.write_bytes(bytes(data))
    _bad(path, "damaged")


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("shopping list: eggs, milk\n")
    _bad(path, "not an image", "text file")


@pytest.mark.parametrize("content, word", [
    (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64, "heif"),
    (b'<svg xmlns="http://www.w3.org/2000/svg"></svg>', "svg"),
    (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", "pdf"),
])
def test_other_formats_are_named(tmp_path, content, word):
    path = tmp_path / "IMG_0001.jpg"
    path.write_bytes(content)
    _bad(path, word)


def test_unreadable_file():
    """A photo the user may not read. Root reads any file, so as root (CI) the check runs in a
    forked child that has dropped to the unprivileged 'nobody' user first."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="za_locked_"))
    try:
        folder.chmod(0o755)
        path = folder / "locked.jpg"
        Image.fromarray(astronaut()).save(path)
        path.chmod(0)
        if os.geteuid() != 0:
            _bad(path, "permission denied")
            return
        pid = os.fork()
        if pid == 0:  # child: no exceptions may escape into pytest's machinery
            code = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                _bad(path, "permission denied")
                code = 0
            except BaseException:  # noqa: BLE001 - reported through the exit status
                code = 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, "an unreadable photo was not refused clearly"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_missing_file_and_folder_and_empty(tmp_path):
    _bad(tmp_path / "nowhere.jpg", "not found")
    folder = tmp_path / "photos.jpg"
    folder.mkdir()
    _bad(folder, "folder")
    empty = tmp_path / "empty.jpg"
    empty.touch()
    _bad(empty, "empty")


def test_awkward_path(tmp_path):
    path = tmp_path / "my 'best' \"photo\" ñandú 写真 (1).jpg"
    Image.fromarray(astronaut()).save(path)
    photo = load_photo(str(path))
    assert photo.rgb.shape == (512, 512, 3) and photo.path == str(path)
