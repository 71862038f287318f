"""Recovery of a missing modality by IMDer and by the baselines it has to beat, on the same rows: zeros, the
training mean, a ridge regressor from the same condition, and any sampler; with the scores of a recovery (Pearson
and cosine with the truth, MSE, RBF-kernel MMD and Frechet distance to the real features) and its downstream
metrics, raw and after IMDer's refiner. Used by ``benchmarks/imder_recovery.py`` and the demo's IMDer section."""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch

from mmer_ext.metrics import regression_metrics
from mmer_ext.models import IMDer
from mmer_ext.models.base import DATA_ORDER
from mmer_ext.seeding import derive_seed
from mmer_ext.train.evaluation import MR_KEY, missing_rate_batches
from mmer_ext.train.views import views_for

__all__ = ["BASELINES", "RidgeRecovery", "cosine", "evaluate_fills", "example_recoveries", "frames", "frechet",
           "mmd_rbf", "network_calls", "parse_sampler", "pearson", "projections", "recovery_scores"]

BASELINES = ("zero", "mean", "ridge")
WINDOW = 5  # condition steps (centred) the ridge regressor reads for each step


def parse_sampler(spec: str) -> tuple[str, int, dict[str, Any]]:
    """``NAME:STEPS[:OPTION...]`` -> ``(name, steps, options)``; an option is ``key=value`` (``eta``, ``snr``,
    ``eps``: numbers; ``schedule``, ``corrector_steps``) or a bare schedule name: ``"ddim:10:eta=0.5"`` ->
    ``("ddim", 10, {"eta": 0.5})``, ``"ddim:10:karras"`` -> ``("ddim", 10, {"schedule": "karras"})``."""
    parts = spec.split(":")
    if len(parts) < 2 or not parts[1].isdigit():
        raise ValueError(f"sampler spec {spec!r} must be NAME:STEPS[:key=value...] (e.g. ddim:10:eta=0.5)")
    options: dict[str, Any] = {}
    for part in parts[2:]:
        key, sep, value = part.partition("=")
        if not sep:
            key, value = "schedule", part
        if key == "schedule":
            options[key] = value
        elif key == "corrector_steps":
            options[key] = int(value)
        elif key in ("eta", "snr", "eps"):
            options[key] = float(value)
        else:
            raise ValueError(f"sampler spec {spec!r}: unknown option {key!r} (eta, snr, eps, schedule, "
                             "corrector_steps)")
    return parts[0], int(parts[1]), options


def network_calls(spec: str) -> int:
    """Score-network evaluations of one sampler run (PC: predictor + corrector per step; Heun: two but the last)."""
    name, steps, options = parse_sampler(spec)
    return {"pc": (1 + options.get("corrector_steps", 1)) * steps, "ode-heun": 2 * steps - 1}.get(name, steps)


# ---------------------------------------------------------------------------------------------- metrics
def frames(x: torch.Tensor) -> torch.Tensor:
    """``[n, d, L] -> [n * L, d]``: the per-step feature vectors."""
    return x.transpose(1, 2).reshape(-1, x.shape[1]).double()


def pearson(rec: torch.Tensor, target: torch.Tensor, mean: torch.Tensor) -> float:
    a, b = (rec.double() - mean).flatten(), (target.double() - mean).flatten()
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else 0.0


def cosine(rec: torch.Tensor, target: torch.Tensor) -> float:
    a, b = rec.double().flatten(1), target.double().flatten(1)
    den = a.norm(dim=1) * b.norm(dim=1)
    return float(torch.where(den > 0, (a * b).sum(1) / den.clamp_min(1e-300), torch.zeros_like(den)).mean())


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, bandwidth: float) -> float:
    """Unbiased MMD^2 between two sets of vectors with the kernel ``exp(-|a - b|^2 / (2 h^2))``."""
    def k(a, b):
        return torch.exp(-torch.cdist(a, b).pow(2) / (2 * bandwidth**2))

    n, m = x.shape[0], y.shape[0]
    kxx, kyy = k(x, x), k(y, y)
    return float((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
                 - 2 * k(x, y).mean())


def frechet(x: torch.Tensor, y: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two sets of vectors (FID's formula)."""
    from scipy import linalg

    mx, my = x.mean(0).numpy(), y.mean(0).numpy()
    cx, cy = np.cov(x.numpy(), rowvar=False), np.cov(y.numpy(), rowvar=False)
    root = linalg.sqrtm(cx @ cy)
    root = root.real if np.iscomplexobj(root) else root
    return float(((mx - my) ** 2).sum() + np.trace(cx + cy - 2 * root))


def recovery_scores(rec: torch.Tensor, target: torch.Tensor, mean: torch.Tensor, *, bandwidth: float,
                    max_frames: int, seed: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    fr, ft = frames(rec), frames(target)
    pick = torch.randperm(fr.shape[0], generator=g)[:max_frames]
    return {"pearson": pearson(rec, target, mean), "cosine": cosine(rec, target),
            "MSE": float((rec.double() - target.double()).pow(2).mean()),
            "MMD": mmd_rbf(fr[pick], ft[pick], bandwidth), "FD": frechet(fr, ft),
            "std_ratio": float((rec.double() - mean).std() / (target.double() - mean).std())}


# ---------------------------------------------------------------------------------------------- data helpers
def batches(dataset, batch_size: int, *, shuffle_gen: torch.Generator | None = None):
    from torch.utils.data import DataLoader

    views = views_for(dataset)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle_gen is not None, generator=shuffle_gen,
                        collate_fn=views.collate)
    yield from loader


def endless(dataset, batch_size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield from batches(dataset, batch_size, shuffle_gen=g)


@torch.no_grad()
def projections(model: IMDer, dataset) -> dict[str, torch.Tensor]:
    model.eval()
    out = {m: [] for m in DATA_ORDER}
    for batch in batches(dataset, 64):
        for m in DATA_ORDER:
            out[m].append(model.project(batch[m], m))
    return {m: torch.cat(v) for m, v in out.items()}


def condition_kinds(present: torch.Tensor, m: str) -> torch.Tensor:
    """For the rows missing ``m`` (ascending): 0 = first other modality only, 1 = second only, 2 = both."""
    j = DATA_ORDER.index(m)
    rows = torch.nonzero(~present[:, j]).flatten()
    o1, o2 = (DATA_ORDER.index(o) for o in DATA_ORDER if o != m)
    has1, has2 = present[rows, o1], present[rows, o2]
    return torch.where(has1 & has2, 2, torch.where(has1, 0, 1))


def window_features(cond: torch.Tensor) -> torch.Tensor:
    """``[n, d, L] -> [n * L, WINDOW * d + 1]``: each step's condition window (edges repeated) and a constant."""
    half = WINDOW // 2
    pad = torch.nn.functional.pad(cond.double(), (half, half), mode="replicate")
    cols = [pad[:, :, i:i + cond.shape[2]] for i in range(WINDOW)]
    f = torch.cat(cols, 1).transpose(1, 2).reshape(-1, WINDOW * cond.shape[1])
    return torch.cat([f, torch.ones(f.shape[0], 1, dtype=f.dtype)], 1)


class RidgeRecovery:
    """Per modality and condition kind, a ridge map from the condition window to the step's features."""

    def __init__(self, model: IMDer, train, val, alphas=(0.1, 1.0, 10.0, 100.0, 1000.0)):
        self.model = model
        ptr, pva = projections(model, train), projections(model, val)
        self.weights: dict[tuple[str, int], torch.Tensor] = {}
        self.alpha: dict[str, float] = {}
        for m in DATA_ORDER:
            for kind in range(3):
                xtr, ytr = window_features(self._cond(ptr, m, kind)), frames(ptr[m])
                xva, yva = window_features(self._cond(pva, m, kind)), frames(pva[m])
                gram, rhs = xtr.T @ xtr, xtr.T @ ytr
                best = None
                for a in alphas:
                    reg = a * torch.eye(gram.shape[0], dtype=gram.dtype)
                    reg[-1, -1] = 0.0  # the intercept is not shrunk
                    w = torch.linalg.solve(gram + reg, rhs)
                    err = float((xva @ w - yva).pow(2).mean())
                    if best is None or err < best[0]:
                        best = (err, a, w)
                self.weights[(m, kind)] = best[2]
                self.alpha[f"{m}{kind}"] = best[1]

    @torch.no_grad()
    def _cond(self, proj: dict[str, torch.Tensor], m: str, kind: int) -> torch.Tensor:
        n = proj[m].shape[0]
        present = torch.ones(n, 3, dtype=torch.bool)
        present[:, DATA_ORDER.index(m)] = False
        o1, o2 = (DATA_ORDER.index(o) for o in DATA_ORDER if o != m)
        if kind == 0:
            present[:, o2] = False
        elif kind == 1:
            present[:, o1] = False
        return self.model._condition(proj, present, m)[1]

    def predict(self, m: str, cond: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
        out = torch.empty(cond.shape[0], cond.shape[2], cond.shape[1], dtype=torch.float64)
        for kind in range(3):
            sel = torch.nonzero(kinds == kind).flatten()
            if sel.numel():
                f = window_features(cond[sel])
                out[sel] = (f @ self.weights[(m, kind)]).reshape(sel.numel(), cond.shape[2], cond.shape[1])
        return out.transpose(1, 2).to(cond.dtype)



# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_fills(model: IMDer, test, *, fills: dict[str, Any], ridge: RidgeRecovery,
                   train_mean: dict[str, torch.Tensor], seed: int, rates, batch_size: int,
                   log: Callable[[str], None], max_frames: int, train=None) -> dict[str, Any]:
    """Every fill on the same rows and patterns: recovery scores per modality (pooled over the rates) and
    downstream metrics per rate, raw and refined."""
    device = torch.device("cpu")
    real = projections(model, test)
    bandwidth = {m: float(torch.cdist(frames(real[m])[:1000], frames(real[m])[:1000]).median()) for m in DATA_ORDER}
    results: dict[str, Any] = {}
    for label, spec in fills.items():
        t0 = time.perf_counter()
        store = {mode: {m: ([], []) for m in DATA_ORDER} for mode in ("raw", "refined")}
        down = {mode: {} for mode in ("raw", "refined")}
        if spec not in BASELINES:
            name, steps, options = parse_sampler(spec)
            model.set_sampler(name, steps, **options)
        for mr in rates:
            preds = {"raw": [], "refined": []}
            labels = []
            gen = torch.Generator().manual_seed(derive_seed(seed, mr, scheme="rate"))
            for batch in missing_rate_batches(test, mr=mr, protocol="per-sample", batch_size=batch_size,
                                              device=device, seed=seed):
                present = model.presence(batch)
                cache: dict[str, torch.Tensor] = {}

                def fill(m, cond, present=present, cache=cache):
                    if m not in cache:
                        if spec == "zero":
                            cache[m] = torch.zeros_like(cond)
                        elif spec == "mean":
                            cache[m] = train_mean[m].to(cond.dtype).expand_as(cond).clone()
                        elif spec == "ridge":
                            cache[m] = ridge.predict(m, cond, condition_kinds(present, m))
                        else:
                            cache[m] = model.sample_modality(m, cond, gen)
                    return cache[m]

                for mode in ("raw", "refined"):
                    pred, rec = model.predict_with_recovery(batch, fill=fill, refine=mode == "refined")
                    preds[mode].append(pred.reshape(-1))
                    for m, (r, t) in rec.items():
                        store[mode][m][0].append(r)
                        store[mode][m][1].append(t)
                labels.append(batch["label"])
            for mode in ("raw", "refined"):
                metrics = regression_metrics(torch.cat(labels), torch.cat(preds[mode]))
                down[mode][MR_KEY(mr)] = {k: metrics[k] for k in ("Acc2_non0", "MAE", "Corr", "F1_non0")}
        seconds = time.perf_counter() - t0
        rec_scores: dict[str, Any] = {}
        for mode in ("raw", "refined"):
            per = {}
            for m in DATA_ORDER:
                rs, ts = store[mode][m]
                if rs:
                    per[m] = recovery_scores(torch.cat(rs), torch.cat(ts), train_mean[m], bandwidth=bandwidth[m],
                                             max_frames=max_frames, seed=seed)
            per["average"] = {k: float(np.mean([per[m][k] for m in DATA_ORDER if m in per])) for k in per["A"]}
            rec_scores[mode] = per
        results[label] = {"seconds": seconds, "recovery": rec_scores, "downstream": down}
        log(f"  {label}: r raw {rec_scores['raw']['average']['pearson']:.3f} refined "
            f"{rec_scores['refined']['average']['pearson']:.3f}, MMD raw {rec_scores['raw']['average']['MMD']:.4f}, "
            f"MAE@0.5 refined {down['refined']['MR=0.5']['MAE'] if 'MR=0.5' in down['refined'] else float('nan'):.3f}"
            f" ({seconds:.0f} s)")
    # The floor of the distances: the real frames of the training split against the test split's.
    if train is not None:
        train_real = projections(model, train)
        results["_real_vs_real"] = {m: {"MMD": mmd_rbf(frames(train_real[m])[:max_frames],
                                                       frames(real[m])[:max_frames], bandwidth[m]),
                                        "FD": frechet(frames(train_real[m]), frames(real[m]))} for m in DATA_ORDER}
    return results



@torch.no_grad()
def example_recoveries(model: IMDer, test, ridge: RidgeRecovery, spec: str, seed: int, rows: int = 64) -> dict:
    """Modality V (or the first with frames) missing, conditioned on the other two: real, ridge and diffused
    features of the first ``rows`` test sequences (for heatmaps and the 2-D projection)."""
    sub = torch.utils.data.Subset(test, range(min(rows, len(test))))
    proj = projections(model, sub)
    n = proj["A"].shape[0]
    out = {}
    for m in DATA_ORDER:
        present = torch.ones(n, 3, dtype=torch.bool)
        present[:, DATA_ORDER.index(m)] = False
        _, cond = model._condition(proj, present, m)
        name, steps, opts = parse_sampler(spec)
        model.set_sampler(name, steps, **opts)
        diffused = model.sample_modality(m, cond, torch.Generator().manual_seed(seed))
        out[m] = {"real": proj[m], "ridge": ridge.predict(m, cond, torch.full((n,), 2)), "diffused": diffused,
                  "sampler": spec}
    return out
