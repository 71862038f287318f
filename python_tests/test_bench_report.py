"""The benchmark report's ratio summary and its markdown rendering (benchmarks/conftest.py), on a made-up report."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

CONFTEST = Path(__file__).resolve().parents[1] / "benchmarks" / "conftest.py"


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("mmer_bench_conftest", CONFTEST)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _impl(median, others=5.0):
    return {"median_s": median, "iqr_s": median / 10, "rounds": 10, "iterations": 1, "first_call_s": median,
            "accuracy": None, "others_cpu_pct": others, "bytes": None, "gbps": None, "pct_peak": None, "pct_copy": None}


def _report():
    groups = {
        "cmd_pairwise/cpu/b64/fwd": {"impls": {"ours": _impl(20e-6), "eager": _impl(600e-6), "compiled": _impl(50e-6)},
                                     "ratios": {"eager/ours": 30.0, "compiled/ours": 2.5}},
        "mmgcn/cpu/train-step": {"impls": {"ours": _impl(1.2, 40.0), "authors-loop": _impl(14.4)},
                                 "ratios": {"authors-loop/ours": 12.0}},
    }
    meta = {"created": "2026-12-05T02:00:00+00:00", "mmer_ext": "0.1.0", "torch": "2.14.1", "python": "3.11.7",
            "machine": "x86_64", "host": "vm", "cpu_model": "AMD EPYC", "cpu_count": 2, "usable_cpus": 2,
            "load_average_1min_end": 0.4, "torch_threads": 1, "gpus": [], "quick": False, "timings_disabled": False,
            "others_cpu_pct_max": 40.0, "ratio_note": "ratio = median(impl) / median(ours)"}
    return {"meta": meta, "groups": groups}


def test_summary_has_one_row_per_group_with_every_ratio(harness):
    lines = harness._format_report(_report())
    start = next(i for i, line in enumerate(lines) if line.startswith("summary:"))
    header, *rows = lines[start + 1:start + 4]
    assert header.split() == ["group", "ours", "median", "eager/ours", "compiled/ours", "authors-loop/ours", "others"]
    assert rows[0].split() == ["cmd_pairwise/cpu/b64/fwd", "20.000", "us", "30.00x", "2.50x", "-", "5%"]
    assert rows[1].split() == ["mmgcn/cpu/train-step", "1.200", "s", "-", "-", "12.00x", "40%"]


def test_markdown_names_the_machine_and_keeps_the_ratios(harness):
    text = harness.format_markdown(_report())
    assert "vm (x86_64), CPU: AMD EPYC, 2 CPUs (2 usable)" in text
    assert "torch 2.14.1 with 1 threads" in text and "load average (1 min) at the end: 0.40" in text
    assert "| cmd_pairwise/cpu/b64/fwd | 20.000 us | 30.00x | 2.50x | - | 5% |" in text
    assert "| mmgcn/cpu/train-step | 1.200 s | - | - | 12.00x | 40% |" in text
