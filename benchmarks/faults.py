"""The fault test at full size (issue 13 item 4) -> benchmarks/results/faults.json.

    /work/bin/heavy 2 python3 benchmarks/faults.py [--photos 500] [--out benchmarks/results/faults.json]

500 small distinct real photos (benchmarks/fault_photos.py: paris250 + distractor wallpapers, two
variants each, <= 256 px) ingested by two ``delf-es worker`` processes into a 3-node cluster (3
shards, 1 replica) while an Elasticsearch node is SIGKILLed and restarted, a worker is SIGKILLed and
replaced and Redis (append-only) is restarted, and a client searches all along
(benchmarks/fault_run.py says how).  The same run, with fewer photos, is the integration test
tests/integration/test_faults.py.  Ports: Elasticsearch 9290-9292 (transport 10390-10392), Redis
6396, services home /work/cache/services-faults (the options change them).  Exit code 1 when a
photo is lost, duplicated or broken, a search failed, or the cluster is not green.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fault_photos import derive, queries  # noqa: E402
from fault_run import MODEL, FaultPlan, run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return head + ("-dirty" if dirty else "")


def ok(result: dict) -> bool:
    return (result.get("finished") and result.get("lost") == 0 and result.get("duplicated") == 0
            and result.get("broken") == 0 and result.get("indexed_once") == result.get("photos")
            and result.get("searches_failed") == 0 and result.get("cluster_status") == "green"
            and not result.get("faults_not_fired"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=500)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "faults.json")
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data", help="the shared data folder")
    parser.add_argument("--work", type=Path, default=Path("/work/cache/faults"))
    parser.add_argument("--services-home", type=Path, default=Path("/work/cache/services-faults"))
    parser.add_argument("--es-port", type=int, default=9290)
    parser.add_argument("--redis-port", type=int, default=6396)
    parser.add_argument("--timeout", type=float, default=1800.0, help="s the ingest may take at most")
    parser.add_argument("--keep-services", action="store_true", help="leave the services running (dev loops)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("elastic_transport").setLevel(logging.ERROR)  # one line per request otherwise
    photos = derive(args.work / "photos", args.photos, args.shared)
    plan = FaultPlan(photos=photos, queries=queries(args.work / "queries", args.shared), work=args.work / f"run-{int(time.time())}",
                     services_home=args.services_home, es_port=args.es_port, redis_port=args.redis_port,
                     timeout=args.timeout, keep_services=args.keep_services)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result = run(plan)
    result = {"photos": result.pop("photos", len(photos)), **result, "started": started, "commit": commit(),
              "model": {k: list(v) if isinstance(v, tuple) else v for k, v in MODEL.items()},
              "photos_source": "paris250 db + distractor wallpapers, 2 variants each (whole, centred 60% crop), "
                               "<= 256 px, pixels checked distinct", "logs": str(plan.work)}
    result["ok"] = bool(ok(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result.get(k) for k in ("photos", "indexed_once", "lost", "duplicated", "broken",
                                                  "searches", "searches_failed", "cluster_status", "ok")}))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
