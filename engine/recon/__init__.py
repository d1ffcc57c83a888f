"""Reconstruction: the 2D fit and job (fit2d, job2d, selection2d), the 3D step, run and config
(fit3d, job3d, config3d, selection3d) and the readout shards with their slice streams (slices)."""
