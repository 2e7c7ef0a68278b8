"""Triton kernels of lsce, installed as ``lsce.triton_kernels``.

``cross_entropy`` holds the per-row forward (loss, m, log_s) and backward
(gradient) kernels and their launchers; ``distillation`` the per-row
distillation kernels (``distill_forward``, ``distill_backward``, reachable
from ``cross_entropy`` too). They run on CUDA tensors, and on CPU
tensors under ``TRITON_INTERPRET=1`` (how the tests run without a GPU).
"""
