"""Triton kernels of fastkd, shipped as ``fastkd.kernels``: one file per op, each holding the
kernel and its host launcher. Importing this package needs triton."""
