"""Triton kernels of longattn, installed as ``longattn.triton_kernels``.

Reached only through ``longattn.backends.triton_backend``; importing this package does not touch a GPU.
"""
