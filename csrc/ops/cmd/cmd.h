#pragma once
// The CMD (central moment discrepancy) op family: declarations shared by cmd.cpp, cmd_cpu.cpp and cmd_cuda.cu.
//
// Only two passes over the [B, D] inputs are device specific; everything else works on the small [M, K, D]
// statistics with ATen ops and is written once for every device:
//   column_stats : stats[0] = mean - x[0];  stats[k-1] = mean over rows of ((x - x[0]) - stats[0])^k, k = 2..K
//   poly_grad    : grad[b, d] = sum_j coef[j, d] * y^j, y = (x[b, d] - x[0, d]) - offset[d]
#include <ATen/core/Tensor.h>

#include <vector>

namespace mmer_ext::cmd {

struct DeviceKernels {
  // x: contiguous [B, D], B >= 1. stats: contiguous [K, D] in opmath dtype, fully overwritten.
  void (*column_stats)(const at::Tensor& x, at::Tensor& stats);
  // x: contiguous [B, D]; offset: [D]; coef: contiguous [K, D], both opmath. Returns a tensor like x.
  at::Tensor (*poly_grad)(const at::Tensor& x, const at::Tensor& offset, const at::Tensor& coef);
};

// Op bodies, device-agnostic given the kernels.
at::Tensor central_moments(const DeviceKernels& k, const at::Tensor& x, int64_t n_moments);
at::Tensor central_moments_backward(const DeviceKernels& k, const at::Tensor& grad, const at::Tensor& x,
                                    const at::Tensor& moments);
std::tuple<at::Tensor, at::Tensor> cmd_pairwise_forward(const DeviceKernels& k, at::TensorList xs,
                                                        int64_t n_moments);
std::vector<at::Tensor> cmd_pairwise_backward(const DeviceKernels& k, const at::Tensor& grad, at::TensorList xs,
                                              const at::Tensor& stats);

// CPU kernels (cmd_cpu.cpp).
void column_stats_cpu(const at::Tensor& x, at::Tensor& stats);
at::Tensor poly_grad_cpu(const at::Tensor& x, const at::Tensor& offset, const at::Tensor& coef);

}  // namespace mmer_ext::cmd
