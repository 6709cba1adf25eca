"""Ctrl-C and SIGTERM during `delf-es index` save what was extracted and say how much (issue 15
item 3); a resumed run finishes the rest without duplicates.  A real subprocess, real model,
embedded index in a temporary folder."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]
PHOTOS = 12


def _photos(folder, count=6, side=256):
    from skimage import data

    base = data.astronaut()
    folder.mkdir()
    for i in range(count):
        crop = np.ascontiguousarray(np.roll(base, 37 * i, axis=1)[:side, :side])
        Image.fromarray(crop).save(folder / f"{i:02d}.png")
    return folder


def _sigint_as_at_a_terminal() -> None:
    # A job a non-interactive shell starts in the background (`cmd &`, some CI runners) inherits
    # SIGINT ignored, and Python then keeps it ignored: the command would never see this Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _index(folder, env):
    return subprocess.Popen([sys.executable, "-m", "delf_es.cli", "-v", "index", str(folder)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigint_as_at_a_terminal)


def _env(tmp_path):
    # a commit after every image: the first "committed" line comes while most photos are still to
    # do, so the signal always finds work in progress (with 1 s batches, six small photos could all
    # land in one commit and the command finish before the signal arrived)
    env = {**os.environ, "DELF_ES_DATA_DIR": str(tmp_path / "index"), "DELF_ES_TORCH_THREADS": "1",
           "OMP_NUM_THREADS": "1", "COLUMNS": "200", "DELF_ES_COMMIT_SECONDS": "0"}
    env.pop("DELF_ES_ES_URL", None)
    env.pop("DELF_ES_REDIS_URL", None)
    return env


def _count(tmp_path) -> int:
    from delf_es.index.embedded import EmbeddedBackend

    with EmbeddedBackend(tmp_path / "index" / "delf-images") as backend:
        return backend.count()


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_index_saves_what_it_extracted_and_says_so(tmp_path, stop):
    folder = _photos(tmp_path / "photos", count=PHOTOS)
    env = _env(tmp_path)
    process = _index(folder, env)
    committed: list[str] = []
    for line in process.stderr:  # wait until at least one image is committed, then interrupt
        if "committed" in line:
            committed.append(line)
            process.send_signal(stop)
            break
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    match = re.search(r"interrupted: (\d+) image\(s\) saved in this run, (\d+) in the index", err)
    assert match, err
    saved = int(match.group(1))
    assert 1 <= saved < PHOTOS and int(match.group(2)) == saved == _count(tmp_path)
    assert "Traceback" not in err
    # the rerun resumes: the rest is indexed, nothing twice
    done = subprocess.run([sys.executable, "-m", "delf_es.cli", "index", str(folder)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{PHOTOS - saved} indexed, {saved} already there" in done.stderr and _count(tmp_path) == PHOTOS


def test_a_ctrl_c_after_the_last_commit_is_reported_with_everything_saved(tmp_path, monkeypatch):
    # In process, with the real model and embedded index; the Ctrl-C is simulated by the final
    # refresh raising KeyboardInterrupt (the moment a signal once slipped past the report).
    from delf_es.errors import Interrupted
    from delf_es.sdk import DelfEs
    from delf_es.settings import Settings

    folder = _photos(tmp_path / "photos", count=1, side=128)
    settings = Settings(data_dir=tmp_path / "index", backend="embedded", es_url=None, redis_url=None,
                        extract_processes=1, torch_threads=1)
    with DelfEs(settings) as sdk:
        def ctrl_c() -> None:
            raise KeyboardInterrupt

        monkeypatch.setattr(sdk.backend, "refresh", ctrl_c)
        with pytest.raises(Interrupted) as stop:
            sdk.bulk_add([str(folder / "00.png")], progress=False)
        assert len(stop.value.report.succeeded) == 1 and sdk.count() == 1
