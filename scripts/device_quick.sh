#!/usr/bin/env bash
# `afs reproduce --profile quick` on the device machine, inside ONE device command, resumable across windows.
# How and why: scripts/README-device.md. The device tool call (after scripts/prepare_device.sh):
#   run(command="AFS_GIT_SHA=<git rev-parse HEAD> bash scripts/device_quick.sh", carry=[".device"], timeout_s=600)
#
# 1. restores a run directory returned by an earlier window, if one is carried in .device/resume/;
# 2. runs `python3 -m afs.cli reproduce` under a hard time limit (BUDGET_S for the whole script, less
#    RESERVE_S kept for step 3); a kill loses at most the epoch or batch in flight (state files are atomic);
# 3. ALWAYS returns, under $OUT (the tool brings back at most 8 files, 64 MiB together):
#      device_quick.log                      the whole output
#      results/<profile>/summary.json        when the run finished (commit it, with ...)
#      results/<profile>/stages.tar.gz       ... every stage's provenance (configs, manifests, logs, metrics)
#      resume/runs-<profile>.tar.gz.NN       the run directory, in chunks of at most 15 MiB: every stage's
#                                            small files, the weights of finished stages, and the state of an
#                                            interrupted one, up to RUNS_MAX_MIB (what does not fit is named
#                                            in the log and retrained by the next window)
#    Copy resume/* into .device/resume/ here and make the same call again to continue.
#
# Environment: OUT (required), PROFILE (quick), BUDGET_S (560), RESERVE_S (30), RUNS_MAX_MIB (40: the
# carried tree is limited to 64 MiB, of which the data takes 19 MiB and the repo ~2), AFS_GIT_SHA (the commit
# recorded in every manifest: the device copy has no .git), PY (python3), AFS_DATA (.device/data),
# RUNS (the run directory, default runs), RESUME_FROM (.device/resume).
# CPU rehearsal (same entry point, smoke profile), a second call resuming from the first's archive:
#   OUT=/tmp/out1 PROFILE=smoke AFS_DATA=../shared/data PY=.venv/bin/python RUNS=/tmp/r1 BUDGET_S=60 bash scripts/device_quick.sh
#   OUT=/tmp/out2 PROFILE=smoke AFS_DATA=../shared/data PY=.venv/bin/python RUNS=/tmp/r2 RESUME_FROM=/tmp/out1/resume bash scripts/device_quick.sh
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
: "${OUT:?set OUT to the folder whose contents come back (the device tool sets it)}"
PROFILE="${PROFILE:-quick}"
BUDGET_S="${BUDGET_S:-560}"
RESERVE_S="${RESERVE_S:-30}"
RUNS_MAX_MIB="${RUNS_MAX_MIB:-40}"
RUNS="${RUNS:-runs}"
RESUME_FROM="${RESUME_FROM:-.device/resume}"
PY="${PY:-python3}"
export AFS_DATA="${AFS_DATA:-$PWD/.device/data}"
export AFS_CACHE="${AFS_CACHE:-$PWD/.cache/afs}"
export PYTHONPATH="$PWD:$PWD/.device/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
exec > >(tee -a "$OUT/device_quick.log") 2>&1
elapsed() { echo $(($(date +%s) - START)); }

echo "### device_quick.sh: profile $PROFILE, budget ${BUDGET_S}s, run dir $RUNS, git ${AFS_GIT_SHA:-unknown (set AFS_GIT_SHA)}"
"$PY" - <<'PYEOF' || { echo "FATAL: $PY cannot import torch"; exit 2; }
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| device",
      torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})")
PYEOF

# 1. Restore an earlier window's run directory. Files already here win (a warm machine's are newer).
mkdir -p "$RUNS"
shopt -s nullglob
chunks=("$RESUME_FROM/runs-$PROFILE.tar.gz."[0-9][0-9])
if ((${#chunks[@]})); then
  cat "${chunks[@]}" | tar -xzf - -C "$RUNS" --skip-old-files || { echo "FATAL: the archive in $RESUME_FROM is broken"; exit 2; }
  echo "### restored $(find "$RUNS/$PROFILE" -name metrics.json | wc -l) finished stage(s) from ${#chunks[@]} chunk(s) in $RESUME_FROM"
fi

# 2. The pipeline, killed (TERM, then KILL 15 s later) when the budget less the reserve is spent.
limit=$((BUDGET_S - RESERVE_S - $(elapsed)))
echo "### [$(elapsed)s] afs reproduce --profile $PROFILE (time limit ${limit}s)"
# A heartbeat: the stages finished since the last one (the pipeline itself is silent until its summary).
(
  seen=$(mktemp)
  find "$RUNS/$PROFILE" \( -name metrics.json -o -name 'eval_*.json' \) 2>/dev/null | sort >"$seen" # restored
  trap 'kill "$nap" 2>/dev/null; rm -f "$seen" "$seen.now"; exit 0' TERM # no orphaned sleep holding the log open
  while :; do
    sleep 30 &
    nap=$!
    wait "$nap"
    find "$RUNS/$PROFILE" \( -name metrics.json -o -name 'eval_*.json' \) 2>/dev/null | sort >"$seen.now"
    new=$(comm -13 "$seen" "$seen.now" | sed "s|^$RUNS/$PROFILE/||" | tr '\n' ' ')
    [[ -n "$new" ]] && echo "### [$(elapsed)s] finished: $new"
    mv "$seen.now" "$seen"
  done
) &
heartbeat=$!
timeout --signal=TERM --kill-after=15 "$limit" "$PY" -m afs.cli reproduce --profile "$PROFILE" --out "$RUNS" --no-progress
rc=$?
kill "$heartbeat" 2>/dev/null
wait "$heartbeat" 2>/dev/null
echo "### [$(elapsed)s] afs reproduce ended rc=$rc"

# 3a. Results and provenance, when the run finished.
if [[ -f "$RUNS/$PROFILE/summary.json" ]]; then
  bash scripts/collect_results.sh "$PROFILE" "$OUT/results" "$RUNS"
fi

# 3b. The run directory for the next window, as a prefix of the order the stages were made in: each
# finished training stage whole (weights, config, manifest, log, metrics, its evaluations; not state.pt,
# never needed again), then an interrupted one with its state.pt, then the folders that only hold
# evaluations (ensemble, transfer audit) and summary.json. At the first stage over RUNS_MAX_MIB, it and
# everything after it stay behind: a stage made later may depend on it (a merger on its members, an
# evaluation on its weights), and the next window retrains them all. Sizes are counted uncompressed (gzip
# saves ~7% on float weights), so the cap holds for the archive.
[[ -d "$RUNS/$PROFILE" ]] && (
  cd "$RUNS" || exit 1
  list=$(mktemp) && left=$(mktemp)
  used=0 cut=
  cap=$((RUNS_MAX_MIB * 1024 * 1024))
  add() { # add NAME FILE...: all the files (one stage) if they fit and nothing was cut before them
    local name=$1 size
    shift
    size=$(du -cb "$@" | tail -1 | cut -f1)
    if [[ -z "$cut" ]] && ((used + size <= cap)); then
      printf '%s\n' "$@" >>"$list"
      used=$((used + size))
    else
      echo "$name" >>"$left"
      cut=${cut:-$name}
    fi
  }
  files() { find "$1" -maxdepth 1 -type f ! -name '*.tmp' "${@:2}"; } # atomic writes' temporaries excluded
  while read -r d; do
    mapfile -t f < <(files "$d" ! -name state.pt)
    add "$d" "${f[@]}"
  done < <(find "$PROFILE" -name metrics.json -printf '%T@ %h\n' | sort -n | cut -d' ' -f2-)
  while read -r d; do
    [[ -f "$d/metrics.json" ]] && continue
    mapfile -t f < <(files "$d")
    add "$d (interrupted)" "${f[@]}"
  done < <(find "$PROFILE" -name state.pt -printf '%h\n')
  while read -r d; do # folders with no training stage of their own (no config.json)
    [[ -f "$d/config.json" ]] && continue
    mapfile -t f < <(files "$d")
    ((${#f[@]})) && add "$d" "${f[@]}"
  done < <(find "$PROFILE" -type d)
  mkdir -p "$OUT/resume"
  [[ -s "$list" ]] && tar -czf - -T "$list" --owner=0 --group=0 | split -b 15M -d -a 2 - "$OUT/resume/runs-$PROFILE.tar.gz."
  echo "### [packed] run directory: $(wc -l <"$list") files, $((used / 1024 / 1024)) MiB uncompressed, in $(ls "$OUT/resume" | wc -l) chunk(s)"
  if [[ -s "$left" ]]; then
    echo "### [packed] left behind from $cut on (RUNS_MAX_MIB=$RUNS_MAX_MIB; the next window redoes them):"
    sed 's/^/###   /' "$left"
  fi
  rm -f "$list" "$left"
)

finished=$(find "$RUNS/$PROFILE" -name metrics.json 2>/dev/null | wc -l)
if [[ -f "$RUNS/$PROFILE/summary.json" ]]; then
  echo "### [$(elapsed)s] DONE: $OUT/results/$PROFILE/summary.json ($finished finished training stages)"
  exit 0
elif ((rc == 124 || rc == 137)); then
  echo "### [$(elapsed)s] NOT FINISHED (time limit): $finished training stage(s) finished; copy resume/* to .device/resume/ and call again"
  exit 75
fi
echo "### [$(elapsed)s] FAILED: afs reproduce exited $rc (the log says why); $finished training stage(s) finished"
exit "$rc"
