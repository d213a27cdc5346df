"""Tests for tomoml_nb.segment (classical baselines, U-Net training and multi-axis prediction)."""
from __future__ import annotations

import numpy as np
import pytest

from tomoml_nb import metrics, phantoms, segment
from tomoml_nb.models.unet import build_unet, size_multiple

TINY = dict(channels=(4, 8), patch_size=16, batch_size=4, progress=False)


def disks(shape=(24, 32, 32), seed=0, n=6):
    """Easy two-class volume: bright balls on a dark, noisy background."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.indices(shape)
    lab = np.zeros(shape, np.uint8)
    for _ in range(n):
        c = [rng.uniform(min(4, s / 2), max(s - 4, s / 2)) for s in shape]
        r = rng.uniform(3, 6)
        lab[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 < r * r] = 1
    img = lab * 1.0 + rng.normal(0, 0.15, shape)
    return img.astype(np.float32), lab


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def phantom():
    return phantoms.bone_implant((32, 32, 32), seed=3)


@pytest.fixture(scope="module")
def tiny_net():
    img, lab = disks()
    return segment.train_unet(img, lab, steps=60, lr=1e-2, seed=0, val_every=30, **TINY)


# --------------------------------------------------------------------------- U-Net
def test_unet_learns_an_easy_task(tiny_net):
    img, lab = disks(seed=1)  # a different volume
    pred, prob = segment.predict(img, tiny_net, axes=("z",), progress=False)
    assert pred.shape == img.shape and pred.dtype == np.uint8
    assert prob.shape == (2,) + img.shape
    assert np.allclose(prob.sum(0), 1, atol=1e-4)
    assert metrics.iou_per_class(pred, lab, 2)[1] > 0.7
    hist = tiny_net.tomoml_history
    assert hist["steps"] == 60 and len(hist["loss"]) == 60
    assert np.mean(hist["loss"][-5:]) < np.mean(hist["loss"][:5])
    assert [s for s, _ in hist["val"]] == [30, 60]  # validation on the held-out z-slab
    assert len(hist["val_iou_per_class"]) == 2
    cfg = tiny_net.tomoml_config
    assert cfg["n_classes"] == 2 and cfg["axes"] == ("z", "y", "x") and cfg["steps"] == 60


def test_training_is_deterministic():
    img, lab = disks()
    a = segment.train_unet(img, lab, steps=3, seed=5, val_fraction=0, **TINY)
    b = segment.train_unet(img, lab, steps=3, seed=5, val_fraction=0, **TINY)
    assert a.tomoml_history["loss"] == b.tomoml_history["loss"]


def test_predict_single_axis_equals_predict_axis(tiny_net):
    img, _ = disks(seed=2)
    for axis in "zyx":
        _, prob = segment.predict(img, tiny_net, axes=(axis,), progress=False)
        np.testing.assert_allclose(prob, segment.predict_axis(img, tiny_net, axis, progress=False), atol=1e-6)


def test_multi_axis_mean_is_average_of_axes(tiny_net):
    img, _ = disks(seed=2)
    per = [segment.predict_axis(img, tiny_net, a, progress=False) for a in "zyx"]
    lab, prob = segment.predict(img, tiny_net, axes=("z", "y", "x"), fusion="mean", progress=False)
    np.testing.assert_allclose(prob, np.mean(per, 0), atol=1e-5)
    np.testing.assert_array_equal(lab, np.mean(per, 0).argmax(0))
    for fusion in segment.FUSIONS:
        lab_f, prob_f = segment.predict(img, tiny_net, fusion=fusion, progress=False)
        assert lab_f.shape == img.shape and np.allclose(prob_f.sum(0), 1, atol=1e-4)


def test_predict_2d_and_odd_sizes(tiny_net):
    img, _ = disks(shape=(7, 19, 23))  # not multiples of the network's size multiple
    lab, prob = segment.predict(img, tiny_net, progress=False)
    assert lab.shape == (7, 19, 23) and prob.shape == (2, 7, 19, 23)
    rng = segment.normalize_intensity(img)[1]  # a slice alone would be normalised by its own percentiles
    lab2, prob2 = segment.predict(img[3], tiny_net, intensity_range=rng, progress=False)
    assert lab2.shape == (19, 23) and prob2.shape == (2, 19, 23)
    np.testing.assert_allclose(prob2, segment.predict_axis(img, tiny_net, "z", intensity_range=rng,
                                                           progress=False)[:, 3], atol=1e-5)


def test_fuse_rules():
    a = np.array([[0.6, 0.2], [0.4, 0.8]], np.float32)   # axis 1: class 0 then class 1
    b = np.array([[0.55, 0.3], [0.45, 0.7]], np.float32)
    c = np.array([[0.0, 0.9], [1.0, 0.1]], np.float32)
    lab_mean, p = segment.fuse([a, b, c], "mean")
    assert lab_mean.tolist() == [1, 1]  # one confident axis outweighs two hesitant ones (soft voting)
    np.testing.assert_allclose(p, (a + b + c) / 3, atol=1e-6)
    lab_major, _ = segment.fuse([a, b, c], "majority")
    assert lab_major.tolist() == [0, 1]  # hard vote: two of three axes say class 0 for pixel 0
    lab_geo, pg = segment.fuse([a, b, c], "geometric")
    assert lab_geo.tolist() == [1, 1]  # axis c gives class 0 probability 0: a veto
    np.testing.assert_allclose(pg.sum(0), 1, atol=1e-6)
    with pytest.raises(ValueError, match=r"^probabilities\[1\]: shape"):
        segment.fuse([a, a[:, :1]])


def test_fusion_weights():
    t = np.array([0, 1, 1, 0, 1])
    good = np.stack([1.0 - t, t]).astype(np.float32) * 0.8 + 0.1
    bad = good[::-1].copy()
    w = segment.fit_fusion_weights({"z": good, "y": bad}, t)
    assert w["z"] > w["y"] and abs(sum(w.values()) - 1) < 1e-6
    lab, _ = segment.fuse({"z": good, "y": bad}, weights=w)
    np.testing.assert_array_equal(lab, t)
    lab_eq, p_eq = segment.fuse({"z": good, "y": bad})
    np.testing.assert_allclose(p_eq, 0.5, atol=1e-6)  # equal weights cancel out
    with pytest.raises(ValueError, match=r"^weights: give a weight for every axis"):
        segment.fuse({"z": good, "y": bad}, weights={"z": 1.0})
    with pytest.raises(ValueError, match=r"^weights: expected 2 weights"):
        segment.fuse([good, bad], weights=[1.0])
    with pytest.raises(ValueError, match=r"^weights: weights must be"):
        segment.fuse([good, bad], weights=[-1.0, 2.0])
    with pytest.raises(TypeError, match=r"^probabilities"):
        segment.fit_fusion_weights([good, bad], t)


def test_predict_uses_stored_fusion_weights(tiny_net):
    import copy

    img, _ = disks(seed=5)
    net = copy.deepcopy(tiny_net)
    per = {a: segment.predict_axis(img, net, a, progress=False) for a in "zyx"}
    net.tomoml_config["fusion_weights"] = {"z": 0.6, "y": 0.3, "x": 0.1}
    _, prob = segment.predict(img, net, progress=False)
    np.testing.assert_allclose(prob, 0.6 * per["z"] + 0.3 * per["y"] + 0.1 * per["x"], atol=1e-5)
    _, prob_eq = segment.predict(img, net, weights=None, progress=False)
    np.testing.assert_allclose(prob_eq, (per["z"] + per["y"] + per["x"]) / 3, atol=1e-5)
    _, prob_zx = segment.predict(img, net, axes=("z", "x"), weights={"z": 1, "x": 3}, progress=False)
    np.testing.assert_allclose(prob_zx, 0.25 * per["z"] + 0.75 * per["x"], atol=1e-5)
    with pytest.raises(ValueError, match=r"^weights"):
        segment.predict(img, net, weights="auto", progress=False)


def test_sparse_labels_are_ignored():
    img, lab = disks()
    sparse = np.full(lab.shape, segment.UNLABELLED, np.int16)
    sparse[::4, ::3, ::3] = lab[::4, ::3, ::3]
    net = segment.train_unet(img, sparse, n_classes=2, steps=3, val_fraction=0, **TINY)
    assert net.tomoml_history["class_counts"] == np.bincount(lab[::4, ::3, ::3].ravel(), minlength=2).tolist()


def test_list_of_2d_slices_and_validation_set():
    img, lab = disks()
    net = segment.train_unet(list(img[:6]), list(lab[:6]), steps=4, val_every=2,
                             validation=(img[6:8], lab[6:8]), **TINY)
    assert len(net.tomoml_history["val"]) == 2


def test_warm_start_continues_training(tiny_net):
    import copy

    img, lab = disks(seed=3)
    net = copy.deepcopy(tiny_net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net2 = segment.train_unet(img, lab, model=net, steps=2, val_fraction=0, **TINY)
    assert net2 is net
    assert net2.tomoml_config["steps"] == 62
    assert any(not np.allclose(before[k].numpy(), v.numpy()) for k, v in net2.state_dict().items()
               if v.dtype.is_floating_point)


def test_checkpoint_and_resume(tmp_path):
    img, lab = disks()
    ck = tmp_path / "ck.pt"
    segment.train_unet(img, lab, steps=4, checkpoint=ck, checkpoint_every=2, val_fraction=0, **TINY)
    assert ck.is_file()
    net = segment.train_unet(img, lab, steps=6, checkpoint=ck, resume=True, val_fraction=0, **TINY)
    assert net.tomoml_history["steps"] == 6
    assert len(net.tomoml_history["loss"]) == 6  # 4 from the checkpoint + 2 new


def test_save_load_roundtrip(tiny_net, tmp_path):
    path = segment.save_model(tiny_net, tmp_path / "m.pt", note="test")
    net = segment.load_model(path)
    img, _ = disks(seed=4)
    np.testing.assert_allclose(segment.predict_axis(img, net, progress=False),
                               segment.predict_axis(img, tiny_net, progress=False), atol=1e-6)
    assert net.tomoml_meta == {"note": "test"}
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"^path"):
        segment.load_model(bad)
    with pytest.raises(FileNotFoundError, match=r"^path"):
        segment.load_model(tmp_path / "missing.pt")


def test_build_unet():
    net = build_unet(5, (8, 16, 32))
    assert size_multiple(net.tomoml_config) == 4
    with pytest.raises(ValueError, match=r"^n_classes"):
        build_unet(1)
    with pytest.raises(ValueError, match=r"^channels"):
        build_unet(3, (8,))
    with pytest.raises(ValueError, match=r"^norm"):
        build_unet(3, norm="layer")


# --------------------------------------------------------------------------- bad inputs
def test_bad_labels_and_shapes():
    img, lab = disks()
    with pytest.raises(ValueError, match=r"^labels: shape"):
        segment.train_unet(img, lab[:-1], steps=1, **TINY)
    with pytest.raises(ValueError, match=r"^labels: label 3 is out of range"):
        segment.train_unet(img, lab * 3, n_classes=2, steps=1, **TINY)
    with pytest.raises(ValueError, match=r"^labels: labels must be >= 0"):
        segment.train_unet(img, lab.astype(int) - 2, steps=1, **TINY)
    with pytest.raises(ValueError, match=r"^labels: labels must be integers"):
        segment.train_unet(img, lab + 0.5, steps=1, **TINY)
    with pytest.raises(ValueError, match=r"^labels: need at least two classes"):
        segment.train_unet(img, np.zeros_like(lab), steps=1, **TINY)
    with pytest.raises(ValueError, match=r"^labels\[1\]: shape"):
        segment.train_unet([img, img], [lab, lab[:, :-1]], steps=1, **TINY)
    with pytest.raises(ValueError, match=r"^labels: 1 label arrays for 2 images"):
        segment.train_unet([img, img], [lab], steps=1, **TINY)
    with pytest.raises(ValueError, match=r"^images: expected a 2D or 3D"):
        segment.train_unet(img[None], lab[None], steps=1, **TINY)
    with pytest.raises(ValueError, match=r"^images: contains"):
        segment.train_unet(np.where(lab > 0, np.nan, img), lab, steps=1, **TINY)


def test_missing_class_warns():
    img, lab = disks()
    with pytest.warns(UserWarning, match=r"^labels: class\(es\) 2 \(pore\)"):
        segment.train_unet(img, lab, n_classes=3, class_names=["bg", "ball", "pore"], steps=1, val_fraction=0,
                           **TINY)


def test_bad_parameters(tiny_net):
    img, lab = disks()
    with pytest.raises(ValueError, match=r"^patch_size: 18 must be a multiple of 4"):
        segment.train_unet(img, lab, steps=1, channels=(4, 8, 16), patch_size=18, progress=False)
    with pytest.raises(ValueError, match=r"^axes"):
        segment.train_unet(img, lab, axes=("q",), steps=1, **TINY)
    with pytest.raises(ValueError, match=r"^steps"):
        segment.train_unet(img, lab, steps=0, **TINY)
    with pytest.raises(ValueError, match=r"^val_fraction"):
        segment.train_unet(img, lab, steps=1, val_fraction=1.0, **TINY)
    with pytest.raises(ValueError, match=r"^class_weights"):
        segment.train_unet(img, lab, steps=1, class_weights=[1.0, 2.0, 3.0], **TINY)
    with pytest.raises(ValueError, match=r"^model: predicts 2 classes"):
        segment.train_unet(img, lab * 2, n_classes=3, model=tiny_net, steps=1, **TINY)
    with pytest.raises(ValueError, match=r"^fusion"):
        segment.predict(img, tiny_net, fusion="median", progress=False)
    with pytest.raises(ValueError, match=r"^axes: repeated"):
        segment.predict(img, tiny_net, axes=("z", "z"), progress=False)
    with pytest.raises(TypeError, match=r"^model"):
        segment.predict(img, object(), progress=False)
    with pytest.raises(ValueError, match=r"^volume: expected a 2D or 3D"):
        segment.predict(img[None], tiny_net, progress=False)
    with pytest.raises(ValueError, match=r"^intensity_range"):
        segment.predict(img, tiny_net, intensity_range="model", progress=False)
    with pytest.raises(ValueError, match=r"^intensity_range"):
        segment.predict(img, tiny_net, intensity_range=(1.0, 0.0), progress=False)
    with pytest.raises(ValueError, match=r"^name"):
        segment.load_pretrained("cats")


# --------------------------------------------------------------------------- classical baselines
def test_threshold_segment_and_intensity_order(phantom):
    img, lab = phantom
    order = segment.intensity_order(img, lab)
    assert order == [0, 1, 4, 2, 3]  # background < soft tissue < degradation < bone < implant
    pred, th = segment.threshold_segment(img, 5, class_order=order)
    assert pred.shape == img.shape and th.size == 4 and np.all(np.diff(th) > 0)
    iou = metrics.iou_per_class(pred, lab, 5)
    assert iou[0] > 0.8 and iou[3] > 0.8
    fixed, _ = segment.threshold_segment(img, 2, thresholds=[0.3])
    np.testing.assert_array_equal(fixed, (img >= 0.3).astype(np.uint8))
    with pytest.raises(ValueError, match=r"^class_order"):
        segment.threshold_segment(img, 3, class_order=[0, 1])
    with pytest.raises(ValueError, match=r"^thresholds"):
        segment.threshold_segment(img, 3, thresholds=[0.5])
    with pytest.raises(ValueError, match=r"^volume: all values are equal"):
        segment.threshold_segment(np.ones((4, 4)), 3)


def test_pixel_classifier(phantom):
    img, lab = phantom
    clf = segment.train_pixel_classifier(img, lab, n_samples=3000, n_estimators=10, seed=0, n_jobs=1)
    assert clf.ndim == 3 and clf.n_classes == 5
    other = phantoms.bone_implant((32, 32, 32), seed=4)
    pred, prob = segment.predict_pixel_classifier(other.image, clf, chunk=10, progress=False)
    assert prob.shape == (5, 32, 32, 32) and np.allclose(prob.sum(0), 1, atol=1e-5)
    iou = metrics.iou_per_class(pred, other.labels, 5)
    assert iou[0] > 0.9 and iou[3] > 0.8
    # chunked 3D features agree with the whole-volume result up to the halo
    _, prob_whole = segment.predict_pixel_classifier(other.image, clf, chunk=64, progress=False)
    assert np.mean(np.abs(prob - prob_whole)) < 0.02
    # sparse scribbles on 2D slices
    sparse = np.full(lab.shape, -1, np.int16)
    sparse[10, ::2, ::2] = lab[10, ::2, ::2]
    clf2 = segment.train_pixel_classifier([img[10], img[20]], [sparse[10], lab[20]], n_classes=5, n_samples=2000,
                                          n_estimators=5, n_jobs=1)
    assert clf2.ndim == 2
    pred2, _ = segment.predict_pixel_classifier(img[:3], clf2, progress=False)
    assert pred2.shape == (3, 32, 32)
    with pytest.raises(TypeError, match=r"^classifier"):
        segment.predict_pixel_classifier(img, object())
    with pytest.raises(ValueError, match=r"^sigma_max"):
        segment.train_pixel_classifier(img, lab, sigma_min=3, sigma_max=1)


def test_normalize_intensity():
    out, rng = segment.normalize_intensity(np.arange(10.0), (0.0, 10.0))
    assert rng == (0.0, 10.0) and out[5] == 0.5
    out, rng = segment.normalize_intensity(np.full((3, 3), 7.0))  # constant: no division by zero
    assert np.isfinite(out).all()
    with pytest.raises(TypeError, match=r"^intensity_range"):
        segment.normalize_intensity(np.arange(3.0), 5.0)


def test_mean_iou():
    assert metrics.mean_iou([0, 1, 1], [0, 1, 1]) == 1.0
    assert metrics.mean_iou([0, 1, 0], [0, 1, -1], ignore_index=-1) == 1.0
    assert metrics.mean_iou([0, 0, 1, 1], [0, 1, 1, 1]) == pytest.approx((0.5 + 2 / 3) / 2)


# --------------------------------------------------------------------------- shipped weights
def test_pretrained_weights_segment_a_held_out_phantom():
    path = segment.pretrained_path()
    assert path.is_file(), "shipped weights missing: run scripts/train_unet.py"
    assert path.stat().st_size < 5e6
    assert path.with_suffix(".md").is_file(), "model card missing"
    net = segment.load_pretrained()
    cfg = net.tomoml_config
    assert cfg["n_classes"] == 5 and cfg["class_names"][4] == "degradation"
    held_out = phantoms.bone_implant((48, 48, 48), seed=90210, degradation=0.6, degradation_seed=777)
    pred, _ = segment.predict(held_out.image, "pretrained", progress=False)
    iou = metrics.iou_per_class(pred, held_out.labels, 5)
    assert np.nanmean(iou) > 0.75, iou


# --------------------------------------------------------------------------- helpers for notebooks
def test_simulate_scribbles(phantom):
    _, lab = phantom
    s = segment.simulate_scribbles(lab, 3, erode=1, keep=0.2, seed=0)
    assert s.shape == lab.shape and s.dtype == np.int16
    labelled = s >= 0
    np.testing.assert_array_equal(s[labelled], lab[labelled])  # scribbles never lie
    assert labelled.mean() < 0.05
    assert len(np.unique(np.nonzero(labelled)[0])) == 3  # three z-slices
    assert set(np.unique(s[labelled])) == set(np.unique(lab[np.unique(np.nonzero(labelled)[0])]))
    with pytest.raises(ValueError, match=r"^keep"):
        segment.simulate_scribbles(lab, keep=2)


def test_iou_table_and_plots(tiny_net):
    truth = np.array([0, 1, 1, 2])
    table = segment.iou_table({"a": [0, 1, 1, 2], "b": [0, 0, 1, 1]}, truth, ["x", "y", "z"], seconds={"a": 1.5})
    lines = table.splitlines()
    assert lines[0] == "| method | x | y | z | mean IoU | seconds |"
    assert lines[2].startswith("| a | 1.000 | 1.000 | 1.000 | **1.000** | 1.5")
    assert lines[3].endswith("| – |")
    with pytest.raises(TypeError, match=r"^predictions"):
        segment.iou_table([], truth)
    fig = segment.plot_confusion_matrix([0, 1, 1, 2], truth, ["x", "y", "z"])
    assert fig.axes[0].get_xlabel() == "predicted class"
    fig = segment.plot_history(tiny_net)
    assert len(fig.axes) == 2  # loss + validation IoU axis
    with pytest.raises(TypeError, match=r"^history"):
        segment.plot_history({"val": []})


def test_crops_of_2d_items_are_whole_slices():
    """A 2D training item must give 2D crops of the slice, never 1-pixel lines through it."""
    rng = np.random.default_rng(0)
    items = [(rng.random((1, 40, 40)).astype(np.float32), rng.integers(0, 2, (1, 40, 40)).astype(np.int16))]
    sampler = segment._CropSampler(items, 2, ("z", "y", "x"), 32, 0.5, False, rng)
    for _ in range(20):
        x, y = sampler._one(rng)
        assert x.shape == (32, 32)
        assert (y >= 0).all()  # no padding: every pixel of the crop comes from the slice


def test_user_files_are_never_overwritten(tiny_net, tmp_path):
    mine = tmp_path / "mine.txt"
    mine.write_text("my notes")
    img, lab = disks()
    with pytest.raises(FileExistsError, match="^checkpoint: .*resume=True"):
        segment.train_unet(img, lab, steps=2, checkpoint=mine, val_fraction=0, **TINY)
    with pytest.raises(ValueError, match="^checkpoint"):
        segment.train_unet(img, lab, steps=2, checkpoint=mine, resume=True, val_fraction=0, **TINY)
    with pytest.raises(FileExistsError, match="^path"):
        segment.save_model(tiny_net, mine)
    assert mine.read_text() == "my notes"
    p = segment.save_model(tiny_net, mine, overwrite=True, note="x")
    assert segment.load_model(p).tomoml_meta == {"note": "x"}


def test_resume_from_another_architecture_names_the_checkpoint(tmp_path):
    img, lab = disks()
    ck = tmp_path / "ck.pt"
    segment.train_unet(img, lab, steps=2, checkpoint=ck, val_fraction=0, **TINY)
    with pytest.raises(ValueError, match="^checkpoint: .*different network"):
        segment.train_unet(img, lab, steps=4, checkpoint=ck, resume=True, val_fraction=0,
                           **{**TINY, "channels": (8, 16)})


# --------------------------------------------------------------------------- volumes larger than memory
def test_predict_blockwise_matches_whole_volume_prediction(tmp_path):
    import zarr

    from tomoml_nb.tiling import robust_range

    ph = phantoms.bone_implant((48, 64, 64), seed=90211, degradation=0.6, degradation_seed=778)
    net = segment.load_pretrained()
    rng = robust_range(ph.image, (0.5, 99.5))
    whole, prob = segment.predict(ph.image, net, intensity_range=rng, progress=False)
    # a margin that covers the volume: every block sees all of it -> identical to one pass
    lab = segment.predict_blockwise(ph.image, net, block_shape=(24, 32, 32), margin=64, progress=False)
    np.testing.assert_array_equal(lab, whole)
    # the default margin (32): blocks are cut in every axis, labels agree almost everywhere
    src = zarr.open(str(tmp_path / "vol.zarr"), mode="w", shape=ph.image.shape, chunks=(16, 32, 32), dtype="f4")
    src[...] = ph.image
    dst = zarr.open(str(tmp_path / "lab.zarr"), mode="w", shape=ph.image.shape, chunks=(16, 32, 32), dtype="u1")
    pz = np.zeros(prob.shape, np.float32)
    out = segment.predict_blockwise(src, net, dst, probabilities=pz, block_shape=(16, 32, 32), progress=False)
    assert out is dst
    assert (dst[...] == whole).mean() > 0.999
    np.testing.assert_allclose(pz.sum(0), 1.0, atol=1e-4)
    assert (pz.argmax(0) == dst[...]).all()
    # a thin margin is an approximation of the whole-volume result, still close
    thin = segment.predict_blockwise(ph.image, net, block_shape=(16, 32, 32), margin=4, progress=False)
    assert 0.95 < (thin == whole).mean() < (dst[...] == whole).mean() + 1e-9


def test_predict_blockwise_validates(tiny_net):
    vol = np.random.default_rng(0).random((8, 16, 16)).astype(np.float32)
    with pytest.raises(ValueError, match=r"^volume: expected a 3D"):
        segment.predict_blockwise(vol[0], tiny_net, progress=False)
    with pytest.raises(ValueError, match=r"^out: shape"):
        segment.predict_blockwise(vol, tiny_net, np.zeros((8, 16, 15), np.uint8), progress=False)
    with pytest.raises(TypeError, match=r"^out: dtype float32"):
        segment.predict_blockwise(vol, tiny_net, np.zeros(vol.shape, np.float32), progress=False)
    with pytest.raises(ValueError, match=r"^probabilities"):
        segment.predict_blockwise(vol, tiny_net, probabilities=np.zeros((3,) + vol.shape, np.float32),
                                  progress=False)
    with pytest.raises(ValueError, match=r"^block_shape"):
        segment.predict_blockwise(vol, tiny_net, block_shape=(0, 8, 8), progress=False)
    bad = vol.copy()
    bad[7, 15, 15] = np.nan
    with pytest.raises(ValueError, match=r"^volume: contains NaN"):
        segment.predict_blockwise(bad, tiny_net, block_shape=4, margin=0, intensity_range=(0.0, 1.0),
                                  progress=False)
