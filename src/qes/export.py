"""Export a tuned run: loadable GPTQ checkpoint + tokenizer + seed log + a model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from qes.fsutil import atomic_dir, refuse_overlap
from qes.seedlog import SeedLog, no_op_report, read_json
from qes.signing import NAMESPACE, SIGNATURE, signature_summary
from qes.tasks import DEFAULT_TASK, task_kind, task_of

CARD = """---
{front_matter}
---
# {name}

GPTQ {bits}-bit (group size {group_size}) checkpoint fine-tuned in its integer code space with Quantized
Evolution Strategies (QES) on the {task} task. Float model: {origin}.

Load it like any GPTQ checkpoint (transformers with `gptqmodel` and `optimum` installed):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{out_dir}")
tokenizer = AutoTokenizer.from_pretrained("{out_dir}")
```

Greedy decoding is the default (`generation_config.json` is the float model's).

## Quantization

| | |
|---|---|
{quant_rows}

## Identity

| | codes_sha256 |
|---|---|
| base quantized checkpoint | `{base_hash}` |
| this checkpoint | `{tuned_hash}` |

The base's complete identity (codes, scales, zero points, g_idx, every other tensor, quantization and model
config, tokenizer) hashes to `{base_identity}`.
{notes}
## Re-deriving these weights

The tuned codes are a function of the base checkpoint and the seed log in `seed_log/` alone, bit for bit on
any hardware. From the float model:

```bash
{commands}
```

`qes replay` verifies the log's hash chain and the base's identity first, then every hash checkpoint on the
way, and prints the final codes_sha256 above (`qes verify-log {out_dir}/seed_log` checks the log alone, in a
second).

{signature}## QES hyperparameters

| | |
|---|---|
{hyper_rows}

## Evaluation: {task}, {n} held-out problems, greedy, {max_new_tokens} new tokens

Reward: {reward}.

| model | accuracy | format rate | mean reward |
|---|---|---|---|
| base (quantized) | {b_acc:.4f} | {b_fmt:.4f} | {b_rew:.4f} |
| tuned (QES) | {t_acc:.4f} | {t_fmt:.4f} | {t_rew:.4f} |
"""

def task_description(task_data: str | Path | None) -> tuple[str, str]:
    """The task's name and a sentence on its reward, read from the run's task data file when it is there."""
    meta = task_of(task_data) if task_data and Path(task_data).is_file() else {"name": DEFAULT_TASK}
    kind = task_kind(meta["name"], where=f"{task_data} (its task metadata)")
    return kind.title, kind.reward_description(meta)


def float_origin(quant_report: dict) -> tuple[str, dict[str, str]]:
    """A sentence naming where the float model came from, and the Hub metadata that follows from it."""
    from qes.fetch import BUNDLED, parse_source

    origin = quant_report.get("float_model") or {}
    source = origin.get("source")
    if not source:
        return f"`{quant_report.get('model', 'unknown')}` (a local folder)", {}
    kind, location = parse_source(source)
    if kind == "bundled":
        bundled = BUNDLED[location]
        file = origin.get("source_file", {})
        text = (f"`{source}`: {bundled.upstream}, the file {bundled.filename} (sha256 `{file.get('sha256', '?')}`) "
                f"shipped in the Python package {origin.get('revision')}")
        return text, {"base_model": bundled.upstream, "license": bundled.license}
    if kind == "hf":
        return f"`{location}` on the Hugging Face Hub at revision `{origin.get('revision')}`", {"base_model": location}
    return f"`{source}` (a local folder)", {}


def _front_matter(metadata: dict[str, str], task: str) -> str:
    lines = [f"{key}: {metadata[key]}" for key in ("base_model",) if key in metadata]
    lines += [f"license: {metadata.get('license', 'other')}", "library_name: transformers",
              "pipeline_tag: text-generation", f"tags: [gptq, qes, evolution-strategies, {task}]"]
    return "\n".join(lines)


def _quant_rows(quant: dict, quant_report: dict) -> str:
    config = quant_report.get("config", {})
    rows = [("bits / group size", f"{quant['bits']} / {quant['group_size']}"),
            ("symmetric / act-order", f"{quant.get('sym')} / {quant.get('desc_act')}"),
            ("checkpoint format", quant.get("checkpoint_format", quant.get("format"))),
            ("calibration prompts / damping", f"{config.get('calibration_samples', '?')} / "
                                              f"{config.get('damp_percent', '?')}")]
    quality = quant_report.get("quality", {})
    if quality.get("prompts"):
        rows.append(("next-token agreement with the float model", f"{quality['next_token_agreement']:.3f}"))
    return "\n".join(f"| {k} | {v} |" for k, v in rows)


def _commands(quant_report: dict, base_hash: str) -> str:
    source = (quant_report.get("float_model") or {}).get("source", "local:<float model folder>")
    config = quant_report.get("config", {})
    quantize = " ".join(f"--{key.replace('_', '-')} {config[key]}" for key in
                        ("bits", "group_size", "calibration_samples", "batch_size", "damp_percent") if key in config)
    return "\n".join([
        f"qes fetch --source {source} --out float-model",
        f"qes quantize float-model {quantize} --out base",
        f"qes codes-sha256 base        # prints {base_hash}",
        "qes replay --base base --log seed_log --out tuned",
    ])


def _signature_front_matter(signed: dict | None) -> str:
    if signed is None:
        return ""
    lines = [f"qes_seed_log_signature: seed_log/{SIGNATURE}",
             f"qes_seed_log_signer_key: {json.dumps(signed['key_fingerprint'])}"]
    if signed["identity"]:
        lines.append(f"qes_seed_log_signer: {json.dumps(signed['identity'])}")
    return "\n" + "\n".join(lines)


def _signature_section(signed: dict | None, out_dir: Path) -> str:
    if signed is None:
        return ""
    named = f" (its signer names it `{signed['identity']}`)" if signed["identity"] else ""
    return f"""## Signature

The seed log is signed with the SSH key `{signed['key_fingerprint']}`{named}: `seed_log/{SIGNATURE}`
(namespace `{NAMESPACE}`) covers the log's last record hash `{signed['last_record_sha256']}`, its run hash,
the base identity and the final codes hash above. It shows who wrote the log to whoever trusts that key;
check it against the keys you trust (lines such as `NAME namespaces="{NAMESPACE}" ssh-ed25519 AAAA...`):

```bash
qes verify-log {out_dir}/seed_log --signer allowed_signers
```

"""


_CHECKPOINT_FILES = ("*.safetensors", "*.json", "*.jinja", "*.txt", "*.model")


def _hyper_rows(run_meta: dict) -> str:
    train = run_meta["train"]
    update = run_meta["update"]
    rows = [
        ("iterations", train["iterations"]),
        ("population (mirrored pairs)", f"{train['population']} ({train['population'] // 2})"),
        ("sigma", train["sigma"]),
        ("alpha", f"{train['alpha']} (warm-up {train['alpha_warmup']}, {train['alpha_decay']})"),
        ("fitness shaping", f"{train['shaping']}, clip {train['coef_clip']}"),
        ("residual mode", update["mode"]),
        ("gamma / window K / clamp", f"{update['gamma']} / {update['window']} / {update['residual_clamp']}"),
        ("noise generator", run_meta["noise"]["generator"]),
        ("global seed", run_meta["global_seed"]),
    ]
    return "\n".join(f"| {k} | {v} |" for k, v in rows)


def export_run(
    replayed_dir: str | Path,
    seed_log_dir: str | Path,
    base_dir: str | Path,
    eval_metrics: dict,
    out_dir: str | Path,
) -> Path:
    """Write `out_dir` with the checkpoint files, a copy of the seed log and README.md."""
    replayed_dir, seed_log_dir, out_dir = Path(replayed_dir), Path(seed_log_dir), Path(out_dir)
    refuse_overlap(out_dir, {"tuned checkpoint": replayed_dir, "seed log": seed_log_dir, "base": base_dir})
    seedlog = SeedLog.open(seed_log_dir)
    seedlog.require_complete()
    run_meta, final = seedlog.meta, seedlog.finished
    replayed = read_json(replayed_dir / "replay_report.json", "replay report of the tuned checkpoint")
    if replayed.get("codes_sha256") != final["codes_sha256"]:
        raise ValueError(
            f"{replayed_dir} holds codes_sha256 {replayed.get('codes_sha256')}, but the seed log {seed_log_dir} "
            f"ends at {final['codes_sha256']}: the tuned checkpoint is not this run's"
        )
    quant = read_json(replayed_dir / "config.json", "model config")["quantization_config"]
    no_op = no_op_report(seedlog, final["codes_sha256"])
    base_report = Path(base_dir) / "quant_report.json"
    quant_report = json.loads(base_report.read_text()) if base_report.is_file() else {"model": str(base_dir)}
    origin, metadata = float_origin(quant_report)
    task, reward = task_description(run_meta.get("task_data"))
    signed = signature_summary(seedlog)
    with atomic_dir(out_dir) as tmp:
        for pattern in _CHECKPOINT_FILES:
            for f in replayed_dir.glob(pattern):
                if f.name != "replay_report.json":
                    shutil.copy2(f, tmp / f.name)
        shutil.copytree(seed_log_dir, tmp / "seed_log", ignore=shutil.ignore_patterns(".tmp-*", "metrics.parquet"))
        base, tuned = eval_metrics["base"], eval_metrics["tuned"]
        (tmp / "README.md").write_text(
            CARD.format(
                front_matter=_front_matter(metadata, task.lower()) + _signature_front_matter(signed),
                name=out_dir.name,
                bits=quant["bits"],
                group_size=quant["group_size"],
                task=task,
                origin=origin,
                reward=reward,
                quant_rows=_quant_rows(quant, quant_report),
                commands=_commands(quant_report, run_meta["base_codes_sha256"]),
                out_dir=out_dir,
                base_hash=run_meta["base_codes_sha256"],
                tuned_hash=final["codes_sha256"],
                hyper_rows=_hyper_rows(run_meta),
                base_identity=run_meta["base"]["sha256"],
                signature=_signature_section(signed, out_dir),
                notes="".join(f"\n> **Warning:** {w}\n" for w in no_op["warnings"]),
                n=base["n"],
                max_new_tokens=eval_metrics.get("max_new_tokens", "?"),
                b_acc=base["accuracy"], b_fmt=base["format_rate"], b_rew=base["mean_reward"],
                t_acc=tuned["accuracy"], t_fmt=tuned["format_rate"], t_rew=tuned["mean_reward"],
            )
        )
    return out_dir
