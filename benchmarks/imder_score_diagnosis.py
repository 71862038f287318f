"""What limits IMDer's score networks on the embedded data? A fixed small protocol (issue 11).

Seed 0 of ``synthetic-mosi-small``: an IMDer (the recovery benchmark's ARCH) is pretrained for ``--pretrain-epochs``
on complete data; its frozen projections give the problem: recover modality ``--target``'s projected features
``[n, 32, L]`` from modality ``--cond``'s. Each variant trains one score net for ``--steps`` Adam steps (batch 64
sequences, lr 2e-3, clean condition, EMA 0.999 with the package's warm-up) and is scored on the test split by the
Pearson correlation (centred by the training mean of each channel x step, the benchmark's metric) of an EM-100 and a
DDIM-10 sample with the truth, and the samples' std ratio. The yardstick is the windowed ridge regressor on the same
pair (r; an exact posterior sample reaches r^2 when the regressor reaches the conditional mean).

    OMP_NUM_THREADS=1 python benchmarks/imder_score_diagnosis.py --variants unet frame --out /tmp/diag.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from imder_recovery import ARCH, train_task  # noqa: E402

from mmer_ext._atomic import atomic_write_text  # noqa: E402
from mmer_ext.data import load_dataset  # noqa: E402
from mmer_ext.models import IMDer  # noqa: E402
from mmer_ext.models.score_net import FrameScoreNet, ScoreNet, dsm_loss  # noqa: E402
from mmer_ext.sampling import sample  # noqa: E402
from mmer_ext.train.recovery import frames, pearson, projections, window_features  # noqa: E402


def ridge_r(ctr, xtr, cte, xte, mean, alphas=(0.1, 1.0, 10.0, 100.0, 1000.0)):
    a, y = window_features(ctr), frames(xtr)
    b = window_features(cte)
    best = None
    for alpha in alphas:  # chosen on the test split here: an upper bound for the yardstick, not a tuned result
        reg = alpha * torch.eye(a.shape[1], dtype=a.dtype)
        reg[-1, -1] = 0
        w = torch.linalg.solve(a.T @ a + reg, a.T @ y)
        pred = (b @ w).reshape(xte.shape[0], xte.shape[2], xte.shape[1]).transpose(1, 2)
        r = pearson(pred, xte, mean)
        best = r if best is None or r > best else best
    return best


def build(kind: str, d: int, sigma: float):
    if kind == "unet":
        return ScoreNet(d, None, d, widths=ARCH["score_channels"], embed_dim=ARCH["score_embed_dim"],
                        num_heads=ARCH["score_heads"], num_layers=ARCH["score_layers"], sigma=sigma,
                        cond_skip=ARCH["score_cond_skip"])
    return FrameScoreNet(d, d, sigma=sigma)


def run_variant(name, kind, sigma, zero_cond, data, steps, seed, log):
    xtr, ctr, xte, cte, mean = data
    torch.manual_seed(seed)
    net = build(kind, xtr.shape[1], sigma)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed + 1)
    t0 = time.perf_counter()
    curve = []
    for step in range(1, steps + 1):
        idx = torch.randint(0, xtr.shape[0], (64,), generator=g)
        c = torch.zeros_like(ctr[idx]) if zero_cond else ctr[idx]
        loss = dsm_loss(net, xtr[idx], c, sigma, generator=g, condition_noise="clean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            decay = min(0.999, step / (9.0 + step))
            torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1.0 - decay)
        if step % max(1, steps // 4) == 0 or step == steps:
            curve.append((step, evaluate(ema, sigma, zero_cond, cte, xte, mean, ("ddim:10",))["ddim:10"]))
            log(f"  {name} step {step}: loss {float(loss):.1f} ddim10 r {curve[-1][1]['r']:.3f} "
                f"({time.perf_counter() - t0:.0f} s)")
    seconds = time.perf_counter() - t0
    res = evaluate(ema, sigma, zero_cond, cte, xte, mean, ("em:100", "ddim:10"))
    return {"name": name, "kind": kind, "sigma": sigma, "zero_cond": zero_cond, "steps": steps,
            "train_seconds": seconds, "curve": curve, **res}


@torch.no_grad()
def evaluate(net, sigma, zero_cond, cte, xte, mean, specs):
    out = {}
    c = torch.zeros_like(cte) if zero_cond else cte
    for spec in specs:
        name, steps = spec.split(":")
        x = sample(name, net, c, steps=int(steps), sigma=sigma, condition_noise="clean",
                   generator=torch.Generator().manual_seed(5))
        out[spec] = {"r": pearson(x, xte, mean), "std_ratio": float((x.double() - mean).std() /
                                                                    (xte.double() - mean).std())}
    return out


VARIANTS = {  # name: (score net, sigma or "data" (max pairwise frame distance), condition zeroed)
    "unet": ("unet", 25.0, False),
    "unet-sigdata": ("unet", "seq", False),
    "frame": ("frame", 25.0, False),
    "frame-sigdata": ("frame", "data", False),
    "frame-sigdata-nocond": ("frame", "data", True),
    "unet-nocond": ("unet", 25.0, True),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--pretrain-epochs", type=int, default=2)
    p.add_argument("--target", default="L")
    p.add_argument("--cond", default="V")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default="/tmp/imder_diag_proj.pt")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    log = lambda s: print(s, flush=True)  # noqa: E731
    cache = Path(args.cache)
    if cache.exists():
        proj = torch.load(cache)
    else:
        torch.manual_seed(args.seed)
        splits = load_dataset("synthetic-mosi-small", seed=args.seed)
        pre = IMDer(splits["train"].dims, **ARCH)
        train_task(pre, splits["train"], epochs=args.pretrain_epochs, batch_size=32, lr=2e-3, seed=args.seed)
        proj = {k: projections(pre, splits[k]) for k in ("train", "test")}
        torch.save(proj, cache)
    xtr, ctr = proj["train"][args.target].float(), proj["train"][args.cond].float()
    xte, cte = proj["test"][args.target].float(), proj["test"][args.cond].float()
    mean = xtr.double().mean(0)
    fr = frames(xtr)
    sub = fr[torch.randperm(fr.shape[0], generator=torch.Generator().manual_seed(0))[:2000]]
    sig_frame = float(torch.cdist(sub, sub).max())
    seq = xtr.flatten(1).double()
    sig_seq = float(torch.cdist(seq, seq).max())
    r = ridge_r(ctr, xtr, cte, xte, mean)
    log(f"data: per-element std {float((xtr.double() - mean).std()):.3f}; max pairwise distance frames "
        f"{sig_frame:.1f}, sequences {sig_seq:.1f}; ridge r {r:.3f} (r^2 {r * r:.3f}, bar 0.8 r^2 {0.8 * r * r:.3f})")
    results = {"ridge_r": r, "max_pair_frame": sig_frame, "max_pair_seq": sig_seq, "variants": []}
    for name in args.variants:
        kind, sigma, zero = VARIANTS[name]
        sigma = sig_frame if sigma == "data" else sig_seq if sigma == "seq" else sigma
        res = run_variant(name, kind, sigma, zero, (xtr, ctr, xte, cte, mean), args.steps, args.seed, log)
        log(f"{name}: sigma {sigma:.1f} em100 r {res['em:100']['r']:.3f} (std x{res['em:100']['std_ratio']:.2f}) "
            f"ddim10 r {res['ddim:10']['r']:.3f} (std x{res['ddim:10']['std_ratio']:.2f}) "
            f"{res['train_seconds']:.0f} s")
        results["variants"].append(res)
        atomic_write_text(args.out, json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
