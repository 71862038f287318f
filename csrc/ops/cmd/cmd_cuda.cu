// CUDA kernels of the CMD family (see cmd.h): the passes over the [B, D] inputs, the per-column maths on the
// statistics, and the CUDA registration.
//
// cmd_power_sums_kernel: a block owns 32 consecutive columns (one per lane, so each warp reads 128 contiguous bytes
// per row) and one split of the rows; 8 row-lanes stride through the split, their partial sums meet in shared
// memory in a fixed order, and cmd_finalize_stats_kernel adds the splits in order. No atomics: results are
// deterministic on a given GPU, and nothing syncs with the host (the upstream gradient is read on the device), so the
// ops can be captured in CUDA graphs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/cuda_utils.cuh"
#include "ops/cmd/cmd.h"
#include "ops/cmd/cmd_math.h"

namespace mmer_ext::cmd {
namespace {

constexpr int kColsPerBlock = 32;
constexpr int kRowLanes = 8;
constexpr int kMaxPowersPerLaunch = 8;
constexpr int kFlushRows = 64;
constexpr int kPolyThreads = 256;
constexpr int kReduceThreads = 256;  // a power of two: the tree reduction halves it

// stats[0, d] = mean of the first min(B, kShiftRows) rows (the shift of cmd_math.h), one thread per column.
template <typename scalar_t, typename acc_t>
__global__ void cmd_shift_kernel(const scalar_t* __restrict__ x, int64_t B, int64_t D, acc_t* __restrict__ shift) {
  const int64_t d = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (d >= D) return;
  const int64_t rows = B < kShiftRows ? B : kShiftRows;
  double s = 0;
  for (int64_t r = 0; r < rows; ++r) s += static_cast<double>(x[r * D + d]);
  shift[d] = static_cast<acc_t>(s / static_cast<double>(rows));
}

// partial[s, q, d] = sum over the rows of split s of (x - shift)^(p_lo + q), q < P. As on the CPU, float runs are
// short: each thread flushes its float32 sums into float64 every kFlushRows of its rows.
template <int P, typename scalar_t, typename acc_t>
__global__ void cmd_power_sums_kernel(const scalar_t* __restrict__ x, int64_t B, int64_t D, int64_t rows_per_split,
                                  const acc_t* __restrict__ shift, int p_lo, double* __restrict__ partial,
                                  int64_t partial_stride_s, int64_t partial_stride_q) {
  __shared__ double smem[kRowLanes][P][kColsPerBlock];
  const int64_t d = int64_t(blockIdx.x) * kColsPerBlock + threadIdx.x;
  const int64_t r_begin = int64_t(blockIdx.y) * rows_per_split;
  const int64_t r_end = min(B, r_begin + rows_per_split);
  double total[P];
  MMER_UNROLL
  for (int q = 0; q < P; ++q) total[q] = 0.0;
  if (d < D) {
    const acc_t s = shift[d];
    int64_t r = r_begin + threadIdx.y;
    while (r < r_end) {
      acc_t acc[P];
      MMER_UNROLL
      for (int q = 0; q < P; ++q) acc[q] = acc_t(0);
      for (int n = 0; n < kFlushRows && r < r_end; ++n, r += kRowLanes) {
        accumulate_powers<P>(centered<acc_t>(x[r * D + d], s, acc_t(0)), p_lo, acc);
      }
      MMER_UNROLL
      for (int q = 0; q < P; ++q) total[q] += static_cast<double>(acc[q]);
    }
  }
  MMER_UNROLL
  for (int q = 0; q < P; ++q) smem[threadIdx.y][q][threadIdx.x] = total[q];
  __syncthreads();
  if (threadIdx.y == 0 && d < D) {
    MMER_UNROLL
    for (int q = 0; q < P; ++q) {
      double sum = 0.0;
      MMER_UNROLL
      for (int lane = 0; lane < kRowLanes; ++lane) sum += smem[lane][q][threadIdx.x];
      partial[blockIdx.y * partial_stride_s + q * partial_stride_q + d] = sum;
    }
  }
}

// stats rows 1..K from the per-split power sums, one thread per column: the splits are added in order, then the
// raw moments about the shift become central ones (in float64, in the raw scratch [K, D]).
template <typename acc_t>
__global__ void cmd_finalize_stats_kernel(const double* __restrict__ partial, int64_t splits, int64_t B, int64_t K,
                                      int64_t D, double* __restrict__ raw, acc_t* __restrict__ stats) {
  const int64_t d = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (d >= D) return;
  for (int64_t q = 0; q < K; ++q) {
    double s = 0;
    for (int64_t i = 0; i < splits; ++i) s += partial[(i * K + q) * D + d];
    raw[q * D + d] = s / static_cast<double>(B);
  }
  raw_to_central(raw + d, D, K);
  for (int64_t q = 0; q < K; ++q) stats[(q + 1) * D + d] = static_cast<acc_t>(raw[q * D + d]);
}

template <typename scalar_t, typename acc_t>
__global__ void cmd_poly_grad_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t n, int64_t D,
                                 const acc_t* __restrict__ shift, const acc_t* __restrict__ offset,
                                 const acc_t* __restrict__ coef, int64_t K, acc_t scale) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t d = i % D;
    const acc_t y = (static_cast<acc_t>(x[i]) - shift[d]) - offset[d];
    out[i] = static_cast<scalar_t>(scale * horner(coef + d, D, K, y));
  }
}

// One block walks the pairs and statistics in a fixed order; its threads split the columns of each norm. Writes
// inv_norms[p * K + k - 1] = inverse_or_zero(norm) when inv_norms != nullptr, and the mean over pairs of the sums
// of the norms to *loss when loss != nullptr.
template <typename acc_t, typename out_t>
__global__ void cmd_pair_norms_kernel(const acc_t* __restrict__ stats, int64_t M, int64_t K, int64_t D,
                                  acc_t* __restrict__ inv_norms, out_t* __restrict__ loss) {
  __shared__ double smem[kReduceThreads];  // float64 sums, as on the CPU
  const int64_t stride_m = (K + 1) * D;
  double total = 0.0;
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = i + 1; j < M; ++j) {
      for (int64_t k = 1; k <= K; ++k) {
        double sq = 0.0;
        for (int64_t d = threadIdx.x; d < D; d += kReduceThreads) {
          const double diff = stat_diff(stats + i * stride_m + d, stats + j * stride_m + d, k, D);
          sq += diff * diff;
        }
        smem[threadIdx.x] = sq;
        __syncthreads();
        for (int width = kReduceThreads / 2; width > 0; width /= 2) {
          if (threadIdx.x < width) smem[threadIdx.x] += smem[threadIdx.x + width];
          __syncthreads();
        }
        if (threadIdx.x == 0) {
          const double norm = sqrt(smem[0]);
          if (inv_norms != nullptr) {
            inv_norms[pair_index(i, j, M) * K + (k - 1)] = inverse_or_zero(static_cast<acc_t>(norm));
          }
          total += norm;
        }
        __syncthreads();
      }
    }
  }
  if (threadIdx.x == 0 && loss != nullptr) *loss = static_cast<out_t>(total / static_cast<double>(M * (M - 1) / 2));
}

// coef[i, :, d] for every input i and column d (one thread each); *grad is the upstream gradient of the loss.
template <typename acc_t>
__global__ void cmd_pairwise_coefficients_kernel(const acc_t* __restrict__ stats, const acc_t* __restrict__ inv_norms,
                                             const acc_t* __restrict__ grad, int64_t M, int64_t K, int64_t D,
                                             acc_t* __restrict__ coef) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= M * D) return;
  const int64_t i = t / D, d = t % D;
  const int64_t stride_m = (K + 1) * D;
  const acc_t scale = *grad / acc_t(M * (M - 1) / 2);
  acc_t* g = coef + i * K * D + d;
  for (int64_t k = 1; k <= K; ++k) g[(k - 1) * D] = scale * pairwise_stat_grad(stats + d, stride_m, M, i, k, D, inv_norms, K);
  grad_coefficients_inplace(g, stats + i * stride_m + D + d, D, K);
}

template <typename acc_t>
__global__ void cmd_moment_coefficients_kernel(acc_t* __restrict__ coef, const acc_t* __restrict__ moments, int64_t K,
                                           int64_t D) {
  const int64_t d = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (d < D) grad_coefficients_inplace(coef + d, moments + d, D, K);
}

// Row splits: enough blocks to fill the GPU a few times over, each thread still summing several rows.
int64_t row_splits(int64_t B, int64_t D) {
  const int64_t col_blocks = mmer_ext::cuda::ceil_div(D, kColsPerBlock);
  const int64_t wanted = mmer_ext::cuda::ceil_div(int64_t(mmer_ext::cuda::sm_count()) * 4, col_blocks);
  const int64_t max_splits = std::max<int64_t>(1, B / (kRowLanes * 4));
  return std::clamp<int64_t>(wanted, 1, std::min<int64_t>(max_splits, 65535));
}

template <typename scalar_t, typename acc_t>
void launch_power_sums(int64_t n_powers, const scalar_t* x, int64_t B, int64_t D, int64_t rows_per_split,
                       const acc_t* shift, int p_lo, double* partial, int64_t partial_stride_s, int64_t splits,
                       cudaStream_t stream) {
  const dim3 block(kColsPerBlock, kRowLanes);
  const dim3 grid(static_cast<unsigned>(mmer_ext::cuda::ceil_div(D, kColsPerBlock)), static_cast<unsigned>(splits));
  switch (n_powers) {
#define MMER_LAUNCH_POWER_SUMS(P)                                                                               \
  case P:                                                                                                       \
    cmd_power_sums_kernel<P, scalar_t, acc_t>                                                                       \
        <<<grid, block, 0, stream>>>(x, B, D, rows_per_split, shift, p_lo, partial, partial_stride_s, D);        \
    break;
    MMER_LAUNCH_POWER_SUMS(1)
    MMER_LAUNCH_POWER_SUMS(2)
    MMER_LAUNCH_POWER_SUMS(3)
    MMER_LAUNCH_POWER_SUMS(4)
    MMER_LAUNCH_POWER_SUMS(5)
    MMER_LAUNCH_POWER_SUMS(6)
    MMER_LAUNCH_POWER_SUMS(7)
    MMER_LAUNCH_POWER_SUMS(8)
#undef MMER_LAUNCH_POWER_SUMS
  }
  mmer_ext::cuda::launch_check("cmd_power_sums_kernel");
}

void cmd_column_stats_cuda(const at::Tensor& x, at::Tensor& stats) {
  const at::cuda::OptionalCUDAGuard guard(x.device());
  const int64_t B = x.size(0), D = x.size(1), K = stats.size(0) - 1;
  if (D == 0) return;
  const int64_t splits = row_splits(B, D);
  const int64_t rows_per_split = mmer_ext::cuda::ceil_div(B, splits);
  auto partial = at::empty({splits, K, D}, stats.options().dtype(at::kDouble));
  auto raw = at::empty({K, D}, stats.options().dtype(at::kDouble));
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto column_blocks = static_cast<unsigned>(mmer_ext::cuda::ceil_div(D, kPolyThreads));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mmer_ext.cmd_column_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    acc_t* sp = stats.mutable_data_ptr<acc_t>();
    cmd_shift_kernel<scalar_t, acc_t><<<column_blocks, kPolyThreads, 0, stream>>>(xp, B, D, sp);
    mmer_ext::cuda::launch_check("cmd_shift_kernel");
    // Powers 1..K of x - shift in one read of x when K <= kMaxPowersPerLaunch.
    for (int64_t q0 = 0; q0 < K; q0 += kMaxPowersPerLaunch) {
      launch_power_sums<scalar_t, acc_t>(std::min<int64_t>(kMaxPowersPerLaunch, K - q0), xp, B, D, rows_per_split,
                                         sp, static_cast<int>(q0) + 1, partial.mutable_data_ptr<double>() + q0 * D,
                                         K * D, splits, stream);
    }
    cmd_finalize_stats_kernel<acc_t><<<column_blocks, kPolyThreads, 0, stream>>>(
        partial.const_data_ptr<double>(), splits, B, K, D, raw.mutable_data_ptr<double>(), sp);
    mmer_ext::cuda::launch_check("cmd_finalize_stats_kernel");
  });
}

at::Tensor cmd_pairwise_loss_cuda(const at::Tensor& stats, at::ScalarType dtype) {
  const at::cuda::OptionalCUDAGuard guard(stats.device());
  auto loss = at::empty({}, stats.options().dtype(dtype));
  const int64_t M = stats.size(0), K = stats.size(1) - 1, D = stats.size(2);
  AT_DISPATCH_FLOATING_TYPES(stats.scalar_type(), "mmer_ext.cmd_pairwise_loss_cuda", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "mmer_ext.cmd_pairwise_loss_cuda", [&] {
      cmd_pair_norms_kernel<acc_t, scalar_t><<<1, kReduceThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          stats.const_data_ptr<acc_t>(), M, K, D, nullptr, loss.mutable_data_ptr<scalar_t>());
      mmer_ext::cuda::launch_check("cmd_pair_norms_kernel");
    });
  });
  return loss;
}

at::Tensor cmd_pairwise_coefficients_cuda(const at::Tensor& grad, const at::Tensor& stats) {
  const at::cuda::OptionalCUDAGuard guard(stats.device());
  const int64_t M = stats.size(0), K = stats.size(1) - 1, D = stats.size(2);
  auto coef = at::empty({M, K, D}, stats.options());
  auto inv_norms = at::empty({M * (M - 1) / 2, K}, stats.options());
  auto g = grad.contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(stats.scalar_type(), "mmer_ext.cmd_pairwise_coefficients_cuda", [&] {
    cmd_pair_norms_kernel<scalar_t, scalar_t><<<1, kReduceThreads, 0, stream>>>(
        stats.const_data_ptr<scalar_t>(), M, K, D, inv_norms.mutable_data_ptr<scalar_t>(), nullptr);
    mmer_ext::cuda::launch_check("cmd_pair_norms_kernel");
    if (M * D > 0) {
      const auto blocks = static_cast<unsigned>(mmer_ext::cuda::ceil_div(M * D, kPolyThreads));
      cmd_pairwise_coefficients_kernel<scalar_t><<<blocks, kPolyThreads, 0, stream>>>(
          stats.const_data_ptr<scalar_t>(), inv_norms.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), M, K, D,
          coef.mutable_data_ptr<scalar_t>());
      mmer_ext::cuda::launch_check("cmd_pairwise_coefficients_kernel");
    }
  });
  return coef;
}

at::Tensor cmd_moment_coefficients_cuda(const at::Tensor& grad, const at::Tensor& moments) {
  const at::cuda::OptionalCUDAGuard guard(grad.device());
  auto coef = grad.clone();
  const int64_t K = coef.size(0), D = coef.size(1);
  if (D == 0) return coef;
  AT_DISPATCH_FLOATING_TYPES(coef.scalar_type(), "mmer_ext.cmd_moment_coefficients_cuda", [&] {
    const auto blocks = static_cast<unsigned>(mmer_ext::cuda::ceil_div(D, kPolyThreads));
    cmd_moment_coefficients_kernel<scalar_t><<<blocks, kPolyThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        coef.mutable_data_ptr<scalar_t>(), moments.const_data_ptr<scalar_t>(), K, D);
    mmer_ext::cuda::launch_check("cmd_moment_coefficients_kernel");
  });
  return coef;
}

at::Tensor cmd_poly_grad_cuda(const at::Tensor& x, const at::Tensor& center, const at::Tensor& coef, double scale) {
  const at::cuda::OptionalCUDAGuard guard(x.device());
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t n = x.numel();
  if (n == 0) return out;
  auto c = center.narrow(0, 0, 2).contiguous();
  auto k = coef.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mmer_ext.cmd_poly_grad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* cp = c.const_data_ptr<acc_t>();
    cmd_poly_grad_kernel<scalar_t, acc_t>
        <<<mmer_ext::cuda::grid_for(n, kPolyThreads), kPolyThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n, x.size(1), cp, cp + x.size(1),
            k.const_data_ptr<acc_t>(), k.size(0), static_cast<acc_t>(scale));
    mmer_ext::cuda::launch_check("cmd_poly_grad_kernel");
  });
  return out;
}

const DeviceKernels kCudaKernels{&cmd_column_stats_cuda, &cmd_pairwise_loss_cuda, &cmd_pairwise_coefficients_cuda,
                                 &cmd_moment_coefficients_cuda, &cmd_poly_grad_cuda};

}  // namespace
}  // namespace mmer_ext::cmd

TORCH_LIBRARY_IMPL(mmer_ext, CUDA, m) {
  mmer_ext::cmd::register_cmd_ops<mmer_ext::cmd::kCudaKernels>(m);
}
