#pragma once
// Counter-based Philox-4x32-10 (Salmon et al. 2011), the generator of curand and of torch's CUDA kernels, shared by
// every op that draws random numbers inside its kernels (the diffusion steps' noise, the GCNII layer's dropout).
// A block depends on (key, counter) only, so a draw does not depend on threads, blocks or vector widths, and the
// same code runs on the CPU and the GPU.
#include <cstdint>

#include "common/macros.h"

namespace mmer_ext {

struct Uint4 {
  uint32_t v[4];
};

MMER_HD inline uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

MMER_HD inline Uint4 philox4x32_10(uint64_t counter_lo, uint64_t counter_hi, uint64_t key) {
  uint32_t c0 = static_cast<uint32_t>(counter_lo), c1 = static_cast<uint32_t>(counter_lo >> 32);
  uint32_t c2 = static_cast<uint32_t>(counter_hi), c3 = static_cast<uint32_t>(counter_hi >> 32);
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  MMER_UNROLL
  for (int round = 0; round < 10; ++round) {
    const uint32_t lo0 = 0xD2511F53u * c0, hi0 = mulhi32(0xD2511F53u, c0);
    const uint32_t lo1 = 0xCD9E8D57u * c2, hi1 = mulhi32(0xCD9E8D57u, c2);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Uint4{{c0, c1, c2, c3}};
}

// Where the noise of one call starts: the generator's key and the counter's low 64 bits.
struct PhiloxSeed {
  uint64_t seed;
  uint64_t counter_lo;
};

// Keep-bits threshold of dropout with drop probability p in (0, 1): an element is kept iff its 32 random bits are
// >= the threshold, i.e. with probability 1 - threshold / 2^32 (within 2^-32 of 1 - p). Shared by the GCNII layer's
// and the attention op's in-kernel dropout.
inline uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t + 0.5);
}

}  // namespace mmer_ext
