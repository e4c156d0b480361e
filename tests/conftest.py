"""Test-wide setup.

Triton decides at decoration time whether a kernel is compiled or interpreted, so the interpreter switch
must be set before anything imports ``afs_kernels``. On a CPU machine this runs every Triton kernel on CPU
tensors; on a GPU machine, run with ``TRITON_INTERPRET=0`` to test the compiled kernels for real.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# Two cores in CI: more threads than cores only adds contention.
os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
