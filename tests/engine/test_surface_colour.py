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
    colours, strength = through_colours(pix, part, pixel_part, priors, sigma_px=3.0)
    assert (strength == 1).all()
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


def test_a_photo_cut_at_the_waist_leaves_no_seam_on_the_back(anny_body):
    """A photo that shows the upper body only, red in front and blue at the sides: the back of the
    chest is half the red carried through, half the blue filled in from the sides; the unseen
    hips are the fill alone. Down the back the colour ramps between the two where the photo
    ends, instead of stepping from one to the other between points 1 cm apart."""
    from zeroavatar_blender.engine.render.raster import render_mesh, vertex_normals

    with torch.no_grad():
        out = anny_body.forward(anny_body.zero_params())
    verts, kp = out.vertices[0].double(), out.keypoints[0].double().numpy()
    v = verts.numpy()
    faces = np.asarray(anny_body.faces, np.int64)
    n = vertex_normals(verts, torch.as_tensor(faces)).numpy()
    hip_z = kp[11:13, 2].mean()
    centre = v.mean(0)
    W, H = 128, 256
    cam = Camera(intrinsics(W, H, 250.0), look_at(centre + np.array([0.0, -3.5, 0.0]), centre), W, H)
    red_front = np.where((n[:, 1] < -0.85)[:, None], [0.9, 0.2, 0.1], [0.1, 0.3, 0.8])  # the sides blue
    shot = render_mesh(verts, anny_body.faces, cam, vertex_colors=torch.as_tensor(red_front))
    photo = (shot["rgb"].numpy() * 255).astype(np.uint8)
    mask = shot["mask"].numpy().copy()
    rows = np.nonzero(mask.any(1))[0]
    mask[int(rows.min() + 0.36 * (rows.max() - rows.min())):] = False  # the photo ends at the waist
    priors = build_colour_priors(photo, cam, mask, anny_body, verts, texture_size=256)
    # body points down the middle of the back, a centimetre apart from the chest to the hips
    back = (n[:, 1] > 0.7) & (np.abs(v[:, 0] - 0.05) < 0.02)
    zs = np.arange(hip_z - 0.1, hip_z + 0.45, 0.01)
    idx = np.array([np.flatnonzero(back)[np.argmin(np.abs(v[back, 2] - z))] for z in zs])
    idx = idx[np.r_[True, np.diff(idx) != 0]]
    c = colour_surface(v[idx], n[idx], v, faces, priors)[:, 0]  # red
    low = int(np.argmin(c))
    top = low + int(np.argmax(c[low:]))
    rise = c[top] - c[low]
    assert rise > 0.05  # redder up the back, where the photo shows the torso
    # a ramp: no 1 cm step holds half the rise (before: one step of 0.142 of a rise of 0.144)
    assert np.abs(np.diff(c[low: top + 1])).max() < 0.5 * rise


def test_parts_blend_where_they_meet(anny_body):
    """Each body vertex's part shares: one part inside a part, two near where they meet."""
    from zeroavatar_blender.engine.body.base import dominant_chains
    from zeroavatar_blender.engine.surface_colour import blended_parts

    faces = np.asarray(anny_body.faces, np.int64)
    part = dominant_chains(anny_body.skin_indices.numpy(), anny_body.skin_weights.numpy(), anny_body.bone_parents)
    ids, shares = blended_parts(part, faces)
    assert np.allclose(shares.sum(1), 1) and (shares >= 0).all()
    own = shares[np.arange(len(part)), np.searchsorted(ids, part)]
    assert (own > 0.5).mean() > 0.95  # each vertex mostly its own part ...
    edge = np.zeros(len(part), bool)  # ... less so next to another part
    for a, b in ((0, 1), (1, 2), (2, 0)):
        edge[faces[part[faces[:, a]] != part[faces[:, b]]][:, [a, b]].reshape(-1)] = True
    assert own[edge].mean() < 0.8 and own[~edge].mean() > 0.9
