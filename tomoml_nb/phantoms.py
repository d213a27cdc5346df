"""Synthetic ground truth: phantoms that look like synchrotron micro-CT.

Every ML method in ``tomoml_nb`` is first taught and tested on a phantom whose
truth is known exactly:

* :func:`bone_implant` -- a bone sample around a (degrading) screw, with five
  classes, for semantic and unsupervised segmentation and denoising;
* :func:`fibres` -- a mat of touching, curved paper fibres with instance labels;
* :func:`displacement_field`, :func:`deform`, :func:`warp` -- families of known
  displacement fields and the warps that apply them, for digital volume
  correlation (DVC);
* :func:`histology`, :func:`oblique_slice`, :func:`random_plane` -- stained
  histology-like images of a CT slice and planar sections through a volume, for
  virtual histology and slice-to-volume registration.

Conventions (see DESIGN.md): arrays are ``(z, y, x)``; vector fields are
``(3, z, y, x)`` with components ordered ``(z, y, x)`` (``(2, y, x)`` in 2D); a
displacement ``u`` is Lagrangian -- the material at ``x`` in the fixed volume
sits at ``x + u(x)`` in the moving one, ``moving(x + u(x)) ~= fixed(x)``, which is
the convention of :func:`skimage.registration.optical_flow_tvl1`.

Generators work at the size given by ``shape`` with vectorised numpy/scipy, and
are deterministic: the same ``seed`` gives bit-identical output.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from ._validate import as_array, check_choice, check_positive, rng_from

__all__ = [
    "Phantom",
    "bone_implant",
    "fibres",
    "FIELD_KINDS",
    "displacement_field",
    "deform",
    "warp",
    "histology",
    "oblique_slice",
    "random_plane",
    "BONE_CLASSES",
]

BONE_CLASSES = ("background", "soft tissue", "bone", "implant", "degradation")
FIELD_KINDS = ("uniform", "star", "power", "spherical", "random_smooth", "shear_band", "mixed")
_MODES = ("nearest", "constant", "reflect", "mirror", "wrap", "grid-wrap", "grid-mirror", "grid-constant")


# --------------------------------------------------------------------------------------
# container
# --------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Phantom:
    """A synthetic volume with its ground truth.

    Unpacks as ``image, labels = phantom``.

    Attributes
    ----------
    image : ndarray of float32
        Attenuation-like grey values, roughly in [0, 1], with blur and noise.
    labels : ndarray of int
        Ground-truth labels (semantic classes or instances), same shape as ``image``.
    info : dict
        Class names, generation parameters and extra ground truth (for example
        ``info["clean"]``, the image before noise was added).

    Examples
    --------
    >>> ph = bone_implant((24, 24, 24), seed=1)
    >>> image, labels = ph
    >>> image.shape == labels.shape
    True
    """

    image: np.ndarray
    labels: np.ndarray
    info: dict = field(default_factory=dict)

    def __iter__(self):
        yield self.image
        yield self.labels

    def __repr__(self):
        keys = ", ".join(self.info)
        return (f"Phantom(image={self.image.shape} {self.image.dtype}, "
                f"labels={self.labels.shape} {self.labels.dtype} max={int(self.labels.max())}, "
                f"info keys: {keys})")


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------
def _check_shape(shape, name, ndims=(3,), min_size=4):
    if isinstance(shape, numbers.Integral) or not hasattr(shape, "__len__"):
        raise TypeError(f"{name}: expected a tuple of {' or '.join(map(str, ndims))} sizes, got {shape!r}")
    shape = tuple(shape)
    if len(shape) not in ndims:
        raise ValueError(f"{name}: expected {' or '.join(map(str, ndims))} sizes, got {len(shape)} ({shape!r})")
    out = []
    for s in shape:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < min_size:
            raise ValueError(f"{name}: every size must be an integer >= {min_size}, got {shape!r}")
        out.append(int(s))
    return tuple(out)


def _check_fraction(value, name):
    check_positive(value, name, allow_zero=True)
    if value > 1:
        raise ValueError(f"{name}: must be in [0, 1], got {value!r}")
    return float(value)


def _check_range(value, name, positive=True):
    try:
        lo, hi = (float(v) for v in value)
    except Exception as exc:
        raise TypeError(f"{name}: expected a pair (low, high), got {value!r}") from exc
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo > hi or (positive and lo <= 0):
        raise ValueError(f"{name}: expected 0 < low <= high, got {value!r}")
    return lo, hi


def _check_order(order):
    if isinstance(order, bool) or not isinstance(order, numbers.Integral) or not 0 <= order <= 5:
        raise ValueError(f"order: spline order must be an integer in 0..5, got {order!r}")
    return int(order)


def _child(rng):
    """An independent generator drawn from ``rng`` (keeps streams reproducible)."""
    return np.random.default_rng(int(rng.integers(2**63)))


def _upsample_linear(small, shape):
    """Separable linear interpolation of ``small`` onto ``shape`` (corner-aligned, fast)."""
    out = small
    for axis, n in enumerate(shape):
        m = out.shape[axis]
        pos = np.linspace(0.0, m - 1.0, n)
        i0 = np.minimum(pos.astype(np.intp), m - 2) if m > 1 else np.zeros(n, np.intp)
        w = (pos - i0).astype(np.float32) if m > 1 else np.zeros(n, np.float32)
        a = np.take(out, i0, axis=axis)
        b = np.take(out, np.minimum(i0 + 1, m - 1), axis=axis)
        wshape = [1] * out.ndim
        wshape[axis] = n
        w = w.reshape(wshape)
        out = a + w * (b - a)
    return out.astype(np.float32, copy=False)


def _noise(shape, sigma, rng, coarse_sigma=1.5):
    """Gaussian-correlated random field with correlation length ``sigma`` (voxels),
    zero mean and unit standard deviation, float32. Large ``sigma`` is generated on a
    coarse grid (where its correlation length is ``coarse_sigma`` cells) and
    interpolated, so the cost stays close to one pass over the array; a small
    ``coarse_sigma`` gives cheap fine textures."""
    shape = tuple(int(s) for s in shape)
    factor = max(1.0, sigma / coarse_sigma)
    if factor <= 1.5:
        field_ = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="wrap")
    else:
        small = tuple(int(np.ceil(s / factor)) + 4 for s in shape)
        coarse = ndi.gaussian_filter(rng.standard_normal(small, dtype=np.float32), sigma / factor, mode="wrap")
        # crop the padded border so the interpolated field has no edge artefacts
        crop = tuple(slice(2, 2 + int(np.ceil(s / factor)) + 1) for s in shape)
        field_ = _upsample_linear(coarse[crop], shape)
    # normalise with statistics of a regular subsample (fast, deterministic)
    sub = field_.reshape(-1)[:: max(1, field_.size // 200_000)]
    mean, std = float(sub.mean(dtype=np.float64)), float(sub.std(dtype=np.float64))
    field_ -= np.float32(mean)
    field_ *= np.float32(1.0 / (std if std > 0 else 1.0))
    return field_.astype(np.float32, copy=False)


def _finish(clean, noise, rng, blur, phase_contrast):
    """Partial-volume blur, propagation phase-contrast fringes, then noise."""
    img = clean
    if blur > 0:
        img = ndi.gaussian_filter(img, blur)
    if phase_contrast > 0:
        img = img + phase_contrast * (img - ndi.gaussian_filter(img, 1.5))
    img = img.astype(np.float32, copy=False)
    noisy = img + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(noise) if noise > 0 else img.copy()
    return noisy.astype(np.float32, copy=False), img


# --------------------------------------------------------------------------------------
# 1. bone with a degrading screw
# --------------------------------------------------------------------------------------
def bone_implant(shape=(96, 96, 96), seed=0, degradation=0.5, noise=0.02, blur=0.7, screw="metal", *,
                 bone_fraction=0.25, trabecular_scale=3.5, phase_contrast=0.4, cupping=0.06, rings=0.004,
                 degradation_seed=None, noise_seed=None, implant_scale=1.0, implant_tip=None):
    """Bone sample around a screw implant with a corrosion layer, as in SR-µCT.

    A cylindrical sample (axis along z) of soft tissue holds a cortical bone plate
    near ``z = 0`` and a trabecular network below it; a threaded screw along z
    (random position, random tip height and handedness) is surrounded by a
    fragmented, porous degradation layer and by patchy peri-implant bone. The grey
    values are attenuation-like: background < soft tissue < degradation layer
    <~ bone < metal screw (a polymer screw is only slightly brighter than soft
    tissue). Partial-volume blur, phase-contrast edge fringes, a beam-hardening
    cupping trend, faint ring artefacts and Gaussian noise make plain
    thresholding imperfect: degradation layer versus bone is the hard pair.

    Parameters
    ----------
    shape : tuple of 3 int
        Volume shape ``(z, y, x)``; the sample and screw scale with it, the
        trabecular texture does not (see ``trabecular_scale``).
    seed : int or numpy.random.Generator
        Random seed; same seed, same volume.
    degradation : float in [0, 1]
        Corrosion extent: 0 = intact screw (class 4 absent), 1 = deep, thick and
        irregular layer.
    noise : float >= 0
        Standard deviation of the additive Gaussian noise.
    blur : float >= 0
        Gaussian partial-volume blur (voxels).
    screw : {"metal", "polymer"}
        Bright metal screw or low-contrast polymer screw.
    bone_fraction : float in [0, 1]
        Approximate trabecular bone volume fraction.
    trabecular_scale : float > 0
        Correlation length of the trabecular network (voxels); trabeculae are
        roughly this thick.
    phase_contrast : float >= 0
        Strength of the bright/dark edge fringes of propagation phase contrast.
    cupping : float >= 0
        Beam-hardening cupping: the sample centre is darker by this much.
    rings : float >= 0
        Amplitude of ring artefacts around the rotation axis.
    degradation_seed : int, optional
        Seed for the degradation morphology only: same anatomy (``seed``),
        different corrosion layer. Defaults to one derived from ``seed``.
    noise_seed : int, optional
        Seed for the noise only, e.g. two independent noisy copies of the same
        phantom for Noise2Noise. Defaults to one derived from ``seed``.
    implant_scale : float > 0
        Size of the screw (radius, thread depth and pitch) and of its corrosion and
        peri-implant zones relative to the default, which scales with the sample.
        ``0.5`` in a volume twice as wide gives the default screw in a field of view
        with four times the cross-section: a small implant in a large sample, where
        most slices show no implant (the setting in which active learning pays).
    implant_tip : float in (0, 1], optional
        Depth of the screw tip as a fraction of ``z`` (default: random in 0.72-0.9).

    Returns
    -------
    Phantom
        ``image`` float32 ``shape``; ``labels`` uint8 0..4 (see
        ``info["classes"]``); ``info`` holds ``classes``, ``clean`` (the image
        without the random noise -- blur, fringes, cupping and rings are kept,
        a target for denoising), ``screw_axis`` ``(y, x)``, ``screw_radius``
        ``(core, thread)``, ``screw_pitch``, ``screw_tip_z`` and ``params``.

    Examples
    --------
    >>> ph = bone_implant((32, 32, 32), seed=0, degradation=0.5)
    >>> ph.image.dtype, ph.labels.dtype, ph.info["classes"][4]
    (dtype('float32'), dtype('uint8'), 'degradation')
    >>> sorted(set(ph.labels.ravel().tolist()))
    [0, 1, 2, 3, 4]
    """
    shape = _check_shape(shape, "shape", min_size=16)
    degradation = _check_fraction(degradation, "degradation")
    check_positive(noise, "noise", allow_zero=True)
    check_positive(blur, "blur", allow_zero=True)
    check_choice(screw, "screw", ("metal", "polymer"))
    bone_fraction = _check_fraction(bone_fraction, "bone_fraction")
    check_positive(trabecular_scale, "trabecular_scale")
    check_positive(phase_contrast, "phase_contrast", allow_zero=True)
    check_positive(cupping, "cupping", allow_zero=True)
    check_positive(rings, "rings", allow_zero=True)
    check_positive(implant_scale, "implant_scale")
    if implant_tip is not None and not 0 < float(implant_tip) <= 1:
        raise ValueError(f"implant_tip: expected a fraction of the depth in (0, 1], got {implant_tip!r}")

    rng = rng_from(seed)
    rng_anat, rng_deg, rng_noise, rng_art = _child(rng), _child(rng), _child(rng), _child(rng)
    if degradation_seed is not None:
        rng_deg = rng_from(degradation_seed)
    if noise_seed is not None:
        rng_noise = rng_from(noise_seed)

    Z, Y, X = shape
    S = float(min(Y, X))
    z = np.arange(Z, dtype=np.float32)[:, None, None]
    yy = np.arange(Y, dtype=np.float32)[:, None]
    xx = np.arange(X, dtype=np.float32)[None, :]
    cy, cx = (Y - 1) / 2.0, (X - 1) / 2.0

    # ---- sample cylinder with a slightly irregular outline -------------------------
    r_c = np.hypot(yy - cy, xx - cx)                       # (Y, X)
    th_c = np.arctan2(yy - cy, xx - cx)
    wobble = np.zeros_like(th_c)
    for k in range(2, 7):
        wobble += rng_anat.normal(0, 1) / k**1.5 * np.cos(k * th_c + rng_anat.uniform(0, 2 * np.pi))
    R_s = 0.46 * S * (1 + 0.03 * wobble)                    # (Y, X)
    zmod = 1 + 0.01 * np.sin(2 * np.pi * z / Z * rng_anat.uniform(0.5, 1.5) + rng_anat.uniform(0, 6.3))
    sample = r_c[None] <= R_s[None] * zmod                  # (Z, Y, X)

    labels = np.zeros(shape, np.uint8)
    labels[sample] = 1

    # ---- cortical plate near z = 0, trabecular bone below --------------------------
    c_top = 0.06 * Z + 0.02 * Z * _noise((Y, X), 0.2 * S, rng_anat)
    c_bot = 0.30 * Z + 0.04 * Z * _noise((Y, X), 0.25 * S, rng_anat)
    cortex = (z >= c_top[None]) & (z < c_bot[None])
    # Haversian canals / resorption pores in the cortex (computed on the slab only)
    zc0, zc1 = max(0, int(np.floor(c_top.min()))), min(Z, int(np.ceil(c_bot.max())) + 1)
    if zc1 > zc0:
        cortex[zc0:zc1] &= _noise((zc1 - zc0, Y, X), 1.2, rng_anat, coarse_sigma=0.8) < 2.6

    n1 = _noise(shape, trabecular_scale, rng_anat)
    n2 = _noise(shape, 1.6 * trabecular_scale, rng_anat)
    density = _noise(shape, 0.15 * S, rng_anat)
    # sheets |n1| < t (a connected sponge of plates), perforated by n2 -> rods and plates
    frac = np.clip(bone_fraction * (1 + 0.35 * density), 0.02, 0.9)
    t = (frac * 1.2533).astype(np.float32)                 # P(|N|<t) ~ 0.8 t for small t
    # round the struts and nodes (remodelled bone has no sharp creases), below the cortex only
    zt0 = min(Z - 1, max(0, int(np.floor(c_bot.min())) - 4))
    trab = np.zeros(shape, bool)
    raw = ((np.abs(n1[zt0:]) < t[zt0:]) & (n2[zt0:] > -0.9)).astype(np.float32)
    trab[zt0:] = ndi.gaussian_filter(raw, 0.8) > 0.42
    del raw
    trab &= z >= c_bot[None] - 2
    del n1, n2
    bone = (cortex | trab) & sample
    labels[bone] = 2
    mineral = 0.04 * density                                 # mineralisation variation
    del density

    # ---- screw ---------------------------------------------------------------------
    off_r = rng_anat.uniform(0, 0.1 * S)
    off_a = rng_anat.uniform(0, 2 * np.pi)
    ay, ax = cy + off_r * np.sin(off_a), cx + off_r * np.cos(off_a)
    Si = S * float(implant_scale)                             # the implant's length scale
    r_core = 0.10 * Si * rng_anat.uniform(0.9, 1.1)
    depth = 0.05 * Si
    r_out = r_core + depth
    pitch = max(5.0, 0.13 * Si * rng_anat.uniform(0.85, 1.15))
    hand = rng_anat.choice([-1.0, 1.0])
    z_tip = Z * rng_anat.uniform(0.72, 0.9)
    if implant_tip is not None:
        z_tip = Z * float(implant_tip)
    phase0 = rng_anat.uniform(0, 1)

    # work inside the box around the screw only
    reach = r_out + degradation * 0.35 * Si + 4
    y0, y1 = max(0, int(ay - reach)), min(Y, int(ay + reach) + 2)
    x0, x1 = max(0, int(ax - reach)), min(X, int(ax + reach) + 2)
    z1 = min(Z, int(z_tip) + int(reach) + 2)
    bshape = (z1, y1 - y0, x1 - x0)
    by = yy[y0:y1] - ay
    bx = xx[:, x0:x1] - ax
    r_a = np.hypot(by, bx)                                   # (by, bx)
    th_a = np.arctan2(by, bx)
    zb = z[:z1]
    phi = np.mod(zb / pitch + hand * th_a[None] / (2 * np.pi) + phase0, 1.0)
    # trapezoidal thread profile: crest 30 % of the pitch, flanks 25 % each
    prof = np.clip((0.4 - np.abs(phi - 0.5)) / 0.25, 0.0, 1.0)
    R_screw = r_core + depth * prof
    # conical tip, rounded core end
    R_screw = np.minimum(R_screw, np.maximum(0.0, (z_tip - zb) * 0.9))
    d = r_a[None] - R_screw                                  # radial signed distance (>0 outside)
    del phi, prof

    box = (slice(0, z1), slice(y0, y1), slice(x0, x1))
    lab_b = labels[box]
    samp_b = sample[box]

    # peri-implant zone: drilled hole mostly refilled with new bone and fibrous tissue
    rim_n = _noise(bshape, 2.5, rng_anat)
    n_deg = [_noise(bshape, s, rng_deg) for s in (3.0, 1.5, 0.9)]
    erode = degradation * (0.55 * depth + 0.25 * r_core) * np.clip(1 + 0.6 * n_deg[0] * (0.4 + degradation), 0, 2.5)
    grow = degradation * (0.35 * depth + 0.12 * r_core) * np.clip(1 + 0.8 * n_deg[1] * (0.4 + degradation), 0, 2.5)
    # pitting: local deep pits into the metal
    erode = erode + degradation * 0.4 * r_core * np.clip(n_deg[0] - 1.2, 0, None)
    metal = d < -erode
    layer = (d < grow) & ~metal
    if degradation > 0:
        # fragmented, porous texture: cracks and pores filled with fluid / tissue
        cracks = (np.abs(n_deg[2]) < 0.07 + 0.08 * degradation) | (n_deg[1] > 1.9)
        layer &= ~cracks
        porous = (d < grow) & ~metal & cracks
    else:
        layer[:] = False
        porous = np.zeros_like(layer)
    near = (d >= grow) & (d < grow + 0.06 * Si + 2)
    new_bone = near & (rim_n > -0.2)
    gap = (d >= 0) & (d < grow + 0.06 * Si + 2) & ~new_bone
    lab_b[gap & samp_b] = 1
    lab_b[new_bone & samp_b] = 2
    lab_b[porous & samp_b] = 1
    lab_b[layer & samp_b] = 4
    lab_b[metal & samp_b] = 3
    # depth of each layer voxel between the metal front (0) and the outer surface (1)
    pos = np.clip((d + erode) / np.maximum(erode + grow, 1e-3), 0, 1)
    del rim_n, near, gap

    # ---- grey values -------------------------------------------------------------------
    img = np.empty(shape, np.float32)
    tex = _noise(shape, 1.0, rng_anat, coarse_sigma=0.6)
    img[:] = 0.06 + 0.01 * tex                                # mounting medium
    soft = labels == 1
    img[soft] = (0.20 + 0.015 * tex)[soft]
    bone_m = labels == 2
    img[bone_m] = (0.50 + mineral + 0.02 * tex)[bone_m]
    cort = bone_m & cortex
    img[cort] += 0.04
    img_b = img[box]
    nb_m = new_bone & (lab_b == 2)
    img_b[nb_m] -= 0.06                                     # younger, less mineralised bone
    deg_grey = 0.46 - 0.16 * pos + 0.06 * n_deg[1] + 0.03 * n_deg[2]
    m4 = lab_b == 4
    img_b[m4] = deg_grey[m4]
    m3 = lab_b == 3
    img_b[m3] = (0.93 if screw == "metal" else 0.28) + 0.01 * tex[box][m3]
    img[box] = img_b
    del tex, deg_grey, pos, n_deg, mineral

    # cupping (beam hardening): darker towards the sample centre
    if cupping > 0:
        cup = (cupping * np.clip(1 - (r_c / (0.46 * S)) ** 2, 0, 1)).astype(np.float32)
        img -= np.where(labels > 0, cup[None], 0).astype(np.float32)
    noisy, clean = _finish(img, noise, rng_noise, blur, phase_contrast)
    # ring artefacts (detector defects, systematic: part of `clean`), added after blur
    if rings > 0:
        nr = int(np.ceil(r_c.max())) + 2
        prof_r = rng_art.standard_normal(nr).astype(np.float32)
        prof_r *= np.where(rng_art.random(nr) < 0.1, 3.0, 1.0).astype(np.float32)
        ring2d = prof_r[np.round(r_c).astype(np.intp)] * np.float32(rings)
        zmod = (1 + 0.5 * np.sin(np.arange(Z) / max(Z, 1) * 2 * np.pi * 3 + rng_art.uniform(0, 6.3)))
        ring = ring2d[None] * zmod.astype(np.float32)[:, None, None]
        noisy += ring
        clean = clean + ring
    info = {
        "classes": list(BONE_CLASSES),
        "clean": clean.astype(np.float32, copy=False),
        "screw_axis": (float(ay), float(ax)),
        "screw_radius": (float(r_core), float(r_out)),
        "screw_pitch": float(pitch),
        "screw_tip_z": float(z_tip),
        "screw": screw,
        "params": dict(shape=shape, seed=seed if isinstance(seed, numbers.Integral) else None,
                       degradation=degradation, noise=noise, blur=blur, bone_fraction=bone_fraction,
                       trabecular_scale=trabecular_scale, phase_contrast=phase_contrast, cupping=cupping,
                       rings=rings, degradation_seed=degradation_seed, noise_seed=noise_seed,
                       implant_scale=float(implant_scale), implant_tip=implant_tip),
    }
    return Phantom(noisy, labels, info)


# --------------------------------------------------------------------------------------
# 2. paper fibres
# --------------------------------------------------------------------------------------
def _fibre_path_2d(shape_yx, rng, step, curvature, orientation, kappa, reach=0.0):
    """A smooth random 2D curve (y, x) crossing the plane, sampled every ``step``.

    The underlying straight line is drawn uniformly among the lines that meet the
    area grown by ``reach`` (uniform offset across it), so fibre density is even
    over the area, not peaked in its centre.
    """
    Y, X = shape_yx
    margin = 6.0
    theta0 = orientation + (rng.vonmises(0.0, kappa) if kappa > 0 else rng.uniform(0, 2 * np.pi))
    d0 = np.array([np.sin(theta0), np.cos(theta0)])
    nrm = np.array([-d0[1], d0[0]])
    centre = np.array([(Y - 1) / 2.0, (X - 1) / 2.0])
    m = reach
    corners = np.array([[-m, -m], [-m, X - 1 + m], [Y - 1 + m, -m], [Y - 1 + m, X - 1 + m]]) - centre
    proj = corners @ nrm
    start = centre + rng.uniform(proj.min(), proj.max()) * nrm
    n = int(1.5 * (Y + X + 4 * margin) / step) + 4
    halves = []
    for direction in (0.0, np.pi):
        # curvature is a smoothed random walk: fibres bend gently and persistently
        w = ndi.gaussian_filter1d(rng.standard_normal(n), 12.0 / step) * curvature * np.sqrt(12.0 / step) * 2.0
        theta = theta0 + direction + np.cumsum(w) * step
        halves.append(start + np.cumsum(step * np.stack([np.sin(theta), np.cos(theta)], axis=1), axis=0))
    pts = np.concatenate([halves[1][::-1], start[None], halves[0]], axis=0)
    inside = ((pts[:, 0] >= -margin) & (pts[:, 0] <= Y - 1 + margin)
              & (pts[:, 1] >= -margin) & (pts[:, 1] <= X - 1 + margin))
    if not inside.any():
        return pts[:0]
    # the longest run of consecutive points inside the (extended) area
    edges = np.diff(np.concatenate([[0], inside.astype(np.int8), [0]]))
    starts, stops = np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]
    k = int(np.argmax(stops - starts))
    return pts[starts[k]:stops[k]]


def _disk(radius):
    r = int(np.ceil(radius))
    g = np.arange(-r, r + 1)
    return (g[:, None] ** 2 + g[None, :] ** 2) <= radius**2 + 1e-6


_FIBRE_BEND = 0.15      # max curvature (2x) of a fibre draping over others (stiffness)
_FIBRE_SINK = 0.4      # how far (x radius) a fibre presses into the ones below
_FIBRE_CONTACT = 0.75  # lateral reach (x radius) of the contact test: fibres nest into gaps


def fibres(shape=(64, 64, 64), n_fibres=40, radius=(2.0, 3.5), seed=0, noise=0.05, blur=0.7, touching=True, *,
           flatten=1.6, hollow=0.25, curvature=0.012, orientation_spread=1.0, phase_contrast=0.6, min_size=20,
           noise_seed=None):
    """A paper-like mat of long, curved, touching fibres with instance labels.

    Fibres are tubes around smooth random curves that cross the volume in x-y
    (paper is a stack of fibres lying in the sheet plane). They are deposited one
    after the other onto a height map, so each drapes over the fibres beneath it
    and, with ``touching=True``, sinks slightly into them: contacts and crossings
    are everywhere, as in real paper. Where two fibres overlap, voxels go to the
    nearest centreline (nearest sample point, via a Euclidean distance transform),
    so labels stay a partition. Cross-sections are ellipses flattened along z
    (collapsed fibres); some fibres are hollow (a lumen filled with air).

    Parameters
    ----------
    shape : tuple of 3 int
        Volume shape ``(z, y, x)``.
    n_fibres : int
        Number of fibres generated (fibres entirely outside the volume are
        dropped; fibres cut into pieces by the volume edge are split, see
        ``info["n_fibres"]``).
    radius : (float, float)
        Range of fibre radii (voxels, in the sheet plane), one per fibre.
    seed : int or numpy.random.Generator
        Random seed.
    noise : float >= 0
        Standard deviation of the Gaussian noise.
    blur : float >= 0
        Partial-volume blur (voxels).
    touching : bool
        True: fibres rest on, nest into and press into each other (many
        contacts). False: a gap of 1-2 voxels is kept between fibres.
    flatten : float >= 1
        Ratio of in-plane to through-thickness (z) semi-axis of the cross-section.
    hollow : float in [0, 1]
        Fraction of fibres with an open lumen.
    curvature : float >= 0
        Typical bending (radians per voxel) of the fibre paths.
    orientation_spread : float >= 0
        Angular spread (radians, von Mises) of the fibre directions about a
        random "machine direction" in x-y: 0 aligns all fibres, values above
        50 (or ``np.inf``) give isotropic sheets.
    phase_contrast : float >= 0
        Strength of the edge fringes.
    min_size : int
        Connected pieces smaller than this (voxels) are removed.
    noise_seed : int, optional
        Seed for the noise only.

    Returns
    -------
    Phantom
        ``image`` float32; ``labels`` int32 with 0 background and instances
        ``1..n`` (each one face-connected component); ``info`` with
        ``n_fibres`` (= n), ``centrelines`` (list of ``(k, 3)`` float arrays in
        voxel coordinates ``(z, y, x)``, one per label, ``centrelines[i]`` for
        label ``i + 1``), ``radii``, ``hollow`` (bool per label), ``clean``.

    Examples
    --------
    >>> ph = fibres((32, 48, 48), n_fibres=12, seed=3)
    >>> ph.labels.dtype, ph.labels.max() == ph.info["n_fibres"] == len(ph.info["centrelines"])
    (dtype('int32'), True)
    """
    shape = _check_shape(shape, "shape", min_size=8)
    n_fibres = check_positive(n_fibres, "n_fibres", integer=True)
    rlo, rhi = _check_range(radius, "radius")
    check_positive(noise, "noise", allow_zero=True)
    check_positive(blur, "blur", allow_zero=True)
    check_positive(flatten, "flatten")
    if flatten < 1:
        raise ValueError(f"flatten: must be >= 1, got {flatten!r}")
    hollow = _check_fraction(hollow, "hollow")
    check_positive(curvature, "curvature", allow_zero=True)
    check_positive(orientation_spread, "orientation_spread", allow_zero=True)
    check_positive(phase_contrast, "phase_contrast", allow_zero=True)
    min_size = check_positive(min_size, "min_size", integer=True, allow_zero=True)

    rng = rng_from(seed)
    rng_geo, rng_img, rng_noise = _child(rng), _child(rng), _child(rng)
    if noise_seed is not None:
        rng_noise = rng_from(noise_seed)
    Z, Y, X = shape
    step = 1.0                                               # path sampling during deposition
    sink = _FIBRE_SINK if touching else 0.0
    bend = _FIBRE_BEND                                        # max curvature 2 * bend (stiffness)
    gap = 0.0 if touching else 2.0
    kappa = 0.0 if orientation_spread > 50 else 1.0 / max(orientation_spread, 1e-3) ** 2
    orientation = rng_geo.uniform(0, np.pi)

    # ---- deposition on a height map -----------------------------------------------------
    # H is the top surface of the mat so far. A new fibre (deposited round, pressed
    # later) rests where its lower surface first meets H: for each centreline
    # sample, the highest H + profile over its footprint, profile being the height of
    # its circular cross-section at lateral distance rho.
    pad = int(np.ceil(rhi + gap)) + 2
    # a gently rough former (wire) surface, so the first layer is not perfectly flat
    H = (0.3 * rhi * _noise((Y + 2 * pad, X + 2 * pad), 12.0, rng_geo)).astype(np.float32)
    curves, radii, is_hollow = [], [], []
    for _ in range(n_fibres):
        r = rng_geo.uniform(rlo, rhi)
        for _attempt in range(20):                             # redraw lines that only graze a corner
            path = _fibre_path_2d((Y, X), rng_geo, step, curvature, orientation, kappa, reach=0.5 * r)
            if len(path) >= 8:
                break
        if len(path) < 4:
            continue
        re = (_FIBRE_CONTACT if touching else 1.0) * r + gap      # lateral reach of the contact test
        k = int(np.ceil(re))
        oy, ox = np.mgrid[-k:k + 1, -k:k + 1]
        oy, ox = oy.ravel(), ox.ravel()
        base = np.round(path).astype(np.intp)
        qy = np.clip(base[:, :1] + oy[None] + pad, 0, H.shape[0] - 1)   # (L, K)
        qx = np.clip(base[:, 1:] + ox[None] + pad, 0, H.shape[1] - 1)
        rho2 = (base[:, :1] + oy[None] - path[:, :1]) ** 2 + (base[:, 1:] + ox[None] - path[:, 1:]) ** 2
        prof = (r + gap) * np.sqrt(np.clip(1 - rho2 / re**2, 0, None))
        prof[rho2 > re**2] = -np.inf
        z_req = np.max(H[qy, qx] + prof, axis=1) - sink * r
        z_req = np.maximum(z_req, r)                           # not below the floor
        # bending stiffness: the lowest profile above z_req whose curvature stays below
        # `bend` (a grey dilation by a parabola): a fibre drapes over the ones it
        # crosses and lies flat elsewhere
        half = int(min(len(z_req), np.sqrt(np.ptp(z_req) / bend) / step + 2))
        para = -bend * (step * np.arange(-half, half + 1, dtype=np.float64)) ** 2
        zc = ndi.grey_dilation(z_req, structure=para, mode="nearest")
        zc = ndi.gaussian_filter1d(zc, 2.0 / step, mode="nearest")
        zc = np.maximum(zc, z_req - 0.1 * r)
        # the new top surface
        inn = rho2 <= r**2
        top = zc[:, None] + r * np.sqrt(np.clip(1 - rho2 / r**2, 0, None))
        np.maximum.at(H, (qy[inn], qx[inn]), top[inn].astype(np.float32))
        curves.append(np.column_stack([zc, path]))
        radii.append(r)
        # only fibres thick enough (after pressing) to keep a lumen with solid walls
        is_hollow.append(bool(rng_geo.random() < hollow) and r / flatten >= 1.9)
    # press the mat along z (calendering): heights and cross-sections shrink by
    # 1/flatten, an affine map, so fibres that did not overlap still do not
    for c in curves:
        c[:, 0] /= flatten
    # centre the mat in z (a thick mat overflows the volume and is cut)
    z_all = np.concatenate([c[:, 0] for c in curves])
    zmin, zmax = (z_all.min() - rhi / flatten), (z_all.max() + rhi / flatten)
    shift = (Z - 1) / 2.0 - (zmin + zmax) / 2.0 + rng_geo.uniform(-0.05, 0.05) * Z
    for c in curves:
        c[:, 0] += shift

    # ---- rasterise: nearest centreline sample via a distance transform ------------------
    # densify the centrelines to 0.5 voxel spacing so their seed voxels form unbroken lines
    curves = [np.stack([np.interp(np.arange(0, len(c) - 0.75, 0.5), np.arange(len(c)), c[:, a])
                        for a in range(3)], axis=1) for c in curves]
    P = np.concatenate(curves, axis=0)
    fid = np.concatenate([np.full(len(c), i, np.int32) for i, c in enumerate(curves)])
    tang = np.concatenate([np.gradient(c, axis=0) for c in curves], axis=0)
    tang /= np.linalg.norm(tang, axis=1, keepdims=True) + 1e-12
    e = int(np.ceil(rhi)) + 2
    pshape = (Z + 2 * e, Y + 2 * e, X + 2 * e)
    q = np.round(P).astype(np.intp) + e
    ok = np.all((q >= 0) & (q < np.array(pshape)), axis=1)
    seeds = np.full(pshape, -1, np.int32)
    idx_ok = np.nonzero(ok)[0]
    seeds[q[ok, 0], q[ok, 1], q[ok, 2]] = idx_ok.astype(np.int32)
    ind = ndi.distance_transform_edt(seeds < 0, return_distances=False, return_indices=True)
    crop = (slice(e, e + Z), slice(e, e + Y), slice(e, e + X))
    d2 = np.zeros(shape, np.int32)
    for a, n in enumerate(shape):
        g = np.arange(e, e + n, dtype=np.int32).reshape([-1 if b == a else 1 for b in range(3)])
        d2 += (ind[a][crop] - g) ** 2
    cand = np.nonzero(d2 <= (rhi + 1.0) ** 2)
    del d2
    owner_vox = tuple(ind[a][crop][cand] for a in range(3))
    del ind
    owner = seeds[owner_vox]                                   # centreline sample index per voxel
    vox = np.stack(cand, axis=1).astype(np.float32)
    off = vox - P[owner].astype(np.float32)
    t_ = tang[owner].astype(np.float32)
    off -= np.sum(off * t_, axis=1, keepdims=True) * t_        # perpendicular part
    # cross-section frame: n1 horizontal (in-plane normal), n2 = t x n1 (mostly z)
    n1 = np.stack([np.zeros(len(t_), np.float32), -t_[:, 2], t_[:, 1]], axis=1)
    n1 /= np.linalg.norm(n1, axis=1, keepdims=True) + 1e-6
    n2 = np.cross(t_, n1)
    a1 = np.sum(off * n1, axis=1)
    a2 = np.sum(off * n2, axis=1)
    f = fid[owner]
    rad = np.asarray(radii, np.float32)[f]
    d_eff = np.sqrt(a1**2 + (flatten * a2) ** 2)
    inside = d_eff <= rad
    # lumen: a flattened slit (collapsed fibre) that leaves walls >= ~1.3 voxels thick,
    # so each fibre stays one face-connected piece
    lz = np.maximum(rad / flatten - 1.3, 1e-3)
    lumen = inside & np.asarray(is_hollow)[f] & ((a1 / (0.5 * rad)) ** 2 + (a2 / lz) ** 2 < 1)
    wall = inside & ~lumen
    lab0 = np.zeros(shape, np.int32)
    lab0[tuple(c[wall] for c in cand)] = f[wall] + 1
    owner_full = np.full(shape, -1, np.int32)
    owner_full[tuple(c[wall] for c in cand)] = owner[wall]
    del cand, vox, off, t_, n1, n2, a1, a2, owner, f, rad, d_eff

    # ---- one face-connected component per label -----------------------------------------
    from skimage.measure import label as cc_label
    comp = cc_label(lab0, background=0, connectivity=1)
    n_comp = int(comp.max())
    sizes = np.bincount(comp.ravel(), minlength=n_comp + 1)
    comp_fibre = np.zeros(n_comp + 1, np.int64)
    comp_fibre[comp.ravel()] = lab0.ravel()
    keep = [c for c in range(1, n_comp + 1) if sizes[c] >= max(min_size, 1)]
    keep.sort(key=lambda c: (comp_fibre[c], -sizes[c], c))
    lut = np.zeros(n_comp + 1, np.int32)
    lut[keep] = np.arange(1, len(keep) + 1, dtype=np.int32)
    labels = lut[comp]
    lo = np.full(len(keep) + 1, np.iinfo(np.int32).max, np.int64)
    hi = np.full(len(keep) + 1, -1, np.int64)
    m = labels > 0
    np.minimum.at(lo, labels[m], owner_full[m])
    np.maximum.at(hi, labels[m], owner_full[m])
    centrelines = [P[lo[i]:hi[i] + 1].copy() for i in range(1, len(keep) + 1)]
    src = [int(comp_fibre[c]) - 1 for c in keep]
    del comp, owner_full

    # ---- grey values --------------------------------------------------------------------
    img = np.full(shape, 0.08, np.float32)
    per_fibre = (0.55 + 0.04 * rng_img.standard_normal(len(curves) + 1)).astype(np.float32)
    per_fibre[0] = 0.08
    tex = _noise(shape, 1.2, rng_img, coarse_sigma=0.6)
    fm = labels > 0                                            # dropped small pieces stay air
    img[fm] = per_fibre[lab0[fm]] + 0.03 * tex[fm]
    img += 0.01 * tex
    noisy, clean = _finish(img, noise, rng_noise, blur, phase_contrast)
    info = {
        "n_fibres": len(keep),
        "centrelines": centrelines,
        "radii": np.asarray([radii[s] for s in src], np.float32),
        "hollow": np.asarray([is_hollow[s] for s in src], bool),
        "source_fibre": np.asarray(src, np.int32),
        "clean": clean,
        "params": dict(shape=shape, seed=seed if isinstance(seed, numbers.Integral) else None,
                       n_fibres=n_fibres, radius=(rlo, rhi), noise=noise, blur=blur,
                       touching=touching, flatten=flatten, hollow=hollow, curvature=curvature,
                       orientation_spread=orientation_spread, phase_contrast=phase_contrast,
                       min_size=min_size, noise_seed=noise_seed),
    }
    return Phantom(noisy, labels, info)


# --------------------------------------------------------------------------------------
# 3. displacement fields
# --------------------------------------------------------------------------------------
_FIELD_OPTIONS = {
    "uniform": ("direction",),
    "star": ("component", "wave_axis", "period_axis", "period"),
    "power": ("axis", "component", "exponent"),
    "spherical": ("centre", "sigma", "contract"),
    "random_smooth": ("sigma",),
    "shear_band": ("normal", "direction", "width", "centre"),
    "mixed": ("kinds", "n_terms"),
}


def _axis(value, name, ndim):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not -ndim <= value < ndim:
        raise ValueError(f"{name}: expected an axis index in [{-ndim}, {ndim - 1}], got {value!r}")
    return int(value) % ndim


def _unit(vec, name, ndim):
    v = as_array(vec, name, ndim=1).astype(np.float64)
    if v.shape != (ndim,) or not np.linalg.norm(v) > 0:
        raise ValueError(f"{name}: expected a non-zero vector of {ndim} components (z, y, x order), got {vec!r}")
    return v / np.linalg.norm(v)


def _random_unit(rng, ndim):
    v = rng.standard_normal(ndim)
    return v / np.linalg.norm(v)


def _coords(shape):
    return [np.arange(n, dtype=np.float64).reshape([-1 if a == i else 1 for a in range(len(shape))])
            for i, n in enumerate(shape)]


def _field_raw(shape, kind, rng, opts, amp=1.0):
    """Unscaled field (float64 list of components) of one kind."""
    nd = len(shape)
    X = _coords(shape)
    full = lambda a: np.broadcast_to(a, shape).astype(np.float64)  # noqa: E731
    if kind == "uniform":
        d = _unit(opts["direction"], "direction", nd) if opts.get("direction") is not None else _random_unit(rng, nd)
        return [np.full(shape, d[i]) for i in range(nd)]
    if kind == "star":
        comp = _axis(opts.get("component", -2), "component", nd)
        wave = _axis(opts.get("wave_axis", -2), "wave_axis", nd)
        pax = _axis(opts.get("period_axis", -1), "period_axis", nd)
        if wave == pax:
            raise ValueError("period_axis: must differ from wave_axis")
        # default shortest period: 8 voxels, or longer so that |grad u| <= 0.7 (no folding)
        lo_default = min(max(8.0, 2 * np.pi * amp / 0.7), float(shape[pax]))
        period = opts.get("period", (lo_default, float(shape[pax])))
        plo, phi_ = _check_range(period, "period")
        P = plo + (phi_ - plo) * X[pax] / max(shape[pax] - 1, 1)
        phase = rng.uniform(-0.5, 0.5) * plo
        c = (shape[wave] - 1) / 2.0 + phase
        out = [np.zeros(shape) for _ in range(nd)]
        out[comp] = full(np.sin(2 * np.pi * (X[wave] - c) / P))
        return out
    if kind == "power":
        ax = _axis(opts.get("axis", -1), "axis", nd)
        comp = _axis(opts.get("component", ax), "component", nd)
        p = opts.get("exponent", 2.0)
        check_positive(p, "exponent")
        out = [np.zeros(shape) for _ in range(nd)]
        out[comp] = full((X[ax] / max(shape[ax] - 1, 1)) ** p)
        return out
    if kind == "spherical":
        if opts.get("centre") is not None:
            c = as_array(opts["centre"], "centre", ndim=1).astype(np.float64)
            if c.shape != (nd,):
                raise ValueError(f"centre: expected {nd} coordinates, got shape {c.shape}")
        else:
            c = np.array([rng.uniform(0.35, 0.65) * (n - 1) for n in shape])
        sigma = opts.get("sigma") or 0.25 * min(shape)
        check_positive(sigma, "sigma")
        r2 = sum((X[i] - c[i]) ** 2 for i in range(nd))
        g = np.exp(-r2 / (2 * sigma**2)) * (-1.0 if opts.get("contract", False) else 1.0)
        return [full((X[i] - c[i]) * g) for i in range(nd)]
    if kind == "random_smooth":
        sigma = opts.get("sigma") or max(3.0, min(shape) / 6.0)
        check_positive(sigma, "sigma")
        return [_noise(shape, sigma, rng).astype(np.float64) for _ in range(nd)]
    if kind == "shear_band":
        if opts.get("normal") is not None:
            n = _unit(opts["normal"], "normal", nd)
        else:  # inclined 20..70 degrees from the first axis
            tilt = np.deg2rad(rng.uniform(20, 70))
            n = np.zeros(nd)
            n[0] = np.cos(tilt)
            n[1:] = np.sin(tilt) * _random_unit(rng, nd - 1)
        if opts.get("direction") is not None:
            t = _unit(opts["direction"], "direction", nd)
            t = t - np.dot(t, n) * n
            if np.linalg.norm(t) < 1e-6:
                raise ValueError("direction: must not be parallel to the band normal")
            t /= np.linalg.norm(t)
        else:
            t = _random_unit(rng, nd)
            t -= np.dot(t, n) * n
            t /= np.linalg.norm(t)
        width = opts.get("width") or max(1.5, 0.04 * min(shape))
        check_positive(width, "width")
        if opts.get("centre") is not None:
            c = as_array(opts["centre"], "centre", ndim=1).astype(np.float64)
            if c.shape != (nd,):
                raise ValueError(f"centre: expected {nd} coordinates, got shape {c.shape}")
        else:
            c = np.array([rng.uniform(0.4, 0.6) * (m - 1) for m in shape])
        d = sum((X[i] - c[i]) * n[i] for i in range(nd))
        prof = np.tanh(d / width)
        return [full(prof * t[i]) for i in range(nd)]
    if kind == "mixed":
        base = tuple(k for k in FIELD_KINDS if k != "mixed")
        kinds = opts.get("kinds")
        if kinds is None:
            n_terms = check_positive(opts.get("n_terms", 3), "n_terms", integer=True)
            kinds = [base[i] for i in rng.choice(len(base), size=min(n_terms, len(base)), replace=False)]
        else:
            if isinstance(kinds, str):
                kinds = [kinds]
            for k in kinds:
                check_choice(k, "kinds", base)
        out = [np.zeros(shape) for _ in range(nd)]
        for k in kinds:
            comp = _field_raw(shape, k, _child(rng), {}, amp)
            norm = np.sqrt(sum(c**2 for c in comp)).max()
            w = rng.uniform(0.3, 1.0) / (norm if norm > 0 else 1.0)
            for i in range(nd):
                out[i] += w * comp[i]
        return out
    raise AssertionError(kind)  # pragma: no cover


def displacement_field(shape, kind="star", max_amplitude=2.0, seed=0, **kwargs):
    """A known displacement field of a given family, for DVC ground truth.

    The field is rescaled so that the largest vector norm over all voxels equals
    ``max_amplitude`` exactly (up to float32 rounding), whatever the kind.

    Parameters
    ----------
    shape : tuple of 2 or 3 int
        Spatial shape ``(z, y, x)`` (or ``(y, x)``).
    kind : str
        One of :data:`FIELD_KINDS`:

        * ``"uniform"``: rigid translation, random direction (``direction=``).
        * ``"star"``: like the DIC-challenge star images: component
          ``component`` (default y, ``-2``) varies as a sine along ``wave_axis``
          (default y) whose period grows linearly along ``period_axis`` (default
          x) over ``period=(p0, shape[period_axis])`` voxels -- tests spatial
          resolution. The default ``p0 = max(8, 2 pi max_amplitude / 0.7)``
          keeps ``|grad u| <= 0.7`` so the map does not fold.
        * ``"power"``: ``u_component = (x_axis / L) ** exponent`` (defaults:
          axis x, component = axis, exponent 2): a curved, non-uniform strain.
        * ``"spherical"``: radial expansion (``contract=True``: contraction)
          ``(x - centre) * exp(-r**2 / 2 sigma**2)`` around ``centre`` (random
          near the middle), ``sigma`` = 0.25 * min(shape).
        * ``"random_smooth"``: Gaussian-filtered white noise per component,
          correlation length ``sigma`` (default min(shape) / 6).
        * ``"shear_band"``: a localised shear band: ``tanh(d / width)`` times an
          in-plane direction, ``d`` the signed distance to an inclined plane
          (``normal``, ``direction``, ``width``, ``centre``).
        * ``"mixed"``: a random weighted sum of ``n_terms=3`` other kinds (or
          the list ``kinds``), each normalised first.
    max_amplitude : float >= 0
        Maximum displacement norm (voxels).
    seed : int or numpy.random.Generator
        Random seed (directions, centres, phases, noise).
    **kwargs
        Options of the chosen kind (listed above); others raise ``TypeError``.

    Returns
    -------
    ndarray of float32, shape ``(ndim, *shape)``
        Components ordered ``(z, y, x)``; Lagrangian (see :func:`deform`).

    Examples
    --------
    >>> u = displacement_field((16, 32, 32), "spherical", max_amplitude=1.5, seed=0)
    >>> u.shape, u.dtype
    ((3, 16, 32, 32), dtype('float32'))
    >>> round(float(np.sqrt((u ** 2).sum(0)).max()), 4)
    1.5
    """
    shape = _check_shape(shape, "shape", ndims=(2, 3), min_size=2)
    check_choice(kind, "kind", FIELD_KINDS)
    check_positive(max_amplitude, "max_amplitude", allow_zero=True)
    for key in kwargs:
        if key not in _FIELD_OPTIONS[kind]:
            accepted = ", ".join(_FIELD_OPTIONS[kind]) or "none"
            raise TypeError(f"{key}: not an option of kind {kind!r} (accepted: {accepted})")
    rng = rng_from(seed)
    comps = _field_raw(shape, kind, rng, kwargs, float(max_amplitude))
    u = np.stack(comps)
    norm = np.sqrt((u**2).sum(0)).max()
    if max_amplitude == 0 or norm == 0:
        return np.zeros((len(shape),) + shape, np.float32)
    u *= max_amplitude / norm
    return u.astype(np.float32)


# --------------------------------------------------------------------------------------
# 4. applying displacements
# --------------------------------------------------------------------------------------
def _check_field(volume, u, vname="volume"):
    vol = as_array(volume, vname, ndim=(2, 3))
    u = as_array(u, "u", ndim=vol.ndim + 1)
    if u.shape != (vol.ndim,) + vol.shape:
        raise ValueError(f"u: expected shape {(vol.ndim,) + vol.shape} (one component per axis of "
                         f"{vname} {vol.shape}), got {u.shape}")
    return vol, u


def _out_dtype(vol, order):
    if order == 0:
        return vol.dtype
    return np.float64 if vol.dtype == np.float64 else np.float32


def _inverse_coords(u, n_iter=50, tol=1e-3):
    """Sampling coordinates ``y - v(y)`` with ``v(y) = u(y - v(y))`` (fixed point).

    If ``u`` maps fixed to moving (``x -> x + u(x)``), sampling the fixed volume at
    these coordinates builds the moving one. Voxels stop iterating once their
    update falls below ``tol``, so sharp local features (shear bands) cost little.
    """
    nd, shape = u.shape[0], u.shape[1:]
    grid = np.indices(shape, dtype=np.float32).reshape(nd, -1)
    v = u.astype(np.float32, copy=True).reshape(nd, -1)
    active = np.arange(v.shape[1])
    change = np.zeros(0, np.float32)
    for _ in range(n_iter):
        coords = grid[:, active] - v[:, active]
        v_new = np.stack([ndi.map_coordinates(u[c], coords, order=1, mode="nearest") for c in range(nd)])
        change = np.abs(v_new - v[:, active]).max(axis=0)
        v[:, active] = v_new
        active = active[change >= tol]
        if active.size == 0:
            break
    if active.size:
        import warnings
        warnings.warn(f"u: inverting the displacement did not converge in {n_iter} iterations for "
                      f"{active.size} voxels (last change {float(change.max()):.3g} voxels); the map "
                      "x -> x + u(x) may fold (|grad u| >= 1)", RuntimeWarning, stacklevel=3)
    return (grid - v).reshape((nd,) + tuple(shape))


def deform(volume, u, order=1, mode="nearest", *, cval=0.0, n_iter=50, tol=1e-3):
    """Apply a Lagrangian displacement: return the moving volume.

    The material at ``x`` in ``volume`` (the fixed volume) is moved to
    ``x + u(x)``, so the result satisfies ``moving(x + u(x)) ~= fixed(x)`` -- the
    convention of :func:`skimage.registration.optical_flow_tvl1`
    (``optical_flow_tvl1(fixed, moving)`` returns approximately ``u``). The field
    is inverted with a fixed-point iteration, ``moving(y) = fixed(y - v(y))`` with
    ``v(y) = u(y - v(y))``, so large and non-uniform displacements are handled
    (as long as the map ``x -> x + u(x)`` does not fold, i.e. ``|grad u| < 1``).

    Parameters
    ----------
    volume : ndarray, 2D or 3D
        The fixed image or volume.
    u : ndarray, shape ``(volume.ndim, *volume.shape)``
        Displacement in voxels, components in axis order ``(z, y, x)``.
    order : int
        Spline order of the final interpolation (0 for label maps).
    mode : str
        How to fill outside the volume (:func:`scipy.ndimage.map_coordinates`).
    cval : float
        Fill value for ``mode="constant"``.
    n_iter, tol : int, float
        Fixed-point iterations and stopping tolerance (voxels) of the
        inversion; a ``RuntimeWarning`` says when some voxels did not converge
        (a folding field).

    Returns
    -------
    ndarray
        The moving volume, float32 (input dtype for ``order=0``).

    See Also
    --------
    warp : the backward warp, ``warp(moving, u) ~= fixed``.

    Examples
    --------
    >>> fixed = np.zeros((8, 16, 16), np.float32); fixed[:, :, 5] = 1
    >>> u = np.zeros((3, 8, 16, 16), np.float32); u[2] = 2.0     # +2 voxels along x
    >>> moving = deform(fixed, u)
    >>> int(np.argmax(moving[4, 8]))
    7
    """
    vol, u = _check_field(volume, u)
    order = _check_order(order)
    check_choice(mode, "mode", _MODES)
    n_iter = check_positive(n_iter, "n_iter", integer=True)
    check_positive(tol, "tol")
    coords = _inverse_coords(u, n_iter, tol)
    return ndi.map_coordinates(vol, coords, order=order, mode=mode, cval=cval, output=_out_dtype(vol, order))


def warp(volume, u, order=1, mode="nearest", *, cval=0.0):
    """Backward warp: return ``volume(x + u(x))``.

    With the Lagrangian convention of :func:`deform`, ``warp(moving, u)`` brings
    the moving volume back onto the fixed one; the residual
    ``warp(moving, u_estimated) - fixed`` is the usual DVC quality check.

    Parameters
    ----------
    volume : ndarray, 2D or 3D
        Volume to sample (usually the moving volume).
    u : ndarray, shape ``(volume.ndim, *volume.shape)``
        Displacement in voxels, components ``(z, y, x)``.
    order : int
        Spline order (0 for label maps).
    mode : str
        Boundary mode of :func:`scipy.ndimage.map_coordinates`.
    cval : float
        Fill value for ``mode="constant"``.

    Returns
    -------
    ndarray
        float32 (input dtype for ``order=0``), same shape as ``volume``.

    Examples
    --------
    >>> f = np.random.default_rng(0).random((8, 24, 24)).astype(np.float32)
    >>> u = np.zeros((3, 8, 24, 24), np.float32); u[1] = -3.0
    >>> bool(np.allclose(warp(deform(f, u), u)[:, 5:-5], f[:, 5:-5]))
    True
    """
    vol, u = _check_field(volume, u)
    order = _check_order(order)
    check_choice(mode, "mode", _MODES)
    coords = np.indices(vol.shape, dtype=np.float32) + u.astype(np.float32, copy=False)
    return ndi.map_coordinates(vol, coords, order=order, mode=mode, cval=cval, output=_out_dtype(vol, order))


# --------------------------------------------------------------------------------------
# 5. histology and planar sections
# --------------------------------------------------------------------------------------
# optical-density stain vectors (R, G, B), Ruifrok & Johnston style
_STAIN_VECTORS = {
    "he": {"a": (0.65, 0.70, 0.29),      # haematoxylin: nuclei, degradation products
           "b": (0.07, 0.99, 0.11),      # eosin: bone matrix, cytoplasm
           "c": (0.27, 0.57, 0.78)},     # brown deposits (corrosion products)
    "trichrome": {"a": (0.55, 0.60, 0.60),   # iron haematoxylin: nuclei
                  "b": (0.85, 0.35, 0.25),   # light green / aniline blue: bone, collagen
                  "c": (0.10, 0.85, 0.70)},  # acid fuchsin: cytoplasm, soft tissue (red)
}
# stain concentrations (a, b, c) per class: background, soft tissue, bone, implant, degradation
_STAIN_CONC = {
    "he": np.array([[0.0, 0.01, 0.0], [0.12, 0.32, 0.0], [0.08, 0.95, 0.02], [0.0, 0.0, 0.0],
                    [0.85, 0.40, 0.55]]),
    "trichrome": np.array([[0.0, 0.01, 0.0], [0.08, 0.15, 0.55], [0.05, 0.95, 0.05], [0.0, 0.0, 0.0],
                           [0.9, 0.25, 0.35]]),
}


def histology(ct_slice, labels, seed=0, stain="he", deformation=2.0, *, compression=0.03, implant="opaque",
              nuclei=0.02):
    """A stained-histology-like RGB image of a CT slice, for virtual histology.

    Colours follow the tissue class (``labels``, the classes of
    :func:`bone_implant`), not the CT grey value: each class gets stain
    concentrations of haematoxylin/eosin (``"he"``: bone pink, soft tissue light
    pink with purple nuclei, degradation layer dark purple-brown) or of a Masson
    trichrome (``"trichrome"``: bone green-blue, soft tissue red), modulated by
    staining inhomogeneity, fibrous texture, nuclei and osteocyte lacunae and a
    weak non-monotonic dependence on bone mineralisation. Colour is therefore no
    linear function of CT intensity; registering it to CT needs e.g. mutual
    information. The implant is opaque grey-black (ground section with the metal
    kept) or missing (paraffin section: white, with the tissue torn around it).
    Finally the section is distorted like a real cut: a smooth elastic field plus
    a slight compression along one random axis.

    Parameters
    ----------
    ct_slice : ndarray, 2D
        CT slice (e.g. ``bone_implant(...).image[z]``).
    labels : ndarray of int, 2D
        Classes 0..4 of that slice (background, soft tissue, bone, implant,
        degradation).
    seed : int or numpy.random.Generator
        Random seed.
    stain : {"he", "trichrome"}
        Staining.
    deformation : float >= 0
        Maximum norm (pixels) of the elastic part of the sectioning deformation.
    compression : float in [0, 0.5)
        Relative shrinkage along one random axis (about the image centre).
    implant : {"opaque", "missing"}
        Appearance of the implant.
    nuclei : float in [0, 1]
        Density of cell nuclei in soft tissue (per pixel).

    Returns
    -------
    rgb : ndarray of float32, shape (H, W, 3), values in [0, 1]
        The deformed histology image.
    info : dict
        ``displacement`` (float32 ``(2, H, W)``, Lagrangian from the CT slice
        to the histology image: ``warp(rgb[..., c], displacement)`` ~= the
        undeformed image, which is ``undeformed``), ``elastic`` (its elastic
        part), ``compression``, ``compression_axis``, ``labels`` (class map
        in histology geometry), ``stain``, ``classes``.

    Examples
    --------
    >>> ph = bone_implant((32, 48, 48), seed=0)
    >>> rgb, info = histology(ph.image[16], ph.labels[16], seed=0)
    >>> rgb.shape, rgb.dtype, info["displacement"].shape
    ((48, 48, 3), dtype('float32'), (2, 48, 48))
    """
    ct = as_array(ct_slice, "ct_slice", ndim=2, dtype=np.float32)
    lab = as_array(labels, "labels", ndim=2)
    if lab.shape != ct.shape:
        raise ValueError(f"labels: shape {lab.shape} differs from ct_slice shape {ct.shape}")
    if lab.dtype.kind not in "iub":
        raise TypeError(f"labels: expected an integer class map, got dtype {lab.dtype}")
    if lab.min() < 0 or lab.max() > 4:
        raise ValueError(f"labels: classes must be in 0..4 ({', '.join(BONE_CLASSES)}), "
                         f"got values {int(lab.min())}..{int(lab.max())}")
    check_choice(stain, "stain", tuple(_STAIN_VECTORS))
    check_positive(deformation, "deformation", allow_zero=True)
    check_positive(compression, "compression", allow_zero=True)
    if compression >= 0.5:
        raise ValueError(f"compression: must be < 0.5, got {compression!r}")
    check_choice(implant, "implant", ("opaque", "missing"))
    nuclei = _check_fraction(nuclei, "nuclei")
    if min(ct.shape) < 8:
        raise ValueError(f"ct_slice: needs at least 8 x 8 pixels, got {ct.shape}")

    rng = rng_from(seed)
    r_tex, r_def, r_noise = _child(rng), _child(rng), _child(rng)
    lab = lab.astype(np.intp)
    shape = ct.shape
    conc = _STAIN_CONC[stain][lab].astype(np.float32)          # (H, W, 3)
    conc = np.moveaxis(conc, -1, 0).copy()                       # (3, H, W): a, b, c
    soft, bone, deg, imp = (lab == 1), (lab == 2), (lab == 4), (lab == 3)

    # staining inhomogeneity (large scale) and fine texture, independent per stain
    for i in range(3):
        conc[i] *= np.clip(1 + 0.15 * _noise(shape, 0.15 * min(shape), r_tex) + 0.12 * _noise(shape, 1.0, r_tex),
                           0.2, None)
    # fibrous texture of soft tissue (anisotropic), mottled degradation products
    fib = ndi.gaussian_filter(r_tex.standard_normal(shape).astype(np.float32), (0.6, 3.0))
    fib = ndi.rotate(fib, r_tex.uniform(0, 180), reshape=False, mode="wrap", order=1)
    fib /= fib.std() + 1e-6
    ib = 2 if stain == "trichrome" else 1                       # the soft-tissue counterstain
    conc[ib][soft] *= np.clip(1 + 0.35 * fib[soft], 0.2, None)
    mott = _noise(shape, 1.5, r_tex)
    conc[:, deg] *= np.clip(1 + 0.35 * mott[deg], 0.2, None)
    # nuclei (soft tissue) and osteocyte lacunae (bone): small haematoxylin dots
    dots = ndi.gaussian_filter((r_tex.random(shape) < nuclei).astype(np.float32), 0.8) * 8
    lac = ndi.gaussian_filter((r_tex.random(shape) < nuclei / 4).astype(np.float32), 0.7) * 6
    conc[0] += np.where(soft, np.clip(dots, 0, 1.2), 0) + np.where(bone, np.clip(lac, 0, 0.8), 0)
    # weak, non-monotonic dependence on mineralisation inside bone
    if bone.any():
        lo, hi = np.percentile(ct[bone], (2, 98))
        cn = np.clip((ct - lo) / max(hi - lo, 1e-6), 0, 1)
        conc[1][bone] *= (1 + 0.25 * np.sin(2 * np.pi * 1.5 * cn[bone]))
    od = np.zeros(shape + (3,), np.float32)
    vecs = _STAIN_VECTORS[stain]
    for i, key in enumerate("abc"):
        od += conc[i][..., None] * np.asarray(vecs[key], np.float32)
    if implant == "opaque":
        od[imp] = (2.0 + 0.15 * mott[imp])[:, None] * np.array([1.0, 1.02, 0.98], np.float32)
    else:
        # metal removed; the tissue next to it tore away in places
        dist = ndi.distance_transform_edt(~imp) if imp.any() else np.full(shape, np.inf)
        tear = (dist <= 1.0 + 3.0 * np.clip(_noise(shape, 4.0, r_tex), 0, None)) & (lab != 0)
        od[imp | tear] = 0.01
    od = ndi.gaussian_filter(od, (0.5, 0.5, 0))
    rgb = np.exp(-od)
    # illumination vignetting and camera noise
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    rr = ((yy - shape[0] / 2) / shape[0]) ** 2 + ((xx - shape[1] / 2) / shape[1]) ** 2
    rgb *= (1 - 0.08 * rr)[..., None]
    rgb += 0.01 * r_noise.standard_normal(rgb.shape).astype(np.float32)
    undeformed = np.clip(rgb, 0, 1).astype(np.float32)

    # sectioning deformation: elastic + compression along one axis
    elastic = displacement_field(shape, "random_smooth", deformation, seed=r_def, sigma=max(4.0, min(shape) / 5))
    axis = int(r_def.integers(2))
    u = elastic.astype(np.float32).copy()
    centre = (shape[axis] - 1) / 2.0
    coord = np.arange(shape[axis], dtype=np.float32) - centre
    u[axis] += (-compression * coord).reshape([-1, 1] if axis == 0 else [1, -1])
    coords = _inverse_coords(u)
    out = np.stack([ndi.map_coordinates(undeformed[..., c], coords, order=1, mode="constant", cval=1.0)
                    for c in range(3)], axis=-1)
    lab_def = ndi.map_coordinates(lab.astype(np.int32), coords, order=0, mode="constant", cval=0).astype(lab.dtype)
    info = {
        "displacement": u,
        "elastic": elastic,
        "compression": float(compression),
        "compression_axis": axis,
        "labels": lab_def,
        "undeformed": undeformed,
        "stain": stain,
        "implant": implant,
        "classes": list(BONE_CLASSES),
    }
    return np.clip(out, 0, 1).astype(np.float32), info


def _check_rotation(normal_or_rotation):
    R = as_array(normal_or_rotation, "normal_or_rotation", ndim=(1, 2)).astype(np.float64)
    if R.shape == (3,):
        n = R / (np.linalg.norm(R) or np.nan)
        if not np.all(np.isfinite(n)):
            raise ValueError("normal_or_rotation: the normal vector is zero")
        # in-plane rows axis: the y axis projected onto the plane (x if y is the normal)
        ref = np.array([0.0, 1.0, 0.0]) if abs(n[1]) < 0.9 else np.array([0.0, 0.0, 1.0])
        v = ref - np.dot(ref, n) * n
        v /= np.linalg.norm(v)
        w = np.cross(n, v)
        return np.stack([n, v, w])
    if R.shape != (3, 3):
        raise ValueError(f"normal_or_rotation: expected a normal (3,) or a rotation (3, 3), got shape {R.shape}")
    if not np.allclose(R @ R.T, np.eye(3), atol=1e-4):
        raise ValueError("normal_or_rotation: the 3 x 3 matrix is not orthonormal (R @ R.T != I)")
    return R


def oblique_slice(volume, origin, normal_or_rotation, shape=None, order=1, *, mode="constant", cval=0.0,
                  return_coords=False):
    """Sample a 2D slice on an arbitrary plane through a volume.

    Pixel ``(i, j)`` of the slice is the volume at
    ``origin + (i - (H - 1) / 2) * R[1] + (j - (W - 1) / 2) * R[2]`` (voxel
    coordinates ``(z, y, x)``), where the **rows** of the rotation ``R`` are:
    ``R[0]`` the plane normal, ``R[1]`` the in-plane direction of increasing slice
    row (``v``), ``R[2]`` that of increasing slice column (``u``). The identity
    therefore gives the ordinary slice ``volume[z]`` when ``origin`` is its centre.

    Parameters
    ----------
    volume : ndarray, 3D
        Volume ``(z, y, x)``.
    origin : sequence of 3 float
        Plane centre in voxel coordinates ``(z, y, x)``.
    normal_or_rotation : array_like, shape (3,) or (3, 3)
        A plane normal (in-plane axes then follow y and x as closely as
        possible) or an orthonormal matrix with rows ``(normal, v, u)``.
    shape : (int, int), optional
        Slice size ``(H, W)``; default ``volume.shape[1:]``.
    order : int
        Spline order.
    mode, cval
        Outside-volume handling (:func:`scipy.ndimage.map_coordinates`).
    return_coords : bool
        Also return the sampled coordinates ``(3, H, W)``.

    Returns
    -------
    slice : ndarray of float32, shape (H, W)
    coords : ndarray of float32, shape (3, H, W)
        Only with ``return_coords=True``.

    Examples
    --------
    >>> vol = np.random.default_rng(0).random((10, 12, 14)).astype(np.float32)
    >>> s = oblique_slice(vol, (4, 5.5, 6.5), np.eye(3))
    >>> bool(np.allclose(s, vol[4]))
    True
    """
    vol = as_array(volume, "volume", ndim=3)
    o = as_array(origin, "origin", ndim=1).astype(np.float64)
    if o.shape != (3,):
        raise ValueError(f"origin: expected 3 coordinates (z, y, x), got shape {o.shape}")
    R = _check_rotation(normal_or_rotation)
    if shape is None:
        shape = vol.shape[1:]
    shape = _check_shape(shape, "shape", ndims=(2,), min_size=1)
    order = _check_order(order)
    check_choice(mode, "mode", _MODES)
    H, W = shape
    i = np.arange(H, dtype=np.float64)[:, None] - (H - 1) / 2.0
    j = np.arange(W, dtype=np.float64)[None, :] - (W - 1) / 2.0
    coords = np.stack([o[k] + i * R[1, k] + j * R[2, k] for k in range(3)]).astype(np.float32)
    out = ndi.map_coordinates(vol, coords, order=order, mode=mode, cval=cval, output=np.float32)
    return (out, coords) if return_coords else out


def _rotation_about(axis, angle):
    a = np.asarray(axis, np.float64)
    a = a / np.linalg.norm(a)
    K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(angle) * K + (1 - np.cos(angle)) * K @ K


def random_plane(volume_shape, max_tilt_deg=15.0, seed=0, *, max_spin_deg=0.0):
    """A random plane through a volume, for slice-to-volume registration tests.

    Parameters
    ----------
    volume_shape : tuple of 3 int
        Volume shape ``(z, y, x)``.
    max_tilt_deg : float in [0, 90]
        Largest angle between the plane normal and the z axis.
    seed : int or numpy.random.Generator
        Random seed.
    max_spin_deg : float >= 0
        Largest in-plane rotation about the normal.

    Returns
    -------
    origin : ndarray of float64, shape (3,)
        Plane centre ``(z, y, x)``, in the middle 40 % of each axis.
    rotation : ndarray of float64, shape (3, 3)
        Rows ``(normal, v, u)`` as in :func:`oblique_slice`.

    Examples
    --------
    >>> origin, R = random_plane((64, 64, 64), max_tilt_deg=10, seed=1)
    >>> bool(np.degrees(np.arccos(abs(R[0, 0]))) <= 10 + 1e-9)
    True
    """
    vshape = _check_shape(volume_shape, "volume_shape", min_size=1)
    check_positive(max_tilt_deg, "max_tilt_deg", allow_zero=True)
    if max_tilt_deg > 90:
        raise ValueError(f"max_tilt_deg: must be <= 90, got {max_tilt_deg!r}")
    check_positive(max_spin_deg, "max_spin_deg", allow_zero=True)
    rng = rng_from(seed)
    origin = np.array([rng.uniform(0.3, 0.7) * (n - 1) for n in vshape])
    tilt = np.deg2rad(max_tilt_deg) * np.sqrt(rng.uniform(0, 1))   # uniform over the cap (small angles)
    az = rng.uniform(0, 2 * np.pi)
    M = _rotation_about((0.0, np.cos(az), np.sin(az)), tilt)
    R = M.T.copy()                                  # rows: rotated z, y, x axes
    spin = np.deg2rad(rng.uniform(-max_spin_deg, max_spin_deg))
    if spin:
        Rs = _rotation_about(R[0], spin)
        R[1], R[2] = Rs @ R[1], Rs @ R[2]
    return origin, R
