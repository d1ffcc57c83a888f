"""Image-quality metrics with the fastMRI definitions, optionally restricted to a support mask.

Inputs are NumPy arrays `(ny, nx)` (any leading dims are allowed except for SSIM, which is 2D),
real or complex. By default the MAGNITUDE images are compared, as fastMRI does; `nrmse_percent`
can compare the complex images instead (`complex_error=True`), which also penalises phase errors.

The reconstruction is never rescaled to the reference: a method that gets the intensity scale
wrong is charged for it. This is the honest choice and the fastMRI one (its `nmse`, `psnr` and
`ssim` in fastmri/evaluate.py take the images as they are).

Definitions (x = reconstruction, r = reference, both restricted to the support S when given):
- NRMSE (%)  = 100 * ||x - r||_2 / ||r||_2                       (fastMRI: sqrt of `nmse`)
- PSNR (dB)  = 20 log10(max r) - 10 log10(mean((x - r)^2))       (fastMRI `psnr`, data_range = max r)
- SSIM       = mean of the SSIM map of Wang et al. 2004 with a 7 x 7 uniform window, K1 = 0.01,
               K2 = 0.03, sample covariance (N / (N - 1)), data_range = max r, averaged over the
               pixels whose window lies inside the image (fastMRI `ssim` = scikit-image's
               `structural_similarity` defaults). Implemented with scipy.ndimage.uniform_filter so
               that scikit-image is not a dependency; tests compare it with a direct loop.
"""
from __future__ import annotations

import numpy as np
from scipy.ndimage import uniform_filter

SSIM_WINDOW = 7  # scikit-image default, used by fastMRI
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _as_images(x: np.ndarray, ref: np.ndarray, magnitude: bool = True) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x)
    ref = np.asarray(ref)
    if x.shape != ref.shape:
        raise ValueError(f"reconstruction shape {x.shape} differs from reference shape {ref.shape}")
    if magnitude:
        return np.abs(x).astype(np.float64), np.abs(ref).astype(np.float64)
    return x.astype(np.complex128), ref.astype(np.complex128)


def _support_bool(support: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    if support is None:
        return None
    support = np.asarray(support)
    if support.shape != shape:
        raise ValueError(f"support mask shape {support.shape} differs from image shape {shape}")
    support = support.astype(bool)
    if not support.any():
        raise ValueError("support mask is empty")
    return support


def nrmse_percent(
    x: np.ndarray, ref: np.ndarray, support: np.ndarray | None = None, complex_error: bool = False
) -> float:
    """100 * ||x - ref|| / ||ref|| over the support (all pixels when `support` is None).

    Args:
        x, ref: images of the same shape, real or complex.
        support: boolean-like mask of the same shape, or None.
        complex_error: compare complex values instead of magnitudes.
    """
    x, ref = _as_images(x, ref, magnitude=not complex_error)
    inside = _support_bool(support, ref.shape)
    if inside is not None:
        x, ref = x[inside], ref[inside]
    ref_norm = np.linalg.norm(ref)
    if ref_norm == 0:
        raise ValueError("reference is zero on the support: NRMSE is undefined")
    return float(100.0 * np.linalg.norm(x - ref) / ref_norm)


def psnr_db(x: np.ndarray, ref: np.ndarray, support: np.ndarray | None = None) -> float:
    """fastMRI PSNR of the magnitudes: 20 log10(max ref) - 10 log10(MSE), over the support.

    Returns inf for identical images.
    """
    x, ref = _as_images(x, ref)
    inside = _support_bool(support, ref.shape)
    if inside is not None:
        x, ref = x[inside], ref[inside]
    mse = np.mean((x - ref) ** 2)
    if mse == 0:
        return float("inf")
    return float(20.0 * np.log10(ref.max()) - 10.0 * np.log10(mse))


def ssim_map(x: np.ndarray, ref: np.ndarray, data_range: float | None = None) -> np.ndarray:
    """Per-pixel SSIM of two real 2D images `(ny, nx)` (float64), before cropping and averaging.

    Local means and (sample) covariances over a 7 x 7 window, Wang et al. 2004 eq. 13.
    """
    x = np.asarray(x, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if ref.ndim != 2 or x.shape != ref.shape:
        raise ValueError(f"SSIM needs two 2D images of one shape, got {x.shape} and {ref.shape}")
    if min(ref.shape) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW} x {SSIM_WINDOW}, got {ref.shape}")
    if data_range is None:
        data_range = float(ref.max())
    n_window = SSIM_WINDOW**2
    sample_cov = n_window / (n_window - 1)
    mean_x = uniform_filter(x, SSIM_WINDOW)
    mean_r = uniform_filter(ref, SSIM_WINDOW)
    var_x = sample_cov * (uniform_filter(x * x, SSIM_WINDOW) - mean_x**2)
    var_r = sample_cov * (uniform_filter(ref * ref, SSIM_WINDOW) - mean_r**2)
    cov_xr = sample_cov * (uniform_filter(x * ref, SSIM_WINDOW) - mean_x * mean_r)
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    numerator = (2 * mean_x * mean_r + c1) * (2 * cov_xr + c2)
    denominator = (mean_x**2 + mean_r**2 + c1) * (var_x + var_r + c2)
    return numerator / denominator


def ssim(
    x: np.ndarray,
    ref: np.ndarray,
    data_range: float | None = None,
    support: np.ndarray | None = None,
) -> float:
    """fastMRI SSIM of the magnitude images `(ny, nx)`.

    The map is averaged over the pixels at least 3 pixels from the border (where the 7 x 7 window
    fits), as scikit-image does. With a `support`, both images are set to zero outside it (so what
    a method puts there does not count) and the map is averaged over the support pixels only.

    Args:
        x, ref: 2D images, real or complex.
        data_range: intensity range; default max |ref| (inside the support when given).
        support: boolean-like mask `(ny, nx)` or None.
    """
    x, ref = _as_images(x, ref)
    inside = _support_bool(support, ref.shape)
    if inside is not None:
        x, ref = x * inside, ref * inside
    if data_range is None:
        data_range = float(ref.max())
    if data_range <= 0:
        raise ValueError("SSIM data_range must be positive (is the reference zero?)")
    local = ssim_map(x, ref, data_range)
    pad = (SSIM_WINDOW - 1) // 2
    valid = np.zeros(ref.shape, dtype=bool)
    valid[pad:-pad, pad:-pad] = True
    if inside is not None:
        valid &= inside
        if not valid.any():
            raise ValueError("support mask has no pixel away from the image border")
    return float(local[valid].mean())


def all_metrics(
    x: np.ndarray, ref: np.ndarray, support: np.ndarray | None = None
) -> dict[str, float]:
    """`{"nrmse_percent", "psnr_db", "ssim"}` of the magnitude images over the support."""
    return {
        "nrmse_percent": nrmse_percent(x, ref, support),
        "psnr_db": psnr_db(x, ref, support),
        "ssim": ssim(x, ref, support=support),
    }
