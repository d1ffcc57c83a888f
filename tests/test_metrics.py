"""Metrics against hand-computed values and a direct (loop) SSIM."""
import numpy as np
import pytest

from engine.evaluation.metrics import all_metrics, nrmse_percent, psnr_db, ssim

X = np.array([[1.0, 2.0], [3.0, 4.0]])
REF = np.array([[1.0, 2.0], [3.0, 5.0]])


def test_nrmse_hand_computed():
    # ||x - ref|| = 1, ||ref|| = sqrt(1 + 4 + 9 + 25)
    assert nrmse_percent(X, REF) == pytest.approx(100 / np.sqrt(39))


def test_psnr_hand_computed():
    # 20 log10(5) - 10 log10(1 / 4) = 10 log10(100)
    assert psnr_db(X, REF) == pytest.approx(20.0)


def test_support_excludes_pixels():
    support = np.array([[1, 1], [1, 0]])
    assert nrmse_percent(X, REF, support) == 0.0
    assert psnr_db(X, REF, support) == float("inf")
    # only the differing pixel: ||1|| / ||5||
    assert nrmse_percent(X, REF, 1 - support) == pytest.approx(20.0)


def test_magnitude_by_default_complex_on_request():
    ref = np.array([[1.0, 2.0], [3.0, 5.0]], dtype=np.complex64)
    x = 1j * ref
    assert nrmse_percent(x, ref) == pytest.approx(0.0)
    # |i - 1| = sqrt(2)
    assert nrmse_percent(x, ref, complex_error=True) == pytest.approx(100 * np.sqrt(2), rel=1e-6)


def test_identical_images():
    rng = np.random.default_rng(0)
    image = rng.random((16, 16)) + 1j * rng.random((16, 16))
    scores = all_metrics(image, image, np.ones((16, 16)))
    assert scores["nrmse_percent"] == 0.0
    assert scores["psnr_db"] == float("inf")
    assert scores["ssim"] == pytest.approx(1.0, abs=1e-12)


def test_ssim_constant_images_hand_computed():
    # zero variances: SSIM = (2ab + C1) / (a^2 + b^2 + C1), C1 = (0.01 * max ref)^2
    ref = np.full((9, 9), 1.0)
    x = np.full((9, 9), 0.5)
    c1 = 1e-4
    assert ssim(x, ref) == pytest.approx((1.0 + c1) / (1.25 + c1), rel=1e-9)


def naive_ssim(x, ref, data_range, win=7):
    """Wang et al. 2004 window by window, sample statistics, crop the border: the fastMRI / skimage SSIM."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    half = win // 2
    values = []
    for i in range(half, x.shape[0] - half):
        for j in range(half, x.shape[1] - half):
            a = x[i - half : i + half + 1, j - half : j + half + 1].ravel()
            b = ref[i - half : i + half + 1, j - half : j + half + 1].ravel()
            cov = np.cov(a, b, ddof=1)
            values.append(
                (2 * a.mean() * b.mean() + c1) * (2 * cov[0, 1] + c2)
                / ((a.mean() ** 2 + b.mean() ** 2 + c1) * (cov[0, 0] + cov[1, 1] + c2))
            )
    return float(np.mean(values))


def test_ssim_matches_direct_implementation():
    rng = np.random.default_rng(1)
    ref = rng.random((13, 17))
    x = ref + 0.2 * rng.standard_normal(ref.shape)
    assert ssim(x, ref) == pytest.approx(naive_ssim(np.abs(x), ref, ref.max()), rel=1e-10)
    assert ssim(x, ref, data_range=2.0) == pytest.approx(naive_ssim(np.abs(x), ref, 2.0), rel=1e-10)


def test_ssim_support_ignores_outside():
    rng = np.random.default_rng(2)
    ref = rng.random((20, 20))
    support = np.zeros((20, 20), bool)
    support[4:16, 4:16] = True
    x = ref.copy()
    x[~support] = 100.0  # garbage outside the support must not count
    assert ssim(x, ref, support=support) == pytest.approx(1.0, abs=1e-12)
    assert ssim(x, ref) < 0.5


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="shape"):
        nrmse_percent(np.ones((2, 2)), np.ones((2, 3)))
    with pytest.raises(ValueError, match="support"):
        psnr_db(X, REF, np.ones((3, 3)))
    with pytest.raises(ValueError, match="empty"):
        nrmse_percent(X, REF, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="at least"):
        ssim(X, REF)
