#!/usr/bin/env bash
# Stage what a GPU device run needs but cannot fetch (it has no network and no ../shared):
#   .device/data/cifar10-jpeg.tar.gz   the offline CIFAR-10 copy (19 MB)
#   .device/site/pyautoattack/         pyautoattack's code, without its 42 MB of example weights
# .device/ is git-ignored; name it in the device tool's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
shared="${SHARED:-../shared}"
mkdir -p .device/data .device/site
cp "$shared/data/cifar10-jpeg.tar.gz" .device/data/
pkg=$(.venv/bin/python -c "import pyautoattack, os; print(os.path.dirname(pyautoattack.__file__))")
rm -rf .device/site/pyautoattack
rsync -a --exclude examples --exclude __pycache__ "$pkg/" .device/site/pyautoattack/ 2>/dev/null \
  || { cp -r "$pkg" .device/site/pyautoattack && rm -rf .device/site/pyautoattack/examples; }
du -sh .device
