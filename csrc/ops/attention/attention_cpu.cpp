// CPU kernels of the attention op (see attention.h).
//
// One task per (batch, head): its q (pre-scaled), k, v are copied once into small accumulation-dtype buffers (any
// input strides and dtypes), then the queries are processed a vector register at a time: each lane is one query
// row, so the softmax, the dropout and the products with k and v are lane-wise and need no horizontal reductions
// except once per key and channel at the end of the backward. At the head widths this op is for (D <= 8) that keeps
// the units busy where the blocked flash kernels spend their time in tiny GEMM calls; wider heads work, but the
// backward's per-lane key and value sums then cost more than the flash kernel (benchmarks/bench_attention.py, wide).
// Head widths 4, 8 and 16 are compiled as constants (accumulators in registers). The dropout bits of a (batch, head)
// are drawn in one pass from the Philox stream of attention_math.h, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/cpu_simd.h"
#include "common/macros.h"
#include "common/philox_cpu.h"
#include "ops/attention/attention.h"
#include "ops/attention/attention_math.h"

namespace mmer_ext::attention {
namespace {

using mmer_ext::cpu::Simd;

template <typename acc_t>
using Vec = typename Simd<acc_t>::Vec;

template <typename acc_t>
constexpr int kLanes = Simd<acc_t>::kLanes;

// exp of every lane. float: Cephes' expf (range reduction by ln 2, degree-6 polynomial, about 1 ulp), written on the
// vector type so it stays in registers; inputs below log(FLT_MIN) give 0 (blocked scores arrive as -inf). double
// (the gradient checks) takes std::exp lane by lane.
template <typename acc_t>
__attribute__((always_inline)) inline Vec<acc_t> vexp(Vec<acc_t> x) {
  if constexpr (std::is_same_v<acc_t, float>) {
    using IVec = typename Simd<int32_t>::Vec;
    const Vec<float> hi = x > 88.3762626647949f ? Vec<float>{} + 88.3762626647949f : x;
    const Vec<float> magic = Vec<float>{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    const Vec<float> n = (hi * 1.44269504088896341f + magic) - magic;
    const Vec<float> r = hi - n * 0.693359375f + n * 2.12194440e-4f;
    Vec<float> y = Vec<float>{} + 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    const IVec bits = (__builtin_convertvector(n, IVec) + 127) << 23;
    const Vec<float> out = y * (Vec<float>)bits;  // same-size vector cast: the bits as floats, 2^n
    return x < -87.3365447505531f ? Vec<float>{} : out;
  } else {
    Vec<acc_t> out;
    for (int w = 0; w < kLanes<acc_t>; ++w) out[w] = std::exp(x[w]);
    return out;
  }
}

template <typename acc_t>
__attribute__((always_inline)) inline Vec<acc_t> vload(const acc_t* p) {
  Vec<acc_t> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename acc_t>
__attribute__((always_inline)) inline void vstore(acc_t* p, const Vec<acc_t>& v) {
  std::memcpy(p, &v, sizeof(v));
}

// Strided view of one [B, H, L, D] input.
template <typename scalar_t>
struct Strided {
  const scalar_t* data;
  int64_t sb, sh, sl, sd;
  Strided(const at::Tensor& t)
      : data(t.const_data_ptr<scalar_t>()), sb(t.stride(0)), sh(t.stride(1)), sl(t.stride(2)), sd(t.stride(3)) {}
  const scalar_t* row(int64_t b, int64_t h, int64_t l) const { return data + b * sb + h * sh + l * sl; }
};

template <typename scalar_t>
struct StridedOut {
  scalar_t* data;
  int64_t sb, sh, sl, sd;
  StridedOut(at::Tensor& t)
      : data(t.mutable_data_ptr<scalar_t>()), sb(t.stride(0)), sh(t.stride(1)), sl(t.stride(2)), sd(t.stride(3)) {}
  scalar_t* row(int64_t b, int64_t h, int64_t l) const { return data + b * sb + h * sh + l * sl; }
};

// Per-task scratch, reused across the (batch, head) pairs of one task.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> qt;          // [D][Lqp]: query rows (scaled), transposed to lanes
  std::vector<acc_t> kk, vv;      // [Lk][D]
  std::vector<acc_t> s, factor;   // [Lk][W]: one block's scores, its dropout factors
  std::vector<acc_t> acc;         // [D][W]: one block's output (forward) or query gradient (backward) sums
  std::vector<acc_t> qreg, greg;  // [D][W]: one block's queries and output gradients (dynamic head width)
  std::vector<acc_t> dk, dv;      // [Lk][D][W]: the backward's lane-wise sums
  std::vector<uint32_t> words;    // the head's Philox words, [Lq][Lk] (plus the partial blocks at its ends)
};

// words[t] = the 32 random bits of score element e0 + t, t < n (attention_math.h); words has room for n + 6.
// One call per (batch, head) covers its Lq * Lk weights: a long, branch-free loop over Philox blocks that the
// compiler vectorises (per query row it would be a dozen blocks, and scalar).
MMER_EXT_CPU_MULTIVERSION void head_bits(uint64_t key, uint64_t counter_lo, uint64_t e0, int64_t n,
                                         uint32_t* __restrict words) {
  const uint64_t g0 = e0 / 4;
  const int64_t blocks = static_cast<int64_t>((e0 + n + 3) / 4 - g0);
  for (int64_t i = 0; i < blocks; ++i) {
    const Uint4 r = philox4x32_10(counter_lo, g0 + static_cast<uint64_t>(i), key);
    for (int t = 0; t < 4; ++t) words[4 * i + t] = r.v[t];
  }
  const int64_t skip = static_cast<int64_t>(e0 - 4 * g0);
  if (skip > 0) std::memmove(words, words + skip, sizeof(uint32_t) * static_cast<size_t>(n));
}

// Fills factor[j][w] for the W query rows from i0 from the head's bits: the dropout factor of score (i0 + w, j);
// rows past Lq get 0.
template <typename acc_t>
void block_factors(Scratch<acc_t>& sc, int64_t i0, int64_t lq, int64_t lk, uint32_t threshold, acc_t inv_keep) {
  constexpr int W = kLanes<acc_t>;
  for (int w = 0; w < W; ++w) {
    const int64_t i = i0 + w;
    if (i >= lq) {
      for (int64_t j = 0; j < lk; ++j) sc.factor[j * W + w] = acc_t(0);
      continue;
    }
    const uint32_t* row = sc.words.data() + i * lk;
    for (int64_t j = 0; j < lk; ++j) sc.factor[j * W + w] = keep_factor<acc_t>(row[j], threshold, inv_keep);
  }
}

template <typename acc_t>
struct Shape {
  int64_t lq, lk, dim, lqp;
  acc_t scale;
  const acc_t* bias;  // [Lk][Lqp]: 0 or -inf (blocked), or nullptr
  uint32_t threshold;  // 0: no dropout
  acc_t inv_keep;
  uint64_t key, counter_lo;
};

template <typename scalar_t, typename acc_t>
void load_head(Scratch<acc_t>& sc, const Shape<acc_t>& s, const Strided<scalar_t>& q, const Strided<scalar_t>& k,
               const Strided<scalar_t>& v, int64_t b, int64_t h) {
  std::fill(sc.qt.begin(), sc.qt.end(), acc_t(0));
  for (int64_t i = 0; i < s.lq; ++i) {
    const scalar_t* r = q.row(b, h, i);
    for (int64_t d = 0; d < s.dim; ++d) sc.qt[d * s.lqp + i] = static_cast<acc_t>(r[d * q.sd]) * s.scale;
  }
  for (int64_t j = 0; j < s.lk; ++j) {
    const scalar_t* rk = k.row(b, h, j);
    const scalar_t* rv = v.row(b, h, j);
    for (int64_t d = 0; d < s.dim; ++d) {
      sc.kk[j * s.dim + d] = static_cast<acc_t>(rk[d * k.sd]);
      sc.vv[j * s.dim + d] = static_cast<acc_t>(rv[d * v.sd]);
    }
  }
}

// kD vectors in registers when the head width is a compile-time constant (kD > 0: the loops over channels unroll and
// the accumulators never touch memory), else D vectors in the task's scratch.
template <typename acc_t, int kD>
struct Channels {
  Vec<acc_t> reg[kD > 0 ? kD : 1];
  acc_t* mem;
  explicit Channels(acc_t* scratch) : mem(scratch) {}
  __attribute__((always_inline)) Vec<acc_t> get(int64_t d) const {
    if constexpr (kD > 0) {
      return reg[d];
    } else {
      return vload<acc_t>(mem + d * kLanes<acc_t>);
    }
  }
  __attribute__((always_inline)) void set(int64_t d, const Vec<acc_t>& v) {
    if constexpr (kD > 0) {
      reg[d] = v;
    } else {
      vstore<acc_t>(mem + d * kLanes<acc_t>, v);
    }
  }
};

template <typename scalar_t, typename acc_t, int kD>
MMER_EXT_CPU_MULTIVERSION void forward_head(Scratch<acc_t>& sc, const Shape<acc_t>& s, int64_t bh,
                                            StridedOut<scalar_t>& out, acc_t* __restrict lse, int64_t b,
                                            int64_t h) {
  constexpr int W = kLanes<acc_t>;
  const int64_t D = kD > 0 ? kD : s.dim;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  if (s.threshold != 0u) {
    head_bits(s.key, s.counter_lo, static_cast<uint64_t>(bh * s.lq * s.lk), s.lq * s.lk, sc.words.data());
  }
  Channels<acc_t, kD> qv(sc.qreg.data()), acc(sc.acc.data());
  for (int64_t i0 = 0; i0 < s.lq; i0 += W) {
    for (int64_t d = 0; d < D; ++d) qv.set(d, vload<acc_t>(sc.qt.data() + d * s.lqp + i0));
    // pass 1: the block's scores against every key and their row maxima
    Vec<acc_t> m = Vec<acc_t>{} + neg_inf;
    for (int64_t j = 0; j < s.lk; ++j) {
      Vec<acc_t> x = s.bias != nullptr ? vload<acc_t>(s.bias + j * s.lqp + i0) : Vec<acc_t>{};
      const acc_t* kj = sc.kk.data() + j * D;
      for (int64_t d = 0; d < D; ++d) x += qv.get(d) * kj[d];
      vstore<acc_t>(sc.s.data() + j * W, x);
      m = x > m ? x : m;
    }
    const Vec<acc_t> shift = m == neg_inf ? Vec<acc_t>{} : m;  // all-blocked rows: exp(-inf - 0) = 0
    if (s.threshold != 0u) block_factors(sc, i0, s.lq, s.lk, s.threshold, s.inv_keep);
    // pass 2: probabilities, their sums, the (dropped) weighted sum of v
    Vec<acc_t> l{};
    for (int64_t d = 0; d < D; ++d) acc.set(d, Vec<acc_t>{});
    for (int64_t j = 0; j < s.lk; ++j) {
      Vec<acc_t> p = vexp<acc_t>(vload<acc_t>(sc.s.data() + j * W) - shift);
      l += p;
      if (s.threshold != 0u) p *= vload<acc_t>(sc.factor.data() + j * W);
      const acc_t* vj = sc.vv.data() + j * D;
      for (int64_t d = 0; d < D; ++d) acc.set(d, acc.get(d) + p * vj[d]);
    }
    for (int w = 0; w < W && i0 + w < s.lq; ++w) {
      const acc_t inv = l[w] > acc_t(0) ? acc_t(1) / l[w] : acc_t(0);
      scalar_t* o = out.row(b, h, i0 + w);
      for (int64_t d = 0; d < D; ++d) o[d * out.sd] = static_cast<scalar_t>(acc.get(d)[w] * inv);
      lse[i0 + w] = row_lse<acc_t>(m[w], l[w]);
    }
  }
}

// Sum of a vector's lanes by halving (log2 W shuffles and adds).
template <typename acc_t>
__attribute__((always_inline)) inline acc_t lane_sum(Vec<acc_t> v) {
  using IVec = typename Simd<std::conditional_t<sizeof(acc_t) == 4, int32_t, int64_t>>::Vec;
  constexpr int W = kLanes<acc_t>;
  IVec idx;
  for (int w = 0; w < W; ++w) idx[w] = w;
  for (int half = W / 2; half >= 1; half /= 2) v += __builtin_shuffle(v, idx ^ half);
  return v[0];
}

template <typename scalar_t, typename acc_t, int kD>
MMER_EXT_CPU_MULTIVERSION void backward_head(Scratch<acc_t>& sc, const Shape<acc_t>& s, int64_t bh,
                                             const Strided<scalar_t>& grad, const Strided<scalar_t>& out,
                                             const acc_t* __restrict lse, StridedOut<scalar_t>& dq,
                                             StridedOut<scalar_t>& dk, StridedOut<scalar_t>& dv, int64_t b,
                                             int64_t h) {
  constexpr int W = kLanes<acc_t>;
  const int64_t D = kD > 0 ? kD : s.dim;
  if (s.threshold != 0u) {
    head_bits(s.key, s.counter_lo, static_cast<uint64_t>(bh * s.lq * s.lk), s.lq * s.lk, sc.words.data());
  }
  std::fill(sc.dk.begin(), sc.dk.end(), acc_t(0));
  std::fill(sc.dv.begin(), sc.dv.end(), acc_t(0));
  Channels<acc_t, kD> qv(sc.qreg.data()), gv(sc.greg.data()), dqa(sc.acc.data());
  for (int64_t i0 = 0; i0 < s.lq; i0 += W) {
    // lanes of this block: lse (+inf past Lq, so p = 0 there), delta = dout . out and dout itself
    alignas(64) acc_t lse_l[W], delta_l[W];
    for (int64_t d = 0; d < D; ++d) gv.set(d, Vec<acc_t>{});
    for (int w = 0; w < W; ++w) {
      const int64_t i = i0 + w;
      lse_l[w] = std::numeric_limits<acc_t>::infinity();
      delta_l[w] = acc_t(0);
      if (i >= s.lq) continue;
      lse_l[w] = lse[i];
      const scalar_t* g = grad.row(b, h, i);
      const scalar_t* o = out.row(b, h, i);
      acc_t dsum = 0;
      for (int64_t d = 0; d < D; ++d) {
        const acc_t gd = static_cast<acc_t>(g[d * grad.sd]);
        Vec<acc_t> col = gv.get(d);
        col[w] = gd;
        gv.set(d, col);
        dsum += gd * static_cast<acc_t>(o[d * out.sd]);
      }
      delta_l[w] = dsum;
    }
    const Vec<acc_t> lse_v = vload<acc_t>(lse_l), delta = vload<acc_t>(delta_l);
    for (int64_t d = 0; d < D; ++d) qv.set(d, vload<acc_t>(sc.qt.data() + d * s.lqp + i0));
    if (s.threshold != 0u) block_factors(sc, i0, s.lq, s.lk, s.threshold, s.inv_keep);
    for (int64_t d = 0; d < D; ++d) dqa.set(d, Vec<acc_t>{});
    for (int64_t j = 0; j < s.lk; ++j) {
      const acc_t* vj = sc.vv.data() + j * D;
      const acc_t* kj = sc.kk.data() + j * D;
      Vec<acc_t> x = s.bias != nullptr ? vload<acc_t>(s.bias + j * s.lqp + i0) : Vec<acc_t>{};
      Vec<acc_t> dp{};
      for (int64_t d = 0; d < D; ++d) {
        x += qv.get(d) * kj[d];
        dp += gv.get(d) * vj[d];
      }
      const Vec<acc_t> p = vexp<acc_t>(x - lse_v);
      Vec<acc_t> pd = p, ds;
      if (s.threshold != 0u) {
        const Vec<acc_t> f = vload<acc_t>(sc.factor.data() + j * W);
        pd = p * f;
        ds = p * (dp * f - delta);
      } else {
        ds = p * (dp - delta);
      }
      acc_t* dkj = sc.dk.data() + j * D * W;
      acc_t* dvj = sc.dv.data() + j * D * W;
      for (int64_t d = 0; d < D; ++d) {
        vstore<acc_t>(dvj + d * W, vload<acc_t>(dvj + d * W) + pd * gv.get(d));
        vstore<acc_t>(dkj + d * W, vload<acc_t>(dkj + d * W) + ds * qv.get(d));
        dqa.set(d, dqa.get(d) + ds * kj[d]);
      }
    }
    for (int w = 0; w < W && i0 + w < s.lq; ++w) {
      scalar_t* r = dq.row(b, h, i0 + w);
      for (int64_t d = 0; d < D; ++d) r[d * dq.sd] = static_cast<scalar_t>(dqa.get(d)[w] * s.scale);
    }
  }
  // qt holds scale * q, so the lane sums of ds * qt are already d loss / d k.
  for (int64_t j = 0; j < s.lk; ++j) {
    scalar_t* rk = dk.row(b, h, j);
    scalar_t* rv = dv.row(b, h, j);
    for (int64_t d = 0; d < D; ++d) {
      rk[d * dk.sd] = static_cast<scalar_t>(lane_sum<acc_t>(vload<acc_t>(sc.dk.data() + (j * D + d) * W)));
      rv[d * dv.sd] = static_cast<scalar_t>(lane_sum<acc_t>(vload<acc_t>(sc.dv.data() + (j * D + d) * W)));
    }
  }
}

// Calls f with the head width as a template constant where one is compiled (MulT's 4, 8, 16), else 0 (dynamic).
template <typename F>
void with_head_width(int64_t dim, F&& f) {
  switch (dim) {
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 16: f(std::integral_constant<int, 16>{}); break;
    default: f(std::integral_constant<int, 0>{}); break;
  }
}

template <typename acc_t>
Shape<acc_t> make_shape(const Problem& p, std::vector<acc_t>& bias, uint64_t key, uint64_t counter_lo) {
  constexpr int W = kLanes<acc_t>;
  Shape<acc_t> s{};
  s.lq = p.lq;
  s.lk = p.lk;
  s.dim = p.dim;
  s.lqp = (p.lq + W - 1) / W * W;
  s.scale = static_cast<acc_t>(p.scale);
  s.threshold = p.dropout > 0.0 ? dropout_threshold(p.dropout) : 0u;
  s.inv_keep = static_cast<acc_t>(1.0 / (1.0 - p.dropout));
  s.key = key;
  s.counter_lo = counter_lo;
  s.bias = nullptr;
  if (p.mask != nullptr) {
    // transposed to [Lk][Lqp] so a block of query rows reads one vector per key
    bias.assign(static_cast<size_t>(p.lk * s.lqp), acc_t(0));
    const bool* m = p.mask->const_data_ptr<bool>();
    for (int64_t i = 0; i < p.lq; ++i) {
      for (int64_t j = 0; j < p.lk; ++j) {
        if (m[i * p.lk + j]) bias[j * s.lqp + i] = -std::numeric_limits<acc_t>::infinity();
      }
    }
    s.bias = bias.data();
  }
  return s;
}

template <typename acc_t>
void size_scratch(Scratch<acc_t>& sc, const Shape<acc_t>& s, bool backward) {
  constexpr int W = kLanes<acc_t>;
  sc.qt.resize(static_cast<size_t>(s.dim * s.lqp));
  sc.kk.resize(static_cast<size_t>(s.lk * s.dim));
  sc.vv.resize(static_cast<size_t>(s.lk * s.dim));
  sc.s.resize(static_cast<size_t>(s.lk * W));
  sc.acc.resize(static_cast<size_t>(s.dim * W));
  sc.qreg.resize(static_cast<size_t>(s.dim * W));
  sc.greg.resize(static_cast<size_t>(s.dim * W));
  if (s.threshold != 0u) {
    sc.factor.resize(static_cast<size_t>(s.lk * W));
    sc.words.resize(static_cast<size_t>(s.lq * s.lk + 8));
  }
  if (backward) {
    sc.dk.resize(static_cast<size_t>(s.lk * s.dim * W));
    sc.dv.resize(static_cast<size_t>(s.lk * s.dim * W));
  }
}

// (batch, head) pairs per task: enough work per task that waking the pool pays.
int64_t grain(const Problem& p) {
  return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, p.lq * p.lk * std::max<int64_t>(p.dim, 1)));
}

// Runs f(scratch, bh, b, h, width) for every (batch, head) in parallel, with the head's q, k, v loaded into the
// task's scratch and the head width as a template constant where one is compiled.
template <typename scalar_t, typename acc_t, typename F>
void for_each_head(const Problem& p, const Shape<acc_t>& s, const Strided<scalar_t>& q, const Strided<scalar_t>& k,
                   const Strided<scalar_t>& v, bool backward, F&& f) {
  at::parallel_for(0, p.batch * p.heads, grain(p), [&](int64_t bh0, int64_t bh1) {
    Scratch<acc_t> sc;
    size_scratch(sc, s, backward);
    for (int64_t bh = bh0; bh < bh1; ++bh) {
      const int64_t b = bh / p.heads, h = bh % p.heads;
      load_head(sc, s, q, k, v, b, h);
      with_head_width(p.dim, [&](auto width) { f(sc, bh, b, h, width); });
    }
  });
}

void attention_forward_cpu(const Problem& p, at::Tensor& out, at::Tensor& lse, at::Tensor& rng,
                           const std::optional<at::Generator>& generator) {
  const uint64_t key = p.dropout > 0.0 ? cpu_philox_key(generator) : 0;  // one 64-bit draw keys the whole mask
  rng.mutable_data_ptr<int64_t>()[0] = static_cast<int64_t>(key);
  rng.mutable_data_ptr<int64_t>()[1] = 0;
  if (out.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.q.scalar_type(), "mmer_ext.attention_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> bias;
    const Shape<acc_t> s = make_shape<acc_t>(p, bias, key, 0);
    const Strided<scalar_t> q(p.q), k(p.k), v(p.v);
    StridedOut<scalar_t> o(out);
    acc_t* lse_data = lse.mutable_data_ptr<acc_t>();
    for_each_head(p, s, q, k, v, /*backward=*/false, [&](Scratch<acc_t>& sc, int64_t bh, int64_t b, int64_t h,
                                                         auto width) {
      forward_head<scalar_t, acc_t, decltype(width)::value>(sc, s, bh, o, lse_data + bh * p.lq, b, h);
    });
  });
}

void attention_backward_cpu(const Problem& p, const at::Tensor& grad, const at::Tensor& out, const at::Tensor& lse,
                            const at::Tensor& rng, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  if (dk.numel() == 0 && dq.numel() == 0) return;
  if (p.lq == 0) {  // no query: nothing reaches the keys
    dk.zero_();
    dv.zero_();
    return;
  }
  const int64_t* state = rng.const_data_ptr<int64_t>();
  const auto key = static_cast<uint64_t>(state[0]), counter_lo = static_cast<uint64_t>(state[1]);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.q.scalar_type(), "mmer_ext.attention_backward_cpu",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> bias;
    const Shape<acc_t> s = make_shape<acc_t>(p, bias, key, counter_lo);
    const Strided<scalar_t> q(p.q), k(p.k), v(p.v), g(grad), o(out);
    StridedOut<scalar_t> dqo(dq), dko(dk), dvo(dv);
    const acc_t* lse_data = lse.const_data_ptr<acc_t>();
    for_each_head(p, s, q, k, v, /*backward=*/true, [&](Scratch<acc_t>& sc, int64_t bh, int64_t b, int64_t h,
                                                        auto width) {
      backward_head<scalar_t, acc_t, decltype(width)::value>(sc, s, bh, g, o, lse_data + bh * p.lq, dqo, dko, dvo, b,
                                                             h);
    });
  });
}

}  // namespace

const DeviceKernels kCpuKernels{&attention_forward_cpu, &attention_backward_cpu};

}  // namespace mmer_ext::attention
