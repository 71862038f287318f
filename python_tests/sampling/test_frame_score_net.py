"""IMDer's default score model, :class:`~mmer_ext.models.score_net.FrameScoreNet`, on the analytic conditional
problem laid out as sequences (issue 11): ``JointGaussian``'s ``[n, K, 2]`` pairs become ``[n, 2, K]`` sequences
(2 channels, K = 16 steps), so each step's target depends on the condition at the same step only -- the structure the
frame net assumes. Trained with :func:`~mmer_ext.models.score_net.dsm_loss` (clean condition, float32, a few seconds
on one core) its samples must have the known conditional mean and spread; with the condition zeroed it must not
follow the condition (so the condition path is what carries the information)."""

from __future__ import annotations

import pytest
import torch

from mmer_ext.models.score_net import FrameScoreNet, dsm_loss
from mmer_ext.sampling import sample
from sampling_problems import JointGaussian

PROBLEM = JointGaussian(dtype=torch.float32)
TRAIN_STEPS = 600


def _seq(a: torch.Tensor) -> torch.Tensor:
    return a.transpose(1, 2).contiguous()  # [n, K, 2] -> [n, 2, K]


def _train(zero_cond: bool, seed: int = 0) -> FrameScoreNet:
    torch.manual_seed(seed)
    net = FrameScoreNet(2, 2, hidden=64, depth=2, cond_window=1, embed_dim=32)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=TRAIN_STEPS, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(TRAIN_STEPS):
        x, c = PROBLEM.draw(32, g)  # 512 pairs a step
        c = torch.zeros_like(c) if zero_cond else c
        loss = dsm_loss(net, _seq(x), _seq(c), 25.0, generator=g, condition_noise="clean")
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


@pytest.fixture(scope="module")
def nets():
    return {"cond": _train(False), "zeroed": _train(True)}


def _draw(net, name, steps, options, zero_cond=False, n=500, seed=5):
    g = torch.Generator().manual_seed(seed)
    _, c = PROBLEM.draw(n, g)
    with torch.no_grad():
        y = sample(name, net, torch.zeros_like(_seq(c)) if zero_cond else _seq(c), steps=steps,
                   condition_noise="clean", generator=g, **options)
    return _seq(y), c  # back to [n, K, 2]


# Samplers from IMDer's own start N(0, std(1)^2) (not the exact start of test_conditional_gaussian), as IMDer runs
# them. Measured (seed 0; 600 / 1500 training steps): coefficient errors EM 0.024 / 0.011, DDIM-10 0.043 / 0.041,
# ODE-Heun-10 0.042 / 0.027; slopes 0.95-1.03. The spread comes out too narrow: relative covariance error EM 0.40 /
# 0.27 and DDIM-10 0.27 / 0.36 (variances ~20-40 % low), and ODE-Heun-10 collapses it (0.92-0.98, variances
# ~0.01 for 0.3-0.4): a deterministic 10-step flow from the prior does not keep the learnt score's spread. So the
# mean is checked tightly for all three, the spread loosely for the stochastic two only.
SAMPLERS = [("em", 100, {}), ("ode-heun", 10, {}), ("ddim", 10, {})]
COEF_TOL, BETA_TOL, COV_TOL = 0.08, 0.08, 0.5


@pytest.mark.parametrize("name, steps, options", SAMPLERS, ids=[s[0] for s in SAMPLERS])
def test_frame_net_samples_the_conditional(nets, name, steps, options):
    y, c = _draw(nets["cond"], name, steps, options)
    coef, cov, beta = PROBLEM.fit(y, c)
    coef_err = float((coef - PROBLEM.true_coef).abs().max())
    cov_err = float(torch.linalg.norm(cov - PROBLEM.Se) / torch.linalg.norm(PROBLEM.Se))
    assert coef_err < COEF_TOL and abs(beta - 1) < BETA_TOL, (coef, beta)
    if name != "ode-heun":
        assert cov_err < COV_TOL, cov


def test_zeroed_condition_loses_the_conditional(nets):
    # Trained and sampled with the condition zeroed, the samples cannot follow c: slope on the true conditional
    # mean ~0 (the marginal is still matched, so the spread is the marginal's, far wider than Se).
    y, c = _draw(nets["zeroed"], "em", 100, {}, zero_cond=True)
    _, cov, beta = PROBLEM.fit(y, c)
    assert abs(beta) < 0.15 and float(torch.linalg.norm(cov - PROBLEM.Se) / torch.linalg.norm(PROBLEM.Se)) > 0.5


def test_frame_net_checks_its_inputs():
    net = FrameScoreNet(4, 3, hidden=8, depth=1, cond_window=3, embed_dim=8)
    x, c = torch.randn(2, 4, 6), torch.randn(2, 3, 6)
    assert net(x, torch.rand(2), c).shape == (2, 4, 6)
    assert net(x, 0.5, None).shape == (2, 4, 6)
    with pytest.raises(ValueError, match="cond must be"):
        net(x, torch.rand(2), torch.randn(2, 4, 6))
    with pytest.raises(ValueError, match="x must be"):
        net(torch.randn(2, 5, 6), torch.rand(2), c)
    with pytest.raises(ValueError, match="t must be"):
        net(x, torch.rand(3), c)
    with pytest.raises(ValueError, match="cond_window"):
        FrameScoreNet(4, 3, cond_window=2)
    with pytest.raises(ValueError, match="sigma"):
        FrameScoreNet(4, 3, sigma=1.0)


def test_frame_net_is_local_in_time():
    # A step's score reads the condition within the window only and x at that step only.
    torch.manual_seed(0)
    net = FrameScoreNet(3, 3, hidden=16, depth=1, cond_window=3, embed_dim=8).eval()
    x, c = torch.randn(1, 3, 9, requires_grad=True), torch.randn(1, 3, 9, requires_grad=True)
    net(x, torch.tensor([0.5]), c)[0, :, 4].sum().backward()
    assert torch.count_nonzero(x.grad[0].abs().sum(0)).item() == 1 and x.grad[0, :, 4].abs().sum() > 0
    touched = torch.nonzero(c.grad[0].abs().sum(0)).flatten().tolist()
    assert touched == [3, 4, 5]
