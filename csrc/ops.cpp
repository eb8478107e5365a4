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
  // The same forward also returning the group statistics mean, rstd (N, num_groups) fp32 that the
  // backward uses (called when autograd records).
  m.def(
      "group_norm_scale_shift_stats(Tensor x, int num_groups, Tensor? weight, Tensor? bias, "
      "Tensor? scale, Tensor? shift, float eps, bool silu) -> (Tensor, Tensor, Tensor)");
  // Its backward from grad_y (like x) and the saved statistics: (dx, dweight, dbias, dscale,
  // dshift), each in its input's dtype; an empty tensor where output_mask is false or the
  // parameter is None.
  m.def(
      "group_norm_scale_shift_backward(Tensor grad_y, Tensor x, int num_groups, Tensor? weight, "
      "Tensor? bias, Tensor? scale, Tensor? shift, Tensor mean, Tensor rstd, bool silu, "
      "bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // ADM self-attention on the qkv conv output: qkv (B, 3*C, T) -> (B, C, T).
  // legacy=True: per head [q, k, v] blocks (QKVAttentionLegacy); False: [q | k | v] (QKVAttention).
  m.def("attention(Tensor qkv, int num_heads, bool legacy) -> Tensor");
  // The forward under autograd: (out, lse) with lse (B, heads, T) float32 the logsumexp of each
  // query's scaled logits, lse[b, h, t] = log sum_s exp(q_t . k_s / sqrt(ch)).
  m.def("attention_lse(Tensor qkv, int num_heads, bool legacy) -> (Tensor, Tensor)");
  // Its backward (flash-attention backward, P recomputed from lse): grad_out, out (B, C, T),
  // lse as above -> grad_qkv (B, 3*C, T) contiguous in qkv's dtype, in qkv's layout.
  m.def(
      "attention_backward(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, int num_heads, "
      "bool legacy) -> Tensor");
  // A 3x3 convolution (stride 1, padding 1) of a channels_last float32 CPU image x (N, Cin, H, W)
  // by Winograd's F(4x4, 3x3) (csrc/cpu/winograd_conv.cpp): weight is the transformed (36, Cin,
  // Cout) float32 weight of ddpm_fast.fast_layers.winograd_weight (or, with AVX-512, its (36,
  // Cout / 16, Cin, 16) column panels, fast_layers.winograd_panels), bias (Cout,), add (N, Cout, H,
  // W) channels_last added to the output (a ResBlock's residual). Returns (N, Cout, H, W)
  // channels_last. Equal to the direct convolution up to float rounding (larger: see the kernel).
  m.def("winograd_conv3x3(Tensor x, Tensor weight, Tensor? bias, Tensor? add) -> Tensor");
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
  // Its backward: from the incoming gradients of x_prev and pred_x0 (either may be None: zero) and
  // the forward's arguments (the step is recomputed, in-kernel noise redrawn), returns
  // (grad_x, grad_model_output (every channel), grad_guidance_grad (empty without one)), each in
  // its input's dtype. The noise and coef are constants.
  m.def(
      "diffusion_step_backward(Tensor? grad_x_prev, Tensor? grad_x0, Tensor x, Tensor model_output, "
      "Tensor coef, Tensor? noise, Tensor? seed, Tensor? step, Tensor? guidance_grad, int method, "
      "int prediction, int variance, bool clip_denoised, int noise_mode, int project_noise, "
      "float? clip_lo, float? clip_hi, bool eps_from_x0) -> (Tensor, Tensor, Tensor)");
}
