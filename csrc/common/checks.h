#pragma once
// Argument checks shared by every op. Each message names the op and the argument, so a user can fix the call
// without reading our source.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <ostream>

namespace mmer_ext {

// The name of an argument in error messages: "x1", or "xs[2]" for an element of a list. Cheap to pass around;
// only formatted when a check fails.
struct ArgName {
  const char* base;
  int64_t index = -1;
};

inline std::ostream& operator<<(std::ostream& os, const ArgName& n) {
  os << n.base;
  if (n.index >= 0) os << "[" << n.index << "]";
  return os;
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_defined(const at::Tensor& t, const char* op, const ArgName& name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
}

inline void check_floating(const at::Tensor& t, const char* op, const ArgName& name) {
  TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

// Every tensor argument of an op lives on the device of its first one; meta counts as a device (a meta tensor mixed
// with real ones must raise, as PyTorch's own ops do, not run a kernel on memory that does not exist). The fake
// kernels in mmer_ext/ops/_checks.py apply the same rules with the same messages: with any meta argument the
// dispatcher runs them instead of these C++ bodies.
inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const ArgName& name,
                              const ArgName& ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device(), "; move them to one device");
}

// A tensor read on the host (dialogue lengths, 0-d step parameters) may also stay on the CPU whatever ref's device;
// anywhere else it must be on ref's device. `what` says which tensors may stay on the CPU, for the message.
inline void check_host_or_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const ArgName& name,
                                      const ArgName& ref_name, const char* what) {
  TORCH_CHECK(t.device().is_cpu() || t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device(), "; pass ", what, " on the CPU or on ", ref_name, "'s device");
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op, const ArgName& name,
                             const ArgName& ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ",
              ref_name, " has ", ref.scalar_type(), "; cast them to one dtype");
}

// float32 math for float32/half/bfloat16 inputs, float64 for float64.
inline at::ScalarType opmath_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace mmer_ext
