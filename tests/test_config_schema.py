"""The config schema: defaults, and bad configs stopped before any job with a message naming the key."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("snakemake")

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = str(ROOT / "workflow" / "schemas" / "config.schema.yaml")


def _default_config() -> dict:
    return yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


def _error_text(config: dict) -> str:
    with pytest.raises(WorkflowError) as info:
        validate(config, SCHEMA)
    return str(info.value) + "\n" + "\n".join(str(arg) for arg in info.value.args)


def test_default_config_is_valid() -> None:
    config = _default_config()
    validate(config, SCHEMA)
    assert config["quantize"]["bits"] == 4
    assert config["model"]["source"] == "bundled:smollm2-135m-instruct"


def test_examples_are_valid() -> None:
    examples = sorted((ROOT / "config" / "examples").glob("*.yaml"))
    assert examples
    for example in examples:
        validate(yaml.safe_load(example.read_text()), SCHEMA)


def test_defaults_fill_missing_blocks_and_keys() -> None:
    config: dict = {"quantize": {"bits": 8}}
    validate(config, SCHEMA)
    assert config["quantize"] == {
        "bits": 8,
        "group_size": 64,
        "calibration_samples": 128,
        "batch_size": 8,
        "damp_percent": 0.05,
        "eval_prompts": 16,
        "offload_to_disk": False,
    }
    assert config["model"]["name"] == "smollm2-135m-instruct"
    assert config["model"]["revision"] is None
    for block in ("finetune", "evaluate"):
        assert (config[block]["backend"], config[block]["dtype"]) == ("auto", "auto")
    assert config["finetune"]["device"] == "auto"
    assert config["slurm"] == {"gpu_partition": None}


def test_every_key_has_type_default_and_description() -> None:
    schema = yaml.safe_load(Path(SCHEMA).read_text())

    def walk(node: dict, path: str) -> None:
        assert node.get("description"), f"{path} lacks a description"
        if node.get("type") == "object":
            assert node.get("additionalProperties") is False, f"{path} accepts unknown keys"
            for key, sub in node["properties"].items():
                walk(sub, f"{path}.{key}")
        if path != "config":
            assert "type" in node, f"{path} lacks a type"
            assert "default" in node, f"{path} lacks a default"

    walk(schema, "config")


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda c: c.update(bogus=1), "'bogus' was unexpected"),
        (lambda c: c["quantize"].update(bitz=4), "'bitz' was unexpected"),
        (lambda c: c["quantize"].update(bits=3), "3 is not one of [4, 8]"),
        (lambda c: c["quantize"].update(group_size="64"), "'64' is not of type 'integer'"),
        (lambda c: c["quantize"].update(group_size=0), "0 is less than the minimum of 1"),
        (lambda c: c["quantize"].update(damp_percent=1.5), "damp_percent"),
        (lambda c: c["model"].update(source="ftp://x"), "does not match"),
        (lambda c: c["model"].update(name="a/b"), "does not match"),
        (lambda c: c["model"].update(dtype="int8"), "'int8' is not one of"),
        (lambda c: c["finetune"].update(backend="marlin"), "'marlin' is not one of ['auto', 'int4pack', 'dense']"),
        (lambda c: c["evaluate"].update(backend="exllama"), "'exllama' is not one of"),
        (lambda c: c["finetune"].update(dtype="fp8"), "'fp8' is not one of ['auto', 'float32', 'bfloat16', 'float16']"),
        (lambda c: c["evaluate"].update(dtype="half"), "'half' is not one of"),
        (lambda c: c["finetune"].update(device="gpu"), "'gpu' is not one of ['auto', 'cpu', 'cuda']"),
        (lambda c: c["slurm"].update(gpu_partition=3), "3 is not of type 'string', 'null'"),
        (lambda c: c["slurm"].update(partition="cpu"), "'partition' was unexpected"),
    ],
)
def test_bad_configs_are_rejected(mutate, expected: str) -> None:
    config = copy.deepcopy(_default_config())
    mutate(config)
    text = _error_text(config)
    assert expected in text


def test_error_names_the_nested_key() -> None:
    config = _default_config()
    config["quantize"]["bits"] = 3
    text = _error_text(config)
    assert "['quantize']['bits']" in text


def _dry_run(*config_args: str, target: str = "all") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--forceall", "--cores", "1", target, "--config", *config_args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_dry_run_stops_on_bad_value_before_any_job() -> None:
    result = _dry_run("quantize={bits: 3}")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "3 is not one of [4, 8]" in output
    assert "['quantize']['bits']" in output
    assert "Job stats" not in output


def test_dry_run_stops_on_unknown_key() -> None:
    result = _dry_run("finetune_typo=1")
    assert result.returncode != 0
    assert "'finetune_typo' was unexpected" in result.stdout + result.stderr


def test_dry_run_accepts_nested_override() -> None:
    result = _dry_run("quantize={bits: 8, group_size: 32}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "results/quantized/smollm2-135m-instruct-w8g32" in result.stdout + result.stderr


def test_dry_run_plans_every_curve_point_and_each_methods_base() -> None:
    """List items given with --config reach the schema typed; -w8 methods train on their own INT8 base."""
    result = _dry_run("experiments={methods: [replay-k50, replay-w8], seeds: [0, 1], iterations: 2, curve_every: 1}",
                      target="experiments")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for planned in ("results/quantized/smollm2-135m-instruct-w8g64", "results/experiments/points/base-w8/it-0.json",
                    "results/experiments/points/exp-replay-k50-s1/it-1.json",
                    "results/experiments/points/exp-replay-w8-s0/it-2.json", "results/experiments/score_curves.png"):
        assert planned in output
