#pragma once
// The key of an in-kernel Philox stream on the CPU (common/philox.h): one 64-bit draw from the CPU generator, so
// torch.manual_seed reproduces every op's draws. Shared by the diffusion steps' noise and the GCNII layer's dropout.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/Generator.h>

#include <cstdint>
#include <mutex>
#include <optional>

namespace mmer_ext {

inline uint64_t cpu_philox_key(const std::optional<at::Generator>& generator) {
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  // See Note [Acquire lock when using random generators].
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return gen->random64();
}

}  // namespace mmer_ext
