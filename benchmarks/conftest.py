"""pytest-benchmark harness for mmer_ext: collection of ``bench_*.py``, calibrated timing, the ratio report.

Run from the repository root with the installed package (the ``pytest`` executable, so the source tree's
``mmer_ext/`` does not shadow the installed one)::

    .venv/bin/pytest benchmarks                                # full run, prints the ratio table at the end
    .venv/bin/pytest benchmarks --quick                        # few rounds, for make demo (see below)
    .venv/bin/pytest benchmarks --benchmark-disable            # CI smoke test: every body once, no timings
    .venv/bin/pytest benchmarks --ratios-json benchmarks/results/cmd_h100.json   # also write the table as JSON

Configuration stays in the root ``pyproject.toml`` (so ``--strict-markers`` and friends apply here too): there
is deliberately no ``benchmarks/pytest.ini``, which would become the inifile for ``pytest benchmarks`` and drop
the root configuration. ``bench_*.py`` files are collected by :func:`pytest_collect_file` below instead of a
``python_files`` setting; ``pytest python_tests`` and a bare ``pytest`` (``testpaths = python_tests``) never load
this conftest.

Options (besides pytest-benchmark's own):

* ``--quick``: at most ~0.1 s of timed rounds per benchmark and at least 3 rounds (overrides
  ``--benchmark-max-time`` / ``--benchmark-min-rounds``). Also ``MMER_BENCH_QUICK=1``.
* ``--ratios-json PATH``: write the ratio table as JSON, and (timed runs) as markdown with the machine facts (host,
  CPU model, cores, torch version, load) to PATH with the suffix ``.md``. Also ``MMER_BENCH_RATIOS_JSON=PATH``.

The report ends with a summary: one row per benchmark group with ours' median and every ratio to it.

Rounds: each benchmark is timed with ``benchmark.pedantic`` after its own warm-up (which also triggers
``torch.compile``). The warm-up calls give an estimate ``t`` of one call; ``iterations = ceil(1 ms / t)`` (so very
fast calls are timed in batches above the timer's noise) and ``rounds = max(min_rounds, ceil(max_time / (t *
iterations)))``, capped at 2000, with ``max_time`` and ``min_rounds`` from ``--benchmark-max-time`` (1 s) and
``--benchmark-min-rounds`` (5).

On the 2-core CPU dev machine the full suite takes ~30-40 s and ``--quick`` ~20 s of wall time with a warm Inductor
cache (``/tmp/torchinductor_$USER``); a cold cache adds ~35 s of torch.compile (quick: ~55 s). Compile time is
reported per benchmark as "first call".

Contention: every benchmark records in ``extra_info["others_cpu_pct"]`` (column "others") the share of all CPUs
that other processes used while it was timed; above 10% the report ends with a warning that the timings are
distorted. On a shared 2-core machine one concurrent compile or test run can change a ratio several-fold.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

# Implementations in report order; the first is the one every ratio divides by.
BASELINE_IMPL = "ours"
IMPL_ORDER = ("ours", "eager", "compiled", "compiled-max-autotune")

_MIN_ROUND_S = 1e-3
_MAX_ROUNDS = 2000
_QUICK_MAX_TIME_S = 0.1
_QUICK_MIN_ROUNDS = 3

_RECORDS = pytest.StashKey[list]()
_SESSION_CPU = pytest.StashKey[object]()


# --------------------------------------------------------------------------------------------------------------
# Collection and options


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mmer_ext benchmarks")
    group.addoption(
        "--quick",
        action="store_true",
        default=os.environ.get("MMER_BENCH_QUICK", "") not in ("", "0"),
        help=f"few rounds (<= ~{_QUICK_MAX_TIME_S} s timed per benchmark, >= {_QUICK_MIN_ROUNDS} rounds): "
        "the whole suite in about a minute. Env: MMER_BENCH_QUICK=1.",
    )
    group.addoption(
        "--ratios-json",
        metavar="PATH",
        default=os.environ.get("MMER_BENCH_RATIOS_JSON") or None,
        help="write the ratio table (medians, ratios vs ours, bandwidth) as JSON to PATH. "
        "Env: MMER_BENCH_RATIOS_JSON.",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_RECORDS] = []
    config.stash[_SESSION_CPU] = _cpu_sample()


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    # bench_*.py are benchmark modules. A file named on the command line is already collected by pytest's python
    # plugin (initial paths bypass python_files), so leave those to it to avoid collecting it twice.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


# --------------------------------------------------------------------------------------------------------------
# Device helpers


# CPU contention. On a small shared machine a compiler or test run elsewhere distorts every number here, so each
# benchmark records the share of all CPUs that *other* processes used while it was timed: system-wide busy time
# from /proc/stat minus this process's CPU time, over wall time x cores (Linux only; None elsewhere).

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_CONTENTION_WARN_PCT = 10.0


def _cpu_sample() -> tuple[float, float, float] | None:
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    busy_s = (user + nice + system + irq + softirq + steal) / _CLK_TCK
    return time.perf_counter(), busy_s, time.process_time()


def _others_cpu_pct(start, end) -> float | None:
    if start is None or end is None or end[0] <= start[0]:
        return None
    wall, busy, own = end[0] - start[0], end[1] - start[1], end[2] - start[2]
    return 100.0 * max(0.0, busy - own) / (wall * (os.cpu_count() or 1))


# Spec HBM bandwidth by device-name substring, first match wins (torch.cuda.get_device_name: an H100 SXM reports
# "NVIDIA H100 80GB HBM3"). GH200 comes in two memory configurations, so it gets no number.
_PEAK_BANDWIDTH_BPS: tuple[tuple[str, float | None], ...] = (
    ("GH200", None),
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100 SXM", 3.35e12),
    ("H100 80GB HBM3", 3.35e12),
)


def peak_bandwidth(device: torch.device) -> tuple[float | None, str | None]:
    """Spec memory bandwidth in B/s and where the number comes from, or ``(None, None)``."""
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    for key, bps in _PEAK_BANDWIDTH_BPS:
        if key.lower() in name.lower():
            return (bps, f"spec ({key})") if bps is not None else (None, None)
    return None, None


@pytest.fixture(scope="session")
def copy_ceiling(request: pytest.FixtureRequest) -> Callable[[torch.device], float | None]:
    """``ceiling(device)``: practical bandwidth in B/s of a 1 GiB ``dst.copy_(src)`` (read + write), measured once
    per device with CUDA events (median of 20); None on CPU or with ``--benchmark-disable``."""
    cache: dict[str, float | None] = {}
    disabled = bool(getattr(request.config, "_benchmarksession", None) and request.config._benchmarksession.disabled)

    def ceiling(device: torch.device) -> float | None:
        if device.type != "cuda" or disabled:
            return None
        key = str(device)
        if key not in cache:
            nbytes = 1 << 30
            src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
            dst = torch.empty_like(src)
            for _ in range(3):
                dst.copy_(src)
            times = []
            for _ in range(20):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                dst.copy_(src)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            cache[key] = 2 * nbytes / statistics.median(times)
            del src, dst
            torch.cuda.empty_cache()
        return cache[key]

    return ceiling


# --------------------------------------------------------------------------------------------------------------
# Timing


def _timing_settings(config: pytest.Config) -> tuple[float, int]:
    if config.getoption("quick"):
        return _QUICK_MAX_TIME_S, _QUICK_MIN_ROUNDS
    return float(config.getoption("benchmark_max_time")), int(config.getoption("benchmark_min_rounds"))


@pytest.fixture
def run_benchmark(benchmark, request: pytest.FixtureRequest, copy_ceiling):
    """``run_benchmark(fn, impl=..., device=..., nbytes=..., warmup=..., check=...)`` times ``fn`` with
    ``benchmark.pedantic`` and records the result for the ratio report.

    ``fn()`` must do one complete unit of work and synchronize the device itself. Before timing it is called
    ``warmup`` times (the first call's duration is kept as ``first_call_s``: the compile time of a
    ``torch.compile``d callable), then ``check(fn())`` is called, which must raise on a wrong result (a dict it
    returns goes into ``extra_info``). With ``--benchmark-disable`` the warm-up is a single call, and after the
    check ``fn`` runs once more, untimed.
    """
    config = request.config
    max_time, min_rounds = _timing_settings(config)

    def run(
        fn: Callable[[], Any],
        *,
        impl: str,
        device: torch.device,
        nbytes: int | None = None,
        warmup: int = 2,
        check: Callable[[Any], None] | None = None,
    ) -> None:
        disabled = benchmark.disabled
        durations = []
        for _ in range(1 if disabled else max(1, warmup)):
            t0 = time.perf_counter()
            fn()
            durations.append(time.perf_counter() - t0)
        first_call_s = durations[0]
        t0 = time.perf_counter()
        result = fn()
        durations.append(time.perf_counter() - t0)
        accuracy = check(result) if check is not None else None
        del result

        # The fastest call after the first (which may compile) estimates one call.
        estimate = max(min(durations[1:] or durations), 1e-7)
        iterations = max(1, math.ceil(_MIN_ROUND_S / estimate))
        rounds = min(_MAX_ROUNDS, max(min_rounds, math.ceil(max_time / (estimate * iterations))))

        benchmark.extra_info.update(
            impl=impl,
            device=str(device),
            device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
            or platform.machine(),
            torch_threads=torch.get_num_threads(),
            first_call_s=first_call_s,
        )
        if accuracy:
            benchmark.extra_info.update(accuracy)
        before = _cpu_sample()
        benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=0)
        others_pct = None if disabled else _others_cpu_pct(before, _cpu_sample())
        benchmark.extra_info["others_cpu_pct"] = others_pct

        median = None if disabled or benchmark.stats is None else float(benchmark.stats.stats.median)
        record = {
            "group": benchmark.group,
            "impl": impl,
            "device": str(device),
            "median_s": median,
            "iqr_s": None if median is None else float(benchmark.stats.stats.iqr),
            "rounds": None if median is None else rounds,
            "iterations": None if median is None else iterations,
            "first_call_s": first_call_s,
            "accuracy": accuracy or None,
            "others_cpu_pct": others_pct,
            "bytes": nbytes,
            "gbps": None,
            "pct_peak": None,
            "pct_copy": None,
        }
        if device.type == "cuda" and nbytes is not None:
            peak, peak_source = peak_bandwidth(device)
            ceiling = copy_ceiling(device)
            record.update(peak_Bps=peak, peak_source=peak_source, copy_ceiling_Bps=ceiling)
            if median is not None:
                achieved = nbytes / median
                record["gbps"] = achieved / 1e9
                record["pct_peak"] = None if peak is None else 100 * achieved / peak
                record["pct_copy"] = None if ceiling is None else 100 * achieved / ceiling
            benchmark.extra_info.update(
                bytes=nbytes,
                achieved_Bps=None if median is None else nbytes / median,
                peak_Bps=peak,
                peak_source=peak_source,
                copy_ceiling_Bps=ceiling,
            )
        config.stash[_RECORDS].append(record)

    return run


# --------------------------------------------------------------------------------------------------------------
# Ratio report


def _build_report(config: pytest.Config) -> dict[str, Any]:
    groups: dict[str, dict[str, Any]] = {}
    for rec in config.stash.get(_RECORDS, []):
        g = groups.setdefault(rec["group"], {"impls": {}, "ratios": {}})
        g["impls"][rec["impl"]] = {k: v for k, v in rec.items() if k not in ("group", "impl")}
    timed = any(r["median_s"] is not None for r in config.stash.get(_RECORDS, []))
    for g in groups.values():
        base = g["impls"].get(BASELINE_IMPL, {}).get("median_s")
        for impl, rec in g["impls"].items():
            if impl != BASELINE_IMPL:
                other = rec["median_s"]
                g["ratios"][f"{impl}/{BASELINE_IMPL}"] = None if base is None or other is None else other / base
    try:
        import mmer_ext

        mmer_version = mmer_ext.__version__
        lib = Path(mmer_ext._C.__file__)
        mmer_lib = {
            "path": str(lib),
            "mtime": datetime.datetime.fromtimestamp(lib.stat().st_mtime, datetime.timezone.utc).isoformat(
                timespec="seconds"
            ),
        }
    except Exception:  # report even if the package broke mid-run
        mmer_version, mmer_lib = None, None
    others = [r["others_cpu_pct"] for r in config.stash.get(_RECORDS, []) if r.get("others_cpu_pct") is not None]
    return {
        "meta": {
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "mmer_ext": mmer_version,
            "mmer_ext_library": mmer_lib,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "host": platform.node(),
            "cpu_model": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "usable_cpus": _usable_cpus(),
            "load_average_1min_end": _load1(),
            "torch_threads": torch.get_num_threads(),
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available()
            else [],
            "quick": bool(config.getoption("quick")),
            "timings_disabled": not timed,
            "others_cpu_pct_session": _others_cpu_pct(config.stash.get(_SESSION_CPU, None), _cpu_sample()),
            "others_cpu_pct_max": max(others) if others else None,
            "ratio_note": "ratio = median(impl) / median(ours): higher means ours is faster",
        },
        "groups": groups,
    }


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _usable_cpus() -> int | None:
    try:
        from mmer_ext.runtime import usable_cpus

        return usable_cpus()
    except Exception:  # the report must not depend on the package importing
        return None


def _load1() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _summary_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per benchmark group: ours' median and every ratio to it (the figures an issue quotes)."""
    ratio_keys: list[str] = []
    for g in report["groups"].values():
        for key in g["ratios"]:
            if key not in ratio_keys:
                ratio_keys.append(key)
    order = {f"{impl}/{BASELINE_IMPL}": i for i, impl in enumerate(IMPL_ORDER)}
    ratio_keys.sort(key=lambda k: order.get(k, len(order)))
    header = ["group", "ours median", *ratio_keys, "others"]
    rows = []
    for name, g in report["groups"].items():
        ours = g["impls"].get(BASELINE_IMPL, {})
        others = [r.get("others_cpu_pct") for r in g["impls"].values() if r.get("others_cpu_pct") is not None]
        rows.append([name, _fmt_time(ours.get("median_s")),
                     *(_fmt(g["ratios"].get(k), ".2f", "x") for k in ratio_keys),
                     _fmt(max(others) if others else None, ".0f", "%")])
    return header, rows


def _format_summary(report: dict[str, Any]) -> list[str]:
    header, rows = _summary_rows(report)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = ["", "summary: ratio = median(impl) / median(ours), > 1 means ours is faster"]
    for row in (header, *rows):
        lines.append("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                                        enumerate(zip(row, widths))))
    return lines


def format_markdown(report: dict[str, Any]) -> str:
    """The ratio table as markdown with the machine facts, for a reference run kept in benchmarks/results/."""
    meta = report["meta"]
    header, rows = _summary_rows(report)
    load = meta.get("load_average_1min_end")
    facts = [
        f"- machine: {meta.get('host')} ({meta.get('machine')}), CPU: {meta.get('cpu_model')}, "
        f"{meta.get('cpu_count')} CPUs ({meta.get('usable_cpus')} usable), "
        f"GPUs: {', '.join(meta['gpus']) if meta['gpus'] else 'none'}",
        f"- torch {meta['torch']} with {meta['torch_threads']} threads, Python {meta['python']}, "
        f"mmer_ext {meta['mmer_ext']}",
        f"- created {meta['created']}; load average (1 min) at the end: {_fmt(load, '.2f')}; other processes used "
        f"up to {_fmt(meta.get('others_cpu_pct_max'), '.0f', '%')} of the CPUs during a timed benchmark"
        + (" (QUICK mode: few rounds)" if meta["quick"] else ""),
    ]
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join([f"# Benchmark ratios ({meta.get('host')}, {meta['created'][:10]})", "", *facts, "",
                      meta["ratio_note"] + ".", "", *table]) + "\n"


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3f} {unit}"
    return f"{s / 1e-9:.1f} ns"


def _fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def _max_err(record: dict[str, Any]) -> float | None:
    acc = record.get("accuracy") or {}
    for key in ("grad_err_rel_to_max", "loss_rel_err", "max_abs_err"):
        if key in acc:
            return acc[key]
    return None


def _format_report(report: dict[str, Any]) -> list[str]:
    meta = report["meta"]
    lines = [
        f"mmer_ext {meta['mmer_ext']}, torch {meta['torch']}, {meta['torch_threads']} torch threads"
        + (f", GPUs: {', '.join(meta['gpus'])}" if meta["gpus"] else ", no GPU")
        + (", QUICK mode (few rounds)" if meta["quick"] else ""),
    ]
    if meta["timings_disabled"]:
        lines.append(
            "timings disabled (--benchmark-disable): every benchmark body ran once, correctness guards passed; "
            "no medians or ratios to report."
        )
        lines.append("ran: " + ", ".join(f"{name} [{', '.join(g['impls'])}]" for name, g in report["groups"].items()))
        return lines
    lines.append("ratio = median(impl) / median(ours); > 1 means ours is faster. 'first call' includes compilation;")
    lines.append("'others' = share of all CPUs used by other processes while that benchmark was timed;")
    lines.append("'max err' = error vs the float64 reference (gradients: relative to their largest entry).")
    header = (
        f"  {'impl':<22} {'median':>11} {'IQR':>11} {'rounds':>9} {'vs ours':>8} {'first call':>11} {'others':>7}"
        f" {'max err':>8}"
    )
    any_cuda = any(r.get("gbps") is not None for g in report["groups"].values() for r in g["impls"].values())
    if any_cuda:
        header += f" {'GB/s':>8} {'% peak':>7} {'% copy':>7}"
    for name, g in report["groups"].items():
        lines.append("")
        lines.append(name)
        lines.append(header)
        base = g["impls"].get(BASELINE_IMPL, {}).get("median_s")
        impls = sorted(g["impls"], key=lambda i: IMPL_ORDER.index(i) if i in IMPL_ORDER else len(IMPL_ORDER))
        for impl in impls:
            r = g["impls"][impl]
            ratio = 1.0 if impl == BASELINE_IMPL and base is not None else g["ratios"].get(f"{impl}/{BASELINE_IMPL}")
            rounds = "-" if r["rounds"] is None else f"{r['rounds']}x{r['iterations']}"
            row = (
                f"  {impl:<22} {_fmt_time(r['median_s']):>11} {_fmt_time(r['iqr_s']):>11} {rounds:>9} "
                f"{_fmt(ratio, '.2f', 'x'):>8} {_fmt_time(r['first_call_s']):>11}"
                f" {_fmt(r.get('others_cpu_pct'), '.0f', '%'):>7} {_fmt(_max_err(r), '.1e'):>8}"
            )
            if any_cuda:
                row += f" {_fmt(r['gbps'], '.0f'):>8} {_fmt(r['pct_peak'], '.1f'):>7} {_fmt(r['pct_copy'], '.1f'):>7}"
            lines.append(row)
        summary = ", ".join(f"{k} = {_fmt(v, '.2f', 'x')}" for k, v in g["ratios"].items())
        if summary:
            lines.append(f"  ratios: {summary}")
    lines.extend(_format_summary(report))
    worst = meta.get("others_cpu_pct_max")
    if worst is not None and worst > _CONTENTION_WARN_PCT:
        lines.append("")
        lines.append(
            f"WARNING: other processes used up to {worst:.0f}% of the CPUs while benchmarks were timed "
            f"(threshold {_CONTENTION_WARN_PCT:.0f}%); these timings are distorted, rerun on a quiet machine."
        )
    return lines


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    if not config.stash.get(_RECORDS, None):
        return
    report = _build_report(config)
    terminalreporter.write_sep("=", "mmer_ext benchmark ratios")
    for line in _format_report(report):
        terminalreporter.write_line(line)
    path = config.getoption("ratios_json")
    if path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
        md = out.with_suffix(".md")
        if not report["meta"]["timings_disabled"]:
            md.write_text(format_markdown(report))
        terminalreporter.write_line(f"ratio table written to {out}" + ("" if report["meta"]["timings_disabled"]
                                                                      else f" and {md}"))
