// Autograd of the CMD family, registered in C++ (the other families register theirs from Python).
//
// Why C++ here: IF-MMIN calls cmd_pairwise on 3 x [64..256, 128] every step, where the kernels take a few
// microseconds. A Python autograd kernel (torch.library.register_autograd, or an autograd.Function behind the
// dispatcher) costs more than that on every call and again in the backward, and it is what kept the op under 2x
// ahead of torch.compile at those sizes (issue 17). The formulas are the fused backward ops; what lives here is only
// the bookkeeping: save the inputs and the statistics, call the backward op, and refuse a second derivative.
//
// torch.compile traces these kernels like any C++ autograd formula (the fake kernels stay in mmer_ext/ops/cmd.py).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "common/autograd.h"

namespace mmer_ext::cmd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using StatsPair = std::tuple<at::Tensor, at::Tensor>;

const auto& pairwise_forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mmer_ext::_cmd_pairwise_forward", "")
                             .typed<StatsPair(at::TensorList, int64_t)>();
  return op;
}

const auto& pairwise_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mmer_ext::_cmd_pairwise_backward", "")
                             .typed<std::vector<at::Tensor>(const at::Tensor&, at::TensorList, const at::Tensor&)>();
  return op;
}

const auto& moments_forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mmer_ext::_central_moments_forward", "")
                             .typed<StatsPair(const at::Tensor&, int64_t)>();
  return op;
}

const auto& moments_backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mmer_ext::_central_moments_backward", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op;
}

// The backward ops are fused first-order formulas. Differentiating through one would otherwise warn and treat its
// output as a constant (a silently wrong second derivative), so under create_graph their result carries a node
// whose backward refuses.
[[noreturn]] void refuse_second_derivative(const char* public_name) {
  TORCH_CHECK(false, public_name,
              ": second derivatives are not implemented (its backward is a fused kernel with a first-order "
              "formula). Use the pure-PyTorch reference in mmer_ext.ops._reference for gradient penalties.");
}

class PairwiseBackwardRefusal : public torch::autograd::Function<PairwiseBackwardRefusal> {
 public:
  static variable_list forward(AutogradContext*, const at::Tensor& grad, at::TensorList xs, const at::Tensor& stats) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return pairwise_backward_op().call(grad, xs, stats);
  }
  static variable_list backward(AutogradContext*, variable_list) { refuse_second_derivative("mmer_ext.cmd"); }
};

class MomentsBackwardRefusal : public torch::autograd::Function<MomentsBackwardRefusal> {
 public:
  static at::Tensor forward(AutogradContext*, const at::Tensor& grad, const at::Tensor& x, const at::Tensor& stats) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return moments_backward_op().call(grad, x, stats);
  }
  static variable_list backward(AutogradContext*, variable_list) {
    refuse_second_derivative("mmer_ext.central_moments");
  }
};

std::vector<at::Tensor> pairwise_backward_autograd(const at::Tensor& grad, at::TensorList xs, const at::Tensor& stats) {
  if (records_graph(xs) || records_graph({grad, stats})) return PairwiseBackwardRefusal::apply(grad, xs, stats);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return pairwise_backward_op().call(grad, xs, stats);
}

at::Tensor moments_backward_autograd(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& stats) {
  if (records_graph({grad, x, stats})) return MomentsBackwardRefusal::apply(grad, x, stats);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return moments_backward_op().call(grad, x, stats);
}

// Both forward ops return (value, stats); stats is saved for the backward and is not differentiable.
class PairwiseForward : public torch::autograd::Function<PairwiseForward> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList xs, int64_t n_moments) {
    auto [loss, stats] = [&] {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      return pairwise_forward_op().call(xs, n_moments);
    }();
    ctx->mark_non_differentiable({stats});
    variable_list saved(xs.begin(), xs.end());
    saved.push_back(stats);
    ctx->save_for_backward(saved);
    return {loss, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto stats = saved.back();
    saved.pop_back();
    auto out = pairwise_backward_autograd(grads[0], saved, stats);
    out.emplace_back();  // n_moments
    return out;
  }
};

class MomentsForward : public torch::autograd::Function<MomentsForward> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, int64_t n_moments) {
    auto [moments, stats] = [&] {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      return moments_forward_op().call(x, n_moments);
    }();
    ctx->mark_non_differentiable({stats});
    ctx->save_for_backward({x, stats});
    return {moments, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    return {moments_backward_autograd(grads[0], saved[0], saved[1]), at::Tensor()};
  }
};

// Without a graph to record, go straight below autograd: building a node only to drop it is most of the cost of an
// IF-MMIN-sized evaluation call.
StatsPair pairwise_forward_autograd(at::TensorList xs, int64_t n_moments) {
  if (!records_graph(xs)) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return pairwise_forward_op().call(xs, n_moments);
  }
  auto out = PairwiseForward::apply(xs, n_moments);
  return {out[0], out[1]};
}

StatsPair moments_forward_autograd(const at::Tensor& x, int64_t n_moments) {
  if (!records_graph({x})) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return moments_forward_op().call(x, n_moments);
  }
  auto out = MomentsForward::apply(x, n_moments);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace mmer_ext::cmd

TORCH_LIBRARY_IMPL(mmer_ext, Autograd, m) {
  m.impl("_central_moments_forward", &mmer_ext::cmd::moments_forward_autograd);
  m.impl("_central_moments_backward", &mmer_ext::cmd::moments_backward_autograd);
  m.impl("_cmd_pairwise_forward", &mmer_ext::cmd::pairwise_forward_autograd);
  m.impl("_cmd_pairwise_backward", &mmer_ext::cmd::pairwise_backward_autograd);
}
