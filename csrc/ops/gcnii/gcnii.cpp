// GCNII layer op family: schemas, argument checks, the device-agnostic op bodies and the CPU registration.
// The element-wise passes live in gcnii_cpu.cpp and gcnii_cuda.cu; the GEMMs are ATen's on either device.
#include "ops/gcnii/gcnii.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "common/checks.h"

namespace mmer_ext::gcnii {
namespace {

// hi and h0 are [N, F] floating matrices of one dtype and device; weight is [2F, F] like them.
void check_layer_args(const at::Tensor& hi, const at::Tensor& h0, const at::Tensor& weight, double theta,
                      double alpha, double dropout, const char* op) {
  const ArgName kHi{"hi"}, kH0{"h0"}, kW{"weight"};
  check_defined(hi, op, kHi);
  check_defined(h0, op, kH0);
  check_defined(weight, op, kW);
  TORCH_CHECK(hi.dim() == 2, op, ": hi must be a 2-d tensor [nodes, features], got shape ", hi.sizes());
  check_floating(hi, op, kHi);
  TORCH_CHECK(h0.sizes() == hi.sizes(), op, ": h0 has shape ", h0.sizes(), " but hi has ", hi.sizes(),
              "; h0 is the first layer's output for the same nodes");
  const int64_t f = hi.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == 2 * f && weight.size(1) == f, op, ": weight must be [2F, F] = [",
              2 * f, ", ", f, "] for ", f, " features (the [hi || h0] projection), got shape ", weight.sizes());
  check_same_device(h0, hi, op, kH0, kHi);
  check_same_device(weight, hi, op, kW, kHi);
  check_same_dtype(h0, hi, op, kH0, kHi);
  check_same_dtype(weight, hi, op, kW, kHi);
  TORCH_CHECK(std::isfinite(theta), op, ": theta must be finite, got ", theta);
  TORCH_CHECK(std::isfinite(alpha), op, ": alpha must be finite, got ", alpha);
  TORCH_CHECK(dropout >= 0.0 && dropout < 1.0, op, ": dropout must be in [0, 1), got ", dropout,
              " (a probability of dropping; 1 would zero the layer)");
}

}  // namespace

at::Tensor gcnii_layer(const DeviceKernels& k, const at::Tensor& hi, const at::Tensor& h0, const at::Tensor& weight,
                       double theta, double alpha, double dropout, const std::optional<at::Generator>& generator) {
  constexpr const char* op = "mmer_ext.gcnii_layer";
  check_layer_args(hi, h0, weight, theta, alpha, dropout, op);
  if (generator.has_value()) {
    TORCH_CHECK(generator->device() == hi.device(), op, ": generator is on ", generator->device(),
                " but hi is on ", hi.device(), "; pass a generator of hi's device");
  }
  const int64_t f = hi.size(1);
  auto a = hi.contiguous(), b = h0.contiguous();
  // acc = hi W[:F] + h0 W[F:]: two GEMMs into one buffer, which the output pass then overwrites in place.
  auto acc = at::mm(a, weight.narrow(0, 0, f));
  acc.addmm_(b, weight.narrow(0, f, f));
  k.output_inplace(acc, a, b, theta, alpha, dropout, generator);
  return acc;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gcnii_layer_backward(const DeviceKernels& k, const at::Tensor& grad,
                                                                    const at::Tensor& out, const at::Tensor& hi,
                                                                    const at::Tensor& h0, const at::Tensor& weight,
                                                                    double theta, double alpha, double dropout) {
  constexpr const char* op = "mmer_ext._gcnii_layer_backward";
  check_layer_args(hi, h0, weight, theta, alpha, dropout, op);
  TORCH_CHECK(grad.sizes() == hi.sizes() && out.sizes() == hi.sizes(), op, ": grad ", grad.sizes(), " and out ",
              out.sizes(), " must have hi's shape ", hi.sizes());
  check_same_device(grad, hi, op, {"grad"}, {"hi"});
  check_same_device(out, hi, op, {"out"}, {"hi"});
  const int64_t f = hi.size(1);
  // g = d loss / d pre; pre = theta [hi || h0] W + c_hi hi + c_h0 h0.
  auto g = k.pre_gradient(grad.to(hi.scalar_type()).contiguous(), out.to(hi.scalar_type()).contiguous(), dropout);
  const auto w_hi = weight.narrow(0, 0, f), w_h0 = weight.narrow(0, f, f);
  auto grad_hi = at::addmm(g, g, w_hi.t(), (1.0 - theta) * (1.0 - alpha), theta);
  auto grad_h0 = at::addmm(g, g, w_h0.t(), (1.0 - theta) * alpha, theta);
  auto grad_w = at::empty_like(weight, at::MemoryFormat::Contiguous);
  auto gw_hi = grad_w.narrow(0, 0, f), gw_h0 = grad_w.narrow(0, f, f);
  // beta = 0: the (uninitialised) output is ignored, not read.
  at::addmm_out(gw_hi, gw_hi, hi.t(), g, 0.0, theta);
  at::addmm_out(gw_h0, gw_h0, h0.t(), g, 0.0, theta);
  return {grad_hi, grad_h0, grad_w};
}

}  // namespace mmer_ext::gcnii

TORCH_LIBRARY_FRAGMENT(mmer_ext, m) {
  // Fake kernel and autograd are registered from this Python module.
  m.set_python_module("mmer_ext.ops.gcnii");
  m.def("gcnii_layer(Tensor hi, Tensor h0, Tensor weight, float theta, float alpha, float dropout=0.0, "
        "Generator? generator=None) -> Tensor");
  m.def("_gcnii_layer_backward(Tensor grad, Tensor out, Tensor hi, Tensor h0, Tensor weight, float theta, "
        "float alpha, float dropout) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mmer_ext, CPU, m) {
  mmer_ext::gcnii::register_gcnii_ops<mmer_ext::gcnii::kCpuKernels>(m);
}
