"""Does the trained attention head select better keypoints than descriptor norms?

Runs the eval harness (``delf_es.eval.run.evaluate``, embedded backend, same search settings)
twice in one run -- keypoints scored by descriptor L2 norm (with its PCA) and by the shipped
trained head (with the PCA refitted on its keypoints) -- and joins the training record of the
head (time, per-epoch loss/accuracy).  Evaluation sets are never used for training or fitting.

    python benchmarks/attention_training.py --gt ../shared/data/paris250/gt.json \
        --distractors ../shared/data/distractors/wallpapers
Writes benchmarks/results/attention_training.json and .png, and the two eval results in
benchmarks/results/eval/.  Feature extraction is cached per model id (reused across runs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np

from delf_es.eval.run import evaluate
from delf_es.features import Extractor
from delf_es.model.delf import default_attention_path
from delf_es.settings import Settings

RESULTS = Path(__file__).resolve().parent / "results"


def run_eval(label: str, settings: Settings, gt: Path, distractors: list[Path], cache: Path) -> dict:
    load_before = os.getloadavg()
    started = time.perf_counter()
    extractor = Extractor(settings)
    result = evaluate(gt, distractors, settings, RESULTS / "eval", cache, label=label, extractor=extractor)
    return {
        "label": label,
        "scoring": extractor.meta.scoring,
        "model_id": result["model_id"],
        "pca": result["pca"]["fitted_on"] + f" ({result['pca']['scoring']} keypoints)" if result["pca"] else None,
        **{k: result[k] for k in ("mAP", "R@1", "R@5", "R@10", "extract_s_per_image_median", "extracted_this_run",
                                  "search_ms_median")},
        "mean_query_keypoints": float(np.mean([q["query_keypoints"] for q in result["per_query"]])),
        "per_query_ap": {q["query_id"]: q["ap"] for q in result["per_query"]},
        "wall_s": round(time.perf_counter() - started, 1),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }


def plot(summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = summary["training"]["history"]
    epochs = [r["epoch"] for r in history]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(epochs, [r["train_loss"] for r in history], label="train")
    axes[0].plot(epochs, [r["val_loss"] for r in history], label="held-out (images or views)")
    axes[0].set_title("cross-entropy")
    axes[1].plot(epochs, [r["train_acc"] for r in history], label="train")
    axes[1].plot(epochs, [r["val_acc"] for r in history], label="held-out (images or views)")
    axes[1].set_title("accuracy (landmark classes)")
    for axis in axes[:2]:
        axis.set_xlabel("epoch")
        axis.legend()
    runs = summary["runs"]
    axes[2].bar([r["label"].replace("scoring-", "") for r in runs], [r["mAP"] for r in runs],
                color=["lightgrey", "grey", "tab:orange"][-len(runs):])
    for index, run in enumerate(runs):
        axes[2].text(index, run["mAP"] + 0.5, f"{run['mAP']:.1f}", ha="center")
    axes[2].set_ylim(0, 100)
    axes[2].set_title("paris250 + 61 distractors, mAP")
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gt", type=Path, required=True)
    parser.add_argument("--distractors", type=Path, action="append", default=[])
    parser.add_argument("--head", type=Path, default=default_attention_path("efficientnet-lite2", "expand"))
    parser.add_argument("--cache", type=Path, default=None, help="feature cache (default: <data_dir>/features)")
    parser.add_argument("--out", type=Path, default=RESULTS / "attention_training.json")
    parser.add_argument("--config", type=Path, default=None,
                        help="JSON settings overrides for both compared runs (e.g. a cheaper pyramid)")
    parser.add_argument("--reference-cache", type=Path, default=None,
                        help="also score norm at default settings from this (already filled) feature cache")
    args = parser.parse_args()
    overrides = json.loads(args.config.read_text()) if args.config else {}
    base = Settings(es_url=None, redis_url=None, **overrides)
    # the feature cache is keyed by model id only: other extraction settings need their own folder
    cache = args.cache or base.data_dir / "features"
    head_record = json.loads(args.head.with_suffix(".json").read_text())
    suffix = f"-{args.config.stem}" if args.config else ""
    runs = []
    if args.reference_cache:
        reference = Settings(es_url=None, redis_url=None, scoring="norm")
        runs.append(run_eval("scoring-norm-default", reference, args.gt, args.distractors, args.reference_cache))
    runs += [
        run_eval(f"scoring-norm{suffix}", base.model_copy(update={"scoring": "norm"}), args.gt, args.distractors, cache),
        run_eval(f"scoring-attention{suffix}", base.model_copy(update={"scoring": "attention", "attention_weights": args.head}),
                 args.gt, args.distractors, cache),
    ]
    norm, trained = runs[-2:]
    deltas = [trained["per_query_ap"][q] - ap for q, ap in norm["per_query_ap"].items()]
    summary = {
        "what": "mAP with keypoints scored by descriptor norm vs by the trained attention head (same run, same search settings)",
        "gt": str(args.gt),
        "distractors": [str(d) for d in args.distractors],
        "settings_overrides_of_compared_runs": overrides,
        "training": {
            "head": str(args.head),
            "data": head_record.get("data"),
            "images": head_record.get("images"),
            "background_images": head_record.get("background_images"),
            "views": head_record.get("views"),
            "config": head_record.get("config"),
            "train_seconds": head_record.get("train_seconds"),
            "view_cache_seconds": head_record.get("view_cache_seconds"),
            "torch_threads": head_record.get("torch_threads"),
            "loadavg_start": head_record.get("loadavg_start"),
            "history": head_record.get("history"),
        },
        "runs": runs,
        "mAP_delta_trained_minus_norm": trained["mAP"] - norm["mAP"],
        "queries_better_worse_same": [sum(d > 1e-9 for d in deltas), sum(d < -1e-9 for d in deltas),
                                      sum(abs(d) <= 1e-9 for d in deltas)],
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
    }
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, args.out.with_suffix(".png"))
    print(json.dumps({k: summary[k] for k in ("mAP_delta_trained_minus_norm", "queries_better_worse_same")} |
                     {r["label"]: r["mAP"] for r in runs}, indent=2))


if __name__ == "__main__":
    main()
