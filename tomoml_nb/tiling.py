"""Tile-and-stitch for volumes that do not fit through a network at once.

Dense maps (probabilities, displacement fields, denoised images) are predicted on
overlapping patches and blended with Gaussian weights, accumulated on the CPU, so peak
memory follows the patch size, not the volume. The input may be any array that supports
slicing (numpy, zarr, dask, h5py datasets): only one patch is read at a time.

Examples
--------
>>> import numpy as np
>>> vol = np.random.default_rng(0).random((40, 40, 40)).astype(np.float32)
>>> out = sliding_window(vol, lambda p: p[None] * 2, patch_shape=(16, 16, 16), progress=False)
>>> out.shape, bool(np.allclose(out[0], vol * 2, atol=1e-5))
((1, 40, 40, 40), True)
"""
from __future__ import annotations

import itertools
from typing import Callable

import numpy as np

__all__ = ["patch_starts", "patch_grid", "gaussian_weight", "sliding_window"]


def patch_starts(size: int, patch: int, overlap: int) -> list[int]:
    """Start indices of patches of length ``patch`` covering ``[0, size)`` with at least ``overlap``.

    The last patch is aligned to the end, so every patch lies fully inside.

    Examples
    --------
    >>> patch_starts(100, 40, 10)
    [0, 30, 60]
    >>> patch_starts(30, 40, 10)
    [0]
    """
    if patch >= size:
        return [0]
    if overlap >= patch:
        raise ValueError(f"overlap: {overlap} must be smaller than the patch size {patch}")
    step = patch - overlap
    n = int(np.ceil((size - patch) / step)) + 1
    starts = np.linspace(0, size - patch, n).round().astype(int)
    return sorted(set(starts.tolist()))


def patch_grid(shape, patch_shape, overlap) -> list[tuple[slice, ...]]:
    """All patch slices (clipped to ``shape``) of a regular overlapping grid.

    Examples
    --------
    >>> len(patch_grid((64, 64), (32, 32), (8, 8)))
    9
    """
    shape = tuple(int(s) for s in shape)
    patch_shape = _per_axis(patch_shape, len(shape), "patch_shape")
    overlap = _per_axis(overlap, len(shape), "overlap")
    starts = [patch_starts(s, p, o) for s, p, o in zip(shape, patch_shape, overlap)]
    return [tuple(slice(a, min(a + p, s)) for a, p, s in zip(combo, patch_shape, shape))
            for combo in itertools.product(*starts)]


def _per_axis(value, ndim, name):
    if np.isscalar(value):
        value = (value,) * ndim
    value = tuple(int(v) for v in value)
    if len(value) != ndim:
        raise ValueError(f"{name}: expected {ndim} values, got {len(value)}")
    if any(v < 0 for v in value):
        raise ValueError(f"{name}: must be >= 0, got {value}")
    return value


def gaussian_weight(patch_shape, sigma_scale: float = 0.125, min_weight: float = 1e-3) -> np.ndarray:
    """Gaussian blending weight, 1 at the patch centre, ``sigma = sigma_scale * size`` per axis.

    Examples
    --------
    >>> w = gaussian_weight((8, 8))
    >>> float(w.max()), bool(w.min() > 0)
    (1.0, True)
    """
    grids = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in patch_shape], indexing="ij")
    w = np.ones(tuple(patch_shape), dtype=np.float64)
    for g, s in zip(grids, patch_shape):
        sigma = max(sigma_scale * s, 1e-6)
        w *= np.exp(-0.5 * ((g - (s - 1) / 2) / sigma) ** 2)
    w /= w.max()
    return np.maximum(w, min_weight).astype(np.float32)


def sliding_window(volume, fn: Callable, patch_shape, overlap=None, *, blend: str = "gaussian",
                   mask=None, out_channels: int | None = None, fill_value: float = 0.0,
                   progress: bool = True, desc: str = "patches") -> np.ndarray:
    """Apply ``fn`` patch by patch and blend the overlapping outputs.

    Parameters
    ----------
    volume : array_like, shape (*spatial) or (C, *spatial) when ``patch_shape`` has fewer axes
        Anything sliceable; patches are read with ``np.asarray(volume[slices])``.
    fn : callable ``patch -> (C, *patch_spatial)``
        The per-patch model, e.g. a network wrapped to take and return numpy.
    patch_shape : tuple of int
        Spatial patch size (clipped to the volume where larger).
    overlap : int or tuple, optional
        Overlap between neighbouring patches (default: a quarter of the patch).
    blend : {"gaussian", "constant"}
        Weighting of overlapping predictions.
    mask : array_like of bool, optional
        Patches without a single mask voxel are skipped and left at ``fill_value``.
    out_channels : int, optional
        Number of output channels; inferred from the first patch when omitted.

    Returns
    -------
    ndarray, shape (C, *spatial), float32
    """
    from tqdm.auto import tqdm

    from ._validate import check_choice

    check_choice(blend, "blend", ("gaussian", "constant"))
    shape = tuple(np.shape(volume))
    patch_shape = tuple(int(p) for p in patch_shape)
    n_sp = len(patch_shape)
    if len(shape) < n_sp:
        raise ValueError(f"patch_shape: {n_sp} axes for a volume of shape {shape}")
    spatial = shape[-n_sp:]
    if overlap is None:
        overlap = tuple(max(p // 4, 0) for p in patch_shape)
    overlap = _per_axis(overlap, n_sp, "overlap")
    patch_eff = tuple(min(p, s) for p, s in zip(patch_shape, spatial))
    overlap = tuple(min(o, max(p - 1, 0)) for o, p in zip(overlap, patch_eff))
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != spatial:
            raise ValueError(f"mask: shape {mask.shape} differs from the volume's spatial shape {spatial}")
    weight_full = gaussian_weight(patch_eff) if blend == "gaussian" else np.ones(patch_eff, np.float32)
    out = None
    wsum = np.zeros(spatial, dtype=np.float32)
    grid = patch_grid(spatial, patch_eff, overlap)
    for sl in tqdm(grid, desc=desc, disable=not progress or len(grid) < 4):
        if mask is not None and not mask[sl].any():
            continue
        patch = np.asarray(volume[(Ellipsis, *sl)])
        pred = np.asarray(fn(patch), dtype=np.float32)
        if pred.shape[-n_sp:] != patch.shape[-n_sp:]:
            raise ValueError(f"fn: returned shape {pred.shape} for a patch of shape {patch.shape}")
        if pred.ndim == n_sp:
            pred = pred[None]
        if out is None:
            c = out_channels if out_channels is not None else pred.shape[0]
            out = np.zeros((c, *spatial), dtype=np.float32)
        w = weight_full[tuple(slice(0, s.stop - s.start) for s in sl)]
        out[(slice(None), *sl)] += pred * w
        wsum[sl] += w
    if out is None:  # everything masked out
        c = out_channels if out_channels is not None else 1
        return np.full((c, *spatial), fill_value, dtype=np.float32)
    covered = wsum > 0
    out[:, covered] /= wsum[covered]
    out[:, ~covered] = fill_value
    return out
