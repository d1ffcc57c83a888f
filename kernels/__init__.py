"""Fused data-consistency kernels (Triton on CUDA) beside their pure-torch references.

Public entry points (kernels.sense; triton is imported only when a Triton path runs):
    dc_loss(image, maps, mask, kspace, backend="auto", fft="torch") -> 0-dim loss
    sense_forward(image, maps, mask, ...) -> masked centred k-space
    sense_adjoint(kspace, maps, mask, ...) -> image
Modules: reference (torch references of every kernel), elementwise (kernels 1-3),
stockham_fft (kernel 4), fused_fft (FFT fused with 1-3), runtime (device / interpreter plumbing).
See kernels/README.md for the design, the centring identity and where cuFFT stays.
"""

from kernels.sense import dc_loss, sense_adjoint, sense_forward

__all__ = ["dc_loss", "sense_adjoint", "sense_forward"]
