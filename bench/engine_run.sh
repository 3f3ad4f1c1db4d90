#!/usr/bin/env bash
# The core engine on real data, through the CLI exactly as a user runs it:
#   index add train/good --holdout 0.25, calibrate, query --json every test image.
# Prints per-stage wall time and peak RSS, and the image AUROC of the query scores.
# Usage: bench/engine_run.sh DATASET_CATEGORY_DIR [extra `index add` options...]
#   bench/engine_run.sh ../shared/datasets/piped/PA_BDP01_TL
#   bench/engine_run.sh ../shared/datasets/magnetic_tile/magnetic_tile
set -euo pipefail
cd "$(dirname "$0")/.."
data="$1"; shift
name="$(basename "$data")"
work="${BENCH_DIR:-bench/.cache}/engine-$name"
rm -rf "$work"; mkdir -p "$work"
sim=.venv/bin/simsearch
stage() {  # stage NAME OUTFILE CMD... : run with stdout to OUTFILE, print its time and peak RSS
    local label="$1" outfile="$2"; shift 2
    /usr/bin/time -f "%e %M" -o "$work/$label.time" "$@" > "$outfile"
    read -r secs kb < "$work/$label.time"
    printf '%-10s %8.1f s  peak RSS %6.0f MiB\n' "$label" "$secs" "$((kb / 1024))"
}
stage add "$work/add.txt" $sim index add "$data/train/good" --holdout 0.25 --index "$work/index" "$@"
stage calibrate "$work/calibrate.txt" $sim calibrate --index "$work/index"
stage query "$work/query.jsonl" $sim query --json --index "$work/index" "$data"/test/*/*
head -1 "$work/add.txt"
sed -n 2,3p "$work/calibrate.txt"
.venv/bin/python - "$work/query.jsonl" <<'PY'
import json, sys
from sklearn.metrics import roc_auc_score
rows = [json.loads(line) for line in open(sys.argv[1])]
labels = [0 if "/test/good/" in r["image"] else 1 for r in rows]
verdicts = [r["is_anomalous"] for r in rows]
assert all(isinstance(v, bool) for v in verdicts), "every verdict must be a boolean"
fp = sum(v for v, y in zip(verdicts, labels) if y == 0)
tp = sum(v for v, y in zip(verdicts, labels) if y == 1)
print(f"images {len(rows)}  image AUROC {roc_auc_score(labels, [r['score'] for r in rows]):.4f}  "
      f"flagged: {tp}/{sum(labels)} defective, {fp}/{len(labels) - sum(labels)} good")
PY
