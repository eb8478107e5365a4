"""Triton kernels of ddpm_fast, installed as the subpackage ddpm_fast.kernels.

One module per op; each registers its kernel launcher with torch.library. Importing a module
needs triton; ddpm_fast imports them lazily, only when the triton backend is chosen."""
