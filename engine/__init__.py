"""INFusion engine: INR + diffusion-prior reconstruction of undersampled multicoil MRI."""

__version__ = "0.1.0"
