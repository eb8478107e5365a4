// CPU kernel of ddpm_fast::attention_backward: the flash-attention backward of ADM self-attention,
// as batched fp32 GEMMs over (samples x heads), for both qkv layouts.
//
// Per (sample, head), with q, k, v (ch, T) the head's slices of qkv, s = 1/sqrt(ch), the forward
//   Z = s q^T k (T x T, Z[t, u] = s q_t . k_u),  P = softmax_u(Z) = exp(Z - lse),  O = v P^T (ch x T)
// saved lse (the per-query logsumexp of Z, from ddpm_fast::attention_lse) and O. Given dO (ch, T):
//   dV = dO P                      (dV[c, u] = sum_t dO[c, t] P[t, u])
//   dP = dO^T v                    (dP[t, u] = sum_c dO[c, t] v[c, u])
//   dZ = P * (dP - delta),  delta[t] = sum_u P[t, u] dP[t, u] = sum_c dO[c, t] O[c, t]
//        (the softmax Jacobian dZ[t, u] = P[t, u] (dP[t, u] - sum_u' P[t, u'] dP[t, u']); delta
//        from dO and O costs O(C T) instead of a (T x T) reduction)
//   dq = s k dZ^T                  (dq[c, t] = s sum_u k[c, u] dZ[t, u])
//   dk = s q dZ                    (dk[c, u] = s sum_t q[c, t] dZ[t, u])
// P is recomputed from q, k and lse (one GEMM and one exp, no row reductions). Arithmetic in fp32
// for every dtype; dq, dk, dv are written by the GEMMs straight into the gradient's (B, 3*C, T)
// layout through the same per-head view the forward reads qkv with (each batched GEMM writes a
// contiguous (samples*heads, ch, T) buffer, scaled into the view in one O(ch T) pass).
#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <cmath>

#include "attention_host.h"
#include "attention_math.h"

namespace {

namespace am = ddpm_fast::attention;

// dst (nb, heads, ch, T), a strided view of the fp32 gradient  <-  alpha * (a @ b), a and b
// batched over the nb * heads (sample, head) pairs. The batched GEMM writes a contiguous buffer
// (BLAS's batched call; on a strided output ATen loops over single GEMMs, measured ~2x slower),
// which one O(ch * T) pass scales into the gradient's layout.
void bmm_into(const at::Tensor& dst, const at::Tensor& a, const at::Tensor& b, double alpha) {
  const at::Tensor product = at::bmm(a, b).view(dst.sizes());
  if (alpha == 1.0) {
    dst.copy_(product);
  } else {
    at::mul_out(const_cast<at::Tensor&>(dst), product, alpha);
  }
}

// heads / grad_heads: (3, B, heads, ch, T) fp32 views of qkv and of its gradient; grad_out, out:
// (B, heads, ch, T) fp32; lse: (B, heads, T) fp32.
void attention_backward_gemm(const at::Tensor& heads, const at::Tensor& grad_heads, const at::Tensor& grad_out,
                             const at::Tensor& out, const at::Tensor& lse, double scale) {
  const int64_t batch = heads.size(1), num_heads = heads.size(2), ch = heads.size(3),
                length = heads.size(4);
  // delta[b, h, t] = sum_c dO[c, t] O[c, t], for all samples at once (O(B C T))
  const at::Tensor delta = (grad_out * out).sum(2);
  const int64_t chunk = am::samples_per_chunk(batch, num_heads, length);
  for (int64_t b0 = 0; b0 < batch; b0 += chunk) {
    const int64_t nb = std::min(chunk, batch - b0);
    const int64_t bh = nb * num_heads;
    const at::Tensor q = am::head_chunk(heads, 0, b0, nb);
    const at::Tensor k = am::head_chunk(heads, 1, b0, nb);
    const at::Tensor v = am::head_chunk(heads, 2, b0, nb);
    const at::Tensor d_o = grad_out.narrow(0, b0, nb).reshape({bh, ch, length});
    const at::Tensor lse_b = lse.narrow(0, b0, nb).reshape({bh, length, 1});
    const at::Tensor delta_b = delta.narrow(0, b0, nb).reshape({bh, length, 1});
    const at::Tensor q_scaled = q * scale;  // (bh, ch, T): s folded into q, not into (T x T) tiles
    // P[t, u] = exp(s q_t . k_u - lse[t])
    at::Tensor p = at::bmm(q_scaled.transpose(1, 2), k);
    p.sub_(lse_b).exp_();
    bmm_into(grad_heads[2].narrow(0, b0, nb), d_o, p, 1.0);  // dV = dO P
    // dZ = P * (dO^T v - delta), in the dP buffer
    at::Tensor dz = at::bmm(d_o.transpose(1, 2), v);
    dz.sub_(delta_b).mul_(p);
    bmm_into(grad_heads[0].narrow(0, b0, nb), k, dz.transpose(1, 2), scale);  // dq = s k dZ^T
    bmm_into(grad_heads[1].narrow(0, b0, nb), q_scaled, dz, 1.0);            // dk = s q dZ
  }
}

at::Tensor attention_backward_cpu(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& out,
                                  const at::Tensor& lse, int64_t num_heads, bool legacy) {
  const int64_t ch = am::check_qkv(qkv.sizes(), qkv.scalar_type(), num_heads);
  const int64_t batch = qkv.size(0), channels = qkv.size(1) / 3, length = qkv.size(2);
  am::check_backward_args(grad_out.sizes(), out.sizes(), lse.sizes(), lse.scalar_type(), batch, channels,
                          num_heads, length);
  for (const at::Tensor* t : {&grad_out, &qkv, &out, &lse}) {
    DDPM_CHECK(t->device().is_cpu(), "attention_backward: every tensor must be on the CPU, got ", t->device());
  }
  // A kernel below autograd: its in-place and out= ops record nothing (see attention.cpp).
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const bool is_float = qkv.scalar_type() == at::kFloat;
  at::Tensor grad32 = at::empty(qkv.sizes(), qkv.options().dtype(at::kFloat));
  if (grad32.numel() > 0) {
    // Each of q, k, v's channels is written exactly once by the GEMMs (T = 0 leaves nothing).
    const at::Tensor qkv32 = qkv.to(at::kFloat);
    const at::Tensor go32 = grad_out.to(at::kFloat).contiguous().view({batch, num_heads, ch, length});
    const at::Tensor out32 = out.to(at::kFloat).contiguous().view({batch, num_heads, ch, length});
    attention_backward_gemm(am::qkv_heads_view(qkv32, num_heads, ch, legacy),
                            am::qkv_heads_view(grad32, num_heads, ch, legacy), go32, out32, lse.contiguous(),
                            1.0 / std::sqrt(static_cast<double>(ch)));
  }
  return is_float ? grad32 : grad32.to(qkv.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) {
  m.impl("attention_backward", &attention_backward_cpu);
}
