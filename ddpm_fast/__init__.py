"""ddpm_fast: fused kernels, a lean ADM U-Net and fast samplers for guided-diffusion models."""
from . import ops, reference
from ._registry import BackendStatus, backends
from .classifier import EncoderUNet, classifier_guidance
from .diffusion import Diffusion
from .flags import classifier_from_flags, from_flags
from .from_diffusers import from_diffusers
from .graphs import clear_cache as clear_graph_cache
from .images import save_grid, to_images
from .pretrained import load_pretrained
from .restore import restore
from .sample import sample
from .unet import UNet

__version__ = "0.1.0"

__all__ = ["BackendStatus", "Diffusion", "EncoderUNet", "UNet", "backends", "classifier_from_flags",
           "classifier_guidance", "clear_graph_cache", "from_diffusers", "from_flags", "load_pretrained", "ops", "reference", "restore", "sample", "save_grid", "to_images",
           "__version__"]
