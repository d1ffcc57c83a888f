"""Fused data-consistency kernels (Triton on CUDA) beside their pure-torch references."""
