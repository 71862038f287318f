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

#include <string>

#include "common/checks.h"

namespace mmer_ext::cmd {
namespace {

void check_n_moments(int64_t n_moments, const char* op) {
  TORCH_CHECK(n_moments >= 1, op, ": n_moments must be >= 1 (1 compares means only), got ", n_moments);
}

// Every input is a [B, D] floating matrix with B >= 1, and all share D, dtype and device.
void check_inputs(at::TensorList xs, const std::vector<std::string>& names, const char* op) {
  for (size_t i = 0; i < xs.size(); ++i) {
    const auto& x = xs[i];
    check_defined(x, op, names[i]);
    check_dim(x, 2, op, names[i], "[batch, features]");
    check_floating(x, op, names[i]);
    TORCH_CHECK(x.size(0) >= 1, op, ": ", names[i], " has an empty batch (shape ", x.sizes(),
                "); moments need at least one row");
    if (i > 0) {
      check_same_device(x, xs[0], op, names[i], names[0]);
      check_same_dtype(x, xs[0], op, names[i], names[0]);
      TORCH_CHECK(x.size(1) == xs[0].size(1), op, ": ", names[i], " has ", x.size(1), " features but ", names[0],
                  " has ", xs[0].size(1), "; the feature dimension D must agree");
    }
  }
}

std::vector<std::string> list_names(const char* base, size_t n) {
  std::vector<std::string> names;
  names.reserve(n);
  for (size_t i = 0; i < n; ++i) names.push_back(std::string(base) + "[" + std::to_string(i) + "]");
  return names;
}

void check_pairwise_inputs(at::TensorList xs, int64_t n_moments, const char* op) {
  TORCH_CHECK(xs.size() >= 2, op, ": xs must hold at least 2 tensors to form a pair, got ", xs.size());
  check_inputs(xs, list_names("xs", xs.size()), op);
  check_n_moments(n_moments, op);
}

at::TensorOptions opmath_options(const at::Tensor& x) {
  return x.options().dtype(opmath_type(x.scalar_type()));
}

// Coefficients a[j, d] with d/dx[b, d] of sum_k <G[k-1], c_k> = sum_j a[j, d] * y[b, d]^j, y the centred x.
// c_k depends on x[b] through (k/B) (y^(k-1) - mean(y^(k-1))) and the mean through 1/B, so
//   a[0]   = (G[0] - sum_{k=3..K} k G[k-1] c_{k-1}) / B     (mean(y) = 0 removes the k = 2 term)
//   a[j]   = (j+1) G[j] / B,  j = 1..K-1.
// G and c are [K, D] in opmath; row 0 of c is not read (it holds the mean or its offset).
at::Tensor moment_grad_coefficients(const at::Tensor& G, const at::Tensor& c, int64_t batch) {
  const int64_t K = G.size(0);
  if (K == 1) return G / static_cast<double>(batch);
  auto k = at::arange(2, K + 1, G.options()).unsqueeze(1);
  auto a_rest = G.slice(0, 1) * k;  // rows j = 1..K-1
  auto a0 = G[0];
  if (K >= 3) a0 = a0 - (a_rest.slice(0, 1) * c.slice(0, 1, K - 1)).sum(0);
  return at::cat({a0.unsqueeze(0), a_rest}, 0).div_(static_cast<double>(batch));
}

// Differences of the K statistics of every unordered pair (i < j): [P, K, D]. Row 0 compares means as
// (x_i[0] - x_j[0]) + (offset_i - offset_j), which keeps the digits a large common mean would eat.
struct PairDiffs {
  at::Tensor first, second;  // [P] pair members, int64 on the inputs' device
  at::Tensor diffs;          // [P, K, D] opmath
};

PairDiffs pair_diffs(at::TensorList xs, const at::Tensor& stats) {
  const int64_t M = static_cast<int64_t>(xs.size());
  auto pairs = at::triu_indices(M, M, 1, stats.options().dtype(at::kLong));
  auto first = pairs[0], second = pairs[1];
  std::vector<at::Tensor> rows;
  rows.reserve(xs.size());
  for (const auto& x : xs) rows.push_back(x.select(0, 0));
  auto shifts = at::stack(rows).to(stats.scalar_type());  // [M, D]
  auto s1 = stats.index_select(0, first), s2 = stats.index_select(0, second);
  auto mean_diff = (shifts.index_select(0, first) - shifts.index_select(0, second)) + (s1.select(1, 0) - s2.select(1, 0));
  auto diffs = at::cat({mean_diff.unsqueeze(1), s1.slice(1, 1) - s2.slice(1, 1)}, 1);
  return {first, second, diffs};
}

}  // namespace

at::Tensor central_moments(const DeviceKernels& k, const at::Tensor& x, int64_t n_moments) {
  constexpr const char* op = "mmer_ext.central_moments";
  check_inputs({x}, {"x"}, op);
  check_n_moments(n_moments, op);
  auto xc = x.contiguous();
  auto stats = at::empty({n_moments, x.size(1)}, opmath_options(x));
  k.column_stats(xc, stats);
  stats.select(0, 0).add_(xc.select(0, 0).to(stats.scalar_type()));
  return stats.to(x.scalar_type());
}

at::Tensor central_moments_backward(const DeviceKernels& k, const at::Tensor& grad, const at::Tensor& x,
                                    const at::Tensor& moments) {
  constexpr const char* op = "mmer_ext._central_moments_backward";
  check_inputs({x}, {"x"}, op);
  TORCH_CHECK(grad.dim() == 2 && grad.size(1) == x.size(1) && grad.sizes() == moments.sizes(), op,
              ": grad ", grad.sizes(), " and moments ", moments.sizes(), " must both be [n_moments, ", x.size(1), "]");
  auto xc = x.contiguous();
  const auto acc = opmath_type(x.scalar_type());
  auto c = moments.to(acc);
  auto offset = c.select(0, 0) - xc.select(0, 0).to(acc);
  auto coef = moment_grad_coefficients(grad.to(acc), c, x.size(0)).contiguous();
  return k.poly_grad(xc, offset, coef);
}

std::tuple<at::Tensor, at::Tensor> cmd_pairwise_forward(const DeviceKernels& k, at::TensorList xs,
                                                        int64_t n_moments) {
  check_pairwise_inputs(xs, n_moments, "mmer_ext._cmd_pairwise_forward");
  const int64_t M = static_cast<int64_t>(xs.size());
  auto stats = at::empty({M, n_moments, xs[0].size(1)}, opmath_options(xs[0]));
  for (int64_t i = 0; i < M; ++i) {
    auto s = stats.select(0, i);
    k.column_stats(xs[i].contiguous(), s);
  }
  auto d = pair_diffs(xs, stats);
  auto norms = d.diffs.square().sum(-1).sqrt();  // [P, K]
  auto loss = norms.sum().div_(static_cast<double>(d.first.numel()));
  return {loss.to(xs[0].scalar_type()), stats};
}

std::vector<at::Tensor> cmd_pairwise_backward(const DeviceKernels& k, const at::Tensor& grad, at::TensorList xs,
                                              const at::Tensor& stats) {
  constexpr const char* op = "mmer_ext._cmd_pairwise_backward";
  TORCH_CHECK(stats.dim() == 3 && stats.size(0) == static_cast<int64_t>(xs.size()), op, ": stats must be [",
              xs.size(), ", n_moments, D], got ", stats.sizes());
  check_pairwise_inputs(xs, stats.size(1), op);
  const int64_t M = static_cast<int64_t>(xs.size());
  auto d = pair_diffs(xs, stats);
  const int64_t P = d.first.numel();
  auto norms = d.diffs.square().sum(-1, /*keepdim=*/true).sqrt();  // [P, K, 1]
  // d||v||/dv = v/||v||, and 0 where v = 0: identical inputs get a zero (sub)gradient, not NaN.
  auto unit = at::where(norms > 0, d.diffs / norms, at::zeros({}, norms.options()));
  // G[i] = sum over pairs of (+unit if i is the first member, -unit if the second), as a matmul so the sum
  // order is fixed (index_add_ would use atomics on CUDA).
  auto ids = at::arange(M, d.first.options()).unsqueeze(1);
  auto sign = (ids == d.first.unsqueeze(0)).to(stats.scalar_type()) - (ids == d.second.unsqueeze(0)).to(stats.scalar_type());
  auto G = at::matmul(sign, unit.flatten(1)).view(stats.sizes());
  G.mul_(grad.to(stats.scalar_type()) / static_cast<double>(P));
  std::vector<at::Tensor> grads;
  grads.reserve(xs.size());
  for (int64_t i = 0; i < M; ++i) {
    auto s = stats.select(0, i);
    auto coef = moment_grad_coefficients(G.select(0, i), s, xs[i].size(0)).contiguous();
    grads.push_back(k.poly_grad(xs[i].contiguous(), s.select(0, 0), coef));
  }
  return grads;
}

namespace {

// cmd and cmd_pairwise are thin composites over _cmd_pairwise_forward, the ATen way (layer_norm over
// native_layer_norm): the private op also returns the statistics, so its backward reads them instead of
// passing over the inputs again.
std::tuple<at::Tensor, at::Tensor> call_pairwise_forward(at::TensorList xs, int64_t n_moments) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mmer_ext::_cmd_pairwise_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(at::TensorList, int64_t)>();
  return op.call(xs, n_moments);
}

at::Tensor cmd_composite(const at::Tensor& x1, const at::Tensor& x2, int64_t n_moments) {
  check_inputs({x1, x2}, {"x1", "x2"}, "mmer_ext.cmd");
  check_n_moments(n_moments, "mmer_ext.cmd");
  return std::get<0>(call_pairwise_forward({x1, x2}, n_moments));
}

at::Tensor cmd_pairwise_composite(at::TensorList xs, int64_t n_moments) {
  check_pairwise_inputs(xs, n_moments, "mmer_ext.cmd_pairwise");
  return std::get<0>(call_pairwise_forward(xs, n_moments));
}

const DeviceKernels kCpuKernels{&column_stats_cpu, &poly_grad_cpu};

at::Tensor central_moments_cpu(const at::Tensor& x, int64_t n_moments) {
  return central_moments(kCpuKernels, x, n_moments);
}
at::Tensor central_moments_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& moments) {
  return central_moments_backward(kCpuKernels, grad, x, moments);
}
std::tuple<at::Tensor, at::Tensor> cmd_pairwise_forward_cpu(at::TensorList xs, int64_t n_moments) {
  return cmd_pairwise_forward(kCpuKernels, xs, n_moments);
}
std::vector<at::Tensor> cmd_pairwise_backward_cpu(const at::Tensor& grad, at::TensorList xs,
                                                  const at::Tensor& stats) {
  return cmd_pairwise_backward(kCpuKernels, grad, xs, stats);
}

}  // namespace
}  // namespace mmer_ext::cmd

TORCH_LIBRARY_FRAGMENT(mmer_ext, m) {
  // Fake kernels and autograd formulas are registered from this Python module.
  m.set_python_module("mmer_ext.ops.cmd");
  m.def("central_moments(Tensor x, int n_moments) -> Tensor");
  m.def("_central_moments_backward(Tensor grad, Tensor x, Tensor moments) -> Tensor");
  m.def("cmd(Tensor x1, Tensor x2, int n_moments=5) -> Tensor");
  m.def("cmd_pairwise(Tensor[] xs, int n_moments=5) -> Tensor");
  // Returns (loss, stats): stats[i, 0] = mean(xs[i]) - xs[i][0], stats[i, k-1] = c_k(xs[i]) for k >= 2, in
  // float32 (float64 for float64 inputs). Saved for the backward; not differentiable.
  m.def("_cmd_pairwise_forward(Tensor[] xs, int n_moments) -> (Tensor, Tensor)");
  m.def("_cmd_pairwise_backward(Tensor grad, Tensor[] xs, Tensor stats) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(mmer_ext, CompositeImplicitAutograd, m) {
  m.impl("cmd", &mmer_ext::cmd::cmd_composite);
  m.impl("cmd_pairwise", &mmer_ext::cmd::cmd_pairwise_composite);
}

TORCH_LIBRARY_IMPL(mmer_ext, CPU, m) {
  m.impl("central_moments", &mmer_ext::cmd::central_moments_cpu);
  m.impl("_central_moments_backward", &mmer_ext::cmd::central_moments_backward_cpu);
  m.impl("_cmd_pairwise_forward", &mmer_ext::cmd::cmd_pairwise_forward_cpu);
  m.impl("_cmd_pairwise_backward", &mmer_ext::cmd::cmd_pairwise_backward_cpu);
}
