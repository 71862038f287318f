// CUDA kernels of the sampling-step ops (see diffusion_steps.h) and the CUDA registration.
//
// diffusion_steps_affine_step_kernel: a grid-stride loop over groups of 4 consecutive elements (one Philox block of
// noise per group, see diffusion_steps_math.h), with one 4-wide vector load/store per tensor when every pointer is
// aligned for it; float32 math for float16/bfloat16. Coefficients computed on the host when the parameters are host
// values (Python floats, 0-d CPU tensors); otherwise from the per-sample parameters, once per group.
// Langevin: per-sample sums of squares of score and noise over chunks of each sample (the in-kernel noise is
// regenerated, never stored), the step sizes in order over the chunks (no atomics: deterministic), then the same
// affine kernel with the same Philox state, so both passes see the same noise.
// Nothing here syncs with the host and the Philox state comes from the generator's graph-safe philox_cuda_state(), so
// the ops can be captured in CUDA graphs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/cuda_utils.cuh"
#include "common/philox_cuda.cuh"
#include "ops/diffusion_steps/diffusion_steps.h"
#include "ops/diffusion_steps/diffusion_steps_math.h"

namespace mmer_ext::diffusion {
namespace {

constexpr int kThreads = 256;
constexpr int kReduceThreads = 256;
constexpr int64_t kMinChunk = 4096;  // elements per reduction block, at least

enum NoiseMode : int { kNoNoise = 0, kNoiseTensor = 1, kNoisePhilox = 2 };

template <typename T>
struct alignas(sizeof(T) * 4) Vec4 {
  T v[4];
};

template <typename acc_t>
struct CoefSource {
  StepKind kind;
  SampleParam<acc_t> p0, p1;
  acc_t log_sigma, dt, eta;
  bool uniform;        // host parameters: `fixed` holds every sample's coefficients
  Coefs<acc_t> fixed;
  // Sample of an element: a multiply-shift when every index is below 2^31 (a 64-bit division is tens of
  // instructions, per group).
  at::cuda::detail::IntDivider<uint32_t> inner32;
  int64_t inner;
  bool small;
  __device__ int64_t sample_of(int64_t e) const {
    return small ? static_cast<int64_t>(inner32.div(static_cast<uint32_t>(e))) : e / inner;
  }
  __device__ Coefs<acc_t> at(int64_t b) const {
    return uniform ? fixed : step_coefficients<acc_t>(kind, p0.at(b), p1.at(b), log_sigma, dt, eta);
  }
};

template <typename acc_t>
void set_sample_divider(CoefSource<acc_t>& c, int64_t inner, int64_t numel) {
  c.inner = inner;
  c.small = numel <= static_cast<int64_t>(INT32_MAX);  // IntDivider<uint32_t> is exact below 2^31
  c.inner32 = at::cuda::detail::IntDivider<uint32_t>(c.small ? static_cast<uint32_t>(inner) : 1u);
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load4(const scalar_t* __restrict__ p, int64_t e0, int count, bool vec, acc_t out[4]) {
  if (vec && count == 4) {
    const Vec4<scalar_t> v = *reinterpret_cast<const Vec4<scalar_t>*>(p + e0);
    MMER_UNROLL
    for (int k = 0; k < 4; ++k) out[k] = static_cast<acc_t>(v.v[k]);
  } else {
    MMER_UNROLL
    for (int k = 0; k < 4; ++k) out[k] = k < count ? static_cast<acc_t>(p[e0 + k]) : acc_t(0);
  }
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store4(scalar_t* __restrict__ p, int64_t e0, int count, bool vec, const acc_t in[4]) {
  if (vec && count == 4) {
    Vec4<scalar_t> v;
    MMER_UNROLL
    for (int k = 0; k < 4; ++k) v.v[k] = static_cast<scalar_t>(in[k]);
    *reinterpret_cast<Vec4<scalar_t>*>(p + e0) = v;
  } else {
    MMER_UNROLL
    for (int k = 0; k < 4; ++k)
      if (k < count) p[e0 + k] = static_cast<scalar_t>(in[k]);
  }
}

// m = a x + b s, n = c m + d s + e z (diffusion_steps_math.h); s, m_out or n_out may be null.
template <typename scalar_t, typename acc_t, int kNoise>
__global__ void diffusion_steps_affine_step_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ s,
                                   const scalar_t* __restrict__ z, scalar_t* __restrict__ m_out,
                                   scalar_t* __restrict__ n_out, int64_t numel, CoefSource<acc_t> coefs,
                                   at::PhiloxCudaState philox, bool vec) {
  PhiloxSeed seed{0, 0};
  if constexpr (kNoise == kNoisePhilox) seed = mmer_ext::cuda::unpack_seed(philox);
  const int64_t groups = (numel + 3) / 4;
  for (int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e0 = g * 4;
    const int count = numel - e0 < 4 ? static_cast<int>(numel - e0) : 4;
    acc_t xv[4], sv[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)}, zv[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    load4(x, e0, count, vec, xv);
    if (s != nullptr) load4(s, e0, count, vec, sv);
    if constexpr (kNoise == kNoiseTensor) load4(z, e0, count, vec, zv);
    if constexpr (kNoise == kNoisePhilox) normal4<acc_t>(seed.seed, seed.counter_lo, static_cast<uint64_t>(g), zv);
    // A group lies in one sample unless the sample size is not a multiple of 4.
    Coefs<acc_t> c0 = coefs.fixed;
    bool one_sample = true;
    if (!coefs.uniform) {
      const int64_t b0 = coefs.sample_of(e0);
      one_sample = coefs.sample_of(e0 + count - 1) == b0;
      c0 = coefs.at(b0);
    }
    acc_t mv[4], nv[4];
    MMER_UNROLL
    for (int k = 0; k < 4; ++k) {
      const Coefs<acc_t> c = one_sample || k >= count ? c0 : coefs.at(coefs.sample_of(e0 + k));
      mv[k] = c.a * xv[k] + c.b * sv[k];
      nv[k] = c.c * mv[k] + c.d * sv[k] + c.e * zv[k];
    }
    if (m_out != nullptr) store4(m_out, e0, count, vec, mv);
    if (n_out != nullptr) store4(n_out, e0, count, vec, nv);
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* smem) {
  MMER_UNROLL
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  acc_t total = acc_t(0);
  if (threadIdx.x == 0) {
    for (int w = 0; w < kReduceThreads / 32; ++w) total += smem[w];
  }
  __syncthreads();
  return total;
}

// partial[2 * item + {0, 1}] = sums of score^2 and z^2 over chunk c of sample b, item = b * chunks + c.
template <typename scalar_t, typename acc_t, int kNoise>
__global__ void diffusion_steps_langevin_partial_kernel(const scalar_t* __restrict__ s, const scalar_t* __restrict__ z,
                                                        int64_t inner,
                                        int64_t chunk, int64_t chunks, at::PhiloxCudaState philox,
                                        acc_t* __restrict__ partial) {
  __shared__ acc_t smem[kReduceThreads / 32];
  const int64_t item = blockIdx.x;
  const int64_t b = item / chunks, c = item % chunks;
  const int64_t lo = b * inner + c * chunk;
  const int64_t hi = min((b + 1) * inner, lo + chunk);
  PhiloxSeed seed{0, 0};
  if constexpr (kNoise == kNoisePhilox) seed = mmer_ext::cuda::unpack_seed(philox);
  acc_t ss = acc_t(0), zz = acc_t(0);
  if (lo < hi) {
    // Whole Philox groups that meet [lo, hi); elements outside belong to the neighbouring chunk or sample.
    for (int64_t g = lo / 4 + threadIdx.x; g <= (hi - 1) / 4; g += blockDim.x) {
      acc_t zv[4];
      if constexpr (kNoise == kNoisePhilox) normal4<acc_t>(seed.seed, seed.counter_lo, static_cast<uint64_t>(g), zv);
      MMER_UNROLL
      for (int k = 0; k < 4; ++k) {
        const int64_t e = g * 4 + k;
        if (e < lo || e >= hi) continue;
        const acc_t sv = static_cast<acc_t>(s[e]);
        acc_t zk;
        if constexpr (kNoise == kNoisePhilox) {
          zk = zv[k];
        } else {
          zk = static_cast<acc_t>(z[e]);
        }
        ss += sv * sv;
        zz += zk * zk;
      }
    }
  }
  ss = block_sum(ss, smem);
  zz = block_sum(zz, smem);
  if (threadIdx.x == 0) {
    partial[2 * item] = ss;
    partial[2 * item + 1] = zz;
  }
}

template <typename acc_t>
__global__ void diffusion_steps_langevin_eps_kernel(const acc_t* __restrict__ partial, int64_t chunks, int64_t B,
                                                    acc_t snr,
                                    acc_t* __restrict__ eps) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  acc_t ss = acc_t(0), zz = acc_t(0);
  for (int64_t c = 0; c < chunks; ++c) {
    ss += partial[2 * (b * chunks + c)];
    zz += partial[2 * (b * chunks + c) + 1];
  }
  eps[b] = langevin_step_size(ss, zz, snr);
}

template <typename T>
bool aligned4(const void* p) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % (sizeof(T) * 4) == 0;
}

at::PhiloxCudaState philox_state(const StepPlan& p) {
  if (p.generator.has_value()) {
    TORCH_CHECK(p.generator->device() == p.x.device(), "mmer_ext: generator is on ", p.generator->device(),
                " but the input is on ", p.x.device(), "; pass a generator of the input's device");
  }
  return mmer_ext::cuda::philox_state(p.generator, p.x.device());
}

// A parameter as the kernels read it: host values as values, tensors converted to acc_t on x's device.
template <typename acc_t>
SampleParam<acc_t> device_param(const ParamArg& p, at::Tensor& keep) {
  if (!p.tensor.defined()) return SampleParam<acc_t>{nullptr, 0, static_cast<acc_t>(p.value)};
  keep = p.tensor.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  return SampleParam<acc_t>{keep.const_data_ptr<acc_t>(), keep.dim() == 0 ? 0 : 1, acc_t(0)};
}

template <typename scalar_t, typename acc_t>
void launch_affine(const StepPlan& p, CoefSource<acc_t> coefs, NoiseMode mode, const at::PhiloxCudaState& philox) {
  const int64_t numel = p.x.numel();
  const scalar_t* x = p.x.const_data_ptr<scalar_t>();
  const scalar_t* s = p.score.defined() ? p.score.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* z = mode == kNoiseTensor ? p.noise.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* m = p.mean.defined() ? p.mean.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* n = p.next.defined() ? p.next.mutable_data_ptr<scalar_t>() : nullptr;
  const bool vec = aligned4<scalar_t>(x) && aligned4<scalar_t>(s) && aligned4<scalar_t>(z) &&
                   aligned4<scalar_t>(m) && aligned4<scalar_t>(n);
  set_sample_divider(coefs, p.inner, numel);
  const unsigned grid = mmer_ext::cuda::grid_for((numel + 3) / 4, kThreads);
  auto stream = at::cuda::getCurrentCUDAStream();
  switch (mode) {
    case kNoNoise:
      diffusion_steps_affine_step_kernel<scalar_t, acc_t, kNoNoise>
          <<<grid, kThreads, 0, stream>>>(x, s, z, m, n, numel, coefs, philox, vec);
      break;
    case kNoiseTensor:
      diffusion_steps_affine_step_kernel<scalar_t, acc_t, kNoiseTensor>
          <<<grid, kThreads, 0, stream>>>(x, s, z, m, n, numel, coefs, philox, vec);
      break;
    case kNoisePhilox:
      diffusion_steps_affine_step_kernel<scalar_t, acc_t, kNoisePhilox>
          <<<grid, kThreads, 0, stream>>>(x, s, z, m, n, numel, coefs, philox, vec);
      break;
  }
  mmer_ext::cuda::launch_check("diffusion_steps_affine_step_kernel");
}

NoiseMode noise_mode(const StepPlan& p) {
  switch (p.noise_source) {
    case NoiseSource::kTensor:
      return kNoiseTensor;
    case NoiseSource::kGenerator:
      return kNoisePhilox;
    default:
      return kNoNoise;
  }
}

void diffusion_steps_affine_step_cuda(const StepPlan& p) {
  const at::cuda::OptionalCUDAGuard guard(p.x.device());
  if (p.x.numel() == 0) return;
  const NoiseMode mode = noise_mode(p);
  const at::PhiloxCudaState philox = mode == kNoisePhilox ? philox_state(p) : at::PhiloxCudaState();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "mmer_ext.diffusion_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor keep0, keep1;
    CoefSource<acc_t> coefs{p.kind,
                            device_param<acc_t>(p.p0, keep0),
                            device_param<acc_t>(p.p1, keep1),
                            static_cast<acc_t>(p.log_sigma),
                            static_cast<acc_t>(p.dt),
                            static_cast<acc_t>(p.eta),
                            !p.p0.tensor.defined() && !p.p1.tensor.defined(),
                            Coefs<acc_t>{},
                            {},
                            1,
                            true};
    if (coefs.uniform) {
      // float64 on the host, rounded once.
      coefs.fixed = cast_coefs<acc_t>(
          step_coefficients<double>(p.kind, p.p0.value, p.p1.value, p.log_sigma, p.dt, p.eta));
    }
    launch_affine<scalar_t, acc_t>(p, coefs, mode, philox);
  });
}

void diffusion_steps_langevin_step_cuda(const StepPlan& p) {
  const at::cuda::OptionalCUDAGuard guard(p.x.device());
  if (p.x.numel() == 0) return;
  const NoiseMode mode = noise_mode(p);
  const at::PhiloxCudaState philox = mode == kNoisePhilox ? philox_state(p) : at::PhiloxCudaState();
  const int64_t B = p.x.size(0), inner = p.inner;
  // Enough reduction blocks to fill the GPU a few times, each over at least kMinChunk elements.
  const int64_t per_sample = std::max<int64_t>(1, mmer_ext::cuda::ceil_div(int64_t(mmer_ext::cuda::sm_count()) * 4, B));
  const int64_t chunk = std::max<int64_t>(kMinChunk, mmer_ext::cuda::ceil_div(inner, per_sample));
  const int64_t chunks = mmer_ext::cuda::ceil_div(inner, chunk);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "mmer_ext.langevin_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    auto partial = at::empty({B * chunks * 2}, p.x.options().dtype(acc));
    auto eps = at::empty({B}, p.x.options().dtype(acc));
    const scalar_t* s = p.score.const_data_ptr<scalar_t>();
    const scalar_t* z = mode == kNoiseTensor ? p.noise.const_data_ptr<scalar_t>() : nullptr;
    const auto blocks = static_cast<unsigned>(B * chunks);
    if (mode == kNoisePhilox) {
      diffusion_steps_langevin_partial_kernel<scalar_t, acc_t, kNoisePhilox><<<blocks, kReduceThreads, 0, stream>>>(
          s, z, inner, chunk, chunks, philox, partial.mutable_data_ptr<acc_t>());
    } else {
      diffusion_steps_langevin_partial_kernel<scalar_t, acc_t, kNoiseTensor><<<blocks, kReduceThreads, 0, stream>>>(
          s, z, inner, chunk, chunks, philox, partial.mutable_data_ptr<acc_t>());
    }
    mmer_ext::cuda::launch_check("diffusion_steps_langevin_partial_kernel");
    diffusion_steps_langevin_eps_kernel<acc_t>
        <<<static_cast<unsigned>(mmer_ext::cuda::ceil_div(B, kThreads)), kThreads, 0, stream>>>(
        partial.const_data_ptr<acc_t>(), chunks, B, static_cast<acc_t>(p.snr), eps.mutable_data_ptr<acc_t>());
    mmer_ext::cuda::launch_check("diffusion_steps_langevin_eps_kernel");
    CoefSource<acc_t> coefs{StepKind::kLangevin,
                            SampleParam<acc_t>{eps.const_data_ptr<acc_t>(), 1, acc_t(0)},
                            SampleParam<acc_t>{nullptr, 0, acc_t(0)},
                            acc_t(0),
                            acc_t(0),
                            acc_t(0),
                            false,
                            Coefs<acc_t>{},
                            {},
                            1,
                            true};
    launch_affine<scalar_t, acc_t>(p, coefs, mode, philox);
  });
}

}  // namespace

const DeviceKernels kCudaKernels{&diffusion_steps_affine_step_cuda, &diffusion_steps_langevin_step_cuda};

}  // namespace mmer_ext::diffusion

TORCH_LIBRARY_IMPL(mmer_ext, CUDA, m) {
  mmer_ext::diffusion::register_step_ops<mmer_ext::diffusion::kCudaKernels>(m);
}
