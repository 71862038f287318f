#pragma once
// The angular adjacency op family (MMGCN's dialogue graph): declarations shared by angular_adjacency.cpp,
// angular_adjacency_cpu.cpp and angular_adjacency_cuda.cu.
//
// Graph over a batch of G dialogues: features [M, N, D] hold M modalities of the same N utterances (dialogues
// concatenated in order); node m * N + k is utterance k in modality m. Maths in angular_adjacency_math.h.
//
// The op bodies in angular_adjacency.cpp check arguments, read the dialogue lengths on the host and call the
// per-device kernels below. The statistics tensor `stats` is [2, M, N] in opmath (float32, or float64 for float64
// features): row 0 holds 1 / ||x|| (0 for a zero vector), row 1 d^-1/2 (1 without normalisation).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace mmer_ext::angular_adjacency {

// Where the dialogues lie along the utterance axis, read on the host once per call.
struct Dialogues {
  std::vector<int64_t> offsets;  // G + 1 entries: dialogue g holds utterances [offsets[g], offsets[g + 1])
  int64_t max_length = 0;        // Lmax, 0 when G = 0

  int64_t count() const { return static_cast<int64_t>(offsets.size()) - 1; }
  int64_t offset(int64_t g) const { return offsets[g]; }
  int64_t length(int64_t g) const { return offsets[g + 1] - offsets[g]; }
};

struct Options {
  double scale;
  bool normalize;
  int64_t window;  // -1: every pair of a dialogue
  bool blocks;     // layout "blocks" ([G, M * Lmax, M * Lmax]) instead of "dense" ([M * N, M * N])
};

// block_graph_propagate's view of the nodes: M modalities of N utterances in G dialogues (checked against x).
struct NodeLayout {
  Dialogues dialogues;
  int64_t M, N;
  int64_t slots() const { return M * dialogues.max_length; }  // S = M * Lmax
};

struct DeviceKernels {
  // x: contiguous [M, N, D]. Returns (adjacency in x's dtype, stats) as described above.
  std::tuple<at::Tensor, at::Tensor> (*forward)(const at::Tensor& x, const Dialogues& dialogues,
                                                const Options& options);
  // grad: dL/d(adjacency), shaped like the forward's output, any strides and floating dtype. x: contiguous.
  // Returns dL/dx, contiguous [M, N, D] in x's dtype.
  at::Tensor (*backward)(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& stats,
                         const Dialogues& dialogues, const Options& options);
  // blocks [G, S, S] (any strides), x [M N, F] -> A @ x [M N, F] in the global node order. Entries of the padding
  // do not contribute (the CPU never reads them; the padded CUDA GEMM multiplies them by zeros, so they must be
  // finite).
  at::Tensor (*propagate)(const at::Tensor& blocks, const at::Tensor& x, const NodeLayout& layout);
  // a, b [M N, F] -> [G, S, S]: a_g b_g^T over each dialogue's slots, zeros in the padding.
  at::Tensor (*outer)(const at::Tensor& a, const at::Tensor& b, const NodeLayout& layout);
};

// Op bodies, device-agnostic given the kernels.
std::tuple<at::Tensor, at::Tensor> angular_adjacency_forward(const DeviceKernels& k, const at::Tensor& features,
                                                             const at::Tensor& lengths, double scale, bool normalize,
                                                             std::optional<int64_t> window, c10::string_view layout);
at::Tensor angular_adjacency_backward(const DeviceKernels& k, const at::Tensor& grad, const at::Tensor& features,
                                      const at::Tensor& lengths, const at::Tensor& stats, double scale,
                                      bool normalize, std::optional<int64_t> window, c10::string_view layout);

at::Tensor block_graph_propagate(const DeviceKernels& k, const at::Tensor& blocks, const at::Tensor& x,
                                 const at::Tensor& lengths, int64_t num_modalities);
at::Tensor block_graph_outer(const DeviceKernels& k, const at::Tensor& a, const at::Tensor& b,
                             const at::Tensor& lengths, int64_t num_modalities, int64_t slots);

// propagate / outer for any device from ATen ops: the nodes gathered into zero-padded slots [G, S, F], one batched
// matmul, gathered back (the CUDA kernels use these; the CPU has per-dialogue GEMMs without the padding).
at::Tensor block_graph_propagate_padded(const at::Tensor& blocks, const at::Tensor& x, const NodeLayout& layout);
at::Tensor block_graph_outer_padded(const at::Tensor& a, const at::Tensor& b, const NodeLayout& layout);

extern const DeviceKernels kCpuKernels;  // angular_adjacency_cpu.cpp

// The op bodies bound to one device's kernels, for TORCH_LIBRARY_IMPL blocks. No device guard here: each CUDA
// kernel entry sets its own, once.
template <const DeviceKernels& K>
void register_angular_adjacency_ops(torch::Library& m) {
  m.impl("_angular_adjacency_forward",
         +[](const at::Tensor& features, const at::Tensor& lengths, double scale, bool normalize,
             std::optional<int64_t> window, c10::string_view layout) {
           return angular_adjacency_forward(K, features, lengths, scale, normalize, window, layout);
         });
  m.impl("_angular_adjacency_backward",
         +[](const at::Tensor& grad, const at::Tensor& features, const at::Tensor& lengths, const at::Tensor& stats,
             double scale, bool normalize, std::optional<int64_t> window, c10::string_view layout) {
           return angular_adjacency_backward(K, grad, features, lengths, stats, scale, normalize, window, layout);
         });
  m.impl("block_graph_propagate", +[](const at::Tensor& blocks, const at::Tensor& x, const at::Tensor& lengths,
                                      c10::SymInt num_modalities) {
    return block_graph_propagate(K, blocks, x, lengths, num_modalities.expect_int());
  });
  m.impl("_block_graph_outer", +[](const at::Tensor& a, const at::Tensor& b, const at::Tensor& lengths,
                                   c10::SymInt num_modalities, c10::SymInt slots) {
    return block_graph_outer(K, a, b, lengths, num_modalities.expect_int(), slots.expect_int());
  });
}

}  // namespace mmer_ext::angular_adjacency
