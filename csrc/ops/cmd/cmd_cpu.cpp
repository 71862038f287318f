// CPU kernels of the CMD family: the two passes over a [B, D] input (see cmd.h).
//
// column_stats works on register tiles of kCols columns: every row adds its powers to accumulators that stay in
// vector registers, and every kRowBlock rows they are flushed into float64 totals, so float32 inputs sum in
// short float runs only. Work items are (row chunk, column tile) pairs whose layout depends on the shape alone,
// and their partial sums are added in a fixed order, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common/macros.h"
#include "ops/cmd/cmd.h"
#include "ops/cmd/cmd_math.h"

namespace mmer_ext::cmd {
namespace {

constexpr int kCols = 16;
constexpr int64_t kRowBlock = 64;
constexpr int kMaxPowersPerSweep = 4;
constexpr int64_t kTargetWorkItems = 64;

// Adds sum over rows [0, rows) of y^p_lo .. y^(p_lo+P-1) for W columns into out[q * out_stride + w].
// x points at the tile's first element, x0 at row 0 of the same columns, offset at the same columns.
template <int P, int W, typename scalar_t, typename acc_t>
MMER_EXT_CPU_MULTIVERSION void power_sums_tile(const scalar_t* __restrict x, int64_t ld, int64_t rows,
                                               const scalar_t* __restrict x0, const acc_t* __restrict offset,
                                               int p_lo, double* __restrict out, int64_t out_stride) {
  double total[P][W] = {};
  for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
    const int64_t r1 = std::min(rows, r0 + kRowBlock);
    acc_t acc[P][W] = {};
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* row = x + r * ld;
      acc_t y[W], p[W];
      for (int w = 0; w < W; ++w) y[w] = centered<acc_t>(row[w], x0[w], offset[w]);
      for (int w = 0; w < W; ++w) p[w] = y[w];
      for (int e = 1; e < p_lo; ++e)
        for (int w = 0; w < W; ++w) p[w] *= y[w];
      for (int q = 0; q < P; ++q) {
        for (int w = 0; w < W; ++w) acc[q][w] += p[w];
        for (int w = 0; w < W; ++w) p[w] *= y[w];
      }
    }
    for (int q = 0; q < P; ++q)
      for (int w = 0; w < W; ++w) total[q][w] += static_cast<double>(acc[q][w]);
  }
  for (int q = 0; q < P; ++q)
    for (int w = 0; w < W; ++w) out[q * out_stride + w] = total[q][w];
}

template <int P, typename scalar_t, typename acc_t>
void power_sums_columns(const scalar_t* x, int64_t D, int64_t rows, const scalar_t* x0, const acc_t* offset,
                        int64_t d0, int64_t d1, int p_lo, double* out) {
  int64_t d = d0;
  for (; d + kCols <= d1; d += kCols)
    power_sums_tile<P, kCols>(x + d, D, rows, x0 + d, offset + d, p_lo, out + d, D);
  for (; d < d1; ++d) power_sums_tile<P, 1>(x + d, D, rows, x0 + d, offset + d, p_lo, out + d, D);
}

// result[q, d] = mean over all B rows of y^(p_lo + q), q < n_powers, y = (x - x0) - offset.
template <typename scalar_t, typename acc_t>
void mean_powers(const scalar_t* x, int64_t B, int64_t D, const acc_t* offset, int p_lo, int n_powers,
                 acc_t* result) {
  const int64_t n_tiles = (D + kCols - 1) / kCols;
  const int64_t max_chunks = (B + kRowBlock - 1) / kRowBlock;
  const int64_t n_chunks = std::clamp<int64_t>((kTargetWorkItems + n_tiles - 1) / n_tiles, 1, max_chunks);
  const int64_t chunk_rows = (B + n_chunks - 1) / n_chunks;
  std::vector<double> partial(static_cast<size_t>(n_chunks * n_powers * D));
  // Tiles per work item: a few, so tiny D still splits into enough items and wide D keeps items short.
  const int64_t tiles_per_item = std::max<int64_t>(1, n_tiles / std::max<int64_t>(1, kTargetWorkItems / n_chunks));
  const int64_t items_per_chunk = (n_tiles + tiles_per_item - 1) / tiles_per_item;

  at::parallel_for(0, n_chunks * items_per_chunk, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t c = item / items_per_chunk;
      const int64_t t = item % items_per_chunk;
      const int64_t r0 = c * chunk_rows;
      const int64_t rows = std::min(B, r0 + chunk_rows) - r0;
      const int64_t d0 = t * tiles_per_item * kCols;
      const int64_t d1 = std::min(D, d0 + tiles_per_item * kCols);
      if (rows <= 0 || d0 >= d1) continue;
      for (int q0 = 0; q0 < n_powers; q0 += kMaxPowersPerSweep) {
        const int n = std::min(kMaxPowersPerSweep, n_powers - q0);
        double* out = partial.data() + (c * n_powers + q0) * D;
        const scalar_t* xs = x + r0 * D;
        switch (n) {
          case 1: power_sums_columns<1>(xs, D, rows, x, offset, d0, d1, p_lo + q0, out); break;
          case 2: power_sums_columns<2>(xs, D, rows, x, offset, d0, d1, p_lo + q0, out); break;
          case 3: power_sums_columns<3>(xs, D, rows, x, offset, d0, d1, p_lo + q0, out); break;
          default: power_sums_columns<4>(xs, D, rows, x, offset, d0, d1, p_lo + q0, out); break;
        }
      }
    }
  });

  for (int64_t q = 0; q < n_powers; ++q) {
    for (int64_t d = 0; d < D; ++d) {
      double s = 0;
      for (int64_t c = 0; c < n_chunks; ++c) s += partial[(c * n_powers + q) * D + d];
      result[q * D + d] = static_cast<acc_t>(s / static_cast<double>(B));
    }
  }
}

template <typename scalar_t, typename acc_t>
void column_stats_impl(const at::Tensor& x, at::Tensor& stats) {
  const int64_t B = x.size(0), D = x.size(1), K = stats.size(0);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  acc_t* sp = stats.mutable_data_ptr<acc_t>();
  if (D == 0) return;
  // Pass 1: offset = mean(x - x0). Pass 2: central powers about x0 + offset.
  std::vector<acc_t> zeros(static_cast<size_t>(D), acc_t(0));
  mean_powers<scalar_t, acc_t>(xp, B, D, zeros.data(), 1, 1, sp);
  if (K >= 2) mean_powers<scalar_t, acc_t>(xp, B, D, sp, 2, static_cast<int>(K - 1), sp + D);
}

template <int W, typename scalar_t, typename acc_t>
MMER_EXT_CPU_MULTIVERSION void poly_grad_tile(const scalar_t* __restrict x, scalar_t* __restrict out,
                                              const scalar_t* __restrict x0, const acc_t* __restrict offset,
                                              const acc_t* __restrict coef, int64_t K, int64_t ld) {
  acc_t y[W], acc[W];
  for (int w = 0; w < W; ++w) y[w] = centered<acc_t>(x[w], x0[w], offset[w]);
  for (int w = 0; w < W; ++w) acc[w] = coef[(K - 1) * ld + w];
  for (int64_t j = K - 2; j >= 0; --j)
    for (int w = 0; w < W; ++w) acc[w] = acc[w] * y[w] + coef[j * ld + w];
  for (int w = 0; w < W; ++w) out[w] = static_cast<scalar_t>(acc[w]);
}

template <typename scalar_t, typename acc_t>
void poly_grad_impl(const at::Tensor& x, const at::Tensor& offset, const at::Tensor& coef, at::Tensor& out) {
  const int64_t B = x.size(0), D = x.size(1), K = coef.size(0);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const acc_t* off = offset.const_data_ptr<acc_t>();
  const acc_t* cp = coef.const_data_ptr<acc_t>();
  // Rows stream through in order; the [K, D] coefficients stay in cache.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* row = xp + b * D;
      scalar_t* orow = op + b * D;
      int64_t d = 0;
      for (; d + kCols <= D; d += kCols) poly_grad_tile<kCols>(row + d, orow + d, xp + d, off + d, cp + d, K, D);
      for (; d < D; ++d) poly_grad_tile<1>(row + d, orow + d, xp + d, off + d, cp + d, K, D);
    }
  });
}

}  // namespace

void column_stats_cpu(const at::Tensor& x, at::Tensor& stats) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mmer_ext.column_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    column_stats_impl<scalar_t, acc_t>(x, stats);
  });
}

at::Tensor poly_grad_cpu(const at::Tensor& x, const at::Tensor& offset, const at::Tensor& coef) {
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return out;
  auto off = offset.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mmer_ext.poly_grad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    poly_grad_impl<scalar_t, acc_t>(x, off, coef, out);
  });
  return out;
}

}  // namespace mmer_ext::cmd
