// CUDA kernels of the CMD family: the two passes over a [B, D] input (see cmd.h), and the CUDA registration.
//
// column_power_sums: a block owns 32 consecutive columns (one per lane, so each warp reads 128 contiguous bytes
// per row) and one split of the rows; 8 row-lanes stride through the split, their partial sums meet in shared
// memory in a fixed order, and the per-split partials are summed by ATen. No atomics: results are deterministic
// on a given GPU, and nothing syncs with the host, so the ops can be captured in CUDA graphs.
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
constexpr int kMaxPowersPerLaunch = 4;
constexpr int kPolyThreads = 256;

// partial[s, q, d] = sum over the rows of split s of y^(p_lo + q), q < P, with y = (x - x[0]) - offset
// (offset == nullptr: 0).
template <int P, typename scalar_t, typename acc_t>
__global__ void column_power_sums_kernel(const scalar_t* __restrict__ x, int64_t B, int64_t D, int64_t rows_per_split,
                                         const acc_t* __restrict__ offset, int p_lo, acc_t* __restrict__ partial,
                                         int64_t partial_stride_s, int64_t partial_stride_q) {
  __shared__ acc_t smem[kRowLanes][P][kColsPerBlock];
  const int64_t d = int64_t(blockIdx.x) * kColsPerBlock + threadIdx.x;
  const int64_t r_begin = int64_t(blockIdx.y) * rows_per_split;
  const int64_t r_end = min(B, r_begin + rows_per_split);
  acc_t acc[P];
  MMER_UNROLL
  for (int q = 0; q < P; ++q) acc[q] = acc_t(0);
  if (d < D) {
    const scalar_t x0 = x[d];
    const acc_t off = offset == nullptr ? acc_t(0) : offset[d];
    for (int64_t r = r_begin + threadIdx.y; r < r_end; r += kRowLanes) {
      accumulate_powers<P>(centered<acc_t>(x[r * D + d], x0, off), p_lo, acc);
    }
  }
  MMER_UNROLL
  for (int q = 0; q < P; ++q) smem[threadIdx.y][q][threadIdx.x] = acc[q];
  __syncthreads();
  if (threadIdx.y == 0 && d < D) {
    MMER_UNROLL
    for (int q = 0; q < P; ++q) {
      acc_t s = acc_t(0);
      MMER_UNROLL
      for (int lane = 0; lane < kRowLanes; ++lane) s += smem[lane][q][threadIdx.x];
      partial[blockIdx.y * partial_stride_s + q * partial_stride_q + d] = s;
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void poly_grad_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t n, int64_t D,
                                 const acc_t* __restrict__ offset, const acc_t* __restrict__ coef, int64_t K) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t d = i % D;
    const acc_t y = centered<acc_t>(x[i], x[d], offset[d]);
    out[i] = static_cast<scalar_t>(horner(coef + d, D, K, y));
  }
}

// Row splits: enough blocks to fill the GPU a few times over, each thread still summing several rows.
int64_t row_splits(int64_t B, int64_t D) {
  const int64_t col_blocks = mmer_ext::cuda::ceil_div(D, kColsPerBlock);
  const int64_t wanted = mmer_ext::cuda::ceil_div(int64_t(mmer_ext::cuda::sm_count()) * 4, col_blocks);
  const int64_t max_splits = std::max<int64_t>(1, B / (kRowLanes * 4));
  return std::clamp<int64_t>(wanted, 1, std::min<int64_t>(max_splits, 65535));
}

// out ([n_powers, D], a view into stats) = mean over rows of y^(p_lo..p_lo+n_powers-1).
template <typename scalar_t, typename acc_t>
void mean_powers(const at::Tensor& x, const acc_t* offset, int p_lo, int64_t n_powers, at::Tensor out) {
  const int64_t B = x.size(0), D = x.size(1);
  const int64_t splits = row_splits(B, D);
  const int64_t rows_per_split = mmer_ext::cuda::ceil_div(B, splits);
  auto partial = at::empty({splits, n_powers, D}, out.options());
  const dim3 block(kColsPerBlock, kRowLanes);
  const dim3 grid(static_cast<unsigned>(mmer_ext::cuda::ceil_div(D, kColsPerBlock)), static_cast<unsigned>(splits));
  auto stream = at::cuda::getCurrentCUDAStream();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  for (int64_t q0 = 0; q0 < n_powers; q0 += kMaxPowersPerLaunch) {
    acc_t* pp = partial.mutable_data_ptr<acc_t>() + q0 * D;
    const int p = p_lo + static_cast<int>(q0);
    switch (std::min<int64_t>(kMaxPowersPerLaunch, n_powers - q0)) {
#define MMER_LAUNCH_POWER_SUMS(P)                                                                          \
  case P:                                                                                                  \
    column_power_sums_kernel<P, scalar_t, acc_t>                                                           \
        <<<grid, block, 0, stream>>>(xp, B, D, rows_per_split, offset, p, pp, n_powers * D, D);            \
    break;
      MMER_LAUNCH_POWER_SUMS(1)
      MMER_LAUNCH_POWER_SUMS(2)
      MMER_LAUNCH_POWER_SUMS(3)
      MMER_LAUNCH_POWER_SUMS(4)
#undef MMER_LAUNCH_POWER_SUMS
    }
    mmer_ext::cuda::launch_check("column_power_sums_kernel");
  }
  at::sum_out(out, partial, {0}).div_(static_cast<double>(B));
}

void column_stats_cuda(const at::Tensor& x, at::Tensor& stats) {
  const at::cuda::OptionalCUDAGuard guard(x.device());
  const int64_t D = x.size(1), K = stats.size(0);
  if (D == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mmer_ext.column_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Pass 1: offset = mean(x - x0). Pass 2: central powers about x0 + offset.
    mean_powers<scalar_t, acc_t>(x, nullptr, 1, 1, stats.narrow(0, 0, 1));
    if (K >= 2) mean_powers<scalar_t, acc_t>(x, stats.const_data_ptr<acc_t>(), 2, K - 1, stats.narrow(0, 1, K - 1));
  });
}

at::Tensor poly_grad_cuda(const at::Tensor& x, const at::Tensor& offset, const at::Tensor& coef) {
  const at::cuda::OptionalCUDAGuard guard(x.device());
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t n = x.numel();
  if (n == 0) return out;
  auto off = offset.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mmer_ext.poly_grad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    poly_grad_kernel<scalar_t, acc_t>
        <<<mmer_ext::cuda::grid_for(n, kPolyThreads), kPolyThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n, x.size(1), off.const_data_ptr<acc_t>(),
            coef.const_data_ptr<acc_t>(), coef.size(0));
    mmer_ext::cuda::launch_check("poly_grad_kernel");
  });
  return out;
}

const DeviceKernels kCudaKernels{&column_stats_cuda, &poly_grad_cuda};

at::Tensor central_moments_cuda(const at::Tensor& x, int64_t n_moments) {
  const at::cuda::OptionalCUDAGuard guard(x.device());
  return central_moments(kCudaKernels, x, n_moments);
}
at::Tensor central_moments_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& moments) {
  const at::cuda::OptionalCUDAGuard guard(x.device());
  return central_moments_backward(kCudaKernels, grad, x, moments);
}
std::tuple<at::Tensor, at::Tensor> cmd_pairwise_forward_cuda(at::TensorList xs, int64_t n_moments) {
  const at::cuda::OptionalCUDAGuard guard(xs.empty() ? at::Device(at::kCUDA) : xs[0].device());
  return cmd_pairwise_forward(kCudaKernels, xs, n_moments);
}
std::vector<at::Tensor> cmd_pairwise_backward_cuda(const at::Tensor& grad, at::TensorList xs,
                                                   const at::Tensor& stats) {
  const at::cuda::OptionalCUDAGuard guard(stats.device());
  return cmd_pairwise_backward(kCudaKernels, grad, xs, stats);
}

}  // namespace
}  // namespace mmer_ext::cmd

TORCH_LIBRARY_IMPL(mmer_ext, CUDA, m) {
  m.impl("central_moments", &mmer_ext::cmd::central_moments_cuda);
  m.impl("_central_moments_backward", &mmer_ext::cmd::central_moments_backward_cuda);
  m.impl("_cmd_pairwise_forward", &mmer_ext::cmd::cmd_pairwise_forward_cuda);
  m.impl("_cmd_pairwise_backward", &mmer_ext::cmd::cmd_pairwise_backward_cuda);
}
