#pragma once
// Scalar maths of the angular adjacency (MMGCN's dialogue graph), shared by the CPU loops and the CUDA kernels.
//
// Notation, for one dialogue: u = x / ||x|| the unit feature vectors (0 for a zero vector), c = u_p . u_q the cosine
// of an edge, t = scale * c, A = w(c) = 1 - arccos(t) / pi its weight, d_p = sum_q A_pq the degree, s_p = d_p^-1/2
// and the output Â_pq = A_pq s_p s_q (or A itself without normalisation). A self-loop's cosine is the constant 1
// (0 for a zero vector), not a computed dot product, so self-loops carry no gradient.
//
// Backward, given g = dL/dÂ (any orientation, not necessarily symmetric):
//   dL/dd_p  = r_p = -1/2 s_p^3 sum_q (g_pq + g_qp) A_pq s_q                          (degree term)
//   dL/dA_pq = g_pq s_p s_q + r_p
//   dL/dc    = (dL/dA_pq + dL/dA_qp) w'(c) = ((g_pq + g_qp) s_p s_q + r_p + r_q) w'(c)   (one per unordered pair)
//   dL/du_p  = sum over the edges {p, q} of dL/dc * u_q
//   dL/dx_p  = (dL/du_p - (dL/du_p . u_p) u_p) / ||x_p||   (0 for a zero vector)
// Without normalisation s = 1 and r = 0.
#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace mmer_ext::angular_adjacency {

constexpr double kPi = 3.14159265358979323846;
constexpr double kInvPi = 0.31830988618379067154;

// Floor of 1 - t^2 under the square root of the arccos derivative. With scale < 1 it is never reached
// (1 - t^2 >= 1 - scale^2 ~ 2e-5 for MMGCN's 0.99999); with scale = 1 it keeps the derivative at (anti)parallel
// pairs finite (at most 1 / (pi * 1e-6) per unit of upstream gradient) instead of infinite.
constexpr double kMinOneMinusT2 = 1e-12;

// sqrt and arccos of the operand's own precision on either side (the global ::sqrt(float) of host code would go
// through double).
template <typename T>
MMER_HD inline T sqrt_(T x) {
#if defined(__CUDA_ARCH__)
  return sqrt(x);
#else
  return std::sqrt(x);
#endif
}

// arccos for float: Cephes' minimax polynomial for arcsin on [0, 1/2] with the half-angle reduction above 1/2;
// at most 1.25 ulp from the correctly rounded value over [-1, 1]. Branch-free (selects only), so the CPU loops
// vectorise it and the GPU runs it without divergence; float results agree bit for bit between the devices.
MMER_HD inline float acos_approx(float x) {
  const float a = x < 0.0f ? -x : x;
  const bool big = a > 0.5f;
  const float z = big ? 0.5f * (1.0f - a) : a * a;
  const float s = big ? sqrt_(z) : a;
  float p = 4.2163199048e-2f;
  p = p * z + 2.4181311049e-2f;
  p = p * z + 4.5470025998e-2f;
  p = p * z + 7.4953002686e-2f;
  p = p * z + 1.6666752422e-1f;
  p = p * z * s + s;  // arcsin(s)
  const float r = big ? p + p : 1.57079632679489661923f - p;
  return x < 0.0f ? 3.14159265358979323846f - r : r;
}

MMER_HD inline double acos_approx(double x) {
#if defined(__CUDA_ARCH__)
  return acos(x);
#else
  return std::acos(x);
#endif
}

template <typename T>
MMER_HD inline T clamp_unit(T t) {
  return t > T(1) ? T(1) : (t < T(-1) ? T(-1) : t);
}

// MMGCN's edge weight 1 - arccos(scale * c) / pi, in [0, 1]. The clamp only absorbs rounding (|c| <= 1 + eps).
template <typename T>
MMER_HD inline T angular_weight(T c, T scale) {
  return T(1) - acos_approx(clamp_unit(scale * c)) * T(kInvPi);
}

// dw/dc = scale / (pi sqrt(1 - t^2)), t = scale * c, with 1 - t^2 floored at kMinOneMinusT2.
template <typename T>
MMER_HD inline T angular_weight_grad(T c, T scale) {
  const T t = clamp_unit(scale * c);
  T q = (T(1) - t) * (T(1) + t);
  q = q > T(kMinOneMinusT2) ? q : T(kMinOneMinusT2);
  return scale * T(kInvPi) / sqrt_(q);
}

// The weight of a self-loop, whose cosine is the constant 1 (0 for a zero vector, inv_norm = 0). unit_weight is
// angular_weight(1, scale) evaluated in float64 (see unit_self_weight): in float32, scale = 0.99999 itself is off by
// 3e-8, which the arccos slope of 224 there would turn into an error of 2e-6.
// A NaN row (NaN or Inf features) counts as non-zero, as in the reference: its other edges are NaN.
template <typename T>
MMER_HD inline T self_weight(T inv_norm, T unit_weight) {
  return inv_norm != T(0) ? unit_weight : T(0.5);
}

inline double unit_self_weight(double scale) { return angular_weight(1.0, scale); }

// Unit vectors without overflow or underflow. Cosines do not depend on the scale of the features, but sum x^2 does:
// in float32 it overflows at |x| ~ 1e19 and underflows below ~1e-19 (float64: 1e154 / 1e-154), which would make
// every cosine 0. So each row is first divided by its largest magnitude a = max_d |x_d| (the scaled row has
// entries in [-1, 1], one of them +-1, so 1 <= sum <= D), and then
//   u_d = (x_d / a) / ||x / a||,   1 / ||x|| = (1 / ||x / a||) / a.
// A zero row has a = 0: its divisor is taken as 1, and inverse_norm gives 0 (unit vector 0, every cosine with it 0,
// weight 0.5).

// Running max of |v| (a NaN compares false and is skipped here; it still poisons the sum of squares).
template <typename T>
MMER_HD inline T max_magnitude(T running, T v) {
  const T a = v < T(0) ? -v : v;
  return a > running ? a : running;
}

// What a row is divided by before its sum of squares: its largest magnitude, or 1 for a zero row.
template <typename T>
MMER_HD inline T row_divisor(T max_abs) {
  return max_abs > T(0) ? max_abs : T(1);
}

// 1 / ||y||, or 0 for a zero vector, from the sum of squares of y (y = x / row_divisor: never over- or underflows).
template <typename T>
MMER_HD inline T inverse_norm(T sum_of_squares) {
  return sum_of_squares > T(0) ? T(1) / sqrt_(sum_of_squares) : T(0);
}

// 1 / ||x|| from the scaled row's inverse norm (0 for a zero vector).
template <typename T>
MMER_HD inline T unscaled_inverse_norm(T scaled_inverse_norm, T divisor) {
  return scaled_inverse_norm / divisor;
}

// u_d from x_d, the row's divisor and the scaled row's inverse norm.
template <typename T>
MMER_HD inline T unit_component(T v, T divisor, T scaled_inverse_norm) {
  return (v / divisor) * scaled_inverse_norm;
}

// d^-1/2 of a degree. Every real node has d >= its self-loop weight >= 1/2 (scale in (0, 1]), so d > 0.
template <typename T>
MMER_HD inline T inverse_sqrt_degree(T degree) {
  return T(1) / sqrt_(degree);
}

// Intra-modality edge (i, j) of a dialogue exists when |i - j| <= window (window < 0: every pair).
MMER_HD inline bool in_window(int64_t i, int64_t j, int64_t window) {
  const int64_t d = i > j ? i - j : j - i;
  return window < 0 || d <= window;
}

// The degree term r_p (see the top of the file) from its accumulated sum_q (g_pq + g_qp) A_pq s_q.
template <typename T>
MMER_HD inline T degree_term(T sum, T s_p) {
  return T(-0.5) * s_p * s_p * s_p * sum;
}

// dL/dc of the unordered pair {p, q}: g_sym = g_pq + g_qp, s_* = d^-1/2 (1 without normalisation), r_* the degree
// terms (0 without normalisation), w_grad = w'(c).
template <typename T>
MMER_HD inline T pair_grad(T g_sym, T s_p, T s_q, T r_p, T r_q, T w_grad) {
  return (g_sym * s_p * s_q + r_p + r_q) * w_grad;
}

}  // namespace mmer_ext::angular_adjacency
