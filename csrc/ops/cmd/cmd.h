#pragma once
// The CMD (central moment discrepancy) op family: declarations shared by cmd.cpp, cmd_cpu.cpp and cmd_cuda.cu.
//
// The op bodies in cmd.cpp check arguments, allocate and call the per-device kernels below. Statistics tensors
// follow the layout of cmd_math.h: per input [K+1, D] in opmath (float32, or float64 for float64 inputs).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace mmer_ext::cmd {

struct DeviceKernels {
  // x: contiguous [B, D], B >= 1. stats: contiguous [K+1, D] (a view), fully overwritten.
  void (*column_stats)(const at::Tensor& x, at::Tensor& stats);
  // stats: [M, K+1, D]. Mean over the pairs i < j of sum_k ||stat_k(i) - stat_k(j)||_2, 0-d of dtype `dtype`.
  at::Tensor (*pairwise_loss)(const at::Tensor& stats, at::ScalarType dtype);
  // grad: 0-d upstream gradient of that loss. Returns [M, K, D] coefficients a (see grad_coefficients_inplace).
  at::Tensor (*pairwise_coefficients)(const at::Tensor& grad, const at::Tensor& stats);
  // grad: [K, D]; moments: [K, D] whose rows 1.. hold c_2..c_K (opmath). Coefficients [K, D] of
  // central_moments' backward.
  at::Tensor (*moment_coefficients)(const at::Tensor& grad, const at::Tensor& moments);
  // x: contiguous [B, D]; center: rows 0 (shift) and 1 (offset) of a statistics tensor; coef: contiguous [K, D].
  // Returns scale * sum_j coef[j] * y^j, y = (x - shift) - offset, shaped and typed like x.
  at::Tensor (*poly_grad)(const at::Tensor& x, const at::Tensor& center, const at::Tensor& coef, double scale);
};

// Op bodies, device-agnostic given the kernels.
std::tuple<at::Tensor, at::Tensor> central_moments_forward(const DeviceKernels& k, const at::Tensor& x,
                                                           int64_t n_moments);
at::Tensor central_moments_backward(const DeviceKernels& k, const at::Tensor& grad, const at::Tensor& x,
                                    const at::Tensor& stats);
std::tuple<at::Tensor, at::Tensor> cmd_pairwise_forward(const DeviceKernels& k, at::TensorList xs,
                                                        int64_t n_moments);
std::vector<at::Tensor> cmd_pairwise_backward(const DeviceKernels& k, const at::Tensor& grad, at::TensorList xs,
                                              const at::Tensor& stats);

extern const DeviceKernels kCpuKernels;  // cmd_cpu.cpp

// The op bodies bound to one device's kernels, for TORCH_LIBRARY_IMPL blocks. No device guard here: each CUDA
// kernel entry sets its own, once.
template <const DeviceKernels& K>
void register_cmd_ops(torch::Library& m) {
  m.impl("_central_moments_forward",
         +[](const at::Tensor& x, int64_t n_moments) { return central_moments_forward(K, x, n_moments); });
  m.impl("_central_moments_backward", +[](const at::Tensor& grad, const at::Tensor& x, const at::Tensor& stats) {
    return central_moments_backward(K, grad, x, stats);
  });
  m.impl("_cmd_pairwise_forward",
         +[](at::TensorList xs, int64_t n_moments) { return cmd_pairwise_forward(K, xs, n_moments); });
  m.impl("_cmd_pairwise_backward", +[](const at::Tensor& grad, at::TensorList xs, const at::Tensor& stats) {
    return cmd_pairwise_backward(K, grad, xs, stats);
  });
}

}  // namespace mmer_ext::cmd
