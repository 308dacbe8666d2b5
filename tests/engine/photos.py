"""Test photos made here, offline: synthetic renders of the Anny body and real-image edge cases.

The renders come with their ground truth (projected COCO-17 keypoints, silhouette), so the
perception tests can check where keypoints land and how well the mask fits, not just that
something was returned.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from zeroavatar_blender.engine.cameras import Camera, intrinsics, look_at

# Clothing by the bone that moves a face most: a plausible dressed person helps the detector.
_SKIN = (0.86, 0.66, 0.53)
_SHIRT = (0.18, 0.36, 0.70)
_TROUSERS = (0.22, 0.22, 0.26)
_SHOES = (0.35, 0.20, 0.12)
_HAIR = (0.20, 0.13, 0.08)
_EYES = (0.08, 0.06, 0.05)


@dataclass
class Render:
    """A synthetic photo with its ground truth."""

    rgb: np.ndarray  # (H, W, 3) uint8
    silhouette: np.ndarray  # (H, W) bool
    keypoints: np.ndarray  # (17, 2) projected COCO-17, pixel centres at integers
    height_px: float  # the body's height on the image (head top to soles)
    camera: Camera


def _bone_colour(name: str) -> tuple[float, float, float]:
    if name.startswith("eye"):
        return _EYES
    if name.startswith(("foot", "toe")):
        return _SHOES
    if name.startswith(("pelvis", "upperleg", "lowerleg", "root")):
        return _TROUSERS
    if name.startswith(("spine", "clavicle", "shoulder", "upperarm")):
        return _SHIRT
    return _SKIN


def face_colours(body, vertices: np.ndarray) -> np.ndarray:
    """(F, 3) float colours: clothes by dominant bone, hair on the top and back of the head."""
    idx = body.skin_indices[:, 0].cpu().numpy()
    palette = np.array([_bone_colour(n) for n in body.bone_names])
    vcol = palette[idx]
    head = np.array([n in ("head", "neck03") for n in body.bone_names])[idx]
    z = vertices[:, 2]
    top = z.max()
    # Hair: the upper skull plus the back of the head (+Y is behind the subject).
    hair = head & ((z > top - 0.07) | ((vertices[:, 1] > 0.02) & (z > top - 0.2)))
    vcol[hair] = _HAIR
    return vcol[body.faces].mean(1)


def rasterize(verts_px: np.ndarray, depth: np.ndarray, faces: np.ndarray, width: int, height: int) -> np.ndarray:
    """Nearest face id per pixel (-1 for none). verts_px (V,2) pixel centres at integers, depth (V,).

    A vectorised z-buffer over each triangle's bounding box; fine for test images.
    """
    tri = verts_px[faces]  # (F,3,2)
    z = depth[faces]  # (F,3)
    x0 = np.clip(np.floor(tri[..., 0].min(1)), 0, width - 1).astype(np.int64)
    x1 = np.clip(np.ceil(tri[..., 0].max(1)), 0, width - 1).astype(np.int64)
    y0 = np.clip(np.floor(tri[..., 1].min(1)), 0, height - 1).astype(np.int64)
    y1 = np.clip(np.ceil(tri[..., 1].max(1)), 0, height - 1).astype(np.int64)
    visible = (z.min(1) > 0) & (tri[..., 0].max(1) >= 0) & (tri[..., 0].min(1) <= width - 1) \
        & (tri[..., 1].max(1) >= 0) & (tri[..., 1].min(1) <= height - 1)
    fids = np.nonzero(visible)[0]
    bw, bh = (x1 - x0 + 1)[fids], (y1 - y0 + 1)[fids]
    counts = bw * bh
    f = np.repeat(fids, counts)
    local = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    px = x0[f] + local % np.repeat(bw, counts)
    py = y0[f] + local // np.repeat(bw, counts)
    a, b, c = tri[f, 0], tri[f, 1], tri[f, 2]
    den = (b[:, 1] - c[:, 1]) * (a[:, 0] - c[:, 0]) + (c[:, 0] - b[:, 0]) * (a[:, 1] - c[:, 1])
    ok = np.abs(den) > 1e-12
    den = np.where(ok, den, 1.0)
    w0 = ((b[:, 1] - c[:, 1]) * (px - c[:, 0]) + (c[:, 0] - b[:, 0]) * (py - c[:, 1])) / den
    w1 = ((c[:, 1] - a[:, 1]) * (px - c[:, 0]) + (a[:, 0] - c[:, 0]) * (py - c[:, 1])) / den
    w2 = 1 - w0 - w1
    inside = ok & (w0 >= -1e-9) & (w1 >= -1e-9) & (w2 >= -1e-9)
    f, px, py = f[inside], px[inside], py[inside]
    zz = (w0[inside] * z[f, 0] + w1[inside] * z[f, 1] + w2[inside] * z[f, 2])
    order = np.lexsort((zz, py * width + px))  # by pixel, nearest first
    pix = (py * width + px)[order]
    first = np.ones(len(pix), bool)
    first[1:] = pix[1:] != pix[:-1]
    ids = np.full(width * height, -1, np.int64)
    ids[pix[first]] = f[order][first]
    return ids.reshape(height, width)


def arm_pose(body, down_deg: float = 20.0) -> torch.Tensor:
    """Pose (1,J,3) lowering both upper arms from Anny's A-pose by ``down_deg`` (negative raises)."""
    pose = torch.zeros(1, body.num_bones, 3, dtype=body.dtype)
    a = np.radians(down_deg)
    # +X is the subject's left and Y points behind: lowering the left arm turns it about +Y.
    pose[0, body.bone_names.index("upperarm01.L"), 1] = a
    pose[0, body.bone_names.index("upperarm01.R"), 1] = -a
    return pose


def render_person(body, width: int = 512, height: int = 640, *, pose: torch.Tensor | None = None,
                  fill: float = 0.85, supersample: int = 2, background: tuple[int, int, int] = (205, 212, 220),
                  centre_x: float = 0.5, azimuth_deg: float = 0.0) -> Render:
    """A full-body front view of Anny with Lambert shading, filling ``fill`` of the image height."""
    params = body.zero_params()
    if pose is not None:
        params.pose = pose.to(body.dtype)
    with torch.no_grad():
        out = body.forward(params)
    verts = out.vertices[0].double().numpy()
    kp3d = out.keypoints[0].double().numpy()
    lo, hi = verts.min(0), verts.max(0)
    body_h = hi[2] - lo[2]
    centre = np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, (lo[2] + hi[2]) / 2])
    K = intrinsics(width, height)
    dist = K[1, 1] * body_h / (fill * height)
    az = np.radians(azimuth_deg)
    eye = centre + dist * np.array([np.sin(az), -np.cos(az), 0.0])
    cam = Camera(K, look_at(eye, centre), width, height)
    # Shift the subject sideways on the image by moving the principal point.
    cam.K[0, 2] += (centre_x - 0.5) * width

    s = supersample
    big = cam.scaled(s)
    cam_pts = big.to_cam(verts)
    uv = big.project(verts)
    ids = rasterize(uv, cam_pts[:, 2], body.faces, big.width, big.height)

    tri = cam_pts[body.faces]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normals /= np.linalg.norm(normals, axis=1, keepdims=True) + 1e-12
    view = -tri.mean(1)
    view /= np.linalg.norm(view, axis=1, keepdims=True)
    light = np.array([-0.4, -0.6, -1.0])  # from the camera side, upper left
    light /= np.linalg.norm(light)
    lambert = np.abs(normals @ light)  # two-sided: the mesh winding need not be consistent
    shade = 0.35 + 0.65 * lambert
    colours = face_colours(body, verts) * shade[:, None]

    img = np.empty((big.height, big.width, 3))
    yy = np.linspace(1.0, 0.8, big.height)[:, None, None]
    img[:] = np.asarray(background, float)[None, None] / 255 * yy
    hit = ids >= 0
    img[hit] = colours[ids[hit]]
    img = img.reshape(height, s, width, s, 3).mean((1, 3))
    cover = hit.reshape(height, s, width, s).mean((1, 3))
    rgb = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)

    kp = cam.project(kp3d)
    foot_to_head = cam.project(np.array([[centre[0], centre[1], lo[2]], [centre[0], centre[1], hi[2]]]))
    return Render(rgb, cover >= 0.5, kp.astype(np.float32), float(abs(foot_to_head[0, 1] - foot_to_head[1, 1])), cam)


def side_by_side(left: np.ndarray, right: np.ndarray, background: tuple[int, int, int] = (205, 212, 220),
                 gap: int = 0) -> tuple[np.ndarray, tuple[int, int]]:
    """Two images bottom-aligned on one canvas. Returns (canvas, x offset of each)."""
    h = max(left.shape[0], right.shape[0])
    w = left.shape[1] + gap + right.shape[1]
    canvas = np.empty((h, w, 3), np.uint8)
    canvas[:] = background
    canvas[h - left.shape[0]:, :left.shape[1]] = left
    canvas[h - right.shape[0]:, left.shape[1] + gap:] = right
    return canvas, (0, left.shape[1] + gap)


def astronaut() -> np.ndarray:
    """scikit-image's astronaut (Eileen Collins, NASA, public domain): a half-body photo."""
    from skimage import data

    return data.astronaut()


# -- files that are awkward on purpose -------------------------------------------------------

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_huge_blank_png(path: Path, width: int, height: int) -> None:
    """A valid 1-bit PNG of width x height, written row by row (kilobytes on disk, no big array)."""
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    comp = zlib.compressobj(9)
    parts = []
    for _ in range(height):
        parts.append(comp.compress(row))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"".join(parts)) \
        + _png_chunk(b"IEND", b"")
    Path(path).write_bytes(data)


# The standard luminance Huffman tables (ITU T.81, Annex K.3).
_DC_BITS = bytes([0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
_DC_VALS = bytes(range(12))
_AC_BITS = bytes([0, 2, 1, 3, 3, 2, 4, 3, 5, 5, 4, 4, 0, 0, 1, 0x7D])
_AC_VALS = bytes.fromhex(
    "01020300041105122131410613516107227114328191a1082342b1c11552d1f02433627282090a161718191a25262728292a"
    "3435363738393a434445464748494a535455565758595a636465666768696a737475767778797a838485868788898a929394"
    "95969798999aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4c5c6c7c8c9cad2d3d4d5d6d7d8d9dae1e2e3e4e5e6e7e8"
    "e9eaf1f2f3f4f5f6f7f8f9fa")


def write_huge_grey_jpeg(path: Path, width: int, height: int, level: int = 128) -> None:
    """A valid baseline greyscale JPEG of width x height, all one grey level, written directly.

    Every 8x8 block is 'DC difference 0, end of block' (6 bits), so even 20000 x 20000 is a few
    megabytes and takes no memory to make; the first block's DC sets the grey level.
    """
    dqt = b"\xff\xdb" + struct.pack(">H", 67) + b"\x00" + b"\x01" * 64
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    dht = b"\xff\xc4" + struct.pack(">H", 2 + 17 + len(_DC_VALS) + 17 + len(_AC_VALS)) \
        + b"\x00" + _DC_BITS + _DC_VALS + b"\x10" + _AC_BITS + _AC_VALS
    sos = b"\xff\xda" + struct.pack(">HB", 8, 1) + b"\x01\x00" + b"\x00\x3f\x00"
    n_blocks = ((width + 7) // 8) * ((height + 7) // 8)
    # First block: DC = (level - 128) * 8 with quantiser 1. Category 10 covers |dc| < 1024.
    dc = (level - 128) * 8
    bits = []
    if dc == 0:
        bits.append("00")
    else:
        cat = int(abs(dc)).bit_length()
        codes = {1: "010", 2: "011", 3: "100", 4: "101", 5: "110", 6: "1110", 7: "11110", 8: "111110",
                 9: "1111110", 10: "11111110"}
        val = dc if dc > 0 else dc + (1 << cat) - 1
        bits.append(codes[cat] + format(val, f"0{cat}b"))
    bits.append("1010")  # EOB
    head = "".join(bits)
    # The rest: "00" + "1010" per block; 4 blocks make 3 whole bytes after aligning.
    rest = n_blocks - 1
    stream = bytearray()
    acc = head
    while rest and len(acc) % 8:
        acc += "001010"
        rest -= 1
    # acc is byte aligned now (or rest is 0).
    stream += int(acc, 2).to_bytes(len(acc) // 8, "big") if len(acc) >= 8 and len(acc) % 8 == 0 else b""
    tail_bits = "" if len(acc) % 8 == 0 else acc
    stream += bytes.fromhex("28a28a") * (rest // 4)
    tail_bits += "001010" * (rest % 4)
    if tail_bits:
        tail_bits += "1" * (-len(tail_bits) % 8)
        stream += int(tail_bits, 2).to_bytes(len(tail_bits) // 8, "big")
    data = bytes(stream).replace(b"\xff", b"\xff\x00")
    Path(path).write_bytes(b"\xff\xd8" + dqt + sof + dht + sos + data + b"\xff\xd9")


def write_png16(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit greyscale (H,W) or RGB (H,W,3) PNG; Pillow cannot write 16-bit RGB itself."""
    h, w = pixels.shape[:2]
    colour_type = 2 if pixels.ndim == 3 else 0
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw))
                           + _png_chunk(b"IEND", b""))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))
