"""End-to-end ingest into the embedded index: ``delf-es index`` on N real paris250 photos, with
1 extraction process of 2 threads and with 2 processes of 1 thread each (Settings.extract_processes),
at the default extraction (EfficientNet-Lite2, 1024 px, 7 scales, PCA 40).

Images/s = photos / wall time of the whole command (start-up, model load, decode, extraction,
index writes and the final refresh included), each configuration into a fresh index.  The
converted network (OpenVINO/ONNX) is taken from ``--models`` so its one-time build is not timed.

    /work/bin/heavy 2 python benchmarks/ingest_embedded.py --photos 250 --models /work/cache/speed/data/models
Writes benchmarks/results/ingest_embedded.json (+ .png).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(paths: list[str], processes: int, threads: int, models: Path | None, env_extra: dict[str, str]) -> dict:
    data_dir = Path(tempfile.mkdtemp(prefix=f"ingest{processes}.", dir="/work/cache/speed" if Path("/work/cache/speed").is_dir() else None))
    listing = data_dir / "photos.txt"
    listing.write_text("\n".join(paths) + "\n")
    env = {**os.environ, **env_extra, "DELF_ES_DATA_DIR": str(data_dir), "DELF_ES_EXTRACT_PROCESSES": str(processes),
           "DELF_ES_TORCH_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    if models is not None:
        env["DELF_ES_MODEL_CACHE_DIR"] = str(models.resolve())
    for name in ("DELF_ES_ES_URL", "DELF_ES_REDIS_URL"):  # the embedded index, no Redis
        env.pop(name, None)
    load_before = os.getloadavg()
    begin = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "delf_es.cli", "index", f"@{listing}"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    wall = time.perf_counter() - begin
    stats = subprocess.run([sys.executable, "-m", "delf_es.cli", "stats"], env=env, capture_output=True, text=True)
    info = json.loads(stats.stdout) if stats.returncode == 0 else {"error": stats.stderr[-500:]}
    row = {
        "extract_processes": processes, "threads_per_process": threads, "photos": len(paths), "exit_code": proc.returncode,
        "wall_s": wall, "images_per_s": len(paths) / wall, "count_in_index": info.get("images"),
        "model_id": info.get("model_id"), "summary": err.strip().splitlines()[-1] if err.strip() else "",
        "loadavg_before": [round(v, 2) for v in load_before], "loadavg_after": [round(v, 2) for v in os.getloadavg()],
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default="../shared/data/paris250/db")
    parser.add_argument("--photos", type=int, default=250)
    parser.add_argument("--models", type=Path, default=None, help="converted-model cache (DELF_ES_MODEL_CACHE_DIR)")
    parser.add_argument("--configs", nargs="+", default=["2x1", "1x2"], help="PROCESSESxTHREADS")
    parser.add_argument("--runtime", default=None, help="DELF_ES_RUNTIME for the runs (default: the settings' default)")
    parser.add_argument("--precision", default=None)
    parser.add_argument("--calibration", default=None, help="DELF_ES_INT8_CALIBRATION")
    parser.add_argument("--out", default="benchmarks/results/ingest_embedded.json")
    args = parser.parse_args()

    from delf_es.cli.context import expand_inputs

    paths = sorted(expand_inputs([args.images]))[: args.photos]
    env_extra = {k: v for k, v in (("DELF_ES_RUNTIME", args.runtime), ("DELF_ES_PRECISION", args.precision),
                                   ("DELF_ES_INT8_CALIBRATION", args.calibration)) if v}
    load_start = os.getloadavg()
    rows = []
    for config in args.configs:
        processes, threads = (int(v) for v in config.split("x"))
        rows.append(run(paths, processes, threads, args.models, env_extra))
    out = {
        "benchmark": "ingest_embedded",
        "command": "/work/bin/heavy 2 python " + " ".join(sys.argv),
        "photos": f"{len(paths)} of {args.images} (sorted), 1024 px, 7 scales, default model",
        "runtime_env": env_extra or "settings defaults",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "loadavg_start": [round(v, 2) for v in load_start], "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        "target": ">= 0.8 images/s end to end on the 2 cores",
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
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.bar(range(len(rows)), [r["images_per_s"] for r in rows], color="#4477aa")
    ax.axhline(0.8, color="#cc3311", linestyle="--", label="target 0.8 images/s")
    ax.set_xticks(range(len(rows)), [f"{r['extract_processes']} process(es)\nx {r['threads_per_process']} thread(s)" for r in rows])
    ax.set_ylabel("images / s, end to end")
    ax.set_title(f"delf-es index, {rows[0]['photos']} paris250 photos, embedded index", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
