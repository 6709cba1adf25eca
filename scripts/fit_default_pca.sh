#!/usr/bin/env bash
# Reproduces the PCA artifacts shipped in delf_es/weights/ (one per backbone's default
# local layer and keypoint scoring): 40 dims (DIMS=128 for the 128-d ablation artifact),
# fitted on the photos listed by scripts/training_images.sh (Debian opencv-doc /
# visp-images-data and scikit-image data; no evaluation image).  Keypoints are selected by
# descriptor norm ('norm' PCAs) or, for backbones with a shipped attention head, by that
# head ('attention' PCAs).  Runs this checkout's code (python -m).
#   [DIMS=40] [SCORING=norm|attention|both] scripts/fit_default_pca.sh [backbone ...]
set -euo pipefail
cd "$(dirname "$0")/.."
list=$(mktemp)
trap 'rm -f "$list"' EXIT
scripts/training_images.sh > "$list"
backbones=("$@")
[ ${#backbones[@]} -gt 0 ] || backbones=(efficientnet-lite2 efficientnet-lite0 mobilenetv2)
dims=${DIMS:-40}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
for backbone in "${backbones[@]}"; do
  layer=$(python3 -c "from delf_es.model.registry import get_preset; print(get_preset('$backbone').local_layer)")
  for scoring in norm attention; do
    [ "${SCORING:-both}" = both ] || [ "${SCORING:-both}" = "$scoring" ] || continue
    head=()
    if [ "$scoring" = attention ]; then
      file=$(ls delf_es/weights/attention-"$backbone"-"$layer"*.pt 2>/dev/null | head -1)
      [ -n "$file" ] || continue
      head=(--attention-weights "$file")
    fi
    python3 -m delf_es.cli --backbone "$backbone" --scoring "$scoring" "${head[@]}" --no-pca fit-pca "@$list" --dims "$dims" \
      --out "delf_es/weights/pca-$backbone-$layer-$scoring-$dims.npz" \
      --fitted-on "$(wc -l < "$list") photos from scripts/training_images.sh: Debian opencv-doc samples, visp-images-data sequences, scikit-image data; keypoints selected by $scoring scores"
  done
done
