"""The face, close up, against the photo: `python -m tests.benchmarks.face_crop PHOTO JOB [JOB ...] --out PNG`.

Renders each finished job's posed avatar (``exports/avatar_posed.ply``, textured, unlit) from its
fit's photo camera at twice the photo's resolution, averages it down, and compares a box around
the detected face (centred on the nose, 3.2 eye distances wide) with the photo: PSNR over the
avatar's pixels there. The synthetic benchmark's 512-px full-body photos leave a face a few
dozen pixels, too few to show the texture's face detail; a portrait (scikit-image's astronaut)
shows it. Writes the photo's crop and each job's side by side to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def face_box(job: Path) -> tuple[slice, slice]:
    from zeroavatar_blender.engine.perception import Perception

    kp = np.asarray(Perception.load(job / "perception.npz").keypoints, np.float64).reshape(-1, 2)[:17]
    half = max(1.6 * float(np.linalg.norm(kp[1] - kp[2])), 20.0)
    x, y = kp[0]
    return slice(int(y - half), int(y + half)), slice(int(x - half), int(x + half))


def render_at_photo(job: Path, height: int, width: int, up: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The posed avatar from the photo camera: (rgb (H,W,3) float, mask (H,W) bool, all of the
    pixel covered)."""
    from zeroavatar_blender.engine.avatar import AvatarBundle
    from zeroavatar_blender.engine.cameras import Camera
    from zeroavatar_blender.evaluation.benchmark import _load_ply, render_bundle

    cam = Camera.from_json(json.loads((job / "fit.json").read_text())["camera"])
    cam = Camera(cam.K * np.array([[up], [up], [1.0]]), np.eye(4), cam.width * up, cam.height * up)  # the ply is in camera axes
    rgb, mask = render_bundle(_load_ply(job / "exports" / "avatar_posed.ply"), AvatarBundle.load(job / "result"), cam)
    return (rgb.reshape(height, up, width, up, 3).mean((1, 3)),
            mask.reshape(height, up, width, up).all((1, 3)))


def main(argv: list[str] | None = None) -> int:
    from PIL import Image

    from zeroavatar_blender.evaluation.metrics import psnr

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("photo", type=Path)
    ap.add_argument("jobs", type=Path, nargs="+", help="finished job folders of that photo (with exports)")
    ap.add_argument("--out", type=Path, default=None, help="write the crops side by side here")
    args = ap.parse_args(argv)
    photo = np.asarray(Image.open(args.photo).convert("RGB"), np.float64) / 255
    box = face_box(args.jobs[0])
    crops = [photo[box]]
    for job in args.jobs:
        rgb, mask = render_at_photo(job, *photo.shape[:2])
        m = mask[box]
        print(f"{job}: face PSNR {psnr(rgb[box], photo[box], m):.2f} dB over {m.mean():.0%} of the box")
        crops.append(np.clip(rgb[box], 0, 1) * m[..., None])
    if args.out is not None:
        strip = np.concatenate(crops, 1)
        Image.fromarray((strip * 255 + 0.5).astype(np.uint8)).resize((strip.shape[1] * 2, strip.shape[0] * 2),
                                                                      Image.LANCZOS).save(args.out, optimize=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
