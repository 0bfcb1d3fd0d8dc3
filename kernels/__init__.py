"""Kernels (Triton) with their plain-torch references, importable as ``dsv3_tools.kernels``.

Each op lives in one file: the Triton ``<op>_kernel``, its ``<op>`` wrapper, and ``<op>_ref`` in plain torch,
which is both the test oracle and the CPU path. Importing this package never imports Triton; a kernel module
imports it on first use, so the CPU path works where Triton is absent.
"""
