"""Virtual histology: slice-to-volume registration and CT-to-stain translation.

Histology is the gold standard of tissue analysis but covers a few 2D sections;
SR-µCT covers the whole 3D sample. The pipeline here follows the published
virtual-histology workflow:

1. **Slice-to-volume registration** -- :func:`register_slice` finds the oblique
   plane inside the CT volume that matches a 2D (stained or grey) section: a
   multi-resolution exhaustive search over plane positions and tilts, scored with
   mutual information (MI) for every in-plane shift at once, then Powell
   refinement of the 6 rigid parameters, then an in-plane B-spline correction of
   the sectioning deformation with SimpleITK.
2. **Translation** -- :func:`train_cyclegan` trains a small cycleGAN (U-Net or
   ResNet generators, PatchGAN discriminators, least-squares GAN, cycle and identity
   losses) on the few registered pairs, with an extra L1 term on the registered
   pairs (the "modified", paired cycleGAN); :func:`predict_volume` then renders a
   virtual histology for every slice of the volume.
3. **Classical baseline** -- :func:`fit_lookup` / :func:`colourise`: a lookup
   table from local attenuation to the mean stain colour, fitted on the same pairs.

Conventions: volumes ``(z, y, x)``; RGB images ``(H, W, 3)`` float in [0, 1]; a
plane is ``origin`` (voxel coordinates of the image centre) plus a 3 x 3 matrix
whose rows are ``(normal, v, u)`` (``v`` = direction of increasing image row,
``u`` = of increasing column), exactly as :func:`tomoml_nb.phantoms.oblique_slice`.

Examples
--------
>>> from tomoml_nb import phantoms, histology
>>> ph = phantoms.bone_implant((40, 48, 48), seed=0)
>>> truth = histology.oblique_sections(ph, 1, seed=1, max_tilt_deg=6)[0]
>>> plane = histology.register_slice(truth["image"], ph.image, max_tilt_deg=8, progress=False)
>>> bool(histology.plane_errors(plane, truth["origin"], truth["rotation"])["angle_deg"] < 3)
True
"""
from __future__ import annotations

import numbers
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from ._validate import as_array, check_choice, check_positive, rng_from

__all__ = [
    "SlicePlane",
    "to_single_channel",
    "nmi",
    "plane_coordinates",
    "register_slice",
    "plane_errors",
    "oblique_sections",
    "Lookup",
    "fit_lookup",
    "colourise",
    "train_cyclegan",
    "translate",
    "predict_volume",
    "save_model",
    "load_model",
    "load_pretrained",
    "pretrained_path",
]

_AXES = ("z", "y", "x")
# rows (normal, v, u): the plain slice along each axis, as volume[i], volume[:, i], volume[:, :, i]
_BASE_FRAMES = {
    "z": np.eye(3),
    "y": np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]),
    "x": np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
}


# --------------------------------------------------------------------------- result container
@dataclass(eq=False)
class SlicePlane:
    """Where a 2D section lies in a volume, as found by :func:`register_slice`.

    Attributes
    ----------
    origin : ndarray (3,)
        Voxel coordinates ``(z, y, x)`` of the image centre (rigid plane).
    rotation : ndarray (3, 3)
        Rows ``(normal, v, u)``: plane normal, direction of increasing image row,
        direction of increasing image column (as in
        :func:`tomoml_nb.phantoms.oblique_slice`). With ``mirror=True`` the
        matrix is a reflection (determinant -1).
    ct_slice : ndarray (H, W) float32
        The CT resampled on the image's pixel grid: rigid plane plus in-plane
        B-spline correction (NaN-free; outside the volume filled with
        ``cval``).
    score : float
        Normalised mutual information of image and ``ct_slice``,
        ``(H(a) + H(b)) / H(a, b)`` in [1, 2]; 1 means unrelated.
    displacement : ndarray (2, H, W) float32 or None
        In-plane correction in image pixels (Lagrangian, fixed = image,
        moving = rigid CT plane): the CT plane sampled at ``pixel + displacement``
        matches the image pixel. None when ``bspline=False``.
    coords : ndarray (3, H, W) float32
        Voxel coordinates at which ``ct_slice`` was sampled.
    inside : float
        Fraction of image pixels that fall inside the volume.
    confidence : float
        ``(score - 1) / (best score of the image's flipped and rotated copies
        on the same plane - 1)``: about 1 for a chance match, typically 1.5 or
        more for a true one; below ``warn_below`` :func:`register_slice` warns.
    pixel_size : (float, float)
        Image pixel size in CT voxels used for resampling.
    stages : list of dict
        ``{"name", "origin", "rotation", "score", "ct_slice", "seconds"}`` after
        each stage (``"coarse"``, ``"refined"``, ``"bspline"``).
    seconds : float
        Total run time.
    """

    origin: np.ndarray
    rotation: np.ndarray
    ct_slice: np.ndarray
    score: float
    displacement: np.ndarray | None
    coords: np.ndarray
    inside: float
    confidence: float
    pixel_size: tuple
    stages: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def normal(self):
        """Unit plane normal ``(z, y, x)``."""
        return self.rotation[0]

    def __repr__(self):
        o = ", ".join(f"{v:.1f}" for v in self.origin)
        n = ", ".join(f"{v:.3f}" for v in self.rotation[0])
        return (f"SlicePlane(origin=({o}), normal=({n}), score={self.score:.3f}, inside={self.inside:.2f}, "
                f"confidence={self.confidence:.2f}, ct_slice={self.ct_slice.shape})")


# --------------------------------------------------------------------------- small helpers
def _rotvec_matrix(w):
    """Rotation matrix of a rotation vector (radians), Rodrigues' formula."""
    w = np.asarray(w, np.float64)
    theta = float(np.linalg.norm(w))
    if theta < 1e-12:
        return np.eye(3)
    a = w / theta
    K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(theta) * K + (1 - np.cos(theta)) * K @ K


def _local_rotate(R, w):
    """Rotate the frame ``R`` (rows normal, v, u) by rotation vector ``w`` given in that frame."""
    return _rotvec_matrix(w).T @ R


def _pair(value, name):
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        v = (float(value), float(value))
    else:
        try:
            v = tuple(float(x) for x in value)
        except TypeError as exc:
            raise TypeError(f"{name}: expected a number or a pair of numbers, got {value!r}") from exc
        if len(v) != 2:
            raise ValueError(f"{name}: expected a number or a pair (row, column), got {value!r}")
    for x in v:
        check_positive(x, name)
    return v


def _robust_range(a, percentiles=(0.5, 99.5), max_samples=2_000_000):
    flat = np.asarray(a).reshape(-1)
    if flat.size > max_samples:
        flat = flat[:: flat.size // max_samples + 1]
    flat = flat[np.isfinite(flat)]
    lo, hi = np.percentile(flat, percentiles)
    if hi <= lo:
        lo, hi = float(flat.min()), float(flat.max())
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def _as_image(image, name="image2d"):
    """Validate a 2D grey or RGB(A) image; returns float32 ``(H, W)`` or ``(H, W, 3)`` in [0, 1] for RGB."""
    img = as_array(image, name, ndim=(2, 3))
    if img.ndim == 3:
        if img.shape[-1] not in (3, 4):
            raise ValueError(f"{name}: expected a grey image (H, W) or an RGB(A) image (H, W, 3|4), "
                             f"got shape {img.shape}")
        img = img[..., :3]
        if img.dtype == np.uint8:
            img = img.astype(np.float32) / 255.0
        elif img.dtype.kind in "iu":
            img = img.astype(np.float32) / float(np.iinfo(img.dtype).max)
        else:
            img = img.astype(np.float32)
            if img.max() > 1.0 + 1e-6 or img.min() < -1e-6:
                if img.max() <= 255.0 and img.min() >= 0:
                    img = img / 255.0
                else:
                    raise ValueError(f"{name}: RGB values must be in [0, 1] (float) or 0..255, got "
                                     f"{float(img.min()):.3g}..{float(img.max()):.3g}")
    else:
        img = img.astype(np.float32)
    if min(img.shape[:2]) < 8:
        raise ValueError(f"{name}: needs at least 8 x 8 pixels, got {img.shape[:2]}")
    if np.ptp(img) == 0:
        raise ValueError(f"{name}: all values are equal; the image carries no structure")
    return img


def to_single_channel(image):
    """One grey channel for multimodal registration of a stained (RGB) or grey section.

    RGB is converted to optical density ``OD = -log(I)`` (stains absorb light,
    so concentrations add in OD) and projected on its first principal
    component, with the sign chosen so that more stain means a larger value. A
    grey image is returned as float32 unchanged.

    Parameters
    ----------
    image : ndarray (H, W) or (H, W, 3|4)
        Grey or RGB(A) image (float in [0, 1] or uint8).

    Returns
    -------
    ndarray (H, W) float32

    Examples
    --------
    >>> rgb = np.ones((16, 16, 3), np.float32); rgb[4:8, 4:8] = (0.8, 0.3, 0.6)
    >>> g = to_single_channel(rgb)
    >>> bool(g[5, 5] > g[0, 0])
    True
    """
    img = _as_image(image, "image")
    if img.ndim == 2:
        return img
    od = -np.log(np.clip(img, 1.0 / 255.0, 1.0)).reshape(-1, 3).astype(np.float64)
    mean = od.mean(0)
    c = od - mean
    sub = c[:: max(1, c.shape[0] // 200_000)]
    _, _, vt = np.linalg.svd(sub, full_matrices=False)
    pc = vt[0]
    if pc.sum() < 0:
        pc = -pc
    return (c @ pc).reshape(img.shape[:2]).astype(np.float32)


def _uniform_edges(values, n_bins, percentiles=(0.5, 99.5)):
    """``n_bins`` equal-width bins over the robust range of ``values`` (outliers go to the end bins)."""
    lo, hi = _robust_range(values, percentiles)
    return np.linspace(lo, hi, n_bins + 1)


def _hybrid_edges(values, n_bins, percentiles=(0.5, 99.5)):
    """About ``n_bins`` bins: the union of equal-width and equal-population (quantile) edges.

    Equal-width bins keep classes that are far apart in grey value apart (and do
    not split one dominant class into noise bins); quantile bins resolve subtle
    contrast inside a sample that fills a small part of the range (a bright
    sample on a dark background, e.g. concrete). The union does both.
    """
    v = np.asarray(values, np.float64).reshape(-1)
    if v.size > 500_000:
        v = v[:: v.size // 500_000 + 1]
    lo, hi = _robust_range(v, percentiles)
    half = max(1, n_bins // 2)
    u = np.linspace(lo, hi, half + 1)
    q = np.clip(np.quantile(v, np.linspace(percentiles[0] / 100, percentiles[1] / 100, half + 1)), lo, hi)
    edges = np.unique(np.concatenate([u, q]))
    keep = np.concatenate([[True], np.diff(edges) > 0.25 * (hi - lo) / n_bins])
    edges = edges[keep]
    edges[0], edges[-1] = lo, hi
    if len(edges) < 3:
        edges = u
    return edges


def _digitize(values, edges):
    n = len(edges) - 1
    return np.clip(np.searchsorted(edges, values, side="right") - 1, 0, n - 1)


def _edges(values, n_bins, binning):
    return _hybrid_edges(values, n_bins) if binning == "hybrid" else _uniform_edges(values, n_bins)


def _image_labels(img, bins, seed=0, binning="uniform"):
    """Discrete classes of a section for mutual information.

    RGB: k-means clusters of the optical density (stains are colours, and one
    grey projection would merge e.g. pink bone and pink soft tissue); grey:
    ``bins`` uniform bins over the robust range. Returns int labels and their
    number.
    """
    if img.ndim == 2:
        edges = _edges(img, bins, binning)
        return _digitize(img, edges), len(edges) - 1
    od = -np.log(np.clip(img, 1.0 / 255.0, 1.0)).reshape(-1, 3).astype(np.float64)
    centres = _kmeans(od[:: max(1, od.shape[0] // 20_000)], int(bins), seed)
    # order clusters by optical density (higher label = more stain)
    centres = centres[np.argsort(centres.sum(1))]
    d = ((od[:, None, :] - centres[None]) ** 2).sum(-1)
    return np.argmin(d, axis=1).reshape(img.shape[:2]).astype(np.intp), len(centres)


def _kmeans(x, k, seed=0, n_iter=25):
    """Small deterministic k-means (k-means++ initialisation); drops empty clusters."""
    rng = np.random.default_rng(seed)
    k = int(min(k, len(np.unique(np.round(x, 3), axis=0))))
    k = max(k, 1)
    centres = [x[rng.integers(len(x))]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        prob = d2 / d2.sum() if d2.sum() > 0 else None
        centres.append(x[rng.choice(len(x), p=prob)])
        d2 = np.minimum(d2, ((x - centres[-1]) ** 2).sum(1))
    c = np.array(centres)
    for _ in range(n_iter):
        lab = np.argmin(((x[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
        new = np.array([x[lab == j].mean(0) if np.any(lab == j) else c[j] for j in range(len(c))])
        if np.allclose(new, c):
            break
        c = new
    lab = np.argmin(((x[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
    return c[np.unique(lab)]


def _resample_labels(labels, k, ii, jj, sigma):
    """Labels on the grid ``(ii, jj)`` (row/column coordinates) by majority (blurred indicators, argmax)."""
    grid = np.meshgrid(ii, jj, indexing="ij")
    best = np.full(grid[0].shape, -1.0)
    out = np.zeros(grid[0].shape, np.intp)
    for c in range(k):
        ind = (labels == c).astype(np.float32)
        if sigma is not None and max(np.atleast_1d(sigma)) > 0:
            ind = ndi.gaussian_filter(ind, sigma)
        v = ndi.map_coordinates(ind, grid, order=1, mode="nearest")
        better = v > best
        out[better] = c
        best[better] = v[better]
    return out


def _label_nmi(labels, k, values, mask, bins=32):
    """NMI between discrete image labels and continuous CT values (uniform bins) inside ``mask``."""
    lab = labels[mask]
    v = values[mask]
    if lab.size < 2:
        return 1.0
    q = _digitize(v, _uniform_edges(v, bins))
    joint = np.bincount(lab * bins + q, minlength=k * bins).reshape(k, bins).astype(np.float64)
    return float(_nmi_from_joint(joint))


def _entropies(joint, axis=(0, 1)):
    """Entropies H(a), H(b), H(a, b) (nats) from joint counts; ``axis`` are the (a, b) axes."""
    p = joint / np.maximum(joint.sum(axis=axis, keepdims=True), 1e-12)

    def ent(q):
        with np.errstate(divide="ignore", invalid="ignore"):
            return -np.where(q > 0, q * np.log(q), 0.0).sum(axis=axis)

    return ent(p.sum(axis=axis[1], keepdims=True)), ent(p.sum(axis=axis[0], keepdims=True)), ent(p)


def _mi_from_joint(joint, axis=(0, 1)):
    """Mutual information H(a) + H(b) - H(a, b) (nats) from joint counts; ``axis`` are the (a, b) axes."""
    h_a, h_b, h_ab = _entropies(joint, axis)
    return h_a + h_b - h_ab


def _nmi_from_joint(joint, axis=(0, 1)):
    """NMI (H(a) + H(b)) / H(a, b) from joint counts; ``axis`` are the (a, b) axes."""
    h_a, h_b, h_ab = _entropies(joint, axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(h_ab > 1e-12, (h_a + h_b) / np.maximum(h_ab, 1e-12), 1.0)
    return out


def nmi(a, b, bins=32, mask=None):
    """Normalised mutual information ``(H(a) + H(b)) / H(a, b)`` of two images.

    Multimodal similarity: 2 for a one-to-one (even non-monotonic) relation
    between grey values, 1 for independent images. Bins are uniform over each
    image's 0.5-99.5 percentile range (outliers go to the end bins).

    Parameters
    ----------
    a, b : ndarray
        Same shape (single channel; see :func:`to_single_channel`).
    bins : int
        Histogram bins per image.
    mask : ndarray of bool, optional
        Pixels to use.

    Examples
    --------
    >>> x = np.random.default_rng(0).random((32, 32))
    >>> round(nmi(x, np.cos(3 * x)), 2) > round(nmi(x, np.random.default_rng(1).random((32, 32))), 2)
    True
    """
    a = as_array(a, "a", dtype=np.float64)
    b = as_array(b, "b", dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"b: shape {b.shape} differs from a shape {a.shape}")
    bins = check_positive(bins, "bins", integer=True)
    if mask is not None:
        m = as_array(mask, "mask").astype(bool)
        if m.shape != a.shape:
            raise ValueError(f"mask: shape {m.shape} differs from a shape {a.shape}")
        a, b = a[m], b[m]
    a, b = a.ravel(), b.ravel()
    if a.size < 2:
        raise ValueError("mask: fewer than 2 pixels selected")
    ia = _digitize(a, _uniform_edges(a, bins))
    ib = _digitize(b, _uniform_edges(b, bins))
    joint = np.bincount(ia * bins + ib, minlength=bins * bins).reshape(bins, bins).astype(np.float64)
    return float(_nmi_from_joint(joint))


def plane_coordinates(origin, rotation, shape, spacing=1.0):
    """Voxel coordinates ``(3, H, W)`` of an image of ``shape`` lying on a plane.

    Pixel ``(i, j)`` sits at ``origin + (i - (H-1)/2) * sy * R[1] + (j - (W-1)/2) * sx * R[2]``
    with ``(sy, sx) = spacing`` (image pixel size in voxels).

    Examples
    --------
    >>> c = plane_coordinates((5, 4.5, 4.5), np.eye(3), (10, 10))
    >>> c[:, 0, 0].tolist()
    [5.0, 0.0, 0.0]
    """
    o = np.asarray(origin, np.float64).reshape(3)
    R = np.asarray(rotation, np.float64).reshape(3, 3)
    sy, sx = _pair(spacing, "spacing")
    H, W = int(shape[0]), int(shape[1])
    i = (np.arange(H, dtype=np.float64) - (H - 1) / 2.0) * sy
    j = (np.arange(W, dtype=np.float64) - (W - 1) / 2.0) * sx
    return (o[:, None, None] + i[None, :, None] * R[1][:, None, None]
            + j[None, None, :] * R[2][:, None, None]).astype(np.float32)


def _inside_mask(coords, shape):
    m = np.ones(coords.shape[1:], bool)
    for k in range(3):
        m &= (coords[k] >= -0.5) & (coords[k] <= shape[k] - 0.5)
    return m


# --------------------------------------------------------------------------- coarse search
class _CoarseLevel:
    """Exhaustive MI search over plane offsets (along the normal), tilts and in-plane shifts.

    For one tilt, all parallel planes are sampled as a stack and quantised into
    ``K`` uniform bins plus one bin for "outside the volume" (so a plane that
    leaves the volume is judged on where it leaves, not rewarded for a smaller,
    easier overlap); the joint histogram with the quantised image is computed
    for every in-plane shift at once: ``J[a, b](s)`` is the cross-correlation of
    the indicator images ``[ct == a]`` and ``[image == b]``, done with FFTs.
    """

    def __init__(self, vol_s, edges_ct, labels, k, step, max_shift, min_overlap):
        import scipy.fft as sfft

        self.vol = vol_s
        self.edges = edges_ct
        self.step = float(step)
        self.bins = len(edges_ct) - 1
        self.min_overlap = float(min_overlap)
        # image labels on the coarse lattice (centred), by majority
        H, W = labels.shape
        self.h = int((H - 1) // step) + 1
        self.w = int((W - 1) // step) + 1
        ii = (np.arange(self.h) - (self.h - 1) / 2.0) * step + (H - 1) / 2.0
        jj = (np.arange(self.w) - (self.w - 1) / 2.0) * step + (W - 1) / 2.0
        qb = _resample_labels(labels, k, ii, jj, 0.5 * step if step > 1 else None)
        self.m = int(np.ceil(max_shift / step))
        self.P, self.Q = self.h + 2 * self.m, self.w + 2 * self.m
        self.fp, self.fq = sfft.next_fast_len(self.P), sfft.next_fast_len(self.Q, real=True)
        present = [b for b in range(k) if np.any(qb == b)]
        ind_b = np.zeros((len(present), self.fp, self.fq), np.float32)
        for i, b in enumerate(present):
            ind_b[i, :self.h, :self.w] = qb == b
        self.fb = np.conj(sfft.rfft2(ind_b, axes=(-2, -1)))
        self.npix = self.h * self.w
        self.qb, self.kb = qb, int(k)

    def plane_stack(self, centres, R):
        """CT samples ``(n, P, Q)`` and inside-mask on planes through ``centres`` with frame ``R``."""
        P, Q, s = self.P, self.Q, self.step
        i = (np.arange(P) - (P - 1) / 2.0) * s
        j = (np.arange(Q) - (Q - 1) / 2.0) * s
        base = i[:, None, None] * R[1] + j[None, :, None] * R[2]          # (P, Q, 3)
        pts = np.asarray(centres, np.float64)[:, None, None, :] + base[None]  # (n, P, Q, 3)
        coords = np.moveaxis(pts, -1, 0).reshape(3, -1)
        vals = ndi.map_coordinates(self.vol, coords, order=1, mode="nearest").reshape(pts.shape[:3])
        inside = np.ones(pts.shape[:3], bool)
        for k in range(3):
            inside &= (pts[..., k] >= -0.5) & (pts[..., k] <= self.vol.shape[k] - 0.5)
        return vals, inside

    def scores(self, centres, R):
        """MI for every centre and every shift: ``(n, 2m+1, 2m+1)`` (-inf where overlap is too small)."""
        vals, inside = self.plane_stack(centres, R)
        qa = np.where(inside, _digitize(vals, self.edges), self.bins)        # bin K = outside the volume
        S = 2 * self.m + 1
        if len(centres) * S * S * self.npix <= 3_000_000:
            score, outside = self._direct(qa)
        else:
            score, outside = self._fft(qa)
        return np.where(1.0 - outside >= self.min_overlap, score, -np.inf)

    def _direct(self, qa):
        """Joint histograms of every shifted window with one bincount (small problems)."""
        from numpy.lib.stride_tricks import sliding_window_view

        n, S = qa.shape[0], 2 * self.m + 1
        ka, kb = self.bins + 1, self.kb
        win = sliding_window_view(qa, (self.h, self.w), axis=(1, 2))           # (n, S, S, h, w)
        idx = win * kb + self.qb[None, None, None]
        idx = idx + (np.arange(n * S * S) * (ka * kb)).reshape(n, S, S, 1, 1)
        joint = np.bincount(idx.ravel(), minlength=n * S * S * ka * kb).reshape(n, S, S, ka, kb)
        joint = joint.astype(np.float64)
        outside = joint[..., self.bins, :].sum(-1) / self.npix
        return _mi_from_joint(joint, axis=(3, 4)), outside

    def _fft(self, qa):
        """Joint histograms of every shift as FFT cross-correlations of indicator images."""
        import scipy.fft as sfft

        n = qa.shape[0]
        present = [a for a in range(self.bins + 1) if np.any(qa == a)]
        ind_a = np.zeros((len(present), n, self.fp, self.fq), np.float32)
        for k, a in enumerate(present):
            ind_a[k, :, :self.P, :self.Q] = qa == a
        fa = sfft.rfft2(ind_a, axes=(-2, -1))                              # (Ka, n, fp, fq')
        S = 2 * self.m + 1
        joint = np.empty((len(present), len(self.fb), n, S, S), np.float64)
        for b in range(len(self.fb)):
            corr = sfft.irfft2(fa * self.fb[b][None, None], s=(self.fp, self.fq), axes=(-2, -1))
            joint[:, b] = corr[..., :S, :S]
        joint = np.clip(np.round(joint), 0, None)
        score = _mi_from_joint(joint, axis=(0, 1))
        if self.bins in present:
            outside = joint[present.index(self.bins)].sum(axis=0) / self.npix
        else:
            outside = np.zeros(score.shape)
        return score, outside


# --------------------------------------------------------------------------- fine metric
class _FineMetric:
    """MI of the image against the CT on a plane, continuous in the plane parameters.

    CT values are interpolated linearly and binned with linear (partial-volume)
    weights into uniform bins (plus an "outside the volume" bin), so the score
    varies smoothly with sub-voxel motion -- what a derivative-free optimiser
    (Powell) needs.
    """

    def __init__(self, vol_s, labels, k, spacing, bins=16, max_pixels=40_000, min_overlap=0.3, binning="uniform"):
        self.vol = vol_s
        stride = int(np.ceil(np.sqrt(labels.size / max_pixels))) if labels.size > max_pixels else 1
        sel = (slice(None, None, stride), slice(None, None, stride))
        self.bins = int(bins)
        self.k = int(k)
        self.qb = labels[sel].ravel()
        self.edges = _edges(vol_s, bins, binning)
        self.bins = len(self.edges) - 1
        self.min_overlap = min_overlap
        H, W = labels.shape
        i = (np.arange(H) - (H - 1) / 2.0)[sel[0]] * spacing[0]
        j = (np.arange(W) - (W - 1) / 2.0)[sel[1]] * spacing[1]
        ii, jj = np.meshgrid(i, j, indexing="ij")
        self.i0, self.j0 = ii.ravel(), jj.ravel()
        self.i, self.j = self.i0, self.j0
        self.sel = sel

    def set_displacement(self, disp_v):
        """In-plane displacement (2, H, W) on the voxel-grid image, in voxels (None: rigid)."""
        if disp_v is None:
            self.i, self.j = self.i0, self.j0
        else:
            self.i = self.i0 + disp_v[0][self.sel].ravel()
            self.j = self.j0 + disp_v[1][self.sel].ravel()

    def __call__(self, origin, R):
        c = origin[:, None] + self.i[None] * R[1][:, None] + self.j[None] * R[2][:, None]
        inside = np.ones(c.shape[1], bool)
        for k in range(3):
            inside &= (c[k] >= -0.5) & (c[k] <= self.vol.shape[k] - 0.5)
        if inside.mean() < self.min_overlap:
            return 0.0
        K, k = self.bins, self.k
        v = ndi.map_coordinates(self.vol, c[:, inside], order=1, mode="nearest")
        t = np.clip(np.interp(v, self.edges, np.arange(K + 1, dtype=np.float64)) - 0.5, 0, K - 1)
        t0 = np.floor(t).astype(np.intp)
        t1 = np.minimum(t0 + 1, K - 1)
        w1 = t - t0
        qb = self.qb[inside]
        K1 = K + 1
        joint = (np.bincount(qb * K1 + t0, weights=1 - w1, minlength=k * K1)
                 + np.bincount(qb * K1 + t1, weights=w1, minlength=k * K1)
                 + np.bincount(self.qb[~inside] * K1 + K, minlength=k * K1)).reshape(k, K1)
        return float(_mi_from_joint(joint))


# --------------------------------------------------------------------------- registration
def _check_range_or_none(value, name, upper):
    if value is None:
        return 0.0, float(upper)
    try:
        lo, hi = (float(v) for v in value)
    except Exception as exc:
        raise TypeError(f"{name}: expected a pair (low, high) of voxel positions, got {value!r}") from exc
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo > hi:
        raise ValueError(f"{name}: expected low <= high, got {value!r}")
    if hi < 0 or lo > upper:
        raise ValueError(f"{name}: {value!r} lies outside the volume (0..{upper:g} along the search axis); "
                         "the section cannot be there")
    return max(lo, 0.0), min(hi, float(upper))


def _tilt_grid(max_tilt, step):
    if max_tilt <= 0:
        return [(0.0, 0.0)]
    n = int(np.floor(max_tilt / step + 1e-9))
    vals = np.arange(-n, n + 1) * step
    out = [(a, b) for a in vals for b in vals if np.hypot(a, b) <= max_tilt + 0.5 * step]
    return out


def _spin_grid(max_spin, step):
    if max_spin <= 0:
        return [0.0]
    n = int(np.ceil(max_spin / step - 1e-9))
    return list(np.linspace(-max_spin, max_spin, 2 * n + 1))


def _bspline_2d(fixed, moving, spacing_fixed, moving_origin, mesh, iterations, seed, affine=False):
    """In-plane deformable correction with SimpleITK (Mattes MI, LBFGSB).

    ``fixed`` = the image (physical pixel size ``spacing_fixed``, centred at 0);
    ``moving`` = the rigid CT plane on a unit grid whose first pixel sits at
    ``moving_origin`` (plane coordinates (v, u)). Returns the physical
    displacement ``(2, H, W)`` (plane units, (v, u)) that maps fixed points into
    the moving plane.
    """
    import SimpleITK as sitk

    H, W = fixed.shape
    f = sitk.GetImageFromArray(fixed.astype(np.float32))
    f.SetSpacing((float(spacing_fixed[1]), float(spacing_fixed[0])))
    f.SetOrigin((-(W - 1) / 2.0 * spacing_fixed[1], -(H - 1) / 2.0 * spacing_fixed[0]))
    m = sitk.GetImageFromArray(moving.astype(np.float32))
    m.SetSpacing((1.0, 1.0))
    m.SetOrigin((float(moving_origin[1]), float(moving_origin[0])))

    def method():
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=24)
        if fixed.size <= 60_000:           # small images: every pixel (exact and deterministic)
            reg.SetMetricSamplingStrategy(reg.NONE)
        else:                              # seed 0 means "wall clock" to SimpleITK: never pass it
            reg.SetMetricSamplingStrategy(reg.RANDOM)
            reg.SetMetricSamplingPercentage(60_000 / fixed.size, int(seed) % 2**31 + 1)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetNumberOfThreads(1)  # bit-identical results run to run
        return reg

    old_threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)      # bit-identical results run to run
    try:
        return _bspline_run(sitk, f, m, method, mesh, iterations, affine)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(old_threads)


def _bspline_run(sitk, f, m, method, mesh, iterations, affine):
    transforms = []
    if affine:
        reg = method()
        tx = sitk.AffineTransform(2)
        reg.SetOptimizerAsRegularStepGradientDescent(learningRate=0.5, minStep=1e-3, numberOfIterations=60,
                                                     relaxationFactor=0.6)
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetInitialTransform(tx, inPlace=True)
        reg.Execute(f, m)
        transforms.append(tx)
    reg = method()
    bs = sitk.BSplineTransformInitializer(f, [int(mesh), int(mesh)], 3)
    reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=int(iterations),
                             maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=4 * int(iterations))
    reg.SetShrinkFactorsPerLevel([2, 1])
    reg.SetSmoothingSigmasPerLevel([1.0, 0.0])
    if transforms:
        reg.SetMovingInitialTransform(transforms[0])
    reg.SetInitialTransform(bs, inPlace=True)
    reg.Execute(f, m)
    composite = sitk.CompositeTransform(2)
    # CompositeTransform applies the last added first: bspline (fixed side), then affine
    for t in transforms:
        composite.AddTransform(t)
    composite.AddTransform(bs)
    field_img = sitk.TransformToDisplacementField(composite, sitk.sitkVectorFloat64, f.GetSize(), f.GetOrigin(),
                                                  f.GetSpacing(), f.GetDirection())
    disp = sitk.GetArrayFromImage(field_img)                  # (H, W, 2) as (x, y) = (u, v)
    return np.stack([disp[..., 1], disp[..., 0]]).astype(np.float64)


def register_slice(image2d, volume, *, pixel_size=1.0, voxel_size=1.0, axis="z", search_range=None,
                   max_tilt_deg=15.0, tilt_step_deg=None, max_spin_deg=0.0, spin_step_deg=None,
                   max_shift=None, mirror=False, coarse_step=None, bins=8, binning="uniform", n_candidates=20,
                   n_refine=3,
                   refine=True, bspline=True,
                   bspline_mesh=None, bspline_iterations=40, min_overlap=0.5, warn_below=1.2, cval=0.0, seed=0,
                   progress=True):
    """Find the oblique plane in ``volume`` that matches a 2D section (slice-to-volume registration).

    Steps (each recorded in ``SlicePlane.stages``):

    1. **coarse** -- multi-resolution exhaustive search. The volume is smoothed
       and sampled on planes every ``coarse_step`` voxels along ``axis``, tilted
       by up to ``max_tilt_deg`` (and spun by up to ``max_spin_deg``); for every
       plane the mutual information (MI) with the image is computed for all
       in-plane shifts up to ``max_shift`` at once (joint histograms of all
       shifted windows, or FFT cross-correlations of bin indicator images for
       large searches). Plane parts outside the volume form their own "outside"
       grey class, so leaving the volume is judged, not rewarded with an easier,
       smaller overlap. The best ``n_candidates`` distinct planes are searched
       again at half the step and half the angular step.
    2. **refined** -- Powell optimisation (scipy) of the 6 rigid parameters
       (3 rotations, 3 translations) of the best ``n_refine`` planes with a
       smooth, partial-volume MI at full resolution.
    3. **bspline** -- in-plane correction of the sectioning deformation (cubic
       B-spline, Mattes mutual information, SimpleITK); then the rigid plane is
       re-fitted with the deformation taken out (it biases the tilt) and the
       deformation re-estimated ("refined + bspline (pass 2)"). A stage that
       lowers the match is rejected (its name says so).

    Stain colour and attenuation are not linearly related (and MI, unlike its
    normalised variant, does not prefer a featureless plane that the image
    merely "explains"), so all metrics are mutual-information based; an RGB
    section is reduced to discrete colour classes (k-means in optical density),
    a grey one to grey-value bins. ``SlicePlane.score`` reports the normalised
    MI of the final match.

    Parameters
    ----------
    image2d : ndarray (H, W) or (H, W, 3|4)
        The section: grey (e.g. a slice of another modality) or RGB stained
        histology (float in [0, 1] or uint8).
    volume : ndarray (z, y, x)
        The CT volume.
    pixel_size : float or (float, float)
        Size of an image pixel, in the unit of ``voxel_size`` (default: in CT
        voxels). The image is resampled to the voxel grid for the search and
        ``ct_slice`` is returned on the image's own pixel grid.
    voxel_size : float
        CT voxel size (same unit as ``pixel_size``, e.g. both in µm).
    axis : {"z", "y", "x"}
        The volume axis the section is roughly perpendicular to; tilts and
        ``search_range`` refer to it. ``axis="z"`` with no tilt gives
        ``volume[k]``.
    search_range : (float, float), optional
        Range of plane-centre positions along ``axis`` to search (voxels);
        default: the whole axis. A range outside the volume is an error.
    max_tilt_deg : float
        Largest tilt of the plane normal from ``axis`` to search.
    tilt_step_deg : float, optional
        Angular step of the coarse grid (default: about 5 degrees, finer for
        large images).
    max_spin_deg, spin_step_deg : float
        In-plane rotation of the section to search (default 0: sections put on
        the slide roughly aligned; the refinement still corrects a few degrees).
    max_shift : float, optional
        Largest in-plane offset (voxels) between the image centre and the
        volume's centre line; default a quarter of the volume's largest
        cross-section size.
    mirror : bool or "auto"
        The section lies face down on the slide (image mirrored); ``"auto"``
        tries both.
    coarse_step : int, optional
        Voxel step of the coarsest level (default: about 1/24 of the image size,
        at least 1).
    bins : int
        Histogram bins of the coarse MI (and colour clusters of an RGB section).
    binning : {"uniform", "hybrid"}
        CT (and grey-section) bins: equal width over the 0.5-99.5 percentile
        range, or the union of equal-width and equal-population bins -- better
        when the structure to match has low contrast compared with the whole
        range (e.g. a dense sample on a dark background).
    n_candidates, n_refine : int
        Distinct coarse candidates searched again at the finer level, and
        finalists refined with Powell (the best one is kept).
    refine, bspline : bool
        Run the Powell refinement / the B-spline correction.
    bspline_mesh : int, optional
        B-spline control-grid cells per side (default: one per ~24 voxels of
        the image, 2 to 12; a finer grid over-fits mutual information on small
        images).
    bspline_iterations : int
        LBFGSB iterations of the B-spline stage.
    min_overlap : float in (0, 1]
        A plane is only considered when at least this fraction of the image lies
        inside the volume; if even the best plane has less, a ``ValueError``
        says the section is not inside the volume.
    warn_below : float
        Warn when ``SlicePlane.confidence`` is below this. On synthetic
        sections true matches scored 1.3-2.2 (lower for small images), unrelated
        images about 1.0, and sections from just outside the scanned region or
        from a similar sample up to 1.35 -- so the warning catches clear
        mismatches only; treat the confidence as a hint and look at
        ``SlicePlane.stages``.
    cval : float
        CT value used outside the volume in ``ct_slice``.
    seed : int
        Seed of the metric sampling in the B-spline stage (large images).
    progress : bool
        tqdm progress bar over the coarse search.

    Returns
    -------
    SlicePlane

    Raises
    ------
    ValueError
        Bad inputs, a ``search_range`` outside the volume, an image larger than
        the volume can contain, or no plane with ``min_overlap`` of the section
        inside the volume.

    Warns
    -----
    RuntimeWarning
        When the match is doubtful (``confidence`` < ``warn_below``: the section
        fits the plane hardly better than its own flipped or rotated copies): it
        may come from outside the scanned region or from another sample.

    Examples
    --------
    >>> from tomoml_nb import phantoms
    >>> ph = phantoms.bone_implant((40, 48, 48), seed=0)
    >>> s = oblique_sections(ph, 1, seed=1, max_tilt_deg=5)[0]
    >>> plane = register_slice(s["image"], ph.image, max_tilt_deg=6, bspline=False, progress=False)
    >>> err = plane_errors(plane, s["origin"], s["rotation"])
    >>> bool(err["angle_deg"] < 3 and err["offset"] < 2)
    True
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    img = _as_image(image2d, "image2d")
    vol = as_array(volume, "volume", ndim=3, dtype=np.float32, nonconstant=True)
    if min(vol.shape) < 4:
        raise ValueError(f"volume: every axis needs at least 4 voxels, got {vol.shape}")
    check_positive(voxel_size, "voxel_size")
    py, px = _pair(pixel_size, "pixel_size")
    spacing = (py / float(voxel_size), px / float(voxel_size))
    check_choice(axis, "axis", _AXES)
    check_positive(max_tilt_deg, "max_tilt_deg", allow_zero=True)
    if max_tilt_deg > 60:
        raise ValueError(f"max_tilt_deg: must be <= 60 (use axis= for another cutting direction), got {max_tilt_deg!r}")
    check_positive(max_spin_deg, "max_spin_deg", allow_zero=True)
    if max_spin_deg > 180:
        raise ValueError(f"max_spin_deg: must be <= 180, got {max_spin_deg!r}")
    if mirror not in (False, True, "auto"):
        raise ValueError(f"mirror: expected False, True or 'auto', got {mirror!r}")
    bins = check_positive(bins, "bins", integer=True)
    if bins < 2:
        raise ValueError(f"bins: need at least 2 bins, got {bins}")
    check_choice(binning, "binning", ("uniform", "hybrid"))
    n_candidates = check_positive(n_candidates, "n_candidates", integer=True)
    n_refine = check_positive(n_refine, "n_refine", integer=True)
    check_positive(warn_below, "warn_below", allow_zero=True)
    check_positive(min_overlap, "min_overlap")
    if min_overlap > 1:
        raise ValueError(f"min_overlap: must be in (0, 1], got {min_overlap!r}")
    if bspline_mesh is not None:
        bspline_mesh = check_positive(bspline_mesh, "bspline_mesh", integer=True)
    bspline_iterations = check_positive(bspline_iterations, "bspline_iterations", integer=True)

    H, W = img.shape[:2]
    # the image on the CT voxel grid (the search works in voxels)
    ext = ((H - 1) * spacing[0], (W - 1) * spacing[1])            # extent in voxels
    Hv, Wv = int(round(ext[0])) + 1, int(round(ext[1])) + 1
    if min(Hv, Wv) < 8:
        raise ValueError(f"pixel_size: the image covers only {Hv} x {Wv} voxels of the volume; "
                         "need at least 8 x 8 (check pixel_size / voxel_size)")
    diag = float(np.linalg.norm(vol.shape))
    if min(ext) > diag:
        raise ValueError(f"image2d: at pixel_size {spacing} voxels the image spans {ext[0]:.0f} x {ext[1]:.0f} "
                         f"voxels, larger than any section of the volume {vol.shape}; check pixel_size")
    sig = [max(0.0, 0.5 * (1.0 / s - 1.0)) for s in spacing]       # anti-alias before shrinking
    ii = np.linspace(0, H - 1, Hv)
    jj = np.linspace(0, W - 1, Wv)
    # discrete image classes for mutual information, at full resolution and on the voxel grid
    lab_full, k_img = _image_labels(img, bins, seed, binning)
    lab_v = _resample_labels(lab_full, k_img, ii, jj, sig)
    if img.ndim == 2:   # grey sections: finer bins for the refinement
        lab_fine_full, k_fine = _image_labels(img, 2 * bins, seed, binning)
        lab_fine = _resample_labels(lab_fine_full, k_fine, ii, jj, sig)
    else:
        lab_fine_full, k_fine, lab_fine = lab_full, k_img, lab_v
    sp_v = (ext[0] / max(Hv - 1, 1), ext[1] / max(Wv - 1, 1))      # ~1 voxel
    if bspline_mesh is None:
        bspline_mesh = int(np.clip(round(min(Hv, Wv) / 24), 2, 12))

    base = _BASE_FRAMES[axis]
    ax_i = _AXES.index(axis)
    n_ax = vol.shape[ax_i]
    lo, hi = _check_range_or_none(search_range, "search_range", n_ax - 1)
    centre = (np.asarray(vol.shape, np.float64) - 1) / 2.0
    cross = [vol.shape[k] for k in range(3) if k != ax_i]
    if max_shift is None:
        max_shift = 0.25 * max(cross)
    check_positive(max_shift, "max_shift", allow_zero=True)
    if coarse_step is None:
        coarse_step = max(1, int(round(max(Hv, Wv) / 24)))
    coarse_step = check_positive(coarse_step, "coarse_step", integer=True)
    if tilt_step_deg is None:
        # a tilt step that moves the image edge by about one coarse voxel, within 2-5 degrees
        tilt_step_deg = float(np.clip(np.degrees(np.arctan(coarse_step / (0.5 * max(Hv, Wv)))), 2.0, 5.0))
    check_positive(tilt_step_deg, "tilt_step_deg")
    if spin_step_deg is None:
        spin_step_deg = tilt_step_deg
    check_positive(spin_step_deg, "spin_step_deg")
    mirrors = (False, True) if mirror == "auto" else (bool(mirror),)

    # ---------------- stage 1: coarse, two levels -------------------------------------------------
    stages = []
    edges_cache = {}

    def level(step, shift):
        sm = ndi.gaussian_filter(vol, 0.5 * step) if step > 1 else vol
        if step not in edges_cache:
            edges_cache[step] = _edges(sm, bins, binning)
        return _CoarseLevel(sm, edges_cache[step], lab_v, k_img, step, shift, min_overlap)

    def frame(tilt, spin, mir):
        R = _local_rotate(base, np.radians([spin, tilt[0], tilt[1]]))
        if mir:
            R = R.copy()
            R[2] = -R[2]
        return R

    def search(lev, items, desc):
        """items: (tilt, spin, mirror, centres (n, 3)); best shift per centre -> list of candidates."""
        results = []
        for tilt, spin, mir, centres in tqdm(items, desc=desc, disable=not progress, leave=False):
            R = frame(tilt, spin, mir)
            sc = lev.scores(centres, R)
            flat = sc.reshape(len(centres), -1)
            best = np.argmax(flat, axis=1)
            for k in range(len(centres)):
                v = flat[k, best[k]]
                if np.isfinite(v):
                    si, sj = divmod(int(best[k]), sc.shape[-1])
                    origin = centres[k] + (si - lev.m) * lev.step * R[1] + (sj - lev.m) * lev.step * R[2]
                    results.append({"score": float(v), "tilt": tuple(tilt), "spin": float(spin), "mirror": mir,
                                    "pos": float(origin[ax_i]), "origin": origin, "rotation": R})
        results.sort(key=lambda r: -r["score"])
        return results

    def distinct(results, n, dpos, dtilt, dspin):
        """Non-maximum suppression: the ``n`` best candidates that differ in position or orientation."""
        keep = []
        for r in results:
            if all(abs(r["pos"] - q["pos"]) > dpos or r["mirror"] != q["mirror"] or abs(r["spin"] - q["spin"]) > dspin
                   or np.hypot(r["tilt"][0] - q["tilt"][0], r["tilt"][1] - q["tilt"][1]) > dtilt for q in keep):
                keep.append(r)
            if len(keep) == n:
                break
        return keep

    step1 = coarse_step
    lev1 = level(step1, max_shift)
    pos1 = np.arange(lo, hi + 1e-9, step1) if hi > lo else np.array([lo])
    line = np.repeat(centre[None], len(pos1), axis=0)
    line[:, ax_i] = pos1
    items1 = [(t, sp, mi, line) for t in _tilt_grid(max_tilt_deg, tilt_step_deg)
              for sp in _spin_grid(max_spin_deg, spin_step_deg) for mi in mirrors]
    res1 = search(lev1, items1, "coarse search")
    if not res1:
        raise ValueError(f"image2d: no plane within search_range ({lo:g}..{hi:g} along {axis}) keeps "
                         f"{min_overlap:.0%} of the section inside the volume; the section lies outside the "
                         "scanned volume (or pixel_size / max_shift are wrong)")

    # level 2: half the step and half the angular step, around the best distinct level-1 candidates
    step2 = max(1, step1 // 2)
    seeds = distinct(res1, n_candidates, step1, tilt_step_deg * 1.01, spin_step_deg * 1.01)
    lev2 = level(step2, step1)
    half, spin_half = tilt_step_deg / 2.0, spin_step_deg / 2.0
    items2 = []
    for r in seeds:
        offs = np.array([-step2, 0.0, step2]) if step2 < step1 else np.array([-0.5, 0.0, 0.5]) * step1
        cen = np.repeat(r["origin"][None], len(offs), axis=0)
        cen[:, ax_i] = np.clip(cen[:, ax_i] + offs, lo, hi)
        cen = np.unique(cen, axis=0)
        for a in (-half, 0.0, half):
            for b in (-half, 0.0, half):
                for sp in ((-spin_half, 0.0, spin_half) if max_spin_deg > 0 else (0.0,)):
                    items2.append(((r["tilt"][0] + a, r["tilt"][1] + b), r["spin"] + sp, r["mirror"], cen))
    res2 = search(lev2, items2, "coarse search (level 2)") or res1
    finalists = distinct(res2, n_refine if refine else 1, step1, tilt_step_deg * 1.01, spin_step_deg * 1.01)
    origin, R = finalists[0]["origin"].copy(), finalists[0]["rotation"].copy()
    fine_vol = ndi.gaussian_filter(vol, 0.5)

    def stage_record(name, o, Rm, disp=None):
        coords = plane_coordinates(o, Rm, (H, W), spacing)
        if disp is not None:
            coords = coords + (disp[0][None] * spacing[0] * Rm[1][:, None, None]
                               + disp[1][None] * spacing[1] * Rm[2][:, None, None]).astype(np.float32)
        ct = ndi.map_coordinates(vol, coords, order=1, mode="constant", cval=cval, output=np.float32)
        inside = _inside_mask(coords, vol.shape)
        score = _label_nmi(lab_fine_full, k_fine, ct, inside) if inside.sum() > 16 else 1.0
        stages.append({"name": name, "origin": np.asarray(o, np.float64).copy(), "rotation": Rm.copy(),
                       "score": float(score), "ct_slice": ct, "inside": inside,
                       "seconds": time.perf_counter() - t0})
        return coords, ct, inside, score

    stage_record("coarse", origin, R)

    # ---------------- stages 2 and 3: Powell on 6 rigid parameters, in-plane B-spline -----------------
    metric = _FineMetric(fine_vol, lab_fine, k_fine, sp_v, bins=16, min_overlap=min_overlap, binning=binning)
    t_lim = 2.0 * tilt_step_deg
    d_lim = 2.0 * step1 + 1.0
    bounds = [(-t_lim, t_lim)] * 3 + [(-d_lim, d_lim)] * 3
    if max_spin_deg <= 0:
        bounds[0] = (-max(3.0, tilt_step_deg), max(3.0, tilt_step_deg))

    def powell(cands):
        from scipy.optimize import minimize

        best_val, best_plane = np.inf, None
        for o0, R0 in cands:
            def params_to_plane(p, o0=o0, R0=R0):
                return o0 + p[3] * R0[0] + p[4] * R0[1] + p[5] * R0[2], _local_rotate(R0, np.radians(p[:3]))

            opt = minimize(lambda p, f=params_to_plane: -metric(*f(p)), np.zeros(6), method="Powell",
                           bounds=bounds, options={"xtol": 0.03, "ftol": 1e-5, "maxfev": 1000})
            if opt.fun < best_val:
                best_val, best_plane = float(opt.fun), params_to_plane(opt.x)
        return best_plane

    def bspline_pass(o, Rm):
        """Deformable in-plane correction on the rigid plane (o, Rm); displacement in image pixels or None."""
        margin = 4.0 + 0.1 * max(ext)
        mv = np.arange(-ext[0] / 2 - margin, ext[0] / 2 + margin + 1e-9, 1.0)
        mu = np.arange(-ext[1] / 2 - margin, ext[1] / 2 + margin + 1e-9, 1.0)
        cm = o[:, None, None] + mv[None, :, None] * Rm[1][:, None, None] + mu[None, None, :] * Rm[2][:, None, None]
        plane_img = ndi.map_coordinates(vol, cm, order=1, mode="constant", cval=cval, output=np.float32)
        # fixed image: each image class painted with its mean CT value on the rigid plane (a pseudo-CT;
        # Mattes MI still copes with what this mapping gets wrong)
        coords = plane_coordinates(o, Rm, (H, W), spacing)
        ct_rigid = ndi.map_coordinates(vol, coords, order=1, mode="constant", cval=cval, output=np.float32)
        m_rigid = _inside_mask(coords, vol.shape)
        means = np.array([ct_rigid[(lab_fine_full == c) & m_rigid].mean() if np.any((lab_fine_full == c) & m_rigid)
                          else float(cval) for c in range(k_fine)], np.float32)
        pseudo = ndi.gaussian_filter(means[lab_fine_full], 0.5)
        try:
            phys = _bspline_2d(pseudo, plane_img, spacing, (mv[0], mu[0]), bspline_mesh, bspline_iterations, seed)
        except RuntimeError as exc:  # pragma: no cover - SimpleITK failure on degenerate images
            warnings.warn(f"bspline: SimpleITK registration failed ({exc}); keeping the rigid plane",
                          RuntimeWarning, stacklevel=3)
            return None
        return np.stack([phys[0] / spacing[0], phys[1] / spacing[1]]).astype(np.float32)

    final = stages[-1]
    disp = None
    if refine:
        origin, R = powell([(f["origin"].copy(), f["rotation"].copy()) for f in finalists])
        stage_record("refined", origin, R)
        final = stages[-1]
    if bspline:
        d = bspline_pass(origin, R)
        if d is not None:
            stage_record("bspline", origin, R, d)
            if stages[-1]["score"] < final["score"] - 1e-3:
                # the deformable step made the match worse (tiny or textureless image): keep the rigid one
                stages[-1]["name"] = "bspline (rejected)"
            else:
                disp, final = d, stages[-1]
        if refine and disp is not None:
            # pass 2: re-fit the rigid plane with the sectioning deformation taken out (it biases the tilt),
            # then re-fit the deformation on the new plane
            dv = np.stack([ndi.map_coordinates(disp[c] * spacing[c], np.meshgrid(ii, jj, indexing="ij"), order=1,
                                               mode="nearest") for c in range(2)])
            metric.set_displacement(dv)
            o2, R2 = powell([(origin.copy(), R.copy())])
            metric.set_displacement(None)
            d2 = bspline_pass(o2, R2)
            if d2 is not None:
                stage_record("refined + bspline (pass 2)", o2, R2, d2)
                if stages[-1]["score"] >= final["score"] - 1e-3:
                    origin, R, disp, final = o2, R2, d2, stages[-1]
                else:
                    stages[-1]["name"] += " (rejected)"
    coords = plane_coordinates(origin, R, (H, W), spacing)
    if disp is not None:
        coords = coords + (disp[0][None] * spacing[0] * R[1][:, None, None]
                           + disp[1][None] * spacing[1] * R[2][:, None, None]).astype(np.float32)
    inside_mask = _inside_mask(coords, vol.shape)
    inside = float(inside_mask.mean())
    if inside < min_overlap:
        raise ValueError(f"image2d: the best-matching plane has only {inside:.0%} of the section inside the "
                         f"volume (min_overlap={min_overlap}); the section lies outside the scanned volume")
    confidence = _dihedral_confidence(lab_fine_full, k_fine, final["ct_slice"], inside_mask)
    if confidence < warn_below:
        warnings.warn(f"image2d: the match is doubtful -- the section fits the best plane hardly better than its "
                      f"own flipped/rotated copies do (confidence {confidence:.2f} < {warn_below}); it may come from "
                      "outside the scanned region or from another sample, or search_range / max_tilt_deg / "
                      "max_shift exclude its true position -- check SlicePlane.stages visually",
                      RuntimeWarning, stacklevel=2)
    return SlicePlane(origin=np.asarray(origin, np.float64), rotation=np.asarray(R, np.float64),
                      ct_slice=final["ct_slice"], score=float(final["score"]), displacement=disp,
                      coords=coords, inside=inside, confidence=float(confidence), pixel_size=spacing,
                      stages=stages, seconds=time.perf_counter() - t0)


def _dihedral_confidence(labels, k, ct, mask):
    """How much better the image matches its plane than its flipped / rotated copies do.

    ``(NMI - 1) / (max NMI of the copies - 1)``: the copies keep the grey-value
    statistics and the overlap, only the spatial correspondence is destroyed, so
    a real match scores well above 1 and a chance match about 1.
    """
    best = _label_nmi(labels, k, ct, mask)
    variants = [labels[::-1, ::-1], labels[::-1], labels[:, ::-1]]
    if labels.shape[0] == labels.shape[1]:
        variants += [np.rot90(labels, 1), np.rot90(labels, 3), labels.T, labels[::-1, ::-1].T]
    null = max(_label_nmi(np.ascontiguousarray(v), k, ct, mask) for v in variants)
    return float((best - 1.0) / max(null - 1.0, 1e-6))


def plane_errors(plane, origin, rotation, shape=None, pixel_size=None):
    """Errors of an estimated plane against the true one.

    Parameters
    ----------
    plane : SlicePlane or (origin, rotation)
        The estimate.
    origin, rotation : array_like
        The true plane (rows of ``rotation``: normal, v, u).
    shape : (int, int), optional
        Image shape for the point error (default ``plane.ct_slice.shape``).
    pixel_size : float, optional
        Image pixel size in voxels (default ``plane.pixel_size`` or 1).

    Returns
    -------
    dict
        ``angle_deg`` -- angle between the plane normals (degrees);
        ``offset`` -- distance (voxels) of the estimated image centre from the
        true plane; ``mean_point_error`` / ``max_point_error`` -- 3D distance
        between where each image pixel is placed by the estimate and by the
        truth (rigid planes; includes in-plane shift and spin).

    Examples
    --------
    >>> e = plane_errors((np.array([10.0, 8, 8]), np.eye(3)), (11.0, 8, 8), np.eye(3), shape=(16, 16))
    >>> e["angle_deg"], e["offset"]
    (0.0, 1.0)
    """
    if isinstance(plane, SlicePlane):
        o_e, R_e = plane.origin, plane.rotation
        if shape is None:
            shape = plane.ct_slice.shape
        if pixel_size is None:
            pixel_size = plane.pixel_size
    else:
        o_e, R_e = plane
    o_e = as_array(o_e, "plane origin", ndim=1, dtype=np.float64)
    R_e = as_array(R_e, "plane rotation", ndim=2, dtype=np.float64)
    o_t = as_array(origin, "origin", ndim=1, dtype=np.float64)
    R_t = as_array(rotation, "rotation", ndim=2, dtype=np.float64)
    if o_t.shape != (3,) or R_t.shape != (3, 3):
        raise ValueError(f"rotation: expected origin (3,) and rotation (3, 3), got {o_t.shape} and {R_t.shape}")
    n_e, n_t = R_e[0] / np.linalg.norm(R_e[0]), R_t[0] / np.linalg.norm(R_t[0])
    angle = float(np.degrees(np.arccos(np.clip(abs(float(n_e @ n_t)), 0.0, 1.0))))
    offset = float(abs((o_e - o_t) @ n_t))
    out = {"angle_deg": angle, "offset": offset}
    if shape is not None:
        sp = 1.0 if pixel_size is None else pixel_size
        ce = plane_coordinates(o_e, R_e, shape, sp).astype(np.float64)
        ct = plane_coordinates(o_t, R_t, shape, sp).astype(np.float64)
        d = np.sqrt(((ce - ct) ** 2).sum(0))
        out["mean_point_error"] = float(d.mean())
        out["max_point_error"] = float(d.max())
    return out


# --------------------------------------------------------------------------- synthetic sections
def oblique_sections(phantom, n_sections=8, seed=0, *, max_tilt_deg=10.0, max_spin_deg=0.0, max_shift=4.0,
                     shape=None, stain="he", deformation=2.0, compression=0.03, implant="opaque",
                     position_range=(0.3, 0.7)):
    """Synthetic stained sections cut at random oblique planes through a phantom, with their truth.

    Each section: a random plane (:func:`tomoml_nb.phantoms.random_plane`, tilt up
    to ``max_tilt_deg`` from z, centre within ``max_shift`` voxels of the volume's
    centre line in y and x), the CT and labels on that plane
    (:func:`tomoml_nb.phantoms.oblique_slice`), and a stained, deformed image of
    it (:func:`tomoml_nb.phantoms.histology`).

    Parameters
    ----------
    phantom : Phantom or (image, labels)
        Volume and class labels 0..4 (:func:`tomoml_nb.phantoms.bone_implant`).
    n_sections : int
        Number of sections.
    seed : int
        Seed of planes and staining.
    max_tilt_deg, max_spin_deg : float
        Tilt of the normal from z, in-plane rotation.
    max_shift : float
        Largest in-plane offset of the section centre from the volume centre line.
    shape : (int, int), optional
        Image size (default ``volume.shape[1:]``).
    stain, deformation, compression, implant
        Passed to :func:`tomoml_nb.phantoms.histology`.
    position_range : (float, float)
        Range of the section centre along z, as fractions of the volume height.

    Returns
    -------
    list of dict
        ``image`` (RGB histology, float32 (H, W, 3)), ``origin``, ``rotation``
        (the true plane), ``ct`` (the CT on the true plane, undeformed geometry),
        ``labels`` (classes in histology geometry), ``undeformed`` (the stained
        image before the sectioning deformation, aligned with ``ct``),
        ``displacement`` (the sectioning deformation, see
        :func:`tomoml_nb.phantoms.histology`), ``seed``.

    Examples
    --------
    >>> from tomoml_nb import phantoms
    >>> ph = phantoms.bone_implant((32, 40, 40), seed=0)
    >>> secs = oblique_sections(ph, 2, seed=0)
    >>> secs[0]["image"].shape, secs[0]["ct"].shape
    ((40, 40, 3), (40, 40))
    """
    from . import phantoms

    if isinstance(phantom, phantoms.Phantom) or (isinstance(phantom, (tuple, list)) and len(phantom) == 2):
        image, labels = phantom
    else:
        raise TypeError(f"phantom: expected a Phantom or an (image, labels) pair, got {type(phantom).__name__}")
    vol = as_array(image, "phantom image", ndim=3, dtype=np.float32)
    lab = as_array(labels, "phantom labels", ndim=3)
    if lab.shape != vol.shape:
        raise ValueError(f"phantom labels: shape {lab.shape} differs from image shape {vol.shape}")
    n_sections = check_positive(n_sections, "n_sections", integer=True)
    check_positive(max_shift, "max_shift", allow_zero=True)
    try:
        f0, f1 = (float(v) for v in position_range)
    except Exception as exc:
        raise TypeError(f"position_range: expected a pair of fractions, got {position_range!r}") from exc
    if not 0 <= f0 <= f1 <= 1:
        raise ValueError(f"position_range: expected 0 <= low <= high <= 1, got {position_range!r}")
    if shape is None:
        shape = vol.shape[1:]
    rng = rng_from(seed)
    centre = (np.asarray(vol.shape, np.float64) - 1) / 2.0
    out = []
    for _ in range(n_sections):
        s_plane, s_stain = (int(v) for v in rng.integers(0, 2**31 - 1, 2))
        _, R = phantoms.random_plane(vol.shape, max_tilt_deg, seed=s_plane, max_spin_deg=max_spin_deg)
        r2 = np.random.default_rng(s_plane)
        origin = centre.copy()
        origin[0] = r2.uniform(f0, f1) * (vol.shape[0] - 1)
        shift = r2.uniform(-max_shift, max_shift, 2)
        origin = origin + shift[0] * R[1] + shift[1] * R[2]
        ct = phantoms.oblique_slice(vol, origin, R, shape=shape, order=1)
        lab2 = phantoms.oblique_slice(lab, origin, R, shape=shape, order=0).astype(np.uint8)
        rgb, info = phantoms.histology(ct, np.clip(lab2, 0, 4), seed=s_stain, stain=stain, deformation=deformation,
                                       compression=compression, implant=implant)
        out.append({"image": rgb, "origin": origin, "rotation": R, "ct": ct, "labels": info["labels"],
                    "undeformed": info["undeformed"], "displacement": info["displacement"], "seed": s_stain})
    return out


# --------------------------------------------------------------------------- classical baseline
@dataclass(eq=False)
class Lookup:
    """Attenuation-to-stain lookup table fitted by :func:`fit_lookup`.

    Attributes
    ----------
    edges : ndarray (bins + 1,)
        CT value bin edges.
    colours : ndarray (bins, C)
        Colour (RGB, C = 3) or grey value (C = 1) per bin; empty bins are
        interpolated from their neighbours.
    counts : ndarray (bins,)
        Training pixels per bin.
    statistic : str
        ``"median"`` or ``"mean"``.
    smooth : float
        Gaussian pre-filter (pixels) applied to the CT before the lookup.
    """

    edges: np.ndarray
    colours: np.ndarray
    counts: np.ndarray
    statistic: str = "median"
    smooth: float = 0.0

    @property
    def channels(self):
        return self.colours.shape[1]

    @property
    def centres(self):
        return 0.5 * (self.edges[1:] + self.edges[:-1])


def _pair_lists(ct_slices, histo_images, paired=True):
    """Validate lists of CT slices and histology images; returns lists of float32 arrays and C."""
    single = not isinstance(ct_slices, (list, tuple)) and np.ndim(ct_slices) == 2
    cts = list(ct_slices) if isinstance(ct_slices, (list, tuple)) else (
        [ct_slices] if single else list(np.asarray(ct_slices)))
    if isinstance(histo_images, (list, tuple)):
        his = list(histo_images)
    elif single or np.ndim(histo_images) == 2:
        his = [histo_images]
    else:
        his = list(np.asarray(histo_images))
    if not cts:
        raise ValueError("ct_slices: no slices given")
    if not his:
        raise ValueError("histo_images: no images given")
    cts = [as_array(c, f"ct_slices[{i}]", ndim=2, dtype=np.float32) for i, c in enumerate(cts)]
    his = [_as_image(h, f"histo_images[{i}]") for i, h in enumerate(his)]
    chans = {1 if h.ndim == 2 else 3 for h in his}
    if len(chans) > 1:
        raise ValueError("histo_images: mixes grey and RGB images; convert them to one kind")
    if paired:
        if len(cts) != len(his):
            raise ValueError(f"histo_images: {len(his)} images for {len(cts)} CT slices (paired=True needs one "
                             "registered image per slice)")
        for i, (c, h) in enumerate(zip(cts, his)):
            if c.shape != h.shape[:2]:
                raise ValueError(f"histo_images[{i}]: shape {h.shape[:2]} differs from ct_slices[{i}] shape "
                                 f"{c.shape}; register first (SlicePlane.ct_slice lies on the image grid)")
    return cts, his, chans.pop()


def fit_lookup(ct_slices, histo_images, bins=64, *, statistic="median", ct_range=None, smooth=0.0, masks=None):
    """Fit the classical virtual-histology baseline: a lookup from CT value to stain colour.

    Local X-ray attenuation is binned and each bin gets the median (or mean)
    colour of the registered histology pixels that fall in it -- the published
    "colourise the absorption values according to the staining" approach.

    Parameters
    ----------
    ct_slices : list of ndarray (H, W)
        Registered CT slices (e.g. ``SlicePlane.ct_slice``).
    histo_images : list of ndarray (H, W, 3) or (H, W)
        The matching histology images (RGB) or grey images of another modality.
    bins : int
        Number of CT bins (uniform over ``ct_range``).
    statistic : {"median", "mean"}
        Colour statistic per bin.
    ct_range : (float, float), optional
        CT range of the bins (default: 0.5 and 99.5 percentiles of the training CT).
    smooth : float
        Gaussian pre-filter (pixels) of the CT before binning, here and in
        :func:`colourise` (0 = the plain lookup).
    masks : list of ndarray of bool, optional
        Pixels to use per pair (e.g. inside the volume).

    Returns
    -------
    Lookup

    Examples
    --------
    >>> ct = np.tile(np.linspace(0, 1, 32, dtype=np.float32), (32, 1))
    >>> rgb = np.stack([ct, 1 - ct, 0.5 * np.ones_like(ct)], -1)
    >>> lut = fit_lookup([ct], [rgb], bins=16)
    >>> float(np.abs(colourise(ct, lut) - rgb).max()) < 0.05
    True
    """
    cts, his, C = _pair_lists(ct_slices, histo_images, paired=True)
    bins = check_positive(bins, "bins", integer=True)
    if bins < 2:
        raise ValueError(f"bins: need at least 2 bins, got {bins}")
    check_choice(statistic, "statistic", ("median", "mean"))
    check_positive(smooth, "smooth", allow_zero=True)
    if masks is not None:
        masks = list(masks)
        if len(masks) != len(cts):
            raise ValueError(f"masks: {len(masks)} masks for {len(cts)} pairs")
        masks = [np.asarray(m, bool) for m in masks]
        for i, (m, c) in enumerate(zip(masks, cts)):
            if m.shape != c.shape:
                raise ValueError(f"masks[{i}]: shape {m.shape} differs from ct_slices[{i}] shape {c.shape}")
    if smooth > 0:
        cts = [ndi.gaussian_filter(c, smooth) for c in cts]
    v = np.concatenate([c[m].ravel() if masks else c.ravel() for c, m in zip(cts, masks or [None] * len(cts))])
    col = np.concatenate([(h[m] if masks else h.reshape(-1, *h.shape[2:])).reshape(-1, C)
                          for h, m in zip(his, masks or [None] * len(his))])
    if v.size < bins:
        raise ValueError(f"ct_slices: only {v.size} pixels for {bins} bins")
    if ct_range is None:
        lo, hi = _robust_range(v)
    else:
        lo, hi = (float(x) for x in ct_range)
        if not hi > lo:
            raise ValueError(f"ct_range: expected low < high, got {ct_range!r}")
    edges = np.linspace(lo, hi, bins + 1)
    idx = _digitize(v, edges)
    counts = np.bincount(idx, minlength=bins)
    colours = np.full((bins, C), np.nan)
    order = np.argsort(idx, kind="stable")
    splits = np.split(order, np.cumsum(counts)[:-1])
    for b, sel in enumerate(splits):
        if sel.size:
            colours[b] = np.median(col[sel], axis=0) if statistic == "median" else col[sel].mean(0)
    good = counts > 0
    centres = 0.5 * (edges[1:] + edges[:-1])
    for c in range(C):
        colours[~good, c] = np.interp(centres[~good], centres[good], colours[good, c])
    return Lookup(edges=edges, colours=colours.astype(np.float32), counts=counts, statistic=statistic,
                  smooth=float(smooth))


def colourise(volume, lookup, *, out=None, chunk=16):
    """Colourise CT values with a :class:`Lookup` (the classical virtual histology).

    Colours are linearly interpolated between bin centres; values outside the
    fitted range take the end colours.

    Parameters
    ----------
    volume : ndarray, 2D slice or 3D volume
        CT values.
    lookup : Lookup
        From :func:`fit_lookup`.
    out : array-like, optional
        Output array of shape ``volume.shape + (C,)`` (RGB) or ``volume.shape``
        (grey), e.g. an ``np.memmap``; filled chunk by chunk along axis 0.
    chunk : int
        Slices per chunk for 3D input (bounds memory).

    Returns
    -------
    ndarray float32, ``volume.shape + (3,)`` for RGB lookups, ``volume.shape`` for grey.

    Examples
    --------
    >>> ct = np.tile(np.linspace(0, 1, 16, dtype=np.float32), (16, 1))
    >>> lut = fit_lookup([ct], [np.stack([ct] * 3, -1)], bins=8)
    >>> colourise(ct, lut).shape
    (16, 16, 3)
    """
    if not isinstance(lookup, Lookup):
        raise TypeError(f"lookup: expected a Lookup from fit_lookup, got {type(lookup).__name__}")
    shape = tuple(np.shape(volume))
    if len(shape) not in (2, 3):
        raise ValueError(f"volume: expected a 2D slice or a 3D volume, got shape {shape}")
    chunk = check_positive(chunk, "chunk", integer=True)
    C = lookup.channels
    oshape = shape + (C,) if C > 1 else shape
    if out is None:
        out = np.empty(oshape, np.float32)
    elif tuple(out.shape) != oshape:
        raise ValueError(f"out: expected shape {oshape}, got {tuple(out.shape)}")
    centres = lookup.centres

    def one(block):
        v = as_array(block, "volume", dtype=np.float32)
        if lookup.smooth > 0:
            v = ndi.gaussian_filter(v, lookup.smooth) if v.ndim == 2 else np.stack(
                [ndi.gaussian_filter(s, lookup.smooth) for s in v])
        res = np.stack([np.interp(v, centres, lookup.colours[:, c]) for c in range(C)], -1).astype(np.float32)
        return res if C > 1 else res[..., 0]

    if len(shape) == 2:
        out[...] = one(volume)
    else:
        for z0 in range(0, shape[0], chunk):
            out[z0:z0 + chunk] = one(np.asarray(volume[z0:z0 + chunk]))
    return out


# --------------------------------------------------------------------------- cycleGAN
_FORMAT = "tomoml_nb.histology.cyclegan/1"
_PRETRAINED = {"bone_implant": "cyclegan_bone_implant.pt"}


def _norm_ct(x, rng_):
    lo, hi = rng_
    return np.clip(2.0 * (x - lo) / (hi - lo) - 1.0, -1.0, 1.0).astype(np.float32)


def _to_net(img, config, domain):
    """numpy image -> float32 (C, H, W) in [-1, 1] for the domain ("a" = CT, "b" = histology)."""
    C = config["channels"]
    if domain == "a":
        x = _norm_ct(img, config["ct_range"])[None]
        return np.repeat(x, C, axis=0) if C > 1 else x
    if C == 3:
        return (2.0 * np.moveaxis(img, -1, 0) - 1.0).astype(np.float32)
    return _norm_ct(img, config["histo_range"])[None]


def _from_net(x, config, domain):
    """(C, H, W) in [-1, 1] -> numpy image in the domain's units."""
    if domain == "a":
        lo, hi = config["ct_range"]
        return ((x.mean(0) + 1.0) / 2.0 * (hi - lo) + lo).astype(np.float32)
    if config["channels"] == 3:
        return np.clip((np.moveaxis(x, 0, -1) + 1.0) / 2.0, 0, 1).astype(np.float32)
    lo, hi = config["histo_range"]
    return ((x[0] + 1.0) / 2.0 * (hi - lo) + lo).astype(np.float32)


class _CropSampler:
    """Random (paired or unpaired) crops with flips and 90-degree rotations."""

    def __init__(self, a_imgs, b_imgs, crop, paired, augment):
        self.a, self.b = a_imgs, b_imgs
        self.crop, self.paired, self.augment = crop, paired, augment

    def _crop(self, img, rng, pos=None):
        C, H, W = img.shape
        c = self.crop
        if H < c or W < c:
            img = np.pad(img, ((0, 0), (0, max(0, c - H)), (0, max(0, c - W))), mode="reflect")
            C, H, W = img.shape
        if pos is None:
            pos = (int(rng.integers(0, H - c + 1)), int(rng.integers(0, W - c + 1)))
        return img[:, pos[0]:pos[0] + c, pos[1]:pos[1] + c], pos

    def _aug(self, x, k, flip):
        x = np.rot90(x, k, axes=(1, 2))
        return x[:, :, ::-1] if flip else x

    def __call__(self, batch, rng):
        A, B = [], []
        for _ in range(batch):
            i = int(rng.integers(len(self.a)))
            a, pos = self._crop(self.a[i], rng)
            if self.paired:
                b, _ = self._crop(self.b[i], rng, pos)
            else:
                b, _ = self._crop(self.b[int(rng.integers(len(self.b)))], rng)
            if self.augment:
                k, flip = int(rng.integers(4)), bool(rng.integers(2))
                a = self._aug(a, k, flip)
                if self.paired:
                    b = self._aug(b, k, flip)
                else:
                    b = self._aug(b, int(rng.integers(4)), bool(rng.integers(2)))
            A.append(np.ascontiguousarray(a))
            B.append(np.ascontiguousarray(b))
        return np.stack(A), np.stack(B)


def _run_generator(net, x, dev, multiple):
    """Run a generator on a (N, C, H, W) float32 array with reflect padding to ``multiple``."""
    import torch

    H, W = x.shape[-2:]
    ph, pw = (-H) % multiple, (-W) % multiple
    t = torch.from_numpy(np.ascontiguousarray(x)).to(dev)
    if ph or pw:
        mode = "reflect" if min(H, W) > max(ph, pw) else "replicate"
        t = torch.nn.functional.pad(t, (0, pw, 0, ph), mode=mode)
    with torch.no_grad():
        y = net(t)
    return y[..., :H, :W].float().cpu().numpy()


def _check_slice_size(hw, config, name):
    """The generator halves the slice ``n_down`` times and reflect-pads the result: every
    side needs more than ``2**n_down`` pixels."""
    need = 2 ** config["n_down"] + 1
    if min(hw) < need:
        raise ValueError(f"{name}: slices of {hw[0]} x {hw[1]} pixels are too small for this network "
                         f"(n_down={config['n_down']}); every side needs at least {need} pixels")


def train_cyclegan(ct_slices, histo_images, paired=True, *, steps=1000, warmup_steps=0, crop=64, batch_size=4,
                   lr=5e-4, warmup_lr=None, lambda_cycle=10.0, lambda_identity=0.5, lambda_paired=100.0, identity_batch=1,
                   generator="unet",
                   base_channels=16, n_blocks=2, n_down=2, d_channels=32, d_layers=2, norm="none", augment=True,
                   ct_range=None,
                   model=None, val_pairs=None, val_every=100, checkpoint=None, checkpoint_every=100, resume=False,
                   device="auto", seed=0, progress=True, time_limit=None, num_threads=None):
    """Train a (paired) cycleGAN that translates CT slices into histology (and back).

    A CycleGAN: two ResNet generators (``g_ab``: CT -> histology, ``g_ba``:
    histology -> CT) and two PatchGAN discriminators, trained with the
    least-squares GAN loss, the cycle-consistency loss
    ``|g_ba(g_ab(a)) - a| + |g_ab(g_ba(b)) - b|`` (weight ``lambda_cycle``) and
    the identity loss ``|g_ab(b) - b| + |g_ba(a) - a|`` (weight
    ``lambda_identity * lambda_cycle``, as in the original; evaluated on the
    first ``identity_batch`` crops of each batch to save time). With
    ``paired=True`` -- registered pairs, the "modified" cycleGAN of virtual
    histology -- an L1 term ``|g_ab(a) - b| + |g_ba(b) - a|`` on the pairs
    (weight ``lambda_paired``) is added; with ``paired=False`` crops of the two
    domains are drawn independently (plain unpaired CycleGAN).

    Training uses random ``crop`` x ``crop`` crops of the few pairs with flips and
    90-degree rotations, Adam (betas 0.5, 0.999) for generators and
    discriminators, the learning rate constant for the first half and decaying
    linearly to 0 in the second half. With registered pairs, ``warmup_steps``
    cheap supervised steps (paired L1 only, both generators, no discriminator;
    about a fifth of the cost of a cycleGAN step) can come first, so the
    adversarial phase starts from generators that already map the tissues.

    Parameters
    ----------
    ct_slices : list of ndarray (H, W)
        Registered CT slices (``SlicePlane.ct_slice``).
    histo_images : list of ndarray (H, W, 3) or (H, W)
        Histology (RGB in [0, 1] or uint8) or grey images of another modality.
    paired : bool
        Pairs are registered pixel to pixel (adds the paired L1 term).
    steps, crop, batch_size, lr : int, int, int, float
        CycleGAN optimisation steps, crop size (a multiple of ``2**n_down``),
        crops per batch, learning rate.
    warmup_steps : int
        Supervised (paired L1) generator steps before the cycleGAN steps
        (``paired=True`` only).
    warmup_lr : float, optional
        Learning rate of the warm-up (default ``lr``); a lower ``lr`` for the
        adversarial phase keeps it from undoing the warm-up.
    lambda_cycle, lambda_identity, lambda_paired : float
        Loss weights (0 switches a term off).
    identity_batch : int
        Crops per batch used for the identity term.
    generator : {"unet", "resnet"}
        Generator architecture (:class:`tomoml_nb.models.cyclegan.UNetGenerator`,
        :class:`~tomoml_nb.models.cyclegan.ResnetGenerator`).
    base_channels, n_blocks, n_down : int
        Generator size.
    d_channels, d_layers : int
        Discriminator size.
    norm : {"instance", "batch", "none"}
        Normalisation of the generators (discriminators: instance norm).
        ``"none"`` by default: with instance norm the colour of a crop depends on
        its content, which shows as colour casts on whole slices.
    augment : bool
        Random flips and 90-degree rotations.
    ct_range : (float, float), optional
        CT values mapped to [-1, 1] (default: 0.5 and 99.5 percentiles of the
        training slices); stored with the model and reused for prediction.
    model : CycleGAN, optional
        Continue training this model (e.g. :func:`load_pretrained`; missing
        discriminators are created).
    val_pairs : list of (ct, histology), optional
        Held-out registered pairs; mean colour SSIM of the translation is
        recorded in ``history["val"]`` every ``val_every`` steps.
    checkpoint : path, optional
        Saved every ``checkpoint_every`` steps and at the end (generators,
        discriminators, both optimisers); with ``resume=True`` training continues
        from it. An existing file is refused without ``resume=True``
        (``FileExistsError``), and with it unless it is a tomoml_nb checkpoint of the
        same network (``ValueError``); see :func:`tomoml_nb.train.check_checkpoint_path`.
    device : str
        ``"auto"`` picks CUDA when available.
    seed : int
        Seeds the weights, crops and augmentation.
    progress : bool
        tqdm progress bar.
    time_limit : float, optional
        Stop after this many seconds.
    num_threads : int, optional
        Torch CPU threads during training (restored afterwards); 1 is fastest on
        a busy shared CPU.

    Returns
    -------
    CycleGAN
        In eval mode, with ``tomoml_config`` (architecture and intensity ranges)
        and ``tomoml_history`` (``loss_g``, ``loss_d``, ``val``, ``steps``,
        ``seconds``).

    Examples
    --------
    >>> from tomoml_nb import phantoms
    >>> ph = phantoms.bone_implant((24, 32, 32), seed=0)
    >>> secs = oblique_sections(ph, 2, seed=0, max_tilt_deg=0, deformation=0, compression=0)
    >>> net = train_cyclegan([s["ct"] for s in secs], [s["image"] for s in secs], steps=2, crop=16,
    ...                      batch_size=2, base_channels=4, n_blocks=1, progress=False)
    >>> translate(secs[0]["ct"], net).shape
    (32, 32, 3)
    """
    import torch
    from tqdm.auto import tqdm

    from .models.cyclegan import CycleGAN
    from .train import check_checkpoint_path, load_checkpoint, resolve_device, save_checkpoint, seed_everything

    cts, his, C = _pair_lists(ct_slices, histo_images, paired=paired)
    steps = check_positive(steps, "steps", integer=True)
    warmup_steps = check_positive(warmup_steps, "warmup_steps", integer=True, allow_zero=True)
    if warmup_steps and not paired:
        raise ValueError("warmup_steps: the supervised warm-up needs registered pairs (paired=True)")
    total = warmup_steps + steps
    crop = check_positive(crop, "crop", integer=True)
    batch_size = check_positive(batch_size, "batch_size", integer=True)
    check_positive(lr, "lr")
    warmup_lr = lr if warmup_lr is None else check_positive(warmup_lr, "warmup_lr")
    for nm, v in (("lambda_cycle", lambda_cycle), ("lambda_identity", lambda_identity),
                  ("lambda_paired", lambda_paired)):
        check_positive(v, nm, allow_zero=True)
    identity_batch = check_positive(identity_batch, "identity_batch", integer=True)
    check_choice(norm, "norm", ("instance", "batch", "none"))
    check_choice(generator, "generator", ("unet", "resnet"))
    val_every = check_positive(val_every, "val_every", integer=True)
    checkpoint_every = check_positive(checkpoint_every, "checkpoint_every", integer=True)
    checkpoint = check_checkpoint_path(checkpoint, resume)
    if num_threads is not None:
        num_threads = check_positive(num_threads, "num_threads", integer=True)
    dev = resolve_device(device)

    if model is not None:
        if not hasattr(model, "tomoml_config"):
            raise TypeError("model: expected a CycleGAN from train_cyclegan / load_model / load_pretrained")
        config = dict(model.tomoml_config)
        if config["channels"] != C:
            raise ValueError(f"histo_images: the model translates to {config['channels']} channel(s), the images "
                             f"have {C}")
    else:
        if ct_range is None:
            ct_range = _robust_range(np.concatenate([c.ravel() for c in cts]))
        histo_range = (0.0, 1.0) if C == 3 else _robust_range(np.concatenate([h.ravel() for h in his]))
        config = {"channels": C, "generator": generator, "base": int(base_channels), "n_blocks": int(n_blocks),
                  "n_down": int(n_down),
                  "d_base": int(d_channels), "d_layers": int(d_layers), "norm": norm,
                  "ct_range": tuple(float(x) for x in ct_range), "histo_range": tuple(float(x) for x in histo_range)}
    multiple = 2 ** config["n_down"]
    if crop % multiple:
        raise ValueError(f"crop: must be a multiple of {multiple} (2**n_down), got {crop}")

    old_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        seed_everything(seed)
        if model is None:
            model = CycleGAN(C, config["base"], config["n_down"], config["n_blocks"], config["d_base"],
                             config["d_layers"], config["norm"], generator=config.get("generator", "unet"))
        elif model.d_a is None:
            from .models.cyclegan import PatchDiscriminator

            model.d_a = PatchDiscriminator(C, config["d_base"], config["d_layers"], "instance")
            model.d_b = PatchDiscriminator(C, config["d_base"], config["d_layers"], "instance")
        model.to(dev)
        opt_g = torch.optim.Adam(model.generator_parameters(), lr=lr, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(model.discriminator_parameters(), lr=lr, betas=(0.5, 0.999))
        def decay(i):  # counted in cycleGAN steps
            return 1.0 if i < steps // 2 else max(0.0, (steps - i) / max(1, steps - steps // 2))

        sch_g = torch.optim.lr_scheduler.LambdaLR(opt_g, decay)
        sch_d = torch.optim.lr_scheduler.LambdaLR(opt_d, decay)
        history = {"loss_g": [], "loss_d": [], "loss_paired": [], "val": []}
        start = 0
        rng = np.random.default_rng(seed)
        if resume and checkpoint is not None and checkpoint.is_file():
            state = load_checkpoint(checkpoint, model, opt_g, map_location=dev)
            if "opt_d" in state:
                opt_d.load_state_dict(state["opt_d"])
            start = int(state.get("step", 0))
            history = state.get("history") or history
            with warnings.catch_warnings():   # fast-forwarding the schedule before any optimiser step
                warnings.simplefilter("ignore", UserWarning)
                for _ in range(max(0, start - warmup_steps)):
                    sch_g.step()
                    sch_d.step()
            rng = np.random.default_rng([seed, start])

        a_imgs = [_to_net(c, config, "a") for c in cts]
        b_imgs = [_to_net(h, config, "b") for h in his]
        sampler = _CropSampler(a_imgs, b_imgs, crop, paired, augment)
        val = [(_to_net(np.asarray(c, np.float32), config, "a"), _as_image(h, "val_pairs")) for c, h in
               (val_pairs or [])]
        l1 = torch.nn.functional.l1_loss

        def mse_to(x, target):
            return torch.mean((x - target) ** 2)

        def validate():
            from .metrics import ssim_rgb

            model.eval()
            vals = []
            for a, h in val:
                pred = _from_net(_run_generator(model.g_ab, a[None], dev, multiple)[0], config, "b")
                vals.append(ssim_rgb(pred, h) if C == 3 else _ssim_grey(pred, h))
            model.train()
            return float(np.mean(vals))

        t0 = time.perf_counter()
        model.train()
        bar = tqdm(range(start, total), desc="cycleGAN", disable=not progress, initial=start, total=total)
        step = start
        for step in bar:
            A, B = sampler(batch_size, rng)
            a = torch.from_numpy(A).to(dev)
            b = torch.from_numpy(B).to(dev)
            if step < warmup_steps:
                # ---- supervised warm-up: paired L1 only
                for g in opt_g.param_groups:
                    g["lr"] = warmup_lr
                lp = l1(model.g_ab(a), b) + l1(model.g_ba(b), a)
                opt_g.zero_grad(set_to_none=True)
                lp.backward()
                opt_g.step()
                history["loss_g"].append(float(lp.detach()) * lambda_paired)
                history["loss_d"].append(float("nan"))
                history["loss_paired"].append(float(lp.detach()))
                if progress and step % 10 == 0:
                    bar.set_postfix(warmup=f"{np.mean(history['loss_paired'][-10:]):.3f}")
                if val and (step + 1) % val_every == 0:
                    history["val"].append((step + 1, validate()))
                if checkpoint is not None and (step + 1) % checkpoint_every == 0:
                    save_checkpoint(checkpoint, model, opt_g, step + 1, history, opt_d=opt_d.state_dict(),
                                    config=config, overwrite=True)
                if time_limit is not None and time.perf_counter() - t0 > time_limit:
                    step += 1
                    break
                continue
            if step == warmup_steps and warmup_steps > 0:
                for g in opt_g.param_groups:
                    g["lr"] = g["initial_lr"] * decay(0)
            # ---- generators
            for p in model.discriminator_parameters():
                p.requires_grad_(False)
            fake_b = model.g_ab(a)
            fake_a = model.g_ba(b)
            loss_adv = mse_to(model.d_b(fake_b), 1.0) + mse_to(model.d_a(fake_a), 1.0)
            loss = loss_adv
            if lambda_cycle > 0:
                loss = loss + lambda_cycle * (l1(model.g_ba(fake_b), a) + l1(model.g_ab(fake_a), b))
            if lambda_identity > 0 and lambda_cycle > 0:
                k = min(identity_batch, batch_size)
                loss = loss + lambda_identity * lambda_cycle * (l1(model.g_ab(b[:k]), b[:k])
                                                                + l1(model.g_ba(a[:k]), a[:k]))
            lp = torch.zeros(())
            if paired and lambda_paired > 0:
                lp = l1(fake_b, b) + l1(fake_a, a)
                loss = loss + lambda_paired * lp
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss: became {loss.item()} at step {step}; lower lr")
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            opt_g.step()
            # ---- discriminators
            for p in model.discriminator_parameters():
                p.requires_grad_(True)
            loss_d = 0.5 * (mse_to(model.d_b(b), 1.0) + mse_to(model.d_b(fake_b.detach()), 0.0)
                            + mse_to(model.d_a(a), 1.0) + mse_to(model.d_a(fake_a.detach()), 0.0))
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            sch_g.step()
            sch_d.step()
            history["loss_g"].append(float(loss.detach()))
            history["loss_d"].append(float(loss_d.detach()))
            history["loss_paired"].append(float(lp.detach()))
            if progress and step % 10 == 0:
                bar.set_postfix(g=f"{np.mean(history['loss_g'][-10:]):.3f}",
                                d=f"{np.nanmean(history['loss_d'][-10:]):.3f}")
            if val and (step + 1) % val_every == 0:
                history["val"].append((step + 1, validate()))
            if checkpoint is not None and (step + 1) % checkpoint_every == 0:
                save_checkpoint(checkpoint, model, opt_g, step + 1, history, opt_d=opt_d.state_dict(),
                                config=config, overwrite=True)
            if time_limit is not None and time.perf_counter() - t0 > time_limit:
                step += 1
                break
        else:
            step = total
        bar.close()
        if val and (not history["val"] or history["val"][-1][0] != step):
            history["val"].append((step, validate()))
        if checkpoint is not None:
            save_checkpoint(checkpoint, model, opt_g, step, history, opt_d=opt_d.state_dict(), config=config,
                            overwrite=True)
        history["steps"] = step
        history["seconds"] = time.perf_counter() - t0
    finally:
        if num_threads is not None:
            torch.set_num_threads(old_threads)
    model.eval()
    model.tomoml_config = config
    model.tomoml_history = history
    return model


def _ssim_grey(pred, ref):
    from .metrics import ssim

    lo, hi = _robust_range(ref)
    return ssim(np.clip(pred, lo, hi), np.clip(ref, lo, hi), data_range=hi - lo)


def _resolve_model(model, device):
    from .train import resolve_device

    if isinstance(model, str) and model == "pretrained":
        model = load_pretrained()
    elif isinstance(model, (str, Path)):
        model = load_model(model)
    if not hasattr(model, "tomoml_config") or not hasattr(model, "g_ab"):
        raise TypeError(f"model: expected 'pretrained', a weights file or a CycleGAN from train_cyclegan, got "
                        f"{type(model).__name__}")
    dev = resolve_device(device)
    model.to(dev).eval()
    return model, dev


def translate(image, model="pretrained", *, direction="ct2histo", device="auto", num_threads=None):
    """Translate one 2D image with a trained cycleGAN.

    Parameters
    ----------
    image : ndarray
        A CT slice (H, W) for ``direction="ct2histo"``; a histology image
        (H, W, 3) or grey (H, W) for ``"histo2ct"``.
    model : CycleGAN, path or "pretrained"
        From :func:`train_cyclegan`, :func:`load_model` or the shipped
        bone-implant weights.
    direction : {"ct2histo", "histo2ct"}
        Which generator to run.
    device : str
        ``"auto"`` picks CUDA when available.
    num_threads : int, optional
        Torch CPU threads (restored afterwards).

    Returns
    -------
    ndarray float32: RGB (H, W, 3) in [0, 1] (or grey) for ``"ct2histo"``;
    CT values (H, W) for ``"histo2ct"``.

    Examples
    --------
    >>> from tomoml_nb import phantoms
    >>> ph = phantoms.bone_implant((32, 40, 40), seed=0)
    >>> translate(ph.image[16]).shape                  # doctest: +SKIP
    (40, 40, 3)
    """
    import torch

    model, dev = _resolve_model(model, device)
    check_choice(direction, "direction", ("ct2histo", "histo2ct"))
    cfg = model.tomoml_config
    mult = 2 ** cfg["n_down"]
    if direction == "ct2histo":
        img = as_array(image, "image", ndim=2, dtype=np.float32)
        _check_slice_size(img.shape[:2], cfg, "image")
        x, gen, dst = _to_net(img, cfg, "a"), model.g_ab, "b"
    else:
        img = _as_image(image, "image")
        if (img.ndim == 3) != (cfg["channels"] == 3):
            raise ValueError(f"image: the model expects {'RGB' if cfg['channels'] == 3 else 'grey'} images")
        _check_slice_size(img.shape[:2], cfg, "image")
        x, gen, dst = _to_net(img, cfg, "b"), model.g_ba, "a"
    old = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(check_positive(num_threads, "num_threads", integer=True))
    try:
        return _from_net(_run_generator(gen, x[None], dev, mult)[0], cfg, dst)
    finally:
        if num_threads is not None:
            torch.set_num_threads(old)


def predict_volume(volume, model="pretrained", axis="z", *, batch_size=8, out=None, intensity_range="model",
                   device="auto", progress=True, num_threads=None):
    """Virtual histology of every slice of a CT volume along ``axis``.

    Slices are translated in batches (only ``batch_size`` slices are in memory
    at a time), so ``volume`` may be an ``np.memmap``, an h5py dataset or a
    zarr array, and ``out`` may be one too.

    Parameters
    ----------
    volume : array-like (z, y, x)
        CT volume: numeric and finite (NaN or inf raise ``ValueError``, checked batch by
        batch), with slices of at least ``2**n_down + 1`` pixels a side (5 for the shipped
        model).
    model : CycleGAN, path or "pretrained"
        The translation model.
    axis : {"z", "y", "x"}
        Slicing axis (the network is 2D).
    batch_size : int
        Slices per forward pass.
    out : array-like, optional
        Output of shape ``(z, y, x, 3)`` (RGB model) or ``(z, y, x)`` (grey) with a
        floating-point dtype (else ``ValueError``); written slice batch by slice batch.
    intensity_range : "model", "volume" or (float, float)
        CT values mapped to the network's input range: those of the training
        data (``"model"``, right when the volume comes from the same scanner
        settings), the volume's own 0.5/99.5 percentiles, or given values.
    device : str
        ``"auto"`` picks CUDA when available.
    progress : bool
        tqdm progress bar.
    num_threads : int, optional
        Torch CPU threads (restored afterwards).

    Returns
    -------
    ndarray float32 (z, y, x, 3) in [0, 1] (or ``out``)

    Examples
    --------
    >>> from tomoml_nb import phantoms
    >>> vol = phantoms.bone_implant((24, 32, 32), seed=0).image
    >>> predict_volume(vol, progress=False).shape      # doctest: +SKIP
    (24, 32, 32, 3)
    """
    import torch
    from tqdm.auto import tqdm

    model, dev = _resolve_model(model, device)
    check_choice(axis, "axis", _AXES)
    batch_size = check_positive(batch_size, "batch_size", integer=True)
    shape = tuple(getattr(volume, "shape", np.shape(volume)))
    if len(shape) != 3:
        raise ValueError(f"volume: expected a 3D volume (z, y, x), got shape {shape}")
    if min(shape) < 1:
        raise ValueError(f"volume: empty volume {shape}")
    cfg = dict(model.tomoml_config)
    if isinstance(intensity_range, str):
        check_choice(intensity_range, "intensity_range", ("model", "volume"))
        if intensity_range == "volume":
            step = max(1, shape[0] // 16)
            cfg["ct_range"] = _robust_range(np.asarray(volume[::step], np.float32))
    else:
        try:
            lo, hi = (float(v) for v in intensity_range)
        except Exception as exc:
            raise TypeError(f"intensity_range: expected 'model', 'volume' or (low, high), got "
                            f"{intensity_range!r}") from exc
        if not hi > lo:
            raise ValueError(f"intensity_range: expected low < high, got {intensity_range!r}")
        cfg["ct_range"] = (lo, hi)
    C = cfg["channels"]
    oshape = shape + (3,) if C == 3 else shape
    if out is None:
        out = np.empty(oshape, np.float32)
    else:
        if not hasattr(out, "shape") or not hasattr(out, "dtype"):
            raise TypeError(f"out: expected an array of shape {oshape}, got {type(out).__name__}")
        if tuple(out.shape) != oshape:
            raise ValueError(f"out: expected shape {oshape}, got {tuple(out.shape)}")
        if np.dtype(out.dtype).kind != "f":
            raise ValueError(f"out: expected a floating-point array (colours in [0, 1]), got dtype {out.dtype}")
    ax = _AXES.index(axis)
    n = shape[ax]
    _check_slice_size(tuple(s for i, s in enumerate(shape) if i != ax), cfg, "volume")
    mult = 2 ** cfg["n_down"]
    old = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(check_positive(num_threads, "num_threads", integer=True))
    try:
        for i0 in tqdm(range(0, n, batch_size), desc=f"virtual histology ({axis})", disable=not progress):
            i1 = min(n, i0 + batch_size)
            sl = [slice(None)] * 3
            sl[ax] = slice(i0, i1)
            block = np.asarray(volume[tuple(sl)])
            if block.dtype.kind not in "biuf":
                raise TypeError(f"volume: expected a numeric array, got dtype {block.dtype}")
            block = block.astype(np.float32, copy=False)
            if not np.isfinite(block).all():
                n_bad = int(block.size - np.count_nonzero(np.isfinite(block)))
                raise ValueError(f"volume: contains {n_bad} NaN or infinite value(s) in slices {i0}-{i1 - 1} "
                                 f"along {axis}")
            block = np.moveaxis(block, ax, 0)                                  # (b, h, w)
            x = np.stack([_to_net(s, cfg, "a") for s in block])
            y = _run_generator(model.g_ab, x, dev, mult)
            res = np.stack([_from_net(v, cfg, "b") for v in y])                # (b, h, w[, 3])
            res = np.moveaxis(res, 0, ax)
            out[tuple(sl)] = res
    finally:
        if num_threads is not None:
            torch.set_num_threads(old)
    return out


# --------------------------------------------------------------------------- weights I/O
def save_model(model, path, *, overwrite=False, **meta):
    """Save a trained cycleGAN's generators (float16, ~1 MB) with its config to ``path``.

    An existing file is refused (``FileExistsError`` naming ``path``) unless
    ``overwrite=True``; ``meta`` is stored as provenance
    (see :func:`tomoml_nb.weights.save_state`).

    Examples
    --------
    >>> import tempfile, os
    >>> from tomoml_nb.models.cyclegan import CycleGAN
    >>> net = CycleGAN(3, base=4, n_blocks=1)
    >>> net.tomoml_config = {"channels": 3, "base": 4, "n_blocks": 1, "n_down": 2, "d_base": 32, "d_layers": 2,
    ...                      "norm": "none", "ct_range": (0.0, 1.0), "histo_range": (0.0, 1.0)}
    >>> p = save_model(net, os.path.join(tempfile.mkdtemp(), "m.pt"))
    >>> load_model(p).tomoml_config["base"]
    4
    """
    from . import weights

    if not hasattr(model, "tomoml_config") or not hasattr(model, "g_ab"):
        raise TypeError("model: expected a CycleGAN from train_cyclegan")
    sd = {k: (v.detach().half() if v.is_floating_point() else v)
          for k, v in model.state_dict().items() if k.startswith(("g_ab.", "g_ba."))}
    hist = getattr(model, "tomoml_history", None) or {}
    short = {k: hist[k] for k in ("val", "steps", "seconds") if k in hist}
    return weights.save_state(path, format=_FORMAT, config=model.tomoml_config, state_dict=sd, history=short,
                              meta=meta, overwrite=overwrite)


def load_model(path, device="cpu"):
    """Load a cycleGAN saved by :func:`save_model` (generators only; discriminators are re-created
    when training continues).

    Examples
    --------
    >>> net = load_model(pretrained_path())            # doctest: +SKIP
    """
    from . import weights
    from .models.cyclegan import CycleGAN

    state = weights.load_state(path, format=_FORMAT)
    cfg = dict(state["config"])
    net = CycleGAN(cfg["channels"], cfg["base"], cfg["n_down"], cfg["n_blocks"], cfg["d_base"], cfg["d_layers"],
                   cfg["norm"], discriminators=False, generator=cfg.get("generator", "unet"))
    return weights.restore(net, state, device)


def pretrained_path(name="bone_implant") -> Path:
    """Path of a shipped cycleGAN weights file (inside the installed package).

    Examples
    --------
    >>> pretrained_path().name
    'cyclegan_bone_implant.pt'
    """
    from .weights import WEIGHTS_DIR

    check_choice(name, "name", tuple(_PRETRAINED))
    return WEIGHTS_DIR / _PRETRAINED[name]


def load_pretrained(name="bone_implant", device="cpu"):
    """Load the shipped cycleGAN (CT -> H&E stain of the bone-implant phantom), offline.

    Trained by ``scripts/train_cyclegan.py`` on 8 registered oblique sections of
    :func:`tomoml_nb.phantoms.bone_implant`; see
    ``tomoml_nb/weights/cyclegan_bone_implant.md``.

    Examples
    --------
    >>> net = load_pretrained()                         # doctest: +SKIP
    >>> net.tomoml_config["channels"]                   # doctest: +SKIP
    3
    """
    from . import weights

    check_choice(name, "name", tuple(_PRETRAINED))
    path = weights.shipped_path(_PRETRAINED[name], script="scripts/train_cyclegan.py")
    return load_model(path, device=device)
