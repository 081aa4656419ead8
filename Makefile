# The two set-up commands of the README: `make demo` (the main job on the embedded
# default) and `make test` (the whole suite). Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.monte-ds-installed

.PHONY: demo test install

install: $(STAMP)

# A torch already importable by $(PYTHON) (e.g. a CUDA build) is kept: the venv then
# sees the system site-packages. Otherwise torch is installed first, so that pip does
# not resolve it through another package and pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python launch/train.py --config configs/tiny.json

test: $(STAMP)
	$(BIN)/python -m pytest -q tests
