#!/usr/bin/env bash
# The issue-16 paris250 (+ wallpapers) rows and pairs checks, cheapest first.  Run from the repo
# root on the shared machine (each step takes the CPU lock itself, one core, one step at a time):
#   scripts/quality_rows.sh [features cache] [map cache] [work folder]
# Every config pins what it compares (query_expansion, qe_min_inliers, the spread rule), so a row
# keeps its meaning when a default changes.
# 1. pairs check of the default (cross-source false pairs, degenerate cases, ground-truth
#    reprojection): benchmarks/results/chance_inliers.json (+ .png); chooses qe_min_inliers and
#    the spread rule (docs/quality.md)
# 2. search-only rows on the default feature cache: default, QE, scale rule, QE + scale rule,
#    300 keypoints, relative spread rule, QE with qe_min_inliers 15
# 3. one backbone pass over paris250 + wallpapers into the map cache (the default row from maps),
#    then the head rows in minutes each: geometry rank / bce, learned projection, QE + relative
#    spread (the new defaults), the best head with them, the rank head with 300 keypoints
# 4. the pairs checks of each variant from the pairs' map cache (benchmarks/results/chance_inliers-*.json)
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
pairs() {  # out config [extra options]
  local result=$1 config=$2; shift 2
  heavy 1 python3 benchmarks/chance_inliers.py --photos "$photos" --cache "$work/pair-features" \
    ${config:+--config benchmarks/configs/$config.json} --out "benchmarks/results/$result" "$@"
}
[ -d "$photos" ] || python3 scripts/training_photos.py --out "$photos" --work "$work/photo-sources"
pairs chance_inliers.json ""
eval_row quality-default "" --cache "$features"
for row in qe-5 scale-rule qe-5-scale-rule keypoints-300 spread-relative qe-5-min-15; do
  eval_row "quality-$row" "$row" --cache "$features"
done
heavy 1 python3 -m delf_es.cli eval $gt --distractors $wall --label quality-default-maps --out $out --no-figures \
  --cache "$work/features-maps" --maps "$maps"
for row in geometry-rank geometry-bce proj40; do
  eval_row "quality-$row" "$row" --cache "$work/features-maps" --maps "$maps"
done
eval_row quality-qe-5-min-15-spread-relative-maps qe-5-min-15-spread-relative --cache "$work/features-maps" --maps "$maps"
eval_row quality-best-combination best-combination --cache "$work/features-maps" --maps "$maps"
eval_row quality-geometry-rank-300 geometry-rank-300 --cache "$work/features-maps" --maps "$maps"
pairs chance_inliers-default-maps.json "" --maps "$work/pair-maps" --more-warps 0 --food 0
for variant in geometry-rank geometry-bce proj40 geometry-rank-300; do
  pairs "chance_inliers-$variant.json" "$variant" --maps "$work/pair-maps" --more-warps 0 --food 0
done
python3 benchmarks/eval_table.py > /dev/null
