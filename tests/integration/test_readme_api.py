"""The README's curl examples (the bash block of "HTTP API & page") run as written against a real
``delf-es serve`` (embedded index, fast Lite0 settings), each curl exiting 0 (``-f``: no HTTP
error) in a folder holding the photos they name."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from api_server import FAST_ENV, Server
from conftest import shared

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "readme-token"
FILES = {  # the names the README's commands use
    "photo.jpg": "paris250/db/louvre/paris_louvre_000004.jpg",
    "a.jpg": "paris250/db/eiffel_tower/paris_eiffel_000000.jpg",
    "b.jpg": "paris250/db/defense/paris_defense_000000.jpg",
    "query.jpg": "paris250/db/louvre/paris_louvre_000004.jpg",
}


def curl_lines() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## HTTP API & page"):]
    block = re.search(r"^```bash\n(.*?)^```", section, re.S | re.M).group(1)
    return [line for line in block.splitlines() if line.startswith(("curl ", "AUTH="))]


def test_the_readme_shows_the_api_with_curl():
    lines = curl_lines()
    assert sum(line.startswith("curl ") for line in lines) >= 8
    assert all("-sf" in line for line in lines if line.startswith("curl "))


def test_readme_curl_examples_run(tmp_path):
    for name, path in FILES.items():
        (tmp_path / name).write_bytes(shared(path).read_bytes())
    server = Server({**FAST_ENV, "DELF_ES_DATA_DIR": str(tmp_path / "data")}, tmp_path / "serve.log", token=TOKEN)
    try:
        server.wait_ready()
        env = {**os.environ, "DELF_ES_API_TOKEN": TOKEN}
        outputs = []
        prelude = ""
        for line in curl_lines():
            if line.startswith("AUTH="):
                prelude = line + "\n"
                continue
            command = line.replace("localhost:8080", f"127.0.0.1:{server.port}")
            proc = subprocess.run(["bash", "-c", prelude + command], cwd=tmp_path, env=env, capture_output=True,
                                  text=True, timeout=300)
            assert proc.returncode == 0, f"{line}\nexit {proc.returncode}: {proc.stderr}\n{server.log()}"
            outputs.append(proc.stdout)
        assert json.loads(outputs[0])["status"] == "ok"
        searches = [json.loads(out) for line, out in zip([l for l in curl_lines() if l.startswith("curl")], outputs)
                    if "/v1/search" in line]
        assert searches[0]["hits"][0]["id"] == "photo.jpg" and searches[0]["hits"][0]["matches"]
        assert (tmp_path / "thumbnail.jpg").read_bytes()[:2] == b"\xff\xd8"
    finally:
        server.stop()
