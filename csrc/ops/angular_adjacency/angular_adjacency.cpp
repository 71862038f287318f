// Angular adjacency op family (MMGCN's dialogue graph): schemas, argument checks, the device-agnostic op bodies and
// the CPU registration. The per-device passes live in angular_adjacency_cpu.cpp and angular_adjacency_cuda.cu.
//
// Definition (MMGCN, Hu et al. 2021): edge weight 1 - arccos(scale * cos(u, v)) / pi; intra-modality edges join every
// pair of utterances of a dialogue (self-loops included; only |i - j| <= window when a window is given), and
// inter-modality edges the same utterance across modalities; then D^-1/2 A D^-1/2 over the whole graph.
#include "ops/angular_adjacency/angular_adjacency.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/safe_numerics.h>
#include <torch/library.h>

#include <string>

#include "common/checks.h"

namespace mmer_ext::angular_adjacency {
namespace {

const ArgName kFeatures{"features"};
const ArgName kLengths{"lengths"};
const ArgName kGrad{"grad"};

// Shapes, dtypes, devices and scalar arguments: everything that can be checked without reading lengths.
void check_arguments(const at::Tensor& features, const at::Tensor& lengths, double scale,
                     std::optional<int64_t> window, c10::string_view layout, const char* op) {
  check_defined(features, op, kFeatures);
  TORCH_CHECK(features.dim() == 3, op, ": ", kFeatures,
              " must be a 3-d tensor [modalities M, utterances N, feature dim D], got shape ", features.sym_sizes());
  check_floating(features, op, kFeatures);
  TORCH_SYM_CHECK(features.sym_size(0).sym_ge(1), op, ": ", kFeatures, " has no modality (shape ",
                  features.sym_sizes(), "); M must be >= 1");
  check_defined(lengths, op, kLengths);
  TORCH_CHECK(lengths.dim() == 1, op, ": ", kLengths, " must be a 1-d tensor [dialogues G], got shape ",
              lengths.sym_sizes());
  TORCH_CHECK(lengths.scalar_type() == at::kLong, op, ": ", kLengths, " must be int64, got ", lengths.scalar_type());
  check_host_or_same_device(lengths, features, op, kLengths, kFeatures, "lengths (read on the host)");
  TORCH_CHECK(scale > 0.0 && scale <= 1.0, op, ": scale must be in (0, 1] (MMGCN uses 0.99999), got ", scale);
  TORCH_CHECK(!window.has_value() || *window >= 0, op,
              ": window must be None or >= 0 (0 keeps the self-loops only), got ", window.value_or(0));
  TORCH_CHECK(layout == "dense" || layout == "blocks", op, ": layout must be \"dense\" or \"blocks\", got \"", layout,
              "\"");
}

// Reads lengths on the host (a device sync when they live on a GPU) and checks that they cover exactly
// num_utterances (`covered` names what holds them, for the message). Each length is checked against what is left
// before it is added, so the running sum never exceeds num_utterances: lengths of 2^62 cannot wrap the int64 sum
// around to a value that passes.
Dialogues read_lengths(const at::Tensor& lengths, int64_t num_utterances, const char* covered, const char* op) {
  auto host = lengths.to(at::kCPU).contiguous();
  const int64_t* p = host.const_data_ptr<int64_t>();
  const int64_t G = host.numel();
  Dialogues d;
  d.offsets.resize(static_cast<size_t>(G + 1));
  d.offsets[0] = 0;
  for (int64_t g = 0; g < G; ++g) {
    TORCH_CHECK(p[g] >= 1, op, ": ", kLengths, "[", g, "] is ", p[g], "; every dialogue needs at least one utterance");
  }
  for (int64_t g = 0; g < G; ++g) {
    TORCH_CHECK(p[g] <= num_utterances - d.offsets[g], op, ": ", kLengths, "[", g, "] is ", p[g], " but ", covered,
                " holds N = ", num_utterances, " utterances and lengths[:", g, "] already take ", d.offsets[g],
                "; the dialogues must cover the utterance axis exactly");
    d.offsets[g + 1] = d.offsets[g] + p[g];
    d.max_length = std::max(d.max_length, p[g]);
  }
  TORCH_CHECK(d.offsets[G] == num_utterances, op, ": ", kLengths, " sum to ", d.offsets[G], " but ", covered,
              " holds N = ", num_utterances, " utterances; the dialogues must cover the utterance axis exactly");
  return d;
}

// The adjacency's element count must fit in int64 (features of zero width make huge M * N cheap to pass), or the
// allocation fails with a message that names no argument.
void check_output_size(int64_t M, int64_t N, const Dialogues& dialogues, bool blocks, const char* op) {
  int64_t side = 0, area = 0, total = 0;
  bool overflow = false;
  if (blocks) {
    overflow = c10::mul_overflows(M, dialogues.max_length, &side) || c10::mul_overflows(side, side, &area) ||
               c10::mul_overflows(area, dialogues.count(), &total);
  } else {
    overflow = c10::mul_overflows(M, N, &side) || c10::mul_overflows(side, side, &total);
  }
  TORCH_CHECK(!overflow, op, ": ", kFeatures, " has M = ", M, " modalities of N = ", N,
              " utterances: the ", blocks ? "blocks" : "dense", " adjacency would hold more than 2^63 elements");
}

// A window of N or more keeps every pair of a dialogue, as no window does; taken as "no window" so that
// i + window + 1 cannot overflow int64 (window = 2^63 - 1).
Options make_options(double scale, bool normalize, std::optional<int64_t> window, c10::string_view layout,
                     int64_t num_utterances) {
  const int64_t w = window.has_value() && *window < num_utterances ? *window : -1;
  return Options{scale, normalize, w, layout == "blocks"};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> angular_adjacency_forward(const DeviceKernels& k, const at::Tensor& features,
                                                             const at::Tensor& lengths, double scale, bool normalize,
                                                             std::optional<int64_t> window, c10::string_view layout) {
  // Named after the public op: this is where its data-dependent checks (the lengths) happen.
  constexpr const char* op = "mmer_ext.angular_adjacency";
  check_arguments(features, lengths, scale, window, layout, op);
  const auto dialogues = read_lengths(lengths, features.size(1), "features", op);
  check_output_size(features.size(0), features.size(1), dialogues, layout == "blocks", op);
  return k.forward(features.contiguous(), dialogues, make_options(scale, normalize, window, layout, features.size(1)));
}

at::Tensor angular_adjacency_backward(const DeviceKernels& k, const at::Tensor& grad, const at::Tensor& features,
                                      const at::Tensor& lengths, const at::Tensor& stats, double scale,
                                      bool normalize, std::optional<int64_t> window, c10::string_view layout) {
  constexpr const char* op = "mmer_ext._angular_adjacency_backward";
  check_arguments(features, lengths, scale, window, layout, op);
  const auto dialogues = read_lengths(lengths, features.size(1), "features", op);
  const int64_t M = features.size(0), N = features.size(1);
  const auto options = make_options(scale, normalize, window, layout, N);
  check_defined(grad, op, kGrad);
  check_floating(grad, op, kGrad);
  check_same_device(grad, features, op, kGrad, kFeatures);
  if (options.blocks) {
    const int64_t S = M * dialogues.max_length;
    TORCH_CHECK(grad.dim() == 3 && grad.size(0) == dialogues.count() && grad.size(1) == S && grad.size(2) == S, op,
                ": grad must be [", dialogues.count(), ", ", S, ", ", S, "] like the blocks adjacency, got ",
                grad.sizes());
  } else {
    TORCH_CHECK(grad.dim() == 2 && grad.size(0) == M * N && grad.size(1) == M * N, op, ": grad must be [", M * N,
                ", ", M * N, "] like the dense adjacency, got ", grad.sizes());
  }
  TORCH_CHECK(stats.dim() == 3 && stats.size(0) == 2 && stats.size(1) == M && stats.size(2) == N &&
                  stats.scalar_type() == opmath_type(features.scalar_type()),
              op, ": stats must be [2, ", M, ", ", N, "] of dtype ", opmath_type(features.scalar_type()),
              " as returned by _angular_adjacency_forward, got ", stats.sizes(), " ", stats.scalar_type());
  check_same_device(stats, features, op, ArgName{"stats"}, kFeatures);
  return k.backward(grad, features.contiguous(), stats.contiguous(), dialogues, options);
}

// ---- block_graph_propagate -------------------------------------------------------------------------------------

namespace {

// The node layout of `nodes` rows = M modalities of N utterances, M given by the caller (inferring it from
// rows / sum(lengths) would accept lengths that fit another M). `x` names the node tensor in messages.
NodeLayout node_layout(const at::Tensor& lengths, const at::Tensor& x, const ArgName& x_name, int64_t num_modalities,
                       int64_t slots, const char* op) {
  check_defined(lengths, op, kLengths);
  TORCH_CHECK(lengths.dim() == 1 && lengths.scalar_type() == at::kLong, op, ": ", kLengths,
              " must be a 1-d int64 tensor [dialogues G], got shape ", lengths.sizes(), " ", lengths.scalar_type());
  check_host_or_same_device(lengths, x, op, kLengths, x_name, "lengths (read on the host)");
  const int64_t nodes = x.size(0);
  const int64_t M = num_modalities;
  TORCH_CHECK(M >= 1, op, ": num_modalities must be >= 1, got ", M);
  TORCH_CHECK(nodes % M == 0, op, ": ", x_name, " has ", nodes,
              " rows (nodes), not a multiple M * N of num_modalities M = ", M);
  const int64_t N = nodes / M;
  const std::string covered = std::string(x_name.base) + " (rows / num_modalities)";
  NodeLayout layout{read_lengths(lengths, N, covered.c_str(), op), M, N};
  // M * Lmax <= M * N = nodes: no overflow.
  TORCH_CHECK(M * layout.dialogues.max_length == slots, op, ": blocks have ", slots,
              " slots per dialogue but M * Lmax = ", M, " * ", layout.dialogues.max_length, " = ",
              M * layout.dialogues.max_length, " for these lengths and num_modalities");
  return layout;
}

void check_nodes(const at::Tensor& x, const at::Tensor& like, const char* op, const ArgName& name,
                 const ArgName& like_name) {
  check_defined(x, op, name);
  TORCH_CHECK(x.dim() == 2, op, ": ", name, " must be a 2-d tensor [nodes M * N, features F], got shape ", x.sizes());
  check_floating(x, op, name);
  check_same_device(x, like, op, name, like_name);
  check_same_dtype(x, like, op, name, like_name);
}

// Row of the padded slots [G * S] of every node m * N + k: (g * M + m) * Lmax + (k - offset_g), on `device`.
at::Tensor slot_of_node(const NodeLayout& layout, const at::Device& device) {
  const auto& d = layout.dialogues;
  auto map = at::empty({layout.M * layout.N}, at::TensorOptions().dtype(at::kLong));
  int64_t* p = map.mutable_data_ptr<int64_t>();
  for (int64_t m = 0; m < layout.M; ++m)
    for (int64_t g = 0; g < d.count(); ++g)
      for (int64_t i = 0; i < d.length(g); ++i)
        p[m * layout.N + d.offset(g) + i] = (g * layout.M + m) * d.max_length + i;
  return map.to(device);
}

// The nodes in the padded slots [G, S, F], zeros in the padding.
at::Tensor to_slots(const at::Tensor& x, const NodeLayout& layout, const at::Tensor& map) {
  const int64_t G = layout.dialogues.count(), S = layout.slots();
  auto padded = at::zeros({G * S, x.size(1)}, x.options());
  return padded.index_copy_(0, map, x).view({G, S, x.size(1)});
}

}  // namespace

at::Tensor block_graph_propagate_padded(const at::Tensor& blocks, const at::Tensor& x, const NodeLayout& layout) {
  const auto map = slot_of_node(layout, x.device());
  auto y = at::bmm(blocks, to_slots(x, layout, map));
  return y.view({-1, x.size(1)}).index_select(0, map);
}

at::Tensor block_graph_outer_padded(const at::Tensor& a, const at::Tensor& b, const NodeLayout& layout) {
  const auto map = slot_of_node(layout, a.device());
  return at::bmm(to_slots(a, layout, map), to_slots(b, layout, map).transpose(1, 2));
}

at::Tensor block_graph_propagate(const DeviceKernels& k, const at::Tensor& blocks, const at::Tensor& x,
                                 const at::Tensor& lengths, int64_t num_modalities) {
  constexpr const char* op = "mmer_ext.block_graph_propagate";
  const ArgName kBlocks{"blocks"}, kX{"x"};
  check_defined(blocks, op, kBlocks);
  TORCH_CHECK(blocks.dim() == 3 && blocks.size(1) == blocks.size(2), op, ": ", kBlocks,
              " must be [G, M * Lmax, M * Lmax], got shape ", blocks.sizes());
  check_floating(blocks, op, kBlocks);
  check_nodes(x, blocks, op, kX, kBlocks);
  const auto layout = node_layout(lengths, x, kX, num_modalities, blocks.size(1), op);
  TORCH_CHECK(blocks.size(0) == layout.dialogues.count(), op, ": ", kBlocks, " hold ", blocks.size(0),
              " dialogues but lengths has ", layout.dialogues.count());
  return k.propagate(blocks, x, layout);
}

at::Tensor block_graph_outer(const DeviceKernels& k, const at::Tensor& a, const at::Tensor& b,
                             const at::Tensor& lengths, int64_t num_modalities, int64_t slots) {
  constexpr const char* op = "mmer_ext._block_graph_outer";
  const ArgName kA{"a"}, kB{"b"};
  check_nodes(a, a, op, kA, kA);
  check_nodes(b, a, op, kB, kA);
  TORCH_CHECK(a.size(0) == b.size(0) && a.size(1) == b.size(1), op, ": ", kA, " ", a.sizes(), " and ", kB, " ",
              b.sizes(), " must have the same shape");
  return k.outer(a, b, node_layout(lengths, a, kA, num_modalities, slots, op));
}

namespace {

// The public op is a thin composite over a private op that also returns the per-node statistics (1 / ||x|| and
// d^-1/2), the ATen way (layer_norm over native_layer_norm): the backward reads them instead of recomputing the
// degrees, which would take another arccos of every edge.
at::Tensor angular_adjacency_composite(const at::Tensor& features, const at::Tensor& lengths, double scale,
                                       bool normalize, std::optional<int64_t> window, c10::string_view layout) {
  check_arguments(features, lengths, scale, window, layout, "mmer_ext.angular_adjacency");
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mmer_ext::_angular_adjacency_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, double, bool,
                                                                 std::optional<int64_t>, c10::string_view)>();
  return std::get<0>(op.call(features, lengths, scale, normalize, window, layout));
}

}  // namespace
}  // namespace mmer_ext::angular_adjacency

TORCH_LIBRARY_FRAGMENT(mmer_ext, m) {
  // Fake kernels and autograd formulas are registered from this Python module.
  m.set_python_module("mmer_ext.ops.angular_adjacency");
  // The kernels read the dialogue lengths on the host every call (the blocks layout's shape depends on them), so
  // they cannot be replayed from a CUDA graph; the tag makes inductor's graph partition run them outside graphs.
  const std::vector<at::Tag> host_reads{at::Tag::cudagraph_unsafe};
  m.def(
      "angular_adjacency(Tensor features, Tensor lengths, *, float scale=0.99999, bool normalize=True, "
      "int? window=None, str layout=\"dense\") -> Tensor");
  // Returns (adjacency, stats); stats is [2, M, N] in float32 (float64 for float64 features): 1 / ||x|| and
  // d^-1/2 per node. Saved for the backward; not differentiable.
  m.def(
      "_angular_adjacency_forward(Tensor features, Tensor lengths, float scale, bool normalize, int? window, "
      "str layout) -> (Tensor, Tensor)",
      host_reads);
  m.def(
      "_angular_adjacency_backward(Tensor grad, Tensor features, Tensor lengths, Tensor stats, float scale, "
      "bool normalize, int? window, str layout) -> Tensor",
      host_reads);
  // num_modalities is explicit: x's rows are M * N, and lengths alone can fit another M. A SymInt, so that a size
  // of a traced tensor (features.shape[0] under torch.compile(dynamic=True)) can be passed.
  m.def("block_graph_propagate(Tensor blocks, Tensor x, Tensor lengths, SymInt num_modalities) -> Tensor",
        host_reads);
  // [G, slots, slots]: a_g b_g^T over each dialogue's padded slots (the gradient of block_graph_propagate with
  // respect to blocks).
  m.def("_block_graph_outer(Tensor a, Tensor b, Tensor lengths, SymInt num_modalities, SymInt slots) -> Tensor",
        host_reads);
}

TORCH_LIBRARY_IMPL(mmer_ext, CompositeImplicitAutograd, m) {
  m.impl("angular_adjacency", &mmer_ext::angular_adjacency::angular_adjacency_composite);
}

TORCH_LIBRARY_IMPL(mmer_ext, CPU, m) {
  mmer_ext::angular_adjacency::register_angular_adjacency_ops<mmer_ext::angular_adjacency::kCpuKernels>(m);
}
