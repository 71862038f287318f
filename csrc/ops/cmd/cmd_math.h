#pragma once
// Scalar maths of the CMD family, shared by the CPU and CUDA kernels.
//
// Notation: x is [B, D]; x0 = x[0, :] is the per-column shift; offset = mean - x0. Every kernel centres a value as
// (x - x0) - offset instead of x - mean: for data whose spread is small against its magnitude (mean 1e4, std 1)
// the first difference is exact in floating point, so the central moments keep full precision where x - mean
// would lose the low digits of the mean.
#include "common/macros.h"

namespace mmer_ext::cmd {

template <typename acc_t, typename scalar_t>
MMER_HD inline acc_t centered(scalar_t x, scalar_t x0, acc_t offset) {
  return (static_cast<acc_t>(x) - static_cast<acc_t>(x0)) - offset;
}

// y^p for a small non-negative integer p, by repeated multiplication as the accumulation loops do.
template <typename T>
MMER_HD inline T int_pow(T y, int p) {
  T r = T(1);
  for (int i = 0; i < p; ++i) r *= y;
  return r;
}

// Adds y^p_lo, ..., y^(p_lo+P-1) to acc[0..P).
template <int P, typename T>
MMER_HD inline void accumulate_powers(T y, int p_lo, T* acc) {
  T p = int_pow(y, p_lo);
  MMER_UNROLL
  for (int q = 0; q < P; ++q) {
    acc[q] += p;
    p *= y;
  }
}

// sum_{j<n} coef[j * stride] * y^j (Horner). The gradient of any function of the central moments with respect to
// one element of x is such a polynomial in the centred element (see cmd.cpp, moment_grad_coefficients).
template <typename T>
MMER_HD inline T horner(const T* coef, long long stride, long long n, T y) {
  T acc = coef[(n - 1) * stride];
  for (long long j = n - 2; j >= 0; --j) acc = acc * y + coef[j * stride];
  return acc;
}

}  // namespace mmer_ext::cmd
