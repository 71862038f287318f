// CUDA kernels of the GCNII layer op (see gcnii.h).
//
// gcnii_output_kernel: a grid-stride loop over groups of 4 consecutive elements, one Philox block per group (the
// layout of gcnii_math.h, so the CPU and the GPU draw the same mask from the same key and counter). The Philox
// state comes from the generator's graph-safe philox_cuda_state(), so the op can be captured in a CUDA graph and
// each replay draws a fresh mask. gcnii_pre_gradient_kernel is the backward's element-wise pass.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/cuda_utils.cuh"
#include "common/philox_cuda.cuh"
#include "ops/gcnii/gcnii.h"
#include "ops/gcnii/gcnii_math.h"

namespace mmer_ext::gcnii {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, typename acc_t>
__global__ void gcnii_output_kernel(scalar_t* __restrict__ acc, const scalar_t* __restrict__ hi,
                                    const scalar_t* __restrict__ h0, int64_t numel, LayerCoefs<acc_t> c,
                                    at::PhiloxCudaState philox) {
  const PhiloxSeed seed = c.threshold != 0u ? mmer_ext::cuda::unpack_seed(philox) : PhiloxSeed{0, 0};
  const int64_t groups = (numel + 3) / 4;
  for (int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += int64_t(gridDim.x) * blockDim.x) {
    Uint4 bits{{0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu}};
    if (c.threshold != 0u) bits = philox4x32_10(seed.counter_lo, static_cast<uint64_t>(g), seed.seed);
    const int64_t e0 = g * 4;
    MMER_UNROLL
    for (int k = 0; k < 4; ++k) {
      const int64_t e = e0 + k;
      if (e < numel) {
        acc[e] = static_cast<scalar_t>(layer_output<acc_t>(static_cast<acc_t>(acc[e]), static_cast<acc_t>(hi[e]),
                                                           static_cast<acc_t>(h0[e]), c, bits.v[k]));
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void gcnii_pre_gradient_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ out,
                                          scalar_t* __restrict__ g, int64_t numel, acc_t scale) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < numel; e += int64_t(gridDim.x) * blockDim.x) {
    g[e] = static_cast<scalar_t>(pre_gradient<acc_t>(static_cast<acc_t>(grad[e]), static_cast<acc_t>(out[e]), scale));
  }
}

void gcnii_output_inplace_cuda(at::Tensor& acc, const at::Tensor& hi, const at::Tensor& h0, double theta,
                               double alpha, double dropout, const std::optional<at::Generator>& generator) {
  const at::cuda::OptionalCUDAGuard guard(acc.device());
  const int64_t numel = acc.numel();
  const uint32_t threshold = dropout > 0.0 ? dropout_threshold(dropout) : 0u;
  const at::PhiloxCudaState philox =
      threshold != 0u ? mmer_ext::cuda::philox_state(generator, acc.device()) : at::PhiloxCudaState();
  if (numel == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, acc.scalar_type(), "mmer_ext.gcnii_layer_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const LayerCoefs<acc_t> c{static_cast<acc_t>(theta), static_cast<acc_t>((1.0 - theta) * (1.0 - alpha)),
                              static_cast<acc_t>((1.0 - theta) * alpha), static_cast<acc_t>(1.0 / (1.0 - dropout)),
                              threshold};
    gcnii_output_kernel<scalar_t, acc_t><<<mmer_ext::cuda::grid_for((numel + 3) / 4, kThreads), kThreads, 0, stream>>>(
        acc.mutable_data_ptr<scalar_t>(), hi.const_data_ptr<scalar_t>(), h0.const_data_ptr<scalar_t>(), numel, c,
        philox);
    mmer_ext::cuda::launch_check("gcnii_output_kernel");
  });
}

at::Tensor gcnii_pre_gradient_cuda(const at::Tensor& grad, const at::Tensor& out, double dropout) {
  const at::cuda::OptionalCUDAGuard guard(grad.device());
  auto g = at::empty_like(grad, at::MemoryFormat::Contiguous);
  const int64_t numel = grad.numel();
  if (numel == 0) return g;
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto dtype = grad.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "mmer_ext.gcnii_layer_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gcnii_pre_gradient_kernel<scalar_t, acc_t><<<mmer_ext::cuda::grid_for(numel, kThreads), kThreads, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(), g.mutable_data_ptr<scalar_t>(), numel,
        static_cast<acc_t>(1.0 / (1.0 - dropout)));
    mmer_ext::cuda::launch_check("gcnii_pre_gradient_kernel");
  });
  return g;
}

}  // namespace

const DeviceKernels kCudaKernels{&gcnii_output_inplace_cuda, &gcnii_pre_gradient_cuda};

}  // namespace mmer_ext::gcnii

TORCH_LIBRARY_IMPL(mmer_ext, CUDA, m) {
  mmer_ext::gcnii::register_gcnii_ops<mmer_ext::gcnii::kCudaKernels>(m);
}
