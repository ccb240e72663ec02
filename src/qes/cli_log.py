"""The ``qes`` subcommands on a run's seed log: replay (re-derive the tuned checkpoint from the base and the
log) and verify-log (check the log without a model); sign-log is :mod:`qes.signing`'s."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qes.cli_options import add_overwrite, existing, fresh_out
from qes.signing import add_signer_options, signature_report


def add_replay(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", type=Path, required=True, help="the base GPTQ checkpoint the run started from")
    parser.add_argument("--log", type=Path, required=True, help="the run's seed log folder (holds run.json, steps/)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the re-derived GPTQ checkpoint")
    parser.add_argument("--partial", action="store_true",
                        help="re-derive the last logged iteration of a run that did not finish (no final.json)")
    parser.add_argument("--until", type=int, default=None, metavar="N",
                        help="stop after iteration N (a point on the run's curve; default: the whole log)")
    add_signer_options(parser, "--require-signature", "refuse a log whose signature does not verify against")
    add_overwrite(parser)


def cmd_replay(args: argparse.Namespace) -> int:
    from qes.replay import replay_checkpoint

    existing(args.base, "--base")
    existing(args.log, "--log")
    fresh_out(args.out, args, {"base": args.base, "log": args.log})
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


def add_verify_log(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("log", type=Path, help="the run's seed log folder (holds run.json, steps/)")
    parser.add_argument("--partial", action="store_true", help="accept a run that did not finish (no final.json)")
    add_signer_options(parser, "--signer", "also verify the log's signature against")


def cmd_verify_log(args: argparse.Namespace) -> int:
    import time

    from qes.seedlog import SeedLog

    started = time.perf_counter()
    seedlog = SeedLog.open(existing(args.log, "log"))
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
