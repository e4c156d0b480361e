"""Scale-out (afs.distributed): DDP training of one extractor, sharded evaluation, failure handling (the
grid of stages on submitit: tests/test_grid.py).

Real processes on localhost: torch.multiprocessing with the gloo backend for the 2-rank process group. Shapes are tiny (WRN-10-1,
a few dozen random 32x32 images) and every spawn is shared by several assertions, because starting a
Python process that imports torch costs seconds on 2 cores.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch

from afs import distributed as D
from afs.config import PROFILES, DataConfig, ExtractorConfig, ModelConfig
from afs.data import ImageData
from afs.evaluation import evaluate
from afs.models import load_model
from afs.training import TrainData, train_extractor

SPAWN = multiprocessing.get_context("spawn")  # fork would copy the parent's torch threads and state
TIMEOUT_S = 20.0  # process-group timeout in the workers: a hang fails the test, it does not stall CI


def _profile(epochs: int = 2, budgets: tuple[int, ...] = (0, 2, 4, 6), n_val: int = 16):
    base = PROFILES["smoke"]
    # Early stopping off: the kept model is the last epoch's, so runs compare weight for weight. A small
    # learning rate: PGD's sign() turns 1e-7 weight differences into flipped pixels, and a tiny net on
    # random data amplifies them from step to step (hence `_same_run`).
    ec = ExtractorConfig(budgets=budgets, epochs=epochs, batch_size=16, lr=0.002, lr_milestones=(1,), attack_steps=2,
                         attack_step_size=4 / 255, val_attack_steps=2, early_stopping=False)
    return dataclasses.replace(base, model=ModelConfig("wrn", 10, 1), extractor=ec,
                               data=DataConfig(name="cifar10-jpeg", augment=True, val_size=n_val),
                               merger=dataclasses.replace(base.merger, stack=budgets[-2:]),
                               experiments=dataclasses.replace(base.experiments, masks=()))


def _data(n: int = 64, n_val: int = 16, classes: int = 4, seed: int = 0) -> TrainData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n + n_val, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.arange(n + n_val) % classes
    names = tuple(f"c{i}" for i in range(classes))
    return TrainData(ImageData(x[:n], y[:n], names, "rand", "train"), ImageData(x[n:], y[n:], names, "rand", "val"))


def _test_set(n: int = 45, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(n) % 4


def _flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten().double() for k, t in sorted(state.items()) if t.is_floating_point()])


def _same_run(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Median |weight difference| of two runs that differ only in floating-point summation order. PGD's sign()
    turns a few roundings into flipped pixels, so the largest difference is chaotic (2e-4 to 5e-4 over profile
    seeds 0-2); the median is not: <= 2.5e-7 over those seeds, while per-rank attack starts (a real fault) give
    >= 1.8e-6 and per-rank BN far more. Asserted below 7e-7."""
    return (_flat(a) - _flat(b)).abs().median().item()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------------
# A 2-rank gloo job: DDP training killed and resumed, sharded evaluation, a rank leaving
# ------------------------------------------------------------------------------------------------------

EVAL_ATTACKS = ("clean", "pgd2", "fgsm")
EVAL_KW = dict(eps=8 / 255, step_size=2 / 255, batch_size=8, seed=3, device="cpu", progress=False)
AA_KW = {"version": "custom", "attacks": ["apgd-ce"]}  # one AutoAttack component: the plumbing, quickly


def _ddp_rank(rank: int, world: int, port: int, root: str) -> None:
    """One rank (run by torch.multiprocessing): what torchrun would start, with torchrun's variables."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # two ranks on two cores
    out = Path(root)
    assert D.init_distributed("gloo", timeout_s=TIMEOUT_S)
    run = out / "ddp"
    # "Killed" after epoch 0 (the call returns, as a restarted torchrun job would find it), then resumed.
    train_extractor(_profile(), _data(), 4 / 255, run_dir=run, device="cpu", progress=False, stop_after=1)
    if rank == 0:
        shutil.copytree(run, out / "ddp_after_epoch0")  # to resume on one process in the test
        torch.save(torch.load(run / "state.pt", weights_only=True)["model"], out / "weights_epoch0.pt")
    D.barrier()
    model = train_extractor(_profile(), _data(), 4 / 255, run_dir=run, device="cpu", progress=False)
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, out / f"weights_rank{rank}.pt")
    x, y = _test_set()
    res = evaluate(model, x, y, EVAL_ATTACKS, **EVAL_KW)
    torch.save({"correct": res.correct, "accuracy": res.accuracy}, out / f"eval_rank{rank}.pt")
    aa = evaluate(model, x, y, ("clean", "aa"), **{**EVAL_KW, "aa_kwargs": AA_KW | {"state_path": out / "aa.json"}})
    torch.save(aa.correct, out / f"aa_rank{rank}.pt")
    # A rank that dies: rank 1 leaves without the barrier; rank 0 must fail, not wait forever.
    if rank == 1:
        # Gone at once, as a crashed rank is: a plain return would run the process group's destructors at
        # interpreter exit, and gloo aborts there now and then (SIGABRT) while its peer is still connected.
        os._exit(0)
    t0 = time.time()
    try:
        D.barrier()
        outcome = "barrier returned"
    except Exception as e:  # gloo: the peer's connection closed, or the timeout
        outcome = f"{type(e).__name__}: {e}"
    (out / "rank0_failure.json").write_text(json.dumps({"outcome": outcome, "seconds": time.time() - t0}))


@pytest.fixture(scope="module")
def ddp_job(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    torch.multiprocessing.start_processes(_ddp_rank, args=(2, _free_port(), str(root)), nprocs=2, join=True,
                                          start_method="spawn")
    return root


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """The one-process reference: the same profile (global batch 16), uninterrupted."""
    root = tmp_path_factory.mktemp("single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the ranks: the same kernels, so only the summation order differs
    try:
        model = train_extractor(_profile(), _data(), 4 / 255, run_dir=root / "run", device="cpu", progress=False)
    finally:
        torch.set_num_threads(threads)
    return root / "run", model


def test_ddp_run_equals_the_single_process_run_and_ranks_agree(ddp_job, single_run):
    run1, model1 = single_run
    w0 = torch.load(ddp_job / "weights_rank0.pt", weights_only=True)
    w1 = torch.load(ddp_job / "weights_rank1.pt", weights_only=True)
    # DDP keeps the ranks identical: same initial broadcast, same averaged gradients, synchronised BN stats.
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    # Same global batch, same per-sample data order, augmentation and attack starts, global-batch BN:
    # only the floating-point summation order differs...
    diff = _same_run(w0, model1.state_dict())
    assert diff < 7e-7, f"DDP weights differ from the single-process run by {diff} (median)"
    # ...while one epoch moves the weights far more than that (the comparison is not vacuous).
    epoch0 = torch.load(ddp_job / "weights_epoch0.pt", weights_only=True)
    step = _same_run(epoch0, model1.state_dict())
    assert step > 7e-7, step
    # Rank 0 alone wrote the log: one line per epoch, the killed epoch not duplicated after the resume.
    log2, log1 = _log(ddp_job / "ddp"), _log(run1)
    assert [r["epoch"] for r in log2] == [0, 1]
    assert all(r["world_size"] == 2 and r["global_batch"] == 16 and r["per_rank_batch"] == 8 for r in log2)
    for a, b in zip(log2, log1):  # all-reduced metrics equal the single-process ones
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_clean"] == b["val_clean"] and a["val_pgd"] == b["val_pgd"]
    assert json.loads((ddp_job / "ddp" / "metrics.json").read_text())["epochs"] == 2


def test_a_ddp_checkpoint_resumes_on_one_process(ddp_job, single_run):
    """Rank-independent runs: the 2-rank state after epoch 0 finishes on 1 process like the 1-process run."""
    run1, model1 = single_run
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        resumed = train_extractor(_profile(), _data(), 4 / 255, run_dir=ddp_job / "ddp_after_epoch0", device="cpu",
                                  progress=False)
    finally:
        torch.set_num_threads(threads)
    assert [r["epoch"] for r in _log(ddp_job / "ddp_after_epoch0")] == [0, 1]
    assert _same_run(resumed.state_dict(), model1.state_dict()) < 7e-7


def test_sharded_evaluation_equals_single_process_evaluation(ddp_job):
    x, y = _test_set()
    model = load_model(ddp_job / "ddp" / "best.pt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = evaluate(model, x, y, EVAL_ATTACKS, **EVAL_KW)
    finally:
        torch.set_num_threads(threads)
    for r in (0, 1):
        got = torch.load(ddp_job / f"eval_rank{r}.pt", weights_only=True)
        for k in EVAL_ATTACKS:  # every image once, in test-set order, with evaluate()'s random starts
            assert torch.equal(got["correct"][k], ref.correct[k]), (r, k)
        assert got["accuracy"] == ref.accuracy
    # 45 images in 6 batches of 8: rank 0 took 3 (one short), rank 1 took 3; the attacks changed answers.
    assert not torch.equal(ref.correct["clean"], ref.correct["pgd2"])


def test_sharded_autoattack_covers_every_image_and_keeps_a_state_file_per_rank(ddp_job):
    # AutoAttack's own batching differs per shard, so its flags are compared by protocol, not bit for bit.
    a0, a1 = (torch.load(ddp_job / f"aa_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(a0["aa"], a1["aa"]) and a0["aa"].shape == (45,)
    assert not (a0["aa"] & ~a0["clean"]).any()  # robust implies correct on the clean image
    assert (ddp_job / "aa.rank0of2.json").is_file() and (ddp_job / "aa.rank1of2.json").is_file()


def test_a_rank_that_leaves_makes_the_others_fail_within_the_timeout(ddp_job):
    rec = json.loads((ddp_job / "rank0_failure.json").read_text())
    assert rec["outcome"] != "barrier returned"
    assert rec["seconds"] < TIMEOUT_S + 10


def test_cross_rank_batchnorm_is_batchnorm_outside_a_process_group_and_keeps_the_checkpoint_format():
    torch.manual_seed(0)
    from afs.models import WideResNet

    net = WideResNet(10, 1, 4)
    conv = D.convert_sync_batchnorm(WideResNet(10, 1, 4), "cpu")
    conv.load_state_dict(net.state_dict())  # same keys, same shapes
    assert any(isinstance(m, D.CrossRankBatchNorm2d) for m in conv.modules())
    x = torch.rand(6, 3, 32, 32)
    for mode in (True, False):
        net.train(mode), conv.train(mode)
        assert torch.equal(net(x), conv(x))
    assert torch.equal(_flat(net.state_dict()), _flat(conv.state_dict()))  # running stats updated alike


def test_scale_profile_and_global_batch_divisibility():
    p = _profile()
    s = D.scale_profile(p, 4)
    assert (s.extractor.batch_size, s.extractor.lr) == (64, pytest.approx(0.008))
    assert s.extractor.epochs == p.extractor.epochs
    with pytest.raises(ValueError, match="ranks must be"):
        D.scale_profile(p, 0)
    with pytest.raises(ValueError, match="timeout_s"):
        D.init_distributed(timeout_s=0)
    assert D.init_distributed() is False  # not under torchrun: single process, nothing to join
    assert (D.rank(), D.world_size(), D.is_main(), D.all_reduce_sums([1.5, 2])) == (0, 1, True, [1.5, 2.0])


def test_cli_refuses_what_torchrun_cannot_parallelise(monkeypatch, capsys):
    from afs.cli import main

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(["train-merger", "--profile", "smoke"]) == 2
    assert "not data-parallel" in capsys.readouterr().err
    assert main(["reproduce", "--profile", "smoke"]) == 2
    assert "--executor local|slurm" in capsys.readouterr().err
