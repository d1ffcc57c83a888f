"""Data I/O: readers into one in-memory layout, the hybrid-space Zarr input store, OME-Zarr output.

Layouts are documented in engine/io/data.py and docs/ARCHITECTURE.md. Every refusal of a file is
an `InputError` (a ValueError) with a one-line message naming the file, the array and the problem.
"""
from engine.io.bart import read_bart, read_cfl, write_cfl
from engine.io.data import MagnitudeVolume, MulticoilData, derive_mask
from engine.io.errors import InputError
from engine.io.fastmri import read_fastmri
from engine.io.hybrid_store import HybridSlab, HybridStore, prepare_hybrid_store, to_hybrid
from engine.io.matlab import read_mat73
from engine.io.nifti import read_nifti
from engine.io.npy import read_npy
from engine.io.ome_zarr import OutputVolume, VolumeWriter, open_volume
from engine.io.prepare import prepare_case
from engine.io.readers import read_input
from engine.io.skmtea import read_skmtea
from engine.io.slabs import partition_readout

__all__ = [
    "HybridSlab",
    "HybridStore",
    "InputError",
    "MagnitudeVolume",
    "MulticoilData",
    "OutputVolume",
    "VolumeWriter",
    "derive_mask",
    "open_volume",
    "partition_readout",
    "prepare_case",
    "prepare_hybrid_store",
    "read_bart",
    "read_cfl",
    "read_fastmri",
    "read_input",
    "read_mat73",
    "read_nifti",
    "read_npy",
    "read_skmtea",
    "to_hybrid",
    "write_cfl",
]
