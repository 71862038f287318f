#pragma once
// What the C++ autograd kernels (cmd_autograd.cpp, attention_autograd.cpp) share.
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>

namespace mmer_ext {

// Whether a call must record a graph node: grad mode is on and some input requires grad. Without one, the kernels go
// straight below autograd (building a node only to drop it costs more than small kernels).
inline bool records_graph(at::TensorList xs) {
  if (!at::GradMode::is_enabled()) return false;
  for (const auto& x : xs)
    if (x.defined() && x.requires_grad()) return true;
  return false;
}

}  // namespace mmer_ext
