// CPU kernels of the CMD family (see cmd.h): the passes over the [B, D] inputs and the per-column maths on the statistics.
//
// column_stats works on one SIMD vector of columns at a time: every row adds its powers to accumulators that stay
// in registers, and every kRowBlock rows they are flushed into float64 totals, so float32 inputs sum in short
// float runs only. Work items are (row chunk, column tile) pairs whose layout depends on the shape alone,
// and their partial sums are added in a fixed order, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/cpu_simd.h"
#include "common/macros.h"
#include "ops/cmd/cmd.h"
#include "ops/cmd/cmd_math.h"

namespace mmer_ext::cmd {
namespace {

using cpu::Simd;
constexpr int64_t kRowBlock = 64;
constexpr int kMaxPowersPerSweep = 8;
constexpr int64_t kTargetWorkItems = 64;
constexpr int64_t kMinElementsPerTask = 1 << 15;

// out[q * D + d] = sum over rows [0, rows) of y^(p_lo+q), q < P, for columns [d0, d1); y = x - shift.
// x points at the first row of the chunk. The rows go by in blocks of kRowBlock that
// stay in cache; within a block, each vector of columns keeps its P accumulators in registers, then adds them to
// float64 totals (scratch: P * (d1 - d0) doubles).
template <int P, typename scalar_t, typename acc_t>
MMER_EXT_CPU_MULTIVERSION void power_sums(const scalar_t* __restrict x, int64_t D, int64_t rows,
                                          const acc_t* __restrict shift, int64_t d0,
                                          int64_t d1, int p_lo, double* __restrict out, double* __restrict total) {
  using Vec = typename Simd<acc_t>::Vec;
  constexpr int L = Simd<acc_t>::kLanes;
  const int64_t n = d1 - d0;
  const int64_t n_vec = n - n % L;
  for (int64_t i = 0; i < P * n; ++i) total[i] = 0.0;
  for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
    const int64_t r1 = std::min(rows, r0 + kRowBlock);
    // Two vectors of columns per sweep over the rows: each accumulator is a chain of dependent adds, and two
    // independent sets of chains keep the adders busy. Lane by lane the operations are those of one vector.
    int64_t c = 0;
    for (; c + 2 * L <= n_vec; c += 2 * L) {
      const int64_t d = d0 + c;
      const Vec s0 = cpu::load<acc_t>(shift + d), s1 = cpu::load<acc_t>(shift + d + L);
      Vec acc0[P] = {}, acc1[P] = {};
      for (int64_t r = r0; r < r1; ++r) {
        const Vec y0 = cpu::load<acc_t>(x + r * D + d) - s0;
        const Vec y1 = cpu::load<acc_t>(x + r * D + d + L) - s1;
        Vec p0 = y0, p1 = y1;
        for (int e = 1; e < p_lo; ++e) {
          p0 *= y0;
          p1 *= y1;
        }
        for (int q = 0; q < P; ++q) {
          acc0[q] += p0;
          acc1[q] += p1;
          p0 *= y0;
          p1 *= y1;
        }
      }
      for (int q = 0; q < P; ++q)
        for (int w = 0; w < L; ++w) {
          total[q * n + c + w] += static_cast<double>(acc0[q][w]);
          total[q * n + c + L + w] += static_cast<double>(acc1[q][w]);
        }
    }
    for (; c < n_vec; c += L) {
      const int64_t d = d0 + c;
      const Vec s = cpu::load<acc_t>(shift + d);
      Vec acc[P] = {};
      for (int64_t r = r0; r < r1; ++r) {
        const Vec y = cpu::load<acc_t>(x + r * D + d) - s;
        Vec p = y;
        for (int e = 1; e < p_lo; ++e) p *= y;
        for (int q = 0; q < P; ++q) {
          acc[q] += p;
          p *= y;
        }
      }
      for (int q = 0; q < P; ++q)
        for (int w = 0; w < L; ++w) total[q * n + c + w] += static_cast<double>(acc[q][w]);
    }
    for (int64_t c = n_vec; c < n; ++c) {  // the last n % L columns
      const int64_t d = d0 + c;
      acc_t acc[P] = {};
      for (int64_t r = r0; r < r1; ++r) accumulate_powers<P>(centered<acc_t>(x[r * D + d], shift[d], acc_t(0)), p_lo, acc);
      for (int q = 0; q < P; ++q) total[q * n + c] += static_cast<double>(acc[q]);
    }
  }
  for (int q = 0; q < P; ++q)
    for (int64_t c = 0; c < n; ++c) out[q * D + d0 + c] = total[q * n + c];
}

// raw_to_central (cmd_math.h) of the D columns of r ([K, D]) at once, the loops over columns innermost so they
// vectorise; column by column the operations are raw_to_central's, in its order. Deliberately not multiversioned:
// the x86-64-v3/v4 clones would contract `a -= b * c` into FMAs and change the rounding from the baseline build's.
void raw_to_central_columns(double* __restrict r, int64_t D, int64_t K) {
  std::vector<double> offset(r, r + D);
  for (int64_t i = 1; i <= K; ++i) {
    for (int64_t p = K; p >= i; --p) {
      double* __restrict dst = r + (p - 1) * D;
      if (p == 1) {
        for (int64_t d = 0; d < D; ++d) dst[d] -= offset[d];
      } else {
        const double* __restrict src = r + (p - 2) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] -= offset[d] * src[d];
      }
    }
  }
  std::copy(offset.begin(), offset.end(), r);
}

// grad_coefficients_inplace (cmd_math.h) of the D columns of g ([K, D]; m's row k-1 holds c_k) at once, columns
// innermost; column by column its operations in its order. Not multiversioned, as raw_to_central_columns.
template <typename T>
void grad_coefficients_columns(T* __restrict g, const T* __restrict m, int64_t D, int64_t K) {
  for (int64_t k = 3; k <= K; ++k) {
    const T* gk = g + (k - 1) * D;
    const T* mk = m + (k - 2) * D;
    for (int64_t d = 0; d < D; ++d) g[d] -= T(k) * gk[d] * mk[d];
  }
  for (int64_t j = 1; j < K; ++j) {
    T* gj = g + j * D;
    for (int64_t d = 0; d < D; ++d) gj[d] *= T(j + 1);
  }
}

// shift[d] = sum of rows [0, rows) of column d, in float64, row by row (the order does not depend on the target).
template <typename scalar_t>
MMER_EXT_CPU_MULTIVERSION void column_sums(const scalar_t* __restrict x, int64_t rows, int64_t D,
                                           double* __restrict out) {
  for (int64_t d = 0; d < D; ++d) out[d] = 0.0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < D; ++d) out[d] += static_cast<double>(x[r * D + d]);
}

// stats rows 1..K (see cmd_math.h) from one pass over x, given row 0 (the shift).
template <typename scalar_t, typename acc_t>
void moments_about_shift(const scalar_t* x, int64_t B, int64_t D, int64_t K, acc_t* stats) {
  constexpr int64_t L = Simd<acc_t>::kLanes;
  // Work items: row chunks first (they read contiguous memory); column ranges too only when rows are few.
  // The layout depends on the shape alone, so the summation order, and the result, do not depend on threads.
  const int64_t n_tiles = (D + L - 1) / L;
  const int64_t n_chunks = std::clamp<int64_t>(kTargetWorkItems, 1, (B + kRowBlock - 1) / kRowBlock);
  const int64_t chunk_rows = (B + n_chunks - 1) / n_chunks;
  const int64_t tiles_per_item = std::max<int64_t>(1, n_tiles / std::max<int64_t>(1, kTargetWorkItems / n_chunks));
  const int64_t items_per_chunk = (n_tiles + tiles_per_item - 1) / tiles_per_item;
  std::vector<double> partial(static_cast<size_t>(n_chunks * K * D));
  const acc_t* shift = stats;
  // Small inputs stay on the calling thread: waking the pool costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(1, chunk_rows * tiles_per_item * L));

  at::parallel_for(0, n_chunks * items_per_chunk, grain, [&](int64_t begin, int64_t end) {
    std::vector<double> scratch(static_cast<size_t>(kMaxPowersPerSweep * tiles_per_item * L));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t c = item / items_per_chunk;
      const int64_t r0 = c * chunk_rows;
      const int64_t rows = std::min(B, r0 + chunk_rows) - r0;
      const int64_t d0 = (item % items_per_chunk) * tiles_per_item * L;
      const int64_t d1 = std::min(D, d0 + tiles_per_item * L);
      if (rows <= 0 || d0 >= d1) continue;
      // Powers 1..K of x - shift, in sweeps of up to kMaxPowersPerSweep (one sweep for the usual K <= 8).
      for (int64_t q0 = 0; q0 < K; q0 += kMaxPowersPerSweep) {
        double* out = partial.data() + (c * K + q0) * D;
        const scalar_t* xc = x + r0 * D;
        const int p = static_cast<int>(q0) + 1;
        switch (std::min<int64_t>(kMaxPowersPerSweep, K - q0)) {
#define MMER_POWER_SUMS_CASE(P) \
  case P:                       \
    power_sums<P>(xc, D, rows, shift, d0, d1, p, out, scratch.data()); \
    break;
          MMER_POWER_SUMS_CASE(1)
          MMER_POWER_SUMS_CASE(2)
          MMER_POWER_SUMS_CASE(3)
          MMER_POWER_SUMS_CASE(4)
          MMER_POWER_SUMS_CASE(5)
          MMER_POWER_SUMS_CASE(6)
          MMER_POWER_SUMS_CASE(7)
          MMER_POWER_SUMS_CASE(8)
#undef MMER_POWER_SUMS_CASE
        }
      }
    }
  });

  // Chunks are added in order (contiguous rows, so this vectorises), then each column's raw moments about the
  // shift become central ones.
  std::vector<double> raw(partial.begin(), partial.begin() + K * D);
  for (int64_t c = 1; c < n_chunks; ++c) {
    const double* pc = partial.data() + c * K * D;
    for (int64_t i = 0; i < K * D; ++i) raw[i] += pc[i];
  }
  const double inv_b = 1.0 / static_cast<double>(B);
  for (int64_t i = 0; i < K * D; ++i) raw[i] *= inv_b;
  raw_to_central_columns(raw.data(), D, K);
  for (int64_t i = 0; i < K * D; ++i) stats[D + i] = static_cast<acc_t>(raw[i]);
}

template <typename scalar_t, typename acc_t>
void column_stats_impl(const at::Tensor& x, at::Tensor& stats) {
  const int64_t B = x.size(0), D = x.size(1), K = stats.size(0) - 1;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  acc_t* sp = stats.mutable_data_ptr<acc_t>();
  if (D == 0) return;
  const int64_t shift_rows = std::min(B, kShiftRows);
  std::vector<double> shift(static_cast<size_t>(D));
  column_sums(xp, shift_rows, D, shift.data());
  for (int64_t d = 0; d < D; ++d) sp[d] = static_cast<acc_t>(shift[d] / static_cast<double>(shift_rows));
  moments_about_shift<scalar_t, acc_t>(xp, B, D, K, sp);
}

// One row of poly_grad: out[d] = scale * sum_j coef[j, d] y^j (Horner), y = (x[d] - shift[d]) - offset[d].
template <typename scalar_t, typename acc_t>
MMER_EXT_CPU_MULTIVERSION void poly_grad_row(const scalar_t* __restrict x, scalar_t* __restrict out,
                                             const acc_t* __restrict shift, const acc_t* __restrict offset,
                                             const acc_t* __restrict coef, int64_t K, int64_t D, acc_t scale) {
  using Vec = typename Simd<acc_t>::Vec;
  constexpr int L = Simd<acc_t>::kLanes;
  int64_t d = 0;
  for (; d + L <= D; d += L) {
    const Vec y = (cpu::load<acc_t>(x + d) - cpu::load<acc_t>(shift + d)) - cpu::load<acc_t>(offset + d);
    Vec acc = cpu::load<acc_t>(coef + (K - 1) * D + d);
    for (int64_t j = K - 2; j >= 0; --j) acc = acc * y + cpu::load<acc_t>(coef + j * D + d);
    cpu::store<scalar_t, acc_t>(out + d, acc * scale);
  }
  for (; d < D; ++d)
    out[d] = static_cast<scalar_t>(scale * horner(coef + d, D, K, centered<acc_t>(x[d], shift[d], offset[d])));
}

// norms[p * K + k - 1] = ||stat_k(i) - stat_k(j)||_2 for every pair p = (i < j), summed in float64.
template <typename acc_t>
std::vector<acc_t> pair_norms(const acc_t* stats, int64_t M, int64_t K, int64_t D) {
  std::vector<acc_t> norms(static_cast<size_t>(M * (M - 1) / 2 * K));
  const int64_t stride_m = (K + 1) * D;
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = i + 1; j < M; ++j) {
      for (int64_t k = 1; k <= K; ++k) {
        double sq = 0;
        for (int64_t d = 0; d < D; ++d) {
          const double diff = stat_diff(stats + i * stride_m + d, stats + j * stride_m + d, k, D);
          sq += diff * diff;
        }
        norms[pair_index(i, j, M) * K + (k - 1)] = static_cast<acc_t>(std::sqrt(sq));
      }
    }
  }
  return norms;
}

template <typename scalar_t, typename acc_t>
void poly_grad_impl(const at::Tensor& x, const acc_t* shift, const acc_t* offset, const at::Tensor& coef,
                    acc_t scale, at::Tensor& out) {
  const int64_t B = x.size(0), D = x.size(1), K = coef.size(0);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const acc_t* cp = coef.const_data_ptr<acc_t>();
  // Rows stream through in order; the [K, D] coefficients stay in cache.
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(D, 1));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      poly_grad_row<scalar_t, acc_t>(xp + b * D, op + b * D, shift, offset, cp, K, D, scale);
  });
}

void cmd_column_stats_cpu(const at::Tensor& x, at::Tensor& stats) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mmer_ext.cmd_column_stats_cpu", [&] {
    column_stats_impl<scalar_t, at::opmath_type<scalar_t>>(x, stats);
  });
}

at::Tensor cmd_pairwise_loss_cpu(const at::Tensor& stats, at::ScalarType dtype) {
  const int64_t M = stats.size(0), K = stats.size(1) - 1, D = stats.size(2);
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES(stats.scalar_type(), "mmer_ext.cmd_pairwise_loss_cpu", [&] {
    for (auto n : pair_norms(stats.const_data_ptr<scalar_t>(), M, K, D)) total += static_cast<double>(n);
  });
  return at::scalar_tensor(total / static_cast<double>(M * (M - 1) / 2), stats.options().dtype(dtype));
}

at::Tensor cmd_pairwise_coefficients_cpu(const at::Tensor& grad, const at::Tensor& stats) {
  const int64_t M = stats.size(0), K = stats.size(1) - 1, D = stats.size(2);
  auto coef = at::empty({M, K, D}, stats.options());
  AT_DISPATCH_FLOATING_TYPES(stats.scalar_type(), "mmer_ext.cmd_pairwise_coefficients_cpu", [&] {
    const scalar_t* sp = stats.const_data_ptr<scalar_t>();
    scalar_t* cp = coef.mutable_data_ptr<scalar_t>();
    auto inv_norms = pair_norms(sp, M, K, D);
    for (auto& n : inv_norms) n = inverse_or_zero(n);
    const scalar_t scale = grad.const_data_ptr<scalar_t>()[0] / static_cast<scalar_t>(M * (M - 1) / 2);
    const int64_t stride_m = (K + 1) * D;
    // pairwise_stat_grad and grad_coefficients_inplace (cmd_math.h) on all D columns at once, columns innermost so
    // the loops vectorise; column by column the operations and their order are those of the two helpers. Not
    // multiversioned, for the reason given at raw_to_central_columns.
    for (int64_t i = 0; i < M; ++i) {
      scalar_t* g = cp + i * K * D;
      for (int64_t k = 1; k <= K; ++k) {
        scalar_t* __restrict gk = g + (k - 1) * D;
        for (int64_t d = 0; d < D; ++d) gk[d] = scalar_t(0);
        for (int64_t j = 0; j < M; ++j) {
          if (j == i) continue;
          const int64_t a = std::min(i, j), b = std::max(i, j);
          const scalar_t* sa = sp + a * stride_m;
          const scalar_t* sb = sp + b * stride_m;
          const scalar_t inv = inv_norms[pair_index(a, b, M) * K + (k - 1)];
          if (i == a) {
            for (int64_t d = 0; d < D; ++d) gk[d] += stat_diff(sa + d, sb + d, k, D) * inv;
          } else {
            for (int64_t d = 0; d < D; ++d) gk[d] += -stat_diff(sa + d, sb + d, k, D) * inv;
          }
        }
        for (int64_t d = 0; d < D; ++d) gk[d] = scale * gk[d];
      }
      grad_coefficients_columns(g, sp + i * stride_m + D, D, K);
    }
  });
  return coef;
}

at::Tensor cmd_moment_coefficients_cpu(const at::Tensor& grad, const at::Tensor& moments) {
  auto coef = grad.clone();
  const int64_t K = coef.size(0), D = coef.size(1);
  AT_DISPATCH_FLOATING_TYPES(coef.scalar_type(), "mmer_ext.cmd_moment_coefficients_cpu", [&] {
    scalar_t* cp = coef.mutable_data_ptr<scalar_t>();
    const scalar_t* mp = moments.const_data_ptr<scalar_t>();
    grad_coefficients_columns(cp, mp, D, K);
  });
  return coef;
}

at::Tensor cmd_poly_grad_cpu(const at::Tensor& x, const at::Tensor& center, const at::Tensor& coef, double scale) {
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return out;
  auto c = center.narrow(0, 0, 2).contiguous();
  auto k = coef.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mmer_ext.cmd_poly_grad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* cp = c.const_data_ptr<acc_t>();
    poly_grad_impl<scalar_t, acc_t>(x, cp, cp + x.size(1), k, static_cast<acc_t>(scale), out);
  });
  return out;
}

}  // namespace

const DeviceKernels kCpuKernels{&cmd_column_stats_cpu, &cmd_pairwise_loss_cpu, &cmd_pairwise_coefficients_cpu,
                                &cmd_moment_coefficients_cpu, &cmd_poly_grad_cpu};

}  // namespace mmer_ext::cmd
