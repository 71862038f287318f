# The README's commands. Each sets up what it needs on a fresh machine: a virtual environment with torch,
# the build and test dependencies, and mmer_ext built from this tree.
#
#   make demo      the main job: train and compare baseline, augmented, MMIN, IF-MMIN and NMER on the embedded
#                  synthetic data, then MMGCN and IMDer (~15 min on 2 cores); report.md and figures land in runs/demo/
#   make test      the whole test suite (and the benchmarks once each, as a smoke test)
#   make bench     the benchmarks with full timing; the report ends with a ratio summary (ours vs eager vs compiled)
#   make bench-reference  the same, kept: benchmarks/results/cpu-<host>-<date>.json and .md (machine, CPU, cores,
#                  torch version, load), to compare a later change with
#   make wheel     a wheel for this torch in dist/
#   make test-cpu  the same tests in a second environment with the CPU-only torch 2.13.0
#   make gpu-check on a lent GPU machine, with its own python3/torch (nothing is installed): the sm_90 build, every
#                  CUDA test, compute-sanitizer, the benchmarks, in a 7-minute budget; results in GPU_CHECK_OUT
#                  ($OUT where that is set, else build/gpu-check-out). Without a GPU: the CPU rehearsal.
#   make gpu-check-rehearsal  the same command with this venv's CUDA torch (what CI runs; no GPU needed)
#
# Variables: VENV (.venv), TORCH (torch==2.14.1), MMER_EXT_CUDA (AUTO | ON | OFF), PYTHON (python3),
# RATIOS_JSON (make bench also writes the ratio table there, e.g. benchmarks/results/<device>-<date>.json, and
# its markdown next to it), BENCH_ARGS (extra pytest arguments for bench / bench-reference, e.g. "-k small"),
# BENCH_REFERENCE (bench-reference's JSON path).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1
MMER_EXT_CUDA ?= AUTO
export MMER_EXT_CUDA

PY := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest
# One build directory per environment: CMake caches the torch it was configured against.
BUILD_DIR := build/$(notdir $(VENV))
DEPS_STAMP := $(VENV)/.mmer_ext-deps

GPU_CHECK_OUT ?= $(or $(OUT),build/gpu-check-out)
GPU_CHECK_ARGS ?=

BENCH_ARGS ?=
BENCH_REFERENCE ?= benchmarks/results/cpu-$(shell hostname -s)-$(shell date -u +%Y-%m-%d).json

.PHONY: venv build test demo bench bench-reference wheel test-cpu gpu-check gpu-check-rehearsal clean

venv: $(DEPS_STAMP)

$(DEPS_STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	# The build requirements from pyproject.toml (torch is already in place: builds use --no-build-isolation).
	$(PY) -m pip install --quiet $$($(PY) -c "import tomllib; reqs = tomllib.load(open('pyproject.toml', 'rb'))['build-system']['requires']; print(' '.join(r for r in reqs if not r.startswith('torch')))") ninja
	touch $@

build: $(DEPS_STAMP)
	$(PY) -m pip install --quiet --no-build-isolation -C build-dir=$(BUILD_DIR) ".[test]"
	cd /tmp && $(abspath $(PY)) -m mmer_ext info

test: build
	$(PYTEST) python_tests
	$(PYTEST) benchmarks --benchmark-disable -q

demo: build
	$(VENV)/bin/mmer-ext demo --out runs/demo

bench: build
	$(PYTEST) benchmarks $(if $(RATIOS_JSON),--ratios-json $(RATIOS_JSON)) $(BENCH_ARGS)

# CPU only (CUDA_VISIBLE_DEVICES=""), so the file is the CPU reference even on a machine with a GPU.
bench-reference: build
	CUDA_VISIBLE_DEVICES= $(PYTEST) benchmarks --ratios-json $(BENCH_REFERENCE) $(BENCH_ARGS)

wheel: $(DEPS_STAMP)
	$(PY) -m pip wheel --no-build-isolation --no-deps -C build-dir=$(BUILD_DIR) -w dist .

test-cpu:
	$(MAKE) test VENV=.venv-cpu TORCH=torch==2.13.0 MMER_EXT_CUDA=AUTO

# No venv: the GPU machine has its python3 with torch and can install nothing (tools/gpu_check.py says what it needs).
gpu-check:
	$(PYTHON) tools/gpu_check.py $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

# After `make build` the venv holds the test dependencies the collection imports (the check builds its own sm_90 copy).
gpu-check-rehearsal: build
	$(PY) tools/gpu_check.py build/gpu-check-rehearsal --mode cpu $(GPU_CHECK_ARGS)

clean:
	rm -rf build dist .benchmarks
