"""Untextured, shaded views of finished jobs' meshes side by side, for judging geometry by eye:
`python -m tests.benchmarks.shaded_views --out figure.png LABEL=JOB [LABEL=JOB ...]`.

Textured renders hide a surface's pits and folds behind the photo's colours; a grey Lambert
render of the face normals shows them. One row per job (front and side view of the posed mesh
in the photo camera's frame, the same framing for every row), its label written on it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch


def load_posed(job: Path) -> tuple[np.ndarray, np.ndarray]:
    """The posed avatar of a finished job: (V,3) in the photo camera's frame, (F,3)."""
    import trimesh

    from zeroavatar_blender.engine.avatar import AvatarBundle

    vertices = np.asarray(trimesh.load(job / "exports" / "avatar_posed.ply", process=False).vertices, np.float64)
    faces = np.asarray(AvatarBundle.load(job / "result").faces, np.int64)
    if len(vertices) == 0 or len(faces) == 0:
        raise SystemExit(f"{job}: no finished avatar (exports/avatar_posed.ply, result/)")
    return vertices, faces


def shade(vertices: np.ndarray, faces: np.ndarray, centre: np.ndarray, azimuth_deg: float, size: int = 384,
          distance: float = 3.2) -> np.ndarray:
    """Grey Lambert image of the face normals from a camera orbiting ``centre`` about the photo
    camera's vertical (y down) axis. -> (size, size) float in [0, 1]."""
    from zeroavatar_blender.engine.cameras import look_at
    from zeroavatar_blender.engine.render.raster import rasterize

    a = np.radians(azimuth_deg)
    eye = centre + distance * np.array([np.sin(a), 0.0, -np.cos(a)])
    w2c = look_at(eye, centre, up=np.array([0.0, -1.0, 0.0]))  # the photo camera's frame has y down
    v = vertices @ w2c[:3, :3].T + w2c[:3, 3]
    f = 1.9 * size
    K = torch.tensor([[f, 0, (size - 1) / 2], [0, f, (size - 1) / 2], [0, 0, 1]], dtype=torch.float64)
    raster = rasterize(torch.as_tensor(v), torch.as_tensor(faces), K, size, size)
    face_id = raster.face_id.numpy()
    n = np.cross(v[faces[:, 1]] - v[faces[:, 0]], v[faces[:, 2]] - v[faces[:, 0]])
    n /= np.linalg.norm(n, axis=1, keepdims=True).clip(1e-12)
    light = np.array([0.35, -0.45, -0.82])
    light /= np.linalg.norm(light)
    img = np.zeros((size, size))
    hit = face_id >= 0
    img[hit] = 0.15 + 0.85 * np.abs(n[face_id[hit]] @ light)
    return img


def figure(rows: list[tuple[str, Path]], size: int = 384) -> np.ndarray:
    from PIL import Image, ImageDraw

    meshes = [load_posed(job) for _, job in rows]
    centre = meshes[0][0].mean(0)  # one framing for all rows: they are the same photo's avatars
    tiles = []
    for (label, _), (v, f) in zip(rows, meshes):
        row = np.concatenate([shade(v, f, centre, az, size) for az in (0.0, 90.0)], 1)
        im = Image.fromarray((row * 255).astype(np.uint8)).convert("RGB")
        ImageDraw.Draw(im).text((8, 8), label, fill=(255, 220, 120))
        tiles.append(np.asarray(im))
    return np.concatenate(tiles, 0)


def main(argv: list[str] | None = None) -> int:
    from PIL import Image

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--size", type=int, default=384)
    p.add_argument("jobs", nargs="+", metavar="LABEL=JOB")
    args = p.parse_args(argv)
    rows = []
    for item in args.jobs:
        label, sep, path = item.partition("=")
        if not sep:
            p.error(f"{item!r}: expected LABEL=JOB")
        rows.append((label, Path(path)))
    Image.fromarray(figure(rows, args.size)).save(args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
