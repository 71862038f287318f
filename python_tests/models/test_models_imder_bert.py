"""IMDer's optional BERT text encoder: a local transformers model over MMSA's tokenised text (``text_bert``)."""

from __future__ import annotations

import pytest
import torch

from mmer_ext.models import IMDer

transformers = pytest.importorskip("transformers")  # the `bert` extra, installed with the `test` extra

DIMS = (5, 6, 32)  # L = the tiny BERT's hidden size
T = 12
TINY = dict(d_model=8, nlevels=1, num_heads=2, score_channels=(8, 16, 32, 32), score_heads=2, score_layers=1,
            score_embed_dim=16, rcab_blocks=1, steps=2)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=40, max_position_embeddings=T)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bert")
    transformers.BertModel(config).save_pretrained(path)
    return str(path)


def _batch(b=4, seed=0, missing=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (b, T), generator=g)
    mask = torch.ones(b, T, dtype=torch.long)
    batch = {"A": torch.randn(b, T, DIMS[0], generator=g), "V": torch.randn(b, T, DIMS[1], generator=g),
             "L": torch.zeros(b, T, DIMS[2]), "text_bert": torch.stack([ids, mask, torch.zeros_like(ids)], dim=1),
             "label": torch.rand(b, generator=g) * 6 - 3}
    if missing is not None:
        batch["missing_index"] = missing
    return batch


def test_text_comes_from_the_frozen_bert(bert_dir):
    torch.manual_seed(0)
    model = IMDer(DIMS, text_encoder=bert_dir, **TINY).eval()
    batch = _batch()
    pred = model(batch)
    assert pred.shape == (4,)
    # batch["L"] is ignored: the text features are BERT's hidden states over text_bert.
    assert torch.allclose(model({**batch, "L": torch.randn(4, T, DIMS[2])}), pred)
    other = _batch(seed=1)
    assert not torch.allclose(model({**batch, "text_bert": other["text_bert"]}), pred)
    # Frozen: no BERT parameter is trained, and it stays in eval mode.
    bert_params = {id(p) for p in model.bert.parameters()}
    assert bert_params and not bert_params & {id(p) for p in model.trainable_parameters()}
    model.train()
    assert not model.bert.training
    loss, _ = model.training_loss(_batch(missing=torch.tensor([[1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1]])))
    loss.backward()
    assert all(p.grad is None for p in model.bert.parameters())


def test_student_keeps_the_teachers_bert(bert_dir):
    torch.manual_seed(0)
    teacher = IMDer(DIMS, text_encoder=bert_dir, **TINY)
    with torch.no_grad():
        next(teacher.bert.parameters()).add_(1.0)  # a teacher whose BERT differs from the files on disk
    student = IMDer(DIMS, teacher=teacher, text_encoder=bert_dir, **TINY)
    for a, b in zip(teacher.bert.parameters(), student.bert.parameters()):
        assert torch.equal(a, b)


def test_bert_errors_are_clear(bert_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        IMDer(DIMS, text_encoder=str(tmp_path / "nowhere"), **TINY)
    with pytest.raises(ValueError, match="hidden size 32"):
        IMDer((5, 6, 768), text_encoder=bert_dir, **TINY)
    model = IMDer(DIMS, text_encoder=bert_dir, **TINY)
    batch = _batch()
    del batch["text_bert"]
    with pytest.raises(ValueError, match="text_bert"):
        model(batch)
