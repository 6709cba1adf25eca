#!/usr/bin/env bash
# The issue-16 paris250 (+ wallpapers) rows and pairs checks, cheapest first.  Run from the repo
# root on the shared machine (each step takes the CPU lock itself):
#   scripts/quality_rows.sh [features cache] [map cache] [work folder]
# 1. pairs check of the default (fills the pairs' backbone maps): benchmarks/results/chance_inliers.json
# 2. search-only rows on the default feature cache: default, QE, scale rule, QE + scale rule, 300 keypoints
# 3. one backbone pass over paris250 + wallpapers into the map cache (~35 min on 2 cores), then the
#    head rows in minutes each: geometry bce / rank, learned projection, rank head with 300 keypoints
# 4. pairs checks of the heads and the projection from the pairs' map cache
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
features=${1:-/work/cache/features}
maps=${2:-/work/cache/quality/maps}
work=${3:-/work/cache/quality}
gt=../shared/data/paris250/gt.json
wall=../shared/data/distractors/wallpapers
out=benchmarks/results/eval
photos=$work/photos-v2
heavy() { /work/bin/heavy "$@"; }
eval_row() {  # label config [extra options]
  local label=$1 config=$2; shift 2
  heavy 1 python3 -m delf_es.cli eval $gt --distractors $wall --label "$label" --out $out --no-figures \
    ${config:+--config benchmarks/configs/$config.json} "$@"
}
[ -d "$photos" ] || python3 scripts/training_photos.py --out "$photos" --work "$work/photo-sources"
heavy 1 python3 benchmarks/chance_inliers.py --photos "$photos" --cache "$work/pair-features" --maps "$work/pair-maps" \
  --out benchmarks/results/chance_inliers.json
eval_row quality-default "" --cache "$features"
eval_row quality-qe-5 qe-5 --cache "$features"
eval_row quality-scale-rule scale-rule --cache "$features"
eval_row quality-qe-5-scale-rule qe-5-scale-rule --cache "$features"
eval_row quality-keypoints-300 keypoints-300 --cache "$features"
heavy 2 python3 -m delf_es.cli eval $gt --distractors $wall --label quality-default-maps --out $out --no-figures \
  --cache "$work/features-maps" --maps "$maps"
for row in geometry-bce geometry-rank proj40 geometry-rank-300; do
  eval_row "quality-$row" "$row" --cache "$work/features-maps" --maps "$maps"
done
for variant in geometry-bce geometry-rank proj40; do
  config=benchmarks/configs/$variant.json
  env $(python3 -c "import json,sys; print(' '.join(f'DELF_ES_{k.upper()}={v}' for k, v in json.load(open('$config')).items()))") \
    /work/bin/heavy 1 python3 benchmarks/chance_inliers.py --photos "$photos" --cache "$work/pair-features" \
    --maps "$work/pair-maps" --out "benchmarks/results/chance_inliers-$variant.json"
done
python3 benchmarks/eval_table.py > /dev/null
