# The two quick-start commands of the README:
#   make demo   set up, then run the distillation demo on its embedded default
#   make test   set up, then run the whole test suite
# Set-up is a virtual environment in .venv with torch's CPU wheel, the pinned dependencies and
# fastkd itself installed editable (which builds the C++ extension with CMake).
#
#   make cuda-check  without a GPU: builds fastkd with its CUDA kernels against a CUDA torch in
#                    .venv-cuda and checks the library (tools/cuda_check.py; docs/design.md §6)
#   make gpu-check   on a machine with a CUDA GPU: fastkd check-gpu (correctness, benchmarks)

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fastkd-installed
# The CUDA torch's own venv. fastkd goes in non-editable: an editable install would write its
# fastkd/_C*.so into the source tree, over the one .venv imports.
CUDA_VENV := .venv-cuda
CUDA_BIN := $(CUDA_VENV)/bin
CUDA_TORCH := torch==2.14.1
CUDA_STAMP := $(CUDA_VENV)/.torch-installed
NATIVE_SOURCES := $(shell find csrc -type f) CMakeLists.txt setup.py pyproject.toml constraints.txt

.PHONY: setup demo test lint cuda-check gpu-check clean

$(STAMP): $(NATIVE_SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt setuptools
	$(BIN)/python -m pip install -q -c constraints.txt --no-build-isolation -e ".[train,test,bench]"
	touch $@

setup: $(STAMP)

demo: setup
	$(BIN)/fastkd demo $(ARGS)

test: setup
	$(BIN)/python -m pytest $(ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

$(CUDA_STAMP):
	test -x $(CUDA_BIN)/python || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_BIN)/python -m pip install -q --upgrade pip
	$(CUDA_BIN)/python -m pip install -q $(CUDA_TORCH)
	$(CUDA_BIN)/python -m pip install -q -c constraints.txt numpy
	touch $@

# Reinstalls every time; the CMake build directory (one per torch build) keeps it incremental.
cuda-check: $(CUDA_STAMP)
	$(CUDA_BIN)/python -m pip install -q --no-build-isolation --no-deps .
	$(CUDA_BIN)/python tools/cuda_check.py

gpu-check: setup
	$(BIN)/python -m fastkd check-gpu $(ARGS)

clean:
	rm -rf build $(VENV) $(CUDA_VENV) fastkd/_C*.so
