#pragma once
// The fused small-head attention op family: declarations shared by attention.cpp, attention_cpu.cpp and
// attention_cuda.cu.
//
//   attention(q, k, v, mask, p, scale) -> (out, lse, rng)
//     out = (softmax(scale q k^T, blocked where mask) * Z / (1 - p)) v,   lse = logsumexp of each score row
//
// q [B, H, Lq, D], k and v [B, H, Lk, D] with any strides; mask [Lq, Lk] bool, True = blocked (nn.MultiheadAttention's
// boolean attn_mask); Z the in-kernel Philox dropout mask (attention_math.h). out is [B, H, Lq, D] laid out as
// [B, Lq, H, D] in memory, so merging the heads back (out.transpose(1, 2).reshape(B, Lq, H * D)) copies nothing;
// lse [B, H, Lq] in the accumulation dtype; rng [2] int64 (Philox key, block counter) on the inputs' device, which
// the backward reads to regenerate Z. The gradients of q, k, v come back in the same head-interleaved layout.
//
// Made for narrow heads (MulT's D = 4 and 8, L up to a few hundred), where the blocked flash kernels spend their
// time on tiny GEMM calls; it never materialises the [Lq, Lk] matrix in memory.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace mmer_ext::attention {

// The checked, shaped problem both devices' kernels receive. Strides are in elements.
struct Problem {
  const at::Tensor &q, &k, &v;
  const at::Tensor* mask;  // nullptr, or a contiguous [Lq, Lk] bool tensor on the inputs' device
  int64_t batch, heads, lq, lk, dim;
  double scale, dropout;
};

struct DeviceKernels {
  // Fills out [B, H, Lq, D] (head-interleaved layout), lse [B, H, Lq] and rng [2]; draws the Philox key from
  // `generator` (or the device's default) when dropout > 0, else writes zeros to rng.
  void (*forward)(const Problem& p, at::Tensor& out, at::Tensor& lse, at::Tensor& rng,
                  const std::optional<at::Generator>& generator);
  // grad and out like out; fills dq, dk, dv (head-interleaved layouts, shaped like q, k, v).
  void (*backward)(const Problem& p, const at::Tensor& grad, const at::Tensor& out, const at::Tensor& lse,
                   const at::Tensor& rng, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv);
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention(const DeviceKernels& kernels, const at::Tensor& q,
                                                         const at::Tensor& k, const at::Tensor& v,
                                                         const std::optional<at::Tensor>& mask, double dropout,
                                                         std::optional<double> scale,
                                                         const std::optional<at::Generator>& generator);
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const DeviceKernels& kernels, const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& rng,
    const std::optional<at::Tensor>& mask, double dropout, std::optional<double> scale);

extern const DeviceKernels kCpuKernels;  // attention_cpu.cpp

// The op bodies bound to one device's kernels, for TORCH_LIBRARY_IMPL blocks.
template <const DeviceKernels& K>
void register_attention_ops(torch::Library& m) {
  m.impl("attention", +[](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& mask, double dropout, std::optional<double> scale,
                          const std::optional<at::Generator>& generator) {
    return attention(K, q, k, v, mask, dropout, scale, generator);
  });
  m.impl("_attention_backward", +[](const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                    const at::Tensor& rng, const std::optional<at::Tensor>& mask, double dropout,
                                    std::optional<double> scale) {
    return attention_backward(K, grad, q, k, v, out, lse, rng, mask, dropout, scale);
  });
}

}  // namespace mmer_ext::attention
