"""IMDer through the trainer and the command line: both stages, the missing-rate sweep, resumption and evaluation."""

from __future__ import annotations

import json

import pytest
import torch

from mmer_ext.cli import main
from mmer_ext.data import MISSING_RATES, load_dataset
from mmer_ext.train import fit, load_config, load_model
from mmer_ext.train.evaluation import evaluate_missing_rates, missing_rate_batches

# A tiny IMDer and a tiny MOSI-like set: the whole two-stage run takes seconds.
TINY_SEQ = {"sizes": [32, 16, 16]}
TINY_IMDER = {"score_channels": [8, 16, 32, 32], "rcab_blocks": 1, "nlevels": 1, "d_model": 8, "num_heads": 2,
              "score_heads": 2, "score_layers": 1}
HPARAMS = {"pretrain": TINY_IMDER, "main": TINY_IMDER}


@pytest.fixture(scope="module")
def seq_splits():
    return load_dataset("synthetic-mosi-small", seed=0, **TINY_SEQ)


def _cfg(tmp_path, **kw):
    fields = dict(model="imder", data="synthetic-mosi-small", data_options=TINY_SEQ, out_dir=str(tmp_path / "run"),
                  device="cpu", epochs=1, batch_size=8, progress=False, sampler="ddim", sampler_steps=2,
                  hparams=HPARAMS)
    fields.update(kw)
    return load_config(None, **fields)


def test_fit_runs_both_stages_and_the_sweep(tmp_path, seq_splits):
    result = fit(_cfg(tmp_path), splits=seq_splits)
    assert [s.name for s in result.stages] == ["pretrain", "score", "main"]
    metrics = result.test_metrics
    assert {f"MR={mr:.1f}" for mr in MISSING_RATES} <= set(metrics)
    for mr in MISSING_RATES:
        m = metrics[f"MR={mr:.1f}"]
        assert {"Acc2_non0", "F1_non0", "Acc2_has0", "Acc7", "MAE", "Corr"} <= set(m)
        # Nothing is recovered when nothing is missing; from MR 0.1 on there is a recovery error.
        assert ("recovery_MSE" in m) == (mr > 0)
    # The second stage trains with the projections frozen and starts from the pretrained weights.
    model = result.model
    assert model.sampler == "ddim" and model.steps == 2
    proj = [p for n, p in model.named_parameters() if n.startswith("proj")]
    assert proj and not any(p.requires_grad for p in proj)
    saved = json.loads((tmp_path / "run" / "test_metrics.json").read_text())["metrics"]
    assert saved["MR=0.3"]["MAE"] == pytest.approx(metrics["MR=0.3"]["MAE"])

    # model.safetensors rebuilds the same model (sampler settings included) and gives the same sweep.
    loaded, meta = load_model(tmp_path / "run" / "model.safetensors")
    assert meta["recipe"] == "imder" and loaded.sampler == "ddim" and loaded.steps == 2
    again = evaluate_missing_rates(loaded, seq_splits["test"], rates=[0.3], batch_size=8, seed=0)
    assert again["MR=0.3"]["MAE"] == pytest.approx(metrics["MR=0.3"]["MAE"], rel=1e-5)

    # The condition mode is stated in the file; a file written before "clean" became the default (no such key)
    # loads with the authors' "shared", what it was trained with.
    assert [h["condition_noise"] for h in meta["hparams"]] == ["clean", "clean", "clean"]
    assert [h["score_net"] for h in meta["hparams"]] == ["frame", "frame", "frame"]  # stated: its default changed
    assert [h.get("objective", "task") for h in meta["hparams"]] == ["task", "score", "task"]
    assert loaded.condition_noise == "clean"
    _rewrite_metadata(tmp_path / "run" / "model.safetensors", tmp_path / "old.safetensors",
                      lambda m: {**m, "hparams": [{k: v for k, v in h.items() if k != "condition_noise"}
                                                  for h in m["hparams"]]})
    old, _ = load_model(tmp_path / "old.safetensors")
    assert old.condition_noise == "shared"
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), loaded.state_dict().values()))


def _rewrite_metadata(src, dst, change):
    from safetensors.torch import load_file, save_file

    from mmer_ext.train.checkpoint import METADATA_KEY, read_weights_metadata

    meta = change(read_weights_metadata(src))
    save_file(load_file(str(src)), str(dst), metadata={METADATA_KEY: json.dumps(meta)})


def test_authors_recipe_keeps_their_condition_noise(tmp_path, seq_splits):
    from mmer_ext.models.recipes import RECIPES
    from mmer_ext.train.trainer import resolve_stages

    assert [s.hparams["condition_noise"] for s in RECIPES["imder-authors"]] == ["shared", "shared"]
    assert [s.hparams["score_net"] for s in RECIPES["imder-authors"]] == ["unet", "unet"]
    assert all(s.hparams["condition_noise"] == "clean" for r in ("imder", "imder-mosei") for s in RECIPES[r])
    # the config key still overrides it, per stage
    stages = resolve_stages(_cfg(tmp_path, hparams={"main": {"condition_noise": "independent"}}))
    assert [s.hparams["condition_noise"] for s in stages] == ["clean", "clean", "independent"]


def test_missing_rate_batches_follow_the_protocol(seq_splits):
    test = seq_splits["test"]
    for protocol in ("per-sample", "per-batch"):
        masks = torch.cat([b["missing_index"] for b in missing_rate_batches(
            test, mr=0.5, protocol=protocol, batch_size=4, device=torch.device("cpu"), seed=0)])
        assert masks.shape == (len(test), 3) and bool((masks.sum(1) >= 1).all())
        assert masks.sum() < 3 * len(test)
    batches = list(missing_rate_batches(test, mr=0.5, protocol="per-batch", batch_size=4,
                                        device=torch.device("cpu"), seed=0))
    for b in batches:  # the authors' protocol: one pattern per batch
        assert bool((b["missing_index"] == b["missing_index"][:1]).all())
        # Missing modalities reach the model as zeros; the clean features stay available as the recovery target.
        for j, m in enumerate("AVL"):
            gone = b["missing_index"][:, j] == 0
            assert float(b[m][gone].abs().sum()) == 0.0
            if bool(gone.any()):
                assert float(b[f"{m}_clean"][gone].abs().sum()) > 0.0
    full = list(missing_rate_batches(test, mr=0.0, protocol="per-batch", batch_size=4, device=torch.device("cpu"),
                                     seed=0))
    assert all(bool((b["missing_index"] == 1).all()) for b in full)  # MR = 0 means complete data (the authors' bug)


def test_stage_fingerprint_names_the_missing_rate(tmp_path, seq_splits):
    fit(_cfg(tmp_path), splits=seq_splits)
    with pytest.raises(ValueError, match="missing_rate"):
        fit(_cfg(tmp_path, missing_rate=0.3), splits=seq_splits)


def test_cli_train_and_evaluate_imder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    flags = ["--set", "data_options.sizes=[32,16,16]"] + [
        arg for stage in HPARAMS for k, v in TINY_IMDER.items()
        for arg in ("--set", f"hparams.{stage}.{k}={json.dumps(v)}")]
    argv = ["train", "--model", "imder", "--data", "synthetic-mosi-small", "--sampler", "ode", "--steps", "2",
            "--missing-rate", "0.3", "--missing-protocol", "per-batch", "--epochs", "1", "--batch-size", "8",
            "--no-progress", "--out", "run", "--device", "cpu", *flags]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "MR=0.7" in out and "Acc2_non0" in out
    run = json.loads((tmp_path / "run" / "run.json").read_text())["config"]
    assert run["missing_rate"] == 0.3 and run["missing_protocol"] == "per-batch" and run["sampler"] == "ode"

    assert main(["evaluate", "run/model.safetensors", "--missing-rates", "0.0", "0.5", "--json", "--device",
                 "cpu"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {"MR=0.0", "MR=0.5", "average", "overall"}
    # The sweep's table and chart beside the checkpoint; the run's per-epoch log and curves from training.
    saved = json.loads((tmp_path / "run" / "eval-test-per-batch.json").read_text())
    assert saved["metrics"] == metrics and saved["settings"]["missing_rates"] == [0.0, 0.5]
    assert "| imder | MR=0.5 |" in (tmp_path / "run" / "eval-test-per-batch.md").read_text()
    assert (tmp_path / "run" / "eval-test-per-batch.png").read_bytes()[:4] == b"\x89PNG"
    assert "val/MAE" in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]
    assert (tmp_path / "run" / "training_curves.png").is_file()

    assert main(["evaluate", "run/model.safetensors", "--missing-rates", "0.9"]) == 2
    assert "missing rates" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "imder", "--missing-rate", "0.05"], "missing_rate"),
    (["train", "--model", "imder", "--steps", "0"], "sampler_steps"),
    (["train", "--model", "imder", "--eta", "1.5"], "sampler_eta"),
    (["train", "--model", "imder", "--eta", "0.5"], "needs --sampler ddim"),
    (["train", "--model", "imder", "--sampler", "pc", "--eta", "0.5"], "needs --sampler ddim"),
    (["train", "--model", "imder", "--set", "missing_protocol=per-epoch"], "missing_protocol"),
])
def test_bad_imder_flags_are_one_clear_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_eta_reaches_every_stage_sampler(tmp_path):
    from mmer_ext.train.trainer import resolve_stages

    stages = resolve_stages(_cfg(tmp_path, sampler_eta=0.5))
    assert [s.hparams["sampler_kwargs"] for s in stages] == [{"eta": 0.5}] * 3
    assert all(s.hparams["sampler"] == "ddim" for s in stages)
