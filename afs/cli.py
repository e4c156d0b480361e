"""The ``afs`` command line: ``reproduce``, ``train-extractor``, ``train-merger``, ``evaluate``, ``notebooks``,
``profiles``; ``afs <command> --help`` documents each. Scale-out (docs/distributed.md): ``torchrun ... -m afs.cli
train-extractor`` trains one extractor data-parallel, ``torchrun ... -m afs.cli evaluate`` shards the test set,
``afs reproduce --executor local|slurm`` runs the grid's stages as submitit jobs (`afs.grid`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

PROFILE_HELP = "smoke | cpu | quick | paper (default: $AFS_PROFILE, else quick with a GPU, cpu without)"


def _budget_or_range(text: str) -> int | tuple[int, int]:
    """``8`` (8/255), or ``3-8``: a budget drawn per batch from [3/255, 8/255] (Table VI's ablation)."""
    try:
        parts = tuple(int(b) for b in text.split("-"))
    except ValueError:
        parts = ()
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"a budget is an integer in 1/255 (e.g. 8) or a range LO-HI (e.g. 3-8); "
                                         f"got {text!r}")
    return parts[0] if len(parts) == 1 else parts


def _budgets(text: str) -> list[int]:
    try:
        budgets = [int(b) for b in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"budgets are integers in 1/255, e.g. '3,4,5,6,7,8'; got {text!r}") from None
    if not budgets:
        raise argparse.ArgumentTypeError("no budgets given; list the members in 1/255, e.g. '3,4,5,6,7,8'")
    twice = sorted({b for b in budgets if budgets.count(b) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"budget(s) {twice} given twice in {text!r}: a stack holds each network once")
    if min(budgets) < 0:
        raise argparse.ArgumentTypeError(f"budgets are >= 0 (1/255 units); got {text!r}")
    return budgets


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="afs", description="Adversarial Feature Stacking: train, stack, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    def command(name: str, parents: list[argparse.ArgumentParser], text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=parents, help=text, description=text[0].upper() + text[1:] + ".")

    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", help="on an error, show the full traceback, not one line")
    sets = argparse.ArgumentParser(add_help=False)
    sets.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                      help="change one profile field, e.g. --set merger.epochs=8 (repeatable; such runs go to "
                           "OUT/<profile>-set<hash>/ and record the changes in config.json)")
    common = argparse.ArgumentParser(add_help=False, parents=[debug, sets])
    common.add_argument("--profile", default=None, help=PROFILE_HELP)
    common.add_argument("--data-root", default=None, help="data set folder (default: $AFS_DATA, else ./data)")
    common.add_argument("--out", default="runs", help="run root; results go to OUT/<profile>/ (default: runs)")
    common.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    common.add_argument("--seed", type=int, default=None,
                        help="another seed than the profile's; its runs go to OUT/<profile>-seed<N>/")
    common.add_argument("--no-progress", action="store_true",
                        help="no progress bars (shown only when stderr is a terminal; stage lines stay)")
    merger = argparse.ArgumentParser(add_help=False)
    merger.add_argument("--alpha", type=float, default=None, help="weight of the clean term (default: the profile's)")
    merger.add_argument("--mode", choices=("paired", "split"), default=None,
                        help="paired: Eq. 5; split: the authors' code")
    ddp = argparse.ArgumentParser(add_help=False)
    ddp.add_argument("--dist-timeout", type=float, default=600.0, metavar="S",
                     help="under torchrun: a collective waiting longer than S seconds fails the job (default: 600)")

    p = command("reproduce", [common], "train and evaluate every stage of a profile into OUT/<profile>/summary.json; "
                "finished stages are reused, interrupted ones resume")
    p.add_argument("--executor", choices=("none", "local", "slurm"), default="none",
                   help="none: every stage in this process (default); local|slurm: each stage a process on this "
                        "machine | a SLURM job (submitit). Rerun the same command after a failure")
    p.add_argument("--gpus-per-job", type=int, default=1, metavar="N",
                   help="with --executor slurm: GPUs per extractor job, trained data-parallel (default: 1)")
    p.add_argument("--partition", default=None, help="with --executor slurm: the SLURM partition")
    p.add_argument("--timeout-min", type=int, default=24 * 60, metavar="M",
                   help="with --executor local|slurm: a job's time limit in minutes (default: 1440)")

    p = command("train-extractor", [common, ddp], "PGD-AT one extractor at a budget")
    p.add_argument("--budget", type=_budget_or_range, required=True,
                   help="training budget in 1/255 (8 means 8/255); LO-HI draws one per batch (Table VI, e.g. 3-8)")
    p.add_argument("--scale-batch", action="store_true", help="under torchrun: the profile's batch PER RANK, the "
                   "learning rate scaled linearly (default: the profile's batch is the global batch)")

    p = command("train-merger", [common, merger], "train the linear merger (Eq. 5) of a stack")
    p.add_argument("--budgets", type=_budgets, help="members in 1/255, e.g. 3,4,5,6,7,8 (default: the profile's)")

    p = command("evaluate", [common, merger, ddp], "evaluate an extractor or a stack on the test set")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--budget", type=int, help="a single extractor's budget in 1/255")
    g.add_argument("--budgets", type=_budgets, help="a stack's members in 1/255")
    p.add_argument("--attacks", default="clean,pgd10,pgd20", help="comma-separated: clean, pgdK, fgsm, aa")

    p = command("notebooks", [debug], "train and evaluate the profile's stages here, then run notebooks/NN_*.ipynb "
                "in order into OUT/")
    p.add_argument("--profile", default=None, help=PROFILE_HELP)
    p.add_argument("--out", default="out", help="folder for executed notebooks and figures (default: out)")

    p = command("profiles", [debug, sets], "print the profiles as JSON, or what one costs")
    p.add_argument("--estimate", action="store_true", help="predict each stage's time from FLOP counts (afs/cost.py)")
    p.add_argument("--profile", default=None, help="with --estimate: " + PROFILE_HELP)
    p.add_argument("--device-kind", choices=("cpu", "h200"), default=None, help="with --estimate: h200 (assumed "
                   "100-180 TFLOP/s) or cpu (measured here); default h200 with a GPU, cpu without")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from afs.grid import GridJobError
    from afs.runs import RunConfigMismatchError, StageBusyError

    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (ValueError, TypeError, OSError, RunConfigMismatchError, StageBusyError, GridJobError) as e:
        # Our own errors say what is wrong and how to go on: one line each (--debug shows the traceback).
        if args.debug:
            raise
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and e.filename is not None:
            e = f"cannot use {e.filename}: {e.strerror or e}; check that --out (and --data-root) name writable folders"
        print(f"afs {args.command}: error: {e}", file=sys.stderr)
        return 2


def _check_args(args: argparse.Namespace) -> None:
    """Every argument checked before any work (loading data, training): a bad one costs nothing."""
    if getattr(args, "attacks", None) is not None:
        from afs.evaluation import parse_attack

        names = [a.strip() for a in args.attacks.split(",") if a.strip()]
        if not names:
            raise ValueError("--attacks is empty; give e.g. clean,pgd10,pgd20 "
                             "(forms: clean, fgsm, aa, pgdK, pgdKxR, cwK)")
        for a in names:
            parse_attack(a)  # ValueError naming the valid forms
    if getattr(args, "alpha", None) is not None and not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha weighs the clean term of Eq. 5 and must lie in [0, 1], got {args.alpha}")
    if getattr(args, "seed", None) is not None and args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if getattr(args, "device", None) is not None:
        import torch

        try:
            dev = torch.device(args.device)
        except RuntimeError:
            raise ValueError(f"--device {args.device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if dev.type == "cuda" and (dev.index or 0) >= n:
            raise ValueError(f"--device {args.device}: this machine has {n or 'no'} usable CUDA device(s)"
                             + ("; use --device cpu" if not n else ""))
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

        run_notebooks("notebooks", args.out, get_profile(args.profile).name)
        return 0

    from afs import distributed
    from afs.pipeline import Pipeline
    from afs.progress import bars_enabled

    ranks = distributed.env_world_size()  # > 1 when torchrun started several processes
    if ranks > 1 and args.command in ("train-merger", "reproduce"):
        raise ValueError(f"{args.command} is not data-parallel: run it as one process; for data-parallel training of "
                         "one stage use 'train-extractor', and for the grid on several GPUs 'afs reproduce --executor "
                         "local|slurm'")
    profile = get_profile(args.profile).with_overrides(args.set)
    if args.seed is not None:
        profile = profile.replace(seed=args.seed)
    if getattr(args, "scale_batch", False) and ranks > 1:
        old, profile = profile.extractor, distributed.scale_profile(profile, ranks)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"--scale-batch: global batch {old.batch_size} -> {profile.extractor.batch_size} ({old.batch_size} "
                  f"per rank), lr {old.lr:g} -> {profile.extractor.lr:g} (linear scaling; recorded in the stage's "
                  f"config.json)", file=sys.stderr)
    if args.command == "reproduce" and args.executor != "none":
        from afs.grid import run_grid

        print("wrote " + run_grid(profile, args.out, args.data_root, args.executor, gpus_per_job=args.gpus_per_job,
                                  timeout_min=args.timeout_min, partition=args.partition))
        return 0
    if ranks > 1:  # process groups report through logging
        rank = os.environ.get("RANK", "0")
        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s afs[rank {rank}] %(message)s")
    # One GPU per process under torchrun (cuda:LOCAL_RANK): every torchrun rank binds its own GPU first
    # (set_device), whatever the command and --device say.
    bound = distributed.bind_local_device() if distributed.launched_by_torchrun() else None
    try:
        if ranks > 1 and args.command in ("train-extractor", "evaluate"):
            distributed.init_distributed(timeout_s=args.dist_timeout)
        pipe = Pipeline(profile, args.out, args.data_root, args.device or bound,
                        progress=not args.no_progress and bars_enabled())
        return _command(args, profile, pipe)
    finally:
        distributed.shutdown()


def _command(args: argparse.Namespace, profile: Any, pipe: Any) -> int:
    from afs import distributed, progress

    def say(text: str) -> None:
        if distributed.is_main():  # rank 0 speaks for a data-parallel job
            print(text)

    if args.command == "reproduce":
        with progress.reporting(progress.for_pipeline(pipe)):  # numbered stage lines and an ETA on stderr
            summary = pipe.reproduce()
        say(f"wrote {pipe.root / 'summary.json'} ({summary['timings']['total_this_call_s']} s)")
    elif args.command == "train-extractor":
        b = args.budget
        pipe.extractor(b)
        say(f"extractor {b}: {pipe.extractor_dir((b[0] / 255, b[1] / 255) if isinstance(b, tuple) else b / 255)}")
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
            aa = pipe.evaluate(model, where, ("clean", "aa"), subset="aa")
            acc.update({f"{k} (AA subset)": v for k, v in aa.items()})
        say(json.dumps(acc, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
