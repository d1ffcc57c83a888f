"""Where Triton kernels may run, and how to run them under the Triton interpreter on CPU.

Triton decides at decoration time (`@triton.jit`) whether a function is compiled for the GPU or
run by its NumPy interpreter (`TRITON_INTERPRET=1`), and that holds for triton's own standard
library (tl.sum, tl.cdiv, ...) too: interpreted kernels only work when `triton` itself was
imported with the variable set, and while it stays set (constexpr functions read it per call).
`triton_interpreter()` therefore swaps in a freshly imported, interpreted triton (and fresh
kernel modules of this package) for the duration of a `with` block and puts the previous modules
and environment back afterwards, so nothing leaks into code that runs after it. The CPU tests
wrap each kernel test module in it; the kernel modules are imported lazily everywhere else.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from types import ModuleType

import torch

# The modules that define @triton.jit kernels (each imports triton at the top), in import order.
KERNEL_MODULES = ("kernels.elementwise", "kernels.stockham_fft", "kernels.fused_fft")


def triton_available() -> bool:
    """True when the `triton` package can be imported (CUDA builds of torch ship it)."""
    return importlib.util.find_spec("triton") is not None


def kernel_module(name: str) -> ModuleType:
    """Import and return `kernels.<name>`, a module of Triton kernels (compiled or interpreted,
    whichever mode the current triton was imported in)."""
    full_name = name if name.startswith("kernels.") else f"kernels.{name}"
    if full_name not in KERNEL_MODULES:
        raise ValueError(f"unknown kernel module {full_name!r}; expected one of {KERNEL_MODULES}")
    if not triton_available():
        raise ImportError("the Triton backend needs the `triton` package (pip install triton)")
    return importlib.import_module(full_name)


def _swappable_modules() -> list[str]:
    """Python modules of triton (not its C extension, which cannot be imported twice) and the
    kernel modules of this package, as currently imported."""
    triton_modules = [
        name
        for name in sys.modules
        if (name == "triton" or name.startswith("triton.")) and not name.startswith("triton._C")
    ]
    return triton_modules + [name for name in KERNEL_MODULES if name in sys.modules]


@contextlib.contextmanager
def triton_interpreter() -> Iterator[None]:
    """Inside the block, Triton kernels of this package run interpreted on CPU tensors.

    Sets TRITON_INTERPRET=1, re-imports triton's Python modules and the kernel modules in
    interpreter mode, and on exit restores the previous modules (or their absence) and the
    previous value of TRITON_INTERPRET. Slow (NumPy per program): small shapes only.
    """
    import kernels

    previous_env = os.environ.get("TRITON_INTERPRET")
    saved = {name: sys.modules.pop(name) for name in _swappable_modules()}
    saved_attributes = {name: getattr(kernels, name.split(".")[1], None) for name in KERNEL_MODULES}
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        importlib.import_module("triton.language")
        # The launcher imports gluon lazily at the first call; import it now, in interpreter mode.
        importlib.import_module("triton.experimental.gluon")
        yield
    finally:
        for name in _swappable_modules():
            del sys.modules[name]
        sys.modules.update(saved)
        for name, attribute in saved_attributes.items():
            short_name = name.split(".")[1]
            if attribute is None:
                kernels.__dict__.pop(short_name, None)
            else:
                setattr(kernels, short_name, attribute)
        if previous_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous_env


def check_launchable(kernel: object, tensors: dict[str, torch.Tensor]) -> None:
    """Raise a clear error when `kernel` cannot run on these tensors.

    Compiled kernels need CUDA tensors; interpreted kernels (inside `triton_interpreter()`) run on
    CPU tensors.
    """
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction):
        return
    for name, tensor in tensors.items():
        if tensor.device.type != "cuda":
            raise RuntimeError(
                f"Triton kernel got `{name}` on {tensor.device}: compiled Triton kernels need CUDA "
                "tensors (use backend='torch' on CPU, or run inside "
                "kernels.runtime.triton_interpreter() to interpret them)"
            )
