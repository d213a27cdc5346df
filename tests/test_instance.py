"""Instance segmentation: EmbedSeg-style network, clustering, training, watershed baseline, metrics."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tomoml_nb import instance, metrics, phantoms
from tomoml_nb.models.embedseg import build_embedseg, split_outputs

#: AP@0.5 the shipped weights must reach on the small held-out phantom below (about half of what
#: they reach when shipped; see the model card) -- catches broken weights or a broken pipeline.
MIN_AP50 = 0.15


@pytest.fixture(scope="module")
def small():
    return phantoms.fibres((32, 64, 64), n_fibres=24, seed=7101, noise=0.05)


@pytest.fixture(scope="module")
def pretrained():
    return instance.load_pretrained()


# --------------------------------------------------------------------------- metrics
def test_matching_and_ap_definition():
    truth = np.array([0, 1, 1, 1, 1, 2, 2, 2, 3, 3])
    pred = np.array([0, 4, 4, 4, 0, 5, 5, 6, 0, 7])          # 1 ok (0.75), 2 ok (0.67), 3 at IoU 0.5
    m = metrics.match_instances(pred, truth, 0.5)
    assert (m["tp"], m["fp"], m["fn"]) == (3, 1, 0)
    assert m["ap"] == pytest.approx(3 / 4)
    ap = metrics.instance_ap(pred, truth, thresholds=(0.5, 0.7, 0.8))
    np.testing.assert_allclose(ap, [3 / 4, 1 / 6, 0.0])
    assert metrics.instance_ap(truth, truth).tolist() == [1.0] * 10


def test_seg_vi_and_merge_split_counts():
    truth = np.array([1, 1, 1, 1, 2, 2, 2, 2])
    merged = np.array([1, 1, 1, 1, 1, 1, 1, 1])
    split = np.array([1, 1, 2, 2, 3, 3, 3, 3])
    assert metrics.seg_score(truth, truth) == 1.0
    assert metrics.seg_score(merged, truth) == pytest.approx(0.5)      # both matched to one object, IoU 0.5 each
    s, m = metrics.variation_of_information(merged, truth)
    assert s == pytest.approx(0.0) and m == pytest.approx(1.0)
    s, m = metrics.variation_of_information(split, truth)
    assert s == pytest.approx(0.5) and m == pytest.approx(0.0)
    c = metrics.merge_split_counts(merged, truth)
    assert c["merged_pred"] == 1 and c["merged_truth"] == 2 and c["split_truth"] == 0
    c = metrics.merge_split_counts(split, truth)
    assert c["merged_pred"] == 0 and c["split_truth"] == 1


def test_metrics_reject_bad_labels():
    with pytest.raises(TypeError, match="^pred"):
        metrics.match_instances(np.array([0.5, 1.0]), np.array([0, 1]))
    with pytest.raises(ValueError, match="^truth"):
        metrics.instance_ap(np.array([0, 1]), np.array([-1, 1]))
    with pytest.raises(ValueError, match="^pred"):
        metrics.seg_score(np.array([0, 1, 1]), np.array([0, 1]))
    with pytest.raises(ValueError, match="^iou_threshold"):
        metrics.match_instances(np.array([0, 1]), np.array([0, 1]), 1.5)


# --------------------------------------------------------------------------- loss and clustering
def _raw_for(offsets, sigma, seed, fg, n_sigma, max_offset, sigma_scale):
    """Raw network outputs that produce the given heads (inverse of split_outputs)."""
    off = torch.atanh(torch.clamp(offsets / max_offset, -0.999, 0.999))
    sig = torch.log(sigma / sigma_scale)
    sd = torch.logit(torch.clamp(seed, 1e-4, 1 - 1e-4))
    return torch.cat([off, sig.expand(n_sigma, *off.shape[1:]), sd[None], fg[None]])[None]


def test_loss_prefers_embeddings_that_collapse_each_instance():
    cfg = build_embedseg({"base": 4, "levels": 2}).tomoml_config
    lab = torch.zeros(8, 8, 16, dtype=torch.long)
    lab[2:6, 2:6, 2:8] = 1
    lab[2:6, 2:6, 8:14] = 2                                   # two touching boxes
    zz, yy, xx = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in lab.shape], indexing="ij")
    coords = torch.stack([zz, yy, xx])
    good = torch.zeros(3, *lab.shape)
    for k in (1, 2):
        m = lab == k
        centre = coords[:, m].mean(1)
        good[:, m] = centre[:, None] - coords[:, m]
    sigma = torch.full((1, *lab.shape), 1.0)
    fg = (lab > 0).float() * 8 - 4
    seed = (lab > 0).float()
    raw_good = _raw_for(good, sigma, seed, fg, 3, cfg["max_offset"], cfg["sigma_scale"])
    raw_zero = _raw_for(torch.zeros_like(good), sigma, seed, fg, 3, cfg["max_offset"], cfg["sigma_scale"])
    lg, pg = instance.embedseg_loss(raw_good, lab[None], cfg)
    lz, pz = instance.embedseg_loss(raw_zero, lab[None], cfg)
    assert pg["inst"] < 0.05 < pz["inst"]
    assert lg < lz
    # and the clustering of the good heads recovers the two boxes exactly
    off, sig, sd, fgl = split_outputs(raw_good, 3, cfg["max_offset"], cfg["sigma_scale"])
    emb = (coords + off[0]).numpy()
    out = instance.cluster_embeddings(emb, sig[0].numpy(), sd[0, 0].numpy(), torch.sigmoid(fgl[0, 0]).numpy(),
                                      min_size=10)
    assert metrics.match_instances(out, lab.numpy(), 0.95)["tp"] == 2


def test_cluster_embeddings_validates_inputs():
    e = np.zeros((3, 4, 4, 4), np.float32)
    s = np.ones((1, 4, 4, 4), np.float32)
    v = np.ones((4, 4, 4), np.float32)
    with pytest.raises(ValueError, match="^embedding"):
        instance.cluster_embeddings(e[:2], s, v, v)
    with pytest.raises(ValueError, match="^sigma"):
        instance.cluster_embeddings(e, s[:, :2], v, v)
    with pytest.raises(ValueError, match="^seed_threshold"):
        instance.cluster_embeddings(e, s, v, v, seed_threshold=1.5)
    assert instance.cluster_embeddings(e, s, v, np.zeros_like(v)).max() == 0      # no foreground


def test_training_reduces_the_loss_and_roundtrips(tmp_path, small):
    torch.manual_seed(0)
    net = instance.train([small.image], [small.labels], config={"base": 4, "levels": 2}, patch_shape=(16, 32, 32),
                         batch_size=1, steps=30, lr=5e-3, voxel_size=(2.0, 1.0, 1.0), device="cpu", progress=False)
    loss = net.tomoml_history["loss"]
    assert np.mean(loss[-8:]) < np.mean(loss[:8])
    assert net.tomoml_voxel_size == (2.0, 1.0, 1.0)
    p = instance.save_model(net, tmp_path / "e.pt")
    again = instance.load_model(p)
    assert again.tomoml_voxel_size == (2.0, 1.0, 1.0) and tuple(again.tomoml_window) == (16, 32, 32)
    x = torch.rand(1, 1, 16, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), again(x))


def test_load_model_rejects_other_files(tmp_path):
    from tomoml_nb.weights import save_state

    p = save_state(tmp_path / "other.pt", format="demo.other/1", config={}, state_dict={})
    with pytest.raises(ValueError, match="^path"):
        instance.load_model(p)
    with pytest.raises(TypeError, match="^model"):
        instance.segment_instances(np.zeros((8, 8, 8)), model=3)


# --------------------------------------------------------------------------- segment_instances
def test_pretrained_segments_held_out_fibres(small, pretrained):
    lab = instance.segment_instances(small.image, pretrained, device="cpu", progress=False)
    assert lab.dtype == np.int32 and lab.shape == small.image.shape
    assert lab.min() == 0
    assert np.array_equal(np.unique(lab), np.arange(lab.max() + 1))            # unique, consecutive
    ap = metrics.match_instances(lab, small.labels, 0.5)["ap"]
    ws = instance.watershed_instances(small.image)
    ap_ws = metrics.match_instances(ws, small.labels, 0.5)["ap"]
    assert ap >= MIN_AP50 and ap > ap_ws


def test_tiled_matches_whole_on_a_volume_that_fits(small, pretrained):
    whole = instance.segment_instances(small.image, pretrained, tile_shape="whole", device="cpu", progress=False)
    # tiles a little smaller than the network window (32, 64, 64): four tiles, stitched
    tiled = instance.segment_instances(small.image, pretrained, tile_shape=(32, 56, 56), overlap=16,
                                       device="cpu", progress=False)
    assert tiled.dtype == np.int32
    assert np.array_equal(np.unique(tiled), np.arange(tiled.max() + 1))
    ap_w = metrics.match_instances(whole, small.labels, 0.5)["ap"]
    ap_t = metrics.match_instances(tiled, small.labels, 0.5)["ap"]
    # measured 0.28 vs 0.36: tiles smaller than the window the network was trained on cost accuracy
    assert ap_t >= ap_w - 0.12


def test_segment_instances_bad_inputs(pretrained):
    vol = np.random.default_rng(0).random((16, 32, 32)).astype(np.float32)
    with pytest.raises(ValueError, match="^volume"):
        instance.segment_instances(vol[0], pretrained)
    bad = vol.copy()
    bad[3, 3, 3] = np.nan
    with pytest.raises(ValueError, match="^volume"):
        instance.segment_instances(bad, pretrained, progress=False)
    with pytest.raises(ValueError, match="^overlap"):
        instance.segment_instances(vol, pretrained, tile_shape=(8, 16, 16), overlap=16, progress=False)
    with pytest.raises(ValueError, match="^tile_shape"):
        instance.segment_instances(vol, pretrained, tile_shape="all", progress=False)
    with pytest.raises(ValueError, match="^stitch"):
        instance.segment_instances(vol, pretrained, tile_shape=16, stitch="greedy", progress=False)
    # a tile larger than the volume is clipped to it (documented fallback)
    lab = instance.segment_instances(vol, pretrained, tile_shape=(64, 64, 64), progress=False)
    assert lab.shape == vol.shape and lab.dtype == np.int32


# --------------------------------------------------------------------------- baseline
def test_watershed_separates_two_touching_balls():
    zz, yy, xx = np.mgrid[:24, :24, :40]
    a = (zz - 12) ** 2 + (yy - 12) ** 2 + (xx - 12) ** 2 < 64
    b = (zz - 12) ** 2 + (yy - 12) ** 2 + (xx - 26) ** 2 < 64
    lab = instance.watershed_instances((a | b).astype(float), smooth=0, h=1.0)
    truth = a.astype(np.int32) + 2 * (b & ~a)
    assert metrics.match_instances(lab, truth, 0.8)["tp"] == 2
    with pytest.raises(ValueError, match="^h"):
        instance.watershed_instances((a | b).astype(float), h=0)
    with pytest.raises(ValueError, match="^volume"):
        instance.watershed_instances(np.zeros((4, 4)))


def test_zarr_in_and_out_give_the_numpy_result(small, pretrained):
    zarr = pytest.importorskip("zarr")
    src = zarr.zeros(small.image.shape, chunks=(16, 32, 32), dtype="f4")
    src[...] = small.image
    dst = zarr.zeros(small.image.shape, chunks=(16, 32, 32), dtype="i4")
    instance.segment_instances(src, pretrained, tile_shape=(32, 40, 40), out=dst, device="cpu", progress=False)
    ref = instance.segment_instances(small.image, pretrained, tile_shape=(32, 40, 40), device="cpu", progress=False)
    np.testing.assert_array_equal(np.asarray(dst[...]), ref)


# --------------------------------------------------------------------------- review s5 (defects 4, 12; nits)
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.float32])
def test_segment_instances_rejects_a_narrow_out_before_any_work(pretrained, monkeypatch, dtype):
    calls = []
    monkeypatch.setattr(instance, "_segment_block", lambda *a, **k: calls.append(1))
    vol = np.random.default_rng(0).random((16, 32, 32)).astype(np.float32)
    for tile_shape in (None, "whole", (16, 16, 16)):
        with pytest.raises(TypeError, match=r"^out: dtype"):
            instance.segment_instances(vol, pretrained, tile_shape=tile_shape, out=np.zeros(vol.shape, dtype),
                                       progress=False)
    with pytest.raises(ValueError, match=r"^out: shape"):
        instance.segment_instances(vol, pretrained, out=np.zeros((4, 4, 4), np.int32), progress=False)
    assert not calls


def test_segment_instances_writes_into_out_for_one_window_and_whole(small, pretrained):
    ref = instance.segment_instances(small.image, pretrained, device="cpu", progress=False)   # fits one window
    for tile_shape in (None, "whole"):
        out = np.full(small.image.shape, -5, np.int64)
        got = instance.segment_instances(small.image, pretrained, tile_shape=tile_shape, out=out, device="cpu",
                                         progress=False)
        assert got is out
        np.testing.assert_array_equal(out, ref)


def test_segment_instances_names_tile_shape_and_voxel_size(pretrained):
    vol = np.random.default_rng(0).random((16, 32, 32)).astype(np.float32)
    with pytest.raises(ValueError, match=r"^tile_shape"):
        instance.segment_instances(vol, pretrained, tile_shape=(16, 16), progress=False)
    with pytest.raises(ValueError, match=r"^overlap"):
        instance.segment_instances(vol, pretrained, tile_shape=16, overlap=(4, 4), progress=False)
    with pytest.raises(ValueError, match=r"^voxel_size"):
        instance.segment_instances(vol, pretrained, voxel_size=(1, 2), progress=False)
    with pytest.raises(ValueError, match=r"^voxel_size"):
        instance.watershed_instances(vol, voxel_size=(1, 2))
    with pytest.raises(ValueError, match=r"^voxel_size"):
        instance.object_sizes(np.ones((2, 2, 2), int), voxel_size=(1, 2))
    with pytest.raises(ValueError, match=r"^tile_shape") as exc:
        instance.segment_instances(vol, pretrained, tile_shape=np.array([4, 16, 16]), progress=False)
    assert "int64" not in str(exc.value) and "(4, 16, 16)" in str(exc.value)
    with pytest.raises(ValueError, match=r"^overlap") as exc:
        instance.segment_instances(vol, pretrained, tile_shape=np.array([8, 16, 16]), overlap=np.int64(16),
                                   progress=False)
    assert "int64" not in str(exc.value)


def test_train_rejects_labels_the_metrics_reject():
    ph = phantoms.fibres((16, 24, 24), n_fibres=4, seed=3)
    kw = dict(config={"base": 4, "levels": 2}, patch_shape=(16, 16, 16), steps=1, progress=False, device="cpu")
    with pytest.raises(ValueError, match=r"^labels\[0\]: labels must be >= 0"):
        instance.train([ph.image], [ph.labels.astype(np.int32) - 1], **kw)
    with pytest.raises(ValueError, match=r"^labels: no instance"):
        instance.train([ph.image, ph.image], [np.zeros(ph.image.shape, np.int32)] * 2, **kw)
    with pytest.raises(ValueError, match=r"^volumes: expected a 3D volume .* or a list"):
        instance.train(ph.image[0], ph.labels[0], **kw)
    with pytest.raises(ValueError, match=r"^patch_shape"):
        instance.train(ph.image, ph.labels, **{**kw, "patch_shape": (16, 16)})
