"""Colouring an avatar surface from the photo: seen, mirrored, carried through to the back."""

from __future__ import annotations

import numpy as np
import torch

from zeroavatar_blender.engine.cameras import Camera, intrinsics, look_at
from zeroavatar_blender.engine.surface_colour import (
    ColourPriors, build_colour_priors, colour_surface, through_colours, visible_in_photo,
)
from zeroavatar_blender.engine.texture import SMOOTHED, UVTexture


def flat_priors(photo: np.ndarray, camera: Camera) -> ColourPriors:
    """Priors with no body to speak of: a body texture that knows nothing (all smooth fill)."""
    s = 8
    tex = UVTexture(np.full((s, s, 3), 128, np.uint8), np.full((s, s), SMOOTHED, np.uint8), np.zeros((s, s), np.float32))
    v = np.array([[0.0, 5.0, 0.0], [0.01, 5.0, 0.0], [0.0, 5.0, 0.01]])
    return ColourPriors(photo.astype(np.float32), camera, np.ones(photo.shape[:2], bool), np.ones(photo.shape[:2], bool), tex, v,
                        np.array([[0, 1, 2]]), np.zeros((1, 3, 2), np.float32), np.zeros(3, np.int64), np.array([-1]))


def test_through_colours_take_the_same_part_at_the_same_place():
    H = W = 64
    photo = np.zeros((H, W, 3), np.float32)
    photo[:, :32] = [1.0, 0.0, 0.0]  # part 0 is red on the left
    photo[:, 32:] = [0.0, 0.0, 1.0]  # part 1 is blue on the right
    photo[::4, :32] = [0.6, 0.0, 0.0]  # with darker red stripes that the blur averages
    pixel_part = np.zeros((H, W), np.int64)
    pixel_part[:, 32:] = 1
    cam = Camera(intrinsics(W, H, 80.0), np.eye(4), W, H)
    priors = flat_priors(photo, cam)
    pix = np.array([[10.0, 20.0], [30.0, 20.0], [50.0, 20.0]])
    part = np.array([0, 0, 1])
    colours, found = through_colours(pix, part, pixel_part, priors, sigma_px=3.0)
    assert found.all()
    assert np.allclose(colours[0], [0.9, 0.0, 0.0], atol=0.03)  # the stripes' mean
    assert colours[1, 0] > 0.8 and colours[1, 2] < 0.05  # next to blue, still the red part's colour
    assert np.allclose(colours[2], [0.0, 0.0, 1.0], atol=1e-3)


def test_visibility_needs_a_point_in_front_facing_the_camera():
    H = W = 32
    cam = Camera(intrinsics(W, H, 40.0), look_at(np.array([0.0, -3.0, 0.0]), np.zeros(3)), W, H)
    priors = flat_priors(np.zeros((H, W, 3)), cam)
    depth = np.full((H, W), 3.0)  # a wall 3 m away fills the view
    points = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.5, 0.0]])
    normals = np.array([[0.0, -1.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]])
    visible, _ = visible_in_photo(points, normals, depth, priors)
    assert visible.tolist() == [True, False, False]  # facing away; hidden behind the wall


def test_a_crease_turned_from_the_camera_is_seen_inside_the_silhouette_not_at_its_edge():
    # a point in front at its pixel whose face is turned 107 degrees from the camera (a crease of
    # the field's union with the body): the photo shows it there, unless that pixel is near the
    # silhouette's edge, where a grazing surface would take the background's colour
    import dataclasses

    H = W = 32
    cam = Camera(intrinsics(W, H, 40.0), look_at(np.array([0.0, -3.0, 0.0]), np.zeros(3)), W, H)
    priors = flat_priors(np.zeros((H, W, 3)), cam)
    depth = np.full((H, W), 3.0)
    turned = np.array([[np.sin(np.radians(107)), np.cos(np.radians(107)) * -1.0, 0.0]])  # facing = cos(107) = -0.29
    point = np.zeros((1, 3))
    assert visible_in_photo(point, turned, depth, priors)[0].tolist() == [True]
    edge = dataclasses.replace(priors, person_core=np.zeros((H, W), bool))
    assert visible_in_photo(point, turned, depth, edge)[0].tolist() == [False]
    facing = np.array([[0.0, -1.0, 0.0]])
    assert visible_in_photo(point, facing, depth, edge)[0].tolist() == [True]  # facing the camera: seen anyway


def test_colour_surface_of_a_real_body_sees_the_front_and_carries_it_to_the_back(anny_body):
    """The fitted body itself as the avatar surface, photographed from the front."""
    from zeroavatar_blender.engine.render.raster import render_mesh

    with torch.no_grad():
        verts = anny_body.forward(anny_body.zero_params()).vertices[0].double()
    centre = verts.mean(0).numpy()
    W = H = 128
    cam = Camera(intrinsics(W, H, 160.0), look_at(centre + np.array([0.0, -3.5, 0.0]), centre), W, H)
    colours = np.where((verts[:, 2].numpy() > centre[2])[:, None], [0.9, 0.2, 0.1], [0.1, 0.3, 0.8])  # top red, bottom blue
    shot = render_mesh(verts, anny_body.faces, cam, vertex_colors=torch.as_tensor(colours))
    photo = (shot["rgb"].numpy() * 255).astype(np.uint8)
    priors = build_colour_priors(photo, cam, shot["mask"].numpy(), anny_body, verts, texture_size=256)
    v = verts.numpy()
    faces = np.asarray(anny_body.faces, np.int64)
    from zeroavatar_blender.engine.render.raster import vertex_normals

    n = vertex_normals(verts, torch.as_tensor(faces)).numpy()
    chest = np.argmin(np.linalg.norm(v - (centre + [0.0, -0.3, 0.3]), axis=1))  # front, upper body
    back = np.argmin(np.linalg.norm(v - (centre + [0.0, 0.3, 0.3]), axis=1))  # back, upper body
    calf = np.argmin(np.linalg.norm(v - (centre + [0.1, 0.3, -0.6]), axis=1))  # back of a leg
    out = colour_surface(v[[chest, back, calf]], n[[chest, back, calf]], v, faces, priors)
    assert out[0, 0] > 0.7 and out[0, 2] < 0.3  # the photo itself
    assert out[1, 0] > 0.6 and out[1, 2] < 0.4  # red like the front of the torso at that height
    assert out[2, 2] > 0.6 and out[2, 0] < 0.3  # blue like the front of that leg
