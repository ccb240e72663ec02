# make run   -- set up .venv and run the workflow on the embedded default config
# make test  -- set up .venv and run the test suite
# make lint  -- ruff, snakefmt and snakemake --lint

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.qes-setup-stamp
CORES ?= all
PYTEST_ARGS ?=

export GPTQMODEL_CPU_WORKERS ?= $(shell nproc 2>/dev/null || echo 2)
export TOKENIZERS_PARALLELISM ?= false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup run test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/torch.txt requirements/pinned.txt requirements/no-deps.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements/torch.txt
	$(BIN)/python -m pip install --quiet -r requirements/pinned.txt -c requirements/torch.txt
	$(BIN)/python -m pip install --quiet --no-deps -r requirements/no-deps.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

run: setup
	$(BIN)/snakemake --cores $(CORES)
	$(BIN)/snakemake --cores $(CORES) --report results/report.html

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/snakefmt --check .
	$(BIN)/snakemake --lint

clean:
	rm -rf results logs benchmarks/fetch_model benchmarks/quantize .snakemake
