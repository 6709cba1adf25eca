"""Readers work while another process writes the embedded index; a second writer is refused
with an error naming the holder (issue 15 item 10).  Real processes, a real on-disk index."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from delf_es.errors import IndexLocked
from delf_es.index.base import ImageRecord
from delf_es.index.embedded import EmbeddedBackend
from delf_es.types import Features

pytestmark = pytest.mark.timeout(180)
REPO = Path(__file__).resolve().parents[2]
MODEL = "test-model@1"

WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    sys.path.insert(0, {tests!r})
    from test_embedded_concurrency import record
    from delf_es.index.embedded import EmbeddedBackend
    backend = EmbeddedBackend({directory!r})
    for line in sys.stdin:               # one write per line from the test, then an ack
        n = int(line)
        report = backend.upsert([record(f"w{{n}}", seed=n)])
        print("wrote", n, report.ok, flush=True)
    backend.close()
    """
)


def record(image_id: str, n: int = 20, seed: int = 0) -> ImageRecord:
    rng = np.random.default_rng(seed)

    def unit(rows, dims):
        x = rng.normal(size=(rows, dims)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    features = Features(image_id=image_id, model_id=MODEL, image_size=(320, 240),
                        keypoints=(rng.random((n, 2)) * 200).astype(np.float32), scales=np.ones(n, np.float32),
                        scores=np.ones(n, np.float32), descriptors=unit(n, 40), global_desc=unit(1, 16)[0])
    return ImageRecord(image_id, f"{image_id}.jpg", {}, features, "2026-12-01T00:00:00+00:00")


def _finds(backend, rec) -> bool:
    neighbours = backend.knn(rec.features.descriptors, 1)
    return bool(len(neighbours.image_ids)) and set(neighbours.image_ids.tolist()) == {rec.image_id}


def test_readers_work_while_another_process_writes_and_a_second_writer_is_told_who(tmp_path):
    directory = tmp_path / "index"
    with EmbeddedBackend(directory) as seed:
        seed.upsert([record("seed", seed=100)])
    writer = subprocess.Popen([sys.executable, "-c", WRITER.format(tests=str(REPO / "tests" / "unit"),
                                                                  directory=str(directory))],
                              cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        def write(n: int) -> None:
            writer.stdin.write(f"{n}\n")
            writer.stdin.flush()
            assert writer.stdout.readline().split() == ["wrote", str(n), "True"]

        write(1)  # the writer now holds the lock, for as long as it is open
        with EmbeddedBackend(directory) as reader:  # opening is never refused
            assert reader.count() == 2 and reader.existing(["seed", "w1"]) == {"seed", "w1"}
            assert _finds(reader, record("w1", seed=1)) and _finds(reader, record("seed", seed=100))
            with pytest.raises(IndexLocked) as refused:
                reader.upsert([record("mine", seed=7)])
            message = str(refused.value)
            assert f"PID {writer.pid}" in message and "-c" in message and "since" in message, message
            assert refused.value.holder["pid"] == writer.pid
            for n in (2, 3):  # the reader follows the writer's commits (snapshot per read)
                write(n)
                assert reader.count() == 1 + n and _finds(reader, record(f"w{n}", seed=n))
            assert "mine" not in reader.existing(["mine"])
        # a CLI reader in its own process while the writer still holds the lock
        stats = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
            import json
            from delf_es.index.embedded import EmbeddedBackend
            with EmbeddedBackend({str(directory)!r}) as b:
                print(json.dumps({{"count": b.count()}}))
            """)], capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert stats.returncode == 0 and json.loads(stats.stdout)["count"] == 4, stats.stderr
    finally:
        writer.stdin.close()
        writer.wait(timeout=60)
    with EmbeddedBackend(directory) as after:  # the writer is gone: anyone may write
        assert after.upsert([record("mine", seed=7)]).ok and after.count() == 5
