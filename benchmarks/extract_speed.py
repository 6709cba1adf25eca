"""Extraction speed of the default model (EfficientNet-Lite2, 1024 px, 7 scales) under every
network runtime, in one run, with each row's agreement with PyTorch float32 and what bounds it.

Rows (each in its own process, so peak RSS is the row's own and torch/OpenVINO threads do
not leak between rows): PyTorch float32 (channels-last, today's default) and its variants
(NCHW, the dynamic SAME-padding copies this change removed, bfloat16 weights, bfloat16
autocast, torch.compile), OpenVINO FP32 and INT8 (NNCF post-training quantisation calibrated
on the training photos of scripts/training_images.sh, never on evaluation images), ONNX
Runtime FP32; and "2 processes x 1 thread" for the main candidates (throughput: wall time of
both halves run at once / photos).  For every row: median and p90 s/image over N paris250
photos after one warm-up photo, the ratio to the float32 row of the same run, peak RSS, the
load average around it, seconds per pyramid level, and the agreement with float32 on the
same photos (share of the same keypoints kept, median cosine of the descriptors of those
keypoints, median cosine of the global descriptors).

Machine: dense 3x3 and 1x1 convolution throughput (GFLOP/s, torch, the same threads), copy
bandwidth (GB/s), and a depthwise 3x3 convolution (GFLOP/s, bytes moved, FLOP/byte) to show
where the network's time goes and why it does not reach the dense peak; plus a per-layer
time breakdown of the float32 network (depthwise / pointwise / other convolutions).

    /work/bin/heavy 2 python benchmarks/extract_speed.py --calibration /work/cache/speed/training.txt \\
        --data-dir /work/cache/speed/data
Writes benchmarks/results/extract_speed.json and extract_speed.png.  ``--attach-map ROW=EVAL.json``
adds paris250 mAP values (from ``delf-es eval`` runs) to an existing result without re-measuring.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path("benchmarks/results")

#: name -> (settings overrides, options); options: threads, processes, old_padding, cpu_autocast, cap_s
ROWS: dict[str, tuple[dict, dict]] = {
    "torch-float32": ({"runtime": "torch", "precision": "float32"}, {}),
    "openvino-float32": ({"runtime": "openvino", "precision": "float32"}, {}),
    "openvino-int8": ({"runtime": "openvino", "precision": "int8"}, {}),
    "onnxruntime-float32": ({"runtime": "onnxruntime", "precision": "float32"}, {}),
    "torch-float32-2x1": ({"runtime": "torch", "precision": "float32"}, {"processes": 2}),
    "openvino-float32-2x1": ({"runtime": "openvino", "precision": "float32"}, {"processes": 2}),
    "openvino-int8-2x1": ({"runtime": "openvino", "precision": "int8"}, {"processes": 2}),
    "torch-float32-nchw": ({"runtime": "torch", "precision": "float32", "channels_last": False}, {"cap_s": 45}),
    "torch-float32-pad-copies": ({"runtime": "torch", "precision": "float32"}, {"old_padding": True, "cap_s": 45}),
    "torch-bfloat16-weights": ({"runtime": "torch", "precision": "bfloat16"}, {"cap_s": 45}),
    "torch-bfloat16-autocast": ({"runtime": "torch", "precision": "bfloat16"}, {"cpu_autocast": True, "cap_s": 45}),
    "torch-compile": ({"runtime": "torch", "precision": "float32", "torch_compile": True}, {"cap_s": 45}),
}
REFERENCE = "torch-float32"


# --------------------------------------------------------------------------- machine


def _best_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def machine_throughput(threads: int) -> dict:
    """Dense and depthwise convolution throughput and copy bandwidth, torch fp32 channels-last."""
    import torch
    from torch import nn

    torch.set_num_threads(threads)
    cl = torch.channels_last
    out = {"threads": threads}
    with torch.inference_mode():
        conv = nn.Conv2d(256, 256, 3, padding=1, bias=False).eval().to(memory_format=cl)
        x = torch.randn(1, 256, 96, 128).contiguous(memory_format=cl)
        out["dense3x3_gflops"] = 2 * 256 * 256 * 9 * 96 * 128 / _best_time(lambda: conv(x), 5) / 1e9
        conv = nn.Conv2d(720, 720, 1, bias=False).eval().to(memory_format=cl)
        x = torch.randn(1, 720, 64, 96).contiguous(memory_format=cl)
        out["pointwise720_gflops"] = 2 * 720 * 720 * 64 * 96 / _best_time(lambda: conv(x), 5) / 1e9
        big = torch.randn(64 * 1024 * 1024)  # 256 MB, far beyond the caches
        dst = torch.empty_like(big)
        out["copy_gb_per_s"] = 2 * big.numel() * 4 / _best_time(lambda: dst.copy_(big), 5) / 1e9
        # a depthwise 3x3 layer of the network's early stages: 144 channels at 256x192 (level 1.0 / 4)
        channels, h, w = 144, 256, 192
        depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False).eval().to(memory_format=cl)
        x = torch.randn(1, channels, h, w).contiguous(memory_format=cl)
        seconds = _best_time(lambda: depthwise(x), 10)
        flops, moved = 2 * 9 * channels * h * w, 2 * channels * h * w * 4  # read input + write output, fp32
        out["depthwise3x3"] = {
            "shape": [1, channels, h, w], "seconds": seconds, "gflops": flops / seconds / 1e9,
            "gb_per_s": moved / seconds / 1e9, "flop_per_byte": flops / moved,
            "roofline_gflops_at_copy_bandwidth": flops / moved * out["copy_gb_per_s"],
        }
        dense_flops, dense_moved = 2 * 256 * 256 * 9 * 96 * 128, 2 * 256 * 96 * 128 * 4 + 256 * 256 * 9 * 4
        out["dense3x3_flop_per_byte"] = dense_flops / dense_moved
    return out


# --------------------------------------------------------------------------- child


def child(spec: dict) -> None:
    """Time one row over its photos; write timings to spec['json'] and features to spec['npz']."""
    import torch

    threads = spec["threads"]
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    if spec.get("old_padding"):
        from delf_es.model import backbone

        backbone.pad_inside_convs = lambda root: None  # the F.pad copy before every SAME conv, as before
    from delf_es.features import Extractor
    from delf_es.imageio import load_image
    from delf_es.model.runtime import TorchLevels
    from delf_es.settings import Settings

    settings = Settings(**spec["settings"], torch_threads=threads, data_dir=spec["data_dir"],
                        model_cache_dir=Path(spec["data_dir"]) / "models", int8_calibration=spec.get("calibration"))
    start = time.perf_counter()
    extractor = Extractor(settings)
    if spec.get("cpu_autocast"):
        extractor.model.float()
        extractor.network = TorchLevels(extractor.model, extractor.device, extractor.runtime, cpu_autocast=True)
    init_s = time.perf_counter() - start
    pixels = [load_image(p, settings).pixels for p in spec["paths"]]
    level_times: dict[str, list[float]] = {}
    forward = extractor.network.forward_levels

    def timed(images, with_global):
        begin = time.perf_counter()
        result = forward(images, with_global)
        level_times.setdefault(f"{images.shape[-2]}x{images.shape[-1]}", []).append(time.perf_counter() - begin)
        return result

    extractor.network.forward_levels = timed
    begin = time.perf_counter()
    extractor.extract(pixels[0], "warm-up")
    warmup_s = time.perf_counter() - begin
    level_times.clear()
    times, feats = [], []
    for i, image in enumerate(pixels):
        begin = time.perf_counter()
        feats.append(extractor.extract(image, str(i)))
        times.append(time.perf_counter() - begin)
        if spec.get("cap_s") and sum(times) > spec["cap_s"] and len(times) >= 3:
            break
    np.savez(spec["npz"], **{f"{k}_{i}": getattr(f, k) for i, f in enumerate(feats)
                             for k in ("keypoints", "scales", "descriptors", "global_desc")})
    Path(spec["json"]).write_text(json.dumps({
        "runtime": extractor.runtime.name, "reason": extractor.runtime.reason, "model_id": extractor.model_id,
        "init_s": init_s, "warmup_s": warmup_s, "times": times, "wall_s": sum(times), "threads": threads,
        "level_s_median": {k: statistics.median(v) for k, v in level_times.items()},
    }))


def layer_profile(paths: list[str], threads: int, data_dir: str) -> dict:
    """Time and FLOPs of each kind of convolution in the torch float32 network (forward hooks)."""
    import torch
    from torch import nn

    from delf_es.features import Extractor
    from delf_es.imageio import load_image
    from delf_es.settings import Settings

    torch.set_num_threads(threads)
    settings = Settings(runtime="torch", precision="float32", torch_threads=threads, data_dir=data_dir)
    extractor = Extractor(settings)
    pixels = load_image(paths[0], settings).pixels
    extractor.extract(pixels, "warm-up")
    kinds: dict[str, dict] = {}
    starts: dict[int, float] = {}

    def kind_of(m: nn.Conv2d) -> str:
        if m.groups > 1 and m.groups == m.in_channels:
            return "depthwise"
        return "pointwise 1x1" if m.kernel_size == (1, 1) else "dense kxk (stem)"

    def pre(module, inputs):
        starts[id(module)] = time.perf_counter()

    def post(module, inputs, output):
        entry = kinds.setdefault(kind_of(module), {"seconds": 0.0, "flops": 0, "bytes": 0})
        entry["seconds"] += time.perf_counter() - starts[id(module)]
        kh, kw = module.kernel_size
        entry["flops"] += 2 * output.numel() * (module.in_channels // module.groups) * kh * kw
        entry["bytes"] += 4 * (inputs[0].numel() + output.numel())

    convs = [m for m in extractor.model.modules() if isinstance(m, nn.Conv2d)]
    handles = [m.register_forward_pre_hook(pre) for m in convs] + [m.register_forward_hook(post) for m in convs]
    begin = time.perf_counter()
    extractor.extract(pixels, "profile")
    total = time.perf_counter() - begin
    for handle in handles:
        handle.remove()
    conv_s = sum(k["seconds"] for k in kinds.values())
    for entry in kinds.values():
        entry["share_of_image_time"] = entry["seconds"] / total
        entry["gflops"] = entry["flops"] / entry["seconds"] / 1e9
        entry["gflop"] = entry["flops"] / 1e9
        entry["flop_per_byte"] = entry["flops"] / entry["bytes"]
    return {"image_s": total, "conv_s": conv_s, "other_s": total - conv_s, "kinds": kinds,
            "conv_gflop_per_image": sum(k["flops"] for k in kinds.values()) / 1e9}


# --------------------------------------------------------------------------- parent


def run_row(name: str, paths: list[str], args, work: Path) -> dict:
    overrides, options = ROWS[name]
    processes = options.get("processes", 1)
    threads = 1 if processes > 1 else args.threads
    halves = [paths[i::processes] for i in range(processes)]
    specs = []
    for index, half in enumerate(halves):
        specs.append({"settings": overrides, "threads": threads, "paths": half, "data_dir": args.data_dir,
                      "calibration": args.calibration, "old_padding": options.get("old_padding", False),
                      "cpu_autocast": options.get("cpu_autocast", False), "cap_s": options.get("cap_s"),
                      "json": str(work / f"{name}.{index}.json"), "npz": str(work / f"{name}.{index}.npz")})
    load_before = os.getloadavg()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.environ.get("PYTHONPATH", os.getcwd())}
    begin = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "--child", json.dumps(s)], env=env) for s in specs]
    rss_kb = []
    for proc in procs:
        while True:  # wait4 for the child's own peak RSS; a row that hangs is killed at the deadline
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - begin > args.row_timeout:
                proc.kill()
            time.sleep(0.5)
        proc.returncode = os.waitstatus_to_exitcode(status)
        rss_kb.append(usage.ru_maxrss)
    if any(p.returncode for p in procs):
        print(json.dumps({"row": name, "error": f"exit codes {[p.returncode for p in procs]}"}), flush=True)
        return {"row": name, "error": f"exit codes {[p.returncode for p in procs]} (timeout {args.row_timeout} s)"}
    parts = [json.loads(Path(s["json"]).read_text()) for s in specs]
    times = [t for part in parts for t in part["times"]]
    measured = sum(len(p["times"]) for p in parts)
    row = {
        "row": name, "runtime": parts[0]["runtime"], "model_id": parts[0]["model_id"], "reason": parts[0]["reason"],
        "processes": processes, "threads_per_process": threads, "photos_measured": measured,
        "seconds_per_image_median": statistics.median(times),
        "seconds_per_image_p90": sorted(times)[int(0.9 * (len(times) - 1))],
        "peak_rss_mb": sum(rss_kb) / 1024, "init_s": max(p["init_s"] for p in parts),
        "warmup_s": max(p["warmup_s"] for p in parts),
        "level_s_median": parts[0]["level_s_median"],
        "loadavg_before": [round(v, 2) for v in load_before], "loadavg_after": [round(v, 2) for v in os.getloadavg()],
    }
    if processes > 1:
        # throughput: both halves ran at once; the wall time includes model loading, so use the
        # slower half's extraction time (from its first timed photo to its last)
        row["latency_s_per_image_median"] = row["seconds_per_image_median"]
        row["seconds_per_image_median"] = max(p["wall_s"] for p in parts) / measured
        row["note"] = "seconds_per_image_median = throughput (slower half's extraction wall / photos); latency_* = per photo"
    row["_features"] = [np.load(s["npz"]) for s in specs]
    # photo index (in ``paths``) of each measured photo, in the order the archives hold them
    row["_order"] = [paths.index(p) for half, part in zip(halves, parts) for p in half[: len(part["times"])]]
    print(json.dumps({k: v for k, v in row.items() if not k.startswith("_")}), flush=True)
    return row


def features_by_photo(row: dict) -> dict[int, dict]:
    out = {}
    cursor = 0
    for archive in row["_features"]:
        count = len([k for k in archive.files if k.startswith("keypoints_")])
        for i in range(count):
            out[row["_order"][cursor]] = {k: archive[f"{k}_{i}"] for k in ("keypoints", "scales", "descriptors", "global_desc")}
            cursor += 1
    return out


def agreement(reference: dict[int, dict], other: dict[int, dict]) -> dict:
    """Share of the reference's keypoints (x, y, scale) the row kept, median cosine of those
    keypoints' descriptors, median cosine of the global descriptors (photos both measured)."""
    kept, cosines, globals_ = [], [], []
    for photo, ref in reference.items():
        if photo not in other:
            continue
        got = other[photo]
        index = {(round(float(x), 1), round(float(y), 1), float(s)): i
                 for i, ((x, y), s) in enumerate(zip(got["keypoints"], got["scales"]))}
        pairs = [(j, index[key]) for j, key in enumerate((round(float(x), 1), round(float(y), 1), float(s))
                                                         for (x, y), s in zip(ref["keypoints"], ref["scales"])) if key in index]
        kept.append(len(pairs) / max(1, len(ref["keypoints"])))
        cosines += [float(ref["descriptors"][j] @ got["descriptors"][i]) for j, i in pairs]
        globals_.append(float(ref["global_desc"] @ got["global_desc"]))
    return {"photos_compared": len(kept), "keypoints_kept_share_median": statistics.median(kept) if kept else None,
            "descriptor_cosine_median": statistics.median(cosines) if cosines else None,
            "global_cosine_median": statistics.median(globals_) if globals_ else None}


def attach_map(out_path: Path, pairs: list[str]) -> None:
    result = json.loads(out_path.read_text())
    for pair in pairs:
        name, path = pair.split("=", 1)
        evaluation = json.loads(Path(path).read_text())
        value = evaluation.get("mAP", evaluation.get("map"))
        for row in result["rows"]:
            if row["row"] == name or row["row"] == name + "-2x1":
                row["paris250_map"] = value
                row["paris250_map_source"] = path
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out_path.with_suffix(".png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", nargs="+", default=["../shared/data/paris250/db"])
    parser.add_argument("--num", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", nargs="+", default=list(ROWS))
    parser.add_argument("--data-dir", default="/work/cache/speed/data", help="where converted models are cached")
    parser.add_argument("--calibration", default="/work/cache/speed/training.txt",
                        help="INT8 calibration photos (the list of scripts/training_images.sh)")
    parser.add_argument("--out", default=str(RESULTS / "extract_speed.json"))
    parser.add_argument("--row-timeout", type=float, default=360, help="s; a row still running is killed")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--attach-map", nargs="+", metavar="ROW=EVAL.json")
    parser.add_argument("--table", action="store_true", help="print the result as a Markdown table (docs/extraction.md)")
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    if args.attach_map:
        attach_map(Path(args.out), args.attach_map)
        return
    if args.table:
        print(markdown_table(json.loads(Path(args.out).read_text())))
        return

    from delf_es.inputs import expand_inputs
    from delf_es.model.runtime import FLAGS_OF_INTEREST, cpu_flags

    paths = expand_inputs(args.images).sources
    step = max(1, len(paths) // args.num)
    paths = paths[::step][: args.num]
    load_start = os.getloadavg()
    machine = {f"{t}_threads": machine_throughput(t) for t in sorted({1, args.threads})}
    profile = layer_profile(paths, args.threads, args.data_dir)
    print(json.dumps({"machine": machine, "profile": profile}), flush=True)
    work = Path(tempfile.mkdtemp(prefix="extract_speed."))
    rows = [run_row(name, paths, args, work) for name in args.rows]
    reference = next((r for r in rows if r["row"] == REFERENCE and "error" not in r), None)
    peak = machine[f"{args.threads}_threads"]["dense3x3_gflops"]
    reference_features = features_by_photo(reference) if reference else {}
    for row in rows:
        if "error" in row:
            continue
        if reference:
            row["ratio_to_float32"] = row["seconds_per_image_median"] / reference["seconds_per_image_median"]
            row["speedup_vs_float32"] = 1 / row["ratio_to_float32"]
            row.update(agreement(reference_features, features_by_photo(row)))
        row["achieved_gflops"] = profile["conv_gflop_per_image"] / row["seconds_per_image_median"]
        row["fraction_of_dense_conv_peak"] = row["achieved_gflops"] / peak
        row.pop("_features"), row.pop("_order")
    import torch

    out = {
        "benchmark": "extract_speed",
        "command": "/work/bin/heavy 2 python " + " ".join(sys.argv),
        "images": f"{len(paths)} photos from {args.images} (every {step}th), longer side resized to 1024, 7 scales",
        "cpu": _cpu_name(), "cpu_flags": [f for f in FLAGS_OF_INTEREST if f in cpu_flags()],
        "platform": platform.platform(), "torch": torch.__version__, "versions": _versions(),
        "loadavg_start": [round(v, 2) for v in load_start], "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        "machine": machine, "layer_profile_torch_float32": profile, "dense_conv3x3_gflops": peak,
        "reference_row": REFERENCE,
        "calibration": f"INT8 calibrated on {args.calibration} (scripts/training_images.sh: Debian opencv-doc, "
                       "visp-images-data, scikit-image photos; every pyramid level), never paris250/pairs/distractors",
        "target": "<= 1.0 s per 1024 px image with 7 scales; >= 60% of the dense-conv throughput",
        "rows": rows,
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    plot(out, Path(args.out).with_suffix(".png"))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "openvino", "nncf", "onnxruntime", "onnx"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def markdown_table(result: dict) -> str:
    def number(value, digits=2):
        return "-" if value is None else f"{value:.{digits}f}"

    lines = ["| row | runtime | processes x threads | s / image (median) | p90 | ratio to float32 | peak RSS MB | "
             "keypoints kept | descriptor cosine | global cosine | share of dense-conv peak | paris250 mAP |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        if "error" in row:
            lines.append(f"| {row['row']} | {row['error']} |||||||||||")
            continue
        photos = "" if row["photos_measured"] >= 20 else f" ({row['photos_measured']} photos)"
        lines.append(
            f"| {row['row']} | {row['runtime']} | {row['processes']} x {row['threads_per_process']} | "
            f"{number(row['seconds_per_image_median'])}{photos} | {number(row['seconds_per_image_p90'])} | "
            f"{number(row.get('ratio_to_float32'))} | {row['peak_rss_mb']:.0f} | {number(row.get('keypoints_kept_share_median'), 3)} | "
            f"{number(row.get('descriptor_cosine_median'), 4)} | {number(row.get('global_cosine_median'), 4)} | "
            f"{number(row.get('fraction_of_dense_conv_peak'))} | {number(row.get('paris250_map'), 1)} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "error" not in r]
    fig, ax = plt.subplots(figsize=(11, 4.8))
    colours = ["#4477aa" if r["processes"] == 1 else "#228833" for r in rows]
    bars = ax.bar(range(len(rows)), [r["seconds_per_image_median"] for r in rows], color=colours)
    for bar, row in zip(bars, rows):
        label = f"{row.get('ratio_to_float32', 1):.2f}x"
        if row.get("paris250_map") is not None:
            label += f"\nmAP {row['paris250_map']:.1f}"
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="#cc3311", linestyle="--", label="target 1.0 s")
    ax.set_xticks(range(len(rows)), [r["row"].replace("-", "\n", 1) for r in rows], fontsize=7)
    ax.set_ylabel("s / image (median; green: 2 processes x 1 thread, throughput)")
    load = result["loadavg_start"]
    ax.set_title(f"EfficientNet-Lite2, 1024 px, 7 scales, {result['cpu']} ({','.join(result['cpu_flags'])}); "
                 f"load at start {load[0]:.2f}", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
