"""The ``qes`` subcommands that run the workflow's model stages: fetch, quantize, codes-sha256, task-data,
finetune, evaluate and export."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qes.cli_options import (
    add_compute_options,
    add_overwrite,
    compute_options,
    describe,
    enum_choices,
    existing,
    fresh_out,
    schema_defaults,
)
from qes.config import read_block


def add_fetch(parser: argparse.ArgumentParser) -> None:
    defaults = schema_defaults("model")
    parser.add_argument("--source", default=defaults["source"], help="bundled:<name>, hf:<org>/<repo> or local:<path>")
    parser.add_argument("--name", default=None, help="output folder name (default: derived from the source)")
    parser.add_argument("--revision", default=None, help="hub branch, tag or commit (hf: sources)")
    parser.add_argument("--dtype", default=defaults["dtype"], choices=enum_choices("model", "dtype"),
                        help=describe("model", "dtype"))
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: results/models/<name>)")
    add_overwrite(parser)


def _default_name(source: str) -> str:
    location = source.partition(":")[2].rstrip("/")
    return location.rsplit("/", 1)[-1].lower() or "model"


def cmd_fetch(args: argparse.Namespace) -> int:
    from qes.fetch import FetchConfig, fetch_model

    name = args.name or _default_name(args.source)
    cfg = FetchConfig(name=name, source=args.source, revision=args.revision, dtype=args.dtype)
    out = args.out or Path("results/models") / name
    local = Path(args.source[len("local:"):]) if args.source.startswith("local:") else None
    fresh_out(out, args, {"source": local})
    manifest = fetch_model(cfg, out)
    print(json.dumps({"out": str(out), "parameters": manifest["parameters"], "revision": manifest["revision"]}))
    return 0


def add_quantize(parser: argparse.ArgumentParser) -> None:
    defaults = schema_defaults("quantize")
    parser.add_argument("model", type=Path, help="float model folder (output of `qes fetch`)")
    parser.add_argument("--out", type=Path, default=None, help="default: results/quantized/<model>-w<bits>g<group>")
    parser.add_argument("--bits", type=int, default=defaults["bits"], choices=enum_choices("quantize", "bits"),
                        help=describe("quantize", "bits"))
    parser.add_argument("--group-size", type=int, default=defaults["group_size"],
                        help=describe("quantize", "group_size"))
    parser.add_argument("--calibration-samples", type=int, default=defaults["calibration_samples"],
                        help=describe("quantize", "calibration_samples"))
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"],
                        help=describe("quantize", "batch_size"))
    parser.add_argument("--damp-percent", type=float, default=defaults["damp_percent"],
                        help=describe("quantize", "damp_percent"))
    parser.add_argument("--eval-prompts", type=int, default=defaults["eval_prompts"],
                        help=describe("quantize", "eval_prompts"))
    parser.add_argument("--offload-to-disk", action="store_true", help=describe("quantize", "offload_to_disk"))
    add_overwrite(parser)


def cmd_quantize(args: argparse.Namespace) -> int:
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
    existing(args.model, "model")
    out = args.out or Path("results/quantized") / f"{args.model.resolve().name}-{cfg.tag}"
    fresh_out(out, args, {"model": args.model})
    report = quantize_model(args.model, out, cfg)
    summary = {"out": str(out), "codes_sha256": report["codes_sha256"], **report["quality"]}
    print(json.dumps(summary))
    return 0


def add_codes_sha256(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="GPTQ checkpoint folder")


def cmd_codes_sha256(args: argparse.Namespace) -> int:
    from qes.checkpoint import load_quantized
    from qes.identity import codes_sha256

    model, _ = load_quantized(existing(args.model, "model"), backend="none")
    print(codes_sha256(model))
    return 0


def add_task_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="model folder whose tokenizer renders the prompts")
    parser.add_argument("--config", type=Path, default=None, help="YAML file whose `task:` block sets the task")
    parser.add_argument("--out", type=Path, default=Path("results/data/countdown"),
                        help="folder for the task's train.parquet and eval.parquet (the workflow writes "
                             "results/data/<task name>)")
    add_overwrite(parser)


def cmd_task_data(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from qes.fsutil import atomic_dir
    from qes.tasks import make_task_data

    task = read_block(args.config, "task")
    tokenizer = AutoTokenizer.from_pretrained(str(existing(args.model, "--model")))
    fresh_out(args.out, args, {"model": args.model})
    with atomic_dir(args.out) as tmp:
        summary = make_task_data(task, tokenizer, tmp / "train.parquet", tmp / "eval.parquet")
    for split in ("train", "eval"):
        summary[split]["path"] = str(args.out / f"{split}.parquet")
    print(json.dumps(summary))
    return 0


def add_finetune(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="quantized checkpoint (output of `qes quantize`)")
    parser.add_argument("--train", type=Path, required=True, help="training rows (train.parquet of the task stage)")
    parser.add_argument("--run-dir", type=Path, required=True, help="seed log folder; an existing one is resumed")
    parser.add_argument("--config", type=Path, default=None, help="YAML file whose `finetune:` block sets the run")
    add_compute_options(parser)
    parser.add_argument(
        "--threads", type=int, default=None,
        help="CPU threads (default: all cores); torchrun ranks share them, srun ranks get them each",
    )


def cmd_finetune(args: argparse.Namespace) -> int:
    import os

    from qes.finetune import run_finetune

    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    threads = args.threads or os.cpu_count() or 1
    existing(args.model, "--model")
    existing(args.train, "--train", "file")
    block = {**read_block(args.config, "finetune"), **compute_options(args)}
    summary = run_finetune(args.model, args.train, args.run_dir, block, threads)
    print(json.dumps(summary))
    return 0


def add_evaluate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", type=Path, required=True, help="base GPTQ checkpoint")
    parser.add_argument("--tuned", type=Path, required=True, help="tuned GPTQ checkpoint (output of `qes replay`)")
    parser.add_argument("--eval", type=Path, required=True, help="held-out rows (eval.parquet of the task stage)")
    parser.add_argument("--out", type=Path, required=True, help="output folder for metrics.json and examples")
    parser.add_argument("--config", type=Path, default=None, help="YAML file whose `evaluate:` block sets the budget")
    add_compute_options(parser)
    add_overwrite(parser)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from qes.evaluate import EvaluateConfig, compare

    options = compute_options(args)
    device = options.pop("device", "auto")
    cfg = EvaluateConfig.from_block({**read_block(args.config, "evaluate"), **options}, device=device)
    existing(args.base, "--base")
    existing(args.tuned, "--tuned")
    existing(args.eval, "--eval", "file")
    fresh_out(args.out, args, {"base": args.base, "tuned": args.tuned, "eval": args.eval})
    from qes.fsutil import atomic_dir

    with atomic_dir(args.out) as tmp:
        metrics = compare(
            args.base, args.tuned, args.eval, cfg,
            tmp / "metrics.json", tmp / "base_examples.parquet", tmp / "tuned_examples.parquet",
        )
    print(json.dumps(metrics["difference"]))
    return 0


def add_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", type=Path, required=True, help="base GPTQ checkpoint")
    parser.add_argument("--tuned", type=Path, required=True, help="tuned GPTQ checkpoint (output of `qes replay`)")
    parser.add_argument("--log", type=Path, required=True, help="the run's seed log folder")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics.json of `qes evaluate`")
    parser.add_argument("--out", type=Path, required=True, help="export folder")
    add_overwrite(parser)


def cmd_export(args: argparse.Namespace) -> int:
    from qes.export import export_run
    from qes.seedlog import read_json

    for option, path, kind in (("--base", args.base, "folder"), ("--tuned", args.tuned, "folder"),
                               ("--log", args.log, "folder"), ("--metrics", args.metrics, "file")):
        existing(path, option, kind)
    fresh_out(args.out, args, {"base": args.base, "tuned": args.tuned, "log": args.log, "metrics": args.metrics})
    print(export_run(args.tuned, args.log, args.base, read_json(args.metrics, "evaluation metrics"), args.out))
    return 0
