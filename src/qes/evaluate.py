"""Held-out evaluation: a quantized model scored on held-out prompts, its metrics and examples written, and
the base and tuned models compared on the same prompts."""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qes.generation import FitnessResult, GenerationConfig, PromptBatch, load_batch, require_quantized, score


@dataclass(frozen=True)
class EvaluateConfig:
    """Decoding budget and size of the held-out evaluation."""

    max_new_tokens: int = 64
    batch_size: int = 32
    limit: int | None = None
    device: str = "auto"
    backend: str = "auto"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        from qes.config import check_values

        block = {k: v for k, v in asdict(self).items() if k != "device"}
        check_values("evaluate", block, source="evaluate settings")
        check_values(("finetune", "device"), self.device, source="evaluate settings")

    @classmethod
    def from_block(cls, values: dict, device: str = "auto") -> EvaluateConfig:
        """The config's `evaluate:` block, validated by the config schema (its defaults fill the gaps)."""
        from qes.config import complete

        return cls(**complete(values, "evaluate", source="evaluate settings"), device=device)


def summarize(result: FitnessResult) -> dict[str, Any]:
    """Held-out metrics of a scored batch."""
    n = len(result.records)
    return {
        "n": n,
        "accuracy": sum(r.correct for r in result.records) / n if n else 0.0,
        "format_rate": sum(r.format_ok for r in result.records) / n if n else 0.0,
        "mean_reward": result.mean_reward,
        "generated_tokens": result.generated_tokens,
        "generation_seconds": result.seconds,
        "tokens_per_second": result.generated_tokens / result.seconds if result.seconds > 0 else 0.0,
    }


def write_examples(batch: PromptBatch, result: FitnessResult, path: str | Path) -> None:
    """Per-example prompts, responses and rewards as Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = result.records
    rows = batch.rows
    table = pa.table(
        {
            "id": [p.id for p in rows],
            **batch.task.describe(rows),
            "prompt": list(batch.prompts),
            "response": result.responses,
            "answer": [r.answer for r in recs],
            "format_ok": [r.format_ok for r in recs],
            "correct": [r.correct for r in recs],
            "reward": [r.reward for r in recs],
            "reason": [r.reason for r in recs],
        }
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def evaluate_heldout(
    model: Any,
    batch: PromptBatch,
    cfg: GenerationConfig,
    metrics_path: str | Path,
    examples_path: str | Path,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Score ``batch`` and write ``metrics.json`` (plus ``extra`` keys) and the per-example Parquet."""
    result = score(model, batch, cfg)
    metrics = {**summarize(result), "max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size, **(extra or {})}
    write_examples(batch, result, examples_path)
    Path(metrics_path).parent.mkdir(parents=True, exist_ok=True)
    Path(metrics_path).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return metrics


def load_for_evaluation(model_dir: str | Path, cfg: EvaluateConfig) -> tuple[Any, Any]:
    """The checkpoint loaded on the device, dtype and backend the evaluation settings ask for."""
    from qes.checkpoint import load_quantized
    from qes.finetune import resolve_device

    return load_quantized(model_dir, device=resolve_device(cfg.device), dtype=cfg.dtype, backend=cfg.backend)


def evaluate_loaded(model: Any, tokenizer: Any, name: str, eval_parquet: str | Path, cfg: EvaluateConfig,
                    metrics_path: Path, examples_path: str | Path) -> dict:
    """Score a loaded quantized model greedily on the first ``cfg.limit`` rows of ``eval_parquet``."""
    from qes.checkpoint import describe_compute

    compute = describe_compute(model)
    logging.getLogger(__name__).info("evaluating %s on %s", name, compute)
    require_quantized(model)
    batch = load_batch(tokenizer, eval_parquet, cfg.limit)
    generation = GenerationConfig(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    extra = {"model": name, **compute}
    return evaluate_heldout(model, batch, generation, metrics_path, examples_path, extra=extra)


def evaluate_model(model_dir: str | Path, eval_parquet: str | Path, cfg: EvaluateConfig,
                   metrics_path: Path, examples_path: str | Path) -> dict:
    """Load the checkpoint at ``model_dir`` and score it as :func:`evaluate_loaded` does."""
    model, tokenizer = load_for_evaluation(model_dir, cfg)
    return evaluate_loaded(model, tokenizer, str(model_dir), eval_parquet, cfg, metrics_path, examples_path)


def compare(base_dir: str | Path, tuned_dir: str | Path, eval_parquet: str | Path, cfg: EvaluateConfig,
            metrics_path: str | Path, base_examples: str | Path, tuned_examples: str | Path) -> dict:
    """Evaluate both models; write metrics.json with base, tuned and their difference."""
    from qes.fsutil import refuse_overlap

    for output in (metrics_path, base_examples, tuned_examples):
        refuse_overlap(output, {"base": base_dir, "tuned": tuned_dir, "eval": eval_parquet}, "output")
    with tempfile.TemporaryDirectory() as tmp:
        base = evaluate_model(base_dir, eval_parquet, cfg, Path(tmp) / "base.json", base_examples)
        tuned = evaluate_model(tuned_dir, eval_parquet, cfg, Path(tmp) / "tuned.json", tuned_examples)
    keys = ("accuracy", "format_rate", "mean_reward")
    metrics = {
        "base": base,
        "tuned": tuned,
        "difference": {k: tuned[k] - base[k] for k in keys},
        "n": base["n"],
        "max_new_tokens": cfg.max_new_tokens,
    }
    report = Path(tuned_dir) / "replay_report.json"
    if report.is_file():  # a tuned checkpoint written by replay says which run it is
        replay = json.loads(report.read_text())
        metrics["codes_changed"] = replay["codes_sha256"] != replay["base_codes_sha256"]
    Path(metrics_path).parent.mkdir(parents=True, exist_ok=True)
    Path(metrics_path).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return metrics
