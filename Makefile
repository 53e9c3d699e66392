# The two quick-start commands of the README:
#   make demo   set up, then run the distillation demo on its embedded default
#   make test   set up, then run the whole test suite
# Set-up is a virtual environment in .venv with torch's CPU wheel, the pinned dependencies and
# fastkd itself installed editable (which builds the C++ extension with CMake).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fastkd-installed
NATIVE_SOURCES := $(shell find csrc -type f) CMakeLists.txt setup.py pyproject.toml constraints.txt

.PHONY: setup demo test lint bench-quick clean

$(STAMP): $(NATIVE_SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt setuptools
	$(BIN)/python -m pip install -q -c constraints.txt --no-build-isolation -e ".[train,test]"
	touch $@

setup: $(STAMP)

demo: setup
	$(BIN)/fastkd demo $(ARGS)

test: setup
	$(BIN)/python -m pytest $(ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf build $(VENV) fastkd/_C*.so
