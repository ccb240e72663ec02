"""Synthetic GPTQ models of real architectures, their prompts and a fixed update schedule, for gpu_check.py.

Codes, zero points, scales, embeddings, biases and prompts are all functions of a counter hash
(:func:`qes.noise.hash32`) turned into floats by exact operations only (a 24-bit integer times a power of
two), so the same model comes out bit for bit on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from qes.backends.codes_only import CodesOnlyBackend
from qes.backends.dense import dequantize_weight
from qes.checkpoint import Scheme, assemble_quantized
from qes.codes import LayerCodes, layer_key, quantized_linears
from qes.generation import PromptBatch
from qes.noise import hash32, member_seeds
from qes.packing import pack_codes
from qes.qlinear import GPTQLinear
from qes.tasks import RewardRecord, Task
from qes.update import Step, alpha_fixed_point, quantize_coefficients, shape_rewards

BITS = 4
SIGMA = 0.01
ALPHA = 0.007  # alpha / sigma = 0.7: steps below one code, so the residual carries over between steps
WINDOW = 10
FULL_STEPS = WINDOW + 3  # the last two updates run on a window that two steps have already left
GLOBAL_SEED = 20240607
M32 = 0xFFFFFFFF
CHUNK = 1 << 24  # elements hashed at a time when filling large float tensors
REFERENCE_CODES = 1 << 24  # codes the CPU reference replays through the full window, at most
STOP_TEXT = "</answer>"
STOP_PERIOD = 8  # one id in eight renders as STOP_TEXT in the training-fitness prompts' responses
GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx")


@dataclass(frozen=True)
class Size:
    """An architecture's shapes and how much of each phase to run on it."""

    arch: str  # llama | qwen2
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool  # input embeddings and lm_head share one tensor, as in the real model
    group: int
    batch: int  # prompts per generate call
    prompt: int  # longest prompt, tokens
    new_tokens: int
    population: int
    steps: int  # iterations of the fixed schedule that score every member
    plain_repeats: int
    members: int  # members scored together in the member-batching phase
    seconds: float  # time box of the QES run (iterations stop early past it, never below 2)


SIZES = {
    "tiny": Size("llama", 256, 512, 2, 4, 2, 1024, True, 128, batch=4, prompt=16, new_tokens=16,
                 population=4, steps=2, plain_repeats=3, members=4, seconds=30),
    "smollm2": Size("llama", 576, 1536, 30, 9, 3, 49152, True, 64, batch=64, prompt=64, new_tokens=128,
                    population=4, steps=3, plain_repeats=3, members=8, seconds=100),
    "qwen1.5b": Size("qwen2", 1536, 8960, 28, 12, 2, 151936, True, 128, batch=32, prompt=64, new_tokens=64,
                     population=4, steps=2, plain_repeats=2, members=32, seconds=100),
}


# --- deterministic content --------------------------------------------------------------------------


def _hashes(tag: str, start: int, count: int, device: torch.device) -> torch.Tensor:
    """hash(tag, k) for k in [start, start + count) as int64 in [0, 2^32): the same bits on every device."""
    key = layer_key(tag)
    k = torch.arange(start, start + count, dtype=torch.int64, device=device)
    return hash32(hash32(k ^ (key & M32)) ^ ((key >> 32) & M32))


def _uniform(tag: str, shape: tuple[int, ...], log2_amplitude: int, dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
    """Values in [-2^a, 2^a): a signed 24-bit integer times 2^(a - 23), exact in float32, then cast."""
    n = math.prod(shape)
    out = torch.empty(n, dtype=dtype, device=device)
    for start in range(0, n, CHUNK):
        h = _hashes(tag, start, min(CHUNK, n - start), device)
        value = ((h >> 8) - (1 << 23)).to(torch.float32) * 2.0 ** (log2_amplitude - 23)
        out[start : start + h.numel()] = value.to(dtype)
    return out.view(shape)


def gptq_tensors(name: str, in_f: int, out_f: int, group: int, device: torch.device) -> dict[str, torch.Tensor]:
    """GPTQ tensors of one layer (exact zero points): uniform codes 0..15 around the zero points 7 and 8.

    Each packed ``qweight`` word is one hash (eight 4-bit codes), which keeps the CPU reference of the
    largest size to seconds.
    """
    h = _hashes(f"{name}/codes", 0, in_f // 8 * out_f, device)
    qweight = ((h ^ 0x80000000) - 0x80000000).to(torch.int32).view(in_f // 8, out_f)
    groups = in_f // group
    hz = _hashes(f"{name}/zeros", 0, groups * out_f, device)
    zeros = (7 + (hz & 1)).view(groups, out_f)  # mean 7.5, like the codes
    # 1024..2047 times 2^-19: [0.002, 0.0039), 11 significant bits, exact in fp16; weight std about 0.013.
    scales = ((hz >> 8) & 1023) + 1024
    return {
        "qweight": qweight,
        "qzeros": pack_codes(zeros.to(torch.uint8), BITS).t().contiguous(),  # [in/g, out/p]
        "scales": (scales.to(torch.float32) * 2.0**-19).to(torch.float16).view(groups, out_f),
        "g_idx": (torch.arange(in_f, device=device) // group).to(torch.int32),
    }


def hf_config(size: Size) -> Any:
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads, tie_word_embeddings=size.tied, max_position_embeddings=4096,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    if size.arch == "llama":
        return LlamaConfig(**common, rms_norm_eps=1e-5)
    return Qwen2Config(**common, rms_norm_eps=1e-6, use_sliding_window=False)


@dataclass(frozen=True)
class LinearShape:
    name: str
    in_features: int
    out_features: int
    bias: bool

    @property
    def codes(self) -> int:
        return self.in_features * self.out_features

    @property
    def decoder_layer(self) -> int:
        return int(self.name.split(".layers.")[1].split(".")[0])


def architecture(config: Any) -> tuple[list[LinearShape], list[tuple[str, tuple[int, ...]]]]:
    """The quantized linears (every decoder linear) and the other parameters, read off a meta-device model.

    A tied lm_head is the input embeddings' parameter, so it is listed once, as the embeddings.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linears = [
        LinearShape(name, m.in_features, m.out_features, m.bias is not None)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}."
    ]
    owned = {f"{x.name}.{p}" for x in linears for p in ("weight", "bias")}
    others = [(n, tuple(p.shape)) for n, p in model.named_parameters() if n not in owned]
    return sorted(linears, key=lambda x: x.name), others


def reference_layers(config: Any) -> list[str]:
    """The layers the CPU reference replays through the full window: all of them up to REFERENCE_CODES codes,
    else the last decoder layer's linears, smallest first, as many as fit (at least one). Each layer's noise and
    update are its own, so a subset of layers comes out as it does in the whole model."""
    linears, _ = architecture(config)
    if sum(x.codes for x in linears) <= REFERENCE_CODES:
        return [x.name for x in linears]
    last = max(x.decoder_layer for x in linears)
    chosen, codes = [], 0
    for x in sorted((x for x in linears if x.decoder_layer == last), key=lambda x: (x.codes, x.name)):
        if chosen and codes + x.codes > REFERENCE_CODES:
            break
        chosen.append(x.name)
        codes += x.codes
    return chosen


def final_norm_signs(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Weights of +-1 for the final norm. With the lm_head tied to the embeddings and weights of one, a random
    model's last hidden state is closest to its own input's embedding, so greedy decoding repeats the prompt's
    last token forever; random signs break that symmetry and the continuations wander through the vocabulary."""
    h = _hashes("model.norm.weight", 0, math.prod(shape), device)
    return (1 - 2 * (h & 1)).to(dtype).view(shape)


def checkpoint_tensors(config: Any, group: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Everything a GPTQ checkpoint of ``config`` holds, made on ``device``."""
    linears, others = architecture(config)
    tensors: dict[str, torch.Tensor] = {}
    for x in linears:
        for attr, t in gptq_tensors(x.name, x.in_features, x.out_features, group, device).items():
            tensors[f"{x.name}.{attr}"] = t
        if x.bias:
            tensors[f"{x.name}.bias"] = _uniform(f"{x.name}/bias", (x.out_features,), -6, dtype, device)
    for name, shape in others:
        if name == "model.norm.weight":  # random signs: see final_norm_signs
            tensors[name] = final_norm_signs(shape, dtype, device)
        elif name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=dtype, device=device)
        else:  # embeddings, lm_head: std about 0.018
            tensors[name] = _uniform(name, shape, -5, dtype, device)
    return tensors


# --- prompts and steps -----------------------------------------------------------------------------


class IdText:
    """Stands in for a tokenizer: responses are rendered as ids, and ids whose hash is 0 modulo ``stop_period``
    as STOP_TEXT (so a stop string ends some rows, as ``</answer>`` does in Countdown)."""

    def __init__(self, stop_period: int = 0):
        self.stop_period = stop_period

    def _word(self, token: int) -> str:
        return STOP_TEXT if self.stop_period and hash32(int(token)) % self.stop_period == 0 else str(int(token))

    def batch_decode(self, rows, skip_special_tokens: bool = True) -> list[str]:
        return [" ".join(map(self._word, r)) for r in rows]


def _prompt_tokens(tag: str, length: int, vocab: int) -> tuple[int, ...]:
    return tuple(int(t) for t in 1 + _hashes(tag, 0, length, torch.device("cpu")) % (vocab - 1))


def synthetic_prompts(size: Size) -> PromptBatch:
    """``batch`` prompts of hashed token ids, of different lengths (so generation pads on the left).

    The end-of-sequence id is one past the vocabulary: greedy decoding never picks it, and no stop strings are
    set, so every row generates exactly ``new_tokens`` tokens and both sides of a comparison do the same work.
    """
    rows = [_prompt_tokens(f"prompt/{r}", size.prompt - int(hash32(r + 1) % (size.prompt // 2)), size.vocab)
            for r in range(size.batch)]
    n = len(rows)
    return PromptBatch((None,) * n, ("",) * n, ("",) * n, tuple(rows), IdText(), pad_token_id=0,
                       eos_token_id=size.vocab)


def synthetic_reward(completion: str, row: Any, prefix: str) -> RewardRecord:
    """Half for ending at the stop string, half for the share of even ids before it: any changed token shows."""
    words = completion.split()
    stopped = bool(words) and words[-1] == STOP_TEXT
    answer = words[:-1] if stopped else words
    even = sum(int(w) % 2 == 0 for w in answer if w != STOP_TEXT) / max(len(answer), 1)
    reason = "ok" if stopped else "no stop string"
    return RewardRecord(stopped, stopped and even >= 0.5, 0.5 * stopped + 0.5 * even, " ".join(answer), reason)


SYNTHETIC_TASK = Task("synthetic", (STOP_TEXT,), synthetic_reward, lambda rows: {"row": list(rows)})


def fitness_prompts(size: Size) -> PromptBatch:
    """``batch`` prompts as finetune scores them: a shared ``prompt``-token prefix (the system message and worked
    examples of a few-shot prompt) and 1 .. prompt/4 tokens of each row's own, under a task with a stop string.

    One id in STOP_PERIOD renders as the stop string, so some rows stop early and some run to the end.
    """
    prefix = _prompt_tokens("fitness/prefix", size.prompt, size.vocab)
    rows = [prefix + _prompt_tokens(f"fitness/{r}", 1 + int(hash32(r + 7) % (size.prompt // 4)), size.vocab)
            for r in range(size.batch)]
    n = len(rows)
    return PromptBatch(tuple(range(n)), ("",) * n, ("",) * n, tuple(rows), IdText(STOP_PERIOD),
                       pad_token_id=0, eos_token_id=size.vocab, task=SYNTHETIC_TASK)


def fixed_step(t: int, population: int) -> Step:
    """Iteration ``t`` of the fixed schedule: seeds from (GLOBAL_SEED, t), coefficients from fixed rewards."""
    seeds = member_seeds(GLOBAL_SEED, t, population // 2)
    rewards = [hash32(((t * population + j) & M32) ^ 0x5BD1E995) / 2.0**32 for j in range(population)]
    return Step(
        iteration=t,
        alpha_fp=alpha_fixed_point(ALPHA, SIGMA),
        seeds=tuple(s for s in seeds for _ in (1, -1)),
        signs=tuple(sign for _ in seeds for sign in (1, -1)),
        coefs=quantize_coefficients(shape_rewards(rewards, "pair_zscore", 3.0)),
    )


# --- models ----------------------------------------------------------------------------------------


def embeddings_tied(model: torch.nn.Module) -> bool:
    """Whether the lm_head computes with the input embeddings' very tensor."""
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    return head.data_ptr() == embed.data_ptr()


def require_tie(model: torch.nn.Module, config: Any, what: str) -> None:
    if embeddings_tied(model) != bool(config.tie_word_embeddings):
        raise RuntimeError(f"{what}: tie_word_embeddings is {config.tie_word_embeddings}, the built model "
                           f"{'ties' if embeddings_tied(model) else 'does not tie'} its lm_head")


def build_qes(size: Size, config: Any, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    tensors = checkpoint_tensors(config, size.group, device, dtype)
    model = assemble_quantized(config, tensors, Scheme(BITS, size.group, zeros_stored_minus_one=False), device,
                               dtype, backend="dense", source=f"<synthetic {size.arch}>")
    require_tie(model, config, "QES model")
    return model


def build_plain(size: Size, config: Any, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The same model with plain ``torch.nn.Linear`` layers holding the dequantized weights."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    qes_model = build_qes(size, config, device, dtype)
    layers = {x.name: x.module for x in quantized_linears(qes_model)}
    state, copies = {}, {}
    for key, value in qes_model.state_dict().items():
        if key.rsplit(".", 1)[0] in layers:
            continue
        if value.data_ptr() not in copies:  # a tied lm_head and its embeddings: one copy
            copies[value.data_ptr()] = value.clone()
        state[key] = copies[value.data_ptr()]
    for name, module in layers.items():
        state[f"{name}.weight"] = dequantize_weight(module, dtype)
        if module.bias is not None:
            state[f"{name}.bias"] = module.bias.detach().to(dtype)
    del qes_model, layers, copies
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    on_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if unexpected or on_meta:
        raise RuntimeError(f"plain model: unexpected {unexpected[:3]}, not loaded {on_meta[:3]}")
    model = model.to(device).eval()
    require_tie(model, config, "plain model")
    return model


def codes_bytes(model: torch.nn.Module) -> int:
    """Bytes of the GPTQ tensors (codes, zero points, scales, g_idx) the QES model keeps beside its dense cache."""
    return sum(getattr(x.module, attr).nbytes for x in quantized_linears(model) for attr in GPTQ_TENSORS)


def codes_only(size: Size, config: Any, device: torch.device, names: list[str] | None = None) -> list[LayerCodes]:
    """Fresh codes of every layer (or of ``names``) on ``device``, with no forward path and no float weights."""
    linears, _ = architecture(config)
    out = []
    for x in linears:
        if names is not None and x.name not in names:
            continue
        module = GPTQLinear(x.in_features, x.out_features, BITS, size.group, bias=False, device=device)
        for attr, t in gptq_tensors(x.name, x.in_features, x.out_features, size.group, device).items():
            getattr(module, attr).copy_(t)
        module.use_backend(CodesOnlyBackend())
        out.append(LayerCodes(x.name, module, BITS, x.in_features, x.out_features))
    return out


def training_members(population: int) -> list[tuple[int, int]]:
    """The members of the iteration after the fixed schedule, in training's order: mirrored pairs."""
    return [(s, sign) for s in member_seeds(GLOBAL_SEED, FULL_STEPS, population // 2) for sign in (1, -1)]
