"""A plain timing ``benchmark`` fixture for benchmarks/ where pytest-benchmark is not installed.

The GPU machine's image cannot be changed; if it ever lacks pytest-benchmark, tools/gpu_check.py loads this plugin
(``-p gpu_check_bench_shim``) so the same harness (benchmarks/conftest.py: warm-up, correctness guard, rounds, ratio
table, bandwidth) still runs. It provides only what that harness uses: ``benchmark.pedantic``, ``.group`` (from the
``benchmark`` marker), ``.extra_info``, ``.disabled``, ``.stats.stats.median`` / ``.iqr``, and the options
``--benchmark-disable``, ``--benchmark-max-time``, ``--benchmark-min-rounds``. Every round is timed with
``time.perf_counter``; the benchmark bodies synchronise the device themselves.
"""

from __future__ import annotations

import statistics
import time
from types import SimpleNamespace

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("benchmark (plain timing shim of tools/gpu_check_bench_shim.py)")
    group.addoption("--benchmark-disable", action="store_true", default=False)
    group.addoption("--benchmark-max-time", type=float, default=1.0)
    group.addoption("--benchmark-min-rounds", type=int, default=5)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "benchmark(group=None): benchmark group (plain timing shim)")


class PlainBenchmark:
    def __init__(self, group: str | None, disabled: bool) -> None:
        self.group = group
        self.disabled = disabled
        self.extra_info: dict = {}
        self.stats = None

    def pedantic(self, target, args=(), kwargs=None, rounds=1, iterations=1, warmup_rounds=0):
        kwargs = kwargs or {}
        for _ in range(warmup_rounds):
            target(*args, **kwargs)
        if self.disabled:
            return target(*args, **kwargs)
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(iterations):
                result = target(*args, **kwargs)
            times.append((time.perf_counter() - t0) / iterations)
        q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
        self.stats = SimpleNamespace(stats=SimpleNamespace(median=statistics.median(times), iqr=q3 - q1))
        return result


@pytest.fixture
def benchmark(request: pytest.FixtureRequest) -> PlainBenchmark:
    marker = request.node.get_closest_marker("benchmark")
    return PlainBenchmark(marker.kwargs.get("group") if marker else None, request.config.getoption("benchmark_disable"))
