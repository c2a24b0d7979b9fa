"""Triton kernels of dynamixer_ops, installed as the top-level package ``dynamixer_triton`` (source:
``kernels/dynamixer_triton/``). The ``triton`` backend (:mod:`dynamixer_ops.backends.triton`) registers them."""
