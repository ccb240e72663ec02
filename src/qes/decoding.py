"""Greedy decoding for fitness: P members x B prompts in one batch, the shared prompt prefix stored once per member.

A fitness call generates for the same B prompts under P perturbed models. The prompts share a long prefix
(system message and worked examples, ~80% of a few-shot prompt) whose keys and values depend on the member's
weights but not on the row, so this decoder keeps them once per member, ``[P, kv_heads, L, head_dim]``, and
only each row's own tokens per row, in a preallocated ``[P * B, kv_heads, capacity, head_dim]`` buffer. Attention
is a cascade: a row's scores against its member's prefix (one matrix product per member and kv head for all of
the member's rows and the query heads of the group, so the prefix is read once per step and grouped-query
attention needs no expanded keys) and against its own tokens, joined in one softmax.

transformers' ``generate`` cannot do this: its caches hold every key per row, and its attention functions see
one key tensor per row. The decoder therefore drives the model's own modules (embeddings, rotary embedding,
decoder layers, final norm, LM head) in a loop of its own and plugs the cascade in through transformers'
attention-function registry, so the architecture's layers (projections, rotary, MLP) stay the library's.
Rows are member-major (member ``m`` owns rows ``[m * B, (m + 1) * B)``); with a group of members installed on
the quantized linears (:mod:`qes.members`) each member's rows run through its own perturbed model.

Decoding is greedy (``argmax``, the first maximum on ties, as ``generate``), left padding, a row stops at EOS or
once its last tokens spell one of the stop strings, and never runs past ``max_new_tokens``; only the last
position's logits are computed.

With a :class:`StaticDecode` the decode steps have fixed shapes, so that ``torch.compile`` compiles them once and,
on CUDA, captures them as a graph (``mode="reduce-overhead"``), as transformers does with its static cache: the
buffers are zero-filled at full capacity (own tokens and prefix rounded up to ``STATIC_BUCKET``) and kept from
call to call, a step writes its keys at a position held in a tensor, the masks are additive over the whole
capacity and updated in place, and the members' corrections are fixed-size (:class:`qes.members.FixedCorrection`).
The masked positions add exact zeros to the softmax, so the step computes the eager one's function up to float
rounding.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import torch

ATTENTION_NAME = "qes_cascade"
#: the static decode path rounds the own-token capacity and the prefix length up to a multiple of this, so that
#: chunks of slightly different lengths share one compiled step
STATIC_BUCKET = 64


@dataclass(frozen=True)
class StaticDecode:
    """Fixed-shape decode steps, compiled with ``torch.compile(backend=backend, mode=mode)``; ``backend=None``
    runs the fixed-shape step eagerly (the reference the compiled step is tested against)."""

    backend: str | None = "inductor"
    mode: str | None = None

    @classmethod
    def for_device(cls, device: torch.device | str) -> StaticDecode:
        """Inductor, with CUDA graphs on CUDA; refused on a CPU without the C++ compiler inductor builds with."""
        if torch.device(device).type == "cuda":
            return cls(mode="reduce-overhead")
        if cpu_compiler() is None:
            raise RuntimeError(f"finetune.decode: compiled on the CPU needs a C++ compiler for torch.compile "
                               f"(inductor), and {_compiler_name()!r} is not on PATH (set CXX to another); use "
                               "decode: eager")
        return cls()


def _compiler_name() -> str:
    return os.environ.get("CXX", "g++")  # what inductor builds its CPU kernels with


def cpu_compiler() -> str | None:
    """The path of the C++ compiler inductor would use on the CPU, or None when there is none."""
    return shutil.which(_compiler_name())


@dataclass
class Decoded:
    """Generated tokens per row (up to and including EOS or the end of a stop string) and how many."""

    tokens: list[list[int]]

    @property
    def generated(self) -> int:
        return sum(len(t) for t in self.tokens)


class CascadeCache:
    """Keys and values of one member-batched decode: the prefix once per member, the rest once per row.

    transformers' attention modules call :meth:`update` with the new keys and values of their layer. The
    prefill runs member by member: in ``prefix`` mode the keys are member ``member``'s prefix, in ``rows``
    mode those of its rows (``rows`` slice); in ``decode`` mode they belong to every row. Row keys are
    written into preallocated per-row buffers at ``start`` and the filled part is returned.
    """

    def __init__(self, layers: int, members: int, rows: int, prefix_len: int, capacity: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device, static: StaticBuffers | None = None):
        self.members, self.rows_per_member = members, rows // members
        self.prefix_len = prefix_len
        self.static = static
        if static is not None:
            self.prefix, self.keys, self.values = static.prefix, static.keys, static.values
        else:
            self.prefix = [
                (torch.empty(members, kv_heads, prefix_len, head_dim, dtype=dtype, device=device),
                 torch.empty(members, kv_heads, prefix_len, head_dim, dtype=dtype, device=device))
                for _ in range(layers)
            ] if prefix_len else None
            shape = (rows, kv_heads, capacity, head_dim)
            self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
            self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.mode = "prefix"
        self.member = 0
        self.start = 0
        self.allowed: torch.Tensor | None = None  # prefill: which own keys each query sees, [B, 1, T, T]
        self.mask: torch.Tensor | None = None  # decode: additive [rows, 1, 1, start + 1] over the own tokens

    @property
    def row_slice(self) -> slice:
        if self.mode == "decode":
            return slice(None)
        per = self.rows_per_member
        return slice(self.member * per, (self.member + 1) * per)

    def prefix_of(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The prefix keys and values the current rows face: one member's in prefill, all in decode."""
        if self.prefix is None:
            return None
        keys, values = self.prefix[layer]
        if self.mode == "decode":
            return keys, values
        at, length = slice(self.member, self.member + 1), slice(0, self.prefix_len)
        return keys[at, :, length], values[at, :, length]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer: int, *args: Any) -> tuple[torch.Tensor, ...]:
        if self.mode == "prefix":
            keys, values = self.prefix[layer]
            keys[self.member, :, : self.prefix_len].copy_(key[0])
            values[self.member, :, : self.prefix_len].copy_(value[0])
            return key, value
        if self.mode == "decode" and self.static is not None:  # fixed shapes: the whole capacity, mask decides
            self.keys[layer].index_copy_(2, self.static.position, key)
            self.values[layer].index_copy_(2, self.static.position, value)
            return self.keys[layer], self.values[layer]
        end = self.start + key.shape[2]
        rows = self.row_slice
        self.keys[layer][rows, :, self.start : end] = key
        self.values[layer][rows, :, self.start : end] = value
        return self.keys[layer][rows, :, :end], self.values[layer][rows, :, :end]


class StaticBuffers:
    """The zero-filled, full-capacity tensors of a fixed-shape decode: keys and values (prefix per member, own
    tokens per row), the additive masks over both and the write position. Kept on the model and reused by every
    call of the same shape, so that a captured graph finds them where it recorded them."""

    def __init__(self, layers: int, members: int, rows: int, prefix_cap: int, capacity: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        self.shape = (layers, members, rows, prefix_cap, capacity, kv_heads, head_dim, dtype, device)
        prefix = (members, kv_heads, prefix_cap, head_dim)
        own = (rows, kv_heads, capacity, head_dim)
        zeros = partial(torch.zeros, dtype=dtype, device=device)
        self.prefix = [(zeros(prefix), zeros(prefix)) for _ in range(layers)] if prefix_cap else None
        self.keys = [zeros(own) for _ in range(layers)]
        self.values = [zeros(own) for _ in range(layers)]
        self.mask = torch.zeros(rows, 1, 1, capacity, dtype=torch.float32, device=device)
        self.prefix_mask = torch.zeros(1, 1, 1, prefix_cap, dtype=torch.float32, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        for tensor in self.tensors():
            torch._dynamo.mark_static_address(tensor)

    def tensors(self) -> list[torch.Tensor]:
        pairs = (self.prefix or []) + list(zip(self.keys, self.values))
        return [t for pair in pairs for t in pair] + [self.mask, self.prefix_mask, self.position]

    def reset(self, real: torch.Tensor, prefix_len: int) -> None:
        """Zero every buffer and open the mask on the real own tokens ``real [rows, capacity]`` and the prefix."""
        for tensor in self.tensors():
            tensor.zero_()
        self.mask.masked_fill_(~real[:, None, None, :], torch.finfo(torch.float32).min)
        self.prefix_mask[..., prefix_len:] = torch.finfo(torch.float32).min

    def open(self, position: int) -> None:
        """Let every row see the own token at ``position`` (written by the coming step)."""
        self.position.fill_(position)
        self.mask[..., position] = 0.0

    @classmethod
    def of(cls, model: torch.nn.Module, *shape: Any) -> StaticBuffers:
        """The model's buffers of this shape, allocated on first use (one shape is kept at a time)."""
        held = getattr(model, "_qes_static_buffers", None)
        if held is None or held.shape != shape:
            model._qes_static_buffers = None  # free the old shape's memory first
            held = model._qes_static_buffers = cls(*shape)
        return held


def cascade_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention over [member's prefix | row's own tokens]; query ``[R, H, T, D]``, returns ``[R, T, H, D]``."""
    cache: CascadeCache = kwargs["qes_cache"]
    if cache.mode == "prefix":  # causal attention within the prefix
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling, enable_gqa=True
        )
        return out.transpose(1, 2).contiguous(), None
    prefix = cache.prefix_of(module.layer_idx)
    if cache.mode == "decode":
        prefix_mask = cache.static.prefix_mask if cache.static is not None else None
        out = _decode_attention(query.float(), key, value, prefix, cache.mask, scaling, prefix_mask)
        return out.to(query.dtype), None
    return _prefill_attention(query, key, value, prefix, cache.allowed, scaling), None


def _prefill_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       prefix: tuple[torch.Tensor, torch.Tensor] | None, allowed: torch.Tensor,
                       scaling: float) -> torch.Tensor:
    """Many query tokens per row: torch's fused attention over the prefix copied to each row for this call
    only (the copy is small next to the prefill's own work and is dropped right after)."""
    rows = query.shape[0]
    if prefix is not None:
        per = rows // prefix[0].shape[0]
        key = torch.cat([prefix[0].repeat_interleave(per, dim=0).to(query.dtype), key.to(query.dtype)], dim=2)
        value = torch.cat([prefix[1].repeat_interleave(per, dim=0).to(query.dtype), value.to(query.dtype)], dim=2)
        seen = torch.ones(*allowed.shape[:-1], prefix[0].shape[2], dtype=torch.bool, device=allowed.device)
        allowed = torch.cat([seen, allowed], dim=-1)
    else:
        key, value = key.to(query.dtype), value.to(query.dtype)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=allowed, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous()


def _decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      prefix: tuple[torch.Tensor, torch.Tensor] | None, mask: torch.Tensor,
                      scaling: float, prefix_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per row: the cascade. The query heads sharing a kv head are rows of one matrix (no
    expanded keys), and all rows of a member face that member's prefix together, so it is read once.
    ``prefix_mask``: additive, over a prefix padded to a fixed length (the static path)."""
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    q = (query * scaling).reshape(rows, kv_heads, group, dim)
    own = torch.matmul(q, key.transpose(-1, -2)) + mask  # [R, Hkv, G, S]
    if prefix is None:
        weights = torch.softmax(own, dim=-1)
        return torch.matmul(weights, value).reshape(rows, 1, heads, dim)
    p_key, p_value = prefix  # [P, Hkv, L, D]
    members, length = p_key.shape[0], p_key.shape[2]
    per = rows // members
    qp = q.reshape(members, per, kv_heads, group, dim).transpose(1, 2).reshape(members, kv_heads, per * group, dim)
    pre = torch.matmul(qp, p_key.transpose(-1, -2))  # [P, Hkv, B*G, L]
    pre = pre.reshape(members, kv_heads, per, group, length).transpose(1, 2).reshape(rows, kv_heads, group, length)
    if prefix_mask is not None:
        pre = pre + prefix_mask
    weights = torch.softmax(torch.cat([pre, own], dim=-1), dim=-1)
    out = torch.matmul(weights[..., length:], value)  # [R, Hkv, G, D]
    wp = weights[..., :length].reshape(members, per, kv_heads, group, length).transpose(1, 2)
    out_pre = torch.matmul(wp.reshape(members, kv_heads, per * group, length), p_value)
    out = out + out_pre.reshape(members, kv_heads, per, group, dim).transpose(1, 2).reshape(rows, kv_heads, group, dim)
    return out.reshape(rows, 1, heads, dim)


_registered = False


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTENTION_NAME, cascade_attention)
        _registered = True


@contextmanager
def _cascade_attention(model: torch.nn.Module):
    _register()
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = before


class StopStrings:
    """Whether a row's last tokens spell one of the stop strings (each token is at least one character)."""

    def __init__(self, tokenizer: Any, stop_strings: Sequence[str]):
        self.tokenizer = tokenizer
        self.strings = tuple(s for s in stop_strings if s)
        self.window = max((len(s) for s in self.strings), default=0) + 1

    def hits(self, rows: list[list[int]]) -> list[bool]:
        if not self.strings or not rows:
            return [False] * len(rows)
        texts = self.tokenizer.batch_decode([r[-self.window :] for r in rows], skip_special_tokens=False)
        return [any(s in text for s in self.strings) for text in texts]


def _model_parts(model: torch.nn.Module) -> tuple[Any, Any]:
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        raise ValueError(f"{type(model).__name__}: the member-batched decoder runs decoder-only models with "
                         "model.layers and a rotary embedding (llama, qwen2, ...); use prefix_cache: row")
    return inner, model.lm_head


def _attention_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def _prefill_allowed(real: torch.Tensor, steps: int) -> torch.Tensor:
    """``[R, 1, T, T]``: query t sees the real own tokens up to itself (and always itself, so that a padding
    query never faces an empty row)."""
    positions = torch.arange(steps, device=real.device)
    causal = positions[None, :] <= positions[:, None]
    return ((causal[None] & real[:, None, :steps]) | torch.eye(steps, dtype=torch.bool, device=real.device)[None]
            ).unsqueeze(1)


def _decode_mask(real: torch.Tensor, end: int) -> torch.Tensor:
    """Additive ``[R, 1, 1, end]`` mask of the real own tokens, for the token at ``end - 1``."""
    mask = torch.zeros(real.shape[0], end, dtype=torch.float32, device=real.device)
    return mask.masked_fill_(~real[:, :end], torch.finfo(torch.float32).min)[:, None, None, :]


def _forward(inner: Any, cache: CascadeCache, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    hidden = inner.embed_tokens(ids)
    embeddings = inner.rotary_emb(hidden, position_ids=positions)
    for layer in inner.layers:
        hidden = layer(hidden, attention_mask=None, position_ids=positions, past_key_values=cache,
                       use_cache=True, position_embeddings=embeddings, qes_cache=cache)
    return hidden


def _next_tokens(inner: Any, lm_head: Any, hidden: torch.Tensor) -> torch.Tensor:
    return lm_head(inner.norm(hidden[:, -1:]))[:, -1].argmax(dim=-1)


def _decode_step(inner: Any, lm_head: Any, cache: CascadeCache, ids: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
    """One decode step of every row: the next greedy token of each."""
    return _next_tokens(inner, lm_head, _forward(inner, cache, ids, positions))


_compiled: dict[tuple[str, str | None], Any] = {}


def _inductor_cache_per_capability() -> None:
    """Give each CPU capability an inductor cache folder of its own, unless the user chose one.

    inductor picks its CPU vector ISA from ``ATEN_CPU_CAPABILITY``, but its on-disk cache does not key every
    artifact by it: with torch 2.13, kernels cached under ``ATEN_CPU_CAPABILITY=avx2`` and loaded under the
    machine's AVX-512 decoded garbage or crashed the process.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir()):
        capability = torch.backends.cpu.get_cpu_capability().lower()
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{default_cache_dir()}-{capability}"


def _static_step(plan: StaticDecode) -> Any:
    if plan.backend is None:
        return _decode_step
    if plan.backend == "inductor":
        _inductor_cache_per_capability()
    key = (plan.backend, plan.mode)
    if key not in _compiled:
        _compiled[key] = torch.compile(_decode_step, backend=plan.backend, mode=plan.mode, fullgraph=True,
                                       dynamic=False)
    compiled = _compiled[key]

    def step(*args: Any) -> torch.Tensor:
        if plan.mode == "reduce-overhead":  # a new replay of the captured graph may reuse its output memory,
            torch.compiler.cudagraph_mark_step_begin()  # so each step is marked and its tokens copied out
        return compiled(*args).clone()

    return step


def _bucket(length: int) -> int:
    return -(-length // STATIC_BUCKET) * STATIC_BUCKET


@torch.inference_mode()
def greedy_group(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prefix_len: int,
    max_new_tokens: int,
    eos_token_id: int,
    stops: StopStrings | None = None,
    members: MemberScopes | None = None,
    static: StaticDecode | None = None,
) -> Decoded:
    """Greedy continuations of B prompts ``[B, prefix_len + S]`` (left-padded after a shared prefix of
    ``prefix_len`` tokens) under each member of ``members`` (the model as it is when None); rows of the
    result are member-major.

    The prompts are run member by member under ``members.alone(m)`` (their work is the same per member
    whichever way it is batched), and every decode step for all members' rows at once under
    ``members.together()``; with ``static`` in fixed shapes, compiled as it says.
    """
    inner, lm_head = _model_parts(model)
    device = next(model.parameters()).device
    layers, kv_heads, head_dim = _attention_shape(model)
    scopes = members or _Unperturbed()
    count, batch = scopes.size, input_ids.shape[0]
    suffix_ids = input_ids[:, prefix_len:].to(device)
    width = suffix_ids.shape[1]
    capacity = width + max_new_tokens if static is None else _bucket(width + max_new_tokens)
    real = torch.zeros(count * batch, capacity, dtype=torch.bool, device=device)
    real[:, :width] = attention_mask[:, prefix_len:].to(device).bool().repeat(count, 1)
    buffers = None
    if static is not None:
        buffers = StaticBuffers.of(model, layers, count, count * batch, _bucket(prefix_len), capacity, kv_heads,
                                   head_dim, torch.float32, device)
        buffers.reset(real, prefix_len)
    cache = CascadeCache(layers, count, count * batch, prefix_len, capacity, kv_heads, head_dim,
                         torch.float32, device, buffers)
    counts = real[:batch, :width].long().cumsum(1)
    positions = prefix_len + (counts - 1).clamp(min=0)
    next_positions = (prefix_len + counts[:, -1]).repeat(count)
    cache.allowed = _prefill_allowed(real[:batch], width)
    last = []
    with _cascade_attention(model):
        for m in range(count):
            cache.member = m
            with scopes.alone(m):
                if prefix_len:
                    cache.mode = "prefix"
                    prefix = input_ids[:1, :prefix_len].to(device)
                    _forward(inner, cache, prefix, torch.arange(prefix_len, device=device)[None])
                cache.mode = "rows"
                last.append(_forward(inner, cache, suffix_ids, positions)[:, -1:])
        cache.mode = "decode"
        if buffers is not None:
            cache.mask = buffers.mask
        tokens = _next_tokens(inner, lm_head, torch.cat(last))
        out: list[list[int]] = [[] for _ in range(count * batch)]
        active = list(range(count * batch))
        with scopes.together(fixed_shapes=static is not None):
            step_fn = _static_step(static) if static is not None else _decode_step
            if static is not None:
                _sync_layers(model)
            for step in range(max_new_tokens):
                values = tokens.tolist()
                for r in active:
                    out[r].append(values[r])
                hit = stops.hits([out[r] for r in active]) if stops is not None else [False] * len(active)
                active = [r for r, h in zip(active, hit) if not h and values[r] != eos_token_id]
                if not active or step + 1 == max_new_tokens:
                    break
                cache.start = width + step
                if buffers is not None:
                    buffers.open(cache.start)
                else:
                    real[:, cache.start] = True
                    cache.mask = _decode_mask(real, cache.start + 1)
                tokens = step_fn(inner, lm_head, cache, tokens[:, None], next_positions[:, None])
                next_positions = next_positions + 1
    return Decoded(out)


def _sync_layers(model: torch.nn.Module) -> None:
    """Bring every quantized layer's forward cache up to date: a compiled step does not look (the codes do not
    change while a group decodes)."""
    from qes.qlinear import GPTQLinear

    for module in model.modules():
        if isinstance(module, GPTQLinear):
            module.sync_cache()


class MemberScopes(Protocol):
    """How a group of perturbed members of one model is computed (see :class:`qes.members.MemberGroup`)."""

    size: int

    def alone(self, member: int) -> AbstractContextManager: ...

    def together(self, fixed_shapes: bool = False) -> AbstractContextManager: ...


class _Unperturbed:
    size = 1

    def alone(self, member: int) -> AbstractContextManager:
        return nullcontext()

    def together(self, fixed_shapes: bool = False) -> AbstractContextManager:
        return nullcontext()
