"""Shared validators of tomoml_nb._validate."""
from __future__ import annotations

import numpy as np
import pytest

from tomoml_nb._validate import as_array, check_label_out


def test_nonconstant_bool_becomes_float_and_constant_is_named():
    a = as_array(np.array([[True, False], [False, False]]), "image", nonconstant=True)
    assert a.dtype == np.float32 and a.tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert as_array([True, False], "image", nonconstant=True, dtype=np.uint8).dtype == np.uint8
    assert as_array([True, False], "mask").dtype == bool          # masks keep their dtype
    with pytest.raises(ValueError, match=r"^image: all values are equal \(True\)"):
        as_array(np.ones((3, 3), bool), "image", nonconstant=True)
    with pytest.raises(ValueError, match=r"^image: all values are equal \(16\)"):   # plain int, no np.int64(16)
        as_array(np.full(4, 16, np.int64), "image", nonconstant=True)


def test_check_label_out():
    for dt in (np.int32, np.int64, np.uint32, np.uint64):
        out = np.zeros((2, 3), dt)
        assert check_label_out(out, (2, 3)) is out
    for dt in (np.int8, np.uint8, np.int16, np.uint16, np.float32, np.float64, bool, np.complex64):
        with pytest.raises(TypeError, match=r"^out: dtype .* cannot hold instance labels"):
            check_label_out(np.zeros((2, 3), dt), (2, 3))
    with pytest.raises(ValueError, match=r"^out: shape \(3, 2\) differs"):
        check_label_out(np.zeros((3, 2), np.int32), (2, 3))
    with pytest.raises(TypeError, match=r"^labels_out: expected an array"):
        check_label_out([[0, 0, 0]], (1, 3), "labels_out")
