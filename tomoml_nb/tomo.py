"""Tomography basics: acquisition simulation, flat/dark correction, centre finding,
ring removal and reconstruction.

Geometry and conventions
------------------------
Parallel beam, angles in **radians** (angles spanning more than ``2.5 pi``, which is what
degrees look like, raise ``ValueError``). Axis orders:

* projections ``(n_angles, n_rows, n_cols)``;
* a sinogram ``(n_angles, n_det)``, a sinogram stack ``(n_rows, n_angles, n_det)``;
* a reconstruction ``(N, N)`` or ``(n_rows, N, N)`` with ``N = n_det``.

Image pixel ``[i, j]`` sits at ``X = j - (N-1)/2``, ``Y = i - (N-1)/2`` (pixel centres,
rotation axis in the middle of the array). The ray at angle ``theta`` through detector
pixel ``d`` is the line ``X cos(theta) - Y sin(theta) = d - center``, so at ``theta = 0``
a projection is the sum over image rows (``image.sum(axis=0)``), the same orientation as
:func:`skimage.transform.radon`. ``center`` is the detector position (0-based, pixel
centres at integer positions) onto which the rotation axis projects; ``center=None`` means
the middle of the detector, ``(n_det - 1) / 2``; a centre outside the detector
(``-0.5 .. n_det - 0.5``) raises ``ValueError``. A sinogram whose axis sits at ``center``
reconstructs with the axis in the middle of the output image.

Values: sinograms are line integrals in units of pixels, reconstructions are attenuation
per pixel, so ``reconstruct(forward_project(image, angles), angles)`` is close to
``image``.

Implementation: the projector pair is plain torch (CPU or GPU, ``device="auto"``).
Forward projection is ray-driven (Joseph: step along the image axis closest to the ray,
linear interpolation across it); backprojection is pixel-driven (linear interpolation
along the detector). On the CPU both reuse each angle's interpolation indices for all
angles related to it by the square grid's 8 rotations/reflections (4 angles of an evenly
spaced 180 degree scan share one set) and run one angle at a time to stay in cache; on
the GPU angles are batched. When other processes keep the cores busy, torch is run with
fewer threads for the duration of a call, because the thousands of small operations of a
projection slow down 10-20x when OpenMP threads wait for descheduled partners.

Examples
--------
>>> import numpy as np
>>> from tomoml_nb import tomo
>>> image = np.zeros((64, 64), np.float32); image[20:44, 24:40] = 0.02
>>> angles = np.linspace(0, np.pi, 90, endpoint=False)
>>> sino = tomo.forward_project(image, angles)
>>> rec = tomo.reconstruct(sino, angles)
>>> bool(np.corrcoef(rec.ravel(), image.ravel())[0, 1] > 0.95)
True
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .train import limit_cpu_threads as _threads
from ._validate import as_array, check_choice, check_positive, rng_from

__all__ = [
    "ProjectionData", "simulate_acquisition", "forward_project", "normalize", "minus_log",
    "find_center", "remove_rings", "stripe_metric", "reconstruct", "bin_detector", "read_line_integrals",
    "FILTERS", "METHODS", "BACKENDS", "RING_METHODS",
]

FILTERS = ("ramp", "shepp-logan", "cosine", "hann")
METHODS = ("fbp", "sirt")
RING_METHODS = ("sorting", "mean")
_PAD = 2  # zero pixels added on each side of detector rows / image rows before interpolating


@dataclass
class ProjectionData:
    """Raw parallel-beam projection data, as a beamline writes it.

    Attributes
    ----------
    projections : ndarray, shape (n_angles, n_rows, n_cols)
        Raw detector counts.
    flats : ndarray, shape (n_flats, n_rows, n_cols)
        Open-beam (white) frames.
    darks : ndarray, shape (n_darks, n_rows, n_cols)
        Frames with the beam off.
    angles : ndarray, shape (n_angles,)
        Rotation angles in **radians**.
    """

    projections: np.ndarray
    flats: np.ndarray
    darks: np.ndarray
    angles: np.ndarray

    def __repr__(self):
        return (f"ProjectionData(projections={self.projections.shape} {self.projections.dtype}, "
                f"flats={self.flats.shape}, darks={self.darks.shape}, "
                f"angles={self.angles.shape} rad [{self.angles.min():.3f}, {self.angles.max():.3f}])")


# =========================================================================== helpers
def _device(device):
    """``"auto"`` -> CUDA when available, else CPU; otherwise a validated torch device."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: not a torch device ({device!r}): {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available; use device='auto' or 'cpu'")
    return dev


def _progress(iterable, total, enabled, desc):
    """Wrap ``iterable`` in a tqdm bar when the work is long, else return it unchanged."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=desc, leave=False)


#: Largest span (max - min) accepted for angles in radians: a full turn plus a margin for
#: overscans (450 degrees). Angles in degrees span more than this for any scan wider than
#: 8 degrees. The same limit as ``data.read_data_exchange``.
MAX_ANGLE_SPAN = 2.5 * np.pi


def _check_angles(angles, n_angles=None, name="angles"):
    ang = as_array(angles, name, ndim=1).astype(np.float64)
    if n_angles is not None and ang.size != n_angles:
        raise ValueError(f"{name}: has {ang.size} values but the data has {n_angles} angles")
    span = float(np.ptp(ang))
    if span > MAX_ANGLE_SPAN:
        raise ValueError(f"{name}: span {span:.4g}, more than a full turn (2*pi) plus a margin; radians are "
                         f"expected and this looks like degrees: use np.deg2rad({name})")
    return ang


def _check_center(center, n_det, name="center"):
    if center is None:
        return (n_det - 1) / 2.0
    if isinstance(center, bool) or not isinstance(center, numbers.Real):
        arr = np.asarray(center)
        if arr.ndim == 0 and arr.dtype.kind in "iuf":
            center = float(arr)
        else:
            raise TypeError(f"{name}: expected a number (detector pixels), got {type(center).__name__}")
    if not np.isfinite(center):
        raise ValueError(f"{name}: must be finite, got {center!r}")
    if not -0.5 <= center <= n_det - 0.5:
        raise ValueError(f"{name}: {center!r} is outside the detector; expected a position in detector pixels "
                         f"between 0 and {n_det - 1} (0-based, pixel centres at integers)")
    return float(center)


def _as_sinograms(sinograms, name="sinograms"):
    """Validate a sinogram (2D) or stack (3D); return float32 (n_rows, n_angles, n_det), was_2d."""
    arr = as_array(sinograms, name, ndim=(2, 3))
    if min(arr.shape) < 2:
        raise ValueError(f"{name}: every axis needs at least 2 samples, got shape {arr.shape}")
    was_2d = arr.ndim == 2
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    return (arr[None] if was_2d else arr), was_2d


def _rows_per_chunk(n_pixels, budget=2 ** 22):
    return max(1, int(budget // max(n_pixels, 1)))


# =========================================================================== projector
def _image_coords(N, circle, dev):
    """Pixel centre coordinates (flattened), optionally only inside the inscribed circle."""
    ax = torch.arange(N, dtype=torch.float32, device=dev) - (N - 1) / 2.0
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    xx, yy = xx.reshape(-1), yy.reshape(-1)
    if not circle:
        return xx, yy, None
    inside = (xx ** 2 + yy ** 2) <= (N / 2.0) ** 2
    sel = inside.nonzero().squeeze(1)
    return xx[sel], yy[sel], sel


def _angle_chunk(dev, per_angle):
    """Angles processed per step: about 2^18 samples per operation on CPU (large enough to
    hide the per-call overhead, small enough to stay in cache), about 2^24 on GPU."""
    budget = 2 ** 18 if dev.type == "cpu" else 2 ** 24
    return max(1, min(512, int(budget // max(per_angle, 1))))


def _backproject(q, angles, N, center, circle=True):
    """Pixel-driven backprojection with linear interpolation along the detector.

    q : tensor (Z, A, D); angles : float64 ndarray (A,). Returns tensor (Z, N, N) holding
    ``sum_a q[a](X cos - Y sin + center)`` (no angular weight).
    """
    if q.device.type == "cpu" and q.shape[0] * N * N >= 2 ** 15:  # small images: batching wins
        return _backproject_sym(q, angles, N, center, circle)
    return _backproject_batched(q, angles, N, center, circle)


def _backproject_batched(q, angles, N, center, circle=True):
    """Angles in batches (GPU): one set of interpolation indices per angle."""
    Z, A, D = q.shape
    dev = q.device
    qp = F.pad(q, (_PAD, _PAD))
    Dp = D + 2 * _PAD
    dq = torch.diff(qp, dim=-1, append=torch.zeros(Z, A, 1, dtype=q.dtype, device=dev))
    qf, dqf = qp.reshape(Z, A * Dp), dq.reshape(Z, A * Dp)
    xs, ys, sel = _image_coords(N, circle, dev)
    M = xs.numel()
    acc = torch.zeros(Z, M, dtype=q.dtype, device=dev)
    cos = torch.as_tensor(np.cos(angles), dtype=torch.float32, device=dev)
    sin = torch.as_tensor(np.sin(angles), dtype=torch.float32, device=dev)
    B = _angle_chunk(dev, M * max(Z, 1))
    hi = Dp - 1 - 1e-3
    for a0 in range(0, A, B):
        a1 = min(A, a0 + B)
        t = xs[None, :] * cos[a0:a1, None]
        t.addcmul_(ys[None, :], sin[a0:a1, None], value=-1.0).add_(center + _PAD)
        t.clamp_(0.0, hi)
        i0 = t.to(torch.int64)
        t.sub_(i0)  # interpolation weight
        i0.add_((torch.arange(a0, a1, device=dev) * Dp)[:, None])
        i0 = i0.reshape(-1)
        v = qf.index_select(1, i0)
        v.addcmul_(t.reshape(1, -1), dqf.index_select(1, i0))
        if a1 - a0 == 1:
            acc.add_(v)
        else:
            acc.add_(v.view(Z, a1 - a0, M).sum(1))
    if sel is None:
        return acc.view(Z, N, N)
    out = torch.zeros(Z, N * N, dtype=q.dtype, device=dev)
    out[:, sel] = acc
    return out.view(Z, N, N)


def _project(img, angles, n_det, center):
    """Ray-driven (Joseph) forward projection: line integrals of ``img`` (Z, N, N).

    Along each ray one image axis is stepped pixel by pixel (the one most perpendicular to
    the ray) and the other is linearly interpolated. Returns tensor (Z, A, n_det).
    """
    if img.device.type == "cpu" and img.shape[0] * img.shape[1] * n_det >= 2 ** 15:
        return _project_sym(img, angles, n_det, center)
    return _project_batched(img, angles, n_det, center)


def _project_batched(img, angles, n_det, center):
    """Angles in batches (GPU)."""
    Z, N, _ = img.shape
    dev = img.device
    A = len(angles)
    cN = (N - 1) / 2.0
    Np = N + 2 * _PAD
    out = torch.zeros(Z, A, n_det, dtype=img.dtype, device=dev)
    t = torch.arange(n_det, dtype=torch.float64, device=dev) - center
    line = torch.arange(N, dtype=torch.float64, device=dev) - cN
    row_off = (torch.arange(N, device=dev) * Np)[:, None]
    hi = Np - 1 - 1e-3
    cos, sin = np.cos(angles), np.sin(angles)
    by_rows = np.abs(cos) >= np.abs(sin)
    for use_rows in (True, False):
        idx = np.nonzero(by_rows == use_rows)[0]
        if idx.size == 0:
            continue
        # rows of `src` are the stepped axis, columns are interpolated
        src = img if use_rows else img.transpose(1, 2)
        sp = F.pad(src, (_PAD, _PAD))
        ds = torch.diff(sp, dim=-1, append=torch.zeros(Z, N, 1, dtype=img.dtype, device=dev))
        sf, dsf = sp.reshape(Z, N * Np), ds.reshape(Z, N * Np)
        B = _angle_chunk(dev, N * n_det * max(Z, 1))
        for k0 in range(0, idx.size, B):
            sub = idx[k0:k0 + B]
            c = torch.as_tensor(cos[sub], dtype=torch.float64, device=dev)[:, None]
            s = torch.as_tensor(sin[sub], dtype=torch.float64, device=dev)[:, None]
            # position along the interpolated axis = per-detector term + per-line term
            if use_rows:   # X = (t + Y sin) / cos
                det_term, line_term, step = t[None, :] / c, line[None, :] * (s / c), 1.0 / c.abs()
            else:          # Y = (X cos - t) / sin
                det_term, line_term, step = -t[None, :] / s, line[None, :] * (c / s), 1.0 / s.abs()
            det_term = (det_term + (cN + _PAD)).to(img.dtype)
            pos = line_term.to(img.dtype)[:, :, None] + det_term[:, None, :]
            pos.clamp_(0.0, hi)  # (b, N, n_det)
            i0 = pos.to(torch.int64)
            pos.sub_(i0)
            i0.add_(row_off[None])
            i0 = i0.reshape(-1)
            v = sf.index_select(1, i0)
            v.addcmul_(pos.reshape(1, -1), dsf.index_select(1, i0))
            v = v.view(Z, len(sub), N, n_det).sum(2) * step.view(1, -1, 1).to(img.dtype)
            out[:, torch.as_tensor(sub, device=dev)] = v
    return out


# --------------------------------------------------------------------------- symmetric CPU path
# The pixel grid is symmetric under the 8 rotations/reflections that map the square onto
# itself. An angle phi = s * theta0 + k * pi/2 (s = +-1, theta0 in [0, pi/4]) sees the grid
# exactly as theta0 sees it after a signed permutation L of the pixel coordinates:
# t_phi(P) = t_theta0(L P) with t_theta(X, Y) = X cos(theta) - Y sin(theta). So the
# interpolation indices (the costly part) are computed once per theta0 and reused by every
# angle of its orbit: up to 4 angles of an evenly spaced 180 degree scan, 8 of a 360 one.
def _u(theta):
    return np.array([np.cos(theta), -np.sin(theta)])


@lru_cache(maxsize=None)
def _orbit_map(sign, k):
    """Integer matrix L with ``t_phi(P) = t_theta0(L P)`` for ``phi = sign*theta0 + k*pi/2``."""
    a, b = 0.3, 0.7
    U0 = np.stack([_u(a), _u(b)], axis=1)
    Uphi = np.stack([_u(sign * a + k * np.pi / 2), _u(sign * b + k * np.pi / 2)], axis=1)
    LT = Uphi @ np.linalg.inv(U0)
    L = np.rint(LT.T).astype(np.int64)
    assert np.allclose(L, LT.T, atol=1e-9)
    return L


@lru_cache(maxsize=64)
def _grid_perm(N, sign, k, inverse=False):
    """Flat index of ``L P`` (or ``L^-1 P``) for every pixel P of an N x N grid."""
    L = _orbit_map(sign, k)
    if inverse:
        L = L.T
    ax = np.arange(N) - (N - 1) / 2.0
    Y, X = np.meshgrid(ax, ax, indexing="ij")
    Xp = L[0, 0] * X + L[0, 1] * Y
    Yp = L[1, 0] * X + L[1, 1] * Y
    i = np.rint(Yp + (N - 1) / 2.0).astype(np.int64)
    j = np.rint(Xp + (N - 1) / 2.0).astype(np.int64)
    return torch.from_numpy((i * N + j).reshape(-1))


def _angle_orbits(angles):
    """Group angles by their representative theta0 in [0, pi/4]:
    ``[(theta0, [(angle_index, (sign, k)), ...]), ...]``."""
    phi = np.mod(np.asarray(angles, np.float64), 2 * np.pi)
    k = np.floor(phi / (np.pi / 2)).astype(np.int64)
    r = phi - k * (np.pi / 2)
    upper = r > np.pi / 4
    th0 = np.where(upper, np.pi / 2 - r, r)
    sign = np.where(upper, -1, 1)
    k = np.where(upper, k + 1, k) % 4
    groups = {}
    for a, (t0, sg, kk) in enumerate(zip(th0, sign, k)):
        key = round(float(t0), 9)
        groups.setdefault(key, (float(t0), []))[1].append((a, (int(sg), int(kk))))
    return list(groups.values())


def _backproject_sym(q, angles, N, center, circle=True):
    Z, A, D = q.shape
    dev = q.device
    qp = F.pad(q, (_PAD, _PAD))
    Dp = D + 2 * _PAD
    dq = torch.diff(qp, dim=-1, append=torch.zeros(Z, A, 1, dtype=q.dtype, device=dev))
    xs, ys, sel = _image_coords(N, circle, dev)
    accs = {}
    hi = Dp - 1 - 1e-3
    for th0, members in _angle_orbits(angles):
        t = xs * float(np.cos(th0))
        t.add_(ys, alpha=-float(np.sin(th0))).add_(center + _PAD).clamp_(0.0, hi)
        i0 = t.to(torch.int64)
        t.sub_(i0)
        for a, key in members:
            v = qp[:, a].index_select(1, i0)
            v.addcmul_(t, dq[:, a].index_select(1, i0))
            if key in accs:
                accs[key].add_(v)
            else:
                accs[key] = v
    out = torch.zeros(Z, N * N, dtype=q.dtype, device=dev)
    for (sg, k), acc in accs.items():
        if sel is not None:
            full = torch.zeros(Z, N * N, dtype=q.dtype, device=dev)
            full[:, sel] = acc
        else:
            full = acc
        if (sg, k) == (1, 0):
            out.add_(full)
        else:
            out.add_(full[:, _grid_perm(N, sg, k)])
    return out.view(Z, N, N)


def _project_sym(img, angles, n_det, center):
    Z, N, _ = img.shape
    dev = img.device
    A = len(angles)
    cN = (N - 1) / 2.0
    Np = N + 2 * _PAD
    out = torch.zeros(Z, A, n_det, dtype=img.dtype, device=dev)
    t = np.arange(n_det, dtype=np.float64) - center
    line = np.arange(N, dtype=np.float64) - cN
    row_off = (torch.arange(N, device=dev) * Np)[:, None]
    hi = Np - 1 - 1e-3
    flat = img.reshape(Z, N * N)
    sources = {}

    def source(key):  # image seen by theta0 for this orbit element: img(L^-1 Q), padded, with diffs
        if key not in sources:
            g = flat if key == (1, 0) else flat[:, _grid_perm(N, key[0], key[1], inverse=True)]
            sp = F.pad(g.view(Z, N, N), (_PAD, _PAD))
            ds = torch.diff(sp, dim=-1, append=torch.zeros(Z, N, 1, dtype=img.dtype, device=dev))
            sources[key] = (sp.reshape(Z, N * Np), ds.reshape(Z, N * Np))
        return sources[key]

    for th0, members in _angle_orbits(angles):
        c, s = np.cos(th0), np.sin(th0)     # c >= s >= 0: step along rows, interpolate in X
        det_term = torch.as_tensor(t / c + cN + _PAD, dtype=img.dtype, device=dev)
        line_term = torch.as_tensor(line * (s / c), dtype=img.dtype, device=dev)
        pos = line_term[:, None] + det_term[None, :]
        pos.clamp_(0.0, hi)
        i0 = pos.to(torch.int64)
        pos.sub_(i0)
        i0.add_(row_off)
        i0, w = i0.reshape(-1), pos.reshape(-1)
        for a, key in members:
            sf, dsf = source(key)
            v = sf.index_select(1, i0)
            v.addcmul_(w, dsf.index_select(1, i0))
            out[:, a] = v.view(Z, N, n_det).sum(1).mul_(1.0 / c)
    return out


def forward_project(image_or_volume, angles, center=None, n_det=None, device="auto"):
    """Noise-free parallel-beam projection (line integrals) of an image or a volume.

    Parameters
    ----------
    image_or_volume : array_like, shape (N, N) or (n_rows, N, N)
        Attenuation per pixel; a volume is ordered (z, y, x) and each z slice is one
        detector row.
    angles : array_like, shape (n_angles,)
        Projection angles in radians (a span above ``2.5 pi`` -- degrees -- raises).
    center : float, optional
        Detector position (0-based pixels) onto which the rotation axis (the middle of the
        image) projects, within the detector. Default: the detector middle, ``(n_det - 1) / 2``.
    n_det : int, optional
        Detector width in pixels. Default ``N``.
    device : str
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``...

    Returns
    -------
    ndarray, float32
        A sinogram ``(n_angles, n_det)`` for an image, a sinogram stack
        ``(n_rows, n_angles, n_det)`` for a volume.

    Notes
    -----
    Ray-driven (Joseph's method): the ray steps one pixel at a time along the image axis
    closest to its direction and interpolates linearly along the other axis.

    Examples
    --------
    >>> import numpy as np
    >>> img = np.ones((32, 32), np.float32)
    >>> sino = forward_project(img, np.linspace(0, np.pi, 10, endpoint=False))
    >>> sino.shape, round(float(sino[0, 16]), 3)
    ((10, 32), 32.0)
    """
    vol = as_array(image_or_volume, "image_or_volume", ndim=(2, 3))
    if vol.shape[-1] != vol.shape[-2]:
        raise ValueError(f"image_or_volume: slices must be square (N, N), got {vol.shape[-2:]}")
    if vol.shape[-1] < 2:
        raise ValueError(f"image_or_volume: needs at least 2x2 pixels, got {vol.shape}")
    was_2d = vol.ndim == 2
    vol = np.ascontiguousarray(vol, dtype=np.float32)
    vol = vol[None] if was_2d else vol
    ang = _check_angles(angles)
    N = vol.shape[-1]
    n_det = N if n_det is None else check_positive(n_det, "n_det", integer=True)
    center = _check_center(center, n_det)
    dev = _device(device)
    chunk = _rows_per_chunk(N * N)
    out = np.empty((vol.shape[0], ang.size, n_det), np.float32)
    starts = range(0, vol.shape[0], chunk)
    long = vol.shape[0] > chunk and vol.size * ang.size > 5e9
    with torch.no_grad(), _threads(dev):
        for z0 in _progress(starts, len(starts), long, "forward_project"):
            img = torch.from_numpy(vol[z0:z0 + chunk]).to(dev)
            out[z0:z0 + chunk] = _project(img, ang, n_det, center).cpu().numpy()
    return out[0] if was_2d else out


# =========================================================================== FBP (torch)
def _fourier_filter(L, filter_name, dev):
    """Ramp filter from the band-limited spatial kernel (no DC offset), times a window."""
    n = np.arange(L)
    n = np.minimum(n, L - n)  # periodic distance
    h = np.zeros(L)
    h[0] = 0.25
    odd = n % 2 == 1
    h[odd] = -1.0 / (np.pi * n[odd]) ** 2
    filt = np.real(np.fft.rfft(h))
    f = np.fft.rfftfreq(L)  # cycles per sample, 0 .. 0.5
    if filter_name == "shepp-logan":
        filt *= np.sinc(f)
    elif filter_name == "cosine":
        filt *= np.cos(np.pi * f)
    elif filter_name == "hann":
        filt *= 0.5 * (1.0 + np.cos(2.0 * np.pi * f))
    return torch.as_tensor(filt, dtype=torch.float32, device=dev)


def _filter_sinograms(sino, filter_name):
    """Ramp-filter each projection (last axis) with zero padding to >= 2 n_det."""
    D = sino.shape[-1]
    L = max(64, 1 << int(math.ceil(math.log2(2 * D))))
    spec = torch.fft.rfft(sino, n=L, dim=-1)
    spec *= _fourier_filter(L, filter_name, sino.device)
    return torch.fft.irfft(spec, n=L, dim=-1)[..., :D].contiguous()


def _angle_weights(angles):
    """FBP quadrature weight of each angle: half the gaps to its neighbours on the circle
    of directions (angles modulo pi), each gap capped at twice the median gap so that a
    limited-angle scan does not inflate its end angles. Evenly spaced 180 and 360 degree
    scans both give ``pi / n_angles`` for every angle; golden-angle or irregular scans get
    their proper weights."""
    a = np.mod(np.asarray(angles, np.float64), np.pi)
    A = a.size
    if A == 1:
        return np.full(1, np.pi)
    order = np.argsort(a, kind="stable")
    srt = a[order]
    gaps = np.diff(np.concatenate([srt, srt[:1] + np.pi]))  # gap after each sorted angle
    positive = gaps[gaps > 1e-9]
    cap = 2.0 * (np.median(positive) if positive.size else np.pi / A)
    gaps = np.minimum(gaps, cap)
    w_sorted = 0.5 * (gaps + np.roll(gaps, 1))
    w = np.empty(A)
    w[order] = w_sorted
    # repeated directions (360 degree scans, duplicates) share their interval
    return w


def _fbp_torch(stack, angles, center, filter_name, circle, device, **_):
    dev = _device(device)
    Z, A, D = stack.shape
    chunk = _rows_per_chunk(D * D)
    out = np.empty((Z, D, D), np.float32)
    starts = range(0, Z, chunk)
    long = Z > chunk and Z * A * D * D > 2e9
    weights = torch.as_tensor(_angle_weights(angles), dtype=torch.float32, device=dev)
    with torch.no_grad(), _threads(dev):
        for z0 in _progress(starts, len(starts), long, "fbp"):
            s = torch.from_numpy(stack[z0:z0 + chunk]).to(dev)
            q = _filter_sinograms(s, filter_name)
            q *= weights[None, :, None]
            rec = _backproject(q, angles, D, center, circle)
            out[z0:z0 + chunk] = rec.cpu().numpy()
    return out


# =========================================================================== SIRT (torch)
def _sirt_torch(stack, angles, center, circle, device, n_iter, nonneg, return_residuals, **_):
    """SIRT: ``x += C A^T R (b - A x)`` with ``R``, ``C`` the inverse row / column sums of
    the projector (Joseph forward, pixel-driven backward), optional clipping at 0."""
    dev = _device(device)
    Z, A, D = stack.shape
    N = D
    out = np.empty((Z, N, N), np.float32)
    chunk = _rows_per_chunk(N * N, budget=2 ** 23)
    residuals = np.zeros((Z, n_iter), np.float64)
    starts = list(range(0, Z, chunk))
    long = n_iter * Z * A * N * N > 4e9
    pbar = None
    if long:
        from tqdm.auto import tqdm
        pbar = tqdm(total=len(starts) * n_iter, desc="sirt", leave=False)
    with torch.no_grad(), _threads(dev):
        support = torch.ones(1, N, N, device=dev)
        if circle:
            support = torch.as_tensor(_circle_mask(N), dtype=torch.float32, device=dev)[None]
        row_sum = _project(support, angles, D, center)                                      # A 1
        col_sum = _backproject(torch.ones(1, A, D, device=dev), angles, N, center, circle)  # A^T 1
        inv_row = torch.where(row_sum > 1e-3, 1.0 / row_sum.clamp_min(1e-3), torch.zeros_like(row_sum))
        inv_col = torch.where(col_sum > 1e-3, 1.0 / col_sum.clamp_min(1e-3), torch.zeros_like(col_sum))
        for z0 in starts:
            b = torch.from_numpy(stack[z0:z0 + chunk]).to(dev)
            x = torch.zeros(b.shape[0], N, N, device=dev)
            for k in range(n_iter):
                r = b - _project(x, angles, D, center)
                residuals[z0:z0 + chunk, k] = torch.linalg.vector_norm(r.flatten(1), dim=1).cpu().numpy()
                x += inv_col * _backproject(r * inv_row, angles, N, center, circle)
                if nonneg:
                    x.clamp_(min=0.0)
                if circle:
                    x *= support
                if pbar is not None:
                    pbar.update()
            out[z0:z0 + chunk] = x.cpu().numpy()
    if pbar is not None:
        pbar.close()
    if return_residuals:
        return out, residuals
    return out


# =========================================================================== other backends
def _shift_rows(sino, shifts):
    """Sub-pixel shift of each projection: ``out[..., a, k] = sino[..., a, k + shifts[a]]``.

    Fourier shift with zero padding (no wrap-around); ``shifts`` is (n_angles,).
    """
    D = sino.shape[-1]
    L = 1 << int(math.ceil(math.log2(2 * D)))
    spec = np.fft.rfft(sino, n=L, axis=-1)
    f = np.fft.rfftfreq(L)
    spec *= np.exp(2j * np.pi * np.asarray(shifts, np.float64)[:, None] * f[None, :])
    return np.fft.irfft(spec, n=L, axis=-1)[..., :D].astype(np.float32)


def _relative_weights(angles):
    """Row factors that turn a backend's uniform ``pi / n_angles`` into our weights."""
    return (_angle_weights(angles) * len(angles) / np.pi).astype(np.float32)


def _circle_mask(N):
    ax = np.arange(N) - (N - 1) / 2.0
    return (ax[:, None] ** 2 + ax[None, :] ** 2) <= (N / 2.0) ** 2


def _fbp_skimage(stack, angles, center, filter_name, circle, **_):
    from skimage.transform import iradon

    Z, A, D = stack.shape
    # skimage puts the axis on pixel D // 2 of both the detector and the output; shifting each
    # projection by s(theta) moves our axis there and puts our output grid (axis at (N-1)/2)
    # on skimage's (a half-pixel image translation is an angle-dependent detector shift).
    delta = D // 2 - (D - 1) / 2.0
    shifts = center - D // 2 + delta * (np.cos(angles) - np.sin(angles))
    shifted = _shift_rows(stack, shifts) * _relative_weights(angles)[:, None]
    deg = np.rad2deg(angles)
    out = np.empty((Z, D, D), np.float32)
    mask = _circle_mask(D)
    for z in _progress(range(Z), Z, Z > 4, "iradon"):
        rec = iradon(shifted[z].T, theta=deg, output_size=D, filter_name=filter_name,
                     interpolation="linear", circle=False)
        # skimage normalises by pi / (2 n) with a filter twice ours: same scale
        if circle:
            rec[~mask] = 0.0
        out[z] = rec
    return out


def _import_astra():
    try:
        import astra  # noqa: F401
    except ImportError as exc:
        raise ImportError("backend: 'astra' needs the astra-toolbox package "
                          "(pip install 'tomoml_nb[astra]' or astra-toolbox==2.5.0); "
                          "use backend='torch' instead") from exc
    return astra


_ASTRA_FILTERS = {"ramp": "ram-lak", "shepp-logan": "shepp-logan", "cosine": "cosine", "hann": "hann"}


def _astra_reconstruct(stack, angles, center, filter_name, circle, algorithm, n_iter=1,
                       projector="line", nonneg=True, **_):
    astra = _import_astra()
    Z, A, D = stack.shape
    shifted = _shift_rows(stack, np.full(A, center - (D - 1) / 2.0))
    if algorithm == "FBP":
        shifted *= _relative_weights(angles)[:, None]
    vol_geom = astra.create_vol_geom(D, D)
    # ASTRA's parallel geometry measures the angle the other way round from ours and its
    # volume rows run the other way (checked against this module with astra-toolbox 2.5.0)
    proj_geom = astra.create_proj_geom("parallel", 1.0, D, -np.asarray(angles, np.float64))
    proj_id = astra.create_projector(projector, proj_geom, vol_geom)
    out = np.empty((Z, D, D), np.float32)
    mask = _circle_mask(D)
    try:
        for z in range(Z):
            sino_id = astra.data2d.create("-sino", proj_geom, shifted[z])
            rec_id = astra.data2d.create("-vol", vol_geom, 0.0)
            cfg = astra.astra_dict(algorithm)
            cfg["ProjectorId"] = proj_id
            cfg["ProjectionDataId"] = sino_id
            cfg["ReconstructionDataId"] = rec_id
            if algorithm == "FBP":
                cfg["FilterType"] = _ASTRA_FILTERS[filter_name]
            elif nonneg:
                cfg["option"] = {"MinConstraint": 0.0}
            alg_id = astra.algorithm.create(cfg)
            try:
                astra.algorithm.run(alg_id, n_iter if algorithm != "FBP" else 1)
                rec = np.ascontiguousarray(astra.data2d.get(rec_id)[::-1], dtype=np.float32)
            finally:
                astra.algorithm.delete(alg_id)
                astra.data2d.delete([sino_id, rec_id])
            if circle:
                rec[~mask] = 0.0
            out[z] = rec
    finally:
        astra.projector.delete(proj_id)
    return out


def _fbp_astra(stack, angles, center, filter_name, circle, **kw):
    return _astra_reconstruct(stack, angles, center, filter_name, circle, "FBP", **kw)


def _sirt_astra(stack, angles, center, filter_name, circle, n_iter, nonneg, return_residuals, **kw):
    if return_residuals:
        raise ValueError("return_residuals: only available with backend='torch'")
    return _astra_reconstruct(stack, angles, center, filter_name, circle, "SIRT", n_iter=n_iter,
                              nonneg=nonneg, **kw)


# backend name -> {method: function(stack, angles, center, filter_name, circle, **options)}
_BACKENDS = {
    "torch": {"fbp": _fbp_torch, "sirt": _sirt_torch},
    "skimage": {"fbp": _fbp_skimage},
    "astra": {"fbp": _fbp_astra, "sirt": _sirt_astra},
}
BACKENDS = tuple(_BACKENDS)


def reconstruct(sinograms, angles, center=None, method="fbp", filter="ramp", n_iter=100,
                backend="torch", device="auto", circle=True, nonneg=True, return_residuals=False):
    """Reconstruct slices from parallel-beam sinograms.

    Parameters
    ----------
    sinograms : array_like, shape (n_angles, n_det) or (n_rows, n_angles, n_det)
        Line integrals (``minus_log`` of normalised projections, or ``forward_project``).
    angles : array_like, shape (n_angles,)
        Angles in radians, any order and spacing (180 or 360 degree, golden-angle...):
        FBP weights each angle by the angular interval it covers. A span above ``2.5 pi``
        (angles in degrees) raises ``ValueError``.
    center : float, optional
        Detector position (0-based pixels, pixel centres at integers) of the rotation axis,
        within the detector. ``None``: the detector middle ``(n_det - 1) / 2``. The axis is put in the middle of
        the output: the value at image offset ``(X, Y)`` from the middle is taken at
        detector position ``center + X cos(theta) - Y sin(theta)``, i.e. the sinogram is
        shifted left by ``center - (n_det - 1) / 2`` (sub-pixel; linear interpolation for
        the torch backend, Fourier shift for the others).
    method : {"fbp", "sirt"}
        Filtered backprojection, or the SIRT iteration (``n_iter`` steps).
    filter : {"ramp", "shepp-logan", "cosine", "hann"}
        FBP filter window (ignored by SIRT).
    n_iter : int
        SIRT iterations.
    backend : {"torch", "skimage", "astra"}
        ``"torch"`` (this package, CPU or GPU); ``"skimage"`` (:func:`skimage.transform.iradon`,
        FBP only); ``"astra"`` (astra-toolbox CPU ``FBP``/``SIRT`` if installed).
    device : str
        Torch device for the torch backend; ``"auto"`` picks CUDA when available.
    circle : bool
        Reconstruct only inside the inscribed circle (zero outside).
    nonneg : bool
        SIRT only: clip negative values after every iteration.
    return_residuals : bool
        SIRT with the torch backend only: also return the residual norms
        ``||b - A x_k||`` before each iteration, shape (n_rows, n_iter).

    Returns
    -------
    ndarray, float32
        ``(N, N)`` for one sinogram, ``(n_rows, N, N)`` for a stack, ``N = n_det``; values
        are attenuation per pixel. With ``return_residuals``: ``(reconstruction, residuals)``.

    Examples
    --------
    >>> import numpy as np
    >>> img = np.zeros((48, 48), np.float32); img[16:32, 12:30] = 1.0
    >>> th = np.linspace(0, np.pi, 60, endpoint=False)
    >>> rec = reconstruct(forward_project(img, th), th)
    >>> rec.shape, bool(abs(rec[24, 20] - 1.0) < 0.1)
    ((48, 48), True)
    >>> rec_sirt = reconstruct(forward_project(img, th), th, method="sirt", n_iter=50)
    >>> bool(rec_sirt.min() >= 0)
    True
    """
    stack, was_2d = _as_sinograms(sinograms)
    Z, A, D = stack.shape
    ang = _check_angles(angles, A)
    center = _check_center(center, D)
    method = check_choice(method, "method", METHODS)
    filter = check_choice(filter, "filter", FILTERS)
    backend = check_choice(backend, "backend", BACKENDS)
    n_iter = check_positive(n_iter, "n_iter", integer=True)
    if backend == "torch":
        _device(device)
    fn = _BACKENDS[backend].get(method)
    if fn is None:
        raise ValueError(f"method: {method!r} is not available with backend={backend!r}; "
                         f"choose one of {', '.join(map(repr, _BACKENDS[backend]))} or backend='torch'")
    if return_residuals and method != "sirt":
        raise ValueError("return_residuals: only meaningful for method='sirt'")
    res = fn(stack, ang, center, filter_name=filter, circle=bool(circle), device=device, n_iter=n_iter,
             nonneg=bool(nonneg), return_residuals=bool(return_residuals))
    if isinstance(res, tuple):
        rec, resid = res
        return (rec[0], resid[0]) if was_2d else (rec, resid)
    return res[0] if was_2d else res


# =========================================================================== acquisition
def _beam_profile(n_rows, n_cols, rng):
    """Smooth, slightly non-uniform open-beam profile around 1 (a few per cent)."""
    x = np.linspace(-1.0, 1.0, n_cols)
    z = np.linspace(-1.0, 1.0, n_rows)[:, None]
    prof = np.exp(-0.5 * (x / 1.6) ** 2)[None, :] * np.exp(-0.5 * (z / 3.0) ** 2)
    for _ in range(3):  # gentle ripples from optics / scintillator
        fx, fz = rng.uniform(0.5, 3.0), rng.uniform(0.0, 1.5)
        ph = rng.uniform(0, 2 * np.pi)
        prof = prof * (1.0 + 0.01 * np.cos(np.pi * (fx * x[None, :] + fz * z) + ph))
    return prof / prof.max()


def simulate_acquisition(obj, angles=None, n_angles=180, flux=1e4, n_flats=10, n_darks=10,
                         dark_level=100.0, ring_strength=0.0, pixel_size=1.0, seed=0, device="auto"):
    """Simulate a parallel-beam scan: raw counts, flats and darks of an attenuating object.

    Parameters
    ----------
    obj : array_like, shape (N, N) or (n_rows, N, N)
        Linear attenuation coefficients (per unit length; one pixel is ``pixel_size`` long).
        A volume is (z, y, x); each z slice becomes one detector row.
    angles : array_like, optional
        Angles in radians (a span above ``2.5 pi`` raises). Default ``n_angles`` angles
        evenly over [0, pi).
    n_angles : int
        Number of angles when ``angles`` is not given.
    flux : float
        Mean open-beam counts per detector pixel (sets the Poisson noise level).
    n_flats, n_darks : int
        Number of open-beam and dark frames.
    dark_level : float
        Mean dark current in counts (with a fixed 5 % pixel-to-pixel pattern).
    ring_strength : float
        Relative size of fixed per-pixel gain errors applied to the projections but not to
        the flats, e.g. ``0.02``; after flat-field correction they leave stripes in the
        sinogram, i.e. rings in the reconstruction.
    pixel_size : float
        Pixel length in the units of ``obj``'s coefficients; line integrals are scaled by it.
    seed : int or numpy.random.Generator
        Random seed (noise, beam profile, gain errors).
    device : str
        Torch device for the projector (``"auto"`` picks CUDA when available).

    Returns
    -------
    ProjectionData
        ``projections`` (n_angles, n_rows, N), ``flats`` (n_flats, n_rows, N), ``darks``
        (n_darks, n_rows, N), all float32 counts, and ``angles`` in radians.

    Examples
    --------
    >>> import numpy as np
    >>> disk = np.zeros((32, 32), np.float32); disk[8:24, 8:24] = 0.05
    >>> data = simulate_acquisition(disk, n_angles=20, flux=1000, seed=1)
    >>> data.projections.shape, data.flats.shape
    ((20, 1, 32), (10, 1, 32))
    """
    vol = as_array(obj, "obj", ndim=(2, 3))
    if vol.shape[-1] != vol.shape[-2]:
        raise ValueError(f"obj: slices must be square (N, N), got {vol.shape[-2:]}")
    vol = vol[None] if vol.ndim == 2 else vol
    if angles is None:
        n_angles = check_positive(n_angles, "n_angles", integer=True)
        ang = np.linspace(0.0, np.pi, n_angles, endpoint=False)
    else:
        ang = _check_angles(angles)
    flux = check_positive(flux, "flux")
    n_flats = check_positive(n_flats, "n_flats", integer=True)
    n_darks = check_positive(n_darks, "n_darks", integer=True)
    dark_level = check_positive(dark_level, "dark_level", allow_zero=True)
    ring_strength = check_positive(ring_strength, "ring_strength", allow_zero=True)
    pixel_size = check_positive(pixel_size, "pixel_size")
    rng = rng_from(seed)

    line = forward_project(vol.astype(np.float32) * np.float32(pixel_size), ang, device=device)
    line = np.clip(line.transpose(1, 0, 2), 0.0, None)  # (n_angles, n_rows, n_cols)
    n_rows, n_cols = line.shape[1:]
    i0 = flux * _beam_profile(n_rows, n_cols, rng)
    dark_map = np.clip(dark_level * (1.0 + 0.05 * rng.standard_normal((n_rows, n_cols))), 0.0, None)
    gain = np.clip(1.0 + ring_strength * rng.standard_normal((n_rows, n_cols)), 0.05, None)
    proj = rng.poisson(i0 * gain * np.exp(-line)) + rng.poisson(dark_map, size=line.shape)
    flats = rng.poisson(i0 + dark_map, size=(n_flats, n_rows, n_cols))
    darks = rng.poisson(dark_map, size=(n_darks, n_rows, n_cols))
    return ProjectionData(projections=proj.astype(np.float32), flats=flats.astype(np.float32),
                          darks=darks.astype(np.float32), angles=ang)


def _frames(frames, name, det_shape, average):
    arr = as_array(frames, name, ndim=(2, 3))
    if arr.shape[-2:] != det_shape:
        raise ValueError(f"{name}: detector shape {arr.shape[-2:]} differs from the projections' {det_shape}")
    arr = arr.astype(np.float32, copy=False)
    if arr.ndim == 2:
        return arr
    return np.median(arr, axis=0) if average == "median" else arr.mean(axis=0, dtype=np.float64).astype(np.float32)


def normalize(projections, flats, darks=None, eps=1e-6, average="mean"):
    """Flat- and dark-field correction: ``(projections - dark) / (flat - dark)``.

    Parameters
    ----------
    projections : array_like, shape (n_angles, n_rows, n_cols) or (n_rows, n_cols)
        Raw counts (a stack of projections, or a single one).
    flats : array_like, shape (n_flats, n_rows, n_cols) or (n_rows, n_cols)
        Open-beam frames (a stack is averaged) or one averaged frame.
    darks : array_like, shape (n_darks, n_rows, n_cols) or (n_rows, n_cols), optional
        Dark frames; ``None`` means no dark current.
    eps : float
        Transmission is clipped to ``>= eps`` so that ``minus_log`` stays finite; pixels
        whose flat is not above the dark (dead pixels) get transmission 1.
    average : {"mean", "median"}
        How to combine stacks of flats/darks (median resists zingers).

    Returns
    -------
    ndarray, float32
        Transmission, same shape as ``projections``.

    Raises
    ------
    ValueError
        More than half of the detector pixels have a flat not above the dark (flats and
        darks swapped, or not open-beam frames).

    Warns
    -----
    UserWarning
        More than 1 % of the detector pixels are dead (flat not above the dark).

    Examples
    --------
    >>> import numpy as np
    >>> proj = np.full((3, 2, 4), 550.0); flat = np.full((2, 4), 1100.0); dark = np.full((5, 2, 4), 100.0)
    >>> round(float(normalize(proj, flat, dark)[0, 0, 0]), 4)
    0.45
    """
    proj = as_array(projections, "projections", ndim=(2, 3)).astype(np.float32, copy=False)
    eps = check_positive(eps, "eps")
    average = check_choice(average, "average", ("mean", "median"))
    det = proj.shape[-2:]
    flat = _frames(flats, "flats", det, average)
    dark = np.zeros(det, np.float32) if darks is None else _frames(darks, "darks", det, average)
    den = flat - dark
    good = den > 0
    n_dead, n_pix = int(good.size - np.count_nonzero(good)), good.size
    if n_dead:
        what = "above the darks" if darks is not None else "positive (no darks given)"
        msg = (f"flats: not {what} in {n_dead} of {n_pix} detector pixels ({100.0 * n_dead / n_pix:.1f} %)")
        if n_dead > 0.5 * n_pix:
            raise ValueError(msg + ("; are flats and darks swapped?" if darks is not None else
                                    "; expected open-beam frames"))
        if n_dead > 0.01 * n_pix:
            warnings.warn(msg + "; these pixels are set to transmission 1", UserWarning, stacklevel=2)
    out = (proj - dark) / np.where(good, den, 1.0)
    out = np.where(good, out, 1.0)
    return np.clip(out, eps, None).astype(np.float32, copy=False)


def minus_log(transmission, eps=1e-6):
    """Line integrals from transmission: ``-log(max(transmission, eps))``.

    Parameters
    ----------
    transmission : array_like
        Output of :func:`normalize` (any shape).
    eps : float
        Floor applied before the logarithm.

    Returns
    -------
    ndarray, float32

    Examples
    --------
    >>> import numpy as np
    >>> minus_log(np.array([1.0, np.exp(-2.0)])).round(3).tolist()
    [-0.0, 2.0]
    """
    t = as_array(transmission, "transmission").astype(np.float32, copy=False)
    eps = check_positive(eps, "eps")
    return (-np.log(np.maximum(t, np.float32(eps)))).astype(np.float32, copy=False)


# =========================================================================== centre finding
def _center_of_mass_fit(sino, angles):
    """Coarse centre: the attenuation centre of mass of each projection traces
    ``c + a cos(theta) + b sin(theta)``; a least-squares fit gives ``c``. Works for any
    angular range (180 or 360 degrees, or 0..179 degrees) without opposite projections."""
    A, D = sino.shape
    edge = max(1, D // 40)
    bg = np.median(np.concatenate([sino[:, :edge], sino[:, -edge:]], axis=1))
    w = sino.astype(np.float64) - bg
    tot = w.sum(axis=1)
    ok = np.abs(tot) > 1e-9 * (np.abs(w).sum(axis=1) + 1e-30)
    if ok.sum() < 3:
        return (D - 1) / 2.0
    com = (w[ok] * np.arange(D)).sum(axis=1) / tot[ok]
    th = angles[ok]
    M = np.stack([np.ones_like(th), np.cos(th), np.sin(th)], axis=1)
    coef, *_ = np.linalg.lstsq(M, com, rcond=None)
    c = float(coef[0])
    return c if np.isfinite(c) and 0 <= c <= D - 1 else (D - 1) / 2.0


def _bin_detector(sino, b):
    if b == 1:
        return sino
    A, D = sino.shape
    Db = D // b
    return sino[:, :Db * b].reshape(A, Db, b).mean(axis=2)


class _CenterScorer:
    """FBP of one (binned) sinogram at many trial centres, scored by an artefact metric."""

    def __init__(self, sino, angles, b, metric, dev):
        self.b = b
        sb = _bin_detector(sino, b)
        self.N = sb.shape[1]
        k = max(1, len(angles) // (2 * self.N))  # about 2 N angles suffice for an N-pixel image
        sb, angles = sb[::k], angles[::k]
        self.angles = angles
        self.metric = metric
        self.dev = dev
        s = torch.from_numpy(np.ascontiguousarray(sb, dtype=np.float32)).to(dev)[None]
        self.q = _filter_sinograms(s, "ramp")
        self.sel = torch.as_tensor(_circle_mask(self.N).reshape(-1), device=dev)
        self.range = None

    def recon(self, center):
        cb = (center - (self.b - 1) / 2.0) / self.b
        return _backproject(self.q, self.angles, self.N, cb, circle=True).reshape(-1)[self.sel]

    def score(self, center):
        v = self.recon(center)
        if self.metric == "negativity":
            return float(-(v.clamp(max=0).sum()) / v.abs().sum().clamp_min(1e-30))
        if self.range is None:  # fixed histogram range for all trial centres of this scorer
            lo, hi = torch.quantile(v[:: max(1, v.numel() // 100000)],
                                    torch.tensor([0.005, 0.995], device=v.device)).tolist()
            pad = 0.25 * (hi - lo) + 1e-12
            self.range = (lo - pad, hi + pad)
        lo, hi = self.range
        bins = int(np.clip(np.sqrt(v.numel()) / 2, 32, 256))
        h = torch.histc(v.clamp(lo, hi), bins=bins, min=lo, max=hi)
        p = h[h > 0] / h.sum()
        return float(-(p * p.log()).sum())


def _parabola_min(xs, ys, k):
    """Sub-step refinement of the minimum at index k from its two neighbours."""
    if k == 0 or k == len(xs) - 1:
        return float(xs[k])
    y0, y1, y2 = ys[k - 1], ys[k], ys[k + 1]
    den = y0 - 2 * y1 + y2
    if den <= 0:
        return float(xs[k])
    step = xs[k + 1] - xs[k]
    return float(xs[k] + np.clip(0.5 * (y0 - y2) / den, -0.5, 0.5) * step)


def _grid_search(scorer, xs):
    ys = np.array([scorer.score(x) for x in xs])
    return ys


def _search(scorer, lo, hi, step, limits, max_shifts=4):
    """Score centres on a grid over [lo, hi]; move the window while the best is at an edge."""
    xs_all, ys_all = [], []
    for _ in range(max_shifts + 1):
        xs = np.arange(lo, hi + 1e-9, step)
        xs = xs[(xs >= limits[0]) & (xs <= limits[1])]
        if xs.size == 0:
            break
        ys = _grid_search(scorer, xs)
        xs_all += list(xs)
        ys_all += list(ys)
        k = int(np.argmin(ys))
        width = hi - lo
        if 0 < k < len(xs) - 1 or len(xs) < 3:
            break
        if k == 0 and xs[0] - step >= limits[0]:
            lo, hi = xs[0] - width, xs[0] - step
        elif k == len(xs) - 1 and xs[-1] + step <= limits[1]:
            lo, hi = xs[-1] + step, xs[-1] + width
        else:
            break
    xs_all, uniq = np.unique(np.round(np.asarray(xs_all), 9), return_index=True)
    ys_all = np.asarray(ys_all)[uniq]
    k = int(np.argmin(ys_all))
    return _parabola_min(xs_all, ys_all, k), xs_all, ys_all


def _opposite_pairs(angles):
    """For each angle, the projection taken half a turn later, if the scan has it:
    ``(i, j, k, w)`` means the opposite of ``i`` is ``(1 - w) * p[j] + w * p[k]``."""
    a = np.mod(angles, 2 * np.pi)
    order = np.argsort(a)
    srt = a[order]
    if srt.size < 4:
        return []
    step = np.median(np.diff(srt))
    if step <= 0:
        return []
    ext = np.concatenate([srt, srt[:1] + 2 * np.pi])
    ext_idx = np.concatenate([order, order[:1]])
    pairs = []
    for i, ai in enumerate(angles):
        target = np.mod(ai + np.pi, 2 * np.pi)
        k = int(np.searchsorted(ext, target))
        if k == 0:
            k = 1
        if k >= ext.size:
            continue
        lo, hi = ext[k - 1], ext[k]
        gap = hi - lo
        if abs(target - lo) <= 0.05 * step:
            pairs.append((i, ext_idx[k - 1], ext_idx[k - 1], 0.0))
        elif abs(hi - target) <= 0.05 * step:
            pairs.append((i, ext_idx[k], ext_idx[k], 0.0))
        elif gap <= 1.5 * step:
            pairs.append((i, ext_idx[k - 1], ext_idx[k], (target - lo) / gap))
    return pairs


def _center_from_opposites(sino, pairs):
    """Mirror each opposite projection and cross-correlate it with its partner: the shift
    ``s`` of the correlation peak gives ``center = (s + n_det - 1) / 2``. The mean over
    angles is removed first, so stripes (fixed along the angles) do not correlate."""
    A, D = sino.shape
    x = sino.astype(np.float64) - sino.mean(axis=0, keepdims=True)
    L = 1 << int(math.ceil(math.log2(4 * D)))
    i = np.array([p[0] for p in pairs])
    j = np.array([p[1] for p in pairs])
    k = np.array([p[2] for p in pairs])
    w = np.array([p[3] for p in pairs])[:, None]
    opp = ((1 - w) * x[j] + w * x[k])[:, ::-1]
    spec = np.fft.rfft(x[i], L, axis=1) * np.conj(np.fft.rfft(opp, L, axis=1))
    corr = np.fft.irfft(spec.sum(axis=0), L)
    shifts = np.fft.fftfreq(L) * L
    keep = np.abs(shifts) <= D - 1  # centre within the detector
    cand = np.where(keep, corr, -np.inf)
    m = int(np.argmax(cand))
    y0, y1, y2 = corr[m - 1], corr[m], corr[(m + 1) % L]
    den = y0 - 2 * y1 + y2
    off = 0.5 * (y0 - y2) / den if den < 0 else 0.0
    return float((shifts[m] + np.clip(off, -0.5, 0.5) + D - 1) / 2.0)


def find_center(sinogram, angles, init=None, search_range=None, method="auto", metric="entropy",
                return_scores=False, device="auto"):
    """Find the rotation centre of a parallel-beam sinogram.

    Two estimators:

    * ``"metric"`` (used for 180 degree scans): a coarse estimate from a sinusoid fit to
      the projections' centres of mass (valid for any angular range, e.g. 0..179 degrees)
      is refined by minimising an artefact measure of fast FBP reconstructions, first on
      a detector binned to about 64 pixels over ``init +- search_range``, then on one
      binned to about 160 pixels over +-2 px in 0.5 px steps, with a parabola through the
      best three points for the sub-pixel value.
    * ``"opposite"`` (used for 360 degree scans): each projection is compared with the
      mirrored projection half a turn later (interpolated between the two nearest angles
      when that angle was not measured); the cross-correlation peak gives the centre
      directly and more precisely than the metric, which is shallow for 360 degree data.

    Parameters
    ----------
    sinogram : array_like, shape (n_angles, n_det)
        Line integrals (``minus_log`` output) of one detector row; a constant sinogram
        (no sample in the beam) raises ``ValueError``.
    angles : array_like, shape (n_angles,)
        Angles in radians (a span above ``2.5 pi`` raises).
    init : float, optional
        ``"metric"``: starting guess in detector pixels; default the centre-of-mass estimate.
    search_range : float, optional
        ``"metric"``: half-width (pixels) of the search window around the
        centre-of-mass estimate; default ``max(3, n_det / 64)``. The window is a trust
        region (give a wider one when the centre of mass is unreliable, e.g. for a
        sample wider than the field of view): on small
        or noisy sinograms the artefact metric is flat and noisy, and an unbounded
        search wanders off a good centre-of-mass estimate (measured on 64-pixel noisy
        sinograms: errors up to 27 pixels unbounded). When the metric's minimum lies on
        the window's edge the centre-of-mass estimate is returned (``return_scores``
        says so in ``method``).
    method : {"auto", "metric", "opposite"}
        ``"auto"``: ``"opposite"`` when at least a quarter of the projections have an
        opposite one (360 degree scans), else ``"metric"``.
    metric : {"entropy", "negativity"}
        Artefact measure: histogram entropy of the reconstruction (Donath et al. 2006),
        or the fraction of negative mass; both are smallest at the right centre.
    return_scores : bool
        Also return a dict of diagnostics: ``method``, ``coarse`` estimate, the trial
        centres and scores of both stages (``stage1``, ``stage2``) and the binning used.
    device : str
        Torch device (``"auto"`` picks CUDA when available).

    Returns
    -------
    float or (float, dict)
        Centre in detector pixels (0-based, pixel centres at integers; the detector middle
        is ``(n_det - 1) / 2``), ready for ``reconstruct(..., center=...)``.

    Examples
    --------
    >>> import numpy as np
    >>> img = np.zeros((96, 96), np.float32); img[30:50, 25:45] = 1; img[55:70, 50:75] = 2
    >>> th = np.linspace(0, np.pi, 120, endpoint=False)
    >>> sino = forward_project(img, th, center=50.0)
    >>> round(find_center(sino, th), 1)
    50.0
    """
    sino = as_array(sinogram, "sinogram", ndim=2).astype(np.float32, copy=False)
    A, D = sino.shape
    if D < 8 or A < 3:
        raise ValueError(f"sinogram: needs at least 3 angles and 8 detector pixels, got shape {sino.shape}")
    ang = _check_angles(angles, A)
    method = check_choice(method, "method", ("auto", "metric", "opposite"))
    metric = check_choice(metric, "metric", ("entropy", "negativity"))
    if search_range is not None:
        search_range = check_positive(search_range, "search_range")
    if init is not None:
        init = _check_center(init, D, "init")
    dev = _device(device)
    if np.ptp(sino) == 0:
        raise ValueError(f"sinogram: all values are equal ({float(sino.flat[0])!r}); there is no sample to find "
                         "the rotation centre from")

    pairs = _opposite_pairs(ang) if method in ("auto", "opposite") else []
    if method == "opposite" and not pairs:
        raise ValueError("method: 'opposite' needs projections half a turn apart (a 360 degree scan); "
                         "use method='metric'")
    if method == "opposite" or (method == "auto" and len(pairs) >= max(3, A // 4)):
        c = _center_from_opposites(sino, pairs)
        if return_scores:
            return c, {"method": "opposite", "coarse": c, "n_pairs": len(pairs)}
        return c

    limits = (0.0, D - 1.0)
    c0 = _center_of_mass_fit(sino, ang) if init is None else init
    if search_range is None:
        search_range = max(3.0, D / 64.0)
    with torch.no_grad(), _threads(dev):
        b1 = max(1, int(round(D / 64)))
        s1 = _CenterScorer(sino, ang, b1, metric, dev)
        step1 = float(np.clip(b1 / 4.0, 0.5, 2.0))
        c1, x1, y1 = _search(s1, c0 - search_range, c0 + search_range, step1, limits, max_shifts=0)
        b2 = max(1, int(round(D / 160)))
        s2 = _CenterScorer(sino, ang, b2, metric, dev)
        k1 = int(np.argmin(y1))
        inconclusive = k1 in (0, len(y1) - 1)
        if inconclusive:
            c2, x2, y2 = c0, np.array([]), np.array([])
        else:
            c2, x2, y2 = _search(s2, c1 - 2.0, c1 + 2.0, 0.5, limits)
    if return_scores:
        return c2, {"method": "centre of mass (metric has no minimum in the window)" if inconclusive else "metric",
                    "coarse": c0, "stage1": (x1, y1), "stage2": (x2, y2), "binning": (b1, b2)}
    return c2


# =========================================================================== ring removal
def _sorting_filter(sino, size):
    """Vo et al. (2018) idea: in each detector column sort the values along the angles; in
    this sorted domain a stripe is a column offset that a median filter across the
    detector removes without touching the object's features; undo the sort."""
    order = np.argsort(sino, axis=0, kind="stable")
    srt = np.take_along_axis(sino, order, axis=0)
    srt = ndimage.median_filter(srt, size=(1, size), mode="reflect")
    out = np.empty_like(sino)
    np.put_along_axis(out, order, srt, axis=0)
    return out


def _mean_filter(sino, size):
    """Detector-mean correction: a full stripe shifts its column's mean over the angles;
    the object's mean profile is smooth (or has edges a median keeps), so the part of the
    column means that a median filter across the detector removes is the stripe offset,
    subtracted from every angle."""
    m = sino.astype(np.float64).mean(axis=0)
    offset = m - ndimage.median_filter(m, size=size, mode="nearest")
    return (sino - offset[None, :]).astype(np.float32)


def remove_rings(sinogram_or_stack, method="sorting", size=21):
    """Remove stripes from sinograms (they become rings in the reconstruction).

    Parameters
    ----------
    sinogram_or_stack : array_like, shape (n_angles, n_det) or (n_rows, n_angles, n_det)
        Sinograms, best as line integrals (``minus_log`` output).
    method : {"sorting", "mean"}
        ``"sorting"``: sort each detector column along the angles, median filter across the
        detector in the sorted domain, unsort (after Vo et al., Opt. Express 2018);
        removes full and partial stripes and keeps the object. ``"mean"``: subtract from
        every angle the high-pass part (what a median filter across the detector removes)
        of the column means; fast, removes full stripes only.
    size : int
        Median window across the detector, in pixels; larger removes wider stripes but
        touches more of the object. 21 suits detectors of 500-2000 pixels; use 5-11 for
        small (~100-300 pixel) sinograms.

    Returns
    -------
    ndarray, float32
        Same shape as the input.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> sino = np.tile(np.hanning(64), (90, 1)) + 0.05 * rng.standard_normal(64)  # fixed stripes
    >>> clean = remove_rings(sino, method="sorting", size=11)
    >>> bool(stripe_metric(clean) < 0.5 * stripe_metric(sino))
    True
    """
    stack, was_2d = _as_sinograms(sinogram_or_stack, "sinogram_or_stack")
    method = check_choice(method, "method", RING_METHODS)
    size = check_positive(size, "size", integer=True)
    filt = _sorting_filter if method == "sorting" else _mean_filter
    out = np.empty_like(stack)
    for z in _progress(range(stack.shape[0]), stack.shape[0], stack.shape[0] > 64, "remove_rings"):
        out[z] = filt(stack[z], size)
    return out[0] if was_2d else out


def stripe_metric(sinogram_or_stack, size=15):
    """How stripy a sinogram is: the standard deviation of its column means (averaged over
    the angles) after removing their smooth part with a median filter across the detector.

    The object contributes a smooth mean profile; fixed per-pixel offsets (stripes, which
    reconstruct as rings) stand out of it. Same units as the sinogram; for a stack, the
    mean over rows. Use it to compare the same data before and after :func:`remove_rings`.

    Parameters
    ----------
    sinogram_or_stack : array_like, shape (n_angles, n_det) or (n_rows, n_angles, n_det)
    size : int
        Median window (pixels) defining the smooth part.

    Returns
    -------
    float

    Examples
    --------
    >>> import numpy as np
    >>> sino = np.ones((10, 50)); sino[:, 20] += 0.5
    >>> round(stripe_metric(sino), 3) > 0
    True
    """
    stack, _ = _as_sinograms(sinogram_or_stack, "sinogram_or_stack")
    size = check_positive(size, "size", integer=True)
    means = stack.astype(np.float64).mean(axis=1)  # (n_rows, n_det)
    hp = means - ndimage.median_filter(means, size=(1, size), mode="nearest")
    return float(hp.std(axis=1).mean())


# --------------------------------------------------------------------------- your own scan
def bin_detector(data, factor):
    """Average ``factor`` neighbouring detector pixels (the last axis); a remainder is dropped.

    Binning a sinogram by 2 halves the reconstruction's size per axis (4x fewer pixels, ~8x less
    FBP work) and lowers the noise: use it for quick looks at large detectors. A rotation centre
    ``c`` found on the binned detector is ``(c + 0.5) * factor - 0.5`` unbinned.

    Examples
    --------
    >>> bin_detector(np.arange(10.0).reshape(2, 5), 2).tolist()
    [[0.5, 2.5], [5.5, 7.5]]
    """
    arr = as_array(data, "data", dtype=np.float32)
    if isinstance(factor, bool) or not isinstance(factor, numbers.Integral) or factor < 1:
        raise ValueError(f"factor: must be an integer >= 1, got {factor!r}")
    factor = int(factor)
    if factor == 1:
        return arr
    n = arr.shape[-1] // factor
    if n < 1:
        raise ValueError(f"factor: {factor} is larger than the detector ({arr.shape[-1]} pixels)")
    return arr[..., :n * factor].reshape(*arr.shape[:-1], n, factor).mean(-1)


def read_line_integrals(file, rows=None, *, binning=1, angles_unit="degrees", average="mean"):
    """Read a raw data-exchange scan and return its line integrals, ready to reconstruct.

    Reads only the requested detector rows (a whole scan need not fit in memory), applies
    flat/dark correction and ``-log`` (:func:`normalize`, :func:`minus_log`) and bins the
    detector.

    Parameters
    ----------
    file : str or Path
        HDF5 file in the data-exchange layout (``exchange/data``, ``data_white``, ``data_dark``,
        ``theta``), see :func:`tomoml_nb.data.read_data_exchange`.
    rows : int, slice or None
        An int ``k``: the ``k`` rows around the middle of the detector; a slice: those rows;
        None: all rows.
    binning : int
        Detector binning (:func:`bin_detector`).
    angles_unit : {"degrees", "radians"}
        Unit of ``exchange/theta`` (the data-exchange convention is degrees).
    average : {"mean", "median"}
        How stacks of flats and darks are combined (:func:`normalize`; median resists zingers).

    Returns
    -------
    lines : ndarray float32, shape (n_angles, n_rows, n_det // binning)
    angles : ndarray, radians
    rows : range
        The detector rows read.

    Examples
    --------
    >>> lines, angles, rows = read_line_integrals("tooth.h5", rows=1, binning=2)   # doctest: +SKIP
    >>> lines.shape, rows                                                          # doctest: +SKIP
    ((181, 1, 320), range(0, 1))
    """
    import h5py

    from .data import read_data_exchange

    with h5py.File(file, "r") as f:
        if "exchange/data" not in f:
            raise KeyError(f"file: {file} has no 'exchange/data'; not a data-exchange file")
        n_rows = int(f["exchange/data"].shape[1])
    if rows is None:
        sel = range(n_rows)
    elif isinstance(rows, slice):
        sel = range(n_rows)[rows]
    elif isinstance(rows, numbers.Integral) and not isinstance(rows, bool) and rows >= 1:
        k = min(int(rows), n_rows)
        sel = range((n_rows - k) // 2, (n_rows - k) // 2 + k)
    else:
        raise ValueError(f"rows: expected a positive int, a slice or None, got {rows!r}")
    if len(sel) == 0 or sel.step != 1:
        raise ValueError(f"rows: {rows!r} selects no contiguous rows of the {n_rows} in {file}")
    scan = read_data_exchange(file, angles_unit=angles_unit, rows=slice(sel.start, sel.stop))
    lines = minus_log(normalize(scan.projections, scan.flats, scan.darks, average=average))
    return bin_detector(lines, binning), scan.angles, sel
