"""Extraction speed per backbone and pyramid, and what fraction of this machine's
dense-convolution throughput it reaches.

For each backbone at 7 and 3 scales: seconds per image, median over N real photos
(paris250, mostly 1024x768), after one warm-up image; the network's convolution
FLOPs for those images (counted by forward hooks on the real levels); and the
machine's measured dense 3x3-convolution throughput (GFLOP/s), so the result is
also a ratio to what this machine can do.

    python benchmarks/extract_speed.py --images ../shared/data/paris250/db --num 20
Writes benchmarks/results/extract_speed.json and extract_speed.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
from torch import nn

from delf_es.items import expand_inputs
from delf_es.features import Extractor
from delf_es.imageio import load_image
from delf_es.settings import DELF_SCALES, Settings

THREE_SCALES = (0.7071, 1.0, 1.4142)


def dense_conv_gflops(repeats: int = 5) -> float:
    """Best-of throughput of a large dense 3x3 convolution (256->256 channels, 96x128)."""
    conv = nn.Conv2d(256, 256, 3, padding=1, bias=False).eval()
    x = torch.randn(1, 256, 96, 128).contiguous(memory_format=torch.channels_last)
    conv = conv.to(memory_format=torch.channels_last)
    flops = 2 * 256 * 256 * 9 * 96 * 128
    best = float("inf")
    with torch.inference_mode():
        conv(x)
        for _ in range(repeats):
            start = time.perf_counter()
            conv(x)
            best = min(best, time.perf_counter() - start)
    return flops / best / 1e9


class FlopCounter:
    """Counts convolution FLOPs (2 * multiply-adds) of every forward pass while attached."""

    def __init__(self, model: nn.Module) -> None:
        self.flops = 0
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, nn.Conv2d)]

    def _hook(self, module: nn.Conv2d, inputs, output) -> None:
        kh, kw = module.kernel_size
        self.flops += 2 * output.numel() * (module.in_channels // module.groups) * kh * kw

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def measure(settings: Settings, paths: list[str]) -> dict:
    extractor = Extractor(settings)
    pixels = [load_image(p, settings).pixels for p in paths]
    extractor.extract(pixels[0], "warm-up")
    times, keypoints = [], []
    for i, image in enumerate(pixels):
        start = time.perf_counter()
        feats = extractor.extract(image, str(i))
        times.append(time.perf_counter() - start)
        keypoints.append(feats.num_keypoints)
    counter = FlopCounter(extractor.model)
    extractor.extract(pixels[0], "flops")
    counter.close()
    return {
        "model_id": extractor.model_id,
        "seconds_per_image_median": statistics.median(times),
        "seconds_per_image_p90": sorted(times)[int(0.9 * (len(times) - 1))],
        "conv_gflops_per_image": counter.flops / 1e9,
        "keypoints_median": statistics.median(keypoints),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", nargs="+", default=["../shared/data/paris250/db"])
    parser.add_argument("--num", type=int, default=20)
    parser.add_argument("--backbones", nargs="+", default=["efficientnet-lite2", "efficientnet-lite0", "mobilenetv2"])
    parser.add_argument("--out", default="benchmarks/results/extract_speed.json")
    args = parser.parse_args()

    paths = expand_inputs(args.images)
    step = max(1, len(paths) // args.num)
    paths = paths[::step][: args.num]
    machine = dense_conv_gflops()
    rows = []
    for backbone in args.backbones:
        for name, scales in (("7 scales", DELF_SCALES), ("3 scales", THREE_SCALES)):
            result = measure(Settings(backbone=backbone, scales=scales), paths)
            achieved = result["conv_gflops_per_image"] / result["seconds_per_image_median"]
            rows.append({"backbone": backbone, "pyramid": name, "scales": list(scales), **result,
                         "achieved_gflops": achieved, "fraction_of_dense_conv_peak": achieved / machine})
            print(json.dumps(rows[-1]), flush=True)
    out = {
        "benchmark": "extract_speed",
        "images": f"{len(paths)} photos from {args.images} (every {step}th), longer side resized to 1024",
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "dense_conv3x3_gflops": machine,
        "target": "<= 1.0 s per 1024 px image with 7 scales (efficientnet-lite2)",
        "rows": rows,
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    plot(out, Path(args.out).with_suffix(".png"))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"{r['backbone']}\n{r['pyramid']}" for r in rows]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar(range(len(rows)), [r["seconds_per_image_median"] for r in rows], color="#4477aa")
    ax.axhline(1.0, color="#cc3311", linestyle="--", label="target (lite2, 7 scales)")
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("s / image (median)")
    ax.set_title(f"Extraction on {result['threads']} CPU threads; dense conv peak {result['dense_conv3x3_gflops']:.0f} GFLOP/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
