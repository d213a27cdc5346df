from __future__ import annotations

import numpy as np
import pytest

from tomoml_nb.tiling import gaussian_weight, patch_grid, patch_starts, sliding_window


def test_patch_starts_cover_and_overlap():
    for size, patch, ov in [(100, 40, 10), (64, 64, 8), (65, 32, 8), (10, 32, 8)]:
        starts = patch_starts(size, patch, ov)
        covered = np.zeros(size, bool)
        for s in starts:
            covered[s:s + patch] = True
            assert s + min(patch, size) <= size
        assert covered.all()
        for a, b in zip(starts, starts[1:]):
            assert a + patch - b >= ov


def test_identity_is_reproduced_exactly_with_blending():
    vol = np.random.default_rng(1).random((37, 50, 29)).astype(np.float32)
    for blend in ("gaussian", "constant"):
        out = sliding_window(vol, lambda p: np.stack([p, -p]), (16, 20, 16), overlap=5, blend=blend,
                             progress=False)
        np.testing.assert_allclose(out[0], vol, atol=1e-5)
        np.testing.assert_allclose(out[1], -vol, atol=1e-5)


def test_mask_skips_patches_and_fills():
    vol = np.ones((32, 32, 32), np.float32)
    mask = np.zeros_like(vol, bool)
    mask[:8, :8, :8] = True
    calls = []

    def fn(p):
        calls.append(p.shape)
        return p[None]

    out = sliding_window(vol, fn, (16, 16, 16), overlap=4, mask=mask, fill_value=np.nan, progress=False)
    assert len(calls) == 1 and np.isnan(out[0, -1, -1, -1]) and out[0, 0, 0, 0] == 1


def test_channel_first_input_and_zarr():
    import zarr

    z = zarr.open(zarr.storage.MemoryStore(), mode="w", shape=(2, 24, 24, 24), chunks=(2, 8, 8, 8), dtype="f4")
    data = np.random.default_rng(0).random((2, 24, 24, 24)).astype(np.float32)
    z[:] = data
    out = sliding_window(z, lambda p: p.sum(0, keepdims=True), (12, 12, 12), progress=False)
    np.testing.assert_allclose(out[0], data.sum(0), atol=1e-5)


def test_weights_and_errors():
    w = gaussian_weight((9, 9, 9))
    assert w[4, 4, 4] == 1 and w[0, 0, 0] < w[4, 4, 0]
    assert len(patch_grid((10, 10), (4, 4), 1)) == 9
    with pytest.raises(ValueError, match="overlap"):
        patch_starts(100, 10, 10)
    with pytest.raises(ValueError, match="mask"):
        sliding_window(np.zeros((8, 8)), lambda p: p, (4, 4), mask=np.ones((4, 4)))
    with pytest.raises(ValueError, match="fn: returned shape"):
        sliding_window(np.zeros((8, 8)), lambda p: p[:2], (4, 4), progress=False)
    with pytest.raises(ValueError, match="blend"):
        sliding_window(np.zeros((8, 8)), lambda p: p, (4, 4), blend="max")


def test_blockwise_equals_a_local_filter_and_writes_into_out(tmp_path):
    import zarr
    from scipy import ndimage as ndi

    from tomoml_nb.tiling import block_grid, blockwise

    vol = np.random.default_rng(2).random((21, 30, 17)).astype(np.float32)
    ref = ndi.uniform_filter(vol, 5)
    for block in ((8, 8, 8), (21, 30, 17), 5):
        res = blockwise(vol, lambda b: ndi.uniform_filter(b, 5), block, margin=2, progress=False)
        np.testing.assert_allclose(res, ref, atol=1e-6)
    # too little context is visible at block faces
    assert not np.allclose(blockwise(vol, lambda b: ndi.uniform_filter(b, 5), 8, margin=1, progress=False), ref)
    # channels and a zarr output
    z = zarr.open(str(tmp_path / "o.zarr"), mode="w", shape=(2,) + vol.shape, chunks=(1, 8, 8, 8), dtype="f4")
    assert blockwise(vol, lambda b: np.stack([b, -b]), (8, 16, 16), out=z, progress=False) is z
    np.testing.assert_array_equal(z[1], -vol)
    # every voxel belongs to exactly one core
    count = np.zeros(vol.shape, int)
    for read, core, local in block_grid(vol.shape, (8, 7, 9), 3):
        count[core] += 1
        assert all(r.start <= c.start and c.stop <= r.stop for r, c in zip(read, core))
    assert (count == 1).all()


def test_blockwise_and_robust_range_validate():
    from tomoml_nb.tiling import blockwise, robust_range

    vol = np.zeros((6, 6, 6), np.float32)
    with pytest.raises(ValueError, match=r"^fn: returned shape"):
        blockwise(vol, lambda b: b[:-1], 3, progress=False)
    with pytest.raises(ValueError, match=r"^out: shape"):
        blockwise(vol, lambda b: b, 3, out=np.zeros((6, 6, 5)), progress=False)
    with pytest.raises(ValueError, match=r"^block_shape"):
        blockwise(vol, lambda b: b, (3, 0, 3), progress=False)
    with pytest.raises(ValueError, match=r"^margin"):
        blockwise(vol, lambda b: b, 3, margin=-1, progress=False)
    with pytest.raises(TypeError, match=r"^fn"):
        blockwise(vol, None, 3, progress=False)
    assert robust_range(vol) == (0.0, 1.0)                      # constant: a unit range, no division by zero
    vol[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"^volume: contains NaN"):
        robust_range(vol)
