// CUDA kernels of the angular adjacency (see angular_adjacency.h and angular_adjacency_math.h) and the CUDA
// registration of the family.
//
// Forward: angular_adjacency_unit_vectors_kernel writes the unit vectors into zero-padded dialogues U [G, M, Lmax, D]
// (float32 for float32/half/bfloat16, float64 for float64); one cuBLAS batched GEMM gives every intra-modality cosine
// block C = U U^T [G * M, Lmax, Lmax]; angular_adjacency_cross_kernel takes the M(M-1)/2 inter-modality cosines of each
// utterance; angular_adjacency_degree_kernel sums each node's edge weights (one warp per node) into d^-1/2;
// angular_adjacency_write_dense_kernel / angular_adjacency_write_blocks_kernel then produce every output element once
// (one block per output row, coalesced stores), recomputing the weight from C (arccos is cheap next to the store of a
// 100 MB dense matrix). A pair's weight is always taken from C[min(i, j), max(i, j)], so the output is exactly
// symmetric even though cuBLAS's C need not be.
//
// Backward: the same U, C and cross cosines; angular_adjacency_degree_term_kernel (normalisation only) the degree terms
// r_p; angular_adjacency_pair_grad_kernel the symmetric matrix S of dL/dc per intra pair and
// angular_adjacency_cross_grad_kernel dL/dc per inter-modality edge; a second batched GEMM S @ U; and
// angular_adjacency_input_grad_kernel adds the inter-modality terms and projects through u = x / ||x|| (one warp per
// node).
//
// The dialogue lengths are read on the host (a sync when they live on the GPU) and the offsets uploaded each call,
// so the ops are tagged cudagraph_unsafe. No atomics: results are deterministic on a given GPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/cuda_utils.cuh"
#include "ops/angular_adjacency/angular_adjacency.h"
#include "ops/angular_adjacency/angular_adjacency_math.h"

namespace mmer_ext::angular_adjacency {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarp * kWarpsPerBlock;
constexpr int kRowThreads = 256;  // write kernels: one block per output row

template <typename T>
__device__ inline T warp_sum(T v) {
  MMER_UNROLL
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename T>
__device__ inline T warp_max(T v) {
  MMER_UNROLL
  for (int off = kWarp / 2; off > 0; off /= 2) {
    const T o = __shfl_xor_sync(0xffffffffu, v, off);
    v = o > v ? o : v;
  }
  return v;
}

// The dialogue holding utterance k: the largest g with offsets[g] <= k (binary search over G + 1 offsets).
__device__ inline int64_t dialogue_of(const int64_t* __restrict__ offsets, int64_t G, int64_t k) {
  int64_t lo = 0, hi = G;  // offsets[lo] <= k < offsets[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (offsets[mid] <= k) lo = mid; else hi = mid;
  }
  return lo;
}

__device__ inline int64_t pair_index(int64_t m, int64_t n, int64_t M) { return m * (2 * M - m - 1) / 2 + (n - m - 1); }

// Geometry shared by the kernels.
struct Geometry {
  const int64_t* offsets;  // [G + 1] on the device
  int64_t G, M, N, D, Lmax, window;
};

// Position of utterance k's dialogue: g, the offset of the dialogue and i = k - offset.
struct Utterance {
  int64_t g, off, L, i;
};

__device__ inline Utterance locate(const Geometry& geo, int64_t k) {
  const int64_t g = dialogue_of(geo.offsets, geo.G, k);
  const int64_t off = geo.offsets[g];
  return {g, off, geo.offsets[g + 1] - off, k - off};
}

// Cosine of the intra-modality pair (i, j) of block (g, m), read from the upper triangle of C.
template <typename acc_t>
__device__ inline acc_t intra_cos(const acc_t* __restrict__ C, const Geometry& geo, int64_t gm, int64_t i, int64_t j) {
  const int64_t a = i < j ? i : j, b = i < j ? j : i;
  return C[(gm * geo.Lmax + a) * geo.Lmax + b];
}

// ---- forward and backward: unit vectors, cross cosines --------------------------------------------------------

// One warp per node (m, k): inv_norm[m, k] and the unit vector into U[g, m, i, :] (U is zero-filled beforehand).
template <typename scalar_t, typename acc_t>
__global__ void angular_adjacency_unit_vectors_kernel(const scalar_t* __restrict__ x, Geometry geo,
                                                      acc_t* __restrict__ U,
                                    acc_t* __restrict__ inv_norm) {
  const int64_t node = (int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.y);
  if (node >= geo.M * geo.N) return;
  const int64_t m = node / geo.N, k = node % geo.N;
  const scalar_t* xr = x + node * geo.D;
  // Scaled by the row's largest magnitude first (see angular_adjacency_math.h): scale-invariant.
  acc_t max_abs = 0;
  for (int64_t d = threadIdx.x; d < geo.D; d += kWarp) max_abs = max_magnitude(max_abs, static_cast<acc_t>(xr[d]));
  const acc_t divisor = row_divisor(warp_max(max_abs));
  acc_t ss = 0;
  for (int64_t d = threadIdx.x; d < geo.D; d += kWarp) {
    const acc_t v = static_cast<acc_t>(xr[d]) / divisor;
    ss += v * v;
  }
  const acc_t inv = inverse_norm(warp_sum(ss));
  const Utterance u = locate(geo, k);
  acc_t* ur = U + ((u.g * geo.M + m) * geo.Lmax + u.i) * geo.D;
  for (int64_t d = threadIdx.x; d < geo.D; d += kWarp) ur[d] = unit_component(static_cast<acc_t>(xr[d]), divisor, inv);
  if (threadIdx.x == 0) inv_norm[node] = unscaled_inverse_norm(inv, divisor);
}

// One warp per (utterance k, modality pair p): cross_cos[p, k] = u_m . u_n.
template <typename acc_t>
__global__ void angular_adjacency_cross_kernel(const acc_t* __restrict__ U, Geometry geo,
                                               acc_t* __restrict__ cross_cos) {
  const int64_t P = geo.M * (geo.M - 1) / 2;
  const int64_t item = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.y;
  if (item >= P * geo.N) return;
  const int64_t p = item / geo.N, k = item % geo.N;
  int64_t m = 0, rest = p;  // (m, n) of pair p in row-major upper-triangle order
  while (rest >= geo.M - 1 - m) {
    rest -= geo.M - 1 - m;
    ++m;
  }
  const int64_t n = m + 1 + rest;
  const Utterance u = locate(geo, k);
  const acc_t* a = U + ((u.g * geo.M + m) * geo.Lmax + u.i) * geo.D;
  const acc_t* b = U + ((u.g * geo.M + n) * geo.Lmax + u.i) * geo.D;
  acc_t s = 0;
  for (int64_t d = threadIdx.x; d < geo.D; d += kWarp) s += a[d] * b[d];
  s = warp_sum(s);
  if (threadIdx.x == 0) cross_cos[p * geo.N + k] = s;
}

// ---- forward --------------------------------------------------------------------------------------------------------

// One warp per node (m, k): its degree (intra row within the window + self-loop + inter-modality edges) -> s.
template <typename acc_t>
__global__ void angular_adjacency_degree_kernel(const acc_t* __restrict__ C, const acc_t* __restrict__ cross_cos,
                              const acc_t* __restrict__ inv_norm, Geometry geo, acc_t scale, acc_t unit_weight,
                              bool normalize, acc_t* __restrict__ inv_sqrt_deg) {
  const int64_t node = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.y;
  if (node >= geo.M * geo.N) return;
  const int64_t m = node / geo.N, k = node % geo.N;
  const Utterance u = locate(geo, k);
  const int64_t gm = u.g * geo.M + m;
  acc_t sum = 0;
  for (int64_t j = threadIdx.x; j < u.L; j += kWarp) {
    if (j != u.i && in_window(u.i, j, geo.window)) sum += angular_weight(intra_cos(C, geo, gm, u.i, j), scale);
  }
  sum = warp_sum(sum);
  if (threadIdx.x != 0) return;
  sum += self_weight(inv_norm[node], unit_weight);
  for (int64_t n = 0; n < geo.M; ++n) {
    if (n == m) continue;
    sum += angular_weight(cross_cos[pair_index(m < n ? m : n, m < n ? n : m, geo.M) * geo.N + k], scale);
  }
  inv_sqrt_deg[node] = normalize ? inverse_sqrt_degree(sum) : acc_t(1);
}

// Value of output entry (node m*N + off + i, node n*N + off + j) of one dialogue, both in it.
template <typename acc_t>
__device__ inline acc_t entry(const acc_t* __restrict__ C, const acc_t* __restrict__ cross_cos,
                              const acc_t* __restrict__ inv_norm, const acc_t* __restrict__ s, const Geometry& geo,
                              const Utterance& u, int64_t m, int64_t n, int64_t j, acc_t scale, acc_t unit_weight) {
  const int64_t p = m * geo.N + u.off + u.i, q = n * geo.N + u.off + j;
  acc_t a;
  if (n == m) {
    if (j == u.i) {
      a = self_weight(inv_norm[p], unit_weight);
    } else if (in_window(u.i, j, geo.window)) {
      a = angular_weight(intra_cos(C, geo, u.g * geo.M + m, u.i, j), scale);
    } else {
      return acc_t(0);
    }
  } else if (j == u.i) {
    a = angular_weight(cross_cos[pair_index(m < n ? m : n, m < n ? n : m, geo.M) * geo.N + u.off + u.i], scale);
  } else {
    return acc_t(0);
  }
  return a * (s[p] * s[q]);  // s_p s_q is commutative: exact symmetry
}

// One block per row of the dense [M N, M N] output.
template <typename scalar_t, typename acc_t>
__global__ void angular_adjacency_write_dense_kernel(const acc_t* __restrict__ C, const acc_t* __restrict__ cross_cos,
                                   const acc_t* __restrict__ inv_norm, const acc_t* __restrict__ s, Geometry geo,
                                   acc_t scale, acc_t unit_weight, scalar_t* __restrict__ out) {
  const int64_t MN = geo.M * geo.N;
  for (int64_t row = blockIdx.x; row < MN; row += gridDim.x) {
    const int64_t m = row / geo.N;
    const Utterance u = locate(geo, row % geo.N);
    scalar_t* orow = out + row * MN;
    for (int64_t n = 0; n < geo.M; ++n) {
      for (int64_t k = threadIdx.x; k < geo.N; k += blockDim.x) {
        const int64_t j = k - u.off;
        const acc_t v = (j >= 0 && j < u.L) ? entry(C, cross_cos, inv_norm, s, geo, u, m, n, j, scale, unit_weight)
                                            : acc_t(0);
        orow[n * geo.N + k] = static_cast<scalar_t>(v);
      }
    }
  }
}

// One block per row of the blocks [G, M Lmax, M Lmax] output.
template <typename scalar_t, typename acc_t>
__global__ void angular_adjacency_write_blocks_kernel(const acc_t* __restrict__ C, const acc_t* __restrict__ cross_cos,
                                    const acc_t* __restrict__ inv_norm, const acc_t* __restrict__ s, Geometry geo,
                                    acc_t scale, acc_t unit_weight, scalar_t* __restrict__ out) {
  const int64_t S = geo.M * geo.Lmax;
  for (int64_t row = blockIdx.x; row < geo.G * S; row += gridDim.x) {
    const int64_t g = row / S, m = (row % S) / geo.Lmax, i = row % geo.Lmax;
    const int64_t off = geo.offsets[g], L = geo.offsets[g + 1] - off;
    const Utterance u{g, off, L, i};
    scalar_t* orow = out + row * S;
    for (int64_t col = threadIdx.x; col < S; col += blockDim.x) {
      const int64_t n = col / geo.Lmax, j = col % geo.Lmax;
      const acc_t v = (i < L && j < L) ? entry(C, cross_cos, inv_norm, s, geo, u, m, n, j, scale, unit_weight)
                                       : acc_t(0);
      orow[col] = static_cast<scalar_t>(v);
    }
  }
}

// ---- backward -------------------------------------------------------------------------------------------------------

// dL/dÂ at output (row, col) of dialogue g, whatever the layout and strides.
template <typename scalar_t>
struct GradView {
  const scalar_t* data;
  int64_t stride_g, stride_r, stride_c;
  bool blocks;
  int64_t N, Lmax;
  // Node (m, i) of dialogue g (offset off) -> its row / column index in the output.
  __device__ int64_t pos(int64_t m, int64_t off, int64_t i) const { return blocks ? m * Lmax + i : m * N + off + i; }
  template <typename acc_t>
  __device__ acc_t at(int64_t g, int64_t row, int64_t col) const {
    return static_cast<acc_t>(data[(blocks ? g : 0) * stride_g + row * stride_r + col * stride_c]);
  }
};

// One warp per node p = (m, k): r_p = -1/2 s_p^3 sum_q (g_pq + g_qp) A_pq s_q over its edges.
template <typename scalar_t, typename acc_t>
__global__ void angular_adjacency_degree_term_kernel(const acc_t* __restrict__ C, const acc_t* __restrict__ cross_cos,
                                   const acc_t* __restrict__ inv_norm, const acc_t* __restrict__ s,
                                   GradView<scalar_t> grad, Geometry geo, acc_t scale, acc_t unit_weight,
                                   acc_t* __restrict__ r) {
  const int64_t node = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.y;
  if (node >= geo.M * geo.N) return;
  const int64_t m = node / geo.N, k = node % geo.N;
  const Utterance u = locate(geo, k);
  const int64_t gm = u.g * geo.M + m;
  const int64_t pp = grad.pos(m, u.off, u.i);
  acc_t sum = 0;
  for (int64_t j = threadIdx.x; j < u.L; j += kWarp) {
    if (j == u.i || !in_window(u.i, j, geo.window)) continue;
    const int64_t pq = grad.pos(m, u.off, j);
    const acc_t h = grad.template at<acc_t>(u.g, pp, pq) + grad.template at<acc_t>(u.g, pq, pp);
    sum += h * angular_weight(intra_cos(C, geo, gm, u.i, j), scale) * s[m * geo.N + u.off + j];
  }
  sum = warp_sum(sum);
  if (threadIdx.x != 0) return;
  sum += acc_t(2) * grad.template at<acc_t>(u.g, pp, pp) * self_weight(inv_norm[node], unit_weight) * s[node];
  for (int64_t n = 0; n < geo.M; ++n) {
    if (n == m) continue;
    const int64_t pq = grad.pos(n, u.off, u.i);
    const acc_t h = grad.template at<acc_t>(u.g, pp, pq) + grad.template at<acc_t>(u.g, pq, pp);
    const acc_t c = cross_cos[pair_index(m < n ? m : n, m < n ? n : m, geo.M) * geo.N + k];
    sum += h * angular_weight(c, scale) * s[n * geo.N + k];
  }
  r[node] = degree_term(sum, s[node]);
}

// S[g, m, i, j] = dL/dc of the intra pair (i, j) (0 on the diagonal, outside the window and in the padding).
template <typename scalar_t, typename acc_t>
__global__ void angular_adjacency_pair_grad_kernel(const acc_t* __restrict__ C, const acc_t* __restrict__ s,
                                 const acc_t* __restrict__ r, GradView<scalar_t> grad, Geometry geo, acc_t scale,
                                 acc_t* __restrict__ S) {
  const int64_t total = geo.G * geo.M * geo.Lmax * geo.Lmax;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = e % geo.Lmax, i = (e / geo.Lmax) % geo.Lmax, gm = e / (geo.Lmax * geo.Lmax);
    const int64_t g = gm / geo.M, m = gm % geo.M;
    const int64_t off = geo.offsets[g], L = geo.offsets[g + 1] - off;
    acc_t v = 0;
    if (i < L && j < L && i != j && in_window(i, j, geo.window)) {
      const int64_t pi = grad.pos(m, off, i), pj = grad.pos(m, off, j);
      const acc_t h = grad.template at<acc_t>(g, pi, pj) + grad.template at<acc_t>(g, pj, pi);
      const int64_t ni = m * geo.N + off + i, nj = m * geo.N + off + j;
      v = pair_grad(h, s[ni], s[nj], r[ni], r[nj], angular_weight_grad(intra_cos(C, geo, gm, i, j), scale));
    }
    S[e] = v;
  }
}

// One thread per (node p = (m, k), modality n != m): dcross[p * M + n] = dL/dc of the inter-modality edge
// between p and (n, k) (0 for n = m).
template <typename scalar_t, typename acc_t>
__global__ void angular_adjacency_cross_grad_kernel(const acc_t* __restrict__ cross_cos, const acc_t* __restrict__ s,
                                  const acc_t* __restrict__ r, GradView<scalar_t> grad, Geometry geo, acc_t scale,
                                  acc_t* __restrict__ dcross) {
  const int64_t total = geo.M * geo.N * geo.M;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = e % geo.M, node = e / geo.M;
    const int64_t m = node / geo.N, k = node % geo.N;
    acc_t v = 0;
    if (n != m) {
      const Utterance u = locate(geo, k);
      const int64_t pp = grad.pos(m, u.off, u.i), pq = grad.pos(n, u.off, u.i);
      const acc_t h = grad.template at<acc_t>(u.g, pp, pq) + grad.template at<acc_t>(u.g, pq, pp);
      const acc_t c = cross_cos[pair_index(m < n ? m : n, m < n ? n : m, geo.M) * geo.N + k];
      const int64_t q = n * geo.N + k;
      v = pair_grad(h, s[node], s[q], r[node], r[q], angular_weight_grad(c, scale));
    }
    dcross[e] = v;
  }
}

// One warp per node p = (m, k): dL/du_p = (S @ U)[g, m, i] + sum_n dcross[p, n] u_(n, k), then through
// u = x / ||x||: (dL/du - (dL/du . u) u) / ||x||, with dL/du . u = (S @ U) . u + sum_n dcross[p, n] c_mn.
template <typename scalar_t, typename acc_t>
__global__ void angular_adjacency_input_grad_kernel(const acc_t* __restrict__ U, const acc_t* __restrict__ SU,
                                  const acc_t* __restrict__ cross_cos, const acc_t* __restrict__ dcross,
                                  const acc_t* __restrict__ inv_norm, Geometry geo, scalar_t* __restrict__ grad_x) {
  const int64_t node = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.y;
  if (node >= geo.M * geo.N) return;
  const int64_t m = node / geo.N, k = node % geo.N;
  const Utterance u = locate(geo, k);
  const acc_t* ur = U + ((u.g * geo.M + m) * geo.Lmax + u.i) * geo.D;
  const acc_t* sur = SU + ((u.g * geo.M + m) * geo.Lmax + u.i) * geo.D;
  const acc_t* dc = dcross + node * geo.M;
  acc_t partial = 0;
  for (int64_t d = threadIdx.x; d < geo.D; d += kWarp) partial += sur[d] * ur[d];
  acc_t dot = warp_sum(partial);
  for (int64_t n = 0; n < geo.M; ++n) {
    if (n != m) dot += dc[n] * cross_cos[pair_index(m < n ? m : n, m < n ? n : m, geo.M) * geo.N + k];
  }
  const acc_t inv = inv_norm[node];
  for (int64_t d = threadIdx.x; d < geo.D; d += kWarp) {
    acc_t gu = sur[d];
    for (int64_t n = 0; n < geo.M; ++n) {
      if (n != m) gu += dc[n] * U[((u.g * geo.M + n) * geo.Lmax + u.i) * geo.D + d];
    }
    grad_x[node * geo.D + d] = static_cast<scalar_t>((gu - dot * ur[d]) * inv);
  }
}

// ---- host side ------------------------------------------------------------------------------------------------------

struct DeviceGeometry {
  at::Tensor offsets;  // keeps the device buffer alive
  Geometry geo;
};

DeviceGeometry make_geometry(const at::Tensor& x, const Dialogues& dialogues, const Options& opt) {
  auto host = at::tensor(dialogues.offsets, at::TensorOptions().dtype(at::kLong));
  auto dev = host.to(x.device());
  return {dev, Geometry{dev.const_data_ptr<int64_t>(), dialogues.count(), x.size(0), x.size(1), x.size(2),
                        dialogues.max_length, opt.window}};
}

unsigned warp_blocks(int64_t items) { return static_cast<unsigned>(mmer_ext::cuda::ceil_div(items, kWarpsPerBlock)); }

// Unit vectors in padded dialogues, their cosine blocks and the inter-modality cosines.
template <typename scalar_t, typename acc_t>
void cosines(const at::Tensor& x, const Geometry& geo, at::Tensor& U, at::Tensor& C, at::Tensor& cross_cos,
             acc_t* inv_norm, cudaStream_t stream) {
  const auto acc_opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  U = at::zeros({geo.G * geo.M, geo.Lmax, geo.D}, acc_opts);
  const dim3 warps(kWarp, kWarpsPerBlock);
  angular_adjacency_unit_vectors_kernel<scalar_t, acc_t><<<warp_blocks(geo.M * geo.N), warps, 0, stream>>>(
      x.const_data_ptr<scalar_t>(), geo, U.mutable_data_ptr<acc_t>(), inv_norm);
  mmer_ext::cuda::launch_check("angular_adjacency_unit_vectors_kernel");
  // cuBLAS, at the precision torch.backends.cuda.matmul allows for float32 (TF32 only if the user enabled it).
  C = at::bmm(U, U.transpose(1, 2));
  const int64_t P = geo.M * (geo.M - 1) / 2;
  cross_cos = at::empty({std::max<int64_t>(P, 1), geo.N}, acc_opts);
  if (P > 0) {
    angular_adjacency_cross_kernel<acc_t><<<warp_blocks(P * geo.N), warps, 0, stream>>>(U.const_data_ptr<acc_t>(), geo,
                                                                       cross_cos.mutable_data_ptr<acc_t>());
    mmer_ext::cuda::launch_check("angular_adjacency_cross_kernel");
  }
}

unsigned row_blocks(int64_t rows) {
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(rows, 1), int64_t(mmer_ext::cuda::sm_count()) * 32));
}

std::tuple<at::Tensor, at::Tensor> angular_adjacency_forward_cuda(const at::Tensor& x, const Dialogues& dialogues,
                                                                  const Options& opt) {
  const at::cuda::OptionalCUDAGuard guard(x.device());
  const int64_t M = x.size(0), N = x.size(1);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto stats = at::empty({2, M, N}, x.options().dtype(acc));
  at::Tensor out = opt.blocks ? at::empty({dialogues.count(), M * dialogues.max_length, M * dialogues.max_length},
                                          x.options())
                              : at::empty({M * N, M * N}, x.options());
  if (N == 0) return {out, stats};
  auto dg = make_geometry(x, dialogues, opt);
  const Geometry& geo = dg.geo;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mmer_ext.angular_adjacency_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t scale = static_cast<acc_t>(opt.scale);
    const acc_t unit_weight = static_cast<acc_t>(unit_self_weight(opt.scale));
    acc_t* inv_norm = stats.mutable_data_ptr<acc_t>();
    acc_t* s = inv_norm + M * N;
    at::Tensor U, C, cross_cos;
    cosines<scalar_t, acc_t>(x, geo, U, C, cross_cos, inv_norm, stream);
    const dim3 warps(kWarp, kWarpsPerBlock);
    angular_adjacency_degree_kernel<acc_t><<<warp_blocks(M * N), warps, 0, stream>>>(C.const_data_ptr<acc_t>(),
                                                                  cross_cos.const_data_ptr<acc_t>(), inv_norm, geo,
                                                                  scale, unit_weight, opt.normalize, s);
    mmer_ext::cuda::launch_check("angular_adjacency_degree_kernel");
    if (opt.blocks) {
      angular_adjacency_write_blocks_kernel<scalar_t, acc_t>
          <<<row_blocks(out.size(0) * out.size(1)), kRowThreads, 0, stream>>>(
          C.const_data_ptr<acc_t>(), cross_cos.const_data_ptr<acc_t>(), inv_norm, s, geo, scale, unit_weight,
          out.mutable_data_ptr<scalar_t>());
      mmer_ext::cuda::launch_check("angular_adjacency_write_blocks_kernel");
    } else {
      angular_adjacency_write_dense_kernel<scalar_t, acc_t><<<row_blocks(M * N), kRowThreads, 0, stream>>>(
          C.const_data_ptr<acc_t>(), cross_cos.const_data_ptr<acc_t>(), inv_norm, s, geo, scale, unit_weight,
          out.mutable_data_ptr<scalar_t>());
      mmer_ext::cuda::launch_check("angular_adjacency_write_dense_kernel");
    }
  });
  return {out, stats};
}

at::Tensor angular_adjacency_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& stats,
                         const Dialogues& dialogues, const Options& opt) {
  const at::cuda::OptionalCUDAGuard guard(x.device());
  auto grad_x = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return grad_x.zero_();
  const int64_t M = x.size(0), N = x.size(1);
  const auto g = grad.scalar_type() == x.scalar_type() ? grad : grad.to(x.scalar_type());
  auto dg = make_geometry(x, dialogues, opt);
  const Geometry& geo = dg.geo;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mmer_ext.angular_adjacency_backward_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t scale = static_cast<acc_t>(opt.scale);
    const acc_t unit_weight = static_cast<acc_t>(unit_self_weight(opt.scale));
    const acc_t* s = stats.const_data_ptr<acc_t>() + M * N;
    auto inv_norm_t = at::empty({M * N}, stats.options());
    acc_t* inv_norm = inv_norm_t.mutable_data_ptr<acc_t>();
    at::Tensor U, C, cross_cos;
    cosines<scalar_t, acc_t>(x, geo, U, C, cross_cos, inv_norm, stream);
    const GradView<scalar_t> gv{g.const_data_ptr<scalar_t>(),
                                opt.blocks ? g.stride(0) : 0,
                                g.stride(opt.blocks ? 1 : 0),
                                g.stride(opt.blocks ? 2 : 1),
                                opt.blocks,
                                N,
                                geo.Lmax};
    auto r = at::zeros({M * N}, stats.options());
    const dim3 warps(kWarp, kWarpsPerBlock);
    if (opt.normalize) {
      angular_adjacency_degree_term_kernel<scalar_t, acc_t><<<warp_blocks(M * N), warps, 0, stream>>>(
          C.const_data_ptr<acc_t>(), cross_cos.const_data_ptr<acc_t>(), inv_norm, s, gv, geo, scale, unit_weight,
          r.mutable_data_ptr<acc_t>());
      mmer_ext::cuda::launch_check("angular_adjacency_degree_term_kernel");
    }
    auto S = at::empty_like(C);
    angular_adjacency_pair_grad_kernel<scalar_t, acc_t>
        <<<mmer_ext::cuda::grid_for(S.numel(), kThreads), kThreads, 0, stream>>>(
        C.const_data_ptr<acc_t>(), s, r.const_data_ptr<acc_t>(), gv, geo, scale, S.mutable_data_ptr<acc_t>());
    mmer_ext::cuda::launch_check("angular_adjacency_pair_grad_kernel");
    auto SU = at::bmm(S, U);
    auto dcross = at::empty({M * N * M}, stats.options());
    angular_adjacency_cross_grad_kernel<scalar_t, acc_t>
        <<<mmer_ext::cuda::grid_for(dcross.numel(), kThreads), kThreads, 0, stream>>>(
        cross_cos.const_data_ptr<acc_t>(), s, r.const_data_ptr<acc_t>(), gv, geo, scale,
        dcross.mutable_data_ptr<acc_t>());
    mmer_ext::cuda::launch_check("angular_adjacency_cross_grad_kernel");
    angular_adjacency_input_grad_kernel<scalar_t, acc_t><<<warp_blocks(M * N), warps, 0, stream>>>(
        U.const_data_ptr<acc_t>(), SU.const_data_ptr<acc_t>(), cross_cos.const_data_ptr<acc_t>(),
        dcross.const_data_ptr<acc_t>(), inv_norm, geo, grad_x.mutable_data_ptr<scalar_t>());
    mmer_ext::cuda::launch_check("angular_adjacency_input_grad_kernel");
  });
  return grad_x;
}

// blocks @ x on padded slots: one cuBLAS batched GEMM (per-dialogue GEMMs would each be a launch).
const DeviceKernels kCudaKernels{&angular_adjacency_forward_cuda, &angular_adjacency_backward_cuda,
                                 &block_graph_propagate_padded, &block_graph_outer_padded};

}  // namespace
}  // namespace mmer_ext::angular_adjacency

TORCH_LIBRARY_IMPL(mmer_ext, CUDA, m) {
  mmer_ext::angular_adjacency::register_angular_adjacency_ops<mmer_ext::angular_adjacency::kCudaKernels>(m);
}
