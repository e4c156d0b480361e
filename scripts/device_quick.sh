#!/usr/bin/env bash
# The `quick` profile on one GPU, inside one device command (or resumed across several: `afs reproduce`
# skips finished stages and resumes interrupted ones from runs/, which stays on a warm device machine).
#   device tool: run(command="bash scripts/device_quick.sh", carry=[".device"], timeout_s=600)
# Results come back through $OUT/results/<profile>/ ; commit them under results/<profile>/.
# A CPU dry run of the same script: OUT=/tmp/out PROFILE=smoke AFS_DATA=../shared/data bash scripts/device_quick.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE="${PROFILE:-quick}"
OUT="${OUT:?set OUT (the device tool sets it)}"
export AFS_DATA="${AFS_DATA:-$PWD/.device/data}"
export AFS_CACHE="${AFS_CACHE:-$PWD/.cache/afs}"
export PYTHONPATH="$PWD:$PWD/.device/site${PYTHONPATH:+:$PYTHONPATH}"
PY="${PY:-python}"
[ -x .venv/bin/python ] && [ -z "${DEVICE:-}" ] && PY=.venv/bin/python
# Stop cleanly before the device tool's 10-minute limit; a later call resumes.
LIMIT="${LIMIT:-540}"
$PY - <<'PYEOF'
import torch, platform
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor())
PYEOF
set +e
timeout --signal=TERM "$LIMIT" $PY -m afs.cli reproduce --profile "$PROFILE" --out runs --no-progress
rc=$?
set -e
if [ -f "runs/$PROFILE/summary.json" ]; then
  bash scripts/collect_results.sh "$PROFILE" "$OUT/results" runs
else
  echo "not finished (rc=$rc): run the same command again to resume"
fi
exit 0
