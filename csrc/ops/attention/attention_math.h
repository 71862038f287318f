#pragma once
// Per-element maths of the attention op, shared by the CPU loops and the CUDA kernels (see attention.h).
//
// Dropout mask: score element e = ((b H + h) Lq + i) Lk + j (row-major over [B, H, Lq, Lk]) is kept iff word (e mod 4)
// of the Philox block with key = rng[0] and counter = (rng[1], e / 4) is >= the threshold (common/philox.h): the
// layout of the GCNII layer's mask, so it depends on the key and the element only, never on threads or blocks, and
// the backward regenerates it from rng instead of storing [B, H, Lq, Lk] bits.
#include <cmath>
#include <cstdint>

#include "common/macros.h"
#include "common/philox.h"

namespace mmer_ext::attention {

// The 32 random bits of score element e.
MMER_HD inline uint32_t dropout_bits(uint64_t e, uint64_t key, uint64_t counter_lo) {
  return philox4x32_10(counter_lo, e / 4, key).v[e % 4];
}

// The factor dropout applies to a probability: 1 / (1 - p) if kept, else 0.
template <typename T>
MMER_HD inline T keep_factor(uint32_t bits, uint32_t threshold, T inv_keep) {
  return bits >= threshold ? inv_keep : T(0);
}

// log-sum-exp of a score row from its maximum and the sum of exp(s - max); +inf for a row that every key is blocked
// from (sum 0), so that exp(s - lse) = 0 for all of its scores and the row's output and gradients are 0.
template <typename T>
MMER_HD inline T row_lse(T max, T sum) {
  return sum > T(0) ? max + log(sum) : T(INFINITY);
}

// d loss / d score of one element: p (dp * factor - delta), where p = exp(s - lse) is the probability before dropout,
// dp = dout_i . v_j, factor the dropout factor and delta = dout_i . out_i (= sum_j p_ij factor_ij dp_ij).
template <typename T>
MMER_HD inline T score_gradient(T p, T dp, T factor, T delta) {
  return p * (dp * factor - delta);
}

}  // namespace mmer_ext::attention
