"""INFusion engine: implicit neural representation + diffusion prior MRI reconstruction.

torch is deliberately not pinned here: clusters bring their own CUDA build. The README's
install command pins the build used on the development machines.
"""
from pathlib import Path

from setuptools import find_namespace_packages, setup

README = Path(__file__).with_name("README.md")

setup(
    name="infusion-engine",
    version="0.1.0",
    description="Distributed INR + diffusion-prior reconstruction of multicoil MRI (INFusion)",
    long_description=README.read_text(encoding="utf-8") if README.exists() else "",
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.10",
    # namespace packages too: engine/assets/prior (weights and the Colin27 notice, no __init__.py)
    # is then a package of its own rather than a data folder setuptools warns about
    packages=find_namespace_packages(include=["engine", "engine.*", "kernels", "kernels.*", "launch"],
                                     exclude=["*.__pycache__"]),
    include_package_data=True,
    package_data={"engine.assets.prior": ["*"], "engine.assets.prior_stage2": ["*"]},
    license_files=["LICENSE"],
    # the launch/ scripts as commands (python launch/<name>.py works the same without installing)
    entry_points={"console_scripts": [
        "infusion-recon2d = launch.recon2d:cli",
        "infusion-recon3d = launch.recon3d:cli",
        "infusion-prepare = launch.prepare:main",
        "infusion-baseline = launch.baseline:main",
        "infusion-train-prior = launch.train_prior:main",
    ]},
    install_requires=[
        "torch",
        "torchvision",
        "numpy",
        "scipy",
        "h5py",
        "zarr>=3",
        "sigpy",
        "lpips",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "nibabel",
    ],
    extras_require={
        "dist": ["deepspeed", "mpi4py", "mpich"],
        "dev": ["pytest", "pytest-timeout", "ruff", "ome-zarr-models", "ome-zarr"],
    },
)
