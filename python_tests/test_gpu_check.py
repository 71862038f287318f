"""The GPU check (``make gpu-check``, tools/gpu_check.py) without a GPU: its kernel table against csrc/, its plan,
its budget, and the parsers that turn sanitizer logs and benchmark tables into a verdict.

The rehearsal itself (the sm_90 build and the collection of the CUDA tests) runs in CI as ``make gpu-check-rehearsal``;
these tests are the fast part.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

import gpu_check  # noqa: E402
import gpu_check_bench_shim  # noqa: E402
import gpu_check_kernels as K  # noqa: E402


# ---- the kernel table, both ways ----------------------------------------------------------------------------------


def test_every_kernel_in_csrc_has_sanitizer_tests():
    kernels = K.global_kernels()
    assert len(kernels) >= 19, kernels  # the parser must find the kernels at all
    missing = sorted(set(kernels) - set(K.KERNEL_TESTS))
    assert not missing, (
        f"__global__ kernels with no test in KERNEL_TESTS of tools/gpu_check_kernels.py: "
        f"{', '.join(f'{k} ({kernels[k]})' for k in missing)}: add a small-shape CUDA test that launches each"
    )
    assert all(K.KERNEL_TESTS[k] for k in kernels), "every kernel needs at least one test"


def test_every_kernel_in_the_table_exists():
    stale = sorted(set(K.KERNEL_TESTS) - set(K.global_kernels()))
    assert not stale, f"KERNEL_TESTS names kernels that csrc/ no longer defines: {', '.join(stale)}"


def test_kernel_parser(tmp_path):
    (tmp_path / "csrc" / "ops").mkdir(parents=True)
    (tmp_path / "csrc" / "ops" / "a.cu").write_text(
        "template <int P, typename T>\n__global__ void first_kernel(const T* x) {}\n"
        "__global__ __launch_bounds__(256, 1) void bounded_kernel(int n)\n{}\n"
        "// __global__ void commented_kernel(int) {}\n"
        "__device__ void helper(int) {}\n"
    )
    (tmp_path / "csrc" / "ops" / "b.cpp").write_text("void host_only() {}\n")
    assert K.global_kernels(tmp_path) == {"first_kernel": "csrc/ops/a.cu", "bounded_kernel": "csrc/ops/a.cu"}


def _test_function_exists(node_id: str) -> bool:
    path, _, rest = node_id.partition("::")
    name = re.match(r"\w+", rest).group(0)
    return re.search(rf"^def {name}\(", (REPO / path).read_text(), re.MULTILINE) is not None


def test_sanitizer_subset_is_small_device_tests_in_listed_files():
    subset = K.sanitizer_subset()
    assert len(subset) == len(set(subset))
    assert len(subset) <= 25, "every subset test runs under three sanitizer tools: keep it small"
    for node_id in subset:
        path = node_id.split("::")[0]
        assert path in K.CUDA_TEST_FILES, node_id
        assert "cuda" in node_id, f"{node_id}: not a CUDA test (the sanitizer sees only device code)"
        assert _test_function_exists(node_id), f"{node_id}: no such test function"
    for path in K.CUDA_TEST_FILES:
        assert (REPO / path).is_file(), path


# ---- the command ----------------------------------------------------------------------------------------------------


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def test_dry_run_prints_the_plan(tmp_path):
    out = _run(str(tmp_path / "out"), "--dry-run")
    assert out.returncode == 0, out.stderr
    for stage in gpu_check.STAGES:
        assert re.search(rf"^{re.escape(stage.name)}\s", out.stdout, re.MULTILINE), stage.name
    for node_id in K.sanitizer_subset():
        assert node_id in out.stdout
    assert not (tmp_path / "out").exists(), "a dry run writes nothing"


def test_unknown_stage_is_refused(tmp_path):
    out = _run(str(tmp_path / "out"), "--only", "memchek")
    assert out.returncode == 2
    assert "unknown stage(s) memchek" in out.stderr


def _fake_stage(name, group, cap, min_s, status="passed", seconds=0.0, needs_gpu=True, optional=False, calls=None):
    def run(ctx, timeout):
        if calls is not None:
            calls.append((name, timeout))
        if name == "env":
            ctx.facts.update(gpu_available=True, device_name="Fake GPU", gpus=["Fake GPU"])
        return gpu_check.Result(status, f"{name} ran")

    return gpu_check.Stage(name, group, needs_gpu, cap, min_s, run, name, optional)


def test_budget_skips_the_least_valuable_stages(tmp_path, monkeypatch):
    calls = []
    clock = [1000.0]
    monkeypatch.setattr(gpu_check.time, "monotonic", lambda: clock[0])

    def advancing(name, group, cap, min_s, spend, **kw):
        stage = _fake_stage(name, group, cap, min_s, calls=calls, **kw)
        inner = stage.run

        def run(ctx, timeout):
            clock[0] += spend
            return inner(ctx, timeout)

        return gpu_check.Stage(stage.name, group, stage.needs_gpu, cap, min_s, run, name, stage.optional)

    stages = [
        advancing("env", 0, 60, 0, 5, needs_gpu=False),
        advancing("build", 1, 300, 0, 60, needs_gpu=False),
        advancing("tests", 2, 100, 30, 100),
        advancing("extra", 2, 100, 30, 100, optional=True),
        advancing("bench", 3, 90, 40, 30),
        advancing("bench2", 4, 90, 40, 30),
    ]
    monkeypatch.setattr(gpu_check, "STAGES", stages)
    status = gpu_check.main([str(tmp_path / "out"), "--budget", "200", "--work-dir", str(tmp_path / "work")])
    ran = [name for name, _ in calls]
    # 165 s spent after tests; bench needs 40 s of the 35 left: skipped, and so is bench2. The optional stage did not
    # fit: its cap (100 s) plus the later stages' minimum times (40 + 40 s) exceed the 135 s left when group 2 began.
    assert ran == ["env", "build", "tests"]
    assert dict(calls)["tests"] == 100  # its cap, not the whole remaining budget
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| bench | skipped |" in summary and "budget: 35 s left" in summary
    assert "| extra | skipped |" in summary
    assert "device: **Fake GPU**" in summary
    assert status == 0


def test_a_failed_stage_fails_the_run_and_stops_after_a_failed_build(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(gpu_check, "STAGES", [
        _fake_stage("env", 0, 60, 0, needs_gpu=False, calls=calls),
        _fake_stage("build", 1, 60, 0, status="failed", needs_gpu=False, calls=calls),
        _fake_stage("tests", 2, 60, 0, calls=calls),
    ])
    status = gpu_check.main([str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")])
    assert status == 1
    assert [c for c, _ in calls] == ["env", "build"]
    assert "# GPU check: FAILED" in (tmp_path / "out" / "summary.md").read_text()
    assert {p.name for p in (tmp_path / "out").iterdir()} <= set(gpu_check.OUT_FILES)
    assert len(gpu_check.OUT_FILES) <= gpu_check.MAX_OUT_FILES  # what the GPU tool brings back


def test_stage_cap_interrupts_a_hanging_command(tmp_path):
    ctx = gpu_check.Ctx(gpu_check.parse_args([str(tmp_path / "out")]), sys.executable, tmp_path, tmp_path / "site",
                        gpu=False, deadline=None)
    rc, cut, log = gpu_check.run_cmd(ctx, "sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], 1)
    assert cut and rc != 0
    assert log.read_text().startswith("$ ")


# ---- parsers ----------------------------------------------------------------------------------------------------------

MEMCHECK_LOG = """\
========= COMPUTE-SANITIZER
========= Invalid __global__ read of size 4 bytes
=========     at void mmer_ext::cmd::(anonymous namespace)::cmd_shift_kernel<float, float>(const T1 *, long, long, T2 *)+0x90
=========     by thread (3,0,0) in block (0,0,0)
=========     Address 0x7f0000000400 is out of bounds
=========
========= Program hit cudaErrorInvalidValue (error 1) due to "invalid argument" on CUDA API call to cudaFuncGetAttributes.
=========     Saved host backtrace up to driver entry point at error
=========         Host Frame: libtorch_cuda.so
=========
========= ERROR SUMMARY: 2 errors
"""


def test_sanitizer_reports_are_attributed_to_our_kernels():
    found = gpu_check.sanitizer_findings(MEMCHECK_LOG)
    assert (found["reports"], found["ours"], found["others"]) == (2, 1, 1)
    assert found["error_summary"] == [2]
    assert "cmd_shift_kernel" in found["first_ours"][0]
    clean = gpu_check.sanitizer_findings("========= COMPUTE-SANITIZER\n========= ERROR SUMMARY: 0 errors\n")
    assert (clean["reports"], clean["ours"]) == (0, 0)


def test_kernel_coverage_matches_whole_names():
    trace = {
        K.ADJ_DENSE: [
            "void mmer_ext::angular_adjacency::(anonymous namespace)::angular_adjacency_degree_term_kernel<float, float>(...)"
        ],
        K.ADJ_RAW_WINDOW: [
            "void mmer_ext::angular_adjacency::(anonymous namespace)::angular_adjacency_degree_kernel<float>(...)"
        ],
    }
    cov = gpu_check.kernel_coverage(trace)
    assert cov["angular_adjacency_degree_term_kernel"]["launched_by"] == [K.ADJ_DENSE]
    assert cov["angular_adjacency_degree_kernel"]["launched_by"] == [K.ADJ_RAW_WINDOW]  # not fooled by ..._term_kernel
    assert cov["angular_adjacency_degree_kernel"]["listed_and_launched"] == [K.ADJ_RAW_WINDOW]
    assert cov["angular_adjacency_write_blocks_kernel"]["listed_and_launched"] == []


def test_bench_table_flags_losses_to_compile_and_low_bandwidth():
    report = {"groups": {
        "op/cuda/large": {"impls": {"ours": {"median_s": 2e-3, "gbps": 1000.0, "pct_copy": 25.0},
                                    "eager": {"median_s": 4e-3}, "compiled": {"median_s": 1e-3}},
                          "ratios": {"eager/ours": 2.0, "compiled/ours": 0.5}},
        "op/cuda/small": {"impls": {"ours": {"median_s": 1e-5, "gbps": 3000.0, "pct_copy": 75.0},
                                    "eager": {"median_s": 4e-5}, "compiled": {"median_s": 3e-5}},
                          "ratios": {"eager/ours": 4.0, "compiled/ours": 3.0}},
    }}
    rows, flags = gpu_check.bench_table(report)
    assert len(rows) == 4 and "| op/cuda/large | 2 ms | 4 ms | 1 ms | 2.00x | 0.50x | 1000 | 25 % |" in rows
    assert flags == ["op/cuda/large: torch.compile is faster (0.50x of ours)",
                     "op/cuda/large: ours reaches 25 % of the copy ceiling"]


def test_plain_timing_shim_measures_rounds():
    bench = gpu_check_bench_shim.PlainBenchmark("g", disabled=False)
    calls = []
    assert bench.pedantic(lambda: calls.append(1) or 7, rounds=5, iterations=3) == 7
    assert len(calls) == 15 and bench.stats.stats.median >= 0 and bench.stats.stats.iqr >= 0
    off = gpu_check_bench_shim.PlainBenchmark("g", disabled=True)
    assert off.pedantic(lambda: 3, rounds=5) == 3 and off.stats is None


@pytest.mark.parametrize("junit_text, expected", [
    ('<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1" time="2.5">'
     '<testcase classname="t" name="a"/><testcase classname="t" name="b"><failure/></testcase>'
     '<testcase classname="t" name="c"><skipped/></testcase></testsuite></testsuites>',
     {"tests": 3, "passed": 1, "failures": 1, "skipped": 1, "failing": ["t::b"]}),
])
def test_junit_counts(tmp_path, junit_text, expected):
    path = tmp_path / "j.xml"
    path.write_text(junit_text)
    counts = gpu_check.junit_counts(path)
    assert {k: counts[k] for k in expected} == expected
    verdict = gpu_check.pytest_verdict(1, False, counts, "x")
    assert verdict.status == "failed" and "t::b" in verdict.detail


def test_every_kernel_is_launched_outside_graph_capture():
    # The sanitizer's main pass gives each tensor its own allocation; graph captures run in a second pass without.
    assert K.GRAPH_TESTS <= set(K.sanitizer_subset())
    for kernel, tests in K.KERNEL_TESTS.items():
        assert set(tests) - K.GRAPH_TESTS, f"{kernel}: only CUDA-graph tests launch it"
