"""Image-quality and segmentation metrics shared by every method.

All functions take numpy arrays of equal shape, validate them, and return floats or
numpy arrays. Method-specific metrics (endpoint error, instance AP, Hungarian mIoU...)
are added here by the method issues so that notebooks and benchmarks share one
definition.

Examples
--------
>>> import numpy as np
>>> a = np.zeros((8, 8)); b = a.copy(); b[0, 0] = 1
>>> round(rmse(a, b), 3)
0.125
"""
from __future__ import annotations

import numpy as np

from ._validate import as_array, check_same_shape

__all__ = ["rmse", "psnr", "ssim", "correlation", "confusion_matrix", "iou_per_class", "dice_per_class"]


def _pair(x, y, name_x, name_y):
    x = as_array(x, name_x, dtype=np.float64)
    y = as_array(y, name_y, dtype=np.float64)
    check_same_shape(x, y, name_x, name_y)
    return x, y


def rmse(estimate, reference, mask=None) -> float:
    """Root-mean-square error between ``estimate`` and ``reference`` (inside ``mask``).

    Examples
    --------
    >>> rmse([1.0, 2.0], [1.0, 4.0])
    1.4142135623730951
    """
    x, y = _pair(estimate, reference, "estimate", "reference")
    if mask is not None:
        mask = as_array(mask, "mask").astype(bool)
        check_same_shape(x, mask, "estimate", "mask")
        x, y = x[mask], y[mask]
    return float(np.sqrt(np.mean((x - y) ** 2)))


def psnr(estimate, reference, data_range=None) -> float:
    """Peak signal-to-noise ratio in dB; ``data_range`` defaults to the reference's range.

    Examples
    --------
    >>> round(psnr([0.0, 1.0, 0.5], [0.0, 1.0, 0.6]), 2)
    24.77
    """
    x, y = _pair(estimate, reference, "estimate", "reference")
    if data_range is None:
        data_range = float(np.ptp(y))
    if data_range <= 0:
        raise ValueError("data_range: must be > 0 (the reference is constant; pass data_range)")
    mse = np.mean((x - y) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(data_range ** 2 / mse))


def ssim(estimate, reference, data_range=None, **kwargs) -> float:
    """Structural similarity (scikit-image implementation), 2D or 3D, greyscale.

    Examples
    --------
    >>> import numpy as np
    >>> img = np.random.default_rng(0).random((32, 32))
    >>> ssim(img, img)
    1.0
    """
    from skimage.metrics import structural_similarity

    x, y = _pair(estimate, reference, "estimate", "reference")
    if data_range is None:
        data_range = float(np.ptp(y))
    if data_range <= 0:
        raise ValueError("data_range: must be > 0 (the reference is constant; pass data_range)")
    return float(structural_similarity(x, y, data_range=data_range, **kwargs))


def correlation(estimate, reference) -> float:
    """Pearson correlation coefficient of two images.

    Examples
    --------
    >>> correlation([1, 2, 3], [2, 4, 6])
    1.0
    """
    x, y = _pair(estimate, reference, "estimate", "reference")
    x, y = x.ravel() - x.mean(), y.ravel() - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    if denom == 0:
        raise ValueError("estimate: correlation undefined for a constant image")
    return float(np.clip((x * y).sum() / denom, -1.0, 1.0))


def confusion_matrix(pred, truth, n_classes=None) -> np.ndarray:
    """Confusion matrix ``C[i, j]`` = number of voxels of true class ``i`` predicted as ``j``.

    Examples
    --------
    >>> confusion_matrix([0, 1, 1], [0, 1, 0])
    array([[1, 1],
           [0, 1]])
    """
    p = as_array(pred, "pred")
    t = as_array(truth, "truth")
    check_same_shape(t, p, "truth", "pred")
    if p.dtype.kind == "f" or t.dtype.kind == "f":
        if not (np.all(p == np.round(p)) and np.all(t == np.round(t))):
            raise ValueError("pred: labels must be integers")
    p, t = p.astype(np.int64).ravel(), t.astype(np.int64).ravel()
    if p.min() < 0 or t.min() < 0:
        raise ValueError("pred: labels must be >= 0")
    n = int(max(p.max(), t.max()) + 1) if n_classes is None else int(n_classes)
    if p.max() >= n or t.max() >= n:
        raise ValueError(f"n_classes: labels up to {max(p.max(), t.max())} do not fit {n} classes")
    return np.bincount(t * n + p, minlength=n * n).reshape(n, n)


def iou_per_class(pred, truth, n_classes=None) -> np.ndarray:
    """Intersection over union per class (NaN for a class absent from both).

    Examples
    --------
    >>> iou_per_class([0, 1, 1, 1], [0, 1, 1, 0])
    array([0.5       , 0.66666667])
    """
    c = confusion_matrix(pred, truth, n_classes).astype(np.float64)
    tp = np.diag(c)
    union = c.sum(0) + c.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def dice_per_class(pred, truth, n_classes=None) -> np.ndarray:
    """Dice coefficient per class (NaN for a class absent from both).

    Examples
    --------
    >>> dice_per_class([0, 1, 1, 1], [0, 1, 1, 0])
    array([0.66666667, 0.8       ])
    """
    c = confusion_matrix(pred, truth, n_classes).astype(np.float64)
    tp = np.diag(c)
    denom = c.sum(0) + c.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / denom, np.nan)


# --------------------------------------------------------------------------- semantic segmentation (issue 5)
__all__ += ["mean_iou"]


def mean_iou(pred, truth, n_classes=None, ignore_index=None) -> float:
    """Mean of :func:`iou_per_class` over the classes present in ``truth`` or ``pred``.

    Parameters
    ----------
    pred, truth : array_like of int
        Predicted and true labels, same shape.
    n_classes : int, optional
        Number of classes (default: largest label + 1).
    ignore_index : int, optional
        Voxels whose true label equals this value (e.g. ``-1`` = unlabelled) are left out.

    Examples
    --------
    >>> mean_iou([0, 1, 1, 1], [0, 1, 1, 0])
    0.5833333333333333
    >>> mean_iou([0, 1, 0], [0, 1, -1], ignore_index=-1)
    1.0
    """
    if ignore_index is not None:
        p = as_array(pred, "pred")
        t = as_array(truth, "truth")
        check_same_shape(t, p, "truth", "pred")
        keep = t != ignore_index
        pred, truth = p[keep], t[keep]
    iou = iou_per_class(pred, truth, n_classes)
    if not np.isfinite(iou).any():
        raise ValueError("truth: no class present; mean IoU is undefined")
    return float(np.nanmean(iou))


# --------------------------------------------------------------------------- virtual histology (issue 7)
__all__ += ["ssim_rgb", "psnr_rgb", "sliced_wasserstein", "texture_distance"]


def _rgb_pair(x, y, name_x="estimate", name_y="reference"):
    x = as_array(x, name_x, ndim=3, dtype=np.float64)
    y = as_array(y, name_y, ndim=3, dtype=np.float64)
    check_same_shape(x, y, name_x, name_y)
    if x.shape[-1] not in (3, 4):
        raise ValueError(f"{name_x}: expected an RGB image (H, W, 3), got shape {x.shape}")
    return x[..., :3], y[..., :3]


def ssim_rgb(estimate, reference, data_range=1.0, **kwargs) -> float:
    """Structural similarity of two colour images (scikit-image, mean over R, G, B).

    Parameters
    ----------
    estimate, reference : array_like (H, W, 3)
        RGB images (float in [0, 1] by default).
    data_range : float
        Value range (1 for float images in [0, 1], 255 for 8-bit).

    Examples
    --------
    >>> rgb = np.random.default_rng(0).random((32, 32, 3))
    >>> ssim_rgb(rgb, rgb)
    1.0
    """
    from skimage.metrics import structural_similarity

    x, y = _rgb_pair(estimate, reference)
    if not data_range > 0:
        raise ValueError(f"data_range: must be > 0, got {data_range!r}")
    return float(structural_similarity(x, y, data_range=data_range, channel_axis=-1, **kwargs))


def psnr_rgb(estimate, reference, data_range=1.0) -> float:
    """Peak signal-to-noise ratio (dB) of two colour images, over all channels.

    Examples
    --------
    >>> a = np.zeros((4, 4, 3)); b = a.copy(); b[0, 0, 0] = 0.1
    >>> round(psnr_rgb(b, a), 2)
    36.81
    """
    x, y = _rgb_pair(estimate, reference)
    if not data_range > 0:
        raise ValueError(f"data_range: must be > 0, got {data_range!r}")
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(data_range ** 2 / mse))


def _pixels(img, name):
    a = as_array(img, name, ndim=(2, 3), dtype=np.float64)
    if a.ndim == 3 and a.shape[-1] not in (3, 4):
        raise ValueError(f"{name}: expected an image (H, W, 3) or pixels (N, 3), got shape {a.shape}")
    if a.ndim == 2 and a.shape[-1] not in (3, 4):
        raise ValueError(f"{name}: expected pixels (N, 3) or an image (H, W, 3), got shape {a.shape}")
    return a.reshape(-1, a.shape[-1])[:, :3]


def sliced_wasserstein(estimate, reference, n_projections=64, seed=0, n_quantiles=256) -> float:
    """Distance between the colour distributions of two images (sliced Wasserstein-1).

    The RGB pixels of each image form a point cloud; both clouds are projected
    on ``n_projections`` random directions (plus the R, G, B axes) and the 1D
    Wasserstein-1 distances (mean absolute difference of quantiles) are
    averaged. Pixel positions are ignored: it asks "are these the right
    colours in the right proportions?", which SSIM/PSNR on unpaired or slightly
    misregistered images cannot. Images may differ in size. 0 = identical
    distributions; in colour units (e.g. 0.05 = 5 % of the range).

    Parameters
    ----------
    estimate, reference : array_like (H, W, 3) or (N, 3)
        Images or pixel lists.
    n_projections : int
        Random projection directions.
    seed : int
        Seed of the directions.
    n_quantiles : int
        Quantiles compared per direction.

    Examples
    --------
    >>> rgb = np.random.default_rng(0).random((32, 32, 3))
    >>> sliced_wasserstein(rgb, rgb)
    0.0
    >>> round(sliced_wasserstein(rgb, np.clip(rgb + 0.1, 0, 1)), 2) > 0
    True
    """
    x = _pixels(estimate, "estimate")
    y = _pixels(reference, "reference")
    from ._validate import check_positive

    n_projections = check_positive(n_projections, "n_projections", integer=True)
    n_quantiles = check_positive(n_quantiles, "n_quantiles", integer=True)
    rng = np.random.default_rng(seed)
    d = rng.standard_normal((n_projections, 3))
    d = np.concatenate([np.eye(3), d / np.linalg.norm(d, axis=1, keepdims=True)])
    q = (np.arange(n_quantiles) + 0.5) / n_quantiles
    px = np.quantile(x @ d.T, q, axis=0)
    py = np.quantile(y @ d.T, q, axis=0)
    return float(np.mean(np.abs(px - py)))


def _random_filters(n_filters, kernel, channels, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_filters, kernel, kernel, channels))
    w -= w.mean(axis=(1, 2, 3), keepdims=True)                   # texture, not mean colour
    w /= np.linalg.norm(w.reshape(n_filters, -1), axis=1).reshape(-1, 1, 1, 1)
    return w.reshape(n_filters, -1)


def _gram(img, filters, kernel):
    from numpy.lib.stride_tricks import sliding_window_view

    patches = sliding_window_view(img, (kernel, kernel), axis=(0, 1))        # (h, w, C, k, k)
    patches = np.moveaxis(patches, 2, -1).reshape(-1, kernel * kernel * img.shape[-1])
    f = np.maximum(patches @ filters.T, 0.0)                                 # ReLU features (N, F)
    return f.T @ f / f.shape[0]


def texture_distance(estimate, reference, n_filters=32, kernel=5, scales=(1, 2, 4), seed=0) -> float:
    """Texture dissimilarity from Gram matrices of fixed random convolution features.

    A Gatys-style texture statistic that needs no downloaded network: each image
    (RGB or grey) is filtered at several scales (block-mean down-sampling by
    ``scales``) with the same ``n_filters`` random zero-mean ``kernel`` x
    ``kernel`` filters (seeded, hence fixed) followed by a ReLU; the Gram matrix
    of the feature maps (feature co-activation averaged over positions)
    summarises the texture regardless of where it is. Random shallow filters
    have been shown to capture texture statistics well (Ustyuzhaninov et al.,
    2016). The distance is the Frobenius norm of the Gram difference relative
    to the reference's, averaged over scales: 0 = same texture statistics;
    blurry predictions (texture too weak) and noisy ones (too strong) both score
    high. Images may differ in size.

    Parameters
    ----------
    estimate, reference : array_like (H, W) or (H, W, C)
        Images with the same number of channels.
    n_filters, kernel : int
        Random filters and their size.
    scales : sequence of int
        Down-sampling factors.
    seed : int
        Seed of the filters.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> a = rng.random((48, 48, 3)); b = rng.random((48, 48, 3))
    >>> smooth = np.full((48, 48, 3), 0.5)
    >>> texture_distance(a, b) < texture_distance(smooth + 0.01 * a, b)
    True
    """
    x = as_array(estimate, "estimate", ndim=(2, 3), dtype=np.float64)
    y = as_array(reference, "reference", ndim=(2, 3), dtype=np.float64)
    x = x[..., None] if x.ndim == 2 else x
    y = y[..., None] if y.ndim == 2 else y
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"reference: {y.shape[-1]} channel(s), estimate has {x.shape[-1]}")
    from ._validate import check_positive

    n_filters = check_positive(n_filters, "n_filters", integer=True)
    kernel = check_positive(kernel, "kernel", integer=True)
    scales = [check_positive(s, "scales", integer=True) for s in np.atleast_1d(scales).tolist()]
    filters = _random_filters(n_filters, kernel, x.shape[-1], seed)
    out = []
    for s in scales:
        xs, ys = x, y
        if s > 1:
            xs = x[: x.shape[0] // s * s, : x.shape[1] // s * s].reshape(x.shape[0] // s, s, x.shape[1] // s, s, -1)
            ys = y[: y.shape[0] // s * s, : y.shape[1] // s * s].reshape(y.shape[0] // s, s, y.shape[1] // s, s, -1)
            xs, ys = xs.mean(axis=(1, 3)), ys.mean(axis=(1, 3))
        if min(xs.shape[:2] + ys.shape[:2]) < kernel:
            continue
        gx, gy = _gram(xs, filters, kernel), _gram(ys, filters, kernel)
        out.append(np.linalg.norm(gx - gy) / max(np.linalg.norm(gy), 1e-12))
    if not out:
        raise ValueError(f"estimate: images too small for kernel {kernel} at scales {scales}")
    return float(np.mean(out))
