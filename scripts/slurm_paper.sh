#!/usr/bin/env bash
# The `paper` profile on a SLURM cluster: four dependent jobs, each a torchrun (docs/distributed.md).
#
#   RUNS=/shared/afs-runs GPUS=4 PARTITION=gpu bash scripts/slurm_paper.sh
#
#   1. extractors  job array, one task per extractor (budgets 0-9 + the two Table VI ablations),
#                  each a data-parallel `afs train-extractor` over GPUS GPUs on NODES node(s)
#   2. mergers     one job: GPUS independent workers (`afs reproduce --worker --train-only`) share the mergers
#   3. evaluation  job array, one task per extractor and stack, the test set sharded over GPUS GPUs
#   4. summary     one GPU: `afs reproduce` reuses everything above and writes summary.json
#
# Every task resumes when resubmitted (or requeued), and stage claims keep two jobs from training the same
# stage. Cost: GPU-hours = image passes / (3600 R), R from results/bench/ (docs/distributed.md, "Cost").
# Print the sbatch scripts instead of submitting them with DRY_RUN=1.
set -euo pipefail

RUNS=${RUNS:-$PWD/runs}            # run directory root: on a file system every node sees
GPUS=${GPUS:-4}                    # GPUs per node (one torchrun rank per GPU)
NODES=${NODES:-1}                  # nodes per extractor task (multi-node DDP through torchrun's c10d rendezvous)
CPUS=${CPUS:-8}                    # CPU cores per GPU
PYTHON=${PYTHON:-python}           # the environment's python, with afs installed
TORCHRUN=${TORCHRUN:-"$PYTHON -m torch.distributed.run"}  # torchrun of that same environment
PARTITION=${PARTITION:-}           # optional sbatch --partition
ACCOUNT=${ACCOUNT:-}               # optional sbatch --account
TIME_EXTRACTOR=${TIME_EXTRACTOR:-2-00:00:00}  # per extractor task; size it from the cost formula
TIME_MERGERS=${TIME_MERGERS:-1-00:00:00}
TIME_EVAL=${TIME_EVAL:-12:00:00}
TIME_SUMMARY=${TIME_SUMMARY:-1-00:00:00}
MAX_RESTARTS=${MAX_RESTARTS:-3}    # torchrun restarts of a failed task before SLURM sees the failure
DRY_RUN=${DRY_RUN:-0}

extra=()
[[ -n "$PARTITION" ]] && extra+=(--partition="$PARTITION")
[[ -n "$ACCOUNT" ]] && extra+=(--account="$ACCOUNT")
mkdir -p "$RUNS/slurm"

# The stages come from the profile itself, not from a copy of its numbers here.
mapfile -t EXTRACTORS < <("$PYTHON" - <<'PY'
from afs.config import get_profile
p = get_profile("paper")
for b in p.extractor.budgets:
    print(b)
lo, hi = p.experiments.random_budget_range
print(f"{lo}-{hi}")  # Table VI: a budget drawn per batch
b8 = 8 if 8 in p.extractor.budgets else max(p.extractor.budgets)
print(f"{b8} --widen-factor {p.experiments.wide_widen_factor}")  # Table VI: the wider network
PY
)
mapfile -t EVALS < <("$PYTHON" - <<'PY'
from afs.config import get_profile
p = get_profile("paper")
b8 = 8 if 8 in p.extractor.budgets else max(p.extractor.budgets)
for b in p.extractor.budgets:  # Table I; AutoAttack on the PGD-AT baseline (Table IV)
    print(f"--budget {b} --attacks clean,pgd10,pgd20" + (",aa" if b == b8 else ""))
stacks = [(tuple(p.merger.stack), p.merger.alpha, m, True) for m in p.experiments.merger_modes]
stacks += [(tuple(p.merger.stack), a, "paired", False) for a in p.experiments.alphas]
stacks += [(p.stack_for_mask(m), p.merger.alpha, "paired", False) for m in p.experiments.masks]
seen = set()
for members, alpha, mode, aa in stacks:
    if (members, alpha, mode) in seen:
        continue
    seen.add((members, alpha, mode))
    print(f"--budgets {','.join(map(str, members))} --alpha {alpha:g} --mode {mode} "
          f"--attacks clean,pgd10,pgd20{',aa' if aa else ''}")
PY
)

# A torchrun line for one job: single node -> --standalone; several -> c10d rendezvous on the first node.
# (Escaped \$ expand inside the job, at run time.)
if (( NODES > 1 )); then
    LAUNCH="srun --ntasks-per-node=1 $TORCHRUN --nnodes=$NODES --nproc-per-node=$GPUS --rdzv-backend=c10d \
--rdzv-endpoint=\$(scontrol show hostnames \"\$SLURM_JOB_NODELIST\" | head -n1):\$((29500 + SLURM_JOB_ID % 20000)) \
--rdzv-id=\$SLURM_JOB_ID --max-restarts=$MAX_RESTARTS"
else
    LAUNCH="$TORCHRUN --standalone --nproc-per-node=$GPUS --max-restarts=$MAX_RESTARTS"
fi
COMMON="--profile paper --out $RUNS --no-progress"

submit() {  # submit() <sbatch args...> < script ; prints the job id
    if [[ "$DRY_RUN" == 1 ]]; then
        echo "### sbatch ${extra[*]} $*" >&2
        cat >&2
        echo "DRYRUN$RANDOM"
    else
        sbatch --parsable "${extra[@]}" "$@"
    fi
}

header() {  # header <name> <nodes> <gpus> <time>: #SBATCH lines first (sbatch stops reading them at a command)
    cat <<EOF
#!/usr/bin/env bash
#SBATCH --job-name=afs-$1
#SBATCH --nodes=$2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$3
#SBATCH --cpus-per-task=$(( CPUS * $3 ))
#SBATCH --time=$4
#SBATCH --requeue
#SBATCH --output=$RUNS/slurm/%x-%j.out
set -euo pipefail
export OMP_NUM_THREADS=$CPUS
EOF
}

# 1. Extractors: one DDP task per stage. --worker claims the stage (a requeued duplicate waits instead).
n_ext=${#EXTRACTORS[@]}
ext_args=$(printf '"%s" ' "${EXTRACTORS[@]}")
EXT=$({ header extractors "$NODES" "$GPUS" "$TIME_EXTRACTOR"; cat <<EOF
STAGES=($ext_args)
$LAUNCH -m afs.cli train-extractor $COMMON --worker --budget \${STAGES[\$SLURM_ARRAY_TASK_ID]}
EOF
} | submit --array=0-$(( n_ext - 1 )) --output="$RUNS/slurm/%x-%A_%a.out")
echo "extractors: job $EXT ($n_ext tasks, each $NODES node(s) x $GPUS GPUs)"

# 2. Mergers: GPUS independent workers on one node share the merger grid through claims.
MRG=$({ header mergers 1 "$GPUS" "$TIME_MERGERS"; cat <<EOF
$TORCHRUN --standalone --nproc-per-node=$GPUS --max-restarts=$MAX_RESTARTS -m afs.cli reproduce $COMMON --worker --train-only
EOF
} | submit --dependency=afterok:"$EXT")
echo "mergers: job $MRG (after $EXT)"

# 3. Evaluation: each model's test set sharded over the GPUs of one node.
n_eval=${#EVALS[@]}
eval_args=$(printf '"%s" ' "${EVALS[@]}")
EVL=$({ header evaluate 1 "$GPUS" "$TIME_EVAL"; cat <<EOF
MODELS=($eval_args)
$TORCHRUN --standalone --nproc-per-node=$GPUS --max-restarts=$MAX_RESTARTS -m afs.cli evaluate $COMMON \${MODELS[\$SLURM_ARRAY_TASK_ID]}
EOF
} | submit --array=0-$(( n_eval - 1 )) --output="$RUNS/slurm/%x-%A_%a.out" --dependency=afterok:"$MRG")
echo "evaluation: job $EVL ($n_eval tasks, after $MRG)"

# 4. Summary: everything cached by now except the ensemble, the ablation rows and the Fig. 4a curves.
SUM=$({ header summary 1 1 "$TIME_SUMMARY"; cat <<EOF
$PYTHON -m afs.cli reproduce $COMMON
EOF
} | submit --dependency=afterok:"$EVL")
echo "summary: job $SUM (after $EVL) -> $RUNS/paper/summary.json"
