#pragma once
// Scalar maths of the sampling-step ops, shared by the CPU loops and the CUDA kernels.
//
// Every step op is the same affine map per element, with per-sample coefficients:
//   m = a * x + b * s            (s: score / eps; "x_mean", "x0_pred")
//   n = c * m + d * s + e * z    (z: standard normal noise; "x_next", "x_prev")
// step_coefficients() gives (a, b, c, d, e) of each op from its per-sample parameters (t, alpha_bar, ...).
//
// In-kernel noise: element i of a call gets normal (i mod 4) of the Philox-4x32-10 block with key = seed and
// counter = (offset / 4, i / 4) (low 64 bits, high 64 bits), i.e. the first four draws of curand_init(seed,
// subsequence = i / 4, offset). That is the layout torch's own kernels use with one "thread" per group of 4, so
// a generator's offset increments keep our draws disjoint from other ops' draws. The value of an element depends
// on (seed, offset, i) only, not on threads, blocks or vector widths, and the same code runs on the CPU.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/macros.h"
#include "common/philox.h"

namespace mmer_ext::diffusion {

// std:: overloads (float math for float) on the host; nvcc maps them to the device functions.
using std::exp;
using std::expm1;
using std::log;
using std::sqrt;

// Which op a set of coefficients belongs to (see step_coefficients).
enum class StepKind : int { kPerturb = 0, kEulerMaruyama = 1, kOde = 2, kDdim = 3, kLangevin = 4 };

template <typename T>
struct Coefs {
  T a, b, c, d, e;
};

// A uniform in (0, 1) from 32 random bits (curand's mapping: never 0, so the log below is finite).
template <typename T>
MMER_HD inline T uniform_open(uint32_t bits) {
  return static_cast<T>(bits) * static_cast<T>(2.3283064365386963e-10) + static_cast<T>(1.1641532182693481e-10);
}

MMER_HD inline uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

MMER_HD inline float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// Natural log of u in (0, 1], float32 (Cephes logf's reduction and polynomial, ~1 ulp). Branch-free, so the CPU
// loops over it vectorise; libm's logf does not.
MMER_HD inline float log_unit(float u) {
  const uint32_t bits = float_bits(u);
  float e = static_cast<float>(static_cast<int32_t>(bits >> 23) - 126);
  float m = bits_float((bits & 0x007fffffu) | 0x3f000000u);  // u = m * 2^e, m in [0.5, 1)
  const bool low = m < 0.70710678f;
  e = low ? e - 1.0f : e;
  const float x = (low ? m + m : m) - 1.0f;  // in [sqrt(0.5) - 1, sqrt(2) - 1)
  const float z = x * x;
  float y = 7.0376836292e-2f;
  y = y * x - 1.1514610310e-1f;
  y = y * x + 1.1676998740e-1f;
  y = y * x - 1.2420140846e-1f;
  y = y * x + 1.4249322787e-1f;
  y = y * x - 1.6668057665e-1f;
  y = y * x + 2.0000714765e-1f;
  y = y * x - 2.4999993993e-1f;
  y = y * x + 3.3333331174e-1f;
  y = y * x * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return (x + y) + 0.693359375f * e;
}

// sin(pi x) and cos(pi x) for x in [0, 2], float32, branch-free: x = q/2 + r with |r| <= 1/4, Taylor series of
// sin and cos at pi r (truncation error < 3e-8), then a rotation by q quarter turns.
MMER_HD inline void sincospi_unit(float x, float* s_out, float* c_out) {
  const int32_t q = static_cast<int32_t>(2.0f * x + 0.5f);
  const float y = (x - 0.5f * static_cast<float>(q)) * 3.14159265358979f;
  const float y2 = y * y;
  const float s =
      y * (1.0f + y2 * (-1.6666667163e-1f +
                        y2 * (8.3333337680e-3f + y2 * (-1.9841270114e-4f + y2 * 2.7557314297e-6f))));
  const float c =
      1.0f + y2 * (-0.5f + y2 * (4.1666667908e-2f +
                                 y2 * (-1.3888889225e-3f + y2 * (2.4801587642e-5f - y2 * 2.7557314297e-7f))));
  const bool odd = (q & 1) != 0, negate = (q & 2) != 0;
  const float so = odd ? c : s, co = odd ? -s : c;
  *s_out = negate ? -so : so;
  *c_out = negate ? -co : co;
}

// Box-Muller: two standard normals from the bits of a radius and an angle uniform. Always float32 arithmetic: the
// noise is then the same for every dtype (a float64 op gets the float32 normals, exactly converted), and a 32-bit
// uniform carries no more precision than that anyway.
MMER_HD inline void box_muller(uint32_t radius_bits, uint32_t angle_bits, float* z0, float* z1) {
  const float radius = sqrt(-2.0f * log_unit(uniform_open<float>(radius_bits)));
  float s, c;
  sincospi_unit(2.0f * uniform_open<float>(angle_bits), &s, &c);
  *z0 = radius * c;
  *z1 = radius * s;
}

// The four standard normals of group `group`: Box-Muller on (bits 0, 1) and (bits 2, 3) of its Philox block.
template <typename T>
MMER_HD inline void normal4(uint64_t seed, uint64_t counter_lo, uint64_t group, T out[4]) {
  const Uint4 r = philox4x32_10(counter_lo, group, seed);
  float z[4];
  box_muller(r.v[0], r.v[1], &z[0], &z[1]);
  box_muller(r.v[2], r.v[3], &z[2], &z[3]);
  MMER_UNROLL
  for (int k = 0; k < 4; ++k) out[k] = static_cast<T>(z[k]);
}

// ---- VE SDE and step coefficients -----------------------------------------------------------------------------

// std(t) = sqrt((sigma^(2t) - 1) / (2 ln sigma)); expm1 keeps full relative precision near t = 0.
template <typename T>
MMER_HD inline T ve_std(T t, T log_sigma) {
  return sqrt(expm1(T(2) * log_sigma * t) / (T(2) * log_sigma));
}

// DDIM (Song et al. 2021, eq. 12): x0 = (x_t - sqrt(1-ab_t) eps) / sqrt(ab_t);
// x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - s^2) eps + s z, s = eta sqrt((1-ab_prev)/(1-ab_t) (1 - ab_t/ab_prev)).
// Rounding guards as in ddim_coefficients_ref: s = 0 when ab_t = 1 or the product is negative; the direction
// coefficient's radicand is floored at 0.
template <typename T>
MMER_HD inline Coefs<T> ddim_coefficients(T ab_t, T ab_prev, T eta) {
  const T one_minus_t = T(1) - ab_t;
  T var = T(0);
  if (one_minus_t > T(0)) {
    var = (T(1) - ab_prev) / one_minus_t * (T(1) - ab_t / ab_prev);
    if (!(var > T(0))) var = T(0);
  }
  const T s = eta * sqrt(var);
  T dir2 = T(1) - ab_prev - s * s;
  if (!(dir2 > T(0))) dir2 = T(0);
  const T inv_sqrt_t = T(1) / sqrt(ab_t);
  return Coefs<T>{inv_sqrt_t, -sqrt(one_minus_t) * inv_sqrt_t, sqrt(ab_prev), sqrt(dir2), s};
}

// Coefficients of one sample: p0 is t (VE ops), alpha_bar_t (DDIM) or the step size eps_b (Langevin); p1 is
// alpha_bar_prev (DDIM). Coefficients an op does not write are still well defined (m = x, n = m).
template <typename T>
MMER_HD inline Coefs<T> step_coefficients(StepKind kind, T p0, T p1, T log_sigma, T dt, T eta) {
  switch (kind) {
    case StepKind::kPerturb:
      return Coefs<T>{T(1), T(0), T(1), T(0), ve_std(p0, log_sigma)};
    case StepKind::kEulerMaruyama: {
      const T g = exp(log_sigma * p0);
      return Coefs<T>{T(1), g * g * dt, T(1), T(0), sqrt(dt) * g};
    }
    case StepKind::kOde: {
      const T g = exp(log_sigma * p0);
      return Coefs<T>{T(1), T(0.5) * g * g * dt, T(1), T(0), T(0)};
    }
    case StepKind::kDdim:
      return ddim_coefficients(p0, p1, eta);
    case StepKind::kLangevin:
    default:
      return Coefs<T>{T(1), p0, T(1), T(0), sqrt(T(2) * p0)};
  }
}

template <typename To, typename From>
MMER_HD inline Coefs<To> cast_coefs(const Coefs<From>& c) {
  return Coefs<To>{static_cast<To>(c.a), static_cast<To>(c.b), static_cast<To>(c.c), static_cast<To>(c.d),
                   static_cast<To>(c.e)};
}

// Langevin step size from the per-sample sums of squares: 2 (snr ||z|| / ||s||)^2, 0 for a zero score.
template <typename T>
MMER_HD inline T langevin_step_size(T score_sq, T noise_sq, T snr) {
  return score_sq > T(0) ? T(2) * snr * snr * noise_sq / score_sq : T(0);
}

// A per-sample parameter: a value known on the host, or a [B] (stride 1) / 0-d (stride 0) array.
template <typename T>
struct SampleParam {
  const T* ptr;
  int64_t stride;
  T value;
  MMER_HD T at(int64_t b) const { return ptr != nullptr ? ptr[b * stride] : value; }
};

}  // namespace mmer_ext::diffusion
