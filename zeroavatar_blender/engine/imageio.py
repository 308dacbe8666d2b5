"""Read a user's photo into one predictable working image, or fail with a message that says why.

Photos arrive in every shape: phone JPEGs lying on their side with an EXIF rotation, 16-bit
PNGs, CMYK JPEGs from print workflows, cut-outs with transparency, 100-megapixel scans. Every
later stage sees the same thing: an upright sRGB uint8 image no larger than ``max_side``, plus
how it maps back to the original pixels (keypoints and the camera are in original pixels).
"""

from __future__ import annotations

import io
import math
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from .errors import BadInputError

# Decoding beyond this many pixels (after JPEG's free 1/2..1/8 scaling) needs gigabytes: refuse.
MAX_DECODE_PIXELS = 2 * 89_478_485  # Pillow's own default decompression-bomb error limit
# Smaller than this on either side cannot show a person well enough to fit a body.
MIN_SIDE = 32
# White, like the renders the optimiser compares against (cut-outs are usually meant on white).
ALPHA_BACKGROUND = (255, 255, 255)

_EXIF_IFD = 0x8769
_ORIENTATION = 0x0112
_FOCAL_LENGTH = 0x920A
_FOCAL_35MM = 0xA405
_FOCAL_PLANE_XRES = 0xA20E
_FOCAL_PLANE_UNIT = 0xA210
_PIXEL_X_DIMENSION = 0xA002
_PIXEL_Y_DIMENSION = 0xA003
_MM_PER_UNIT = {2: 25.4, 3: 10.0, 4: 1.0, 5: 0.001}  # inch, cm, mm, micrometre
_DIAGONAL_35MM = math.hypot(36.0, 24.0)


@dataclass
class Photo:
    rgb: np.ndarray  # (h, w, 3) uint8 working image, EXIF orientation applied, max(h, w) <= max_side
    scale: float  # working px per original px (<= 1.0)
    original_size: tuple[int, int]  # (W, H) after EXIF rotation, in original pixels
    path: str
    focal_px: float | None  # focal length in ORIGINAL pixels from EXIF, when present
    alpha: np.ndarray | None = None  # (h, w) float32 in [0, 1] when the photo had transparency

    @property
    def working_size(self) -> tuple[int, int]:
        return int(self.rgb.shape[1]), int(self.rgb.shape[0])


def load_photo(path: str | Path, max_side: int = 2048) -> Photo:
    """The photo at ``path`` as an upright working image. Raises BadInputError with the reason."""
    if max_side < MIN_SIDE:
        raise ValueError(f"max_side must be at least {MIN_SIDE}, got {max_side}")
    p = Path(path).expanduser()
    _check_file(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = _open(p)
        try:
            return _decode(im, p, max_side)
        finally:
            im.close()


def _check_file(p: Path) -> None:
    try:
        st = p.stat()
    except FileNotFoundError:
        raise BadInputError(f"photo not found: {p}", "check the path (and that the drive is mounted)") from None
    except OSError as exc:
        raise BadInputError(f"cannot open {p}: {exc.strerror or exc}", "check the path and its permissions") from exc
    if p.is_dir():
        raise BadInputError(f"{p} is a folder, not a photo", "pass the path of one image file (JPEG, PNG, WebP...)")
    if st.st_size == 0:
        raise BadInputError(f"{p} is empty (0 bytes)", "the copy or download probably failed; get the photo again")


def _open(p: Path) -> Image.Image:
    try:
        return Image.open(p)
    except Image.DecompressionBombError:
        head = _head(p)
        if head.startswith(b"\xff\xd8\xff"):  # JPEG decodes at 1/2..1/8 scale for free: allow it
            return JpegImagePlugin.JpegImageFile(str(p))
        raise BadInputError(f"{p} is too large to decode safely (over {MAX_DECODE_PIXELS // 1_000_000} megapixels)",
                            "downscale it to at most 4096 pixels on the long side, or save it as a JPEG") from None
    except UnidentifiedImageError:
        raise BadInputError(f"{p} is not an image this engine can read: {_sniff(p)}",
                            "use a JPEG, PNG, WebP, TIFF or BMP photo") from None
    except PermissionError as exc:
        raise BadInputError(f"cannot read {p}: permission denied", "check the file's permissions") from exc
    except OSError as exc:
        raise BadInputError(f"{p} is truncated or damaged ({exc})",
                            "re-export or re-download the photo; the file is incomplete") from exc


def _head(p: Path, n: int = 64) -> bytes:
    try:
        with open(p, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def _sniff(p: Path) -> str:
    """A human guess at what a file Pillow cannot identify really is."""
    head = _head(p, 512)
    if head[4:8] == b"ftyp":
        brand = head[8:12].decode("ascii", "replace")
        if brand.startswith(("heic", "heix", "hevc", "mif1", "msf1", "avif")):
            return f"it is a HEIF/AVIF image ('{brand}'), which this engine's Pillow does not decode"
        return f"it is a video/ISO media file ('{brand}')"
    if head.lstrip().startswith((b"<svg", b"<?xml")):
        return "it is an SVG/XML drawing, not a photo"
    if head.startswith(b"%PDF"):
        return "it is a PDF document"
    if head and b"\0" not in head and sum(c < 32 and c not in b"\t\n\r" for c in head) == 0:
        return "it is a text file"
    if head.startswith(b"\xff\xd8"):
        return "it starts like a JPEG but its header is damaged"
    return "its format is unknown or the file is damaged"


def _decode(im: Image.Image, p: Path, max_side: int) -> Photo:
    W0, H0 = im.size  # as stored, before EXIF rotation
    exif = _exif(im)
    rotated = exif.get(_ORIENTATION, 1) in (5, 6, 7, 8)
    W, H = (H0, W0) if rotated else (W0, H0)
    if min(W, H) < MIN_SIDE:
        raise BadInputError(f"{p} is only {W}x{H} pixels: too small to show a person",
                            f"use a photo at least {MIN_SIDE} pixels on each side (512 or more works best)")
    s = min(1.0, max_side / max(W, H))
    size = (max(1, round(W * s)), max(1, round(H * s)))
    if isinstance(im, JpegImagePlugin.JpegImageFile) and s < 1.0:  # JPEG and MPO (phone photos)
        # libjpeg's DCT scaling: decode at the smallest 1/2..1/8 size still >= the working size.
        stored = (math.ceil(W0 * s), math.ceil(H0 * s))
        im.draft(im.mode, stored)
    if im.size[0] * im.size[1] > MAX_DECODE_PIXELS:
        raise BadInputError(f"{p} is {W}x{H} pixels ({W * H / 1e6:.0f} megapixels): too large to decode safely",
                            "downscale it to at most 4096 pixels on the long side, or save it as a JPEG")
    try:
        if im.format == "PNG":  # Pillow skips the pixel data's checksums when loading
            with Image.open(p) as check:
                check.verify()
        im.load()
    except MemoryError:
        raise BadInputError(f"{p} ({W}x{H}) does not fit in memory", "downscale the photo and try again") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise BadInputError(f"{p} is truncated or damaged ({exc})",
                            "re-export or re-download the photo; the file is incomplete") from exc
    im = ImageOps.exif_transpose(im)
    try:
        rgb, alpha = _to_rgb(im)
    except (ValueError, OSError) as exc:
        raise BadInputError(f"{p} uses colour mode {im.mode!r}, which cannot be converted to RGB ({exc})",
                            "save the photo as an 8-bit RGB JPEG or PNG") from exc
    if rgb.size != size:
        rgb = rgb.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        if alpha is not None:
            alpha = alpha.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    alpha_arr = None if alpha is None else np.asarray(alpha, dtype=np.float32) / 255.0
    return Photo(np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8)), float(size[0] / W), (int(W), int(H)),
                 str(p), focal_from_exif(exif, W0, H0), alpha_arr)


def _exif(im: Image.Image) -> Image.Exif:
    try:
        return im.getexif()
    except Exception:  # noqa: BLE001 - broken EXIF must not stop a readable photo
        return Image.Exif()


def _to_rgb(im: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """Any Pillow mode -> (sRGB 'RGB' image, 'L' alpha or None). Alpha is composited on white."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(_high_depth_to_u8(np.asarray(im))).convert("RGB"), None
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB", "1") and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        alpha = rgba.getchannel("A")
        if alpha.getextrema() == (255, 255):  # declared but fully opaque
            return _icc_to_srgb(rgba.convert("RGB"), im.info.get("icc_profile")), None
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        flat = Image.alpha_composite(background, rgba).convert("RGB")
        return _icc_to_srgb(flat, im.info.get("icc_profile")), alpha
    if mode in ("RGB", "CMYK"):
        converted = _icc_to_srgb(im, im.info.get("icc_profile"))
        return (converted if converted.mode == "RGB" else converted.convert("RGB")), None
    return im.convert("RGB"), None


def _high_depth_to_u8(a: np.ndarray) -> np.ndarray:
    """16-bit and float greyscale -> uint8 (Pillow's own convert clips instead of scaling)."""
    if a.dtype.kind == "f":
        a = np.nan_to_num(a.astype(np.float64))
        hi = 1.0 if a.max() <= 1.0 else (255.0 if a.max() <= 255.0 else 65535.0)
        return np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if a.max() <= 255 and a.dtype.itemsize > 2:  # 'I' holding 8-bit values
        return a.astype(np.uint8)
    return (np.clip(a, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)


def _icc_to_srgb(im: Image.Image, icc: bytes | None) -> Image.Image:
    """Apply an embedded colour profile (Display P3 phones, CMYK print files); plain convert without one."""
    if not icc:
        return im if im.mode == "RGB" else im.convert("RGB")
    try:
        from PIL import ImageCms

        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        dst = ImageCms.createProfile("sRGB")
        return ImageCms.profileToProfile(im, src, dst, outputMode="RGB")
    except Exception:  # noqa: BLE001 - a broken profile: the pixels are still usable
        return im if im.mode == "RGB" else im.convert("RGB")


def focal_from_exif(exif: Image.Exif, stored_w: int, stored_h: int) -> float | None:
    """Focal length in pixels of the stored image, from EXIF, or None when absent or implausible.

    Prefer the 35 mm-equivalent focal length (defined on the 43.3 mm diagonal); otherwise use the
    physical focal length and the focal-plane resolution, corrected if the image was resized.
    """
    try:
        ifd = exif.get_ifd(_EXIF_IFD)
    except Exception:  # noqa: BLE001
        return None
    tags = {**dict(exif), **dict(ifd)}
    diag = math.hypot(stored_w, stored_h)
    focal = None
    f35 = _number(tags.get(_FOCAL_35MM))
    if f35 and f35 > 0:
        focal = f35 / _DIAGONAL_35MM * diag
    else:
        f_mm = _number(tags.get(_FOCAL_LENGTH))
        xres = _number(tags.get(_FOCAL_PLANE_XRES))
        unit = _MM_PER_UNIT.get(int(_number(tags.get(_FOCAL_PLANE_UNIT)) or 2))
        if f_mm and f_mm > 0 and xres and xres > 0 and unit:
            focal = f_mm * xres / unit
            # Focal-plane resolution counts the camera's pixels: rescale if the file was resized.
            sensor = [_number(tags.get(t)) for t in (_PIXEL_X_DIMENSION, _PIXEL_Y_DIMENSION)]
            if all(d and d > 0 for d in sensor):
                focal *= max(stored_w, stored_h) / max(sensor)
    if focal is None or not (0.2 * max(stored_w, stored_h) <= focal <= 30.0 * max(stored_w, stored_h)):
        return None
    return float(focal)


def _number(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, tuple) and len(value) == 2:  # old-style rational
        return float(value[0]) / float(value[1]) if value[1] else None
    try:
        x = float(value)  # IFDRational, int, float
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return x if math.isfinite(x) else None
