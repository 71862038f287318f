"""Do IF-MMIN's and NMER's invariant (shared) features carry information, and does a scale-invariant CMD change that?

CMD is scale-dependent, so a teacher can lower it by shrinking every shared feature towards 0 (issue 15). For each
model (``ifmmin``, ``nmer``), each CMD input mode (``--modes``: the authors' ``none``, and the scale-invariant
``l2`` / ``pooled`` of :mod:`mmer_ext.models.invariance`, set on the teacher as ``cmd_normalize``) and each seed, the
whole two-stage recipe is trained on the embedded synthetic utterances, and on the test split (all modalities) the
trained teacher's shared features are measured:

* ``std``: their per-dimension standard deviation over the test utterances, averaged (also ``spec_std``: the same for
  the specific features, the scale the classifier works at);
* ``probe_UA``: a linear probe (standardised features, logistic regression fit on the train split) of the label from
  the three shared feature vectors, its test UA (chance 0.25); ``probe_spec_UA`` the same from the specific features;
* ``cos_matched`` / ``cos_gap``: the mean cosine between two modalities' shared features of the same utterance, and
  its excess over mismatched utterances (how much the shared space aligns an utterance across modalities);
* the student's six-condition average UA on the test split (``six_UA``, under the recipe's corruption), its
  full-modality UA, and its last epoch's invariant loss.

It is a script, not a test: a run trains ``len(models) x len(modes) x seeds`` two-stage models (minutes each on a
CPU). ``--tiny`` is the smoke mode. Writes ``invariant_features_study-<device>-<date>.json`` and ``.md`` into ``--out``
(default ``benchmarks/results``)::

    .venv/bin/python benchmarks/invariant_features_study.py                   # ~15 min on 2 CPU threads
    .venv/bin/python benchmarks/invariant_features_study.py --tiny --out /tmp/s
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from mmer_ext._atomic import atomic_write_text
from mmer_ext.data import make_synthetic_utterances
from mmer_ext.metrics import classification_metrics
from mmer_ext.train import fit, load_config, load_model
from mmer_ext.train.evaluation import iterate_batches, protocol_view
from mmer_ext.train.views import views_for

MODALITIES = ("A", "L", "V")


@torch.no_grad()
def teacher_features(teacher: torch.nn.Module, dataset) -> dict[str, Any]:
    """Per-modality specific and shared features of the full, clean split, and the labels."""
    teacher.eval()
    spec: dict[str, list] = {m: [] for m in MODALITIES}
    shared: dict[str, list] = {m: [] for m in MODALITIES}
    labels = []
    for batch in iterate_batches(protocol_view(dataset, "full"), views=views_for(dataset), batch_size=256,
                                 device=torch.device("cpu"), corruption="zero", scheduler=None, seed=0):
        s, inv = teacher.features(batch)
        for m in MODALITIES:
            spec[m].append(s[m])
            shared[m].append(inv[m])
        labels.append(batch["label"])
    return {"spec": {m: torch.cat(v) for m, v in spec.items()}, "shared": {m: torch.cat(v) for m, v in shared.items()},
            "label": torch.cat(labels)}


def probe_ua(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(train_x, train_y)
    pred = clf.predict(test_x)
    return float(classification_metrics(test_y, pred, num_classes=int(max(train_y.max(), test_y.max()) + 1))["UA"])


def cross_modal_similarity(shared: dict[str, torch.Tensor], seed: int) -> tuple[float, float]:
    matched, gap = [], []
    perm = torch.randperm(shared["A"].shape[0], generator=torch.Generator().manual_seed(seed))
    for a, b in combinations(MODALITIES, 2):
        same = F.cosine_similarity(shared[a], shared[b], dim=-1).mean()
        other = F.cosine_similarity(shared[a], shared[b][perm], dim=-1).mean()
        matched.append(float(same))
        gap.append(float(same - other))
    return statistics.mean(matched), statistics.mean(gap)


def measure(model_name: str, mode: str, seed: int, splits: dict, sizes: dict, epochs: int, out: Path) -> dict:
    run_dir = out / f"{model_name}-{mode}-seed{seed}"
    cfg = load_config(None, [f"hparams.teacher.cmd_normalize={mode}"], model=model_name, data="synthetic",
                      data_options=sizes, seed=seed, out_dir=str(run_dir), epochs=epochs, progress=False,
                      tensorboard=False, device="cpu")
    start = time.perf_counter()
    result = fit(cfg, splits=splits, log=lambda m: None)
    seconds = time.perf_counter() - start
    model, _ = load_model(run_dir / "model.safetensors")
    train, test = teacher_features(model.teacher, splits["train"]), teacher_features(model.teacher, splits["test"])
    cat = {k: {s: torch.cat([d[s][m] for m in MODALITIES], dim=-1).numpy() for s in ("spec", "shared")}
           for k, d in (("train", train), ("test", test))}
    shared_std = statistics.mean(float(test["shared"][m].std(dim=0).mean()) for m in MODALITIES)
    spec_std = statistics.mean(float(test["spec"][m].std(dim=0).mean()) for m in MODALITIES)
    cos_matched, cos_gap = cross_modal_similarity(test["shared"], seed)
    student = json.loads((run_dir / "student" / "done.json").read_text())
    return {
        "model": model_name, "mode": mode, "seed": seed, "seconds": round(seconds, 1),
        "std": shared_std, "spec_std": spec_std,
        "probe_UA": probe_ua(cat["train"]["shared"], train["label"].numpy(), cat["test"]["shared"],
                             test["label"].numpy()),
        "probe_spec_UA": probe_ua(cat["train"]["spec"], train["label"].numpy(), cat["test"]["spec"],
                                  test["label"].numpy()),
        "cos_matched": cos_matched, "cos_gap": cos_gap,
        "six_UA": result.test_metrics["average"]["UA"], "full_UA": result.test_metrics["{a,v,l}"]["UA"],
        "student_invariant_loss": student["history"][-1]["train"].get("invariant"),
    }


def summarise(rows: list[dict]) -> list[dict]:
    keys = ("std", "spec_std", "probe_UA", "probe_spec_UA", "cos_matched", "cos_gap", "six_UA", "full_UA",
            "student_invariant_loss")
    out = []
    for model, mode in dict.fromkeys((r["model"], r["mode"]) for r in rows):
        group = [r for r in rows if r["model"] == model and r["mode"] == mode]
        entry: dict[str, Any] = {"model": model, "mode": mode, "seeds": [r["seed"] for r in group]}
        for k in keys:
            values = [float(r[k]) for r in group if r[k] is not None]
            entry[k] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        out.append(entry)
    return out


def markdown(summary: list[dict], rows: list[dict], settings: dict) -> str:
    def fmt(pair, digits=3):
        return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"

    lines = ["# Invariant (shared) features of IF-MMIN's and NMER's teachers", "",
             f"Settings: {json.dumps(settings)}", "",
             "Mean ± std over the seeds. `std`: per-dimension std of the teacher's shared features on the test split; "
             "`probe`: test UA of a linear probe of the label (chance 0.25) from the shared / specific features; "
             "`cos`: mean cosine of two modalities' shared features of the same utterance, and its excess over "
             "mismatched utterances; `six UA`: the student's average UA over the six missing conditions; `inv. loss`: "
             "the student's last-epoch invariant MSE.", "",
             "| model | CMD input | shared std | specific std | probe (shared) | probe (specific) | cos matched | "
             "cos gap | six UA | full UA | inv. loss |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for e in summary:
        lines.append(f"| {e['model']} | {e['mode']} | {fmt(e['std'], 4)} | {fmt(e['spec_std'])} | {fmt(e['probe_UA'])} "
                     f"| {fmt(e['probe_spec_UA'])} | {fmt(e['cos_matched'])} | {fmt(e['cos_gap'])} | "
                     f"{fmt(e['six_UA'])} | {fmt(e['full_UA'])} | {fmt(e['student_invariant_loss'], 5)} |")
    lines += ["", "Per run:", "", "| model | mode | seed | shared std | probe | six UA | seconds |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['model']} | {r['mode']} | {r['seed']} | {r['std']:.4f} | {r['probe_UA']:.3f} | "
              f"{r['six_UA']:.3f} | {r['seconds']} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ifmmin", "nmer"])
    parser.add_argument("--modes", nargs="+", default=["none", "l2", "pooled"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8, help="total epochs of each stage")
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--n-test", type=int, default=120)
    parser.add_argument("--tiny", action="store_true", help="smoke mode: 2 seeds, 1 epoch, 48 utterances")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--work", default=None, help="run directories (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.seeds, args.epochs, args.n_train, args.n_test = 2, 1, 48, 24
    torch.set_num_threads(max(1, torch.get_num_threads()))
    sizes = {"preset": "small", "n_train": args.n_train, "n_val": max(24, args.n_test // 2), "n_test": args.n_test}
    import tempfile

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="invariant-study-"))
    rows = []
    for seed in range(args.seeds):
        splits = make_synthetic_utterances(seed=seed, **sizes)
        for model_name in args.models:
            for mode in args.modes:
                row = measure(model_name, mode, seed, splits, sizes, args.epochs, work)
                print(json.dumps(row), flush=True)
                rows.append(row)
    settings = {"sizes": sizes, "epochs_per_stage": args.epochs, "seeds": list(range(args.seeds)),
                "threads": torch.get_num_threads(), "torch": torch.__version__, "python": sys.version.split()[0],
                "machine": platform.machine()}
    summary = summarise(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"invariant_features_study-cpu-{torch.get_num_threads()}threads-{datetime.date.today().isoformat()}"
    if args.tiny:
        stem += "-tiny"
    atomic_write_text(out / f"{stem}.json", json.dumps({"settings": settings, "summary": summary, "runs": rows},
                                                      indent=2))
    atomic_write_text(out / f"{stem}.md", markdown(summary, rows, settings))
    print(out / f"{stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
