"""Pinhole cameras in the OpenCV convention (x right, y down, z forward), world = Blender frame.

Pure functions on tensors plus one small dataclass that is saved in fit.json. The reference
camera comes from the fit; novel views orbit the subject (see ``orbit_camera``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .transfer import to_device

# World (Z up, subject faces -Y) -> camera looking along +Y at the subject's front.
FRONT_VIEW_R = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])


def scaled_intrinsics(K, factor: float):
    """Intrinsics (numpy or torch 3x3) for an image resized by ``factor``, pixel centres kept."""
    K = K.copy() if isinstance(K, np.ndarray) else K.clone()
    K[:2, :2] *= factor
    K[:2, 2] = (K[:2, 2] + 0.5) * factor - 0.5
    return K


@dataclass
class Camera:
    K: np.ndarray  # (3,3) intrinsics in pixels of an image of (width, height)
    world_to_cam: np.ndarray  # (4,4) OpenCV extrinsics
    width: int
    height: int

    @property
    def R(self) -> np.ndarray:
        return self.world_to_cam[:3, :3]

    @property
    def t(self) -> np.ndarray:
        return self.world_to_cam[:3, 3]

    @property
    def center(self) -> np.ndarray:
        return -self.R.T @ self.t

    def scaled(self, factor: float) -> "Camera":
        """The same camera for an image resized by ``factor`` (pixel centres kept)."""
        return Camera(scaled_intrinsics(self.K, factor), self.world_to_cam.copy(), max(1, round(self.width * factor)), max(1, round(self.height * factor)))

    def project(self, points: np.ndarray) -> np.ndarray:
        """(N,3) world -> (N,2) pixels."""
        cam = points @ self.R.T + self.t
        uv = cam @ self.K.T
        return uv[:, :2] / uv[:, 2:3]

    def to_cam(self, points: np.ndarray) -> np.ndarray:
        return points @ self.R.T + self.t

    def to_json(self) -> dict:
        return {"K": self.K.tolist(), "world_to_cam": self.world_to_cam.tolist(),
                "width": int(self.width), "height": int(self.height), "convention": "opencv"}

    @staticmethod
    def from_json(d: dict) -> "Camera":
        return Camera(np.asarray(d["K"], dtype=np.float64), np.asarray(d["world_to_cam"], dtype=np.float64),
                      int(d["width"]), int(d["height"]))

    def torch(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(K, world_to_cam) as tensors (uploaded without a host wait: transfer.py)."""
        return (to_device(torch.as_tensor(self.K, dtype=dtype), device),
                to_device(torch.as_tensor(self.world_to_cam, dtype=dtype), device))


def intrinsics(width: int, height: int, focal_px: float | None = None) -> np.ndarray:
    """A centred pinhole. Without EXIF focal length assume a 50 mm-equivalent lens (about 40
    degrees across the long side), typical for full-body photos."""
    if focal_px is None:
        focal_px = 50.0 / 36.0 * max(width, height)
    return np.array([[focal_px, 0, (width - 1) / 2], [0, focal_px, (height - 1) / 2], [0, 0, 1]], dtype=np.float64)


def look_at(eye: np.ndarray, target: np.ndarray, up: np.ndarray = np.array([0.0, 0.0, 1.0])) -> np.ndarray:
    """OpenCV world_to_cam (4,4) for a camera at ``eye`` looking at ``target``."""
    z = target - eye
    z = z / np.linalg.norm(z)
    x = np.cross(z, up)
    if np.linalg.norm(x) < 1e-8:  # looking straight up/down
        x = np.cross(z, np.array([0.0, 1.0, 0.0]))
    x = x / np.linalg.norm(x)
    y = np.cross(z, x)
    R = np.stack([x, y, z])
    M = np.eye(4)
    M[:3, :3] = R
    M[:3, 3] = -R @ eye
    return M


def orbit_camera(target: np.ndarray, radius: float, azimuth_deg: float, elevation_deg: float,
                 K: np.ndarray, width: int, height: int) -> Camera:
    """A camera on a sphere around ``target``. Azimuth 0 is the front (camera at -Y), 90 the
    subject's left side (+X), 180 the back; elevation is above the horizon."""
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    offset = np.array([math.sin(az) * math.cos(el), -math.cos(az) * math.cos(el), math.sin(el)])
    return Camera(K.copy(), look_at(target + radius * offset, target), width, height)


def project_torch(points: torch.Tensor, K: torch.Tensor, world_to_cam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(...,N,3) world -> ((...,N,2) pixels, (...,N) depth). Differentiable."""
    cam = points @ world_to_cam[..., :3, :3].transpose(-1, -2) + world_to_cam[..., None, :3, 3]
    z = cam[..., 2]
    uv = cam @ K.transpose(-1, -2)
    return uv[..., :2] / z[..., None].clamp_min(1e-6), z


def camera_rays(K: torch.Tensor, world_to_cam: torch.Tensor, width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ray origins and unit directions through pixel centres: ((H,W,3), (H,W,3)) in world."""
    dtype, device = K.dtype, K.device
    ys, xs = torch.meshgrid(torch.arange(height, dtype=dtype, device=device),
                            torch.arange(width, dtype=dtype, device=device), indexing="ij")
    d_cam = torch.stack([(xs - K[0, 2]) / K[0, 0], (ys - K[1, 2]) / K[1, 1], torch.ones_like(xs)], -1)
    R = world_to_cam[:3, :3]
    d_world = d_cam @ R  # R^T d
    d_world = d_world / d_world.norm(dim=-1, keepdim=True)
    origin = -(R.T @ world_to_cam[:3, 3])
    return origin.expand_as(d_world), d_world
