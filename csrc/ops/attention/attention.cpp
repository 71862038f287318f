// Attention op family: schemas, argument checks, the device-agnostic op bodies and the CPU registration.
// The kernels live in attention_cpu.cpp and attention_cuda.cu.
#include "ops/attention/attention.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cmath>

#include "common/checks.h"

namespace mmer_ext::attention {
namespace {

struct Shapes {
  int64_t batch, heads, lq, lk, dim;
};

Shapes check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& mask, double dropout, std::optional<double> scale,
                  const char* op) {
  check_defined(q, op, {"query"});
  check_defined(k, op, {"key"});
  check_defined(v, op, {"value"});
  TORCH_CHECK(q.dim() == 4, op, ": query must be a 4-d tensor [batch, heads, Lq, head_dim], got shape ", q.sizes());
  check_floating(q, op, {"query"});
  TORCH_CHECK(k.dim() == 4 && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), op,
              ": key must be [batch, heads, Lk, head_dim] = [", q.size(0), ", ", q.size(1), ", Lk, ", q.size(3),
              "] to match query ", q.sizes(), ", got shape ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": value has shape ", v.sizes(), " but key has ", k.sizes(),
              "; they must match (one value per key)");
  check_same_device(k, q, op, {"key"}, {"query"});
  check_same_device(v, q, op, {"value"}, {"query"});
  check_same_dtype(k, q, op, {"key"}, {"query"});
  check_same_dtype(v, q, op, {"value"}, {"query"});
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, op, ": mask must be a bool tensor (True = blocked), got ",
                mask->scalar_type());
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == q.size(2) && mask->size(1) == k.size(2), op,
                ": mask must be [Lq, Lk] = [", q.size(2), ", ", k.size(2), "], got shape ", mask->sizes());
    check_same_device(*mask, q, op, {"mask"}, {"query"});
  }
  TORCH_CHECK(dropout >= 0.0 && dropout < 1.0, op, ": dropout must be in [0, 1), got ", dropout,
              " (a probability of dropping; 1 would zero every output)");
  if (scale.has_value()) {
    TORCH_CHECK(std::isfinite(*scale), op, ": scale must be finite, got ", *scale);
  }
  return {q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
}

// The kernels' view of a checked call; `mask` (contiguous or undefined) must outlive it. Default scale 1 / sqrt(D).
Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                     const Shapes& s, double dropout, std::optional<double> scale) {
  return {q, k, v, mask.defined() ? &mask : nullptr, s.batch, s.heads, s.lq, s.lk, s.dim,
          scale.value_or(1.0 / std::sqrt(static_cast<double>(std::max<int64_t>(s.dim, 1)))), dropout};
}

// [B, H, L, D] with the memory of [B, L, H, D]: heads interleaved, as the in-projection produced them.
at::Tensor head_interleaved(const at::Tensor& like, int64_t b, int64_t h, int64_t l, int64_t d) {
  return at::empty({b, l, h, d}, like.options()).transpose(1, 2);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention(const DeviceKernels& kernels, const at::Tensor& q,
                                                         const at::Tensor& k, const at::Tensor& v,
                                                         const std::optional<at::Tensor>& mask, double dropout,
                                                         std::optional<double> scale,
                                                         const std::optional<at::Generator>& generator) {
  constexpr const char* op = "mmer_ext.attention";
  const Shapes s = check_args(q, k, v, mask, dropout, scale, op);
  if (generator.has_value()) {
    TORCH_CHECK(generator->device() == q.device(), op, ": generator is on ", generator->device(),
                " but query is on ", q.device(), "; pass a generator of query's device");
  }
  auto out = head_interleaved(q, s.batch, s.heads, s.lq, s.dim);
  auto lse = at::empty({s.batch, s.heads, s.lq}, q.options().dtype(at::toOpMathType(q.scalar_type())));
  auto rng = at::zeros({2}, q.options().dtype(at::kLong));
  const at::Tensor m = mask.has_value() && mask->defined() ? mask->contiguous() : at::Tensor();
  const Problem p = make_problem(q, k, v, m, s, dropout, scale);
  kernels.forward(p, out, lse, rng, generator);
  return {out, lse, rng};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const DeviceKernels& kernels, const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& rng,
    const std::optional<at::Tensor>& mask, double dropout, std::optional<double> scale) {
  constexpr const char* op = "mmer_ext._attention_backward";
  const Shapes s = check_args(q, k, v, mask, dropout, scale, op);
  TORCH_CHECK(grad.sizes() == q.sizes() && out.sizes() == q.sizes(), op, ": grad ", grad.sizes(), " and out ",
              out.sizes(), " must have query's shape ", q.sizes());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == s.batch && lse.size(1) == s.heads && lse.size(2) == s.lq, op,
              ": lse must be [batch, heads, Lq] = [", s.batch, ", ", s.heads, ", ", s.lq, "], got shape ",
              lse.sizes());
  TORCH_CHECK(lse.scalar_type() == at::toOpMathType(q.scalar_type()), op, ": lse must be ",
              at::toOpMathType(q.scalar_type()), " (the forward's), got ", lse.scalar_type());
  TORCH_CHECK(rng.scalar_type() == at::kLong && rng.numel() == 2, op,
              ": rng must be the forward's int64 [2] Philox state, got ", rng.scalar_type(), " ", rng.sizes());
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{grad, "grad"}, {out, "out"}, {lse, "lse"},
                                {rng, "rng"}}) {
    check_same_device(t, q, op, {name}, {"query"});
  }
  check_same_dtype(grad, q, op, {"grad"}, {"query"});
  check_same_dtype(out, q, op, {"out"}, {"query"});
  auto dq = head_interleaved(q, s.batch, s.heads, s.lq, s.dim);
  auto dk = head_interleaved(k, s.batch, s.heads, s.lk, s.dim);
  auto dv = head_interleaved(v, s.batch, s.heads, s.lk, s.dim);
  const at::Tensor m = mask.has_value() && mask->defined() ? mask->contiguous() : at::Tensor();
  const Problem p = make_problem(q, k, v, m, s, dropout, scale);
  kernels.backward(p, grad, out, lse.contiguous(), rng.contiguous(), dq, dk, dv);
  return {dq, dk, dv};
}

}  // namespace mmer_ext::attention

TORCH_LIBRARY_FRAGMENT(mmer_ext, m) {
  // Fake kernel and autograd are registered from this Python module.
  m.set_python_module("mmer_ext.ops.attention");
  m.def("attention(Tensor query, Tensor key, Tensor value, Tensor? mask=None, float dropout=0.0, "
        "float? scale=None, Generator? generator=None) -> (Tensor, Tensor, Tensor)");
  m.def("_attention_backward(Tensor grad, Tensor query, Tensor key, Tensor value, Tensor out, Tensor lse, "
        "Tensor rng, Tensor? mask, float dropout, float? scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mmer_ext, CPU, m) {
  mmer_ext::attention::register_attention_ops<mmer_ext::attention::kCpuKernels>(m);
}
