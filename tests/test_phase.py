"""Tests for tomoml_nb.phase: propagation physics, simulation, Paganin and physics retrieval."""
from __future__ import annotations

import numpy as np
import pytest

from tomoml_nb import phase as P

E, Z, PX = 20.0, 0.05, 1e-6


def test_wavelength_and_fresnel_number():
    assert P.wavelength_m(12.398419843) == pytest.approx(1e-10, rel=1e-6)
    assert P.fresnel_number(20, 0.05, 1e-6) == pytest.approx(1e-12 / (P.wavelength_m(20) * 0.05))


def test_material_table_values():
    d, b = P.material_delta_beta("water", 20)
    assert d == pytest.approx(5.764e-7, rel=1e-3) and b == pytest.approx(2.566e-10, rel=1e-3)
    # delta scales ~ 1/E^2 far from edges
    d2, _ = P.material_delta_beta("water", 40)
    assert d / d2 == pytest.approx(4.0, rel=0.01)
    assert P.material_delta_beta("air", 30) == (0.0, 0.0)
    with pytest.raises(ValueError, match="energy_kev"):
        P.material_delta_beta("water", 5)
    with pytest.raises(ValueError, match="material"):
        P.material_delta_beta("unobtainium", 20)


def test_propagation_conserves_energy_and_is_invertible():
    rng = np.random.default_rng(0)
    phi = -np.abs(rng.standard_normal((64, 64)))
    psi = np.exp(1j * phi)
    out = P.fresnel_propagate(psi, E, Z, PX, pad=None)
    assert np.sum(np.abs(out) ** 2) == pytest.approx(np.sum(np.abs(psi) ** 2), rel=1e-9)
    # propagating forward then by the conjugate transfer function recovers the field
    back = np.conj(P.fresnel_propagate(np.conj(out), E, Z, PX, pad=None))
    assert np.allclose(back, psi, atol=1e-10)


def test_tie_sign_a_diverging_lens_darkens_its_centre():
    """delta > 0: a thicker centre (more negative phase) spreads the beam (TIE)."""
    y, x = np.mgrid[-64:64, -64:64]
    phi = -2.0 * np.exp(-(x ** 2 + y ** 2) / (2 * 15.0 ** 2))
    I = np.abs(P.fresnel_propagate(np.exp(1j * phi), E, Z, PX)) ** 2
    lap = np.gradient(np.gradient(phi, axis=0), axis=0) + np.gradient(np.gradient(phi, axis=1), axis=1)
    lam = P.wavelength_m(E)
    tie = 1 - Z * lam / (2 * np.pi) / PX ** 2 * lap
    assert I[64, 64] < 1
    assert np.abs(I - tie).max() < 0.01


def test_padding_avoids_wraparound():
    phi = np.zeros((64, 64)); phi[:, 60:] = -3.0        # an edge near the right border
    psi = np.exp(1j * phi)
    wrap = np.abs(P.fresnel_propagate(psi, E, 0.2, PX, pad=None)) ** 2
    padded = np.abs(P.fresnel_propagate(psi, E, 0.2, PX, pad="edge")) ** 2
    # periodic FFT sees a second edge at x=0 -> fringes on the left; padding removes them
    assert np.abs(wrap[:, :4] - 1).max() > 0.05
    assert np.abs(padded[:, :4] - 1).max() < 0.02


def test_simulation_phantom_and_paganin_single_material_is_accurate():
    t = np.zeros((64, 64)); t[16:48, 16:48] = 20e-6
    d, b = P.material_delta_beta("water", E)
    sim = P.simulate_phase_contrast(d * t, b * t, E, Z, PX)
    assert sim["phase"].min() == pytest.approx(-2 * np.pi / P.wavelength_m(E) * d * 20e-6, rel=1e-6)
    phi = P.retrieve(sim["intensity"], E, Z, PX, "paganin", delta_beta=d / b)
    inner = np.s_[22:42, 22:42]
    assert np.abs(phi[inner] - sim["phase"][inner]).mean() < 0.05 * abs(sim["phase"].min())
    # a wrong delta/beta gives a wrong phase: the retrieval depends on the guess
    wrong = P.retrieve(sim["intensity"], E, Z, PX, "paganin", delta_beta=d / b / 10)
    assert np.abs(wrong[inner] - sim["phase"][inner]).mean() > 0.5 * abs(sim["phase"].min())


def test_mixed_material_phantom():
    ph = P.mixed_material_phantom((32, 32, 32), E, PX, seed=1)
    assert ph["delta"].shape == (32, 32)
    assert set(ph["materials"]) == {"water", "hydroxyapatite", "titanium", "titanium_dioxide"}
    ratios = [d / b for d, b in ph["materials"].values()]
    assert max(ratios) / min(ratios) > 10          # genuinely mixed delta/beta
    assert (ph["delta"] >= 0).all() and ph["delta"].max() > 0


def test_physics_retrieval_runs_fits_the_data_and_is_deterministic():
    t = np.zeros((32, 32)); t[8:24, 8:24] = 10e-6
    d, b = P.material_delta_beta("hydroxyapatite", E)
    sim = P.simulate_phase_contrast(d * t, b * t, E, Z, PX, flux=1e5, seed=0)
    kw = dict(n_iter=15, depth=4, progress=False, full_output=True, seed=2)
    r1 = P.retrieve(sim["intensity"], E, Z, PX, "physics", delta_beta=300, **kw)
    r2 = P.retrieve(sim["intensity"], E, Z, PX, "physics", delta_beta=300, **kw)
    assert np.array_equal(r1["phase"], r2["phase"])
    assert (r1["phase"] <= 0).all() and (r1["attenuation"] >= 0).all()
    assert r1["loss"][-1] < r1["loss"][0]
    assert r1["phase"].shape == (32, 32)


@pytest.mark.parametrize("s", [1, 2, 3])
def test_physics_forward_model_equals_the_simulator_at_the_same_oversampling(s):
    import torch
    ph = P.mixed_material_phantom((24, 24, 40), E, PX, seed=3)
    sim = P.simulate_phase_contrast(ph["delta"], ph["beta"], E, Z, PX, oversample=s)
    maps = torch.from_numpy(sim["phase"]), torch.from_numpy(sim["attenuation"])

    def forward(oversample):
        return P._Physics(sim["phase"].shape, E, Z, PX, "edge", 2.0, "cpu", oversample)(*maps).numpy()

    out = forward(s)
    assert out.shape == (24, 40)
    assert np.abs(out - sim["intensity"]).max() < 1e-3
    if s == 1:   # and the detector grid alone is far from a finely sampled image at the metal edges
        fine = P.simulate_phase_contrast(ph["delta"], ph["beta"], E, Z, PX, oversample=4)["intensity"]
        assert np.abs(out - fine).max() > 10 * np.abs(forward(2) - fine).max()


def test_physics_retrieval_rejects_a_bad_oversample():
    img = np.ones((32, 32))
    for bad in (0, 2.5, True, 9):
        with pytest.raises(ValueError, match="oversample"):
            P.retrieve(img, E, Z, PX, "physics", n_iter=1, oversample=bad, progress=False)


@pytest.mark.parametrize("kwargs,name", [
    (dict(energy_kev=0), "energy_kev"), (dict(energy_kev=-5), "energy_kev"), (dict(energy_kev=1000), "energy_kev"),
    (dict(distance_m=0), "distance_m"), (dict(distance_m=-1), "distance_m"), (dict(distance_m=500), "distance_m"),
    (dict(distance_m=1e-12), "distance_m"), (dict(distance_m=50), "distance_m"),
    (dict(pixel_size_m=0), "pixel_size_m"), (dict(pixel_size_m=2e-3), "pixel_size_m"),
    (dict(pixel_size_m=1e-10), "pixel_size_m"),
])
def test_bad_physical_units_name_the_parameter(kwargs, name):
    args = dict(energy_kev=E, distance_m=Z, pixel_size_m=PX)
    args.update(kwargs)
    img = np.ones((32, 32))
    with pytest.raises(ValueError, match=name):
        P.fresnel_propagate(img.astype(complex), **args)
    with pytest.raises(ValueError, match=name):
        P.retrieve(img, method="paganin", delta_beta=100, **args)
    with pytest.raises(ValueError, match=name):
        P.simulate_phase_contrast(img * 1e-12, img * 1e-15, **args)


def test_other_bad_inputs():
    img = np.ones((32, 32))
    with pytest.raises(ValueError, match="delta_beta"):
        P.retrieve(img, E, Z, PX, "paganin")
    with pytest.raises(ValueError, match="method"):
        P.retrieve(img, E, Z, PX, "holotomography")
    with pytest.raises(ValueError, match="pad"):
        P.fresnel_propagate(img, E, Z, PX, pad="wrap")
    with pytest.raises(ValueError, match="delta"):
        P.simulate_phase_contrast(-img, img, E, Z, PX)
    with pytest.raises(ValueError, match="thickness_m"):
        P.simulate_phase_contrast(img, img, E, Z, PX, thickness_m=5.0)
    with pytest.raises(ValueError, match="intensity"):
        P.retrieve(-img, E, Z, PX, "paganin", delta_beta=10)


@pytest.mark.parametrize("scale", [30000.0, 0.0, 0.01, 25.0])
def test_intensity_that_is_not_flat_fielded_is_refused(scale):
    """Raw counts (median ~3e4) gave a phase of +2576 rad; an all-zero image a constant -3454 rad."""
    img = np.ones((32, 32)) * scale
    with pytest.raises(ValueError, match="^intensity: median .* flat-field"):
        P.retrieve(img, E, Z, PX, "paganin", delta_beta=100)
    with pytest.raises(ValueError, match="^intensity: median"):
        P.retrieve(img, E, Z, PX, "physics", n_iter=1, progress=False)
    with pytest.raises(ValueError, match="^intensity: median"):
        P.paganin(img, E, Z, PX, 100)


def test_plausible_distances_still_pass():
    img = np.ones((32, 32))
    for z in (1e-6, 0.05, 10.0):
        assert P.retrieve(img * 0.9, E, z, PX, "paganin", delta_beta=100).shape == (32, 32)
        assert P.fresnel_propagate(img.astype(complex), E, z, PX).shape == (32, 32)
    with pytest.raises(ValueError, match="^distance_m: .*1 um - 10 m"):
        P.fresnel_number(E, 11.0, PX)
