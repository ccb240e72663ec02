"""The forward backends of :class:`qes.qlinear.GPTQLinear`, one per module, and the choice between them.

A backend is a cache derived from a layer's GPTQ integers (never written back) that runs its forward pass:
:mod:`~qes.backends.base` (the interfaces and :class:`~qes.backends.base.LayerSpec`, what a backend is asked
to run), :mod:`~qes.backends.int4pack` (torch's CPU int4 matmul), :mod:`~qes.backends.dense` (a dequantized
weight, any device), :mod:`~qes.backends.codes_only` (no forward path: replay, hashing, saving) and
:mod:`~qes.backends.choice` (``auto`` and an explicit choice, a loop over a priority list asking each backend
whether it can run the layer).
"""
