"""`snakemake --use-conda` plans every rule with its pinned environment; `snakemake --lint` is clean.

No conda can be installed on the test machines, so a stub `conda` on PATH answers the three questions
Snakemake asks before planning (`--version`, `info --json`, `config --get channel_priority`). Without
it, `--use-conda` must stop at once: that proves the stub, not a silent fallback, is what is exercised.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import yaml
from _workflow import ROOT, copy_workflow, snakemake

STUB = """#!/bin/sh
echo "$*" >> "{calls}"
case "$1" in
  --version) echo "conda 24.9.2" ;;
  info) echo '{{"conda_prefix": "{prefix}", "root_prefix": "{prefix}", "platform": "linux-64", \
          "envs_dirs": ["{prefix}/envs"], "pkgs_dirs": ["{prefix}/pkgs"], "conda_version": "24.9.2"}}' ;;
  config) echo '{{"get": {{"channel_priority": "strict"}}}}' ;;
  *) echo "stub conda cannot: $*" >&2; exit 1 ;;
esac
"""
RULES = {"fetch_model", "quantize", "make_task_data", "finetune", "replay", "evaluate", "export"}
EXPERIMENT_RULES = {"finetune", "replay", "experiment_summary"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_workflow(tmp_path_factory.mktemp("conda") / "workflow")


def _stub_path(tmp_path: Path) -> tuple[dict[str, str], Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    stub = bin_dir / "conda"
    stub.write_text(STUB.format(calls=calls, prefix=tmp_path / "conda"))
    stub.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, calls


def test_dry_run_with_conda_plans_every_rule(workdir: Path, tmp_path: Path) -> None:
    env, calls = _stub_path(tmp_path)
    result = snakemake(workdir, "-n", "--use-conda", "--cores", "2", env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "Conda environment envs/qes.yaml will be created" in out
    planned = set(re.findall(r"^rule (\w+):", out, flags=re.M)) - {"all"}
    assert planned == RULES
    assert "info --json" in calls.read_text()
    experiments = snakemake(workdir, "-n", "--use-conda", "--cores", "2", "experiments", env=env)
    assert experiments.returncode == 0, experiments.stderr[-3000:]
    planned = set(re.findall(r"^rule (\w+):", experiments.stdout + experiments.stderr, flags=re.M))
    assert planned >= EXPERIMENT_RULES
    listed = snakemake(workdir, "--list-conda-envs", "--use-conda", "--cores", "1", env=env)
    assert listed.returncode == 0 and "envs/qes.yaml" in listed.stdout


def test_every_rule_declares_the_environment() -> None:
    for smk in sorted((ROOT / "rules").glob("*.smk")):
        blocks = re.split(r"^rule ", smk.read_text(), flags=re.M)[1:]
        for block in blocks:
            name = block.split(":", 1)[0]
            if "script:" not in block and "shell:" not in block:
                continue  # a target rule: it runs nothing
            assert 'conda:\n        "../envs/qes.yaml"' in block, f"rule {name} in {smk.name} has no conda env"


def test_without_conda_use_conda_stops_with_a_clear_error(workdir: Path, tmp_path: Path) -> None:
    if shutil.which("conda", path="/usr/bin:/bin"):
        pytest.skip("a real conda is installed in /usr/bin")
    result = snakemake(workdir, "-n", "--use-conda", "--cores", "2", env={"PATH": "/usr/bin:/bin"})
    assert result.returncode != 0
    assert "Error running conda info" in result.stdout + result.stderr


def test_env_pins_match_the_setup_pins() -> None:
    """envs/qes.yaml pins (exact ==) the same versions that `make setup` installs and the tests use."""
    pinned = {}
    for name in ("torch.txt", "pinned.txt"):
        for line in (ROOT / "requirements" / name).read_text().splitlines():
            if "==" in line and not line.startswith("#"):
                package, version = line.split("==")
                pinned[package.strip().lower().replace("_", "-")] = version.strip()
    env = yaml.safe_load((ROOT / "envs" / "qes.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pip, "envs/qes.yaml has an empty pip section"
    for requirement in pip:
        package, sep, version = requirement.partition("==")
        assert sep, f"envs/qes.yaml: {requirement!r} is not pinned with =="
        key = package.strip().lower().replace("_", "-")
        assert pinned.get(key) == version, f"envs/qes.yaml pins {requirement}, requirements/ pin {pinned.get(key)}"
    assert {"snakemake", "pyarrow", "gptqmodel", "transformers"} <= {p.lower() for p in pinned}


def test_snakemake_lint_is_clean(workdir: Path) -> None:
    result = snakemake(workdir, "--lint")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Congratulations, your workflow is in a good condition" in result.stdout + result.stderr
