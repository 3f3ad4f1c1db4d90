#!/usr/bin/env bash
# anomalib's PatchCore on every category of the shared datasets, both normalisations, resumable:
# a category whose .json exists is skipped. Results feed docs/benchmarks.md (bench/accuracy.py).
# Coreset ratio: anomalib's default 0.1 on PIPED; 0.01 on Magnetic Tile, whose bank (779k patches at
# anomalib's 256 x 256 input) is past ~100k, where its CPU coreset would take hours.
set -euo pipefail
cd "$(dirname "$0")/.."
bash bench/anomalib_setup.sh > /dev/null
data=../shared/datasets
for dataset in piped magnetic_tile; do
    ratio=0.1; [ "$dataset" = magnetic_tile ] && ratio=0.01
    for dir in "$data/$dataset"/*/; do
        category=$(basename "$dir")
        [ -d "$dir/train/good" ] || continue
        for norm in weights imagenet; do
            out="bench/.cache/anomalib/$norm/$dataset/$category"
            [ -f "$out.json" ] && continue
            mkdir -p "$(dirname "$out")"
            bench/.venv-anomalib/bin/python bench/anomalib_patchcore.py --data "$data/$dataset" \
                --category "$category" --norm "$norm" --coreset-ratio "$ratio" --out "$out.npz" > "$out.log" 2>&1
            .venv/bin/python bench/anomalib_metrics.py "$out.npz"
        done
    done
done
