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


# --------------------------------------------------------------------------- unsupervised segmentation (issue 6)
__all__ += ["hungarian_match", "hungarian_iou_per_class", "hungarian_miou", "hungarian_accuracy"]

_EXTRA = ("unmatched", "majority")


def hungarian_match(pred, truth, n_classes=None, n_clusters=None, extra="unmatched"):
    """Match unsupervised clusters to true classes (Hungarian algorithm).

    Cluster ids carry no meaning, so an unsupervised segmentation is scored
    after a one-to-one assignment of clusters to classes that maximises the
    number of correctly labelled voxels (the linear-sum assignment on the
    confusion matrix, as in unsupervised segmentation papers). More clusters
    than classes are allowed; what happens to the clusters left without a class
    is set by ``extra``:

    * ``"unmatched"`` (strict, the default): they stay unmatched -- their voxels
      count as wrong for every class (a false negative of their true class and a
      false positive of none);
    * ``"majority"`` (lenient): after the one-to-one matching each remaining
      cluster is merged into the class it overlaps most (many-to-one).

    Parameters
    ----------
    pred : array_like of int
        Cluster labels (>= 0), any shape.
    truth : array_like of int
        True class labels (>= 0), same shape.
    n_classes, n_clusters : int, optional
        Number of classes / clusters (default: largest label + 1).
    extra : {"unmatched", "majority"}
        How clusters beyond the number of classes are counted.

    Returns
    -------
    mapping : ndarray of int, shape (n_clusters,)
        Class assigned to each cluster, -1 for an unmatched cluster.
    confusion : ndarray, shape (n_classes, n_clusters)
        ``confusion[i, j]`` = voxels of class ``i`` in cluster ``j``.

    Examples
    --------
    >>> mapping, _ = hungarian_match([2, 2, 0, 1], [0, 0, 1, 1])
    >>> mapping.tolist()
    [1, -1, 0]
    >>> hungarian_match([2, 2, 0, 1], [0, 0, 1, 1], extra="majority")[0].tolist()
    [1, 1, 0]
    """
    from scipy.optimize import linear_sum_assignment

    from ._validate import check_choice

    check_choice(extra, "extra", _EXTRA)
    p = as_array(pred, "pred")
    t = as_array(truth, "truth")
    check_same_shape(t, p, "truth", "pred")
    for arr, nm in ((p, "pred"), (t, "truth")):
        if arr.dtype.kind == "f" and not np.all(arr == np.round(arr)):
            raise ValueError(f"{nm}: labels must be integers")
        if arr.min() < 0:
            raise ValueError(f"{nm}: labels must be >= 0")
    p, t = p.astype(np.int64).ravel(), t.astype(np.int64).ravel()
    nc = int(t.max() + 1) if n_classes is None else int(n_classes)
    nk = int(p.max() + 1) if n_clusters is None else int(n_clusters)
    if t.max() >= nc:
        raise ValueError(f"n_classes: true labels up to {t.max()} do not fit {nc} classes")
    if p.max() >= nk:
        raise ValueError(f"n_clusters: cluster labels up to {p.max()} do not fit {nk} clusters")
    conf = np.bincount(t * nk + p, minlength=nc * nk).reshape(nc, nk)
    rows, cols = linear_sum_assignment(-conf.astype(np.float64))
    mapping = np.full(nk, -1, np.int64)
    mapping[cols] = rows
    if extra == "majority":
        free = mapping < 0
        mapping[free] = conf[:, free].argmax(0)
    return mapping, conf


def _hungarian_confusion(pred, truth, n_classes, n_clusters, extra):
    mapping, conf = hungarian_match(pred, truth, n_classes, n_clusters, extra)
    nc = conf.shape[0]
    merged = np.zeros((nc, nc + 1), np.int64)          # last column: unmatched clusters
    for j, c in enumerate(mapping):
        merged[:, c if c >= 0 else nc] += conf[:, j]
    return merged


def hungarian_iou_per_class(pred, truth, n_classes=None, n_clusters=None, extra="unmatched") -> np.ndarray:
    """IoU of each true class with the cluster(s) matched to it by :func:`hungarian_match`.

    Voxels of unmatched clusters (``extra="unmatched"``) count as false
    negatives of their true class. NaN for a class absent from ``truth`` with no
    matched voxels.

    Examples
    --------
    >>> hungarian_iou_per_class([1, 1, 0, 0], [0, 0, 1, 1]).tolist()
    [1.0, 1.0]
    """
    m = _hungarian_confusion(pred, truth, n_classes, n_clusters, extra).astype(np.float64)
    nc = m.shape[0]
    tp = np.diag(m[:, :nc])
    union = m.sum(1) + m[:, :nc].sum(0) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def hungarian_miou(pred, truth, n_classes=None, n_clusters=None, extra="unmatched") -> float:
    """Mean IoU of an unsupervised segmentation after Hungarian cluster-to-class matching.

    Parameters
    ----------
    pred : array_like of int
        Cluster labels; more clusters than classes are allowed.
    truth : array_like of int
        True classes, same shape.
    n_classes, n_clusters : int, optional
        Default: largest label + 1.
    extra : {"unmatched", "majority"}
        ``"unmatched"`` (strict): voxels of clusters left without a class are
        errors; ``"majority"``: each extra cluster joins the class it overlaps
        most. See :func:`hungarian_match`.

    Returns
    -------
    float
        Mean over the classes present in ``truth`` (or matched).

    Examples
    --------
    >>> hungarian_miou([1, 1, 0, 0], [0, 0, 1, 1])
    1.0
    >>> hungarian_miou([1, 2, 0, 0], [0, 0, 1, 1])
    0.75
    >>> hungarian_miou([1, 2, 0, 0], [0, 0, 1, 1], extra="majority")
    1.0
    """
    iou = hungarian_iou_per_class(pred, truth, n_classes, n_clusters, extra)
    if not np.isfinite(iou).any():
        raise ValueError("truth: no class present; mean IoU is undefined")
    return float(np.nanmean(iou))


def hungarian_accuracy(pred, truth, n_classes=None, n_clusters=None, extra="unmatched") -> float:
    """Unsupervised pixel accuracy: share of voxels whose matched cluster is their class.

    Clusters are matched to classes by :func:`hungarian_match`; voxels in
    unmatched clusters are wrong (``extra="unmatched"``) or take the majority
    class of their cluster (``extra="majority"``).

    Examples
    --------
    >>> hungarian_accuracy([1, 2, 0, 0], [0, 0, 1, 1])
    0.75
    """
    m = _hungarian_confusion(pred, truth, n_classes, n_clusters, extra)
    nc = m.shape[0]
    return float(np.trace(m[:, :nc]) / m.sum())


# --------------------------------------------------------------------------------------
# displacement fields (digital volume correlation, issue 3)
# --------------------------------------------------------------------------------------
__all__ += ["endpoint_error"]


def endpoint_error(u_est, u_true, mask=None) -> dict:
    """End-point error (EPE) of a displacement field: ``|u_est - u_true|`` per voxel.

    Parameters
    ----------
    u_est, u_true : array_like, shape (ndim, *spatial)
        Estimated and true displacement, one component per spatial axis (voxels).
    mask : array_like of bool, shape spatial, optional
        Voxels to score (default: all).

    Returns
    -------
    dict
        ``"mean"``, ``"median"``, ``"max"`` EPE (voxels) and the fractions of voxels with
        EPE below 0.5, 1 and 3 voxels: ``"under_0.5"``, ``"under_1"``, ``"under_3"``.

    Examples
    --------
    >>> u = np.zeros((3, 4, 4, 4)); v = u.copy(); v[2, :2] = 0.6
    >>> e = endpoint_error(v, u)
    >>> round(e["mean"], 3), e["under_0.5"]
    (0.3, 0.5)
    """
    est = as_array(u_est, "u_est", dtype=np.float64)
    true = as_array(u_true, "u_true", dtype=np.float64)
    check_same_shape(true, est, "u_true", "u_est")
    if est.ndim < 2 or est.shape[0] != est.ndim - 1:
        raise ValueError(f"u_est: expected shape (ndim, *spatial) with one component per axis, got {est.shape}")
    err = np.sqrt(((est - true) ** 2).sum(0))
    if mask is not None:
        mask = as_array(mask, "mask")
        if mask.shape != err.shape:
            raise ValueError(f"mask: shape {mask.shape} differs from the field's spatial shape {err.shape}")
        err = err[mask.astype(bool)]
        if err.size == 0:
            raise ValueError("mask: contains no True voxel")
    return {"mean": float(err.mean()), "median": float(np.median(err)), "max": float(err.max()),
            "under_0.5": float((err < 0.5).mean()), "under_1": float((err < 1).mean()),
            "under_3": float((err < 3).mean())}


# --------------------------------------------------------------------------- instance segmentation (issue 4)
__all__ += ["AP_THRESHOLDS", "instance_overlaps", "match_instances", "instance_ap", "seg_score",
            "variation_of_information", "merge_split_counts"]

#: IoU thresholds of the instance AP: 0.50, 0.55, ..., 0.95.
AP_THRESHOLDS = tuple(np.round(np.arange(0.5, 0.951, 0.05), 2).tolist())


def _label_pair(pred, truth):
    p = as_array(pred, "pred")
    t = as_array(truth, "truth")
    check_same_shape(t, p, "truth", "pred")
    for a, name in ((p, "pred"), (t, "truth")):
        if a.dtype.kind not in "iub":
            raise TypeError(f"{name}: expected integer instance labels, got dtype {a.dtype}")
        if a.size and a.min() < 0:
            raise ValueError(f"{name}: labels must be >= 0 (0 = background)")
    return p.ravel(), t.ravel()


def instance_overlaps(pred, truth):
    """Voxel overlaps of every (true, predicted) pair of instances (background 0 excluded).

    Returns
    -------
    dict
        ``truth_ids``, ``pred_ids`` (sorted), ``truth_sizes``, ``pred_sizes``, and the
        non-zero overlaps as ``pairs`` (k, 2) of ids with ``inter`` (k,) voxel counts.

    Examples
    --------
    >>> o = instance_overlaps([0, 1, 1, 2], [0, 1, 1, 1])
    >>> o["pairs"].tolist(), o["inter"].tolist()
    ([[1, 1], [1, 2]], [2, 1])
    """
    p, t = _label_pair(pred, truth)
    keep = (p > 0) | (t > 0)
    p, t = p[keep].astype(np.int64), t[keep].astype(np.int64)
    t_ids, t_sizes = np.unique(t[t > 0], return_counts=True)
    p_ids, p_sizes = np.unique(p[p > 0], return_counts=True)
    both = (p > 0) & (t > 0)
    if both.any():
        base = int(p.max()) + 1
        k, inter = np.unique(t[both] * base + p[both], return_counts=True)
        pairs = np.stack([k // base, k % base], axis=1)
    else:
        pairs, inter = np.zeros((0, 2), np.int64), np.zeros(0, np.int64)
    return {"truth_ids": t_ids, "pred_ids": p_ids, "truth_sizes": t_sizes, "pred_sizes": p_sizes,
            "pairs": pairs, "inter": inter}


def _pair_iou(o):
    ts = o["truth_sizes"][np.searchsorted(o["truth_ids"], o["pairs"][:, 0])]
    ps = o["pred_sizes"][np.searchsorted(o["pred_ids"], o["pairs"][:, 1])]
    return o["inter"] / (ts + ps - o["inter"])


def match_instances(pred, truth, iou_threshold=0.5, *, overlaps=None):
    """One-to-one matching of predicted to true instances at an IoU threshold.

    A pair counts as a true positive when its IoU is at least ``iou_threshold``; pairs are
    chosen by a maximum-IoU one-to-one assignment (Hungarian; for thresholds above 0.5 at
    most one candidate exists per object anyway). Unmatched predictions are false
    positives, unmatched true instances false negatives.

    Parameters
    ----------
    pred, truth : array_like of int
        Instance labels (0 = background), same shape.
    iou_threshold : float in (0, 1]
    overlaps : dict, optional
        Precomputed :func:`instance_overlaps` (then ``pred``/``truth`` are ignored).

    Returns
    -------
    dict
        ``tp``, ``fp``, ``fn``, ``precision``, ``recall``, ``f1``, ``ap`` (= TP / (TP + FP + FN),
        the "average precision" of the Data Science Bowl 2018 / StarDist / EmbedSeg papers at
        one threshold) and ``mean_matched_iou``.

    Examples
    --------
    >>> truth = [0, 1, 1, 1, 2, 2, 0, 3]
    >>> pred = [0, 5, 5, 5, 6, 0, 0, 0]
    >>> m = match_instances(pred, truth, 0.5)
    >>> m["tp"], m["fp"], m["fn"], m["ap"]
    (2, 0, 1, 0.6666666666666666)
    """
    from scipy.optimize import linear_sum_assignment

    if not 0 < float(iou_threshold) <= 1:
        raise ValueError(f"iou_threshold: must be in (0, 1], got {iou_threshold!r}")
    o = instance_overlaps(pred, truth) if overlaps is None else overlaps
    n_t, n_p = len(o["truth_ids"]), len(o["pred_ids"])
    iou = _pair_iou(o)
    ok = iou >= iou_threshold
    tp, ious = 0, []
    if ok.any():
        ti = np.searchsorted(o["truth_ids"], o["pairs"][ok, 0])
        pi = np.searchsorted(o["pred_ids"], o["pairs"][ok, 1])
        _, ti = np.unique(ti, return_inverse=True)
        _, pi = np.unique(pi, return_inverse=True)
        m = np.zeros((ti.max() + 1, pi.max() + 1))
        m[ti, pi] = iou[ok]
        r, c = linear_sum_assignment(-m)
        ious = m[r, c][m[r, c] >= iou_threshold]
        tp = int(len(ious))
    fp, fn = n_p - tp, n_t - tp
    prec = tp / n_p if n_p else float(n_t == 0)
    rec = tp / n_t if n_t else float(n_p == 0)
    return {"tp": tp, "fp": fp, "fn": fn, "precision": prec, "recall": rec,
            "f1": 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0,
            "ap": tp / (tp + fp + fn) if (tp + fp + fn) else 1.0,
            "mean_matched_iou": float(np.mean(ious)) if len(ious) else 0.0}


def instance_ap(pred, truth, thresholds=AP_THRESHOLDS):
    """Instance "average precision" TP / (TP + FP + FN) at each IoU threshold.

    The definition of the 2018 Data Science Bowl, used by StarDist and EmbedSeg (not the
    area under a precision-recall curve: the segmentation has no score ranking). The
    default thresholds are 0.50, 0.55, ..., 0.95; their mean is the usual summary.

    Parameters
    ----------
    pred, truth : array_like of int
        Instance labels (0 = background), same shape.
    thresholds : sequence of float
        IoU thresholds in (0, 1].

    Returns
    -------
    ndarray
        AP per threshold.

    Examples
    --------
    >>> instance_ap([0, 1, 1, 2], [0, 1, 1, 2], thresholds=(0.5, 0.9)).tolist()
    [1.0, 1.0]
    """
    o = instance_overlaps(pred, truth)
    thresholds = np.atleast_1d(np.asarray(thresholds, np.float64))
    if thresholds.size == 0:
        raise ValueError("thresholds: empty")
    return np.array([match_instances(None, None, t, overlaps=o)["ap"] for t in thresholds])


def seg_score(pred, truth):
    """SEG measure of the Cell Tracking Challenge: mean Jaccard of every true instance.

    A true object R is matched to the predicted object S with ``|R ∩ S| > 0.5 |R|`` (at
    most one exists); its score is ``|R ∩ S| / |R ∪ S|``, or 0 without a match. SEG is the
    mean over the true objects (1 = perfect).

    Examples
    --------
    >>> seg_score([0, 1, 1, 2], [0, 1, 1, 1])
    0.6666666666666666
    """
    o = instance_overlaps(pred, truth)
    if len(o["truth_ids"]) == 0:
        raise ValueError("truth: no instances; SEG is undefined")
    ts = o["truth_sizes"][np.searchsorted(o["truth_ids"], o["pairs"][:, 0])]
    good = o["inter"] > 0.5 * ts
    return float(_pair_iou(o)[good].sum() / len(o["truth_ids"]))


def variation_of_information(pred, truth, *, ignore_background=True):
    """Variation of information split into its split and merge parts (bits).

    ``split = H(pred | truth)`` (how much the prediction cuts true objects apart) and
    ``merge = H(truth | pred)`` (how much it lumps true objects together); their sum is the
    VI. With ``ignore_background`` only voxels foreground in ``truth`` or ``pred`` count
    (background is then one more label), so a sparse volume is not dominated by empty space.

    Returns
    -------
    (float, float)
        ``(split, merge)``; 0 for identical segmentations.

    Examples
    --------
    >>> variation_of_information([1, 1, 2, 2], [1, 1, 1, 1])
    (1.0, 0.0)
    """
    p, t = _label_pair(pred, truth)
    if ignore_background:
        keep = (p > 0) | (t > 0)
        p, t = p[keep], t[keep]
    if p.size == 0:
        return 0.0, 0.0
    p = np.unique(p, return_inverse=True)[1].ravel()
    t = np.unique(t, return_inverse=True)[1].ravel()
    joint = np.unique(t.astype(np.int64) * (int(p.max()) + 1) + p, return_counts=True)[1] / p.size
    pt = np.bincount(t) / p.size
    pp = np.bincount(p) / p.size
    h_joint = -np.sum(joint * np.log2(joint))
    h_t = -np.sum(pt[pt > 0] * np.log2(pt[pt > 0]))
    h_p = -np.sum(pp[pp > 0] * np.log2(pp[pp > 0]))
    return float(max(h_joint - h_t, 0.0)), float(max(h_joint - h_p, 0.0))


def merge_split_counts(pred, truth, min_fraction=0.2):
    """Count merged and split instances.

    Every true object goes to the predicted object that holds most of its voxels (its
    "home"). A predicted object that is home to two or more true objects merged them:
    ``merged_pred`` counts such predicted objects, ``merged_truth`` the true objects
    involved. A true object is split when two or more predicted objects each hold at least
    ``min_fraction`` of it (``split_truth``).

    Parameters
    ----------
    pred, truth : array_like of int
    min_fraction : float in (0, 1]
        Smallest part of a true object that counts as a piece.

    Returns
    -------
    dict
        ``merged_pred``, ``merged_truth``, ``split_truth``, ``n_pred``, ``n_truth``.

    Examples
    --------
    >>> merge_split_counts([1, 1, 1, 1, 2, 3], [1, 1, 2, 2, 3, 3])
    {'merged_pred': 1, 'merged_truth': 2, 'split_truth': 1, 'n_pred': 3, 'n_truth': 3}
    """
    if not 0 < float(min_fraction) <= 1:
        raise ValueError(f"min_fraction: must be in (0, 1], got {min_fraction!r}")
    o = instance_overlaps(pred, truth)
    pairs, inter = o["pairs"], o["inter"]
    merged_pred = merged_truth = split_truth = 0
    if len(inter):
        order = np.lexsort((-inter, pairs[:, 0]))             # per true object, largest overlap first
        pt, pp, pi = pairs[order, 0], pairs[order, 1], inter[order]
        first = np.r_[True, pt[1:] != pt[:-1]]
        _, c = np.unique(pp[first], return_counts=True)
        merged_pred = int((c >= 2).sum())
        merged_truth = int(c[c >= 2].sum())
        ts = o["truth_sizes"][np.searchsorted(o["truth_ids"], pt)]
        big = pi >= min_fraction * ts
        split_truth = int((np.bincount(np.searchsorted(o["truth_ids"], pt[big]),
                                       minlength=len(o["truth_ids"])) >= 2).sum())
    return {"merged_pred": merged_pred, "merged_truth": merged_truth, "split_truth": split_truth,
            "n_pred": int(len(o["pred_ids"])), "n_truth": int(len(o["truth_ids"]))}
