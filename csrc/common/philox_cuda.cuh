#pragma once
// The state of an in-kernel Philox stream on CUDA (common/philox.h): the generator's graph-safe philox_cuda_state(),
// so ops that draw inside their kernels can be captured in a CUDA graph and each replay draws anew. Shared by the
// diffusion steps' noise and the GCNII layer's dropout.
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>

#include <mutex>
#include <optional>

#include "common/philox.h"

namespace mmer_ext::cuda {

// Host: the Philox state of one call of `generator` (or `device`'s default generator). One Philox block (4 32-bit
// draws) per group of 4 elements.
inline at::PhiloxCudaState philox_state(const std::optional<at::Generator>& generator, const at::Device& device) {
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      generator, at::cuda::detail::getDefaultCUDAGenerator(device.index()));
  // See Note [Acquire lock when using random generators].
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return gen->philox_cuda_state(4);
}

// Device: the key and the block counter's low word of that state. The generator's offset counts 32-bit draws; one
// Philox block is 4 of them.
__device__ __forceinline__ PhiloxSeed unpack_seed(const at::PhiloxCudaState& philox) {
  const auto seeds = at::cuda::philox::unpack(philox);
  return PhiloxSeed{std::get<0>(seeds), std::get<1>(seeds) / 4};
}

}  // namespace mmer_ext::cuda
