#pragma once
// Element-wise maths of the GCNII layer op, shared by the CPU loops and the CUDA kernels (see gcnii.h for the op).
//
// Dropout mask: element i (row-major index into the [N, F] output) is kept iff word (i mod 4) of the Philox block
// with key = seed and counter = (counter_lo, i / 4) is >= the threshold (common/philox.h) - the layout of the
// diffusion ops' noise, so the mask depends on (seed, counter_lo, i) only, not on threads, blocks or vector widths.
#include <cstdint>

#include "common/macros.h"
#include "common/philox.h"

namespace mmer_ext::gcnii {

// Coefficients of one layer: pre = theta * acc + c_hi * hi + c_h0 * h0, with acc = [hi || h0] W,
// c_hi = (1 - theta)(1 - alpha), c_h0 = (1 - theta) alpha; out = keep ? relu(pre) * scale : 0.
template <typename T>
struct LayerCoefs {
  T theta, c_hi, c_h0, scale;
  uint32_t threshold;  // 0: no dropout (every element kept, no Philox draw)
};

template <typename T>
MMER_HD inline T layer_output(T acc, T hi, T h0, const LayerCoefs<T>& c, uint32_t bits) {
  T v = c.theta * acc + c.c_hi * hi + c.c_h0 * h0;
  v = v < T(0) ? T(0) : v;  // relu; NaN passes through as in torch.relu
  return bits >= c.threshold ? v * c.scale : T(0);
}

// d loss / d pre from the output alone: an element with out > 0 was kept and had pre > 0 (scale >= 1, so a kept
// positive value never rounds to 0); every other element's gradient is 0.
template <typename T>
MMER_HD inline T pre_gradient(T grad, T out, T scale) {
  return out > T(0) ? grad * scale : T(0);
}

}  // namespace mmer_ext::gcnii
