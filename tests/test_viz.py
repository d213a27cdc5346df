"""Tests for tomoml_nb.viz and tomoml_nb.widgets (headless, Agg backend)."""
import subprocess
import sys
import textwrap

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from tomoml_nb import viz  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def phantom():
    """Two balls in noise, class labels from thresholds, a smooth vector field."""
    rng = np.random.default_rng(0)
    shape = (20, 24, 28)
    zz, yy, xx = np.indices(shape)
    vol = np.zeros(shape)
    vol[(zz - 10) ** 2 + (yy - 12) ** 2 + (xx - 10) ** 2 < 36] = 1.0
    vol[(zz - 8) ** 2 + (yy - 10) ** 2 + (xx - 20) ** 2 < 16] = 2.0
    vol += rng.normal(0, 0.1, shape)
    labels = (vol > 0.5).astype(np.int32) + (vol > 1.5)
    vectors = np.stack([0.05 * (zz - 10), 0.02 * (yy - 12), -0.03 * (xx - 14)]).astype(float)
    return vol, labels, vectors


def _n_image_axes(fig):
    return sum(1 for ax in fig.axes if ax.images)


# --------------------------------------------------------------------------- orthoslices

def test_orthoslices_panels_and_titles(phantom):
    vol, labels, vectors = phantom
    fig = viz.orthoslices(vol, labels=labels, vectors=vectors, label_names={1: "a", 2: "b"}, title="t")
    assert isinstance(fig, Figure)
    assert _n_image_axes(fig) == 3
    titles = [ax.get_title() for ax in fig.axes[:3]]
    assert titles == ["z = 10  (y-x plane)", "y = 12  (z-x plane)", "x = 14  (z-y plane)"]
    assert len(fig.axes) == 5  # 3 panels + grey and vector colourbars
    assert all(len(ax.collections) == 1 for ax in fig.axes[:3])  # one quiver per panel
    assert fig.legends


def test_orthoslices_index_and_no_colorbar(phantom):
    vol, _, _ = phantom
    fig = viz.orthoslices(vol, index=(3, None, 0), colorbar=False)
    assert len(fig.axes) == 3
    assert fig.axes[0].get_title().startswith("z = 3")
    assert fig.axes[2].get_title().startswith("x = 0")
    z_img = fig.axes[0].images[0].get_array()
    np.testing.assert_allclose(z_img, vol[3])


def test_orthoslices_into_given_axes(phantom):
    vol, _, _ = phantom
    fig, axes = plt.subplots(1, 3)
    out = viz.orthoslices(vol, axes=axes, colorbar=False)
    assert out is fig


def test_orthoslices_lazy_array(phantom):
    vol, _, _ = phantom

    class Lazy:  # h5py/zarr-like: shape, dtype, slicing, no numpy subclass
        def __init__(self, a):
            self._a, self.shape, self.dtype = a, a.shape, a.dtype
            self.reads = 0

        def __getitem__(self, key):
            self.reads += 1
            return self._a[key]

    lazy = Lazy(vol)
    fig = viz.orthoslices(lazy)
    assert lazy.reads == 3
    assert _n_image_axes(fig) == 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(volume=np.zeros((4, 4))), "^volume: expected a 3D"),
        (dict(volume=np.full((4, 4, 4), np.nan)), "^volume: contains"),
        (dict(labels=np.zeros((2, 2, 2), int)), "^labels: shape"),
        (dict(labels=np.full((20, 24, 28), 0.5)), "^labels: expected integer"),
        (dict(labels=-np.ones((20, 24, 28), int)), "^labels: labels must be >= 0"),
        (dict(vectors=np.zeros((20, 24, 28))), "^vectors: expected a 4D"),
        (dict(vectors=np.zeros((2, 20, 24, 28))), r"^vectors: expected shape \(3, z, y, x\)"),
        (dict(index=(99, None, None)), "^index: z index 99"),
        (dict(label_alpha=2.0), "^label_alpha:"),
        (dict(percentile=(90, 10)), "^percentile:"),
    ],
)
def test_orthoslices_bad_inputs(phantom, kwargs, match):
    vol, _, _ = phantom
    kwargs = dict(kwargs)
    volume = kwargs.pop("volume", vol)
    with pytest.raises(ValueError, match=match):
        viz.orthoslices(volume, **kwargs)


def test_orthoslices_bad_index_type(phantom):
    with pytest.raises(TypeError, match="^index:"):
        viz.orthoslices(phantom[0], index=5)


# --------------------------------------------------------------------------- compare

def test_compare_grid_and_error_map(phantom):
    vol, labels, _ = phantom
    truth = vol[10]
    noisy = truth + 0.2
    fig = viz.compare(
        {"noisy": noisy, "truth": truth, "|error|": np.abs(noisy - truth), "seg": labels[10]},
        cmap={"|error|": "magma"}, labels=["seg"], colorbar=["|error|"], label_names={1: "a", 2: "b"},
        suptitle="s",
    )
    assert [ax.get_title() for ax in fig.axes[:4]] == ["noisy", "truth", "|error|", "seg"]
    assert len(fig.axes) == 5  # 4 panels + 1 colourbar
    # shared contrast for the two grey panels
    assert fig.axes[0].images[0].get_clim() == fig.axes[1].images[0].get_clim()
    # the label panel is drawn as RGBA, background black
    seg_rgba = fig.axes[3].images[0].get_array()
    assert seg_rgba.shape == labels[10].shape + (4,)
    assert np.allclose(seg_rgba[labels[10] == 0], (0, 0, 0, 1))


def test_compare_ncols_and_rgb():
    rng = np.random.default_rng(1)
    imgs = {f"p{i}": rng.random((8, 10)) for i in range(5)}
    imgs["rgb"] = rng.random((8, 10, 3))
    fig = viz.compare(imgs, ncols=3, share_contrast=False)
    assert len(fig.axes) == 6
    assert fig.axes[0].images[0].get_clim() != fig.axes[1].images[0].get_clim()


def test_compare_diverging_is_symmetric():
    img = np.linspace(-1, 3, 100).reshape(10, 10)
    fig = viz.compare({"diff": img}, cmap="RdBu_r")
    lo, hi = fig.axes[0].images[0].get_clim()
    assert lo == pytest.approx(-hi)


@pytest.mark.parametrize(
    "images, kwargs, exc, match",
    [
        ([np.zeros((4, 4))], {}, TypeError, "^images: expected a dict"),
        ({}, {}, ValueError, "^images: the dict is empty"),
        ({"a": np.zeros((4, 4, 4, 4))}, {}, ValueError, r"^images\['a'\]: expected a 2D or 3D"),
        ({"a": np.zeros((4, 4, 5))}, {}, ValueError, r"^images\['a'\]: expected a 2D image or an RGB"),
        ({"a": np.zeros((4, 4))}, {"labels": ["b"]}, ValueError, "^labels: unknown panel"),
        ({"a": np.zeros((4, 4))}, {"cmap": {"b": "magma"}}, ValueError, "^cmap: unknown panel"),
        ({"a": np.zeros((4, 4))}, {"cmap": "nope"}, ValueError, "^cmap: unknown colormap"),
    ],
)
def test_compare_bad_inputs(images, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        viz.compare(images, **kwargs)


# --------------------------------------------------------------------------- overlays

def test_overlay_rgb_and_transparent_background():
    img = np.linspace(0, 1, 100).reshape(10, 10)
    lab = np.zeros((10, 10), int)
    lab[2:5, 2:5] = 1
    lab[6:8, 6:9] = 7
    rgb = viz.overlay(img, lab, alpha=0.5, vmin=0, vmax=1)
    assert rgb.shape == (10, 10, 3)
    assert rgb.min() >= 0 and rgb.max() <= 1
    # background keeps the grey image (up to the colormap's 256 levels)
    np.testing.assert_allclose(rgb[lab == 0], np.repeat(img[lab == 0][:, None], 3, axis=1), atol=1 / 255 + 1e-6)
    # labelled pixels are tinted (not grey any more)
    assert np.ptp(rgb[3, 3]) > 0.05
    assert not np.allclose(rgb[3, 3], rgb[7, 7])
    assert viz.overlay(img, lab, outline=True).shape == (10, 10, 3)


def test_overlay_bad_inputs():
    with pytest.raises(ValueError, match="^labels2d: shape"):
        viz.overlay(np.zeros((4, 4)), np.zeros((4, 5), int))
    with pytest.raises(ValueError, match="^image2d: expected a 2D"):
        viz.overlay(np.zeros((4, 4, 4)), np.zeros((4, 4), int))
    with pytest.raises(ValueError, match="^alpha:"):
        viz.overlay(np.zeros((4, 4)), np.zeros((4, 4), int), alpha=-1)


def test_plot_overlay_figure():
    img = np.random.default_rng(0).random((12, 16))
    fig = viz.plot_overlay(img, (img > 0.8).astype(int), label_names={1: "bright"}, title="o")
    assert len(fig.axes) == 1 and fig.axes[0].get_title() == "o"
    assert fig.axes[0].images[0].get_array().shape == (12, 16, 3)


def test_label_cmap():
    cm = viz.label_cmap(300)
    assert cm.N == 301
    assert cm.colors[0][3] == 0.0
    assert viz.label_cmap(3, background="black").colors[0][3] == 1.0
    # colours depend on the id only, and are distinct and deterministic
    np.testing.assert_allclose(viz.label_cmap(5).colors[1:6], viz.label_cmap(300).colors[1:6])
    np.testing.assert_allclose(viz.label_cmap(300).colors, viz.label_cmap(300).colors)
    cols = np.asarray(viz.label_cmap(300).colors)[1:, :3]
    assert np.all(np.abs(np.diff(cols, axis=0)).sum(axis=1) > 0.05)  # neighbours differ
    with pytest.raises(ValueError, match="^n:"):
        viz.label_cmap(0)
    with pytest.raises(ValueError, match="^background:"):
        viz.label_cmap(3, background="white")


# --------------------------------------------------------------------------- vector fields

def test_plot_vector_field_single_and_dict(phantom):
    _, _, u = phantom
    fig = viz.plot_vector_field(u)
    assert _n_image_axes(fig) == 3
    assert [ax.get_title() for ax in fig.axes[:3]] == ["u_z", "u_y", "u_x"]
    for ax in fig.axes[:3]:
        lo, hi = ax.images[0].get_clim()
        assert lo == pytest.approx(-hi)
    fig = viz.plot_vector_field({"truth": u, "classical": u + 0.1, "learned": u * 0.9}, axis="x", index=3)
    assert _n_image_axes(fig) == 9
    # a component column shares one scale across rows
    assert fig.axes[0].images[0].get_clim() == fig.axes[3].images[0].get_clim()
    fig = viz.plot_vector_field(u, component="magnitude")
    assert _n_image_axes(fig) == 1
    assert fig.axes[0].images[0].get_clim()[0] == 0


def test_plot_vector_field_bad_inputs(phantom):
    _, _, u = phantom
    with pytest.raises(ValueError, match=r"^u: expected shape \(3, z, y, x\)"):
        viz.plot_vector_field(u[:2])
    with pytest.raises(ValueError, match="^u: expected a 4D"):
        viz.plot_vector_field(u[0])
    with pytest.raises(ValueError, match=r"^u\['b'\]: shape"):
        viz.plot_vector_field({"a": u, "b": u[:, :5]})
    with pytest.raises(ValueError, match="^axis:"):
        viz.plot_vector_field(u, axis="w")
    with pytest.raises(ValueError, match="^index:"):
        viz.plot_vector_field(u, index=100)
    with pytest.raises(ValueError, match="^component:"):
        viz.plot_vector_field(u, component="w")


# --------------------------------------------------------------------------- histogram

def test_plot_histogram(phantom):
    vol, labels, _ = phantom
    fig = viz.plot_histogram(vol, labels, label_names={1: "a", 2: "b"}, thresholds=[0.5, 1.5], bins=64)
    ax = fig.axes[0]
    assert len(fig.axes) == 1
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts == ["all voxels", "unlabelled (0)", "a", "b"]
    fig = viz.plot_histogram(vol, log=False, range=(0, 1))
    assert fig.axes[0].get_xlim() == (0, 1)
    with pytest.raises(ValueError, match="^labels: shape"):
        viz.plot_histogram(vol, labels[:2])
    with pytest.raises(ValueError, match="^labels: 30 distinct"):
        viz.plot_histogram(vol, np.arange(vol.size).reshape(vol.shape) % 30)


# --------------------------------------------------------------------------- view3d

def test_view3d_static_volume(phantom):
    vol, _, _ = phantom
    fig = viz.view3d(vol)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 4
    assert fig.axes[3].name == "3d"
    assert fig._tomoml_n_faces > 0


def test_view3d_static_labels_only(phantom):
    _, labels, _ = phantom
    fig = viz.view3d(None, labels=labels, max_labels=1, label_names={1: "a", 2: "b"})
    assert len(fig.axes) == 4
    assert "largest" in fig.axes[3].get_title()


def test_view3d_static_does_not_import_interactive_viewers():
    code = textwrap.dedent(
        """
        import sys, matplotlib
        matplotlib.use("Agg")
        import numpy as np
        from tomoml_nb import viz
        vol = np.zeros((12, 12, 12)); vol[3:9, 3:9, 3:9] = 1
        fig = viz.view3d(vol, labels=(vol > 0).astype(int))
        bad = [m for m in ("k3d", "itkwidgets", "ipywidgets") if m in sys.modules]
        print("BAD", bad)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "BAD []" in out.stdout


def test_view3d_errors(phantom, monkeypatch):
    vol, _, _ = phantom
    with pytest.raises(ValueError, match="^viewer: unknown value 'vtk'; choose one of 'static', 'k3d', 'itk'"):
        viz.view3d(vol, viewer="vtk")
    with pytest.raises(ValueError, match="^volume: got None"):
        viz.view3d(None)
    with pytest.raises(ValueError, match="^volume: expected a 3D"):
        viz.view3d(vol[0])
    with pytest.raises(TypeError, match="^height: unexpected keyword"):
        viz.view3d(vol, height=300)
    monkeypatch.setitem(sys.modules, "itkwidgets", None)  # behaves as "not installed"
    with pytest.raises(ImportError, match=r"^viewer='itk' needs itkwidgets.*itkwidgets\[lab\]==1.0a55"):
        viz.view3d(vol, viewer="itk")
    monkeypatch.setitem(sys.modules, "k3d", None)
    with pytest.raises(ImportError, match="^viewer='k3d' needs the k3d package.*pip install k3d"):
        viz.view3d(vol, viewer="k3d")


def test_view3d_k3d(phantom):
    pytest.importorskip("k3d")
    from k3d.plot import Plot

    vol, labels, _ = phantom
    plot = viz.view3d(vol, labels=labels, viewer="k3d", height=300)
    assert isinstance(plot, Plot)
    assert sorted(type(o).__name__ for o in plot.objects) == ["Volume", "Voxels"]
    html = viz.k3d_snapshot_html(plot, height=200).data
    assert html.startswith("<div><iframe srcdoc=") and "height:200px" in html
    with pytest.raises(TypeError, match="^plot:"):
        viz.k3d_snapshot_html(object())


# --------------------------------------------------------------------------- widgets

def test_slice_browser_updates_on_slider(phantom):
    from tomoml_nb.widgets import slice_browser

    vol, labels, _ = phantom
    b = slice_browser(vol, labels=labels, label_names={1: "a"})
    assert b.n_draws == 1 and b.current_axis == "z" and b.current_index == 10
    assert b.output.outputs[0]["data"]["text/plain"] == "<slice z = 10>"
    b.slider.value = 4
    assert b.current_index == 4 and b.n_draws == 2
    assert b.output.outputs[0]["data"]["text/plain"] == "<slice z = 4>"
    assert b.last_png.startswith(b"\x89PNG")
    b.axis_dropdown.value = "x"
    assert (b.current_axis, b.current_index, b.slider.max) == ("x", 14, 27)
    assert b.n_draws == 3  # one redraw per axis change, not one per trait update
    b.alpha_slider.value = 0.8
    assert b.n_draws == 4
    assert isinstance(b.snapshot(), Figure)


def test_compare_browser(phantom):
    from tomoml_nb.widgets import compare_browser

    vol, labels, _ = phantom
    b = compare_browser({"noisy": vol + 0.3, "truth": vol, "seg": labels}, labels=["seg"], axis="y", index=2)
    assert (b.current_axis, b.current_index, b.n_draws) == ("y", 2, 1)
    b.slider.value = 7
    assert b.current_index == 7 and b.n_draws == 2
    assert b.output.outputs[0]["data"]["text/plain"] == "<slice y = 7>"
    with pytest.raises(ValueError, match=r"^volumes\['b'\]: shape"):
        compare_browser({"a": vol, "b": vol[:3]})


def test_widgets_bad_inputs(phantom):
    from tomoml_nb.widgets import compare_browser, slice_browser

    vol, labels, _ = phantom
    with pytest.raises(ValueError, match="^volume: expected a 3D"):
        slice_browser(vol[0])
    with pytest.raises(ValueError, match="^labels: shape"):
        slice_browser(vol, labels=labels[:3])
    with pytest.raises(ValueError, match="^axis:"):
        slice_browser(vol, axis="w")
    with pytest.raises(ValueError, match="^index:"):
        slice_browser(vol, index=99)
    with pytest.raises(TypeError, match="^volumes: expected a dict"):
        compare_browser([vol])
