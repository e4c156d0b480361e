"""afs_kernels: fast PGD building blocks, importable without ``afs`` and without Triton.

Each op has a fused Triton kernel (used on CUDA tensors) and a pure-PyTorch ``*_reference`` (the CPU path
and the tests' oracle): :func:`pgd_step` (one L-inf PGD iterate, projected and box-clamped),
:func:`random_start` (a uniform start in the eps-ball) and :func:`merger_head` (a stack's final BN + ReLU +
pool + concat + linear merger in one pass, differentiable; ``StackedModel`` runs on it). :func:`pgd_loop` is
THE PGD loop of the project (``afs.attacks.PGD`` runs it), eager or ``torch.compile``d.

Triton runs on CPU tensors only under ``TRITON_INTERPRET=1``, which must be set before this package is
imported (Triton reads it when the kernels are decorated).
"""

from ._common import HAS_TRITON, Backend, Choice, Norm
from .attack_loop import COMPILED_PIXEL_TOLERANCE, pgd_loop, sum_cross_entropy
from .merger_head import merger_head, merger_head_reference
from .pgd_step import pgd_step, pgd_step_reference
from .random_start import random_start, random_start_reference

__all__ = ["HAS_TRITON", "Backend", "Choice", "Norm", "COMPILED_PIXEL_TOLERANCE", "pgd_loop", "pgd_step",
           "pgd_step_reference", "random_start", "random_start_reference", "sum_cross_entropy", "merger_head",
           "merger_head_reference"]
