"""The `qes` command for the fetch / quantize / codes-sha256 stages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qes.cli import main


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
    assert json.loads((out / "quant_report.json").read_text())["bits"] == 8


def test_errors_are_reported_not_raised(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["quantize", str(tmp_path / "missing")]) == 2
    assert "qes quantize: error:" in capsys.readouterr().err
    assert main(["fetch", "--source", "local:/nonexistent/model", "--name", "m", "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", str(tmp_path), "--bits", "3"])
