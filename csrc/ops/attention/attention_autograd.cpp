// Autograd of the attention op, registered in C++ (as CMD's; the other families register theirs from Python).
//
// Why C++ here: MulT calls the op 21 times per training step, with kernels of about half a millisecond forward and a
// millisecond backward; the Python autograd kernel (torch.library.register_autograd) added about a quarter of a
// millisecond to every call, forward and backward. What lives here is only the bookkeeping: save the inputs, the
// output, the log-sum-exp and the Philox state, call the backward op, and refuse a second derivative.
//
// torch.compile traces these kernels like any C++ autograd formula (the fake kernels stay in
// mmer_ext/ops/attention.py).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/autograd.h"

namespace mmer_ext::attention {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

const auto& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mmer_ext::attention", "")
                             .typed<Triple(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const std::optional<at::Tensor>&, double, std::optional<double>,
                                           const std::optional<at::Generator>&)>();
  return op;
}

const auto& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mmer_ext::_attention_backward", "")
                             .typed<Triple(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const std::optional<at::Tensor>&, double, std::optional<double>)>();
  return op;
}

class BackwardRefusal : public torch::autograd::Function<BackwardRefusal> {
 public:
  static variable_list forward(AutogradContext*, const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                               const at::Tensor& rng, const std::optional<at::Tensor>& mask, double dropout,
                               std::optional<double> scale) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [dq, dk, dv] = backward_op().call(grad, q, k, v, out, lse, rng, mask, dropout, scale);
    return {dq, dk, dv};
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "mmer_ext.attention: second derivatives are not implemented (its backward is a fused "
                "first-order pass). Use attention_ref in mmer_ext.ops._reference for gradient penalties.");
  }
};

Triple backward_autograd(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& out, const at::Tensor& lse, const at::Tensor& rng,
                         const std::optional<at::Tensor>& mask, double dropout, std::optional<double> scale) {
  if (records_graph({grad, q, k, v, out})) {
    auto r = BackwardRefusal::apply(grad, q, k, v, out, lse, rng, mask, dropout, scale);
    return {r[0], r[1], r[2]};
  }
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return backward_op().call(grad, q, k, v, out, lse, rng, mask, dropout, scale);
}

// (out, lse, rng): lse and rng are saved for the backward and are not differentiable.
class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& mask, double dropout, std::optional<double> scale,
                               const std::optional<at::Generator>& generator) {
    auto [out, lse, rng] = [&] {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      return forward_op().call(q, k, v, mask, dropout, scale, generator);
    }();
    ctx->mark_non_differentiable({lse, rng});
    ctx->save_for_backward({q, k, v, out, lse, rng, mask.has_value() ? *mask : at::Tensor()});
    ctx->saved_data["dropout"] = dropout;
    ctx->saved_data["scale"] = scale.has_value() ? c10::IValue(*scale) : c10::IValue();
    return {out, lse, rng};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
                                     at::Tensor(), at::Tensor()};
    const std::optional<at::Tensor> mask = s[6].defined() ? std::optional<at::Tensor>(s[6]) : std::nullopt;
    const auto& scale_value = ctx->saved_data["scale"];
    const std::optional<double> scale =
        scale_value.isNone() ? std::nullopt : std::optional<double>(scale_value.toDouble());
    auto [dq, dk, dv] = backward_autograd(grads[0], s[0], s[1], s[2], s[3], s[4], s[5], mask,
                                          ctx->saved_data["dropout"].toDouble(), scale);
    return {dq, dk, dv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Without a graph to record (evaluation, no_grad), go straight below autograd.
Triple attention_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& mask, double dropout, std::optional<double> scale,
                          const std::optional<at::Generator>& generator) {
  if (!records_graph({q, k, v})) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return forward_op().call(q, k, v, mask, dropout, scale, generator);
  }
  auto out = AttentionFunction::apply(q, k, v, mask, dropout, scale, generator);
  return {out[0], out[1], out[2]};
}

}  // namespace
}  // namespace mmer_ext::attention

TORCH_LIBRARY_IMPL(mmer_ext, Autograd, m) {
  m.impl("attention", &mmer_ext::attention::attention_autograd);
  m.impl("_attention_backward", &mmer_ext::attention::backward_autograd);
}
