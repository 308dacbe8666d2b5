import numpy as np
import pytest
import torch

from zeroavatar_blender.engine.cameras import Camera, intrinsics, look_at
from zeroavatar_blender.engine.render.raster import render_mesh, vertex_normals
from zeroavatar_blender.engine.texture import (
    CROWN, EMPTY, MIRRORED, SEEN, SMOOTHED, bake_photo_texture, push_pull, texel_surface_map, uv_mirror_map,
)

SIZE = 256


def strip_mesh():
    """A flat strip mirror-symmetric about x = 0, triangulated symmetrically, UVs affine in x, y."""
    xs = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
    verts = np.array([[x, y, 0.0] for y in (0.0, 1.0) for x in xs])
    n = len(xs)
    faces = []
    for i in range(n - 1):
        a, b, c, d = i, i + 1, n + i + 1, n + i
        faces += [[a, b, c], [a, c, d]] if xs[i] < 0 else [[a, b, d], [b, c, d]]
    faces = np.array(faces)
    uv = np.stack([0.05 + 0.45 * (verts[:, 0] + 1), 0.05 + 0.9 * verts[:, 1]], 1)[faces].astype(np.float32)
    mirror = np.array([int(np.argmin(np.abs(verts[:, 0] + v[0]) + np.abs(verts[:, 1] - v[1]))) for v in verts])
    return verts, faces, uv, mirror


def texel_centres_uv(size):
    rows, cols = np.mgrid[0:size, 0:size]
    return np.stack([(cols + 0.5) / size, 1 - (rows + 0.5) / size], -1)


def test_texel_map_reproduces_texel_uvs():
    _, faces, uv, _ = strip_mesh()
    face_id, bary = texel_surface_map(faces, uv, 64)
    covered = face_id >= 0
    expected_fraction = 0.9 * 0.9
    assert abs(covered.mean() - expected_fraction) < 0.04
    recon = (bary[..., None] * uv[face_id.clip(0)]).sum(-2)
    np.testing.assert_allclose(recon[covered], texel_centres_uv(64)[covered], atol=1e-5)
    assert (bary[covered] >= -1e-6).all()


def test_a_tiny_chart_still_gets_texels_of_its_own():
    # a chart smaller than a texel covers no texel centre; with a margin the texels around it
    # take it (at its nearest point), not the nearest other chart
    corner_uv = np.array([[[0.101, 0.101], [0.1015, 0.101], [0.101, 0.1015]],  # a sliver
                          [[0.5, 0.5], [0.9, 0.5], [0.5, 0.9]]])
    faces = np.array([[0, 1, 2], [3, 4, 5]])
    fid, _ = texel_surface_map(faces, corner_uv, 64)
    assert not (fid == 0).any()
    fid, bary = texel_surface_map(faces, corner_uv, 64, margin=2.0)
    assert 0 < (fid == 0).sum() <= 16
    assert np.allclose(bary[fid == 0].sum(1), 1.0) and (bary[fid >= 0] >= -1e-6).all()
    big, _ = texel_surface_map(faces, corner_uv, 64)
    assert ((fid == 1) & (big == 1)).sum() == (big == 1).sum()  # covered texels keep their face
    assert (fid == 1).sum() > (big == 1).sum()  # and the big face's edge texels are added
    extra = (fid >= 0) & (big < 0)
    nearest = (bary[extra][:, :, None] * corner_uv[fid[extra]]).sum(1)  # the point each extra texel took
    distance = np.linalg.norm(nearest - texel_centres_uv(64)[extra], axis=1) * 64
    assert (distance <= 2.0 + 1e-6).all() and (distance > 0).all()


def test_uv_mirror_map_reflects_left_and_right():
    _, faces, uv, mirror = strip_mesh()
    m = uv_mirror_map(faces, uv, mirror, 64)
    face_id, _ = texel_surface_map(faces, uv, 64)
    covered = face_id >= 0
    assert np.isfinite(m[covered]).all() and np.isnan(m[~covered]).all()
    centres = texel_centres_uv(64)
    np.testing.assert_allclose(m[covered][:, 0], 1 - centres[covered][:, 0], atol=1e-5)
    np.testing.assert_allclose(m[covered][:, 1], centres[covered][:, 1], atol=1e-5)
    # A mirror map that pairs nothing leaves every texel undefined.
    broken = uv_mirror_map(faces, uv, np.roll(mirror, 3), 64)
    assert np.isnan(broken).mean() > 0.5


def test_push_pull_pads_from_neighbours():
    img = np.zeros((16, 16, 3), np.float32)
    w = np.zeros((16, 16), np.float32)
    img[3, 4] = [10, 20, 30]
    w[3, 4] = 1
    out = push_pull(img, w)
    np.testing.assert_allclose(out, np.broadcast_to([10, 20, 30], out.shape), atol=1e-3)
    img[12, 12], w[12, 12] = [200, 200, 200], 1
    out = push_pull(img, w)
    assert out[3, 4, 0] == 10 and out[12, 12, 0] == 200
    assert out[4, 5, 0] < out[11, 11, 0]  # each side takes after its nearest known texel


def symmetric_colour(points: np.ndarray) -> np.ndarray:
    """A smooth colour field that is the same at (x, y, z) and (-x, y, z)."""
    x, y, z = np.abs(points[:, 0]), points[:, 1], points[:, 2]
    return np.stack([128 + 90 * np.sin(12 * x + 3 * z), 128 + 90 * np.sin(9 * y + 5 * z),
                     128 + 90 * np.cos(7 * x - 6 * z + 2 * y)], 1)


@pytest.fixture(scope="module")
def scene(anny_body):
    body = anny_body
    with torch.no_grad():
        out = body.forward(body.zero_params())
    rest = out.rest_vertices[0].double().numpy()
    posed = out.vertices[0].double()
    face_id, bary = texel_surface_map(body.faces, body.corner_uv, SIZE)
    covered = face_id >= 0
    points = (bary[..., None] * rest[body.faces[face_id.clip(0)]]).sum(-2)
    gt = np.zeros((SIZE, SIZE, 3), np.float32)
    gt[covered] = symmetric_colour(points[covered])
    gt = np.clip(np.rint(push_pull(gt, covered.astype(np.float32))), 0, 255).astype(np.uint8)
    posed_points = (bary[..., None] * posed.numpy()[body.faces[face_id.clip(0)]]).sum(-2)
    vn = vertex_normals(posed, torch.from_numpy(body.faces)).numpy()
    normals = (bary[..., None] * vn[body.faces[face_id.clip(0)]]).sum(-2)
    centre = ((posed.max(0).values + posed.min(0).values) / 2).numpy()
    return dict(body=body, posed=posed, gt=gt, covered=covered, rest_points=points, posed_points=posed_points,
                normals=normals, centre=centre)


def photo_of(scene, direction, W=192, H=256):
    eye = scene["centre"] + 3.2 * np.asarray(direction, dtype=np.float64)
    cam = Camera(intrinsics(W, H), look_at(eye, scene["centre"]), W, H)
    out = render_mesh(scene["posed"], scene["body"].faces, cam, corner_uv=scene["body"].corner_uv,
                      texture=scene["gt"])
    photo = np.clip(np.rint(out["rgb"].numpy() * 255), 0, 255).astype(np.uint8)
    return photo, cam, out["mask"].numpy()


def colour_error(tex, scene, where):
    return np.abs(tex.image.astype(np.float64) - scene["gt"])[where].mean()


def test_front_photo_seen_texels_match_and_back_is_not_mirrored(scene):
    photo, cam, mask = photo_of(scene, [0.0, -1.0, 0.0])
    tex = bake_photo_texture(photo, cam, scene["posed"], scene["body"], mask=mask, size=SIZE)
    assert tex.image.shape == (SIZE, SIZE, 3) and tex.image.dtype == np.uint8
    assert tex.source.dtype == np.uint8 and tex.confidence.dtype == np.float32
    covered, src = scene["covered"], tex.source
    assert ((src == EMPTY) == ~covered).all()
    seen = src == SEEN
    assert seen.mean() > 0.1
    err = colour_error(tex, scene, seen)
    shuffled = np.abs(tex.image.astype(np.float64)[seen] - np.roll(scene["gt"][seen], 5000, 0)).mean()
    assert err < 6.0 and shuffled > 6 * err
    # Confidence: the facing cosine of seen texels, zero elsewhere.
    assert (tex.confidence[seen] > 0.2).all() and (tex.confidence[seen] <= 1).all()
    assert (tex.confidence[~seen] == 0).all()
    # The back (normals pointing away from the camera, +Y) is never the photo nor its mirror; on
    # the back of the head it is the crown's colour, elsewhere the smooth fill.
    back = covered & (scene["normals"][..., 1] > 0.3)
    assert back.sum() > 1000 and np.isin(src[back], (SMOOTHED, CROWN)).all()
    crown = src == CROWN
    assert crown[back].mean() < 0.4  # few or none: this small photo shows little of the crown
    z = scene["rest_points"][..., 2]
    assert (z[crown] > z[covered].max() - 0.25).all()  # all on the head
    # No black anywhere: the padding and the smooth fill take colours from the body.
    assert tex.image.min() > 25


def test_side_photo_mirrors_the_hidden_side_and_respects_occlusion(scene):
    photo, cam, mask = photo_of(scene, [1.0, 0.0, 0.0])  # from the subject's left (+X)
    tex = bake_photo_texture(photo, cam, scene["posed"], scene["body"], mask=mask, size=SIZE)
    src = tex.source
    x_rest = scene["rest_points"][..., 0]
    mirrored = src == MIRRORED
    assert mirrored.sum() > 500
    assert (x_rest[mirrored] < 0.02).mean() > 0.85  # mostly the right side, borrowing from the left
    assert colour_error(tex, scene, mirrored) < 10.0  # the colour field is symmetric
    assert (x_rest[src == SEEN] > -0.05).mean() > 0.95
    # Texels facing the camera but 5 cm or more behind the visible surface (the right arm and
    # flank behind the torso) are occluded: never seen.
    to_cam = cam.center - scene["posed_points"]
    facing = (scene["normals"] * to_cam).sum(-1) / np.linalg.norm(to_cam, axis=-1)
    depth = render_mesh(scene["posed"], scene["body"].faces, cam)["depth"].numpy()
    pts = scene["posed_points"].reshape(-1, 3)
    pix = np.rint(cam.project(pts)).astype(int).clip(0, [cam.width - 1, cam.height - 1])
    behind = (cam.to_cam(pts)[:, 2] - depth[pix[:, 1], pix[:, 0]]).reshape(facing.shape) > 0.05
    hidden = scene["covered"] & (facing > 0.5) & behind
    assert hidden.sum() > 200 and not (src[hidden] == SEEN).any()


def test_person_mask_limits_what_is_seen(scene):
    photo, cam, mask = photo_of(scene, [0.0, -1.0, 0.0])
    half = mask.copy()
    half[:, cam.width // 2:] = False
    tex = bake_photo_texture(photo, cam, scene["posed"], scene["body"], mask=half, size=SIZE, mask_erode_px=3)
    full = bake_photo_texture(photo, cam, scene["posed"], scene["body"], mask=mask, size=SIZE, mask_erode_px=3)
    seen = tex.source == SEEN
    assert 0.3 < seen.sum() / (full.source == SEEN).sum() < 0.7
    pix = cam.project(scene["posed_points"][seen])
    assert pix[:, 0].max() < cam.width // 2 - 3 + 0.5
    nobody = bake_photo_texture(photo, cam, scene["posed"], scene["body"], mask=np.zeros_like(mask), size=SIZE)
    assert not (nobody.source == SEEN).any() and (nobody.source[scene["covered"]] == SMOOTHED).all()


def test_camera_must_match_the_photo(scene):
    photo, cam, _ = photo_of(scene, [0.0, -1.0, 0.0])
    with pytest.raises(ValueError, match="camera.scaled"):
        bake_photo_texture(photo[::2, ::2], cam, scene["posed"], scene["body"], size=64)
    with pytest.raises(ValueError, match="mask"):
        bake_photo_texture(photo, cam, scene["posed"], scene["body"], mask=np.ones((3, 3), bool), size=64)
