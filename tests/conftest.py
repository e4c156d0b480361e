"""Test-wide setup.

Triton decides at decoration time whether a kernel is compiled or interpreted, so the interpreter switch
must be set before anything imports ``afs_kernels``. On a CPU machine this runs every Triton kernel on CPU
tensors; on a GPU machine, run with ``TRITON_INTERPRET=0`` to test the compiled kernels for real.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# Two cores in CI: more threads than cores only adds contention. On a machine shared with other jobs,
# OMP_NUM_THREADS=1 avoids OpenMP barrier stalls that can slow small convolutions tenfold.
os.environ.setdefault("OMP_NUM_THREADS", str(min(2, os.cpu_count() or 1)))

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def real_data_root():
    """Where the offline CIFAR-10 copy is: $AFS_DATA, else ../shared/data beside the repo (as in CI)."""
    from pathlib import Path

    root = Path(os.environ.get("AFS_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not (root / "cifar10-jpeg.tar.gz").exists() and not (root / "cifar10-jpeg").exists():
        pytest.skip(f"the offline CIFAR-10 copy is not at {root} (set AFS_DATA)")
    return root


@pytest.fixture(scope="session")
def real_cifar10(real_data_root, tmp_path_factory):
    """The offline CIFAR-10 copy (train, test), decoded once per session. CI has it beside the repo."""
    from pathlib import Path

    from afs.data import load_dataset

    cache = Path(os.environ.get("AFS_CACHE", tmp_path_factory.mktemp("afs-cache")))
    return (load_dataset("cifar10-jpeg", real_data_root, "train", cache_dir=cache),
            load_dataset("cifar10-jpeg", real_data_root, "test", cache_dir=cache))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for tests on tiny tensors: extra OpenMP threads only add overhead there, and on
    a busy 2-core box they oversubscribe it (AutoAttack on the toy ran ~5x slower so)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def net():
    """The standardly trained toy network of tests/toys.py (accurate, not robust), trained once."""
    import toys

    return toys.trained_tiny_net()
