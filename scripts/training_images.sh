#!/usr/bin/env bash
# Prints the paths of the real photos the project fits its PCA (and trains its attention
# head) on.  None of them is in ../shared/data (paris250, pairs, distractors): they come
# from Debian packages (opencv-doc samples, visp-images-data sequences) and scikit-image's
# bundled data, installed here on demand.  Usage: scripts/training_images.sh > list.txt
set -euo pipefail

need_pkg() {
  if ! dpkg -s "$1" >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq --no-install-recommends "$1") >&2
  fi
}
need_pkg opencv-doc
need_pkg visp-images-data

OPENCV=/usr/share/doc/opencv-doc/examples/data
VISP=/usr/share/visp-images-data/ViSP-images
# opencv-doc: colour photos of real scenes (no calibration boards, logos, text or drawings)
for f in Blender_Suzanne1.jpg aero1.jpg aero3.jpg aloeL.jpg apple.jpg baboon.jpg board.jpg building.jpg \
         butterfly.jpg ela_original.jpg fruits.jpg home.jpg left.jpg leuvenA.jpg licenseplate_motion.jpg \
         messi5.jpg orange.jpg pca_test1.jpg squirrel_cls.jpg starry_night.jpg stuff.jpg graf1.png \
         rubberwhale1.png smarties.png basketball1.png box_in_scene.png; do
  echo "$OPENCV/$f"
done
# visp-images-data: two paintings' photos, a castle model and an object sequence (sparse frames)
echo "$VISP/Klimt/Klimt.ppm"
echo "$VISP/Solvay/Solvay_conference_1927_Version2_1280x881.jpg"
ls "$VISP"/mbt-depth/castel/castel/image_*.pgm | awk 'NR % 3 == 1'
ls "$VISP"/mbt/cube/image*.pgm | awk 'NR % 20 == 1'
ls "$VISP"/cube/image.*.pgm | awk 'NR % 10 == 1'
# scikit-image (PyPI) bundled photos
SK=$(python -c "import skimage, os; print(os.path.join(os.path.dirname(skimage.__file__), 'data'))")
for f in astronaut.png coffee.png chelsea.png rocket.jpg motorcycle_left.png brick.png grass.png gravel.png; do
  echo "$SK/$f"
done
