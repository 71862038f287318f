// CPU kernels of the GCNII layer op (see gcnii.h).
//
// Work is split over flat element ranges that depend on the shape alone; each range draws its Philox words into
// an L1-sized buffer and runs a branch-free loop the compiler vectorises, so the mask, and the result, do not
// depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "common/macros.h"
#include "common/philox_cpu.h"
#include "ops/gcnii/gcnii.h"
#include "ops/gcnii/gcnii_math.h"

namespace mmer_ext::gcnii {
namespace {

constexpr int64_t kBlock = 1024;      // elements per mask buffer (4 KiB of bits: stays in L1); a multiple of 4
constexpr int64_t kGrain = 1 << 14;   // elements per task: below that, waking the pool costs more than it saves

// bits[4 i + k] = word k of the Philox block of group g0 + i, i < n.
MMER_EXT_CPU_MULTIVERSION void philox_words(uint64_t key, uint64_t counter_lo, int64_t g0, int64_t n,
                                            uint32_t* __restrict bits) {
  for (int64_t i = 0; i < n; ++i) {
    const Uint4 r = philox4x32_10(counter_lo, static_cast<uint64_t>(g0 + i), key);
    for (int k = 0; k < 4; ++k) bits[4 * i + k] = r.v[k];
  }
}

template <typename scalar_t, typename acc_t>
MMER_EXT_CPU_MULTIVERSION void output_run(scalar_t* __restrict acc, const scalar_t* __restrict hi,
                                          const scalar_t* __restrict h0, const uint32_t* __restrict bits,
                                          int64_t len, LayerCoefs<acc_t> c) {
  for (int64_t i = 0; i < len; ++i) {
    const uint32_t b = bits != nullptr ? bits[i] : 0xFFFFFFFFu;
    acc[i] = static_cast<scalar_t>(layer_output<acc_t>(static_cast<acc_t>(acc[i]), static_cast<acc_t>(hi[i]),
                                                       static_cast<acc_t>(h0[i]), c, b));
  }
}

template <typename scalar_t, typename acc_t>
MMER_EXT_CPU_MULTIVERSION void pre_gradient_run(const scalar_t* __restrict grad, const scalar_t* __restrict out,
                                                scalar_t* __restrict g, int64_t len, acc_t scale) {
  for (int64_t i = 0; i < len; ++i) {
    g[i] = static_cast<scalar_t>(pre_gradient<acc_t>(static_cast<acc_t>(grad[i]), static_cast<acc_t>(out[i]), scale));
  }
}

void gcnii_output_inplace_cpu(at::Tensor& acc, const at::Tensor& hi, const at::Tensor& h0, double theta,
                              double alpha, double dropout, const std::optional<at::Generator>& generator) {
  const int64_t numel = acc.numel();
  const uint32_t threshold = dropout > 0.0 ? dropout_threshold(dropout) : 0u;
  const uint64_t key = threshold != 0u ? cpu_philox_key(generator) : 0;  // one 64-bit draw keys the whole mask
  if (numel == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, acc.scalar_type(), "mmer_ext.gcnii_layer_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const LayerCoefs<acc_t> c{static_cast<acc_t>(theta), static_cast<acc_t>((1.0 - theta) * (1.0 - alpha)),
                              static_cast<acc_t>((1.0 - theta) * alpha), static_cast<acc_t>(1.0 / (1.0 - dropout)),
                              threshold};
    scalar_t* a = acc.mutable_data_ptr<scalar_t>();
    const scalar_t* x = hi.const_data_ptr<scalar_t>();
    const scalar_t* x0 = h0.const_data_ptr<scalar_t>();
    const int64_t blocks = (numel + kBlock - 1) / kBlock;
    at::parallel_for(0, blocks, std::max<int64_t>(1, kGrain / kBlock), [&](int64_t b0, int64_t b1) {
      alignas(64) uint32_t bits[kBlock];
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t first = blk * kBlock, len = std::min(kBlock, numel - first);
        if (threshold != 0u) philox_words(key, 0, first / 4, (len + 3) / 4, bits);
        output_run<scalar_t, acc_t>(a + first, x + first, x0 + first, threshold != 0u ? bits : nullptr, len, c);
      }
    });
  });
}

at::Tensor gcnii_pre_gradient_cpu(const at::Tensor& grad, const at::Tensor& out, double dropout) {
  auto g = at::empty_like(grad, at::MemoryFormat::Contiguous);
  const int64_t numel = grad.numel();
  const auto dtype = grad.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "mmer_ext.gcnii_layer_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto scale = static_cast<acc_t>(1.0 / (1.0 - dropout));
    const scalar_t* gr = grad.const_data_ptr<scalar_t>();
    const scalar_t* o = out.const_data_ptr<scalar_t>();
    scalar_t* gp = g.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, numel, kGrain, [&](int64_t i0, int64_t i1) {
      pre_gradient_run<scalar_t, acc_t>(gr + i0, o + i0, gp + i0, i1 - i0, scale);
    });
  });
  return g;
}

}  // namespace

const DeviceKernels kCpuKernels{&gcnii_output_inplace_cpu, &gcnii_pre_gradient_cpu};

}  // namespace mmer_ext::gcnii
