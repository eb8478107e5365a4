# ddpm_fast developer commands. Every target works from a fresh clone: when no virtualenv is
# active it creates .venv, installs torch and the package (building the C++/CUDA extension), then
# runs. TORCH_CUDA_ARCH_LIST picks the CUDA archs (default 8.0;9.0+PTX; CI uses 9.0 alone).
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.14.1
ifdef VIRTUAL_ENV
PY := python
else
PY := $(VENV)/bin/python
endif
STAMP := build/.installed-$(subst /,_,$(abspath $(PY)))
SOURCES := setup.py CMakeLists.txt pyproject.toml $(shell find csrc -type f 2>/dev/null)
PYTEST_ARGS ?=

.PHONY: install test test-fast demo bench bench-quick bench-compare clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip

$(STAMP): $(SOURCES) | $(PY)
	$(PY) -m pip install -q torch==$(TORCH_VERSION) "cmake>=3.26" ninja pybind11 "setuptools>=68" wheel
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	@mkdir -p build && touch $@

install: $(STAMP)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: install
	$(PY) -m ddpm_fast.cli demo

bench: install
	$(PY) -m pytest benchmarks -q

bench-quick: install
	$(PY) -m pytest benchmarks -q

clean:
	rm -rf build dist *.egg-info ddpm_fast/_C*.so

# Reproduce the bundled digits model (ddpm_fast/assets/digits.*): a time-boxed CPU run (resumes
# from runs/digits/checkpoint.pt when interrupted), then its EMA weights are exported.
.PHONY: train-demo
train-demo: install
	$(PY) -m ddpm_fast.train --out runs/digits --minutes 50 --threads 1 --export ddpm_fast/assets --name digits
