"""Triton kernels of dynamixer_ops, installed as ``dynamixer_ops.kernels``."""
