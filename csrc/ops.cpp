// The schemas of every ddpm_fast op, in one place. Each backend registers its kernels for these
// names with TORCH_LIBRARY_IMPL in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu; the fake (meta)
// implementations used by torch.compile and CUDA-graph capture live beside the op's Python
// wrapper in ddpm_fast/ops/<op>.py; the pure-PyTorch definition lives in ddpm_fast/reference.
#include <torch/library.h>

TORCH_LIBRARY(ddpm_fast, m) {
  // AdaGN: GroupNorm(x) [* weight + bias] [* (1 + scale) + shift] [-> SiLU]; x (N, C, *spatial),
  // weight/bias (C,), scale/shift (N, C). Statistics and arithmetic in fp32, output in x's dtype.
  m.def(
      "group_norm_scale_shift(Tensor x, int num_groups, Tensor? weight, Tensor? bias, "
      "Tensor? scale, Tensor? shift, float eps, bool silu) -> Tensor");
  // ADM self-attention on the qkv conv output: qkv (B, 3*C, T) -> (B, C, T).
  // legacy=True: per head [q, k, v] blocks (QKVAttentionLegacy); False: [q | k | v] (QKVAttention).
  m.def("attention(Tensor qkv, int num_heads, bool legacy) -> Tensor");
  // One fused reverse diffusion step (ddpm_fast/reference.py diffusion_step is its definition):
  // coef (B, NUM_COEFS) float32 columns and the int option codes are in ddpm_fast/step_layout.py,
  // mirrored in csrc/include/diffusion_step_math.h. Noise: `noise` given, else drawn in-kernel
  // from counter-based Philox keyed by seed (B,) int64 and the step id `step` (0-dim int64).
  // Returns (x_prev, pred_x0); pred_x0 is an empty tensor when return_x0 is false.
  m.def(
      "diffusion_step(Tensor x, Tensor model_output, Tensor coef, Tensor? noise, Tensor? seed, "
      "Tensor? step, Tensor? guidance_grad, int method, int prediction, int variance, "
      "bool clip_denoised, int noise_mode, int project_noise, float? clip_lo, float? clip_hi, "
      "bool eps_from_x0, bool return_x0) -> (Tensor, Tensor)");
}
