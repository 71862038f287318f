"""Few-step recovery samplers against IMDer's 100-step Euler-Maruyama, end to end on the embedded data.

Two questions, answered with honest runs (one seed, the package's trainer, the paper's IMDer architecture):

1. **Recovery error at fewer steps.** One IMDer is trained with the authors' sampler (100-step EM in every training
   batch). Its trained score networks then recover the missing modalities of the test split with each sampler in
   ``--samplers``; the recovery MSE (recovered vs true projected features) of each is compared with EM-100's.
   Target of the issue: a <= 20-step sampler within 5 % of EM-100's recovery error.
2. **End-to-end speed at equal recognition metrics.** The missing-data stage is trained again from the same
   pretrained checkpoint with the few-step sampler ``--fast`` in every training batch, then evaluated with it. Its
   wall time (training stage + test sweep) and metrics are compared with the EM-100 pipeline's. Target: >= 5x.

It is a script, not a pytest benchmark: one run trains models for minutes. ``--tiny`` is the smoke mode
(``python_tests/test_imder_sampler_study.py`` runs it)::

    .venv/bin/python benchmarks/imder_sampler_study.py                      # ~30 min on the 2-core CPU
    .venv/bin/python benchmarks/imder_sampler_study.py --tiny --out /tmp/s  # seconds

Writes ``imder_sampler_study-<device>-<date>.json`` and ``.md`` into ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mmer_ext._atomic import atomic_write_text
from mmer_ext.data import load_dataset
from mmer_ext.sampling import CONDITION_MODES
from mmer_ext.train import fit, load_config, load_model
from mmer_ext.train.evaluation import MR_KEY, evaluate_missing_rates

# (name, steps, extra sampler options): the candidates of question 1, EM-100 first (the reference).
DEFAULT_SAMPLERS = ("em:100", "ode:20", "ode-heun:10", "ode-heun:20", "ddim:10", "ddim:20", "pc:20",
                    "ddim:10:karras", "ode-heun:10:karras")
TINY_HPARAMS = {"score_channels": [8, 16, 32, 32], "rcab_blocks": 1, "nlevels": 1, "d_model": 8, "num_heads": 2,
                "score_heads": 2, "score_layers": 1}


def parse_sampler(spec: str) -> tuple[str, int, dict[str, Any]]:
    """``"ddim:10"`` or ``"ddim:10:karras"`` -> ``("ddim", 10, {"schedule": "karras"})``."""
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"sampler spec {spec!r} must be NAME:STEPS or NAME:STEPS:SCHEDULE")
    return parts[0], int(parts[1]), ({"schedule": parts[2]} if len(parts) == 3 else {})


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-")
    return f"cpu-{torch.get_num_threads()}threads"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="synthetic-mosi-small")
    p.add_argument("--pretrain-epochs", type=int, default=10)
    p.add_argument("--main-epochs", type=int, default=3)
    p.add_argument("--missing-rate", type=float, default=0.3, help="MR of the missing-data stage")
    p.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7], help="test MRs")
    p.add_argument("--samplers", nargs="+", default=list(DEFAULT_SAMPLERS))
    p.add_argument("--fast", default="ddim:10", help="the few-step sampler of the end-to-end comparison")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--work", default="runs/imder_sampler_study", help="where the trained models go")
    p.add_argument("--tiny", action="store_true", help="smoke mode: tiny model and data, 1 epoch")
    p.add_argument("--condition-noise", choices=CONDITION_MODES, default="shared",
                   help="how training and sampling perturb the condition (shared: the authors', which this study "
                        "measured first; clean: the package's IMDer default)")
    p.add_argument("--reuse", action="store_true",
                   help="keep the models trained in --work by an earlier run (same settings): only evaluate again")
    args = p.parse_args(argv)

    data_options: dict[str, Any] = {}
    hparams: dict[str, Any] = {}
    if args.tiny:
        data_options = {"sizes": [16, 8, 8]}
        hparams = {"pretrain": TINY_HPARAMS, "main": TINY_HPARAMS}
        args.pretrain_epochs, args.main_epochs = 1, 1
        args.rates = [0.3, 0.7]
        args.samplers = ["em:4", "ddim:2"]
        args.fast = "ddim:2"
    reference, fast = parse_sampler(args.samplers[0]), parse_sampler(args.fast)
    splits = load_dataset(args.data, seed=args.seed, **data_options)
    work = Path(args.work)
    common = dict(model="imder", data=args.data, data_options=data_options, seed=args.seed, device=args.device,
                  progress=False, missing_rate=args.missing_rate, eval_missing_rates=list(args.rates),
                  stage_epochs={"pretrain": args.pretrain_epochs, "main": args.main_epochs})
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    def stage_hparams(options: dict[str, Any]) -> dict[str, Any]:
        return {stage: {**hparams.get(stage, {}), "sampler_kwargs": options, "condition_noise": args.condition_noise}
                for stage in ("pretrain", "main")}

    # ---- the reference pipeline: pretraining, then the missing-data stage with EM-100 in every batch
    t0 = time.perf_counter()
    ref_cfg = load_config(None, **common, out_dir=str(work / "reference"), sampler=reference[0],
                          sampler_steps=reference[1], hparams=stage_hparams(reference[2]), resume=args.reuse)
    ref = fit(ref_cfg, splits=splits, log=say)
    ref_total = time.perf_counter() - t0
    pretrain_s = ref.stages[0].seconds
    ref_pipeline_s = ref_total - pretrain_s  # the missing-data stage + the test sweep
    if args.reuse:
        # Reused stages were loaded, not trained: their time is the earlier run's, read back from its JSON.
        previous = sorted(Path(args.out).glob(f"imder_sampler_study-*{'-tiny' if args.tiny else ''}.json"))
        if not previous:
            raise SystemExit("--reuse needs the JSON of the earlier run in --out")
        old = json.loads(previous[-1].read_text())["end_to_end"]
        pretrain_s, ref_pipeline_s = old["pretrain_seconds"], old["reference"]["seconds"]
    device = next(ref.model.parameters()).device

    # ---- question 1: every sampler on the reference model's trained score networks
    recovery: dict[str, Any] = {}
    model = ref.model
    for spec in args.samplers:
        name, steps, options = parse_sampler(spec)
        model.set_sampler(name, steps, **options)
        t1 = time.perf_counter()
        metrics = evaluate_missing_rates(model, splits["test"], rates=args.rates, protocol=ref_cfg.missing_protocol,
                                         batch_size=32, device=device, seed=args.seed)
        recovery[spec] = {"seconds": time.perf_counter() - t1, "metrics": metrics}
        say(f"{spec}: recovery MSE {metrics['average'].get('recovery_MSE', float('nan')):.4f}, "
            f"MAE {metrics['average']['MAE']:.4f} ({recovery[spec]['seconds']:.1f} s)")
    ref_mse = recovery[args.samplers[0]]["metrics"]["average"]["recovery_MSE"]
    for spec, r in recovery.items():
        r["recovery_MSE_vs_reference"] = r["metrics"]["average"]["recovery_MSE"] / ref_mse - 1.0
        r["speedup_vs_reference"] = recovery[args.samplers[0]]["seconds"] / r["seconds"]

    # ---- question 2: the missing-data stage again from the same pretrained weights, with the fast sampler
    pretrained = work / "reference" / "pretrain" / "best.safetensors"
    t0 = time.perf_counter()
    fast_cfg = load_config(None, **common, out_dir=str(work / "fast"), sampler=fast[0], sampler_steps=fast[1],
                           hparams=stage_hparams(fast[2]), resume=args.reuse)
    fast_run = fit(fast_cfg, splits=splits, teacher_checkpoint=pretrained, log=say)
    fast_pipeline_s = time.perf_counter() - t0 if not args.reuse else old["fast"]["seconds"]
    load_model(pretrained)  # the checkpoint both pipelines start from is a complete, loadable model

    def summary(metrics: dict[str, Any]) -> dict[str, float]:
        keys = ("Acc2_non0", "F1_non0", "Acc7", "MAE", "Corr", "recovery_MSE")
        return {k: metrics["average"][k] for k in keys if k in metrics["average"]}

    end_to_end = {
        "reference": {"sampler": args.samplers[0], "seconds": ref_pipeline_s, "metrics": summary(ref.test_metrics),
                      "per_rate": {MR_KEY(mr): ref.test_metrics[MR_KEY(mr)] for mr in args.rates}},
        "fast": {"sampler": args.fast, "seconds": fast_pipeline_s, "metrics": summary(fast_run.test_metrics),
                 "per_rate": {MR_KEY(mr): fast_run.test_metrics[MR_KEY(mr)] for mr in args.rates}},
        "pretrain_seconds": pretrain_s,
        "speedup_missing_stage_and_test": ref_pipeline_s / fast_pipeline_s,
        "speedup_with_pretraining": (pretrain_s + ref_pipeline_s) / (pretrain_s + fast_pipeline_s),
    }

    stamp = datetime.date.today().isoformat()
    dev = _device_name(device)
    payload = {
        "date": stamp, "device": dev, "torch": torch.__version__, "python": platform.python_version(),
        "tiny": args.tiny, "data": args.data, "sizes": {k: len(v) for k, v in splits.items()},
        "dims": list(splits["train"].dims), "seed": args.seed, "missing_rate_train": args.missing_rate,
        "test_rates": args.rates, "epochs": {"pretrain": args.pretrain_epochs, "main": args.main_epochs},
        "hparams": hparams, "condition_noise": args.condition_noise, "recovery": recovery, "end_to_end": end_to_end,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = ("-tiny" if args.tiny else "") + ("" if args.condition_noise == "shared" else f"-{args.condition_noise}")
    base = out / f"imder_sampler_study-{dev}-{stamp}{tag}"
    atomic_write_text(base.with_suffix(".json"), json.dumps(payload, indent=2, default=float) + "\n")
    atomic_write_text(base.with_suffix(".md"), render_markdown(payload))
    print(render_markdown(payload))
    return 0


def render_markdown(payload: dict[str, Any]) -> str:
    rec, e2e = payload["recovery"], payload["end_to_end"]
    lines = [
        f"# IMDer: few-step samplers vs {next(iter(rec))} ({payload['device']}, {payload['date']})",
        "",
        f"Data `{payload['data']}` {payload['sizes']}, dims {payload['dims']}, seed {payload['seed']}; epochs "
        f"{payload['epochs']}; condition noise `{payload.get('condition_noise', 'shared')}`; missing-data stage at MR "
        f"{payload['missing_rate_train']}; test MRs "
        f"{payload['test_rates']} (averages below).{' **Tiny smoke run: not a result.**' if payload['tiny'] else ''}",
        "",
        "## 1. Recovery error of each sampler on the same trained score networks",
        "",
        "| sampler:steps | recovery MSE | vs reference | recovery cosine | MAE | Acc-2 (non0) | test sweep s | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for spec, r in rec.items():
        m = r["metrics"]["average"]
        lines.append(f"| {spec} | {m['recovery_MSE']:.4f} | {100 * r['recovery_MSE_vs_reference']:+.1f} % | "
                     f"{m['recovery_cosine']:.4f} | {m['MAE']:.4f} | {100 * m['Acc2_non0']:.2f} | "
                     f"{r['seconds']:.1f} | {r['speedup_vs_reference']:.1f}x |")
    ref_cos = next(iter(rec.values()))["metrics"]["average"].get("recovery_cosine", float("nan"))
    if abs(ref_cos) < 0.05:
        lines += ["", f"**The recovered features are uncorrelated with the true ones** (cosine {ref_cos:+.4f} for the "
                  "reference sampler): the score networks did not learn to use the condition at this training length "
                  "and condition-noise mode, so the errors above compare the spread of unconditional samples "
                  "(deterministic samplers spread less, hence their lower MSE), not recovery quality."]
    ref, fast = e2e["reference"], e2e["fast"]
    lines += [
        "",
        "## 2. End to end: the missing-data stage trained and tested with each sampler",
        "",
        "| pipeline | sampler | seconds | MAE | Acc-2 (non0) | F1 (non0) | Acc-7 | Corr |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in (("reference", ref), ("fast", fast)):
        m = r["metrics"]
        lines.append(f"| {label} | {r['sampler']} | {r['seconds']:.1f} | {m['MAE']:.4f} | {100 * m['Acc2_non0']:.2f} | "
                     f"{100 * m['F1_non0']:.2f} | {100 * m['Acc7']:.2f} | {m['Corr']:.4f} |")
    lines += [
        "",
        f"Speed-up of the missing-data stage + test sweep: **{e2e['speedup_missing_stage_and_test']:.1f}x**; "
        f"with the shared pretraining ({e2e['pretrain_seconds']:.0f} s, no sampling) counted in both: "
        f"{e2e['speedup_with_pretraining']:.1f}x.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
