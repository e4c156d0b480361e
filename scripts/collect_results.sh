#!/usr/bin/env bash
# Copy a finished run's summary and every stage's provenance (configs, manifests, logs, metrics,
# evaluation JSON; no weights) from runs/<profile>/ into <dest>/<profile>/, ready to commit.
#   bash scripts/collect_results.sh cpu [dest=results] [runs=runs]
set -euo pipefail
profile="${1:?usage: collect_results.sh PROFILE [DEST] [RUNS]}"
dest="${2:-results}"
runs="${3:-runs}"
src="$runs/$profile"
[ -f "$src/summary.json" ] || { echo "no $src/summary.json: run 'afs reproduce --profile $profile' first" >&2; exit 1; }
mkdir -p "$dest/$profile"
cp "$src/summary.json" "$dest/$profile/summary.json"
(cd "$src" && find . \( -name log.jsonl -o -name metrics.json -o -name config.json -o -name manifest.json \
    -o -name 'eval_*.json' \) | LC_ALL=C sort | tar -czf - -T - --owner=0 --group=0 --mtime='2000-01-01') \
  > "$dest/$profile/stages.tar.gz"
echo "wrote $dest/$profile/summary.json and stages.tar.gz"
