"""ddpm_fast: fused kernels, a lean ADM U-Net and fast samplers for guided-diffusion models."""
from . import ops, reference
from ._registry import BackendStatus, backends
from .pretrained import load_pretrained
from .diffusion import Diffusion
from .flags import from_flags
from .unet import UNet

__version__ = "0.1.0"

__all__ = ["BackendStatus", "backends", "load_pretrained", "ops", "reference", "__version__"]
