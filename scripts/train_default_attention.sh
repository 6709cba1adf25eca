#!/usr/bin/env bash
# Reproduces the shipped attention head delf_es/weights/attention-efficientnet-lite2-expand-instance.pt
# (+ .json provenance).  Data: the 65 photos of scripts/training_images.sh (Debian opencv-doc,
# visp-images-data, scikit-image; none from ../shared/data), labelled for instance
# discrimination: every photo is its own class, except frames of one visp sequence (one
# object, one class) and opencv's aero1/aero3 (the same aerial scene); scikit-image's
# brick/grass/gravel textures are background images (uniform-target negatives).
# Augmented views (crops around the centre, random rescale) are the positives of a class.
#   scripts/train_default_attention.sh [run folder]     (~ minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-${DELF_ES_DATA_DIR:-$HOME/.local/share/delf-es}/train-default-attention}
tree=$run/tree
rm -rf "$tree"
mkdir -p "$tree/classes" "$tree/background"
list=$(mktemp)
trap 'rm -f "$list"' EXIT
scripts/training_images.sh > "$list"
while read -r path; do
  name=$(basename "$path")
  stem=${name%.*}
  case "$path" in
    */ViSP-images/mbt-depth/castel/*) class=visp-castel ;;
    */ViSP-images/mbt/cube/*) class=visp-mbt-cube ;;
    */ViSP-images/cube/*) class=visp-cube ;;
    */aero1.jpg|*/aero3.jpg) class=opencv-aero ;;
    */skimage/data/brick.png|*/skimage/data/grass.png|*/skimage/data/gravel.png) class="" ;;
    *) class=$stem ;;
  esac
  if [ -z "$class" ]; then
    ln -s "$path" "$tree/background/$name"
  else
    mkdir -p "$tree/classes/$class"
    ln -s "$path" "$tree/classes/$class/$name"
  fi
done < "$list"
out=delf_es/weights/attention-efficientnet-lite2-expand-instance.pt
python -m delf_es.cli --backbone efficientnet-lite2 train attention "$tree/classes" --background "$tree/background" \
  --out "$run" --epochs 30 --hidden 128 --views 24 --sizes 192,256,320,384 --crop-min 0.5 --holdout 0.2 \
  --batch-size 32 --lr 1e-3 --seed 0 --threads "${THREADS:-2}" --cache "$run/views" --export "$out" ${RESUME:+--resume}
python - "$run" "$out" <<'PY'
import json, sys, torch
run, out = sys.argv[1], sys.argv[2]
head = torch.load(out, map_location="cpu", weights_only=True)
summary = json.load(open(f"{run}/train.json"))
meta = {k: v for k, v in head["meta"].items()}
meta.update({"file": out, "format": head["format"], "script": "scripts/train_default_attention.sh",
             "data": "65 photos of scripts/training_images.sh; classes = photos / visp sequences / aero pair; "
                     "background = scikit-image brick, grass, gravel",
             "views": {**meta["views"], "train": summary["views"]["train"], "val": summary["views"]["val"]},
             "history": summary["history"]})
json.dump(meta, open(out.replace(".pt", ".json"), "w"), indent=2)
print(f"wrote {out} and its .json")
PY
