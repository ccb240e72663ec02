"""The ``qes`` command line: each pipeline stage without Snakemake.

    qes fetch --source bundled:smollm2-135m-instruct --name smollm2-135m-instruct
    qes quantize results/models/smollm2-135m-instruct --bits 4 --group-size 64
    qes codes-sha256 results/quantized/smollm2-135m-instruct-w4g64
    qes finetune --model results/quantized/... --train results/data/countdown/train.parquet --run-dir results/runs/x
    qes replay --base results/quantized/... --log results/runs/x --out results/replay/x

Each subcommand is one function ``_cmd_<name>(args) -> int`` registered in :data:`COMMANDS` together with the
function that declares its arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from qes import __version__


def _add_fetch(parser: argparse.ArgumentParser) -> None:
    from qes.fetch import FetchConfig

    defaults = FetchConfig(name="x", source="bundled:smollm2-135m-instruct")
    parser.add_argument("--source", default=defaults.source, help="bundled:<name>, hf:<org>/<repo> or local:<path>")
    parser.add_argument("--name", default=None, help="output folder name (default: derived from the source)")
    parser.add_argument("--revision", default=None, help="hub branch, tag or commit (hf: sources)")
    parser.add_argument("--dtype", default=defaults.dtype, choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: results/models/<name>)")


def _default_name(source: str) -> str:
    location = source.partition(":")[2].rstrip("/")
    return location.rsplit("/", 1)[-1].lower() or "model"


def _cmd_fetch(args: argparse.Namespace) -> int:
    from qes.fetch import FetchConfig, fetch_model

    name = args.name or _default_name(args.source)
    cfg = FetchConfig(name=name, source=args.source, revision=args.revision, dtype=args.dtype)
    out = args.out or Path("results/models") / name
    manifest = fetch_model(cfg, out)
    print(json.dumps({"out": str(out), "parameters": manifest["parameters"], "revision": manifest["revision"]}))
    return 0


def _add_quantize(parser: argparse.ArgumentParser) -> None:
    from qes.quantize import QuantizeConfig

    defaults = QuantizeConfig()
    parser.add_argument("model", type=Path, help="float model folder (output of `qes fetch`)")
    parser.add_argument("--out", type=Path, default=None, help="default: results/quantized/<model>-w<bits>g<group>")
    parser.add_argument("--bits", type=int, default=defaults.bits, choices=[4, 8])
    parser.add_argument("--group-size", type=int, default=defaults.group_size)
    parser.add_argument("--calibration-samples", type=int, default=defaults.calibration_samples)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--damp-percent", type=float, default=defaults.damp_percent)
    parser.add_argument("--eval-prompts", type=int, default=defaults.eval_prompts)
    parser.add_argument("--offload-to-disk", action="store_true")


def _cmd_quantize(args: argparse.Namespace) -> int:
    from qes.quantize import QuantizeConfig, quantize_model

    cfg = QuantizeConfig(
        bits=args.bits,
        group_size=args.group_size,
        calibration_samples=args.calibration_samples,
        batch_size=args.batch_size,
        damp_percent=args.damp_percent,
        eval_prompts=args.eval_prompts,
        offload_to_disk=args.offload_to_disk,
    )
    out = args.out or Path("results/quantized") / f"{args.model.resolve().name}-{cfg.tag}"
    report = quantize_model(args.model, out, cfg)
    summary = {"out": str(out), "codes_sha256": report["codes_sha256"], **report["quality"]}
    print(json.dumps(summary))
    return 0


def _add_codes_sha256(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="GPTQ checkpoint folder")


def _cmd_codes_sha256(args: argparse.Namespace) -> int:
    from qes.codes import codes_sha256, load_quantized

    model, _ = load_quantized(args.model, backend="none")
    print(codes_sha256(model))
    return 0


def _add_task_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="model folder whose tokenizer renders the prompts")
    parser.add_argument("--config", type=Path, default=None, help="YAML file whose `task:` block sets the problems")
    parser.add_argument("--out", type=Path, default=Path("results/data/countdown"), help="folder for the Parquet files")


def _cmd_task_data(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from qes.tasks.countdown import TaskSettings, make_task_data

    settings = TaskSettings.from_dict({k: v for k, v in _read_block(args.config, "task").items() if v is not None})
    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    print(json.dumps(make_task_data(settings, tokenizer, args.out / "train.parquet", args.out / "eval.parquet")))
    return 0


def _add_replay(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", type=Path, required=True, help="the base GPTQ checkpoint the run started from")
    parser.add_argument("--log", type=Path, required=True, help="the run's seed log folder (holds run.json, steps/)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the re-derived GPTQ checkpoint")


def _cmd_replay(args: argparse.Namespace) -> int:
    from qes.replay import replay_checkpoint

    report = replay_checkpoint(args.base, args.log, args.out)
    print(json.dumps(report))
    print(report["codes_sha256"])
    return 0


def _read_block(path: Path | None, block: str) -> dict:
    if path is None:
        return {}
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    return dict(data.get(block) or {})


def _add_compute_options(parser: argparse.ArgumentParser) -> None:
    from qes.qlinear import BACKENDS

    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                        help="where to compute (default: the config's, else auto = cuda when torch sees one)")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="forward path of the quantized layers: int4pack (torch's CPU int4 matmul, INT4), "
                             "dense (dequantized weight, any device), auto (default: int4pack for INT4 on CPU)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=None,
                        help="compute dtype (default auto: bf16 on CUDA and CPUs with native bf16, else float32)")


def _compute_options(args: argparse.Namespace) -> dict:
    """The --device/--backend/--dtype flags that were given, to override the config block."""
    return {key: getattr(args, key) for key in ("device", "backend", "dtype") if getattr(args, key) is not None}


def _add_finetune(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="quantized checkpoint (output of `qes quantize`)")
    parser.add_argument("--train", type=Path, required=True, help="training problems (train.parquet of the task stage)")
    parser.add_argument("--run-dir", type=Path, required=True, help="seed log folder; an existing one is resumed")
    parser.add_argument("--config", type=Path, default=None, help="YAML file whose `finetune:` block sets the run")
    _add_compute_options(parser)
    parser.add_argument(
        "--threads", type=int, default=None,
        help="CPU threads (default: all cores); torchrun ranks share them, srun ranks get them each",
    )


def _cmd_finetune(args: argparse.Namespace) -> int:
    import os

    from qes.train import run_finetune

    threads = args.threads or os.cpu_count() or 1
    block = {**_read_block(args.config, "finetune"), **_compute_options(args)}
    summary = run_finetune(args.model, args.train, args.run_dir, block, threads)
    print(json.dumps(summary))
    return 0


def _add_evaluate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", type=Path, required=True, help="base GPTQ checkpoint")
    parser.add_argument("--tuned", type=Path, required=True, help="tuned GPTQ checkpoint (output of `qes replay`)")
    parser.add_argument("--eval", type=Path, required=True, help="held-out problems (eval.parquet of the task stage)")
    parser.add_argument("--out", type=Path, required=True, help="output folder for metrics.json and examples")
    parser.add_argument("--config", type=Path, default=None, help="YAML file whose `evaluate:` block sets the budget")
    _add_compute_options(parser)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from qes.evaluate import EvaluateConfig, compare

    cfg = EvaluateConfig(**{**_read_block(args.config, "evaluate"), **_compute_options(args)})
    metrics = compare(
        args.base, args.tuned, args.eval, cfg,
        args.out / "metrics.json", args.out / "base_examples.parquet", args.out / "tuned_examples.parquet",
    )
    print(json.dumps(metrics["difference"]))
    return 0


def _add_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", type=Path, required=True, help="base GPTQ checkpoint")
    parser.add_argument("--tuned", type=Path, required=True, help="tuned GPTQ checkpoint (output of `qes replay`)")
    parser.add_argument("--log", type=Path, required=True, help="the run's seed log folder")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics.json of `qes evaluate`")
    parser.add_argument("--out", type=Path, required=True, help="export folder")


def _cmd_export(args: argparse.Namespace) -> int:
    from qes.export import export_run

    print(export_run(args.tuned, args.log, args.base, json.loads(args.metrics.read_text()), args.out))
    return 0


Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

#: name -> (help, declare arguments, run)
COMMANDS: dict[str, Command] = {
    "fetch": ("fetch a float model (stage fetch_model)", _add_fetch, _cmd_fetch),
    "quantize": ("GPTQ-quantize a float model (stage quantize)", _add_quantize, _cmd_quantize),
    "codes-sha256": ("print the codes_sha256 identity of a GPTQ checkpoint", _add_codes_sha256, _cmd_codes_sha256),
    "task-data": ("write train / held-out Countdown problems (stage make_task_data)", _add_task_data, _cmd_task_data),
    "finetune": ("run or resume QES on a quantized checkpoint (stage finetune)", _add_finetune, _cmd_finetune),
    "replay": ("re-derive a tuned checkpoint from its base and seed log (stage replay)", _add_replay, _cmd_replay),
    "evaluate": ("held-out evaluation of base vs tuned (stage evaluate)", _add_evaluate, _cmd_evaluate),
    "export": ("tuned checkpoint + seed log + model card (stage export)", _add_export, _cmd_export),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="qes", description="Quantized Evolution Strategies on GPTQ models.")
    parser.add_argument("--version", action="version", version=f"qes {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, declare, run) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        declare(command)
        command.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qes`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.run(args))
    except (ValueError, RuntimeError, FileNotFoundError, OSError) as error:
        print(f"qes {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
