"""Input validation shared by every module.

Each helper raises an error whose message starts with the offending parameter's
name, so a user sees at once which argument to fix.
"""
from __future__ import annotations

import numbers

import numpy as np

__all__ = ["as_array", "check_positive", "check_choice", "check_same_shape", "check_label_out", "rng_from"]


def as_array(x, name, *, ndim=None, dtype=None, finite=True, allow_empty=False, nonconstant=False):
    """Return ``x`` as a numpy array after checking it.

    Parameters
    ----------
    x : array_like
        The input.
    name : str
        Parameter name used in error messages.
    ndim : int or tuple of int, optional
        Allowed number(s) of dimensions.
    dtype : numpy dtype, optional
        Convert to this dtype (after the checks on the original values).
    finite : bool
        Reject NaN and inf.
    allow_empty : bool
        Accept arrays with zero elements.
    nonconstant : bool
        Reject arrays whose values are all equal. A boolean array is then taken as a
        grey-value image and returned as float32 (0.0 / 1.0) unless ``dtype`` is given.

    Examples
    --------
    >>> as_array([[1, 2], [3, 4]], "image", ndim=2).shape
    (2, 2)
    """
    if x is None:
        raise TypeError(f"{name}: expected an array, got None")
    try:
        arr = np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise TypeError(f"{name}: cannot be converted to an array ({exc})") from exc
    if arr.dtype == object:
        raise TypeError(f"{name}: expected a numeric array, got dtype object")
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, numbers.Integral) else tuple(ndim)
        if arr.ndim not in allowed:
            want = " or ".join(f"{d}D" for d in allowed)
            raise ValueError(f"{name}: expected a {want} array, got {arr.ndim}D with shape {arr.shape}")
    if arr.size == 0 and not allow_empty:
        raise ValueError(f"{name}: array is empty (shape {arr.shape})")
    if finite and arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
        n_bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"{name}: contains {n_bad} NaN or infinite value(s)")
    if nonconstant and arr.size and arr.min() == arr.max():   # not np.ptp: it cannot subtract booleans
        raise ValueError(f"{name}: all values are equal ({arr.flat[0].item()!r}); the input carries no structure")
    if nonconstant and arr.dtype == bool and dtype is None:
        arr = arr.astype(np.float32)          # grey values 0/1 for the caller's arithmetic
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    return arr


def check_positive(value, name, *, allow_zero=False, integer=False):
    """Check that a scalar is positive (and optionally an integer); return it.

    Examples
    --------
    >>> check_positive(3, "n_angles", integer=True)
    3
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    if integer and not float(value).is_integer():
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    if not np.isfinite(value):
        raise ValueError(f"{name}: must be finite, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: must be {bound}, got {value!r}")
    return int(value) if integer else value


def check_choice(value, name, choices):
    """Check that ``value`` is one of ``choices``; return it.

    Examples
    --------
    >>> check_choice("fbp", "method", ("fbp", "sirt"))
    'fbp'
    """
    if value not in choices:
        raise ValueError(f"{name}: unknown value {value!r}; choose one of {', '.join(map(repr, choices))}")
    return value


def check_same_shape(a, b, name_a, name_b):
    """Raise if two arrays differ in shape."""
    if np.shape(a) != np.shape(b):
        raise ValueError(f"{name_b}: shape {np.shape(b)} differs from {name_a} shape {np.shape(a)}")


def check_label_out(out, shape, name="out"):
    """Check an output array for instance labels before any work; return it.

    ``out`` must have ``shape`` and an integer dtype that holds label ids: int32, int64,
    uint32 or uint64 (smaller integers would wrap around, floats cannot index). Any array
    with ``shape``, ``dtype`` and slice assignment is accepted (numpy, zarr, h5py).

    Examples
    --------
    >>> import numpy as np
    >>> check_label_out(np.zeros((2, 3), np.int32), (2, 3)).dtype
    dtype('int32')
    >>> check_label_out(np.zeros((2, 3), np.uint8), (2, 3))
    Traceback (most recent call last):
    ...
    TypeError: out: dtype uint8 cannot hold instance labels; use int32 or int64
    """
    if not hasattr(out, "shape") or not hasattr(out, "dtype"):
        raise TypeError(f"{name}: expected an array with shape and dtype (numpy, zarr, h5py), "
                        f"got {type(out).__name__}")
    shape = tuple(int(s) for s in shape)
    if tuple(int(s) for s in out.shape) != shape:
        raise ValueError(f"{name}: shape {tuple(int(s) for s in out.shape)} differs from the expected shape {shape}")
    dt = np.dtype(out.dtype)
    if dt.kind not in "iu" or dt.itemsize < 4:
        raise TypeError(f"{name}: dtype {dt} cannot hold instance labels; use int32 or int64")
    return out


def rng_from(seed):
    """Return a ``numpy.random.Generator`` from a seed, a Generator, or None."""
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)
