#!/usr/bin/env python3
"""One prepared command that turns a lent GPU into a verdict on the CUDA code: ``make gpu-check`` runs this.

    python3 tools/gpu_check.py OUT_DIR [--budget 420] [--dry-run] [--only STAGES] [--skip STAGES]

Written for the GPU machine this project is sometimes lent (one H200, 16 cores, its own python3 with torch 2.11 +
cu130, nvcc 13.0, compute-sanitizer, ninja, pytest, pytest-benchmark, pytest-timeout, pytest-xdist; nothing can be
installed there), and runnable anywhere: without a GPU it is the CPU rehearsal that CI runs (every stage that needs
no GPU). Stages, in the order of their value, each with a time cap:

  env            python, torch, GPU (nvidia-smi), nvcc, compute-sanitizer, which optional test packages exist
  build          the package for sm_90 only (``pip wheel --no-build-isolation --no-deps``, all cores, MMER_EXT_CUDA=ON)
                 against the python3/torch found, unpacked into a private site dir; the import is checked
  collect        the CUDA tests counted; the sanitizer subset and the benchmark selections must still exist
                 (CPU rehearsal: the whole suite is collected and every CUDA test must live in a listed file)
  kernel-trace   GPU: the sanitizer subset under torch.profiler; every __global__ kernel of csrc/ must be launched
                 by one of the tests tools/gpu_check_kernels.py names for it
  cuda-tests     GPU: every CUDA test (parity with the CPU and the references, opcheck, gradcheck, compile, CUDA
                 graphs, in-kernel Philox noise), with pytest-xdist where present
  memcheck       GPU, alongside cuda-tests: compute-sanitizer over the small-shape subset that launches every kernel,
  racecheck      with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so each tensor is its own allocation
  initcheck      (only if the budget leaves room for the benchmarks after it)
  bench-ops      GPU: the op benchmarks of benchmarks/ (ours vs eager reference vs torch.compile) at a small and a
                 large size, with bandwidth against a copy ceiling measured in the same run
  bench-sampler  GPU: the IMDer sampler, CUDA-graph replay vs plain loop vs eager vs torch.compile

When the budget (default 7 minutes on a GPU, none in the rehearsal) runs short, the stages at the end of that list
are skipped (and a stage that reaches its cap is interrupted, keeping what it finished); the summary says which.
Exit status: 0 when every stage that ran passed, 1 when anything failed, 2 on bad arguments.

OUT_DIR receives at most 8 files (the GPU tool returns no more): summary.md (the verdict, the device, the tables),
gpu_check.json, benchmarks.json, junit-cuda-tests.xml, sanitizer-reports.txt, gpu_check.log and logs.tar.gz (every
command's full output, the other junit files, the raw benchmark JSON). Work files go to --work-dir.

Measured here (the 2-core development machine, shared by six engineers, so wall times are inflated): the cold
sm_90-only build took 14 min 44 s at a load average of 8 to 14 (the build got 28 % of the two cores; 254 CPU-seconds:
227 user + 27 system) and, a second time, 7 min 14 s at a load average of about 9.5 (235 CPU-seconds for the whole
run up to the build, env probe included): about 2 to 2.5 minutes on two idle cores. Each of the three .cu files is
one of the longest jobs, so on the GPU machine's 16 cores the build should take about a minute; the plan caps it at
300 s. The rest of the rehearsal (environment, an incremental build, collecting the whole suite and the benchmarks)
took 38 s of wall time and 25 CPU-seconds here.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check_kernels as K  # noqa: E402

REPO = K.REPO
TOOLS = Path(__file__).resolve().parent
DEFAULT_GPU_BUDGET_S = 420
MAX_OUT_FILES = 8  # what the GPU tool brings back from its output folder
OUT_FILES = ("summary.md", "gpu_check.json", "benchmarks.json", "junit-cuda-tests.xml", "sanitizer-reports.txt",
             "gpu_check.log", "logs.tar.gz")
MAX_REPORT_BYTES = 4 << 20

# Benchmarks: one small and one large size per op; the max-autotune baselines (minutes of compilation each), the
# authors' Python-loop adjacency (seconds per call), the dense adjacency layout (MMGCN uses the blocks) and the middle
# IMDer size are left out to fit the budget: each torch.compile baseline costs seconds of compilation. A stage cut
# at its cap still reports the groups it finished.
BENCH_OPS_FILES = ("benchmarks/bench_cmd.py", "benchmarks/bench_angular_adjacency.py", "benchmarks/bench_diffusion_steps.py",
                   "benchmarks/bench_gcnii.py", "benchmarks/bench_attention.py")
BENCH_OPS_SELECT = "cuda and not max-autotune and not mmgcn-loop and not imder128 and not dense"
BENCH_SAMPLER_FILES = ("benchmarks/bench_imder_sampler.py",)
BENCH_SAMPLER_SELECT = "cuda and not (B128 and compiled)"
# Optional packages the test suite or the benchmarks use; the GPU machine's image is fixed, so each is looked up.
OPTIONAL_MODULES = (
    "pytest_benchmark", "pytest_timeout", "xdist", "hypothesis", "expecttest", "omegaconf", "yaml", "safetensors",
    "h5py", "sklearn", "matplotlib", "tqdm", "transformers", "scipy", "scikit_build_core", "pybind11", "ninja",
)


# ---- small helpers ------------------------------------------------------------------------------------------------


class Log:
    """Prints progress and keeps a copy for gpu_check.log (the GPU tool shows only the output's tail)."""

    def __init__(self) -> None:
        self.buf = io.StringIO()
        self.lock = threading.Lock()

    def __call__(self, msg: str = "") -> None:
        line = f"[{datetime.datetime.now(datetime.timezone.utc):%H:%M:%S}] {msg}" if msg else ""
        with self.lock:
            print(line, flush=True)
            self.buf.write(line + "\n")


log = Log()


@dataclasses.dataclass
class Result:
    status: str  # passed | failed | skipped | cut | unavailable
    detail: str = ""
    seconds: float = 0.0
    data: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Stage:
    name: str
    group: int  # stages of one group run at the same time
    needs_gpu: bool
    cap_s: float
    min_s: float
    run: Callable[["Ctx", float], Result]
    summary: str
    optional: bool = False  # runs only if the later stages' minimum times still fit after its cap


@dataclasses.dataclass
class Ctx:
    args: argparse.Namespace
    python: str
    work: Path
    site: Path
    gpu: bool
    deadline: float | None
    facts: dict = dataclasses.field(default_factory=dict)
    built: bool = False

    def remaining(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            PYTHONPATH=os.pathsep.join([str(self.site), str(TOOLS)]),
            # Never the source tree's mmer_ext/ (no compiled library there): no cwd on sys.path.
            PYTHONSAFEPATH="1",
            PYTHONUNBUFFERED="1",
            PYTHONDONTWRITEBYTECODE="1",
            TORCHINDUCTOR_CACHE_DIR=str(self.work / "inductor-cache"),
        )
        env.setdefault("OMP_NUM_THREADS", "1" if not self.gpu else "2")
        env.update(extra)
        return env

    def pytest(self) -> list[str]:
        return [self.python, "-P", "-m", "pytest", "-p", "no:cacheprovider"]

    def has(self, module: str) -> bool:
        return bool(self.facts.get("modules", {}).get(module))


def run_cmd(ctx: Ctx, name: str, argv: list[str], timeout: float, env: dict | None = None) -> tuple[int, bool, Path]:
    """Run ``argv`` in the repository root, output to ``work/logs/<name>.log``. At ``timeout`` the process group gets
    SIGINT (pytest then writes its junit file and summary for what finished), then SIGKILL 30 s later.
    Returns (exit status, interrupted, log path)."""
    path = ctx.work / "logs" / f"{name}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        f.write("$ " + shlex.join(argv) + "\n\n")
        f.flush()
        proc = subprocess.Popen(argv, cwd=REPO, env=env or ctx.env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=max(timeout, 1)), False, path
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return proc.returncode, True, path


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def junit_counts(path: Path) -> dict:
    """Counts and the first failing test ids of a pytest junit file (empty if it is missing)."""
    if not path.exists():
        return {}
    root = ET.parse(path).getroot()
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "time_s": 0.0}
    failing = []
    for suite in root.iter("testsuite"):
        for key in ("tests", "failures", "errors", "skipped"):
            counts[key] += int(suite.get(key, 0))
        counts["time_s"] += float(suite.get("time", 0))
    skip_reasons: dict[str, int] = {}
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failing.append(f"{case.get('classname', '')}::{case.get('name', '')}")
        skipped = case.find("skipped")
        if skipped is not None:
            reason = (skipped.get("message") or "").strip()[:120]
            skip_reasons[reason] = skip_reasons.get(reason, 0) + 1
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failing"] = failing[:40]
    counts["skip_reasons"] = skip_reasons
    return counts


def pytest_verdict(rc: int, cut: bool, counts: dict, what: str) -> Result:
    summary = (f"{counts.get('passed', 0)} passed, {counts.get('failures', 0) + counts.get('errors', 0)} failed, "
               f"{counts.get('skipped', 0)} skipped" if counts else "no junit report")
    if counts.get("failures") or counts.get("errors") or (rc != 0 and not cut):
        detail = f"{what}: {summary} (pytest exit {rc})"
        if counts.get("failing"):
            detail += "; first failing: " + ", ".join(counts["failing"][:5])
        return Result("failed", detail, data={"junit": counts, "rc": rc})
    if cut:
        return Result("cut", f"{what}: interrupted at its time cap after {summary}", data={"junit": counts, "rc": rc})
    if not counts.get("tests"):
        return Result("failed", f"{what}: no test ran (pytest exit {rc}, {summary})", data={"junit": counts, "rc": rc})
    return Result("passed", f"{what}: {summary}", data={"junit": counts, "rc": rc})


def collect_ids(ctx: Ctx, name: str, targets: list[str], keyword: str | None, timeout: float,
                extra: tuple[str, ...] = ()) -> tuple[list[str], int, Path, bool]:
    argv = ctx.pytest() + ["--collect-only", "-q", "--continue-on-collection-errors", *extra, *targets]
    argv += ["-k", keyword] if keyword else []
    rc, cut, path = run_cmd(ctx, name, argv, timeout)
    ids = [line.strip() for line in path.read_text(errors="replace").splitlines() if "::" in line and not line.startswith("$")]
    return ids, rc, path, cut


# ---- stages -------------------------------------------------------------------------------------------------------


def _probe(ctx: Ctx, code: str, timeout: float = 120) -> dict:
    out = subprocess.run([ctx.python, "-P", "-c", code], cwd=REPO, env=ctx.env(), capture_output=True, text=True,
                         timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _version_of(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def stage_env(ctx: Ctx, timeout: float) -> Result:
    facts = ctx.facts
    facts["python_executable"] = ctx.python
    facts["cpus"] = os.cpu_count()
    facts["repo_commit"] = _version_of(["git", "-C", str(REPO), "rev-parse", "HEAD"]) or "unknown (no .git here)"
    facts.update(_probe(ctx, "import json, sys, torch; print(json.dumps({'python': sys.version.split()[0], "
                             "'torch': torch.__version__, 'torch_cuda': torch.version.cuda, "
                             "'gpu_available': torch.cuda.is_available(), "
                             "'gpus': [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())], "
                             "'capabilities': ['%d.%d' % torch.cuda.get_device_capability(i) "
                             "for i in range(torch.cuda.device_count())]}))"))
    mods = _probe(ctx, "import importlib.util, json; print(json.dumps({m: importlib.util.find_spec(m) is not None "
                       f"for m in {list(OPTIONAL_MODULES)!r}}}))")
    facts["modules"] = mods
    smi = _version_of(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                       "--format=csv,noheader"])
    facts["nvidia_smi"] = smi
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
    nvcc_out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout if nvcc else ""
    release = re.search(r"release ([\d.]+)", nvcc_out)
    facts["nvcc"] = release.group(1) if release else None
    sanitizer = shutil.which("compute-sanitizer") or next(
        (p for p in ("/usr/local/cuda/bin/compute-sanitizer", "/usr/local/cuda/compute-sanitizer/compute-sanitizer")
         if Path(p).exists()), None)
    facts["compute_sanitizer"] = sanitizer
    if sanitizer:
        facts["compute_sanitizer_version"] = _version_of([sanitizer, "--version"])
        try:
            helptext = subprocess.run([sanitizer, "--help"], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.TimeoutExpired):
            helptext = ""
        facts["sanitizer_kernel_filter"] = "--kernel-name" in helptext
    facts["device_name"] = (facts["gpus"][0] if facts.get("gpus") else None) or (smi.split(",")[0] if smi else None)
    missing = sorted(m for m, ok in mods.items() if not ok)
    detail = (f"python {facts['python']}, torch {facts['torch']} (CUDA {facts['torch_cuda']}), "
              f"GPU: {facts['device_name'] or 'none'}, nvcc: {facts['nvcc'] or 'not found'}, "
              f"compute-sanitizer: {'yes' if sanitizer else 'not found'}; missing optional packages: "
              f"{', '.join(missing) or 'none'}")
    return Result("passed", detail, data={"missing_modules": missing})


def stage_build(ctx: Ctx, timeout: float) -> Result:
    dist, site = ctx.work / "dist", ctx.site
    shutil.rmtree(dist, ignore_errors=True)
    build_dir = ctx.args.build_dir or "build/gpu-check-sm90"
    jobs = str(ctx.args.jobs or os.cpu_count() or 2)
    env = ctx.env(MMER_EXT_CUDA="ON", TORCH_CUDA_ARCH_LIST="9.0", CMAKE_BUILD_PARALLEL_LEVEL=jobs, MAX_JOBS=jobs)
    env.pop("PYTHONSAFEPATH")  # the build backend imports nothing from here, but pip's own subprocesses expect cwd
    argv = [ctx.python, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index", "-v",
            "-C", f"build-dir={build_dir}", "-w", str(dist), str(REPO)]
    t0 = time.monotonic()
    rc, cut, path = run_cmd(ctx, "build", argv, timeout, env=env)
    build_s = time.monotonic() - t0
    wheels = sorted(dist.glob("mmer_ext-*.whl"))
    if rc != 0 or cut or not wheels:
        return Result("failed", f"sm_90 build {'hit its time cap' if cut else f'exit {rc}'} after {build_s:.0f} s:\n"
                      + tail(path), data={"build_s": build_s})
    shutil.rmtree(site, ignore_errors=True)
    with zipfile.ZipFile(wheels[-1]) as whl:
        whl.extractall(site)
    try:
        info = _probe(ctx, "import json, mmer_ext; i = mmer_ext.build_info(); "
                           "i['file'] = mmer_ext.__file__; print(json.dumps(i))")
    except Exception as e:  # noqa: BLE001  (any import failure is the finding)
        return Result("failed", f"built in {build_s:.0f} s, but importing it failed: {e}", data={"build_s": build_s})
    problems = []
    if not str(info["file"]).startswith(str(site)):
        problems.append(f"imported {info['file']}, not the fresh build")
    if not info["cuda_kernels"]:
        problems.append("built without the CUDA kernels")
    if "9.0" not in [a.replace("+PTX", "") for a in info["cuda_arch_list"]]:
        problems.append(f"arch list {info['cuda_arch_list']} lacks 9.0")
    unsupported = [g["name"] for g in info.get("gpus", []) if not g["supported_by_build"]]
    if unsupported:
        problems.append(f"not built for {', '.join(unsupported)}")
    ctx.facts["build_info"] = info
    ctx.built = not problems
    detail = (f"sm_90 wheel in {build_s:.0f} s with {jobs} jobs ({build_dir}); torch {info['torch_built_against']}, "
              f"nvcc {info['nvcc']}, archs {info['cuda_arch_list']}")
    return Result("failed" if problems else "passed", detail + ("; " + "; ".join(problems) if problems else ""),
                  data={"build_s": build_s})


def stage_collect(ctx: Ctx, timeout: float) -> Result:
    problems, data = [], {}
    full = not ctx.gpu  # the whole suite only where every test module's imports are there
    targets = ["python_tests"] if full else list(K.CUDA_TEST_FILES)
    # With the kernel-trace plugin loaded, so a broken plugin shows up here rather than on the GPU.
    ids, rc, path, _ = collect_ids(ctx, "collect-cuda-tests", targets, K.CUDA_TEST_KEYWORD, timeout,
                                   extra=("-p", "gpu_check_trace"))
    if not ids:
        return Result("failed", f"collecting the CUDA tests failed (exit {rc}):\n" + tail(path))
    if rc != 0:
        problems.append(f"collection errors (exit {rc}): {tail(path, 5)}")
    per_file: dict[str, int] = {}
    for i in ids:
        per_file[i.split("::")[0]] = per_file.get(i.split("::")[0], 0) + 1
    data["cuda_tests"] = len(ids)
    data["cuda_tests_per_file"] = per_file
    if full:
        outside = sorted(set(per_file) - set(K.CUDA_TEST_FILES))
        if outside:
            problems.append("CUDA tests outside CUDA_TEST_FILES of tools/gpu_check_kernels.py: " + ", ".join(outside))
    empty = sorted(set(K.CUDA_TEST_FILES) - set(per_file))
    if empty:
        problems.append("listed files without CUDA tests: " + ", ".join(empty))
    missing = [t for t in K.sanitizer_subset() if t not in set(ids)]
    if missing:
        problems.append("sanitizer subset tests that no longer exist: " + ", ".join(missing))
    data["sanitizer_subset"] = len(K.sanitizer_subset())
    for name, files, select in (("bench-ops", BENCH_OPS_FILES, BENCH_OPS_SELECT),
                                ("bench-sampler", BENCH_SAMPLER_FILES, BENCH_SAMPLER_SELECT)):
        bench_ids, brc, bpath, _ = collect_ids(ctx, f"collect-{name}", list(files), select, timeout)
        data[f"{name}_benchmarks"] = len(bench_ids)
        if brc != 0 or not bench_ids:
            problems.append(f"{name}: the selection '{select}' collects nothing (exit {brc}): {tail(bpath, 3)}")
    detail = (f"{len(ids)} CUDA tests in {len(per_file)} files; sanitizer subset {data['sanitizer_subset']} tests over "
              f"{len(K.KERNEL_TESTS)} kernels; benchmarks: {data.get('bench-ops_benchmarks')} op, "
              f"{data.get('bench-sampler_benchmarks')} sampler")
    return Result("failed" if problems else "passed", detail + ("; " + "; ".join(problems) if problems else ""), data=data)


def kernel_coverage(trace: dict[str, list[str]]) -> dict[str, dict]:
    """For each kernel of the table: the listed tests that launched it and every subset test that did."""
    out = {}
    for kernel, tests in K.KERNEL_TESTS.items():
        pattern = re.compile(rf"(?<![\w]){re.escape(kernel)}(?![\w])")
        launched_by = sorted(t for t, names in trace.items() if any(pattern.search(n) for n in names))
        out[kernel] = {"listed": list(tests), "launched_by": launched_by,
                       "listed_and_launched": [t for t in tests if t in launched_by]}
    return out


def stage_kernel_trace(ctx: Ctx, timeout: float) -> Result:
    trace_path = ctx.work / "kernel-trace.json"
    trace_path.unlink(missing_ok=True)
    argv = ctx.pytest() + ["-q", "-p", "gpu_check_trace", *K.sanitizer_subset()]
    rc, cut, path = run_cmd(ctx, "kernel-trace", argv, timeout, env=ctx.env(MMER_GPU_CHECK_TRACE=str(trace_path)))
    if not trace_path.exists():
        return Result("failed", f"no kernel trace written (pytest exit {rc}):\n" + tail(path))
    trace = json.loads(trace_path.read_text())
    cov = kernel_coverage(trace)
    not_launched = [k for k, c in cov.items() if not c["listed_and_launched"]]
    detail = (f"{len(cov) - len(not_launched)}/{len(cov)} kernels launched by a test the table names for them, "
              f"{len(trace)} tests traced")
    if not_launched:
        detail += "; NOT launched by their listed tests: " + ", ".join(not_launched)
    if rc not in (0,):
        detail += f"; pytest exit {rc} under the profiler (see cuda-tests and the sanitizer stages for the tests)"
    status = "failed" if not_launched else ("cut" if cut else "passed")
    return Result(status, detail, data={"coverage": cov})


def stage_cuda_tests(ctx: Ctx, timeout: float) -> Result:
    junit = ctx.work / "junit-cuda-tests.xml"
    junit.unlink(missing_ok=True)
    # A file that cannot be imported there is an error in the report, not the end of the run.
    argv = ctx.pytest() + ["-q", "-rfE", "--continue-on-collection-errors", "--junitxml", str(junit),
                           "-k", K.CUDA_TEST_KEYWORD, *K.CUDA_TEST_FILES]
    extra = {}
    if ctx.has("xdist"):
        workers = max(2, min(8, (os.cpu_count() or 4) // 2))
        argv += ["-n", str(workers)]
        extra["TORCHINDUCTOR_COMPILE_THREADS"] = "2"
        extra["PYTHONHASHSEED"] = "0"  # xdist needs the same collection in every worker
    if ctx.has("pytest_timeout"):
        argv += ["--timeout", "300"]
    rc, cut, _ = run_cmd(ctx, "cuda-tests", argv, timeout, env=ctx.env(**extra))
    counts = junit_counts(junit)
    result = pytest_verdict(rc, cut, counts, "CUDA tests" + (" (xdist)" if ctx.has("xdist") else ""))
    return _fail_cuda_skips(ctx, counts, result)


def _fail_cuda_skips(ctx: Ctx, counts: dict, result: Result) -> Result:
    """On a GPU machine a test skipped for want of CUDA means the build or the device is not what the check assumes."""
    no_cuda = {r: n for r, n in counts.get("skip_reasons", {}).items()
               if re.search(r"needs a CUDA|no CUDA|CUDA GPU|not built for|without CUDA", r)}
    if ctx.gpu and no_cuda:
        result.status = "failed"
        result.detail += "; skipped for want of CUDA on a GPU machine: " + "; ".join(f"{n}x {r}" for r, n in no_cuda.items())
    return result


_BLOCK_START = re.compile(r"^========= (?!\s)(?!ERROR SUMMARY|RACECHECK SUMMARY|LEAK SUMMARY|Target application|COMPUTE-SANITIZER)(.+)$")


def sanitizer_findings(text: str) -> dict:
    """Split a compute-sanitizer log into reports; a report is ours when its frames name the mmer_ext namespace."""
    blocks: list[list[str]] = []
    for line in text.splitlines():
        if _BLOCK_START.match(line):
            blocks.append([line])
        elif blocks and line.startswith("=========     "):
            blocks[-1].append(line)
    ours = [b for b in blocks if any("mmer_ext" in ln for ln in b)]
    summary = re.findall(r"(?:ERROR|RACECHECK) SUMMARY: (\d+)", text)
    return {"reports": len(blocks), "ours": len(ours), "others": len(blocks) - len(ours),
            "error_summary": [int(s) for s in summary], "first_ours": ["\n".join(b[:6]) for b in ours[:5]],
            "first_others": ["\n".join(b[:4]) for b in blocks if b not in ours][:3]}


def _merge_counts(parts: list[dict]) -> dict:
    merged: dict = {}
    for c in parts:
        for k, v in c.items():
            if isinstance(v, (int, float)):
                merged[k] = merged.get(k, 0) + v
            elif isinstance(v, list):
                merged[k] = merged.get(k, []) + v
    return merged


def make_sanitizer_stage(tool: str) -> Callable[[Ctx, float], Result]:
    def run(ctx: Ctx, timeout: float) -> Result:
        sanitizer = ctx.facts.get("compute_sanitizer")
        if not sanitizer:
            return Result("unavailable", "compute-sanitizer not found on this machine")
        subset = K.sanitizer_subset()
        # Every tensor its own cudaMalloc, so an access past its end is outside any allocation. A CUDA-graph capture
        # cannot allocate that way (cudaMalloc is refused while a stream captures), so the capture tests run in a
        # second pass with torch's caching allocator.
        parts = [("", [t for t in subset if t not in K.GRAPH_TESTS], {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}, 0.7),
                 ("-graphs", [t for t in subset if t in K.GRAPH_TESTS], {}, 1.0)]
        t_end = time.monotonic() + timeout
        texts, counts, rcs, cut_any, logs = [], [], [], False, []
        for suffix, ids, extra_env, share in parts:
            left = t_end - time.monotonic()
            if not ids or left < 5:
                cut_any = cut_any or bool(ids)
                continue
            report = ctx.work / f"{tool}{suffix}.log"
            junit = ctx.work / f"junit-{tool}{suffix}.xml"
            for p in (report, junit):
                p.unlink(missing_ok=True)
            argv = [sanitizer, "--tool", tool, "--log-file", str(report), "--print-limit", "100"]
            # initcheck must see every kernel's writes, or memory a torch kernel initialised reads as uninitialised
            # in ours; memcheck and racecheck need only instrument our kernels (much faster around torch's own).
            if tool != "initcheck" and ctx.facts.get("sanitizer_kernel_filter"):
                argv += ["--kernel-name", "kns=mmer_ext"]
            argv += ctx.pytest() + ["-q", "--junitxml", str(junit), *ids]
            if ctx.has("pytest_timeout"):
                argv += ["--timeout", "600"]
            rc, cut, path = run_cmd(ctx, f"{tool}{suffix}", argv, left * share, env=ctx.env(**extra_env))
            text = report.read_text(errors="replace") if report.exists() else ""
            if "Device not supported" in text or "Device not supported" in tail(path, 40):
                return Result("unavailable", f"{tool}: compute-sanitizer does not support this device/runtime here")
            texts.append(text)
            counts.append(junit_counts(junit))
            rcs.append(rc)
            cut_any = cut_any or cut
            logs.append(path)
        found = sanitizer_findings("\n".join(texts))
        merged = _merge_counts(counts)
        merged["skip_reasons"] = {r: n for c in counts for r, n in c.get("skip_reasons", {}).items()}
        rc = next((r for r in rcs if r != 0), 0)
        verdict = pytest_verdict(rc, cut_any, merged, f"{tool} subset")
        detail = f"{tool}: {found['ours']} reports in mmer_ext kernels, {found['others']} elsewhere; " + verdict.detail
        if found["ours"]:
            detail += "\n" + "\n".join(found["first_ours"][:2])
        status = "failed" if found["ours"] or verdict.status == "failed" else verdict.status
        return _fail_cuda_skips(ctx, merged, Result(status, detail, data={"findings": found, "junit": merged, "rc": rcs}))

    return run


def _bench(ctx: Ctx, name: str, files: tuple[str, ...], select: str, timeout: float) -> Result:
    ratios = ctx.work / f"{name}.json"
    ratios.unlink(missing_ok=True)
    argv = ctx.pytest() + ["-q", "--quick", "--ratios-json", str(ratios), "-k", select, *files]
    if ctx.has("pytest_benchmark"):
        argv += ["--benchmark-json", str(ctx.work / f"{name}-raw.json")]
    else:  # the same harness over a plain timing loop (tools/gpu_check_bench_shim.py)
        argv += ["-p", "gpu_check_bench_shim"]
    rc, cut, path = run_cmd(ctx, name, argv, timeout)
    if not ratios.exists():
        return Result("failed" if not cut else "cut", f"{name}: no ratio table written (pytest exit {rc}):\n" + tail(path))
    report = json.loads(ratios.read_text())
    timed = sum(1 for g in report["groups"].values() for r in g["impls"].values() if r.get("median_s") is not None)
    status = "failed" if rc != 0 and not cut else ("cut" if cut else "passed")
    detail = f"{name}: {timed} timings in {len(report['groups'])} groups" + ("" if ctx.has("pytest_benchmark")
                                                                              else " (plain timing shim)")
    if status == "failed":
        detail += f"; pytest exit {rc}:\n" + tail(path, 8)
    return Result(status, detail, data={"report": report})


def stage_bench_ops(ctx: Ctx, timeout: float) -> Result:
    return _bench(ctx, "bench-ops", BENCH_OPS_FILES, BENCH_OPS_SELECT, timeout)


def stage_bench_sampler(ctx: Ctx, timeout: float) -> Result:
    return _bench(ctx, "bench-sampler", BENCH_SAMPLER_FILES, BENCH_SAMPLER_SELECT, timeout)


STAGES = [
    Stage("env", 0, False, 60, 0, stage_env, "python, torch, GPU, nvcc, compute-sanitizer, optional packages"),
    Stage("build", 1, False, 300, 0, stage_build, "sm_90-only wheel, --no-build-isolation --no-deps, all cores"),
    Stage("collect", 2, False, 240, 0, stage_collect, "CUDA tests counted; subset and benchmark selections exist"),
    Stage("kernel-trace", 3, True, 60, 20, stage_kernel_trace, "every kernel launched by its listed tests"),
    Stage("cuda-tests", 4, True, 130, 60, stage_cuda_tests, "every CUDA test"),
    Stage("memcheck", 4, True, 130, 60, make_sanitizer_stage("memcheck"), "compute-sanitizer memcheck, subset"),
    Stage("racecheck", 4, True, 130, 60, make_sanitizer_stage("racecheck"), "compute-sanitizer racecheck, subset"),
    Stage("initcheck", 4, True, 130, 60, make_sanitizer_stage("initcheck"), "compute-sanitizer initcheck, subset",
          optional=True),
    Stage("bench-ops", 5, True, 90, 45, stage_bench_ops, "op benchmarks, small + large size, vs eager and compile"),
    Stage("bench-sampler", 6, True, 90, 30, stage_bench_sampler, "IMDer sampler with and without CUDA-graph replay"),
]


# ---- report ---------------------------------------------------------------------------------------------------------


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s * 1e9:.3g} ns"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _num(x: float | None, suffix: str = "") -> str:
    return "-" if x is None else f"{x:.0f}{suffix}"


def bench_table(report: dict) -> tuple[list[str], list[str]]:
    """Markdown rows per benchmark group, and the flags: losses to torch.compile, < 50 % of the copy ceiling."""
    rows = ["| group | ours | eager | compiled | eager/ours | compiled/ours | ours GB/s | % of copy |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    flags = []
    for name, g in report.get("groups", {}).items():
        impls, ratio = g["impls"], g.get("ratios", {})
        ours = impls.get("ours", {})
        pct = ours.get("pct_copy")
        rows.append(f"| {name} | {_fmt_s(ours.get('median_s'))} | {_fmt_s(impls.get('eager', {}).get('median_s'))} | "
                    f"{_fmt_s(impls.get('compiled', {}).get('median_s'))} | {_ratio(ratio.get('eager/ours'))} | "
                    f"{_ratio(ratio.get('compiled/ours'))} | {_num(ours.get('gbps'))} | {_num(pct, ' %')} |")
        for impl, rec in impls.items():
            if impl not in ("ours", "eager", "compiled"):
                rows.append(f"| {name} [{impl}] | {_fmt_s(rec.get('median_s'))} | | | "
                            f"{_ratio(ratio.get(impl + '/ours'))} (this/ours) | | {_num(rec.get('gbps'))} | |")
        c = ratio.get("compiled/ours")
        if c is not None and c < 1:
            flags.append(f"{name}: torch.compile is faster ({c:.2f}x of ours)")
        if pct is not None and pct < 50:
            flags.append(f"{name}: ours reaches {pct:.0f} % of the copy ceiling")
    return rows, flags


def write_outputs(ctx: Ctx, results: dict[str, Result], plan: list[str], started: float, out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    failed = [n for n, r in results.items() if r.status == "failed"]
    incomplete = [n for n, r in results.items() if r.status in ("skipped", "cut", "unavailable")]
    if not ctx.gpu:
        verdict = "REHEARSAL FAILED" if failed else "REHEARSAL PASSED (no GPU: the GPU stages did not run)"
    else:
        verdict = "FAILED" if failed else ("PASSED" if not incomplete else "PASSED (incomplete: see the skipped stages)")
    device = ctx.facts.get("device_name") or "no GPU (CPU rehearsal)"
    total = time.monotonic() - started
    md = [f"# GPU check: {verdict}", "",
          f"- device: **{device}**" + (f" (nvidia-smi: {ctx.facts['nvidia_smi']})" if ctx.facts.get("nvidia_smi") else ""),
          f"- mode: {'GPU' if ctx.gpu else 'CPU rehearsal (GPU stages skipped)'}; budget "
          f"{'none' if ctx.deadline is None else f'{ctx.args.budget:.0f} s'}; took {total:.0f} s",
          f"- python {ctx.facts.get('python')}, torch {ctx.facts.get('torch')} (CUDA {ctx.facts.get('torch_cuda')}), "
          f"nvcc: {ctx.facts.get('nvcc')}, compute-sanitizer: {ctx.facts.get('compute_sanitizer_version') or 'none'}",
          f"- repository commit: {ctx.facts.get('repo_commit')}; "
          f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", "",
          "| stage | status | seconds | detail |", "| --- | --- | --- | --- |"]
    for name, r in results.items():
        first = r.detail.splitlines()[0] if r.detail else ""
        md.append(f"| {name} | {r.status} | {r.seconds:.0f} | {first.replace('|', '/')} |")
    cov = results.get("kernel-trace", Result("skipped")).data.get("coverage")
    md += ["", "## Kernels", "", "| kernel | launched by (listed tests) | tests in the table |", "| --- | --- | --- |"]
    for kernel, tests in K.KERNEL_TESTS.items():
        if cov is None:
            launched = "not traced"
        else:
            launched = str(len(cov[kernel]["listed_and_launched"])) if cov[kernel]["listed_and_launched"] else "**none**"
        md.append(f"| {kernel} | {launched} | {len(tests)} |")
    bench_json = {}
    for name in ("bench-ops", "bench-sampler"):
        rep = results.get(name, Result("skipped")).data.get("report")
        if rep:
            bench_json[name] = rep
            rows, flags = bench_table(rep)
            copy = next((r.get("copy_ceiling_Bps") for g in rep["groups"].values() for r in g["impls"].values()
                         if r.get("copy_ceiling_Bps")), None)
            md += ["", f"## {name}" + (f" (copy ceiling measured in this run: {copy / 1e9:.0f} GB/s)" if copy else ""),
                   "", *rows]
            if flags:
                md += ["", "Flags:", *[f"- {f}" for f in flags]]
    long_details = [(n, r.detail) for n, r in results.items() if "\n" in r.detail]
    if long_details:
        md += ["", "## Details"]
        for n, d in long_details:
            md += ["", f"### {n}", "", "```", d[-6000:], "```"]
    md += ["", "## Plan", "", "```", *plan, "```", ""]
    files = {"summary.md": "\n".join(md)}
    files["gpu_check.json"] = json.dumps({
        "verdict": verdict, "device": device, "facts": ctx.facts, "seconds": total,
        "stages": {n: dataclasses.asdict(r) | {"data": {k: v for k, v in r.data.items() if k != "report"}}
                   for n, r in results.items()},
        "kernel_tests": K.KERNEL_TESTS, "extra_sanitizer_tests": K.EXTRA_SANITIZER_TESTS}, indent=1, default=str)
    if bench_json:
        files["benchmarks.json"] = json.dumps(bench_json, indent=1)
    reports = []
    for tool in ("memcheck", "racecheck", "initcheck"):
        for p in (ctx.work / f"{tool}.log", ctx.work / f"{tool}-graphs.log"):
            if p.exists():
                reports.append(f"##### {p.stem}\n" + p.read_text(errors="replace")[-MAX_REPORT_BYTES // 6:])
    if reports:
        files["sanitizer-reports.txt"] = "\n".join(reports)
    for name, text in files.items():
        (out / name).write_text(text)
    junit = ctx.work / "junit-cuda-tests.xml"
    if junit.exists() and junit.stat().st_size < 16 << 20:
        shutil.copy(junit, out / junit.name)
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        for p in sorted(ctx.work.glob("*.xml")) + sorted(ctx.work.glob("*.json")) + sorted(ctx.work.glob("*.log")):
            tar.add(p, arcname=p.name)
        if (ctx.work / "logs").exists():
            tar.add(ctx.work / "logs", arcname="logs")
    log(f"verdict: {verdict}; failed: {', '.join(failed) or 'none'}; not run or cut: {', '.join(incomplete) or 'none'}")
    log(f"outputs in {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    (out / "gpu_check.log").write_text(log.buf.getvalue())
    return 1 if failed else 0


# ---- driver ---------------------------------------------------------------------------------------------------------


def make_plan(args: argparse.Namespace, gpu: bool | None, budget: float | None) -> list[str]:
    lines = [f"python: {args.python}; mode: {'GPU' if gpu else 'CPU rehearsal' if gpu is False else 'GPU if one is visible'}"
             f"; budget: {'none' if budget is None else f'{budget:.0f} s'}; work dir: {args.work_dir}",
             "stage          group  cap s  min s  needs  what"]
    for s in STAGES:
        lines.append(f"{s.name:<14} {s.group:>5}  {s.cap_s:>5.0f}  {s.min_s:>5.0f}  {'GPU' if s.needs_gpu else 'any':<5}  "
                     f"{s.summary}{' (if time allows)' if s.optional else ''}")
    lines.append(f"CUDA tests: -k '{K.CUDA_TEST_KEYWORD}' over {len(K.CUDA_TEST_FILES)} files")
    lines.append(f"sanitizer subset ({len(K.sanitizer_subset())} tests, {len(K.KERNEL_TESTS)} kernels):")
    lines += [f"  {t}" for t in K.sanitizer_subset()]
    lines.append(f"bench-ops: -k '{BENCH_OPS_SELECT}' over {', '.join(BENCH_OPS_FILES)}")
    lines.append(f"bench-sampler: -k '{BENCH_SAMPLER_SELECT}' over {', '.join(BENCH_SAMPLER_FILES)}")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="folder for the results (at most 8 files)")
    p.add_argument("--budget", type=float, default=None,
                   help=f"hard time budget in seconds (default {DEFAULT_GPU_BUDGET_S} with a GPU, none without)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--mode", choices=("auto", "gpu", "cpu"), default="auto",
                   help="gpu: fail if no GPU is visible; cpu: the rehearsal even where a GPU is visible")
    p.add_argument("--python", default=sys.executable, help="the interpreter whose torch to build against and test")
    p.add_argument("--build-dir", default=None, help="CMake build dir (default build/gpu-check-sm90; incremental)")
    p.add_argument("--work-dir", type=Path, default=REPO / "build" / "gpu-check-work")
    p.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (default: all cores)")
    p.add_argument("--only", default="", help="comma-separated stages to run (env and build always run)")
    p.add_argument("--skip", default="", help="comma-separated stages to leave out")
    args = p.parse_args(argv)
    names = {s.name for s in STAGES}
    for opt in ("only", "skip"):
        bad = [n for n in filter(None, getattr(args, opt).split(",")) if n not in names]
        if bad:
            p.error(f"--{opt}: unknown stage(s) {', '.join(bad)}; stages: {', '.join(s.name for s in STAGES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    if args.dry_run:
        for line in make_plan(args, None if args.mode == "auto" else args.mode == "gpu", args.budget):
            print(line)
        return 0
    work = args.work_dir = args.work_dir.resolve()
    args.out = args.out.resolve()
    for name in OUT_FILES:  # a reused output folder must not mix two runs
        (args.out / name).unlink(missing_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ctx = Ctx(args, args.python, work, work / "site", gpu=False, deadline=None)
    results: dict[str, Result] = {}
    only = set(filter(None, args.only.split(","))) | {"env", "build"} if args.only else None
    skip = set(filter(None, args.skip.split(",")))
    plan: list[str] = []
    try:
        for group in sorted({s.group for s in STAGES}):
            stages = [s for s in STAGES if s.group == group]
            runnable = []
            for s in stages:
                left = ctx.remaining()
                later_min = sum(t.min_s for t in STAGES if t.group > group and not t.optional
                                and (not t.needs_gpu or ctx.gpu))
                reason = None
                if s.name in skip or (only is not None and s.name not in only):
                    reason = "left out by --only/--skip"
                elif s.needs_gpu and not ctx.gpu:
                    reason = "needs a GPU"
                elif s.name != "env" and any(results.get(n) and results[n].status == "failed" for n in ("env", "build")):
                    reason = "the build or the environment failed"
                elif left < s.min_s:
                    reason = f"budget: {left:.0f} s left, the stage needs at least {s.min_s:.0f} s"
                elif s.optional and left < min(s.cap_s, left) + later_min:
                    reason = f"budget: {left:.0f} s left, keeping {later_min:.0f} s for the later stages"
                if reason:
                    results[s.name] = Result("skipped", reason)
                    log(f"{s.name}: skipped ({reason})")
                else:
                    runnable.append(s)
            if not runnable:
                continue
            threads, group_results = [], {}

            def work_on(stage: Stage) -> None:
                # Caps are sized for the GPU machine; without a budget (the rehearsal) an hour guards against hangs.
                timeout = 3600.0 if ctx.deadline is None else min(stage.cap_s, max(ctx.remaining(), stage.min_s))
                log(f"{stage.name}: started (cap {timeout:.0f} s)")
                t0 = time.monotonic()
                try:
                    res = stage.run(ctx, timeout)
                except Exception as e:  # noqa: BLE001  (a broken stage is reported, the others still run)
                    res = Result("failed", f"{type(e).__name__}: {e}")
                res.seconds = time.monotonic() - t0
                group_results[stage.name] = res
                log(f"{stage.name}: {res.status.upper()} in {res.seconds:.0f} s — {res.detail.splitlines()[0] if res.detail else ''}")

            for s in runnable:
                t = threading.Thread(target=work_on, args=(s,))
                t.start()
                threads.append(t)
            for t in threads:
                t.join()
            for s in stages:
                if s.name in group_results:
                    results[s.name] = group_results[s.name]
            if group == 0:
                # After the environment is known: the mode, the budget and the plan.
                ctx.gpu = bool(ctx.facts.get("gpu_available")) and args.mode != "cpu"
                if args.mode == "gpu" and not ctx.gpu:
                    results["env"] = Result("failed", "--mode gpu, but torch sees no GPU")
                budget = args.budget if args.budget is not None else (DEFAULT_GPU_BUDGET_S if ctx.gpu else None)
                ctx.args.budget = budget
                ctx.deadline = None if budget is None else started + budget
                plan = make_plan(args, ctx.gpu, budget)
                for line in plan:
                    log(line)
        results = {s.name: results[s.name] for s in STAGES if s.name in results}
    finally:
        status = write_outputs(ctx, results, plan, started, args.out)
    return status


if __name__ == "__main__":
    sys.exit(main())
