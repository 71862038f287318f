#pragma once
// Scalar maths of the CMD family, shared by the CPU loops and the CUDA kernels.
//
// Statistics layout, per input x of shape [B, D], one column d at a time (rows of a [K+1, D] array):
//   row 0: shift  = mean of the first min(B, kShiftRows) rows, rounded to the opmath type
//   row 1: offset = mean_d - shift
//   row k: c_k    = mean over rows of y^k, k = 2..K,   y = (x - shift) - offset
// One pass accumulates the power sums of x - shift; raw_to_central turns them into central moments. The shift is
// within a few standard errors of the mean, so that conversion cancels nothing, and x - shift is exact when the
// spread is small against the magnitude (mean 1e4, std 1), where x - mean in float32 would lose the low digits.
#include <cstdint>

#include "common/macros.h"

namespace mmer_ext::cmd {

constexpr int64_t kShiftRows = 64;

template <typename acc_t, typename scalar_t, typename shift_t>
MMER_HD inline acc_t centered(scalar_t x, shift_t shift, acc_t offset) {
  return (static_cast<acc_t>(x) - static_cast<acc_t>(shift)) - offset;
}

// Adds y^p_lo, ..., y^(p_lo+P-1) to acc[0..P).
template <int P, typename T>
MMER_HD inline void accumulate_powers(T y, int p_lo, T* acc) {
  T p = y;
  for (int e = 1; e < p_lo; ++e) p *= y;
  MMER_UNROLL
  for (int q = 0; q < P; ++q) {
    acc[q] += p;
    p *= y;
  }
}

// In place, at one column: r[(p-1) * stride] = m_p, the mean of (x - shift)^p for p = 1..K, becomes the statistics
// rows 1..K: offset = m_1, then c_k = E[(y - offset)^k] for k >= 2 (y = x - shift). Pass i (p from K down to i)
// turns E[y^(p-i+1) (y - offset)^(i-1)] into E[y^(p-i) (y - offset)^i]; after pass p, slot p holds c_p and later
// passes leave it alone. Multiply-adds only: no binomial coefficients, no divisions.
template <typename T>
MMER_HD inline void raw_to_central(T* r, int64_t stride, int64_t K) {
  const T offset = r[0];
  for (int64_t i = 1; i <= K; ++i)
    for (int64_t p = K; p >= i; --p) r[(p - 1) * stride] -= offset * (p == 1 ? T(1) : r[(p - 2) * stride]);
  r[0] = offset;
}

// sum_{j<n} coef[j * stride] * y^j (Horner).
template <typename T>
MMER_HD inline T horner(const T* coef, int64_t stride, int64_t n, T y) {
  T acc = coef[(n - 1) * stride];
  for (int64_t j = n - 2; j >= 0; --j) acc = acc * y + coef[j * stride];
  return acc;
}

// Difference of statistic k (1: the mean, k >= 2: c_k) between inputs a and b; a and b point at row 0 of their
// statistics, column d. Means are compared as (shift_a - shift_b) + (offset_a - offset_b), which keeps the digits
// a large common mean would eat.
template <typename T>
MMER_HD inline T stat_diff(const T* a, const T* b, int64_t k, int64_t D) {
  return k == 1 ? (a[0] - b[0]) + (a[D] - b[D]) : a[k * D] - b[k * D];
}

// Index of the unordered pair (i, j), i < j, among the M(M-1)/2 pairs in row-major order of the upper triangle.
MMER_HD inline int64_t pair_index(int64_t i, int64_t j, int64_t M) { return i * (2 * M - i - 1) / 2 + (j - i - 1); }

// d(sum over pairs of ||stat_k(a) - stat_k(b)||) / d stat_k(i) at one column: sum over j != i of +-diff / norm.
// inv_norms[p * K + k - 1] is 1 / ||stat_k(a) - stat_k(b)|| for pair p = (a, b), or 0 where the statistics coincide:
// 0 is the subgradient we define for ||0||. stats points at input 0, column d; inputs are stride_m apart.
template <typename T>
MMER_HD inline T pairwise_stat_grad(const T* stats, int64_t stride_m, int64_t M, int64_t i, int64_t k, int64_t D,
                                    const T* inv_norms, int64_t K) {
  T g = T(0);
  for (int64_t j = 0; j < M; ++j) {
    if (j == i) continue;
    const int64_t a = i < j ? i : j, b = i < j ? j : i;
    const T diff = stat_diff(stats + a * stride_m, stats + b * stride_m, k, D);
    g += (i == a ? diff : -diff) * inv_norms[pair_index(a, b, M) * K + (k - 1)];
  }
  return g;
}

// 1 / norm, or 0 for a zero norm (see pairwise_stat_grad).
template <typename T>
MMER_HD inline T inverse_or_zero(T norm) {
  return norm > T(0) ? T(1) / norm : T(0);
}

// In place, at one column: g[(k-1) * stride] = dL/d(statistic k) (k = 1: the mean) becomes the coefficients
// a_j (g[j * stride]) of the gradient polynomial  B * dL/dx[b] = sum_j a_j y[b]^j.
// Since c_k depends on x[b] through (k/B) (y^(k-1) - mean(y^(k-1))), and the mean through 1/B:
//   a_0 = G_1 - sum_{k=3..K} k G_k c_{k-1}        (mean(y) = 0 removes the k = 2 term)
//   a_j = (j+1) G_{j+1},  j = 1..K-1              (a_j takes G_{j+1}'s slot)
// m[(k-1) * stride] holds c_k for k >= 2.
template <typename T>
MMER_HD inline void grad_coefficients_inplace(T* g, const T* m, int64_t stride, int64_t K) {
  T a0 = g[0];
  for (int64_t k = 3; k <= K; ++k) a0 -= T(k) * g[(k - 1) * stride] * m[(k - 2) * stride];
  g[0] = a0;
  for (int64_t j = 1; j < K; ++j) g[j * stride] *= T(j + 1);
}

}  // namespace mmer_ext::cmd
