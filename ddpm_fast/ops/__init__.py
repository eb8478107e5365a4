"""The public fused ops. Each checks its arguments (errors name the argument), picks a backend
(`backend="auto"|"torch"|"cpu"|"cuda"|"triton"`) and calls the kernel registered with
torch.library (ddpm_fast::<op>) or the pure-PyTorch reference of ddpm_fast.reference."""
from .attention import attention
from .diffusion_step import diffusion_step
from .group_norm_scale_shift import group_norm_scale_shift

__all__ = ["attention", "diffusion_step", "group_norm_scale_shift"]
