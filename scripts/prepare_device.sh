#!/usr/bin/env bash
# Stage what a GPU device run needs but cannot fetch (it has no network and no ../shared):
#   .device/data/cifar10-jpeg.tar.gz   the offline CIFAR-10 copy (19 MB)
#   .device/site/pyautoattack/         pyautoattack's code, without its 42 MB of example weights
#   .device/resume/                    a run directory returned by an earlier device_quick.sh window, when
#                                      given: bash scripts/prepare_device.sh <files_at of that call>
# .device/ is git-ignored; name it in the device tool's `carry`. All that travels (tracked and untracked-not-
# ignored files, and .device/) must stay under the tool's 64 MiB: the total is printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
shared="${SHARED:-../shared}"
returned="${1:-}"
mkdir -p .device/data .device/site
cp "$shared/data/cifar10-jpeg.tar.gz" .device/data/
pkg=$(.venv/bin/python -c "import pyautoattack, os; print(os.path.dirname(pyautoattack.__file__))")
rm -rf .device/site/pyautoattack
rsync -a --exclude examples --exclude __pycache__ "$pkg/" .device/site/pyautoattack/ 2>/dev/null \
  || { cp -r "$pkg" .device/site/pyautoattack && rm -rf .device/site/pyautoattack/examples; }
if [[ -n "$returned" ]]; then
  # The chunks a window returned replace any older ones: the next window resumes from exactly these.
  shopt -s nullglob
  chunks=("$returned"/resume/runs-*.tar.gz.[0-9][0-9])
  ((${#chunks[@]})) || { echo "no resume/runs-*.tar.gz.NN under $returned" >&2; exit 1; }
  rm -rf .device/resume && mkdir -p .device/resume
  cp "${chunks[@]}" .device/resume/
  echo "the next device_quick.sh window resumes from ${#chunks[@]} chunk(s) in .device/resume/"
elif [[ -d .device/resume ]]; then
  echo "kept .device/resume/ (the next window resumes from it; rm -rf .device/resume to start afresh)"
fi
tracked=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | awk '/\ttotal$/ {s += $1} END {print s + 0}')
device=$(du -sb .device | cut -f1)
echo "travels: $(((tracked + device) / 1024 / 1024)) MiB of 64 (the tree $((tracked / 1024 / 1024)) MiB, .device $((device / 1024 / 1024)) MiB)"
