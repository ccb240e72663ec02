"""Generation: greedy batched generation on a fixed prompt batch, scored with the task reward.

The training loop scores the same prompts with many perturbed models per iteration, so prompts
are tokenised once into a :class:`PromptBatch` and :func:`score` only generates and rewards.
Generation is greedy (deterministic), uses the KV cache, pads on the left, stops each row at EOS or
at the end of one of the task's stop strings (Countdown: ``</answer>``; nothing after it can earn
reward) and never runs past ``max_new_tokens``. The prompts' common leading tokens (system message and
worked examples, ~80% of a few-shot prompt) are run once per call (``GenerationConfig.share_prefix``).

Two decoders produce the same greedy function up to floating-point rounding (``GenerationConfig.prefix_cache``):

``member`` (default)
    :mod:`qes.decoding`: the prefix's keys and values stored once per member and read once per step, and
    several perturbed members scored in one batch (:func:`score_group`, with :mod:`qes.members`).
``row``
    transformers' ``generate`` with the prefix's cache repeated for every row, one member at a time: the
    reference the member decoder is tested against.

The held-out metrics and examples of a scored batch are written by :mod:`qes.evaluate`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qes.tasks import RewardRecord, Task, default_task, read_task_data

if TYPE_CHECKING:
    from qes.decoding import MemberScopes


#: where a shared prompt prefix's keys and values are kept: once per member (qes.decoding) or once per row
PREFIX_CACHES = ("member", "row")
#: how the member decoder's steps run: as torch ops, or in fixed shapes through torch.compile
DECODES = ("eager", "compiled")


@dataclass(frozen=True)
class GenerationConfig:
    """Fixed decoding budget: ``max_new_tokens`` per prompt, ``batch_size`` prompts per call.

    ``stop_strings``: a row stops once its text ends with one of them (None: the task's; ``()`` stops at
    EOS only).

    ``share_prefix``: when the prompts of a call start with the same tokens (the system message and the
    worked examples), run that prefix once and let every row reuse its KV cache, instead of recomputing
    it per row. Rows are then laid out as ``[prefix | padding | own tokens]`` (position ids follow the
    attention mask, so every real token keeps its position). Same greedy model function, about half the
    time for few-shot prompts on CPU.

    ``prefix_cache``: ``member`` keeps the prefix once per member (:mod:`qes.decoding`, which also scores
    several members at once); ``row`` is transformers' ``generate`` with the prefix repeated per row.

    ``decode``: ``eager`` runs the member decoder's steps as torch ops; ``compiled`` runs them in fixed shapes
    through ``torch.compile`` (CUDA graphs on CUDA; :class:`qes.decoding.StaticDecode`).
    """

    max_new_tokens: int = 64
    batch_size: int = 16
    share_prefix: bool = True
    stop_strings: tuple[str, ...] | None = None
    prefix_cache: str = "member"
    decode: str = "eager"

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be >= 1")
        if self.prefix_cache not in PREFIX_CACHES:
            raise ValueError(f"prefix_cache must be one of {', '.join(PREFIX_CACHES)}, got {self.prefix_cache!r}")
        if self.decode not in DECODES:
            raise ValueError(f"decode must be one of {', '.join(DECODES)}, got {self.decode!r}")
        if self.decode != "eager" and self.prefix_cache != "member":
            raise ValueError(f"decode {self.decode} needs prefix_cache member")


@dataclass(frozen=True)
class PromptBatch:
    """A task's rows with their prompt texts and token ids, tokenised once.

    ``rows[i]`` is row ``i`` as the task's reward reads it (a Countdown problem, a dataset row).
    ``prefixes[i]`` is the assistant prefix that prompt ``i`` ends with; it is put back in front of
    the response when the reward is computed.
    """

    rows: tuple[Any, ...]
    prompts: tuple[str, ...]
    prefixes: tuple[str, ...]
    token_ids: tuple[tuple[int, ...], ...]
    tokenizer: Any = field(repr=False, compare=False)
    pad_token_id: int
    eos_token_id: int
    task: Task = field(default=None, repr=False, compare=False)  # type: ignore[assignment]  # set by make_batch

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, indices: Sequence[int]) -> PromptBatch:
        """The prompts at ``indices``, in that order."""
        return replace(
            self,
            rows=tuple(self.rows[i] for i in indices),
            prompts=tuple(self.prompts[i] for i in indices),
            prefixes=tuple(self.prefixes[i] for i in indices),
            token_ids=tuple(self.token_ids[i] for i in indices),
        )

    def chunks(self, batch_size: int, share_prefix: bool = False) -> list[Chunk]:
        """The prompts in groups of ``batch_size``, padded on the left.

        With ``share_prefix`` each group's common leading tokens (all but at least one token per row) become
        the chunk's ``prefix`` and the rows hold ``[prefix | padding | rest]``; without it ``prefix`` is
        empty and the rows are plain left-padded prompts.
        """
        out = []
        for start in range(0, len(self), batch_size):
            rows = self.token_ids[start : start + batch_size]
            shared = common_prefix_length(rows) if share_prefix else 0
            width = max(len(r) for r in rows) - shared
            ids = torch.full((len(rows), shared + width), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(rows), shared + width), dtype=torch.long)
            for j, r in enumerate(rows):
                ids[j, :shared] = torch.tensor(r[:shared], dtype=torch.long)
                mask[j, :shared] = 1
                rest = len(r) - shared
                ids[j, shared + width - rest :] = torch.tensor(r[shared:], dtype=torch.long)
                mask[j, shared + width - rest :] = 1
            out.append(Chunk(slice(start, start + len(rows)), ids, mask, shared))
        return out


@dataclass(frozen=True)
class Chunk:
    """One generate call: ``rows`` of the batch, their ids and mask, and the shared prefix length."""

    rows: slice
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prefix_len: int


def common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Leading tokens shared by all rows, leaving at least one token of every row outside the prefix."""
    limit = min(len(r) for r in rows) - 1
    n = 0
    first = rows[0]
    while n < limit and all(r[n] == first[n] for r in rows):
        n += 1
    return n


def make_batch(
    tokenizer: Any, rows: Sequence[Any], prompts: Sequence[str], prefixes: Sequence[str] | str,
    task: Task | None = None,
) -> PromptBatch:
    """Tokenise prompt texts (already chat-formatted; no special tokens are added) of ``task``'s rows
    (the default task's, :func:`qes.tasks.default_task`, when None)."""
    task = task if task is not None else default_task()
    if isinstance(prefixes, str):
        prefixes = [prefixes] * len(prompts)
    if not (len(rows) == len(prompts) == len(prefixes)):
        raise ValueError("rows, prompts and prefixes differ in length")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    return PromptBatch(
        tuple(rows), tuple(prompts), tuple(prefixes), tuple(tuple(i) for i in ids), tokenizer, int(pad), int(eos),
        task,
    )


@dataclass(frozen=True)
class FitnessResult:
    """Per-example rewards (with their records and responses), their mean and the cost."""

    rewards: list[float]
    records: list[RewardRecord]
    responses: list[str]
    mean_reward: float
    generated_tokens: int
    seconds: float


def stop_strings(cfg: GenerationConfig, batch: PromptBatch) -> tuple[str, ...]:
    """The stop strings of a call: the config's when set, else the batch's task's."""
    return cfg.stop_strings if cfg.stop_strings is not None else batch.task.stop_strings


def hf_generation_config(cfg: GenerationConfig, batch: PromptBatch) -> Any:
    """The transformers generation settings of ``score``: greedy, KV cache, the batch's pad and EOS."""
    from transformers import GenerationConfig as HFGenerationConfig

    return HFGenerationConfig(
        max_new_tokens=cfg.max_new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        pad_token_id=batch.pad_token_id,
        eos_token_id=batch.eos_token_id,
        temperature=None,
        top_p=None,
        top_k=None,
        stop_strings=list(stop_strings(cfg, batch)) or None,
    )


def generated_lengths(new_tokens: torch.Tensor, eos_token_id: int, pad_token_id: int | None = None) -> list[int]:
    """Tokens each row really generated: up to and including its first EOS; without one, up to the padding
    that generate appends to a row once it has stopped (at a stop string), else all."""
    lengths = []
    for row in new_tokens.tolist():
        n = row.index(eos_token_id) + 1 if eos_token_id in row else len(row)
        if pad_token_id is not None and pad_token_id != eos_token_id:
            while n > 0 and row[n - 1] == pad_token_id:
                n -= 1
        lengths.append(n)
    return lengths


MIN_SHARED_PREFIX = 8  # shorter common prefixes are not worth a separate forward pass


def _prefix_cache(model: Any, chunk: Chunk, device: torch.device) -> Any:
    """KV cache of the chunk's shared prefix, computed once and repeated for every row."""
    prefix = chunk.input_ids[:1, : chunk.prefix_len].to(device)
    cache = model(input_ids=prefix, use_cache=True).past_key_values
    cache.batch_repeat_interleave(chunk.input_ids.shape[0])
    return cache


def generate(model: Any, batch: PromptBatch, cfg: GenerationConfig) -> tuple[list[str], int]:
    """Greedy responses for every prompt of ``batch`` and the number of generated tokens."""
    if cfg.prefix_cache == "member":
        responses, tokens = generate_group(model, batch, cfg)
        return responses[0], tokens[0]
    return _generate_rows(model, batch, cfg)


def generate_group(model: Any, batch: PromptBatch, cfg: GenerationConfig, members: MemberScopes | None = None
                   ) -> tuple[list[list[str]], list[int]]:
    """Greedy responses of each member of ``members`` (a :class:`qes.members.MemberGroup`; the model as it is
    when None) for every prompt of ``batch``, and each member's number of generated tokens."""
    from qes.decoding import StaticDecode, StopStrings, greedy_group

    if cfg.prefix_cache != "member":
        raise ValueError("scoring several members at once needs prefix_cache: member")
    count = members.size if members is not None else 1
    stops = StopStrings(batch.tokenizer, stop_strings(cfg, batch))
    responses: list[list[str]] = [[] for _ in range(count)]
    tokens = [0] * count
    static = StaticDecode.for_device(next(model.parameters()).device) if cfg.decode == "compiled" else None
    for chunk in batch.chunks(cfg.batch_size, share_prefix=cfg.share_prefix):
        prefix = chunk.prefix_len if chunk.prefix_len >= MIN_SHARED_PREFIX else 0
        decoded = greedy_group(model, chunk.input_ids, chunk.attention_mask, prefix, cfg.max_new_tokens,
                               batch.eos_token_id, stops, members, static)
        rows = chunk.input_ids.shape[0]
        texts = batch.tokenizer.batch_decode(decoded.tokens, skip_special_tokens=True)
        for m in range(count):
            responses[m].extend(texts[m * rows : (m + 1) * rows])
            tokens[m] += sum(len(t) for t in decoded.tokens[m * rows : (m + 1) * rows])
    return responses, tokens


@torch.inference_mode()
def _generate_rows(model: Any, batch: PromptBatch, cfg: GenerationConfig) -> tuple[list[str], int]:
    """transformers' ``generate`` with the shared prefix's cache repeated for every row (``prefix_cache: row``)."""
    gen_cfg = hf_generation_config(cfg, batch)
    device = next(model.parameters()).device
    responses: list[str] = []
    total = 0
    for chunk in batch.chunks(cfg.batch_size, share_prefix=cfg.share_prefix):
        ids = chunk.input_ids.to(device)
        kwargs = {}
        if chunk.prefix_len >= MIN_SHARED_PREFIX:
            kwargs["past_key_values"] = _prefix_cache(model, chunk, device)
        if stop_strings(cfg, batch):
            kwargs["tokenizer"] = batch.tokenizer  # transformers matches stop strings on the token texts
        out = model.generate(
            input_ids=ids, attention_mask=chunk.attention_mask.to(device), generation_config=gen_cfg, **kwargs
        )
        new = out[:, ids.shape[1] :].cpu()
        lengths = generated_lengths(new, batch.eos_token_id, batch.pad_token_id)
        total += sum(lengths)
        rows = [row[:n].tolist() for row, n in zip(new, lengths, strict=True)]
        responses.extend(batch.tokenizer.batch_decode(rows, skip_special_tokens=True))
    return responses, total


def score(model: Any, batch: PromptBatch, cfg: GenerationConfig) -> FitnessResult:
    """Generate greedily for the whole batch and reward every response."""
    start = time.perf_counter()
    with _eval_mode(model):
        responses, tokens = generate(model, batch, cfg)
    return _rewarded(batch, responses, tokens, time.perf_counter() - start)


def score_group(model: Any, batch: PromptBatch, cfg: GenerationConfig, members: MemberScopes) -> list[FitnessResult]:
    """:func:`score` for each member of a :class:`qes.members.MemberGroup`; each result's ``seconds`` is its
    share of the group's time."""
    start = time.perf_counter()
    with _eval_mode(model):
        responses, tokens = generate_group(model, batch, cfg, members)
    share = (time.perf_counter() - start) / members.size
    return [_rewarded(batch, r, n, share) for r, n in zip(responses, tokens, strict=True)]


@contextmanager
def _eval_mode(model: Any):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _rewarded(batch: PromptBatch, responses: list[str], tokens: int, seconds: float) -> FitnessResult:
    rows = zip(responses, batch.rows, batch.prefixes, strict=True)
    records = [batch.task.score(response, row, prefix) for response, row, prefix in rows]
    rewards = [r.reward for r in records]
    mean = sum(rewards) / len(rewards) if rewards else 0.0
    return FitnessResult(rewards, records, responses, mean, tokens, seconds)


def quant_linear_names(model: torch.nn.Module) -> list[str]:
    """Names of the model's GPTQ quantized linear modules."""
    from qes.qlinear import GPTQLinear

    return [name for name, m in model.named_modules() if isinstance(m, GPTQLinear)]


def require_quantized(model: torch.nn.Module) -> None:
    """Raise unless every linear layer of the decoder is a GPTQ quantized module, so that fitness
    is the quantized model's forward pass and never a float original's."""
    quantized = quant_linear_names(model)
    if not quantized:
        raise ValueError("the model has no GPTQ quantized linear layers (a float model?)")
    dense = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}."]
    if dense:
        raise ValueError(f"decoder linear layers left in float: {dense[:3]}...")


def load_batch(tokenizer: Any, task_parquet: str | Path, limit: int | None = None) -> PromptBatch:
    """A prompt batch from a task Parquet file written by the task stage (its first ``limit`` rows)."""
    task, rows, prompts, prefixes = read_task_data(task_parquet, limit)
    return make_batch(tokenizer, rows, prompts, prefixes, task)
