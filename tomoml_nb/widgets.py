"""Small ipywidgets browsers for volumes: a slice slider driving matplotlib images.

The browsers render each view to a PNG with matplotlib (no pyplot, no
interactive backend) and put it in an ``ipywidgets.Output``. They therefore work
with the plain inline backend, need no browser extension beyond ipywidgets,
draw the first slice while being constructed, and never wait for a front end:
building one under papermill or in a plain Python process returns at once.

For offline HTML reports (where widget state is stripped) call
``browser.snapshot()`` to get a static matplotlib Figure of the current view.

Examples
--------
>>> import numpy as np
>>> from tomoml_nb.widgets import slice_browser
>>> vol = np.random.default_rng(0).random((10, 32, 32))
>>> b = slice_browser(vol, labels=(vol > 0.9).astype(int))
>>> b.slider.value = 3
>>> b.current_index
3
"""
from __future__ import annotations

import base64
import io
from collections.abc import Mapping

import numpy as np

try:
    import ipywidgets as _ipw
except ImportError as exc:  # pragma: no cover - ipywidgets is a core dependency
    raise ImportError("tomoml_nb.widgets needs ipywidgets: pip install ipywidgets") from exc

from . import viz as _viz
from ._validate import as_array, check_choice, check_positive

__all__ = ["SliceBrowser", "CompareBrowser", "slice_browser", "compare_browser"]

_AXES = ("z", "y", "x")


def _png(fig, dpi):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, pil_kwargs={"compress_level": 1})  # fast encode
    return buf.getvalue()


def _volume(volume, name):
    """Validate a 3D volume; out-of-core arrays (h5py, zarr, dask) are kept lazy."""
    if _viz._is_lazy(volume):
        shape = tuple(int(s) for s in volume.shape)
        if len(shape) != 3:
            raise ValueError(f"{name}: expected a 3D array, got {len(shape)}D with shape {shape}")
        return volume
    return as_array(volume, name, ndim=3)


def _slice(volume, axis, i, name):
    s = _viz._take(volume, axis, i)
    return as_array(s, name, ndim=2) if _viz._is_lazy(volume) else s


def _centre_slices(volume, name):
    return [_slice(volume, a, volume.shape[k] // 2, name) for k, a in enumerate(_AXES)]


class _Browser(_ipw.VBox):
    """Slider + axis dropdown + output; subclasses implement ``_draw(fig, axis, index)``."""

    def __init__(self, shape, axis, index, figsize, dpi, extra_controls=(), continuous_update=False):
        if isinstance(axis, int) and not isinstance(axis, bool) and 0 <= axis <= 2:
            axis = _AXES[axis]
        check_choice(axis, "axis", _AXES)
        self._shape = tuple(shape)
        n = self._shape[_AXES.index(axis)]
        if index is None:
            index = n // 2
        elif isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index: expected an integer slice index, got {index!r}")
        elif not 0 <= index < n:
            raise ValueError(f"index: {index} is outside 0..{n - 1} along axis {axis!r}")
        self._figsize = figsize
        self._dpi = check_positive(dpi, "dpi", integer=True)
        self._busy = False
        #: number of times the view was drawn (tests and diagnostics)
        self.n_draws = 0
        #: PNG bytes of the view currently shown
        self.last_png = None
        self.slider = _ipw.IntSlider(
            value=int(index), min=0, max=n - 1, step=1, description=axis,
            continuous_update=bool(continuous_update),
            layout=_ipw.Layout(width="60%"),
        )
        self.axis_dropdown = _ipw.Dropdown(
            options=list(_AXES), value=axis, description="axis", layout=_ipw.Layout(width="150px"),
        )
        self.output = _ipw.Output()
        controls = _ipw.HBox([self.slider, self.axis_dropdown, *extra_controls])
        super().__init__([controls, self.output])
        self.slider.observe(self._on_index, names="value")
        self.axis_dropdown.observe(self._on_axis, names="value")
        self.redraw()

    # state ---------------------------------------------------------------
    @property
    def current_axis(self):
        """Axis normal to the slice shown ("z", "y" or "x")."""
        return self.axis_dropdown.value

    @property
    def current_index(self):
        """Index of the slice shown."""
        return int(self.slider.value)

    # events --------------------------------------------------------------
    def _on_index(self, change):
        if not self._busy:
            self.redraw()

    def _on_axis(self, change):
        axis = change["new"]
        n = self._shape[_AXES.index(axis)]
        self._busy = True
        try:
            # order matters: widen max before moving value so the slider never clamps twice
            self.slider.max = max(self.slider.max, n - 1)
            self.slider.value = n // 2
            self.slider.max = n - 1
            self.slider.description = axis
        finally:
            self._busy = False
        self.redraw()

    def _on_style(self, change):
        self.redraw()

    # drawing -------------------------------------------------------------
    def _figure(self):
        from matplotlib.figure import Figure

        fig = Figure(figsize=self._figsize_for(self.current_axis), layout="constrained")
        self._draw(fig, self.current_axis, self.current_index)
        return fig

    def redraw(self):
        """Render the current slice into :attr:`output` (also called on every change)."""
        fig = self._figure()
        png = _png(fig, self._dpi)
        self.last_png = png
        self.n_draws += 1
        # set the outputs in one assignment: no flicker, and no kernel needed
        self.output.outputs = (
            {
                "output_type": "display_data",
                "data": {
                    "image/png": base64.b64encode(png).decode("ascii"),
                    "text/plain": f"<slice {self.current_axis} = {self.current_index}>",
                },
                "metadata": {},
            },
        )

    def snapshot(self):
        """Static matplotlib Figure of the current view (for reports that strip widgets)."""
        fig = _viz._new_figure(self._figsize_for(self.current_axis))
        self._draw(fig, self.current_axis, self.current_index)
        return fig

    def _figsize_for(self, axis):  # pragma: no cover - overridden
        raise NotImplementedError

    def _draw(self, fig, axis, index):  # pragma: no cover - overridden
        raise NotImplementedError


class SliceBrowser(_Browser):
    """Slice browser for one volume with an optional label overlay.

    Built by :func:`slice_browser`; see there for the parameters.

    Attributes
    ----------
    slider : ipywidgets.IntSlider
        Slice index.
    axis_dropdown : ipywidgets.Dropdown
        Axis normal to the slice ("z", "y", "x").
    alpha_slider : ipywidgets.FloatSlider
        Label opacity (shown only when labels are given).
    output : ipywidgets.Output
        Holds the rendered image.
    current_index, current_axis, n_draws, last_png
        What is shown and how often it was drawn.
    """

    def __init__(self, volume, labels=None, axis="z", cmap="gray", *, index=None, label_alpha=0.4,
                 label_names=None, vmin=None, vmax=None, percentile=(0.5, 99.5), width=6.0, dpi=80,
                 continuous_update=False):
        self.volume = _volume(volume, "volume")
        self.labels = None
        if labels is not None:
            self.labels = _viz._check_labels(labels, "labels", self.volume.shape)
        self._cmap = _viz._cmap(cmap)
        sample = _centre_slices(self.volume, "volume") if _viz._is_lazy(self.volume) else self.volume
        self._lo, self._hi = _viz._limits(sample, vmin, vmax, percentile)
        self._max_label = int(self.labels.max()) if self.labels is not None and self.labels.size else 0
        self._label_names = label_names
        self._width = check_positive(width, "width")
        self.alpha_slider = _ipw.FloatSlider(
            value=_viz._check_fraction(label_alpha, "label_alpha"), min=0.0, max=1.0, step=0.05,
            description="labels", readout_format=".2f", continuous_update=True,
            layout=_ipw.Layout(width="260px", display=None if self.labels is not None else "none"),
        )
        super().__init__(self.volume.shape, axis, index, None, dpi,
                         extra_controls=(self.alpha_slider,) if self.labels is not None else (),
                         continuous_update=continuous_update)
        self.alpha_slider.observe(self._on_style, names="value")

    def _figsize_for(self, axis):
        v_ax, h_ax = _viz._PLANE_AXES[axis]
        h, w = self._shape[_AXES.index(v_ax)], self._shape[_AXES.index(h_ax)]
        legend = 0.5 if self._label_names is not None and self.labels is not None else 0.0
        return (self._width, float(np.clip((self._width - 1.3) * h / w + 0.9 + legend, 2.0, 12.0)))

    def _draw(self, fig, axis, index):
        ax = fig.add_subplot()
        img = _slice(self.volume, axis, index, "volume")
        im = ax.imshow(img, cmap=self._cmap, vmin=self._lo, vmax=self._hi, interpolation="nearest")
        if self.labels is not None:
            lab = _viz._take(self.labels, axis, index)
            ax.imshow(_viz._label_rgba(lab, self._max_label, float(self.alpha_slider.value)),
                      interpolation="nearest")
            if self._label_names is not None:
                _viz._legend(fig, _viz._label_names(self._label_names, None), self._max_label)
        v_ax, h_ax = _viz._PLANE_AXES[axis]
        n = self._shape[_AXES.index(axis)]
        ax.set_title(f"{axis} = {index}  (of 0..{n - 1})")
        ax.set_xlabel(f"{h_ax} (voxels)")
        ax.set_ylabel(f"{v_ax} (voxels)")
        fig.colorbar(im, ax=ax, shrink=0.85, label="grey value")


class CompareBrowser(_Browser):
    """One slider driving several same-shaped volumes side by side.

    Built by :func:`compare_browser`; attributes as in :class:`SliceBrowser`
    (no ``alpha_slider``), plus ``volumes`` (the dict).
    """

    def __init__(self, volumes, axis="z", cmap="gray", share_contrast=True, labels=False, *, index=None,
                 ncols=None, colorbar=False, label_names=None, vmin=None, vmax=None,
                 percentile=(0.5, 99.5), panel_size=3.2, dpi=80, continuous_update=False):
        if not isinstance(volumes, Mapping):
            raise TypeError(f"volumes: expected a dict {{title: volume}}, got {type(volumes).__name__}")
        if not volumes:
            raise ValueError("volumes: the dict is empty")
        vols = {}
        shape = None
        for key, v in volumes.items():
            name = f"volumes[{key!r}]"
            arr = _volume(v, name)
            if shape is None:
                shape, first = arr.shape, name
            elif tuple(arr.shape) != tuple(shape):
                raise ValueError(f"{name}: shape {tuple(arr.shape)} differs from {first} shape {tuple(shape)}")
            vols[key] = arr
        self.volumes = vols
        # validate panel kinds on the centre slices, then fix colours and ranges once
        centre = {k: _slice(v, "z", shape[0] // 2, f"volumes[{k!r}]") for k, v in vols.items()}
        _, self._label_keys = _viz._prepare_images(centre, labels, name="volumes")
        for k in self._label_keys:
            vols[k] = _viz._check_labels(vols[k], f"volumes[{k!r}]", None) if not _viz._is_lazy(vols[k]) else vols[k]
        self._cmaps = _viz._panel_cmaps(vols, cmap)
        samples = {k: (np.concatenate([s.ravel() for s in _centre_slices(v, f"volumes[{k!r}]")])
                       if _viz._is_lazy(v) else v) for k, v in vols.items() if k not in self._label_keys}
        self._limits = _viz._compare_limits(samples, list(samples), self._cmaps, bool(share_contrast), vmin, vmax, percentile)
        self._max_label = max([int(np.max(vols[k])) for k in self._label_keys] or [0])
        self._ncols = None if ncols is None else check_positive(ncols, "ncols", integer=True)
        self._colorbar = colorbar
        self._label_names = label_names
        self._panel_size = check_positive(panel_size, "panel_size")
        super().__init__(shape, axis, index, None, dpi, continuous_update=continuous_update)

    def _grid(self):
        n = len(self.volumes)
        nc = min(self._ncols or (n if n <= 4 else 4), n)
        return nc, int(np.ceil(n / nc))

    def _figsize_for(self, axis):
        v_ax, h_ax = _viz._PLANE_AXES[axis]
        h, w = self._shape[_AXES.index(v_ax)], self._shape[_AXES.index(h_ax)]
        nc, nr = self._grid()
        extra = 0.9 + (0.5 if self._label_names is not None and self._label_keys else 0)
        return (nc * self._panel_size + (0.8 if self._colorbar else 0),
                float(np.clip(nr * self._panel_size * h / w + extra, 2.0, 14.0)))

    def _draw(self, fig, axis, index):
        images = {}
        for k, v in self.volumes.items():
            s = _slice(v, axis, index, f"volumes[{k!r}]")
            images[k] = np.asarray(s) if k not in self._label_keys else _viz._check_labels(s, f"volumes[{k!r}]", None)
        nc, _ = self._grid()
        _viz._draw_compare(fig, images, self._label_keys, self._cmaps, self._limits, nc, self._colorbar,
                           self._label_names, max_label=self._max_label)
        n = self._shape[_AXES.index(axis)]
        fig.suptitle(f"{axis} = {index}  (of 0..{n - 1})")


def slice_browser(volume, labels=None, axis="z", cmap="gray", *, index=None, label_alpha=0.4, label_names=None,
                  vmin=None, vmax=None, percentile=(0.5, 99.5), width=6.0, dpi=80, continuous_update=False):
    """Browse the slices of a volume with a slider (optionally with a label overlay).

    Returns an ``ipywidgets.VBox``: an IntSlider for the slice index, a Dropdown
    for the axis, an opacity slider for the labels (when given) and an ``Output``
    with the matplotlib image, redrawn on every change. The first slice is drawn
    during construction; nothing waits for a browser, so it is safe under
    papermill. Works with the inline backend (no ipympl needed).

    Parameters
    ----------
    volume : array_like, shape (z, y, x)
        Grey values; an h5py Dataset, zarr or dask array is read one slice at a
        time (contrast then comes from the three centre slices).
    labels : array_like of int, shape (z, y, x), optional
        Label map to overlay (0 = background, transparent).
    axis : {"z", "y", "x"}
        Initial slicing axis.
    cmap : str or Colormap
        Colormap of the grey values.
    index : int, optional
        Initial slice (default: centre).
    label_alpha : float
        Initial label opacity.
    label_names : dict or list, optional
        ``{label: name}`` for a legend.
    vmin, vmax : float, optional
        Fixed display range (default: robust percentiles of the whole volume,
        fixed while browsing).
    percentile : (float, float)
        Percentiles for the display range.
    width : float
        Figure width in inches.
    dpi : int
        Resolution of the rendered image.
    continuous_update : bool
        Redraw while the slider is dragged. Off by default: each redraw takes a
        fraction of a second on a laptop CPU and dragged updates would queue up;
        the view updates on release and with the arrow keys.

    Returns
    -------
    SliceBrowser
        A VBox with attributes ``slider``, ``axis_dropdown``, ``alpha_slider``,
        ``output``, ``current_index``, ``current_axis``, ``n_draws`` and the
        methods ``redraw()`` and ``snapshot()``.

    Examples
    --------
    >>> import numpy as np
    >>> vol = np.random.default_rng(0).random((12, 24, 24))
    >>> b = slice_browser(vol, axis="y")
    >>> b.current_axis, b.current_index
    ('y', 12)
    >>> b.slider.value = 5; b.current_index
    5
    """
    return SliceBrowser(volume, labels, axis, cmap, index=index, label_alpha=label_alpha, label_names=label_names,
                        vmin=vmin, vmax=vmax, percentile=percentile, width=width, dpi=dpi,
                        continuous_update=continuous_update)


def compare_browser(volumes, axis="z", cmap="gray", share_contrast=True, labels=False, *, index=None, ncols=None,
                    colorbar=False, label_names=None, vmin=None, vmax=None, percentile=(0.5, 99.5),
                    panel_size=3.2, dpi=80, continuous_update=False):
    """One slice slider driving several volumes side by side (e.g. noisy | denoised | truth).

    Panels are drawn as by :func:`tomoml_nb.viz.compare`; display ranges are
    computed once from the whole volumes, so the contrast does not jump while
    browsing.

    Parameters
    ----------
    volumes : dict of {str: array_like}
        Panel title -> 3D volume; all the same shape.
    axis : {"z", "y", "x"}
        Initial slicing axis.
    cmap : str, Colormap or dict
        As in :func:`tomoml_nb.viz.compare` (e.g. ``{"|error|": "magma"}``).
    share_contrast : bool
        Panels with the same colormap share one display range.
    labels : bool or collection of str
        Panels that are label maps (drawn with distinct colours).
    index : int, optional
        Initial slice (default: centre).
    ncols : int, optional
        Panels per row.
    colorbar : bool or collection of str
        Colourbars, as in :func:`tomoml_nb.viz.compare`.
    label_names : dict or list, optional
        ``{label: name}`` for a legend of the label panels.
    vmin, vmax : float, optional
        Fixed display range of the scalar panels.
    percentile : (float, float)
        Percentiles for the display ranges.
    panel_size : float
        Width of one panel in inches.
    dpi : int
        Resolution of the rendered image.
    continuous_update : bool
        Redraw while the slider is dragged. Off by default: each redraw takes a
        fraction of a second on a laptop CPU and dragged updates would queue up;
        the view updates on release and with the arrow keys.

    Returns
    -------
    CompareBrowser
        A VBox with ``slider``, ``axis_dropdown``, ``output``, ``current_index``,
        ``current_axis``, ``n_draws``, ``redraw()`` and ``snapshot()``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> truth = rng.random((8, 16, 16)); noisy = truth + rng.normal(0, 0.2, truth.shape)
    >>> b = compare_browser({"noisy": noisy, "truth": truth})
    >>> b.slider.value = 2; b.current_index
    2
    """
    return CompareBrowser(volumes, axis, cmap, share_contrast, labels, index=index, ncols=ncols, colorbar=colorbar,
                          label_names=label_names, vmin=vmin, vmax=vmax, percentile=percentile,
                          panel_size=panel_size, dpi=dpi, continuous_update=continuous_update)
