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
