"""Digital volume correlation (DVC): dense 3D displacement between two volumes, and strain.

Methods of :func:`estimate_displacement` (all return ``(3, z, y, x)`` float32 in voxels):

* ``"volraft"`` -- a small volumetric RAFT network (:mod:`tomoml_nb.models.raft3d`)
  trained on synthetic displacement fields applied to real and synthetic textures
  (``scripts/train_volraft.py``); whole volumes are processed as overlapping patches
  blended with Gaussian weights (:func:`tomoml_nb.tiling.sliding_window`), so memory
  follows the patch size, and patches without a mask voxel are skipped.
* ``"optflow"`` -- classical variational optical flow: coarse-to-fine pyramid, warping,
  robust (Charbonnier) data term, TV-type (Charbonnier) regulariser, solved by lagged
  diffusivity with red-black SOR, in torch (CPU or GPU); presets ``"default"`` and
  ``"optimised"`` (finer pyramid, more warps, median filtering of the flow).
* ``"tvl1"`` and ``"ilk"`` -- scikit-image's N-d TV-L1 and iterative Lucas-Kanade
  optical flow (:func:`skimage.registration.optical_flow_tvl1`,
  :func:`skimage.registration.optical_flow_ilk`), as well-kept classical baselines.

Convention (DESIGN.md): ``u`` is Lagrangian, the material at ``x`` in ``fixed`` sits at
``x + u(x)`` in ``moving``, so ``moving(x + u(x)) ≈ fixed(x)``; components ``(z, y, x)``.
:func:`tomoml_nb.phantoms.deform` builds such pairs and :func:`tomoml_nb.phantoms.warp`
checks them.

Intensity normalisation: both volumes are cast to float32 and mapped with the *same*
affine transform taken from the fixed volume (its mean and standard deviation; for
``"volraft"`` per patch, with a floor on the standard deviation), so integer and float
inputs, and any grey-value range, give the same displacement; brightness constancy
between the two volumes is assumed.

Examples
--------
>>> import numpy as np
>>> from tomoml_nb import phantoms
>>> from tomoml_nb.dvc import estimate_displacement
>>> rng = np.random.default_rng(0)
>>> from scipy import ndimage as ndi
>>> fixed = ndi.gaussian_filter(rng.random((24, 32, 32)), 1.5).astype(np.float32)
>>> u = np.zeros((3, 24, 32, 32), np.float32); u[2] = 1.0          # +1 voxel along x
>>> moving = phantoms.deform(fixed, u)
>>> est = estimate_displacement(fixed, moving, method="optflow", progress=False)
>>> bool(abs(float(np.median(est[2, 6:-6, 8:-8])) - 1.0) < 0.1)
True
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ._validate import as_array, check_choice, check_positive, rng_from
from .train import limit_cpu_threads as _threads

__all__ = [
    "METHODS", "OPTFLOW_PRESETS", "SKIMAGE_PRESETS", "estimate_displacement", "strain", "synthetic_pair",
    "SyntheticPairs", "make_model", "save_model", "load_model", "load_pretrained", "pretrained_path",
    "fine_tune", "sequence_loss", "evaluate", "choose_iters", "inference_iters", "DEFAULT_ITERS", "plot_strain",
    "plot_error_maps",
]

METHODS = ("volraft", "optflow", "tvl1", "ilk")
_FORMAT = "tomoml_nb.dvc.volraft/1"
DEFAULT_ITERS = 12          # refinement iterations when the weights do not name their own
_PRETRAINED = {"synthetic": "volraft_synthetic.pt"}

#: Settings of this package's variational optical flow. "optimised" was chosen on validation
#: pairs (bone-implant phantom seed 50 and procedural textures, field seeds >= 5000; never the
#: benchmark cases) -- see benchmarks/dvc.py, which re-tunes the classical methods in every run.
OPTFLOW_PRESETS = {
    "default": dict(alpha=0.3, scale=0.5, levels=6, warps=3, sweeps=20, omega=1.8, eps_data=0.1,
                    eps_smooth=0.05, presmooth=0.0, median=0),
    "optimised": dict(alpha=0.1, scale=0.7, levels=10, warps=5, sweeps=30, omega=1.9, eps_data=0.05,
                      eps_smooth=0.02, presmooth=0.5, median=3),
}
#: scikit-image optical-flow settings: its own defaults, and values tuned on the validation pairs.
SKIMAGE_PRESETS = {
    "tvl1": {"default": dict(attachment=15, tightness=0.3, num_warp=5, num_iter=10),
             "optimised": dict(attachment=10, tightness=0.3, num_warp=10, num_iter=20)},
    "ilk": {"default": dict(radius=7, num_warp=10),
            "optimised": dict(radius=5, num_warp=10, gaussian=True)},
}


# --------------------------------------------------------------------------------------
# validation and normalisation
# --------------------------------------------------------------------------------------
def _check_pair(fixed, moving, mask=None, min_size=8):
    fixed = as_array(fixed, "fixed", ndim=3, nonconstant=True)
    moving = as_array(moving, "moving", ndim=3, nonconstant=True)
    if moving.shape != fixed.shape:
        raise ValueError(f"moving: shape {moving.shape} differs from fixed shape {fixed.shape}")
    if min(fixed.shape) < min_size:
        raise ValueError(f"fixed: every axis needs at least {min_size} voxels, got shape {fixed.shape}")
    if mask is not None:
        mask = as_array(mask, "mask", ndim=3)
        if mask.shape != fixed.shape:
            raise ValueError(f"mask: shape {mask.shape} differs from fixed shape {fixed.shape}")
        mask = mask.astype(bool)
        if not mask.any():
            raise ValueError("mask: contains no True voxel")
    return fixed, moving, mask


def _normalise_pair(fixed, moving):
    """Both volumes mapped with the fixed volume's mean and standard deviation (float32)."""
    f = fixed.astype(np.float32)
    m = moving.astype(np.float32)
    mean, std = float(f.mean(dtype=np.float64)), float(f.std(dtype=np.float64))
    std = std if std > 0 else 1.0
    return (f - mean) / std, (m - mean) / std


# --------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------
def estimate_displacement(fixed, moving, method="volraft", mask=None, *, preset="default", model=None,
                          patch_shape=64, overlap=16, iters=None, device="auto", progress=True, seed=0, **kwargs):
    """Dense 3D displacement ``u`` with ``moving(x + u(x)) ≈ fixed(x)``.

    Parameters
    ----------
    fixed, moving : array_like, 3D, same shape (integer or float)
        The reference and the deformed volume, axes ``(z, y, x)``; at least 8 voxels
        per axis, finite, not constant. Both are normalised with the fixed volume's
        mean and standard deviation (see the module docstring).
    method : {"volraft", "optflow", "tvl1", "ilk"}
        Learned network, this package's variational optical flow, or scikit-image's
        TV-L1 / iterative Lucas-Kanade.
    mask : array_like of bool, optional
        Region of interest. ``"volraft"`` skips patches without a mask voxel (left at
        0); ``"optflow"`` uses only masked voxels in its data term (the regulariser
        fills the rest). The scikit-image methods ignore it. Values outside the mask
        are not meaningful.
    preset : {"default", "optimised"}
        Settings of the classical methods (:data:`OPTFLOW_PRESETS`,
        :data:`SKIMAGE_PRESETS`); ``**kwargs`` override single settings.
    model : VolRAFT, optional
        Network for ``"volraft"`` (default: the shipped weights, :func:`load_pretrained`).
    patch_shape, overlap : int or tuple
        Patch size and overlap of the sliding window for ``"volraft"``.
    iters : int, optional
        Recurrent refinement iterations of the network. Default: the number stored with
        the weights (``inference_iters``, chosen on validation pairs by
        :func:`choose_iters`; 6 for the shipped network), else 12.
    device : str
        ``"auto"`` picks CUDA when available (``"volraft"``, ``"optflow"``).
    progress : bool
        Show tqdm progress bars.
    seed : int
        Unused by the deterministic methods; kept for a uniform signature.

    Returns
    -------
    ndarray of float32, shape ``(3, *fixed.shape)``
        Displacement in voxels, components ``(z, y, x)``.

    Examples
    --------
    >>> import numpy as np
    >>> from scipy import ndimage as ndi
    >>> from tomoml_nb import phantoms
    >>> f = ndi.gaussian_filter(np.random.default_rng(1).random((16, 24, 24)), 1.5)
    >>> u = np.zeros((3, 16, 24, 24), np.float32); u[1] = -0.8
    >>> est = estimate_displacement(f, phantoms.deform(f, u), method="tvl1")
    >>> est.shape, est.dtype
    ((3, 16, 24, 24), dtype('float32'))
    """
    check_choice(method, "method", METHODS)
    check_choice(preset, "preset", ("default", "optimised"))
    fixed, moving, mask = _check_pair(fixed, moving, mask)
    f, m = _normalise_pair(fixed, moving)
    if method == "volraft":
        if iters is not None:
            iters = check_positive(iters, "iters", integer=True)
        if kwargs:
            raise TypeError(f"{next(iter(kwargs))}: not an option of method 'volraft'")
        net = model if model is not None else load_pretrained(device=device)
        if iters is None:
            iters = inference_iters(net)
        return _volraft(f, m, mask, net, patch_shape, overlap, iters, device, progress)
    if method == "optflow":
        opts = dict(OPTFLOW_PRESETS[preset])
        for k in kwargs:
            if k not in opts:
                raise TypeError(f"{k}: not an option of method 'optflow' (accepted: {', '.join(opts)})")
        opts.update(kwargs)
        return _optflow(f, m, mask, device=device, progress=progress, **opts)
    opts = dict(SKIMAGE_PRESETS[method][preset])
    opts.update(kwargs)
    from skimage.registration import optical_flow_ilk, optical_flow_tvl1

    func = optical_flow_tvl1 if method == "tvl1" else optical_flow_ilk
    try:
        u = func(f, m, **opts)
    except TypeError as exc:
        raise TypeError(f"kwargs: not accepted by scikit-image's {func.__name__}: {exc}") from exc
    return np.asarray(u, dtype=np.float32)


# --------------------------------------------------------------------------------------
# learned: VolRAFT
# --------------------------------------------------------------------------------------
def _triple(value, name):
    """An int or 3 ints (z, y, x) -> tuple of 3 ints; an error naming ``name`` otherwise."""
    arr = np.asarray(value)
    if arr.ndim == 0:
        arr = np.full(3, arr)
    if arr.shape != (3,) or arr.dtype.kind not in "iuf" or not np.all(np.isfinite(arr)) \
            or not np.all(arr == np.round(arr)):
        raise ValueError(f"{name}: expected an integer or 3 integers (z, y, x), got {value!r}")
    return tuple(int(v) for v in arr)


def _volraft(f, m, mask, net, patch_shape, overlap, iters, device, progress):
    import torch

    from .tiling import sliding_window
    from .train import resolve_device

    if not hasattr(net, "factor") or not hasattr(net, "fnet"):
        raise TypeError("model: expected a VolRAFT network (see load_pretrained / make_model)")
    dev = resolve_device(device)
    net = net.to(dev).eval()
    factor = net.factor
    patch = _triple(patch_shape, "patch_shape")
    for p in patch:
        check_positive(p, "patch_shape", integer=True)
        if p < 16:
            raise ValueError(f"patch_shape: every axis needs at least 16 voxels, got {patch}")
    ov = _triple(overlap, "overlap")
    if any(o < 0 or o >= p for o, p in zip(ov, patch)):
        raise ValueError(f"overlap: must be in [0, patch_shape), got {ov} for patch_shape {patch}")
    floor = 0.05  # f is already globally standardised: per-patch std never below 5 % of the global one
    stack = np.stack([f, m])

    def one_patch(p):
        shape = p.shape[1:]
        target = [max(16, int(math.ceil(s / factor)) * factor) for s in shape]
        pads = [(0, 0)] + [(0, t - s) for t, s in zip(target, shape)]
        p = np.pad(p, pads, mode="edge") if any(t != s for t, s in zip(target, shape)) else p
        mean = float(p[0].mean())
        std = max(float(p[0].std()), floor)
        x = torch.from_numpy(np.ascontiguousarray((p - mean) / std, dtype=np.float32))[:, None].to(dev)
        with torch.no_grad():
            out = net(x[:1], x[1:], iters=iters)[-1][0]
        return out.float().cpu().numpy()[(slice(None), *(slice(0, s) for s in shape))]

    with _threads(dev):
        return sliding_window(stack, one_patch, patch, ov, mask=mask, out_channels=3, progress=progress,
                              desc="volraft patches").astype(np.float32, copy=False)


def make_model(**config):
    """A fresh (untrained) :class:`~tomoml_nb.models.raft3d.VolRAFT`; ``config`` overrides its defaults.

    Examples
    --------
    >>> make_model(downsample=4).factor
    4
    """
    from .models.raft3d import VolRAFT

    return VolRAFT(**config)


def save_model(model, path, history=None, *, overwrite=False, **meta):
    """Save a VolRAFT network (state dict + config) with :func:`tomoml_nb.weights.save_state`.

    An existing file is refused (``FileExistsError`` naming ``path``) unless
    ``overwrite=True``; ``meta`` is stored as provenance.

    Examples
    --------
    >>> import os, tempfile
    >>> p = save_model(make_model(), os.path.join(tempfile.mkdtemp(), "v.pt"))
    >>> load_model(p).factor
    4
    """
    from . import weights

    if not hasattr(model, "config") or not hasattr(model, "fnet"):
        raise TypeError("model: expected a VolRAFT network")
    return weights.save_state(path, format=_FORMAT, config=model.config, state_dict=model.state_dict(),
                              history=history or getattr(model, "tomoml_history", {}), meta=meta,
                              overwrite=overwrite)


def load_model(path, device="cpu"):
    """Load a VolRAFT network saved by :func:`save_model` (eval mode).

    Examples
    --------
    >>> net = load_model(pretrained_path())
    >>> net.factor
    4
    """
    from . import weights

    state = weights.load_state(path, format=_FORMAT)
    net = make_model(**state["config"])
    return weights.restore(net, state, device)


def pretrained_path(name="synthetic") -> Path:
    """Path of the shipped VolRAFT weights (inside the installed package).

    Examples
    --------
    >>> pretrained_path().name
    'volraft_synthetic.pt'
    """
    from .weights import shipped_path

    check_choice(name, "name", tuple(_PRETRAINED))
    return shipped_path(_PRETRAINED[name], script="scripts/train_volraft.py")


def load_pretrained(name="synthetic", device="cpu"):
    """Load the shipped VolRAFT weights, offline; model card ``tomoml_nb/weights/volraft_synthetic.md``.

    Examples
    --------
    >>> load_pretrained().config["downsample"]
    4
    """
    from .train import resolve_device

    return load_model(pretrained_path(name), device=resolve_device(device))


# --------------------------------------------------------------------------------------
# classical: variational optical flow (torch)
# --------------------------------------------------------------------------------------
def _blur(x, sigma):
    import torch
    from torch.nn import functional as F

    if sigma <= 0:
        return x
    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = 2 * r + 1
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        x = F.conv3d(F.pad(x, pad, mode="replicate"), k.view(1, 1, *shape).repeat(c, 1, 1, 1, 1), groups=c)
    return x


def _resize(x, shape):
    from torch.nn import functional as F

    return F.interpolate(x, size=tuple(shape), mode="trilinear", align_corners=True)


def _warp_t(vol, u):
    """``vol(x + u(x))`` for ``vol (1, C, D, H, W)`` and ``u (1, 3, D, H, W)`` (border clamped)."""
    from .models.raft3d import coords_grid, sample_grid

    pts = (coords_grid(1, u.shape[-3:], u.device, u.dtype) + u).permute(0, 2, 3, 4, 1)
    return sample_grid(vol, pts, padding_mode="border")


def _grad(x):
    """Central differences along (z, y, x) with one-sided ends: ``(1, 3, D, H, W)`` for ``x (1, 1, D, H, W)``."""
    import torch

    out = []
    for ax in (2, 3, 4):
        out.append(torch.gradient(x, dim=ax)[0] if x.shape[ax] > 1 else torch.zeros_like(x))
    return torch.cat(out, 1)


def _fdiff(u, ax):
    """Forward difference along ``ax`` (0 at the last plane)."""
    import torch

    d = torch.zeros_like(u)
    n = u.shape[ax]
    if n > 1:
        d.narrow(ax, 0, n - 1).copy_(u.narrow(ax, 1, n - 1) - u.narrow(ax, 0, n - 1))
    return d


def _shift(x, ax, step):
    """``x[p + step * e_ax]`` with zeros outside (step = +1 or -1)."""
    import torch

    out = torch.zeros_like(x)
    n = x.shape[ax]
    if n > 1:
        if step > 0:
            out.narrow(ax, 0, n - 1).copy_(x.narrow(ax, 1, n - 1))
        else:
            out.narrow(ax, 1, n - 1).copy_(x.narrow(ax, 0, n - 1))
    return out


def _optflow(f, m, mask, *, alpha, scale, levels, warps, sweeps, omega, eps_data, eps_smooth, presmooth,
             median, device="auto", progress=True, min_size=8):
    import torch
    from tqdm.auto import tqdm

    from .train import resolve_device

    check_positive(alpha, "alpha")
    if not 0.3 <= scale < 1:
        raise ValueError(f"scale: pyramid scale factor must be in [0.3, 1), got {scale!r}")
    levels = check_positive(levels, "levels", integer=True)
    warps = check_positive(warps, "warps", integer=True)
    sweeps = check_positive(sweeps, "sweeps", integer=True)
    if not 0 < omega < 2:
        raise ValueError(f"omega: SOR relaxation must be in (0, 2), got {omega!r}")
    check_positive(eps_data, "eps_data")
    check_positive(eps_smooth, "eps_smooth")
    check_positive(presmooth, "presmooth", allow_zero=True)
    median = check_positive(median, "median", integer=True, allow_zero=True)
    dev = resolve_device(device)
    with _threads(dev), torch.no_grad():
        I0 = torch.from_numpy(f)[None, None].to(dev)
        I1 = torch.from_numpy(m)[None, None].to(dev)
        W0 = (torch.from_numpy(mask.astype(np.float32))[None, None].to(dev) if mask is not None
              else torch.ones_like(I0))
        if presmooth > 0:
            I0, I1 = _blur(I0, presmooth), _blur(I1, presmooth)
        shapes = [tuple(I0.shape[-3:])]
        while len(shapes) < levels:
            nxt = tuple(max(1, int(round(s * scale))) for s in shapes[-1])
            if min(nxt) < min_size or nxt == shapes[-1]:
                break
            shapes.append(nxt)
        sigma = 0.5 * math.sqrt(1 / scale**2 - 1)
        pyr = [(I0, I1, W0)]
        for shp in shapes[1:]:
            a, b, w = pyr[-1]
            pyr.append((_resize(_blur(a, sigma), shp), _resize(_blur(b, sigma), shp), _resize(w, shp)))
        u = torch.zeros((1, 3, *shapes[-1]), device=dev)
        parity = None
        total = sum(warps for _ in shapes)
        bar = tqdm(total=total, desc="optflow warps", disable=not progress)
        for lvl in range(len(shapes) - 1, -1, -1):
            a, b, w = pyr[lvl]
            shp = shapes[lvl]
            if tuple(u.shape[-3:]) != shp:
                old = u.shape[-3:]
                u = _resize(u, shp)
                ratio = torch.tensor([(n - 1) / max(o - 1, 1) for n, o in zip(shp, old)], device=dev)
                u = u * ratio.view(1, 3, 1, 1, 1)
            idx = [torch.arange(n, device=dev) for n in shp]
            zz, yy, xx = torch.meshgrid(*idx, indexing="ij")
            parity = ((zz + yy + xx) % 2 == 0)[None, None]
            ga = _grad(a)
            for _ in range(warps):
                bw = _warp_t(b, u)
                g = 0.5 * (_grad(bw) + ga)
                it = bw - a
                du = torch.zeros_like(u)
                for s in range(sweeps):
                    if s % 5 == 0:  # lagged diffusivity: robust weights from the current estimate
                        rho = it + (g * du).sum(1, keepdim=True)
                        wd = w / torch.sqrt(rho**2 + eps_data**2)
                        U = u + du
                        mag = sum((_fdiff(U, ax) ** 2).sum(1, keepdim=True) for ax in (2, 3, 4))
                        ps = 1.0 / torch.sqrt(mag + eps_smooth**2)
                        wax = []  # edge weight between p and p + e_ax (0 past the last plane)
                        for ax in (2, 3, 4):
                            e = 0.5 * (ps + _shift(ps, ax, +1))
                            n = e.shape[ax]
                            e.narrow(ax, n - 1, 1).zero_()
                            wax.append(e)
                        wsum = sum(e + _shift(e, ax, -1) for e, ax in zip(wax, (2, 3, 4)))
                        c = alpha * wsum + 1e-9
                        aa = wd * (g**2).sum(1, keepdim=True)
                    for colour in (parity, ~parity):
                        U = u + du
                        nsum = sum(e * _shift(U, ax, +1) + _shift(e * U, ax, -1)
                                   for e, ax in zip(wax, (2, 3, 4)))
                        r = -wd * it * g + alpha * (nsum - wsum * u)
                        ar = wd * (g * r).sum(1, keepdim=True)
                        x = (r - g * ar / (c + aa)) / c
                        du = torch.where(colour, (1 - omega) * du + omega * x, du)
                u = u + du
                if median > 1:
                    from scipy import ndimage as ndi

                    un = u[0].cpu().numpy()
                    un = np.stack([ndi.median_filter(un[i], size=median, mode="nearest") for i in range(3)])
                    u = torch.from_numpy(un)[None].to(dev)
                bar.update(1)
        bar.close()
        return u[0].cpu().numpy().astype(np.float32)


# --------------------------------------------------------------------------------------
# strain
# --------------------------------------------------------------------------------------
def strain(u, voxel_size=1.0, smooth=0.0, *, mask=None):
    """Green-Lagrange strain and its invariants from a displacement field.

    ``F = I + grad u`` (central differences, ``grad u[i, j] = d u_i / d x_j`` with
    ``i, j`` in ``(z, y, x)``), ``E = (F^T F - I) / 2``.

    Parameters
    ----------
    u : array_like, shape (3, z, y, x)
        Displacement in voxels (Lagrangian, as from :func:`estimate_displacement`).
    voxel_size : float or 3 floats
        Voxel size per axis; displacements are converted to the same unit, so the
        strain is dimensionless whatever the unit.
    smooth : float
        Gaussian smoothing (sigma, voxels) of ``u`` before differentiation; DVC
        fields are noisy and differentiation amplifies noise.
    mask : array_like of bool, optional
        Outside the mask every output is set to NaN.

    Returns
    -------
    dict of float32 arrays
        ``"E"`` (3, 3, z, y, x) Green-Lagrange tensor; ``"volumetric"`` det F - 1;
        ``"max_shear"`` (e1 - e3) / 2 of the principal strains; ``"max_principal"`` e1;
        ``"principal"`` (3, z, y, x) principal strains, largest first.

    Examples
    --------
    >>> import numpy as np
    >>> z, y, x = np.indices((8, 8, 8), dtype=np.float32)
    >>> u = np.stack([0 * z, 0 * y, 0.01 * x])           # 1 % stretch along x
    >>> s = strain(u)
    >>> round(float(s["E"][2, 2].mean()), 5), round(float(s["volumetric"].mean()), 4)
    (0.01005, 0.01)
    """
    u = as_array(u, "u", ndim=4)
    if u.shape[0] != 3 or min(u.shape[1:]) < 2:
        raise ValueError(f"u: expected shape (3, z, y, x) with at least 2 voxels per axis, got {u.shape}")
    try:
        vs = np.asarray(voxel_size, dtype=np.float64)
    except (TypeError, ValueError):
        vs = None
    if vs is not None and vs.ndim == 0:
        vs = np.full(3, float(vs))
    if vs is None or vs.shape != (3,) or not np.all(np.isfinite(vs)) or np.any(vs <= 0):
        raise ValueError(f"voxel_size: expected a positive number or 3 positive numbers (z, y, x) in one "
                         f"length unit, got {voxel_size!r}")
    check_positive(smooth, "smooth", allow_zero=True)
    if mask is not None:
        mask = as_array(mask, "mask", ndim=3).astype(bool)
        if mask.shape != u.shape[1:]:
            raise ValueError(f"mask: shape {mask.shape} differs from the field's spatial shape {u.shape[1:]}")
    u = u.astype(np.float64)
    if smooth > 0:
        from scipy import ndimage as ndi

        u = np.stack([ndi.gaussian_filter(c, smooth, mode="nearest") for c in u])
    # displacement in physical units, derivatives in physical units: du_i/dx_j = (vs_i / vs_j) d u_i / d k_j
    grad = np.empty((3, 3) + u.shape[1:], np.float64)
    for i in range(3):
        for j in range(3):
            grad[i, j] = np.gradient(u[i], axis=j) * (vs[i] / vs[j])
    F = grad + np.eye(3).reshape(3, 3, 1, 1, 1)
    E = 0.5 * (np.einsum("ki...,kj...->ij...", F, F) - np.eye(3).reshape(3, 3, 1, 1, 1))
    Fm = np.moveaxis(F, (0, 1), (-2, -1))
    vol = np.linalg.det(Fm) - 1.0
    Em = np.moveaxis(E, (0, 1), (-2, -1))
    ev = np.linalg.eigvalsh(Em)[..., ::-1]  # descending
    principal = np.moveaxis(ev, -1, 0)
    out = {"E": E, "volumetric": vol, "max_shear": 0.5 * (principal[0] - principal[2]),
           "max_principal": principal[0], "principal": principal}
    out = {k: v.astype(np.float32) for k, v in out.items()}
    if mask is not None:
        for v in out.values():
            v[..., ~mask] = np.nan
    return out


# --------------------------------------------------------------------------------------
# synthetic pairs and training
# --------------------------------------------------------------------------------------
def synthetic_pair(volume, kind="star", max_amplitude=2.0, noise=0.02, seed=0, **field_kwargs):
    """A fixed/moving pair with a known displacement, from any volume.

    ``moving = deform(volume, u) + noise`` and ``fixed = volume + noise`` with
    independent Gaussian noise of standard deviation ``noise`` times the volume's
    standard deviation.

    Parameters
    ----------
    volume : array_like, 3D
    kind, max_amplitude, **field_kwargs
        Passed to :func:`tomoml_nb.phantoms.displacement_field`.
    noise : float >= 0
        Relative noise level.
    seed : int
        Seeds the field and the noise.

    Returns
    -------
    (fixed, moving, u) : float32 arrays

    Examples
    --------
    >>> import numpy as np
    >>> vol = np.random.default_rng(0).random((16, 16, 16))
    >>> f, m, u = synthetic_pair(vol, "uniform", 1.0, seed=1)
    >>> f.shape, u.shape
    ((16, 16, 16), (3, 16, 16, 16))
    """
    from . import phantoms

    vol = as_array(volume, "volume", ndim=3, nonconstant=True).astype(np.float32)
    check_positive(noise, "noise", allow_zero=True)
    rng = rng_from(seed)
    u = phantoms.displacement_field(vol.shape, kind, max_amplitude, seed=rng, **field_kwargs)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        moving = phantoms.deform(vol, u)
    s = float(vol.std()) * noise
    fixed = vol + s * rng.standard_normal(vol.shape).astype(np.float32)
    moving = moving + s * rng.standard_normal(vol.shape).astype(np.float32)
    return fixed.astype(np.float32), moving.astype(np.float32), u


def _standardise(vol):
    v = np.asarray(vol, np.float32)
    return (v - v.mean()) / max(float(v.std()), 1e-6)


class SyntheticPairs:
    """Random training pairs made on the device: texture crop + displacement field + noise.

    A pool of displacement fields (all families of
    :func:`tomoml_nb.phantoms.displacement_field`, max amplitudes log-uniform in
    ``amplitude``) is made once with numpy; each batch draws textures (crops of the
    given volumes, or procedural two-phase / grainy textures made on the fly), random
    axis flips and permutations applied consistently to the field and its components,
    an amplitude jitter capped so that ``|grad u| <= max_grad`` (no folding), the
    deformation (fixed-point inversion, as :func:`tomoml_nb.phantoms.deform`), and
    independent noise on both volumes. Crops are taken with a margin so that material
    enters the patch from outside, then cut to ``patch``.

    Parameters
    ----------
    textures : list of 3D arrays
        Source volumes, each at least ``patch + 2 * margin`` per axis.
    patch : int
        Cube size of the returned pairs (multiple of the network's downsampling).
    n_fields : int
        Size of the field pool.
    amplitude : (float, float)
        Range of max amplitudes (voxels), sampled log-uniformly.
    noise : (float, float)
        Range of relative noise levels.
    procedural : float
        Probability of a procedural texture instead of a crop.
    kinds : tuple of str
        Field families in the pool.
    seed : int
    device : str
    pool_workers : int
        Processes used to build the field pool (1: in this process).

    Examples
    --------
    >>> import numpy as np
    >>> tex = [np.random.default_rng(0).random((40, 40, 40))]
    >>> sp = SyntheticPairs(tex, patch=16, margin=8, n_fields=4, seed=0, device="cpu")
    >>> f, m, u = sp.sample(2, np.random.default_rng(1))
    >>> tuple(f.shape), tuple(u.shape)
    ((2, 1, 16, 16, 16), (2, 3, 16, 16, 16))
    """

    def __init__(self, textures, patch=32, margin=12, n_fields=64, amplitude=(0.3, 10.0), noise=(0.0, 0.1),
                 procedural=0.3, kinds=None, max_grad=0.7, seed=0, device="auto", pool_workers=1, progress=False):
        import torch

        from . import phantoms
        from .train import resolve_device

        self.patch = check_positive(patch, "patch", integer=True)
        self.margin = check_positive(margin, "margin", integer=True, allow_zero=True)
        self.size = self.patch + 2 * self.margin
        self.device = resolve_device(device)
        self.amplitude = tuple(float(a) for a in amplitude)
        if not 0 < self.amplitude[0] <= self.amplitude[1]:
            raise ValueError(f"amplitude: expected 0 < low <= high, got {amplitude!r}")
        self.noise = tuple(float(a) for a in noise)
        self.procedural = float(procedural)
        self.max_grad = float(max_grad)
        self.kinds = tuple(kinds) if kinds is not None else phantoms.FIELD_KINDS
        for k in self.kinds:
            check_choice(k, "kinds", phantoms.FIELD_KINDS)
        if textures is None:
            textures = []
        checked = []
        for i, t in enumerate(textures):
            t = as_array(t, f"textures[{i}]", ndim=3, nonconstant=True)
            if min(t.shape) < self.size:
                raise ValueError(f"textures[{i}]: shape {t.shape} smaller than patch + 2 * margin = {self.size}")
            checked.append(t)
        if not checked and self.procedural <= 0:
            raise ValueError("textures: give at least one volume or procedural > 0")
        rng = rng_from(seed)
        specs = []
        lo, hi = np.log(self.amplitude[0]), np.log(self.amplitude[1])
        for i in range(check_positive(n_fields, "n_fields", integer=True)):
            kind = self.kinds[i % len(self.kinds)]
            specs.append((self.size, kind, float(np.exp(rng.uniform(lo, hi))), int(rng.integers(2**31))))
        if pool_workers > 1:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(pool_workers) as ex:
                fields = list(ex.map(_make_field, specs, chunksize=8))
        else:
            from tqdm.auto import tqdm

            fields = [_make_field(s) for s in tqdm(specs, desc="field pool", disable=not progress)]
        # the field pool is made before anything touches the GPU (worker processes never do)
        self.fields = torch.from_numpy(np.stack(fields)).to(self.device)
        self.textures = [torch.from_numpy(_standardise(t)).to(self.device) for t in checked]

    def _procedural(self, n, gen):
        import torch

        s = self.size
        out = []
        for _ in range(n):
            x = torch.randn((1, 1, s, s, s), generator=gen, device="cpu").to(self.device)
            sigma = float(torch.empty(1).uniform_(0.8, 3.0, generator=gen))
            x = _blur(x, sigma)
            x = x / x.std()
            r = float(torch.rand(1, generator=gen))
            if r < 0.5:  # two-phase (grains / pores) with soft edges
                thr = float(torch.empty(1).uniform_(-0.8, 0.8, generator=gen))
                x = torch.tanh(3.0 * (x - thr))
            fine = _blur(torch.randn((1, 1, s, s, s), generator=gen).to(self.device), 0.7)
            x = x + 0.3 * float(torch.rand(1, generator=gen)) * fine / fine.std()
            out.append(x[0, 0])
        return out

    def sample(self, batch, rng):
        """``(fixed, moving, u)`` tensors ``(B, 1, P, P, P)``, ``(B, 1, P, P, P)``, ``(B, 3, P, P, P)``."""
        import torch

        from .models.raft3d import coords_grid, sample_grid

        s, p, mg = self.size, self.patch, self.margin
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        vols, us = [], []
        n_proc = int((rng.random(batch) < self.procedural).sum()) if self.textures else batch
        procs = self._procedural(n_proc, gen) if n_proc else []
        for b in range(batch):
            if b < n_proc:
                v = procs[b]
            else:
                t = self.textures[int(rng.integers(len(self.textures)))]
                o = [int(rng.integers(0, n - s + 1)) for n in t.shape]
                v = t[o[0]:o[0] + s, o[1]:o[1] + s, o[2]:o[2] + s]
            perm = rng.permutation(3)
            v = v.permute(*perm.tolist())
            flips = [a for a in range(3) if rng.random() < 0.5]
            if flips:
                v = v.flip(flips)
            u = self.fields[int(rng.integers(len(self.fields)))]
            # random axis permutation / flips of the field: axes and components together
            fperm = rng.permutation(3)
            u = u[fperm].permute(0, *(fperm + 1).tolist())
            fflips = [a for a in range(3) if rng.random() < 0.5]
            if fflips:
                u = u.flip([a + 1 for a in fflips])
                sign = torch.ones(3, device=u.device)
                sign[fflips] = -1
                u = u * sign.view(3, 1, 1, 1)
            amp = float(torch.sqrt((u**2).sum(0)).max())
            scale = float(np.exp(rng.uniform(np.log(0.7), np.log(1.3))))
            if amp > 0:
                target = float(np.clip(amp * scale, self.amplitude[0], self.amplitude[1]))
                scale = target / amp
            gmax = max(float(torch.diff(u, dim=ax).abs().max()) for ax in (1, 2, 3)) * scale
            if gmax > self.max_grad:
                scale *= self.max_grad / gmax
            vols.append(v)
            us.append(u * scale)
        vol = torch.stack(vols)[:, None].float()
        u = torch.stack(us).float()
        grid = coords_grid(batch, (s, s, s), self.device)
        v_inv = u
        for _ in range(12):  # moving(y) = fixed(y - v(y)), v(y) = u(y - v(y))
            v_inv = sample_grid(u, (grid - v_inv).permute(0, 2, 3, 4, 1), padding_mode="border")
        moving = sample_grid(vol, (grid - v_inv).permute(0, 2, 3, 4, 1), padding_mode="border")
        sl = (slice(None), slice(None), slice(mg, mg + p), slice(mg, mg + p), slice(mg, mg + p))
        fixed, moving, u = vol[sl], moving[sl], u[sl]
        lvl = torch.from_numpy(np.exp(rng.uniform(np.log(max(self.noise[0], 1e-3)), np.log(max(self.noise[1], 1e-3)),
                                                  batch))).float().to(self.device).view(-1, 1, 1, 1, 1)
        std = fixed.std(dim=(2, 3, 4), keepdim=True).clamp_min(0.05)
        fixed = fixed + lvl * std * torch.randn(fixed.shape, generator=gen).to(self.device)
        moving = moving + lvl * std * torch.randn(moving.shape, generator=gen).to(self.device)
        mean = fixed.mean(dim=(2, 3, 4), keepdim=True)
        std = fixed.std(dim=(2, 3, 4), keepdim=True).clamp_min(0.05)
        return (fixed - mean) / std, (moving - mean) / std, u.contiguous()


def _make_field(spec):
    import warnings

    from . import phantoms

    size, kind, amp, seed = spec
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return phantoms.displacement_field((size, size, size), kind, amp, seed=seed)


def sequence_loss(flows, target, gamma=0.8):
    """RAFT sequence loss: ``sum_i gamma^(n-1-i) * mean EPE(flow_i, target)``.

    Examples
    --------
    >>> import torch
    >>> t = torch.zeros(1, 3, 4, 4, 4)
    >>> round(float(sequence_loss([t + 1.0, t], t, gamma=0.5)), 3)
    0.866
    """
    import torch

    n = len(flows)
    loss = 0.0
    for i, fl in enumerate(flows):
        epe = torch.sqrt(((fl - target) ** 2).sum(1) + 1e-8).mean()
        loss = loss + gamma ** (n - 1 - i) * epe
    return loss


def evaluate(model, pairs, iters=12, device="auto"):
    """Mean end-point error of a network on a fixed list of ``(fixed, moving, u)`` tensor batches.

    Examples
    --------
    >>> import torch
    >>> z = torch.zeros(1, 1, 16, 16, 16); z[..., 8:, :, :] = 1
    >>> evaluate(make_model(), [(z, z, torch.zeros(1, 3, 16, 16, 16))], iters=1, device="cpu") >= 0
    True
    """
    import torch

    from .train import resolve_device

    dev = resolve_device(device)
    was_training = model.training
    model.eval()
    errs = []
    with torch.no_grad():
        for f, m, u in pairs:
            out = model(f.to(dev), m.to(dev), iters=iters)[-1]
            errs.append(float(torch.sqrt(((out - u.to(dev)) ** 2).sum(1)).mean()))
    model.train(was_training)
    return float(np.mean(errs))


def inference_iters(model):
    """Refinement iterations to use with ``model``: the ``inference_iters`` stored with its
    weights (see :func:`choose_iters`), else :data:`DEFAULT_ITERS`.

    Examples
    --------
    >>> inference_iters(make_model())
    12
    """
    return int(getattr(model, "tomoml_meta", {}).get("inference_iters", DEFAULT_ITERS))


def choose_iters(model, pairs, candidates=(4, 6, 8, 12), device="auto"):
    """Pick the number of refinement iterations with the lowest mean EPE on validation pairs.

    An under-trained recurrent network can drift after the number of iterations it was
    trained with, so more iterations are not always better; the choice is stored in the
    weights' metadata as ``inference_iters`` by ``scripts/train_volraft.py`` and used by
    :func:`estimate_displacement` when ``iters`` is not given.

    Parameters
    ----------
    model : VolRAFT
    pairs : list of ``(fixed, moving, u)`` tensor batches
        Validation pairs, never the benchmark's test cases.
    candidates : sequence of int
    device : str

    Returns
    -------
    (int, dict)
        The best number of iterations and the mean EPE of every candidate.

    Examples
    --------
    >>> import torch
    >>> z = torch.zeros(1, 1, 16, 16, 16); z[..., 8:, :, :] = 1
    >>> best, epe = choose_iters(make_model(), [(z, z, torch.zeros(1, 3, 16, 16, 16))], (1, 2), device="cpu")
    >>> best in (1, 2), sorted(epe)
    (True, [1, 2])
    """
    cands = [check_positive(c, "candidates", integer=True) for c in candidates]
    if not cands:
        raise ValueError("candidates: give at least one number of iterations")
    epe = {c: evaluate(model, pairs, iters=c, device=device) for c in cands}
    return min(epe, key=epe.get), epe


def fine_tune(model, volumes, steps=50, *, patch=32, batch_size=2, lr=1e-4, amplitude=(0.3, 8.0), noise=(0.0, 0.05),
              iters=8, n_fields=32, device="auto", seed=0, progress=True):
    """Fine-tune a VolRAFT network on synthetic fields applied to *your* volumes.

    Useful when a sample's texture differs from the training textures: the
    network sees your grey values, with known displacements.

    Parameters
    ----------
    model : VolRAFT
        Network to adapt (modified in place and returned).
    volumes : 3D array or list of 3D arrays
        Texture sources, each at least ``patch + 16`` voxels per axis.
    steps, patch, batch_size, lr, iters : training settings
    amplitude, noise : (float, float)
        Ranges of synthetic max amplitudes (voxels) and relative noise.
    n_fields : int
        Size of the displacement-field pool.

    Returns
    -------
    VolRAFT, with ``tomoml_history`` (losses, steps, seconds).

    Examples
    --------
    >>> import numpy as np
    >>> vol = np.random.default_rng(0).random((40, 40, 40))
    >>> net = fine_tune(make_model(), vol, steps=1, patch=16, batch_size=1, n_fields=2, progress=False)
    >>> net.tomoml_history["steps"]
    1
    """
    from .train import fit, resolve_device

    if isinstance(volumes, np.ndarray) and volumes.ndim == 3:
        volumes = [volumes]
    if not isinstance(volumes, (list, tuple)) or not volumes:
        raise TypeError("volumes: expected a 3D array or a list of 3D arrays")
    dev = resolve_device(device)
    iters = check_positive(iters, "iters", integer=True)
    sampler = SyntheticPairs(volumes, patch=patch, margin=8, n_fields=n_fields, amplitude=amplitude, noise=noise,
                             procedural=0.0, seed=seed, device=dev)
    bs = check_positive(batch_size, "batch_size", integer=True)
    with _threads(dev):
        hist = fit(model, lambda step, rng: sampler.sample(bs, rng),
                   lambda net, b: sequence_loss(net(b[0], b[1], iters=iters), b[2]),
                   steps=steps, lr=lr, device=dev, seed=seed, progress=progress, desc="fine-tuning",
                   scheduler=None)
    model.tomoml_history = hist
    return model.eval()


# --------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------
def _slice(a, axis, index):
    axis = {"z": 0, "y": 1, "x": 2}.get(axis, axis)
    check_choice(axis, "axis", (0, 1, 2))
    n = a.shape[-3 + axis]
    index = n // 2 if index is None else int(index)
    if not 0 <= index < n:
        raise ValueError(f"index: {index} outside [0, {n - 1}] along axis {axis}")
    return np.take(a, index, axis=a.ndim - 3 + axis)


def plot_error_maps(fields, u_true, axis="z", index=None, vmax=None):
    """End-point-error maps of several estimates on one slice, one shared colour scale.

    Parameters
    ----------
    fields : dict of {str: (3, z, y, x) array}
    u_true : (3, z, y, x) array
    axis, index : slice shown (default: centre of ``z``)
    vmax : float, optional
        Upper colour limit in voxels (default: 99th percentile over all maps).

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import numpy as np
    >>> u = np.zeros((3, 8, 8, 8), np.float32)
    >>> fig = plot_error_maps({"a": u + 0.1}, u)
    """
    from .viz import compare

    u_true = as_array(u_true, "u_true", ndim=4)
    if not isinstance(fields, dict) or not fields:
        raise TypeError("fields: expected a non-empty dict {name: field}")
    panels = {}
    for name, u in fields.items():
        u = as_array(u, f"fields[{name!r}]", ndim=4)
        if u.shape != u_true.shape:
            raise ValueError(f"fields[{name!r}]: shape {u.shape} differs from u_true {u_true.shape}")
        panels[f"{name} |error|"] = _slice(np.sqrt(((u - u_true) ** 2).sum(0)), axis, index)
    top = vmax if vmax is not None else float(np.percentile(np.concatenate([p.ravel() for p in panels.values()]), 99))
    return compare(panels, cmap="magma", vmin=0.0, vmax=max(top, 1e-6), colorbar=True,
                   suptitle="end-point error (voxels)")


def plot_strain(strains, quantity="volumetric", axis="z", index=None, vmax=None):
    """One strain quantity on a slice for several fields, side by side (diverging, shared scale).

    Parameters
    ----------
    strains : dict of {str: dict from :func:`strain`} or one such dict
    quantity : {"volumetric", "max_shear", "max_principal", "Ezz", "Eyy", "Exx", "Ezy", "Ezx", "Eyx"}
    axis, index : slice shown
    vmax : float, optional
        Symmetric colour limit (default: 99th percentile of ``|value|`` of the first entry).
        Voxels outside a mask (NaN) are drawn as 0.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import numpy as np
    >>> u = np.random.default_rng(0).normal(size=(3, 8, 8, 8)) * 0.01
    >>> fig = plot_strain({"field": strain(u)}, "max_shear")
    """
    from .viz import compare

    comps = {"Ezz": (0, 0), "Eyy": (1, 1), "Exx": (2, 2), "Ezy": (0, 1), "Ezx": (0, 2), "Eyx": (1, 2)}
    check_choice(quantity, "quantity", ("volumetric", "max_shear", "max_principal", *comps))
    if isinstance(strains, dict) and "E" in strains:
        strains = {quantity: strains}
    if not isinstance(strains, dict) or not strains:
        raise TypeError("strains: expected a dict {name: strain(...) result}")
    panels = {}
    for name, s in strains.items():
        if not isinstance(s, dict) or "E" not in s:
            raise TypeError(f"strains[{name!r}]: expected the dict returned by strain()")
        q = s["E"][comps[quantity]] if quantity in comps else s[quantity]
        panels[name] = np.nan_to_num(_slice(q, axis, index), nan=0.0)  # masked-out voxels shown as 0
    first = np.abs(next(iter(panels.values())))
    top = vmax if vmax is not None else float(np.nanpercentile(first, 99))
    top = max(top, 1e-6)
    return compare(panels, cmap="RdBu_r", vmin=-top, vmax=top, colorbar=True, suptitle=f"strain: {quantity}")
