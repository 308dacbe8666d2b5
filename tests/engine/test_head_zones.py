"""The back of the head takes the crown's colour: hair seen on top continues round the back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zeroavatar_blender.engine.cameras import Camera, intrinsics, look_at
from zeroavatar_blender.engine.head_zones import (
    FALL_END, SHOULDER_LEVEL, crown_colour, fall_zones_from_keypoints, hair_fall_zones, hair_reach, head_zones,
    long_hair_shown, zones_from_keypoints,
)
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


def photo(subject, direction, W=256, H=512, long_hair=False):
    """The subject photographed from ``direction``; with ``long_hair``, two locks of the hair's
    colour hang beside the neck from the ears to the shoulders."""
    centre = subject["verts"].mean(0).numpy()
    eye = centre + 3.0 * np.asarray(direction, np.float64)
    cam = Camera(intrinsics(W, H, 500.0), look_at(eye, centre), W, H)
    verts, faces, colours = subject["verts"].numpy(), np.asarray(subject["body"].faces), subject["colours"]
    if long_hair:
        import trimesh

        kp = subject["kp"]
        for side in (3, 4):  # COCO ears
            top, bottom = kp[side, 2] - 0.02, kp[5:7, 2].mean() - 0.01
            lock = trimesh.creation.box(extents=[0.035, 0.03, top - bottom])
            x = kp[side, 0] + np.sign(kp[side, 0] - subject["ears"][0]) * 0.02
            lock.apply_translation([x, subject["ears"][1] + 0.02, 0.5 * (top + bottom)])
            faces = np.concatenate([faces, lock.faces + len(verts)])
            verts = np.concatenate([verts, lock.vertices])
            colours = np.concatenate([colours, np.tile(HAIR, (len(lock.vertices), 1))])
    shot = render_mesh(torch.as_tensor(verts), faces, cam, vertex_colors=torch.as_tensor(colours))
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
    neck, fall, _ = hair_fall_zones(body)
    assert neck.any() and (fall == 1).any()  # a toy body of 696 vertices: 42 % and 0.7 % of it on SMPL's layout
    assert (v[neck, 2] < ears[2]).all()
    assert (v[fall == 1, 2] < ears[2]).all() and (v[fall == 1, 1] > kp[5:7, 1].mean()).all()  # below the head, behind the shoulders


def test_fall_zone_lies_on_the_upper_back_between_the_shoulder_blades(anny_body, subject):
    neck, fall, height = hair_fall_zones(anny_body)
    assert hair_fall_zones(anny_body)[1] is fall  # cached with the head's zones
    v, kp, ears = subject["verts"].numpy(), subject["kp"], subject["ears"]
    scale = np.linalg.norm(kp[3] - kp[4])
    assert np.corrcoef(height, v[:, 2])[0, 1] > 0.99  # Anny stands upright
    full = fall == 1
    assert full.sum() > 100 and (v[full, 1] > kp[5:7, 1].mean()).all()  # behind the shoulders (-Y is forward)
    assert (np.abs(v[fall > 0, 0]) < 0.9 * scale + 0.05).all()  # not out on the arms
    assert (height[fall > 0] < -0.3 + 1e-9).all() and (height[fall > 0] > FALL_END - 0.5 - 1e-9).all()
    assert (v[neck, 2] < ears[2]).all() and (v[neck, 2] > kp[5:7, 2].mean() - 0.1).all()
    assert not (neck & subject["head"] & (height > -0.5)).any()
    nothing = fall_zones_from_keypoints(v, np.zeros_like(kp))
    assert not nothing[0].any() and not nothing[1].any()


def test_hair_reaches_the_lowest_shell_behind_the_back_or_the_shoulders():
    height = np.linspace(0.0, -4.0, 81)
    fall = np.ones_like(height)
    bare = hair_reach(fall, height, np.zeros(81, bool))  # nothing stands off: the shoulders' level
    assert bare[height >= SHOULDER_LEVEL].min() == 1 and bare[height < SHOULDER_LEVEL - 0.5].max() == 0
    shell = (height < -1.0) & (height > -2.2)  # a shell standing off the back down to -2.2
    reach = hair_reach(fall, height, shell)
    assert reach[height >= -2.1].min() == 1 and reach[height < -2.7].max() == 0  # the lowest 2 % of the shell may be strays
    deep = hair_reach(fall, height, height < -1.0)  # a shell down to the hips: no further than FALL_END
    assert deep[height < FALL_END - 0.5].max() == 0
    assert hair_reach(0.5 * fall, height, shell).max() == 0.5  # the zone's own weight


def test_long_hair_shown_needs_the_crowns_colour_off_the_body_beside_the_neck():
    H = W = 64
    photo = np.zeros((H, W, 3))
    body = np.zeros((H, W), bool)
    body[10:64, 24:40] = True  # a body: its neck band's vertices project to rows 20-30
    ys, xs = np.mgrid[10:64:2, 24:40:2]
    pixels = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float64)
    neck = (pixels[:, 1] >= 20) & (pixels[:, 1] <= 30)
    hair = np.array([0.3, 0.2, 0.1])
    person = body.copy()
    person[20:31, 18:24] = True  # locks beside the neck, 6 x 11 px, off the body
    photo[20:31, 18:24] = hair
    assert long_hair_shown(photo, person, body, pixels, neck, hair, ear_px=20.0)  # 66 px >= 0.04 * 400
    assert not long_hair_shown(photo, person, body, pixels, neck, np.array([0.9, 0.9, 0.9]), ear_px=20.0)  # another colour
    assert not long_hair_shown(photo, person, body, pixels, neck, hair, ear_px=50.0)  # too little for a bigger head
    low = np.zeros_like(neck)
    low[pixels[:, 1] > 50] = True  # the same locks beside the hips' band: not falling past the neck
    assert not long_hair_shown(photo, person, body, pixels, low, hair, ear_px=20.0)
    beard = np.zeros((H, W, 3))
    beard[20:31, 26:32] = hair  # the colour on the body itself (a beard, a brown shirt): no evidence
    assert not long_hair_shown(beard, body, body, pixels, neck, hair, ear_px=20.0)


def test_long_hair_in_the_photo_colours_the_upper_back_and_its_shell(subject):
    """Locks of hair falling past the neck in a front photo: a shell 5 cm behind the upper back
    and the back itself down to that shell take the hair's colour; the same photo without the
    locks leaves them the shirt carried through (as `test_colour_surface_gives_long_hair_...`)."""
    from zeroavatar_blender.engine.surface_colour import build_colour_priors, colour_surface

    body = subject["body"]
    v = subject["verts"].numpy()
    faces = np.asarray(body.faces, np.int64)
    n = vertex_normals(subject["verts"], torch.as_tensor(faces)).numpy()
    kp = subject["kp"]
    shoulders = kp[5:7, 2].mean()
    spine = np.argmin(np.linalg.norm(v - [0.0, v[:, 1].max(), shoulders - 0.12], axis=1))  # between the shoulder blades
    assert n[spine, 1] > 0.7
    low_back = np.argmin(np.linalg.norm(v - [0.0, v[:, 1].max(), kp[11:13, 2].mean() + 0.1], axis=1))
    points = np.stack([v[spine] + 0.05 * n[spine], v[spine], v[low_back]])
    normals = n[[spine, spine, low_back]]
    for long_hair, expect in ((True, [HAIR, HAIR, SHIRT]), (False, [SHIRT, SHIRT, SHIRT])):
        shot, cam, mask = photo(subject, [0.0, -1.0, 0.0], long_hair=long_hair)
        priors = build_colour_priors(shot, cam, mask, body, subject["verts"], texture_size=256)
        assert (priors.hair is not None) == long_hair
        # the avatar: the body and a shell standing off its upper back (so the hair reaches it)
        shell = (v[:, 1] > 0.02) & (np.abs(v[:, 2] - (shoulders - 0.12)) < 0.03) & (np.abs(v[:, 0]) < 0.06)
        mesh_v = np.where(shell[:, None], v + 0.05 * n, v)
        out = colour_surface(np.concatenate([points, mesh_v[shell]]), np.concatenate([normals, n[shell]]), mesh_v, faces, priors)
        err = np.abs(out[:3] - np.array(expect)).mean(1)
        assert err.max() < 0.12, (long_hair, out[:3])


def test_front_photo_with_long_hair_gives_the_bare_upper_back_the_hair(subject):
    """The fast path's body (no shell): locks beside the neck put the hair on the upper back down
    to the shoulders' level; the back below and a photo without the locks keep the fill."""
    body = subject["body"]
    size = 256
    fid, bary = texel_surface_map(body.faces, body.corner_uv, size)
    covered = fid >= 0
    points = (bary[..., None] * subject["verts"].numpy()[body.faces[fid.clip(0)]]).sum(-2)
    d = points - subject["ears"]
    kp = subject["kp"]
    behind = covered & (d[..., 1] > 0.05) & (np.abs(d[..., 0]) < 0.05)  # the middle of the back
    upper = behind & (points[..., 2] < subject["ears"][2] - 0.08) & (points[..., 2] > kp[5:7, 2].mean() - 0.01)
    lower = behind & (points[..., 2] < kp[5:7, 2].mean() - 0.2)
    assert upper.sum() > 30 and lower.sum() > 100
    for long_hair in (True, False):
        shot, cam, mask = photo(subject, [0.0, -1.0, 0.0], long_hair=long_hair)
        tex = bake_photo_texture(shot, cam, subject["verts"], body, mask=mask, size=size)
        assert tex.long_hair == long_hair
        hair_err = np.abs(tex.image[upper].astype(np.float64) / 255 - HAIR).mean(-1)
        if long_hair:
            assert np.median(hair_err) < 0.08 and (tex.source[upper] == CROWN).mean() > 0.8
        else:
            assert hair_err.min() > 0.15
        assert np.abs(tex.image[lower].astype(np.float64) / 255 - HAIR).mean(-1).min() > 0.15
    # without a person mask the same locks are no evidence (a background of that colour would pass)
    shot, cam, _ = photo(subject, [0.0, -1.0, 0.0], long_hair=True)
    assert not bake_photo_texture(shot, cam, subject["verts"], body, mask=None, size=64).long_hair
