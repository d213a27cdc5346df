"""Tile-and-stitch of instance labels (tomoml_nb.tiling.label_tiles / stitch_labels / tile_cores)."""
from __future__ import annotations

import numpy as np
import pytest
from skimage.measure import label as cc_label

from tomoml_nb import phantoms
from tomoml_nb.metrics import match_instances
from tomoml_nb.tiling import label_tiles, stitch_labels, tile_cores


def pieces(tile):
    """A perfect per-tile labeller: the true labels cut into connected pieces inside the tile."""
    return cc_label(tile, background=0, connectivity=1).astype(np.int32)


def same_partition(a, b):
    """True when two label maps are equal up to renumbering."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


@pytest.fixture(scope="module")
def fibres():
    return phantoms.fibres((24, 64, 64), n_fibres=30, seed=21).labels


@pytest.mark.parametrize("shape,tile,overlap", [((50, 61, 40), (16, 20, 40), (4, 6, 0)),
                                                ((30, 30, 30), (32, 8, 12), 3), ((9, 100, 7), 9, 2)])
def test_cores_partition_the_volume(shape, tile, overlap):
    count = np.zeros(shape, int)
    for t, c in tile_cores(shape, tile, overlap):
        for ts, cs in zip(t, c):
            assert ts.start <= cs.start < cs.stop <= ts.stop
        count[c] += 1
    assert (count == 1).all()


def test_perfect_labeller_is_stitched_back_exactly(fibres):
    # every fibre crosses several tiles; each one must get exactly one label again
    out = label_tiles(fibres, pieces, (16, 24, 24), 8, progress=False)
    assert out.dtype == np.int32
    assert same_partition(out, fibres)
    assert np.array_equal(np.unique(out), np.arange(out.max() + 1))


def test_touching_rods_inconsistent_contact_naive_merges_ours_does_not():
    shape = (8, 20, 96)
    truth = np.zeros(shape, np.int32)
    truth[2:6, 4:9, :] = 1
    truth[2:6, 9:14, :] = 2                                    # rod 2 touches rod 1 along its length

    def wobbly(tile_labels_origin):
        # each tile disagrees by one voxel about the contact: the boundary row goes to rod 1
        # in some tiles and to rod 2 in others, as two runs of a real network would
        def lab(t):
            out = t.copy()
            if lab.calls % 2:
                out[(t == 2) & (np.roll(t, 1, axis=1) == 1)] = 1
            lab.calls += 1
            return out
        lab.calls = 0
        return lab

    ours = label_tiles(truth, wobbly(None), (8, 20, 32), 12, progress=False)
    naive = label_tiles(truth, wobbly(None), (8, 20, 32), 12, stitch="naive", progress=False)
    assert len(np.unique(ours)) - 1 == 2
    assert match_instances(ours, truth, 0.9)["tp"] == 2
    assert len(np.unique(naive)) - 1 == 1                    # the published failure


def test_no_chain_merge_through_a_tile_that_merged_two_fibres():
    truth = np.zeros((6, 16, 120), np.int32)
    truth[1:5, 2:7, :] = 1
    truth[1:5, 7:12, :] = 2
    layout = tile_cores(truth.shape, (6, 16, 32), 8)
    tiles = []
    for i, (t, _) in enumerate(layout):
        lab = truth[t].copy()
        if i == 2:                                             # one tile's labeller merges the two rods
            lab[lab == 2] = 1
        tiles.append(lab)
    out = stitch_labels(truth.shape, tiles, (6, 16, 32), 8, progress=False)
    bad_core = layout[2][1]
    outside = np.ones(truth.shape, bool)
    outside[bad_core] = False
    # outside the faulty tile's core the two rods keep different labels
    a = np.unique(out[outside & (truth == 1)])
    b = np.unique(out[outside & (truth == 2)])
    assert not set(a.tolist()) & set(b.tolist())


def test_zarr_input_and_output_match_numpy(fibres):
    zarr = pytest.importorskip("zarr")
    src = zarr.zeros(fibres.shape, chunks=(8, 32, 32), dtype="i4")
    src[...] = fibres
    dst = zarr.zeros(fibres.shape, chunks=(8, 32, 32), dtype="i4")
    label_tiles(src, pieces, (16, 32, 32), 8, out=dst, progress=False)
    ref = label_tiles(fibres, pieces, (16, 32, 32), 8, progress=False)
    np.testing.assert_array_equal(np.asarray(dst[...]), ref)


def test_tile_larger_than_volume_falls_back_to_one_tile(fibres):
    out = label_tiles(fibres, pieces, (100, 100, 100), 10, progress=False)
    assert same_partition(out, pieces(fibres))


def test_bad_inputs_name_the_parameter(fibres):
    with pytest.raises(ValueError, match="^overlap"):
        label_tiles(fibres, pieces, (16, 16, 16), 16, progress=False)
    with pytest.raises(ValueError, match="^stitch"):
        label_tiles(fibres, pieces, 16, 4, stitch="greedy", progress=False)
    with pytest.raises(ValueError, match="^labeller"):
        label_tiles(fibres, lambda t: t[:-1], 16, 4, progress=False)
    with pytest.raises(TypeError, match="^labeller"):
        label_tiles(fibres, lambda t: t.astype(float), 16, 4, progress=False)
    with pytest.raises(TypeError, match="^labeller"):
        label_tiles(fibres, "pieces", 16, 4, progress=False)
    with pytest.raises(ValueError, match="^iou_threshold"):
        label_tiles(fibres, pieces, 16, 4, iou_threshold=0, progress=False)
    with pytest.raises(ValueError, match="^out"):
        label_tiles(fibres, pieces, 16, 4, out=np.zeros((2, 2, 2), np.int32), progress=False)
    with pytest.raises(ValueError, match="^tile_labels"):
        stitch_labels(fibres.shape, [fibres], (16, 16, 16), 4)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.uint16, np.float32, np.float64, bool])
def test_out_dtype_that_cannot_hold_labels_is_rejected_before_any_work(fibres, dtype):
    # review s5 defect 4: uint8 out wrapped 800 objects to 195 labels, float32 crashed after the work
    calls = []

    def labeller(t):
        calls.append(1)
        return pieces(t)

    with pytest.raises(TypeError, match=r"^out: dtype"):
        label_tiles(fibres, labeller, (16, 24, 24), 8, out=np.zeros(fibres.shape, dtype), progress=False)
    tiles = [fibres[t] for t, _ in tile_cores(fibres.shape, (16, 24, 24), 8)]
    with pytest.raises(TypeError, match=r"^out: dtype"):
        stitch_labels(fibres.shape, tiles, (16, 24, 24), 8, out=np.zeros(fibres.shape, dtype), progress=False)
    assert not calls


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint32])
def test_out_of_a_wide_integer_dtype_is_filled(fibres, dtype):
    ref = label_tiles(fibres, pieces, (16, 24, 24), 8, progress=False)
    out = np.zeros(fibres.shape, dtype)
    assert label_tiles(fibres, pieces, (16, 24, 24), 8, out=out, progress=False) is out
    np.testing.assert_array_equal(out, ref)


def test_iou_threshold_and_negative_labels_are_named(fibres):
    with pytest.raises(TypeError, match=r"^iou_threshold"):
        label_tiles(fibres, pieces, 16, 4, iou_threshold="high", progress=False)
    with pytest.raises(TypeError, match=r"^iou_threshold"):
        label_tiles(fibres, pieces, 16, 4, iou_threshold=None, progress=False)
    with pytest.raises(ValueError, match=r"^labeller: returned negative"):
        label_tiles(fibres, lambda t: pieces(t) - 1, 16, 4, progress=False)
    tiles = [fibres[t] - 1 for t, _ in tile_cores(fibres.shape, (16, 24, 24), 8)]
    with pytest.raises(ValueError, match=r"^tile_labels\[0\]: labels must be >= 0"):
        stitch_labels(fibres.shape, tiles, (16, 24, 24), 8, progress=False)
