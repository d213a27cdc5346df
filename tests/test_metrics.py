from __future__ import annotations

import numpy as np
import pytest

from tomoml_nb import metrics
from tomoml_nb._validate import as_array, check_choice, check_positive


def test_psnr_rmse_ssim_correlation():
    rng = np.random.default_rng(0)
    ref = rng.random((32, 32))
    noisy = ref + 0.1 * rng.standard_normal(ref.shape)
    assert metrics.rmse(ref, ref) == 0
    assert metrics.psnr(ref, ref) == float("inf")
    assert 15 < metrics.psnr(noisy, ref) < 25
    assert metrics.psnr(ref + 0.01, ref) > metrics.psnr(noisy, ref)
    assert metrics.ssim(ref, ref) == pytest.approx(1.0)
    assert metrics.ssim(noisy, ref) < 0.95
    assert metrics.correlation(ref, 2 * ref + 1) == pytest.approx(1.0)
    mask = np.zeros_like(ref, bool)
    mask[:4] = True
    assert metrics.rmse(noisy, ref, mask=mask) > 0


def test_segmentation_metrics():
    truth = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    c = metrics.confusion_matrix(pred, truth)
    assert c.sum() == 6 and c[0, 1] == 1 and c[2, 0] == 1
    iou = metrics.iou_per_class(pred, truth)
    np.testing.assert_allclose(iou, [1 / 3, 2 / 3, 1 / 2])
    dice = metrics.dice_per_class(pred, truth, n_classes=4)
    assert np.isnan(dice[3]) and dice[1] == pytest.approx(0.8)


def test_metric_errors_name_the_parameter():
    with pytest.raises(ValueError, match="reference: shape"):
        metrics.rmse(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="estimate: contains 1 NaN"):
        metrics.psnr([np.nan, 1.0], [0.0, 1.0])
    with pytest.raises(ValueError, match="data_range"):
        metrics.psnr([1.0, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="n_classes"):
        metrics.iou_per_class([0, 3], [0, 1], n_classes=2)
    with pytest.raises(ValueError, match="pred: labels must be >= 0"):
        metrics.confusion_matrix([-1, 0], [0, 0])


def test_validators():
    with pytest.raises(ValueError, match="volume: expected a 3D array, got 2D"):
        as_array(np.zeros((2, 2)), "volume", ndim=3)
    with pytest.raises(ValueError, match="x: array is empty"):
        as_array([], "x")
    with pytest.raises(TypeError, match="x: expected a numeric array"):
        as_array(["a"], "x")
    with pytest.raises(ValueError, match="x: all values are equal"):
        as_array(np.ones(4), "x", nonconstant=True)
    with pytest.raises(ValueError, match="flux: must be > 0"):
        check_positive(0, "flux")
    with pytest.raises(ValueError, match="n: expected an integer"):
        check_positive(2.5, "n", integer=True)
    with pytest.raises(ValueError, match="method: unknown value 'x'; choose one of 'a', 'b'"):
        check_choice("x", "method", ("a", "b"))
