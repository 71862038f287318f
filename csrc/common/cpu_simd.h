#pragma once
// Portable SIMD for CPU kernels: GCC/Clang vector extensions of one 64-byte register's width. Inside a function
// marked MMER_EXT_CPU_MULTIVERSION they lower to one AVX-512 register, two AVX2 registers or four SSE registers,
// whichever the clone targets, so kernels are written once and still use the widest unit at hand.
#include <cstring>
#include <type_traits>

namespace mmer_ext::cpu {

constexpr int kVectorBytes = 64;

template <typename T>
struct Simd {
  typedef T Vec __attribute__((vector_size(kVectorBytes)));
  static constexpr int kLanes = kVectorBytes / static_cast<int>(sizeof(T));
};

// Loads kLanes consecutive scalar_t values as a vector of acc_t (converting half/bfloat16 lane by lane).
template <typename acc_t, typename scalar_t>
__attribute__((always_inline)) inline typename Simd<acc_t>::Vec load(const scalar_t* p) {
  typename Simd<acc_t>::Vec v;
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    std::memcpy(&v, p, sizeof(v));
  } else {
    for (int w = 0; w < Simd<acc_t>::kLanes; ++w) v[w] = static_cast<acc_t>(p[w]);
  }
  return v;
}

template <typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline void store(scalar_t* p, const typename Simd<acc_t>::Vec& v) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    std::memcpy(p, &v, sizeof(v));
  } else {
    for (int w = 0; w < Simd<acc_t>::kLanes; ++w) p[w] = static_cast<scalar_t>(v[w]);
  }
}

}  // namespace mmer_ext::cpu
