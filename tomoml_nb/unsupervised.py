"""Unsupervised semantic segmentation of tomography: a STEGO-style pipeline without labels.

The pipeline (after Hamilton et al., "Unsupervised semantic segmentation by distilling
feature correspondences", ICLR 2022), rebuilt for greyscale SR-µCT and trained on the
tomography itself because no natural-image backbone can be downloaded:

1. **Backbone** (:class:`~tomoml_nb.models.stego.Backbone`, a small CNN with dense
   features at 1/2 resolution) trained by *dense DINO self-distillation* (teacher centred
   by a running mean or by Sinkhorn-Knopp equipartition, ``centering``)
   (:func:`train_backbone`): a student and an exponential-moving-average teacher see two
   differently augmented views of the same slice crop (grey-level gamma/contrast/offset,
   Gaussian noise, blur, flips and 90° rotations -- all valid for CT) plus smaller local
   crops; per pixel, the student's soft assignment to 128 learned prototypes must predict
   the teacher's centred and sharpened assignment at the same place.
2. **Head** (:func:`train_head`): the STEGO correspondence loss. For random points of a
   crop and of (a) the same crop, (b) one of its k nearest-neighbour crops in backbone
   feature space and (c) a random crop, the head's code correlations are pulled towards
   the backbone's feature correlations minus a shift ``b`` (one shift and one weight per
   term): ``L = -sum w * clamp(code_corr, 0) * (feat_corr - b)``.
3. **Cluster probe** (:func:`fit_probe`): cosine k-means of the head codes
   (``n_clusters >= n_classes`` allowed), or -- ``probe="features"`` -- Euclidean k-means of
   the backbone features themselves, without the head (better on the bone-implant
   validation phantom; see the model card of the shipped weights).
4. **Dense CRF** refinement (:func:`crf_refine`): a torch mean-field CRF with a Gaussian
   and a greyscale bilateral kernel (windowed, runs anywhere), or the fully connected
   permutohedral CRF of the optional ``pydensecrf2`` package.

Classical baselines for the same job: :func:`otsu_segment` (multi-level Otsu) and
:func:`kmeans_segment` (k-means on intensity or on filter features).

Entry points: :func:`fit`, :func:`predict`, :func:`fit_predict`; scores with
:func:`tomoml_nb.metrics.hungarian_miou` (clusters matched to classes).

Examples
--------
>>> from tomoml_nb import phantoms, unsupervised, metrics
>>> ph = phantoms.bone_implant((32, 32, 32), seed=3)
>>> seg = unsupervised.fit(ph.image, 5, head_steps=20, progress=False)
>>> labels = unsupervised.predict(seg, ph.image, progress=False)
>>> labels.shape
(32, 32, 32)
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._validate import as_array, check_choice, check_positive, rng_from

__all__ = [
    "Segmenter", "normalize", "train_backbone", "train_head", "fit_probe", "fit", "predict", "predict_proba",
    "fit_predict", "crf_refine", "crf_available", "soft_labels", "otsu_segment", "kmeans_segment", "filter_features",
    "save_model", "load_model", "load_pretrained", "pretrained_path", "plot_clusters", "score_table",
]

FORMAT = "tomoml_nb.unsupervised.stego/1"
SCRIPT = "scripts/train_stego.py"
PRETRAINED = {"bone_implant": "stego_bone_implant.pt"}
# STEGO loss defaults: (weight, shift) for the self, k-nearest-neighbour and random-negative terms
_MARGIN = 16
LOSS_DEFAULTS = dict(self_weight=0.5, self_shift=0.50, knn_weight=1.0, knn_shift=0.45, rand_weight=1.0,
                     rand_shift=0.75, bandwidth=1.0)


# --------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------
def _robust_range(a, percentiles=(0.5, 99.5), max_samples=1_000_000):
    flat = a.ravel()
    if flat.size > max_samples:
        flat = flat[:: flat.size // max_samples]
    lo, hi = np.percentile(flat, percentiles)
    if hi <= lo:
        lo, hi = float(a.min()), float(a.max())
    return float(lo), float(hi)


def normalize(image, intensity_range=None):
    """Map grey values to about [0, 1] by robust percentiles (0.5 %, 99.5 %), as float32.

    Parameters
    ----------
    image : array_like
        2D image or 3D volume.
    intensity_range : (float, float), optional
        Grey values mapped to 0 and 1 (default: the image's 0.5 and 99.5 percentiles).

    Examples
    --------
    >>> [round(float(v), 2) for v in normalize(np.arange(10.0))[[0, -1]]]
    [-0.01, 1.01]
    """
    a = as_array(image, "image", dtype=np.float32, nonconstant=True)
    lo, hi = _robust_range(a) if intensity_range is None else map(float, intensity_range)
    if not hi > lo:
        raise ValueError(f"intensity_range: expected (low, high) with high > low, got {intensity_range!r}")
    return ((a - lo) / (hi - lo)).astype(np.float32)


def _as_volumes(images, name="images"):
    """List of normalised 3D float32 arrays from an image, a volume or a list of them."""
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError(f"{name}: empty list; pass at least one image or volume")
        items = list(images)
    else:
        items = [images]
    out = []
    for i, im in enumerate(items):
        nm = name if len(items) == 1 else f"{name}[{i}]"
        a = as_array(im, nm, ndim=(2, 3), nonconstant=True)
        if min(a.shape) < 1 or min(a.shape[-2:]) < 8:
            raise ValueError(f"{nm}: each slice must be at least 8 x 8 pixels, got shape {a.shape}")
        a = normalize(a)
        out.append(a[None] if a.ndim == 2 else a)
    return out


def _check_n_classes(n_classes, n_clusters=None):
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)):
        raise TypeError(f"n_classes: expected an integer >= 2, got {n_classes!r}")
    if n_classes < 2:
        raise ValueError(f"n_classes: must be >= 2 (one class needs no segmentation), got {n_classes}")
    if n_clusters is None:
        return int(n_classes), int(n_classes)
    check_positive(n_clusters, "n_clusters", integer=True)
    if n_clusters < n_classes:
        raise ValueError(f"n_clusters: must be >= n_classes ({n_classes}), got {n_clusters}")
    return int(n_classes), int(n_clusters)


# --------------------------------------------------------------------------------------
# crops and augmentations
# --------------------------------------------------------------------------------------
def _random_crops(volumes, n, size, rng, axes=(0, 1, 2)):
    """``n`` random ``size`` x ``size`` crops of slices along random axes, (n, 1, size, size) float32."""
    out = np.empty((n, 1, size, size), np.float32)
    for k in range(n):
        v = volumes[rng.integers(len(volumes))]
        ax = [a for a in axes if v.shape[a] > 1 or v.ndim == 2]
        ax = int(rng.choice(ax)) if v.shape[0] > 1 else 0
        sl = np.take(v, rng.integers(v.shape[ax]), axis=ax)
        ph, pw = max(0, size - sl.shape[0]), max(0, size - sl.shape[1])
        if ph or pw:
            sl = np.pad(sl, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)), mode="reflect")
        y = rng.integers(sl.shape[0] - size + 1)
        x = rng.integers(sl.shape[1] - size + 1)
        out[k, 0] = sl[y:y + size, x:x + size]
    return out


def _gauss_kernel(sigma, dev):
    import torch

    r = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-r, r + 1, device=dev, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _blur(x, sigma):
    import torch.nn.functional as F

    k = _gauss_kernel(sigma, x.device)
    r = k.numel() // 2
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _photometric(x, gen, strength=1.0):
    """Grey-level augmentations valid for CT: gamma, contrast, offset, blur mix, Gaussian noise."""
    import torch

    b = x.shape[0]
    dev = x.device

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand(b, 1, 1, 1, generator=gen, device=dev)

    # grey values carry meaning in CT (attenuation), so level changes stay small; noise and
    # blur (the nuisances of a scan) are strong
    s = strength
    gamma = torch.exp(u(-0.05 * s, 0.05 * s))
    y = x.clamp(-0.5, 2.0)
    y = torch.sign(y) * y.abs() ** gamma
    y = y * u(1 - 0.05 * s, 1 + 0.05 * s) + u(-0.02 * s, 0.02 * s)
    mix = u(0, 1) * (torch.rand(b, 1, 1, 1, generator=gen, device=dev) < 0.5)
    y = (1 - mix) * y + mix * _blur(y, 1.0)
    noise = u(0, 0.05 * s) * torch.randn(x.shape, generator=gen, device=dev)
    return y + noise


def _dihedral(x, k):
    """Apply the k-th of the 8 flips/90-degree rotations to the last two axes."""
    import torch

    if k >= 4:
        x = torch.flip(x, (-1,))
    return torch.rot90(x, k % 4, (-2, -1))


def _dihedral_inv(x, k):
    import torch

    x = torch.rot90(x, -(k % 4), (-2, -1))
    if k >= 4:
        x = torch.flip(x, (-1,))
    return x


# --------------------------------------------------------------------------------------
# 1. backbone: dense DINO self-distillation
# --------------------------------------------------------------------------------------
def _sinkhorn(logits, temp, n_iter=3):
    """Sinkhorn-Knopp equipartition of teacher logits (list of (B, K, h, w)) → list of probabilities.

    Every prototype receives the same total mass over all pixels of the batch, every pixel mass 1.
    """
    import torch

    shapes = [t.shape for t in logits]
    flat = torch.cat([t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]) for t in logits]).float()   # (N, K)
    # per-pixel max subtracted: a per-pixel factor is undone by the column normalisation, and no
    # pixel underflows to all zeros
    q = torch.exp((flat - flat.max(dim=1, keepdim=True).values) / temp).T                       # (K, N)
    q = q / q.sum()
    k, n = q.shape
    for _ in range(n_iter):
        q = q / q.sum(dim=1, keepdim=True).clamp_min(1e-30) / k
        q = q / q.sum(dim=0, keepdim=True).clamp_min(1e-30) / n
    q = (q * n).T
    out, i = [], 0
    for b, kk, h, w in shapes:
        out.append(q[i:i + b * h * w].reshape(b, h, w, kk).permute(0, 3, 1, 2))
        i += b * h * w
    return out


def train_backbone(images, *, net=None, steps=300, crop=64, batch_size=16, n_local=2, n_prototypes=128,
                   teacher_temp=0.04, student_temp=0.1, center_momentum=0.9, ema=(0.99, 0.999), lr=2e-3,
                   width=16, feat_dim=64, code_dim=24, device="auto", seed=0, progress=True, time_limit=None,
                   validate=None, val_every=100, recon_weight=1.0, mask_ratio=0.3, centering="mean"):
    """Train a :class:`~tomoml_nb.models.stego.StegoNet` backbone by dense DINO self-distillation.

    Parameters
    ----------
    images : array_like or list of array_like
        2D slices or 3D volumes (slices along z, y and x are used), no labels.
    net : StegoNet, optional
        Network to continue training (default: a new one with ``width``, ``feat_dim``, ``code_dim``).
    steps : int
        Optimisation steps.
    crop : int
        Size of the two global views (multiple of 8); local views are ``crop // 2``.
    batch_size : int
        Crops per step.
    n_local : int
        Local crops per global crop (student only).
    n_prototypes : int
        Output prototypes of the DINO head.
    teacher_temp, student_temp : float
        Softmax temperatures (the teacher's is lower: sharpening).
    center_momentum : float
        Momentum of the teacher-output centre (centering prevents collapse).
    centering : {"mean", "sinkhorn"}
        ``"mean"``: DINO's running centre subtracted from the teacher logits;
        ``"sinkhorn"``: Sinkhorn-Knopp equipartition of the teacher's pixel-to-prototype
        assignments over the batch (3 iterations, as in SwAV / DINOv2).
    ema : (float, float)
        Teacher EMA momentum at the start and at the end (cosine schedule).
    lr : float
        AdamW learning rate.
    device : str
        ``"auto"`` picks CUDA when available.
    seed : int
        Seed for weights, crops and augmentations.
    time_limit : float, optional
        Stop after this many seconds.
    validate : callable ``(net) -> float``, optional
        Called every ``val_every`` steps with the teacher network (eval mode).

    Returns
    -------
    net : StegoNet
        With the teacher's backbone weights (the head is untouched).
    history : dict
        From :func:`tomoml_nb.train.fit`.

    Examples
    --------
    >>> from tomoml_nb import phantoms
    >>> vol = phantoms.bone_implant((32, 32, 32), seed=1).image
    >>> net, hist = train_backbone(vol, steps=3, crop=32, batch_size=2, progress=False)
    >>> hist["steps"]
    3
    """
    import torch
    from torch import nn
    import torch.nn.functional as F

    from .models.stego import DinoHead, StegoNet
    from .train import fit as train_fit, resolve_device, seed_everything

    vols = _as_volumes(images)
    steps = check_positive(steps, "steps", integer=True)
    crop = check_positive(crop, "crop", integer=True)
    if crop % 8:
        raise ValueError(f"crop: must be a multiple of 8, got {crop}")
    batch_size = check_positive(batch_size, "batch_size", integer=True)
    check_positive(n_local, "n_local", integer=True, allow_zero=True)
    check_choice(centering, "centering", ("mean", "sinkhorn"))
    dev = resolve_device(device)
    seed_everything(seed)
    if net is None:
        net = StegoNet(width=width, feat_dim=feat_dim, code_dim=code_dim)
    student = nn.ModuleDict({"backbone": net.backbone,
                             "dino": DinoHead(net.backbone.feat_dim, n_prototypes=n_prototypes),
                             "decoder": nn.Sequential(nn.Conv2d(net.backbone.feat_dim, 4, 1), nn.PixelShuffle(2))})
    student.to(dev)
    teacher = copy.deepcopy(student).to(dev)
    for p in teacher.parameters():
        p.requires_grad_(False)
    center = torch.zeros(1, n_prototypes, 1, 1, device=dev)
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    state = {"step": 0}

    region = crop + crop // 2          # views are overlapping crops of a larger region: the crop border
    #                                    (and any position code) is not shared by the two views

    def batches(step, rng):
        return torch.from_numpy(_random_crops(vols, batch_size, region, rng))

    def ema_update(step):
        m = ema[1] - (ema[1] - ema[0]) * (math.cos(math.pi * step / steps) + 1) / 2
        with torch.no_grad():
            for pt, ps in zip(teacher.parameters(), student.parameters()):
                pt.mul_(m).add_(ps.detach(), alpha=1 - m)

    def run(mod, x):
        return mod["dino"](mod["backbone"](x))

    def offset(size):
        return int(torch.randint(0, (region - size) // 4 + 1, (1,), generator=gen, device=dev)) * 4

    def view(x, size):
        oy, ox = offset(size), offset(size)
        k = int(torch.randint(0, 8, (1,), generator=gen, device=dev))
        clean = x[..., oy:oy + size, ox:ox + size]
        return (oy // 2, ox // 2, size // 2), _dihedral(_photometric(clean, gen), k), k, clean

    def masked(v):
        """Hide random 8 x 8 patches (filled with the crop mean): the student must infer them from context."""
        if mask_ratio <= 0:
            return v
        b, _, hh, ww = v.shape
        m = torch.rand(b, 1, hh // 8, ww // 8, generator=gen, device=dev) < mask_ratio
        m = F.interpolate(m.float(), scale_factor=8, mode="nearest")
        return v * (1 - m) + m * v.mean(dim=(2, 3), keepdim=True)

    def overlap(a, b):
        """Slices of the feature maps of boxes a and b (y, x, size at feature scale) that overlap."""
        y0, x0 = max(a[0], b[0]), max(a[1], b[1])
        y1, x1 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[2], b[1] + b[2])
        if y1 - y0 < 2 or x1 - x0 < 2:
            return None
        sa = (..., slice(y0 - a[0], y1 - a[0]), slice(x0 - a[1], x1 - a[1]))
        sb = (..., slice(y0 - b[0], y1 - b[0]), slice(x0 - b[1], x1 - b[1]))
        return sa, sb

    def loss_fn(model, x):
        nonlocal center
        if state["step"] > 0:
            ema_update(state["step"])
        state["step"] += 1
        glob = [view(x, crop) for _ in range(2)]
        loc = [view(x, crop // 2) for _ in range(n_local)]
        with torch.no_grad():
            t_out = [_dihedral_inv(run(teacher, v), k) for _, v, k, _ in glob]
            if centering == "sinkhorn":
                t_prob = _sinkhorn(t_out, teacher_temp)
            else:
                t_prob = [F.softmax((t - center) / teacher_temp, dim=1) for t in t_out]
        s_out, recon = [], 0.0
        for n, (box, v, k, clean) in enumerate(glob + loc):
            f = model["backbone"](masked(v) if n < 2 else v)
            s_out.append((box, _dihedral_inv(model["dino"](f), k)))
            if recon_weight > 0 and n < 2:
                # denoise/inpaint: predict the clean crop (before noise, blur, masking) from the features
                recon = recon + F.mse_loss(_dihedral_inv(model["decoder"](f), k), clean) / 2
        loss, n_terms = 0.0, 0
        for i, (box_s, s) in enumerate(s_out):
            logp = F.log_softmax(s / student_temp, dim=1)
            for j, (box_t, _, _, _) in enumerate(glob):
                if i == j:
                    continue
                ov = overlap(box_s, box_t)
                if ov is None:
                    continue
                loss = loss - (t_prob[j][ov[1]] * logp[ov[0]]).sum(1).mean()
                n_terms += 1
        loss = loss / max(n_terms, 1) + recon_weight * recon / 0.01 ** 2 * 1e-2
        with torch.no_grad():
            batch_center = torch.cat(t_out).mean(dim=(0, 2, 3), keepdim=True)
            center = center * center_momentum + batch_center * (1 - center_momentum)
        return loss

    val = None
    if validate is not None:
        def val(_model):
            snapshot = copy.deepcopy(net)      # net.backbone is the student's: never overwrite it here
            snapshot.backbone.load_state_dict(teacher["backbone"].state_dict())
            snapshot.eval()
            return validate(snapshot)

    hist = train_fit(student, batches, loss_fn, steps=steps, lr=lr, weight_decay=0.04, device=dev, seed=seed,
                     progress=progress, desc="DINO backbone", time_limit=time_limit, validate=val,
                     val_every=val_every)
    net.backbone.load_state_dict(teacher["backbone"].state_dict())
    net.to(dev).eval()
    return net, hist


# --------------------------------------------------------------------------------------
# 2. head: STEGO correspondence distillation
# --------------------------------------------------------------------------------------
def _features(net, crops, dev, batch_size=32):
    import torch

    out = []
    net.eval()
    with torch.no_grad():
        for i in range(0, len(crops), batch_size):
            x = torch.as_tensor(crops[i:i + batch_size]).to(dev)
            out.append(net.backbone(x))
    return torch.cat(out)


def _knn(feats, k):
    import torch
    import torch.nn.functional as F

    g = F.normalize(F.normalize(feats, dim=1).mean(dim=(2, 3)), dim=1)
    sim = g @ g.T
    sim.fill_diagonal_(-2)
    return sim.topk(min(k, len(g) - 1), dim=1).indices


def _corr(a, b):
    import torch
    import torch.nn.functional as F

    return torch.einsum("bcn,bcm->bnm", F.normalize(a, dim=1), F.normalize(b, dim=1))


def _feature_affinity(f1, f2, bandwidth):
    """Gaussian-kernel affinity of feature vectors (B, C, N) x (B, C, M) → (B, N, M) in (0, 1].

    STEGO correlates backbone features by cosine similarity, which suits the high-dimensional
    features of a ViT; for a small CNN whose features include a few grey-level channels the cosine
    of centred vectors confuses "dark" with "darker" (same direction), so the affinity here is a
    Gaussian kernel of the Euclidean distance, ``exp(-d^2 / (2 bandwidth^2 median(d^2)))``.
    """
    import torch

    d2 = torch.cdist(f1.transpose(1, 2), f2.transpose(1, 2)).pow(2)
    scale = d2.detach().median().clamp_min(1e-6)
    return torch.exp(-d2 / (2 * bandwidth ** 2 * scale))


def _stego_term(f1, f2, c1, c2, shift, bandwidth=0.5):
    fd = _feature_affinity(f1, f2, bandwidth)
    fd = fd - fd.mean(dim=2, keepdim=True) + fd.mean()      # "pointwise" centring of STEGO
    cd = _corr(c1, c2)
    return -(cd.clamp(min=0) * (fd - shift)).mean()


def train_head(net, images, *, steps=400, crop=64, pool_size=256, batch_size=16, n_points=121, knn=7, lr=5e-4,
               self_weight=None, self_shift=None, knn_weight=None, knn_shift=None, rand_weight=None,
               rand_shift=None, bandwidth=None, device="auto", seed=0, progress=True, time_limit=None, reset=True):
    """Train the STEGO segmentation head on frozen backbone features.

    The correspondence loss for a pair of crops ``(x, y)`` at ``n_points`` random
    points is ``-mean(clamp(C_code, 0) * (C_feat - b))``, where ``C`` are cosine
    correlation matrices between the points of ``x`` and ``y`` (head codes and
    backbone features) and ``C_feat`` is centred per point. It is applied with
    ``y = x`` (self), ``y`` = one of the ``knn`` nearest crops in backbone feature
    space (positive neighbours) and ``y`` = a random crop (negatives); each term has
    its weight and shift ``b`` (defaults in :data:`LOSS_DEFAULTS`). A high shift
    pushes codes apart, a low one pulls them together.

    Parameters
    ----------
    net : StegoNet
        Network with a trained backbone (kept frozen).
    images : array_like or list
        Unlabelled 2D slices or 3D volumes.
    steps, crop, pool_size, batch_size : int
        Steps, crop size, number of crops in the pool (features precomputed once), crops per step.
    n_points : int
        Random points per crop (a square number is not needed).
    knn : int
        Nearest neighbours per crop for the positive term.
    self_weight, self_shift, knn_weight, knn_shift, rand_weight, rand_shift : float, optional
        Loss weights and shifts (``None``: :data:`LOSS_DEFAULTS`).
    reset : bool
        Re-initialise the head before training.

    Returns
    -------
    net : StegoNet
    history : dict

    Examples
    --------
    >>> from tomoml_nb import phantoms
    >>> from tomoml_nb.models.stego import StegoNet
    >>> vol = phantoms.bone_implant((32, 32, 32), seed=1).image
    >>> net, hist = train_head(StegoNet(), vol, steps=3, crop=32, pool_size=8, batch_size=4, progress=False)
    >>> hist["steps"]
    3
    """
    import torch
    import torch.nn.functional as F

    from .models.stego import SegmentationHead
    from .train import fit as train_fit, resolve_device, seed_everything

    vols = _as_volumes(images)
    steps = check_positive(steps, "steps", integer=True)
    crop = check_positive(crop, "crop", integer=True)
    if crop % 4:
        raise ValueError(f"crop: must be a multiple of 4, got {crop}")
    pool_size = check_positive(pool_size, "pool_size", integer=True)
    if pool_size < 3:
        raise ValueError(f"pool_size: need at least 3 crops, got {pool_size}")
    batch_size = check_positive(batch_size, "batch_size", integer=True)
    n_points = check_positive(n_points, "n_points", integer=True)
    knn = check_positive(knn, "knn", integer=True)
    w = dict(LOSS_DEFAULTS)
    for k, v in dict(self_weight=self_weight, self_shift=self_shift, knn_weight=knn_weight, knn_shift=knn_shift,
                     rand_weight=rand_weight, rand_shift=rand_shift, bandwidth=bandwidth).items():
        if v is not None:
            if not np.isfinite(v):
                raise ValueError(f"{k}: must be finite, got {v!r}")
            w[k] = float(v)
    dev = resolve_device(device)
    seed_everything(seed)
    rng = rng_from(seed)
    net.to(dev)
    if reset:
        net.head = SegmentationHead(net.backbone.feat_dim, net.config["code_dim"]).to(dev)
    pool = _random_crops(vols, pool_size, crop, rng)
    feats = _features(net, pool, dev)                       # (P, D, h, w), frozen
    # standardise the features over the pool: the correlations of raw (post-activation) features are
    # all close to 1, and the shifts b of the loss are then meaningless
    # (centred per channel, one common scale: the relative weight of the channels is kept)
    mu = feats.mean(dim=(0, 2, 3), keepdim=True)
    sd = (feats - mu).pow(2).mean().sqrt().clamp_min(1e-6)
    feats = (feats - mu) / sd
    nn_idx = _knn(feats, knn)
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    for p in net.backbone.parameters():
        p.requires_grad_(False)

    def batches(step, r):
        i = torch.from_numpy(r.integers(0, pool_size, batch_size))
        j = nn_idx[i.to(nn_idx.device), torch.from_numpy(r.integers(0, nn_idx.shape[1], batch_size)).to(nn_idx.device)]
        n = torch.from_numpy(r.integers(0, pool_size, batch_size))
        return i, j.cpu(), n

    def sample(f, coords):
        return F.grid_sample(f, coords, mode="bilinear", align_corners=False).flatten(2)

    def loss_fn(model, batch):
        i, j, n = batch
        fi, fj, fn = feats[i], feats[j], feats[n]
        coords = [torch.rand(len(i), 1, n_points, 2, generator=gen, device=dev) * 2 - 1 for _ in range(3)]
        head = model.head
        ci, cj, cn = head(fi * sd + mu), head(fj * sd + mu), head(fn * sd + mu)
        si, sj, sn = (sample(fi, coords[0]), sample(fj, coords[1]), sample(fn, coords[2]))
        ki, kj, kn = (sample(ci, coords[0]), sample(cj, coords[1]), sample(cn, coords[2]))
        loss = w["self_weight"] * _stego_term(si, si, ki, ki, w["self_shift"], w["bandwidth"])
        loss = loss + w["knn_weight"] * _stego_term(si, sj, ki, kj, w["knn_shift"], w["bandwidth"])
        loss = loss + w["rand_weight"] * _stego_term(si, sn, ki, kn, w["rand_shift"], w["bandwidth"])
        return loss

    try:
        hist = train_fit(net, batches, loss_fn, steps=steps, lr=lr, device=dev, seed=seed, progress=progress,
                         desc="STEGO head", time_limit=time_limit)
    finally:
        for p in net.backbone.parameters():
            p.requires_grad_(True)
    hist["loss_weights"] = w
    net.eval()
    return net, hist


# --------------------------------------------------------------------------------------
# 3. cluster probe: cosine k-means on head codes
# --------------------------------------------------------------------------------------
def _codes_for(net, vols, dev, axes=(0,), batch_size=16, space="codes"):
    """Head codes of full slices (unit norm), upsampled to full resolution: returns a list per volume.

    ``space="features"``: the backbone features instead (not normalised).
    """
    import torch
    import torch.nn.functional as F

    out = []
    net.eval()
    with torch.no_grad():
        for v in vols:
            per_axis = []
            for ax in axes:
                sl = np.moveaxis(v, ax, 0)
                H, W = sl.shape[1:]
                # a reflected margin keeps the image border away from the features of the image
                m = min(_MARGIN, H - 1, W - 1)
                ph, pw = (-(H + 2 * m)) % 4, (-(W + 2 * m)) % 4
                codes = []
                for s in range(0, sl.shape[0], batch_size):
                    x = torch.from_numpy(np.ascontiguousarray(sl[s:s + batch_size]))[:, None].to(dev)
                    x = F.pad(x, (m, m, m, m), mode="reflect")
                    if ph or pw:
                        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
                    f = net.backbone(x)
                    c = f if space == "features" else net.head(f)
                    c = F.interpolate(c, scale_factor=2, mode="bilinear", align_corners=False)[..., m:m + H, m:m + W]
                    codes.append(c if space == "features" else F.normalize(c, dim=1))
                per_axis.append((ax, torch.cat(codes)))        # (n_slices, C, H, W) along ax
            out.append(per_axis)
    return out


def _spherical_kmeans(x, k, rng, n_init=4, iters=40):
    """Cosine k-means on unit vectors ``x`` (N, C) → centroids (k, C) (numpy)."""
    best, best_score = None, -np.inf
    for _ in range(n_init):
        # k-means++ on cosine distance
        c = [x[rng.integers(len(x))]]
        for _ in range(1, k):
            d = np.clip(1 - np.max(x @ np.stack(c).T, axis=1), 0, None)
            p = d / d.sum() if d.sum() > 0 else None
            c.append(x[rng.choice(len(x), p=p)])
        c = np.stack(c)
        for _ in range(iters):
            a = np.argmax(x @ c.T, axis=1)
            new = np.stack([x[a == j].sum(0) if np.any(a == j) else c[j] for j in range(k)])
            new /= np.maximum(np.linalg.norm(new, axis=1, keepdims=True), 1e-12)
            if np.allclose(new, c, atol=1e-6):
                c = new
                break
            c = new
        score = float(np.max(x @ c.T, axis=1).sum())
        if score > best_score:
            best, best_score = c, score
    return best


def _sample_slices(vols, max_slices, rng):
    """Up to ``max_slices`` slices, evenly spread over the volumes and the three axes, as (n, H, W) stacks."""
    per = max(1, max_slices // (3 * len(vols)))
    out = []
    for v in vols:
        for ax in ((0,) if v.shape[0] == 1 else (0, 1, 2)):
            n = v.shape[ax]
            idx = np.unique(np.linspace(0, n - 1, min(per, n)).round().astype(int))
            out.append(np.ascontiguousarray(np.moveaxis(np.take(v, idx, axis=ax), ax, 0)))
    return out


def fit_probe(net, images, n_clusters, *, n_samples=60000, max_slices=48, device="auto", seed=0, n_init=4,
              space="codes", return_temperature=False):
    """Cluster probe: k-means centroids of the head codes (cosine) or of the backbone features (Euclidean).

    Parameters
    ----------
    space : {"codes", "features"}
        ``"codes"``: cosine k-means of the unit-norm head codes, centroids ``(n_clusters, code_dim)``
        (STEGO's cluster probe). ``"features"``: Euclidean k-means of the backbone features
        themselves, centroids ``(n_clusters, feat_dim)``; the head is not used.
    return_temperature : bool
        Also return the temperature of the probabilities: 0.05 for codes; for features the
        median squared distance of the sampled pixels to their nearest centroid.

    Examples
    --------
    >>> from tomoml_nb import phantoms
    >>> from tomoml_nb.models.stego import StegoNet
    >>> c = fit_probe(StegoNet(), phantoms.bone_implant((32, 32, 32), seed=1).image, 3)
    >>> c.shape
    (3, 24)
    """
    from .train import resolve_device

    vols = _as_volumes(images)
    n_clusters = check_positive(n_clusters, "n_clusters", integer=True)
    check_choice(space, "space", ("codes", "features"))
    dev = resolve_device(device)
    rng = rng_from(seed)
    net.to(dev)
    codes = []
    for per_axis in _codes_for(net, _sample_slices(vols, max_slices, rng), dev, space=space):
        c = per_axis[0][1]
        codes.append(c.permute(0, 2, 3, 1).reshape(-1, c.shape[1]).cpu().numpy())
    x = np.concatenate(codes)
    if len(x) < n_clusters:
        raise ValueError(f"images: {len(x)} pixels cannot make {n_clusters} clusters")
    x = x[rng.choice(len(x), min(n_samples, len(x)), replace=False)].astype(np.float64)
    if space == "codes":
        cen = _spherical_kmeans(x, n_clusters, rng, n_init=n_init).astype(np.float32)
        return (cen, 0.05) if return_temperature else cen
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters, n_init=n_init, random_state=int(rng.integers(2 ** 31))).fit(x)
    cen = km.cluster_centers_
    d2 = ((x[:, None, :] - cen[None]) ** 2).sum(-1).min(1)
    temp = float(max(np.median(d2), 1e-6))
    cen = cen.astype(np.float32)
    return (cen, temp) if return_temperature else cen


# --------------------------------------------------------------------------------------
# the fitted segmenter
# --------------------------------------------------------------------------------------
@dataclass(eq=False)
class Segmenter:
    """A fitted unsupervised segmenter: backbone + head (``net``) and cluster probe (``centroids``).

    Attributes
    ----------
    net : StegoNet
    centroids : ndarray (n_clusters, code_dim)
        Unit-norm cluster centres in head-code space.
    n_classes : int
        Classes the user asked for; ``n_clusters >= n_classes``.
    temperature : float
        Softmax temperature turning cosine similarities (codes) or ``-squared distances / 2``
        (features) into cluster probabilities.
    space : {"codes", "features"}
        Where the probe lives: the head codes (cosine, STEGO) or the backbone features (Euclidean).
    history : dict
        Training summaries.
    """

    net: object
    centroids: np.ndarray
    n_classes: int
    temperature: float = 0.05
    history: dict = field(default_factory=dict)
    space: str = "codes"

    @property
    def n_clusters(self):
        return int(len(self.centroids))

    def __repr__(self):
        return (f"Segmenter(n_classes={self.n_classes}, n_clusters={self.n_clusters}, probe={self.space!r}, "
                f"config={self.net.config})")


def _tag(net, space):
    net._probe_space = space          # plain attribute (not saved): the probe space of the source segmenter
    return net


def _resolve_net(backbone):
    from .models.stego import StegoNet

    if isinstance(backbone, Segmenter):
        return _tag(copy.deepcopy(backbone.net), backbone.space)
    if isinstance(backbone, StegoNet):
        return copy.deepcopy(backbone)
    if isinstance(backbone, str):
        if backbone in PRETRAINED:
            seg = load_pretrained(backbone)
            return _tag(seg.net, seg.space)
        if backbone == "train":
            return None
        if Path(backbone).suffix == ".pt":
            seg = load_model(backbone)
            return _tag(seg.net, seg.space)
        raise ValueError(f"backbone: unknown value {backbone!r}; use 'train', "
                         f"{', '.join(map(repr, PRETRAINED))}, a .pt path, a Segmenter or a StegoNet")
    raise TypeError(f"backbone: expected a string, a Segmenter or a StegoNet, got {type(backbone).__name__}")


def fit(images, n_classes, *, n_clusters=None, backbone="bone_implant", backbone_steps=300, head_steps=300,
        crop=64, batch_size=16, pool_size=256, train_head_=True, device="auto", seed=0, progress=True,
        loss=None, probe="auto"):
    """Fit an unsupervised segmenter (backbone + STEGO head + cluster probe) on unlabelled data.

    Parameters
    ----------
    images : array_like or list of array_like
        Greyscale 2D slices or 3D volumes; no labels.
    n_classes : int >= 2
        Number of classes wanted.
    n_clusters : int, optional
        Clusters of the probe (``>= n_classes``; default ``n_classes``).
    backbone : str, Segmenter or StegoNet
        ``"bone_implant"`` (shipped weights, self-supervised on unlabelled bone-implant
        phantoms), a ``.pt`` file, an existing network, or ``"train"`` to train one from
        scratch on ``images``
        with DINO self-distillation for ``backbone_steps`` steps.
    backbone_steps, head_steps : int
        Training steps of the backbone (only with ``backbone="train"``) and of the head.
    crop, batch_size, pool_size : int
        Crop size, crops per step, crops in the head's kNN pool.
    train_head_ : bool
        Retrain the head on ``images`` (``False``: keep the head of ``backbone`` and only
        fit the cluster probe).
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``.
    seed : int
        Everything is deterministic for a given seed (on one device).
    loss : dict, optional
        STEGO loss weights/shifts (keys of :data:`LOSS_DEFAULTS`).
    probe : {"auto", "codes", "features"}
        ``"codes"``: STEGO -- train the head, then cosine k-means of its codes.
        ``"features"``: Euclidean k-means of the backbone features directly (no head is
        trained; ``head_steps``, ``loss`` and ``train_head_`` are ignored). ``"auto"``: the
        probe space of ``backbone`` when it is a segmenter (the shipped ``"bone_implant"``
        one uses ``"features"``, which scored higher than the STEGO head on its validation
        phantoms -- see the model card), else ``"codes"``.

    Returns
    -------
    Segmenter

    Examples
    --------
    >>> from tomoml_nb import phantoms
    >>> seg = fit(phantoms.bone_implant((32, 32, 32), seed=3).image, 5, head_steps=10, progress=False)
    >>> seg.n_clusters
    5
    """
    from .train import limit_cpu_threads, resolve_device

    n_classes, n_clusters = _check_n_classes(n_classes, n_clusters)
    check_choice(probe, "probe", ("auto", "codes", "features"))
    vols = _as_volumes(images)
    dev = resolve_device(device)
    loss = dict(loss or {})
    unknown = set(loss) - set(LOSS_DEFAULTS)
    if unknown:
        raise ValueError(f"loss: unknown key(s) {sorted(unknown)}; use {sorted(LOSS_DEFAULTS)}")
    history = {}
    t0 = time.perf_counter()
    with limit_cpu_threads(dev):
        net = _resolve_net(backbone)
        if probe == "auto":
            probe = getattr(net, "_probe_space", "codes")
        if net is None:
            net, h = train_backbone(vols, steps=backbone_steps, crop=crop, batch_size=batch_size, device=dev,
                                    seed=seed, progress=progress)
            history["backbone"] = {"steps": h["steps"], "seconds": h["seconds"], "loss": h["loss"][-1]}
        if train_head_ and probe == "codes":
            net, h = train_head(net, vols, steps=head_steps, crop=crop, pool_size=pool_size,
                                batch_size=batch_size, device=dev, seed=seed, progress=progress, **loss)
            history["head"] = {"steps": h["steps"], "seconds": h["seconds"], "loss": h["loss"][-1],
                               "loss_weights": h["loss_weights"]}
        centroids, temp = fit_probe(net, vols, n_clusters, device=dev, seed=seed, space=probe,
                                    return_temperature=True)
    history["seconds"] = time.perf_counter() - t0
    history["probe"] = probe
    return Segmenter(net.to("cpu").eval(), centroids, n_classes, temp, history=history, space=probe)


def _check_segmenter(segmenter):
    if isinstance(segmenter, str):
        return load_pretrained(segmenter) if segmenter in PRETRAINED else load_model(segmenter)
    if not isinstance(segmenter, Segmenter):
        raise TypeError(f"segmenter: expected a Segmenter (from fit or load_model), got {type(segmenter).__name__}")
    return segmenter


def predict_proba(segmenter, images_or_volume, *, axes=("z",), batch_size=16, device="auto", progress=True):
    """Cluster probabilities ``(n_clusters, *shape)`` of a 2D image or 3D volume (no CRF).

    Slices along each of ``axes`` go through backbone and head; the codes are
    upsampled to full resolution, compared with the centroids (cosine) and turned
    into probabilities with a softmax at ``segmenter.temperature``; several axes are
    averaged.

    Examples
    --------
    >>> from tomoml_nb import phantoms
    >>> vol = phantoms.bone_implant((32, 32, 32), seed=3).image
    >>> seg = fit(vol, 3, head_steps=5, progress=False)
    >>> predict_proba(seg, vol, progress=False).shape
    (3, 32, 32, 32)
    """
    import torch
    from tqdm.auto import tqdm

    from .train import limit_cpu_threads, resolve_device

    from .segment import _check_axes

    seg = _check_segmenter(segmenter)
    arr = as_array(images_or_volume, "images_or_volume", ndim=(2, 3), nonconstant=True)
    if min(arr.shape[-2:]) < 8:
        raise ValueError(f"images_or_volume: slices must be at least 8 x 8 pixels, got shape {arr.shape}")
    is2d = arr.ndim == 2
    axes = ("z",) if is2d else _check_axes(axes)
    vol = normalize(arr)
    vol = vol[None] if is2d else vol
    dev = resolve_device(device)
    net = seg.net.to(dev).eval()
    cen = torch.as_tensor(seg.centroids, device=dev)
    prob = np.zeros((seg.n_clusters,) + vol.shape, np.float32)
    with limit_cpu_threads(dev), torch.no_grad():
        for a in tqdm(axes, desc="predict", disable=not progress):
            ax = "zyx".index(a)
            (_, codes), = _codes_for(net, [vol], dev, axes=(ax,), batch_size=batch_size, space=seg.space)[0]
            if seg.space == "features":
                d2 = torch.stack([(codes - c[None, :, None, None]).pow(2).sum(1) for c in cen])   # (K, n, H, W)
                logits = -d2 / (2 * seg.temperature)
            else:
                logits = torch.einsum("nchw,kc->knhw", codes, cen) / seg.temperature
            p = torch.softmax(logits, dim=0).cpu().numpy()
            prob += np.moveaxis(p, 1, ax + 1)
    prob /= len(axes)
    seg.net.to("cpu")
    return prob[:, 0] if is2d else prob


def predict(segmenter, images_or_volume, crf=True, *, axes=("z",), crf_method="auto", crf_params=None,
            batch_size=16, device="auto", progress=True):
    """Label a 2D image or 3D volume with a fitted segmenter (cluster ids ``0..n_clusters-1``).

    Parameters
    ----------
    segmenter : Segmenter or str
        From :func:`fit`, :func:`load_model`, or a shipped name (``"bone_implant"``).
    images_or_volume : array_like
        2D image or 3D volume (greyscale).
    crf : bool
        Refine with a dense CRF (:func:`crf_refine`).
    axes : tuple of {"z", "y", "x"}
        Slice directions whose probabilities are averaged (3D only; at least one, no repeats).
    crf_method : {"auto", "torch", "pydensecrf"}
        ``"auto"`` = the torch mean-field CRF (see :func:`crf_refine` for why).
    crf_params : dict, optional
        Extra arguments for :func:`crf_refine`, keys among :data:`CRF_PARAMS`
        (``n_iter``, ``sxy_gauss``, ``w_gauss``, ``sxy_bilateral``, ``s_intensity``,
        ``w_bilateral``, ``window``, ``batch``).

    Returns
    -------
    ndarray of uint8
        Cluster labels, same shape as the input. Cluster ids are arbitrary; match
        them to classes with :func:`tomoml_nb.metrics.hungarian_match`.

    Raises
    ------
    ValueError
        ``axes`` empty, repeated or not among "z", "y", "x"; unknown ``crf_method``;
        unknown key in ``crf_params``.

    Examples
    --------
    >>> from tomoml_nb import phantoms
    >>> vol = phantoms.bone_implant((32, 32, 32), seed=3).image
    >>> seg = fit(vol, 3, head_steps=5, progress=False)
    >>> predict(seg, vol[0], progress=False).shape
    (32, 32)
    """
    check_choice(crf_method, "crf_method", ("auto", "torch", "pydensecrf"))
    crf_params = _check_crf_params(crf_params)
    prob = predict_proba(segmenter, images_or_volume, axes=axes, batch_size=batch_size, device=device,
                         progress=progress)
    if crf:
        return crf_refine(prob, images_or_volume, method=crf_method, device=device, **crf_params)
    return prob.argmax(0).astype(np.uint8)


#: Keys of ``predict(crf_params=...)``: the tuning arguments of :func:`crf_refine`.
CRF_PARAMS = ("n_iter", "sxy_gauss", "w_gauss", "sxy_bilateral", "s_intensity", "w_bilateral", "window", "batch")


def _check_crf_params(crf_params):
    if crf_params is None:
        return {}
    if not isinstance(crf_params, dict):
        raise TypeError(f"crf_params: expected a dict of crf_refine arguments, got {type(crf_params).__name__}")
    unknown = [k for k in crf_params if k not in CRF_PARAMS]
    if unknown:
        raise ValueError(f"crf_params: unknown key(s) {', '.join(map(repr, unknown))}; allowed keys: "
                         f"{', '.join(CRF_PARAMS)} (method and device are predict's crf_method and device)")
    return dict(crf_params)


def fit_predict(images, n_classes, *, crf=True, seed=0, progress=True, **kwargs):
    """:func:`fit` on ``images`` then :func:`predict` on the same data (one call).

    ``images`` must be one 2D image or one 3D volume; ``kwargs`` go to :func:`fit`.

    Examples
    --------
    >>> from tomoml_nb import phantoms
    >>> vol = phantoms.bone_implant((32, 32, 32), seed=3).image
    >>> fit_predict(vol, 3, head_steps=5, progress=False).shape
    (32, 32, 32)
    """
    if isinstance(images, (list, tuple)):
        raise TypeError("images: fit_predict takes one image or volume; use fit() then predict() for a list")
    seg = fit(images, n_classes, seed=seed, progress=progress, **kwargs)
    return predict(seg, images, crf=crf, device=kwargs.get("device", "auto"), progress=progress)


# --------------------------------------------------------------------------------------
# 4. dense CRF
# --------------------------------------------------------------------------------------
def crf_available():
    """True when the optional ``pydensecrf2`` package (module ``pydensecrf``) can be imported.

    Examples
    --------
    >>> isinstance(crf_available(), bool)
    True
    """
    try:
        import pydensecrf.densecrf  # noqa: F401
    except Exception:
        return False
    return True


def _crf_torch(prob, image, n_iter, sxy_gauss, w_gauss, sxy_bilateral, s_intensity, w_bilateral, window,
               dev, batch):
    """Windowed mean-field CRF (Potts) on 2D slices: Gaussian + bilateral (greyscale) kernels."""
    import torch
    import torch.nn.functional as F

    K, Z, H, W = prob.shape
    r = window // 2
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    d2 = torch.as_tensor((dy ** 2 + dx ** 2).ravel(), dtype=torch.float32, device=dev)   # (w*w,)
    g_sp = torch.exp(-d2 / (2 * sxy_gauss ** 2))
    b_sp = torch.exp(-d2 / (2 * sxy_bilateral ** 2))
    centre = (d2 == 0)
    g_sp[centre] = 0
    b_sp[centre] = 0
    out = np.empty((Z, H, W), np.uint8)
    for s in range(0, Z, batch):
        img = torch.as_tensor(image[s:s + batch], device=dev)[:, None]             # (b,1,H,W)
        b = img.shape[0]
        nb = F.unfold(F.pad(img, (r, r, r, r), mode="replicate"), window)          # (b, w*w, H*W)
        diff2 = (nb - img.flatten(2)) ** 2
        kern = w_gauss * g_sp[None, :, None] + w_bilateral * b_sp[None, :, None] * torch.exp(
            -diff2 / (2 * s_intensity ** 2))                                       # (b, w*w, H*W)
        p = torch.as_tensor(prob[:, s:s + b], device=dev).permute(1, 0, 2, 3)      # (b,K,H,W)
        unary = torch.log(p.clamp_min(1e-6))
        q = p
        for _ in range(n_iter):
            qn = F.unfold(F.pad(q, (r, r, r, r), mode="replicate"), window).view(b, K, window * window, H * W)
            msg = (qn * kern[:, None]).sum(2).view(b, K, H, W)
            q = torch.softmax(unary + msg, dim=1)
        out[s:s + b] = q.argmax(1).to(torch.uint8).cpu().numpy()
    return out


def _crf_dense(prob, image, n_iter, sxy_gauss, w_gauss, sxy_bilateral, s_intensity, w_bilateral):
    """Fully connected CRF of pydensecrf2 on the whole 2D image or 3D volume (permutohedral lattice)."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import create_pairwise_bilateral, create_pairwise_gaussian

    K = prob.shape[0]
    shape = prob.shape[1:]
    n = int(np.prod(shape))
    d = dcrf.DenseCRF(n, K)
    d.setUnaryEnergy(np.ascontiguousarray(-np.log(np.clip(prob.reshape(K, n), 1e-6, None)), dtype=np.float32))
    d.addPairwiseEnergy(create_pairwise_gaussian(sdims=(sxy_gauss,) * len(shape), shape=shape).astype(np.float32),
                        compat=float(w_gauss))
    d.addPairwiseEnergy(create_pairwise_bilateral(sdims=(sxy_bilateral,) * len(shape), schan=(s_intensity,),
                                                  img=image.astype(np.float32), chdim=-1).astype(np.float32),
                        compat=float(w_bilateral))
    q = np.array(d.inference(n_iter)).reshape((K,) + shape)
    return q.argmax(0).astype(np.uint8)


def crf_refine(prob, image, *, method="auto", n_iter=5, sxy_gauss=1.5, w_gauss=1.0, sxy_bilateral=4.0,
               s_intensity=0.08, w_bilateral=2.0, window=9, device="auto", batch=16):
    """Dense CRF refinement of cluster probabilities with a greyscale image.

    Mean-field inference of a Potts CRF whose pairwise kernels are a Gaussian in
    space (``sxy_gauss`` pixels, weight ``w_gauss``: smoothness) and a bilateral one
    in space and grey value (``sxy_bilateral`` pixels, ``s_intensity`` in normalised
    grey units, weight ``w_bilateral``: labels follow edges).

    Parameters
    ----------
    prob : ndarray (K, [Z,] H, W)
        Probabilities (e.g. from :func:`predict_proba`).
    image : ndarray ([Z,] H, W)
        The greyscale image (normalised internally by robust percentiles).
    method : {"auto", "torch", "pydensecrf"}
        ``"torch"``: windowed (``window`` x ``window``) mean field on 2D slices along z,
        any device, no extra dependency. ``"pydensecrf"``: the fully connected
        permutohedral-lattice CRF of the optional ``pydensecrf2`` package, 2D or full
        3D. ``"auto"`` = ``"torch"``: on the held-out phantoms of
        ``benchmarks/unsupervised.py`` it raised the mean IoU by about 0.06, the
        dense CRF (with the same kernel parameters) by under 0.01, although the dense
        CRF was about 3x faster on CPU; and the torch path needs no optional package
        (``pydensecrf2`` builds from source, with a C++ compiler).
    n_iter : int
        Mean-field iterations.

    Returns
    -------
    ndarray of uint8
        Refined labels.

    Examples
    --------
    >>> img = np.zeros((16, 16), np.float32); img[:, 8:] = 1
    >>> p = np.stack([1 - img, img]) * 0.6 + 0.2
    >>> crf_refine(p, img, method="torch")[0, [0, 15]].tolist()
    [0, 1]
    """
    from .train import limit_cpu_threads, resolve_device

    check_choice(method, "method", ("auto", "torch", "pydensecrf"))
    p = as_array(prob, "prob", ndim=(3, 4), dtype=np.float32)
    img = as_array(image, "image", ndim=(2, 3))
    if p.shape[1:] != img.shape:
        raise ValueError(f"image: shape {img.shape} differs from prob's spatial shape {p.shape[1:]}")
    if p.shape[0] < 2:
        raise ValueError(f"prob: needs at least 2 classes along axis 0, got {p.shape[0]}")
    n_iter = check_positive(n_iter, "n_iter", integer=True)
    for nm, v in (("sxy_gauss", sxy_gauss), ("sxy_bilateral", sxy_bilateral), ("s_intensity", s_intensity)):
        check_positive(v, nm)
    for nm, v in (("w_gauss", w_gauss), ("w_bilateral", w_bilateral)):
        check_positive(v, nm, allow_zero=True)
    window = check_positive(window, "window", integer=True)
    if window % 2 == 0:
        raise ValueError(f"window: must be odd, got {window}")
    img = normalize(img) if np.ptp(img) > 0 else img.astype(np.float32)
    if method == "pydensecrf":
        if not crf_available():
            raise ImportError("method: 'pydensecrf' needs the optional package pydensecrf2 "
                              "(pip install pydensecrf2); method='torch' needs nothing")
        return _crf_dense(p, img, n_iter, sxy_gauss, w_gauss, sxy_bilateral, s_intensity, w_bilateral)
    is2d = img.ndim == 2
    if is2d:
        p, img = p[:, None], img[None]
    dev = resolve_device(device)
    with limit_cpu_threads(dev):
        out = _crf_torch(p, img, n_iter, sxy_gauss, w_gauss, sxy_bilateral, s_intensity, w_bilateral, window,
                         dev, batch)
    return out[0] if is2d else out


def soft_labels(labels, n_classes=None, confidence=0.8):
    """Hard labels as probabilities ``(K, ...)``, so that :func:`crf_refine` can refine any segmentation.

    Each voxel gets ``confidence`` for its label and the rest shared by the other classes: the
    CRF may then move labels where the image says so. Used to give the classical baselines
    (multi-Otsu, k-means) the same CRF refinement as the learned segmenter -- a like-for-like
    comparison.

    Parameters
    ----------
    labels : int array
        Labels ``0..K-1``.
    n_classes : int, optional
        ``K``; default ``labels.max() + 1``.
    confidence : float in (1/K, 1)

    Returns
    -------
    ndarray float32 ``(K, *labels.shape)``

    Examples
    --------
    >>> soft_labels(np.array([0, 2]), 3, confidence=0.8).astype(float).round(2).tolist()
    [[0.8, 0.1], [0.1, 0.1], [0.1, 0.8]]
    """
    lab = as_array(labels, "labels")
    if lab.dtype.kind not in "iub" or (lab.size and lab.min() < 0):
        raise ValueError("labels: expected non-negative integer labels")
    k = int(lab.max()) + 1 if n_classes is None else int(n_classes)
    if k < 2 or k <= int(lab.max()):
        raise ValueError(f"n_classes: {n_classes!r} is too small for labels up to {int(lab.max())} (need >= 2)")
    confidence = float(confidence)
    if not 1.0 / k < confidence < 1.0:
        raise ValueError(f"confidence: must lie in (1/{k}, 1), got {confidence!r}")
    p = np.full((k,) + lab.shape, (1.0 - confidence) / (k - 1), np.float32)
    np.put_along_axis(p, lab[None].astype(np.int64), np.float32(confidence), axis=0)
    return p


# --------------------------------------------------------------------------------------
# classical baselines
# --------------------------------------------------------------------------------------
def otsu_segment(image, n_classes):
    """Multi-level Otsu thresholds: ``n_classes`` grey-level bands (0 = darkest).

    Examples
    --------
    >>> img = np.repeat([0.0, 0.5, 1.0], 10)
    >>> otsu_segment(img + 0.01 * np.arange(30) % 0.02, 3)[[0, 15, 29]].tolist()
    [0, 1, 2]
    """
    from skimage.filters import threshold_multiotsu

    n_classes, _ = _check_n_classes(n_classes)
    a = as_array(image, "image", nonconstant=True, dtype=np.float32)
    t = threshold_multiotsu(a, classes=n_classes, nbins=256)
    return np.digitize(a, t).astype(np.uint8)


def filter_features(image, sigmas=(1.0, 2.0, 4.0)):
    """Per-voxel features: normalised intensity, Gaussian smoothings and gradient magnitudes.

    Returns an array ``(n_features, *image.shape)``.

    Examples
    --------
    >>> filter_features(np.random.default_rng(0).random((8, 8)), sigmas=(1,)).shape
    (3, 8, 8)
    """
    from scipy import ndimage as ndi

    a = normalize(as_array(image, "image", ndim=(2, 3), nonconstant=True))
    feats = [a]
    for s in np.atleast_1d(sigmas).tolist():
        check_positive(s, "sigmas")
        feats.append(ndi.gaussian_filter(a, s))
        feats.append(ndi.gaussian_gradient_magnitude(a, s))
    return np.stack(feats).astype(np.float32)


def kmeans_segment(image, n_classes, *, features="filters", sigmas=(1.0, 2.0, 4.0), n_samples=100000, seed=0):
    """k-means clustering of voxels on intensity or on :func:`filter_features` (standardised).

    Parameters
    ----------
    image : array_like
        2D image or 3D volume.
    n_classes : int >= 2
        Clusters.
    features : {"intensity", "filters"}
        Grey value only, or grey value + Gaussian smoothings + gradient magnitudes at ``sigmas``.
    n_samples : int
        Voxels used to fit the centres (all voxels are then assigned).

    Examples
    --------
    >>> img = np.repeat([0.0, 1.0], 50) + np.random.default_rng(0).normal(0, 0.05, 100)
    >>> lab = kmeans_segment(img[None], 2, features="intensity")
    >>> len(set(lab[0, :50].tolist())), len(set(lab[0, 50:].tolist()))
    (1, 1)
    """
    from sklearn.cluster import KMeans

    n_classes, _ = _check_n_classes(n_classes)
    check_choice(features, "features", ("intensity", "filters"))
    a = as_array(image, "image", nonconstant=True, dtype=np.float32)
    if features == "intensity":
        f = normalize(a)[None]
    else:
        if a.ndim not in (2, 3):
            raise ValueError(f"image: expected a 2D or 3D array for filter features, got {a.ndim}D")
        f = filter_features(a, sigmas)
    x = f.reshape(len(f), -1).T
    x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-6)
    rng = rng_from(seed)
    idx = rng.choice(len(x), min(n_samples, len(x)), replace=False)
    km = KMeans(n_classes, n_init=4, random_state=int(rng.integers(2 ** 31))).fit(x[idx])
    # order clusters by mean intensity so ids are stable and readable (0 = darkest)
    order = np.argsort(np.argsort(km.cluster_centers_[:, 0]))
    return order[km.predict(x)].reshape(a.shape).astype(np.uint8)


# --------------------------------------------------------------------------------------
# weights I/O
# --------------------------------------------------------------------------------------
def save_model(segmenter, path, *, overwrite=False, **meta):
    """Save a :class:`Segmenter` (network, centroids, settings) with :func:`tomoml_nb.weights.save_state`.

    An existing file is refused (``FileExistsError`` naming ``path``) unless ``overwrite=True``;
    other keyword arguments are stored as provenance (``meta``).

    Examples
    --------
    >>> import os, tempfile
    >>> from tomoml_nb.models.stego import StegoNet
    >>> seg = Segmenter(StegoNet(), np.eye(3, 24, dtype=np.float32), 3)
    >>> p = save_model(seg, os.path.join(tempfile.mkdtemp(), "s.pt"))
    >>> load_model(p).n_clusters
    3
    """
    from .weights import save_state

    seg = _check_segmenter(segmenter)
    config = dict(seg.net.config, n_classes=seg.n_classes, temperature=seg.temperature, space=seg.space,
                  centroids=np.asarray(seg.centroids, np.float32).tolist())
    return save_state(path, format=FORMAT, config=config, state_dict=seg.net.state_dict(),
                      history=seg.history, meta=meta, overwrite=overwrite)


def load_model(path, device="cpu"):
    """Load a :class:`Segmenter` saved by :func:`save_model` (see :func:`save_model` for an example)."""
    from .models.stego import StegoNet
    from .weights import load_state

    state = load_state(path, format=FORMAT)
    cfg = dict(state["config"])
    centroids = np.asarray(cfg.pop("centroids"), np.float32)
    n_classes = int(cfg.pop("n_classes"))
    temperature = float(cfg.pop("temperature"))
    space = str(cfg.pop("space", "codes"))
    net = StegoNet(**cfg)
    net.load_state_dict(state["state_dict"])
    net.to(device).eval()
    seg = Segmenter(net, centroids, n_classes, temperature, history=state["history"], space=space)
    seg.meta = state["meta"]
    return seg


def pretrained_path(name="bone_implant") -> Path:
    """Path of a shipped segmenter (``"bone_implant"``).

    Examples
    --------
    >>> pretrained_path().name
    'stego_bone_implant.pt'
    """
    from .weights import shipped_path

    check_choice(name, "name", tuple(PRETRAINED))
    return shipped_path(PRETRAINED[name], script=SCRIPT)


def load_pretrained(name="bone_implant", device="cpu"):
    """Load a shipped segmenter (backbone + head + probe), offline from the package.

    Examples
    --------
    >>> load_pretrained().n_classes
    5
    """
    return load_model(pretrained_path(name), device=device)


# --------------------------------------------------------------------------------------
# reporting helpers
# --------------------------------------------------------------------------------------
def score_table(predictions, truth, class_names=None, *, seconds=None, extra="unmatched", digits=3):
    """Markdown table of Hungarian-matched IoU per class, mean IoU and accuracy per method.

    Parameters
    ----------
    predictions : dict name -> labels
    truth : ndarray of int
    class_names : list of str, optional
    seconds : dict name -> float, optional

    Examples
    --------
    >>> t = np.array([0, 0, 1, 1])
    >>> print(score_table({"a": np.array([1, 1, 0, 0])}, t, ["x", "y"]).splitlines()[2])
    | a | 1.000 | 1.000 | **1.000** | 1.000 |
    """
    from .metrics import hungarian_accuracy, hungarian_iou_per_class

    t = as_array(truth, "truth")
    nc = int(t.max()) + 1
    names = list(class_names) if class_names is not None else [str(i) for i in range(nc)]
    head = "| method | " + " | ".join(names) + " | mean IoU | accuracy |" + (" seconds |" if seconds else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, pred in predictions.items():
        iou = hungarian_iou_per_class(pred, t, nc, extra=extra)
        acc = hungarian_accuracy(pred, t, nc, extra=extra)
        row = f"| {name} | " + " | ".join(f"{v:.{digits}f}" for v in iou) + \
              f" | **{np.nanmean(iou):.{digits}f}** | {acc:.{digits}f} |"
        if seconds:
            row += f" {seconds.get(name, float('nan')):.1f} |"
        lines.append(row)
    return "\n".join(lines)


def plot_clusters(image, predictions, truth=None, *, slice_index=None, axis=0, class_names=None, ncols=None,
                  title=None):
    """Overlay each method's Hungarian-matched labels on one slice; returns the Figure.

    Cluster ids are mapped to the true classes with :func:`tomoml_nb.metrics.hungarian_match`
    when ``truth`` is given (unmatched clusters shown in white), so colours agree across panels.
    Without ``truth`` the first prediction is the reference the others are matched to.

    Examples
    --------
    >>> img = np.random.default_rng(0).random((4, 16, 16))
    >>> fig = plot_clusters(img, {"a": (img > 0.5).astype(int)})
    >>> len(fig.axes) >= 2
    True
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    from .metrics import hungarian_match

    img = as_array(image, "image", ndim=(2, 3))
    if img.ndim == 3:
        idx = img.shape[axis] // 2 if slice_index is None else int(slice_index)
        take = lambda a: np.take(a, idx, axis=axis)  # noqa: E731
    else:
        take = lambda a: a  # noqa: E731
    panels = [("image", take(img), None)]
    if truth is not None:
        t = as_array(truth, "truth")
        panels.append(("ground truth", take(t), None))
    ref = t if truth is not None else (np.asarray(next(iter(predictions.values()))) if predictions else None)
    for name, pred in predictions.items():
        p = np.asarray(pred).astype(np.int64)
        if ref is not None:
            nc, nk = int(ref.max()) + 1, int(p.max()) + 1
            mapping, _ = hungarian_match(p, ref, max(nc, 1), max(nk, 1))
            p = np.where(mapping[p] >= 0, mapping[p], -1)
        panels.append((name, take(p), None))
    n = len(panels)
    ncols = ncols or min(n, 4)
    nrows = int(np.ceil(n / ncols))
    fig, axs = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.2 * nrows), squeeze=False)
    base = plt.get_cmap("tab10")
    k = int(max(np.max(p) for _, p, _ in panels[1:])) + 1 if n > 1 else 1
    cmap = ListedColormap([(1, 1, 1, 1)] + [base(i % 10) for i in range(max(k, 1))])
    for ax, (name, a, _) in zip(axs.ravel(), panels):
        if name == "image":
            ax.imshow(a, cmap="gray")
        else:
            ax.imshow(take(img) if img.ndim == 3 else img, cmap="gray")
            ax.imshow(np.ma.masked_less(a + 1, 0), cmap=cmap, vmin=0, vmax=k, alpha=0.55,
                      interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    for ax in axs.ravel()[n:]:
        ax.axis("off")
    if class_names is not None:
        from matplotlib.patches import Patch

        fig.legend(handles=[Patch(color=base(i % 10), label=c) for i, c in enumerate(class_names)],
                   loc="lower center", ncol=len(class_names), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05 if class_names is not None else 0, 1, 1))
    return fig
