"""What the model looks at: the keypoint-score map of one pyramid level and the selected
keypoints, drawn over the image (``delf-es attention IMAGE --out heat.png``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from delf_es.features import LEVEL_MULTIPLE, Extractor, _resize, check_pixels
from delf_es.model.receptive_field import level_size


@torch.inference_mode()
def score_map(extractor: Extractor, pixels: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w) float32 keypoint scores (attention, or descriptor norm) of the
    stride-16 map at pyramid ``scale``, resized exactly as ``Extractor.extract_raw`` does."""
    check_pixels(pixels)
    settings = extractor.settings
    height, width = pixels.shape[:2]
    base = torch.from_numpy(np.array(pixels)).permute(2, 0, 1)[None].float().to(extractor.device)
    ratio = min(1.0, settings.max_image_size / max(width, height))
    base_h, base_w = max(1, round(height * ratio)), max(1, round(width * ratio))
    level_h, level_w = level_size(base_h * scale, LEVEL_MULTIPLE), level_size(base_w * scale, LEVEL_MULTIPLE)
    level = (_resize(base, level_h, level_w) - extractor._mean) / extractor._std
    return extractor.network.forward_level(level, with_global=False).scores.float().cpu().numpy()


def draw_attention(
    pixels: np.ndarray, scores: np.ndarray, keypoints: np.ndarray, keypoint_scales: np.ndarray, title: str, out: Path
) -> Path:
    """Image | image with the score map overlaid and the keypoints (circle size ~ pyramid scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height, width = pixels.shape[:2]
    figure, axes = plt.subplots(1, 2, figsize=(12, 6 * height / width + 0.6))
    axes[0].imshow(pixels)
    axes[0].set_title("image")
    axes[1].imshow(pixels)
    heat = axes[1].imshow(scores, cmap="inferno", alpha=0.6, extent=(-0.5, width - 0.5, height - 0.5, -0.5),
                          interpolation="bilinear")
    if len(keypoints):
        axes[1].scatter(keypoints[:, 0], keypoints[:, 1], s=6 / np.maximum(keypoint_scales, 0.1), facecolors="none",
                        edgecolors="cyan", linewidths=0.6)
    axes[1].set_title(title, fontsize=9)
    for axis in axes:
        axis.set_axis_off()
    figure.colorbar(heat, ax=axes[1], fraction=0.03, pad=0.01)
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out
