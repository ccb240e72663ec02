# make run   -- set up .venv and run the workflow on the embedded default config
# make test  -- set up .venv and run the test suite
# make lint  -- ruff, snakefmt and snakemake --lint
#
# The torch build is chosen by QES_TORCH (auto, cpu, cuda or cu126; see requirements/torch.txt):
#   make setup QES_TORCH=cuda     # CUDA 13 from PyPI (NVIDIA driver >= 580), e.g. on a login node without a GPU
#   make setup QES_TORCH=cu126    # CUDA 12.6 from the PyTorch index, for drivers 525 to 575
# auto (the default) runs envs/torch-build.sh: cpu when `nvidia-smi -L` lists no GPU, else cuda or cu126 by the
# driver version nvidia-smi reports. The variant is recorded in the set-up stamp: a make call that resolves to
# another variant reinstalls torch (export QES_TORCH to keep one).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
CORES ?= all
PYTEST_ARGS ?=

QES_TORCH ?= auto
TORCH_VERSION := 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_CU126_INDEX ?= https://download.pytorch.org/whl/cu126
ifeq ($(QES_TORCH),auto)
TORCH_VARIANT := $(shell sh envs/torch-build.sh)
else
TORCH_VARIANT := $(QES_TORCH)
endif
ifeq ($(filter $(TORCH_VARIANT),cpu cuda cu126),)
$(error QES_TORCH must be auto, cpu, cuda or cu126, not '$(QES_TORCH)')
endif
STAMP := $(VENV)/.qes-setup-stamp-$(TORCH_VARIANT)
DEV_STAMP := $(VENV)/.qes-dev-stamp
# Packages only the CUDA builds of torch pull in; a switch to another build removes them (several GB), so
# CUDA 12 and CUDA 13 runtime wheels never sit side by side.
CUDA_ONLY := ^(nvidia-|triton==|cuda-toolkit==|cuda-bindings==|cuda-pathfinder==)
define remove_cuda_packages
	$(PIP) list --format=freeze | grep -E '$(CUDA_ONLY)' | cut -d= -f1 | xargs -r $(PIP) uninstall --quiet -y
endef

# cpu: the local wheel if pip's find-links has one, else the PyTorch CPU index. Its dependencies come with
# requirements/pinned.txt. cuda: exactly 2.13.0 (`===` refuses local builds such as 2.13.0+cpu) from PyPI.
# cu126: 2.13.0+cu126 from the PyTorch CUDA 12.6 index, its nvidia-*-cu12 wheels from pip's own index.
define torch_install_cpu
	$(remove_cuda_packages)
	$(PIP) install --quiet --no-index --no-deps torch==$(TORCH_VERSION)+cpu 2>/dev/null \
	  || { echo "no local torch $(TORCH_VERSION)+cpu wheel: installing it from $(TORCH_CPU_INDEX)"; \
	       $(PIP) install --quiet --no-deps --index-url $(TORCH_CPU_INDEX) torch==$(TORCH_VERSION)+cpu; }
endef
define torch_install_cuda
	$(PIP) install --quiet "torch===$(TORCH_VERSION)"
endef
define torch_install_cu126
	$(PIP) install --quiet --extra-index-url $(TORCH_CU126_INDEX) torch==$(TORCH_VERSION)+cu126
endef

export GPTQMODEL_CPU_WORKERS ?= $(shell nproc 2>/dev/null || echo 2)
export TOKENIZERS_PARALLELISM ?= false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup setup-dev run test lint clean

setup: $(STAMP)

# Test and lint tools: only `make test` and `make lint` install them; `make run` needs none of them.
setup-dev: $(DEV_STAMP)

$(DEV_STAMP): $(STAMP) requirements/dev.txt
	$(PIP) install --quiet -r requirements/dev.txt -c requirements/pinned.txt -c requirements/torch.txt
	touch $@

$(STAMP): pyproject.toml requirements/torch.txt requirements/pinned.txt requirements/no-deps.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if ls $(VENV)/.qes-setup-stamp-* 2>/dev/null | grep -qv -- '-$(TORCH_VARIANT)$$'; then $(remove_cuda_packages); fi
	rm -f $(VENV)/.qes-setup-stamp* $(DEV_STAMP)
	@echo "installing torch $(TORCH_VERSION) ($(TORCH_VARIANT) build, QES_TORCH=$(QES_TORCH))"
	$(torch_install_$(TORCH_VARIANT))
	$(PIP) install --quiet -r requirements/pinned.txt -c requirements/torch.txt
	$(PIP) install --quiet --no-deps -r requirements/no-deps.txt
	$(PIP) install --quiet --no-deps -e .
	touch $@

run: setup
	$(BIN)/snakemake --cores $(CORES)
	$(BIN)/snakemake --cores $(CORES) --report results/report.html

test: setup-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup-dev
	$(BIN)/ruff check .
	$(BIN)/snakefmt --check .
	$(BIN)/snakemake --lint

clean:
	rm -rf results logs benchmarks/fetch_model benchmarks/quantize .snakemake
