#pragma once
// Helpers for CUDA launchers: launch configuration and a launch check that explains missing architectures.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#ifndef MMER_EXT_CUDA_ARCH_LIST
#define MMER_EXT_CUDA_ARCH_LIST "unknown"
#endif

namespace mmer_ext::cuda {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Blocks for a grid-stride loop over n elements: enough to fill every SM a few times, no more.
inline unsigned grid_for(int64_t n, int threads) {
  const int64_t wanted = ceil_div(std::max<int64_t>(n, 1), threads);
  return static_cast<unsigned>(std::min<int64_t>(wanted, int64_t(sm_count()) * 8));
}

// Like C10_CUDA_KERNEL_LAUNCH_CHECK (no device sync), but a GPU that is not among the built architectures gets
// a message that says how to rebuild instead of CUDA's "no kernel image is available".
inline void launch_check(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaErrorNoKernelImageForDevice) {
    const auto* prop = at::cuda::getCurrentDeviceProperties();
    TORCH_CHECK(false, "mmer_ext: kernel ", kernel, " has no code for ", prop->name, " (sm_", prop->major,
                prop->minor, "); this build has archs ", MMER_EXT_CUDA_ARCH_LIST, ". Rebuild with TORCH_CUDA_ARCH_LIST=\"",
                prop->major, ".", prop->minor, "\" pip install --no-build-isolation .");
  }
  C10_CUDA_CHECK(err);
}

}  // namespace mmer_ext::cuda
