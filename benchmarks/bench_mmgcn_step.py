"""MMGCN training, end to end: our graph ops against the graph built the way the authors' code builds it.

Implementations, timed in the same run on the same batch and the same initial weights:

* ``ours``: :class:`mmer_ext.models.MMGCN` as shipped: ``angular_adjacency(layout="blocks")`` split once per step
  into the intra-modality blocks (``block_graph_propagate`` with one modality: ``M`` GEMMs per dialogue and layer)
  and the cross-modality edges (``propagation="modal"``: one batched ``[M, M] x [M, F]`` product per utterance),
  never the ``[M N, M N]`` matrix; each GCNII layer and the dropout after it one ``gcnii_layer`` call, its mask
  drawn in-kernel (``dropout_rng="philox"``).
* ``ours-full-blocks``: the same with ``propagation="full"``: ``block_graph_propagate`` over the whole
  ``M Lmax`` blocks (``M^2`` GEMMs per dialogue and layer), the path before issue 17.
* ``authors-graph``: the same model with its ``adjacency`` replaced by ``angular_adjacency_mmgcn_loop`` (a dense
  ``[M N, M N]`` matrix filled by Python loops over dialogues, modalities, utterances and modality pairs, then
  normalised by diagonal matrix products, as MMGCN's ``create_big_adj``) and propagated by dense matmuls in each of
  the 64 GCNII layers, which run as modules (``lerp``, two ``addmm``, ``relu``) with the ``rand_like`` dropout of
  ``dropout_rng="uniform"``: the authors' layer structure, at a quarter of their ``nn.Dropout``'s cost. It is slow,
  so it does not run under ``--benchmark-disable`` (the CI smoke test).

The unit is one training step (forward, loss, backward to every trainable parameter) of the paper's 64-layer model
on one IEMOCAP-sized batch: 16 synthetic dialogues of 10-110 utterances drawn with a fixed seed, IEMOCAP-ERC feature
dims (text 100, audio 1582, visual 342), 6 classes. An IEMOCAP training epoch is 120 dialogues = 8 such batches;
``extra_info["epoch_s_estimate"]`` is 8 x the median step (the data pipeline costs milliseconds next to it).

Correctness guard: before timing, each implementation's loss and parameter gradients must agree with ``ours``' at
float32 tolerances. ``ours-full-blocks`` draws the same masks as ``ours`` and is compared on the timed step itself;
``authors-graph`` draws its masks from another stream, so both are compared on one step with dropout set to 0 (the
maths is the same; only the graph construction, the propagation and the layers' kernels differ).
"""

from __future__ import annotations

import functools

import pytest
import torch

from mmer_ext.data import collate_dialogues, make_synthetic_dialogues
from mmer_ext.models import MMGCN
from mmer_ext.ops._reference import angular_adjacency_mmgcn_loop

BATCH_DIALOGUES = 16
EPOCH_BATCHES = 8  # 120 IEMOCAP training dialogues / 16
IMPLS = ("ours", "ours-full-blocks", "authors-graph")


class AuthorsGraphMMGCN(MMGCN):
    """MMGCN whose graph is built and applied as in the authors' code (dense, Python loops)."""

    def adjacency(self, nodes, lengths, present=None, layout=None):
        return angular_adjacency_mmgcn_loop(nodes, lengths, scale=self.scale, window=self.window)


@functools.cache
def _setup():
    splits = make_synthetic_dialogues(seed=0)
    train = splits["train"]
    batch = collate_dialogues([train[i] for i in range(BATCH_DIALOGUES)])
    torch.manual_seed(0)
    ours = MMGCN(train.dims, train.num_classes, num_speakers=train.num_speakers)
    authors = AuthorsGraphMMGCN(train.dims, train.num_classes, num_speakers=train.num_speakers,
                                dropout_rng="uniform")
    authors.load_state_dict(ours.state_dict())
    full = MMGCN(train.dims, train.num_classes, num_speakers=train.num_speakers, propagation="full")
    full.load_state_dict(ours.state_dict())
    return batch, {"ours": ours, "ours-full-blocks": full, "authors-graph": authors}


def _step_fn(model: MMGCN, batch):
    params = model.trainable_parameters()

    def step():
        # The same masks on every call (and in ours and ours-full-blocks): every round does the same work.
        torch.manual_seed(1)
        loss, _ = model.training_loss(batch)
        grads = torch.autograd.grad(loss, params)
        return loss.detach(), grads

    return step


@functools.cache
def _reference_result():
    batch, models = _setup()
    return _step_fn(models["ours"], batch)()


def _without_dropout(impl: str):
    """The step of ``impl`` with dropout 0: the comparison of implementations that draw different masks."""
    batch, models = _setup()
    model = models[impl]
    saved, model.dropout = model.dropout, 0.0
    try:
        return _step_fn(model, batch)()
    finally:
        model.dropout = saved


def _check(impl: str, result) -> dict[str, float]:
    if impl == "authors-graph":
        result, (ref_loss, ref_grads) = _without_dropout(impl), _without_dropout("ours")
    else:
        ref_loss, ref_grads = _reference_result()
    loss, grads = result
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    worst = 0.0
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=2e-3, atol=1e-4)
        worst = max(worst, float((g - r).abs().max()))
    return {"loss": float(loss), "max_abs_grad_diff": worst}


@pytest.mark.parametrize("impl", [pytest.param(i, marks=pytest.mark.benchmark(group="mmgcn/cpu/train-step"))
                                  for i in IMPLS])
def test_mmgcn_training_step(run_benchmark, benchmark, request, impl: str) -> None:
    if impl == "authors-graph" and request.config.getoption("benchmark_disable"):
        pytest.skip("the authors-style graph takes seconds per step; timed runs only")
    batch, models = _setup()
    run_benchmark(_step_fn(models[impl], batch), impl=impl, device=torch.device("cpu"), warmup=1,
                  check=lambda result: _check(impl, result))
    stats = None if benchmark.disabled or benchmark.stats is None else benchmark.stats.stats
    benchmark.extra_info["utterances"] = int(batch["label"].numel())
    if stats is not None:
        benchmark.extra_info["epoch_s_estimate"] = EPOCH_BATCHES * float(stats.median)
