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
