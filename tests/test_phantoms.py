"""Tests for tomoml_nb.phantoms: the synthetic ground truth of every method."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage as ndi

from tomoml_nb import phantoms as P


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def bone():
    return P.bone_implant((40, 56, 56), seed=3, degradation=0.6)


@pytest.fixture(scope="module")
def fib():
    return P.fibres((40, 56, 56), n_fibres=30, seed=2)


def _texture(shape, sigma=2.0, seed=0):
    rng = np.random.default_rng(seed)
    t = ndi.gaussian_filter(rng.standard_normal(shape), sigma)
    return ((t - t.min()) / np.ptp(t)).astype(np.float32)


def _face_contacts(labels):
    """Number of face-adjacent voxel pairs that carry two different non-zero labels."""
    n = 0
    for ax in range(labels.ndim):
        a = np.moveaxis(labels, ax, 0)
        lo, hi = a[:-1], a[1:]
        n += int(np.count_nonzero((lo > 0) & (hi > 0) & (lo != hi)))
    return n


# ----------------------------------------------------------------------------- Phantom
def test_phantom_unpacks_and_is_frozen(bone):
    image, labels = bone
    assert image is bone.image and labels is bone.labels
    with pytest.raises(dataclasses.FrozenInstanceError):
        bone.image = None
    assert "Phantom(" in repr(bone)


# ----------------------------------------------------------------------------- bone
def test_bone_dtypes_ranges_and_classes(bone):
    image, labels = bone
    assert image.dtype == np.float32 and labels.dtype == np.uint8
    assert image.shape == labels.shape == (40, 56, 56)
    assert np.isfinite(image).all()
    assert -0.3 < image.min() and image.max() < 1.3
    assert set(np.unique(labels)) == {0, 1, 2, 3, 4}
    assert bone.info["classes"] == ["background", "soft tissue", "bone", "implant", "degradation"]
    assert bone.info["clean"].shape == image.shape


def test_bone_no_degradation_class_at_zero():
    _, labels = P.bone_implant((32, 48, 48), seed=3, degradation=0.0)
    assert 4 not in np.unique(labels)
    assert {0, 1, 2, 3} <= set(np.unique(labels))


def test_bone_deterministic():
    a = P.bone_implant((24, 32, 32), seed=5)
    b = P.bone_implant((24, 32, 32), seed=5)
    c = P.bone_implant((24, 32, 32), seed=6)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.labels, c.labels)


def test_bone_grey_values_realistic(bone):
    image, labels = bone
    clean = bone.info["clean"]
    means = [float(clean[labels == k].mean()) for k in range(5)]
    bg, soft, bn, metal, deg = means
    assert bg < soft < deg < bn < metal
    # degradation layer vs bone: the hard pair, overlapping after blur and noise
    a, b = image[labels == 4], image[labels == 2]
    thresholds = np.linspace(a.min(), b.max(), 200)
    best = max(max((np.sum(a < t) + np.sum(b >= t)) / (a.size + b.size) for t in thresholds), 0)
    assert 0.6 < best < 0.97
    # a polymer screw is darker than bone
    poly = P.bone_implant((32, 48, 48), seed=3, screw="polymer")
    assert poly.info["clean"][poly.labels == 3].mean() < poly.info["clean"][poly.labels == 2].mean()


def test_bone_degradation_seed_changes_only_the_layer():
    a = P.bone_implant((24, 64, 64), seed=1, degradation=0.5, degradation_seed=10)
    b = P.bone_implant((24, 64, 64), seed=1, degradation=0.5, degradation_seed=11)
    assert not np.array_equal(a.labels == 4, b.labels == 4)
    ay, ax = a.info["screw_axis"]
    yy, xx = np.mgrid[0:64, 0:64]
    r = np.hypot(yy - ay, xx - ax)
    # the corrosion zone reaches at most ~0.35 * degradation * size beyond the thread
    far = np.broadcast_to(r > a.info["screw_radius"][1] + 0.35 * 0.5 * 64 + 5, a.labels.shape)
    assert (a.labels[far] > 0).sum() > 1000
    np.testing.assert_array_equal(a.labels[far], b.labels[far])


def test_bone_noise_seed_gives_independent_noise_same_truth():
    a = P.bone_implant((24, 32, 32), seed=1, noise_seed=1)
    b = P.bone_implant((24, 32, 32), seed=1, noise_seed=2)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.info["clean"], b.info["clean"])
    assert not np.array_equal(a.image, b.image)


@pytest.mark.parametrize("kwargs, name", [
    (dict(shape=(10, 10)), "shape"),
    (dict(shape=(32, 32, 8)), "shape"),
    (dict(degradation=1.5), "degradation"),
    (dict(degradation=-0.1), "degradation"),
    (dict(noise=-1.0), "noise"),
    (dict(screw="wood"), "screw"),
])
def test_bone_bad_inputs(kwargs, name):
    with pytest.raises((ValueError, TypeError)) as err:
        P.bone_implant(**{"shape": (24, 24, 24), **kwargs})
    assert str(err.value).startswith(name)


# ----------------------------------------------------------------------------- fibres
def test_fibres_labels_are_a_partition_of_connected_instances(fib):
    image, labels = fib
    assert image.dtype == np.float32 and labels.dtype == np.int32
    assert np.isfinite(image).all()
    n = fib.info["n_fibres"]
    assert n >= 10
    np.testing.assert_array_equal(np.unique(labels), np.arange(n + 1))
    assert len(fib.info["centrelines"]) == n == len(fib.info["radii"])
    for c in fib.info["centrelines"]:
        assert c.ndim == 2 and c.shape[1] == 3 and len(c) >= 2
    for sl, lab in zip(ndi.find_objects(labels), range(1, n + 1)):
        _, ncomp = ndi.label(labels[sl] == lab)
        assert ncomp == 1, f"label {lab} has {ncomp} pieces"


def test_fibres_touch_and_fibres_brighter_than_air(fib):
    image, labels = fib
    assert _face_contacts(labels) > 50
    pairs = set()
    for ax in range(3):
        a = np.moveaxis(labels, ax, 0)
        m = (a[:-1] > 0) & (a[1:] > 0) & (a[:-1] != a[1:])
        pairs |= set(zip(a[:-1][m].tolist(), a[1:][m].tolist()))
    assert len({tuple(sorted(p)) for p in pairs}) >= 5
    clean = fib.info["clean"]
    assert clean[labels > 0].mean() > clean[labels == 0].mean() + 0.2
    # long fibres lying in the sheet plane: extent in x-y much larger than in z
    ext = [np.ptp(c, axis=0) for c in fib.info["centrelines"]]
    assert np.median([max(e[1], e[2]) / (e[0] + 1) for e in ext]) > 3


def test_fibres_not_touching_option():
    a = P.fibres((40, 56, 56), n_fibres=30, seed=2, touching=False)
    b = P.fibres((40, 56, 56), n_fibres=30, seed=2, touching=True)
    assert _face_contacts(a.labels) < 0.2 * _face_contacts(b.labels)


def test_fibres_deterministic():
    a = P.fibres((24, 40, 40), n_fibres=10, seed=4)
    b = P.fibres((24, 40, 40), n_fibres=10, seed=4)
    c = P.fibres((24, 40, 40), n_fibres=10, seed=5)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.labels, c.labels)


@pytest.mark.parametrize("kwargs, name", [
    (dict(radius=(3.0, 2.0)), "radius"),
    (dict(radius=3.0), "radius"),
    (dict(n_fibres=0), "n_fibres"),
    (dict(n_fibres=2.5), "n_fibres"),
    (dict(shape=(32, 32)), "shape"),
    (dict(noise=float("nan")), "noise"),
])
def test_fibres_bad_inputs(kwargs, name):
    with pytest.raises((ValueError, TypeError)) as err:
        P.fibres(**{"shape": (16, 24, 24), **kwargs})
    assert str(err.value).startswith(name)


# ----------------------------------------------------------------------------- fields
@pytest.mark.parametrize("kind", P.FIELD_KINDS)
def test_displacement_field_kinds(kind):
    u = P.displacement_field((12, 20, 24), kind, max_amplitude=2.5, seed=1)
    assert u.shape == (3, 12, 20, 24) and u.dtype == np.float32
    assert np.isfinite(u).all()
    assert np.sqrt((u.astype(np.float64) ** 2).sum(0)).max() == pytest.approx(2.5, rel=1e-5)
    np.testing.assert_array_equal(u, P.displacement_field((12, 20, 24), kind, max_amplitude=2.5, seed=1))
    if kind != "power":  # power has no random part
        assert not np.array_equal(u, P.displacement_field((12, 20, 24), kind, max_amplitude=2.5, seed=2))
    u2 = P.displacement_field((20, 24), kind, max_amplitude=1.0, seed=1)
    assert u2.shape == (2, 20, 24)
    assert np.sqrt((u2.astype(np.float64) ** 2).sum(0)).max() == pytest.approx(1.0, rel=1e-5)


def test_displacement_field_shapes_of_kinds():
    star = P.displacement_field((8, 64, 64), "star", 1.0, seed=0)
    assert np.abs(star[0]).max() == 0 and np.abs(star[2]).max() == 0      # only the y component
    # period grows along x: more sign changes along y at small x than at large x
    col = lambda x: int(np.sum(np.diff(np.sign(star[1, 4, :, x])) != 0))  # noqa: E731
    assert col(2) > col(60)
    sph = P.displacement_field((32, 32, 32), "spherical", 1.0, seed=0, centre=(16, 16, 16))
    assert sph[2, 16, 16, 24] > 0 and sph[2, 16, 16, 8] < 0                # expansion
    assert P.displacement_field((8, 8, 8), "uniform", 0.0).max() == 0


@pytest.mark.parametrize("call, name, exc", [
    (lambda: P.displacement_field((8, 8, 8), "twist"), "kind", ValueError),
    (lambda: P.displacement_field((8, 8, 8), "star", -1.0), "max_amplitude", ValueError),
    (lambda: P.displacement_field((8, 8, 8), "star", float("nan")), "max_amplitude", ValueError),
    (lambda: P.displacement_field((8, 8, 8), "star", 1.0, sigma=3), "sigma", TypeError),
    (lambda: P.displacement_field((8, 8), "power", 1.0, axis=5), "axis", ValueError),
    (lambda: P.displacement_field((8,), "uniform"), "shape", ValueError),
])
def test_displacement_field_bad_inputs(call, name, exc):
    with pytest.raises(exc) as err:
        call()
    assert str(err.value).startswith(name)
    if name == "kind":
        for k in P.FIELD_KINDS:
            assert k in str(err.value)


# ----------------------------------------------------------------------------- deform / warp
def test_deform_uniform_shift_convention():
    fixed = _texture((12, 24, 40))
    u = np.zeros((3,) + fixed.shape, np.float32)
    u[2] = 2.0                                           # +2 voxels along x
    moving = P.deform(fixed, u)
    # material at x moves to x + 2: moving(x + 2) == fixed(x)
    np.testing.assert_allclose(moving[..., 4:-4], np.roll(fixed, 2, axis=-1)[..., 4:-4], atol=1e-6)
    np.testing.assert_allclose(moving[..., 7], fixed[..., 5], atol=1e-6)
    # and the backward warp undoes it
    np.testing.assert_allclose(P.warp(moving, u)[..., 4:-4], fixed[..., 4:-4], atol=1e-6)


def test_deform_nonuniform_inverts_warp():
    fixed = _texture((24, 40, 40), sigma=2.5)
    u = P.displacement_field(fixed.shape, "spherical", 4.0, seed=0, centre=(12, 20, 20), sigma=8)
    moving = P.deform(fixed, u, order=3)
    back = P.warp(moving, u, order=3)
    inner = (slice(5, -5),) * 3
    err = np.abs(back - fixed)[inner].mean()
    assert err < 0.01 * np.ptp(fixed)
    # the naive (uninverted) pull-back is clearly worse: the inversion matters
    naive = P.warp(fixed, -u, order=3)
    assert np.abs(P.warp(naive, u, order=3) - fixed)[inner].mean() > 3 * err


def test_deform_matches_skimage_optical_flow_convention():
    from skimage.registration import optical_flow_tvl1
    fixed = _texture((96, 96), sigma=2.0, seed=3)
    u = P.displacement_field(fixed.shape, "spherical", 2.0, seed=0, centre=(48, 48), sigma=18)
    moving = P.deform(fixed, u, order=3)
    flow = optical_flow_tvl1(fixed, moving)
    inner = (slice(None),) + (slice(12, -12),) * 2
    strong = np.sqrt((u ** 2).sum(0))[inner[1:]] > 0.8
    for c in range(2):
        corr = np.corrcoef(flow[c][inner[1:]][strong], u[c][inner[1:]][strong])[0, 1]
        assert corr > 0.8
    # the sign: same direction as u, not the opposite
    assert np.sum(flow[inner] * u[inner]) > 0.5 * np.sum(u[inner] ** 2)


def test_deform_warns_on_folding_field():
    x = np.arange(64, dtype=np.float32)
    u = np.zeros((2, 16, 64), np.float32)
    u[1] = 6 * np.sin(2 * np.pi * x / 8)                  # |du/dx| ~ 4.7: the map folds
    with pytest.warns(RuntimeWarning, match="^u: "):
        P.deform(_texture((16, 64)), u)


def test_deform_labels_and_2d():
    lab = (np.arange(20 * 30).reshape(20, 30) % 7).astype(np.uint8)
    u = np.zeros((2, 20, 30))
    u[0] = 1.0
    out = P.deform(lab, u, order=0)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[2:-2], np.roll(lab, 1, axis=0)[2:-2])


@pytest.mark.parametrize("volume, u, kwargs, name", [
    (np.zeros((8, 8, 8)), np.zeros((2, 8, 8, 8)), {}, "u"),
    (np.zeros((8, 8, 8)), np.zeros((3, 8, 8, 9)), {}, "u"),
    (np.zeros((8, 8, 8)), np.full((3, 8, 8, 8), np.nan), {}, "u"),
    (np.full((8, 8, 8), np.nan), np.zeros((3, 8, 8, 8)), {}, "volume"),
    (np.zeros(8), np.zeros((1, 8)), {}, "volume"),
    (np.zeros((8, 8)), np.zeros((2, 8, 8)), {"order": 7}, "order"),
    (np.zeros((8, 8)), np.zeros((2, 8, 8)), {"mode": "bounce"}, "mode"),
])
def test_deform_warp_bad_inputs(volume, u, kwargs, name):
    for fn in (P.deform, P.warp):
        with pytest.raises((ValueError, TypeError)) as err:
            fn(volume, u, **kwargs)
        assert str(err.value).startswith(name)


# ----------------------------------------------------------------------------- planes
def test_oblique_slice_identity_is_plain_slice():
    vol = _texture((10, 12, 14))
    np.testing.assert_allclose(P.oblique_slice(vol, (4, 5.5, 6.5), np.eye(3)), vol[4], atol=1e-6)
    np.testing.assert_allclose(P.oblique_slice(vol, (7, 5.5, 6.5), (1.0, 0, 0)), vol[7], atol=1e-6)
    s, coords = P.oblique_slice(vol, (4, 5.5, 6.5), np.eye(3), shape=(4, 6), return_coords=True)
    assert s.shape == (4, 6) and coords.shape == (3, 4, 6)


def test_oblique_slice_rows_convention_and_random_plane():
    zz = np.broadcast_to(np.arange(40, dtype=np.float32)[:, None, None], (40, 40, 40)).copy()
    origin, R = P.random_plane(zz.shape, max_tilt_deg=12, seed=3)
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-10)
    assert np.linalg.det(R) == pytest.approx(1.0)
    assert np.degrees(np.arccos(abs(R[0, 0]))) <= 12 + 1e-9
    assert np.all(origin > 0) and np.all(origin < 39)
    s = P.oblique_slice(zz, origin, R, shape=(9, 11), order=1)
    i = np.arange(9)[:, None] - 4
    j = np.arange(11)[None, :] - 5
    np.testing.assert_allclose(s, origin[0] + i * R[1, 0] + j * R[2, 0], atol=1e-4)
    o2, R2 = P.random_plane(zz.shape, max_tilt_deg=12, seed=3)
    np.testing.assert_array_equal(R, R2)
    np.testing.assert_array_equal(origin, o2)
    _, R3 = P.random_plane(zz.shape, max_tilt_deg=12, seed=4)
    assert not np.array_equal(R, R3)


def test_oblique_slice_bad_inputs():
    vol = np.zeros((8, 8, 8), np.float32)
    with pytest.raises(ValueError, match="^normal_or_rotation"):
        P.oblique_slice(vol, (4, 4, 4), 2 * np.eye(3))
    with pytest.raises(ValueError, match="^normal_or_rotation"):
        P.oblique_slice(vol, (4, 4, 4), (0, 0, 0))
    with pytest.raises(ValueError, match="^origin"):
        P.oblique_slice(vol, (4, 4), np.eye(3))
    with pytest.raises(ValueError, match="^volume"):
        P.oblique_slice(vol[0], (4, 4, 4), np.eye(3))
    with pytest.raises(ValueError, match="^max_tilt_deg"):
        P.random_plane((8, 8, 8), max_tilt_deg=-1)


# ----------------------------------------------------------------------------- histology
def test_histology_output_and_nonlinear_colours(bone):
    image, labels = bone
    z = 20
    rgb, info = P.histology(image[z], labels[z], seed=0, deformation=2.0)
    assert rgb.shape == image[z].shape + (3,) and rgb.dtype == np.float32
    assert rgb.min() >= 0 and rgb.max() <= 1
    u = info["displacement"]
    assert u.shape == (2,) + image[z].shape and u.dtype == np.float32
    assert np.sqrt((info["elastic"].astype(np.float64) ** 2).sum(0)).max() == pytest.approx(2.0, rel=1e-5)
    # colour is not a linear function of CT: poor linear fit on the undeformed image
    ct = image[z].ravel()
    for c in range(3):
        col = info["undeformed"][..., c].ravel()
        assert abs(np.corrcoef(ct, col)[0, 1]) < 0.95
    # classes have their stain: bone is pink (red > green), background near white
    und, lab = info["undeformed"], labels[z]
    assert und[lab == 2][:, 0].mean() > und[lab == 2][:, 1].mean() + 0.2
    assert und[lab == 0].mean() > 0.85
    # the returned displacement undoes the sectioning deformation
    back = np.stack([P.warp(rgb[..., c], u, order=1) for c in range(3)], axis=-1)
    inner = (slice(8, -8), slice(8, -8))
    assert np.abs(back - und)[inner].mean() < 0.03
    agree = P.warp(info["labels"], u, order=0)[inner] == lab[inner]
    assert agree.mean() > 0.9


def test_histology_deterministic_and_options(bone):
    image, labels = bone
    a, _ = P.histology(image[20], labels[20], seed=1)
    b, _ = P.histology(image[20], labels[20], seed=1)
    c, _ = P.histology(image[20], labels[20], seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    tri, info = P.histology(image[20], labels[20], seed=1, stain="trichrome", implant="missing", deformation=0,
                            compression=0)
    und = info["undeformed"]
    assert und[labels[20] == 3].mean() > 0.85          # the implant fell out: white
    np.testing.assert_allclose(info["displacement"], 0)


@pytest.mark.parametrize("kwargs, name", [
    (dict(labels=np.zeros((10, 10), np.uint8)), "labels"),
    (dict(labels=np.full((32, 32), 7, np.uint8)), "labels"),
    (dict(labels=np.zeros((32, 32), np.float32)), "labels"),
    (dict(ct_slice=np.full((32, 32), np.nan)), "ct_slice"),
    (dict(stain="gold"), "stain"),
    (dict(deformation=-2.0), "deformation"),
    (dict(implant="ghost"), "implant"),
])
def test_histology_bad_inputs(kwargs, name):
    args = dict(ct_slice=np.zeros((32, 32), np.float32), labels=np.ones((32, 32), np.uint8))
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError)) as err:
        P.histology(**args)
    assert str(err.value).startswith(name)


def test_bone_implant_small_implant_option():
    default = P.bone_implant((32, 64, 64), seed=4)
    small = P.bone_implant((32, 64, 64), seed=4, implant_scale=0.5, implant_tip=0.4)
    frac = lambda ph: np.mean(ph.labels == 3)  # noqa: E731
    assert 0 < frac(small) < 0.5 * frac(default)
    assert small.info["screw_tip_z"] == pytest.approx(0.4 * 32)
    assert small.info["screw_radius"][0] < 0.6 * default.info["screw_radius"][0]
    # the anatomy (same seed) is unchanged away from the implant
    far = np.s_[:, :8, :8]
    np.testing.assert_array_equal(small.labels[far], default.labels[far])
    with pytest.raises(ValueError, match="^implant_tip"):
        P.bone_implant((16, 16, 16), implant_tip=1.5)
    with pytest.raises(ValueError, match="^implant_scale"):
        P.bone_implant((16, 16, 16), implant_scale=0)
