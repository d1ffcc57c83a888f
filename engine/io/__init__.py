"""Data I/O: readers into one in-memory layout, the hybrid-space Zarr input store, OME-Zarr output.

Layouts are documented in engine/io/data.py and docs/ARCHITECTURE.md. Every refusal of a file is
an `InputError` (a ValueError) with a one-line message naming the file, the array and the problem.
"""
import importlib

# Exports load on first use (PEP 562): `from engine.io.ome_zarr import open_volume` then costs a Zarr
# import, not torch's (the SLURM script's completion check runs it at the end of every job step).
_EXPORTS = {
    "engine.io.bart": ("read_bart", "read_cfl", "write_cfl"),
    "engine.io.data": ("MagnitudeVolume", "MulticoilData", "derive_mask"),
    "engine.io.errors": ("InputError",),
    "engine.io.fastmri": ("read_fastmri",),
    "engine.io.hybrid_store": ("HybridSlab", "HybridStore", "prepare_hybrid_store", "to_hybrid"),
    "engine.io.matlab": ("read_mat73",),
    "engine.io.nifti": ("read_nifti",),
    "engine.io.npy": ("read_npy",),
    "engine.io.ome_zarr": ("OutputVolume", "VolumeWriter", "open_volume"),
    "engine.io.prepare": ("prepare_case",),
    "engine.io.readers": ("read_input",),
    "engine.io.skmtea": ("read_skmtea",),
    "engine.io.slabs": ("partition_readout",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = [name for names in _EXPORTS.values() for name in names]


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
