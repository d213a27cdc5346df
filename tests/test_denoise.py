"""Tests for tomoml_nb.denoise and the MSD network."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tomoml_nb import denoise as dn
from tomoml_nb import tomo
from tomoml_nb.models.msd import MSDNet, _DilatedLayer


def _pair(n=3, size=48, sigma=0.25, seed=0):
    rng = np.random.default_rng(seed)
    clean = np.zeros((n, size, size), np.float32)
    for i in range(n):
        r0, c0 = rng.integers(4, size // 2, 2)
        clean[i, r0:r0 + size // 3, c0:c0 + size // 4] = 1.0
        clean[i, size // 2:size // 2 + 6, 5:size - 5] = 0.5
    noisy = clean + sigma * rng.standard_normal(clean.shape).astype(np.float32)
    return noisy, clean


# ------------------------------------------------------------------------------ MSD network
def test_msd_dilations_cycle_and_dense_connectivity():
    net = MSDNet(depth=12, max_dilation=10)
    assert [layer.dilation for layer in net.layers] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2]
    assert [layer.in_channels for layer in net.layers] == list(range(1, 13))   # all previous maps
    assert net.final.in_channels == 13 and net.final.kernel_size == (1, 1)


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate"])
def test_dilated_layer_equals_conv2d(mode):
    layer = _DilatedLayer(4, 2, 3, mode).double()
    conv = torch.nn.Conv2d(4, 2, 3, padding=3, dilation=3, padding_mode=mode).double()
    conv.weight.data.copy_(layer.weight.data)
    conv.bias.data.copy_(layer.bias.data)
    x = torch.randn(2, 4, 15, 17, dtype=torch.double, requires_grad=True)
    y1, y2 = layer(x), conv(x)
    assert torch.allclose(y1, y2, atol=1e-10)
    g = torch.randn_like(y1)
    gx1, gw1, gb1 = torch.autograd.grad(y1, (x, layer.weight, layer.bias), g)
    gx2, gw2, gb2 = torch.autograd.grad(y2, (x, conv.weight, conv.bias), g)
    assert torch.allclose(gx1, gx2, atol=1e-10) and torch.allclose(gw1, gw2, atol=1e-9)
    assert torch.allclose(gb1, gb2, atol=1e-10)


def test_msd_identity_at_init_and_checkpoint_same_gradients():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 24, 24)
    net = MSDNet(depth=6)
    assert torch.allclose(net(x), x)
    net.final.weight.data.normal_()
    net.train()
    g = []
    for ck in (False, True):
        net.checkpoint = ck
        net.zero_grad()
        net(x).square().mean().backward()
        g.append(net.layers[0].weight.grad.clone())
    assert torch.allclose(g[0], g[1], atol=1e-6)


def test_msd_bad_inputs():
    with pytest.raises(ValueError, match="depth"):
        MSDNet(depth=0)
    with pytest.raises(ValueError, match="padding_mode"):
        MSDNet(padding_mode="circular")
    with pytest.raises(ValueError, match="x:"):
        MSDNet(depth=3)(torch.zeros(1, 2, 16, 16))
    with pytest.raises(ValueError, match="x:"):
        MSDNet(depth=10, max_dilation=10)(torch.zeros(1, 1, 8, 8))


# ------------------------------------------------------------------------------ supervised
def test_supervised_msd_beats_noisy_input_on_held_out_slices():
    noisy, clean = _pair(6, seed=0)
    test_noisy, test_clean = _pair(2, seed=1)            # different seed: held out
    model = dn.train_supervised(noisy, clean, depth=10, steps=120, patch=32, batch=4, lr=3e-3, progress=False)
    out = model(test_noisy, progress=False)
    before = dn.evaluate(test_noisy, test_clean)["psnr"]
    after = dn.evaluate(out, test_clean)["psnr"]
    assert after > before + 3.0, (before, after)


def test_denoiser_save_load_roundtrip_and_tiling(tmp_path):
    noisy, clean = _pair(2)
    model = dn.train_supervised(noisy, clean, depth=4, steps=3, patch=32, progress=False)
    path = model.save(tmp_path / "m.pt")
    again = dn.Denoiser.load(path)
    a = dn.denoise(noisy, model, progress=False)
    b = dn.denoise(noisy, again, progress=False)
    assert np.allclose(a, b, atol=1e-6)
    tiled = dn.denoise(noisy, again, tile=32, overlap=16, progress=False)   # 48 > 32: tiled path
    assert tiled.shape == noisy.shape
    assert np.abs(tiled - a).mean() < 0.05 * np.abs(a).mean() + 1e-3


@pytest.mark.parametrize("shape", [(2, 24, 40), (24, 24)])
def test_tta_averages_the_eight_orientations(shape):
    """Self-ensemble of a linear, non-symmetric filter = the filter with its kernel averaged over
    the 8 rotations/mirrorings; a wrong inverse transform would give a different kernel."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    out = dn.denoise(x, conv, tta=True, progress=False)
    assert out.shape == x.shape and out.dtype == np.float32
    k = conv.weight.detach().numpy()[0, 0]
    sym = np.mean([np.rot90(kk, r) for kk in (k, k[:, ::-1]) for r in range(4)], 0)
    ref = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False)
    ref.weight.data[:] = torch.from_numpy(sym.copy())
    expect = dn.denoise(x, ref, progress=False)
    assert np.allclose(out, expect, atol=1e-5)
    assert not np.allclose(out, dn.denoise(x, conv, progress=False), atol=1e-3)   # the kernel is not symmetric


@pytest.mark.usefixtures("one_torch_thread")   # training picks its thread count from the idle cores; a count
def test_train_is_deterministic():                # that differs between the two runs changes the last bits
    noisy, clean = _pair(2)
    a = dn.train_supervised(noisy, clean, depth=4, steps=5, patch=32, seed=3, progress=False)
    b = dn.train_supervised(noisy, clean, depth=4, steps=5, patch=32, seed=3, progress=False)
    assert np.array_equal(a(noisy, progress=False), b(noisy, progress=False))


def test_supervised_bad_inputs():
    noisy, clean = _pair(2)
    with pytest.raises(ValueError, match="clean"):
        dn.train_supervised(noisy, clean[:1], steps=1)
    with pytest.raises(ValueError, match="steps"):
        dn.train_supervised(noisy, clean, steps=0)
    with pytest.raises(ValueError, match="noisy"):
        dn.train_supervised(np.zeros((4,)), np.zeros((4,)))
    with pytest.raises(ValueError, match="^model"):        # neither a shipped name nor a file
        dn.denoise(noisy, "not a model")
    with pytest.raises(TypeError, match="^model"):
        dn.denoise(noisy, 3.5)


# ------------------------------------------------------------------------------ Noise2Inverse
def _scan(n_angles=128, N=48, seed=0):
    img = np.zeros((N, N), np.float32)
    img[10:38, 12:36] = 1.0
    img[18:26, 18:30] = 2.0
    sim = dn.simulate_low_dose(img, n_angles=n_angles, flux=300, seed=seed)
    return sim


def test_split_reconstructions_are_unbiased_and_independent():
    sim = _scan()
    subs = dn.split_reconstructions(sim["projections"], sim["angles"], 4)
    assert subs.shape == (4, 1, 48, 48)
    m = sim["mask"]
    full = tomo.reconstruct(sim["projections"], sim["angles"])
    assert np.allclose(subs.mean(0)[0][m], full[m], atol=0.05 * np.abs(full).max())
    noise = subs[:, 0][:, m] - sim["truth"][m]
    c = np.corrcoef(noise[0], noise[1])[0, 1]
    assert abs(c) < 0.3


def test_noise2inverse_denoises_without_clean_data():
    sim = _scan()
    out, model = dn.noise2inverse(sim["projections"], sim["angles"], 2, depth=10, steps=120, patch=32,
                                  lr=3e-3, progress=False, return_model=True)
    assert out.shape == (48, 48)
    assert isinstance(model, dn.Denoiser)
    m = sim["mask"]
    before = dn.evaluate(sim["reconstruction"], sim["truth"], mask=m)["psnr"]
    after = dn.evaluate(out, sim["truth"], mask=m)["psnr"]
    assert after > before + 2.0, (before, after)


def test_noise2inverse_accepts_projection_stacks():
    sim = dn.simulate_low_dose(np.ones((2, 32, 32), np.float32), n_angles=32, flux=1000)
    assert sim["projections"].shape == (32, 2, 32)
    out = dn.noise2inverse(sim["projections"], sim["angles"], 4, depth=3, steps=2, patch=16, progress=False)
    assert out.shape == (2, 32, 32)


def test_noise2inverse_bad_inputs():
    sim = _scan(n_angles=16)
    with pytest.raises(ValueError, match="angles"):
        dn.noise2inverse(sim["projections"], sim["angles"][:-1], 2, steps=1)
    with pytest.raises(ValueError, match="n_splits"):
        dn.noise2inverse(sim["projections"], sim["angles"], 1, steps=1)
    with pytest.raises(ValueError, match="n_splits"):
        dn.split_reconstructions(sim["projections"], sim["angles"], 10)
    with pytest.raises(ValueError, match="projections"):
        dn.noise2inverse(np.zeros(5), sim["angles"], 2)


# ------------------------------------------------------------------------------ classical
def test_classical_filters_and_tuning_on_validation():
    noisy, clean = _pair(2, sigma=0.3)
    for method in ("gaussian", "median", "nlm"):
        best = dn.tune_classical(noisy, clean, method)
        assert best["strength"] in best["grid"]
        assert best["psnr"] == max(best["scores"])
        assert best["psnr"] > dn.evaluate(noisy, clean)["psnr"]
    with pytest.raises(ValueError, match="method"):
        dn.classical_filter(noisy, "wiener")
    with pytest.raises(ValueError, match="strength"):
        dn.classical_filter(noisy, "gaussian", -1)
    with pytest.raises(ValueError, match="grid"):
        dn.tune_classical(noisy, clean, "gaussian", grid=())


def test_bm3d_optional():
    noisy, _ = _pair(1)
    if "bm3d" in dn.classical_methods():
        assert dn.classical_filter(noisy[0], "bm3d", 1.0).shape == noisy[0].shape
    else:
        with pytest.raises(ImportError, match="bm3d"):
            dn.classical_filter(noisy, "bm3d", 1.0)


def test_simulate_low_dose_bad_inputs():
    with pytest.raises(ValueError, match="volume"):
        dn.simulate_low_dose(np.ones((16, 20)))
    with pytest.raises(ValueError, match="flux"):
        dn.simulate_low_dose(np.ones((16, 16)), flux=0)
    with pytest.raises(ValueError, match="volume"):
        dn.simulate_low_dose(np.zeros((16, 16)))


# ------------------------------------------------------------------------------ shipped weights
@pytest.mark.parametrize("name, depth", [("msd_bone_implant", 30), ("msd_n2i_bone_implant", 30),
                                         ("msd_deep_bone_implant", 100), ("msd_deep25d_bone_implant", 100),
                                         ("msd_deep25d2_bone_implant", 100)])
def test_shipped_weights_denoise_a_held_out_phantom(name, depth):
    from tomoml_nb.phantoms import bone_implant

    model = dn.load_pretrained(name)
    assert model.net.config["depth"] == depth
    vol = bone_implant((16, 128, 128), seed=42, noise=0.0, rings=0.0).image   # seed unused in training
    sim = dn.simulate_low_dose(vol[6:10], n_angles=360, flux=1000, seed=42)
    before = dn.evaluate(sim["reconstruction"], sim["truth"], mask=sim["mask"])["psnr"]
    after = dn.evaluate(model(sim["reconstruction"], progress=False), sim["truth"], mask=sim["mask"])["psnr"]
    assert after > before + 4.0, (before, after)


def test_shipped_25d_network_gains_from_the_neighbouring_slices():
    from tomoml_nb.phantoms import bone_implant

    vol = bone_implant((16, 128, 128), seed=42, noise=0.0, rings=0.0).image   # seed unused in training
    sim = dn.simulate_low_dose(vol[4:12], n_angles=360, flux=1000, seed=42)
    psnr = {}
    for name, context in (("msd_deep_bone_implant", 0), ("msd_deep25d_bone_implant", 1),
                          ("msd_deep25d2_bone_implant", 2)):
        model = dn.load_pretrained(name)
        assert model.context == context
        psnr[name] = dn.evaluate(model(sim["reconstruction"], progress=False), sim["truth"], mask=sim["mask"])["psnr"]
    # each started as the network with one neighbour less (measured: 32.04, 32.82, 32.90 dB on these 8 slices)
    assert psnr["msd_deep25d_bone_implant"] > psnr["msd_deep_bone_implant"] + 0.3, psnr
    assert psnr["msd_deep25d2_bone_implant"] > psnr["msd_deep25d_bone_implant"] + 0.03, psnr


def test_load_pretrained_unknown_name():
    with pytest.raises(ValueError, match="name"):
        dn.load_pretrained("msd_nonexistent")


def test_noise2inverse_and_splits_refuse_angles_in_degrees():
    deg = np.degrees(np.linspace(0, np.pi, 32, endpoint=False))
    proj = np.random.default_rng(0).random((32, 16)).astype(np.float32)
    with pytest.raises(ValueError, match=r"^angles: .*radians.*deg2rad"):
        dn.split_reconstructions(proj, deg)
    with pytest.raises(ValueError, match=r"^angles: .*radians"):
        dn.noise2inverse(proj, deg, steps=1, depth=2, progress=False)


def test_denoiser_save_never_overwrites_and_denoise_takes_names_and_paths(tmp_path):
    model = dn.Denoiser(MSDNet(depth=3), 0.0, 1.0)
    mine = tmp_path / "mine.pt"
    mine.write_text("precious")
    with pytest.raises(FileExistsError, match="^path"):
        model.save(mine)
    assert mine.read_text() == "precious"
    assert model.save(mine, overwrite=True) == mine
    img = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    ref = dn.denoise(img, model, progress=False)
    assert np.allclose(dn.denoise(img, str(mine), progress=False), ref, atol=1e-6)
    assert np.allclose(dn.denoise(img, mine, progress=False), ref, atol=1e-6)
    shipped = dn.denoise(img, "msd_bone_implant", progress=False)
    assert np.allclose(shipped, dn.denoise(img, dn.load_pretrained("msd_bone_implant"), progress=False))
    with pytest.raises(ValueError, match="^model: .*shipped denoiser"):
        dn.denoise(img, "msd_nope", progress=False)
    bad = tmp_path / "bad.pt"
    bad.write_text("not a torch file")
    with pytest.raises(ValueError, match="^model"):
        dn.denoise(img, bad, progress=False)


# ------------------------------------------------------------------------------ 2.5D: neighbouring slices
def _stack(n_slices=8, size=40, sigma=0.35, seed=0):
    """A volume whose object does not change along z, with noise independent between slices."""
    rng = np.random.default_rng(seed)
    clean2d = np.zeros((size, size), np.float32)
    r0, c0 = rng.integers(4, size // 2, 2)
    clean2d[r0:r0 + size // 3, c0:c0 + size // 4] = 1.0
    clean2d[size // 2:size // 2 + 5, 4:size - 4] = 0.5
    clean = np.repeat(clean2d[None], n_slices, 0)
    return clean + sigma * rng.standard_normal(clean.shape).astype(np.float32), clean


def test_context_index_mirrors_at_the_ends():
    idx = dn._context_index(4, 2)
    assert idx.tolist() == [[0, 1, 1, 2, 2], [1, 0, 2, 1, 3], [2, 1, 3, 0, 2], [3, 2, 2, 1, 1]]
    assert dn._context_index(3, 0).tolist() == [[0], [1], [2]]


def test_network_with_context_uses_the_neighbouring_slices():
    train = [_stack(seed=s) for s in range(3)]
    noisy, clean = _stack(seed=10)
    scores = {}
    for k in (0, 1):
        m = dn.train_supervised([t[0] for t in train], [t[1] for t in train], context=k, depth=8, steps=200,
                                patch=32, batch=4, lr=3e-3, progress=False, seed=0)
        assert m.context == k and m.info["context"] == k
        scores[k] = dn.evaluate(m(noisy, progress=False), clean)["psnr"]
    # three independent noisy copies of each slice: the 2.5D network must beat the 2D one clearly
    assert scores[1] > scores[0] + 1.0, scores


def test_with_context_starts_as_the_single_slice_model_and_roundtrips(tmp_path):
    from tomoml_nb.models.msd import MSDNet

    torch.manual_seed(0)
    base = dn.Denoiser(MSDNet(depth=6), 0.2, 1.5)
    torch.nn.init.normal_(base.net.final.weight, std=0.3)
    wide = dn.with_context(base, 2)
    vol = np.random.default_rng(1).normal(size=(6, 72, 72)).astype(np.float32)
    for tile in (512, 40):                                  # whole slices and the tiled path
        np.testing.assert_allclose(wide(vol, progress=False, tile=tile), base(vol, progress=False, tile=tile),
                                   atol=1e-4)
    p = wide.save(tmp_path / "w.pt")
    again = dn.Denoiser.load(p)
    assert again.context == 2
    np.testing.assert_allclose(again(vol, progress=False), wide(vol, progress=False), atol=1e-6)


def test_with_context_widens_a_25d_model_keeping_its_neighbours():
    from tomoml_nb.models.msd import MSDNet

    torch.manual_seed(0)
    one = dn.Denoiser(MSDNet(in_channels=3, depth=6), 0.1, 2.0, {}, {"context": 1})
    for p in one.net.parameters():                          # every weight non-zero, neighbours included
        torch.nn.init.normal_(p, std=0.2)
    assert one.context == 1
    two = dn.with_context(one, 2)
    assert two.context == 2 and two.net.config["in_channels"] == 5
    vol = np.random.default_rng(2).normal(size=(7, 40, 40)).astype(np.float32)
    # the +-1 neighbours keep their weights (channel order: slice, -1, +1, -2, +2), +-2 start at zero
    np.testing.assert_allclose(two(vol, progress=False), one(vol, progress=False), atol=1e-4)


def test_context_bad_inputs():
    from tomoml_nb.models.msd import MSDNet

    wide = dn.with_context(dn.Denoiser(MSDNet(depth=3), 0.0, 1.0), 1)
    noisy, clean = _stack(n_slices=4)
    with pytest.raises(ValueError, match="volume"):
        wide(noisy[0], progress=False)                      # one slice has no neighbours
    with pytest.raises(ValueError, match="context"):
        dn.train_supervised(noisy, clean, model=wide, context=2, steps=1, progress=False)
    with pytest.raises(ValueError, match="noisy"):
        dn.train_supervised(noisy[:1], clean[:1], context=1, depth=3, steps=1, progress=False)
    with pytest.raises(ValueError, match="context"):
        dn.with_context(wide, 1)                            # already has this context
    sim = dn.simulate_low_dose(np.ones((1, 32, 32), np.float32), n_angles=40, flux=1000, seed=0)
    with pytest.raises(ValueError, match="model"):
        dn.noise2inverse(sim["projections"], sim["angles"], 2, model=wide, steps=1, progress=False)


def test_bm4d_filters_the_volume_jointly():
    noisy, clean = _stack(n_slices=6, size=32, sigma=0.2)
    if "bm4d" not in dn.classical_methods():
        with pytest.raises(ImportError, match="bm4d"):
            dn.classical_filter(noisy, "bm4d", 1.0)
        return
    out = dn.classical_filter(noisy, "bm4d", 1.0)
    assert out.shape == noisy.shape and out.dtype == np.float32
    # the object is constant along z: joint 3D filtering beats the per-slice BM3D
    p4 = dn.evaluate(out, clean)["psnr"]
    p3 = dn.evaluate(dn.classical_filter(noisy, "bm3d", 1.0), clean)["psnr"]
    assert p4 > p3 > dn.evaluate(noisy, clean)["psnr"]
    best = dn.tune_classical(noisy, clean, "bm4d", grid=(0.5, 1.0))
    assert best["strength"] in (0.5, 1.0)
    with pytest.raises(ValueError, match="volume"):
        dn.classical_filter(noisy[0], "bm4d", 1.0)


@pytest.mark.parametrize("tta", [False, True])
def test_chunked_denoising_into_out_equals_one_pass(tmp_path, tta):
    import zarr

    torch.manual_seed(1)
    net = MSDNet(in_channels=5, depth=5)                       # reads 2 slices on each side
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    model = dn.Denoiser(net, 0.1, 2.0)
    vol = np.random.default_rng(3).random((11, 16, 16)).astype(np.float32)
    ref = dn.denoise(vol, model, progress=False, tta=tta)
    src = zarr.open(str(tmp_path / "v.zarr"), mode="w", shape=vol.shape, chunks=(3, 16, 16), dtype="f4")
    src[...] = vol
    dst = zarr.open(str(tmp_path / "o.zarr"), mode="w", shape=vol.shape, chunks=(3, 16, 16), dtype="f4")
    # chunks of 3 slices: every chunk needs its neighbours from the next chunks, the last one is short
    assert dn.denoise(src, model, out=dst, chunk=3, progress=False, tta=tta) is dst
    np.testing.assert_allclose(dst[...], ref, atol=1e-5)
    np.testing.assert_allclose(dn.denoise(vol, model, chunk=4, progress=False, tta=tta), ref, atol=1e-5)


def test_chunked_denoising_validates():
    model = dn.Denoiser(MSDNet(depth=3), 0.0, 1.0)
    vol = np.zeros((4, 16, 16), np.float32)
    with pytest.raises(ValueError, match=r"^out: shape"):
        dn.denoise(vol, model, out=np.zeros((4, 16, 15), np.float32), progress=False)
    with pytest.raises(TypeError, match=r"^out: expected a float"):
        dn.denoise(vol, model, out=np.zeros(vol.shape, np.uint16), progress=False)
    with pytest.raises(ValueError, match=r"^chunk"):
        dn.denoise(vol, model, chunk=0, progress=False)
    with pytest.raises(ValueError, match=r"^volume: out= and chunk= need a 3D"):
        dn.denoise(vol[0], model, chunk=2, progress=False)
