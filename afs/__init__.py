"""afs: Adversarial Feature Stacking (Liu, Zhao, Shi), reference implementation.

The library is imported by submodule (``afs.config``, ``afs.data``, ``afs.models``, ``afs.attacks``, ...);
nothing heavy happens on ``import afs``.
"""

__version__ = "0.1.0"
