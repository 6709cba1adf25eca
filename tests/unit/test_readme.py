"""Every Python block of README.md runs as written (a newcomer copies them first).

Each ```python block runs in a fresh interpreter in an empty folder, with the embedded index in a
temporary data folder and every DELF_ES_* variable of the caller removed (a user's server settings
must not redirect it).  The model is the default one at two pyramid scales, to keep the run short;
the calls and their results' shape are what the README shows.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(text: str) -> list[str]:
    return BLOCK.findall(text)


def test_the_readme_has_python_blocks():
    assert python_blocks((ROOT / "README.md").read_text())


def test_block_extraction_finds_only_python_fences():
    text = "```bash\necho no\n```\n```python\nprint(1)\n```\n"
    assert python_blocks(text) == ["print(1)\n"]


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(python_blocks((ROOT / "README.md").read_text()))))
def test_readme_python_block_runs(index, tmp_path):
    code = python_blocks((ROOT / "README.md").read_text())[index]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELF_ES_")}
    env.update(
        DELF_ES_DATA_DIR=str(tmp_path / "data"), DELF_ES_SCALES="[0.7071, 1.0]", DELF_ES_GLOBAL_SCALES="[1.0]",
        DELF_ES_TORCH_THREADS="1", OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")])),
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"README block {index} failed:\n{code}\n--- stderr ---\n{proc.stderr[-4000:]}"
