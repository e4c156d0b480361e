"""CUDA-path defects, shown on the CPU: kernels launch on the data's GPU, every torchrun rank binds its GPU,
resume restores only this GPU's RNG, provenance honours AFS_GIT_SHA, one precision policy with explicit
TF32, and data reaches the model's device through one helper.

A CPU cannot run CUDA, so the CUDA calls are observed through monkeypatched ``torch.cuda`` functions: what
is checked is which device each path asks for, which is what the defects got wrong."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from afs import distributed, io, runs
from afs_kernels._common import launch_device


def test_kernels_launch_on_the_datas_device():
    ctx = launch_device(torch.device("cuda", 1))
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1  # not the current device
    assert isinstance(launch_device(torch.device("cpu")), contextlib.nullcontext)


def test_every_kernel_launch_is_wrapped():
    import importlib
    import inspect

    import ast

    for name in ("pgd_step", "random_start", "merger_head"):
        tree = ast.parse(inspect.getsource(importlib.import_module(f"afs_kernels.{name}")))
        launchers = [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and "_kernel[" in ast.unparse(f)]
        assert launchers, name
        for f in launchers:  # every function that launches a kernel does so under launch_device(...)
            withs = [w for w in ast.walk(f) if isinstance(w, ast.With) and "launch_device(" in ast.unparse(w.items[0])]
            launches = [n for n in ast.walk(f) if isinstance(n, ast.Subscript) and ast.unparse(n.value).endswith("_kernel")]
            inside = [n for w in withs for n in ast.walk(w) if isinstance(n, ast.Subscript) and ast.unparse(n.value).endswith("_kernel")]
            assert len(launches) == len(inside), f"{name}.{f.name}"


def test_torchrun_ranks_bind_their_own_gpu(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(torch.device(d)))
    for k, v in {"RANK": "2", "LOCAL_RANK": "2", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "x",
                 "MASTER_PORT": "1", "TORCHELASTIC_RUN_ID": "t", "GROUP_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    assert distributed.launched_by_torchrun()
    assert distributed.bind_local_device() == torch.device("cuda", 2)
    assert calls == [torch.device("cuda", 2)]


def test_cli_binds_the_gpu_on_every_torchrun_path():
    import inspect

    from afs import cli

    src = inspect.getsource(cli)
    assert "bind_local_device()" in src and "distributed.local_device()" not in src


def test_resume_restores_only_this_gpus_rng(monkeypatch):
    seen = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: seen.append((state, device)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    dev1 = torch.device("cuda", 1)
    runs.restore_cuda_rng(torch.tensor([7]), dev1)  # the new format: this device's state only
    # The old format (every GPU's state): a resume on fewer GPUs takes this GPU's entry, or none.
    runs.restore_cuda_rng([torch.tensor([0]), torch.tensor([1])], dev1)
    runs.restore_cuda_rng([torch.tensor([0])], dev1)  # saved on one GPU, resumed on GPU 1: nothing to restore
    runs.restore_cuda_rng(torch.tensor([9]), torch.device("cpu"))
    assert [(int(s), d) for s, d in seen] == [(7, dev1), (1, dev1)]
    assert runs.cuda_rng_state(torch.device("cpu")) is None


def test_provenance_honours_afs_git_sha(monkeypatch):
    monkeypatch.setenv("AFS_GIT_SHA", "0123abc")
    m = io.manifest("cpu")
    assert m["git_sha"] == "0123abc"  # the device machine's copy has no .git: the caller passes the commit


def test_one_precision_policy(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert runs.resolve_precision("auto", cuda) == "bf16"
    assert runs.resolve_precision("fp32", cuda) == "fp32" and runs.resolve_precision("bf16", cpu) == "bf16"
    # "auto" on a CPU follows its bf16 hardware: AVX512-BF16 or AMX -> bf16, neither -> fp32.
    for support, want in (({"avx512_bf16": False, "amx": False}, "fp32"), ({"avx512_bf16": True, "amx": False}, "bf16"),
                          ({"avx512_bf16": False, "amx": True}, "bf16")):
        monkeypatch.setattr(runs, "cpu_bf16_support", lambda s=support: s)
        assert runs.resolve_precision("auto", cpu) == want
    with pytest.raises(ValueError, match="precision"):
        runs.resolve_precision("fp16", cpu)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    wrapped = runs.AutocastModel(net, "cpu")
    x = torch.rand(4, 3, 2, 2)
    out = wrapped(x)
    assert out.dtype == torch.float32 and torch.allclose(out, net(x), atol=0.05)  # bf16 inside, fp32 out
    assert list(wrapped.parameters()) == list(net.parameters())


def test_numerics_are_explicit_and_recorded(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # cuDNN's default
    monkeypatch.setattr(runs, "cpu_bf16_support", lambda: {"avx512_bf16": False, "amx": False})
    got = runs.configure_numerics("auto", False, torch.device("cpu"))
    assert got == {"precision": "fp32", "requested": "auto", "tf32": False, "deterministic": False,
                   "cpu_bf16": {"avx512_bf16": False, "amx": False}}
    assert torch.backends.cudnn.allow_tf32 is False and torch.backends.cuda.matmul.allow_tf32 is False
    assert io.manifest("cpu")["tf32"] == {"matmul": False, "cudnn": False}


def test_data_meets_the_model_on_its_device():
    from afs.attacks import on_model_device

    net = nn.Linear(2, 2).to(torch.float32)
    x, y = torch.rand(3, 2), torch.arange(3)
    a, b = on_model_device(net, x, y)
    assert a.device == b.device == next(net.parameters()).device
    assert on_model_device(net, x).shape == x.shape
