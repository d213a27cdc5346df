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


# =====================================================================================
# Annotation tool for active learning (issue 5: semantic segmentation)
#
# A person paints class labels on one slice; ActiveLearningUI wires it to a
# tomoml_nb.active.ActiveLearner (query -> annotate -> retrain -> next query).
# Two back ends: "ipympl" (mouse painting on an ipympl canvas; offline in JupyterLab 4,
# `pip install ipympl` / the `lab` extra) and "sliders" (plain ipywidgets: pick the
# pixel with two sliders, then paint / fill; works with the inline backend and no
# front-end extension). Neither waits for a browser: both construct at once under
# papermill, and every action is also a method (paint, fill, undo, submit), so the
# tool can be driven and tested from code.
# =====================================================================================
import time as _time_al

__all__ += ["AnnotationTool", "ActiveLearningUI", "annotation_tool", "active_learning_ui", "ANNOTATION_BACKENDS"]

#: Back ends of :func:`annotation_tool`.
ANNOTATION_BACKENDS = ("auto", "ipympl", "sliders")


def _class_palette(n_classes):
    """RGB colours per class; class 0 (painted background) light grey, others as in viz."""
    from . import viz as _viz_al

    pal = _viz_al._label_colors(max(int(n_classes) - 1, 1))[:, :3].copy()
    pal[0] = (0.82, 0.82, 0.82)
    return pal[: int(n_classes)]


def _has_ipympl():
    try:
        import ipympl  # noqa: F401
    except Exception:
        return False
    return True


class AnnotationTool:
    """Paint class labels on a 2D image inside a notebook (see :func:`annotation_tool`).

    Attributes
    ----------
    labels : ndarray of int16
        The annotation; ``-1`` = not labelled.
    image : ndarray
        The grey image being annotated.
    widget : ipywidgets.VBox
        The user interface (displayed when the tool is the value of a cell).
    backend : {"ipympl", "sliders"}
    n_submitted : int
        How many times :meth:`submit` ran.
    """

    def __init__(self, image, n_classes, *, labels=None, proposal=None, class_names=None, backend="auto",
                 on_submit=None, brush=3, tolerance=0.08, alpha=0.45, aside=None, aside_title="uncertainty",
                 title=None, width=5.0):
        import ipywidgets as ipw

        self.n_classes = check_positive(n_classes, "n_classes", integer=True)
        if self.n_classes < 2:
            raise ValueError(f"n_classes: need at least 2 classes, got {n_classes}")
        if class_names is None:
            class_names = [f"class {c}" for c in range(self.n_classes)]
        class_names = [str(c) for c in class_names]
        if len(class_names) != self.n_classes:
            raise ValueError(f"class_names: expected {self.n_classes} names, got {len(class_names)}")
        self.class_names = class_names
        check_choice(backend, "backend", ANNOTATION_BACKENDS)
        if backend == "auto":
            backend = "ipympl" if _has_ipympl() else "sliders"
        elif backend == "ipympl" and not _has_ipympl():
            raise ImportError("backend: 'ipympl' needs ipympl (pip install ipympl, or the package's `lab` extra); "
                              "use backend='sliders' without it")
        self.backend = backend
        if on_submit is not None and not callable(on_submit):
            raise TypeError(f"on_submit: expected a callable labels2d -> None, got {type(on_submit).__name__}")
        self.on_submit = on_submit
        self.alpha = float(alpha)
        self.palette = _class_palette(self.n_classes)
        self.title = title
        self.aside_title = aside_title
        self._width = check_positive(width, "width")
        self.n_submitted = 0
        self._undo = []
        self._drag = False

        self.class_selector = ipw.ToggleButtons(
            options=[(f"{c}: {name}", c) for c, name in enumerate(self.class_names)], value=min(1, self.n_classes - 1),
            description="class", style={"button_width": "auto"})
        self.tool_selector = ipw.ToggleButtons(options=["brush", "fill", "eraser"], value="brush", description="tool",
                                               style={"button_width": "auto"})
        self.brush_slider = ipw.IntSlider(value=check_positive(brush, "brush", integer=True), min=1, max=25,
                                          description="brush", continuous_update=False)
        self.tolerance_slider = ipw.FloatSlider(value=float(check_positive(tolerance, "tolerance")), min=0.01, max=0.5,
                                                step=0.01, description="fill tol.", continuous_update=False,
                                                readout_format=".2f")
        self.undo_button = ipw.Button(description="undo", icon="undo")
        self.clear_button = ipw.Button(description="clear", icon="eraser")
        self.proposal_button = ipw.Button(description="start from model", icon="magic",
                                          tooltip="copy the model's prediction, then correct it")
        self.submit_button = ipw.Button(description="submit", button_style="success", icon="check")
        self.status = ipw.HTML()
        self.legend = ipw.HTML(self._legend_html())
        self.undo_button.on_click(lambda _b: self.undo())
        self.clear_button.on_click(lambda _b: self.clear())
        self.proposal_button.on_click(lambda _b: self.use_proposal())
        self.submit_button.on_click(lambda _b: self.submit())

        self._fig = None
        self._canvas = None
        self.output = ipw.Output()
        # sliders back end: pixel picker
        self.row_slider = ipw.IntSlider(description="row", continuous_update=False)
        self.col_slider = ipw.IntSlider(description="column", continuous_update=False)
        self.apply_button = ipw.Button(description="apply tool at (row, column)", icon="paint-brush",
                                       layout=ipw.Layout(width="auto"))
        self.apply_button.on_click(lambda _b: self._apply_at(self.row_slider.value, self.col_slider.value))
        self.row_slider.observe(lambda _c: self.redraw(), names="value")
        self.col_slider.observe(lambda _c: self.redraw(), names="value")

        self.set_image(image, labels=labels, proposal=proposal, aside=aside, title=title)
        tools = ipw.HBox([self.tool_selector, self.brush_slider, self.tolerance_slider])
        buttons = ipw.HBox([self.undo_button, self.clear_button, self.proposal_button, self.submit_button])
        view = self._canvas if self.backend == "ipympl" else ipw.VBox(
            [self.output, ipw.HBox([self.row_slider, self.col_slider]), self.apply_button])
        self.widget = ipw.VBox([self.class_selector, self.legend, tools, view, buttons, self.status])

    # ------------------------------------------------------------------ state
    def set_image(self, image, *, labels=None, proposal=None, aside=None, title=None):
        """Show a new image (e.g. the next queried slice) with an empty or given annotation."""
        img = as_array(image, "image", ndim=2, dtype=np.float32)
        self.image = img
        if labels is None:
            lab = np.full(img.shape, -1, np.int16)
        else:
            lab = self._check_labels2d(labels, "labels")
        self.labels = lab
        self.proposal = None if proposal is None else self._check_labels2d(proposal, "proposal")
        self.aside = None if aside is None else as_array(aside, "aside", ndim=2, dtype=np.float32)
        if self.aside is not None and self.aside.shape != img.shape:
            raise ValueError(f"aside: shape {self.aside.shape} differs from image shape {img.shape}")
        self.title = title if title is not None else self.title
        self._undo = []
        lo, hi = np.percentile(img, (0.5, 99.5))
        self._lo, self._hi = float(lo), float(hi if hi > lo else lo + 1)
        self._grey = np.clip((img - self._lo) / (self._hi - self._lo), 0, 1)
        self.row_slider.max, self.col_slider.max = img.shape[0] - 1, img.shape[1] - 1
        self.row_slider.value, self.col_slider.value = img.shape[0] // 2, img.shape[1] // 2
        self.proposal_button.disabled = self.proposal is None
        if self.backend == "ipympl":
            self._build_canvas()
        self.redraw()

    def _check_labels2d(self, labels, name):
        lab = as_array(labels, name, ndim=2)
        if lab.shape != self.image.shape:
            raise ValueError(f"{name}: shape {lab.shape} differs from image shape {self.image.shape}")
        if lab.dtype.kind == "f" and not np.all(lab == np.round(lab)):
            raise ValueError(f"{name}: labels must be integers")
        if lab.min() < -1 or lab.max() >= self.n_classes:
            raise ValueError(f"{name}: labels must be in -1..{self.n_classes - 1} (-1 = unlabelled), "
                             f"got {int(lab.min())}..{int(lab.max())}")
        return lab.astype(np.int16)

    def _push(self):
        self._undo.append(self.labels.copy())
        del self._undo[:-30]

    def _label_value(self, label):
        if label is None:
            return -1 if self.tool_selector.value == "eraser" else int(self.class_selector.value)
        label = int(label)
        if not -1 <= label < self.n_classes:
            raise ValueError(f"label: must be in -1..{self.n_classes - 1}, got {label}")
        return label

    def _check_pixel(self, row, col):
        h, w = self.image.shape
        row, col = int(round(row)), int(round(col))
        if not (0 <= row < h and 0 <= col < w):
            raise ValueError(f"row: pixel ({row}, {col}) is outside the {h} x {w} image")
        return row, col

    # ------------------------------------------------------------------ tools (also callable from code)
    def paint(self, row, col, label=None, radius=None, *, record=True):
        """Paint a disk of ``radius`` (default: the brush slider) with ``label`` (default: the selected class)."""
        row, col = self._check_pixel(row, col)
        value = self._label_value(label)
        r = self.brush_slider.value if radius is None else check_positive(radius, "radius", integer=True)
        if record:
            self._push()
        h, w = self.image.shape
        y0, y1, x0, x1 = max(0, row - r + 1), min(h, row + r), max(0, col - r + 1), min(w, col + r)
        yy, xx = np.ogrid[y0:y1, x0:x1]
        disk = (yy - row) ** 2 + (xx - col) ** 2 < r * r
        self.labels[y0:y1, x0:x1][disk] = value
        self.redraw()

    def fill(self, row, col, label=None, tolerance=None):
        """Flood-fill the connected region of similar grey value around a pixel (a "magic wand")."""
        from skimage.segmentation import flood

        row, col = self._check_pixel(row, col)
        value = self._label_value(label)
        tol = self.tolerance_slider.value if tolerance is None else check_positive(tolerance, "tolerance")
        self._push()
        region = flood(self._grey, (row, col), tolerance=float(tol))
        self.labels[region] = value
        self.redraw()

    def erase(self, row, col, radius=None):
        """Set a disk back to unlabelled (-1)."""
        self.paint(row, col, -1, radius)

    def undo(self):
        """Undo the last paint / fill / clear."""
        if self._undo:
            self.labels = self._undo.pop()
            self.redraw()

    def clear(self):
        """Remove every label."""
        self._push()
        self.labels = np.full(self.image.shape, -1, np.int16)
        self.redraw()

    def use_proposal(self):
        """Replace the annotation by the model's proposal (then correct its mistakes)."""
        if self.proposal is None:
            raise RuntimeError("proposal: no model proposal for this image")
        self._push()
        self.labels = self.proposal.copy()
        self.redraw()

    def submit(self):
        """Hand the annotation to ``on_submit`` (if given) and return a copy of it."""
        if not (self.labels >= 0).any():
            self.status.value = "<b style='color:#b00'>Nothing labelled yet: paint at least one stroke.</b>"
            raise ValueError("labels: nothing is labelled yet; paint at least one stroke before submitting")
        out = self.labels.copy()
        self.n_submitted += 1
        if self.on_submit is not None:
            self.on_submit(out)
        return out

    def _apply_at(self, row, col):
        tool = self.tool_selector.value
        if tool == "fill":
            self.fill(row, col)
        else:
            self.paint(row, col)

    # ------------------------------------------------------------------ drawing
    def _legend_html(self):
        sw = []
        for c, name in enumerate(self.class_names):
            r, g, b = (int(255 * v) for v in self.palette[c])
            sw.append(f"<span style='display:inline-block;width:12px;height:12px;background:rgb({r},{g},{b});"
                      f"border:1px solid #555;margin:0 4px 0 10px'></span>{c}: {name}")
        return "<div style='font-size:90%'>" + "".join(sw) + " &nbsp; (unpainted = not labelled)</div>"

    def rgb(self):
        """The grey image with the annotation blended on (RGB float array)."""
        out = np.repeat(self._grey[..., None], 3, axis=-1)
        m = self.labels >= 0
        if m.any():
            out[m] = (1 - self.alpha) * out[m] + self.alpha * self.palette[self.labels[m]]
        return out

    def _status_text(self):
        counts = np.bincount(self.labels[self.labels >= 0].ravel().astype(np.int64), minlength=self.n_classes)
        parts = ", ".join(f"{self.class_names[c]}: {int(n)}" for c, n in enumerate(counts) if n)
        return f"labelled pixels — {parts or 'none yet'}"

    def _draw_axes(self, fig):
        axes = fig.subplots(1, 2 if self.aside is not None else 1, squeeze=False)[0]
        ax = axes[0]
        self._im = ax.imshow(self.rgb(), interpolation="nearest")
        ax.set_title(self.title or "annotate")
        ax.set_xlabel("column")
        ax.set_ylabel("row")
        if self.aside is not None:
            a2 = axes[1]
            im2 = a2.imshow(self.aside, cmap="magma", vmin=0, vmax=max(float(self.aside.max()), 1e-6),
                            interpolation="nearest")
            a2.set_title(self.aside_title)
            a2.set_xticks([])
            a2.set_yticks([])
            fig.colorbar(im2, ax=a2, shrink=0.8)
        return ax

    def _figsize(self):
        h, w = self.image.shape
        ncol = 2 if self.aside is not None else 1
        return (self._width * ncol, float(np.clip(self._width * h / w, 2.5, 10.0)) + 0.4)

    def _build_canvas(self):
        from ipympl.backend_nbagg import Canvas, FigureManager
        from matplotlib.figure import Figure

        if self._canvas is None:
            fig = Figure(figsize=self._figsize(), layout="constrained")
            canvas = Canvas(fig)
            FigureManager(canvas, 0)
            canvas.header_visible = False
            canvas.footer_visible = False
            canvas.toolbar_position = "top"
            canvas.mpl_connect("button_press_event", self._on_press)
            canvas.mpl_connect("motion_notify_event", self._on_move)
            canvas.mpl_connect("button_release_event", self._on_release)
            self._canvas = canvas
        else:
            fig = self._fig
            fig.clf()
            fig.set_size_inches(*self._figsize(), forward=True)
        self._fig = fig
        self._ax = self._draw_axes(fig)

    def _toolbar_busy(self):
        tb = getattr(self._canvas, "toolbar", None)
        return bool(tb is not None and str(getattr(tb, "mode", "")))

    def _on_press(self, event):
        if event.inaxes is not self._ax or event.xdata is None or self._toolbar_busy():
            return
        self._drag = self.tool_selector.value != "fill"
        self._apply_at(event.ydata, event.xdata)

    def _on_move(self, event):
        if not self._drag or event.inaxes is not self._ax or event.xdata is None:
            return
        self.paint(event.ydata, event.xdata, record=False)

    def _on_release(self, event):
        self._drag = False

    def redraw(self):
        """Refresh the view (after programmatic changes)."""
        if getattr(self, "labels", None) is None:
            return
        self.status.value = self._status_text()
        if self.backend == "ipympl":
            if self._fig is not None:
                self._im.set_data(self.rgb())
                self._canvas.draw_idle()
            return
        import base64

        from matplotlib.figure import Figure

        fig = Figure(figsize=self._figsize(), layout="constrained")
        ax = self._draw_axes(fig)
        r, c = self.row_slider.value, self.col_slider.value
        ax.axhline(r, color="#00e5ff", lw=0.8)
        ax.axvline(c, color="#00e5ff", lw=0.8)
        rad = self.brush_slider.value
        from matplotlib.patches import Circle

        ax.add_patch(Circle((c, r), rad, fill=False, color="#00e5ff", lw=1))
        png = _png(fig, 80)
        self.output.outputs = ({"output_type": "display_data",
                                "data": {"image/png": base64.b64encode(png).decode("ascii"),
                                         "text/plain": "<annotation view>"}, "metadata": {}},)

    def snapshot(self):
        """Static matplotlib Figure of the current annotation (for reports that strip widgets)."""
        from . import viz as _viz_al

        fig = _viz_al._new_figure(self._figsize())
        self._draw_axes(fig)
        return fig

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)


def annotation_tool(image, n_classes, *, labels=None, proposal=None, class_names=None, backend="auto",
                    on_submit=None, brush=3, tolerance=0.08, alpha=0.45, aside=None, title=None, width=5.0):
    """A paint tool to label a 2D slice by hand, with a class selector, brush, fill and undo.

    ``backend="ipympl"`` (default when ipympl is installed) paints with the mouse:
    press and drag with the brush, click with the fill tool (a magic wand that floods
    the connected region of similar grey value). ``backend="sliders"`` works with plain
    ipywidgets and the inline backend: choose the pixel with the row/column sliders
    (a cyan cross-hair shows it) and press "apply". Both construct at once without a
    browser (safe under papermill); every action is also a method.

    Parameters
    ----------
    image : array_like, 2D
        Slice to annotate.
    n_classes : int >= 2
    labels : array_like, optional
        Initial annotation (``-1`` = unlabelled); default empty.
    proposal : array_like, optional
        A model's prediction, copied in with the "start from model" button.
    class_names : sequence of str, optional
    backend : {"auto", "ipympl", "sliders"}
    on_submit : callable ``labels2d -> None``, optional
        Called by the "submit" button.
    brush : int
        Initial brush radius (pixels).
    tolerance : float
        Initial fill tolerance, in units of the image's display range.
    alpha : float
        Opacity of the painted labels.
    aside : array_like, 2D, optional
        A second panel shown beside the image (e.g. the model's uncertainty).
    title : str, optional
    width : float
        Panel width in inches.

    Returns
    -------
    AnnotationTool
        ``tool.labels`` is the annotation; ``tool.widget`` the interface.

    Examples
    --------
    >>> import numpy as np
    >>> tool = annotation_tool(np.random.default_rng(0).random((32, 32)), 3, backend="sliders")
    >>> tool.paint(10, 10, label=2, radius=2)
    >>> int((tool.labels == 2).sum())
    9
    >>> tool.undo(); int((tool.labels >= 0).sum())
    0
    """
    return AnnotationTool(image, n_classes, labels=labels, proposal=proposal, class_names=class_names,
                          backend=backend, on_submit=on_submit, brush=brush, tolerance=tolerance, alpha=alpha,
                          aside=aside, title=title, width=width)


class ActiveLearningUI:
    """The human-in-the-loop active-learning loop in one widget (see :func:`active_learning_ui`).

    Attributes
    ----------
    learner : tomoml_nb.active.ActiveLearner
    tool : AnnotationTool
        Shows the current query; its "submit" button teaches, retrains and asks the next.
    query : tomoml_nb.active.Query
        The slice being annotated.
    log : list of str
        One line per round.
    """

    def __init__(self, learner, *, backend="auto", steps=None, brush=3):
        import ipywidgets as ipw

        from .active import ActiveLearner

        if not isinstance(learner, ActiveLearner):
            raise TypeError(f"learner: expected a tomoml_nb.active.ActiveLearner, got {type(learner).__name__}")
        self.learner = learner
        self.steps = None if steps is None else check_positive(steps, "steps", integer=True)
        self.log = []
        self.skipped = set()
        self.query = self._next_query()
        self.tool = AnnotationTool(learner.image(self.query), learner.n_classes, proposal=self._proposal(),
                                   class_names=learner.class_names, backend=backend, on_submit=self._on_submit,
                                   brush=brush, aside=self._aside(), title=self._title())
        self.skip_button = ipw.Button(description="skip this slice", icon="forward")
        self.skip_button.on_click(lambda _b: self.skip())
        self.info = ipw.HTML(self._info())
        self.widget = ipw.VBox([self.info, self.tool.widget, self.skip_button])

    def _next_query(self):
        for _ in range(len(self.learner.pool) + 1):
            qs = self.learner.query(1)
            if qs and qs[0].key not in self.skipped:
                return qs[0]
            if qs:  # a skipped slice came back: take it out of this round's candidates
                self.learner.pool = [k for k in self.learner.pool if k != qs[0].key]
        raise RuntimeError("pool: no slice left to annotate")

    def _proposal(self):
        return None if self.learner.model is None else self.learner.proposal(self.query)

    def _aside(self):
        from .active import uncertainty

        if self.learner.model is None:
            return None
        return uncertainty(self.learner.probabilities(self.query),
                           "margin" if self.learner.strategy == "margin" else "entropy")

    def _title(self):
        return f"annotate slice {self.query}"

    def _info(self, extra=""):
        missing = self.learner.missing_classes
        names = self.learner.class_names or [str(c) for c in range(self.learner.n_classes)]
        miss = ", ".join(names[c] for c in missing) if missing else "none"
        return (f"<b>Round {len(self.learner.rounds) + 1}</b> — {self.learner.n_annotated} slice(s) annotated; "
                f"classes never labelled yet: {miss}. Paint some pixels of every class you see "
                f"(sparse strokes are enough), then <i>submit</i>: the model retrains and asks for the next slice."
                + (f"<br>{extra}" if extra else ""))

    def _on_submit(self, labels2d):
        self.learner.teach(self.query, labels2d)
        self.info.value = self._info("training…")
        t0 = _time_al.perf_counter()
        hist = self.learner.retrain(self.steps)
        line = (f"round {len(self.learner.rounds)}: annotated {self.query}, trained {hist['steps']} steps in "
                f"{_time_al.perf_counter() - t0:.1f} s, loss {np.mean(hist['loss'][-10:]):.3f}")
        self.log.append(line)
        self._show_next(line)

    def _show_next(self, line=""):
        self.query = self._next_query()
        self.tool.set_image(self.learner.image(self.query), proposal=self._proposal(), aside=self._aside(),
                            title=self._title())
        self.info.value = self._info(line)

    def skip(self):
        """Leave the current slice unannotated and show the next query."""
        self.skipped.add(self.query.key)
        self.learner.pool = [k for k in self.learner.pool if k != self.query.key]
        self._show_next(f"skipped {self.query}")

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)


def active_learning_ui(learner, *, backend="auto", steps=None, brush=3):
    """Annotate the slices an :class:`~tomoml_nb.active.ActiveLearner` asks for, in the notebook.

    Shows the most uncertain slice with the model's uncertainty beside it; paint
    labels, press "submit": the annotation is taught, the network retrains for a few
    steps (warm start) and the next query appears. "start from model" copies the
    current prediction so you only correct its mistakes. Constructing it never waits
    for a browser.

    Parameters
    ----------
    learner : tomoml_nb.active.ActiveLearner
    backend : {"auto", "ipympl", "sliders"}
        See :func:`annotation_tool`.
    steps : int, optional
        Training steps per round (default: the learner's).
    brush : int
        Initial brush radius.

    Returns
    -------
    ActiveLearningUI

    Examples
    --------
    >>> import numpy as np
    >>> from tomoml_nb.active import ActiveLearner
    >>> learner = ActiveLearner(np.random.default_rng(0).random((16, 16, 16)), 2, progress=False)
    >>> ui = active_learning_ui(learner, backend="sliders")
    >>> ui.query.axis in ("z", "y", "x")
    True
    """
    return ActiveLearningUI(learner, backend=backend, steps=steps, brush=brush)
