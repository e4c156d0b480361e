"""The ``afs`` command line: ``afs reproduce``, ``afs train-extractor``, ``afs train-merger``,
``afs evaluate``, ``afs notebooks``, ``afs profiles``. ``afs <command> --help`` documents each."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["main"]


def _common(p: argparse.ArgumentParser, out: bool = True) -> None:
    p.add_argument("--profile", default=None,
                   help="smoke | cpu | quick | paper (default: $AFS_PROFILE, else quick with a GPU, cpu without)")
    p.add_argument("--data-root", default=None, help="folder holding the data set (default: $AFS_DATA, else ./data)")
    if out:
        p.add_argument("--out", default="runs", help="run directory root; results go to OUT/<profile>/ (default: runs)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _budgets(text: str) -> list[int]:
    try:
        return [int(b) for b in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"budgets are integers in 1/255 units, e.g. '3,4,5,6,7,8'; got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="afs", description="Adversarial Feature Stacking: train, stack, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    p = sub.add_parser("reproduce", help="run every stage the notebooks need, skipping finished ones",
                       description="Train all extractors, mergers and ablations of a profile, evaluate them, and "
                                   "write OUT/<profile>/summary.json. Finished stages are reused, interrupted ones resume.")
    _common(p)

    p = sub.add_parser("train-extractor", help="PGD-AT one extractor at a budget",
                       description="PGD adversarial training of one network at an L-inf budget (in 1/255), "
                                   "into OUT/<profile>/extractors/eps<B>/ (resumes if interrupted).")
    _common(p)
    p.add_argument("--budget", type=int, required=True, help="training budget in 1/255 (8 means 8/255)")

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

    p = sub.add_parser("notebooks", help="execute the notebooks top to bottom into an output folder",
                       description="Run notebooks/NN_*.ipynb in order under a profile; executed copies go to OUT/.")
    p.add_argument("--profile", default=None, help="profile (default: $AFS_PROFILE, else quick with a GPU, cpu without)")
    p.add_argument("--out", default="out", help="folder for executed notebooks and figures (default: out)")
    p.add_argument("--notebooks", default="notebooks", help="folder holding the notebooks (default: notebooks)")
    p.add_argument("--timeout", type=int, default=-1, help="per-cell timeout in seconds (default: none)")
    p.add_argument("--in-place", action="store_true", help="write outputs back into the notebooks themselves")

    sub.add_parser("profiles", help="print the profiles as JSON", description="Print every profile's settings.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, TypeError) as e:  # our own clear errors: no traceback
        print(f"afs {args.command}: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from afs.config import PROFILES, get_profile

    if args.command == "profiles":
        print(json.dumps({k: v.to_dict() for k, v in PROFILES.items()}, indent=2))
        return 0
    if args.command == "notebooks":
        from afs.notebooks import run_notebooks

        run_notebooks(args.notebooks, args.out, get_profile(args.profile).name, timeout=args.timeout,
                      in_place=args.in_place)
        return 0

    from afs.pipeline import Pipeline

    profile = get_profile(args.profile)
    pipe = Pipeline(profile, args.out, args.data_root, args.device, progress=not args.no_progress)
    if args.command == "reproduce":
        summary = pipe.reproduce()
        print(f"wrote {pipe.root / 'summary.json'} ({summary['timings']['total_this_call_s']} s)")
    elif args.command == "train-extractor":
        pipe.extractor(args.budget)
        print(f"extractor eps{args.budget}: {pipe.extractor_dir(args.budget / 255)}")
    elif args.command == "train-merger":
        budgets = args.budgets or list(profile.merger.stack)
        stack = pipe.stack(budgets, args.alpha, args.mode)
        print(f"merger over {budgets}: importance ratios {[round(r, 3) for r in stack.importance_ratio().tolist()]}")
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
        print(json.dumps(acc, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
