"""Propagation-based phase contrast: Fresnel propagation, simulation from a mixed-material
phantom, and single-distance phase retrieval (Paganin's filter and a self-supervised,
physics-informed network).

Physics and conventions
-----------------------
The sample's refractive index is ``n = 1 - delta + i beta``. For a thin sample the exit
wave is ``psi = exp(-A + i phi)`` with (``k = 2 pi / lambda``)

* phase ``phi = -k * integral(delta dz)`` in radians (<= 0 for matter, 0 in air), and
* attenuation ``A = k * integral(beta dz)`` (>= 0): the contact image is ``exp(-2 A)``.

Free-space propagation over a distance ``z`` is applied in Fourier space with the Fresnel
transfer function ``H(f) = exp(-i pi lambda z |f|^2)`` (``f`` in cycles per metre; the
constant phase ``exp(i k z)`` is dropped). The detector records ``I = |psi_z|^2``
normalised by the open beam (flat field), so ``I = 1`` without a sample.

The FFT treats the image as periodic. To keep waves leaving one side from re-entering
on the other, :func:`fresnel_propagate` pads the field first (``pad="edge"``, default:
replicate the border values, which suits a sample that continues beyond the field of
view; ``"reflect"``; ``"constant"``: free space, ``psi = 1``; or ``None``: periodic) to
``pad_factor`` times its size (default 2) and crops back after propagating.

Units are explicit in every signature: ``energy_kev`` (1-500 keV), ``distance_m``
(metres, 1 um to 10 m), ``pixel_size_m`` (metres, 1 nm to 1 mm); values outside these
ranges (a unit mix-up) raise ``ValueError``. Retrieval expects flat-field-normalised
intensity: an image whose median lies outside 0.05-20 (raw counts, all zero) raises.

Examples
--------
>>> import numpy as np
>>> from tomoml_nb import phase
>>> ph = np.zeros((64, 64)); ph[20:44, 20:44] = -1.0          # a phase step of -1 rad
>>> I = np.abs(phase.fresnel_propagate(np.exp(1j * ph), 20, 0.1, 1e-6)) ** 2
>>> bool(abs(I.mean() - 1) < 0.01), bool(I.max() > 1.1)       # energy kept, edge fringes
(True, True)
"""
from __future__ import annotations

import numbers
import time

import numpy as np

from ._validate import as_array, check_choice, check_positive, rng_from

__all__ = [
    "wavelength_m", "fresnel_number", "material_delta_beta", "MATERIALS", "TABLE_ENERGIES_KEV",
    "fresnel_propagate", "simulate_phase_contrast", "mixed_material_phantom", "retrieve", "paganin",
    "METHODS", "PAD_MODES",
]

HC_KEV_M = 1.239841984e-9          # h c in keV * m: lambda[m] = HC_KEV_M / E[keV]
METHODS = ("paganin", "physics")
PAD_MODES = ("edge", "reflect", "constant", None)

# --------------------------------------------------------------------------------------
# Refractive index decrements of a few materials.
#
# delta and beta were computed (once, while writing this module) with xraydb 4.5.8
# (`xraydb.xray_delta_beta(formula, density, energy_eV)`; Elam, Ravel & Sieber, Radiat.
# Phys. Chem. 63 (2002) 121, with Chantler's anomalous scattering factors), for the
# formula and density listed. beta includes photo-absorption and coherent + incoherent
# scattering. Between tabulated energies values are interpolated log-log; the table
# starts above the K edges of every element used (Ti 4.97 keV), so the interpolation is
# smooth. Typical check: water at 20 keV, delta = 5.76e-7, beta = 2.57e-10.
# --------------------------------------------------------------------------------------
TABLE_ENERGIES_KEV = (8, 10, 12, 15, 17.5, 20, 25, 30, 35, 40, 50, 60, 80, 100, 125, 150, 200)
MATERIALS = {
    # name: (formula, density g/cm3, delta(E), beta(E))
    "water": ("H2O", 1.0,
              (3.617e-06, 2.311e-06, 1.604e-06, 1.025e-06, 7.531e-07, 5.764e-07, 3.688e-07, 2.56e-07, 1.881e-07,
               1.44e-07, 9.214e-08, 6.398e-08, 3.599e-08, 2.303e-08, 1.474e-08, 1.024e-08, 5.757e-09),
              (1.165e-08, 4.69e-09, 2.184e-09, 8.571e-10, 4.491e-10, 2.566e-10, 1.007e-10, 4.643e-11, 2.402e-11,
               1.357e-11, 5.229e-12, 2.398e-12, 7.012e-13, 2.693e-13, 1.034e-13, 4.731e-14, 1.377e-14)),
    "hydroxyapatite": ("Ca5(PO4)3OH", 3.16,
                       (1.033e-05, 6.607e-06, 4.579e-06, 2.924e-06, 2.145e-06, 1.64e-06, 1.048e-06, 7.27e-07,
                        5.338e-07, 4.084e-07, 2.612e-07, 1.813e-07, 1.02e-07, 6.524e-08, 4.174e-08, 2.899e-08,
                        1.63e-08),
                       (3.352e-07, 1.422e-07, 6.979e-08, 2.923e-08, 1.603e-08, 9.42e-09, 3.877e-09, 1.852e-09,
                        9.848e-10, 5.7e-10, 2.285e-10, 1.082e-10, 3.327e-11, 1.321e-11, 5.246e-12, 2.467e-12,
                        7.503e-13)),
    "titanium": ("Ti", 4.506,
                 (1.353e-05, 8.741e-06, 6.071e-06, 3.876e-06, 2.841e-06, 2.172e-06, 1.386e-06, 9.606e-07, 7.047e-07,
                  5.389e-07, 3.444e-07, 2.39e-07, 1.343e-07, 8.589e-08, 5.495e-08, 3.815e-08, 2.145e-08),
                 (1.111e-06, 4.844e-07, 2.398e-07, 1.014e-07, 5.599e-08, 3.347e-08, 1.397e-08, 6.72e-09, 3.597e-09,
                  2.093e-09, 8.474e-10, 4.048e-10, 1.262e-10, 5.022e-11, 1.999e-11, 9.414e-12, 2.871e-12)),
    "titanium_dioxide": ("TiO2", 4.23,
                         (1.314e-05, 8.45e-06, 5.865e-06, 3.747e-06, 2.749e-06, 2.102e-06, 1.343e-06, 9.314e-07,
                          6.836e-07, 5.23e-07, 3.344e-07, 2.321e-07, 1.305e-07, 8.348e-08, 5.342e-08, 3.709e-08,
                          2.086e-08),
                         (6.472e-07, 2.815e-07, 1.391e-07, 5.87e-08, 3.236e-08, 1.932e-08, 8.054e-09, 3.87e-09,
                          2.07e-09, 1.204e-09, 4.867e-10, 2.323e-10, 7.234e-11, 2.877e-11, 1.144e-11, 5.387e-12,
                          1.641e-12)),
    "magnesium": ("Mg", 1.738,
                  (5.645e-06, 3.599e-06, 2.493e-06, 1.591e-06, 1.168e-06, 8.931e-07, 5.709e-07, 3.962e-07, 2.909e-07,
                   2.227e-07, 1.425e-07, 9.891e-08, 5.562e-08, 3.559e-08, 2.278e-08, 1.582e-08, 8.897e-09),
                  (8.282e-08, 3.381e-08, 1.607e-08, 6.468e-09, 3.449e-09, 2.001e-09, 8.055e-10, 3.782e-10, 1.978e-10,
                   1.128e-10, 4.412e-11, 2.049e-11, 6.106e-12, 2.388e-12, 9.337e-13, 4.336e-13, 1.292e-13)),
    "magnesium_hydroxide": ("Mg(OH)2", 2.34,
                            (7.876e-06, 5.028e-06, 3.486e-06, 2.227e-06, 1.635e-06, 1.251e-06, 8.002e-07, 5.554e-07,
                             4.08e-07, 3.123e-07, 1.998e-07, 1.387e-07, 7.803e-08, 4.994e-08, 3.196e-08, 2.219e-08,
                             1.248e-08),
                            (6.331e-08, 2.575e-08, 1.218e-08, 4.868e-09, 2.585e-09, 1.494e-09, 5.975e-10, 2.793e-10,
                             1.457e-10, 8.294e-11, 3.232e-11, 1.496e-11, 4.44e-12, 1.729e-12, 6.734e-13, 3.117e-13,
                             9.243e-14)),
}
# bone_implant classes -> materials (background is air: delta = beta = 0)
IMPLANT_MATERIALS = {
    "titanium": ("water", "hydroxyapatite", "titanium", "titanium_dioxide"),
    "magnesium": ("water", "hydroxyapatite", "magnesium", "magnesium_hydroxide"),
}


# =============================================================================== validation
def _check_energy(energy_kev, name="energy_kev"):
    check_positive(energy_kev, name)
    if not 1.0 <= energy_kev <= 500.0:
        raise ValueError(f"{name}: {energy_kev!r} keV is outside the plausible X-ray range 1-500 keV "
                         f"(give the energy in keV, e.g. 20 for 20 keV)")
    return float(energy_kev)


def _check_distance(distance_m, name="distance_m"):
    check_positive(distance_m, name)
    if not 1e-6 <= distance_m <= 10.0:
        raise ValueError(f"{name}: {distance_m!r} m is outside the plausible range 1 um - 10 m; give metres, "
                         f"e.g. 0.05 for 5 cm")
    return float(distance_m)


def _check_flat_fielded(img, name="intensity"):
    """Reject an image that is not divided by the open beam (median far from 1, or all zero)."""
    med = float(np.median(img))
    if not 0.05 <= med <= 20.0:
        raise ValueError(f"{name}: median {med:.4g} is far from 1; expected a flat-field-normalised image "
                         f"(projection / open beam, about 1 where there is no sample), e.g. from "
                         f"tomo.normalize(projections, flats, darks)")


def _check_oversample(oversample, maximum=None):
    bad = isinstance(oversample, bool) or not isinstance(oversample, numbers.Integral) or oversample < 1
    if bad or (maximum is not None and oversample > maximum):
        bounds = ">= 1" if maximum is None else f"1-{maximum}"
        raise ValueError(f"oversample: must be an integer {bounds}, got {oversample!r}")
    return int(oversample)


def _check_pixel(pixel_size_m, name="pixel_size_m"):
    check_positive(pixel_size_m, name)
    if not 1e-9 <= pixel_size_m <= 1e-3:
        raise ValueError(f"{name}: {pixel_size_m!r} m is outside 1 nm - 1 mm; give metres, e.g. 1e-6 for 1 um")
    return float(pixel_size_m)


def _check_pad(pad, pad_factor):
    check_choice(pad, "pad", PAD_MODES)
    check_positive(pad_factor, "pad_factor")
    if pad_factor < 1:
        raise ValueError(f"pad_factor: must be >= 1, got {pad_factor!r}")
    return pad, float(pad_factor)


def wavelength_m(energy_kev):
    """X-ray wavelength in metres for a photon energy in keV.

    Examples
    --------
    >>> round(wavelength_m(12.398) * 1e10, 4)      # 1 Angstrom at 12.4 keV
    1.0
    """
    return HC_KEV_M / _check_energy(energy_kev)


def fresnel_number(energy_kev, distance_m, pixel_size_m):
    """Fresnel number ``pixel_size**2 / (lambda * distance)`` of one pixel.

    Values well above 1: contact regime (little phase contrast); around 0.1-1: edge
    fringes a few pixels wide (Paganin / TIE regime); well below 0.1: holographic.

    Examples
    --------
    >>> round(fresnel_number(20, 0.05, 1e-6), 3)
    0.323
    """
    lam = wavelength_m(energy_kev)
    return _check_pixel(pixel_size_m) ** 2 / (lam * _check_distance(distance_m))


def material_delta_beta(material, energy_kev):
    """``(delta, beta)`` of a tabulated material at ``energy_kev`` (log-log interpolation).

    Parameters
    ----------
    material : str
        One of :data:`MATERIALS` (``"water"``, ``"hydroxyapatite"``, ``"titanium"``,
        ``"titanium_dioxide"``, ``"magnesium"``, ``"magnesium_hydroxide"``), or ``"air"``.
    energy_kev : float
        Photon energy in keV, within the table (8-200 keV).

    Examples
    --------
    >>> d, b = material_delta_beta("water", 20)
    >>> f"{d:.3g} {b:.3g} {d / b:.0f}"
    '5.76e-07 2.57e-10 2246'
    """
    energy_kev = _check_energy(energy_kev)
    if material == "air":
        return 0.0, 0.0
    check_choice(material, "material", tuple(MATERIALS) + ("air",))
    lo, hi = TABLE_ENERGIES_KEV[0], TABLE_ENERGIES_KEV[-1]
    if not lo <= energy_kev <= hi:
        raise ValueError(f"energy_kev: {energy_kev} keV is outside the material table ({lo}-{hi} keV)")
    e = np.log(TABLE_ENERGIES_KEV)
    _, _, d, b = MATERIALS[material]
    delta = float(np.exp(np.interp(np.log(energy_kev), e, np.log(d))))
    beta = float(np.exp(np.interp(np.log(energy_kev), e, np.log(b))))
    return delta, beta


# =============================================================================== propagation
def _pad_widths(shape, pad_factor):
    return [((int(np.ceil(s * (pad_factor - 1) / 2))),) * 2 for s in shape]


def _freq_sq(shape, pixel_size_m):
    fy = np.fft.fftfreq(shape[0], d=pixel_size_m)
    fx = np.fft.fftfreq(shape[1], d=pixel_size_m)
    return fy[:, None] ** 2 + fx[None, :] ** 2


def _transfer(shape, lam, distance_m, pixel_size_m):
    """Fresnel transfer function ``exp(-i pi lambda z |f|^2)`` on an FFT grid."""
    return np.exp(-1j * np.pi * lam * distance_m * _freq_sq(shape, pixel_size_m))


def fresnel_propagate(wavefield, energy_kev, distance_m, pixel_size_m, pad="edge", pad_factor=2.0):
    """Propagate a complex wavefield over ``distance_m`` in free space (Fresnel approximation).

    Parameters
    ----------
    wavefield : array_like, complex, shape (y, x) or (n, y, x)
        Field at the sample exit plane, e.g. ``exp(-A + 1j * phi)``; a stack is
        propagated image by image.
    energy_kev : float
        Photon energy in keV (1-500).
    distance_m : float
        Propagation (sample-to-detector) distance in metres (1 um - 10 m).
    pixel_size_m : float
        Pixel size in metres (1 nm - 1 mm).
    pad : {"edge", "reflect", "constant", None}
        How the field is extended before the FFT (see the module notes): replicate the
        border, mirror it, free space (``psi = 1``), or nothing (periodic).
    pad_factor : float
        Padded size / original size per axis (>= 1; 2 avoids wrap-around for fringes up to
        half the field wide).

    Returns
    -------
    ndarray, complex128, same shape as ``wavefield``

    Examples
    --------
    >>> import numpy as np
    >>> flat = np.ones((32, 32), complex)
    >>> bool(np.allclose(fresnel_propagate(flat, 20, 1.0, 1e-6), 1))
    True
    """
    psi = np.asarray(wavefield)
    if psi.dtype.kind not in "biufc":
        raise TypeError(f"wavefield: expected a numeric (complex) array, got dtype {psi.dtype}")
    if psi.ndim not in (2, 3) or min(psi.shape[-2:]) < 2:
        raise ValueError(f"wavefield: expected a 2D image or a 3D stack, got shape {psi.shape}")
    if not np.isfinite(psi).all():
        raise ValueError("wavefield: contains NaN or infinite values")
    lam = wavelength_m(energy_kev)
    distance_m = _check_distance(distance_m)
    pixel_size_m = _check_pixel(pixel_size_m)
    pad, pad_factor = _check_pad(pad, pad_factor)
    was_2d = psi.ndim == 2
    stack = psi[None] if was_2d else psi
    H, W = stack.shape[-2:]
    widths = _pad_widths((H, W), pad_factor) if pad is not None else [(0, 0), (0, 0)]
    out = np.empty(stack.shape, np.complex128)
    for i, img in enumerate(stack):
        img = img.astype(np.complex128)
        if pad == "constant":
            img = np.pad(img, widths, mode="constant", constant_values=1.0)
        elif pad is not None:
            img = np.pad(img, widths, mode=pad)
        tf = _transfer(img.shape, lam, distance_m, pixel_size_m)
        prop = np.fft.ifft2(np.fft.fft2(img) * tf)
        out[i] = prop[widths[0][0]:widths[0][0] + H, widths[1][0]:widths[1][0] + W]
    return out[0] if was_2d else out


# =============================================================================== simulation
def _projected(arr, name, thickness_m, pixel_size_m, shape=None):
    a = as_array(arr, name, ndim=(2, 3)).astype(np.float64)
    if (a < 0).any():
        raise ValueError(f"{name}: must be >= 0 (delta and beta of matter are non-negative)")
    if a.ndim == 3:
        if thickness_m is not None:
            raise ValueError("thickness_m: not used with 3D delta/beta volumes (voxel depth = pixel_size_m)")
        return a.sum(0) * pixel_size_m
    if thickness_m is None:
        return a
    t = np.asarray(thickness_m, np.float64)
    if t.ndim not in (0, 2) or (t.ndim == 2 and t.shape != a.shape):
        raise ValueError(f"thickness_m: expected a scalar or a map of shape {a.shape}, got shape {t.shape}")
    if not np.isfinite(t).all() or (t < 0).any():
        raise ValueError("thickness_m: must be finite and >= 0 (metres)")
    if t.ndim == 0 and t > 0.1:
        raise ValueError(f"thickness_m: {float(t)!r} m is implausibly thick; give metres, e.g. 1e-4 for 100 um")
    return a * t


def simulate_phase_contrast(delta, beta, energy_kev, distance_m, pixel_size_m, *, thickness_m=None,
                            flux=None, oversample=4, detector_blur=0.0, pad="edge", pad_factor=2.0, seed=0):
    """Near-field (propagation-based) phase-contrast image of a sample.

    Parameters
    ----------
    delta, beta : array_like
        Either 2D *projected* maps ``integral(delta dz)`` and ``integral(beta dz)`` in metres
        (``thickness_m=None``); or 2D maps of the refractive-index decrements together with
        ``thickness_m``; or 3D volumes ``(depth, y, x)`` of decrements with the beam along
        axis 0 and voxels ``pixel_size_m`` deep.
    energy_kev, distance_m, pixel_size_m : float
        Photon energy (keV), sample-detector distance (m), detector pixel size (m).
    thickness_m : float or array_like, optional
        Path length through the sample (metres), scalar or a map.
    flux : float, optional
        Photons per pixel in the open beam: Poisson noise; ``None``: noise-free.
    oversample : int
        The wave is propagated on a grid ``oversample`` times finer (maps upsampled
        linearly) and the intensity binned back to detector pixels, so steep edges are
        sampled. The default 4 is finer than the forward model of
        ``retrieve(method="physics")`` (``oversample=2``), so a retrieval never uses the
        exact simulation model (no "inverse crime"); the two differ by a variance of
        about 7e-5 on the benchmark phantom, as much as the noise at 1e4 photons.
    detector_blur : float
        Gaussian point-spread function of the detector, sigma in pixels.
    pad, pad_factor
        Padding of the field for the FFT (see :func:`fresnel_propagate`).
    seed : int
        Noise seed.

    Returns
    -------
    dict
        ``intensity`` (flat-field normalised, float32, detector grid), ``phase`` (radians,
        ``-k integral(delta)``), ``attenuation`` (``k integral(beta)``; contact image
        ``exp(-2 attenuation)``), ``contact`` (``exp(-2 attenuation)``), ``fresnel_number``
        and the parameters.

    Examples
    --------
    >>> import numpy as np
    >>> t = np.zeros((64, 64)); t[16:48, 16:48] = 20e-6        # 20 um of water
    >>> d, b = material_delta_beta("water", 20)
    >>> sim = simulate_phase_contrast(d * t, b * t, 20, 0.1, 1e-6)
    >>> round(float(sim["phase"].min()), 2), sim["intensity"].shape
    (-1.17, (64, 64))
    """
    from scipy import ndimage as ndi

    energy_kev = _check_energy(energy_kev)
    distance_m = _check_distance(distance_m)
    pixel_size_m = _check_pixel(pixel_size_m)
    pd = _projected(delta, "delta", thickness_m, pixel_size_m)
    pb = _projected(beta, "beta", thickness_m, pixel_size_m)
    if pd.shape != pb.shape:
        raise ValueError(f"beta: shape {pb.shape} differs from delta's {pd.shape}")
    oversample = _check_oversample(oversample)
    check_positive(detector_blur, "detector_blur", allow_zero=True)
    if flux is not None:
        check_positive(flux, "flux")
    lam = HC_KEV_M / energy_kev
    k = 2 * np.pi / lam
    phi, att = -k * pd, k * pb
    s = int(oversample)
    if s > 1:
        # linear upsampling with pixel-centre alignment; the mean over each s x s block
        # stays close to the detector-pixel value
        phi_f = ndi.zoom(phi, s, order=1, mode="nearest", grid_mode=True)
        att_f = ndi.zoom(att, s, order=1, mode="nearest", grid_mode=True)
    else:
        phi_f, att_f = phi, att
    psi = np.exp(-att_f + 1j * phi_f)
    inten = np.abs(fresnel_propagate(psi, energy_kev, distance_m, pixel_size_m / s, pad=pad,
                                     pad_factor=pad_factor)) ** 2
    if s > 1:
        H, W = phi.shape
        inten = inten.reshape(H, s, W, s).mean((1, 3))
    if detector_blur > 0:
        inten = ndi.gaussian_filter(inten, detector_blur, mode="nearest")
    if flux is not None:
        rng = rng_from(seed)
        inten = rng.poisson(inten * flux) / float(flux)
    return {"intensity": inten.astype(np.float32), "phase": phi.astype(np.float32),
            "attenuation": att.astype(np.float32), "contact": np.exp(-2 * att).astype(np.float32),
            "fresnel_number": pixel_size_m ** 2 / (lam * distance_m), "energy_kev": energy_kev,
            "distance_m": distance_m, "pixel_size_m": pixel_size_m, "flux": flux}


def mixed_material_phantom(shape=(128, 128, 128), energy_kev=20.0, pixel_size_m=1e-6, implant="titanium", seed=0,
                           degradation=0.5):
    """Projected ``delta``/``beta`` maps of a bone sample with a metal implant (mixed materials).

    The labels of :func:`tomoml_nb.phantoms.bone_implant` are turned into materials and
    projected along ``y`` (a radiograph of the cylinder from the side: image rows are
    ``z``, columns ``x``): background = air, soft tissue = water (1.00 g/cm3), bone =
    hydroxyapatite (3.16 g/cm3, the bone mineral -- real bone, a composite, is about
    1.9 g/cm3), implant = titanium (4.506 g/cm3) or magnesium (1.738 g/cm3), degradation
    layer = TiO2 (4.23 g/cm3) or Mg(OH)2 (2.34 g/cm3). delta and beta at ``energy_kev``
    come from :data:`MATERIALS` (xraydb tables). The delta/beta ratios differ by more than
    an order of magnitude (water ~2250, hydroxyapatite ~175, titanium ~65 at 20 keV),
    which is what a single-material Paganin filter cannot represent.

    Parameters
    ----------
    shape : tuple of 3 int
        Phantom volume ``(z, y, x)``; the image is ``(z, x)``, the beam crosses ``y``.
    energy_kev : float
        Photon energy in keV (8-200 for the material table).
    pixel_size_m : float
        Voxel (and detector pixel) size in metres.
    implant : {"titanium", "magnesium"}
    seed, degradation
        Passed to :func:`~tomoml_nb.phantoms.bone_implant`.

    Returns
    -------
    dict
        ``delta``, ``beta`` projected maps (metres, float64, ``(z, x)``), ``thickness``
        ``{material: path-length map (m)}``, ``materials`` ``{material: (delta, beta)}``,
        ``labels`` (the 3D labels) and the parameters.

    Examples
    --------
    >>> ph = mixed_material_phantom((32, 32, 32), 20, 1e-6)
    >>> ph["delta"].shape, sorted(ph["materials"])[:2]
    ((32, 32), ['hydroxyapatite', 'titanium'])
    """
    from .phantoms import bone_implant

    energy_kev = _check_energy(energy_kev)
    pixel_size_m = _check_pixel(pixel_size_m)
    check_choice(implant, "implant", tuple(IMPLANT_MATERIALS))
    ph = bone_implant(shape, seed=seed, degradation=degradation, noise=0.0, rings=0.0)
    labels = ph.labels
    mats = IMPLANT_MATERIALS[implant]
    delta = np.zeros((labels.shape[0], labels.shape[2]))
    beta = np.zeros_like(delta)
    thickness, materials = {}, {}
    for cls, mat in enumerate(mats, start=1):
        d, b = material_delta_beta(mat, energy_kev)
        t = (labels == cls).sum(axis=1) * pixel_size_m
        thickness[mat] = t
        materials[mat] = (d, b)
        delta += d * t
        beta += b * t
    return {"delta": delta, "beta": beta, "thickness": thickness, "materials": materials, "labels": labels,
            "energy_kev": energy_kev, "pixel_size_m": pixel_size_m, "implant": implant}


# =============================================================================== retrieval
def paganin(intensity, energy_kev, distance_m, pixel_size_m, delta_beta, pad="edge", pad_factor=2.0):
    """Paganin's single-material phase retrieval (Paganin et al., J. Microsc. 206, 2002).

    Assumes one material with a known ``delta / beta`` ratio, so ``phi = -(delta/beta) A``,
    and inverts the transport-of-intensity equation in Fourier space:
    ``A = -1/2 ln F^-1[ F(I) / (1 + pi lambda z (delta/beta) |f|^2) ]``.

    Parameters
    ----------
    intensity : array_like, shape (y, x)
        Flat-field-normalised intensity (median within 0.05-20, else ``ValueError``).
    energy_kev, distance_m, pixel_size_m : float
        keV (1-500), metres (1 um - 10 m), metres (1 nm - 1 mm).
    delta_beta : float
        ``delta / beta`` of the assumed material (> 0).
    pad, pad_factor
        Padding before the FFT (see :func:`fresnel_propagate`).

    Returns
    -------
    phase, attenuation : ndarray, float32

    Examples
    --------
    >>> import numpy as np
    >>> phi, A = paganin(np.ones((16, 16)), 20, 0.05, 1e-6, 1000)
    >>> float(abs(phi).max())
    0.0
    """
    img = as_array(intensity, "intensity", ndim=2).astype(np.float64)
    _check_flat_fielded(img)
    lam = wavelength_m(energy_kev)
    distance_m = _check_distance(distance_m)
    pixel_size_m = _check_pixel(pixel_size_m)
    check_positive(delta_beta, "delta_beta")
    pad, pad_factor = _check_pad(pad, pad_factor)
    H, W = img.shape
    widths = _pad_widths((H, W), pad_factor) if pad is not None else [(0, 0), (0, 0)]
    if pad == "constant":
        p = np.pad(img, widths, mode="constant", constant_values=1.0)
    elif pad is not None:
        p = np.pad(img, widths, mode=pad)
    else:
        p = img
    filt = 1.0 + np.pi * lam * distance_m * delta_beta * _freq_sq(p.shape, pixel_size_m)
    low = np.real(np.fft.ifft2(np.fft.fft2(p) / filt))
    low = low[widths[0][0]:widths[0][0] + H, widths[1][0]:widths[1][0] + W]
    att = -0.5 * np.log(np.clip(low, 1e-6, None))
    return (-delta_beta * att).astype(np.float32), att.astype(np.float32)


class _Physics:
    """Differentiable forward model: maps (phase, attenuation) on the detector grid to
    detector intensity with the same padding as :func:`fresnel_propagate` (torch FFT). With
    ``oversample`` s > 1 the padded maps are upsampled bilinearly to a grid s times finer,
    propagated there and the intensity is averaged over each s x s block -- a detector
    pixel integrates the intensity over its area, which matters where the phase changes
    by more than about pi per pixel (metal edges)."""

    def __init__(self, shape, energy_kev, distance_m, pixel_size_m, pad, pad_factor, device, oversample=1):
        import torch

        H, W = shape
        self.H, self.W, self.s = H, W, int(oversample)
        widths = _pad_widths((H, W), pad_factor) if pad is not None else [(0, 0), (0, 0)]
        self.py, self.px = widths[0][0], widths[1][0]
        self.mode = {"edge": "replicate", "reflect": "reflect", "constant": "constant", None: None}[pad]
        s = self.s
        tf = _transfer((s * (H + 2 * self.py), s * (W + 2 * self.px)), wavelength_m(energy_kev), distance_m,
                       pixel_size_m / s)
        self.tf = torch.from_numpy(tf).to(torch.complex64).to(device)

    def __call__(self, phi, att):
        import torch
        import torch.nn.functional as F

        m = torch.stack([phi, att])[None]
        if self.mode is not None and (self.py or self.px):
            m = F.pad(m, (self.px, self.px, self.py, self.py), mode=self.mode)  # constant pad: psi = 1
        if self.s > 1:
            m = F.interpolate(m, scale_factor=self.s, mode="bilinear", align_corners=False)
        m = m[0]
        psi = torch.polar(torch.exp(-m[1]), m[0])
        out = torch.fft.ifft2(torch.fft.fft2(psi) * self.tf).abs().square()
        if self.s > 1:
            out = F.avg_pool2d(out[None, None], self.s)[0, 0]
        return out[self.py:self.py + self.H, self.px:self.px + self.W]


def _tv(x):
    return (x[1:] - x[:-1]).abs().mean() + (x[:, 1:] - x[:, :-1]).abs().mean()


def _physics_retrieve(img, energy_kev, distance_m, pixel_size_m, delta_beta, *, n_iter, lr, tv_ratio, tv_attenuation,
                      delta_beta_range, depth, pad, pad_factor, oversample, device, seed, progress):
    """Self-supervised retrieval: an MSD generator proposes attenuation and a local
    log(delta/beta) map; the Fresnel model turns them into intensity; the mismatch to the
    measured intensity (plus TV priors) trains the generator for this one image."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from .models.msd import MSDNet
    from .train import resolve_device, seed_everything

    dev = resolve_device(device)
    seed_everything(seed)
    lo, hi = (float(np.log(v)) for v in delta_beta_range)
    db0 = float(np.clip(delta_beta, *delta_beta_range))
    _, att0 = paganin(img, energy_kev, distance_m, pixel_size_m, db0, pad=pad or "edge", pad_factor=pad_factor)
    model = _Physics(img.shape, energy_kev, distance_m, pixel_size_m, pad, pad_factor, dev, oversample)
    meas = torch.from_numpy(img.astype(np.float32)).to(dev)
    # noise variance of the measurement (robust, from pixel differences) normalises the data term
    diff = np.diff(img, axis=1)
    noise_var = float(max((1.4826 * np.median(np.abs(diff - np.median(diff)))) ** 2 / 2, 1e-8))
    a_scale = float(max(att0.max(), 1e-3))
    a_init = torch.from_numpy(np.clip(att0, 1e-6 * a_scale, None) / a_scale).to(dev)
    a_init = torch.log(torch.expm1(a_init.clamp_min(1e-6)))                 # inverse softplus
    u = (np.log(db0) - lo) / (hi - lo)
    u = float(np.clip(u, 1e-3, 1 - 1e-3))
    s_init = float(np.log(u / (1 - u)))                                     # inverse sigmoid
    net = MSDNet(1, 2, depth=depth, max_dilation=8, padding_mode="replicate").to(dev)
    with torch.no_grad():
        net.final.weight.zero_()
        net.final.bias.zero_()
    x = ((meas - meas.mean()) / meas.std().clamp_min(1e-6))[None, None]
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    history = []

    def maps():
        out = net(x)[0]
        att = a_scale * F.softplus(a_init + out[0])                         # attenuation >= 0 (beta >= 0)
        log_r = lo + (hi - lo) * torch.sigmoid(s_init + out[1])             # delta/beta inside the range
        return -torch.exp(log_r) * att, att, log_r                          # phase <= 0 (delta >= 0)

    for it in tqdm(range(n_iter), desc="physics retrieval", disable=not progress):
        phi, att, log_r = maps()
        data = ((model(phi, att) - meas) ** 2).mean() / noise_var
        loss = data + tv_ratio * _tv(log_r) + tv_attenuation * _tv(att) / a_scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(float(data.detach()))
    with torch.no_grad():
        phi, att, log_r = maps()
        pred = model(phi, att)
    return (phi.cpu().numpy().astype(np.float32), att.cpu().numpy().astype(np.float32),
            pred.cpu().numpy().astype(np.float32), np.exp(log_r.cpu().numpy()).astype(np.float32), history)


def retrieve(intensity, energy_kev, distance_m, pixel_size_m, method="paganin", delta_beta=None, *, n_iter=100,
             lr=0.01, tv_ratio=1.0, tv_attenuation=1.0, delta_beta_range=(10.0, 5000.0), depth=16, pad="edge",
             pad_factor=2.0, oversample=2, device="auto", seed=0, progress=True, full_output=False):
    """Single-distance phase retrieval from one flat-field-normalised near-field image.

    Parameters
    ----------
    intensity : array_like, shape (y, x)
        Measured intensity divided by the open beam (1 in air); an image whose median is
        outside 0.05-20 (raw counts, an all-zero image) raises ``ValueError``.
    energy_kev, distance_m, pixel_size_m : float
        Photon energy (keV, 1-500), sample-to-detector distance (m, 1 um - 10 m), pixel
        size (m, 1 nm - 1 mm); values outside these ranges raise ``ValueError``.
    method : {"paganin", "physics"}
        ``"paganin"``: the single-material filter (:func:`paganin`), needs ``delta_beta``.
        ``"physics"``: self-supervised, physics-informed retrieval. A small mixed-scale
        dense network (the generator, trained on this image only, no ground truth) maps
        the measured image to an attenuation map ``A >= 0`` and a *local* delta/beta map
        ``r`` (within ``delta_beta_range``); the phase is ``phi = -r A``. The Fresnel
        propagator (torch FFT, same padding as :func:`fresnel_propagate`) turns
        ``exp(-A + i phi)`` into the intensity the detector would see; the mismatch to the
        measurement (normalised by the noise variance estimated from the image) plus total
        variation of ``log r`` and of ``A`` is minimised with Adam for ``n_iter``
        iterations, starting from Paganin's solution with ``delta_beta`` (default 500).
        Letting ``r`` vary in space is what allows several materials; a single distance
        cannot separate phase and attenuation at low spatial frequencies without such a
        prior (the intensity there depends on the phase only through its Laplacian).
        Measured limitation (``benchmarks/results/denoise_phase.md``): on the
        mixed-material benchmark phantom (phase down to -21 rad) the fitted ``r`` map
        stays nearly uniform and the result is worse than Paganin with a well-chosen
        delta/beta. What was measured there (128 x 128, 1e4 photons): a forward model on
        the detector grid (``oversample=1``) differs from a finely sampled image by a
        variance of 0.03, some 350 times the noise, at the steep metal edges; the default
        ``oversample=2`` brings that to 7e-5 (about the noise) and the phase RMSE from
        4.44 to 3.93 rad, still above Paganin's 3.14. The noise variance estimated from
        pixel differences is dominated by the edge fringes (about 0.02 against a true
        9e-5), so the data term is weighted below what the noise allows. The deeper
        cause is that the problem is not convex at this phase strength: with the true
        local delta/beta map given, L-BFGS on the attenuation from Paganin's start only
        moves the phase RMSE from 5.9 to 5.7 rad (a Paganin-preconditioned version ends
        at 9.6), while started from the true maps it stays at 0.04 rad -- a better
        start, not a better data term, is what is missing.
    oversample : int
        Physics method: the forward model propagates on a grid this many times finer
        than the detector and averages the intensity over each pixel (1 = detector grid:
        a quarter of the pixels to propagate, much less accurate at strong phase edges).
    delta_beta : float, optional
        Paganin's delta/beta (required for ``"paganin"``), or the starting value for
        ``"physics"``.
    n_iter, lr : int, float
        Physics method: iterations and Adam learning rate.
    tv_ratio, tv_attenuation : float
        Physics method: weights of the total variation of ``log(delta/beta)`` and of the
        (normalised) attenuation.
    delta_beta_range : (float, float)
        Physics method: bounds of the local delta/beta.
    depth : int
        Physics method: layers of the MSD generator.
    pad, pad_factor
        FFT padding (see :func:`fresnel_propagate`).
    device, seed, progress
        Torch device (``"auto"``), seed (deterministic), tqdm bar.
    full_output : bool
        Return a dict with ``phase``, ``attenuation``, ``model_intensity`` (the forward
        model of the result), ``delta_beta_map`` (physics), ``loss`` history, ``seconds``.

    Returns
    -------
    ndarray, float32
        The phase map in radians (``-k integral(delta dz)``, <= 0), or the dict above.

    Examples
    --------
    >>> import numpy as np
    >>> t = np.zeros((48, 48)); t[12:36, 12:36] = 10e-6
    >>> d, b = material_delta_beta("water", 20)
    >>> I = simulate_phase_contrast(d * t, b * t, 20, 0.05, 1e-6)["intensity"]
    >>> phi = retrieve(I, 20, 0.05, 1e-6, "paganin", delta_beta=d / b)
    >>> bool(abs(phi[24, 24] - (-2 * np.pi / wavelength_m(20) * d * 10e-6)) < 0.1)
    True
    """
    img = as_array(intensity, "intensity", ndim=2).astype(np.float64)
    if min(img.shape) < 16:
        raise ValueError(f"intensity: needs at least 16 x 16 pixels, got {img.shape}")
    if (img < 0).any():
        raise ValueError("intensity: must be >= 0 (flat-field-normalised counts)")
    _check_flat_fielded(img)
    energy_kev = _check_energy(energy_kev)
    distance_m = _check_distance(distance_m)
    pixel_size_m = _check_pixel(pixel_size_m)
    method = check_choice(method, "method", METHODS)
    pad, pad_factor = _check_pad(pad, pad_factor)
    t0 = time.perf_counter()
    if method == "paganin":
        if delta_beta is None:
            raise ValueError("delta_beta: required for method='paganin' (delta/beta of the sample's material, "
                             "e.g. material_delta_beta('water', energy_kev))")
        phi, att = paganin(img, energy_kev, distance_m, pixel_size_m, delta_beta, pad=pad, pad_factor=pad_factor)
        if not full_output:
            return phi
        psi = np.exp(-att + 1j * phi)
        model = np.abs(fresnel_propagate(psi, energy_kev, distance_m, pixel_size_m, pad=pad,
                                         pad_factor=pad_factor)) ** 2
        return {"phase": phi, "attenuation": att, "model_intensity": model.astype(np.float32),
                "delta_beta_map": np.full(img.shape, float(delta_beta), np.float32), "loss": [],
                "seconds": time.perf_counter() - t0}
    delta_beta = 500.0 if delta_beta is None else check_positive(delta_beta, "delta_beta")
    n_iter = check_positive(n_iter, "n_iter", integer=True)
    check_positive(lr, "lr")
    check_positive(tv_ratio, "tv_ratio", allow_zero=True)
    check_positive(tv_attenuation, "tv_attenuation", allow_zero=True)
    try:
        lo, hi = (float(v) for v in delta_beta_range)
    except Exception as exc:
        raise TypeError(f"delta_beta_range: expected (low, high), got {delta_beta_range!r}") from exc
    if not 0 < lo < hi:
        raise ValueError(f"delta_beta_range: expected 0 < low < high, got {delta_beta_range!r}")
    if isinstance(depth, bool) or not isinstance(depth, numbers.Integral) or depth < 1:
        raise ValueError(f"depth: must be an integer >= 1, got {depth!r}")
    oversample = _check_oversample(oversample, maximum=8)
    phi, att, model, ratio, hist = _physics_retrieve(
        img, energy_kev, distance_m, pixel_size_m, delta_beta, n_iter=n_iter, lr=lr, tv_ratio=tv_ratio,
        tv_attenuation=tv_attenuation, delta_beta_range=(lo, hi), depth=int(depth), pad=pad,
        pad_factor=pad_factor, oversample=oversample, device=device, seed=seed, progress=progress)
    if not full_output:
        return phi
    return {"phase": phi, "attenuation": att, "model_intensity": model, "delta_beta_map": ratio, "loss": hist,
            "seconds": time.perf_counter() - t0}
