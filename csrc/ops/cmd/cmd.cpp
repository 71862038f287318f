// CMD op family: schemas, argument checks, the device-agnostic op bodies and the CPU registration.
// The per-device passes over the inputs live in cmd_cpu.cpp and cmd_cuda.cu.
//
// Definition (MISA / IF-MMIN, without the range normalisation of Zellinger et al.):
//   cmd(x1, x2, K) = ||mean(x1) - mean(x2)||_2 + sum_{k=2..K} ||c_k(x1) - c_k(x2)||_2,
//   c_k(x) = mean over rows of (x - mean(x))^k.
#include "ops/cmd/cmd.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "common/checks.h"

namespace mmer_ext::cmd {
namespace {

const ArgName kX[] = {{"x"}};

// An upper bound keeps the [n_moments + 1, D] statistics and the per-moment loops of a huge n_moments (2^62) from
// failing inside the allocator or running for ever. Moments of order 256 already overflow float32 unless
// |x - mean| < 1.42 (float32's max is 1.42^256), so no meaningful call is refused.
constexpr int64_t kMaxMoments = 256;

void check_n_moments(int64_t n_moments, const char* op) {
  TORCH_CHECK(n_moments >= 1, op, ": n_moments must be >= 1 (1 compares means only), got ", n_moments);
  TORCH_CHECK(n_moments <= kMaxMoments, op, ": n_moments must be <= ", kMaxMoments,
              " (higher moments overflow float32), got ", n_moments);
}

// Every input is a [B, D] floating matrix with B >= 1, and all share D, dtype and device.
void check_inputs(at::TensorList xs, const char* op, const ArgName* names = nullptr) {
  auto name = [&](size_t i) { return names ? names[i] : ArgName{"xs", static_cast<int64_t>(i)}; };
  for (size_t i = 0; i < xs.size(); ++i) {
    const auto& x = xs[i];
    check_defined(x, op, name(i));
    TORCH_CHECK(x.dim() == 2, op, ": ", name(i), " must be a 2-d tensor [batch, features], got shape ",
                x.sym_sizes());
    check_floating(x, op, name(i));
    // Symbolic sizes: under torch.compile(dynamic=True) these checks become runtime asserts, not shape guards.
    TORCH_SYM_CHECK(x.sym_size(0).sym_ge(1), op, ": ", name(i), " has an empty batch (shape ", x.sym_sizes(),
                    "); moments need at least one row");
    if (i > 0) {
      check_same_device(x, xs[0], op, name(i), name(0));
      check_same_dtype(x, xs[0], op, name(i), name(0));
      TORCH_SYM_CHECK(x.sym_size(1).sym_eq(xs[0].sym_size(1)), op, ": ", name(i), " has ", x.sym_size(1),
                      " features but ", name(0), " has ", xs[0].sym_size(1), "; the feature dimension D must agree");
    }
  }
}

void check_pairwise_inputs(at::TensorList xs, int64_t n_moments, const char* op) {
  TORCH_CHECK(xs.size() >= 2, op, ": xs must hold at least 2 tensors to form a pair, got ", xs.size());
  check_inputs(xs, op);
  check_n_moments(n_moments, op);
}

at::TensorOptions opmath_options(const at::Tensor& x) {
  return x.options().dtype(opmath_type(x.scalar_type()));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> central_moments_forward(const DeviceKernels& k, const at::Tensor& x,
                                                           int64_t n_moments) {
  constexpr const char* op = "mmer_ext._central_moments_forward";
  check_inputs({x}, op, kX);
  check_n_moments(n_moments, op);
  auto stats = at::empty({n_moments + 1, x.size(1)}, opmath_options(x));
  k.column_stats(x.contiguous(), stats);
  // Rows: mean = shift + offset, then c_2..c_K.
  auto out = stats.narrow(0, 1, n_moments).clone();
  out.select(0, 0).add_(stats.select(0, 0));
  return {out.to(x.scalar_type()), stats};
}

at::Tensor central_moments_backward(const DeviceKernels& k, const at::Tensor& grad, const at::Tensor& x,
                                    const at::Tensor& stats) {
  constexpr const char* op = "mmer_ext._central_moments_backward";
  check_inputs({x}, op, kX);
  TORCH_CHECK(stats.dim() == 2 && stats.size(1) == x.size(1) && stats.size(0) >= 2 &&
                  grad.dim() == 2 && grad.size(0) == stats.size(0) - 1 && grad.size(1) == x.size(1),
              op, ": grad ", grad.sizes(), " must be [n_moments, ", x.size(1), "] and stats ", stats.sizes(),
              " [n_moments + 1, ", x.size(1), "] as returned by _central_moments_forward");
  check_same_device(grad, x, op, {"grad"}, kX[0]);
  check_same_device(stats, x, op, {"stats"}, kX[0]);
  const auto acc = opmath_type(x.scalar_type());
  auto s = stats.to(x.device(), acc).contiguous();
  // moment_coefficients reads c_k (k >= 2) from rows 1.. of its second argument, i.e. stats rows 2..K.
  auto coef = k.moment_coefficients(grad.to(x.device(), acc).contiguous(), s.narrow(0, 1, s.size(0) - 1));
  return k.poly_grad(x.contiguous(), s, coef, 1.0 / static_cast<double>(x.size(0)));
}

std::tuple<at::Tensor, at::Tensor> cmd_pairwise_forward(const DeviceKernels& k, at::TensorList xs,
                                                        int64_t n_moments) {
  check_pairwise_inputs(xs, n_moments, "mmer_ext._cmd_pairwise_forward");
  const int64_t M = static_cast<int64_t>(xs.size());
  auto stats = at::empty({M, n_moments + 1, xs[0].size(1)}, opmath_options(xs[0]));
  for (int64_t i = 0; i < M; ++i) {
    auto s = stats.select(0, i);
    k.column_stats(xs[i].contiguous(), s);
  }
  return {k.pairwise_loss(stats, xs[0].scalar_type()), stats};
}

std::vector<at::Tensor> cmd_pairwise_backward(const DeviceKernels& k, const at::Tensor& grad, at::TensorList xs,
                                              const at::Tensor& stats) {
  constexpr const char* op = "mmer_ext._cmd_pairwise_backward";
  TORCH_CHECK(stats.dim() == 3 && stats.size(0) == static_cast<int64_t>(xs.size()) && stats.size(1) >= 2 &&
                  (xs.empty() || (xs[0].dim() == 2 && stats.size(2) == xs[0].size(1))),
              op,
              ": stats must be [", xs.size(), ", n_moments + 1, D] as returned by _cmd_pairwise_forward, got ",
              stats.sizes());
  check_pairwise_inputs(xs, stats.size(1) - 1, op);
  TORCH_CHECK(grad.numel() == 1, op, ": grad must hold one value (the loss is a scalar), got shape ", grad.sizes());
  check_same_device(grad, xs[0], op, {"grad"}, {"xs", 0});
  check_same_device(stats, xs[0], op, {"stats"}, {"xs", 0});
  // On the statistics' device: a CUDA kernel reads the upstream gradient from device memory.
  auto coef = k.pairwise_coefficients(grad.to(stats.device(), stats.scalar_type()).reshape({}), stats.contiguous());
  std::vector<at::Tensor> grads;
  grads.reserve(xs.size());
  for (size_t i = 0; i < xs.size(); ++i) {
    const auto& x = xs[i];
    grads.push_back(k.poly_grad(x.contiguous(), stats.select(0, i), coef.select(0, i),
                                1.0 / static_cast<double>(x.size(0))));
  }
  return grads;
}

namespace {

// The public ops are thin composites over private ops that also return the statistics, the ATen way (layer_norm
// over native_layer_norm): the backward reads them instead of passing over the inputs again, and keeps the
// centre at full precision (the returned mean is rounded to the input dtype).
std::tuple<at::Tensor, at::Tensor> call_pairwise_forward(at::TensorList xs, int64_t n_moments) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mmer_ext::_cmd_pairwise_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(at::TensorList, int64_t)>();
  return op.call(xs, n_moments);
}

at::Tensor central_moments_composite(const at::Tensor& x, int64_t n_moments) {
  check_inputs({x}, "mmer_ext.central_moments", kX);
  check_n_moments(n_moments, "mmer_ext.central_moments");
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mmer_ext::_central_moments_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t)>();
  return std::get<0>(op.call(x, n_moments));
}

at::Tensor cmd_composite(const at::Tensor& x1, const at::Tensor& x2, int64_t n_moments) {
  static const ArgName names[] = {{"x1"}, {"x2"}};
  check_inputs({x1, x2}, "mmer_ext.cmd", names);
  check_n_moments(n_moments, "mmer_ext.cmd");
  return std::get<0>(call_pairwise_forward({x1, x2}, n_moments));
}

at::Tensor cmd_pairwise_composite(at::TensorList xs, int64_t n_moments) {
  check_pairwise_inputs(xs, n_moments, "mmer_ext.cmd_pairwise");
  return std::get<0>(call_pairwise_forward(xs, n_moments));
}

}  // namespace
}  // namespace mmer_ext::cmd

TORCH_LIBRARY_FRAGMENT(mmer_ext, m) {
  // Fake kernels and autograd formulas are registered from this Python module.
  m.set_python_module("mmer_ext.ops.cmd");
  m.def("central_moments(Tensor x, int n_moments) -> Tensor");
  // Returns (moments, stats); stats is [n_moments + 1, D] as laid out in cmd_math.h, in float32 (float64 for
  // float64 inputs). Saved for the backward; not differentiable.
  m.def("_central_moments_forward(Tensor x, int n_moments) -> (Tensor, Tensor)");
  m.def("_central_moments_backward(Tensor grad, Tensor x, Tensor stats) -> Tensor");
  m.def("cmd(Tensor x1, Tensor x2, int n_moments=5) -> Tensor");
  m.def("cmd_pairwise(Tensor[] xs, int n_moments=5) -> Tensor");
  // Returns (loss, stats): stats[i] is [n_moments + 1, D] as laid out in cmd_math.h (shift, mean - shift,
  // c_2..c_K) in float32 (float64 for float64 inputs). Saved for the backward; not differentiable.
  m.def("_cmd_pairwise_forward(Tensor[] xs, int n_moments) -> (Tensor, Tensor)");
  m.def("_cmd_pairwise_backward(Tensor grad, Tensor[] xs, Tensor stats) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(mmer_ext, CompositeImplicitAutograd, m) {
  m.impl("central_moments", &mmer_ext::cmd::central_moments_composite);
  m.impl("cmd", &mmer_ext::cmd::cmd_composite);
  m.impl("cmd_pairwise", &mmer_ext::cmd::cmd_pairwise_composite);
}

TORCH_LIBRARY_IMPL(mmer_ext, CPU, m) {
  mmer_ext::cmd::register_cmd_ops<mmer_ext::cmd::kCpuKernels>(m);
}
