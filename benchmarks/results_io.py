"""What every benchmark result file carries, written one way: the machine and its load, the JSON
file (rewritten after each row, so a run cut short keeps its rows), rows of other runs kept.

    result = {"benchmark": "x.py", "machine": machine(), "rows": kept_rows(out, lambda r: r["nodes"] != 3)}
    write_json(out, result)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"


def loadavg() -> float:
    """The 1-minute load average now."""
    return round(os.getloadavg()[0], 2)


def machine() -> dict[str, Any]:
    """The cores, the load averages (1, 5, 15 min) at the start, the OpenMP threads and the time."""
    return {"cpu_count": os.cpu_count(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S")}


def kept_rows(path: Path, keep: Callable[[dict], bool]) -> list[dict]:
    """The rows of an earlier result file at ``path`` that ``keep`` accepts (none if absent)."""
    if not path.exists():
        return []
    return [row for row in json.loads(path.read_text()).get("rows", []) if keep(row)]


def write_json(path: Path, result: dict[str, Any]) -> None:
    """Write ``result`` (indented, trailing newline), replacing the file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)
