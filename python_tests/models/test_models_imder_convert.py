"""Loading the authors' IMDer checkpoints (mdswyz/IMDer ``pt/pretrained-{mosi,mosei}.pth``) into our IMDer.

No checkpoint of theirs is available here, so the test writes one: a state dict in their layout, built from the key
names and shapes their modules define (``IMDER``, ``ScoreNet``, ``Group``/``RCAB``/``CALayer``, MulT's
``TransformerEncoder`` with its ``MultiheadAttention``), random values, saved with ``torch.save`` as theirs is. The
reference forward passes below are written from their modules' maths, in their conventions (sequence-first
encoders, positions 1..L, the [L, A, V] head, the (V|A), (L|A), (L|V) pair convs), independently of our code; the
converted model must reproduce them."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from mmer_ext.models import IMDer
from mmer_ext.models.imder_convert import (
    AuthorsCheckpointError,
    authors_hparams,
    convert_authors_checkpoint,
    convert_authors_state_dict,
    load_authors_state_dict,
)

MOSI_DIMS = {"a": 5, "v": 20, "l": 768}  # their feature_dims [768, 5, 20] (L, A, V)


# ---------------------------------------------------------------------------------------------------------------------
# their layout


class _Layout:
    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)
        self.sd: dict[str, torch.Tensor] = {}

    def w(self, key, *shape, fan_in=None):
        fan_in = fan_in or (shape[1] * (shape[2] if len(shape) > 2 else 1) if len(shape) > 1 else shape[0])
        self.sd[key] = torch.randn(*shape, generator=self.g, dtype=torch.float64) / math.sqrt(fan_in)

    def b(self, key, n):
        self.sd[key] = 0.1 * torch.randn(n, generator=self.g, dtype=torch.float64)

    def norm(self, key, n):
        self.sd[key + ".weight"] = 1 + 0.1 * torch.randn(n, generator=self.g, dtype=torch.float64)
        self.b(key + ".bias", n)

    def linear(self, key, n_out, n_in, bias=True):
        self.w(key + ".weight", n_out, n_in)
        if bias:
            self.b(key + ".bias", n_out)

    def conv(self, key, n_out, n_in, k, bias=True, transposed=False):
        self.w(key + ".weight", *((n_in, n_out, k) if transposed else (n_out, n_in, k)), fan_in=n_in * k)
        if bias:
            self.b(key + ".bias", n_out)

    def encoder(self, key, dim, layers):
        """Their TransformerEncoder: layers.i.{self_attn, fc1, fc2, layer_norms.0/1}, layer_norm, two buffers."""
        for i in range(layers):
            p = f"{key}.layers.{i}."
            self.w(p + "self_attn.in_proj_weight", 3 * dim, dim)
            self.b(p + "self_attn.in_proj_bias", 3 * dim)
            self.linear(p + "self_attn.out_proj", dim, dim)
            self.linear(p + "fc1", 4 * dim, dim)
            self.linear(p + "fc2", dim, 4 * dim)
            self.norm(p + "layer_norms.0", dim)
            self.norm(p + "layer_norms.1", dim)
        self.norm(key + ".layer_norm", dim)
        self.sd[key + ".version"] = torch.tensor([2.0])
        self.sd[key + ".embed_positions._float_tensor"] = torch.zeros(1)

    def score_net(self, key, ch=(32, 64, 128, 256), embed=256, layers=2):
        self.sd[key + ".embed.0.W"] = 30 * torch.randn(embed // 2, generator=self.g, dtype=torch.float64)
        self.linear(key + ".embed.1", embed, embed)
        for k in range(4):
            cin = 32 if k == 0 else ch[k - 1]
            self.conv(f"{key}.conv{k + 1}", ch[k], cin, 3, bias=False)
            if k:
                self.conv(f"{key}.conv{k + 1}_cond", ch[k], ch[k - 1], 3, bias=False)
            self.encoder(f"{key}.attention_{k + 1}", ch[k], layers)
            self.linear(f"{key}.dense{k + 1}.dense", ch[k], embed)
            self.norm(f"{key}.gnorm{k + 1}", ch[k])
        # decoder: tconv4 (256 -> 128), tconv3 (256 -> 64), tconv2 (128 -> 32), tconv1 (64 -> 32, with bias)
        for k, dense in ((4, 5), (3, 6), (2, 7)):
            cin = ch[3] if k == 4 else 2 * ch[k - 1]
            self.conv(f"{key}.tconv{k}", ch[k - 2], cin, 3, bias=False, transposed=True)
            self.conv(f"{key}.tconv{k}_cond", ch[k - 2], ch[k - 1], 3, bias=False, transposed=True)
            self.encoder(f"{key}.attention_t{k}", ch[k - 2], layers)
            self.linear(f"{key}.dense{dense}.dense", ch[k - 2], embed)
            self.norm(f"{key}.tgnorm{k}", ch[k - 2])
        self.conv(f"{key}.tconv1", 32, 2 * ch[0], 3, transposed=True)
        self.conv(f"{key}.tconv1_cond", 32, ch[0], 3, transposed=True)
        self.encoder(f"{key}.attention_t1", 32, layers)

    def rcan(self, key, d, blocks=20, reduction=16):
        self.conv(key + ".0", 2 * d, d, 1)
        for i in range(blocks):
            p = f"{key}.1.body.{i}.body."
            self.conv(p + "0", 2 * d, 2 * d, 3)
            self.conv(p + "2", 2 * d, 2 * d, 3)
            self.conv(p + "3.conv_du.0", 2 * d // reduction, 2 * d, 1)
            self.conv(p + "3.conv_du.2", 2 * d, 2 * d // reduction, 1)
        self.conv(f"{key}.1.body.{blocks}", 2 * d, 2 * d, 3)
        self.conv(key + ".2", d, 2 * d, 1)


def authors_layout(dims=MOSI_DIMS, d=32, nlevels=4, seed=0, bert=False) -> dict[str, torch.Tensor]:
    """A state dict of their IMDER (MOSI configuration by default), random values."""
    lay = _Layout(seed)
    for m in "lav":
        lay.score_net(f"score_{m}")
    for pair in ("cat_lv", "cat_la", "cat_va"):
        lay.conv(pair, d, 2 * d, 1)
    for m in "lva":
        lay.rcan(f"rec_{m}", d)
    for m in "lav":
        lay.conv(f"proj_{m}", d, dims[m], 3, bias=False)
    for m, o in ("la", "lv", "al", "av", "vl", "va"):
        lay.encoder(f"trans_{m}_with_{o}", d, nlevels)
    for m in "lav":
        lay.encoder(f"trans_{m}_mem", 2 * d, max(nlevels, 3))
    lay.linear("proj1", 6 * d, 6 * d)
    lay.linear("proj2", 6 * d, 6 * d)
    lay.linear("out_layer", 1, 6 * d)
    if bert:
        lay.linear("text_model.model.pooler.dense", 8, 8)
    return lay.sd


# ---------------------------------------------------------------------------------------------------------------------
# their forward passes, written from their modules


def _positions(length, dim):
    # fairseq's sinusoidal table at positions 1..length (no step of these inputs is padding), computed in float32 as
    # theirs is (get_embedding builds it with dtype=torch.float) and only then cast
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
    angles = torch.arange(1, length + 1, dtype=torch.float32)[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1).double()


def ref_encoder(sd, key, x, kv=None, heads=8):
    """Their TransformerEncoder in eval mode, sequence first: x [Lq, B, D], kv [Lk, B, D]."""
    length, batch, dim = x.shape
    embed = lambda s: math.sqrt(dim) * s + _positions(s.shape[0], dim)[:, None, :]  # noqa: E731
    h = embed(x)
    src = None if kv is None else embed(kv)
    lk = length if src is None else src.shape[0]
    mask = torch.triu(torch.full((length, lk), float("-inf"), dtype=torch.float64), 1 + abs(lk - length))
    i = 0
    while f"{key}.layers.{i}.fc1.weight" in sd:
        p = f"{key}.layers.{i}."

        def ln(s, j, p=p):
            return F.layer_norm(s, (dim,), sd[f"{p}layer_norms.{j}.weight"], sd[f"{p}layer_norms.{j}.bias"])

        q_in = ln(h, 0)
        k_in = q_in if src is None else ln(src, 0)
        w, b = sd[p + "self_attn.in_proj_weight"], sd[p + "self_attn.in_proj_bias"]
        hd = dim // heads
        q = F.linear(q_in, w[:dim], b[:dim]) * hd**-0.5
        k = F.linear(k_in, w[dim:2 * dim], b[dim:2 * dim])
        v = F.linear(k_in, w[2 * dim:], b[2 * dim:])
        split = lambda s: s.reshape(s.shape[0], batch * heads, hd).transpose(0, 1)  # noqa: E731
        weights = torch.softmax(torch.bmm(split(q), split(k).transpose(1, 2)) + mask, dim=-1)
        attn = torch.bmm(weights, split(v)).transpose(0, 1).reshape(length, batch, dim)
        h = h + F.linear(attn, sd[p + "self_attn.out_proj.weight"], sd[p + "self_attn.out_proj.bias"])
        y = F.relu(F.linear(ln(h, 1), sd[p + "fc1.weight"], sd[p + "fc1.bias"]))
        h = h + F.linear(y, sd[p + "fc2.weight"], sd[p + "fc2.bias"])
        i += 1
    return F.layer_norm(h, (dim,), sd[key + ".layer_norm.weight"], sd[key + ".layer_norm.bias"])


def ref_imder_complete(sd, a, v, l):  # noqa: E741
    """Their IMDER forward with all three modalities present (num_modal=3), eval mode: the regression output."""
    proj = {m: F.conv1d(x.transpose(1, 2), sd[f"proj_{m}.weight"]).permute(2, 0, 1)
            for m, x in (("l", l), ("a", a), ("v", v))}
    last = []
    for m, (o1, o2) in (("l", "av"), ("a", "lv"), ("v", "la")):
        pair = torch.cat([ref_encoder(sd, f"trans_{m}_with_{o}", proj[m], proj[o]) for o in (o1, o2)], dim=2)
        last.append(ref_encoder(sd, f"trans_{m}_mem", pair)[-1])
    h = torch.cat(last, dim=1)
    z = F.linear(F.relu(F.linear(h, sd["proj1.weight"], sd["proj1.bias"])), sd["proj2.weight"], sd["proj2.bias"]) + h
    return F.linear(z, sd["out_layer.weight"], sd["out_layer.bias"]).squeeze(-1)


def ref_score_net(sd, key, x, t, cond, sigma=25.0):
    """Their ScoreNet forward, channel first ``[B, 32, 48]``."""
    p = key + "."
    act = lambda s: s * torch.sigmoid(s)  # noqa: E731
    angles = t[:, None] * sd[p + "embed.0.W"][None] * 2 * math.pi
    emb = act(F.linear(torch.cat([angles.sin(), angles.cos()], -1), sd[p + "embed.1.weight"], sd[p + "embed.1.bias"]))

    def attn(name, h, c):
        return ref_encoder(sd, p + name, h.permute(2, 0, 1), c.permute(2, 0, 1)).permute(1, 2, 0)

    def dense(k):
        return F.linear(emb, sd[f"{p}dense{k}.dense.weight"], sd[f"{p}dense{k}.dense.bias"])[..., None]

    gn = lambda name, h, g: F.group_norm(h, g, sd[p + name + ".weight"], sd[p + name + ".bias"])  # noqa: E731
    h = F.conv1d(x, sd[p + "conv1.weight"], padding=1)
    h = act(gn("gnorm1", h + attn("attention_1", h, cond) + dense(1), 4))
    skips, c = [h], cond
    for k in (2, 3, 4):
        h = F.conv1d(h, sd[f"{p}conv{k}.weight"], stride=2, padding=1)
        c = F.conv1d(c, sd[f"{p}conv{k}_cond.weight"], stride=2, padding=1)
        h = act(gn(f"gnorm{k}", h + attn(f"attention_{k}", h, c) + dense(k), 32))
        skips.append(h)
    h = skips.pop()
    for k, d in ((4, 5), (3, 6), (2, 7)):
        up = lambda s, w: F.conv_transpose1d(s, w, stride=2, padding=1, output_padding=1)  # noqa: E731
        h = up(h if k == 4 else torch.cat([h, skips.pop()], 1), sd[f"{p}tconv{k}.weight"])
        c = up(c, sd[f"{p}tconv{k}_cond.weight"])
        h = act(gn(f"tgnorm{k}", h + attn(f"attention_t{k}", h, c) + dense(d), 32))
    h = F.conv_transpose1d(torch.cat([h, skips.pop()], 1), sd[p + "tconv1.weight"], sd[p + "tconv1.bias"], padding=1)
    c = F.conv_transpose1d(c, sd[p + "tconv1_cond.weight"], sd[p + "tconv1_cond.bias"], padding=1)
    h = h + attn("attention_t1", h, c)
    std = torch.sqrt((sigma ** (2 * t) - 1) / 2 / math.log(sigma))
    return h / std[:, None, None]


# ---------------------------------------------------------------------------------------------------------------------
# tests


@pytest.fixture(scope="module")
def mosi():
    """Their MOSI layout and our IMDer loaded from it (float64, eval)."""
    sd = authors_layout()
    hp = authors_hparams(sd)
    dims, num_classes = hp.pop("dims"), hp.pop("num_classes")
    model = IMDer(dims, num_classes, condition_noise="shared", **hp).double().eval()
    model.load_state_dict(convert_authors_state_dict(sd))  # strict: every tensor of ours is filled
    return sd, model


def test_shapes_give_the_authors_configuration(mosi):
    sd, model = mosi
    hp = authors_hparams(sd)
    assert hp == dict(dims=(5, 20, 768), num_classes=1, d_model=32, nlevels=4, num_heads=8, proj_kernel=3,
                      score_channels=(32, 64, 128, 256), score_heads=8, score_layers=2, score_embed_dim=256,
                      rcab_blocks=20, rcab_reduction=16, score_net="unet", score_ema=None,
                      refine_residual=False)
    converted = convert_authors_state_dict(sd)
    dropped = [k for k in sd if k.endswith((".version", ".embed_positions._float_tensor"))]
    assert len(converted) == len(sd) - len(dropped) == len(model.state_dict())


def test_complete_data_output_matches_theirs(mosi):
    # The whole recognition path: projections, the six cross-modal encoders, the memory encoders in their order and
    # the head on their [L, A, V] concatenation.
    sd, model = mosi
    g = torch.Generator().manual_seed(1)
    a, v, l = (torch.randn(3, 50, MOSI_DIMS[m], generator=g, dtype=torch.float64) for m in "avl")
    ours = model({"A": a, "V": v, "L": l})
    torch.testing.assert_close(ours, ref_imder_complete(sd, a, v, l), rtol=1e-9, atol=1e-9)


def test_pair_conditions_match_theirs(mosi):
    sd, model = mosi
    g = torch.Generator().manual_seed(2)
    p = {m: torch.randn(2, 32, 48, generator=g, dtype=torch.float64) for m in "AVL"}
    theirs = {"AV": F.conv1d(torch.cat([p["V"], p["A"]], 1), sd["cat_va.weight"], sd["cat_va.bias"]),
              "AL": F.conv1d(torch.cat([p["L"], p["A"]], 1), sd["cat_la.weight"], sd["cat_la.bias"]),
              "VL": F.conv1d(torch.cat([p["L"], p["V"]], 1), sd["cat_lv.weight"], sd["cat_lv.bias"])}
    for pair, want in theirs.items():
        torch.testing.assert_close(model.fuse[pair](torch.cat([p[pair[0]], p[pair[1]]], 1)), want)


@pytest.mark.parametrize("m", ["L", "A", "V"])
def test_score_networks_match_theirs(mosi, m):
    sd, model = mosi
    g = torch.Generator().manual_seed(3)
    x, c = (torch.randn(2, 32, 48, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([0.3, 0.9], dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model.score[m](x, t, c), ref_score_net(sd, f"score_{m.lower()}", x, t, c),
                                   rtol=1e-8, atol=1e-8)


def test_refiners_are_mapped(mosi):
    sd, model = mosi
    gate = model.refine["V"][1].body[7].body[3].gate[2]
    assert torch.equal(gate.weight, sd["rec_v.1.body.7.body.3.conv_du.2.weight"])
    assert torch.equal(model.refine["L"][2].bias, sd["rec_l.2.bias"])
    assert not any(r.residual for r in model.refine.values())  # theirs are plain stacks


def test_convert_command_writes_a_loadable_model(tmp_path):
    from mmer_ext.cli import main
    from mmer_ext.train import load_model

    sd = {"Model." + k: v.float() for k, v in authors_layout(bert=True).items()}  # as their pretrained files
    src = tmp_path / "pretrained-mosi.pth"
    torch.save(sd, src)
    assert main(["convert", str(src), str(tmp_path / "out")]) == 0
    model, meta = load_model(tmp_path / "out" / "model.safetensors")
    assert isinstance(model, IMDer) and model.condition_noise == "shared" and model.dims == (5, 20, 768)
    assert meta["recipe"] == "imder-authors" and meta["converted_from"]["bert_dropped"]
    assert meta["config"]["missing_protocol"] == "per-batch"
    plain = {k[len("Model."):]: v for k, v in sd.items() if not k.startswith("Model.text_model.")}
    g = torch.Generator().manual_seed(4)
    a, v, l = (torch.randn(2, 50, MOSI_DIMS[m], generator=g) for m in "avl")
    torch.testing.assert_close(model({"A": a, "V": v, "L": l}),
                               ref_imder_complete({k: t.double() for k, t in plain.items()}, a.double(), v.double(),
                                                  l.double()).float(), rtol=1e-4, atol=1e-4)
    assert load_authors_state_dict(src).keys() == {k[len("Model."):] for k in sd}


def test_mosei_layout_is_recognised(tmp_path):
    sd = authors_layout(dims={"a": 74, "v": 35, "l": 768}, nlevels=6, seed=5)
    torch.save({k: v.float() for k, v in sd.items()}, tmp_path / "imder-mosei.pth")
    from mmer_ext.train import load_model

    out = convert_authors_checkpoint(tmp_path / "imder-mosei.pth", tmp_path / "out")
    model, meta = load_model(out)
    assert meta["recipe"] == "imder-mosei" and model.dims == (74, 35, 768) and model.condition_noise == "shared"
    assert len(model.fusion.cross["LA"].layers) == 6 and model.clip_grad_value == 0.6


def test_their_bert_goes_into_the_text_encoder(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=40, max_position_embeddings=50)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    torch.manual_seed(1)  # their fine-tuned BERT: other weights than the directory's
    theirs = transformers.BertModel(config).state_dict()
    sd = {**authors_layout(dims={"a": 5, "v": 20, "l": 32}), **{f"text_model.model.{k}": v for k, v in theirs.items()}}
    torch.save({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, tmp_path / "imder-mosi.pth")
    from mmer_ext.train import load_model

    model, meta = load_model(convert_authors_checkpoint(tmp_path / "imder-mosi.pth", tmp_path / "out",
                                                        text_encoder=str(tmp_path / "bert")))
    assert not meta["converted_from"]["bert_dropped"] and model.text_encoder == str(tmp_path / "bert")
    got = model.bert.state_dict()
    assert all(torch.equal(got[k], v) for k, v in theirs.items() if k in got)
    assert not torch.equal(got["embeddings.word_embeddings.weight"],
                           transformers.BertModel.from_pretrained(tmp_path / "bert").embeddings.word_embeddings.weight)
    with pytest.raises(AuthorsCheckpointError, match="holds no BERT"):
        convert_authors_checkpoint(_without_bert(sd, tmp_path), tmp_path / "out2", text_encoder=str(tmp_path / "bert"))


def _without_bert(sd, tmp_path):
    path = tmp_path / "no-bert.pth"
    torch.save({k: v for k, v in sd.items() if not k.startswith("text_model.")}, path)
    return path


def test_bad_files_are_refused(tmp_path):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(AuthorsCheckpointError, match="no tensor 'proj_l.weight'"):
        convert_authors_checkpoint(tmp_path / "other.pth", tmp_path / "out")
    sd = authors_layout()
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(AuthorsCheckpointError, match="unexpected tensor 'extra.weight'"):
        convert_authors_state_dict(sd)
    torch.save({"state": [1, 2]}, tmp_path / "list.pth")
    with pytest.raises(AuthorsCheckpointError, match="flat state dict of tensors"):
        load_authors_state_dict(tmp_path / "list.pth")
    with pytest.raises(AuthorsCheckpointError, match="does not exist"):
        load_authors_state_dict(tmp_path / "missing.pth")
