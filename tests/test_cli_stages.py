"""The `qes` command for the fetch / quantize / codes-sha256 stages."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from qes.cli import build_parser, main


def test_codes_sha256_command(tiny_gptq, capsys: pytest.CaptureFixture[str]) -> None:
    path = tiny_gptq(4)
    assert main(["codes-sha256", str(path)]) == 0
    expected = json.loads((path / "quant_report.json").read_text())["codes_sha256"]
    assert capsys.readouterr().out.strip().splitlines()[-1] == expected


def test_fetch_and_quantize_commands(tiny_float_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models = tmp_path / "models" / "tiny"
    assert main(["fetch", "--source", f"local:{tiny_float_dir}", "--name", "tiny", "--out", str(models)]) == 0
    fetched = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert fetched["out"] == str(models) and fetched["parameters"] > 0
    out = tmp_path / "quantized"
    args = ["quantize", str(models), "--bits", "8", "--group-size", "32", "--calibration-samples", "8"]
    assert main([*args, "--eval-prompts", "2", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["out"] == str(out) and len(summary["codes_sha256"]) == 64
    report = json.loads((out / "quant_report.json").read_text())
    assert report["bits"] == 8
    assert report["float_model"]["source"] == f"local:{tiny_float_dir}" and report["float_model"]["name"] == "tiny"
    # greedy stays greedy: GPTQModel's do_sample=true does not reach the checkpoint
    generation = out / "generation_config.json"
    assert not generation.is_file() or not json.loads(generation.read_text()).get("do_sample", False)
    # outputs are readable by other users (a plain open()'s mode), whatever the writer's own default
    umask = os.umask(0)
    os.umask(umask)
    for folder in (models, out):
        modes = {f.name: f.stat().st_mode & 0o777 for f in folder.iterdir()}
        assert set(modes.values()) == {0o666 & ~umask}, modes


def test_errors_are_reported_not_raised(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["quantize", str(tmp_path / "missing")]) == 2
    assert "qes quantize: error:" in capsys.readouterr().err
    assert main(["fetch", "--source", "local:/nonexistent/model", "--name", "m", "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", str(tmp_path), "--bits", "3"])


def test_help_shows_every_default() -> None:
    """Each option with a default says it in `--help` (values off by default, like flags, need not)."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"fetch", "quantize", "finetune", "replay", "evaluate"} <= set(commands)
    missing = []
    for name, command in commands.items():
        text = " ".join(command.format_help().split())
        for action in command._actions:
            if not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
                continue
            if "default" not in " ".join((action.help or "").split()) and f"(default: {action.default})" not in text:
                missing.append(f"{name} {action.option_strings[0]}")
    assert not missing, missing
    assert "--group-size GROUP_SIZE Inputs sharing one scale" in " ".join(commands["quantize"].format_help().split())
