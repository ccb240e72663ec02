"""One validation for every entry point, checked before anything runs, and runs that change nothing said loudly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml
from _workflow import copy_workflow, snakemake

from qes.config import ConfigError, complete, schema
from qes.evaluate import EvaluateConfig
from qes.hparams import FinetuneConfig, TrainConfig, finetune_config
from qes.quantize import QuantizeConfig
from qes.update import UpdateConfig


def _qes(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "qes.cli", *args], capture_output=True, text=True, env=env,
                          timeout=900)


def test_library_defaults_are_the_schema_defaults() -> None:
    defaults = complete({})
    assert finetune_config({}) == FinetuneConfig()
    block = FinetuneConfig().to_block()
    assert block == {k: v for k, v in defaults["finetune"].items() if k != "run"}
    assert EvaluateConfig.from_block({}) == EvaluateConfig()
    assert asdict(EvaluateConfig()) == {**defaults["evaluate"], "device": "auto"}
    assert QuantizeConfig.from_dict({}) == QuantizeConfig()
    assert asdict(QuantizeConfig()) == defaults["quantize"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: TrainConfig(alpha=-0.003), "finetune.alpha: -0.003 is less than or equal to the minimum of 0"),
        (lambda: TrainConfig(alpha=0.0), "finetune.alpha: 0.0 is less than or equal to the minimum of 0"),
        (lambda: TrainConfig(sigma=10.0), "finetune.sigma: 10.0 is greater than the maximum of 4"),
        (lambda: TrainConfig(global_seed=-1), "finetune.global_seed: -1 is less than the minimum of 0"),
        (lambda: TrainConfig(coef_clip=-1.0), "finetune.coef_clip: -1.0 is less than or equal to the minimum of 0"),
        (lambda: TrainConfig(alpha_warmup=-2), "finetune.alpha_warmup: -2 is less than the minimum of 0"),
        (lambda: TrainConfig(population=2), "finetune.population: 2 with shaping pair_zscore can never update"),
        (lambda: UpdateConfig(window=0), "finetune.residual.window: 0 is less than the minimum of 1"),
        (lambda: FinetuneConfig(ranks=9), "finetune.ranks: 9 ranks for a population of 8"),
        (lambda: EvaluateConfig(max_new_tokens=0), "evaluate.max_new_tokens: 0 is less than the minimum of 1"),
        (lambda: finetune_config({"iterations": "3"}), "finetune.iterations: '3' is not of type 'integer'"),
        (lambda: finetune_config({"iterations": 2.5}), "finetune.iterations: 2.5 is not of type 'integer'"),
        (lambda: finetune_config([1, 2]), "finetune: [1, 2] is not of type 'object'"),
    ],
)
def test_library_constructors_validate(make, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        make()
    assert message in str(info.value)


def test_backend_and_fitness_path_conflicts_are_refused_before_anything_runs() -> None:
    from qes.config import check_rules

    cuda = complete({"finetune": {"device": "cuda", "backend": "int4pack"}})
    with pytest.raises(ConfigError, match="finetune.backend: int4pack runs on the CPU only"):
        check_rules(cuda)
    evaluate = complete({"evaluate": {"backend": "int4pack"}})
    check_rules(evaluate, device="cpu")
    with pytest.raises(ConfigError, match="evaluate.backend: int4pack runs on the CPU only"):
        check_rules(evaluate, device="cuda")  # finetune.device auto, resolved to cuda while planning
    with pytest.raises(ConfigError, match="finetune.member_batch: 4 needs prefix_cache member"):
        FinetuneConfig(member_batch=4, prefix_cache="row")


def test_centered_rank_can_update_with_two_members() -> None:
    assert TrainConfig(population=2, shaping="centered_rank").population == 2


def test_every_schema_key_reaches_the_library() -> None:
    """No finetune key of the schema is silently dropped on the way to FinetuneConfig."""
    keys = set(schema()["properties"]["finetune"]["properties"]) - {"run"}
    assert set(FinetuneConfig().to_block()) == keys


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"iterations": "3"}, "finetune.iterations: '3' is not of type 'integer'"),
        ([1, 2], "finetune: expected a mapping of settings, found [1, 2]"),
        ({"alpha": -0.003}, "finetune.alpha: -0.003 is less than or equal to the minimum of 0"),
        ({"population": 2}, "finetune.population: 2 with shaping pair_zscore can never update"),
        ({"residual": {"windw": 3}},
         "finetune.residual: Additional properties are not allowed ('windw' was unexpected)"),
        ({"alpha": float("nan")}, "finetune.alpha: nan is not of type 'number'"),
        ({"sigma": float("nan")}, "finetune.sigma: nan is not of type 'number'"),
        ({"alpha": float("inf")}, "finetune.alpha: inf is not of type 'number'"),
        ({"population": 8.0}, "finetune.population: 8.0 is not of type 'integer'"),
    ],
)
def test_finetune_command_validates_its_config(tmp_path: Path, block, message: str) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"finetune": block}))
    (tmp_path / "model").mkdir()
    (tmp_path / "train.parquet").write_bytes(b"")
    result = _qes("finetune", "--model", str(tmp_path / "model"), "--train", str(tmp_path / "train.parquet"),
                  "--run-dir", str(tmp_path / "run"), "--config", str(config))
    assert result.returncode == 2
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("text", "unknown"),
    [("alpha: -1\n", "alpha"), ("fine_tune:\n  alpha: 0.1\n", "fine_tune"),
     ("finetune:\n  alpha: 0.1\nevaluation: {}\n", "evaluation")],
)
def test_finetune_command_refuses_unknown_top_level_keys(tmp_path: Path, text: str, unknown: str) -> None:
    """Settings outside a known section would be silently ignored: a misspelt section, a key without one."""
    config = tmp_path / "config.yaml"
    config.write_text(text)
    (tmp_path / "model").mkdir()
    (tmp_path / "train.parquet").write_bytes(b"")
    result = _qes("finetune", "--model", str(tmp_path / "model"), "--train", str(tmp_path / "train.parquet"),
                  "--run-dir", str(tmp_path / "run"), "--config", str(config))
    assert result.returncode == 2
    assert f"unknown top-level key(s) {unknown}: settings go in one of the sections" in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()


def test_workflow_checks_refuse_floats_for_integers_and_non_finite_numbers() -> None:
    from qes.config import check_rules

    for change, message in (({"population": 8.0}, "finetune.population: 8.0 is not of type 'integer'"),
                            ({"alpha": float("nan")}, "finetune.alpha: nan is not of type 'number'")):
        config = complete({})
        config["finetune"].update(change)  # as Snakemake's own validation lets it through
        with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
            check_rules(config)


@pytest.fixture(scope="module")
def task_data(tiny_gptq, tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    from qes.tasks.countdown import TaskSettings, make_task_data

    data = tmp_path_factory.mktemp("task")
    settings = TaskSettings.from_dict({"train_size": 8, "eval_size": 4})
    make_task_data(settings, AutoTokenizer.from_pretrained(str(tiny_gptq(4))), data / "train.parquet",
                   data / "eval.parquet")
    return data / "train.parquet"


def _finetune(base: Path, train: Path, run_dir: Path, config: Path, **extra) -> subprocess.CompletedProcess:
    block = {"iterations": 2, "population": 4, "batch_prompts": 4, "max_new_tokens": 4, "device": "cpu", **extra}
    config.write_text(yaml.safe_dump({"finetune": block}))
    return _qes("finetune", "--model", str(base), "--train", str(train), "--run-dir", str(run_dir),
                "--config", str(config), "--threads", "1")


def test_a_run_that_changes_nothing_says_so(tiny_gptq, task_data: Path, tmp_path: Path) -> None:
    """The random tiny model never scores on Countdown: every member ties, no code moves."""
    result = _finetune(tiny_gptq(4), task_data, tmp_path / "run", tmp_path / "c.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["codes_changed"] is False and summary["all_members_tied"] is True
    assert summary["codes_sha256"] == summary["base_codes_sha256"]
    assert "no code changed in 2 iterations (every member tied in every iteration)" in summary["warnings"][0]
    assert "no code changed in 2 iterations" in result.stderr
    # The summary says which CPU the run used and what an iteration cost there (to size the next run).
    assert summary["seconds_per_iteration"] > 0 and summary["compute"]["cpu_model"]
    assert summary["compute"]["cpu_count"] == os.cpu_count()


def test_fail_if_unchanged_turns_the_warning_into_an_error(tiny_gptq, task_data: Path, tmp_path: Path) -> None:
    result = _finetune(tiny_gptq(4), task_data, tmp_path / "run", tmp_path / "c.yaml", fail_if_unchanged=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "qes finetune: error: finetune.fail_if_unchanged is set and no code changed in 2 iterations"
    )
    assert (tmp_path / "run" / "final.json").is_file()  # the seed log itself is kept


# --- the workflow refuses before any job runs or any output is removed --------------------------------------


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return copy_workflow(tmp_path / "wf")


def _plant(workdir: Path, *names: str) -> dict[str, bytes]:
    files = {}
    for name in names:
        path = workdir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"earlier output {name}".encode())
        files[name] = path.read_bytes()
    return files


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("task={num_count_min: 4}", "task.num_count_min (4) is greater than task.num_count_max (3)"),
        ("task={target_min: 30}", "task.target_min (30) is greater than task.target_max (20)"),
        ("task={train_file: missing.json}", "task.train_file: missing.json does not exist"),
        ("finetune={population: 2}", "finetune.population: 2 with shaping pair_zscore can never update"),
        ("finetune={ranks: 10}", "finetune.ranks: 10 ranks for a population of 8"),
    ],
)
def test_cross_key_rules_stop_the_workflow_before_outputs_are_removed(workdir: Path, override: str,
                                                                      message: str) -> None:
    planted = _plant(workdir, "results/data/countdown/train.parquet", "results/data/countdown/eval.parquet")
    result = snakemake(workdir, "--cores", "1", "--forceall", "results/data/countdown/train.parquet",
                       "--config", override, timeout=300)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr, result.stderr[-3000:]
    assert {name: (workdir / name).read_bytes() for name in planted} == planted


def test_a_run_that_cannot_resume_is_refused_while_planning(workdir: Path, tiny_gptq, tmp_path: Path) -> None:
    """A finished run's outputs survive a config change that its seed log refuses."""
    from _synthetic_run import fitness_of

    from qes.checkpoint import load_quantized
    from qes.codes import quantized_linears
    from qes.train import train

    model, _ = load_quantized(tiny_gptq(4), backend="dense")
    defaults = complete(yaml.safe_load((workdir / "config/config.yaml").read_text()))
    cfg = finetune_config(defaults["finetune"])
    stage = {"base_checkpoint": "results/quantized/smollm2-135m-instruct-w4g64",
             "task_data": "results/data/countdown/train.parquet", "batch_prompts": 16, "max_new_tokens": 48,
             "fitness": cfg.fitness_path()}
    train(model, quantized_linears(model), fitness_of(model), cfg.train, workdir / "results/runs/default", stage)
    assert snakemake(workdir, "--cores", "1", "-n", "results/finetune/default/summary.json").returncode == 0
    planted = _plant(workdir, "results/finetune/default/summary.json", "results/finetune/default/metrics.parquet")
    log_before = {p: p.read_bytes() for p in (workdir / "results/runs/default").rglob("*") if p.is_file()}
    result = snakemake(workdir, "--cores", "1", "results/finetune/default/summary.json",
                       "--config", "finetune={alpha: 0.004}", timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "results/runs/default holds a run with a different 'train'" in output, output[-3000:]
    assert {name: (workdir / name).read_bytes() for name in planted} == planted
    # another model under the same run name is refused before anything is fetched or quantized
    other = snakemake(workdir, "--cores", "1", "results/finetune/default/summary.json", "--config",
                      "model={name: other-model, source: 'local:/nonexistent'}", timeout=300)
    assert other.returncode != 0
    assert "results/runs/default holds a run with a different 'base_checkpoint'" in other.stdout + other.stderr
    assert not (workdir / "results/models/other-model").exists()
    assert {p: p.read_bytes() for p in (workdir / "results/runs/default").rglob("*") if p.is_file()} == log_before
    shutil.rmtree(workdir / "results/runs/default/steps")
    (workdir / "results/runs/default/steps").mkdir()
    result = snakemake(workdir, "--cores", "1", "-n", "results/finetune/default/summary.json", timeout=300)
    assert result.returncode != 0
    assert "final.json does not match the log: iterations is 20 there, the log gives 0" in result.stdout + result.stderr


def test_experiment_logs_live_where_the_config_says(workdir: Path, tiny_gptq) -> None:
    """experiments.log_dir points the experiment runs at committed seed logs; they are checked while planning."""
    from _synthetic_run import fitness_of

    from qes.checkpoint import load_quantized
    from qes.codes import quantized_linears
    from qes.train import train

    model, _ = load_quantized(tiny_gptq(4), backend="dense")
    committed = workdir / "experiments/mine/runs/exp-replay-s0"
    train(model, quantized_linears(model), fitness_of(model), TrainConfig(iterations=1, population=4), committed)
    target = "results/finetune/exp-replay-s0/summary.json"
    setting = "experiments={log_dir: experiments/mine/runs}"
    result = snakemake(workdir, "--cores", "1", "-n", target, "--config", setting)
    assert result.returncode != 0
    assert "experiments/mine/runs/exp-replay-s0 holds a run with a different" in result.stdout + result.stderr
    assert snakemake(workdir, "--cores", "1", "-n", target).returncode == 0  # results/runs/ is used by default
