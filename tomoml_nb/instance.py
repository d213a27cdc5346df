"""3D instance segmentation of touching objects (paper fibres) with spatial embeddings.

An EmbedSeg-style method (Neven et al., CVPR 2019; Lalit et al., MIDL 2021) for volumes
that do not fit through a network at once:

* a small 3D U-Net (:mod:`tomoml_nb.models.embedseg`) predicts per voxel an offset,
  a clustering bandwidth sigma (one per axis), a seed map and a foreground probability;
* the spatial embedding of a voxel is its position (physical units; anisotropic voxel size
  supported) plus its offset. Training pulls the embeddings of each instance into a
  Gaussian around their mean (Lovász hinge on the instance's Gaussian), keeps sigma
  constant inside an instance and regresses the seed map to the Gaussian;
* inference clusters voxels around seeds (highest seed first; voxels inside the seed's
  Gaussian with probability > 0.5 that are connected to it form an instance);
* the network sees a *window* (its training patch): instances are the pieces of objects
  inside it, and a fibre longer than the window is one piece per window. Volumes larger
  than the window are cut into overlapping tiles and stitched by
  :func:`tomoml_nb.tiling.label_tiles` (Hungarian IoU matching in the overlaps, core
  ownership, and a union-find that never joins two objects of one tile), so a fibre
  crossing many tiles gets one label and two touching fibres keep two.

The classical baseline is :func:`watershed_instances` (distance transform + marker
watershed); :func:`tune_watershed` picks its parameters on a validation volume.

Examples
--------
>>> from tomoml_nb import phantoms
>>> ph = phantoms.fibres((32, 48, 48), n_fibres=12, seed=3)
>>> lab = watershed_instances(ph.image)
>>> lab.dtype
dtype('int32')
"""
from __future__ import annotations

import math
import time
import warnings

import numpy as np
from scipy import ndimage as ndi

from ._validate import as_array, check_choice, check_label_out, check_positive, rng_from
from .tiling import robust_range

__all__ = ["segment_instances", "predict_embeddings", "cluster_embeddings", "train", "embedseg_loss",
           "watershed_instances", "tune_watershed", "evaluate", "object_sizes", "plot_size_distributions",
           "metrics_table", "plot_training", "save_model", "load_model", "load_pretrained",
           "normalize", "FORMAT", "PRETRAINED"]

FORMAT = "tomoml_nb.instance.embedseg/1"
PRETRAINED = "embedseg_fibres.pt"
_SCRIPT = "scripts/train_embedseg.py"

# default clustering settings (stored with the weights; the script may tune them on validation data)
#: Window (z, y, x) a network sees at once by default: its training patch. Objects are clustered
#: around centres the network can reach from inside this window; larger volumes are tiled.
DEFAULT_WINDOW = (32, 64, 64)
CLUSTER_DEFAULTS = {"fg_threshold": 0.5, "seed_threshold": 0.5, "min_size": 20, "grow": 2.0}


# --------------------------------------------------------------------------- input handling
def _check_volume(volume, name="volume"):
    vol = as_array(volume, name, ndim=3)
    if min(vol.shape) < 4:
        raise ValueError(f"{name}: every axis needs at least 4 voxels, got shape {vol.shape}")
    return vol


def _voxel_size(voxel_size):
    if voxel_size is None:
        return (1.0, 1.0, 1.0)
    try:
        vs = np.asarray(voxel_size, np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"voxel_size: expected 3 positive numbers (z, y, x) or one number, "
                        f"got {voxel_size!r}") from None
    if vs.ndim > 1 or vs.size not in (1, 3):
        raise ValueError(f"voxel_size: expected 3 positive numbers (z, y, x) or one number, got {voxel_size!r}")
    vs = np.broadcast_to(vs.ravel(), (3,))
    if not np.all(np.isfinite(vs)) or np.any(vs <= 0):
        raise ValueError(f"voxel_size: expected 3 positive numbers (z, y, x), got {voxel_size!r}")
    vs = vs / vs.min()                          # relative: the finest axis has unit spacing
    return tuple(float(v) for v in vs)


def normalize(volume, percentiles=(0.5, 99.5), *, sample=2_000_000):
    """Map grey values to about [0, 1] by robust percentiles (as the network was trained).

    Parameters
    ----------
    volume : array_like (any sliceable array)
        Grey values; a strided subsample of at most ``sample`` voxels sets the percentiles,
        so this works on zarr/dask arrays too (then returns the ``(lo, hi)`` pair only when
        the volume is not a numpy array -- see ``return_range``).
    percentiles : (float, float)

    Returns
    -------
    ndarray float32

    Examples
    --------
    >>> import numpy as np
    >>> v = normalize(np.arange(1000.0).reshape(10, 10, 10))
    >>> round(float(v.min()), 3), round(float(v.max()), 3)
    (-0.005, 1.005)
    """
    lo, hi = robust_range(volume, percentiles, sample)
    return ((np.asarray(volume, np.float32) - lo) / (hi - lo)).astype(np.float32)


# --------------------------------------------------------------------------- network I/O
def _torch():
    import torch

    return torch


def save_model(net, path, *, history=None, meta=None, overwrite=False):
    """Save an EmbedSeg network (config + clustering settings + weights) to ``path``.

    An existing file is refused (``FileExistsError`` naming ``path``) unless ``overwrite=True``.

    Examples
    --------
    >>> import os, tempfile
    >>> from tomoml_nb.models.embedseg import build_embedseg
    >>> p = save_model(build_embedseg({"base": 4, "levels": 2}), os.path.join(tempfile.mkdtemp(), "e.pt"))
    >>> load_model(p).tomoml_config["base"]
    4
    """
    from .weights import save_state

    cfg = dict(net.tomoml_config)
    cfg["cluster"] = dict(getattr(net, "tomoml_cluster", CLUSTER_DEFAULTS))
    cfg["voxel_size"] = list(getattr(net, "tomoml_voxel_size", (1.0, 1.0, 1.0)))
    cfg["window"] = [int(w) for w in getattr(net, "tomoml_window", DEFAULT_WINDOW)]
    return save_state(path, format=FORMAT, config=cfg, state_dict=net.state_dict(),
                      history=history if history is not None else getattr(net, "tomoml_history", {}), meta=meta,
                      overwrite=overwrite)


def load_model(path):
    """Load a network saved by :func:`save_model` (CPU, eval mode).

    Examples
    --------
    >>> load_model("missing.pt")
    Traceback (most recent call last):
    ...
    FileNotFoundError: path: missing.pt does not exist
    """
    from .models.embedseg import build_embedseg
    from .weights import load_state

    state = load_state(path, format=FORMAT)
    cfg = dict(state["config"])
    cluster = {**CLUSTER_DEFAULTS, **cfg.pop("cluster", {})}
    vs = tuple(cfg.pop("voxel_size", (1.0, 1.0, 1.0)))
    window = tuple(cfg.pop("window", DEFAULT_WINDOW))
    net = build_embedseg(cfg)
    net.load_state_dict(state["state_dict"])
    net.eval()
    net.tomoml_cluster = cluster
    net.tomoml_voxel_size = vs
    net.tomoml_window = window
    net.tomoml_history = state["history"]
    net.tomoml_meta = state["meta"]
    return net


def load_pretrained():
    """The shipped fibre network (``tomoml_nb/weights/embedseg_fibres.pt``; see its model card).

    Examples
    --------
    >>> net = load_pretrained()
    >>> net.tomoml_config["n_sigma"]
    3
    """
    from .weights import shipped_path

    return load_model(shipped_path(PRETRAINED, script=_SCRIPT))


def _resolve_model(model):
    torch = _torch()
    if isinstance(model, str) and model == "pretrained":
        return load_pretrained()
    if isinstance(model, torch.nn.Module):
        if not hasattr(model, "tomoml_config"):
            raise TypeError("model: expected a network built by tomoml_nb.models.embedseg")
        return model
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        return load_model(model)
    raise TypeError(f"model: expected 'pretrained', a weights path or a network, got {type(model).__name__}")


# --------------------------------------------------------------------------- prediction
def _coords(shape, voxel_size, device, origin=(0, 0, 0)):
    torch = _torch()
    ax = [(torch.arange(n, device=device, dtype=torch.float32) + o) * v
          for n, v, o in zip(shape, voxel_size, origin)]
    return torch.stack(torch.meshgrid(*ax, indexing="ij"))


def _forward(net, x, dev):
    """Run the network on a normalised (Z, Y, X) numpy block, padding to the size multiple."""
    torch = _torch()
    from .models.embedseg import size_multiple, split_outputs

    m = size_multiple(net.tomoml_config)
    pad = [(0, (-s) % m) for s in x.shape]
    xp = np.pad(x, pad, mode="reflect") if any(p[1] for p in pad) else x
    cfg = net.tomoml_config
    with torch.no_grad():
        t = torch.from_numpy(np.ascontiguousarray(xp, np.float32))[None, None].to(dev)
        raw = net(t)
        off, sig, seed, fg = split_outputs(raw, cfg["n_sigma"], cfg["max_offset"], cfg["sigma_scale"])
    crop = (slice(None), slice(None), *[slice(0, s) for s in x.shape])
    return off[crop][0], sig[crop][0], seed[crop][0, 0], torch.sigmoid(fg[crop][0, 0])


def predict_embeddings(volume, model="pretrained", *, voxel_size=None, device="auto", normalized=False):
    """Network outputs for a volume that fits at once: offsets, sigma, seed and foreground maps.

    Parameters
    ----------
    volume : array_like (z, y, x)
    model : "pretrained", path or network
    voxel_size : 3 floats, optional
        Physical voxel size (z, y, x); default: the one the network was trained with.
    device : str
    normalized : bool
        True when ``volume`` is already normalised with :func:`normalize`.

    Returns
    -------
    dict of numpy arrays
        ``offsets`` (3, z, y, x), ``sigma`` (n_sigma, z, y, x), ``seed`` and ``foreground``
        (z, y, x), ``embedding`` (3, z, y, x) = coordinates + offsets.

    Examples
    --------
    >>> from tomoml_nb.models.embedseg import build_embedseg
    >>> out = predict_embeddings(np.random.default_rng(0).random((8, 12, 12)), build_embedseg({"base": 4}))
    >>> out["embedding"].shape, out["seed"].shape
    ((3, 8, 12, 12), (8, 12, 12))
    """
    from .train import limit_cpu_threads, resolve_device

    vol = _check_volume(volume)
    net = _resolve_model(model)
    dev = resolve_device(device)
    vs = _voxel_size(voxel_size if voxel_size is not None else getattr(net, "tomoml_voxel_size", None))
    x = vol.astype(np.float32) if normalized else normalize(vol)
    net.eval().to(dev)
    with limit_cpu_threads(dev):
        off, sig, seed, fg = _forward(net, x, dev)
        emb = _coords(x.shape, vs, dev) + off
    return {k: v.cpu().numpy() for k, v in
            dict(offsets=off, sigma=sig, seed=seed, foreground=fg, embedding=emb).items()}


def cluster_embeddings(embedding, sigma, seed, foreground, *, fg_threshold=0.5, seed_threshold=0.5,
                       min_size=20, grow=2.0, max_seeds=None, refine=2, voxel_size=(1.0, 1.0, 1.0)):
    """Cluster voxels around seeds in embedding space (EmbedSeg inference).

    1. Foreground = ``foreground > fg_threshold``.
    2. Repeatedly take the unclustered foreground voxel with the highest seed value (while it
       exceeds ``seed_threshold``); the unclustered foreground voxels whose embedding lies
       inside its Gaussian (``exp(-sum((e - e_seed)^2 / (2 sigma_seed^2))) > 0.5``) form a
       proposal; ``refine`` times the Gaussian is re-centred on the proposal's mean embedding
       and bandwidth (the centre used in training) and the proposal recomputed; the proposal
       voxels connected to the seed in space form an instance when there are at least ``min_size``
       of them; they leave the pool either way, and no voxel of the proposal seeds again.
       At most ``max_seeds`` seeds are tried (bounds the time of a poorly trained network).
    3. Foreground voxels left over take the label of the nearest instance voxel within
       ``grow`` voxels.

    Parameters
    ----------
    embedding : ndarray (3, z, y, x)
        Coordinates + offsets (physical units).
    sigma : ndarray (1 or 3, z, y, x)
    seed, foreground : ndarray (z, y, x)
    fg_threshold, seed_threshold : float in [0, 1)
    min_size : int
    grow : float >= 0
    max_seeds : int, optional
        Default: one per 20 foreground voxels, at least 1000.
    refine : int >= 0
        Re-centring iterations of each proposal.
    voxel_size : 3 floats
        The voxel size the embedding's coordinates were built with.

    Returns
    -------
    ndarray int32 (z, y, x)

    Examples
    --------
    >>> e = np.zeros((3, 4, 4, 8), np.float32); e[2, :, :, 4:] = 20.0       # two collapsed clusters
    >>> lab = cluster_embeddings(e, np.ones((1, 4, 4, 8), np.float32), np.ones((4, 4, 8)), np.ones((4, 4, 8)),
    ...                          min_size=4)
    >>> np.unique(lab).tolist()
    [1, 2]
    """
    torch = _torch()
    for v, n in ((fg_threshold, "fg_threshold"), (seed_threshold, "seed_threshold")):
        if not 0 <= float(v) < 1:
            raise ValueError(f"{n}: must be in [0, 1), got {v!r}")
    min_size = check_positive(min_size, "min_size", integer=True, allow_zero=True)
    grow = check_positive(grow, "grow", allow_zero=True)
    embedding = np.asarray(embedding, np.float32)
    if embedding.ndim != 4 or embedding.shape[0] != 3:
        raise ValueError(f"embedding: expected shape (3, z, y, x), got {embedding.shape}")
    shape = embedding.shape[1:]
    sigma = np.asarray(sigma, np.float32)
    if sigma.ndim != 4 or sigma.shape[0] not in (1, 3) or sigma.shape[1:] != shape:
        raise ValueError(f"sigma: expected shape (1 or 3, *{shape}), got {sigma.shape}")
    seed = np.asarray(seed, np.float32)
    foreground = np.asarray(foreground, np.float32)
    if seed.shape != shape or foreground.shape != shape:
        raise ValueError(f"seed: seed and foreground must have shape {shape}, got {seed.shape}, {foreground.shape}")

    vz = float(_voxel_size(voxel_size)[0])
    fg = foreground > fg_threshold
    labels = np.zeros(shape, np.int32)
    idx = np.flatnonzero(fg)
    if idx.size == 0:
        return labels
    coords = np.stack(np.unravel_index(idx, shape), axis=1)
    ec = torch.from_numpy(np.ascontiguousarray(embedding.reshape(3, -1)[:, idx]))        # (3, N)
    e = ec.T                                                                          # (N, 3) view
    s = torch.from_numpy(sigma.reshape(sigma.shape[0], -1)[:, idx].T.copy())         # (N, ns)
    sd = torch.from_numpy(seed.ravel()[idx].copy())
    free = torch.ones(len(idx), dtype=torch.bool)
    score = torch.where(sd > seed_threshold, sd, torch.full_like(sd, -1.0))
    lab_flat = np.zeros(len(idx), np.int32)
    n_lab = 0
    thr = 2.0 * math.log(2.0)                 # Gaussian > 0.5  <=>  squared Mahalanobis < 2 ln 2
    refine = check_positive(refine, "refine", integer=True, allow_zero=True)
    if max_seeds is None:
        max_seeds = max(1000, idx.size // 20)
    max_seeds = check_positive(max_seeds, "max_seeds", integer=True)
    # voxels are in z-major order: only those whose z lies within the reach of the seed's
    # embedding (|offset| <= max |offset| seen, plus 3 sigma) can fall inside its Gaussian
    zc = torch.from_numpy(coords[:, 0].astype(np.float32) * vz)
    reach = float((e[:, 0] - zc).abs().max()) + 3.0 * float(s[:, 0].max()) + 1.0
    for _ in range(max_seeds):
        k = int(torch.argmax(score))
        if float(score[k]) < 0:
            break
        ez = float(e[k, 0])
        lo = int(torch.searchsorted(zc, torch.tensor([ez - reach])))
        hi = int(torch.searchsorted(zc, torch.tensor([ez + reach]), right=True))
        prop = torch.zeros(len(idx), dtype=torch.bool)
        centre, bw = e[k], s[k]
        for _ in range(refine + 1):
            inv = (1.0 / bw).expand(3).tolist()
            c = centre.tolist()
            d2 = ((ec[0, lo:hi] - c[0]) * inv[0]) ** 2
            d2 += ((ec[1, lo:hi] - c[1]) * inv[1]) ** 2
            d2 += ((ec[2, lo:hi] - c[2]) * inv[2]) ** 2
            prop[lo:hi] = (d2 < thr) & free[lo:hi]
            prop[k] = True
            # re-centre on the proposal's mean embedding and bandwidth, as in training
            centre, bw = e[prop].mean(0), s[prop].mean(0)
        pidx = torch.nonzero(prop).squeeze(1).numpy()
        pc = coords[pidx]
        lo = pc.min(0)
        sub = np.zeros(tuple(pc.max(0) + 1 - lo), bool)
        sub[tuple((pc - lo).T)] = True
        cc, _ = ndi.label(sub, structure=np.ones((3, 3, 3)))
        keep = cc[tuple((pc - lo).T)] == cc[tuple(coords[k] - lo)]
        kidx = pidx[keep]
        if kidx.size >= max(min_size, 1):
            n_lab += 1
            lab_flat[kidx] = n_lab
        free[torch.from_numpy(kidx)] = False
        score[prop] = -1.0
    labels.ravel()[idx] = lab_flat
    left = fg & (labels == 0)
    if grow > 0 and left.any() and labels.any():
        dist, ind = ndi.distance_transform_edt(labels == 0, return_indices=True)
        take = left & (dist <= grow)
        labels[take] = labels[tuple(i[take] for i in ind)]
    return _relabel(labels)


def _per_axis3(value, name):
    """One int or 3 ints (z, y, x) -> tuple of 3 Python ints; the error names ``name``."""
    try:
        arr = np.asarray(value)
    except Exception:                                   # pragma: no cover - exotic inputs
        arr = np.asarray(None)
    if arr.dtype.kind not in "iuf" or arr.ndim > 1 or arr.size not in (1, 3) or not np.all(np.isfinite(arr)) \
            or not np.all(arr == np.round(arr)):
        raise ValueError(f"{name}: expected one integer or 3 integers (z, y, x), got {value!r}")
    return tuple(int(v) for v in np.broadcast_to(arr.ravel(), (3,)))


def _relabel(labels):
    ids, inv = np.unique(labels, return_inverse=True)
    if ids[0] != 0:
        return (inv.reshape(labels.shape) + 1).astype(np.int32)
    return inv.reshape(labels.shape).astype(np.int32)


def _segment_block(net, x, dev, vs, cluster):
    from .train import limit_cpu_threads

    with limit_cpu_threads(dev):
        off, sig, seed, fg = _forward(net, x, dev)
        emb = _coords(x.shape, vs, dev) + off
        out = {k: v.cpu().numpy() for k, v in dict(emb=emb, sig=sig, seed=seed, fg=fg).items()}
    return cluster_embeddings(out["emb"], out["sig"], out["seed"], out["fg"], voxel_size=vs, **cluster)


def segment_instances(volume, model="pretrained", tile_shape=None, overlap=None, *, voxel_size=None,
                      stitch="iou", iou_threshold=0.5, fg_threshold=None, seed_threshold=None, min_size=None,
                      max_voxels=16_000_000, out=None, device="auto", progress=True):
    """Instance labels (int32, 0 = background) of a grey volume with an EmbedSeg-style network.

    Parameters
    ----------
    volume : array_like (z, y, x)
        Grey values (any sliceable array when tiled: numpy, zarr, h5py, dask).
    model : "pretrained", path or network
        ``"pretrained"``: the shipped fibre network (:func:`load_pretrained`).
    tile_shape : int, 3 ints, "whole" or None
        None (default): the whole volume at once when it fits in the network's window (its
        training patch, ``net.tomoml_window``), otherwise tiles of that window. ``"whole"``:
        one pass over the whole volume whatever its size (up to ``max_voxels``; objects
        longer than the window then come out in pieces, because the network's offsets only
        reach across a window). Given: overlapping tiles, each segmented on its own and
        stitched by :func:`tomoml_nb.tiling.label_tiles`. A tile larger than the volume is
        clipped to it.
    overlap : int or 3 ints, optional
        Tile overlap (default: a quarter of the tile, at least 8 voxels, at most half). Must be smaller
        than ``tile_shape``. Larger overlaps stitch better and cost more tiles: a fibre that leaves a
        tile and comes back is two pieces in it, and a thin overlap may hold too little of either for
        the IoU match. With perfect tile labels on the benchmark's 256³ fibre phantom, tiles
        (32, 64, 64) gave AP@0.5 0.885 / 0.959 / 0.982 at overlaps of a quarter / 3/8 / half the tile
        (275 / 468 / 735 tiles; BENCHMARKS.md).
    voxel_size : 3 floats, optional
        Physical voxel size (z, y, x); default the network's (isotropic for the shipped one).
    stitch : {"iou", "naive"}
        Stitching across tiles (see :func:`tomoml_nb.tiling.label_tiles`); ``"naive"`` only
        to show how touching fibres get merged.
    iou_threshold : float
        Smallest IoU in a tile overlap for two pieces to be joined.
    fg_threshold, seed_threshold, min_size
        Clustering settings (:func:`cluster_embeddings`); None = the values stored with the
        network (chosen on validation data by the training script).
    max_voxels : int
        Largest volume processed at once with ``tile_shape="whole"``.
    out : array_like, optional
        Output array (e.g. zarr for volumes larger than memory): the volume's shape, dtype
        int32 or int64 (smaller integers would wrap around and floats cannot hold labels;
        both are rejected before any work). Written and returned whatever the tiling,
        also when the volume fits one window or with ``tile_shape="whole"``.
    device : str
    progress : bool

    Returns
    -------
    ndarray int32 (or ``out``)

    Raises
    ------
    ValueError
        ``volume`` not 3D or too small; ``tile_shape``, ``overlap`` or ``voxel_size`` of the
        wrong length or out of range; ``out`` of the wrong shape.
    TypeError
        ``out`` of a dtype that cannot hold instance labels.

    Examples
    --------
    >>> from tomoml_nb import phantoms
    >>> ph = phantoms.fibres((32, 64, 64), n_fibres=15, seed=11)
    >>> lab = segment_instances(ph.image, progress=False)
    >>> lab.dtype, lab.shape
    (dtype('int32'), (32, 64, 64))
    """
    from .tiling import label_tiles
    from .train import resolve_device

    shape = tuple(np.shape(volume))
    if len(shape) != 3:
        raise ValueError(f"volume: expected a 3D array, got {len(shape)}D with shape {shape}")
    if min(shape) < 4:
        raise ValueError(f"volume: every axis needs at least 4 voxels, got shape {shape}")
    check_choice(stitch, "stitch", ("iou", "naive"))
    max_voxels = check_positive(max_voxels, "max_voxels", integer=True)
    if out is not None:
        check_label_out(out, shape)
    if isinstance(tile_shape, str):
        check_choice(tile_shape, "tile_shape", ("whole",))
    elif tile_shape is not None:
        tile_shape = _per_axis3(tile_shape, "tile_shape")
    if overlap is not None:
        overlap = _per_axis3(overlap, "overlap")
    net = _resolve_model(model)
    dev = resolve_device(device)
    net.eval().to(dev)
    vs = _voxel_size(voxel_size if voxel_size is not None else getattr(net, "tomoml_voxel_size", None))
    cluster = dict(getattr(net, "tomoml_cluster", CLUSTER_DEFAULTS))
    for k, v in (("fg_threshold", fg_threshold), ("seed_threshold", seed_threshold), ("min_size", min_size)):
        if v is not None:
            cluster[k] = v
    lo, hi = robust_range(volume)           # one normalisation for every tile (also checks NaN)

    def labeller(block):
        block = np.asarray(block, np.float32)
        if not np.all(np.isfinite(block)):
            raise ValueError("volume: contains NaN or infinite values")
        return _segment_block(net, (block - lo) / (hi - lo), dev, vs, cluster)

    def whole():
        lab = labeller(np.asarray(volume))
        if out is None:
            return lab
        out[...] = lab
        return out

    window = tuple(int(w) for w in getattr(net, "tomoml_window", DEFAULT_WINDOW))
    if isinstance(tile_shape, str):
        if int(np.prod(shape)) > max_voxels:
            raise ValueError(f"tile_shape: 'whole' on {shape} exceeds max_voxels={max_voxels}; give a tile shape")
        return whole()
    if tile_shape is None:
        if all(s <= w for s, w in zip(shape, window)):
            return whole()
        tile_shape = window
    if min(tile_shape) < 8:
        raise ValueError(f"tile_shape: tiles need at least 8 voxels per axis, got {tile_shape}")
    if overlap is None:
        overlap = tuple(int(min(max(t // 4, 8), t // 2)) for t in tile_shape)
    ov = overlap
    for t, o, s in zip(tile_shape, ov, shape):
        if o < 0 or (t < s and o >= t):
            raise ValueError(f"overlap: {ov} must be >= 0 and smaller than tile_shape {tile_shape}")
    return label_tiles(volume, labeller, tile_shape, ov,
                       stitch=stitch, iou_threshold=iou_threshold, out=out, progress=progress,
                       desc="instance tiles")


# --------------------------------------------------------------------------- training
def _lovasz_hinge(logits, target):
    """Lovász hinge loss (Berman et al. 2018) of one binary mask, flattened inputs."""
    torch = _torch()
    signs = 2.0 * target - 1.0
    errors = 1.0 - logits * signs
    errors_sorted, perm = torch.sort(errors, descending=True)
    gt = target[perm]
    n_pos = gt.sum()
    inter = n_pos - gt.cumsum(0)
    union = n_pos + (1.0 - gt).cumsum(0)
    jac = 1.0 - inter / union
    grad = torch.cat([jac[:1], jac[1:] - jac[:-1]])
    return torch.dot(torch.relu(errors_sorted), grad)


def _lovasz_hinge_rows(logits, target):
    """Lovász hinge of K binary masks at once: ``logits`` and ``target`` of shape (K, V)."""
    torch = _torch()
    errors = 1.0 - logits * (2.0 * target - 1.0)
    errors_sorted, perm = torch.sort(errors, dim=1, descending=True)
    gt = torch.gather(target, 1, perm)
    n_pos = gt.sum(1, keepdim=True)
    inter = n_pos - gt.cumsum(1)
    union = n_pos + (1.0 - gt).cumsum(1)
    jac = 1.0 - inter / union
    grad = torch.cat([jac[:, :1], jac[:, 1:] - jac[:, :-1]], dim=1)
    return (torch.relu(errors_sorted) * grad).sum(1)


def embedseg_loss(raw, labels, config, *, voxel_size=(1.0, 1.0, 1.0), w_inst=1.0, w_var=10.0, w_seed=1.0,
                  w_fg=1.0, min_instance=10):
    """The EmbedSeg / spatial-embedding loss for a batch of patches.

    For each instance ``k`` of each patch (a connected piece of an object inside the patch):
    centre ``C_k`` = mean embedding of its voxels, bandwidth ``s_k`` = their mean sigma (per
    axis), Gaussian ``phi_k(e) = exp(-sum((e - C_k)^2 / (2 s_k^2)))``;

    * Lovász hinge between ``2 phi_k - 1`` (as logits) and the instance mask over the
      foreground voxels -- pulls the instance into its Gaussian and pushes the voxels of
      every other instance out of it. Background voxels are left out: the foreground head
      decides what is clustered, so their embeddings never matter. (On a GPU all instances
      of a patch go through one batched sort; on a CPU instance by instance over the
      voxels embedded within 4 sigma of ``C_k``, the others having ``phi_k ~ 0``.);
    * sigma smoothness: mean squared deviation of ``log sigma`` from its instance mean;
    * seed regression: seed -> ``phi_k`` (detached) inside instance ``k``, -> 0 on background;
    * foreground: binary cross-entropy + soft Dice of the foreground logit.

    Parameters
    ----------
    raw : tensor (B, 3 + n_sigma + 2, Z, Y, X)
        Network outputs.
    labels : tensor (B, Z, Y, X) int
        Instance labels of each patch (0 = background, -1 = ignore).
    config : dict
        The network's ``tomoml_config``.
    voxel_size : 3 floats
        Physical voxel size (coordinates are index * voxel_size).

    Returns
    -------
    (tensor, dict)
        Total loss and its parts (floats).

    Examples
    --------
    >>> import torch
    >>> from tomoml_nb.models.embedseg import build_embedseg
    >>> net = build_embedseg({"base": 4, "levels": 2})
    >>> lab = torch.zeros(1, 8, 8, 8, dtype=torch.long); lab[0, 2:6, 2:6, 1:4] = 1; lab[0, 2:6, 2:6, 4:7] = 2
    >>> loss, parts = embedseg_loss(net(torch.rand(1, 1, 8, 8, 8)), lab, net.tomoml_config)
    >>> sorted(parts)
    ['fg', 'inst', 'seed', 'var']
    """
    torch = _torch()
    from .models.embedseg import split_outputs

    off, sig, seed, fg_logit = split_outputs(raw, config["n_sigma"], config["max_offset"], config["sigma_scale"])
    B = raw.shape[0]
    xyz = _coords(raw.shape[2:], voxel_size, raw.device)
    emb = xyz[None] + off
    parts = {"inst": 0.0, "var": 0.0, "seed": 0.0, "fg": 0.0}
    total = raw.new_zeros(())
    for b in range(B):
        lab = labels[b].reshape(-1)
        e = emb[b].reshape(3, -1)                                     # (3, V)
        s = sig[b].reshape(sig.shape[1], -1)                          # (ns, V)
        sd = seed[b, 0].reshape(-1)
        valid = lab >= 0
        fgm = lab > 0
        bg = valid & ~fgm
        ids, inv, counts = torch.unique(lab, return_inverse=True, return_counts=True)
        keep = (ids > 0) & (counts >= min_instance)
        n_inst = int(keep.sum())
        seed_bg = (sd[bg] ** 2).sum()
        inst = raw.new_zeros(())
        var = raw.new_zeros(())
        seed_fg = raw.new_zeros(())
        if n_inst and not raw.is_cuda:
            # CPU: one instance at a time, Lovász over the voxels embedded within 4 sigma of its
            # centre (the others have phi ~ 0, hence no hinge error) -- less work than all voxels
            for k in ids[keep]:
                m = lab == k
                ck = e[:, m].mean(1, keepdim=True)
                sk = s[:, m].mean(1, keepdim=True)
                var = var + ((torch.log(s[:, m]) - torch.log(sk).detach()) ** 2).mean()
                near = (((e.detach() - ck.detach()).abs() <= 4.0 * sk.detach()).all(0) & fgm) | m
                phi = torch.exp(-(((e[:, near] - ck) ** 2) / (2.0 * sk ** 2)).sum(0))
                mk = m[near]
                inst = inst + _lovasz_hinge(2.0 * phi - 1.0, mk.float())
                seed_fg = seed_fg + ((sd[near][mk] - phi[mk].detach()) ** 2).sum()
        elif n_inst:
            # GPU: all instances of the patch at once: K Gaussians over the V voxels, one batched sort
            slot = torch.full((len(ids),), -1, dtype=torch.long, device=raw.device)
            slot[keep] = torch.arange(n_inst, device=raw.device)
            own = slot[inv]                                           # (V,) instance slot or -1
            inside = own >= 0
            oi = own[inside]
            cnt = counts[keep].to(e.dtype)                            # (K,)
            ck = torch.zeros(n_inst, 3, device=raw.device, dtype=e.dtype).index_add_(0, oi, e[:, inside].T)
            ck = ck / cnt[:, None]                                    # (K, 3) mean embeddings
            sk = torch.zeros(n_inst, s.shape[0], device=raw.device, dtype=s.dtype).index_add_(0, oi, s[:, inside].T)
            sk = sk / cnt[:, None]                                    # (K, ns) mean bandwidths
            dev2 = (torch.log(s[:, inside].T) - torch.log(sk).detach()[oi]) ** 2         # (n_in, ns)
            var = (torch.zeros(n_inst, device=raw.device).index_add_(0, oi, dev2.mean(1)) / cnt).sum()
            sk3 = sk.expand(n_inst, 3) if sk.shape[1] == 1 else sk
            fidx = torch.nonzero(fgm).squeeze(1)                       # foreground voxels only
            d2 = (((e[:, fidx][None] - ck[:, :, None]) / sk3[:, :, None]) ** 2).sum(1)   # (K, V_fg)
            phi = torch.exp(-0.5 * d2)
            own_f = own[fidx]
            target = (own_f[None] == torch.arange(n_inst, device=raw.device)[:, None]).to(phi.dtype)
            inst = _lovasz_hinge_rows(2.0 * phi - 1.0, target).sum()
            in_f = own_f >= 0
            phi_own = phi[own_f[in_f], torch.nonzero(in_f).squeeze(1)]
            seed_fg = ((sd[fidx][in_f] - phi_own.detach()) ** 2).sum()
        n_i = max(n_inst, 1)
        n_fg = max(int(fgm.sum()), 1)
        n_bg = max(int(bg.sum()), 1)
        l_seed = seed_fg / n_fg + seed_bg / n_bg
        fgl = fg_logit[b, 0].reshape(-1)[valid]
        tf = fgm[valid].float()
        l_fg = torch.nn.functional.binary_cross_entropy_with_logits(fgl, tf)
        pf = torch.sigmoid(fgl)
        l_fg = l_fg + 1.0 - (2 * (pf * tf).sum() + 1.0) / (pf.sum() + tf.sum() + 1.0)
        loss = w_inst * inst / n_i + w_var * var / n_i + w_seed * l_seed + w_fg * l_fg
        total = total + loss / B
        parts["inst"] += float(inst.detach()) / n_i / B
        parts["var"] += float(var.detach()) / n_i / B
        parts["seed"] += float(l_seed.detach()) / B
        parts["fg"] += float(l_fg.detach()) / B
    return total, parts


def _patch_labels(lab):
    """Instances of a patch = connected pieces of each label inside the patch."""
    from skimage.measure import label as cc_label

    return cc_label(lab, background=0, connectivity=1).astype(np.int64)


class PatchSampler:
    """Random training patches (foreground-centred), with flips/transposes and grey-value jitter.

    Parameters
    ----------
    volumes : list of normalised float32 arrays (z, y, x)
    labels : list of int arrays
    patch_shape : 3 ints
    batch_size : int
    augment : bool
        Flips along every axis, y<->x transposition, gain/offset/noise jitter.
    """

    def __init__(self, volumes, labels, patch_shape, batch_size, augment=True):
        self.vols = volumes
        self.labs = labels
        self.patch = tuple(int(p) for p in patch_shape)
        self.bs = int(batch_size)
        self.augment = augment
        self.fg_idx = [np.flatnonzero(lab > 0) for lab in labels]

    def sample(self, rng):
        xs, ys = [], []
        for _ in range(self.bs):
            i = int(rng.integers(len(self.vols)))
            vol, lab = self.vols[i], self.labs[i]
            P = [min(p, s) for p, s in zip(self.patch, vol.shape)]
            if len(self.fg_idx[i]) and rng.random() < 0.9:
                c = np.unravel_index(self.fg_idx[i][rng.integers(len(self.fg_idx[i]))], vol.shape)
            else:
                c = [rng.integers(s) for s in vol.shape]
            st = [int(np.clip(ci - p // 2 + rng.integers(-p // 4, p // 4 + 1), 0, s - p))
                  for ci, p, s in zip(c, P, vol.shape)]
            sl = tuple(slice(a, a + p) for a, p in zip(st, P))
            x = vol[sl].astype(np.float32)
            y = _patch_labels(lab[sl])
            if self.augment:
                for ax in range(3):
                    if rng.random() < 0.5:
                        flip = (slice(None),) * ax + (slice(None, None, -1),)
                        x, y = x[flip], y[flip]
                if P[1] == P[2] and rng.random() < 0.5:
                    x, y = x.transpose(0, 2, 1), y.transpose(0, 2, 1)
                x = x * rng.uniform(0.85, 1.15) + rng.uniform(-0.1, 0.1)
                if rng.random() < 0.5:
                    x = x + rng.normal(0, rng.uniform(0, 0.05), x.shape).astype(np.float32)
            xs.append(np.ascontiguousarray(x, np.float32))
            ys.append(np.ascontiguousarray(y))
        return xs, ys


def train(volumes, labels, *, model=None, config=None, voxel_size=None, patch_shape=(32, 48, 48),
          batch_size=2, steps=300, lr=2e-3, weight_decay=1e-4, validation=None, val_every=100, device="auto", seed=0,
          progress=True, time_limit=None, checkpoint=None, resume=False, augment=True, loss_weights=None):
    """Train an EmbedSeg network on grey volumes with instance labels.

    Parameters
    ----------
    volumes : list of array_like (z, y, x)
        Grey volumes (normalised here per volume with :func:`normalize`).
    labels : list of array_like of int
        Instance labels (0 = background), same shapes. Instances are re-labelled per patch
        (connected pieces), so a fibre leaving and re-entering a patch is two instances.
    model : network, optional
        Continue training this network (fine-tuning); default: a new one from ``config``.
    config : dict, optional
        Architecture (:data:`tomoml_nb.models.embedseg.DEFAULT_CONFIG` keys).
    voxel_size : 3 floats, optional
        Physical voxel size (anisotropic data); stored with the network.
    patch_shape : 3 ints
        Training patch (multiples of the network's size multiple).
    batch_size, steps, lr, weight_decay
        Optimisation (AdamW, cosine schedule; :func:`tomoml_nb.train.fit`).
    validation : (volume, labels), optional
        Held-out pair; AP@0.5 on it is recorded every ``val_every`` steps.
    device : str
    seed : int
    time_limit : float, optional
        Stop after this many seconds.
    checkpoint, resume
        As in :func:`tomoml_nb.train.fit`.
    loss_weights : dict, optional
        ``w_inst``, ``w_var``, ``w_seed``, ``w_fg`` of :func:`embedseg_loss`.

    Returns
    -------
    torch.nn.Module
        The network, with ``tomoml_history`` (loss, validation) attached.

    Raises
    ------
    ValueError
        ``volumes`` neither a 3D volume nor a list of them; ``labels`` not one per volume, of
        another shape, negative, or without a single instance in any volume; ``patch_shape``
        or ``voxel_size`` invalid.
    TypeError
        ``labels`` not integer.

    Examples
    --------
    >>> from tomoml_nb import phantoms
    >>> ph = phantoms.fibres((32, 48, 48), n_fibres=12, seed=3)
    >>> net = train([ph.image], [ph.labels], config={"base": 4, "levels": 2}, patch_shape=(16, 16, 16),
    ...             steps=2, progress=False, device="cpu")
    >>> len(net.tomoml_history["loss"])
    2
    """
    torch = _torch()
    from .models.embedseg import build_embedseg, size_multiple
    from .train import fit, limit_cpu_threads, resolve_device, seed_everything

    if hasattr(volumes, "ndim") and hasattr(volumes, "shape"):          # one array, not a list of them
        if volumes.ndim != 3:
            raise ValueError(f"volumes: expected a 3D volume (z, y, x) or a list of 3D volumes, got a "
                             f"{volumes.ndim}D array with shape {tuple(volumes.shape)}")
        volumes, labels = [volumes], [labels]
    if len(volumes) == 0 or len(volumes) != len(labels):
        raise ValueError(f"labels: expected one label volume per volume, got {len(labels)} for {len(volumes)}")
    vols, labs = [], []
    for i, (v, lab) in enumerate(zip(volumes, labels)):
        v = _check_volume(v, f"volumes[{i}]")
        lab = as_array(lab, f"labels[{i}]", ndim=3)
        if lab.shape != v.shape:
            raise ValueError(f"labels[{i}]: shape {lab.shape} differs from volumes[{i}] shape {v.shape}")
        if lab.dtype.kind not in "iu":
            raise TypeError(f"labels[{i}]: expected integer instance labels, got dtype {lab.dtype}")
        if lab.min() < 0:
            raise ValueError(f"labels[{i}]: labels must be >= 0 (0 = background), got minimum {int(lab.min())}")
        vols.append(normalize(v))
        labs.append(lab.astype(np.int64))
    if not any(lab.any() for lab in labs):
        raise ValueError("labels: no instance in any training volume (every label is 0 = background); "
                         "the network would learn nothing")

    steps = check_positive(steps, "steps", integer=True)
    batch_size = check_positive(batch_size, "batch_size", integer=True)
    seed_everything(seed)
    net = model if model is not None else build_embedseg(config)
    m = size_multiple(net.tomoml_config)
    patch_shape = _per_axis3(patch_shape, "patch_shape")
    if any(p % m or p < m for p in patch_shape):
        raise ValueError(f"patch_shape: every size must be a positive multiple of {m}, got {patch_shape}")
    vs = _voxel_size(voxel_size)
    net.tomoml_voxel_size = vs
    net.tomoml_window = patch_shape
    if not hasattr(net, "tomoml_cluster"):
        net.tomoml_cluster = dict(CLUSTER_DEFAULTS)
    dev = resolve_device(device)
    sampler = PatchSampler(vols, labs, patch_shape, batch_size, augment=augment)
    weights = dict(loss_weights or {})

    def batches(step, rng):
        xs, ys = sampler.sample(rng)
        shp = tuple(max(x.shape[a] for x in xs) for a in range(3))
        shp = tuple(-(-t // m) * m for t in shp)
        if any(x.shape != shp for x in xs):      # volumes smaller than the patch: pad
            xs = [np.pad(x, [(0, t - s) for s, t in zip(x.shape, shp)]) for x in xs]
            ys = [np.pad(y, [(0, t - s) for s, t in zip(y.shape, shp)], constant_values=-1) for y in ys]
        return torch.from_numpy(np.stack(xs)[:, None]), torch.from_numpy(np.stack(ys))

    def loss_fn(model_, batch):
        x, y = batch
        loss, _ = embedseg_loss(model_(x), y, model_.tomoml_config, voxel_size=vs, **weights)
        return loss

    validate = None
    if validation is not None:
        vx, vy = validation
        vx = _check_volume(vx, "validation")
        vy = as_array(vy, "validation", ndim=3)

        def validate(model_):
            lab = segment_instances(vx, model_, device=dev, progress=False, max_voxels=vx.size)
            from .metrics import match_instances

            return match_instances(lab, vy, 0.5)["ap"]

    with limit_cpu_threads(dev):
        hist = fit(net, batches, loss_fn, steps=steps, lr=lr, weight_decay=weight_decay, validate=validate,
                   val_every=val_every, checkpoint=checkpoint, resume=resume, device=dev, seed=seed,
                   progress=progress, desc="EmbedSeg", time_limit=time_limit)
    net.eval()
    net.tomoml_history = {"loss": [float(v) for v in hist["loss"]], "val": hist["val"], "steps": hist["steps"],
                          "seconds": hist["seconds"], "patch_shape": list(patch_shape), "batch_size": batch_size}
    return net


# --------------------------------------------------------------------------- classical baseline
def watershed_instances(volume, *, threshold=None, smooth=1.0, h=1.0, min_distance=3, voxel_size=None,
                        min_size=20, foreground=None):
    """Distance-transform + marker-watershed instances (the classical baseline).

    Foreground = smoothed volume above ``threshold`` (Otsu when None) or the given
    ``foreground`` mask; markers = h-maxima of the (anisotropic) Euclidean distance
    transform, kept at least ``min_distance`` voxels apart; watershed on the negative
    distance inside the foreground; objects smaller than ``min_size`` are dropped.

    Parameters
    ----------
    volume : array_like (z, y, x)
    threshold : float, optional
        Grey-value threshold (after Gaussian smoothing with ``smooth``).
    smooth : float >= 0
    h : float > 0
        Height of the distance maxima that seed an object (voxels): larger = fewer objects.
    min_distance : int >= 1
    voxel_size : 3 floats, optional
    min_size : int
    foreground : bool array, optional
        Use this mask instead of thresholding.

    Returns
    -------
    ndarray int32

    Examples
    --------
    >>> import numpy as np
    >>> v = np.zeros((20, 20, 40)); v[5:15, 5:15, 3:18] = 1; v[5:15, 5:15, 18:37] = 1   # two touching boxes
    >>> v[5:15, 9:11, 17:19] = 0; v[9:11, 5:15, 17:19] = 0
    >>> int(watershed_instances(v, smooth=0, h=2).max())
    2
    """
    from skimage.filters import threshold_otsu
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    vol = _check_volume(volume)
    check_positive(smooth, "smooth", allow_zero=True)
    check_positive(h, "h")
    min_distance = check_positive(min_distance, "min_distance", integer=True)
    min_size = check_positive(min_size, "min_size", integer=True, allow_zero=True)
    vs = _voxel_size(voxel_size)
    if foreground is None:
        sm = ndi.gaussian_filter(vol.astype(np.float32), smooth) if smooth > 0 else vol.astype(np.float32)
        if threshold is None:
            threshold = float(threshold_otsu(sm))
        fg = sm > threshold
    else:
        fg = as_array(foreground, "foreground", ndim=3).astype(bool)
        if fg.shape != vol.shape:
            raise ValueError(f"foreground: shape {fg.shape} differs from volume shape {vol.shape}")
    if not fg.any():
        return np.zeros(vol.shape, np.int32)
    dist = ndi.distance_transform_edt(fg, sampling=vs).astype(np.float32)
    peaks = h_maxima(dist, h) > 0
    if min_distance > 1:
        peaks &= dist >= ndi.maximum_filter(dist, size=2 * min_distance + 1) - h
    markers, _ = ndi.label(peaks)
    lab = watershed(-dist, markers, mask=fg)
    if min_size:
        sizes = np.bincount(lab.ravel())
        lab[sizes[lab] < min_size] = 0
    return _relabel(lab)


def tune_watershed(volume, labels, *, thresholds=(None,), smooths=(0.5, 1.0), hs=(0.5, 1.0, 1.5, 2.5),
                   min_distances=(1, 3, 5), voxel_size=None, progress=True):
    """Grid search of :func:`watershed_instances` parameters for the best AP@0.5 on a labelled volume.

    Use a validation volume, never the one you report on.

    Returns
    -------
    (dict, float)
        Best keyword arguments and their AP@0.5.

    Examples
    --------
    >>> from tomoml_nb import phantoms
    >>> ph = phantoms.fibres((24, 40, 40), n_fibres=8, seed=5)
    >>> best, ap = tune_watershed(ph.image, ph.labels, hs=(1.0,), min_distances=(3,), progress=False)
    >>> sorted(best)
    ['h', 'min_distance', 'smooth', 'threshold']
    """
    from itertools import product

    from tqdm.auto import tqdm

    from .metrics import match_instances

    vol = _check_volume(volume)
    lab = as_array(labels, "labels", ndim=3)
    best, best_ap = None, -1.0
    grid = list(product(thresholds, smooths, hs, min_distances))
    for thr, sm, h, md in tqdm(grid, desc="watershed grid", disable=not progress):
        kw = dict(threshold=thr, smooth=sm, h=h, min_distance=md)
        ap = match_instances(watershed_instances(vol, voxel_size=voxel_size, **kw), lab, 0.5)["ap"]
        if ap > best_ap:
            best, best_ap = kw, ap
    return best, float(best_ap)


# --------------------------------------------------------------------------- evaluation
def evaluate(pred, truth, *, reference=None):
    """Instance metrics of a prediction: AP@0.5/0.75, mean AP, SEG, VI split/merge, merged/split counts.

    Parameters
    ----------
    pred, truth : int arrays
    reference : int array, optional
        Another prediction (e.g. whole-volume inference); adds ``merged_vs_reference``: how
        many of its objects ``pred`` merged into one.

    Returns
    -------
    dict of floats/ints

    Examples
    --------
    >>> r = evaluate(np.array([0, 1, 1, 2]), np.array([0, 1, 1, 2]))
    >>> r["ap50"], r["merged"]
    (1.0, 0)
    """
    from . import metrics as M

    ap = M.instance_ap(pred, truth)
    split, merge = M.variation_of_information(pred, truth)
    ms = M.merge_split_counts(pred, truth)
    res = {"ap50": float(ap[0]), "ap75": float(ap[5]), "map": float(ap.mean()), "seg": M.seg_score(pred, truth),
           "vi_split": split, "vi_merge": merge, "merged": ms["merged_truth"], "split": ms["split_truth"],
           "n_pred": ms["n_pred"], "n_truth": ms["n_truth"]}
    if reference is not None:
        res["merged_vs_reference"] = M.merge_split_counts(pred, reference)["merged_truth"]
    return res


# --------------------------------------------------------------------------- summaries and plots
def object_sizes(labels, voxel_size=None):
    """Size of every instance (voxels, or physical volume with ``voxel_size``), background excluded.

    Examples
    --------
    >>> object_sizes(np.array([[0, 1, 1], [2, 2, 2]])).tolist()
    [2.0, 3.0]
    """
    lab = as_array(labels, "labels")
    if lab.dtype.kind not in "iu":
        raise TypeError(f"labels: expected integer instance labels, got dtype {lab.dtype}")
    if lab.min() < 0:
        raise ValueError(f"labels: labels must be >= 0 (0 = background), got minimum {int(lab.min())}")
    if voxel_size is not None:
        try:
            vs = np.asarray(voxel_size, np.float64)
        except (TypeError, ValueError):
            vs = np.zeros(0)
        if vs.ndim > 1 or vs.size not in (1, lab.ndim) or not np.all(np.isfinite(vs)) or np.any(vs <= 0):
            raise ValueError(f"voxel_size: expected one or {lab.ndim} positive numbers, got {voxel_size!r}")
    counts = np.bincount(lab.ravel().astype(np.int64))[1:]
    counts = counts[counts > 0].astype(np.float64)
    if voxel_size is not None:
        counts *= float(np.prod(np.broadcast_to(vs.ravel(), (lab.ndim,))))
    return counts


def plot_size_distributions(results, *, voxel_size=None, bins=30, title=None):
    """Histograms (log-spaced bins) of the instance sizes of several segmentations of one volume.

    Parameters
    ----------
    results : dict of {name: int labels}
    voxel_size : 3 floats, optional
        Physical voxel size (then sizes are volumes).
    bins : int
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> lab = np.zeros((8, 8, 8), np.int32); lab[:2] = 1; lab[4:] = 2
    >>> fig = plot_size_distributions({"a": lab, "b": lab})
    >>> len(fig.axes)
    1
    """
    from .viz import _new_figure

    if not isinstance(results, dict) or not results:
        raise ValueError("results: expected a non-empty dict {name: labels}")
    sizes = {k: object_sizes(v, voxel_size) for k, v in results.items()}
    allv = np.concatenate([s for s in sizes.values() if s.size] or [np.ones(1)])
    n_bins = check_positive(bins, "bins", integer=True)
    edges = np.geomspace(max(allv.min(), 1e-9), allv.max() * 1.0001 + 1e-9, n_bins + 1)
    fig = _new_figure(figsize=(6.5, 3.8))
    ax = fig.add_subplot(111)
    for name, s in sizes.items():
        med = np.median(s) if s.size else 0.0
        ax.hist(s, bins=edges, histtype="step", linewidth=1.8, label=f"{name} ({s.size} objects, median {med:.0f})")
    ax.set_xscale("log")
    ax.set_xlabel("object size" + (" (physical volume)" if voxel_size is not None else " (voxels)"))
    ax.set_ylabel("number of objects")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return fig


def metrics_table(results, truth):
    """A markdown table of :func:`evaluate` for several segmentations of one labelled volume.

    Parameters
    ----------
    results : dict of {name: int labels}
    truth : int labels

    Returns
    -------
    str

    Examples
    --------
    >>> t = np.array([0, 1, 1, 2, 2])
    >>> print(metrics_table({"perfect": t}, t).splitlines()[2])
    | perfect | 1.000 | 1.000 | 1.000 | 1.000 | 0.000 | 0.000 | 2 / 2 | 0 | 0 |
    """
    head = ("| method | AP@0.5 | AP@0.75 | mAP | SEG | VI split | VI merge | objects / fibres | merged | split |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name, lab in results.items():
        r = evaluate(lab, truth)
        rows.append(f"| {name} | {r['ap50']:.3f} | {r['ap75']:.3f} | {r['map']:.3f} | {r['seg']:.3f} | "
                    f"{r['vi_split']:.3f} | {r['vi_merge']:.3f} | {r['n_pred']} / {r['n_truth']} | {r['merged']} | "
                    f"{r['split']} |")
    return head + "\n" + "\n".join(rows)


def plot_training(history, *, title="EmbedSeg training"):
    """Loss per step (and validation AP@0.5 when recorded) of :func:`train`'s ``net.tomoml_history``.

    Examples
    --------
    >>> fig = plot_training({"loss": [3.0, 2.5, 2.2, 2.0], "val": [(4, 0.1)]})
    >>> len(fig.axes)
    2
    """
    from .viz import _new_figure

    if not isinstance(history, dict) or not history.get("loss"):
        raise ValueError("history: expected a dict with a non-empty 'loss' list (net.tomoml_history)")
    loss = np.asarray(history["loss"], np.float64)
    fig = _new_figure(figsize=(6.5, 3.2))
    ax = fig.add_subplot(111)
    ax.plot(np.arange(1, len(loss) + 1), loss, color="0.6", lw=0.8, label="loss")
    if len(loss) >= 10:
        k = max(len(loss) // 20, 2)
        sm = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(k, len(loss) + 1), sm, color="C0", lw=1.8, label=f"mean of {k} steps")
    ax.set_xlabel("step")
    ax.set_ylabel("EmbedSeg loss")
    ax.set_title(title)
    ax2 = ax.twinx()
    val = [v for v in history.get("val", []) if isinstance(v, (list, tuple))]
    if val:
        ax2.plot([v[0] for v in val], [v[1] for v in val], "o-", color="C3", label="validation AP@0.5")
    ax2.set_ylabel("validation AP@0.5", color="C3")
    ax.legend(loc="upper right", fontsize=8)
    return fig
