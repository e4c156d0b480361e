"""The ``afs`` command line: ``afs reproduce``, ``afs train-extractor``, ``afs train-merger``,
``afs evaluate``, ``afs notebooks``, ``afs profiles``. ``afs <command> --help`` documents each.

Scale-out uses torchrun itself (docs/distributed.md): ``torchrun --nproc-per-node=N -m afs.cli
train-extractor ...`` trains one extractor data-parallel, ``torchrun ... -m afs.cli evaluate ...`` shards
the test set, and ``afs reproduce --executor local|slurm`` runs the grid's stages as separate jobs through
submitit (`afs.grid`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main"]


def _debug(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="on an error, show the full traceback, not one line")


def _common(p: argparse.ArgumentParser, out: bool = True) -> None:
    _debug(p)
    p.add_argument("--profile", default=None,
                   help="smoke | cpu | quick | paper (default: $AFS_PROFILE, else quick with a GPU, cpu without)")
    p.add_argument("--data-root", default=None, help="folder holding the data set (default: $AFS_DATA, else ./data)")
    if out:
        p.add_argument("--out", default="runs", help="run directory root; results go to OUT/<profile>/ (default: runs)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--seed", type=int, default=None,
                   help="another seed than the profile's (weights, data order, attack starts); its runs go to "
                        "OUT/<profile>-seed<N>/ so they never mix with the profile's own")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they are shown only when stderr is a terminal; stage lines stay)")
    _set(p)


def _set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="change one profile field, e.g. --set merger.epochs=8 --set extractor.budgets=0,4,8 "
                        "(repeatable; checked against the profile's fields; such runs go to "
                        "OUT/<profile>-set<hash>/ and record the changes in config.json)")


def _scale_out(p: argparse.ArgumentParser, ddp: bool = True) -> None:
    if ddp:
        p.add_argument("--dist-timeout", type=float, default=600.0, metavar="S",
                       help="under torchrun: a collective waiting longer than S seconds (a dead or hung rank) "
                            "fails the job (default: 600)")


def _budget_or_range(text: str) -> int | tuple[int, int]:
    """``8`` (8/255), or ``3-8``: a budget drawn per batch from [3/255, 8/255] (Table VI's ablation)."""
    try:
        parts = [int(b) for b in text.split("-")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"a budget is an integer in 1/255 (e.g. 8) or a range LO-HI (e.g. 3-8); got {text!r}")
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def _budgets(text: str) -> list[int]:
    try:
        budgets = [int(b) for b in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"budgets are integers in 1/255 units, e.g. '3,4,5,6,7,8'; got {text!r}") from None
    if not budgets:
        raise argparse.ArgumentTypeError("no budgets given; list the members in 1/255, e.g. '3,4,5,6,7,8'")
    twice = sorted({b for b in budgets if budgets.count(b) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"budget(s) {twice} given twice in {text!r}: a stack holds each network once")
    if any(b < 0 for b in budgets):
        raise argparse.ArgumentTypeError(f"budgets are >= 0 (1/255 units); got {text!r}")
    return budgets


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="afs", description="Adversarial Feature Stacking: train, stack, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    p = sub.add_parser("reproduce", help="run every stage the notebooks need, skipping finished ones",
                       description="Train all extractors, mergers and ablations of a profile, evaluate them, and "
                                   "write OUT/<profile>/summary.json. Finished stages are reused, interrupted ones resume.")
    _common(p)
    p.add_argument("--executor", choices=("none", "local", "slurm"), default="none",
                   help="none: every stage in this process (default); local: each stage a separate process on this "
                        "machine; slurm: each stage a SLURM job (submitit; extractors as one array, then the mergers, "
                        "then the evaluation). Rerun the same command after a failure: finished stages are kept")
    p.add_argument("--gpus-per-job", type=int, default=1, metavar="N",
                   help="with --executor slurm: GPUs per extractor job, trained data-parallel (default: 1)")
    p.add_argument("--partition", default=None, help="with --executor slurm: the SLURM partition")
    p.add_argument("--timeout-min", type=int, default=24 * 60, metavar="M",
                   help="with --executor local|slurm: a job's time limit in minutes (default: 1440)")

    p = sub.add_parser("train-extractor", help="PGD-AT one extractor at a budget",
                       description="PGD adversarial training of one network at an L-inf budget (in 1/255), "
                                   "into OUT/<profile>/extractors/eps<B>/ (resumes if interrupted).")
    _common(p)
    p.add_argument("--budget", type=_budget_or_range, required=True,
                   help="training budget in 1/255 (8 means 8/255); LO-HI draws one per batch (Table VI, e.g. 3-8)")
    p.add_argument("--widen-factor", type=int, default=None,
                   help="another width than the profile's (Table VI's large model: the profile's wide_widen_factor)")
    _scale_out(p)
    p.add_argument("--scale-batch", action="store_true",
                   help="under torchrun: keep the profile's batch PER RANK and scale the learning rate linearly "
                        "(default: the profile's batch is the global batch, split over the ranks)")

    p = sub.add_parser("train-merger", help="train the linear merger of a stack",
                       description="Train the merger (Eq. 5) over the extractors at --budgets (trained first if missing).")
    _common(p)
    p.add_argument("--budgets", type=_budgets, default=None, help="members in 1/255, e.g. 3,4,5,6,7,8 (default: the profile's)")
    p.add_argument("--alpha", type=float, default=None, help="weight of the clean term (default: the profile's)")
    p.add_argument("--mode", choices=("paired", "split"), default=None, help="paired = Eq. 5; split = the authors' code")

    p = sub.add_parser("evaluate", help="evaluate an extractor or a stack on the test set",
                       description="Clean / PGD-K / AutoAttack accuracy of a trained extractor (--budget) or stack (--budgets).")
    _common(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--budget", type=int, help="a single extractor's budget in 1/255")
    g.add_argument("--budgets", type=_budgets, help="a stack's members in 1/255")
    p.add_argument("--alpha", type=float, default=None)
    p.add_argument("--mode", choices=("paired", "split"), default=None)
    p.add_argument("--attacks", default="clean,pgd10,pgd20", help="comma-separated: clean, pgdK, fgsm, aa")
    _scale_out(p)

    p = sub.add_parser("notebooks", help="execute the notebooks top to bottom into an output folder",
                       description="Run notebooks/NN_*.ipynb in order under a profile; executed copies go to OUT/.")
    _debug(p)
    p.add_argument("--profile", default=None, help="profile (default: $AFS_PROFILE, else quick with a GPU, cpu without)")
    p.add_argument("--out", default="out", help="folder for executed notebooks and figures (default: out)")
    p.add_argument("--notebooks", default="notebooks", help="folder holding the notebooks (default: notebooks)")
    p.add_argument("--timeout", type=int, default=-1, help="per-cell timeout in seconds (default: none)")
    p.add_argument("--in-place", action="store_true", help="write outputs back into the notebooks themselves")
    p.add_argument("--no-prepare", action="store_true",
                   help="skip the first step, which trains and evaluates every stage here in the terminal (stage "
                        "lines and an ETA on stderr); notebook 00 then trains what is missing inside its kernel, unseen")

    p = sub.add_parser("profiles", help="print the profiles as JSON, or what one costs (--estimate)",
                       description="Print every profile's settings; with --estimate, the predicted compute time of "
                                   "each stage of one profile's 'afs reproduce' and the total (afs/cost.py).")
    _debug(p)
    p.add_argument("--estimate", action="store_true", help="predict each stage's time from FLOP counts instead")
    p.add_argument("--profile", default=None,
                   help="with --estimate: the profile (default: $AFS_PROFILE, else quick with a GPU, cpu without)")
    _set(p)
    p.add_argument("--device-kind", choices=("cpu", "h200"), default=None,
                   help="with --estimate: h200 (an assumed 100-180 TFLOP/s) or cpu (measured here, a few seconds); "
                        "default h200 with a GPU, cpu without")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from afs.grid import GridJobError
    from afs.runs import RunConfigMismatchError, StageBusyError

    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (ValueError, TypeError, OSError, RunConfigMismatchError, StageBusyError, GridJobError) as e:
        # Our own errors say what is wrong and how to go on; a file-system error names its path. One line
        # each (--debug shows the traceback).
        if args.debug:
            raise
        print(f"afs {args.command}: error: {_message(e)}", file=sys.stderr)
        return 2


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and e.filename is not None:
        return (f"cannot use {e.filename}: {e.strerror or e}; check that --out (and --data-root) name writable "
                f"folders")
    return str(e)


def _check_args(args: argparse.Namespace) -> None:
    """Every argument checked before any work (loading data, training): a bad one costs nothing."""
    if getattr(args, "attacks", None) is not None:
        from afs.evaluation import parse_attack

        names = [a.strip() for a in args.attacks.split(",") if a.strip()]
        if not names:
            raise ValueError("--attacks is empty; give e.g. clean,pgd10,pgd20 (forms: clean, fgsm, aa, pgdK, pgdKxR, cwK)")
        for a in names:
            parse_attack(a)  # ValueError naming the valid forms
    if getattr(args, "alpha", None) is not None and not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha weighs the clean term of Eq. 5 and must lie in [0, 1], got {args.alpha}")
    if getattr(args, "device", None) is not None:
        import torch

        try:
            dev = torch.device(args.device)
        except RuntimeError:
            raise ValueError(f"--device {args.device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: this machine has no usable CUDA device "
                             "(torch.cuda.is_available() is False); use --device cpu")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s) here")
    if getattr(args, "out", None) is not None and args.command != "notebooks":
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file, not a folder")
        out.mkdir(parents=True, exist_ok=True)  # PermissionError -> one line naming it
        if not os.access(out, os.W_OK):
            raise ValueError(f"--out {out} is not writable; choose another folder")


def _run(args: argparse.Namespace) -> int:
    from afs.config import PROFILES, get_profile

    _check_args(args)
    if args.command == "profiles":
        if not args.estimate:
            if args.profile is not None or args.device_kind is not None or args.set:
                raise ValueError("--profile, --set and --device-kind go with --estimate")
            print(json.dumps({k: v.to_dict() for k, v in PROFILES.items()}, indent=2))
            return 0
        import torch

        from afs import cost

        profile = get_profile(args.profile).with_overrides(args.set)
        kind = args.device_kind or ("h200" if torch.cuda.is_available() else "cpu")
        print(cost.format_estimate(profile, cost.stages(profile), cost.throughput_for(kind, profile)))
        return 0
    if args.command == "notebooks":
        from afs.notebooks import run_notebooks

        run_notebooks(args.notebooks, args.out, get_profile(args.profile).name, timeout=args.timeout,
                      in_place=args.in_place, prepare=not args.no_prepare)
        return 0

    from afs import distributed
    from afs.pipeline import Pipeline

    ranks = distributed.env_world_size()  # > 1 when torchrun started several processes
    if ranks > 1 and args.command in ("train-merger", "reproduce"):
        raise ValueError(f"{args.command} is not data-parallel: run it as one process; for data-parallel training of "
                         "one stage use 'train-extractor', and for the grid on several GPUs 'afs reproduce --executor "
                         "local|slurm'")
    profile = get_profile(args.profile).with_overrides(args.set)
    if getattr(args, "seed", None) is not None:
        if args.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {args.seed}")
        profile = profile.replace(seed=args.seed)
    if getattr(args, "scale_batch", False) and ranks > 1:
        scaled = distributed.scale_profile(profile, ranks)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"--scale-batch: global batch {profile.extractor.batch_size} -> {scaled.extractor.batch_size} "
                  f"({profile.extractor.batch_size} per rank), lr {profile.extractor.lr:g} -> {scaled.extractor.lr:g} "
                  f"(linear scaling; recorded in the stage's config.json)", file=sys.stderr)
        profile = scaled
    if args.command == "reproduce" and args.executor != "none":
        from afs.grid import run_grid

        path = run_grid(profile, args.out, args.data_root, args.executor, gpus_per_job=args.gpus_per_job,
                        timeout_min=args.timeout_min, partition=args.partition)
        print(f"wrote {path}")
        return 0
    if ranks > 1:  # process groups report through logging
        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s afs[rank {os.environ.get('RANK', '0')}] %(message)s")
    # One GPU per process under torchrun (cuda:LOCAL_RANK): every torchrun rank binds its own GPU first
    # (set_device), whatever the command and --device say.
    bound = distributed.bind_local_device() if distributed.launched_by_torchrun() else None
    device = args.device or bound
    try:
        if ranks > 1 and args.command in ("train-extractor", "evaluate"):
            distributed.init_distributed(timeout_s=args.dist_timeout)
        from afs.progress import bars_enabled

        # tqdm bars on a terminal only: redrawn with carriage returns they would flood a CI log.
        pipe = Pipeline(profile, args.out, args.data_root, device, progress=not args.no_progress and bars_enabled())
        return _command(args, profile, pipe)
    finally:
        distributed.shutdown()


def _command(args: argparse.Namespace, profile: Any, pipe: Any) -> int:
    from afs import distributed

    def say(text: str) -> None:
        if distributed.is_main():  # rank 0 speaks for a data-parallel job
            print(text)

    if args.command == "reproduce":
        from afs import progress

        with progress.reporting(progress.for_pipeline(pipe)):  # numbered stage lines and an ETA on stderr
            summary = pipe.reproduce()
        say(f"wrote {pipe.root / 'summary.json'} ({summary['timings']['total_this_call_s']} s)")
    elif args.command == "train-extractor":
        from afs.config import ModelConfig

        wide = None if args.widen_factor is None else ModelConfig(profile.model.arch, profile.model.depth, args.widen_factor)
        pipe.extractor(args.budget, wide)
        b = args.budget
        say(f"extractor {b}: {pipe.extractor_dir((b[0] / 255, b[1] / 255) if isinstance(b, tuple) else b / 255, wide)}")
    elif args.command == "train-merger":
        budgets = args.budgets or list(profile.merger.stack)
        stack = pipe.stack(budgets, args.alpha, args.mode)
        say(f"merger over {budgets}: importance ratios {[round(r, 3) for r in stack.importance_ratio().tolist()]}")
    elif args.command == "evaluate":
        attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
        if args.budget is not None:
            model, where = pipe.extractor(args.budget), pipe.extractor_dir(args.budget / 255)
        else:
            model = pipe.stack(args.budgets, args.alpha, args.mode)
            where = pipe.stack_dir(args.budgets, args.alpha if args.alpha is not None else profile.merger.alpha,
                                   args.mode or profile.merger.mode)
        acc = pipe.evaluate(model, where, [a for a in attacks if a != "aa"])
        if "aa" in attacks:
            acc.update({f"{k} (AA subset)": v for k, v in pipe.evaluate(model, where, ("clean", "aa"), subset="aa").items()})
        say(json.dumps(acc, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
