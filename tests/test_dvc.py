"""Digital volume correlation: sign/axis conventions on known fields, strain, bad inputs, weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from tomoml_nb import dvc, metrics, phantoms
from tomoml_nb.models.raft3d import VolRAFT, _CorrPyramid, sample_grid, window_lookup


@pytest.fixture(scope="module")
def texture():
    rng = np.random.default_rng(0)
    v = ndi.gaussian_filter(rng.standard_normal((32, 40, 48)), 1.6)
    return ((v - v.mean()) / v.std()).astype(np.float32)


@pytest.fixture(scope="module")
def net():
    return dvc.load_pretrained()


def _translation(shape, axis, amount):
    u = np.zeros((3, *shape), np.float32)
    u[axis] = amount
    return u


def _inner(a, m=8):
    return a[..., m:-m, m:-m, m:-m]


# ---------------------------------------------------------------- conventions
class _PhaseCorrelationNet(torch.nn.Module):
    """Stands in for VolRAFT with a known answer: the integer shift from FFT cross-correlation.

    It lets the tests check the whole ``method="volraft"`` plumbing (normalisation, padding,
    patches, blending, channel order, sign) independently of how well the weights are trained.
    """

    factor = 4
    config = {"downsample": 4}
    fnet = None

    def forward(self, fixed, moving, iters=1):
        a, b = torch.fft.fftn(fixed[0, 0] - fixed.mean()), torch.fft.fftn(moving[0, 0] - moving.mean())
        r = torch.fft.ifftn(b * a.conj()).real  # circular cross-correlation
        idx = np.unravel_index(int(r.argmax()), r.shape)
        shift = [i if i <= n // 2 else i - n for i, n in zip(idx, r.shape)]
        return [torch.tensor(shift, dtype=torch.float32).view(1, 3, 1, 1, 1).expand(1, 3, *fixed.shape[-3:])]


@pytest.mark.parametrize("method", ["optflow", "tvl1", "volraft"])
@pytest.mark.parametrize("axis,amount", [(0, 1.5), (1, -1.2), (2, 2.0)])
def test_translation_sign_and_axis(texture, method, axis, amount):
    if method == "volraft":
        amount = float(np.round(amount))  # the stand-in network finds integer shifts
    u = _translation(texture.shape, axis, amount)
    moving = phantoms.deform(texture, u)
    kw = {"model": _PhaseCorrelationNet(), "patch_shape": 32, "overlap": 8} if method == "volraft" else {}
    est = dvc.estimate_displacement(texture, moving, method, progress=False, **kw)
    med = np.median(_inner(est).reshape(3, -1), axis=1)
    assert abs(med[axis] - amount) < 0.3, (method, med)
    for other in {0, 1, 2} - {axis}:
        assert abs(med[other]) < 0.3, (method, med)


def test_shipped_volraft_beats_the_zero_field_on_real_texture(net):
    from tomoml_nb import data

    snow = data.load("spam_snow")[20:68, 20:68, 20:68]
    errs = []
    for axis, amount in [(0, 2.0), (1, -2.0), (2, 2.0)]:
        u = _translation(snow.shape, axis, amount)
        moving = phantoms.deform(snow.astype(np.float32), u)
        est = dvc.estimate_displacement(snow, moving, "volraft", model=net, patch_shape=48, progress=False)
        assert est.shape == u.shape and est.dtype == np.float32
        e = metrics.endpoint_error(_inner(est), _inner(u))["mean"]
        med = np.median(_inner(est).reshape(3, -1), axis=1)
        assert np.sign(med[axis]) == np.sign(amount), med  # the right sign along the moved axis
        errs.append(e)
    assert np.mean(errs) < 0.85 * 2.0, errs  # clearly better than predicting no motion (EPE 2)


@pytest.mark.parametrize("method", ["optflow", "volraft"])
def test_swapping_the_volumes_reverses_the_field(texture, method):
    if method == "volraft":
        u = _translation(texture.shape, 1, 2.0)
        kw = {"model": _PhaseCorrelationNet(), "patch_shape": 32}
    else:
        u = phantoms.displacement_field(texture.shape, "uniform", 1.5, seed=4)
        kw = {}
    moving = phantoms.deform(texture, u)
    fwd = dvc.estimate_displacement(texture, moving, method, progress=False, **kw)
    bwd = dvc.estimate_displacement(moving, texture, method, progress=False, **kw)
    assert metrics.endpoint_error(_inner(fwd), _inner(u))["median"] < 0.4
    assert metrics.endpoint_error(_inner(bwd), _inner(-u))["median"] < 0.4


def test_integer_and_float_inputs_agree(texture):
    u = _translation(texture.shape, 2, 1.0)
    moving = phantoms.deform(texture, u)
    lo = min(texture.min(), moving.min())
    to_int = lambda v: np.round((v - lo) * 3000 + 100).astype(np.uint16)  # noqa: E731
    a = dvc.estimate_displacement(texture, moving, "optflow", progress=False)
    b = dvc.estimate_displacement(to_int(texture), to_int(moving), "optflow", progress=False)
    assert np.abs(_inner(a) - _inner(b)).mean() < 0.05


def test_optflow_recovers_a_smooth_field(texture):
    u = phantoms.displacement_field(texture.shape, "random_smooth", 2.0, seed=1)
    moving = phantoms.deform(texture, u)
    est = dvc.estimate_displacement(texture, moving, "optflow", progress=False)
    assert metrics.endpoint_error(_inner(est), _inner(u))["mean"] < 0.35
    assert metrics.endpoint_error(_inner(np.zeros_like(u)), _inner(u))["mean"] > 0.6


def test_volraft_mask_skips_patches(texture, net):
    u = _translation(texture.shape, 2, 1.0)
    moving = phantoms.deform(texture, u)
    mask = np.zeros(texture.shape, bool)
    mask[:10, :10, :10] = True
    est = dvc.estimate_displacement(texture, moving, "volraft", mask=mask, model=net, patch_shape=16, overlap=4,
                                    progress=False)
    assert est.shape == (3, *texture.shape) and est.dtype == np.float32
    assert np.all(est[:, -10:, -10:, -10:] == 0)
    assert np.any(est[:, :10, :10, :10] != 0)


# ---------------------------------------------------------------- network internals
def test_sample_grid_takes_zyx_points():
    v = torch.arange(5 * 6 * 7, dtype=torch.float32).reshape(1, 1, 5, 6, 7)
    p = torch.tensor([3.0, 1.0, 5.0]).reshape(1, 1, 1, 1, 3)
    assert float(sample_grid(v, p)) == float(v[0, 0, 3, 1, 5])


@pytest.mark.parametrize("shape", [(8, 5, 3), (1, 4, 4), (2, 1, 7)])
@pytest.mark.parametrize("radius", [1, 2])
def test_window_lookup_equals_grid_sample(shape, radius):
    """The fast correlation look-up gives grid_sample's values (and gradients) on the window,
    also for centres far outside the volume and for axes of size 1."""
    import itertools

    torch.manual_seed(0)
    n = 300
    vol = torch.randn(n, *shape, requires_grad=True)
    centre = torch.stack([torch.rand(n) * (s + 10) - 5 for s in shape], 1)
    centre[:4] = 1e3
    centre[4:8] = -1e3
    offs = torch.tensor(list(itertools.product(range(-radius, radius + 1), repeat=3)), dtype=torch.float32)
    ref = sample_grid(vol[:, None], centre[:, None, None, None] + offs.view(1, -1, 1, 1, 3))
    got = window_lookup(vol, centre, radius)
    k = 2 * radius + 1
    assert got.shape == (n, k, k, k)
    assert torch.allclose(got.reshape(n, -1), ref.reshape(n, -1), atol=1e-5)
    assert float(got[:8].detach().abs().max()) == 0.0 or 1 in shape   # outside: zero (size-1 axes read index 0)
    (g1,) = torch.autograd.grad(got.square().sum(), vol)
    (g2,) = torch.autograd.grad(ref.square().sum(), vol)
    assert torch.allclose(g1, g2, atol=1e-4)


def test_correlation_pyramid_levels_are_pooled_correlations():
    torch.manual_seed(0)
    f1, f2 = torch.randn(1, 8, 6, 4, 5), torch.randn(1, 8, 6, 4, 5)
    pyr = _CorrPyramid(f1, f2, levels=3, radius=1).pyramid
    a = torch.nn.functional.normalize(f1.reshape(1, 8, -1), dim=1)
    b = torch.nn.functional.normalize(f2.reshape(1, 8, -1), dim=1)
    full = (4.0 * a.transpose(1, 2) @ b).reshape(-1, 1, 6, 4, 5)
    assert torch.allclose(pyr[0], full[:, 0], atol=1e-5)
    assert torch.allclose(pyr[1], torch.nn.functional.avg_pool3d(full, 2)[:, 0], atol=1e-5)
    assert len(pyr) == 3 and pyr[2].shape == (120, 1, 1, 1)


def test_convex_upsampling_scales_the_flow():
    net = VolRAFT(downsample=4)
    coarse = torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1, 1).expand(1, 3, 3, 3, 3)
    up = net.upsample(coarse, torch.randn(1, 27 * 64, 3, 3, 3))
    assert up.shape == (1, 3, 12, 12, 12)
    assert torch.allclose(up, torch.tensor([2.0, -4.0, 8.0]).view(1, 3, 1, 1, 1).expand_as(up), atol=1e-5)


def test_synthetic_pairs_are_consistent():
    tex = [np.random.default_rng(2).random((40, 40, 40)).astype(np.float32)]
    sp = dvc.SyntheticPairs(tex, patch=16, margin=8, n_fields=6, amplitude=(1.0, 3.0), noise=(0.001, 0.002),
                            procedural=0.5, seed=0, device="cpu")
    f, m, u = sp.sample(4, np.random.default_rng(0))
    for b in range(4):
        F, M, U = f[b, 0].numpy(), m[b, 0].numpy(), u[b].numpy()
        res_true = np.abs(phantoms.warp(M, U) - F)[3:-3, 3:-3, 3:-3].mean()
        res_flip = np.abs(phantoms.warp(M, -U) - F)[3:-3, 3:-3, 3:-3].mean()
        assert res_true < res_flip


def test_sequence_loss_weights_late_iterations():
    t = torch.zeros(1, 3, 4, 4, 4)
    assert float(dvc.sequence_loss([t, t + 1.0], t, gamma=0.5)) > float(dvc.sequence_loss([t + 1.0, t], t, gamma=0.5))


# ---------------------------------------------------------------- weights
def test_shipped_weights_load_offline_with_a_model_card(net):
    assert isinstance(net, VolRAFT) and not net.training
    path = dvc.pretrained_path()
    assert path.stat().st_size < 5e6
    card = path.with_suffix(".md").read_text().lower()
    for word in ("training data", "steps", "validation", "epe"):
        assert word in card


def test_save_and_load_roundtrip(tmp_path):
    net = dvc.make_model(downsample=4)
    p = dvc.save_model(net, tmp_path / "v.pt")
    back = dvc.load_model(p)
    for (k, a), (_, b) in zip(net.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(TypeError, match="^model"):
        dvc.save_model(torch.nn.Linear(2, 2), tmp_path / "x.pt")


def test_fine_tune_runs(texture):
    vol = np.pad(texture, 8, mode="reflect")
    net = dvc.fine_tune(dvc.make_model(), vol, steps=2, patch=16, batch_size=1, iters=2, n_fields=2, progress=False)
    assert net.tomoml_history["steps"] == 2 and not net.training


# ---------------------------------------------------------------- strain
def test_strain_of_uniform_stretch_and_rigid_translation():
    z, y, x = np.indices((10, 10, 10), dtype=np.float64)
    s = dvc.strain(np.stack([0 * z, 0.02 * y, 0 * x]))
    assert np.allclose(s["E"][1, 1], 0.02 + 0.5 * 0.02**2, atol=1e-6)
    assert np.allclose(s["E"][0, 0], 0, atol=1e-7) and np.allclose(s["E"][0, 1], 0, atol=1e-7)
    assert np.allclose(s["volumetric"], 0.02, atol=1e-6)
    assert np.allclose(s["max_principal"], s["E"][1, 1], atol=1e-6)
    t = dvc.strain(np.ones((3, 6, 6, 6)) * 2.5)
    for k in ("volumetric", "max_shear", "max_principal"):
        assert np.abs(t[k]).max() < 1e-6


def test_strain_of_simple_shear_and_voxel_size():
    z, y, x = np.indices((8, 8, 8), dtype=np.float64)
    g = 0.04
    s = dvc.strain(np.stack([0 * z, 0 * y, g * y]))  # u_x = g * y
    assert np.allclose(s["E"][1, 2], g / 2, atol=1e-6) and np.allclose(s["E"][2, 1], g / 2, atol=1e-6)
    assert np.allclose(s["volumetric"], 0, atol=1e-6)
    assert np.allclose(s["max_shear"], 0.5 * np.sqrt(g**2 + g**4 / 4), atol=1e-5)
    # same physical strain whatever the voxel size when displacements are in voxels of that size
    z, y, x = np.indices((16, 16, 16), dtype=np.float64)
    s2 = dvc.strain(np.stack([0 * z, 0 * y, g * y]), voxel_size=(2.0, 2.0, 2.0), smooth=1.0)
    assert np.allclose(s2["E"][1, 2][5:-5, 5:-5, 5:-5], g / 2, atol=1e-5)
    with pytest.raises(ValueError, match="^voxel_size"):
        dvc.strain(np.zeros((3, 4, 4, 4)), voxel_size=(1, 0, 1))
    with pytest.raises(ValueError, match="^u"):
        dvc.strain(np.zeros((2, 4, 4, 4)))
    masked = dvc.strain(np.zeros((3, 4, 4, 4)), mask=np.eye(4, dtype=bool)[None].repeat(4, 0))
    assert np.isnan(masked["volumetric"]).sum() == 4 * 12


# ---------------------------------------------------------------- metric
def test_endpoint_error():
    u = np.zeros((3, 4, 4, 4))
    v = u.copy()
    v[0, 0] = 2.0
    e = metrics.endpoint_error(v, u)
    assert e["mean"] == pytest.approx(0.5) and e["under_1"] == pytest.approx(0.75) and e["under_3"] == 1.0
    m = np.zeros((4, 4, 4), bool)
    m[1:] = True
    assert metrics.endpoint_error(v, u, mask=m)["mean"] == 0.0
    with pytest.raises(ValueError, match="^mask"):
        metrics.endpoint_error(v, u, mask=np.ones((4, 4), bool))
    with pytest.raises(ValueError, match="^u_est"):
        metrics.endpoint_error(v[:, :2], u)


# ---------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("method", ["optflow", "volraft"])
def test_bad_inputs_name_the_parameter(texture, method):
    good = texture
    est = dvc.estimate_displacement
    with pytest.raises(ValueError, match="^moving"):
        est(good, good[:-1], method)
    with pytest.raises(ValueError, match="^fixed"):
        est(good[0], good[0], method)
    bad = good.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="^moving"):
        est(good, bad, method)
    bad[1, 2, 3] = np.inf
    with pytest.raises(ValueError, match="^fixed"):
        est(bad, good, method)
    with pytest.raises(ValueError, match="^fixed"):
        est(np.ones_like(good), good, method)
    with pytest.raises(ValueError, match="^moving"):
        est(good, np.zeros(good.shape, np.uint8), method)
    with pytest.raises(ValueError, match="^mask"):
        est(good, good, method, mask=np.ones((4, 4, 4), bool))
    with pytest.raises(ValueError, match="^mask"):
        est(good, good, method, mask=np.zeros(good.shape, bool))
    with pytest.raises(ValueError, match="^fixed"):
        est(good[:4], good[:4], method)


def test_bad_options_name_the_parameter(texture):
    with pytest.raises(ValueError, match="^method"):
        dvc.estimate_displacement(texture, texture, "sift")
    with pytest.raises(ValueError, match="^preset"):
        dvc.estimate_displacement(texture, texture, "optflow", preset="fast")
    with pytest.raises(TypeError, match="^beta"):
        dvc.estimate_displacement(texture, texture, "optflow", beta=1.0)
    with pytest.raises(ValueError, match="^scale"):
        dvc.estimate_displacement(texture, texture, "optflow", scale=1.5)
    with pytest.raises(ValueError, match="^patch_shape"):
        dvc.estimate_displacement(texture, texture, "volraft", patch_shape=8, model=dvc.make_model())
    with pytest.raises(TypeError, match="^model"):
        dvc.estimate_displacement(texture, texture, "volraft", model=torch.nn.Linear(1, 1))


# ---------------------------------------------------------------- inference iterations
class _CountingNet(_PhaseCorrelationNet):
    def __init__(self, meta=None):
        super().__init__()
        self.seen = []
        if meta is not None:
            self.tomoml_meta = meta

    def forward(self, fixed, moving, iters=1):
        self.seen.append(iters)
        return super().forward(fixed, moving, iters)


@pytest.mark.parametrize("meta,given,expected", [(None, None, dvc.DEFAULT_ITERS), ({"inference_iters": 5}, None, 5),
                                                 ({"inference_iters": 5}, 3, 3)])
def test_volraft_iterations_follow_the_weights_unless_given(texture, meta, given, expected):
    net = _CountingNet(meta)
    dvc.estimate_displacement(texture, texture, "volraft", model=net, iters=given, patch_shape=32, overlap=8,
                              progress=False)
    assert net.seen and set(net.seen) == {expected}


def test_shipped_weights_store_the_iterations_chosen_on_validation(net):
    chosen = net.tomoml_meta["inference_iters"]
    by_iters = {int(k): v for k, v in net.tomoml_meta["val_epe_by_iters"].items()}
    assert dvc.inference_iters(net) == chosen == min(by_iters, key=by_iters.get)


def test_choose_iters_rejects_bad_candidates():
    with pytest.raises(ValueError, match="candidates"):
        dvc.choose_iters(dvc.make_model(), [], candidates=())
    with pytest.raises(ValueError, match="candidates"):
        dvc.choose_iters(dvc.make_model(), [], candidates=(0,))


def test_voxel_size_and_patch_shape_errors_name_the_parameter(texture):
    u = np.zeros((3, 6, 6, 6))
    for bad in ((1, 2), "1um", None, (1, 2, 3, 4), (1, np.nan, 1)):
        with pytest.raises(ValueError, match="^voxel_size"):
            dvc.strain(u, voxel_size=bad)
    assert dvc.strain(u, voxel_size=(2, 1, 1))["E"].shape == (3, 3, 6, 6, 6)
    with pytest.raises(ValueError, match="^patch_shape"):
        dvc.estimate_displacement(texture, texture, "volraft", patch_shape=(32, 32), model=dvc.make_model())
    with pytest.raises(ValueError, match="^overlap"):
        dvc.estimate_displacement(texture, texture, "volraft", patch_shape=32, overlap=(4, 4),
                                  model=dvc.make_model())


def test_save_model_never_overwrites_without_overwrite(tmp_path):
    net = dvc.make_model(downsample=4)
    mine = tmp_path / "v.pt"
    mine.write_text("mine")
    with pytest.raises(FileExistsError, match="^path"):
        dvc.save_model(net, mine)
    assert mine.read_text() == "mine"
    assert dvc.load_model(dvc.save_model(net, mine, overwrite=True)).factor == net.factor
