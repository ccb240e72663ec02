"""A tiny, randomly initialised llama with a small byte-level BPE tokenizer, for fast tests.

The tokenizer is trained in memory on a few Countdown-style sentences (vocabulary of a few hundred tokens,
ChatML chat template with ``<|im_start|>``/``<|im_end|>``), so prompts rendered for the real model render
for this one too. Everything is deterministic: the same folder content on every call.
"""

from __future__ import annotations

from pathlib import Path

import torch

HIDDEN = 64
INTERMEDIATE = 128
LAYERS = 2
VOCAB = 384

_CORPUS = [
    "Using the numbers [3, 5, 7], create an equation that equals 22. You can use basic arithmetic operations "
    "(+, -, *, /) and each number can only be used once. Show your work in <think> </think> tags. "
    "And return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>.",
    "<think> 3 * 5 = 15, 15 + 7 = 22 </think> <answer> 3 * 5 + 7 </answer>",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 10 25 50 75 100 = + - * / ( )",
    "system user assistant You are a helpful assistant. Let me solve this step by step.",
    "Explain why the sky is blue. Write a short poem about a lighthouse at night.",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer():
    """A byte-level BPE tokenizer with ChatML special tokens (pad 0, bos 1, eos 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_float_model(
    out_dir: Path,
    seed: int = 0,
    *,
    hidden: int = HIDDEN,
    intermediate: int = INTERMEDIATE,
    heads: tuple[int, int] = (4, 2),
    scale: float = 0.08,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a random llama (2 layers; by default hidden 64, float32) and its tokenizer to ``out_dir``.

    ``heads`` is (attention heads, key-value heads); weights are N(0, scale^2) drawn from ``seed``.
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=LAYERS,
        num_attention_heads=heads[0],
        num_key_value_heads=heads[1],
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    generator = torch.Generator().manual_seed(seed)  # test weights only; never model state under QES
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    out_dir = Path(out_dir)
    model.to(dtype).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
