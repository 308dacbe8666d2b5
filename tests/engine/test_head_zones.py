"""The back of the head takes the crown's colour: hair seen on top continues round the back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zeroavatar_blender.engine.cameras import Camera, intrinsics, look_at
from zeroavatar_blender.engine.head_zones import crown_colour, head_zones, zones_from_keypoints
from zeroavatar_blender.engine.render.raster import render_mesh, vertex_normals
from zeroavatar_blender.engine.texture import CROWN, SEEN, bake_photo_texture, texel_surface_map

HAIR, SKIN, SHIRT = np.array([0.25, 0.15, 0.08]), np.array([0.85, 0.65, 0.55]), np.array([0.1, 0.3, 0.8])


@pytest.fixture(scope="module")
def subject(anny_body):
    """Anny in its zero pose with short hair: a cap over the top and back of the head down to
    3 cm under the ears, the face and the neck bare, a blue shirt below."""
    with torch.no_grad():
        out = anny_body.forward(anny_body.zero_params())
    v = out.vertices[0].double()
    kp = out.keypoints[0].double().numpy()
    ears = 0.5 * (kp[3] + kp[4])
    d = v.numpy() - ears
    head = v.numpy()[:, 2] > kp[5:7, 2].mean() + 0.12
    hair = head & (d[:, 2] > -0.03) & (d[:, 1] > -0.04)  # -Y is forward: behind the face's front
    hair |= head & (d[:, 2] > 0.075)  # the top: a hairline 4.5 cm above the eyes
    colours = np.where(hair[:, None], HAIR, np.where(head[:, None], SKIN, SHIRT))
    return dict(body=anny_body, verts=v, kp=kp, ears=ears, colours=colours, hair=hair, head=head)


def photo(subject, direction, W=256, H=512):
    centre = subject["verts"].mean(0).numpy()
    eye = centre + 3.0 * np.asarray(direction, np.float64)
    cam = Camera(intrinsics(W, H, 500.0), look_at(eye, centre), W, H)
    shot = render_mesh(subject["verts"], subject["body"].faces, cam, vertex_colors=torch.as_tensor(subject["colours"]))
    return (shot["rgb"].numpy() * 255).astype(np.uint8), cam, shot["mask"].numpy()


def test_zones_sit_behind_the_ears_and_on_top_of_the_head(anny_body, subject):
    weight, crown = head_zones(anny_body)
    assert head_zones(anny_body)[0] is weight  # cached per body
    assert weight.min() == 0 and weight.max() == 1 and ((weight > 0) & (weight < 1)).sum() > 100  # soft edges
    back = weight > 0
    d = subject["verts"].numpy() - subject["ears"]
    scale = np.linalg.norm(subject["kp"][3] - subject["kp"][4])
    assert back.sum() > 200 and crown.sum() > 50
    assert (d[back, 1] > -0.15 * scale).all()  # behind the ears (-Y is forward) ...
    assert np.median(d[weight == 1, 1]) > 0.2 * scale  # ... fully well behind them
    assert (d[back, 2] > -0.3 * scale - 0.01).all()  # not down the neck
    assert (d[crown, 2] > 0.3 * scale).all() and (d[crown, 1] > -0.5 * scale).all()  # behind the forehead
    assert subject["head"][back].all() and subject["head"][crown].all()


def test_zones_of_a_body_turned_and_shifted_are_the_same_vertices(subject):
    v, kp = subject["verts"].numpy(), subject["kp"]
    a = np.deg2rad(70)
    R = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ \
        np.array([[1, 0, 0], [0, np.cos(0.4), -np.sin(0.4)], [0, np.sin(0.4), np.cos(0.4)]])
    t = np.array([1.0, -2.0, 0.5])
    b0, c0 = zones_from_keypoints(v, kp)
    b1, c1 = zones_from_keypoints(v @ R.T + t, kp @ R.T + t)
    assert np.allclose(b0, b1) and (c0 == c1).all()
    nothing = zones_from_keypoints(v, np.zeros_like(kp))  # keypoints all in one place
    assert not nothing[0].any() and not nothing[1].any()


def test_crown_colour_is_robust_and_needs_enough_texels():
    colours = np.tile([60.0, 40.0, 20.0], (100, 1))
    colours[:10] = [250.0, 250.0, 250.0]  # a highlight and background at the edge
    everywhere = np.ones(100, bool)
    assert np.allclose(crown_colour(colours, everywhere, everywhere), [60, 40, 20])
    assert crown_colour(colours, np.arange(100) < 9, everywhere) is None  # too few texels
    big = np.ones(10000, bool)
    assert crown_colour(np.tile(colours, (100, 1)), np.arange(10000) < 15, big) is None  # too small a share
    assert crown_colour(np.tile(colours, (100, 1)), np.arange(10000) < 25, big) is not None


def test_front_photo_gives_the_back_of_the_head_the_hair_not_the_skin(subject):
    body = subject["body"]
    shot, cam, mask = photo(subject, [0.0, -1.0, 0.0])
    size = 256
    tex = bake_photo_texture(shot, cam, subject["verts"], body, mask=mask, size=size)
    fid, bary = texel_surface_map(body.faces, body.corner_uv, size)
    covered = fid >= 0
    truth_hair = (bary * subject["hair"][body.faces[fid.clip(0)]]).sum(-1) > 0.99
    back_v, _ = head_zones(body)
    back = covered & truth_hair & ((bary * back_v[body.faces[fid.clip(0)]]).sum(-1) > 0.99)
    assert back.sum() > 500 and (tex.source[back] == CROWN).mean() > 0.9
    rgb = tex.image[back].astype(np.float64) / 255
    assert np.abs(rgb - HAIR).mean() < 0.1  # the hair's colour; skin is 0.5 away
    # the back of the neck under the hair keeps the fill: no hair colour run down it
    points = (bary[..., None] * subject["verts"].numpy()[body.faces[fid.clip(0)]]).sum(-2)
    d = points - subject["ears"]
    neck = covered & (d[..., 1] > 0.02) & (d[..., 2] < -0.07) & (d[..., 2] > -0.1) & (np.abs(d[..., 0]) < 0.04)
    assert neck.sum() > 50
    assert np.abs(tex.image[neck].astype(np.float64) / 255 - HAIR).mean(-1).min() > 0.15
    # the face keeps the photo
    face = covered & (np.linalg.norm(points - subject["kp"][0], axis=-1) < 0.03)
    assert face.sum() > 50 and (tex.source[face] == SEEN).mean() > 0.5
    assert np.abs(tex.image[face].astype(np.float64) / 255 - SKIN).mean() < 0.08


def test_a_photo_without_the_crown_leaves_the_back_of_the_head_to_the_fill(subject):
    shot, cam, mask = photo(subject, [0.0, -1.0, 0.0])
    mask = mask.copy()
    rows = np.nonzero(mask.any(1))[0]
    mask[: rows.min() + int(0.06 * (rows.max() - rows.min()))] = False  # the top of the head cut off
    tex = bake_photo_texture(shot, cam, subject["verts"], subject["body"], mask=mask, size=128)
    assert not (tex.source == CROWN).any()


def test_colour_surface_gives_long_hair_behind_the_head_the_crown(subject):
    """A point 6 cm behind the head (long hair of an optimised shell) is the crown's colour, not
    the face's colour carried through the head."""
    from zeroavatar_blender.engine.surface_colour import build_colour_priors, colour_surface

    body = subject["body"]
    shot, cam, mask = photo(subject, [0.0, -1.0, 0.0])
    priors = build_colour_priors(shot, cam, mask, body, subject["verts"], texture_size=256)
    v = subject["verts"].numpy()
    faces = np.asarray(body.faces, np.int64)
    n = vertex_normals(subject["verts"], torch.as_tensor(faces)).numpy()
    back_v, _ = head_zones(body)
    i = np.argmax(np.where(back_v == 1, v[:, 1], -np.inf))  # the back-most point of the head
    points = np.stack([v[i], v[i] + 0.06 * n[i]])
    out = colour_surface(points, n[[i, i]], v, faces, priors)
    assert np.abs(out - HAIR).mean(1).max() < 0.1
    # a shell point behind the upper back still takes the shirt carried through
    j = np.argmin(np.linalg.norm(v - (v.mean(0) + [0.0, 0.3, 0.25]), axis=1))
    shirt = colour_surface((v[j] + 0.05 * n[j])[None], n[j][None], v, faces, priors)
    assert np.abs(shirt[0] - SHIRT).mean() < 0.1


@pytest.mark.parametrize("kind", ["smpl", "smplx"])
def test_zones_on_other_body_models(tmp_path, kind):
    """The zones come from any body's own face keypoints: the synthetic SMPL-layout models too."""
    from zeroavatar_blender.engine.body import load_body

    from .body.synthetic_smpl import write_model_folder

    body = load_body(kind, write_model_folder(tmp_path / kind, kind).parent)
    back, crown = head_zones(body)
    with torch.no_grad():
        out = body.forward(body.zero_params())
    v, kp = out.vertices[0].double().numpy(), out.keypoints[0].double().numpy()
    ears = 0.5 * (kp[3] + kp[4])
    assert (back > 0.5).mean() > 0.01 and crown.mean() > 0.01  # 2.9 % and 2.4 % here; 2.6 % and 1.0 % on Anny
    to_nose = (kp[0] - ears) / np.linalg.norm(kp[0] - ears)
    ahead = (v - ears) @ to_nose
    assert (ahead[back > 0.5] < 0.02).all() and np.median(ahead[back > 0.5]) < -0.02  # behind the ears
    assert (v[crown, 2] > ears[2]).all() and (v[back > 0, 2] > kp[5:7, 2].mean()).all()  # above the shoulders
