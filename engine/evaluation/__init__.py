"""Comparison and scoring: classical baselines (zero-filled, CG-SENSE, L1-wavelet 2D and 3D),
metrics (NRMSE, PSNR, SSIM) and the comparison figures (report)."""
