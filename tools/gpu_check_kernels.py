"""What the GPU check covers: every ``__global__`` kernel in ``csrc/`` and the sanitizer tests that launch it.

``KERNEL_TESTS`` is maintained by hand and checked both ways by ``python_tests/test_gpu_check.py``: every kernel
defined in ``csrc/`` must appear here with at least one test, and every kernel named here must still exist. The
sanitizer subset of ``tools/gpu_check.py`` is exactly the tests named here plus ``EXTRA_SANITIZER_TESTS`` (small
shapes: compute-sanitizer slows every launch by one to two orders of magnitude). On the GPU the check also records,
with ``torch.profiler``, which kernels each subset test really launched and fails if a kernel is not launched by any
of its tests, so a table entry that was true when written cannot silently go stale.

A kernel's tests are chosen to take its different launch configurations where the code has them: the float32 and
float64 instantiations, more than one row split and more than eight moments (CMD), dense and block layouts, with and
without normalisation (adjacency), each noise source (none, a noise tensor, in-kernel Philox), the scalar path for
misaligned tensors, and capture in a CUDA graph (step ops, samplers).

This module is plain data plus one parser; it imports neither torch nor mmer_ext, so the plan can be printed anywhere.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_CMD = "python_tests/ops/test_cmd.py::"
_ADJ = "python_tests/ops/test_angular_adjacency.py::"
_STEPS = "python_tests/ops/test_diffusion_steps.py::"
_NOISE = "python_tests/ops/test_diffusion_steps_noise.py::"
_GRAPH = "python_tests/sampling/test_sampling_cuda_graph.py::"
_GCNII = "python_tests/ops/test_gcnii.py::"
_ATTN = "python_tests/ops/test_attention.py::"

# CMD family. B = 100000, D = 17 gives hundreds of row splits; B = 33, D = 1024 one split over 32 column blocks.
CMD_PAIRWISE_GRADS = _CMD + "test_grads_match_reference[cuda-cmd_pairwise-B100000xD17-5-float32]"
CMD_MOMENTS_GRADS = _CMD + "test_grads_match_reference[cuda-central_moments-B33xD1024-5-float64]"
CMD_MANY_MOMENTS = _CMD + "test_many_moments_match_reference[cuda-cmd_pairwise-13]"  # powers in two launches (8 + 5)
CMD_GRAPH = _CMD + "test_cuda_graph_capture_of_pairwise_forward_and_backward"
# Angular adjacency. "odd" = 3 modalities (inter-modality cosines), dialogues of lengths 3, 1, 5, 2, D = 17.
ADJ_DENSE = _ADJ + "test_grads_match_reference[cuda-odd-float32-dense]"
ADJ_BLOCKS = _ADJ + "test_grads_match_reference[cuda-odd-float64-blocks]"
ADJ_RAW_WINDOW = _ADJ + "test_options_match_reference[cuda-float32-dense-raw-1]"  # no degree terms, a window
# Step ops. test_matches_reference: the noise-tensor path with every parameter form (host and per-sample values).
STEPS_EM = _STEPS + "test_matches_reference[cuda-ve_sde_em_step-4x32x48-float32]"
STEPS_ODE = _STEPS + "test_matches_reference[cuda-ve_ode_step-4x32x48-float32]"  # no noise at all
STEPS_LANGEVIN = _STEPS + "test_matches_reference[cuda-langevin_corrector_step-4x32x48-float64]"
STEPS_LANGEVIN_PHILOX = _NOISE + "test_in_kernel_noise_is_standard_normal[cuda-langevin_corrector_step]"
STEPS_DDIM_PHILOX = _NOISE + "test_in_kernel_noise_is_standard_normal[cuda-ddim_step]"
STEPS_SCALAR_PATH = _NOISE + "test_cuda_vector_and_scalar_paths_draw_the_same_noise"
STEPS_GRAPH = _NOISE + "test_cuda_graph_replay_matches_eager_loop[generator-batch]"
SAMPLER_GRAPH_PC = _GRAPH + "test_replay_equals_eager_and_follows_new_inputs[pc]"
# GCNII layer: without dropout (no Philox) in float64, with in-kernel dropout in float32 (and its exact stream), replay.
GCNII_GRADS = _GCNII + "test_grads_match_reference[cuda-300x32-0.0-float64]"
GCNII_DROPOUT_GRADS = _GCNII + "test_grads_match_reference[cuda-300x32-0.4-float32]"
GCNII_STREAM = _GCNII + "test_cuda_mask_is_the_reference_philox_stream_for_its_seed"
GCNII_GRAPH = _GCNII + "test_cuda_graph_replay_draws_fresh_masks"
# Attention: float64 with a mask (a blocked row), float32 with dropout (its exact stream), odd widths, replay.
ATTN_GRADS = _ATTN + "test_grads_match_reference[cuda-2x3x5x7x4-mask-0.0-float64]"
ATTN_DROPOUT_GRADS = _ATTN + "test_grads_match_reference[cuda-2x2x17x33x40-mask-0.3-float32]"
ATTN_STREAM = _ATTN + "test_mask_is_the_reference_philox_stream[cuda-0.5-3x2x19x23x8]"
ATTN_GRAPH = _ATTN + "test_cuda_graph_replay_draws_fresh_masks_and_matching_gradients"

KERNEL_TESTS: dict[str, tuple[str, ...]] = {
    # csrc/ops/cmd/cmd_cuda.cu
    "cmd_shift_kernel": (CMD_PAIRWISE_GRADS, CMD_MOMENTS_GRADS),
    "cmd_power_sums_kernel": (CMD_PAIRWISE_GRADS, CMD_MOMENTS_GRADS, CMD_MANY_MOMENTS),
    "cmd_finalize_stats_kernel": (CMD_PAIRWISE_GRADS, CMD_MOMENTS_GRADS, CMD_MANY_MOMENTS),
    "cmd_poly_grad_kernel": (CMD_PAIRWISE_GRADS, CMD_MOMENTS_GRADS),
    "cmd_pair_norms_kernel": (CMD_PAIRWISE_GRADS, CMD_GRAPH),
    "cmd_pairwise_coefficients_kernel": (CMD_PAIRWISE_GRADS, CMD_GRAPH),
    "cmd_moment_coefficients_kernel": (CMD_MOMENTS_GRADS,),
    # csrc/ops/angular_adjacency/angular_adjacency_cuda.cu
    "angular_adjacency_unit_vectors_kernel": (ADJ_DENSE, ADJ_BLOCKS, ADJ_RAW_WINDOW),
    "angular_adjacency_cross_kernel": (ADJ_DENSE, ADJ_BLOCKS),
    "angular_adjacency_degree_kernel": (ADJ_DENSE, ADJ_BLOCKS, ADJ_RAW_WINDOW),
    "angular_adjacency_write_dense_kernel": (ADJ_DENSE, ADJ_RAW_WINDOW),
    "angular_adjacency_write_blocks_kernel": (ADJ_BLOCKS,),
    "angular_adjacency_degree_term_kernel": (ADJ_DENSE, ADJ_BLOCKS),
    "angular_adjacency_pair_grad_kernel": (ADJ_DENSE, ADJ_BLOCKS, ADJ_RAW_WINDOW),
    "angular_adjacency_cross_grad_kernel": (ADJ_DENSE, ADJ_BLOCKS),
    "angular_adjacency_input_grad_kernel": (ADJ_DENSE, ADJ_BLOCKS, ADJ_RAW_WINDOW),
    # csrc/ops/diffusion_steps/diffusion_steps_cuda.cu
    "diffusion_steps_affine_step_kernel": (
        STEPS_EM,
        STEPS_ODE,
        STEPS_DDIM_PHILOX,
        STEPS_SCALAR_PATH,
        STEPS_GRAPH,
        SAMPLER_GRAPH_PC,
    ),
    "diffusion_steps_langevin_partial_kernel": (STEPS_LANGEVIN, STEPS_LANGEVIN_PHILOX, SAMPLER_GRAPH_PC),
    "diffusion_steps_langevin_eps_kernel": (STEPS_LANGEVIN, STEPS_LANGEVIN_PHILOX, SAMPLER_GRAPH_PC),
    # csrc/ops/gcnii/gcnii_cuda.cu
    "gcnii_output_kernel": (GCNII_GRADS, GCNII_DROPOUT_GRADS, GCNII_STREAM, GCNII_GRAPH),
    "gcnii_pre_gradient_kernel": (GCNII_GRADS, GCNII_DROPOUT_GRADS),
    # csrc/ops/attention/attention_cuda.cu
    "attention_forward_kernel": (ATTN_GRADS, ATTN_DROPOUT_GRADS, ATTN_STREAM, ATTN_GRAPH),
    "attention_dq_kernel": (ATTN_GRADS, ATTN_DROPOUT_GRADS, ATTN_GRAPH),
    "attention_dkv_kernel": (ATTN_GRADS, ATTN_DROPOUT_GRADS, ATTN_GRAPH),
}

# Subset tests that capture CUDA graphs: capture needs torch's caching allocator, so the sanitizer runs them in a pass
# of their own without PYTORCH_NO_CUDA_MEMORY_CACHING (every kernel is also launched by a test outside this set).
GRAPH_TESTS: frozenset[str] = frozenset({CMD_GRAPH, STEPS_GRAPH, SAMPLER_GRAPH_PC, GCNII_GRAPH, ATTN_GRAPH})

# CUDA code of ours without a __global__ of its own (ATen ops and cuBLAS on the device path), checked all the same.
EXTRA_SANITIZER_TESTS: dict[str, str] = {
    _ADJ + "test_block_graph_propagate_matches_dense[cuda-mixed-1-float32]":
        "block_graph_propagate / _block_graph_outer: padded batched GEMMs on the CUDA path",
}

# Files holding every test that runs on a CUDA device (the GPU stage runs these files' CUDA tests, not the whole
# suite, so a module whose import needs a package the GPU machine lacks cannot break the run). The rehearsal checks
# this list against a collection of the whole suite.
CUDA_TEST_FILES: tuple[str, ...] = (
    "python_tests/ops/test_angular_adjacency.py",
    "python_tests/ops/test_cmd.py",
    "python_tests/ops/test_cuda_gradcheck_compile.py",
    "python_tests/ops/test_diffusion_steps.py",
    "python_tests/ops/test_diffusion_steps_autograd.py",
    "python_tests/ops/test_diffusion_steps_noise.py",
    "python_tests/ops/test_gcnii.py",
    "python_tests/ops/test_attention.py",
    "python_tests/sampling/test_samplers.py",
    "python_tests/sampling/test_sampling_cuda_graph.py",
    "python_tests/sampling/test_sampling_schedulers.py",
    "python_tests/models/test_models_imder.py",
    "python_tests/sampling/test_sampling_condition_modes.py",
    "python_tests/sampling/test_sampling_config_callback.py",
    "python_tests/test_build.py",
    # Selected by the keyword only ("cuda" in a parameter or name: device strings, the CUDA-prediction of the wheel
    # metadata); they run on any machine, and listing them keeps the collection check exact.
    "python_tests/test_packaging.py",
    "python_tests/train/test_cli_errors.py",
    "python_tests/train/test_train_config.py",
)
# -k expression selecting the CUDA tests inside those files: the cuda marker and "cuda" in a name are both keywords.
CUDA_TEST_KEYWORD = "cuda or test_generator_of_wrong_device_type"

_GLOBAL_RE = re.compile(r"__global__\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?void\s+(\w+)\s*\(")


def global_kernels(root: Path = REPO) -> dict[str, str]:
    """Every ``__global__`` function defined under ``root/csrc``: name -> file (relative to ``root``)."""
    found: dict[str, str] = {}
    for path in sorted((root / "csrc").rglob("*")):
        if path.suffix not in (".cu", ".cuh", ".h", ".hpp", ".cpp"):
            continue
        text = re.sub(r"//[^\n]*", "", path.read_text())  # a kernel named in a comment is not a kernel
        for name in _GLOBAL_RE.findall(text):
            found[name] = str(path.relative_to(root))
    return found


def sanitizer_subset() -> list[str]:
    """The node ids compute-sanitizer runs, in a fixed order, each once."""
    ids: list[str] = []
    for tests in KERNEL_TESTS.values():
        ids.extend(t for t in tests if t not in ids)
    ids.extend(t for t in EXTRA_SANITIZER_TESTS if t not in ids)
    return ids
