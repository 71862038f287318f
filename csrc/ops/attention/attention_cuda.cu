// CUDA kernels of the attention op (see attention.h).
//
// Thread-per-row kernels: the head widths this op is for (D = 4 .. 64) leave too little work per score for a
// warp-per-row or tensor-core tiling to pay at MulT's lengths. attention_forward_kernel: one thread per query row,
// an online-softmax pass for the row's max and sum, then the weighted sum of v in chunks of kChunk channels.
// The backward is two kernels without atomics, so it is deterministic: one thread per query row for dq (and the
// row's delta = dout . out, kept for the second), one thread per key row for dk and dv. Each recomputes the scores
// and regenerates the dropout bits from rng, which the forward's first thread wrote from the generator's
// graph-safe Philox state, so the op can be captured in a CUDA graph and each replay draws a fresh mask.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/cuda_utils.cuh"
#include "common/philox_cuda.cuh"
#include "ops/attention/attention.h"
#include "ops/attention/attention_math.h"

namespace mmer_ext::attention {
namespace {

constexpr int kThreads = 128;
constexpr int kChunk = 16;  // output channels accumulated in registers per pass over the keys

template <typename scalar_t>
struct View {
  const scalar_t* data;
  int64_t sb, sh, sl, sd;
  __device__ const scalar_t* row(int64_t b, int64_t h, int64_t l) const { return data + b * sb + h * sh + l * sl; }
};

template <typename scalar_t>
struct OutView {
  scalar_t* data;
  int64_t sb, sh, sl, sd;
  __device__ scalar_t* row(int64_t b, int64_t h, int64_t l) const { return data + b * sb + h * sh + l * sl; }
};

template <typename scalar_t>
View<scalar_t> view(const at::Tensor& t) {
  return {t.const_data_ptr<scalar_t>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

template <typename scalar_t>
OutView<scalar_t> out_view(at::Tensor& t) {
  return {t.mutable_data_ptr<scalar_t>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

template <typename acc_t>
struct Dims {
  int64_t heads, lq, lk, dim;
  acc_t scale, inv_keep;
  uint32_t threshold;  // 0: no dropout
  const bool* mask;    // [Lq, Lk] or nullptr
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t dot_row(const scalar_t* a, int64_t sa, const scalar_t* b, int64_t sb, int64_t n) {
  acc_t s = 0;
  for (int64_t d = 0; d < n; ++d) s += static_cast<acc_t>(a[d * sa]) * static_cast<acc_t>(b[d * sb]);
  return s;
}

// Dropout factor of score (row r = b H Lq + h Lq + i, key j).
template <typename acc_t>
__device__ __forceinline__ acc_t factor_of(const Dims<acc_t>& s, int64_t r, int64_t j, uint64_t key, uint64_t ctr) {
  if (s.threshold == 0u) return acc_t(1);
  return keep_factor<acc_t>(dropout_bits(static_cast<uint64_t>(r * s.lk + j), key, ctr), s.threshold, s.inv_keep);
}

template <typename scalar_t, typename acc_t>
__global__ void attention_forward_kernel(View<scalar_t> q, View<scalar_t> k, View<scalar_t> v, OutView<scalar_t> out,
                                         acc_t* __restrict__ lse, int64_t* __restrict__ rng, int64_t rows,
                                         Dims<acc_t> s, at::PhiloxCudaState philox) {
  const PhiloxSeed seed = s.threshold != 0u ? mmer_ext::cuda::unpack_seed(philox) : PhiloxSeed{0, 0};
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    rng[0] = static_cast<int64_t>(seed.seed);
    rng[1] = static_cast<int64_t>(seed.counter_lo);
  }
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < rows; r += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = r % s.lq, bh = r / s.lq, b = bh / s.heads, h = bh % s.heads;
    const scalar_t* qi = q.row(b, h, i);
    const bool* mrow = s.mask != nullptr ? s.mask + i * s.lk : nullptr;
    acc_t m = -INFINITY, l = 0;
    for (int64_t j = 0; j < s.lk; ++j) {
      if (mrow != nullptr && mrow[j]) continue;
      const acc_t x = s.scale * dot_row<scalar_t, acc_t>(qi, q.sd, k.row(b, h, j), k.sd, s.dim);
      if (x > m) {
        l = l * exp(m - x) + acc_t(1);
        m = x;
      } else {
        l += exp(x - m);
      }
    }
    const acc_t row = row_lse<acc_t>(m, l);
    lse[r] = row;
    scalar_t* o = out.row(b, h, i);
    for (int64_t d0 = 0; d0 < s.dim; d0 += kChunk) {
      acc_t acc[kChunk];
#pragma unroll
      for (int c = 0; c < kChunk; ++c) acc[c] = 0;
      for (int64_t j = 0; j < s.lk; ++j) {
        if (mrow != nullptr && mrow[j]) continue;
        const acc_t x = s.scale * dot_row<scalar_t, acc_t>(qi, q.sd, k.row(b, h, j), k.sd, s.dim);
        const acc_t p = exp(x - row) * factor_of(s, r, j, seed.seed, seed.counter_lo);
        const scalar_t* vj = v.row(b, h, j);
#pragma unroll
        for (int c = 0; c < kChunk; ++c) {
          if (d0 + c < s.dim) acc[c] += p * static_cast<acc_t>(vj[(d0 + c) * v.sd]);
        }
      }
#pragma unroll
      for (int c = 0; c < kChunk; ++c) {
        if (d0 + c < s.dim) o[(d0 + c) * out.sd] = static_cast<scalar_t>(acc[c]);
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void attention_dq_kernel(View<scalar_t> q, View<scalar_t> k, View<scalar_t> v, View<scalar_t> grad,
                                    View<scalar_t> out, const acc_t* __restrict__ lse,
                                    const int64_t* __restrict__ rng, acc_t* __restrict__ delta,
                                    OutView<scalar_t> dq, int64_t rows, Dims<acc_t> s) {
  const auto key = static_cast<uint64_t>(rng[0]), ctr = static_cast<uint64_t>(rng[1]);
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < rows; r += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = r % s.lq, bh = r / s.lq, b = bh / s.heads, h = bh % s.heads;
    const scalar_t* qi = q.row(b, h, i);
    const scalar_t* gi = grad.row(b, h, i);
    const bool* mrow = s.mask != nullptr ? s.mask + i * s.lk : nullptr;
    const acc_t di = dot_row<scalar_t, acc_t>(gi, grad.sd, out.row(b, h, i), out.sd, s.dim);
    delta[r] = di;
    const acc_t row = lse[r];
    scalar_t* o = dq.row(b, h, i);
    for (int64_t d0 = 0; d0 < s.dim; d0 += kChunk) {
      acc_t acc[kChunk];
#pragma unroll
      for (int c = 0; c < kChunk; ++c) acc[c] = 0;
      for (int64_t j = 0; j < s.lk; ++j) {
        if (mrow != nullptr && mrow[j]) continue;
        const scalar_t* kj = k.row(b, h, j);
        const acc_t p = exp(s.scale * dot_row<scalar_t, acc_t>(qi, q.sd, kj, k.sd, s.dim) - row);
        const acc_t dp = dot_row<scalar_t, acc_t>(gi, grad.sd, v.row(b, h, j), v.sd, s.dim);
        const acc_t ds = score_gradient<acc_t>(p, dp, factor_of(s, r, j, key, ctr), di);
#pragma unroll
        for (int c = 0; c < kChunk; ++c) {
          if (d0 + c < s.dim) acc[c] += ds * static_cast<acc_t>(kj[(d0 + c) * k.sd]);
        }
      }
#pragma unroll
      for (int c = 0; c < kChunk; ++c) {
        if (d0 + c < s.dim) o[(d0 + c) * dq.sd] = static_cast<scalar_t>(acc[c] * s.scale);
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void attention_dkv_kernel(View<scalar_t> q, View<scalar_t> k, View<scalar_t> v, View<scalar_t> grad,
                                     const acc_t* __restrict__ lse, const int64_t* __restrict__ rng,
                                     const acc_t* __restrict__ delta, OutView<scalar_t> dk, OutView<scalar_t> dv,
                                     int64_t keys, Dims<acc_t> s) {
  const auto key = static_cast<uint64_t>(rng[0]), ctr = static_cast<uint64_t>(rng[1]);
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < keys; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = t % s.lk, bh = t / s.lk, b = bh / s.heads, h = bh % s.heads;
    const scalar_t* kj = k.row(b, h, j);
    const scalar_t* vj = v.row(b, h, j);
    scalar_t* ok = dk.row(b, h, j);
    scalar_t* ov = dv.row(b, h, j);
    for (int64_t d0 = 0; d0 < s.dim; d0 += kChunk) {
      acc_t ak[kChunk], av[kChunk];
#pragma unroll
      for (int c = 0; c < kChunk; ++c) ak[c] = av[c] = 0;
      for (int64_t i = 0; i < s.lq; ++i) {
        if (s.mask != nullptr && s.mask[i * s.lk + j]) continue;
        const int64_t r = bh * s.lq + i;
        const scalar_t* qi = q.row(b, h, i);
        const scalar_t* gi = grad.row(b, h, i);
        const acc_t p = exp(s.scale * dot_row<scalar_t, acc_t>(qi, q.sd, kj, k.sd, s.dim) - lse[r]);
        const acc_t f = factor_of(s, r, j, key, ctr);
        const acc_t dp = dot_row<scalar_t, acc_t>(gi, grad.sd, vj, v.sd, s.dim);
        const acc_t ds = score_gradient<acc_t>(p, dp, f, delta[r]);
#pragma unroll
        for (int c = 0; c < kChunk; ++c) {
          if (d0 + c < s.dim) {
            ak[c] += ds * static_cast<acc_t>(qi[(d0 + c) * q.sd]);
            av[c] += p * f * static_cast<acc_t>(gi[(d0 + c) * grad.sd]);
          }
        }
      }
#pragma unroll
      for (int c = 0; c < kChunk; ++c) {
        if (d0 + c < s.dim) {
          ok[(d0 + c) * dk.sd] = static_cast<scalar_t>(ak[c] * s.scale);
          ov[(d0 + c) * dv.sd] = static_cast<scalar_t>(av[c]);
        }
      }
    }
  }
}

template <typename acc_t>
Dims<acc_t> dims_of(const Problem& p) {
  return {p.heads, p.lq, p.lk, p.dim, static_cast<acc_t>(p.scale), static_cast<acc_t>(1.0 / (1.0 - p.dropout)),
          p.dropout > 0.0 ? dropout_threshold(p.dropout) : 0u,
          p.mask != nullptr ? p.mask->const_data_ptr<bool>() : nullptr};
}

void attention_forward_cuda(const Problem& p, at::Tensor& out, at::Tensor& lse, at::Tensor& rng,
                            const std::optional<at::Generator>& generator) {
  const at::cuda::OptionalCUDAGuard guard(p.q.device());
  const at::PhiloxCudaState philox =
      p.dropout > 0.0 ? mmer_ext::cuda::philox_state(generator, p.q.device()) : at::PhiloxCudaState();
  const int64_t rows = p.batch * p.heads * p.lq;
  if (rows == 0) return;  // rng stays zero: nothing was drawn from it
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.q.scalar_type(), "mmer_ext.attention_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    attention_forward_kernel<scalar_t, acc_t><<<mmer_ext::cuda::grid_for(rows, kThreads), kThreads, 0, stream>>>(
        view<scalar_t>(p.q), view<scalar_t>(p.k), view<scalar_t>(p.v), out_view<scalar_t>(out),
        lse.mutable_data_ptr<acc_t>(), rng.mutable_data_ptr<int64_t>(), rows, dims_of<acc_t>(p), philox);
    mmer_ext::cuda::launch_check("attention_forward_kernel");
  });
}

void attention_backward_cuda(const Problem& p, const at::Tensor& grad, const at::Tensor& out, const at::Tensor& lse,
                             const at::Tensor& rng, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const at::cuda::OptionalCUDAGuard guard(p.q.device());
  const int64_t rows = p.batch * p.heads * p.lq, keys = p.batch * p.heads * p.lk;
  if (rows == 0) {  // no query: nothing reaches the keys
    dk.zero_();
    dv.zero_();
    return;
  }
  auto delta = at::empty({rows}, lse.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.q.scalar_type(), "mmer_ext.attention_backward_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto s = dims_of<acc_t>(p);
    attention_dq_kernel<scalar_t, acc_t><<<mmer_ext::cuda::grid_for(rows, kThreads), kThreads, 0, stream>>>(
        view<scalar_t>(p.q), view<scalar_t>(p.k), view<scalar_t>(p.v), view<scalar_t>(grad), view<scalar_t>(out),
        lse.const_data_ptr<acc_t>(), rng.const_data_ptr<int64_t>(), delta.mutable_data_ptr<acc_t>(),
        out_view<scalar_t>(dq), rows, s);
    mmer_ext::cuda::launch_check("attention_dq_kernel");
    if (keys == 0) return;
    attention_dkv_kernel<scalar_t, acc_t><<<mmer_ext::cuda::grid_for(keys, kThreads), kThreads, 0, stream>>>(
        view<scalar_t>(p.q), view<scalar_t>(p.k), view<scalar_t>(p.v), view<scalar_t>(grad),
        lse.const_data_ptr<acc_t>(), rng.const_data_ptr<int64_t>(), delta.const_data_ptr<acc_t>(),
        out_view<scalar_t>(dk), out_view<scalar_t>(dv), keys, s);
    mmer_ext::cuda::launch_check("attention_dkv_kernel");
  });
}

}  // namespace

const DeviceKernels kCudaKernels{&attention_forward_cuda, &attention_backward_cuda};

}  // namespace mmer_ext::attention

TORCH_LIBRARY_IMPL(mmer_ext, CUDA, m) {
  mmer_ext::attention::register_attention_ops<mmer_ext::attention::kCudaKernels>(m);
}
