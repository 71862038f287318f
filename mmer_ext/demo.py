"""The main job (``mmer-ext demo``, the README's ``make demo``): the MMIN paper's comparison on the embedded data.

Trains the full-modality baseline, the augmented baseline, MMIN, IF-MMIN and NMER on the embedded synthetic
utterances under 3 seeds each, evaluates each under the six missing conditions and full, and writes to ``out_dir``:

- ``report.md``: the paper-style tables as means over the seeds (missing = zeroed, MMIN's protocol; missing = noisy,
  NMER's protocol), the same as mean ± std, which orderings of the models are significant (paired t-test over
  seeds on the average UA), the test of the MMIN paper's hypothesis (average over the six conditions: MMIN >
  augmented > full-modality baseline) as the run found it, seeds, epochs, timings;
- ``results.csv`` / ``results_noisy.csv``: the mean tables; ``results_per_seed.csv`` / ``results_noisy_per_seed.csv``:
  one row per model and seed, and each model's std; ``results.json``: all of it, with the paired tests;
- ``ua_per_condition.png``: mean UA per condition per model; ``ua_seed_spread.png``: each seed's average UA;
- ``confusion_<model>.png``: confusion matrices per condition (summed over the seeds, normalised by true class);
- ``mmin_embeddings.png``: a 2-D t-SNE projection of MMIN's imagined vs the teacher's real joint embeddings (the
  first seed);
- an MMGCN section: MMGCN trained on the embedded synthetic dialogues, evaluated under the six conditions and full
  (WA, UA, weighted F1, per-class F1; ``mmgcn_results.csv``; its confusion matrices ``mmgcn_confusion.png``);
- an IMDer section: the recipe's three stages (complete-data pretraining, score pretraining, missing-data training
  at MR 0.1) on the embedded MOSI-like sequences, evaluated over the missing-rate sweep MR 0.0 ... 0.7 (Acc-2, F1,
  Acc-7, MAE, Corr, recovery error; ``imder_results.csv``), then the recovery against zero-fill and a ridge
  regressor (table) with two pictures (``imder_recovery_heatmaps.png``, ``imder_recovery_pca.png``).

The full-modality baseline is MMIN's own teacher (the same model and seed, trained once). The students train fewer epochs
than in the papers, on smaller feature dims (see :class:`DemoPlan`); both are recorded in the report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mmer_ext import report
from mmer_ext.data import CONDITION_LABELS, make_synthetic_dialogues, make_synthetic_utterances
from mmer_ext.models.recipes import RECIPES
from mmer_ext.train import collect_embeddings, evaluate_model, fit, load_config
from mmer_ext.significance import ALPHA, markdown_orderings, pairwise_orderings
from mmer_ext.train.cv import aggregate_metrics
from mmer_ext.train.distributed import resolve_device

__all__ = ["DemoPlan", "run_demo", "DEMO_MODELS"]

UTTERANCE_MODELS = ("baseline", "augmented", "mmin", "ifmmin", "nmer")
DEMO_MODELS = (*UTTERANCE_MODELS, "mmgcn", "imder")
DISPLAY_NAMES = {"baseline": "full-modality baseline", "augmented": "augmented baseline", "mmin": "MMIN",
                 "ifmmin": "IF-MMIN", "nmer": "NMER", "mmgcn": "MMGCN", "imder": "IMDer"}


@dataclass(frozen=True)
class DemoPlan:
    """Data and epochs of the demo; ``quick`` is a smoke run of the whole pipeline (tests, CI), not a result.

    The full plan uses the ``small`` synthetic preset (A/V/L dims 20/24/32 instead of IEMOCAP's 130/342/1024) at
    half IEMOCAP's size (1500/300/600 utterances), and trains each of the five utterance models under 3 seeds, so
    that its table is a mean ± std and its orderings can be tested over seeds. To keep the whole demo near 15
    minutes on 2 CPU cores with three seeds, the data were halved (from IEMOCAP's 3000/600/1200) and the students
    cut from 25 to 20 epochs (the students are ~80 % of the utterance models' time, NMER's student alone ~55 %).
    That leaves the students 40 % of the single-seed plan's optimizer steps, and it shows: on seeds 0-2 MMIN and
    IF-MMIN fall significantly below both baselines, where the single-seed plan (3000 utterances, 25 student epochs)
    had MMIN above them. With the IEMOCAP dims one epoch costs about 5x more. Teachers and baselines train the papers' 20 epochs (10 + 10 decay); students
    20 instead of the papers' 40-80. ``mmer-ext train`` uses the IEMOCAP dims by default.

    IMDer keeps the paper's MulT and refiners (d = 32, 4 MulT levels, 20-block refiners) on the ``small`` MOSI-like
    preset (400 / 100 / 200 sequences of 50 steps, text dims 32 instead of BERT's 768), with the package's default
    per-frame score networks (``score_net="frame"``: a 3-block residual MLP of width 256 per step over a 5-step
    condition window, 0.31M parameters each, instead of the paper's 3.5M-parameter sequence U-Net, which did not
    learn the conditional on this data) and the recipe's three stages: 15 pretraining epochs, ``imder_score_passes`` passes
    of score pretraining on the complete training sequences, 6 missing-data epochs (the authors train until early
    stopping); 10-step DDIM with half the ancestral noise (``eta=0.5``) is the recovery sampler instead of the authors'
    100-step Euler-Maruyama (``benchmarks/imder_recovery.py`` compares them). The section then shows the recovery against zero-fill and a
    ridge regressor from the same condition on the test split at MR ``imder_recovery_rates``, with pictures.
    """

    data_options: dict[str, Any]
    dialogue_options: dict[str, Any]
    stage_epochs: dict[str, dict[str, int]]
    # The utterance models train once per seed (seed, seed + 1, ...) on the same data; tables are mean ± std.
    n_seeds: int = 3
    batch_size: dict[str, int] | None = None
    # IMDer: the synthetic MOSI-like sequences, and the recovery sampler used in training and evaluation.
    sequence_data: str = "synthetic-mosi-small"
    sequence_options: dict[str, Any] | None = None
    imder_sampler: str = "ddim:10:eta=0.5"  # NAME:STEPS[:key=value], see mmer_ext.train.recovery.parse_sampler
    imder_hparams: dict[str, Any] | None = None
    imder_recovery_rates: tuple[float, ...] = (0.5,)

    @staticmethod
    def full() -> "DemoPlan":
        return DemoPlan(
            data_options={"preset": "small", "n_train": 1500, "n_val": 300, "n_test": 600},
            # MMGCN: the small dialogue preset (40 / 8 / 12 dialogues of 10-40 utterances, dims 24/20/16) with the
            # paper's 64 layers and 20 epochs takes ~30 s; IEMOCAP-sized dialogues take ~2.5 min.
            dialogue_options={"preset": "small"},
            stage_epochs={"baseline": {"main": 20}, "augmented": {"main": 20},
                          "mmin": {"teacher": 20, "student": 20}, "ifmmin": {"teacher": 20, "student": 20},
                          "nmer": {"teacher": 20, "student": 20}, "mmgcn": {"main": 20},
                          "imder": {"pretrain": 15, "score": 60, "main": 6}},
        )

    @staticmethod
    def quick() -> "DemoPlan":
        one = {"main": 1, "teacher": 1, "student": 1, "pretrain": 1, "score": 1}
        return DemoPlan(
            data_options={"preset": "small", "n_train": 192, "n_val": 48, "n_test": 64},
            dialogue_options={"preset": "small", "n_dialogues_train": 6, "n_val": 2, "n_test": 3},
            stage_epochs={m: {k: v for k, v in one.items() if k in _stage_names(m)} for m in DEMO_MODELS},
            n_seeds=2,
            batch_size={**{m: 32 for m in UTTERANCE_MODELS}, "mmgcn": 4, "imder": 16},
            sequence_options={"sizes": (48, 16, 24)},
            imder_sampler="ddim:3:eta=0.5",
            imder_hparams={"score_hidden": 32, "score_depth": 1, "rcab_blocks": 2, "nlevels": 1},
        )


def _stage_names(model: str) -> tuple[str, ...]:
    from mmer_ext.models.recipes import RECIPES

    return tuple(s.name for s in RECIPES[model])


def _hypothesis(avg_ua: dict[str, float], orderings: list[dict[str, Any]] | None = None, n_seeds: int = 1) -> str:
    """The MMIN paper's ordering on the mean average UA; with seeds, each of its two steps is called established
    only when the paired test over seeds finds it significant."""
    b, a, m = avg_ua.get("baseline"), avg_ua.get("augmented"), avg_ua.get("mmin")
    if None in (a, b, m):
        return "Not all three models of the hypothesis were trained."
    tests = {(r["better"], r["worse"]): r for r in orderings or []}

    def step(hi: str, lo: str, v_hi: float, v_lo: float) -> tuple[str, str]:
        """The text of one step and its state: supported, contradicted or tie (not significant)."""
        name_hi, name_lo = DISPLAY_NAMES[hi], DISPLAY_NAMES[lo]
        text = f"{name_hi} {v_hi:.2%} {'>' if v_hi > v_lo else '<='} {name_lo} {v_lo:.2%}"
        r = tests.get((name_hi, name_lo)) or tests.get((name_lo, name_hi))
        if r is None:
            return text, "supported" if v_hi > v_lo else "contradicted"
        sig = r["significant"]
        state = ("supported" if v_hi > v_lo else "contradicted") if sig else "tie"
        return text + f" ({'significant' if sig else 'not significant'}, paired p = {r['p']:.3f})", state

    (t1, s1), (t2, s2) = step("mmin", "augmented", m, a), step("augmented", "baseline", a, b)
    verdict = ("holds" if s1 == s2 == "supported" else
               "does not hold" if "contradicted" in (s1, s2) else "is not established")
    what = f"on the mean over {n_seeds} seeds" if orderings else "on this run"
    return (f"The MMIN paper's finding (average UA over the six missing conditions: MMIN > augmented baseline > "
            f"full-modality baseline) **{verdict}** {what}: {t1}; {t2}.")


def _train_utterance_models(plan: DemoPlan, splits: dict[str, Any], out_dir: Path, *, seeds: list[int],
                            models: tuple[str, ...], device: str, progress: bool, noise_steps: int,
                            log: Callable[[str], None]) -> tuple[dict[str, list[Any]], dict[str, float]]:
    """Every utterance model under every seed, each run in ``out_dir/<model>/seed-<s>/`` (resumable as any run)."""
    runs: dict[str, list[Any]] = {}
    timings: dict[str, float] = {}
    for name in models:
        t0 = time.perf_counter()
        runs[name] = []
        for s in seeds:
            run_dir = out_dir / name / f"seed-{s}"
            cfg = load_config(None, model=name, data="synthetic", data_options=plan.data_options, seed=s,
                              out_dir=str(run_dir), device=device, stage_epochs=plan.stage_epochs[name],
                              batch_size=(plan.batch_size or {}).get(name), progress=progress, noise_steps=noise_steps)
            teacher = None
            if name == "mmin" and "baseline" in runs:
                # MMIN's teacher is the full-modality baseline of the same seed: trained once, used twice.
                teacher = out_dir / "baseline" / f"seed-{s}" / "model.safetensors"
            runs[name].append(fit(cfg, splits=splits, teacher_checkpoint=teacher, log=log))
        timings[name] = time.perf_counter() - t0
        log(f"{DISPLAY_NAMES[name]}: {len(seeds)} seeds trained in {timings[name]:.0f} s")
    return runs, timings


def _summed_confusion(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    import numpy as np

    return {k: np.sum([np.asarray(m["confusion"][k]) for m in metrics], axis=0).tolist()
            for k in metrics[0]["confusion"]}


def _mmgcn_section(plan: DemoPlan, out_dir: Path, *, seed: int, device: str, progress: bool,
                   log: Callable[[str], None]) -> dict[str, Any]:
    """MMGCN on the embedded synthetic dialogues, evaluated beyond the paper under the six missing conditions."""
    t0 = time.perf_counter()
    splits = make_synthetic_dialogues(seed=seed, **plan.dialogue_options)
    log("embedded synthetic dialogues: " + ", ".join(f"{k} {len(v)} ({v.num_utterances} utterances)"
                                                     for k, v in splits.items()))
    cfg = load_config(None, model="mmgcn", data="synthetic-dialogue", data_options=plan.dialogue_options, seed=seed,
                      out_dir=str(out_dir / "mmgcn"), device=device, stage_epochs=plan.stage_epochs["mmgcn"],
                      batch_size=(plan.batch_size or {}).get("mmgcn"), progress=progress)
    result = fit(cfg, splits=splits, log=log)
    metrics = dict(result.test_metrics)
    per_class = metrics.pop("per_class_F1")
    class_names = list(splits["test"].class_names)
    lines = [
        f"{len(splits['train'])} / {len(splits['val'])} / {len(splits['test'])} dialogues (train / val / test), "
        f"{splits['test'].num_classes} classes, {RECIPES['mmgcn'][0].hparams.get('num_layers', 64)}-layer GCNII "
        "(the paper's depth), selected on validation weighted F1 (the authors select on the test set). MMGCN is "
        "trained on full dialogues; the missing-condition columns zero a modality's node features at test time, "
        "beyond the paper.",
        "",
        report.markdown_table({"MMGCN": metrics}, metrics=("WA", "UA", "WF1")),
        "",
        "Per-class F1 (full modalities): " + ", ".join(f"{n} {v:.2%}" for n, v in zip(class_names, per_class)),
    ]
    report.write_table_csv(out_dir / "mmgcn_results.csv", {"MMGCN": metrics}, metrics=("WA", "UA", "WF1"))
    confusion = metrics.pop("confusion")
    report.plot_confusion_matrices(out_dir / "mmgcn_confusion.png", confusion, class_names,
                                   title="MMGCN: test confusion per condition (rows: true class)")
    lines += ["", "![MMGCN: confusion per condition, normalised by true class](mmgcn_confusion.png)"]
    seconds = time.perf_counter() - t0
    log(f"MMGCN: trained in {seconds:.0f} s")
    return {"metrics": metrics, "per_class_F1": dict(zip(class_names, per_class)), "confusion": confusion,
            "markdown": "\n".join(lines),
            "sizes": {k: len(v) for k, v in splits.items()}, "seconds": seconds}


def _imder_section(plan: DemoPlan, out_dir: Path, *, seed: int, device: str, progress: bool,
                   log: Callable[[str], None]) -> dict[str, Any]:
    """IMDer on the embedded MOSI-like sequences: the recipe's stages, the missing-rate sweep on the test split, the
    recovery comparison."""
    from mmer_ext.data import load_dataset

    t0 = time.perf_counter()
    options = dict(plan.sequence_options or {})
    splits = load_dataset(plan.sequence_data, seed=seed, **options)
    train = splits["train"]
    log(f"embedded synthetic sequences ({plan.sequence_data}): " + ", ".join(f"{k} {len(v)}" for k, v in splits.items())
        + f"; dims {tuple(train.dims)}")
    from mmer_ext.train.recovery import parse_sampler

    sampler, steps, sampler_options = parse_sampler(plan.imder_sampler)
    hparams = {name: dict(plan.imder_hparams) for name in _stage_names("imder")} if plan.imder_hparams else {}
    cfg = load_config(None, model="imder", data=plan.sequence_data, data_options=options, seed=seed,
                      out_dir=str(out_dir / "imder"), device=device, stage_epochs=plan.stage_epochs["imder"],
                      batch_size=(plan.batch_size or {}).get("imder"), progress=progress, sampler=sampler,
                      sampler_steps=steps, sampler_eta=sampler_options.get("eta"), hparams=hparams)
    result = fit(cfg, splits=splits, log=log)
    metrics = result.test_metrics
    lines = [
        f"{len(train)} / {len(splits['val'])} / {len(splits['test'])} sequences (train / val / test) of "
        f"{train[0]['A'].shape[0]} steps, dims (A, V, L) {tuple(train.dims)}, sentiment label in [-3, 3]. "
        f"Stages: complete-data pretraining; score pretraining ({plan.stage_epochs['imder'].get('score', 0)} passes "
        "over the complete training sequences, projections frozen, EMA of the score weights); training at MR "
        f"{cfg.missing_rate} ({cfg.missing_protocol} missingness); condition `clean` (never noised). Recovery sampler "
        f"`{plan.imder_sampler}` ({steps} steps) in training and evaluation (the authors sample 100 Euler-Maruyama steps; "
        "`benchmarks/imder_recovery.py` compares the samplers). Acc-2 and F1 on the non-zero labels, as IMDer reports them; recovery MSE between the recovered "
        "and the true projected features of the missing modalities.",
        "",
        report.markdown_missing_rate_table({"IMDer": metrics}),
    ]
    report.write_missing_rate_csv(out_dir / "imder_results.csv", {"IMDer": metrics})
    t1 = time.perf_counter()
    recovery, rec_lines, figures = _imder_recovery(result.model, splits, plan, out_dir, seed=seed,
                                                   sampler=plan.imder_sampler, log=log)
    lines += ["", *rec_lines]
    seconds = time.perf_counter() - t0
    log(f"IMDer: trained and evaluated in {seconds:.0f} s (recovery comparison and pictures {time.perf_counter() - t1:.0f} s)")
    return {"metrics": metrics, "markdown": "\n".join(lines), "sizes": {k: len(v) for k, v in splits.items()},
            "sampler": plan.imder_sampler, "seconds": seconds, "recovery": recovery, "figures": figures}


def _imder_recovery(model, splits, plan: DemoPlan, out_dir: Path, *, seed: int, sampler: str,
                    log: Callable[[str], None]) -> tuple[dict[str, Any], list[str], dict[str, str]]:
    """The short form of ``benchmarks/imder_recovery.py`` on the demo's trained IMDer: zero-fill, a ridge regressor
    from the same condition and the model's sampler on the same test rows, and two pictures."""
    from mmer_ext.models.base import DATA_ORDER
    from mmer_ext.train.recovery import RidgeRecovery, evaluate_fills, example_recoveries, frames, projections

    model = model.cpu().eval()
    train_mean = {m: p.mean(0).double() for m, p in projections(model, splits["train"]).items()}
    ridge = RidgeRecovery(model, splits["train"], splits["val"])
    rates = tuple(plan.imder_recovery_rates)
    fills = {"zero-fill": "zero", "ridge": "ridge", f"diffusion {sampler}": sampler}
    res = evaluate_fills(model, splits["test"], fills=fills, ridge=ridge, train_mean=train_mean, seed=seed,
                         rates=rates, batch_size=32, log=log, max_frames=1000)
    rows = ["| recovery | Pearson r (raw) | MSE (raw) | MMD^2 to real (raw) | spread / real | "
            + " | ".join(f"Acc-2 / MAE at MR {mr} (raw, refined)" for mr in rates) + " |",
            "|---|---:|---:|---:|---:|" + "---|" * len(rates)]
    for name, r in res.items():
        avg = r["recovery"]["raw"]["average"]
        cells = [f"{100 * r['downstream']['raw'][f'MR={mr:.1f}']['Acc2_non0']:.1f} / "
                 f"{r['downstream']['raw'][f'MR={mr:.1f}']['MAE']:.3f}, "
                 f"{100 * r['downstream']['refined'][f'MR={mr:.1f}']['Acc2_non0']:.1f} / "
                 f"{r['downstream']['refined'][f'MR={mr:.1f}']['MAE']:.3f}" for mr in rates]
        rows.append(f"| {name} | {avg['pearson']:.3f} | {avg['MSE']:.3f} | {avg['MMD']:.4f} | {avg['std_ratio']:.2f} | "
                    + " | ".join(cells) + " |")
    r_ridge = res["ridge"]["recovery"]["raw"]["average"]["pearson"]
    lines = [
        f"Recovery of the missing modalities on the test split at MR {list(rates)} (the same rows and patterns for "
        f"every method; averaged over A, V, L). Pearson r: correlation with the true projected features (centred by "
        f"the training mean); an exact posterior sample would reach r^2 of the regressor's r "
        f"({r_ridge:.3f}^2 = {r_ridge ** 2:.3f}). MMD^2: RBF-kernel distance between recovered and real per-step "
        "feature vectors (lower = the recovery looks like real features). Raw: the sample (or fill) itself; refined: "
        "after IMDer's refiner.",
        "",
        *rows,
    ]
    examples = example_recoveries(model, splits["test"], ridge, sampler, seed, rows=64)
    m = "V" if "V" in examples else DATA_ORDER[0]
    ex = examples[m]
    figures = {}
    report.plot_recovery_heatmaps(out_dir / "imder_recovery_heatmaps.png", ex["real"][:3].numpy(),
                                  {"ridge": ex["ridge"][:3].numpy(), f"diffusion {sampler}": ex["diffused"][:3].numpy()},
                                  modality=m)
    figures[f"IMDer: real vs recovered {m} features of three test sequences (from A and L)"] = \
        "imder_recovery_heatmaps.png"
    report.plot_recovery_projection(out_dir / "imder_recovery_pca.png",
                                    {"real": frames(ex["real"]).numpy(), "ridge": frames(ex["ridge"]).numpy(),
                                     f"diffusion {sampler}": frames(ex["diffused"]).numpy()}, seed=seed,
                                    title=f"IMDer: real, regressed and diffused {m} frames (PCA of the real ones)")
    figures[f"IMDer: real, regressed and diffused {m} frames, 2-D PCA"] = "imder_recovery_pca.png"
    summary = {name: {"pearson": r["recovery"]["raw"]["average"]["pearson"],
                      "MMD": r["recovery"]["raw"]["average"]["MMD"],
                      "downstream": r["downstream"]} for name, r in res.items()}
    return summary, lines, figures


def run_demo(out_dir: str | Path = "runs/demo", *, seed: int = 0, quick: bool = False, device: str = "auto",
             progress: bool = True, models: tuple[str, ...] = DEMO_MODELS, noise_steps: int = 100,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = DemoPlan.quick() if quick else DemoPlan.full()
    started = time.perf_counter()
    unknown = sorted(set(models) - set(DEMO_MODELS))
    if unknown:
        raise ValueError(f"unknown demo model(s) {unknown}; choose from {DEMO_MODELS}")
    splits = make_synthetic_utterances(seed=seed, **plan.data_options)
    log(f"embedded synthetic data: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items())
        + f"; dims {tuple(splits['train'].dims)}; classes {list(splits['train'].class_names)}")

    seeds = [seed + i for i in range(plan.n_seeds)]
    runs, timings = _train_utterance_models(plan, splits, out_dir, seeds=seeds, device=device, progress=progress,
                                            noise_steps=noise_steps, log=log,
                                            models=tuple(m for m in models if m in UTTERANCE_MODELS))
    trained = {name: r[0] for name, r in runs.items()}  # the first seed's run: its embeddings are drawn

    test = splits["test"]
    num_classes = test.num_classes
    dev = resolve_device(device)
    per_seed: dict[str, dict[str, list[dict[str, Any]]]] = {"zero": {}, "gaussian": {}}
    for name, results in runs.items():
        for corruption in per_seed:
            # The same test noise for every model and seed (the evaluation seed stays `seed`): the seeds vary the
            # training only, so model A's seed s and model B's seed s are a pair.
            per_seed[corruption][DISPLAY_NAMES[name]] = [evaluate_model(
                r.model, test, num_classes=num_classes, conditions="six+full", device=dev, corruption=corruption,
                noise_steps=noise_steps, seed=seed, with_per_class=True) for r in results]
    tables: dict[str, dict[str, Any]] = {c: {} for c in per_seed}
    spreads: dict[str, dict[str, Any]] = {c: {} for c in per_seed}
    for corruption, by_model in per_seed.items():
        for display, metrics in by_model.items():
            tables[corruption][display], spreads[corruption][display] = aggregate_metrics(metrics)
    orderings = {c: pairwise_orderings({d: [m["average"]["UA"] for m in ms] for d, ms in by_model.items()})
                 for c, by_model in per_seed.items() if len(seeds) > 1 and len(by_model) > 1}

    figures = {}
    if runs:
        report.write_table_csv(out_dir / "results.csv", tables["zero"])
        report.write_table_csv(out_dir / "results_noisy.csv", tables["gaussian"])
        for corruption, stem in (("zero", "results_per_seed.csv"), ("gaussian", "results_noisy_per_seed.csv")):
            rows = {f"{d} seed {s}": m for d, ms in per_seed[corruption].items() for s, m in zip(seeds, ms)}
            rows.update({f"{d} std": spreads[corruption][d] for d in per_seed[corruption]})
            report.write_table_csv(out_dir / stem, rows, metrics=("WA", "UA", "F1"))
        report.plot_ua_per_condition(out_dir / "ua_per_condition.png", tables["zero"],
                                     title=f"UA per missing-modality condition, mean over {len(seeds)} seeds")
        figures[f"UA per missing condition (missing = zeroed), mean over {len(seeds)} seeds"] = "ua_per_condition.png"
        report.plot_seed_spread(out_dir / "ua_seed_spread.png",
                                {c: {d: [m["average"]["UA"] for m in ms] for d, ms in by_model.items()}
                                 for c, by_model in (("missing = zeroed", per_seed["zero"]),
                                                     ("missing = noisy", per_seed["gaussian"]))},
                                metric="average UA over the six conditions")
        figures[f"Average UA of each seed (points) and their mean (bar), {len(seeds)} seeds"] = "ua_seed_spread.png"
        for name in runs:
            display = DISPLAY_NAMES[name]
            summed = _summed_confusion(per_seed["zero"][display])
            report.plot_confusion_matrices(out_dir / f"confusion_{name}.png", summed, test.class_names,
                                           title=f"{display}: test confusion summed over {len(seeds)} seeds "
                                                 "(missing = zeroed; rows: true class)")
            figures[f"{display}: confusion per condition, normalised by true class"] = f"confusion_{name}.png"
    if "mmin" in trained:
        emb = collect_embeddings(trained["mmin"].model, test, device=dev, seed=seed)
        report.plot_embedding_projection(out_dir / "mmin_embeddings.png", emb["imagined"], emb["target"],
                                         emb["label"], test.class_names, seed=seed)
        figures[f"MMIN (seed {seed}): imagined vs real joint embeddings (t-SNE)"] = "mmin_embeddings.png"
    dialogue = _mmgcn_section(plan, out_dir, seed=seed, device=device, progress=progress, log=log) \
        if "mmgcn" in models else None
    if dialogue is not None:
        timings["mmgcn"] = dialogue["seconds"]
    sequences = _imder_section(plan, out_dir, seed=seed, device=device, progress=progress, log=log) \
        if "imder" in models else None
    if sequences is not None:
        timings["imder"] = sequences["seconds"]
        figures.update(sequences["figures"])

    avg_ua = {name: tables["zero"][DISPLAY_NAMES[name]]["average"]["UA"] for name in trained}
    elapsed = time.perf_counter() - started
    payload = {
        "seed": seed, "quick": quick, "epochs": plan.stage_epochs, "data_options": plan.data_options,
        "dialogues": dialogue, "imder": sequences,
        "sizes": {k: len(v) for k, v in splits.items()}, "dims": list(test.dims), "noise_steps": noise_steps,
        "seconds": {**timings, "total": elapsed}, "tables": tables, "condition_labels": list(CONDITION_LABELS),
        "seeds": seeds, "tables_std": spreads, "tables_per_seed": per_seed, "orderings": orderings,
        "stages": {name: [[{"name": s.name, "best_epoch": s.best_epoch, "seconds": s.seconds} for s in r.stages]
                          for r in results] for name, results in runs.items()},
    }
    report.write_results_json(out_dir / "results.json", payload, seeds=seeds)
    hypothesis = _hypothesis(avg_ua, orderings.get("zero"), len(seeds))
    if quick:
        hypothesis = (f"**Quick smoke run** (1 epoch per stage, a few hundred utterances, {len(seeds)} seeds): it "
                      "checks that the pipeline "
                      "works end to end; its numbers are not a result. " + hypothesis)
    extra = {}
    if trained:
        noisy = f"missing = noisy (NMER's protocol: Gaussian noise, intensity T = {noise_steps})"
        extra[f"Mean ± std over {len(seeds)} seeds"] = (
            f"Seeds {', '.join(map(str, seeds))} on the same data (they vary the weights, the data order and the "
            "training noise); the sample std (ddof = 1) over the seeds; WA / UA / macro-F1 in percent.\n\n"
            "Missing = zeroed (MMIN's protocol):\n\n"
            + report.markdown_mean_std_table({d: (tables["zero"][d], spreads["zero"][d]) for d in tables["zero"]})
            + f"\nThe {noisy}:\n\n"
            + report.markdown_mean_std_table({d: (tables["gaussian"][d], spreads["gaussian"][d])
                                              for d in tables["gaussian"]}))
        if orderings:
            extra["Which orderings are significant"] = (
                f"Average UA over the six missing conditions, every pair of models compared seed by seed (paired "
                f"t-test, `scipy.stats.ttest_rel`, two-sided, {len(seeds) - 1} degrees of freedom); an ordering is "
                f"called significant at p < {ALPHA:g}. A difference that is not significant is a tie on this run, "
                "whatever the order of the means.\n\nMissing = zeroed:\n\n" + markdown_orderings(orderings["zero"])
                + "\nMissing = noisy:\n\n" + markdown_orderings(orderings["gaussian"]))
        extra[f"Mean over seeds, {noisy}"] = report.markdown_table(tables["gaussian"])
    if dialogue is not None:
        extra["MMGCN on synthetic dialogues"] = dialogue["markdown"]
    if sequences is not None:
        extra["IMDer on synthetic MOSI-like sequences: the missing-rate sweep"] = sequences["markdown"]
    extra.update({
        "Timings": "\n".join(f"- {DISPLAY_NAMES.get(k, k)}: {v:.0f} s" for k, v in payload["seconds"].items()),
    })
    report.write_report_md(
        out_dir / "report.md",
        title="mmer_ext demo: missing-modality emotion recognition on the embedded synthetic data",
        results=tables["zero"],
        seeds=seeds,
        config={"epochs per stage": {m: plan.stage_epochs[m] for m in models}, "data": plan.data_options,
                "dialogue data": plan.dialogue_options,
                "sizes": payload["sizes"], "dims (A, V, L)": list(test.dims), "device": str(dev)},
        hypothesis_text=hypothesis,
        figures=figures,
        extra_sections=extra,
    )
    if trained:
        log(report.format_mean_std_table({d: (tables["zero"][d], spreads["zero"][d]) for d in tables["zero"]},
                                         metrics=("UA",)))
        log(hypothesis.replace("**", ""))
    if dialogue is not None:
        log(report.format_table({"MMGCN": dialogue["metrics"]}, metrics=("WA", "UA", "WF1")))
    if sequences is not None:
        log(report.format_missing_rate_table({"IMDer": sequences["metrics"]}))
    log(f"wrote {out_dir / 'report.md'} ({elapsed:.0f} s in all)")
    return payload
