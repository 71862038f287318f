"""MMGCN (MMGCN, Hu et al., ACL 2021; github.com/hujingwen6666/MMGCN): shapes, GCNII thetas, the graph against a hand-built one and the reference op, modality
subsets, losses (the authors' focal loss by hand), learning, gradients, dialogue independence, missing modalities."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from mmer_ext.data import DialogueConditionView, DialogueDataset, collate_dialogues, corrupt_dialogue_batch
from mmer_ext.models import MMGCN, gcnii_theta, mmgcn_focal_loss
from mmer_ext.models.mmgcn import IEMOCAP_ERC_CLASS_WEIGHTS, parse_modalities
from mmer_ext.ops._reference import angular_adjacency_ref

DIMS = (12, 10, 8)  # A, V, L
C = 6


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def make_dataset(lengths=(5, 3, 7), seed=0, num_speakers=2) -> DialogueDataset:
    g = torch.Generator().manual_seed(seed)
    return DialogueDataset(
        [torch.randn(n, DIMS[0], generator=g) for n in lengths],
        [torch.randn(n, DIMS[1], generator=g) for n in lengths],
        [torch.randn(n, DIMS[2], generator=g) for n in lengths],
        [torch.randint(0, num_speakers, (n,), generator=g) for n in lengths],
        [torch.randint(0, C, (n,), generator=g) for n in lengths],
        num_classes=C, num_speakers=num_speakers)


def make_batch(lengths=(5, 3, 7), seed=0) -> dict:
    ds = make_dataset(lengths, seed)
    return collate_dialogues([ds[k] for k in range(len(ds))])


def model(**kw) -> MMGCN:
    kw.setdefault("num_layers", 4)
    kw.setdefault("num_speakers", 2)
    return MMGCN(DIMS, C, **kw)


def test_shapes_match_spec_anchors():
    batch = make_batch()
    net = model().eval()
    n = int(batch["lengths"].sum())
    assert net.node_outputs(batch).shape == (3, n, 300)  # [dropout(x) (200) || h (100)]
    assert net.utterance_features(batch).shape == (n, 900)  # a, v, l concatenated
    out = net(batch)
    assert out.shape == (n, C)
    assert torch.allclose(out.exp().sum(-1), torch.ones(n), atol=1e-5)
    assert net.trainable_parameters() and net.clip_grad_norm is None


def test_gcnii_thetas():
    assert math.isclose(gcnii_theta(0.5, 1), 0.4055, abs_tol=5e-5)
    assert math.isclose(gcnii_theta(0.5, 64), 0.00778, abs_tol=5e-6)
    thetas = model(num_layers=64).thetas
    assert len(thetas) == 64 and thetas[0] == gcnii_theta(0.5, 1) and thetas[-1] == gcnii_theta(0.5, 64)
    assert all(a > b for a, b in zip(thetas, thetas[1:]))


@pytest.mark.parametrize("variant", [True, False])
def test_gcnii_layer_formula(variant):
    from mmer_ext.models import GCNIILayer

    layer = GCNIILayer(5, theta=0.3, alpha=0.1, variant=variant)
    assert layer.weight.shape == ((10, 5) if variant else (5, 5))
    hi, h0 = torch.randn(7, 5), torch.randn(7, 5)
    mix = 0.9 * hi + 0.1 * h0
    support = torch.cat([hi, h0], -1) if variant else mix
    assert torch.allclose(layer(hi, h0), 0.3 * support @ layer.weight + 0.7 * mix, atol=1e-6)


def _hand_graph(nodes: torch.Tensor, lengths) -> torch.Tensor:
    """MMGCN's graph from its definition, one edge at a time (the authors' code): all pairs within a dialogue and modality,
    the same utterance across modalities, weight 1 - arccos(0.99999 cos)/pi, then D^-1/2 A D^-1/2."""
    m, n, _ = nodes.shape
    x = nodes.double()
    a = torch.zeros(m * n, m * n, dtype=torch.float64)

    def w(u, v):
        cos = torch.dot(u, v) / (u.norm() * v.norm())
        return 1 - math.acos(0.99999 * float(cos)) / math.pi

    start = 0
    for length in lengths:
        idx = range(start, start + length)
        for p in range(m):
            for q in range(m):
                for i in idx:
                    for j in idx:
                        if p == q or i == j:
                            a[p * n + i, q * n + j] = w(x[p, i], x[q, j])
        start += length
    d = a.sum(1).rsqrt()
    return d[:, None] * a * d[None, :]


def test_graph_is_mmgcns_graph():
    batch = make_batch()
    net = model().eval()
    with torch.no_grad():
        nodes = net.node_features(batch)
        assert nodes.shape == (3, 15, 200)
        dense = net.adjacency(nodes, batch["lengths"], layout="dense")
        blocks = net.adjacency(nodes, batch["lengths"])
    hand = _hand_graph(nodes, batch["lengths"].tolist())
    assert torch.allclose(dense.double(), hand, atol=1e-5)
    assert torch.allclose(dense, angular_adjacency_ref(nodes, batch["lengths"]), atol=1e-6)
    assert blocks.shape == (3, 21, 21)  # G, M * Lmax
    # Same model with the dense layout: the same predictions.
    dense_net = model(graph_layout="dense").eval()
    dense_net.load_state_dict(net.state_dict())
    with torch.no_grad():
        assert torch.allclose(net(batch), dense_net(batch), atol=1e-5)


def test_window_limits_intra_edges():
    batch = make_batch()
    net = model(window=1).eval()
    with torch.no_grad():
        nodes = net.node_features(batch)
        dense = net.adjacency(nodes, batch["lengths"], layout="dense")
    n = 15
    a_block = dense[:n, :n]  # acoustic-acoustic edges
    i, j = torch.nonzero(a_block, as_tuple=True)
    assert ((i - j).abs() <= 1).all()
    assert torch.allclose(dense, angular_adjacency_ref(nodes, batch["lengths"], window=1), atol=1e-6)


def test_dialogues_do_not_see_each_other():
    """The prediction for a dialogue does not depend on the other dialogues of its batch (graph blocks and the
    packed BiLSTM; the authors' padded LSTM breaks this)."""
    net = model().eval()
    ds = make_dataset((5, 3, 7))
    other = make_dataset((9, 2), seed=1)
    with torch.no_grad():
        alone = net(collate_dialogues([ds[2]]))
        mixed = net(collate_dialogues([other[0], ds[2], other[1]]))
    assert torch.allclose(alone, mixed[9:16], atol=1e-5)


@pytest.mark.parametrize("mods, expected", [("a", ("A",)), ("v", ("V",)), ("l", ("L",)), ("t", ("L",)),
                                            ("al", ("A", "L")), ("vt", ("V", "L")), ("lva", ("A", "V", "L"))])
def test_modality_subsets(mods, expected):
    assert parse_modalities(mods) == expected
    net = model(modalities=mods).eval()
    batch = make_batch()
    out = net(batch)
    assert out.shape == (15, C) and net.utterance_features(batch).shape == (15, 300 * len(expected))
    assert (net.text_lstm is None) == ("L" not in expected)
    assert (net.speaker_embedding is None) == ("L" not in expected)
    unused = [m for m in "AVL" if m not in expected]
    if unused:  # the modalities left out are not read
        changed = dict(batch, **{m: torch.randn_like(batch[m]) for m in unused})
        with torch.no_grad():
            assert torch.equal(net(changed), out.detach())


def test_bad_arguments():
    with pytest.raises(ValueError, match="subset"):
        parse_modalities("ax")
    with pytest.raises(ValueError, match="twice"):
        parse_modalities("lt")
    with pytest.raises(ValueError, match="6 IEMOCAP-ERC weights"):
        MMGCN(DIMS, 7, num_speakers=2, class_weights="iemocap")
    with pytest.raises(ValueError, match="loss"):
        model(loss="ce")
    with pytest.raises(ValueError, match="num_speakers"):
        model(num_speakers=1)(make_batch())  # speakers 0/1 in the batch


def test_nll_loss_with_iemocap_weights():
    batch = make_batch()
    net = model(class_weights="iemocap", dropout=0.0).eval()
    loss, parts = net.training_loss(batch)
    logp = net(batch)
    w = torch.tensor(IEMOCAP_ERC_CLASS_WEIGHTS)[batch["label"]]
    manual = (w * -logp.gather(1, batch["label"][:, None]).squeeze(1)).sum() / w.sum()
    assert torch.allclose(loss, manual, atol=1e-6) and set(parts) == {"nll"}
    assert math.isclose(IEMOCAP_ERC_CLASS_WEIGHTS[0], 1 / 0.086747)


def test_focal_loss_matches_hand_computation():
    torch.manual_seed(0)
    logp = F.log_softmax(torch.randn(5, 4, dtype=torch.float64), -1)
    y = torch.tensor([0, 3, 1, 1, 2])
    total = 0.0
    for i in range(5):
        for c in range(4):
            p = float(logp[i, c])
            onehot = 1.0 if c == int(y[i]) else 0.0
            total += -1.0 * (1.0 - onehot * p) ** 2.5 * p
    assert math.isclose(float(mmgcn_focal_loss(logp, y, 2.5, 1.0)), total / 20, rel_tol=1e-12)
    net = model(loss="focal", dropout=0.0).eval()
    batch = make_batch()
    loss, parts = net.training_loss(batch)
    assert set(parts) == {"focal"} and torch.allclose(loss, mmgcn_focal_loss(net(batch), batch["label"]))


def test_adam_steps_reduce_loss_and_gradients_reach_everything():
    batch = make_batch()
    net = model(dropout=0.0, class_weights="iemocap")
    opt = torch.optim.Adam(net.trainable_parameters(), lr=3e-3)
    first, _ = net.training_loss(batch)
    first.backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or p.grad.abs().sum() == 0]
    assert not missing
    opt.step()
    for _ in range(7):
        opt.zero_grad()
        loss, _ = net.training_loss(batch)
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first.item()


def test_gradient_flows_through_the_graph():
    """The adjacency is built from the encoded features and is not detached (as in the authors' code)."""
    net = model(dropout=0.0)
    batch = make_batch()
    nodes = net.node_features(batch)
    adj = net.adjacency(nodes, batch["lengths"])
    (adj * torch.randn_like(adj)).sum().backward()
    assert net.proj["A"].weight.grad is not None and net.proj["A"].weight.grad.abs().sum() > 0


def _missing_batch(condition):
    ds = make_dataset()
    view = DialogueConditionView(ds, condition=condition)
    return corrupt_dialogue_batch(collate_dialogues([view[k] for k in range(len(view))]))


def test_missing_modalities_zero_nodes():
    net = model().eval()
    full = make_batch()
    with torch.no_grad():
        # An all-present mask changes nothing.
        assert torch.allclose(net(full), net({k: v for k, v in full.items() if k != "missing_index"}))
        batch = _missing_batch("avz")  # text missing
        nodes = net.node_features(batch)
        assert (nodes[2] == 0).all() and (nodes[:2] != 0).any()
        out = net(batch)
    assert torch.isfinite(out).all()
    dense = angular_adjacency_ref(nodes, batch["lengths"], normalize=False, layout="dense")
    n = 15
    assert torch.allclose(dense[2 * n:, 2 * n:][dense[2 * n:, 2 * n:] != 0], torch.tensor(0.5))  # zero-vector rule
    # "input" feeds the zero input through the encoders instead; the predictions differ.
    net.missing_nodes = "input"
    with torch.no_grad():
        assert (net.node_features(batch)[2] != 0).any()
        assert not torch.allclose(net(batch), out)


def test_missing_modalities_isolate():
    net = model(missing_nodes="isolate", graph_layout="dense").eval()
    batch = _missing_batch("azl")  # visual missing
    n = 15
    with torch.no_grad():
        nodes = net.node_features(batch)
        present = batch["missing_index"][:, [0, 1, 2]].T.bool()
        dense = net.adjacency(nodes, batch["lengths"], present)
        blocks_net = model(missing_nodes="isolate").eval()
        blocks_net.load_state_dict(net.state_dict())
        assert torch.allclose(net(batch), blocks_net(batch), atol=1e-5)
    v = slice(n, 2 * n)
    off = dense[v].clone()
    off[:, v] = 0
    assert (off == 0).all()  # no edge between a missing visual node and any other node
    assert torch.allclose(dense[v, v], torch.eye(n))  # a lone self-loop, normalised to 1
    # The present part is the normalised graph of the present modalities alone.
    keep = torch.cat([torch.arange(n), torch.arange(2 * n, 3 * n)])
    ref = angular_adjacency_ref(nodes[[0, 2]], batch["lengths"], layout="dense")
    assert torch.allclose(dense[keep][:, keep], ref, atol=1e-6)


def test_state_dict_round_trip_and_recipe():
    from mmer_ext.models.recipes import RECIPES

    (stage,) = RECIPES["mmgcn"]
    assert (stage.data, stage.batch_size, stage.lr, stage.weight_decay, stage.epochs, stage.select_metric) == (
        "dialogue", 16, 3e-4, 3e-5, 20, "WF1")
    assert stage.hparams["dropout"] == 0.4 and stage.hparams["class_weights"] == "iemocap"
    (meld,) = RECIPES["mmgcn-meld"]
    assert (meld.lr, meld.weight_decay, meld.epochs, meld.hparams["loss"]) == (1e-3, 0.0, 60, "focal")
    net = stage.model(DIMS, C, num_speakers=2, **{**stage.hparams, "num_layers": 4}).eval()
    assert net.num_layers == 4 and MMGCN(DIMS, C, num_speakers=2).num_layers == 64
    clone = model(class_weights="iemocap").eval()
    clone.load_state_dict(net.state_dict())
    batch = make_batch()
    with torch.no_grad():
        assert torch.equal(net(batch), clone(batch))


@pytest.mark.parametrize("missing", [None, "isolate"])
@pytest.mark.parametrize("window", [None, 1])
def test_modal_propagation_matches_full_blocks(missing, window):
    """propagation="modal" (intra-modality blocks + diagonal cross-modality edges) is the full block product on
    MMGCN's graph: same output and same gradients, including through the adjacency into the encoders."""
    kw = dict(dropout=0.0, window=window, num_layers=3)
    if missing:
        kw["missing_nodes"] = missing
    full, modal = model(propagation="full", **kw), model(**kw)
    modal.load_state_dict(full.state_dict())
    batch = _missing_batch("azl") if missing else make_batch(lengths=(5, 1, 7, 2))
    outs = []
    for net in (full, modal):
        out = net(batch)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append((out.detach(), [p.grad.clone() for p in net.parameters()]))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-6)
    for g_modal, g_full in zip(outs[1][1], outs[0][1]):
        torch.testing.assert_close(g_modal, g_full, rtol=1e-4, atol=1e-6)
    assert outs[0][1][0].abs().sum() > 0


@pytest.mark.parametrize("m", ["l", "al"])
def test_modal_propagation_subsets(m):
    full, modal = model(propagation="full", modalities=m, dropout=0.0), model(modalities=m, dropout=0.0)
    modal.load_state_dict(full.state_dict())
    batch = make_batch()
    torch.testing.assert_close(modal(batch), full(batch), rtol=1e-5, atol=1e-6)


def test_uniform_dropout_keep_probability_and_seeding():
    net = model(dropout=0.3).train()
    x = torch.ones(200_000)
    torch.manual_seed(5)
    y = net._dropout(x)
    kept = (y != 0).double().mean().item()
    assert abs(kept - 0.7) < 5 * math.sqrt(0.7 * 0.3 / x.numel())  # binomial, 5 sigma
    assert torch.allclose(y[y != 0], torch.tensor(1 / 0.7))  # inverted dropout: E[y] = x
    torch.manual_seed(5)
    assert torch.equal(net._dropout(x), y)  # the global generator: seeding reproduces the masks
    assert torch.equal(net.eval()._dropout(x), x)
    bern = model(dropout=0.3, dropout_rng="bernoulli").train()
    torch.manual_seed(5)
    assert torch.equal(bern._dropout(x), (torch.manual_seed(5), torch.nn.functional.dropout(x, 0.3))[1])
    g = torch.randn(50)
    x = torch.randn(50, requires_grad=True)
    y = net.train()._dropout(x)
    y.backward(g)
    torch.testing.assert_close(x.grad, g * (y.detach() / x.detach()))  # the backward applies the same mask


def test_dropout_rng_default_and_legacy():
    assert model().dropout_rng == "philox"
    assert MMGCN.legacy_defaults == {"dropout_rng": "uniform"}  # runs saved before the default changed


def test_propagation_and_dropout_rng_arguments():
    with pytest.raises(ValueError, match="propagation"):
        model(propagation="sparse")
    with pytest.raises(ValueError, match="dropout_rng"):
        model(dropout_rng="threefry")
