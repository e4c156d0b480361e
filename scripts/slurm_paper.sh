#!/usr/bin/env bash
# The `paper` profile on a SLURM cluster through submitit (afs.grid; docs/distributed.md):
#
#   RUNS=/shared/afs-runs GPUS=4 PARTITION=gpu bash scripts/slurm_paper.sh
#
#   1. extractors  one job array, one job per extractor (budgets 0-9 + the two Table VI ablations), each
#                  trained data-parallel over GPUS GPUs (submitit tasks joined into one process group)
#   2. mergers     a second array once the extractors are done, one GPU per merger
#   3. evaluation  one job: `afs reproduce` finds every stage trained, evaluates and writes summary.json
#
# This script is the driver: it submits each phase and waits for it, so run it where it may stay up for
# the whole grid (tmux/screen on a login node, or a small CPU job). If it or any job dies, run it again:
# finished stages are kept, an interrupted one resumes from its last epoch, and a stage's lock keeps a
# requeued duplicate from training it twice. Job logs: $RUNS/paper/jobs/<job id>/.
# Cost: GPU-hours = image passes / (3600 R), R from results/bench/ (docs/distributed.md, "Cost").
set -euo pipefail

RUNS=${RUNS:-$PWD/runs}            # run directory root: on a file system every node sees
GPUS=${GPUS:-4}                    # GPUs per extractor job
PARTITION=${PARTITION:-}           # optional SLURM partition
TIMEOUT_MIN=${TIMEOUT_MIN:-2880}   # per job; size it from the cost formula (an extractor is the longest)
PYTHON=${PYTHON:-python}           # the environment's python, with afs installed

args=(--profile paper --executor slurm --gpus-per-job "$GPUS" --timeout-min "$TIMEOUT_MIN" --out "$RUNS" --no-progress)
[[ -n "$PARTITION" ]] && args+=(--partition "$PARTITION")
exec "$PYTHON" -m afs.cli reproduce "${args[@]}"
