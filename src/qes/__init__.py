"""qes: fine-tune GPTQ-quantized language models in their integer code space with Quantized Evolution Strategies."""

__version__ = "0.2.0"
