"""Compile every Triton kernel for an H100 (sm_90) on the CPU: no GPU is needed to run Triton's
front end, LLVM and ptxas, and this catches what the interpreter cannot (compiled-mode typing of
the unrolled Stockham stages, layouts of reshape/permute/split/join, register allocation).

Compiles into a temporary cache directory so each run really compiles (about 10 s in all).
"""

from __future__ import annotations

import pytest

from kernels.runtime import kernel_module, triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

POINTER, INT, FLOAT = "*fp32", "i32", "fp32"


def _kernels():
    elementwise = kernel_module("elementwise")
    fft = kernel_module("stockham_fft")
    fused = kernel_module("fused_fft")
    plane = {"HEIGHT": 256, "WIDTH": 256}
    return [
        (elementwise._coil_expand_modulate_kernel, {"BLOCK": elementwise.ELEMENTWISE_BLOCK}, 4),
        (
            elementwise._masked_residual_kernel,
            {"HAS_MEASURED": True, "PREMODULATE": True, "COMPUTE_LOSS": True, "BLOCK": 1024},
            4,
        ),
        (elementwise._coil_combine_modulate_kernel, {"BLOCK": elementwise.COMBINE_BLOCK}, 4),
        (fft._fft_axis_kernel, {"N": 512, "LOG2N": 9, "ROWS": 4, "INVERSE": True}, 8),
        (fused._expand_fft_rows_kernel, {**plane, "LOG2NX": 8, "ROWS": 8}, 8),
        (
            fused._fft_columns_residual_kernel,
            {**plane, "LOG2NY": 8, "COLS": 8, "INVERSE_COLUMNS": True},
            8,
        ),
        (fused._ifft_rows_combine_kernel, {**plane, "LOG2NX": 8, "ROWS": 1}, 4),
    ]


def _signature(kernel, constexprs):
    """Types from the argument names: *_ptr are float32 pointers, sign/scale/norm floats."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = POINTER
        elif name in ("sign", "scale", "norm"):
            signature[name] = FLOAT
        else:
            signature[name] = INT
    return signature


def test_all_kernels_compile_for_sm90(monkeypatch, tmp_path):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    kernels = _kernels()
    if any(isinstance(kernel, InterpretedFunction) for kernel, _, _ in kernels):
        pytest.skip("TRITON_INTERPRET is set for the whole process: kernels are interpreted")
    for kernel, constexprs, num_warps in kernels:
        source = ASTSource(
            fn=kernel, signature=_signature(kernel, constexprs), constexprs=constexprs
        )
        compiled = triton.compile(
            source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}
        )
        assert ".entry" in compiled.asm["ptx"], kernel.__name__
        assert len(compiled.asm["cubin"]) > 0, kernel.__name__
