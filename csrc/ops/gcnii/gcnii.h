#pragma once
// The GCNII layer op family (MMGCN's deep graph convolution): declarations shared by gcnii.cpp, gcnii_cpu.cpp and
// gcnii_cuda.cu.
//
//   gcnii_layer(hi, h0, W, theta, alpha, p)
//     = dropout_p(relu(theta [hi || h0] W + (1 - theta)((1 - alpha) hi + alpha h0)))
//
// with hi = A h (the propagated input), h0 the first layer's output, W [2F, F]. The two GEMMs are ATen's; the
// per-device kernels below are the one pass that does everything else (mixing, residual, relu, the in-kernel
// dropout mask) and the one pass of the backward that turns the upstream gradient into d loss / d pre.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace mmer_ext::gcnii {

struct DeviceKernels {
  // acc: contiguous [N, F], on entry [hi || h0] W; overwritten with the layer's output. hi, h0: contiguous [N, F].
  // Draws the dropout mask from `generator` (or the device's default) when dropout > 0.
  void (*output_inplace)(at::Tensor& acc, const at::Tensor& hi, const at::Tensor& h0, double theta, double alpha,
                         double dropout, const std::optional<at::Generator>& generator);
  // grad, out: contiguous [N, F]. Returns d loss / d pre (see pre_gradient in gcnii_math.h), shaped like grad.
  at::Tensor (*pre_gradient)(const at::Tensor& grad, const at::Tensor& out, double dropout);
};

at::Tensor gcnii_layer(const DeviceKernels& k, const at::Tensor& hi, const at::Tensor& h0, const at::Tensor& weight,
                       double theta, double alpha, double dropout, const std::optional<at::Generator>& generator);
std::tuple<at::Tensor, at::Tensor, at::Tensor> gcnii_layer_backward(const DeviceKernels& k, const at::Tensor& grad,
                                                                    const at::Tensor& out, const at::Tensor& hi,
                                                                    const at::Tensor& h0, const at::Tensor& weight,
                                                                    double theta, double alpha, double dropout);

extern const DeviceKernels kCpuKernels;  // gcnii_cpu.cpp

// The op bodies bound to one device's kernels, for TORCH_LIBRARY_IMPL blocks. No device guard here: each CUDA
// kernel entry sets its own.
template <const DeviceKernels& K>
void register_gcnii_ops(torch::Library& m) {
  m.impl("gcnii_layer", +[](const at::Tensor& hi, const at::Tensor& h0, const at::Tensor& weight, double theta,
                            double alpha, double dropout, const std::optional<at::Generator>& generator) {
    return gcnii_layer(K, hi, h0, weight, theta, alpha, dropout, generator);
  });
  m.impl("_gcnii_layer_backward", +[](const at::Tensor& grad, const at::Tensor& out, const at::Tensor& hi,
                                      const at::Tensor& h0, const at::Tensor& weight, double theta, double alpha,
                                      double dropout) {
    return gcnii_layer_backward(K, grad, out, hi, h0, weight, theta, alpha, dropout);
  });
}

}  // namespace mmer_ext::gcnii
