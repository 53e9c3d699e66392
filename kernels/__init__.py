"""Triton kernels of fastkd, shipped as ``fastkd.kernels``: one file per op, each holding the
kernel and its host launcher, and ``aot``, which compiles them for sm_80/sm_90 without a GPU
(``python -m fastkd.kernels.aot``; docs/design.md §6). Importing this package needs triton."""
