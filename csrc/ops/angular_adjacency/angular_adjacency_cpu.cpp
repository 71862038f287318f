// CPU kernels of the angular adjacency (see angular_adjacency.h and angular_adjacency_math.h).
//
// Work is split by dialogue: edges never cross dialogues, so each dialogue's graph (and, in backward, its share of
// the gradient) is computed by one thread from its own rows, with no reduction across threads: results do not
// depend on the thread count. Dialogues are taken from a shared queue, longest first, so the threads stay busy
// when lengths vary (10 to 110 utterances in IEMOCAP).
//
// Per dialogue g (L utterances) and modality m, the cosines of the intra-modality block are one GEMM of the unit
// vectors (MKL through at::cpu::mm_out, into a thread-local L x L buffer); the arccos map, window, degrees and
// scaling are fused passes over the upper triangle, mirrored so the adjacency is exactly symmetric. The output rows
// of the dialogue (zeros outside it) are then written once, in order. Backward recomputes the cosines (one GEMM),
// builds the symmetric matrix S of dL/dc per pair and gets dL/du with a second GEMM, S @ U.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "common/macros.h"
#include "ops/angular_adjacency/angular_adjacency.h"
#include "ops/angular_adjacency/angular_adjacency_math.h"

namespace mmer_ext::angular_adjacency {
namespace {

// Index of the unordered modality pair (m, n), m < n, among the M(M-1)/2 pairs in row-major upper-triangle order.
inline int64_t pair_index(int64_t m, int64_t n, int64_t M) { return m * (2 * M - m - 1) / 2 + (n - m - 1); }

// A dense adjacency is mostly zeros, and writing a fresh 100 MB tensor costs more in first-touch page faults than
// in stores. Transparent huge pages cut the faults 512-fold; this only advises the kernel (as torch does for every
// allocation under THP_MEM_ALLOC_ENABLE=1) and is a no-op where THP is off or unsupported.
void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < 4 * kHuge) return;
  const auto first = reinterpret_cast<uintptr_t>(data);
  const uintptr_t begin = (first + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (first + bytes) & ~(kHuge - 1);
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

// Runs fn(g, scratch) for every dialogue g, longest first, on all threads. Each thread owns one Scratch (buffers
// sized for a dialogue), kept across calls: buffers of a few hundred kB would otherwise be mapped fresh from the
// kernel on every call (glibc serves them with mmap), and their page faults cost as much as the arithmetic.
template <typename Scratch, typename Fn>
void for_each_dialogue(const Dialogues& dialogues, Fn&& fn) {
  const int64_t G = dialogues.count();
  if (G == 0) return;
  std::vector<int64_t> order(static_cast<size_t>(G));
  std::iota(order.begin(), order.end(), int64_t(0));
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return dialogues.length(a) > dialogues.length(b); });
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), G));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    thread_local Scratch scratch;
    for (int64_t i = next.fetch_add(1); i < G; i = next.fetch_add(1)) fn(order[i], scratch);
  });
}

// ---- SIMD leaves -----------------------------------------------------------------------------------------------

template <typename acc_t>
MMER_EXT_CPU_MULTIVERSION acc_t dot(const acc_t* __restrict a, const acc_t* __restrict b, int64_t n) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// unit[r] = x[r] / ||x[r]|| (0 for a zero row) and inv_norm[r] = 1 / ||x[r]|| for rows [begin, end) of a
// [rows, D] matrix.
template <typename scalar_t, typename acc_t>
MMER_EXT_CPU_MULTIVERSION void normalize_rows(const scalar_t* __restrict x, int64_t begin, int64_t end, int64_t D,
                                              acc_t* __restrict unit, acc_t* __restrict inv_norm) {
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* xr = x + r * D;
    acc_t* ur = unit + r * D;
    // Scaled by the row's largest magnitude first (see angular_adjacency_math.h): scale-invariant.
    acc_t max_abs = 0;
#pragma omp simd reduction(max : max_abs)
    for (int64_t d = 0; d < D; ++d) max_abs = max_magnitude(max_abs, static_cast<acc_t>(xr[d]));
    const acc_t divisor = row_divisor(max_abs);
    acc_t ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int64_t d = 0; d < D; ++d) {
      const acc_t v = static_cast<acc_t>(xr[d]) / divisor;
      ss += v * v;
    }
    const acc_t inv = inverse_norm(ss);
    inv_norm[r] = unscaled_inverse_norm(inv, divisor);
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) ur[d] = unit_component(static_cast<acc_t>(xr[d]), divisor, inv);
  }
}

// Forward, one row i of an intra block, in place: w[j] = weight(c[j]) for j in [begin, end); adds every weight to
// col_sum[j] and returns their sum.
template <typename acc_t>
MMER_EXT_CPU_MULTIVERSION acc_t weight_row(acc_t* __restrict w, acc_t* __restrict col_sum, int64_t begin,
                                           int64_t end, acc_t scale) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = begin; j < end; ++j) {
    const acc_t a = angular_weight(w[j], scale);
    w[j] = a;
    col_sum[j] += a;
    sum += a;
  }
  return sum;
}

// Backward pass 1, one row i: the degree-term sums over the pairs (i, j), j in [begin, end): h = g_ij + g_ji,
// r_sum[i] += h A s_j (returned) and r_sum[j] += h A s_i.
template <typename acc_t>
MMER_EXT_CPU_MULTIVERSION acc_t degree_sum_row(const acc_t* __restrict c, const acc_t* __restrict h,
                                               const acc_t* __restrict s, acc_t s_i, acc_t* __restrict r_sum,
                                               int64_t begin, int64_t end, acc_t scale) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = begin; j < end; ++j) {
    const acc_t ha = h[j] * angular_weight(c[j], scale);
    sum += ha * s[j];
    r_sum[j] += ha * s_i;
  }
  return sum;
}

// Backward pass 2, one row i, in place over h: h[j] becomes dL/dc of the pair (i, j), j in [begin, end).
template <typename acc_t>
MMER_EXT_CPU_MULTIVERSION void pair_grad_row(const acc_t* __restrict c, acc_t* __restrict h,
                                             const acc_t* __restrict s, const acc_t* __restrict r, acc_t s_i,
                                             acc_t r_i, int64_t begin, int64_t end, acc_t scale) {
#pragma omp simd
  for (int64_t j = begin; j < end; ++j)
    h[j] = pair_grad(h[j], s_i, s[j], r_i, r[j], angular_weight_grad(c[j], scale));
}

// out[j] = a[j] * (s_i * s[j]) for j < n, rounded to the output dtype. The product of the two scalings is
// commutative, so a symmetric A stays exactly symmetric.
template <typename scalar_t, typename acc_t>
MMER_EXT_CPU_MULTIVERSION void scaled_row(scalar_t* __restrict out, const acc_t* __restrict a,
                                          const acc_t* __restrict s, acc_t s_i, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<scalar_t>(a[j] * (s_i * s[j]));
}

// g_out = (g - (g . u) u) * inv_norm: the gradient through u = x / ||x||.
template <typename scalar_t, typename acc_t>
MMER_EXT_CPU_MULTIVERSION void project_row(scalar_t* __restrict out, const acc_t* __restrict g,
                                           const acc_t* __restrict u, acc_t inv_norm, int64_t D) {
  acc_t gu = 0;
#pragma omp simd reduction(+ : gu)
  for (int64_t d = 0; d < D; ++d) gu += g[d] * u[d];
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) out[d] = static_cast<scalar_t>((g[d] - gu * u[d]) * inv_norm);
}

template <typename acc_t>
MMER_EXT_CPU_MULTIVERSION void axpy(acc_t* __restrict y, acc_t a, const acc_t* __restrict x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

template <typename scalar_t>
void fill_zero(scalar_t* p, int64_t n) {
  if (n > 0) std::memset(static_cast<void*>(p), 0, static_cast<size_t>(n) * sizeof(scalar_t));
}

// ---- shared pieces of forward and backward -----------------------------------------------------------------------

// The unit vectors of dialogue g (rows [off, off + L) of every modality) into unit [M, L, D], and 1 / ||x|| into
// inv_norm[m * N + off + i]. Per dialogue and thread, so they are computed right before use, in cache.
template <typename scalar_t, typename acc_t>
void dialogue_unit_vectors(const scalar_t* x, int64_t M, int64_t N, int64_t D, int64_t off, int64_t L, acc_t* unit,
                           acc_t* inv_norm) {
  for (int64_t m = 0; m < M; ++m)
    normalize_rows<scalar_t, acc_t>(x + (m * N + off) * D, 0, L, D, unit + m * L * D, inv_norm + m * N + off);
}

// A [rows, cols] tensor over a thread's buffer (for the GEMMs).
template <typename acc_t>
at::Tensor view(acc_t* data, int64_t rows, int64_t cols) {
  return at::from_blob(data, {rows, cols}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
}

// cos[i, j] = u_i . u_j over the L utterances of one modality of one dialogue (all of it; only the upper triangle
// is used). unit_m: [L, D] rows of the unit vectors.
template <typename acc_t>
void gram(acc_t* unit_m, acc_t* cos, int64_t L, int64_t D) {
  auto u = view(unit_m, L, D);
  auto out = view(cos, L, L);
  at::cpu::mm_out(out, u, u.t());
}

// ---- forward ----------------------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
void forward_impl(const at::Tensor& x, const Dialogues& dialogues, const Options& opt, at::Tensor& out,
                  at::Tensor& stats) {
  const int64_t M = x.size(0), N = x.size(1), D = x.size(2);
  const int64_t P = M * (M - 1) / 2;
  const int64_t Lmax = dialogues.max_length;
  const acc_t scale = static_cast<acc_t>(opt.scale);
  const acc_t unit_weight = static_cast<acc_t>(unit_self_weight(opt.scale));
  acc_t* inv_norm = stats.mutable_data_ptr<acc_t>();
  acc_t* inv_sqrt_deg = inv_norm + M * N;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  // Row stride of the output and where dialogue g's node (m, i) sits along a row / down the columns.
  const int64_t row_len = opt.blocks ? M * Lmax : M * N;

  struct Buffers {  // per thread, reused across dialogues
    std::vector<acc_t> unit;   // [M, L, D] unit vectors
    std::vector<acc_t> block;  // [M, L, L] cosines, then weights
    std::vector<acc_t> cross;  // [P, L] inter-modality weights
    std::vector<acc_t> deg;    // [M, L] degrees, then d^-1/2
  };
  for_each_dialogue<Buffers>(dialogues, [&](int64_t g, Buffers& buf) {
    const int64_t off = dialogues.offset(g), L = dialogues.length(g);
    buf.unit.resize(static_cast<size_t>(M * L * D));
    buf.block.resize(static_cast<size_t>(M * L * L));
    buf.cross.resize(static_cast<size_t>(std::max<int64_t>(P, 1) * L));
    buf.deg.assign(static_cast<size_t>(M * L), acc_t(0));
    acc_t* up = buf.unit.data();  // row (m, i) at (m * L + i) * D
    dialogue_unit_vectors(xp, M, N, D, off, L, up, inv_norm);
    // Intra-modality weights, upper triangle within the window, then mirrored; degrees accumulate by row and column.
    for (int64_t m = 0; m < M; ++m) {
      acc_t* w = buf.block.data() + m * L * L;
      acc_t* deg = buf.deg.data() + m * L;
      gram(up + m * L * D, w, L, D);
      for (int64_t i = 0; i < L; ++i) {
        acc_t* wi = w + i * L;
        const int64_t hi = opt.window < 0 ? L : std::min(L, i + opt.window + 1);
        const acc_t self = self_weight(inv_norm[m * N + off + i], unit_weight);
        wi[i] = self;
        deg[i] += self + weight_row(wi, deg, i + 1, hi, scale);
        for (int64_t j = hi; j < L; ++j) wi[j] = acc_t(0);
      }
      for (int64_t i = 0; i < L; ++i)
        for (int64_t j = 0; j < i; ++j) w[i * L + j] = w[j * L + i];
    }
    // Inter-modality weights: utterance i in modalities m < n.
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t n = m + 1; n < M; ++n) {
        acc_t* cw = buf.cross.data() + pair_index(m, n, M) * L;
        for (int64_t i = 0; i < L; ++i) {
          const acc_t c = dot(up + (m * L + i) * D, up + (n * L + i) * D, D);
          const acc_t a = angular_weight(c, scale);
          cw[i] = a;
          buf.deg[m * L + i] += a;
          buf.deg[n * L + i] += a;
        }
      }
    }
    // d^-1/2 per node, kept in buf.deg for the row writer and in stats for the backward.
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t i = 0; i < L; ++i) {
        acc_t& d = buf.deg[m * L + i];
        d = opt.normalize ? inverse_sqrt_degree(d) : acc_t(1);
        inv_sqrt_deg[m * N + off + i] = d;
      }
    }
    // The dialogue's output rows, each written once from left to right (zeros outside the dialogue).
    const int64_t seg_len = opt.blocks ? Lmax : N;  // columns per modality along a row
    const int64_t seg_off = opt.blocks ? 0 : off;   // where the dialogue starts within a modality's columns
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t i = 0; i < L; ++i) {
        const int64_t row = opt.blocks ? (g * M + m) * Lmax + i : m * N + off + i;
        scalar_t* orow = op + row * row_len;
        const acc_t s_i = buf.deg[m * L + i];
        for (int64_t n = 0; n < M; ++n) {
          scalar_t* seg = orow + n * seg_len;
          fill_zero(seg, seg_off);
          if (n == m) {
            scaled_row<scalar_t, acc_t>(seg + seg_off, buf.block.data() + (m * L + i) * L, buf.deg.data() + n * L,
                                        s_i, L);
          } else {
            fill_zero(seg + seg_off, L);
            const acc_t a = buf.cross[pair_index(std::min(m, n), std::max(m, n), M) * L + i];
            seg[seg_off + i] = static_cast<scalar_t>(a * (s_i * buf.deg[n * L + i]));
          }
          fill_zero(seg + seg_off + L, seg_len - seg_off - L);
        }
      }
    }
    if (opt.blocks) {
      // Padding rows of every modality: all zeros.
      for (int64_t m = 0; m < M; ++m)
        fill_zero(op + ((g * M + m) * Lmax + L) * row_len, (Lmax - L) * row_len);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> angular_adjacency_forward_cpu(const at::Tensor& x, const Dialogues& dialogues,
                                               const Options& opt) {
  const int64_t M = x.size(0), N = x.size(1);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto stats = at::empty({2, M, N}, x.options().dtype(acc));
  at::Tensor out;
  if (opt.blocks) {
    const int64_t S = M * dialogues.max_length;
    out = at::empty({dialogues.count(), S, S}, x.options());
  } else {
    out = at::empty({M * N, M * N}, x.options());
  }
  advise_huge_pages(out.data_ptr(), static_cast<size_t>(out.nbytes()));
  if (N == 0) return {out, stats};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mmer_ext.angular_adjacency_cpu", [&] {
    forward_impl<scalar_t, at::opmath_type<scalar_t>>(x, dialogues, opt, out, stats);
  });
  return {out, stats};
}

// ---- backward ---------------------------------------------------------------------------------------------------

// Reads dL/dÂ at (row, col) of the output whatever its dtype and strides (the upstream gradient may be an expanded
// or transposed view; a contiguous copy of a dense one would cost 100 MB).
template <typename grad_t, typename acc_t>
struct GradReader {
  const grad_t* data;
  int64_t stride_g, stride_r, stride_c;
  acc_t operator()(int64_t g, int64_t row, int64_t col) const {
    return static_cast<acc_t>(data[g * stride_g + row * stride_r + col * stride_c]);
  }
};

template <typename scalar_t, typename acc_t, typename grad_t>
void backward_impl(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& stats, const Dialogues& dialogues,
                   const Options& opt, at::Tensor& grad_x) {
  const int64_t M = x.size(0), N = x.size(1), D = x.size(2);
  const int64_t P = M * (M - 1) / 2;
  const int64_t Lmax = dialogues.max_length;
  const acc_t scale = static_cast<acc_t>(opt.scale);
  const acc_t unit_weight = static_cast<acc_t>(unit_self_weight(opt.scale));
  const acc_t* inv_norm = stats.const_data_ptr<acc_t>();
  const acc_t* inv_sqrt_deg = inv_norm + M * N;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  // The unit vectors are recomputed per dialogue (cheaper than keeping them: O(L D) against the O(L^2 D) GEMMs);
  // their norms land in a scratch copy, identical to stats row 0.
  std::vector<acc_t> norms(static_cast<size_t>(M * N));
  scalar_t* gxp = grad_x.mutable_data_ptr<scalar_t>();
  const GradReader<grad_t, acc_t> read{grad.const_data_ptr<grad_t>(), opt.blocks ? grad.stride(0) : 0,
                                       grad.stride(opt.blocks ? 1 : 0), grad.stride(opt.blocks ? 2 : 1)};

  struct Buffers {  // per thread, reused across dialogues
    std::vector<acc_t> unit;     // [M, L, D] unit vectors
    std::vector<acc_t> block;    // [M, L, L] cosines
    std::vector<acc_t> h;        // [M, L, L] g_ij + g_ji, then dL/dc
    std::vector<acc_t> cross_c;  // [P, L] inter-modality cosines
    std::vector<acc_t> cross_h;  // [P, L] g_pq + g_qp of the inter-modality edges
    std::vector<acc_t> r;        // [M, L] degree terms
    std::vector<acc_t> s;        // [M, L] d^-1/2
    std::vector<acc_t> gu;       // [M, L, D] dL/du
  };
  for_each_dialogue<Buffers>(dialogues, [&](int64_t g, Buffers& buf) {
    const int64_t off = dialogues.offset(g), L = dialogues.length(g);
    // Position of node (m, i) of this dialogue along the output's rows / columns.
    auto node = [&](int64_t m, int64_t i) { return opt.blocks ? m * Lmax + i : m * N + off + i; };
    const int64_t gb = opt.blocks ? g : 0;
    buf.block.resize(static_cast<size_t>(M * L * L));
    buf.h.resize(static_cast<size_t>(M * L * L));
    buf.cross_c.resize(static_cast<size_t>(std::max<int64_t>(P, 1) * L));
    buf.cross_h.resize(static_cast<size_t>(std::max<int64_t>(P, 1) * L));
    buf.r.assign(static_cast<size_t>(M * L), acc_t(0));
    buf.gu.resize(static_cast<size_t>(M * L * D));
    buf.s.resize(static_cast<size_t>(M * L));
    buf.unit.resize(static_cast<size_t>(M * L * D));
    acc_t* up = buf.unit.data();  // row (m, i) at (m * L + i) * D
    dialogue_unit_vectors(xp, M, N, D, off, L, up, norms.data());
    acc_t* s_local = buf.s.data();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t i = 0; i < L; ++i) s_local[m * L + i] = inv_sqrt_deg[m * N + off + i];

    // Cosines and the symmetrised upstream gradient h = g_ij + g_ji of every edge (upper triangle; the diagonal
    // holds 2 g_ii, which enters the degree term only).
    for (int64_t m = 0; m < M; ++m) {
      acc_t* c = buf.block.data() + m * L * L;
      acc_t* h = buf.h.data() + m * L * L;
      gram(up + m * L * D, c, L, D);
      for (int64_t i = 0; i < L; ++i) {
        const int64_t hi = opt.window < 0 ? L : std::min(L, i + opt.window + 1);
        const int64_t pi = node(m, i);
        h[i * L + i] = acc_t(2) * read(gb, pi, pi);
        for (int64_t j = i + 1; j < hi; ++j) {
          const int64_t pj = node(m, j);
          h[i * L + j] = read(gb, pi, pj) + read(gb, pj, pi);
        }
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t n = m + 1; n < M; ++n) {
        const int64_t p = pair_index(m, n, M);
        for (int64_t i = 0; i < L; ++i) {
          buf.cross_c[p * L + i] = dot(up + (m * L + i) * D, up + (n * L + i) * D, D);
          buf.cross_h[p * L + i] = read(gb, node(m, i), node(n, i)) + read(gb, node(n, i), node(m, i));
        }
      }
    }
    // Degree terms r_p = -1/2 s_p^3 sum_q (g_pq + g_qp) A_pq s_q.
    if (opt.normalize) {
      for (int64_t m = 0; m < M; ++m) {
        const acc_t* c = buf.block.data() + m * L * L;
        const acc_t* h = buf.h.data() + m * L * L;
        const acc_t* sm = s_local + m * L;
        acc_t* rm = buf.r.data() + m * L;
        for (int64_t i = 0; i < L; ++i) {
          const int64_t hi = opt.window < 0 ? L : std::min(L, i + opt.window + 1);
          const acc_t self = self_weight(inv_norm[m * N + off + i], unit_weight);
          rm[i] += h[i * L + i] * self * sm[i] +
                   degree_sum_row(c + i * L, h + i * L, sm, sm[i], rm, i + 1, hi, scale);
        }
      }
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t n = m + 1; n < M; ++n) {
          const int64_t p = pair_index(m, n, M);
          for (int64_t i = 0; i < L; ++i) {
            const acc_t ha = buf.cross_h[p * L + i] * angular_weight(buf.cross_c[p * L + i], scale);
            buf.r[m * L + i] += ha * s_local[n * L + i];
            buf.r[n * L + i] += ha * s_local[m * L + i];
          }
        }
      }
      for (int64_t q = 0; q < M * L; ++q) buf.r[q] = degree_term(buf.r[q], s_local[q]);
    }
    // dL/dc per pair (symmetric, zero diagonal: self-loops are constant), then dL/du = S @ U per modality.
    for (int64_t m = 0; m < M; ++m) {
      const acc_t* c = buf.block.data() + m * L * L;
      acc_t* h = buf.h.data() + m * L * L;
      const acc_t* sm = s_local + m * L;
      const acc_t* rm = buf.r.data() + m * L;
      for (int64_t i = 0; i < L; ++i) {
        const int64_t hi = opt.window < 0 ? L : std::min(L, i + opt.window + 1);
        pair_grad_row(c + i * L, h + i * L, sm, rm, sm[i], rm[i], i + 1, hi, scale);
        h[i * L + i] = acc_t(0);
        for (int64_t j = hi; j < L; ++j) h[i * L + j] = acc_t(0);
      }
      for (int64_t i = 0; i < L; ++i)
        for (int64_t j = 0; j < i; ++j) h[i * L + j] = h[j * L + i];
      auto gu = view(buf.gu.data() + m * L * D, L, D);
      at::cpu::mm_out(gu, view(h, L, L), view(up + m * L * D, L, D));
    }
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t n = m + 1; n < M; ++n) {
        const int64_t p = pair_index(m, n, M);
        for (int64_t i = 0; i < L; ++i) {
          const acc_t dc = pair_grad(buf.cross_h[p * L + i], s_local[m * L + i], s_local[n * L + i],
                                     buf.r[m * L + i], buf.r[n * L + i],
                                     angular_weight_grad(buf.cross_c[p * L + i], scale));
          axpy(buf.gu.data() + (m * L + i) * D, dc, up + (n * L + i) * D, D);
          axpy(buf.gu.data() + (n * L + i) * D, dc, up + (m * L + i) * D, D);
        }
      }
    }
    // Through the normalisation u = x / ||x||.
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t i = 0; i < L; ++i) {
        const int64_t row = m * N + off + i;
        project_row<scalar_t, acc_t>(gxp + row * D, buf.gu.data() + (m * L + i) * D, up + (m * L + i) * D,
                                    inv_norm[row], D);
      }
    }
  });
}

at::Tensor angular_adjacency_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& stats,
                        const Dialogues& dialogues, const Options& opt) {
  auto grad_x = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return grad_x.zero_();
  // Autograd hands over a gradient of the output's dtype; anything else is converted once (strides are kept).
  const auto g = grad.scalar_type() == x.scalar_type() ? grad : grad.to(x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mmer_ext.angular_adjacency_backward_cpu",
                                  [&] {
    backward_impl<scalar_t, at::opmath_type<scalar_t>, scalar_t>(g, x, stats, dialogues, opt, grad_x);
  });
  return grad_x;
}

// ---- block_graph_propagate ------------------------------------------------------------------------------------------
// Per dialogue, M^2 GEMMs of its L x L sub-blocks with the L-row chunks of x, on the inputs' memory: no gather, no
// padding (the padded batched matmul would do (Lmax / L)^2 times the work, 2.5x on IEMOCAP's test set).
//
// float32 / float64 call the Fortran BLAS that torch's own CPU matmul calls (sgemm_ / dgemm_, exported by
// libtorch_cpu's MKL or OpenBLAS) on raw pointers: MMGCN calls these ops 192 times per training step over ~50
// dialogue-modality blocks each, and building two tensor views and dispatching at::mm for every microsecond-sized
// GEMM cost about as much as the GEMMs' arithmetic. The symbols are weak: a torch without them (or another dtype)
// takes the at::mm path on views.

struct NoScratch {};

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

// Column-major C (m x n, ldc) = beta C + op(A) op(B), op given by 'N' / 'T'. Only where has_raw_gemm holds.
template <typename scalar_t>
void raw_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, const scalar_t* a, int64_t lda, const scalar_t* b,
              int64_t ldb, scalar_t beta, scalar_t* c, int64_t ldc) {
  const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
  const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
  const scalar_t one = 1;
  if constexpr (std::is_same_v<scalar_t, float>) {
    sgemm_(&ta, &tb, &mi, &ni, &ki, &one, a, &la, b, &lb, &beta, c, &lc);
  } else {
    dgemm_(&ta, &tb, &mi, &ni, &ki, &one, a, &la, b, &lb, &beta, c, &lc);
  }
}

// Whether raw_gemm can take the calls of a block op: a float32 / float64 BLAS is there, and every size and leading
// dimension (at most the block stride and the feature count) fits BLAS's 32-bit integers.
bool has_raw_gemm(at::ScalarType t, int64_t largest) {
  const bool blas = (t == at::kFloat && sgemm_ != nullptr) || (t == at::kDouble && dgemm_ != nullptr);
  return blas && largest <= 2147483647;
}

// The L x L block of dialogue g between modalities m (rows) and n (columns), a strided view of blocks.
at::Tensor sub_block(const at::Tensor& blocks, int64_t g, int64_t m, int64_t n, int64_t Lmax, int64_t L) {
  return blocks.select(0, g).narrow(0, m * Lmax, L).narrow(1, n * Lmax, L);
}

at::Tensor block_graph_propagate_cpu(const at::Tensor& blocks, const at::Tensor& x, const NodeLayout& layout) {
  const int64_t M = layout.M, N = layout.N, Lmax = layout.dialogues.max_length;
  auto xc = x.contiguous();
  auto y = at::empty({M * N, x.size(1)}, x.options());
  if (y.numel() == 0) return y;
  const int64_t F = x.size(1), gs = blocks.stride(0), rs = blocks.stride(1), cs = blocks.stride(2);
  if (has_raw_gemm(x.scalar_type(), std::max({F, rs, cs})) && (rs == 1 || cs == 1)) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmer_ext.block_graph_propagate_cpu", [&] {
      const scalar_t* bp = blocks.const_data_ptr<scalar_t>();
      const scalar_t* xp = xc.const_data_ptr<scalar_t>();
      scalar_t* yp = y.mutable_data_ptr<scalar_t>();
      // Row-major y_m = A x_n is column-major y_m^T = x_n^T A^T; a column-major block (transposed blocks, in the
      // backward) is read transposed instead.
      const bool row_major = cs == 1;
      for_each_dialogue<NoScratch>(layout.dialogues, [&](int64_t g, NoScratch&) {
        const int64_t off = layout.dialogues.offset(g), L = layout.dialogues.length(g);
        for (int64_t m = 0; m < M; ++m) {
          for (int64_t n = 0; n < M; ++n) {
            const scalar_t* a = bp + g * gs + m * Lmax * rs + n * Lmax * cs;
            raw_gemm<scalar_t>('N', row_major ? 'N' : 'T', F, L, L, xp + (n * N + off) * F, F, a, row_major ? rs : cs,
                               scalar_t(n > 0 ? 1 : 0), yp + (m * N + off) * F, F);
          }
        }
      });
    });
    return y;
  }
  for_each_dialogue<NoScratch>(layout.dialogues, [&](int64_t g, NoScratch&) {
    const int64_t off = layout.dialogues.offset(g), L = layout.dialogues.length(g);
    for (int64_t m = 0; m < M; ++m) {
      auto y_m = y.narrow(0, m * N + off, L);
      for (int64_t n = 0; n < M; ++n) {
        const auto a = sub_block(blocks, g, m, n, Lmax, L);
        const auto x_n = xc.narrow(0, n * N + off, L);
        if (n == 0) {
          at::cpu::mm_out(y_m, a, x_n);
        } else {
          at::cpu::addmm_out(y_m, y_m, a, x_n);
        }
      }
    }
  });
  return y;
}

at::Tensor block_graph_outer_cpu(const at::Tensor& a, const at::Tensor& b, const NodeLayout& layout) {
  const int64_t M = layout.M, N = layout.N, Lmax = layout.dialogues.max_length, S = layout.slots();
  if (a.size(1) == 0 || N == 0 || !has_raw_gemm(a.scalar_type(), std::max(S, a.size(1)))) {
    auto out = at::zeros({layout.dialogues.count(), S, S}, a.options());
    if (a.size(1) == 0 || N == 0) return out;
    auto ac = a.contiguous(), bc = b.contiguous();
    for_each_dialogue<NoScratch>(layout.dialogues, [&](int64_t g, NoScratch&) {
      const int64_t off = layout.dialogues.offset(g), L = layout.dialogues.length(g);
      for (int64_t m = 0; m < M; ++m) {
        const auto a_m = ac.narrow(0, m * N + off, L);
        for (int64_t n = 0; n < M; ++n) {
          auto o = sub_block(out, g, m, n, Lmax, L);
          at::cpu::mm_out(o, a_m, bc.narrow(0, n * N + off, L).t());
        }
      }
    });
    return out;
  }
  // Every entry is written once, by its dialogue's thread: the GEMMs fill the L x L sub-blocks and the padding is
  // zeroed there (not in a separate pass over the whole tensor first).
  auto out = at::empty({layout.dialogues.count(), S, S}, a.options());
  auto ac = a.contiguous(), bc = b.contiguous();
  const int64_t F = a.size(1);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "mmer_ext._block_graph_outer_cpu", [&] {
    const scalar_t* ap = ac.const_data_ptr<scalar_t>();
    const scalar_t* bp = bc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    for_each_dialogue<NoScratch>(layout.dialogues, [&](int64_t g, NoScratch&) {
      const int64_t off = layout.dialogues.offset(g), L = layout.dialogues.length(g);
      scalar_t* block = op + g * S * S;
      for (int64_t r = 0; r < S; ++r) {
        scalar_t* row = block + r * S;
        if (r % Lmax >= L) {
          std::fill(row, row + S, scalar_t(0));
          continue;
        }
        for (int64_t n = 0; n < M; ++n) std::fill(row + n * Lmax + L, row + (n + 1) * Lmax, scalar_t(0));
      }
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t n = 0; n < M; ++n) {
          // Row-major block (m, n) = a_m b_n^T is column-major b_n a_m^T.
          raw_gemm<scalar_t>('T', 'N', L, L, F, bp + (n * N + off) * F, F, ap + (m * N + off) * F, F, scalar_t(0),
                             block + m * Lmax * S + n * Lmax, S);
        }
      }
    });
  });
  return out;
}

}  // namespace

const DeviceKernels kCpuKernels{&angular_adjacency_forward_cpu, &angular_adjacency_backward_cpu,
                                &block_graph_propagate_cpu, &block_graph_outer_cpu};

}  // namespace mmer_ext::angular_adjacency
