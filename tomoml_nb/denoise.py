"""Denoising of tomographic reconstructions: mixed-scale dense networks, supervised and
self-supervised (Noise2Inverse), beside the classical filters.

* :func:`train_supervised` -- an MSD network (Pelt & Sethian 2018) trained on pairs of
  noisy and clean slices;
* :func:`noise2inverse` -- no clean data at all (Hendriksen, Pelt & Batenburg 2020): the
  projections are split by angle into ``K`` subsets, each is reconstructed on its own,
  and a network learns to predict one sub-reconstruction from the mean of the others
  (the "X:1" strategy). Noise in different subsets is independent, so the best such
  prediction is the *noise-free* reconstruction; at inference the predictions for all
  ``K`` splits are averaged;
* :func:`denoise` -- apply a trained model slice by slice (tiled when large);
* ``context=k`` (:func:`train_supervised`, :func:`with_context`) -- "2.5D" networks that
  see the ``k`` slices above and below as extra input channels: the noise of a
  parallel-beam scan is independent between slices while the object is not, so the
  neighbours carry information a single slice lacks;
* :func:`classical_filter`, :func:`tune_classical` -- Gaussian, median, non-local means
  (scikit-image) and, when the optional ``bm3d`` package is installed, BM3D per slice and
  BM4D on the whole volume (the classical counterpart of a network with context), each
  with its strength chosen on validation data;
* :func:`simulate_low_dose` -- a low-dose scan of a known object, reconstructed with FBP,
  for tutorials and benchmarks with ground truth.

Conventions: volumes ``(z, y, x)`` are denoised as 2D ``(y, x)`` slices (with their
``k`` neighbours as extra channels for a network with context);
projections are ``(n_angles, n_rows, n_det)``, a single sinogram ``(n_angles, n_det)``;
angles in radians.

Examples
--------
>>> import numpy as np
>>> from tomoml_nb import denoise as dn
>>> rng = np.random.default_rng(0)
>>> clean = np.zeros((4, 48, 48), np.float32); clean[:, 12:36, 16:30] = 1
>>> noisy = clean + 0.3 * rng.standard_normal(clean.shape).astype(np.float32)
>>> model = dn.train_supervised(noisy, clean, depth=8, steps=30, patch=32, progress=False)
>>> dn.denoise(noisy, model, progress=False).shape
(4, 48, 48)
"""
from __future__ import annotations

import numbers
import os
import time
from dataclasses import dataclass, field

import numpy as np

from .train import limit_cpu_threads as _threads
from ._validate import as_array, check_choice, check_positive, check_same_shape

__all__ = [
    "Denoiser", "train_supervised", "noise2inverse", "denoise", "split_reconstructions",
    "classical_filter", "tune_classical", "classical_methods", "CLASSICAL", "DEFAULT_GRIDS",
    "simulate_low_dose", "load_pretrained", "evaluate", "with_context",
]

CLASSICAL = ("gaussian", "median", "nlm", "bm3d", "bm4d")

# strength grids searched by tune_classical (in units of the data's noise where relevant)
DEFAULT_GRIDS = {
    "gaussian": (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0),            # sigma, pixels
    "median": (3, 5, 7, 9),                                              # window size, pixels
    "nlm": (0.4, 0.6, 0.8, 1.0, 1.3, 1.7),                               # h / estimated noise sigma
    "bm3d": (0.5, 0.75, 1.0, 1.5, 2.0, 3.0),                             # sigma_psd / estimated sigma
    "bm4d": (1.0, 1.5, 2.0, 2.5, 3.0),                                   # sigma_psd / estimated sigma
}
_FORMAT = "tomoml_nb.denoise.msd/1"


# =============================================================================== helpers
def _as_slices(volume, name):
    """Validate an image (y, x) or volume (z, y, x); return float32 (z, y, x) and was_2d."""
    arr = as_array(volume, name, ndim=(2, 3))
    if min(arr.shape[-2:]) < 8:
        raise ValueError(f"{name}: slices must be at least 8 x 8 pixels, got {arr.shape}")
    was_2d = arr.ndim == 2
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    return (arr[None] if was_2d else arr), was_2d


def _check_int(value, name, low):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name}: must be an integer >= {low}, got {value!r}")
    return int(value)


def _context_index(n_slices, context):
    """(n_slices, 2 context + 1) slice indices: each slice first, then its neighbours -1, +1, -2, +2...

    Mirrored at the ends of the stack (slice -1 reads slice 1), as the networks' convolutions do
    at image borders.
    """
    z = np.arange(n_slices)[:, None] + np.array([0] + [d for j in range(1, context + 1) for d in (-j, j)])
    z = np.where(z < 0, -z, z)
    z = np.where(z >= n_slices, 2 * (n_slices - 1) - z, z)
    return np.clip(z, 0, n_slices - 1)


def _stack_context(vol, context):
    """(z, y, x) -> (z, 2 context + 1, y, x): each slice with its neighbours as channels."""
    return vol[_context_index(len(vol), context)] if context else vol[:, None]


def _volume_list(x, name, context):
    """Training data as a list of float32 (z, y, x) volumes: one array (a volume, or slices when
    ``context == 0``) or a list/tuple of them."""
    items = list(x) if isinstance(x, (list, tuple)) else [x]
    if not items:
        raise ValueError(f"{name}: empty")
    vols = []
    for i, v in enumerate(items):
        label = name if len(items) == 1 and not isinstance(x, (list, tuple)) else f"{name}[{i}]"
        arr, was_2d = _as_slices(v, label)
        if context and (was_2d or len(arr) <= context):
            raise ValueError(f"{label}: context={context} needs volumes (z, y, x) of more than {context} "
                             f"contiguous slices, got shape {np.shape(v)}")
        vols.append(arr)
    return vols


@dataclass
class Denoiser:
    """A trained denoising network together with the intensity normalisation it expects.

    Calling it denoises a 2D image or a 3D volume slice by slice (see :func:`denoise`).

    Attributes
    ----------
    net : torch.nn.Module
        The network (an :class:`~tomoml_nb.models.msd.MSDNet`), input/output one channel.
    offset, scale : float
        Inputs are mapped to ``(x - offset) / scale`` and outputs back.
    history : dict
        Training history from :func:`tomoml_nb.train.fit`.
    info : dict
        How it was trained (strategy, steps, seconds...).

    Examples
    --------
    >>> import numpy as np
    >>> from tomoml_nb.models.msd import MSDNet
    >>> d = Denoiser(MSDNet(depth=4), offset=0.0, scale=1.0)
    >>> d(np.ones((16, 16), np.float32), progress=False).shape
    (16, 16)
    """

    net: object
    offset: float
    scale: float
    history: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def context(self) -> int:
        """Neighbouring slices the network sees on each side (0: a single-slice network)."""
        return _net_context(self.net)

    def __call__(self, volume, **kwargs):
        return denoise(volume, self, **kwargs)

    def save(self, path, *, overwrite=False):
        """Save weights, architecture and normalisation to ``path`` (a ``.pt`` file).

        An existing file is refused (``FileExistsError`` naming ``path``) unless
        ``overwrite=True``; see :func:`tomoml_nb.weights.save_state`.
        """
        from . import weights

        info = {k: v for k, v in self.info.items() if isinstance(v, (int, float, str, bool, list, tuple))}
        return weights.save_state(path, format=_FORMAT, state_dict=self.net.state_dict(),
                                  config={"net": dict(self.net.config), "offset": float(self.offset),
                                          "scale": float(self.scale)}, meta=info, overwrite=overwrite)

    @classmethod
    def load(cls, path):
        """Load a :class:`Denoiser` written by :meth:`save`.

        Examples
        --------
        >>> import tempfile, os
        >>> from tomoml_nb.models.msd import MSDNet
        >>> p = os.path.join(tempfile.mkdtemp(), "m.pt")
        >>> _ = Denoiser(MSDNet(depth=3), 0.1, 2.0).save(p)
        >>> Denoiser.load(p).scale
        2.0
        """
        from . import weights
        from .models.msd import MSDNet

        state = weights.load_state(path, format=_FORMAT)
        cfg = state["config"]
        net = MSDNet(**cfg["net"])
        net.load_state_dict(state["state_dict"])
        net.eval()
        return cls(net, float(cfg["offset"]), float(cfg["scale"]), {}, dict(state["meta"]))

def load_pretrained(name="msd_bone_implant"):
    """Load a denoiser shipped with the package (see ``tomoml_nb/weights/<name>.md``).

    Parameters
    ----------
    name : str
        Weights file stem in ``tomoml_nb/weights``.

    Returns
    -------
    Denoiser

    Examples
    --------
    >>> model = load_pretrained()                      # doctest: +SKIP
    >>> model.net.config["depth"]                      # doctest: +SKIP
    50
    """
    from .weights import WEIGHTS_DIR

    path = WEIGHTS_DIR / f"{name}.pt"
    if not path.is_file():
        avail = sorted(p.stem for p in WEIGHTS_DIR.glob("msd_*.pt"))
        raise ValueError(f"name: no shipped weights {name!r}; available: {avail}")
    return Denoiser.load(path)


def _resolve_model(model):
    """A :class:`Denoiser` from a shipped name (``"msd_bone_implant"``) or a saved file's path."""
    from pathlib import Path

    path = Path(model)
    if path.is_file():
        try:
            return Denoiser.load(path)
        except ValueError as exc:
            raise ValueError(f"model: {exc}") from exc
    try:
        return load_pretrained(str(model))
    except ValueError as exc:   # lists the shipped names
        raise ValueError(f"model: {str(model)!r} is neither an existing file nor a shipped denoiser ({exc})") from None


def _net_context(net):
    """Slices on each side a network takes as extra channels: (in_channels - 1) / 2."""
    c = int(getattr(net, "config", {}).get("in_channels", 1))
    if c % 2 != 1:
        raise ValueError(f"model: a denoising network needs an odd number of input channels (the slice and "
                         f"its neighbours on both sides), this one takes {c}")
    return (c - 1) // 2


def with_context(model, context):
    """A copy of a denoiser that takes ``context`` neighbours on each side (more than it had).

    The new neighbours enter as extra input channels with zero weights, so the returned model
    denoises exactly like ``model`` until it is trained further (``train_supervised(...,
    model=with_context(m, 1))``): a 2D network is a good start for a 2.5D one, and a network
    that reads one neighbour on each side is a good start for one that reads two.

    Parameters
    ----------
    model : Denoiser or str
        A model, or the name of a shipped one (:func:`load_pretrained`).
    context : int
        Neighbours on each side, larger than ``model.context``.

    Returns
    -------
    Denoiser

    Examples
    --------
    >>> import numpy as np
    >>> from tomoml_nb.models.msd import MSDNet
    >>> m = Denoiser(MSDNet(depth=4), 0.0, 1.0)
    >>> m2 = with_context(m, 1)
    >>> m2.context, m2.net.config["in_channels"]
    (1, 3)
    >>> vol = np.random.default_rng(0).normal(size=(5, 32, 32)).astype(np.float32)
    >>> bool(np.allclose(m2(vol, progress=False), m(vol, progress=False), atol=1e-5))
    True
    """
    import copy

    from .models.msd import widen_input

    if isinstance(model, (str, os.PathLike)):
        model = _resolve_model(model)
    if not isinstance(model, Denoiser):
        raise TypeError(f"model: expected a Denoiser, got {type(model).__name__}")
    context = _check_int(context, "context", 1)
    if context <= model.context:
        raise ValueError(f"context: must be larger than the {model.context} neighbouring slice(s) on each "
                         f"side that the model already takes, got {context}")
    net = widen_input(model.net, 2 * context + 1)
    info = dict(copy.deepcopy(model.info), context=context, widened_from=int(model.net.config["in_channels"]))
    return Denoiser(net, model.offset, model.scale, {}, info)


# =============================================================================== training
def _make_net(depth, width, max_dilation, model, in_channels=1):
    from .models.msd import MSDNet

    if model is not None:
        net = model.net if isinstance(model, Denoiser) else model
        if not hasattr(net, "config"):
            raise TypeError("model: expected an MSDNet or a Denoiser to start from")
        if int(net.config.get("in_channels", 1)) != in_channels:
            raise ValueError(f"context: the model takes {net.config.get('in_channels', 1)} input channel(s) "
                             f"(context={(int(net.config.get('in_channels', 1)) - 1) // 2}), the data "
                             f"{in_channels} (context={(in_channels - 1) // 2}); see with_context()")
        return net
    return MSDNet(in_channels, 1, depth=_check_int(depth, "depth", 1), width=_check_int(width, "width", 1),
                  max_dilation=_check_int(max_dilation, "max_dilation", 1))


def _augment(x, y, rng):
    """Same random flip / 90-degree rotation of input and target patches (numpy)."""
    k = int(rng.integers(4))
    if k:
        x, y = np.rot90(x, k, axes=(-2, -1)), np.rot90(y, k, axes=(-2, -1))
    if rng.random() < 0.5:
        x, y = x[..., ::-1], y[..., ::-1]
    return x, y


def _fit_pairs(inputs, targets, *, pair_index, model, depth, width, max_dilation, steps, patch, batch, lr,
               val, device, seed, progress, time_limit, desc, strategy, keep_best=False):
    """Train an MSD net on patches of (input, target) slice pairs.

    ``inputs`` are float32 (n, y, x) or, for a network with context, (n, c, y, x);
    ``targets`` (n, y, x) (both already normalised); ``pair_index`` maps sample i to (input
    slice, target slice) -- used by Noise2Inverse, where one input slice pairs with one
    target slice of the same split.
    """
    import torch

    from .train import fit, seed_everything

    seed_everything(seed)  # the network's initial weights depend on the seed too
    net = _make_net(depth, width, max_dilation, model, 1 if inputs.ndim == 3 else inputs.shape[1])
    H, W = inputs.shape[-2:]
    p = min(patch, H, W)
    if p <= max(getattr(net, "dilations", [1])):
        raise ValueError(f"patch: {patch} (clipped to the slice size {min(H, W)}) must exceed the largest "
                         f"dilation {max(net.dilations)}")

    def batches(step, rng):
        xs, ys = [], []
        for _ in range(batch):
            i = int(rng.integers(len(pair_index)))
            a, b = pair_index[i]
            r0, c0 = int(rng.integers(H - p + 1)), int(rng.integers(W - p + 1))
            x = inputs[a, ..., r0:r0 + p, c0:c0 + p]
            y = targets[b, r0:r0 + p, c0:c0 + p]
            x, y = _augment(x, y, rng)
            xs.append(np.ascontiguousarray(x))
            ys.append(np.ascontiguousarray(y))
        xs = np.stack(xs)
        return torch.from_numpy(xs[:, None] if xs.ndim == 3 else xs), torch.from_numpy(np.stack(ys)[:, None])

    def loss_fn(m, b):
        return torch.nn.functional.mse_loss(m(b[0]), b[1])

    validate = None
    if val is not None:
        vx, vy = val

        def validate(m):
            dev = next(m.parameters()).device
            out = m(torch.from_numpy(vx[:, None] if vx.ndim == 3 else vx).to(dev)).cpu().numpy()[:, 0]
            return float(np.mean((out - vy) ** 2))

    with _threads():
        hist = fit(net, batches, loss_fn, steps=steps, lr=lr, device=device, seed=seed, progress=progress,
                   desc=desc, validate=validate, val_every=max(steps // 5, 1), time_limit=time_limit,
                   keep_best=keep_best)
    net.cpu().eval()
    return net, hist


def _norm_stats(x):
    x = np.asarray(x, np.float64)
    scale = float(x.std())
    return float(x.mean()), (scale if scale > 0 else 1.0)


def train_supervised(noisy, clean, *, model=None, context=None, depth=50, width=1, max_dilation=10, steps=500,
                     patch=64, batch=4, lr=2e-3, validation=None, device="auto", seed=0, progress=True,
                     time_limit=None, keep_best=False):
    """Train a mixed-scale dense network to map noisy slices to clean ones.

    Parameters
    ----------
    noisy, clean : array_like, shape (y, x) or (n, y, x), or a list of such arrays
        Training pairs, e.g. low-dose reconstructions and the ground truth (or high-dose
        reconstructions). Each slice is one 2D training image. With ``context > 0`` each
        array is a volume of contiguous slices (give several scans as a list, so that no
        slice borrows a neighbour from another scan).
    model : MSDNet or Denoiser, optional
        Start from this network (fine-tuning, e.g. :func:`load_pretrained`, or
        :func:`with_context` of a single-slice model); its normalisation is kept when it is
        a :class:`Denoiser`.
    context : int, optional
        Neighbouring slices on each side given to the network as extra channels ("2.5D";
        default: the model's, or 0 for a new network).
    depth, width, max_dilation : int
        MSD architecture when ``model`` is None (dilations cycle 1..max_dilation).
    steps, patch, batch, lr : int, int, int, float
        Optimisation steps, square patch size, patches per step, AdamW learning rate
        (cosine-decayed).
    validation : tuple (noisy_val, clean_val), optional
        Held-out slices (a volume or a list of volumes, as for ``noisy``); their MSE is
        recorded in ``history["val"]`` (five times per run and at the end).
    device : str
        ``"auto"`` uses CUDA when available.
    seed : int
        Seeds weights, patch sampling and augmentation.
    progress : bool
        Show a tqdm bar.
    time_limit : float, optional
        Stop after this many seconds; the cosine schedule then anneals over the time budget
        when it ends before ``steps`` (see :func:`tomoml_nb.train.fit`).
    keep_best : bool
        With ``validation``: return the weights of the lowest validation MSE seen instead
        of the last ones.

    Returns
    -------
    Denoiser

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(1)
    >>> clean = np.zeros((2, 40, 40), np.float32); clean[:, 10:30, 10:30] = 1
    >>> noisy = clean + 0.2 * rng.standard_normal(clean.shape).astype(np.float32)
    >>> m = train_supervised(noisy, clean, depth=6, steps=20, patch=24, progress=False)
    >>> m.info["strategy"]
    'supervised'
    """
    if context is None:
        context = _net_context(model.net if isinstance(model, Denoiser) else model) if model is not None else 0
    context = _check_int(context, "context", 0)
    xs, ys = _volume_list(noisy, "noisy", context), _volume_list(clean, "clean", context)
    if len(xs) != len(ys):
        raise ValueError(f"clean: {len(ys)} volume(s) for {len(xs)} noisy one(s)")
    for i, (a, b) in enumerate(zip(xs, ys)):
        check_same_shape(a, b, f"noisy[{i}]" if len(xs) > 1 else "noisy", f"clean[{i}]" if len(xs) > 1 else "clean")
        check_same_shape(a[0], xs[0][0], "noisy[0] slices", f"noisy[{i}] slices")
    x, y = np.concatenate(xs), np.concatenate(ys)
    steps = check_positive(steps, "steps", integer=True)
    patch = _check_int(patch, "patch", 8)
    batch = _check_int(batch, "batch", 1)
    check_positive(lr, "lr")
    if isinstance(model, Denoiser):
        offset, scale = model.offset, model.scale
    else:
        offset, scale = _norm_stats(x)
    xn = np.concatenate([_stack_context((v - offset) / scale, context) for v in xs])   # (n, 1 + 2 context, y, x)
    yn = (y - offset) / scale
    val = None
    if validation is not None:
        vxs, vys = _volume_list(validation[0], "validation[0]", context), _volume_list(validation[1], "validation[1]",
                                                                                        context)
        for a, b in zip(vxs, vys):
            check_same_shape(a, b, "validation[0]", "validation[1]")
        vx = np.concatenate([_stack_context((v - offset) / scale, context) for v in vxs])
        val = (vx, (np.concatenate(vys) - offset) / scale)
    pairs = [(i, i) for i in range(len(x))]
    net, hist = _fit_pairs(xn, yn, pair_index=pairs, model=model, depth=depth, width=width,
                           max_dilation=max_dilation, steps=steps, patch=patch, batch=batch, lr=lr, val=val,
                           device=device, seed=seed, progress=progress, time_limit=time_limit,
                           desc="MSD supervised", strategy="supervised", keep_best=keep_best)
    info = {"strategy": "supervised", "steps": hist["steps"], "seconds": hist["seconds"], "patch": patch,
            "batch": batch, "lr": lr, "seed": seed, "n_slices": len(x), "context": context}
    return Denoiser(net, offset, scale, hist, info)


def _as_projections(projections, angles):
    """Return sinograms (n_rows, n_angles, n_det) float32, angles (float64), was_2d."""
    arr = as_array(projections, "projections", ndim=(2, 3))
    was_2d = arr.ndim == 2
    sino = arr[None] if was_2d else np.transpose(arr, (1, 0, 2))
    ang = as_array(angles, "angles", ndim=1).astype(np.float64)
    if ang.size != sino.shape[1]:
        raise ValueError(f"angles: has {ang.size} values but projections have {sino.shape[1]} angles "
                         f"(expected (n_angles, n_det) or (n_angles, n_rows, n_det))")
    from .tomo import _check_angles

    ang = _check_angles(ang)  # radians: a span above 2.5 pi (degrees) raises
    return np.ascontiguousarray(sino, dtype=np.float32), ang, was_2d


def _reconstruct(stack, angles, **kw):
    """``tomo.reconstruct`` for a sinogram stack (n_rows, n_angles, n_det); always returns 3D."""
    from . import tomo

    if stack.shape[0] == 1:
        return tomo.reconstruct(stack[0], angles, **kw)[None]
    return tomo.reconstruct(stack, angles, **kw)


def split_reconstructions(projections, angles, n_splits=2, *, center=None, method="fbp", filter="ramp",
                          n_iter=100, device="auto"):
    """Reconstruct ``n_splits`` disjoint angular subsets separately (Noise2Inverse's data).

    Subset ``j`` holds angles ``j, j + K, j + 2K, ...`` (interleaved), so every subset
    covers the full angular range evenly and its reconstruction has the full scale; its
    noise is independent of the other subsets'.

    Parameters
    ----------
    projections : array_like, shape (n_angles, n_det) or (n_angles, n_rows, n_det)
        Line integrals (``tomo.minus_log(tomo.normalize(...))``).
    angles : array_like, shape (n_angles,)
        Radians (a span above ``2.5 pi`` -- angles in degrees -- raises ``ValueError``).
    n_splits : int
        Number of subsets ``K`` (2 or 4 are usual).
    center, method, filter, n_iter, device
        Passed to :func:`tomoml_nb.tomo.reconstruct`.

    Returns
    -------
    ndarray, float32, shape (K, n_rows, N, N)
        One reconstruction per subset (``n_rows = 1`` for a single sinogram).

    Examples
    --------
    >>> import numpy as np
    >>> from tomoml_nb import tomo
    >>> img = np.zeros((32, 32), np.float32); img[8:24, 10:20] = 1
    >>> th = np.linspace(0, np.pi, 64, endpoint=False)
    >>> split_reconstructions(tomo.forward_project(img, th), th, 4).shape
    (4, 1, 32, 32)
    """
    sino, ang, _ = _as_projections(projections, angles)
    K = _check_int(n_splits, "n_splits", 2)
    if sino.shape[1] < 2 * K:
        raise ValueError(f"n_splits: {K} subsets of {sino.shape[1]} angles leave fewer than 2 angles each")
    recs = [_reconstruct(np.ascontiguousarray(sino[:, j::K]), ang[j::K], center=center, method=method,
                         filter=filter, n_iter=n_iter, device=device) for j in range(K)]
    return np.stack(recs).astype(np.float32)


def noise2inverse(projections, angles, n_splits=2, *, center=None, method="fbp", filter="ramp", n_iter=100,
                  model=None, depth=50, width=1, max_dilation=10, steps=500, patch=64, batch=4, lr=2e-3,
                  device="auto", seed=0, progress=True, time_limit=None, return_model=False):
    """Self-supervised denoising of a tomogram from its own projections (Noise2Inverse).

    The projections are split by angle into ``K = n_splits`` interleaved subsets, each
    subset is reconstructed (:func:`split_reconstructions`), and an MSD network is
    trained to predict sub-reconstruction ``j`` from the mean of the other ``K - 1``
    ("X:1" strategy; Hendriksen et al., IEEE TCI 6, 2020). The noise of the target is
    independent of the input's, so minimising the MSE drives the network towards the
    noise-free reconstruction, without any clean data. The result is the mean of the
    network's predictions over all ``K`` splits.

    Parameters
    ----------
    projections : array_like, shape (n_angles, n_det) or (n_angles, n_rows, n_det)
        Line integrals of one slice (a sinogram) or of ``n_rows`` slices.
    angles : array_like, shape (n_angles,)
        Radians, covering [0, pi) (or [0, 2 pi)) evenly; a span above ``2.5 pi`` (angles
        in degrees) raises ``ValueError``.
    n_splits : int
        ``K``, usually 2 or 4. More splits give sparser sub-reconstructions (streaks when
        the angles are few) but more training pairs.
    center, method, filter, n_iter
        Reconstruction settings (:func:`tomoml_nb.tomo.reconstruct`).
    model : MSDNet or Denoiser, optional
        Start from this network (e.g. one trained with Noise2Inverse on a similar scan).
    depth, width, max_dilation, steps, patch, batch, lr
        Network and training settings (see :func:`train_supervised`).
    device, seed, progress, time_limit
        As in :func:`train_supervised`.
    return_model : bool
        Also return the trained :class:`Denoiser` (it maps the mean of ``K - 1``
        sub-reconstructions to a denoised one).

    Returns
    -------
    ndarray, float32
        The denoised reconstruction, ``(N, N)`` for a sinogram, ``(n_rows, N, N)`` for
        projections; with ``return_model``: ``(denoised, model)``.

    Examples
    --------
    >>> import numpy as np
    >>> from tomoml_nb import tomo
    >>> img = np.zeros((48, 48), np.float32); img[12:36, 14:30] = 0.05
    >>> th = np.linspace(0, np.pi, 96, endpoint=False)
    >>> sino = tomo.forward_project(img, th)
    >>> sino += np.random.default_rng(0).normal(0, 0.3, sino.shape).astype(np.float32)
    >>> out = noise2inverse(sino, th, 2, depth=6, steps=10, patch=32, progress=False)
    >>> out.shape
    (48, 48)
    """
    sino, ang, was_2d = _as_projections(projections, angles)
    if model is not None and _net_context(model.net if isinstance(model, Denoiser) else model):
        raise ValueError("model: Noise2Inverse here trains single-slice networks (context 0); this one takes "
                         "neighbouring slices")
    K = _check_int(n_splits, "n_splits", 2)
    steps = check_positive(steps, "steps", integer=True)
    patch = _check_int(patch, "patch", 8)
    batch = _check_int(batch, "batch", 1)
    check_positive(lr, "lr")
    subs = split_reconstructions(sino.transpose(1, 0, 2), ang, K, center=center, method=method, filter=filter,
                                 n_iter=n_iter, device=device)                 # (K, R, N, N)
    R = subs.shape[1]
    total = subs.sum(0)
    inputs = (total[None] - subs) / (K - 1)                                     # mean of the others
    if isinstance(model, Denoiser):
        offset, scale = model.offset, model.scale
    else:
        offset, scale = _norm_stats(inputs)
    xin = ((inputs - offset) / scale).reshape(K * R, *subs.shape[-2:])
    tgt = ((subs - offset) / scale).reshape(K * R, *subs.shape[-2:])
    pairs = [(i, i) for i in range(K * R)]
    net, hist = _fit_pairs(xin, tgt, pair_index=pairs, model=model, depth=depth, width=width,
                           max_dilation=max_dilation, steps=steps, patch=patch, batch=batch, lr=lr, val=None,
                           device=device, seed=seed, progress=progress, time_limit=time_limit,
                           desc=f"Noise2Inverse K={K}", strategy="noise2inverse")
    info = {"strategy": f"noise2inverse X:1, K={K}", "steps": hist["steps"], "seconds": hist["seconds"],
            "patch": patch, "batch": batch, "lr": lr, "seed": seed, "n_slices": int(R)}
    den = Denoiser(net, offset, scale, hist, info)
    preds = denoise(inputs.reshape(K * R, *subs.shape[-2:]), den, device=device, progress=progress)
    out = preds.reshape(K, R, *subs.shape[-2:]).mean(0)
    out = out[0] if was_2d else out
    return (out, den) if return_model else out


# =============================================================================== inference
def denoise(volume, model, *, tile=512, overlap=32, batch=4, device="auto", progress=True, tta=False, out=None,
            chunk=None):
    """Denoise a 2D image or a 3D volume slice by slice with a trained network.

    Parameters
    ----------
    volume : array_like, shape (y, x) or (z, y, x)
        Reconstructed slices (the same kind of data the model was trained on).
    model : Denoiser, torch.nn.Module, str or path
        From :func:`train_supervised`, :func:`noise2inverse` (``return_model=True``) or
        :func:`load_pretrained`; the name of a shipped denoiser (``"msd_bone_implant"``,
        see :func:`load_pretrained`) or the path of a file written by :meth:`Denoiser.save`;
        a bare network is applied without normalisation.
    tile : int
        Slices larger than ``tile`` pixels on a side are processed in overlapping
        ``tile x tile`` patches blended with Gaussian weights
        (:func:`tomoml_nb.tiling.sliding_window`), which bounds memory.
    overlap : int
        Overlap between tiles (pixels).
    batch : int
        Slices per forward pass when slices are small.
    device : str
        ``"auto"`` uses CUDA when available.
    progress : bool
        tqdm bar over slices.
    tta : bool
        Test-time augmentation ("self-ensemble"): denoise each slice in its 8 orientations
        (4 rotations by 90 degrees, each also mirrored), undo the transform and average.
        8 times slower; it helps when the network was trained with these flips and
        rotations (as :func:`train_supervised` and :func:`noise2inverse` do) and the noise is
        isotropic in the slice plane, as after filtered back-projection over 180 degrees.
        Measured on the validation phantom of ``scripts/train_msd.py`` with the 100-layer
        network: +0.15 dB (flux 500) and +0.22 dB (flux 2000).
    out : array_like, optional
        Float array of ``volume``'s shape to write the result into, e.g. a zarr array for a
        scan larger than memory; the volume (any sliceable 3D array: numpy, zarr, h5py,
        ``np.memmap``) is then read ``chunk`` slices at a time (plus the network's
        neighbouring slices), so memory follows the chunk. The result is the same as
        in one pass.
    chunk : int, optional
        Slices per chunk (default 64 when ``out`` is given); without ``out`` a new numpy
        array is filled chunk by chunk.

    Returns
    -------
    ndarray, float32, same shape as ``volume`` (or ``out``)

    Examples
    --------
    >>> import numpy as np
    >>> from tomoml_nb.models.msd import MSDNet
    >>> out = denoise(np.zeros((3, 32, 32)), Denoiser(MSDNet(depth=4), 0.0, 1.0), progress=False)
    >>> out.shape, float(abs(out).max())
    ((3, 32, 32), 0.0)
    """
    import torch
    from tqdm.auto import tqdm

    from .tiling import sliding_window
    from .train import resolve_device

    if out is not None or chunk is not None:
        return _denoise_chunks(volume, model, out, chunk, progress,
                               dict(tile=tile, overlap=overlap, batch=batch, device=device, tta=tta))
    vol, was_2d = _as_slices(volume, "volume")
    if isinstance(model, (str, os.PathLike)):
        model = _resolve_model(model)
    if tta:
        acc = np.zeros(vol.shape, np.float64)
        for k, flip in tqdm([(k, f) for k in range(4) for f in (False, True)], desc="denoise (8 orientations)",
                            disable=not progress):
            view = np.rot90(vol, k, axes=(1, 2))
            out = denoise(np.ascontiguousarray(view[..., ::-1] if flip else view), model, tile=tile,
                          overlap=overlap, batch=batch, device=device, progress=False)
            acc += np.rot90(out[..., ::-1] if flip else out, -k, axes=(1, 2))
        out = (acc / 8).astype(np.float32)
        return out[0] if was_2d else out
    if isinstance(model, Denoiser):
        net, offset, scale = model.net, model.offset, model.scale
    elif isinstance(model, torch.nn.Module):
        net, offset, scale = model, 0.0, 1.0
    else:
        raise TypeError(f"model: expected a Denoiser or a torch module, got {type(model).__name__}")
    tile = _check_int(tile, "tile", 32)
    overlap = _check_int(overlap, "overlap", 0)
    batch = _check_int(batch, "batch", 1)
    k = _net_context(net)
    Z, H, W = vol.shape
    if k and (was_2d or Z <= k):
        raise ValueError(f"volume: this network also reads {k} neighbouring slice(s) on each side; give a volume "
                         f"(z, y, x) of more than {k} contiguous slices, got shape {np.shape(volume)}")
    dev = resolve_device(device)
    net = net.to(dev).eval()
    out = np.empty_like(vol)
    index = _context_index(Z, k)

    def inputs(z):  # normalised network input for slice(s) z: (b, 1 + 2k, h, w)
        return (vol[index[z]] - offset) / scale

    def run(x):  # x: (b, c, h, w) normalised numpy
        with torch.no_grad():
            return net(torch.from_numpy(np.ascontiguousarray(x)).to(dev)).cpu().numpy()[:, 0]

    with _threads():
        if H <= tile and W <= tile:
            for z0 in tqdm(range(0, Z, batch), desc="denoise", disable=not progress or Z <= batch):
                out[z0:z0 + batch] = run(inputs(slice(z0, z0 + batch))) * scale + offset
        else:
            for z in tqdm(range(Z), desc="denoise", disable=not progress):
                res = sliding_window(inputs(z), lambda p: run(p[None]), (tile, tile), overlap, progress=False)
                out[z] = res[0] * scale + offset
    net.cpu()
    return out[0] if was_2d else out


def _denoise_chunks(volume, model, out, chunk, progress, kwargs):
    """:func:`denoise` ``chunk`` slices at a time, each read with the network's neighbours, into ``out``."""
    from tqdm.auto import tqdm

    shape = tuple(int(s) for s in np.shape(volume))
    if len(shape) != 3:
        raise ValueError(f"volume: out= and chunk= need a 3D volume (z, y, x), got shape {shape}")
    chunk = _check_int(64 if chunk is None else chunk, "chunk", 1)
    if out is None:
        out = np.zeros(shape, np.float32)
    else:
        if tuple(np.shape(out)) != shape:
            raise ValueError(f"out: shape {tuple(np.shape(out))} differs from the volume's {shape}")
        kind = np.dtype(getattr(out, "dtype", np.int64))
        if kind.kind != "f":
            raise TypeError(f"out: expected a float array (float32), got dtype {kind}")
    if isinstance(model, (str, os.PathLike)):
        model = _resolve_model(model)
    net = model.net if isinstance(model, Denoiser) else model
    k = _net_context(net)
    Z = shape[0]
    starts = list(range(0, Z, chunk))
    for z0 in tqdm(starts, desc="denoise chunks", disable=not progress or len(starts) < 2):
        z1 = min(Z, z0 + chunk)
        a, b = max(0, z0 - k), min(Z, z1 + k)
        res = denoise(np.asarray(volume[a:b]), model, progress=False, **kwargs)
        out[z0:z1] = res[z0 - a:z1 - a]
    return out


# =============================================================================== classical
def classical_methods():
    """Classical filters available here (``"bm3d"`` / ``"bm4d"`` only when the optional ``bm3d`` /
    ``bm4d`` packages are installed).

    Examples
    --------
    >>> classical_methods()[:3]
    ('gaussian', 'median', 'nlm')
    """
    import importlib.util

    return tuple(m for m in CLASSICAL if m not in ("bm3d", "bm4d") or importlib.util.find_spec(m) is not None)


def _sigma_est(img):
    from skimage.restoration import estimate_sigma

    return float(estimate_sigma(img))


def classical_filter(volume, method="gaussian", strength=1.0, *, sigma=None, progress=False):
    """Apply a classical denoising filter slice by slice (BM4D: to the whole volume).

    Parameters
    ----------
    volume : array_like, shape (y, x) or (z, y, x)
    method : {"gaussian", "median", "nlm", "bm3d", "bm4d"}
        ``"gaussian"``: :func:`scipy.ndimage.gaussian_filter` with ``sigma = strength``
        pixels; ``"median"``: :func:`scipy.ndimage.median_filter` with window
        ``strength`` (odd integer); ``"nlm"``: :func:`skimage.restoration.denoise_nl_means`
        (5x5 patches, 13x13 search) with ``h = strength * sigma``; ``"bm3d"``: the
        ``bm3d`` package (optional, non-commercial licence) with
        ``sigma_psd = strength * sigma``; ``"bm4d"``: the ``bm4d`` package (same
        licence) on the whole volume at once -- 3D blocks, so it uses the neighbouring
        slices like a network with ``context`` does -- with ``sigma_psd = strength * sigma``
        (``sigma``: the median of the per-slice estimates); needs a volume of at least 4
        contiguous slices and takes tens of seconds for 16 slices of 128 x 128.
    strength : float
        The filter's one tuning parameter (see above); pick it with :func:`tune_classical`.
    sigma : float, optional
        Noise standard deviation for ``"nlm"``/``"bm3d"``; default: estimated per slice
        (:func:`skimage.restoration.estimate_sigma`).
    progress : bool
        tqdm bar over slices.

    Returns
    -------
    ndarray, float32, same shape as ``volume``

    Examples
    --------
    >>> import numpy as np
    >>> img = np.random.default_rng(0).normal(size=(32, 32))
    >>> float(classical_filter(img, "gaussian", 2.0).std()) < 0.3
    True
    """
    from scipy import ndimage as ndi
    from tqdm.auto import tqdm

    vol, was_2d = _as_slices(volume, "volume")
    method = check_choice(method, "method", CLASSICAL)
    check_positive(strength, "strength")
    if sigma is not None:
        check_positive(sigma, "sigma")
    if method in ("bm3d", "bm4d") and method not in classical_methods():
        raise ImportError(f"method: {method!r} needs the optional {method} package (pip install {method}; "
                          "free for non-commercial use only)")
    if method == "bm4d":
        if was_2d or len(vol) < 4:
            raise ValueError(f"volume: 'bm4d' filters a volume (z, y, x) of at least 4 contiguous slices, got shape "
                             f"{np.shape(volume)}; use 'bm3d' for single slices")
        import bm4d

        s = float(np.median([_sigma_est(img) for img in vol])) if sigma is None else float(sigma)
        return np.asarray(bm4d.bm4d(vol, sigma_psd=max(strength * s, 1e-12)), np.float32)
    if method == "median":
        size = int(round(strength))
        if size < 2:
            raise ValueError(f"strength: median window must be >= 2 pixels, got {strength!r}")
    out = np.empty_like(vol)
    for z in tqdm(range(len(vol)), desc=method, disable=not progress):
        img = vol[z]
        if method == "gaussian":
            out[z] = ndi.gaussian_filter(img, float(strength), mode="reflect")
        elif method == "median":
            out[z] = ndi.median_filter(img, size=size, mode="reflect")
        elif method == "nlm":
            from skimage.restoration import denoise_nl_means

            s = _sigma_est(img) if sigma is None else float(sigma)
            out[z] = denoise_nl_means(img, patch_size=5, patch_distance=6, h=max(strength * s, 1e-12),
                                      sigma=s, fast_mode=True)
        else:
            import bm3d

            s = _sigma_est(img) if sigma is None else float(sigma)
            out[z] = bm3d.bm3d(img, sigma_psd=max(strength * s, 1e-12))
    return out[0] if was_2d else out


def _masked_psnr(est, ref, mask, data_range):
    from .metrics import psnr

    if mask is None:
        return psnr(est, ref, data_range=data_range)
    return psnr(est[..., mask], ref[..., mask], data_range=data_range)


def tune_classical(noisy, clean, method="gaussian", grid=None, *, mask=None, progress=False):
    """Choose a classical filter's strength by the best PSNR on *validation* data.

    Use slices that are not in the test set (another phantom or seed) so the comparison
    with a trained network stays fair. For ``"bm4d"`` the slices must be contiguous (a
    volume), since it filters them jointly.

    Parameters
    ----------
    noisy, clean : array_like, shape (y, x) or (n, y, x)
        Validation pairs.
    method : {"gaussian", "median", "nlm", "bm3d", "bm4d"}
    grid : sequence of float, optional
        Strengths to try (default :data:`DEFAULT_GRIDS`).
    mask : array_like of bool, shape (y, x), optional
        Pixels where PSNR is measured (e.g. the reconstruction circle).
    progress : bool
        tqdm bar over the grid.

    Returns
    -------
    dict
        ``{"method", "strength", "psnr", "grid", "scores"}``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> clean = np.zeros((32, 32)); clean[8:24, 8:24] = 1
    >>> best = tune_classical(clean + 0.3 * rng.standard_normal(clean.shape), clean, "gaussian")
    >>> best["strength"] >= 1.0
    True
    """
    from tqdm.auto import tqdm

    x, _ = _as_slices(noisy, "noisy")
    y, _ = _as_slices(clean, "clean")
    check_same_shape(x, y, "noisy", "clean")
    method = check_choice(method, "method", CLASSICAL)
    grid = tuple(DEFAULT_GRIDS[method] if grid is None else grid)
    if not grid:
        raise ValueError("grid: empty")
    if mask is not None:
        mask = as_array(mask, "mask", ndim=2).astype(bool)
        if mask.shape != y.shape[-2:]:
            raise ValueError(f"mask: shape {mask.shape} differs from the slices' {y.shape[-2:]}")
    rng_ = float(np.ptp(y if mask is None else y[:, mask]))
    sig = [_sigma_est(s) for s in x] if method in ("nlm", "bm3d", "bm4d") else None
    scores = []
    for g in tqdm(grid, desc=f"tune {method}", disable=not progress):
        if method == "bm4d":
            out = classical_filter(x, method, g, sigma=float(np.median(sig)))
        elif sig is None:
            out = classical_filter(x, method, g)
        else:
            out = np.stack([classical_filter(s, method, g, sigma=sg) for s, sg in zip(x, sig)])
        scores.append(_masked_psnr(out, y, mask, rng_))
    k = int(np.argmax(scores))
    return {"method": method, "strength": grid[k], "psnr": float(scores[k]), "grid": list(grid),
            "scores": [float(s) for s in scores]}


def evaluate(estimate, truth, *, mask=None, data_range=None):
    """PSNR (dB) and SSIM of denoised slices against the truth, inside ``mask``.

    Parameters
    ----------
    estimate, truth : array_like, shape (y, x) or (n, y, x)
    mask : array_like of bool, shape (y, x), optional
        Region where the metrics are computed (PSNR on the masked pixels; SSIM over the
        whole slice with the outside set to the truth's values, so it does not count).
    data_range : float, optional
        Default: the truth's range inside the mask.

    Returns
    -------
    dict
        ``{"psnr": float, "ssim": float}`` (SSIM averaged over slices).

    Examples
    --------
    >>> import numpy as np
    >>> t = np.zeros((16, 16)); t[4:12, 4:12] = 1
    >>> evaluate(t, t)["ssim"]
    1.0
    """
    from .metrics import ssim

    e, _ = _as_slices(estimate, "estimate")
    t, _ = _as_slices(truth, "truth")
    check_same_shape(t, e, "truth", "estimate")
    if mask is not None:
        mask = as_array(mask, "mask", ndim=2).astype(bool)
        if mask.shape != t.shape[-2:]:
            raise ValueError(f"mask: shape {mask.shape} differs from the slices' {t.shape[-2:]}")
    if data_range is None:
        data_range = float(np.ptp(t if mask is None else t[:, mask]))
    p = _masked_psnr(e, t, mask, data_range)
    if mask is not None:
        e = np.where(mask, e, t)
    s = float(np.mean([ssim(a, b, data_range=data_range) for a, b in zip(e, t)]))
    return {"psnr": p, "ssim": s}


# =============================================================================== simulation
def simulate_low_dose(volume, *, n_angles=360, flux=1000.0, attenuation=2.0, n_flats=20, seed=0,
                      device="auto"):
    """Simulate a low-dose parallel-beam scan of a known object and reconstruct it (FBP).

    Parameters
    ----------
    volume : array_like, shape (N, N) or (n_rows, N, N)
        The object (e.g. ``phantoms.bone_implant(...).image`` with ``noise=0``), in any
        grey-value units.
    n_angles : int
        Projections over [0, pi).
    flux : float
        Open-beam counts per detector pixel: lower flux, more noise
        (:func:`tomoml_nb.tomo.simulate_acquisition`).
    attenuation : float
        Largest line integral through the object (``-log`` transmission), which sets the
        pixel length: ``pixel_size = attenuation / max(projection of volume)``.
    n_flats : int
        Open-beam frames averaged for flat-field correction.
    seed : int
        Noise seed.
    device : str
        Projector device.

    Returns
    -------
    dict
        ``projections`` line integrals ``(n_angles, n_rows, N)`` (or ``(n_angles, N)``),
        ``angles`` (radians), ``reconstruction`` (FBP, in the units of ``volume``),
        ``truth`` (the volume, zero outside the reconstruction circle), ``mask`` (the
        circle), ``pixel_size`` and ``seconds``.

    Examples
    --------
    >>> import numpy as np
    >>> img = np.zeros((32, 32), np.float32); img[8:24, 8:24] = 0.5
    >>> sim = simulate_low_dose(img, n_angles=48, flux=500)
    >>> sim["reconstruction"].shape, sim["projections"].shape
    ((32, 32), (48, 32))
    """
    from . import tomo

    vol, was_2d = _as_slices(volume, "volume")
    if vol.shape[-1] != vol.shape[-2]:
        raise ValueError(f"volume: slices must be square (N, N), got {vol.shape[-2:]}")
    n_angles = _check_int(n_angles, "n_angles", 2)
    check_positive(flux, "flux")
    check_positive(attenuation, "attenuation")
    t0 = time.perf_counter()
    N = vol.shape[-1]
    ax = np.arange(N) - (N - 1) / 2.0
    mask = (ax[:, None] ** 2 + ax[None, :] ** 2) <= (N / 2.0) ** 2
    truth = np.where(mask, vol, 0).astype(np.float32)
    ang = np.linspace(0.0, np.pi, n_angles, endpoint=False)
    peak = float(tomo.forward_project(truth, ang[:: max(1, n_angles // 16)], device=device).max())
    if peak <= 0:
        raise ValueError("volume: nothing attenuates (all values <= 0 inside the reconstruction circle)")
    pixel_size = attenuation / peak
    data = tomo.simulate_acquisition(truth, angles=ang, flux=flux, n_flats=n_flats, n_darks=n_flats,
                                     pixel_size=pixel_size, seed=seed, device=device)
    proj = tomo.minus_log(tomo.normalize(data.projections, data.flats, data.darks)) / np.float32(pixel_size)
    rec = _reconstruct(np.ascontiguousarray(proj.transpose(1, 0, 2)), ang, device=device)
    out = {"projections": proj[:, 0] if was_2d else proj, "angles": ang, "reconstruction": rec[0] if was_2d else rec,
           "truth": truth[0] if was_2d else truth, "mask": mask, "pixel_size": pixel_size,
           "seconds": time.perf_counter() - t0}
    return out
