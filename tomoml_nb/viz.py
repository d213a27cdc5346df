"""Figures for tomographic volumes, label maps and vector fields.

Every plotting function draws with matplotlib's object API and **returns the
Figure** without calling ``plt.show()``, so it works headless (Agg backend,
papermill, ``tomoml report``) and the figure can be saved with
``fig.savefig(...)``. In Jupyter a returned figure is displayed when it is the
value of a cell or when the cell ends, exactly once (see :class:`TomoFigure`),
also when it was assigned (``fig = viz.compare(...)``) or more code follows.

Conventions: arrays are indexed ``(z, y, x)``; vector fields have shape
``(3, z, y, x)`` with components in the order ``(z, y, x)``; label maps are
non-negative integers with ``0`` as background (drawn transparent). Axis labels
are in voxels. Images are shown with ``origin="upper"`` (row 0 at the top), the
way slices are stored.

3D views: :func:`view3d` renders a static matplotlib figure by default and never
imports an interactive viewer; ``viewer="k3d"`` and ``viewer="itk"`` are opt-in.

Examples
--------
>>> import numpy as np
>>> from tomoml_nb import viz
>>> vol = np.random.default_rng(0).normal(size=(16, 20, 24))
>>> fig = viz.orthoslices(vol, labels=(vol > 1).astype(int))
>>> len(fig.axes) >= 3
True
"""
from __future__ import annotations

import colorsys
import html
import numbers
import warnings
from collections.abc import Mapping

import matplotlib.figure as _mpl_figure
import numpy as np

from ._validate import as_array, check_choice, check_positive, check_same_shape

__all__ = [
    "VIEWERS",
    "label_cmap",
    "orthoslices",
    "compare",
    "overlay",
    "plot_overlay",
    "plot_vector_field",
    "plot_histogram",
    "view3d",
    "k3d_snapshot_html",
    "TomoFigure",
]

#: Choices for ``view3d(viewer=...)``.
VIEWERS = ("static", "k3d", "itk")

K3D_INSTALL = "pip install k3d  (or pip install 'tomoml_nb[lab]')"
ITK_INSTALL = "pip install 'itkwidgets[lab]==1.0a55' 'ngff-zarr==0.20.4' 'zarr<3'  (or pip install 'tomoml_nb[itk]')"

_AXES = ("z", "y", "x")
# colour of each slicing plane, used for the panel frame and for the crosshair
# line that marks that plane in the other panels
_PLANE_COLORS = {"z": "#e8413c", "y": "#2fbf71", "x": "#f2b81d"}
# in-plane axes (vertical, horizontal) of a slice normal to each axis
_PLANE_AXES = {"z": ("y", "x"), "y": ("z", "x"), "x": ("z", "y")}
_DIVERGING = {
    "bwr", "seismic", "coolwarm", "rdbu", "rdgy", "rdylbu", "rdylgn", "puor", "brbg", "prgn",
    "piyg", "spectral", "berlin", "managua", "vanimo", "icefire", "vlag",
}
_MAX_LABEL_COLORS = 65536


# --------------------------------------------------------------------------- helpers

def _pyplot():
    import matplotlib.pyplot as plt

    return plt


class TomoFigure(_mpl_figure.Figure):
    """A matplotlib Figure that Jupyter displays exactly once.

    With the inline backend, a pyplot figure is drawn at the end of the cell
    *and* again when it is the cell's value; returned figures would show twice.
    This subclass displays itself (as the inline backend would) and then
    releases pyplot's handle, so a plotting call shows one image whether it is the
    last line of a cell, assigned to a variable, or followed by more code.
    Outside Jupyter it is an ordinary Figure (``savefig``, ``plt.show()``).
    """

    def _ipython_display_(self):
        _display_once(self)


def _display_once(fig):
    import io

    import matplotlib
    from IPython import get_ipython
    from IPython.display import display, publish_display_data
    from matplotlib._pylab_helpers import Gcf

    backend = str(matplotlib.get_backend()).lower()
    managed = any(m.canvas.figure is fig for m in Gcf.get_all_fig_managers())
    if managed and ("ipympl" in backend or "widget" in backend):
        if not matplotlib.is_interactive():  # interactive ipympl shows the canvas on creation
            display(fig.canvas)
        return
    data, metadata = {}, {}
    ip = get_ipython()
    if ip is not None:  # the formatters the inline backend registered (png/retina/svg settings)
        for mime, formatter in ip.display_formatter.formatters.items():
            try:
                out = formatter(fig)
            except Exception:  # pragma: no cover - a broken optional formatter
                out = None
            if isinstance(out, tuple) and len(out) == 2:
                out, md = out
                if md:
                    metadata[mime] = md
            if out is not None:
                data[mime] = out
    if not any(k.startswith("image/") for k in data):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
        data["image/png"] = buf.getvalue()
    data.setdefault("text/plain", repr(fig))
    publish_display_data(data, metadata=metadata or None)
    if managed and "inline" in backend:
        _pyplot().close(fig)


def _new_figure(figsize=None, **kwargs):
    return _pyplot().figure(figsize=figsize, layout="constrained", FigureClass=TomoFigure, **kwargs)


def _cmap(cmap, name="cmap"):
    import matplotlib

    if isinstance(cmap, matplotlib.colors.Colormap):
        return cmap
    if not isinstance(cmap, str):
        raise TypeError(f"{name}: expected a colormap name or Colormap, got {type(cmap).__name__}")
    try:
        return matplotlib.colormaps[cmap]
    except KeyError:
        raise ValueError(f"{name}: unknown colormap {cmap!r}") from None


def _is_diverging(cmap):
    name = _cmap(cmap).name.lower()
    if name.endswith("_r"):
        name = name[:-2]
    return name in _DIVERGING


def _check_percentile(percentile, name="percentile"):
    try:
        lo, hi = (float(p) for p in percentile)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected two numbers (low, high), got {percentile!r}") from None
    if not 0 <= lo < hi <= 100:
        raise ValueError(f"{name}: need 0 <= low < high <= 100, got {percentile!r}")
    return lo, hi


def _sample(a, max_n=2_000_000):
    """A strided subsample of ``a`` with at most about ``max_n`` elements (for percentiles)."""
    a = np.asarray(a)
    if a.size <= max_n:
        return a.ravel()
    step = int(np.ceil((a.size / max_n) ** (1.0 / a.ndim)))
    return a[(slice(None, None, step),) * a.ndim].ravel()


def _limits(arrays, vmin=None, vmax=None, percentile=(0.5, 99.5), symmetric=False):
    """Display range (lo, hi) from robust percentiles of ``arrays``; ``vmin``/``vmax`` override."""
    if vmin is not None and not isinstance(vmin, numbers.Real):
        raise TypeError(f"vmin: expected a number, got {type(vmin).__name__}")
    if vmax is not None and not isinstance(vmax, numbers.Real):
        raise TypeError(f"vmax: expected a number, got {type(vmax).__name__}")
    if vmin is None or vmax is None:
        plo, phi = _check_percentile(percentile)
        if not isinstance(arrays, (list, tuple)):
            arrays = [arrays]
        s = np.concatenate([_sample(a).astype(np.float64, copy=False) for a in arrays])
        s = s[np.isfinite(s)]
        if s.size == 0:
            lo, hi = 0.0, 1.0
        elif symmetric:
            m = float(np.percentile(np.abs(s), phi))
            lo, hi = -m, m
        else:
            lo, hi = (float(v) for v in np.percentile(s, (plo, phi)))
        if vmin is not None:
            lo = float(vmin)
        if vmax is not None:
            hi = float(vmax)
    else:
        lo, hi = float(vmin), float(vmax)
    if symmetric and vmin is None and vmax is not None:
        lo = -abs(hi)
    if not hi > lo:
        if vmin is not None and vmax is not None:
            raise ValueError(f"vmax: must be greater than vmin, got vmin={vmin!r}, vmax={vmax!r}")
        pad = 0.5 if lo == 0 else abs(lo) * 0.01
        lo, hi = lo - pad, hi + pad
    return lo, hi


def _check_labels(labels, name, shape, ref_name="volume"):
    """Validate an integer label array of the given shape; return it as an integer array."""
    arr = as_array(labels, name)
    if arr.dtype.kind == "b":
        arr = arr.astype(np.uint8)
    elif arr.dtype.kind == "f":
        if not np.array_equal(arr, np.round(arr)):
            raise ValueError(f"{name}: expected integer labels (0 = background), got non-integer values")
        arr = arr.astype(np.int64)
    if shape is not None:
        check_same_shape(_Shape(shape), arr, ref_name, name)
    if arr.size and arr.dtype.kind == "i" and arr.min() < 0:
        raise ValueError(f"{name}: labels must be >= 0 (0 = background), got minimum {arr.min()}")
    return arr


class _Shape:
    """Stand-in with a ``shape`` so ``np.shape`` works without allocating an array."""

    def __init__(self, shape):
        self.shape = tuple(shape)



def _label_colors(n):
    """RGBA colours (n + 1, 4) for labels 0..n; entry 0 is the transparent background.

    The colour of label ``i`` depends on ``i`` only (never on ``n``), so label maps with
    different numbers of classes use the same colours for the same ids.
    """
    import matplotlib

    n = int(n)
    out = np.zeros((n + 1, 4))
    base = np.asarray(matplotlib.colormaps["Set1"].colors)[[0, 1, 2, 4, 3, 6, 7, 5]]  # no grey; yellow late
    k = min(n, len(base))
    out[1 : k + 1, :3] = base[:k]
    if n > len(base):
        i = np.arange(len(base) + 1, n + 1, dtype=np.float64)
        hue = (0.137 + i * 0.6180339887498949) % 1.0
        sat = 0.55 + 0.4 * ((i * 0.7548776662466927) % 1.0)
        val = 0.75 + 0.25 * ((i * 0.5698402909980532) % 1.0)
        rgb = [colorsys.hsv_to_rgb(h, s, v) for h, s, v in zip(hue, sat, val)]
        out[len(base) + 1 :, :3] = rgb
    out[1:, 3] = 1.0
    return out


def label_cmap(n, background="transparent"):
    """Colormap with distinct colours for labels ``0..n``.

    Label 0 (background) is transparent or black; labels 1-8 get well separated
    qualitative colours (ColorBrewer Set1 without grey), higher labels get
    pseudo-random but deterministic colours spread by the golden ratio, so
    neighbouring instance ids differ clearly. The colour of a label depends only on
    its id, so several label maps drawn with ``label_cmap`` agree.

    Parameters
    ----------
    n : int
        Largest label value (>= 1).
    background : {"transparent", "black"}
        Colour of label 0.

    Returns
    -------
    matplotlib.colors.ListedColormap
        ``n + 1`` colours; use it with ``vmin=-0.5, vmax=n + 0.5`` and
        ``interpolation="nearest"``, or index it directly: ``label_cmap(n).colors[labels]``.

    Examples
    --------
    >>> cm = label_cmap(3)
    >>> cm.N
    4
    >>> float(cm.colors[0][3])  # background alpha
    0.0
    """
    from matplotlib.colors import ListedColormap

    n = check_positive(n, "n", integer=True)
    check_choice(background, "background", ("transparent", "black"))
    colors = _label_colors(n)
    if background == "black":
        colors[0] = (0.0, 0.0, 0.0, 1.0)
    return ListedColormap(colors, name=f"labels{n}")


def _label_rgba(labels, max_label=None, alpha=1.0, background="transparent"):
    """RGBA float image for an integer label array; background transparent (or black)."""
    lab = np.asarray(labels)
    if max_label is None:
        max_label = int(lab.max()) if lab.size else 0
    k = int(min(max(max_label, 1), _MAX_LABEL_COLORS))
    pal = _label_colors(k)
    pal[1:, 3] = alpha
    if background == "black":
        pal[0] = (0.0, 0.0, 0.0, 1.0)
    if max_label > k:
        idx = np.where(lab > 0, (lab - 1) % k + 1, 0)
    else:
        idx = lab
    return pal[idx]


def _label_names(label_names, present):
    """Normalise ``label_names`` (dict or sequence indexed by label) to {label: name}."""
    if label_names is None:
        return None
    if isinstance(label_names, Mapping):
        names = {int(k): str(v) for k, v in label_names.items()}
    elif isinstance(label_names, (list, tuple)):
        names = {i: str(v) for i, v in enumerate(label_names)}
    else:
        raise TypeError(
            f"label_names: expected a dict {{label: name}} or a list indexed by label, got {type(label_names).__name__}"
        )
    return {k: v for k, v in sorted(names.items()) if k > 0 and (present is None or k in present)}


def _legend(fig, names, max_label):
    from matplotlib.patches import Patch

    if not names:
        return None
    pal = _label_colors(max(max_label, max(names)))
    handles = [Patch(facecolor=pal[k, :3], edgecolor="0.3", label=f"{k}: {v}") for k, v in names.items()]
    engine = fig.get_layout_engine()
    constrained = engine is not None and type(engine).__name__ == "ConstrainedLayoutEngine"
    loc = "outside lower center" if constrained else "lower center"
    return fig.legend(handles=handles, loc=loc, ncols=min(len(handles), 6), frameon=False, title="labels")


def _present_labels(*arrays):
    present = set()
    for a in arrays:
        if a is not None and np.size(a):
            present.update(int(v) for v in np.unique(a) if v > 0)
    return present


def _is_lazy(x):
    """An out-of-core array (h5py Dataset, zarr, dask): has shape/dtype/[] but is not numpy."""
    return (
        not isinstance(x, (np.ndarray, list, tuple))
        and hasattr(x, "shape")
        and hasattr(x, "dtype")
        and hasattr(x, "__getitem__")
    )


def _parse_index(index, shape, name="index"):
    """``None`` or a 3-sequence of int/None -> tuple of 3 valid ints (centre by default)."""
    if index is None:
        index = (None, None, None)
    if isinstance(index, numbers.Integral) or not hasattr(index, "__len__") or len(index) != 3:
        raise TypeError(f"{name}: expected None or a (z, y, x) triple of slice indices, got {index!r}")
    out = []
    for ax, i, n in zip(_AXES, index, shape):
        if i is None:
            out.append(n // 2)
            continue
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"{name}: {ax} index must be an integer or None, got {i!r}")
        if not 0 <= i < n:
            raise ValueError(f"{name}: {ax} index {i} is outside 0..{n - 1}")
        out.append(int(i))
    return tuple(out)


def _vector_plane(vectors, axis, i):
    """(3, h, w) slice of a (3, z, y, x) field normal to ``axis``."""
    sl = [slice(None)] * 4
    sl[_AXES.index(axis) + 1] = i
    return vectors[tuple(sl)]


def _take(a, axis, i):
    """Slice of a 3D (or (c, z, y, x) with leading components) array normal to ``axis``."""
    k = _AXES.index(axis)
    sl = [slice(None)] * 3
    sl[k] = i
    return a[tuple(sl)]


# --------------------------------------------------------------------------- orthoslices

def orthoslices(
    volume,
    index=None,
    labels=None,
    vectors=None,
    *,
    label_names=None,
    cmap="gray",
    label_alpha=0.4,
    title=None,
    vmin=None,
    vmax=None,
    percentile=(0.5, 99.5),
    vector_step=None,
    vector_cmap="spring",
    crosshair=True,
    colorbar=True,
    figsize=None,
    axes=None,
):
    """Three orthogonal slices through a volume, with optional labels and vectors.

    Panels, left to right: the z slice (y-x plane, axial), the y slice (z-x plane)
    and the x slice (z-y plane) through ``index``. Each panel's frame has the colour
    of its plane, and coloured crosshair lines mark where the other two planes cut
    it. Contrast is robust (percentiles of the whole volume) and shared by the three
    panels.

    Parameters
    ----------
    volume : array_like, shape (z, y, x)
        Grey values. An h5py Dataset, zarr or dask array is read slice by slice
        (only the three slices are loaded; contrast then comes from those slices).
    index : tuple of 3 int or None, optional
        ``(iz, iy, ix)`` of the planes; ``None`` (or a ``None`` entry) means the centre.
    labels : array_like of int, shape (z, y, x), optional
        Label map drawn on top (0 = background, transparent).
    vectors : array_like, shape (3, z, y, x), optional
        Vector field in voxels, components ``(z, y, x)`` (e.g. a displacement). Each
        panel shows its two in-plane components as arrows on a subsampled grid,
        coloured by the full 3D magnitude. Arrows are scaled so the longest is about
        one grid step long; the factor is given in the colourbar label.
    label_names : dict or list, optional
        ``{label: name}`` (or a list indexed by label value, entry 0 ignored); adds a legend.
    cmap : str or Colormap
        Colormap of the grey values.
    label_alpha : float
        Opacity of the label colours, 0-1.
    title : str, optional
        Figure title.
    vmin, vmax : float, optional
        Fixed display range; override the percentiles.
    percentile : (float, float)
        Percentiles of the grey values mapped to the ends of the colormap.
    vector_step : int, optional
        Spacing of the arrows in voxels (default: about 20 arrows across the widest axis).
    vector_cmap : str or Colormap
        Colormap of the vector magnitude.
    crosshair : bool
        Draw the lines marking the other planes.
    colorbar : bool
        Add a grey-value colourbar (and one for the vector magnitude).
    figsize : (float, float), optional
        Figure size in inches (default from the volume's proportions).
    axes : sequence of 3 matplotlib Axes, optional
        Draw into these instead of a new figure.

    Returns
    -------
    matplotlib.figure.Figure
        ``fig.axes[:3]`` are the z, y and x panels; colourbar axes follow.

    Examples
    --------
    >>> import numpy as np
    >>> vol = np.random.default_rng(0).random((20, 30, 40))
    >>> fig = orthoslices(vol, index=(5, None, None), labels=(vol > 0.9).astype(int))
    >>> [ax.get_title() for ax in fig.axes[:3]]
    ['z = 5  (y-x plane)', 'y = 15  (z-x plane)', 'x = 20  (z-y plane)']
    """
    lazy = _is_lazy(volume)
    if lazy:
        shape = tuple(int(s) for s in volume.shape)
        if len(shape) != 3:
            raise ValueError(f"volume: expected a 3D array, got {len(shape)}D with shape {shape}")
    else:
        volume = as_array(volume, "volume", ndim=3)
        shape = volume.shape
    iz, iy, ix = _parse_index(index, shape)
    idx = {"z": iz, "y": iy, "x": ix}
    if labels is not None:
        labels = _check_labels(labels, "labels", shape)
    if vectors is not None:
        vectors = as_array(vectors, "vectors", ndim=4)
        if vectors.shape != (3,) + tuple(shape):
            raise ValueError(
                f"vectors: expected shape (3, z, y, x) = {(3,) + tuple(shape)} with components (z, y, x), "
                f"got {vectors.shape}"
            )
    label_alpha = _check_fraction(label_alpha, "label_alpha")
    if vector_step is not None:
        vector_step = check_positive(vector_step, "vector_step", integer=True)

    slices = {}
    for ax_name in _AXES:
        s = _take(volume, ax_name, idx[ax_name])
        slices[ax_name] = as_array(s, "volume", ndim=2) if lazy else s
    lo, hi = _limits(list(slices.values()) if lazy else volume, vmin, vmax, percentile)

    max_label = int(labels.max()) if labels is not None and labels.size else 0
    nz, ny, nx = shape

    if axes is None:
        if figsize is None:
            width = 13.0
            n_cbar = (1 + (vectors is not None)) if colorbar else 0
            panels_w = width - 0.9 * n_cbar - 1.8  # colourbars and y labels
            height = panels_w * max(ny, nz) / (2 * nx + ny) + 1.0
            height += (0.4 if title is not None else 0) + (0.6 if label_names is not None and labels is not None else 0)
            figsize = (width, float(np.clip(height, 3.0, 9.0)))
        fig = _new_figure(figsize)
        gs = fig.add_gridspec(1, 3, width_ratios=[nx, nx, ny])
        axes = [fig.add_subplot(gs[0, j]) for j in range(3)]
    else:
        axes = list(axes)
        if len(axes) != 3:
            raise ValueError(f"axes: expected 3 Axes (z, y, x panels), got {len(axes)}")
        fig = axes[0].figure

    quiver_scale = None
    qstep = vector_step or max(1, int(round(max(shape) / 16)))
    if vectors is not None:
        vectors = vectors.astype(np.float64, copy=False)
        magnitude = np.sqrt((vectors ** 2).sum(axis=0))
        mag_max = max(float(magnitude.max()), 1e-12)
        inplane = []
        for ax_name in _AXES:
            v_ax, h_ax = _PLANE_AXES[ax_name]
            plane = _vector_plane(vectors, ax_name, idx[ax_name])
            comps = plane[[_AXES.index(v_ax), _AXES.index(h_ax)]][:, qstep // 2 :: qstep, qstep // 2 :: qstep]
            inplane.append(np.sqrt((comps ** 2).sum(axis=0)).ravel())
        # the 98th percentile arrow is one grid step long, so typical arrows stay visible
        ref = float(np.percentile(np.concatenate(inplane), 98))
        quiver_scale = max(ref, 1e-12) / qstep

    im = q = None
    for ax, ax_name in zip(axes, _AXES):
        img = slices[ax_name]
        v_ax, h_ax = _PLANE_AXES[ax_name]
        im = ax.imshow(img, cmap=_cmap(cmap), vmin=lo, vmax=hi, interpolation="nearest")
        if labels is not None:
            ax.imshow(_label_rgba(_take(labels, ax_name, idx[ax_name]), max_label, label_alpha), interpolation="nearest")
        if vectors is not None:
            plane = _vector_plane(vectors, ax_name, idx[ax_name])
            h, w = img.shape
            rr, cc = np.meshgrid(np.arange(qstep // 2, h, qstep), np.arange(qstep // 2, w, qstep), indexing="ij")
            q = ax.quiver(
                cc, rr, plane[_AXES.index(h_ax)][rr, cc], plane[_AXES.index(v_ax)][rr, cc],
                _take(magnitude, ax_name, idx[ax_name])[rr, cc],
                cmap=_cmap(vector_cmap, "vector_cmap"), clim=(0, mag_max),
                angles="xy", scale_units="xy", scale=quiver_scale, units="inches", width=0.028,
                headwidth=3.0, headlength=3.0, headaxislength=2.7, minlength=0.3, pivot="tail",
                edgecolor="black", linewidth=0.4,
            )
        if crosshair:
            ax.axhline(idx[v_ax], color=_PLANE_COLORS[v_ax], lw=0.9, alpha=0.85)
            ax.axvline(idx[h_ax], color=_PLANE_COLORS[h_ax], lw=0.9, alpha=0.85)
        ax.set_xlim(-0.5, img.shape[1] - 0.5)
        ax.set_ylim(img.shape[0] - 0.5, -0.5)
        for spine in ax.spines.values():
            spine.set_edgecolor(_PLANE_COLORS[ax_name])
            spine.set_linewidth(2.0)
        ax.set_title(f"{ax_name} = {idx[ax_name]}  ({v_ax}-{h_ax} plane)")
        ax.set_xlabel(f"{h_ax} (voxels)")
        ax.set_ylabel(f"{v_ax} (voxels)")

    if colorbar:
        fig.colorbar(im, ax=axes, shrink=0.85, label="grey value", pad=0.01)
        if q is not None:
            fig.colorbar(
                q, ax=axes, shrink=0.85, pad=0.01,
                label=f"|vector| (voxels);  arrows \u00d7{1 / quiver_scale:.2g}",
            )
    if label_names is not None and labels is not None:
        names = _label_names(label_names, _present_labels(*(_take(labels, a, idx[a]) for a in _AXES)) or None)
        _legend(fig, names, max_label)
    if title is not None:
        fig.suptitle(title)
    return fig


def _check_fraction(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
        raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")
    return float(value)


# --------------------------------------------------------------------------- compare

def _prepare_images(images, labels, name="images"):
    if not isinstance(images, Mapping):
        raise TypeError(f"{name}: expected a dict {{title: image}}, got {type(images).__name__}")
    if len(images) == 0:
        raise ValueError(f"{name}: the dict is empty")
    if isinstance(labels, bool):
        label_keys = set(images) if labels else set()
    elif labels is None:
        label_keys = set()
    else:
        label_keys = set(labels)
        unknown = label_keys - set(images)
        if unknown:
            raise ValueError(f"labels: unknown panel name(s) {sorted(map(str, unknown))}; panels are {list(images)}")
    out = {}
    for key, img in images.items():
        pname = f"{name}[{key!r}]"
        arr = as_array(img, pname, ndim=(2, 3))
        if arr.ndim == 3 and arr.shape[-1] not in (3, 4):
            raise ValueError(
                f"{pname}: expected a 2D image or an RGB(A) image of shape (h, w, 3|4), got shape {arr.shape}; "
                "for a volume pass one slice, e.g. volume[volume.shape[0] // 2]"
            )
        if key in label_keys:
            if arr.ndim != 2:
                raise ValueError(f"{pname}: a label panel must be 2D, got shape {arr.shape}")
            arr = _check_labels(arr, pname, None)
        out[key] = arr
    return out, label_keys


def _panel_cmaps(images, cmap):
    if isinstance(cmap, Mapping):
        unknown = set(cmap) - set(images)
        if unknown:
            raise ValueError(f"cmap: unknown panel name(s) {sorted(map(str, unknown))}; panels are {list(images)}")
        return {k: _cmap(cmap.get(k, "gray")) for k in images}
    c = _cmap(cmap)
    return {k: c for k in images}


def _compare_limits(images, scalar, cmaps, share_contrast, vmin, vmax, percentile):
    """{key: (lo, hi)} for the ``scalar`` panels; panels with the same colormap share a range."""
    limits = {}
    if share_contrast:
        groups = {}
        for k in scalar:
            groups.setdefault(cmaps[k].name, []).append(k)
        for keys in groups.values():
            lim = _limits([images[k] for k in keys], vmin, vmax, percentile, _is_diverging(cmaps[keys[0]]))
            limits.update({k: lim for k in keys})
    else:
        for k in scalar:
            limits[k] = _limits(images[k], vmin, vmax, percentile, _is_diverging(cmaps[k]))
    return limits


def _draw_compare(fig, images, label_keys, cmaps, limits, ncols, colorbar, label_names, label_alpha=1.0,
                  max_label=None):
    n = len(images)
    ncols = n if ncols is None and n <= 4 else (ncols or 4)
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    axs = fig.subplots(nrows, ncols, squeeze=False)
    flat = axs.ravel()
    for ax in flat[n:]:
        fig.delaxes(ax)
    if isinstance(colorbar, bool):
        cbar_keys = set(images) if colorbar else set()
    else:
        cbar_keys = set(colorbar)
        unknown = cbar_keys - set(images)
        if unknown:
            raise ValueError(f"colorbar: unknown panel name(s) {sorted(map(str, unknown))}; panels are {list(images)}")
    if max_label is None:
        max_label = max([int(images[k].max()) for k in label_keys if images[k].size] or [0])
    mappables = {}
    for ax, (key, img) in zip(flat, images.items()):
        if key in label_keys:
            ax.imshow(_label_rgba(img, max_label, label_alpha, background="black"), interpolation="nearest")
        elif img.ndim == 3:
            rgb = img if img.dtype == np.uint8 else np.clip(img, 0, 1)
            ax.imshow(rgb, interpolation="nearest")
        else:
            lo, hi = limits[key]
            mappables[key] = ax.imshow(img, cmap=cmaps[key], vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(str(key))
        ax.set_xticks([])
        ax.set_yticks([])
    # one colourbar per group of panels sharing colormap and range
    done = set()
    for key, m in mappables.items():
        if key not in cbar_keys or key in done:
            continue
        group = [k for k in mappables if k in cbar_keys and cmaps[k].name == cmaps[key].name and limits[k] == limits[key]]
        done.update(group)
        group_axes = [flat[list(images).index(k)] for k in group]
        fig.colorbar(m, ax=group_axes, shrink=0.85, pad=0.02)
    if label_names is not None and label_keys:
        names = _label_names(label_names, _present_labels(*(images[k] for k in label_keys)) or None)
        _legend(fig, names, max_label)
    return flat[:n]


def compare(
    images,
    ncols=None,
    cmap="gray",
    share_contrast=True,
    labels=False,
    suptitle=None,
    *,
    vmin=None,
    vmax=None,
    percentile=(0.5, 99.5),
    colorbar=False,
    label_names=None,
    panel_size=3.5,
    figsize=None,
):
    """Side-by-side panels, e.g. ``baseline | method | ground truth``.

    Parameters
    ----------
    images : dict of {str: array_like}
        Panel title -> 2D image, 2D label map, or RGB(A) image ``(h, w, 3|4)``
        (uint8, or float in [0, 1], e.g. from :func:`overlay`). Shapes may differ.
    ncols : int, optional
        Panels per row (default: all in one row up to 4, then 4 per row).
    cmap : str, Colormap or dict
        Colormap for the scalar panels, or ``{title: cmap}`` per panel (others
        ``"gray"``); use it for error maps, e.g. ``{"|error|": "magma"}``. Diverging
        colormaps (``"RdBu_r"``, ``"coolwarm"``...) get limits symmetric about 0.
    share_contrast : bool
        Scalar panels with the same colormap share one display range (the fair
        way to compare a denoiser with its input); otherwise each has its own.
    labels : bool or collection of str
        Panels drawn as label maps (distinct colours per label, 0 black):
        ``True`` for all, or the titles of those panels.
    suptitle : str, optional
        Figure title.
    vmin, vmax : float, optional
        Fixed display range for all scalar panels.
    percentile : (float, float)
        Robust display range when ``vmin``/``vmax`` are not given.
    colorbar : bool or collection of str
        Add colourbars (to all scalar panels, or to the named ones); panels that
        share a range share one colourbar.
    label_names : dict or list, optional
        Names of label values for a legend (label panels only).
    panel_size : float
        Width of one panel in inches (when ``figsize`` is not given).
    figsize : (float, float), optional
        Figure size in inches.

    Returns
    -------
    matplotlib.figure.Figure
        One axes per panel (in dict order), then colourbar axes.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> truth = rng.random((32, 32)); noisy = truth + rng.normal(0, 0.3, truth.shape)
    >>> fig = compare({"noisy": noisy, "truth": truth, "|error|": abs(noisy - truth)},
    ...               cmap={"|error|": "magma"}, colorbar=["|error|"])
    >>> [ax.get_title() for ax in fig.axes[:3]]
    ['noisy', 'truth', '|error|']
    """
    images, label_keys = _prepare_images(images, labels)
    if ncols is not None:
        ncols = check_positive(ncols, "ncols", integer=True)
    panel_size = check_positive(panel_size, "panel_size")
    cmaps = _panel_cmaps(images, cmap)
    scalar = [k for k, a in images.items() if k not in label_keys and a.ndim == 2]
    limits = _compare_limits(images, scalar, cmaps, bool(share_contrast), vmin, vmax, percentile)
    n = len(images)
    nc = min(ncols or (n if n <= 4 else 4), n)
    nr = int(np.ceil(n / nc))
    if figsize is None:
        aspect = float(np.clip(np.median([a.shape[0] / a.shape[1] for a in images.values()]), 0.25, 4.0))
        extra = 0.6 + (0.4 if suptitle else 0) + (0.5 if label_names is not None and label_keys else 0)
        cb = 0.8 if colorbar is not False and colorbar else 0.0
        figsize = (nc * panel_size + cb, nr * panel_size * aspect + extra)
    fig = _new_figure(figsize)
    _draw_compare(fig, images, label_keys, cmaps, limits, nc, colorbar, label_names)
    if suptitle is not None:
        fig.suptitle(suptitle)
    return fig


# --------------------------------------------------------------------------- overlays

def overlay(
    image2d,
    labels2d,
    alpha=0.4,
    *,
    cmap="gray",
    vmin=None,
    vmax=None,
    percentile=(0.5, 99.5),
    outline=False,
    max_label=None,
):
    """Blend a label map onto a grey image; return an RGB array.

    Background (label 0) pixels keep the grey image; labelled pixels are
    mixed with their label colour (see :func:`label_cmap`).

    Parameters
    ----------
    image2d : array_like, shape (h, w)
        Grey image.
    labels2d : array_like of int, shape (h, w)
        Label map, 0 = background.
    alpha : float
        Opacity of the label colours, 0-1.
    cmap : str or Colormap
        Colormap of the grey image.
    vmin, vmax : float, optional
        Display range of the image (default: robust percentiles).
    percentile : (float, float)
        Percentiles mapped to the ends of the colormap.
    outline : bool
        Also draw label boundaries in full colour (good for touching instances).
    max_label : int, optional
        Largest label id used to pick colours; pass the same value for several
        slices of one label volume (colours depend only on the id either way).

    Returns
    -------
    numpy.ndarray, shape (h, w, 3), float in [0, 1]

    Examples
    --------
    >>> import numpy as np
    >>> img = np.linspace(0, 1, 64).reshape(8, 8)
    >>> lab = np.zeros((8, 8), int); lab[2:5, 2:5] = 1
    >>> rgb = overlay(img, lab)
    >>> rgb.shape
    (8, 8, 3)
    """
    img = as_array(image2d, "image2d", ndim=2)
    lab = _check_labels(labels2d, "labels2d", img.shape, "image2d")
    alpha = _check_fraction(alpha, "alpha")
    lo, hi = _limits(img, vmin, vmax, percentile)
    norm = np.clip((img.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0)
    base = _cmap(cmap)(norm)[..., :3]
    if max_label is None:
        max_label = int(lab.max()) if lab.size else 0
    colors = _label_rgba(lab, max_label)[..., :3]
    mask = lab > 0
    out = base.copy()
    out[mask] = (1.0 - alpha) * base[mask] + alpha * colors[mask]
    if outline:
        from skimage.segmentation import find_boundaries

        edge = find_boundaries(lab, mode="inner") & mask
        out[edge] = colors[edge]
    return out


def plot_overlay(
    image2d,
    labels2d,
    alpha=0.4,
    *,
    label_names=None,
    title=None,
    outline=False,
    cmap="gray",
    vmin=None,
    vmax=None,
    percentile=(0.5, 99.5),
    figsize=None,
    ax=None,
):
    """Figure of a label map blended onto a grey image (see :func:`overlay`).

    Parameters
    ----------
    image2d, labels2d, alpha, outline, cmap, vmin, vmax, percentile
        As in :func:`overlay`.
    label_names : dict or list, optional
        ``{label: name}`` for a legend.
    title : str, optional
        Axes title.
    figsize : (float, float), optional
        Figure size in inches.
    ax : matplotlib Axes, optional
        Draw into this axes.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import numpy as np
    >>> img = np.random.default_rng(0).random((32, 32))
    >>> fig = plot_overlay(img, (img > 0.7).astype(int) + (img > 0.9), label_names={1: "pore", 2: "crack"})
    >>> len(fig.axes)
    1
    """
    rgb = overlay(image2d, labels2d, alpha, cmap=cmap, vmin=vmin, vmax=vmax, percentile=percentile, outline=outline)
    lab = np.asarray(labels2d)
    if ax is None:
        h, w = rgb.shape[:2]
        if figsize is None:
            figsize = (6.0, float(np.clip(6.0 * h / w, 2.5, 10.0)) + (0.8 if label_names is not None else 0.3))
        fig = _new_figure(figsize)
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    ax.imshow(rgb, interpolation="nearest")
    ax.set_xlabel("x (voxels)")
    ax.set_ylabel("y (voxels)")
    if title is not None:
        ax.set_title(title)
    if label_names is not None:
        names = _label_names(label_names, _present_labels(lab) or None)
        _legend(fig, names, int(lab.max()) if lab.size else 0)
    return fig


# --------------------------------------------------------------------------- vector fields

def _component_list(component):
    names = {"z": 0, "y": 1, "x": 2, 0: 0, 1: 1, 2: 2, "magnitude": "magnitude", "|u|": "magnitude"}
    if component is None:
        return [0, 1, 2]
    comps = component if isinstance(component, (list, tuple)) else [component]
    out = []
    for c in comps:
        if isinstance(c, bool) or c not in names:
            raise ValueError(f"component: unknown value {c!r}; choose 'z', 'y', 'x' (or 0, 1, 2), 'magnitude', or None for all")
        out.append(names[c])
    return out


def plot_vector_field(
    u,
    axis="z",
    index=None,
    component=None,
    *,
    cmap="RdBu_r",
    vmax=None,
    percentile=99.5,
    title=None,
    unit="voxels",
    panel_size=3.2,
    figsize=None,
):
    """Components of a vector field (e.g. a DVC displacement) on one slice.

    One panel per component (``u_z``, ``u_y``, ``u_x``) with a diverging colormap
    and limits symmetric about zero. Pass a dict of fields to get one row per
    field, e.g. ``{"ground truth": u_true, "classical": u_dic, "learned": u_net}``;
    each component column then shares one colour scale so the rows compare directly.

    Parameters
    ----------
    u : array_like, shape (3, z, y, x), or dict of {str: array_like}
        Vector field(s), components in the order ``(z, y, x)``; all the same shape.
    axis : {"z", "y", "x"} or int
        Axis normal to the slice shown.
    index : int, optional
        Slice index along ``axis`` (default: centre).
    component : {"z", "y", "x", 0, 1, 2, "magnitude"} or list of them, optional
        Components to show (default: the three components).
    cmap : str or Colormap
        Diverging colormap for the components (the magnitude uses ``"viridis"``).
    vmax : float, optional
        Colour limit ``[-vmax, vmax]`` for all components. Default: per component,
        the ``percentile`` of ``|u_c|`` on the slice of the *first* field, so put
        the reference (ground truth) first; noisier estimates then saturate
        instead of washing out the reference.
    percentile : float
        Percentile of absolute values used for the automatic limit (robust to a
        few wild vectors, common in classical DVC).
    title : str, optional
        Figure title (default names the slice).
    unit : str
        Unit shown on the colourbars.
    panel_size : float
        Panel width in inches.
    figsize : (float, float), optional
        Figure size in inches.

    Returns
    -------
    matplotlib.figure.Figure
        ``n_fields * n_components`` panels (row-major), then one colourbar per column.

    Examples
    --------
    >>> import numpy as np
    >>> u = np.random.default_rng(0).normal(size=(3, 8, 16, 16))
    >>> fig = plot_vector_field({"truth": u, "estimate": u + 0.1}, axis="y")
    >>> len(fig.axes)  # 2 rows x 3 components + 3 colourbars
    9
    """
    fields = dict(u) if isinstance(u, Mapping) else {None: u}
    if not fields:
        raise ValueError("u: the dict of fields is empty")
    arrays = {}
    shape = None
    for key, f in fields.items():
        pname = "u" if key is None else f"u[{key!r}]"
        arr = as_array(f, pname, ndim=4)
        if arr.shape[0] != 3:
            raise ValueError(f"{pname}: expected shape (3, z, y, x) with components (z, y, x), got {arr.shape}")
        if shape is None:
            shape = arr.shape
        elif arr.shape != shape:
            raise ValueError(f"{pname}: shape {arr.shape} differs from the first field's shape {shape}")
        arrays[key] = arr
    if isinstance(axis, numbers.Integral) and not isinstance(axis, bool) and 0 <= axis <= 2:
        axis = _AXES[axis]
    check_choice(axis, "axis", _AXES)
    n_ax = shape[1 + _AXES.index(axis)]
    if index is None:
        index = n_ax // 2
    elif isinstance(index, bool) or not isinstance(index, numbers.Integral):
        raise TypeError(f"index: expected an integer slice index, got {index!r}")
    elif not 0 <= index < n_ax:
        raise ValueError(f"index: {index} is outside 0..{n_ax - 1} along axis {axis!r}")
    comps = _component_list(component)
    if vmax is not None:
        vmax = check_positive(vmax, "vmax")
    if not isinstance(percentile, numbers.Real) or not 0 < percentile <= 100:
        raise ValueError(f"percentile: expected a number in (0, 100], got {percentile!r}")
    panel_size = check_positive(panel_size, "panel_size")

    k = _AXES.index(axis)
    planes = {}
    for key, arr in arrays.items():
        sl = [slice(None)] * 4
        sl[k + 1] = int(index)
        planes[key] = arr[tuple(sl)].astype(np.float64)  # (3, h, w)

    def comp_img(plane, c):
        return np.sqrt((plane ** 2).sum(axis=0)) if c == "magnitude" else plane[c]

    v_ax, h_ax = _PLANE_AXES[axis]
    nrows, ncols = len(planes), len(comps)
    h, w = next(iter(planes.values())).shape[1:]
    if figsize is None:
        aspect = float(np.clip(h / w, 0.25, 4.0))
        figsize = (ncols * panel_size + 0.4, nrows * panel_size * aspect + 1.5)
    fig = _new_figure(figsize)
    axs = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
    for j, c in enumerate(comps):
        imgs = [comp_img(p, c) for p in planes.values()]
        hi = vmax
        if hi is None:  # scale from the first (reference) field; all fields if it is flat
            hi = float(np.percentile(np.abs(imgs[0]), percentile))
            if not hi > 0:
                hi = max(float(np.percentile(np.abs(np.concatenate([i.ravel() for i in imgs])), percentile)), 1e-12)
        if c == "magnitude":
            lo, cm = 0.0, _cmap("viridis")
            label = f"|u| ({unit})"
        else:
            lo, cm = -hi, _cmap(cmap)
            label = f"u_{_AXES[c]} ({unit})"
        for i, (key, img) in enumerate(zip(planes, imgs)):
            ax = axs[i, j]
            m = ax.imshow(img, cmap=cm, vmin=lo, vmax=hi, interpolation="nearest")
            if i == 0:
                ax.set_title("|u|" if c == "magnitude" else f"u_{_AXES[c]}")
            if i == nrows - 1:
                ax.set_xlabel(f"{h_ax} (voxels)")
            if j == 0:
                ax.set_ylabel(f"{v_ax} (voxels)" if key is None else f"{key}\n{v_ax} (voxels)")
        fig.colorbar(m, ax=axs[:, j], location="bottom", shrink=0.9, label=label, pad=0.02)
    fig.suptitle(title if title is not None else f"slice {axis} = {index}")
    return fig


# --------------------------------------------------------------------------- histogram

def plot_histogram(
    volume,
    labels=None,
    bins=256,
    *,
    label_names=None,
    range=None,
    percentile=(0.05, 99.95),
    log=True,
    thresholds=None,
    title=None,
    figsize=None,
    ax=None,
):
    """Grey-value histogram, split per class when ``labels`` is given.

    Use it to choose thresholds: the overall histogram is filled grey, each class
    is a coloured line, and ``thresholds`` are marked with dashed lines.

    Parameters
    ----------
    volume : array_like
        Grey values (any dimension).
    labels : array_like of int, optional
        Class map of the same shape (0 = unlabelled, drawn as its own line). At
        most 20 classes (semantic labels, not instance labels).
    bins : int
        Number of bins.
    label_names : dict or list, optional
        ``{label: name}`` for the legend.
    range : (float, float), optional
        Histogram range (default: the ``percentile`` range widened by 5 %, so a few
        extreme voxels do not squash the histogram).
    percentile : (float, float)
        Percentiles used for the default range.
    log : bool
        Logarithmic count axis (background peaks otherwise hide small phases).
    thresholds : float or sequence of float, optional
        Values to mark (e.g. from ``skimage.filters.threshold_otsu``).
    title : str, optional
        Axes title.
    figsize : (float, float), optional
        Figure size in inches.
    ax : matplotlib Axes, optional
        Draw into this axes.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import numpy as np
    >>> vol = np.random.default_rng(0).normal(size=(8, 32, 32))
    >>> fig = plot_histogram(vol, labels=(vol > 0).astype(int), thresholds=0.0)
    >>> len(fig.axes)
    1
    """
    vol = as_array(volume, "volume")
    bins = check_positive(bins, "bins", integer=True)
    lab = None
    if labels is not None:
        lab = _check_labels(labels, "labels", vol.shape)
        max_label = int(lab.max()) if lab.size else 0
        present = np.unique(lab) if max_label > 10_000 else np.flatnonzero(np.bincount(lab.ravel()))
        if len(present) > 21:
            raise ValueError(
                f"labels: {len(present)} distinct labels; per-class histograms are drawn for at most 20 "
                "classes (pass class labels, not instance labels)"
            )
    if range is None:
        lo, hi = _limits(vol, None, None, percentile)
        pad = 0.05 * (hi - lo)
        lo, hi = lo - pad, hi + pad
    else:
        try:
            lo, hi = (float(v) for v in range)
        except (TypeError, ValueError):
            raise TypeError(f"range: expected (low, high), got {range!r}") from None
        if not hi > lo:
            raise ValueError(f"range: high must exceed low, got {range!r}")
    if thresholds is None:
        thresholds = []
    elif isinstance(thresholds, numbers.Real):
        thresholds = [thresholds]
    thresholds = [float(t) for t in thresholds]

    v = vol.ravel().astype(np.float64, copy=False)
    inside = (v >= lo) & (v <= hi)
    b = np.minimum(((v[inside] - lo) / (hi - lo) * bins).astype(np.int64), bins - 1)
    edges = np.linspace(lo, hi, bins + 1)
    centres = 0.5 * (edges[1:] + edges[:-1])

    if ax is None:
        fig = _new_figure(figsize or (7.5, 4.2))
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    total = np.bincount(b, minlength=bins)
    ax.fill_between(centres, total, step="mid", color="0.82", label="all voxels")
    ax.step(centres, total, where="mid", color="0.45", lw=0.8)
    if lab is not None:
        lv = lab.ravel()[inside]
        names = _label_names(label_names, None) or {}
        if max_label > 10_000:
            _, inv = np.unique(lv, return_inverse=True)
            keys = np.unique(lv)
        else:
            inv, keys = lv, np.arange(max_label + 1)
        counts = np.bincount(inv.astype(np.int64) * bins + b, minlength=len(keys) * bins).reshape(len(keys), bins)
        pal = _label_colors(max(max_label, 1))
        for i, key in enumerate(keys):
            if counts[i].sum() == 0:
                continue
            key = int(key)
            color = "black" if key == 0 else pal[key if max_label <= _MAX_LABEL_COLORS else 1, :3]
            default = "unlabelled (0)" if key == 0 else f"label {key}"
            name = names.get(key, default)
            ax.step(centres, counts[i], where="mid", color=color, lw=1.4, ls=":" if key == 0 else "-", label=name)
    for t in thresholds:
        ax.axvline(t, color="crimson", ls="--", lw=1.2)
        ax.annotate(f"{t:.4g}", (t, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                    textcoords="offset points", color="crimson", fontsize=9)
    if log:
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.8)
    ax.set_xlim(lo, hi)
    ax.set_xlabel("grey value")
    ax.set_ylabel("voxel count" + (" (log)" if log else ""))
    if title is not None:
        ax.set_title(title)
    ax.legend(frameon=False, fontsize=9)
    ax.grid(alpha=0.25)
    return fig


# --------------------------------------------------------------------------- view3d

def _block_mean(a, f):
    """Downsample a 3D array by averaging f x f x f blocks (edges cropped)."""
    if f <= 1:
        return a.astype(np.float32, copy=False)
    nz, ny, nx = (s // f for s in a.shape)
    a = a[: nz * f, : ny * f, : nx * f].astype(np.float32, copy=False)
    return a.reshape(nz, f, ny, f, nx, f).mean(axis=(1, 3, 5))


def _front_labels(lab, axis):
    """Label of the first non-zero voxel along ``axis`` (a 'what you see from there' projection)."""
    fg = lab > 0
    first = np.argmax(fg, axis=axis)
    vals = np.take_along_axis(lab, np.expand_dims(first, axis), axis=axis).squeeze(axis)
    return np.where(fg.any(axis=axis), vals, 0)


def _mesh(field, level, spacing):
    from skimage.measure import marching_cubes

    padded = np.pad(field, 1, mode="constant", constant_values=float(field.min()))  # closes surfaces at the edges
    verts, faces, _, _ = marching_cubes(padded, level=level, spacing=spacing, allow_degenerate=False)
    verts -= np.asarray(spacing)  # undo the padding offset
    return verts, faces


def _meshes(make_jobs, f, max_faces, f_max):
    """Surfaces from ``make_jobs(f)`` -> [(field, level, spacing, offset, colour)], coarsening the
    downsampling factor ``f`` (smooth, unlike a marching-cubes step) until under ``max_faces``."""
    while True:
        meshes = [(*_mesh(fld, lvl, sp), off, col) for fld, lvl, sp, off, col in make_jobs(f)]
        total = sum(len(m[1]) for m in meshes)
        if total <= max_faces or f >= f_max:
            break
        f = min(f_max, max(f + 1, int(np.ceil(f * np.sqrt(total / max_faces)))))
    parts = [_shaded_faces(v + off, fc, col) for v, fc, off, col in meshes if len(fc)]
    return parts, total, f


def _label_jobs(lab, ids, f, max_label):
    """Surface jobs for the labels ``ids`` at downsampling ``f``."""
    from scipy.ndimage import find_objects, gaussian_filter

    # nearest-neighbour pre-stride for large reductions, then block averaging of each
    # label's mask inside its bounding box: smooth surfaces at a bounded cost per label
    s = max(1, f // 2)
    f2 = int(np.ceil(f / s))
    sub = lab[::s, ::s, ::s]
    boxes = find_objects(sub, max_label=max(ids) if ids else 0)
    pal = _label_colors(max(max_label, 1)) if max_label <= _MAX_LABEL_COLORS else None
    jobs = []
    for i in ids:
        box = boxes[i - 1]
        if box is None:  # vanished in the pre-stride
            continue
        lo = [max(0, (b.start // f2 - 1) * f2) for b in box]
        hi = [min(n, (b.stop // f2 + 2) * f2) for b, n in zip(box, sub.shape)]
        crop = sub[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] == i
        mask = gaussian_filter(_block_mean(crop, f2), 0.5)
        if mask.max() <= 0.5:
            continue
        color = pal[i, :3] if pal is not None else _label_rgba(np.array([i]), max_label)[0, :3]
        offset = np.asarray(lo, dtype=float) * s + (s * f2 - 1) / 2.0
        jobs.append((mask, 0.5, (s * f2,) * 3, offset, color))
    return jobs


def _shaded_faces(verts, faces, color, alpha=1.0):
    """Triangles in plot order (x, y, z) and their Lambert-shaded RGBA face colours."""
    from matplotlib.colors import to_rgb

    tri = verts[faces][:, :, ::-1]  # (z, y, x) -> (x, y, z) for the plot axes
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    light = np.array([-0.45, -0.55, 0.70])  # from the viewer's upper left
    light /= np.linalg.norm(light)
    lambert = np.abs(normals @ light)  # two-sided: orientation of marching-cubes faces varies
    shade = 0.35 + 0.65 * lambert
    rgb = np.clip(np.asarray(to_rgb(color))[None, :] * shade[:, None], 0, 1)
    return tri, np.column_stack([rgb, np.full(len(rgb), alpha)])


def _add_meshes(ax3d, parts):
    """Draw (triangles, colours) parts as ONE collection so faces are depth-sorted together."""
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    if not parts:
        return None
    tri = np.concatenate([p[0] for p in parts])
    fc = np.concatenate([p[1] for p in parts])
    coll = Poly3DCollection(tri, facecolors=fc, edgecolors=fc, linewidths=0.1)
    ax3d.add_collection3d(coll)
    return coll


def view3d(
    volume,
    labels=None,
    viewer="static",
    threshold=None,
    *,
    max_size=None,
    max_labels=10,
    max_faces=40_000,
    label_names=None,
    cmap="gray",
    percentile=(0.5, 99.5),
    surface_color="#d8c8a8",
    title=None,
    figsize=None,
    **viewer_kwargs,
):
    """3D view of a volume and/or a label map.

    ``viewer="static"`` (default) needs nothing beyond matplotlib and
    scikit-image and never imports an interactive viewer: it returns a Figure with
    maximum-intensity projections along z, y and x plus a shaded isosurface
    (marching cubes on a downsampled copy) or, with ``labels``, one coloured
    surface per label (the ``max_labels`` largest). Safe in headless runs and
    reports.

    ``viewer="k3d"`` returns an interactive ``k3d`` plot (volume rendering of
    ``volume`` and/or voxels of ``labels``); it runs headless and ships its own
    JavaScript, so it works offline in JupyterLab. To keep a view in an exported
    HTML report wrap it with :func:`k3d_snapshot_html`. Install: ``pip install k3d``.

    ``viewer="itk"`` returns an ``itkwidgets`` viewer. It needs a live browser
    front end and loads its viewer from the internet (CDN): it **hangs headless
    runs** (papermill, ``tomoml report``) and does not work offline. A set that
    works with JupyterLab 4: ``pip install 'itkwidgets[lab]==1.0a55'
    'ngff-zarr==0.20.4' 'zarr<3'`` (the ``itk`` extra).

    Parameters
    ----------
    volume : array_like, shape (z, y, x), or None
        Grey values; may be ``None`` when ``labels`` is given.
    labels : array_like of int, shape (z, y, x), optional
        Label map (0 = background).
    viewer : {"static", "k3d", "itk"}
        Which renderer to use.
    threshold : float, optional
        Isosurface level for the static grey-value surface (default: Otsu
        threshold of the downsampled volume).
    max_size : int, optional
        Downsample (block mean for grey values, nearest for labels) so the
        largest axis is at most this many voxels: default 96 for ``"static"``,
        256 for ``"k3d"``; ``"itk"`` gets the full volume.
    max_labels : int
        Static viewer: surfaces for at most this many labels (the largest).
    max_faces : int
        Static viewer: triangle budget; the volume is downsampled further until
        the surfaces fit, which keeps drawing to a few seconds.
    label_names : dict or list, optional
        Static viewer: ``{label: name}`` for a legend.
    cmap : str or Colormap
        Colormap of the projections / the k3d volume rendering.
    percentile : (float, float)
        Robust display range of the grey values.
    surface_color : color
        Static viewer: colour of the grey-value isosurface.
    title : str, optional
        Static viewer: figure title.
    figsize : (float, float), optional
        Static viewer: figure size in inches.
    **viewer_kwargs
        Passed to ``k3d.plot`` or ``itkwidgets.view``; not accepted by the static viewer.

    Returns
    -------
    matplotlib.figure.Figure, k3d.plot.Plot or itkwidgets viewer

    Raises
    ------
    ValueError
        Unknown ``viewer``.
    ImportError
        ``viewer="k3d"``/``"itk"`` when the package is not installed (the message
        says what to install).

    Examples
    --------
    >>> import numpy as np
    >>> zz, yy, xx = np.mgrid[:32, :32, :32]
    >>> ball = ((zz - 16) ** 2 + (yy - 16) ** 2 + (xx - 16) ** 2 < 100).astype(float)
    >>> fig = view3d(ball)                # static: projections + isosurface
    >>> len(fig.axes)
    4
    """
    check_choice(viewer, "viewer", VIEWERS)
    if volume is None and labels is None:
        raise ValueError("volume: got None and no labels; pass a volume, labels, or both")
    vol = None if volume is None else as_array(volume, "volume", ndim=3)
    lab = None
    if labels is not None:
        lab = _check_labels(labels, "labels", vol.shape if vol is not None else None)
        if lab.ndim != 3:
            raise ValueError(f"labels: expected a 3D array, got {lab.ndim}D with shape {lab.shape}")
    if max_size is not None:
        max_size = check_positive(max_size, "max_size", integer=True)
    max_labels = check_positive(max_labels, "max_labels", integer=True)
    max_faces = check_positive(max_faces, "max_faces", integer=True)
    if viewer == "k3d":
        return _view_k3d(vol, lab, max_size or 256, cmap, percentile, viewer_kwargs)
    if viewer == "itk":
        return _view_itk(vol, lab, viewer_kwargs)
    if viewer_kwargs:
        raise TypeError(f"{next(iter(viewer_kwargs))}: unexpected keyword argument for viewer='static'")
    return _view_static(vol, lab, threshold, max_size or 96, max_labels, max_faces, label_names, cmap, percentile,
                        surface_color, title, figsize)


def _view_static(vol, lab, threshold, max_size, max_labels, max_faces, label_names, cmap, percentile,
                 surface_color, title, figsize):
    shape = (vol if vol is not None else lab).shape
    nz, ny, nx = shape
    f = max(1, int(np.ceil(max(shape) / max_size)))
    if figsize is None:
        top = 11.0 * max(ny, nz) / (2 * nx + ny) + 0.8
        figsize = (12.0, float(np.clip(top + 6.5, 7.0, 13.0)))
    fig = _new_figure(figsize)
    top_h = figsize[0] * max(ny, nz) / (2 * nx + ny) + 0.8
    gs = fig.add_gridspec(2, 3, width_ratios=[nx, nx, ny], height_ratios=[top_h, max(figsize[1] - top_h, 1.0)])
    mip_axes = [fig.add_subplot(gs[0, j]) for j in range(3)]
    ax3d = fig.add_subplot(gs[1, :], projection="3d")

    # projections
    max_label = int(lab.max()) if lab is not None and lab.size else 0
    mips = {}
    if vol is not None:
        mips = {a: vol.max(axis=k) for k, a in enumerate(_AXES)}
        lo, hi = _limits(list(mips.values()), None, None, percentile)
    for k, (ax, a) in enumerate(zip(mip_axes, _AXES)):
        v_ax, h_ax = _PLANE_AXES[a]
        if vol is not None:
            ax.imshow(mips[a], cmap=_cmap(cmap), vmin=lo, vmax=hi, interpolation="nearest")
        else:
            ax.set_facecolor("black")
            ax.imshow(np.zeros(tuple(s for i, s in enumerate(shape) if i != k)), cmap="gray", vmin=0, vmax=1)
        if lab is not None:
            ax.imshow(_label_rgba(_front_labels(lab, k), max_label, 0.55 if vol is not None else 1.0),
                      interpolation="nearest")
        ax.set_title(f"{'max projection' if vol is not None else 'labels seen'} along {a}")
        for spine in ax.spines.values():
            spine.set_edgecolor(_PLANE_COLORS[a])
            spine.set_linewidth(1.5)
        ax.set_xlabel(f"{h_ax} (voxels)")
        ax.set_ylabel(f"{v_ax} (voxels)")

    # surfaces
    note = None
    make_jobs = lambda f: []  # noqa: E731
    if lab is not None:
        counts = np.bincount(lab.ravel()) if max_label <= 10_000_000 else None
        if counts is not None:
            ids = np.argsort(counts[1:])[::-1][:max_labels] + 1
            ids = [int(i) for i in ids if counts[i] > 0]
        else:  # pragma: no cover - huge ids
            u, c = np.unique(lab[lab > 0], return_counts=True)
            ids = [int(i) for i in u[np.argsort(c)[::-1][:max_labels]]]
        n_present = int(np.count_nonzero(counts[1:])) if counts is not None else len(ids)
        if n_present > len(ids):
            note = f"the {len(ids)} largest of {n_present} labels"
        make_jobs = lambda f: _label_jobs(lab, ids, f, max_label)  # noqa: E731
    elif vol is not None:
        small = _block_mean(vol, f)
        if threshold is None:
            from skimage.filters import threshold_otsu

            threshold = float(threshold_otsu(small)) if np.ptp(small) > 0 else float(small.flat[0])
        if small.min() < threshold < small.max():
            note = f"isosurface at {threshold:.4g}"
            # offset (f - 1) / 2: vertices at block centres
            make_jobs = lambda f: [(_block_mean(vol, f), threshold, (f, f, f), (f - 1) / 2.0, surface_color)]  # noqa: E731
        else:
            note = f"no surface: threshold {threshold:.4g} outside the data range"
    parts, n_faces, f_used = _meshes(make_jobs, f, max_faces, max(1, max(shape) // 12))
    _add_meshes(ax3d, parts)
    ax3d.set_xlim(0, nx)
    ax3d.set_ylim(0, ny)
    ax3d.set_zlim(0, nz)
    ax3d.set_box_aspect((nx, ny, nz), zoom=1.15)
    ax3d.set_xlabel("x")
    ax3d.set_ylabel("y")
    ax3d.set_zlabel("z")
    ax3d.view_init(elev=22, azim=-55)
    ax3d.set_title("3D surface" + (f"\n{note}" if note else ""), fontsize=10)
    if label_names is not None and lab is not None:
        _legend(fig, _label_names(label_names, set(ids) or None), max_label)
    if title is not None:
        fig.suptitle(title)
    fig._tomoml_n_faces = n_faces  # for tests / diagnostics
    fig._tomoml_downsample = f_used
    return fig


def _k3d_colormap(cmap, n=64):
    c = _cmap(cmap)
    xs = np.linspace(0.0, 1.0, n)
    rgb = c(xs)[:, :3]
    return np.column_stack([xs, rgb]).astype(np.float32).ravel().tolist()


def _view_k3d(vol, lab, max_size, cmap, percentile, plot_kwargs):
    try:
        import k3d
    except ImportError as exc:
        raise ImportError(
            f"viewer='k3d' needs the k3d package, which is not installed: {K3D_INSTALL}. "
            "viewer='static' needs nothing extra."
        ) from exc
    shape = (vol if vol is not None else lab).shape
    f = max(1, int(np.ceil(max(shape) / max_size)))
    nz, ny, nx = shape
    bounds = [0, nx, 0, ny, 0, nz]
    plot = k3d.plot(**plot_kwargs)
    if vol is not None:
        v = vol[::f, ::f, ::f].astype(np.float32)
        lo, hi = _limits(v, None, None, percentile)
        plot += k3d.volume(v, color_map=_k3d_colormap(cmap), color_range=[lo, hi], bounds=bounds, name="volume")
    if lab is not None:
        sub = lab[::f, ::f, ::f]
        vox = np.where(sub > 0, (sub.astype(np.int64) - 1) % 255 + 1, 0).astype(np.uint8)
        pal = _label_colors(255)[1:, :3]
        packed = [int(r * 255) << 16 | int(g * 255) << 8 | int(b * 255) for r, g, b in pal]
        plot += k3d.voxels(vox, color_map=packed, bounds=bounds, outlines=False, name="labels",
                           opacity=0.6 if vol is not None else 1.0)
    return plot


def _view_itk(vol, lab, view_kwargs):
    try:
        import itkwidgets
    except ImportError as exc:
        raise ImportError(
            "viewer='itk' needs itkwidgets, which is not installed. A set that works with JupyterLab 4: "
            f"{ITK_INSTALL}. It needs network access (CDN) and a live browser; for offline use or reports "
            "use viewer='static' or viewer='k3d'."
        ) from exc
    warnings.warn(
        "viewer='itk': itkwidgets loads its viewer from a CDN and needs a live browser front end; it hangs "
        "headless runs (papermill, nbconvert, `tomoml report`). Use viewer='static' or 'k3d' there.",
        RuntimeWarning,
        stacklevel=3,
    )
    kwargs = dict(view_kwargs)
    if vol is not None:
        kwargs.setdefault("image", vol)
    if lab is not None:
        kwargs.setdefault("label_image", lab)
    return itkwidgets.view(**kwargs)


def k3d_snapshot_html(plot, height=512):
    """Embed a k3d plot as a self-contained ``<iframe>`` that renders offline.

    Exported notebooks lose live k3d widgets (and widget state pulls a widget
    manager from a CDN); ``plot.get_snapshot()`` is a standalone HTML page with
    the data and JavaScript inlined (about 1.2 MB per view), which this wraps in
    an ``<iframe srcdoc=...>`` so it stays interactive in an offline HTML report.

    Parameters
    ----------
    plot : k3d.plot.Plot
        E.g. the result of ``view3d(volume, viewer="k3d")``.
    height : int
        Height of the frame in pixels.

    Returns
    -------
    IPython.display.HTML

    Examples
    --------
    >>> plot = view3d(volume, viewer="k3d")      # doctest: +SKIP
    >>> k3d_snapshot_html(plot)                   # doctest: +SKIP
    """
    from IPython.display import HTML

    if not hasattr(plot, "get_snapshot"):
        raise TypeError(f"plot: expected a k3d plot (with get_snapshot), got {type(plot).__name__}")
    height = check_positive(height, "height", integer=True)
    doc = html.escape(plot.get_snapshot(), quote=True)
    # the <div> wrapper keeps IPython from suggesting IFrame (which needs a URL, not inline HTML)
    return HTML(f'<div><iframe srcdoc="{doc}" style="width:100%;height:{height}px;border:0"></iframe></div>')
