"""`snakemake --use-conda` plans every rule with its pinned environment; `snakemake --lint` is clean.

No conda can be installed on the test machines, so a stub `conda` on PATH answers the three questions
Snakemake asks before planning (`--version`, `info --json`, `config --get channel_priority`). Without
it, `--use-conda` must stop at once: that proves the stub, not a silent fallback, is what is exercised.
The environment follows the resolved device: envs/qes-cpu.yaml (torch's CPU build), envs/qes-cuda.yaml
(CUDA 13) or envs/qes-cu126.yaml (CUDA 12.6); a stub `nvidia-smi` that lists a GPU with a given driver, or
fails, decides what `device: auto` and `conda.cuda_build: auto` resolve to, for the workflow and the Makefile.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
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
GPU_WITH_DRIVER = """#!/bin/sh
case "$*" in
  *--query-gpu=driver_version*) echo '{driver}' ;;
  *) echo 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0a1b2c3d-0000-0000-0000)' ;;
esac
"""
NVIDIA_SMI = {
    "gpu": "#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0a1b2c3d-0000-0000-0000)'\n",
    "driver-580": GPU_WITH_DRIVER.format(driver="580.65.06"),
    "driver-550": GPU_WITH_DRIVER.format(driver="550.54.15"),
    "none": "#!/bin/sh\necho 'No devices were found'\nexit 6\n",
}
RULES = {"fetch_model", "quantize", "make_task_data", "finetune", "replay", "evaluate", "export"}
EXPERIMENT_RULES = {"finetune", "experiment_point", "experiment_summary"}
ENVS = ("qes-cpu.yaml", "qes-cuda.yaml", "qes-cu126.yaml")
CPU_INDEX = "--extra-index-url https://download.pytorch.org/whl/cpu"
CU126_INDEX = "--extra-index-url https://download.pytorch.org/whl/cu126"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_workflow(tmp_path_factory.mktemp("conda") / "workflow")


def _stub_path(tmp_path: Path, nvidia_smi: str = "none") -> tuple[dict[str, str], Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    stub = bin_dir / "conda"
    stub.write_text(STUB.format(calls=calls, prefix=tmp_path / "conda"))
    stub.chmod(0o755)
    (bin_dir / "nvidia-smi").write_text(NVIDIA_SMI[nvidia_smi])
    (bin_dir / "nvidia-smi").chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, calls


def test_dry_run_with_conda_plans_every_rule(workdir: Path, tmp_path: Path) -> None:
    env, calls = _stub_path(tmp_path)
    result = snakemake(workdir, "-n", "--use-conda", "--cores", "2", env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "Conda environment envs/qes-cpu.yaml will be created" in out
    assert "envs/qes-cuda.yaml" not in out
    planned = set(re.findall(r"^rule (\w+):", out, flags=re.M)) - {"all"}
    assert planned == RULES
    assert "info --json" in calls.read_text()
    experiments = snakemake(workdir, "-n", "--use-conda", "--cores", "2", "experiments", env=env)
    assert experiments.returncode == 0, experiments.stderr[-3000:]
    planned = set(re.findall(r"^rule (\w+):", experiments.stdout + experiments.stderr, flags=re.M))
    assert planned >= EXPERIMENT_RULES
    listed = snakemake(workdir, "--list-conda-envs", "--use-conda", "--cores", "1", env=env)
    assert listed.returncode == 0 and "envs/qes-cpu.yaml" in listed.stdout
    assert "envs/qes-cuda.yaml" not in listed.stdout


@pytest.mark.parametrize(
    ("nvidia_smi", "device", "build", "expected"),
    [
        ("gpu", "auto", "auto", "qes-cuda.yaml"),
        ("none", "cuda", "auto", "qes-cuda.yaml"),
        ("gpu", "cpu", "auto", "qes-cpu.yaml"),
        ("driver-580", "auto", "auto", "qes-cuda.yaml"),
        ("driver-550", "auto", "auto", "qes-cu126.yaml"),
        ("driver-550", "auto", "cu13", "qes-cuda.yaml"),
        ("none", "cuda", "cu126", "qes-cu126.yaml"),
    ],
    ids=["auto-with-gpu", "cuda", "cpu-with-gpu", "driver-580", "driver-550", "driver-550-cu13", "cuda-cu126"],
)
def test_environment_follows_the_resolved_device(
    workdir: Path, tmp_path: Path, nvidia_smi: str, device: str, build: str, expected: str
) -> None:
    env, _ = _stub_path(tmp_path, nvidia_smi)
    result = snakemake(workdir, "-n", "--use-conda", "--cores", "2", "--config", f"finetune={{device: {device}}}",
                       f"conda={{cuda_build: {build}}}", env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert f"Conda environment envs/{expected} will be created" in out
    for other in set(ENVS) - {expected}:
        assert f"envs/{other}" not in out
    planned = set(re.findall(r"^rule (\w+):", out, flags=re.M)) - {"all"}
    assert planned == RULES


def test_every_rule_declares_the_environment() -> None:
    for smk in sorted((ROOT / "rules").glob("*.smk")):
        blocks = re.split(r"^rule ", smk.read_text(), flags=re.M)[1:]
        for block in blocks:
            name = block.split(":", 1)[0]
            if "script:" not in block and "shell:" not in block:
                continue  # a target rule: it runs nothing
            assert "conda:\n        conda_env()" in block, f"rule {name} in {smk.name} has no conda env"


def test_without_conda_use_conda_stops_with_a_clear_error(workdir: Path, tmp_path: Path) -> None:
    if shutil.which("conda", path="/usr/bin:/bin"):
        pytest.skip("a real conda is installed in /usr/bin")
    result = snakemake(workdir, "-n", "--use-conda", "--cores", "2", env={"PATH": "/usr/bin:/bin"})
    assert result.returncode != 0
    assert "Error running conda info" in result.stdout + result.stderr


def _pip_section(name: str) -> list[str]:
    env = yaml.safe_load((ROOT / "envs" / name).read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pip, f"envs/{name} has an empty pip section"
    return pip


@pytest.mark.parametrize("name", ENVS)
def test_env_pins_match_the_setup_pins(name: str) -> None:
    """Each env pins (exact ==) the same versions that `make setup` installs and the tests use."""
    pinned = {}
    for requirements in ("torch.txt", "pinned.txt"):
        for line in (ROOT / "requirements" / requirements).read_text().splitlines():
            if "==" in line and not line.startswith("#"):
                package, version = line.split("==")
                pinned[package.strip().lower().replace("_", "-")] = version.strip()
    for requirement in _pip_section(name):
        if requirement.startswith("--"):
            continue  # an index option
        package, sep, version = requirement.partition("==")
        assert sep, f"envs/{name}: {requirement!r} is not pinned with =="
        key = package.strip().lower().replace("_", "-")
        public = version.split("+")[0] if key == "torch" else version
        assert pinned.get(key) == public, f"envs/{name} pins {requirement}, requirements/ pin {pinned.get(key)}"
    assert {"snakemake", "pyarrow", "gptqmodel", "transformers"} <= {p.lower() for p in pinned}


def test_cpu_and_cuda_envs_differ_only_in_the_torch_build() -> None:
    cpu, cuda, cu126 = (_pip_section(name) for name in ENVS)
    assert CPU_INDEX in cpu and "torch==2.13.0+cpu" in cpu
    assert not any(r.startswith("--") for r in cuda) and "torch==2.13.0" in cuda
    assert CU126_INDEX in cu126 and "torch==2.13.0+cu126" in cu126
    rest = {r for r in cpu if not r.startswith(("--", "torch=="))}
    assert rest == {r for r in cuda if not r.startswith("torch==")}
    assert rest == {r for r in cu126 if not r.startswith(("--", "torch=="))}
    for name in ENVS:
        script = ROOT / "envs" / name.replace(".yaml", ".post-deploy.sh")
        assert os.access(script, os.X_OK), f"{script.name} is missing or not executable"


def test_snakemake_lint_is_clean(workdir: Path) -> None:
    result = snakemake(workdir, "--lint")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Congratulations, your workflow is in a good condition" in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("nvidia_smi", "variant"),
    [("none", "cpu"), ("gpu", "cuda"), ("driver-580", "cuda"), ("driver-550", "cu126")],
)
def test_make_setup_installs_the_build_the_driver_runs(tmp_path: Path, nvidia_smi: str, variant: str) -> None:
    """`make setup` with QES_TORCH=auto plans the torch build that envs/torch-build.sh reads off the driver."""
    env, _ = _stub_path(tmp_path, nvidia_smi)
    chosen = subprocess.run(["sh", "envs/torch-build.sh"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, **env})
    assert chosen.stdout.strip() == variant
    venv = tmp_path / "venv"
    plan = subprocess.run(["make", "-n", "setup", f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env, "QES_TORCH": "auto"})
    assert plan.returncode == 0, plan.stderr
    assert f"touch {venv}/.qes-setup-stamp-{variant}" in plan.stdout
    installs = {
        "cpu": "torch==2.13.0+cpu",
        "cuda": '"torch===2.13.0"',
        "cu126": f"{CU126_INDEX} torch==2.13.0+cu126",
    }
    for build, command in installs.items():
        assert (command in plan.stdout) == (build == variant), f"{build}: {command}"


def test_make_refuses_an_unknown_torch_build(tmp_path: Path) -> None:
    plan = subprocess.run(["make", "-n", "setup", f"VENV={tmp_path}/venv", "QES_TORCH=cu118"], cwd=ROOT,
                          capture_output=True, text=True)
    assert plan.returncode != 0
    assert "QES_TORCH must be auto, cpu, cuda or cu126, not 'cu118'" in plan.stderr
