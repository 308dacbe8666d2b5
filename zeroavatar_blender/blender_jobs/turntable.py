"""Render an avatar turning around, headless: N views and a contact sheet.

    python -m zeroavatar_blender.blender_jobs.turntable (--bundle DIR | --glb FILE) --out DIR \\
        [--views 8] [--size 512] [--engine cycles|workbench] [--samples 64] [--no-denoise]
        [--elevation 10] [--rest]

Cycles on the CPU is the default (true materials and lighting). Workbench (flat studio light,
the texture shown unlit) also renders headless and is several times faster for quick checks;
EEVEE needs a GPU context and takes minutes per frame on a software one, so it is not offered.
The camera orbits the avatar: azimuth 0 is the front (camera on -Y), 90 the subject's left.
View transform "Standard" (AgX washes the texture's colours out). Prints JSON lines:
one ``render`` per view, then ``turntable`` with the contact sheet and seconds per view.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ENGINES = {"cycles": "CYCLES", "workbench": "BLENDER_WORKBENCH"}

_json_out = sys.stdout


def emit(kind: str, **fields: Any) -> None:
    print(json.dumps({"type": kind, **fields}, allow_nan=False), file=_json_out, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m zeroavatar_blender.blender_jobs.turntable",
                                     description=__doc__.split("\n\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", type=Path, help="avatar bundle folder (result/) or job folder")
    src.add_argument("--glb", type=Path, help="a .glb/.gltf file (e.g. an export) instead of a bundle")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--size", type=int, default=512, help="square image size in pixels")
    parser.add_argument("--engine", choices=sorted(ENGINES), default="cycles")
    parser.add_argument("--samples", type=int, default=64, help="Cycles samples per pixel")
    parser.add_argument("--no-denoise", dest="denoise", action="store_false")
    parser.add_argument("--elevation", type=float, default=10.0, help="camera elevation in degrees")
    parser.add_argument("--rest", action="store_true", help="render the rest pose instead of the photo's pose")
    parser.add_argument("--columns", type=int, default=0, help="contact sheet columns (default: about square)")
    args = parser.parse_args(argv)
    if not 1 <= args.views <= 360 or not 16 <= args.size <= 4096 or args.samples < 1:
        parser.error("--views must be 1..360, --size 16..4096, --samples at least 1")
    return args


def load_avatar(args: argparse.Namespace) -> list:
    """Objects to frame: the built bundle avatar's mesh, or every mesh of an imported glTF."""
    import bpy

    from ..addon import scene

    if args.bundle is not None:
        armature, mesh = scene.build_avatar(args.bundle, apply_pose=not args.rest)
        if args.rest:
            armature.data.pose_position = "REST"
        return [mesh]
    if not args.glb.is_file():
        raise FileNotFoundError(f"no glTF file at {args.glb}")
    result = bpy.ops.import_scene.gltf(filepath=str(args.glb.resolve()))
    if "FINISHED" not in result:
        raise RuntimeError(f"Blender could not import {args.glb}")
    meshes = [o for o in bpy.context.scene.objects if o.type == "MESH"]
    # Frame the skinned avatar, not helpers the importer adds (e.g. its bone-shape icosphere).
    skinned = [o for o in meshes if any(m.type == "ARMATURE" for m in o.modifiers) or o.vertex_groups]
    meshes = skinned or meshes
    for o in bpy.context.scene.objects:
        if o.type == "MESH" and o not in meshes:
            o.hide_render = True
    if not meshes:
        raise RuntimeError(f"{args.glb} holds no mesh")
    if args.rest:
        for o in bpy.context.scene.objects:
            if o.type == "ARMATURE":
                o.data.pose_position = "REST"
    return meshes


def bounds(objects: list) -> tuple[np.ndarray, np.ndarray]:
    """World-space (min, max) of the evaluated (deformed) meshes."""
    from ..addon.scene import evaluated_vertices

    pts = np.concatenate([evaluated_vertices(o) for o in objects])
    return pts.min(0), pts.max(0)


def setup_render(scene: Any, engine: str, size: int, samples: int, denoise: bool) -> None:
    import bpy

    r = scene.render
    r.engine = ENGINES[engine]
    r.resolution_x = r.resolution_y = size
    r.resolution_percentage = 100
    r.image_settings.file_format = "PNG"
    r.image_settings.color_mode = "RGB"
    r.film_transparent = False
    scene.view_settings.view_transform = "Standard"
    scene.view_settings.look = "None"
    world = scene.world or bpy.data.worlds.new("ZeroAvatar Turntable")
    scene.world = world
    if world.node_tree is None:  # Blender < 5 made node trees on request only
        world.use_nodes = True
    world.color = (0.32, 0.32, 0.34)  # what Workbench shows
    bg = next(n for n in world.node_tree.nodes if n.type == "BACKGROUND")
    bg.inputs["Color"].default_value = (0.32, 0.32, 0.34, 1.0)  # what Cycles sees and is lit by
    bg.inputs["Strength"].default_value = 1.0
    if engine == "cycles":
        scene.cycles.device = "CPU"
        scene.cycles.samples = samples
        scene.cycles.use_adaptive_sampling = True
        scene.cycles.use_denoising = denoise
        scene.cycles.max_bounces = 4
        scene.cycles.diffuse_bounces = 2
        scene.cycles.glossy_bounces = 1
        scene.cycles.transmission_bounces = 1
        r.use_persistent_data = True  # keep the BVH between views
    else:
        shading = scene.display.shading
        shading.light = "STUDIO"
        shading.color_type = "TEXTURE"
        shading.background_type = "WORLD"
        scene.display.render_aa = "8"


def add_key_light(scene: Any, center: np.ndarray, height: float) -> None:
    """A sun from the front left above, so the turning body shows its shape."""
    import bpy

    light = bpy.data.lights.new("ZeroAvatar Key", "SUN")
    light.energy = 3.0
    light.angle = math.radians(10)
    obj = bpy.data.objects.new("ZeroAvatar Key", light)
    obj.rotation_euler = (math.radians(50), 0.0, math.radians(-30))
    scene.collection.objects.link(obj)


def orbit_camera(scene: Any, lens: float = 50.0) -> Any:
    import bpy

    data = bpy.data.cameras.new("ZeroAvatar Turntable")
    data.lens = lens
    data.sensor_fit = "HORIZONTAL"
    data.sensor_width = 36.0
    cam = bpy.data.objects.new("ZeroAvatar Turntable", data)
    scene.collection.objects.link(cam)
    scene.camera = cam
    return cam


def camera_distance(lo: np.ndarray, hi: np.ndarray, lens: float, sensor: float = 36.0, margin: float = 1.1) -> float:
    """Distance at which the body fits the square frame from every azimuth."""
    half_fov = math.atan(sensor / 2 / lens)
    radius_xy = 0.5 * float(np.linalg.norm((hi - lo)[:2]))
    half_h = 0.5 * float(hi[2] - lo[2])
    return max(half_h, radius_xy) * margin / math.tan(half_fov) + radius_xy


def place_camera(cam: Any, center: np.ndarray, distance: float, azimuth_deg: float, elevation_deg: float) -> None:
    from mathutils import Vector

    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    offset = np.array([math.sin(az) * math.cos(el), -math.cos(az) * math.cos(el), math.sin(el)])
    eye = Vector((center + distance * offset).tolist())
    cam.location = eye
    cam.rotation_euler = (Vector(center.tolist()) - eye).to_track_quat("-Z", "Y").to_euler()


def contact_sheet(paths: list[Path], out_path: Path, columns: int = 0) -> Path:
    """Tile the views (same size) into one PNG, left to right, top to bottom."""
    import bpy

    images = [bpy.data.images.load(str(p), check_existing=False) for p in paths]
    w, h = images[0].size
    cols = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    sheet = np.ones((rows * h, cols * w, 4), dtype=np.float32)
    sheet[..., :3] = 0.2
    for i, img in enumerate(images):
        px = np.empty(w * h * 4, dtype=np.float32)
        img.pixels.foreach_get(px)
        r, c = divmod(i, cols)
        y0 = (rows - 1 - r) * h  # Blender's pixel rows run bottom to top
        sheet[y0:y0 + h, c * w:(c + 1) * w] = px.reshape(h, w, 4)
        bpy.data.images.remove(img)
    out = bpy.data.images.new("ZeroAvatar Contact Sheet", cols * w, rows * h, alpha=False)
    out.pixels.foreach_set(sheet.ravel())
    out.filepath_raw = str(out_path)
    out.file_format = "PNG"
    out.save()
    bpy.data.images.remove(out)
    return out_path


def render_turntable(args: argparse.Namespace) -> dict[str, Any]:
    import bpy

    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    objects = load_avatar(args)
    lo, hi = bounds(objects)
    center = 0.5 * (lo + hi)
    setup_render(scene, args.engine, args.size, args.samples, args.denoise)
    add_key_light(scene, center, float(hi[2] - lo[2]))
    cam = orbit_camera(scene)
    distance = camera_distance(lo, hi, cam.data.lens)
    args.out.mkdir(parents=True, exist_ok=True)
    paths, times = [], []
    for i in range(args.views):
        azimuth = 360.0 * i / args.views
        place_camera(cam, center, distance, azimuth, args.elevation)
        path = (args.out / f"view_{i:03d}.png").resolve()
        scene.render.filepath = str(path)
        t0 = time.perf_counter()
        bpy.ops.render.render(write_still=True)
        times.append(time.perf_counter() - t0)
        if not path.is_file():
            raise RuntimeError(f"Blender rendered no image to {path}")
        paths.append(path)
        emit("render", view=i, azimuth=azimuth, path=str(path), seconds=round(times[-1], 3))
    sheet = contact_sheet(paths, (args.out / "contact_sheet.png").resolve(), args.columns)
    summary = {"contact_sheet": str(sheet), "views": len(paths), "engine": args.engine, "size": args.size,
               "samples": args.samples if args.engine == "cycles" else None,
               "seconds_per_view": round(float(np.mean(times)), 3),
               "first_view_seconds": round(times[0], 3)}
    emit("turntable", **summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    global _json_out
    args = parse_args(argv)
    sys.stdout.flush()
    _json_out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # Blender's render progress goes to stderr; stdout is JSON lines only
    from .. import protocol
    from ..addon.bundle_io import BundleError

    try:
        render_turntable(args)
    except (BundleError, FileNotFoundError) as exc:
        emit("error", code=protocol.EXIT_BAD_INPUT, message=str(exc))
        return protocol.EXIT_BAD_INPUT
    except OSError as exc:
        emit("error", code=protocol.EXIT_IO, message=f"cannot write to {args.out}: {exc}")
        return protocol.EXIT_IO
    except RuntimeError as exc:
        emit("error", code=protocol.EXIT_FAILED, message=str(exc))
        return protocol.EXIT_FAILED
    emit("done", status="ok", code=protocol.EXIT_OK)
    return protocol.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
