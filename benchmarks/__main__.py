"""Command line: ``python -m benchmarks <suite|all> [--device cuda] [--batch-sizes 128,512] [--quick] ...``.

Examples::

    python -m benchmarks pgd --device cuda --batch-sizes 128,512           # the issue's full size
    python -m benchmarks summary --results-dir results/bench              # one line per stored row
    python -m benchmarks merge --from /path/to/out/results/bench          # device rows -> results/bench
    python -m benchmarks all --device cpu --model wrn-10-1 --batch-sizes 8 --image-size 16 \\
        --steps 2 --members 2 --epoch-images 16 --epoch-batch-size 8 --bandwidth-batch 0 \\
        --cpu-batch-size 4 --cpu-train-steps 2 --cpu-eval-batches 1 --cpu-epoch-batches 1 \\
        --compile-backend eager --quick --results-dir /tmp/bench             # a CPU dry run
    OMP_NUM_THREADS=2 python -m benchmarks cpu --data-root /path/to/data      # the cpu suite (CPU only)
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from .harness import Recorder, config_dict, merge_results, summarize
from .suites import SUITES, BenchConfig


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def build_parser() -> argparse.ArgumentParser:
    d = BenchConfig()
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("suite", choices=[*SUITES, "all", "summary", "merge"],
                   help="what to measure ('all': every suite in turn); 'summary' prints the stored rows of "
                        "--results-dir, 'merge' appends the rows of --from to --results-dir")
    p.add_argument("--from", dest="merge_from", default=None, help="merge: the folder of *.json rows to add")
    p.add_argument("--device", default=None,
                   help="cuda (timed with CUDA events) or cpu (a dry run; the cpu suite's only device); "
                        f"default: cpu for the cpu suite, else {d.device}")
    p.add_argument("--batch-sizes", type=_ints, default=d.batch_sizes, help="comma-separated, e.g. 128,512")
    p.add_argument("--model", default=d.model, help="wrn-<depth>-<widen>")
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--num-classes", type=int, default=d.num_classes)
    p.add_argument("--steps", type=int, default=d.steps, help="PGD iterations")
    p.add_argument("--members", type=int, default=d.members, help="extractors in the stack / merger head")
    p.add_argument("--warmup", type=int, default=None, help=f"untimed calls (default {d.warmup}; 1 with --quick)")
    p.add_argument("--reps", type=int, default=None, help=f"timed repetitions (default {d.reps}; 3 with --quick)")
    p.add_argument("--quick", action="store_true", help="fewer warm-ups and repetitions")
    p.add_argument("--compile-backend", default=d.compile_backend, help="torch.compile backend")
    p.add_argument("--peak-tflops", type=float, default=d.peak_tflops, help="bf16 peak the TFLOP/s are compared with")
    p.add_argument("--bandwidth-batch", type=int, default=d.bandwidth_batch, help="pgd_step: extra large batch (0: none)")
    p.add_argument("--epoch-images", type=int, default=d.epoch_images)
    p.add_argument("--epoch-batch-size", type=int, default=d.epoch_batch_size)
    p.add_argument("--epoch-baseline-batches", type=int, default=d.epoch_baseline_batches)
    p.add_argument("--cpu-batch-size", type=int, default=d.cpu_batch_size, help="cpu suite: attack/training batch")
    p.add_argument("--cpu-train-steps", type=int, default=d.cpu_train_steps,
                   help="cpu suite: PGD-AT steps that train the attacked model first")
    p.add_argument("--cpu-eval-batches", type=int, default=d.cpu_eval_batches,
                   help="cpu suite: batches the attack strength is scored on")
    p.add_argument("--cpu-epoch-batches", type=int, default=d.cpu_epoch_batches,
                   help="cpu suite: batches of the timed PGD-AT epoch")
    p.add_argument("--cpu-compile", action=argparse.BooleanOptionalAction, default=d.cpu_compile,
                   help="cpu suite: also the torch.compile'd variants")
    p.add_argument("--data-root", default=d.data_root,
                   help="cpu suite: folder holding --dataset (afs.data); default synthetic images")
    p.add_argument("--dataset", default=d.dataset, help="cpu suite: the data set in --data-root")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--results-dir", default=d.results_dir, help="rows are appended to <dir>/<suite>.json")
    p.add_argument("--note", action="append", default=[], help="free text stored in every row (repeatable)")
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    d = BenchConfig()
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else d.warmup)
    reps = args.reps if args.reps is not None else (3 if args.quick else d.reps)
    device = args.device or ("cpu" if args.suite == "cpu" else d.device)
    return replace(
        d, device=device, batch_sizes=args.batch_sizes, model=args.model, image_size=args.image_size,
        num_classes=args.num_classes, steps=args.steps, members=args.members, warmup=warmup, reps=reps,
        compile_backend=args.compile_backend, peak_tflops=args.peak_tflops, bandwidth_batch=args.bandwidth_batch,
        epoch_images=args.epoch_images, epoch_batch_size=args.epoch_batch_size,
        epoch_baseline_batches=args.epoch_baseline_batches, cpu_batch_size=args.cpu_batch_size,
        cpu_train_steps=args.cpu_train_steps, cpu_eval_batches=args.cpu_eval_batches,
        cpu_epoch_batches=args.cpu_epoch_batches, cpu_compile=args.cpu_compile, data_root=args.data_root,
        dataset=args.dataset, seed=args.seed, results_dir=args.results_dir, notes=tuple(args.note),
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.suite == "summary":
            print(summarize(args.results_dir))
            return 0
        if args.suite == "merge":
            if args.merge_from is None:
                raise ValueError("merge needs --from DIR (the folder holding the device run's *.json rows)")
            for name, n in merge_results(args.merge_from, args.results_dir).items():
                print(f"{name}: {n} new rows -> {Path(args.results_dir) / name}")
            return 0
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        cfg = config_from_args(args)
        device = cfg.torch_device()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = list(SUITES) if args.suite == "all" else [args.suite]
    failures: list[str] = []
    for name in names:
        rec = Recorder(name, Path(cfg.results_dir), device, config_dict(cfg))
        env = rec.env
        where = env.get("gpu") or env.get("cpu")
        print(f"== {name} on {where} (torch {env['torch']}, triton {env['triton']}) -> {rec.path}", flush=True)
        t0 = time.perf_counter()
        SUITES[name](cfg, rec)
        print(f"== {name}: {len(rec.rows)} rows in {time.perf_counter() - t0:.1f} s", flush=True)
        failures += [f"{name} {f}" for f in rec.failures]
    if failures:
        print(f"== {len(failures)} case(s) FAILED:", *failures, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
