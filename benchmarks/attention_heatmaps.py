"""Keypoint-score heat maps of a few training/pairs photos: descriptor norm vs trained heads.

For each photo (default: opencv-doc's building.jpg and home.jpg, whose sky and trees should
score low, and HPatches v_dogman image 1), the stride-16 score map at pyramid scale 1.0 of
every scoring given (``norm`` and each ``--head NAME=PATH``) is drawn over the photo, each map
normalised to its own 1st-99th percentile (only the order matters for selection).  The
opencv-doc photos are read from ``--photos-dir`` (scripts/training_photos.py's output).

    python benchmarks/attention_heatmaps.py --head bce=delf_es/weights/attention-...-matchability-bce.pt \
        --out benchmarks/results/attention_heatmaps.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from delf_es.imageio import load_image
from delf_es.model.attention import AttentionHead
from delf_es.model.delf import build_model
from delf_es.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def score_maps(pixels: np.ndarray, heads: dict[str, AttentionHead | None], settings: Settings) -> dict[str, np.ndarray]:
    model, meta = build_model(settings.model_copy(update={"scoring": "norm"}))
    height, width = pixels.shape[:2]
    side = 512 / max(height, width)
    h, w = int(round(height * side / 32)) * 32, int(round(width * side / 32)) * 32
    image = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None].float()
    image = torch.nn.functional.interpolate(image, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(meta.mean).view(1, 3, 1, 1)
    std = torch.tensor(meta.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        local = model.backbone((image - mean) / std, with_global=False).local
        out = {}
        for name, head in heads.items():
            out[name] = (local.norm(dim=1)[0] if head is None else head(local)[0, 0]).numpy()
    return out


def load_head(path: Path, channels: int) -> AttentionHead:
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    head = AttentionHead(channels, hidden=state["conv1.weight"].shape[0])
    head.load_state_dict(state)
    return head.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", action="append", default=[], help="NAME=PATH of an attention head (repeatable)")
    parser.add_argument("--photo", action="append", type=Path, default=None)
    parser.add_argument("--photos-dir", type=Path, default=Path("/work/cache/quality/photos-v2"),
                        help="folder written by scripts/training_photos.py")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/attention_heatmaps.png")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = Settings()
    photos = args.photo or [args.photos_dir / "opencv-doc__building.jpg", args.photos_dir / "opencv-doc__home.jpg",
                            ROOT.parent / "shared/data/pairs/hpatches_v_dogman/1.ppm"]
    _, meta = build_model(settings.model_copy(update={"scoring": "norm"}))
    heads: dict[str, AttentionHead | None] = {"norm": None}
    for spec in args.head:
        name, path = spec.split("=", 1)
        heads[name] = load_head(Path(path), meta.local_dim)
    fig, axes = plt.subplots(len(photos), len(heads) + 1, figsize=(3.2 * (len(heads) + 1), 2.6 * len(photos)))
    for row, photo in zip(np.atleast_2d(axes), photos):
        pixels = load_image(photo, settings).pixels
        maps = score_maps(pixels, heads, settings)
        row[0].imshow(pixels)
        row[0].set_title(photo.name, fontsize=8)
        for ax, (name, scores) in zip(row[1:], maps.items()):
            low, high = np.percentile(scores, [1, 99])
            ax.imshow(pixels)
            ax.imshow(np.clip((scores - low) / max(high - low, 1e-9), 0, 1), cmap="inferno", alpha=0.6,
                      extent=(0, pixels.shape[1], pixels.shape[0], 0), interpolation="nearest")
            ax.set_title(name, fontsize=8)
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(args.out)


if __name__ == "__main__":
    main()
