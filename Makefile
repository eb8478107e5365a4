# ddpm_fast developer commands. Every target works from a fresh clone: when no virtualenv is
# active it creates .venv, installs torch and the package (building the C++/CUDA extension), then
# runs. TORCH_CUDA_ARCH_LIST picks the CUDA archs (default 8.0;9.0+PTX where a GPU is visible; none,
# CPU kernels only, where none is: setup.py's skip_cuda; CI sets 8.0;9.0).
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.14.1
ifdef VIRTUAL_ENV
PY := python
else
PY := $(VENV)/bin/python
endif
STAMP := build/.installed-$(subst /,_,$(abspath $(PY)))
TEST_STAMP := build/.test-deps-$(subst /,_,$(abspath $(PY)))
SOURCES := setup.py CMakeLists.txt pyproject.toml $(shell find csrc -type f 2>/dev/null)
# Two pytest workers (pytest-xdist), whole files per worker (module fixtures such as the SIMT
# build run once): the suite is mostly single-threaded Python and C++ calls, so on a 2-core machine
# two workers take about half the time of one. PYTEST_WORKERS=0 runs in one process.
PYTEST_WORKERS ?= 2
PYTEST_ARGS ?= $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile)

.PHONY: install test demo bench bench-quick bench-compare gpu-check clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip

# Two stamps: the package (torch, the build, the runtime dependencies: all `make demo` needs) and
# the test/benchmark dependencies (pyproject's [test] extra, installed by name so that adding them
# does not rebuild the extension).
$(STAMP): $(SOURCES) | $(PY)
	$(PY) -m pip install -q torch==$(TORCH_VERSION) "cmake>=3.26" ninja pybind11 "setuptools>=68" wheel
	$(PY) -m pip install -q --no-build-isolation -e .
	@mkdir -p build && touch $@

$(TEST_STAMP): $(STAMP) pyproject.toml
	$(PY) -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['test']))" \
		| xargs -d '\n' $(PY) -m pip install -q
	@touch $@

install: $(TEST_STAMP)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m ddpm_fast.cli demo --out samples.npz --grid samples.png

# The full suite: JSON + markdown table under benchmarks/results/<device>-<date>.*
# (on a GPU machine build for its arch first, e.g. TORCH_CUDA_ARCH_LIST=9.0 make bench;
# COMPILE=1 also benchmarks torch.compile of the reference U-Net).
bench: install
	$(PY) -m ddpm_fast.benchreport run $(if $(COMPILE),-- --compile)

# CI variant: few rounds, small shapes; fails when a fused path is < 0.8x its reference.
bench-quick: install
	$(PY) -m ddpm_fast.benchreport run --quick --out-dir build/bench --min-speedup 0.8

# pytest-benchmark's comparison against the last saved run of this machine.
bench-compare: install
	$(PY) -m pytest benchmarks -q --benchmark-autosave --benchmark-storage=file://build/bench-history \
		--benchmark-compare --benchmark-columns=median,iqr

# The GPU acceptance run (benchmarks/gpu_check.py; README "GPU acceptance run"): on a CUDA machine it
# builds for the local GPU with the python and torch that are there (no venv, no download), runs the
# cuda tests, the GPU benchmarks with the speed gate, compute-sanitizer and the end-to-end checks in
# about 8 minutes; without a GPU it runs its dry run. Results: $$DDPM_FAST_GPU_CHECK_DIR (default
# build/gpu-check). GPU_CHECK_ARGS: e.g. --skip sanitizer, --dry-run.
GPU_CHECK_PYTHON ?= $(if $(VIRTUAL_ENV),python,python3)
gpu-check:
	$(GPU_CHECK_PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf build dist *.egg-info ddpm_fast/_C*.so

# Reproduce the bundled digits model (ddpm_fast/assets/digits.*): a time-boxed CPU run (resumes
# from runs/digits/checkpoint.pt when interrupted), then its EMA weights are exported.
.PHONY: train-demo
train-demo: install
	$(PY) -m ddpm_fast.train --out runs/digits --steps 7060 --minutes 60 --threads 2 --export ddpm_fast/assets --name digits
