#pragma once
// Portability macros shared by CPU and CUDA translation units.

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MMER_HD __host__ __device__
#else
#define MMER_HD
#endif

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MMER_UNROLL _Pragma("unroll")
#elif defined(__GNUC__) && !defined(__clang__)
#define MMER_UNROLL _Pragma("GCC unroll 8")
#else
#define MMER_UNROLL
#endif

// Hot CPU loops are compiled for AVX-512, AVX2 and baseline x86-64, picked at load time (GCC function
// multiversioning), so one wheel is fast on new CPUs and still runs on old ones. Other compilers and
// architectures get the baseline build only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define MMER_EXT_CPU_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MMER_EXT_CPU_MULTIVERSION
#endif
