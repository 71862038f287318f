"""IMDer's missing-rate protocol: the miss_2 / miss_1 table, the MR = 0 fix, exact per-sample counts, the authors'
per-batch layout, at least one modality per row, realised rates, and determinism."""

from __future__ import annotations

import math

import pytest
import torch

from mmer_ext.data import (
    MISSING_RATES,
    MR_PROTOCOLS,
    authors_batch_counts,
    missing_rate_fractions,
    missing_rate_patterns,
    realized_missing_rate,
)

TABLE = {0.0: (0.0, 0.0), 0.1: (0.1, 0.1), 0.2: (0.2, 0.2), 0.3: (0.3, 0.3), 0.4: (0.5, 0.2), 0.5: (0.7, 0.1),
         0.6: (0.9, 0.0), 0.7: (1.0, 0.0)}


def _half_up(x: float) -> int:
    return math.floor(round(x, 9) + 0.5)


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_table_and_identity():
    assert MISSING_RATES == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7) and MR_PROTOCOLS == ("per-sample", "per-batch")
    for mr in MISSING_RATES:
        a, b = missing_rate_fractions(mr)
        assert (a, b) == TABLE[mr]
        assert a + b <= 1.0
        if mr == 0.7:
            assert 2 * a + b == pytest.approx(2.0)  # capped: 3 * 0.7 = 2.1 would need a sample missing all three
        else:
            assert 2 * a + b == pytest.approx(3 * mr)
    # The authors' MR = 0 would read index -1 (all batches miss two); here it is complete data.
    assert missing_rate_fractions(0) == (0.0, 0.0)
    assert missing_rate_fractions(0.30000000000000004) == (0.3, 0.3)


@pytest.mark.parametrize("bad", [0.15, 0.8, -0.1, 1.0, float("nan"), "x", None])
def test_bad_rates(bad):
    with pytest.raises(ValueError, match="mr must be one of"):
        missing_rate_fractions(bad)
    with pytest.raises(ValueError, match="mr must be one of"):
        missing_rate_patterns(10, bad)


@pytest.mark.parametrize("n", [0, 1, 7, 10, 101, 1000])
@pytest.mark.parametrize("mr", MISSING_RATES)
def test_per_sample_exact_counts(n, mr):
    m = missing_rate_patterns(n, mr, generator=_g(0))
    assert m.dtype == torch.int64 and m.shape == (n, 3)
    assert bool(((m == 0) | (m == 1)).all())
    present = m.sum(1)
    assert bool((present >= 1).all())
    a, b = TABLE[mr]
    n2 = _half_up(a * n)
    n1 = min(_half_up(b * n), n - n2)
    assert int((present == 1).sum()) == n2 and int((present == 2).sum()) == n1
    if n == 1000:
        assert realized_missing_rate(m) == pytest.approx((2 * a + b) / 3)


def test_per_sample_shuffled_and_uniform():
    m = missing_rate_patterns(30000, 0.3, generator=_g(1))
    present = m.sum(1)
    # Shuffled positions: not all the two-missing rows at the start.
    assert 0.2 < float((present[:3000] == 1).float().mean()) < 0.4
    # Every modality is dropped about equally often, among the rows missing one and those missing two.
    for k in (1, 2):
        rows = m[present == k]
        frac = (1 - rows).sum(0).float() / (1 - rows).sum()
        assert torch.allclose(frac, torch.full((3,), 1 / 3), atol=0.02), (k, frac)


@pytest.mark.parametrize("mr", MISSING_RATES)
def test_per_batch_layout(mr):
    n, bs = 100, 8
    nb = 13  # ceil(100 / 8); the last batch has 4 items
    m = missing_rate_patterns(n, mr, protocol="per-batch", batch_size=bs, generator=_g(2))
    assert m.shape == (n, 3) and bool((m.sum(1) >= 1).all())
    a, b = TABLE[mr]
    # the authors count 13 batches as N = round(1.3) * 10 = 10: batch k misses two while k / 10 < a
    n2 = min(nb, math.ceil(a * 10 - 1e-9))
    n1 = min(nb - n2, math.ceil(b * 10 - 1e-9))
    assert authors_batch_counts(nb, mr) == (n2, n1)
    for k in range(nb):
        rows = m[k * bs:(k + 1) * bs]
        assert bool((rows == rows[0]).all())  # the whole batch shares one pattern
        want = 1 if k < n2 else 2 if k < n2 + n1 else 3
        assert int(rows[0].sum()) == want, (k, rows[0])
    expect = (2 * (n2 * bs) + n1 * bs) if n2 + n1 < nb else None
    if expect is not None:
        assert realized_missing_rate(m) == pytest.approx(expect / (3 * n))


def test_per_batch_realised_rate_follows_batches():
    # With many batches the realised rate is close to the table's; with few it is set by the batch rounding.
    for mr in MISSING_RATES:
        a, b = TABLE[mr]
        m = missing_rate_patterns(3200, mr, protocol="per-batch", batch_size=32, generator=_g(3))
        assert realized_missing_rate(m) == pytest.approx((2 * a + b) / 3)
    m = missing_rate_patterns(9 * 4, 0.1, protocol="per-batch", batch_size=4, generator=_g(3))
    # round(0.9) = 1 batch of 4 misses two modalities and round(0.9) = 1 batch misses one: 12 / 108, not 0.1.
    assert realized_missing_rate(m) == pytest.approx((2 * 4 + 4) / (3 * 36))


def _authors_loop(num_batches, mr):
    """The authors' training loop, batch by batch (trains/singleTask/IMDER.py: numpy's round, float comparisons)."""
    import numpy as np

    miss_2 = [0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0]
    miss_1 = [0.1, 0.2, 0.3, 0.2, 0.1, 0.0, 0.0]
    denom = np.round(num_batches / 10) * 10
    two = one = 0
    for _ in range(num_batches):
        if two / denom < miss_2[int(mr * 10 - 1)]:
            two += 1
        elif one / denom < miss_1[int(mr * 10 - 1)]:
            one += 1
    return two, one


@pytest.mark.parametrize("num_batches", [6, 9, 13, 15, 22, 25, 35, 37, 100, 101])
@pytest.mark.parametrize("mr", MISSING_RATES[1:])
def test_authors_batch_counts_match_their_loop(num_batches, mr):
    assert authors_batch_counts(num_batches, mr) == _authors_loop(num_batches, mr)


def test_authors_batch_counts_on_mosi_and_mosei():
    # MOSI test: 686 rows in batches of 32 -> 22 batches, counted as 20: at MR 0.7 two batches stay complete.
    assert authors_batch_counts(22, 0.7) == (20, 0)
    assert authors_batch_counts(22, 0.1) == (2, 2)
    # MOSEI test: 4659 rows in batches of 128 -> 37 batches, counted as 40.
    assert authors_batch_counts(37, 0.5) == (28, 4)
    assert authors_batch_counts(37, 0.7) == (37, 0)
    # numpy / Python round half to even: 25 batches count as 20, 35 as 40 (round-half-up on 25 would give 8 at 0.3)
    assert authors_batch_counts(25, 0.3) == (6, 6)
    assert authors_batch_counts(35, 0.3) == (12, 12)
    # up to 5 batches N would be 0 (round(0.5) = 0; the authors' loop then divides by zero): the actual count is used
    assert authors_batch_counts(4, 0.5) == (3, 1) and authors_batch_counts(5, 0.5) == (4, 1)
    assert authors_batch_counts(0, 0.5) == (0, 0)
    assert authors_batch_counts(22, 0.0) == (0, 0)
    m = missing_rate_patterns(686, 0.7, protocol="per-batch", batch_size=32, generator=_g(0))
    kept = m.sum(1)
    assert bool((kept[:20 * 32] == 1).all()) and bool((kept[20 * 32:] == 3).all())
    with pytest.raises(ValueError, match="num_batches"):
        authors_batch_counts(-1, 0.3)
    with pytest.raises(ValueError, match="mr must be one of"):
        authors_batch_counts(10, 0.25)


def test_per_batch_arguments():
    for bs in (None, 0, -3, 2.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            missing_rate_patterns(10, 0.3, protocol="per-batch", batch_size=bs)
    with pytest.raises(ValueError, match="protocol"):
        missing_rate_patterns(10, 0.3, protocol="per-epoch")
    with pytest.raises(ValueError, match="num_items"):
        missing_rate_patterns(-1, 0.3)
    assert missing_rate_patterns(0, 0.5, protocol="per-batch", batch_size=4).shape == (0, 3)
    # batch_size is not needed (and ignored) per sample
    assert missing_rate_patterns(10, 0.3, batch_size=4, generator=_g(0)).equal(
        missing_rate_patterns(10, 0.3, generator=_g(0)))


@pytest.mark.parametrize("protocol", MR_PROTOCOLS)
def test_deterministic_per_seed(protocol):
    kw = dict(protocol=protocol, batch_size=4)
    a = missing_rate_patterns(200, 0.5, generator=_g(7), **kw)
    b = missing_rate_patterns(200, 0.5, generator=_g(7), **kw)
    c = missing_rate_patterns(200, 0.5, generator=_g(8), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(0)
    d = missing_rate_patterns(200, 0.5, **kw)
    torch.manual_seed(0)
    assert torch.equal(d, missing_rate_patterns(200, 0.5, **kw))


def test_complete_at_zero_and_realized_rate():
    assert missing_rate_patterns(50, 0.0, generator=_g(0)).eq(1).all()
    assert missing_rate_patterns(50, 0.0, protocol="per-batch", batch_size=8).eq(1).all()
    assert realized_missing_rate(torch.tensor([[1, 0, 0], [1, 1, 1], [0, 1, 1]])) == pytest.approx(3 / 9)
    assert realized_missing_rate(torch.zeros(0, 3, dtype=torch.int64)) == 0.0
    with pytest.raises(ValueError, match="\\[N, 3\\]"):
        realized_missing_rate(torch.ones(4))
