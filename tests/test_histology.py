"""Tests for tomoml_nb.histology: slice-to-volume registration, lookup baseline, cycleGAN, metrics."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import ndimage as ndi

from tomoml_nb import histology as H
from tomoml_nb import metrics, phantoms

TINY = dict(crop=16, batch_size=2, base_channels=4, n_blocks=1, d_channels=4, progress=False, num_threads=1)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def phantom():
    return phantoms.bone_implant((40, 56, 56), seed=3)


@pytest.fixture(scope="module")
def section(phantom):
    return H.oblique_sections(phantom, 1, seed=4, max_tilt_deg=5, max_shift=3)[0]


def quiet_register(*args, **kwargs):
    kwargs.setdefault("progress", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return H.register_slice(*args, **kwargs)


@pytest.fixture(scope="module")
def registered(phantom, section):
    return quiet_register(section["image"], phantom.image, max_tilt_deg=6)


# --------------------------------------------------------------------------- helpers
def test_to_single_channel_rgb_and_grey():
    rgb = np.ones((16, 16, 3), np.float32)
    rgb[4:8, 4:8] = (0.8, 0.3, 0.6)
    rgb[10:14, 10:14] = (0.3, 0.1, 0.2)          # more stain
    g = H.to_single_channel(rgb)
    assert g.shape == (16, 16)
    assert g[0, 0] < g[5, 5] < g[12, 12]
    grey = np.random.default_rng(0).random((16, 16))
    assert np.allclose(H.to_single_channel(grey), grey)
    assert H.to_single_channel((rgb * 255).astype(np.uint8)).shape == (16, 16)
    with pytest.raises(ValueError, match="^image"):
        H.to_single_channel(np.zeros((16, 16, 5)))


def test_nmi_prefers_related_images():
    rng = np.random.default_rng(0)
    x = ndi.gaussian_filter(rng.random((48, 48)), 2)
    assert H.nmi(x, np.cos(20 * x)) > H.nmi(x, rng.random((48, 48))) + 0.1
    assert 1.0 <= H.nmi(x, x) <= 2.0
    with pytest.raises(ValueError, match="^b"):
        H.nmi(x, x[:10])


def test_plane_coordinates_identity_is_a_plain_slice():
    vol = np.random.default_rng(0).random((8, 10, 12)).astype(np.float32)
    c = H.plane_coordinates((3, 4.5, 5.5), np.eye(3), (10, 12))
    assert np.allclose(ndi.map_coordinates(vol, c, order=1), vol[3], atol=1e-5)
    half = H.plane_coordinates((3, 4.5, 5.5), np.eye(3), (5, 6), spacing=2.0)
    assert np.allclose(half[:, 1, 1] - half[:, 0, 0], (0, 2, 2))


def test_plane_errors_known_values():
    R = phantoms.random_plane((32, 32, 32), 10, seed=1)[1]
    e = H.plane_errors((np.array([10.0, 16, 16]) + 2 * R[0], R), (10.0, 16, 16), R, shape=(8, 8))
    assert e["angle_deg"] == pytest.approx(0, abs=1e-6)
    assert e["offset"] == pytest.approx(2.0)
    assert e["mean_point_error"] == pytest.approx(2.0, abs=1e-5)
    tilted = H._local_rotate(R, np.radians([0, 3, 0]))
    assert H.plane_errors((np.zeros(3), tilted), np.zeros(3), R)["angle_deg"] == pytest.approx(3, abs=1e-6)


def test_oblique_sections_truth_is_consistent(phantom, section):
    ct = phantoms.oblique_slice(phantom.image, section["origin"], section["rotation"], shape=section["ct"].shape)
    assert np.allclose(ct, section["ct"])
    assert section["image"].shape == section["ct"].shape + (3,)
    assert np.degrees(np.arccos(abs(section["rotation"][0, 0]))) <= 5 + 1e-6
    with pytest.raises(TypeError, match="^phantom"):
        H.oblique_sections(np.zeros((8, 8, 8)), 1)


# --------------------------------------------------------------------------- registration
def test_register_recovers_the_plane(registered, section):
    err = H.plane_errors(registered, section["origin"], section["rotation"])
    assert err["angle_deg"] < 3.0
    assert err["offset"] < 1.5
    assert err["mean_point_error"] < 2.0
    names = [s["name"] for s in registered.stages]
    assert names[:2] == ["coarse", "refined"]
    assert registered.ct_slice.shape == section["image"].shape[:2]
    assert registered.displacement is None or registered.displacement.shape == (2,) + section["ct"].shape
    assert registered.inside > 0.8
    assert registered.confidence > 1.2
    # the pipeline improves the match stage by stage
    assert registered.stages[1]["score"] >= registered.stages[0]["score"] - 1e-3
    assert registered.score >= registered.stages[1]["score"] - 1e-3


def test_bspline_corrects_the_sectioning_deformation(phantom):
    s = H.oblique_sections(phantom, 1, seed=8, max_tilt_deg=0, deformation=2.5, compression=0.04)[0]
    truth = phantoms.deform(s["ct"], s["displacement"])            # the CT in histology geometry
    inner = (slice(6, -6), slice(6, -6))
    plane = quiet_register(s["image"], phantom.image, max_tilt_deg=3)
    rigid = [st for st in plane.stages if st["name"] == "refined"][0]["ct_slice"]
    assert plane.displacement is not None
    err_rigid = metrics.rmse(rigid[inner], truth[inner])
    err_final = metrics.rmse(plane.ct_slice[inner], truth[inner])
    assert err_final < 0.9 * err_rigid


def test_register_grey_section_with_nonmonotonic_contrast(phantom):
    o, R = np.array([20.0, 27.5, 27.5]), H._local_rotate(np.eye(3), np.radians([0, 3, -2]))
    ct = phantoms.oblique_slice(phantom.image, o, R)
    other_modality = np.cos(6 * ct) + 0.02 * np.random.default_rng(0).standard_normal(ct.shape)
    plane = quiet_register(other_modality, phantom.image, max_tilt_deg=5, bspline=False)
    err = H.plane_errors(plane, o, R)
    assert err["angle_deg"] < 2.0 and err["offset"] < 1.0


def test_register_with_finer_histology_pixels(phantom, section):
    big = ndi.zoom(section["image"], (2, 2, 1), order=1)             # pixel size 0.5 voxel
    # pixel size and voxel size in the same physical unit (e.g. 0.65 um histology, 1.3 um CT)
    plane = quiet_register(big, phantom.image, pixel_size=0.65, voxel_size=1.3, max_tilt_deg=6, bspline=False)
    assert plane.pixel_size == pytest.approx((0.5, 0.5))
    assert plane.ct_slice.shape == big.shape[:2]
    err = H.plane_errors(plane, section["origin"], section["rotation"])
    assert err["offset"] < 1.5 and err["angle_deg"] < 3.0


def test_register_along_another_axis(phantom):
    o = np.array([19.5, 30.0, 27.5])
    R = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])   # rows z, cols x: volume[:, 30, :]
    img = phantoms.oblique_slice(phantom.image, o, R, shape=(40, 56))
    assert np.allclose(img, phantom.image[:, 30, :], atol=1e-5)
    plane = quiet_register(img, phantom.image, axis="y", max_tilt_deg=3, bspline=False)
    err = H.plane_errors(plane, o, R)
    assert err["offset"] < 1.0 and err["angle_deg"] < 2.0


def test_mirrored_section_is_found_with_mirror_auto(phantom, section):
    flipped = section["image"][:, ::-1]
    plane = quiet_register(flipped, phantom.image, max_tilt_deg=6, mirror="auto", bspline=False)
    assert np.linalg.det(plane.rotation) < 0
    assert H.plane_errors(plane, section["origin"], section["rotation"])["offset"] < 1.5


def test_outside_and_bad_inputs(phantom, section):
    vol = phantom.image
    with pytest.raises(ValueError, match="^search_range"):
        H.register_slice(section["image"], vol, search_range=(60, 80), progress=False)
    with pytest.raises(ValueError, match="^image2d"):
        H.register_slice(section["image"], vol, pixel_size=5.0, progress=False)
    with pytest.raises(ValueError, match="^image2d"):
        # the section cannot lie 90 % inside the volume when it is searched only at the volume's top face
        H.register_slice(section["image"], vol, search_range=(0, 0), max_tilt_deg=0, min_overlap=0.9,
                         max_shift=0, progress=False)
    with pytest.raises(ValueError, match="^image2d"):
        H.register_slice(np.zeros((16, 16, 5)), vol, progress=False)
    with pytest.raises(ValueError, match="^volume"):
        H.register_slice(section["image"], vol[0], progress=False)
    with pytest.raises(ValueError, match="^max_tilt_deg"):
        H.register_slice(section["image"], vol, max_tilt_deg=80, progress=False)
    with pytest.raises(ValueError, match="^pixel_size"):
        H.register_slice(section["image"], vol, pixel_size=-1, progress=False)
    with pytest.raises(ValueError, match="^axis"):
        H.register_slice(section["image"], vol, axis="w", progress=False)
    with pytest.raises(ValueError, match="^mirror"):
        H.register_slice(section["image"], vol, mirror="maybe", progress=False)
    with pytest.raises(ValueError, match="^binning"):
        H.register_slice(section["image"], vol, binning="quantile", progress=False)


def test_unrelated_image_gives_a_warning(phantom):
    noise = np.random.default_rng(1).random((56, 56, 3)).astype(np.float32)
    with pytest.warns(RuntimeWarning, match="doubtful"):
        plane = H.register_slice(noise, phantom.image, max_tilt_deg=4, bspline=False, progress=False)
    assert plane.confidence < 1.2


# --------------------------------------------------------------------------- classical baseline
def test_lookup_recovers_a_known_colour_map():
    rng = np.random.default_rng(0)
    ct = rng.random((40, 40)).astype(np.float32)
    rgb = np.stack([ct, 1 - ct, np.where(ct > 0.5, 0.9, 0.1)], -1).astype(np.float32)
    lut = H.fit_lookup([ct], [rgb], bins=32)
    pred = H.colourise(ct, lut)
    assert pred.shape == rgb.shape
    assert np.abs(pred - rgb)[..., :2].max() < 0.05
    vol = np.stack([ct, ct[::-1]])
    out = np.zeros(vol.shape + (3,), np.float32)
    res = H.colourise(vol, lut, out=out, chunk=1)
    assert res is out and np.allclose(out[0], pred)
    grey = H.fit_lookup([ct], [np.cos(3 * ct)], bins=16, statistic="mean")
    assert H.colourise(ct, grey).shape == ct.shape
    with pytest.raises(TypeError, match="^lookup"):
        H.colourise(ct, {"edges": 1})
    with pytest.raises(ValueError, match="^histo_images"):
        H.fit_lookup([ct], [rgb[:20]])
    with pytest.raises(ValueError, match="^bins"):
        H.fit_lookup([ct], [rgb], bins=1)


# --------------------------------------------------------------------------- cycleGAN
@pytest.fixture(scope="module")
def pairs(phantom):
    secs = H.oblique_sections(phantom, 3, seed=11, max_tilt_deg=0, deformation=0, compression=0)
    return [s["ct"] for s in secs], [s["image"] for s in secs]


@pytest.fixture(scope="module")
def tiny_gan(pairs):
    cts, his = pairs
    return H.train_cyclegan(cts, his, steps=40, lr=2e-3, seed=0, **TINY)


def test_cyclegan_trains_and_translates(tiny_gan, pairs):
    cts, his = pairs
    hist = tiny_gan.tomoml_history
    assert hist["steps"] == 40 and len(hist["loss_g"]) == 40
    assert np.mean(hist["loss_paired"][-10:]) < np.mean(hist["loss_paired"][:10])
    rgb = H.translate(cts[0], tiny_gan)
    assert rgb.shape == his[0].shape and rgb.dtype == np.float32
    assert 0 <= rgb.min() and rgb.max() <= 1
    back = H.translate(his[0], tiny_gan, direction="histo2ct")
    assert back.shape == cts[0].shape
    odd = H.translate(cts[0][:30, :27], tiny_gan)                      # sizes not a multiple of 4
    assert odd.shape == (30, 27, 3)


def test_cyclegan_is_deterministic_and_resumes(pairs, tmp_path):
    cts, his = pairs
    a = H.train_cyclegan(cts, his, steps=3, seed=5, **TINY)
    b = H.train_cyclegan(cts, his, steps=3, seed=5, **TINY)
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert np.array_equal(v.numpy(), w.numpy()), k
    ck = tmp_path / "gan.ckpt"
    H.train_cyclegan(cts, his, steps=2, seed=5, checkpoint=ck, **TINY)
    resumed = H.train_cyclegan(cts, his, steps=4, seed=5, checkpoint=ck, resume=True, **TINY)
    assert resumed.tomoml_history["steps"] == 4 and len(resumed.tomoml_history["loss_g"]) == 4
    unpaired = H.train_cyclegan(cts, his[::-1], paired=False, steps=2, seed=5, **TINY)
    assert unpaired.tomoml_history["loss_paired"] == [0.0, 0.0]
    warm = H.train_cyclegan(cts, his, warmup_steps=2, steps=1, seed=5, **TINY)
    assert warm.tomoml_history["steps"] == 3
    assert np.isnan(warm.tomoml_history["loss_d"][:2]).all() and np.isfinite(warm.tomoml_history["loss_d"][2])


def test_cyclegan_bad_inputs(pairs):
    cts, his = pairs
    with pytest.raises(ValueError, match="^histo_images"):
        H.train_cyclegan(cts, his[:2], **TINY)
    with pytest.raises(ValueError, match="^crop"):
        H.train_cyclegan(cts, his, **{**TINY, "crop": 18})
    with pytest.raises(ValueError, match="^histo_images"):
        H.train_cyclegan(cts[:1], [his[0][:, :-2]], **TINY)
    with pytest.raises(ValueError, match="^steps"):
        H.train_cyclegan(cts, his, **{**TINY, "steps": 0})
    with pytest.raises(ValueError, match="^warmup_steps"):
        H.train_cyclegan(cts, his, paired=False, warmup_steps=2, **TINY)
    with pytest.raises(ValueError, match="^generator"):
        H.train_cyclegan(cts, his, generator="vit", **TINY)


def test_predict_volume_axes_batches_and_out(tiny_gan, phantom, tmp_path):
    vol = phantom.image[:10, :20, :24]
    ref = H.predict_volume(vol, tiny_gan, batch_size=3, progress=False)
    assert ref.shape == vol.shape + (3,) and ref.dtype == np.float32
    assert np.allclose(ref[4], H.translate(vol[4], tiny_gan), atol=1e-5)
    for axis in ("y", "x"):
        res = H.predict_volume(vol, tiny_gan, axis=axis, batch_size=4, progress=False)
        assert res.shape == vol.shape + (3,)
    assert np.allclose(H.predict_volume(vol, tiny_gan, axis="y", batch_size=7, progress=False)[:, 5],
                       H.translate(vol[:, 5], tiny_gan), atol=1e-5)
    mm = np.lib.format.open_memmap(tmp_path / "vh.npy", mode="w+", dtype=np.float32, shape=vol.shape + (3,))
    H.predict_volume(vol, tiny_gan, out=mm, progress=False)
    assert np.allclose(np.asarray(mm), ref)
    other = H.predict_volume(vol, tiny_gan, intensity_range=(0.0, 2.0), progress=False)
    assert not np.allclose(other, ref)
    with pytest.raises(ValueError, match="^axis"):
        H.predict_volume(vol, tiny_gan, axis="t")
    with pytest.raises(ValueError, match="^out"):
        H.predict_volume(vol, tiny_gan, out=np.zeros((2, 2, 2, 3), np.float32))
    with pytest.raises(ValueError, match="^volume"):
        H.predict_volume(vol[0], tiny_gan)
    with pytest.raises(TypeError, match="^model"):
        H.predict_volume(vol, object())


def test_grey_modality_model(phantom):
    cts = [phantom.image[z] for z in (10, 20, 30)]
    other = [np.cos(4 * c) for c in cts]
    net = H.train_cyclegan(cts, other, steps=2, seed=0, **TINY)
    assert net.tomoml_config["channels"] == 1
    assert H.predict_volume(phantom.image[:4], net, progress=False).shape == (4, 56, 56)
    assert H.translate(other[0], net, direction="histo2ct").shape == (56, 56)


def test_save_load_round_trip(tiny_gan, pairs, tmp_path):
    p = H.save_model(tiny_gan, tmp_path / "m.pt", note="test")
    net = H.load_model(p)
    assert net.d_a is None and net.tomoml_meta["note"] == "test"
    a = H.translate(pairs[0][0], tiny_gan)
    b = H.translate(pairs[0][0], net)
    assert np.abs(a - b).max() < 0.02                                 # float16 storage
    with pytest.raises(FileNotFoundError, match="^path"):
        H.load_model(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="^path"):
        H.load_model(tmp_path / "bad.pt")
    # fine-tuning a loaded model re-creates the discriminators
    tuned = H.train_cyclegan(pairs[0], pairs[1], model=net, steps=1, seed=0, **TINY)
    assert tuned.d_a is not None


def test_shipped_weights_load_and_run(phantom):
    if not H.pretrained_path().is_file():
        pytest.skip("shipped weights not built yet (python scripts/train_cyclegan.py)")
    net = H.load_pretrained()
    assert net.tomoml_config["channels"] == 3
    assert H.pretrained_path().stat().st_size < 5_000_000
    rgb = H.translate(phantom.image[20], net)
    assert rgb.shape == (56, 56, 3)
    # H&E: bone is pink-red (red > green), the metal implant dark
    bone = phantom.labels[20] == 2
    assert rgb[bone][:, 0].mean() > rgb[bone][:, 1].mean()
    implant = phantom.labels[20] == 3
    if implant.sum() > 10:
        assert rgb[implant].mean() < rgb[bone].mean()


# --------------------------------------------------------------------------- metrics
def test_colour_metrics():
    rng = np.random.default_rng(0)
    ref = ndi.gaussian_filter(rng.random((48, 48, 3)), (2, 2, 0))
    noisy = np.clip(ref + 0.1 * rng.standard_normal(ref.shape), 0, 1)
    assert metrics.ssim_rgb(ref, ref) == pytest.approx(1.0)
    assert metrics.ssim_rgb(noisy, ref) < 0.9
    assert metrics.psnr_rgb(noisy, ref) == pytest.approx(20.0, abs=1.0)
    assert metrics.sliced_wasserstein(ref, ref) == 0.0
    shifted = np.clip(ref + 0.2, 0, 1)
    assert metrics.sliced_wasserstein(shifted, ref) > metrics.sliced_wasserstein(ref[::-1], ref)
    flat = np.full_like(ref, 0.5)
    assert metrics.texture_distance(ref[::-1, ::-1], ref) < metrics.texture_distance(flat + 0.001 * ref, ref)
    assert metrics.texture_distance(ref[:30], ref) < 1.0                # sizes may differ
    with pytest.raises(ValueError, match="^reference"):
        metrics.ssim_rgb(ref, ref[:10])
    with pytest.raises(ValueError, match="^estimate"):
        metrics.ssim_rgb(ref[..., 0], ref)
    with pytest.raises(ValueError, match="^reference"):
        metrics.texture_distance(ref, ref[..., 0])
    with pytest.raises(ValueError, match="^estimate"):
        metrics.sliced_wasserstein(np.zeros((4, 5)), ref)


def test_predict_volume_validates_its_input_and_out(tiny_gan, phantom):
    vol = phantom.image[:4, :16, :16].copy()
    vol[2, 3, 3] = np.nan
    with pytest.raises(ValueError, match="^volume: contains 1 NaN"):
        H.predict_volume(vol, tiny_gan, progress=False)
    vol[2, 3, 3] = np.inf
    with pytest.raises(ValueError, match="^volume"):
        H.predict_volume(vol, tiny_gan, batch_size=1, progress=False)
    vol = phantom.image[:4, :16, :16]
    with pytest.raises(ValueError, match="^volume: slices of 4 x 4 pixels are too small"):
        H.predict_volume(vol[:, :4, :4], tiny_gan, progress=False)
    with pytest.raises(ValueError, match="^image: .*too small"):
        H.translate(vol[0, :4, :4], tiny_gan)
    assert H.predict_volume(vol[:, :5, :5], tiny_gan, progress=False).shape == (4, 5, 5, 3)
    with pytest.raises(ValueError, match="^out: .*floating-point"):
        H.predict_volume(vol, tiny_gan, out=np.zeros(vol.shape + (3,), np.uint8), progress=False)
    with pytest.raises(TypeError, match="^out"):
        H.predict_volume(vol, tiny_gan, out=[0.0], progress=False)
    out = np.zeros(vol.shape + (3,))
    assert H.predict_volume(vol, tiny_gan, out=out, progress=False) is out and out.max() > 0


def test_save_and_checkpoint_never_overwrite_user_files(tiny_gan, pairs, tmp_path):
    mine = tmp_path / "mine.pt"
    mine.write_text("mine")
    with pytest.raises(FileExistsError, match="^path"):
        H.save_model(tiny_gan, mine)
    cts, his = pairs
    with pytest.raises(FileExistsError, match="^checkpoint: .*resume=True"):
        H.train_cyclegan(cts, his, steps=1, checkpoint=mine, **TINY)
    with pytest.raises(ValueError, match="^checkpoint"):
        H.train_cyclegan(cts, his, steps=1, checkpoint=mine, resume=True, **TINY)
    assert mine.read_text() == "mine"
    assert H.load_model(H.save_model(tiny_gan, mine, overwrite=True)).tomoml_config["base"] == 4
