// CPU kernels of the sampling-step ops (see diffusion_steps.h).
//
// Work is split over flat element ranges that depend on the shape alone; inside a range, each run of elements of
// one sample gets that sample's coefficients (computed in float64) and goes through a branch-free affine loop the
// compiler vectorises. In-kernel noise is the counter-based Philox of diffusion_steps_math.h keyed by one 64-bit
// draw from the CPU generator, so every element's noise depends on its index alone: the result does not depend on
// the thread count, and the Langevin step regenerates the same noise in its second pass instead of storing it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/macros.h"
#include "common/philox_cpu.h"
#include "ops/diffusion_steps/diffusion_steps.h"
#include "ops/diffusion_steps/diffusion_steps_math.h"

namespace mmer_ext::diffusion {
namespace {

constexpr int64_t kGrain = 1 << 14;  // elements per task: below that, waking the pool costs more than it saves
constexpr int64_t kBlock = 256;      // elements per noise buffer (stays in L1)
constexpr int64_t kNormChunk = 1 << 14;

// The Philox blocks of groups [g0, g0 + n): bits[4 i + k] is word k of group g0 + i.
MMER_EXT_CPU_MULTIVERSION void philox_blocks(const PhiloxSeed& seed, int64_t g0, int64_t n, uint32_t* __restrict bits) {
  for (int64_t i = 0; i < n; ++i) {
    const Uint4 r = philox4x32_10(seed.counter_lo, static_cast<uint64_t>(g0 + i), seed.seed);
    for (int k = 0; k < 4; ++k) bits[4 * i + k] = r.v[k];
  }
}

// z[2 p], z[2 p + 1] = Box-Muller of (bits[2 p], bits[2 p + 1]), p < n_pairs: the same normals as normal4, in a
// loop the compiler vectorises (the float32 log and sincos are branch-free).
MMER_EXT_CPU_MULTIVERSION void box_muller_pairs(const uint32_t* __restrict bits, int64_t n_pairs, float* __restrict z) {
  for (int64_t p = 0; p < n_pairs; ++p) box_muller(bits[2 * p], bits[2 * p + 1], &z[2 * p], &z[2 * p + 1]);
}

// out[k] = noise of element first + k, k < count <= kBlock.
template <typename T>
void fill_normals(const PhiloxSeed& seed, int64_t first, int64_t count, T* out) {
  const int64_t g0 = first >> 2;
  const int64_t groups = ((first + count - 1) >> 2) - g0 + 1;
  alignas(64) uint32_t bits[kBlock + 8];
  alignas(64) float z[kBlock + 8];
  philox_blocks(seed, g0, groups, bits);
  box_muller_pairs(bits, 2 * groups, z);
  const float* zf = z + (first - 4 * g0);
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(out, zf, static_cast<size_t>(count) * sizeof(T));
  } else {
    for (int64_t k = 0; k < count; ++k) out[k] = static_cast<T>(zf[k]);
  }
}

template <typename T, bool kScore, bool kNoise, bool kMean, bool kNext>
MMER_EXT_CPU_MULTIVERSION void affine_run(const T* __restrict x, const T* __restrict s, const T* __restrict z,
                                          T* __restrict m_out, T* __restrict n_out, int64_t len, Coefs<T> c) {
  for (int64_t i = 0; i < len; ++i) {
    T m = c.a * x[i];
    if constexpr (kScore) m = m + c.b * s[i];
    if constexpr (kMean) m_out[i] = m;
    if constexpr (kNext) {
      T n = c.c * m;
      if constexpr (kScore) n = n + c.d * s[i];
      if constexpr (kNoise) n = n + c.e * z[i];
      n_out[i] = n;
    }
  }
}

template <typename T>
void affine_dispatch(const T* x, const T* s, const T* z, T* m, T* n, int64_t len, const Coefs<T>& c) {
  // The combinations the ops use: perturb (no score, no mean), ODE (no noise, no next), the rest.
  if (s == nullptr) {
    affine_run<T, false, true, false, true>(x, s, z, m, n, len, c);
  } else if (n == nullptr) {
    affine_run<T, true, false, true, false>(x, s, z, m, n, len, c);
  } else if (z == nullptr) {
    affine_run<T, true, false, true, true>(x, s, z, m, n, len, c);
  } else {
    affine_run<T, true, true, true, true>(x, s, z, m, n, len, c);
  }
}

// A ParamArg as float64 values on the host (the tensor keeps a converted copy alive).
struct HostParam {
  at::Tensor keep;
  SampleParam<double> view{nullptr, 0, 0.0};
  explicit HostParam(const ParamArg& p) {
    if (!p.tensor.defined()) {
      view.value = p.value;
      return;
    }
    keep = p.tensor.to(at::kDouble).contiguous();
    view.ptr = keep.const_data_ptr<double>();
    view.stride = keep.dim() == 0 ? 0 : 1;
  }
};

// The affine map over all elements; coef_at(b) gives sample b's coefficients in float64.
template <typename T, typename CoefFn>
void run_affine(const StepPlan& p, const CoefFn& coef_at, const std::optional<PhiloxSeed>& seed) {
  const int64_t numel = p.x.numel();
  const int64_t inner = p.inner;
  const T* xp = p.x.const_data_ptr<T>();
  const T* sp = p.score.defined() ? p.score.const_data_ptr<T>() : nullptr;
  const T* zp = p.noise.defined() ? p.noise.const_data_ptr<T>() : nullptr;
  T* mp = p.mean.defined() ? p.mean.mutable_data_ptr<T>() : nullptr;
  T* np = p.next.defined() ? p.next.mutable_data_ptr<T>() : nullptr;
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    T zbuf[kBlock];
    int64_t i = begin;
    while (i < end) {
      const int64_t b = i / inner;
      const int64_t seg_end = std::min(end, (b + 1) * inner);
      const Coefs<T> c = cast_coefs<T>(coef_at(b));
      for (int64_t j = i; j < seg_end; j += kBlock) {
        const int64_t len = std::min(kBlock, seg_end - j);
        const T* z = nullptr;
        if (seed.has_value()) {
          fill_normals<T>(*seed, j, len, zbuf);
          z = zbuf;
        } else if (zp != nullptr) {
          z = zp + j;
        }
        affine_dispatch<T>(xp + j, sp ? sp + j : nullptr, z, mp ? mp + j : nullptr, np ? np + j : nullptr, len, c);
      }
      i = seg_end;
    }
  });
}

std::optional<PhiloxSeed> seed_for(const StepPlan& p) {
  if (p.noise_source != NoiseSource::kGenerator) return std::nullopt;
  return PhiloxSeed{cpu_philox_key(p.generator), 0};
}

void diffusion_steps_affine_step_cpu(const StepPlan& p) {
  if (p.x.numel() == 0) return;
  const HostParam p0(p.p0), p1(p.p1);
  const auto seed = seed_for(p);
  AT_DISPATCH_FLOATING_TYPES(p.x.scalar_type(), "mmer_ext.diffusion_step_cpu", [&] {
    const auto coef_at = [&](int64_t b) {
      return step_coefficients<double>(p.kind, p0.view.at(b), p1.view.at(b), p.log_sigma, p.dt, p.eta);
    };
    run_affine<scalar_t>(p, coef_at, seed);
  });
}

// Per-sample sums of squares of score and noise, in float64, over fixed chunks of each sample (added in order).
template <typename T>
std::vector<double> langevin_step_sizes(const StepPlan& p, const std::optional<PhiloxSeed>& seed) {
  const int64_t B = p.x.size(0), inner = p.inner;
  const int64_t chunks = std::max<int64_t>(1, (inner + kNormChunk - 1) / kNormChunk);
  const T* sp = p.score.const_data_ptr<T>();
  const T* zp = p.noise.defined() ? p.noise.const_data_ptr<T>() : nullptr;
  std::vector<double> partial(static_cast<size_t>(B * chunks * 2), 0.0);
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, std::min(inner, kNormChunk)));
  at::parallel_for(0, B * chunks, grain, [&](int64_t begin, int64_t end) {
    T zbuf[kBlock];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks, c = item % chunks;
      const int64_t lo = b * inner + c * kNormChunk;
      const int64_t hi = std::min((b + 1) * inner, lo + kNormChunk);
      double ss = 0.0, zz = 0.0;
      for (int64_t j = lo; j < hi; j += kBlock) {
        const int64_t len = std::min(kBlock, hi - j);
        const T* z = zp + j;
        if (seed.has_value()) {
          fill_normals<T>(*seed, j, len, zbuf);
          z = zbuf;
        }
        for (int64_t k = 0; k < len; ++k) {
          const double sv = static_cast<double>(sp[j + k]), zv = static_cast<double>(z[k]);
          ss += sv * sv;
          zz += zv * zv;
        }
      }
      partial[2 * item] = ss;
      partial[2 * item + 1] = zz;
    }
  });
  std::vector<double> eps(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    double ss = 0.0, zz = 0.0;
    for (int64_t c = 0; c < chunks; ++c) {
      ss += partial[2 * (b * chunks + c)];
      zz += partial[2 * (b * chunks + c) + 1];
    }
    eps[b] = langevin_step_size(ss, zz, p.snr);
  }
  return eps;
}

void diffusion_steps_langevin_step_cpu(const StepPlan& p) {
  if (p.x.numel() == 0) return;
  const auto seed = seed_for(p);  // one draw, used by both passes
  AT_DISPATCH_FLOATING_TYPES(p.x.scalar_type(), "mmer_ext.langevin_corrector_step_cpu", [&] {
    const auto eps = langevin_step_sizes<scalar_t>(p, seed);
    const auto coef_at = [&](int64_t b) {
      return step_coefficients<double>(StepKind::kLangevin, eps[b], 0.0, 0.0, 0.0, 0.0);
    };
    run_affine<scalar_t>(p, coef_at, seed);
  });
}

}  // namespace

const DeviceKernels kCpuKernels{&diffusion_steps_affine_step_cpu, &diffusion_steps_langevin_step_cpu};

}  // namespace mmer_ext::diffusion
