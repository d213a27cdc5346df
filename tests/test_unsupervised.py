"""Tests of tomoml_nb.unsupervised (STEGO-style segmentation) and the Hungarian metrics."""
from __future__ import annotations

import numpy as np
import pytest

from tomoml_nb import metrics, phantoms, unsupervised as U


@pytest.fixture(scope="module")
def small():
    return phantoms.bone_implant((32, 32, 32), seed=3, degradation=0.6)


@pytest.fixture(scope="module")
def fitted(small):
    return U.fit(small.image, 5, head_steps=10, pool_size=16, batch_size=4, crop=32, progress=False, seed=0,
                 probe="codes")


# --------------------------------------------------------------------------- metrics
def test_hungarian_miou_is_permutation_invariant():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, (20, 20))
    perm = np.array([2, 0, 3, 1])
    assert metrics.hungarian_miou(perm[truth], truth) == 1.0
    assert metrics.hungarian_accuracy(perm[truth], truth) == 1.0


def test_hungarian_extra_clusters_counted_as_documented():
    truth = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    pred = np.array([5, 5, 5, 2, 1, 1, 1, 1])        # cluster 2 is an extra cluster inside class 0
    strict = metrics.hungarian_iou_per_class(pred, truth)
    assert strict.tolist() == [0.75, 1.0]             # extra cluster's voxel is a false negative of class 0
    assert metrics.hungarian_accuracy(pred, truth) == 7 / 8
    assert metrics.hungarian_miou(pred, truth, extra="majority") == 1.0
    mapping, conf = metrics.hungarian_match(pred, truth)
    assert mapping[5] == 0 and mapping[1] == 1 and mapping[2] == -1
    assert conf.shape == (2, 6)


def test_hungarian_beats_identity_mapping():
    truth = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([2, 2, 0, 0, 1, 0])
    assert metrics.mean_iou(pred, truth) == 0.0
    assert metrics.hungarian_miou(pred, truth) == pytest.approx((1 + 2 / 3 + 1 / 2) / 3)


def test_hungarian_bad_inputs():
    with pytest.raises(ValueError, match="^pred"):
        metrics.hungarian_miou([0, -1], [0, 1])
    with pytest.raises(ValueError, match="^pred.*shape"):
        metrics.hungarian_miou([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="^extra"):
        metrics.hungarian_miou([0, 1], [0, 1], extra="nope")
    with pytest.raises(ValueError, match="^pred"):
        metrics.hungarian_miou([0.5, 1], [0, 1])


# --------------------------------------------------------------------------- pipeline
def test_fit_predict_shapes_and_label_range(small, fitted):
    assert fitted.n_clusters == 5 and fitted.n_classes == 5
    lab = U.predict(fitted, small.image, crf=False, progress=False)
    assert lab.shape == small.image.shape and lab.dtype == np.uint8
    assert lab.max() < 5
    lab2d = U.predict(fitted, small.image[10], crf=True, progress=False)
    assert lab2d.shape == (32, 32)
    prob = U.predict_proba(fitted, small.image, axes=("z", "x"), progress=False)
    assert prob.shape == (5, 32, 32, 32)
    np.testing.assert_allclose(prob.sum(0), 1.0, atol=1e-4)


def test_deterministic_with_seed(small):
    kw = dict(head_steps=5, pool_size=12, batch_size=4, crop=32, progress=False, seed=7)
    a = U.fit(small.image, 3, **kw)
    b = U.fit(small.image, 3, **kw)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    np.testing.assert_array_equal(U.predict(a, small.image, crf=False, progress=False),
                                  U.predict(b, small.image, crf=False, progress=False))


def test_backbone_training_runs_and_changes_weights(small):
    import torch

    from tomoml_nb.models.stego import StegoNet

    torch.manual_seed(0)
    net = StegoNet(width=8, feat_dim=16, code_dim=8)
    before = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    net, hist = U.train_backbone(small.image, net=net, steps=3, crop=32, batch_size=2, progress=False)
    assert hist["steps"] == 3 and np.isfinite(hist["loss"]).all()
    after = net.backbone.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].dtype.is_floating_point)


def test_sinkhorn_equipartitions_prototypes():
    import torch

    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(2, 6, 4, 4, generator=g) * 3 + torch.arange(6.0).view(1, 6, 1, 1),
              torch.randn(2, 6, 4, 4, generator=g)]
    q = U._sinkhorn(logits, 0.3, n_iter=50)
    assert [t.shape for t in q] == [t.shape for t in logits]
    flat = torch.cat([t.permute(0, 2, 3, 1).reshape(-1, 6) for t in q])
    np.testing.assert_allclose(flat.sum(1).numpy(), 1.0, atol=1e-3)           # one unit per pixel
    np.testing.assert_allclose(flat.mean(0).numpy(), 1 / 6, atol=0.01)        # equal use of prototypes
    # plain softmax of the same logits is far from balanced (prototype 5 dominates)
    sm = torch.softmax(torch.cat([t.permute(0, 2, 3, 1).reshape(-1, 6) for t in logits]) / 0.3, 1)
    assert sm.mean(0).max() > 0.25 and sm.mean(0).min() < 0.1


def test_backbone_training_sinkhorn(small):
    kw = dict(steps=2, crop=32, batch_size=2, progress=False, centering="sinkhorn", seed=3,
              width=8, feat_dim=16, code_dim=8)
    a, ha = U.train_backbone(small.image, **kw)
    b, hb = U.train_backbone(small.image, **kw)
    assert np.isfinite(ha["loss"]).all() and ha["loss"] == hb["loss"]
    with pytest.raises(ValueError, match="^centering"):
        U.train_backbone(small.image, steps=1, crop=32, batch_size=2, progress=False, centering="swav")


def test_feature_probe_fit_predict_save_load(tmp_path, small):
    seg = U.fit(small.image, 5, probe="features", progress=False, seed=1)
    assert seg.space == "features" and "head" not in seg.history
    assert seg.centroids.shape == (5, seg.net.backbone.feat_dim) and seg.temperature > 0
    prob = U.predict_proba(seg, small.image, progress=False)
    np.testing.assert_allclose(prob.sum(0), 1.0, atol=1e-4)
    lab = U.predict(seg, small.image, crf=False, progress=False)
    assert lab.max() < 5
    # the bright screw and the dark background are found without labels
    assert metrics.hungarian_miou(lab, small.labels, 5) > 0.3
    back = U.load_model(U.save_model(seg, tmp_path / "f.pt"))
    assert back.space == "features" and back.temperature == pytest.approx(seg.temperature)
    np.testing.assert_array_equal(U.predict(back, small.image, crf=False, progress=False), lab)
    again = U.fit(small.image, 5, probe="features", progress=False, seed=1)
    np.testing.assert_array_equal(again.centroids, seg.centroids)
    # "auto" inherits the probe space of the backbone's segmenter
    assert U.fit(small.image, 5, progress=False, seed=1).space == U.load_pretrained().space
    assert U.fit(small.image, 3, backbone=U.fit(small.image, 3, head_steps=2, pool_size=8, batch_size=2, crop=32,
                                                 probe="codes", progress=False), head_steps=2, pool_size=8,
                 batch_size=2, crop=32, progress=False).space == "codes"
    with pytest.raises(ValueError, match="^probe"):
        U.fit(small.image, 5, probe="pixels", progress=False)
    with pytest.raises(ValueError, match="^space"):
        U.fit_probe(seg.net, small.image, 3, space="pixels")


def test_more_clusters_than_classes(small):
    seg = U.fit(small.image, 3, n_clusters=6, head_steps=5, pool_size=12, batch_size=4, crop=32, progress=False)
    assert seg.n_clusters == 6
    lab = U.predict(seg, small.image, crf=False, progress=False)
    assert lab.max() < 6


def test_pretrained_segmenter_beats_chance_on_held_out_phantom():
    ph = phantoms.bone_implant((48, 48, 48), seed=7301, degradation=0.6, degradation_seed=97)
    seg = U.load_pretrained()
    lab = U.predict(seg, ph.image, crf=False, progress=False)
    # 5 classes at these proportions: a random labelling scores about 0.1
    assert metrics.hungarian_miou(lab, ph.labels, 5, seg.n_clusters) > 0.3


def test_crf_cleans_isolated_errors():
    img = np.zeros((32, 32), np.float32)
    img[:, 16:] = 1.0
    truth = (img > 0.5).astype(int)
    prob = np.stack([1 - img, img]) * 0.8 + 0.1
    rng = np.random.default_rng(0)
    flip = rng.random(img.shape) < 0.08
    prob[:, flip] = prob[::-1][:, flip]               # salt-and-pepper mistakes
    noisy = prob.argmax(0)
    assert (noisy != truth).sum() > 20
    refined = U.crf_refine(prob, img, method="torch")
    assert (refined != truth).sum() < (noisy != truth).sum() / 4


@pytest.mark.skipif(not U.crf_available(), reason="optional pydensecrf2 not installed")
def test_pydensecrf_agrees_on_clean_case():
    img = np.zeros((24, 24), np.float32)
    img[:, 12:] = 1.0
    prob = np.stack([1 - img, img]) * 0.6 + 0.2
    assert (U.crf_refine(prob, img, method="pydensecrf") == (img > 0.5)).all()
    vol = np.stack([img] * 4)
    p3 = np.stack([1 - vol, vol]) * 0.6 + 0.2
    assert U.crf_refine(p3, vol, method="pydensecrf").shape == vol.shape


def test_baselines(small):
    lab = U.otsu_segment(small.image, 5)
    assert lab.max() == 4 and lab.shape == small.image.shape
    km = U.kmeans_segment(small.image, 5, features="intensity", n_samples=5000)
    assert metrics.hungarian_miou(km, small.labels, 5) > 0.4
    kf = U.kmeans_segment(small.image, 5, features="filters", n_samples=5000)
    assert kf.shape == small.image.shape


def test_save_load_roundtrip(tmp_path, small, fitted):
    p = U.save_model(fitted, tmp_path / "s.pt", note="test")
    seg = U.load_model(p)
    np.testing.assert_array_equal(seg.centroids, fitted.centroids)
    np.testing.assert_array_equal(U.predict(seg, small.image, crf=False, progress=False),
                                  U.predict(fitted, small.image, crf=False, progress=False))


# --------------------------------------------------------------------------- errors
def test_errors_name_the_parameter(small, fitted):
    with pytest.raises(ValueError, match="^n_classes"):
        U.fit(small.image, 1, progress=False)
    with pytest.raises(TypeError, match="^n_classes"):
        U.fit(small.image, 2.5, progress=False)
    with pytest.raises(ValueError, match="^n_clusters"):
        U.fit(small.image, 5, n_clusters=3, progress=False)
    with pytest.raises(ValueError, match="^images"):
        U.fit([], 3, progress=False)
    with pytest.raises(ValueError, match="^images"):
        U.fit(np.zeros((0, 16, 16)), 3, progress=False)
    bad = small.image.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="^images.*NaN"):
        U.fit(bad, 3, progress=False)
    with pytest.raises(ValueError, match="^images_or_volume.*NaN"):
        U.predict(fitted, bad, progress=False)
    with pytest.raises(ValueError, match="^images_or_volume"):
        U.predict(fitted, np.ones((16, 16)), progress=False)
    with pytest.raises(TypeError, match="^segmenter"):
        U.predict("not a segmenter object".split(), small.image)
    with pytest.raises(ValueError, match="^axes"):
        U.predict(fitted, small.image, axes=("w",), progress=False)
    with pytest.raises(ValueError, match="^backbone"):
        U.fit(small.image, 3, backbone="imagenet", progress=False)
    with pytest.raises(ValueError, match="^loss"):
        U.fit(small.image, 3, loss={"knn_shfit": 0.1}, progress=False)
    with pytest.raises(ValueError, match="^method"):
        U.crf_refine(np.ones((2, 8, 8)) / 2, np.zeros((8, 8)), method="dense")
    with pytest.raises(ValueError, match="^n_classes"):
        U.otsu_segment(small.image, 1)
    with pytest.raises(ValueError, match="^features"):
        U.kmeans_segment(small.image, 3, features="hog")


# --------------------------------------------------------------------------- review s5 (defect 8; nits)
def test_predict_axes_crf_method_and_crf_params_are_named(small, fitted):
    for axes in ((), [], ("z", "z"), ("z", "q")):
        with pytest.raises(ValueError, match=r"^axes"):
            U.predict(fitted, small.image, axes=axes, progress=False)
        with pytest.raises(ValueError, match=r"^axes"):
            U.predict_proba(fitted, small.image, axes=axes, progress=False)
    with pytest.raises(ValueError, match=r"^crf_method"):
        U.predict(fitted, small.image, crf_method="fast", progress=False)
    with pytest.raises(ValueError, match=r"^crf_params: unknown key.*'sxy'.*allowed keys: n_iter"):
        U.predict(fitted, small.image, crf_params={"sxy": 3}, progress=False)
    with pytest.raises(TypeError, match=r"^crf_params"):
        U.predict(fitted, small.image, crf_params=[("n_iter", 2)], progress=False)
    lab = U.predict(fitted, small.image[10], crf_params={"n_iter": 2, "window": 5}, progress=False)
    assert lab.shape == (32, 32)


def test_bool_images_are_taken_as_grey_values(small, fitted):
    mask = small.image > np.median(small.image)
    assert U.predict(fitted, mask, crf=False, progress=False).shape == mask.shape
    assert U.otsu_segment(mask[10], 2).shape == (32, 32)
    with pytest.raises(ValueError, match=r"^images_or_volume: all values are equal \(False\)"):
        U.predict(fitted, np.zeros((16, 16), bool), progress=False)


def test_soft_labels_give_hard_segmentations_to_the_crf():
    lab = np.array([[0, 1], [2, 1]])
    p = U.soft_labels(lab, 4, confidence=0.7)
    assert p.shape == (4, 2, 2) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(0), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(p.argmax(0), lab)
    with pytest.raises(ValueError, match=r"^n_classes"):
        U.soft_labels(lab, 2)
    with pytest.raises(ValueError, match=r"^confidence"):
        U.soft_labels(lab, 3, confidence=0.2)
    with pytest.raises(ValueError, match=r"^labels"):
        U.soft_labels(lab - 1)
    # a CRF on noisy hard labels of a clean two-region image removes the isolated errors
    img = np.zeros((1, 32, 32), np.float32)
    img[:, :, 16:] = 1.0
    truth = (img > 0.5).astype(np.uint8)
    noisy = truth.copy()
    rng = np.random.default_rng(0)
    flip = rng.random(truth.shape) < 0.05
    noisy[flip] = 1 - noisy[flip]
    refined = U.crf_refine(U.soft_labels(noisy, 2), img, method="torch")
    assert (refined != truth).mean() < 0.5 * (noisy != truth).mean()
