"""Hostile-user sweep and kill -9 rounds (issue 15): does every mistake get a typed one-line error,
and does a crash ever lose, duplicate or half-write an image?

Part 1, hostile inputs (>= 250): CLI commands (typer's runner, in a worker process) and SDK calls
with bad options, bad DELF_ES_* values, bad files (FIFO, device, directory, corrupt, lying
headers, over-long names, markup in names), bad ids, metadata and filters (hand-written and
generated from a seeded random pool of hostile fragments), and service outages (a dead
Elasticsearch / Redis port).  Each case has an expectation: ``error`` (must be refused with a
typed error) or ``ok`` (must work) or ``either`` (generated: either is right, but never a
traceback).  Outcomes:

* ``typed_error``: CLI exit code 1/2 with an ``error:``/``failed``/``skipped`` line and no
  traceback; SDK raised a DelfEsError (or its Interrupted);
* ``correct``: worked, and the expectation was ``ok`` or ``either``;
* ``wrongly_accepted``: worked although the expectation was ``error``;
* ``traceback``: a traceback was printed, or the SDK raised anything but a DelfEsError;
* ``hang``: no answer within ``--case-timeout`` s (the worker is killed with SIGKILL and restarted).

Part 2, kill -9: an ``index`` run of ``--kill-images`` small photos (256 px, so extraction takes
about a second each with the default model and the default commit interval is exercised; the
default model otherwise) in an embedded index is killed with SIGKILL at a random moment
(``--kills`` times, resuming each time), then finished.  The run logs every commit
(``-v``: "committed N image(s): [ids]"), so after each kill we know what was reported saved.
Measured: images reported saved but missing (target 0), finished-but-uncommitted work lost per
kill (images whose extraction had completed, by the log, minus those committed; target <= 1),
duplicates (rows per id) and half-written images (keypoints / descriptors / global descriptor
missing or of the wrong shape; target 0).

    /work/bin/heavy 1 python benchmarks/robustness.py   -> benchmarks/results/robustness.json (+ .png)
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import pickle
import random
import re
import select
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--backbone", "efficientnet-lite0", "--scales", "1.0"]


# ----------------------------------------------------------------------------- fixtures


def _write_fixtures(folder: Path) -> dict[str, str]:
    """Small real images and hostile files; returns name -> path."""
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    photo = data.astronaut()
    paths: dict[str, str] = {}

    def save(name: str, array) -> None:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(array)).save(path)
        paths[name] = str(path)

    save("good.png", photo[:128, :128])
    save("good2.jpg", photo[100:228, 200:328])
    save("a/img.jpg", photo[:96, :96])
    save("b/img.jpg", photo[200:296, 200:296])
    save("photo[red].png", photo[:96, 100:196])
    save("[bold]x.png", photo[50:146, 50:146])
    save("blank.png", np.full((128, 128, 3), 255, np.uint8))
    transparent = folder / "transparent.png"
    Image.fromarray(np.zeros((128, 128, 4), np.uint8), "RGBA").save(transparent)
    paths["transparent.png"] = str(transparent)
    buffer = io.BytesIO()
    Image.fromarray(photo[:288, :384]).save(buffer, "JPEG")
    good_jpeg = buffer.getvalue()
    lie = bytearray(good_jpeg)
    i = 2
    while i < len(lie):
        marker, length = lie[i + 1], int.from_bytes(lie[i + 2:i + 4], "big")
        if marker in (0xC0, 0xC2):
            lie[i + 5:i + 9] = (7000).to_bytes(2, "big") + (9000).to_bytes(2, "big")
            break
        i += 2 + length
    specials = {
        "lie.jpg": bytes(lie), "truncated.jpg": good_jpeg[: len(good_jpeg) // 2], "empty.jpg": b"",
        "text.png": b"not an image at all", "html.jpg": b"<html><body>hi</body></html>",
        "zeros.png": b"\x00" * 4096, "tiny.png": _png_bytes(8, 8), "huge-header.png": _png_header(100000, 100000),
        "svg.png": b'<svg xmlns="http://www.w3.org/2000/svg"/>',
    }
    for name, content in specials.items():
        (folder / name).write_bytes(content)
        paths[name] = str(folder / name)
    os.mkfifo(folder / "fifo.jpg")
    paths["fifo.jpg"] = str(folder / "fifo.jpg")
    (folder / "dir.jpg").mkdir()
    paths["dir.jpg"] = str(folder / "dir.jpg")
    mixed = folder / "mixed"
    mixed.mkdir()
    Image.fromarray(photo[:96, :96]).save(mixed / "ok.png")
    os.mkfifo(mixed / "pipe.jpg")
    (mixed / "bad.jpg").write_bytes(b"junk")
    paths["mixed"] = str(mixed)
    os.symlink(folder, folder / "loop")
    (folder / "list.txt").write_text(f"{paths['good.png']}\n\n{paths['good2.jpg']}\n")
    paths["list.txt"] = str(folder / "list.txt")
    (folder / "list-bad.txt").write_bytes(b"\xff\xfe\x00garbage")
    paths["list-bad.txt"] = str(folder / "list-bad.txt")
    os.mkfifo(folder / "list-fifo.txt")
    paths["list-fifo.txt"] = str(folder / "list-fifo.txt")
    (folder / "file-not-dir").write_text("x")
    paths["file-not-dir"] = str(folder / "file-not-dir")
    return paths


def _png_bytes(width: int, height: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 100, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _png_header(width: int, height: int) -> bytes:
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


# ----------------------------------------------------------------------------- cases

HOSTILE_FRAGMENTS = ["", " ", "-1", "0", "1e999", "nan", "-inf", "NaN", "999999999999", "[", "]", "{", "}", "\"", "'",
                     "\\", "/", "..", "\x00", "\n", "é", "𝔘", "[red]", "[/", ",", ",,", "null", "true", "0x10", "1_0",
                     "%s", "$(id)", ";", "|", "*", "?", "~", "a" * 300]


def _generated(rng: random.Random, count: int) -> list[str]:
    out = []
    for _ in range(count):
        out.append("".join(rng.choice(HOSTILE_FRAGMENTS) for _ in range(rng.randint(1, 3))))
    return out


def _json_generated(rng: random.Random, count: int) -> list[str]:
    atoms = ['1', '"x"', 'null', 'true', '[]', '{}', '-1e400', 'NaN', '"metadata.a"', '{"term": {}}',
             '{"term": {"metadata.a": [1]}}', '{"range": {"a": {"gt": "x"}}}', '{"bool": {"must": 5}}',
             '{"wildcard": {"a": "*"}}', '{"exists": {"field": ""}}', '{"terms": {"a": 7}}', '{"match_all": {}}']
    out = []
    for _ in range(count):
        text = rng.choice(atoms)
        for _ in range(rng.randint(0, 2)):
            text = rng.choice(['{"bool": {"filter": [%s]}}', '[%s]', '{"a": %s}', '%s', '{"must_not": %s}']) % text
        if rng.random() < 0.2:
            text = text[: rng.randint(0, len(text))]
        out.append(text)
    return out


def build_cases(paths: dict[str, str], rng: random.Random) -> list[dict]:
    """Every case: {"id", "kind": cli|sdk, "args"/"call", "env", "expect": error|ok|either}."""
    p = paths
    cases: list[dict] = []

    def cli(case_id: str, args: list[str], expect: str = "error", env: dict | None = None, fast: bool = True) -> None:
        cases.append({"id": case_id, "kind": "cli", "args": (FAST if fast else []) + args, "env": env or {},
                      "expect": expect})

    def sdk(case_id: str, call: str, args: list, kwargs: dict | None = None, expect: str = "error",
            env: dict | None = None) -> None:
        cases.append({"id": case_id, "kind": "sdk", "call": call, "args": args, "kwargs": kwargs or {},
                      "env": env or {}, "expect": expect})

    # --- global options ---------------------------------------------------------------
    for value in ["-5", "0", "abc", "", "1.5", "99999999999999999999"]:
        cli(f"--max-features {value!r}", ["--max-features", value, "extract", p["good.png"], "--out", "{tmp}/f"], fast=False)
    for value in ["", "a,b", "0", "-1", "1,,2", "nan", "inf", "0.5,-0.5", "1e-400"]:
        cli(f"--scales {value!r}", ["--scales", value, "extract", p["good.png"], "--out", "{tmp}/f"], fast=False)
    for value in ["cuda", "cuda:7", "tpu", "", "cpu:0:1", "mps"]:
        cli(f"--device {value!r}", ["--device", value, "extract", p["good.png"], "--out", "{tmp}/f"])
    for value in ["bogus", "", "resnet50"]:  # resnet50 needs --backbone-weights: an error too
        cli(f"--backbone {value!r}", ["--backbone", value, "extract", p["good.png"], "--out", "{tmp}/f"], fast=False)
    for value in ["bogus", ""]:
        cli(f"--scoring {value!r}", ["--scoring", value, "extract", p["good.png"], "--out", "{tmp}/f"])
    for name in ["fifo.jpg", "dir.jpg", "text.png"]:
        cli(f"--pca {name}", ["--pca", p[name], "extract", p["good.png"], "--out", "{tmp}/f"])
        cli(f"--attention-weights {name}", ["--attention-weights", p[name], "--scoring", "attention", "extract",
                                             p["good.png"], "--out", "{tmp}/f"])
    cli("--pca missing", ["--pca", "/nonexistent/pca.npz", "extract", p["good.png"], "--out", "{tmp}/f"])
    cli("--backbone-weights /dev/zero", ["--backbone-weights", "/dev/zero", "extract", p["good.png"], "--out", "{tmp}/f"])
    for value in _generated(rng, 12):
        cli(f"gen --max-features {value!r}", ["--max-features", value, "stats"],
            expect="ok" if value.isdigit() and int(value) >= 1 else "either")
    for value in _generated(rng, 12):
        cli(f"gen --scales {value!r}", ["--scales", value, "stats"], expect="either", fast=False)

    # --- DELF_ES_* values -------------------------------------------------------------
    bad_env = {
        "DELF_ES_SHORTLIST_MODE": ["bogus", ""], "DELF_ES_CORRESPONDENCES": ["x"], "DELF_ES_RANK_BY": ["y"],
        "DELF_ES_RANSAC_MODEL": ["z"], "DELF_ES_MAX_FEATURE_NUM": ["-1", "0", "x"], "DELF_ES_SCALES": ["abc", "[]", "[-1]"],
        "DELF_ES_RANSAC_PX": ["-3", "nan"], "DELF_ES_MAX_PIXELS": ["0"], "DELF_ES_MIN_IMAGE_SIDE": ["-1"],
        "DELF_ES_URL_TIMEOUT": ["0"], "DELF_ES_TORCH_THREADS": ["-1"], "DELF_ES_SHORTLIST_SIZE": ["0"],
        "DELF_ES_KNN_K": ["0"], "DELF_ES_MIN_INLIERS": ["-1"], "DELF_ES_ID_FROM": ["name"],
        "DELF_ES_COMMIT_SECONDS": ["-1"], "DELF_ES_DEVICE": ["cuda", "gpu"], "DELF_ES_DATA_DIR": ["/proc/nope", "/dev/null"],
        "DELF_ES_ES_URL": ["localhost:9200", "ftp://x", "http://127.0.0.1:99999"],
        "DELF_ES_REDIS_URL": ["http://127.0.0.1:6379", "redis://"], "DELF_ES_USE_PCA": ["maybe"],
        "DELF_ES_MAX_FILE_BYTES": ["0"], "DELF_ES_VERIFY_THREADS": ["0"], "DELF_ES_ES_TIMEOUT": ["-1"],
        "DELF_ES_WORKER_REINDEX_SCHEDULE": ["every day"], "DELF_ES_KNN_MIN_SIMILARITY": ["2"],
        "DELF_ES_MIN_INLIER_SPREAD": ["-1"], "DELF_ES_MIN_KEYPOINT_CONTRAST": ["-2"],
    }
    for name, values in bad_env.items():
        for value in values:
            cli(f"{name}={value!r}", ["search", p["good.png"]], env={name: value}, fast=False)
    cli("DELF_ES_MAX_FEATURES=3 (typo)", ["stats"], expect="ok", env={"DELF_ES_MAX_FEATURES": "3"})

    # --- files -------------------------------------------------------------------------
    bad_files = ["fifo.jpg", "dir.jpg", "lie.jpg", "truncated.jpg", "empty.jpg", "text.png", "html.jpg", "zeros.png",
                 "tiny.png", "huge-header.png", "svg.png"]
    for name in bad_files:
        for command in ("extract", "index", "search", "match"):
            args = {"extract": ["extract", p[name], "--out", "{tmp}/f"], "index": ["index", p[name]],
                    "search": ["search", p[name]], "match": ["match", p[name], p["good.png"], "--out", "{tmp}/m.png"]}[command]
            cli(f"{command} {name}", args)
        sdk(f"sdk add_image {name}", "add_image", [p[name]])
        sdk(f"sdk search_image {name}", "search_image", [p[name]])
    for missing in ["/nonexistent.jpg", "{tmp}/" + "x" * 300 + ".jpg", "relative/missing.png", "/dev/zero", "/dev/null",
                    "/proc/self/mem", "/etc/shadow"]:
        cli(f"index {missing[:40]}", ["index", missing])
        sdk(f"sdk add_image {missing[:40]}", "add_image", [missing])
    cli("index @missing.txt", ["index", "@/nonexistent/list.txt"])
    cli("index @list-fifo.txt", ["index", "@" + p["list-fifo.txt"]])
    cli("index @list-bad.txt", ["index", "@" + p["list-bad.txt"]])
    cli("index @list.txt", ["index", "@" + p["list.txt"]], expect="ok")
    cli("index folder with a FIFO and junk", ["index", p["mixed"]], expect="error")  # exit 1: two failed, one indexed
    cli("extract a/img.jpg b/img.jpg", ["extract", p["a/img.jpg"], p["b/img.jpg"], "--out", "{tmp}/same-stem"], expect="ok")
    cli("extract --out a file", ["extract", p["good.png"], "--out", p["file-not-dir"]])
    cli("extract --out under a file", ["extract", p["good.png"], "--out", p["file-not-dir"] + "/sub"])
    cli("extract --out /proc", ["extract", p["good.png"], "--out", "/proc/nope"])
    cli("extract photo[red].png", ["extract", p["photo[red].png"], "--out", "{tmp}/markup"], expect="ok")
    cli("extract [bold]x.png", ["extract", p["[bold]x.png"], "--out", "{tmp}/markup2"], expect="ok")
    cli("index good.png three spellings", ["index", p["good.png"], p["good.png"].replace("/good.png", "/./good.png"),
                                           p["good.png"].replace("/good.png", "//good.png")], expect="ok")
    cli("search --show under a file", ["search", p["good.png"], "--show", p["file-not-dir"] + "/x.png"])
    cli("attention --scale -1", ["attention", p["good.png"], "--scale", "-1", "--out", "{tmp}/a.png"])
    cli("attention --scale 0", ["attention", p["good.png"], "--scale", "0", "--out", "{tmp}/a.png"])
    cli("fit-pca --dims 0", ["fit-pca", p["good.png"], "--out", "{tmp}/p.npz", "--dims", "0"])
    cli("fit-pca --dims -3", ["fit-pca", p["good.png"], "--out", "{tmp}/p.npz", "--dims", "-3"])
    cli("fit-pca --max-per-image 0", ["fit-pca", p["good.png"], "--out", "{tmp}/p.npz", "--max-per-image", "0"])
    cli("match --model bogus", ["match", p["good.png"], p["good2.jpg"], "--model", "bogus"])
    cli("eval missing gt", ["eval", "/nonexistent/gt.json", "--out", "{tmp}/e"])
    cli("eval gt is a FIFO", ["eval", p["fifo.jpg"], "--out", "{tmp}/e"])
    cli("eval gt not JSON", ["eval", p["text.png"], "--out", "{tmp}/e"])
    cli("eval --backend bogus", ["eval", p["text.png"], "--backend", "bogus"])
    cli("eval --config missing", ["eval", p["text.png"], "--config", "/nonexistent.json"])
    cli("delete unknown id", ["delete", "no-such-id"])
    cli("delete empty id", ["delete", ""])
    cli("delete over-long id", ["delete", "x" * 600])

    # --- search options ----------------------------------------------------------------
    for value in ["-1", "0", "abc", ""]:
        cli(f"search --limit {value!r}", ["search", p["good.png"], "--limit", value])
    for value in ["nope", "[]", "1", '"x"', "{", '{"wildcard": {"a": "*"}}', '{"term": {}}', '{"script": {}}',
                  '{"bool": {"must": 5}}', '{"range": {"a": {"near": 1}}}', "[" * 5000]:
        cli(f"search --filter {value[:30]!r}", ["search", p["good.png"], "--filter", value])
    for value in _json_generated(rng, 25):
        cli(f"gen search --filter {value[:40]!r}", ["search", p["good.png"], "--filter", value], expect="either")
    for value in ["nope", "[1]", "1", '{"": 1}', '{"a": NaN}', '{"a": Infinity}', "{" * 3000]:
        cli(f"index --metadata {value[:30]!r}", ["index", p["good.png"], "--metadata", value])
    for value in _json_generated(rng, 15):
        cli(f"gen index --metadata {value[:40]!r}", ["index", p["good2.jpg"], "--metadata", value], expect="either")

    # --- SDK arguments -------------------------------------------------------------------
    for limit in [-1, 0, "5", 2.5, True, None]:
        sdk(f"sdk search limit={limit!r}", "search_image", [p["good.png"]], {"limit": limit})
    for value in [-1, "3", 1.5]:
        sdk(f"sdk search min_inliers={value!r}", "search_image", [p["good.png"]], {"min_inliers": value})
    for value in ["nope", 5, ["a"], {"wildcard": {"a": "*"}}, {"term": {}}, {"bool": {"must": 5}}]:
        sdk(f"sdk search pre_filter={str(value)[:30]}", "search_image", [p["good.png"]], {"pre_filter": value})
    for value in [{"": 1}, {1: 2}, {"a": float("nan")}, {"a": b"bytes"}, {"a": {1, 2}}, "string", ["list"], {"a": object()}]:
        sdk(f"sdk add metadata={str(value)[:30]}", "add_image", [p["good.png"]], {"metadata": value})
    for name in ["", "x" * 600, "\udcff", None, 5, b"bytes-without-bytestream", ["a"]]:
        sdk(f"sdk add name={str(name)[:20]!r}", "add_image", [name], {"img": p["good.png"]} if isinstance(name, str) else {})
    for value in [b"", b"garbage", b"\x89PNG\r\n\x1a\n", "not-bytes"]:
        sdk(f"sdk add bytestream {str(value)[:20]}", "add_image", [value], {"bytestream": True})
    for image_id in ["", "no-such", "x" * 600, None, 7]:
        sdk(f"sdk get_image {str(image_id)[:20]!r}", "get_image", [image_id])
        sdk(f"sdk delete_image {str(image_id)[:20]!r}", "delete_image", [image_id])
    for items in [[5], [None], [("a",)], [{"nopath": 1}], [{"path": p["fifo.jpg"]}], [(p["good.png"], "notadict")]]:
        sdk(f"sdk bulk_add {str(items)[:40]}", "bulk_add", [items], {"progress": False}, expect="ok_report_failures")
    for url in ["file:///etc/passwd", "ftp://example.org/a.jpg", "http://127.0.0.1:1/a.jpg", "http://169.254.169.254/x",
                "http://[::1]/a.jpg", "http://localhost/a.jpg", "http://0x7f000001/a.jpg", "gopher://x", "http:///nohost",
                "http://10.0.0.1/a.jpg"]:
        sdk(f"sdk add url {url}", "add_image", [url])
        cli(f"search url {url}", ["search", url])
    for name, good in [("good.png", True), ("blank.png", False)]:
        pass
    sdk("sdk blank png finds no hit", "search_blank", [p["blank.png"], p["transparent.png"]], expect="ok_no_hits")

    # --- outages ---------------------------------------------------------------------------
    dead_es = {"DELF_ES_ES_URL": "http://127.0.0.1:9", "DELF_ES_ES_TIMEOUT": "2"}
    for args in (["stats"], ["index", p["good.png"]], ["search", p["good.png"]], ["delete", "x"]):
        cli(f"ES down: {args[0]}", args, env=dead_es)
    sdk("sdk ES down count", "count", [], env=dead_es)
    dead_redis = {"DELF_ES_REDIS_URL": "redis://127.0.0.1:9/0"}
    cli("Redis down: search still works", ["search", p["good.png"]], expect="ok", env=dead_redis)

    # --- HTTP API (FastAPI app in process, real engine, embedded index) ----------------------
    def api(case_id: str, method: str, url: str, expect: str = "error", **request) -> None:
        cases.append({"id": case_id, "kind": "api", "method": method, "url": url, "request": request,
                      "env": {}, "expect": expect})

    api("api PUT good.png", "PUT", "/v1/images/good?refresh=true", expect="ok",
        content=Path(p["good.png"]).read_bytes(), headers={"Content-Type": "image/png"})
    for name in ["lie.jpg", "truncated.jpg", "empty.jpg", "text.png", "html.jpg", "zeros.png", "tiny.png",
                 "huge-header.png", "svg.png"]:
        api(f"api PUT {name}", "PUT", f"/v1/images/{name}", content=Path(p[name]).read_bytes(),
            headers={"Content-Type": "image/jpeg"})
    api("api PUT no content type", "PUT", "/v1/images/x", content=b"abc")
    api("api PUT text/plain", "PUT", "/v1/images/x", content=b"abc", headers={"Content-Type": "text/plain"})
    api("api PUT over-long id", "PUT", "/v1/images/" + "x" * 600, content=Path(p["good.png"]).read_bytes(),
        headers={"Content-Type": "image/png"})
    for metadata in ["nope", "[1]", '{"a": NaN}', '{"": 1}', "{" * 2000]:
        api(f"api PUT metadata {metadata[:20]!r}", "PUT", "/v1/images/m",
            files={"file": ("g.png", Path(p["good.png"]).read_bytes(), "image/png")}, data={"metadata": metadata})
    api("api PUT multipart without file", "PUT", "/v1/images/m", data={"metadata": "{}"},
        files={"other": ("g.png", b"x", "image/png")})
    for body in [{}, {"url": "file:///etc/passwd"}, {"url": "http://127.0.0.1:1/a.jpg"}, {"url": "ftp://x/y.jpg"},
                 {"id": "no-such-id"}, {"id": "good", "url": "http://example.org/a.jpg"}, {"id": "good", "limit": -1},
                 {"id": "good", "limit": "many"}, {"id": "good", "filter": "nope"},
                 {"id": "good", "filter": {"wildcard": {"a": "*"}}}, {"id": "good", "filter": {"term": {}}},
                 {"id": "good", "min_inliers": -3}, {"id": "good", "bbox": [1, 2]}, {"id": "", "limit": 1},
                 {"id": "good", "unknown_option": 1}, {"url": "http://[::1]/a.jpg"}]:
        api(f"api search {json.dumps(body)[:50]}", "POST", "/v1/search", json=body)
    api("api search by id", "POST", "/v1/search", expect="ok", json={"id": "good"})
    api("api search body not JSON", "POST", "/v1/search", content=b"{not json", headers={"Content-Type": "application/json"})
    api("api search text/plain", "POST", "/v1/search", content=b"x", headers={"Content-Type": "text/plain"})
    api("api search multipart without file", "POST", "/v1/search", data={"limit": "3"}, files={"f": ("a", b"x")})
    api("api search multipart bad file", "POST", "/v1/search", files={"file": ("t.png", b"not an image", "image/png")})
    api("api search multipart limit=-1", "POST", "/v1/search",
        files={"file": ("g.png", Path(p["good.png"]).read_bytes(), "image/png")}, data={"limit": "-1"})
    api("api GET unknown id", "GET", "/v1/images/no-such-id")
    api("api DELETE unknown id", "DELETE", "/v1/images/no-such-id")
    api("api GET unknown task", "GET", "/v1/tasks/no-such-task")
    api("api bulk garbage", "POST", "/v1/images/_bulk", content=b"garbage", headers={"Content-Type": "application/json"})
    api("api stats", "GET", "/v1/stats", expect="ok")

    # --- things that must work -------------------------------------------------------------
    cli("index good.png", ["index", p["good.png"]], expect="ok")
    cli("search good.png", ["search", p["good.png"]], expect="ok")
    cli("stats", ["stats"], expect="ok")
    sdk("sdk add good2.jpg", "add_image", [p["good2.jpg"]], expect="ok")
    sdk("sdk search good2.jpg", "search_image", [p["good2.jpg"]], expect="ok")
    return cases


# ----------------------------------------------------------------------------- the worker


def worker_main() -> None:
    """Run cases from stdin (one JSON per line); answer one JSON per line on the real stdout."""
    from typer.testing import CliRunner

    from delf_es.cli import app
    from delf_es.errors import DelfEsError

    answer = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    runner = CliRunner()
    _reuse_models()
    engines: dict = {}
    for line in sys.stdin:
        case = pickle.loads(base64.b64decode(line))  # pickle: SDK cases hold bytes, sets, NaN, objects
        env = {k: v.replace("{tmp}", case["tmp"]) for k, v in case["env"].items()}
        try:
            if case["kind"] == "cli":
                outcome = _run_cli(runner, app, case, env)
            elif case["kind"] == "api":
                outcome = _run_api(case, engines, DelfEsError)
            else:
                outcome = _run_sdk(case, env, engines, DelfEsError)
        except BaseException as error:  # the harness itself must not die
            outcome = {"outcome": "traceback", "detail": "harness: " + "".join(traceback.format_exception_only(error))}
        answer.write(json.dumps(outcome) + "\n")


def _reuse_models() -> None:
    """One model per distinct model configuration for the whole sweep, instead of one per case
    (each CLI command builds its Extractor; loading the weights is most of a case's CPU).  What
    a case checks does not change: a configuration whose model cannot be built raises here as
    in the CLI (nothing is cached then), and extraction itself runs for every case."""
    import delf_es.features as features

    built: dict[str, object] = {}
    real = features.Extractor

    def extractor(settings, *args, **kwargs):
        key = settings.model_dump_json()
        if key not in built:
            built[key] = real(settings, *args, **kwargs)
        return built[key]

    features.Extractor = extractor


def _run_cli(runner, app, case: dict, env: dict) -> dict:
    import logging

    for handler in logging.root.handlers[:]:  # each run's basicConfig binds the runner's (then closed) stderr
        logging.root.removeHandler(handler)
    args = [a.replace("{tmp}", case["tmp"]) for a in case["args"]]
    # one index per model configuration: an index is bound to the model that first wrote it
    # (another model's features are refused with ModelMismatch, correctly, but not what a case tests)
    model = "fast" if case["args"][: len(FAST)] == FAST else "default"
    base = {"DELF_ES_DATA_DIR": f"{case['tmp']}/index-{model}", "COLUMNS": "200"}
    result = runner.invoke(app, args, env={**base, **env}, catch_exceptions=True)
    text = result.output
    crashed = result.exception is not None and not isinstance(result.exception, SystemExit)
    if crashed or "Traceback" in text:
        detail = "".join(traceback.format_exception(result.exception))[-600:] if crashed else text[-600:]
        return {"outcome": "traceback", "detail": detail}
    ok = result.exit_code == 0
    typed = result.exit_code in (1, 2, 130) and bool(re.search(r"^(error:|failed|skipped|╭─ Error|Usage:|Error:)", text, re.M)
                                                     or "Invalid value" in text or "No such option" in text)
    if not ok and not typed:
        return {"outcome": "traceback", "detail": f"exit {result.exit_code} without a typed message: {text[-300:]}"}
    return _judge(case, ok, text[-300:])


def _run_api(case: dict, engines: dict, DelfEsError) -> dict:
    """One request to the real app (FastAPI TestClient: exceptions the app lets through raise)."""
    from fastapi.testclient import TestClient

    from delf_es.api.app import create_app
    from delf_es.sdk import DelfEs
    from delf_es.settings import Settings

    if "api" not in engines:
        settings = Settings(data_dir=Path(case["tmp"]) / "api-index", es_url=None, redis_url=None)
        engines["api"] = TestClient(create_app(settings, DelfEs(settings), warm_up=False), raise_server_exceptions=True)
    client = engines["api"]
    try:
        response = client.request(case["method"], case["url"], **case["request"])
    except Exception as error:  # noqa: BLE001 - an exception the app did not turn into a response
        return {"outcome": "traceback", "detail": "".join(traceback.format_exception(error))[-600:]}
    detail = f"{response.status_code} {response.text[:250]}"
    if response.status_code >= 500 and response.status_code != 503:
        return {"outcome": "traceback", "detail": detail}
    if response.status_code >= 400:
        try:
            shaped = isinstance(response.json().get("error", {}).get("type"), str)
        except (ValueError, AttributeError):
            shaped = False
        if not shaped:
            return {"outcome": "traceback", "detail": "error without the {error: {type, reason}} shape: " + detail}
    return _judge(case, response.status_code < 400, detail)


def _judge(case: dict, ok: bool, detail: str) -> dict:
    expect = case["expect"]
    if not ok:
        return {"outcome": "wrongly_refused" if expect == "ok" else "typed_error", "detail": detail}
    if expect == "error":
        return {"outcome": "wrongly_accepted", "detail": detail}
    return {"outcome": "correct", "detail": detail}


def _run_sdk(case: dict, env: dict, engines: dict, DelfEsError) -> dict:
    from delf_es.sdk import DelfEs
    from delf_es.settings import Settings

    key = json.dumps(env, sort_keys=True)
    if key not in engines:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            engines[key] = DelfEs(Settings(data_dir=Path(case["tmp"]) / "sdk-index"))
        except DelfEsError as error:
            return _judge(case, False, str(error))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    engine = engines[key]
    try:
        if case["call"] == "search_blank":
            engine.add_image(case["args"][1], refresh_after=True)
            hits = engine.search_image(case["args"][0])
            return {"outcome": "correct" if not hits else "wrongly_accepted", "detail": f"{len(hits)} hits"}
        result = getattr(engine, case["call"])(*case["args"], **case["kwargs"])
    except DelfEsError as error:
        if "\n" in str(error):
            return {"outcome": "traceback", "detail": "multi-line error: " + str(error)[:300]}
        return _judge(case, False, f"{type(error).__name__}: {error}"[:300])
    except Exception as error:  # noqa: BLE001 - what we are counting
        return {"outcome": "traceback", "detail": "".join(traceback.format_exception(error))[-600:]}
    if case["expect"] == "ok_report_failures":
        failed = getattr(result, "failed", None)
        return {"outcome": "correct" if failed else "wrongly_accepted", "detail": str(failed)[:300]}
    return _judge(case, True, str(result)[:300])


class Worker:
    """The worker process; killed with SIGKILL and restarted when a case hangs."""

    def __init__(self) -> None:
        self.process = None
        self.start()

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)

    def run(self, case: dict, timeout: float) -> dict:
        self.process.stdin.write(base64.b64encode(pickle.dumps(case)).decode() + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if ready:
            line = self.process.stdout.readline()
            if line:
                return json.loads(line)
            self.process.wait()
            self.start()
            return {"outcome": "traceback", "detail": f"worker died (exit {self.process.returncode})"}
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.start()
        return {"outcome": "hang", "detail": f"no answer in {timeout} s"}

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


def sweep(tmp: Path, seed: int, case_timeout: float, only: str | None = None) -> dict:
    paths = _write_fixtures(tmp / "files")
    cases = build_cases(paths, random.Random(seed))
    if only:
        cases = [c for c in cases if re.search(only, c["id"])]
    worker = Worker()
    counts: dict[str, int] = {}
    rows = []
    started = time.monotonic()
    try:
        for case in cases:
            case["tmp"] = str(tmp)
            outcome = worker.run(case, case_timeout)
            counts[outcome["outcome"]] = counts.get(outcome["outcome"], 0) + 1
            rows.append({"id": case["id"], "kind": case["kind"], "expect": case["expect"], **outcome})
            if outcome["outcome"] not in ("typed_error", "correct"):
                print(f"  {outcome['outcome']}: {case['id']}: {outcome['detail'][-200:]!r}", flush=True)
    finally:
        worker.close()
    return {"cases": len(cases), "counts": counts, "seconds": round(time.monotonic() - started, 1), "results": rows}


# ----------------------------------------------------------------------------- kill -9 rounds


def _kill_photos(folder: Path, count: int, side: int) -> list[str]:
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    sources = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    out = []
    for i in range(count):
        base = sources[i % len(sources)]
        y = (i * 29) % max(1, base.shape[0] - side)
        x = (i * 53) % max(1, base.shape[1] - side)
        path = folder / f"{i:03d}.png"
        Image.fromarray(np.ascontiguousarray(base[y:y + side, x:x + side])).save(path)
        out.append(str(path.resolve()))
    return out


def _index_state(directory: Path) -> dict:
    """Rows per id and half-written rows, read straight from SQLite (read-only)."""
    database = directory / "images.sqlite3"
    if not database.exists():
        return {"ids": {}, "half_written": []}
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(images)")]
        rows = conn.execute("SELECT * FROM images").fetchall()
    finally:
        conn.close()
    ids: dict[str, int] = {}
    half = []
    for row in rows:
        record = dict(zip(columns, row))
        image_id = record.get("image_id") or record.get("id")
        ids[image_id] = ids.get(image_id, 0) + 1
        n = record.get("num_keypoints")
        blobs = {k: v for k, v in record.items() if isinstance(v, (bytes, memoryview))}
        sizes = {k: len(v) for k, v in blobs.items()}
        keypoints = sizes.get("keypoints")
        if n is None or keypoints is None or keypoints != int(n) * 8 or any(s % 4 for s in sizes.values()) or \
                not sizes.get("global_desc", sizes.get("global", 1)):
            half.append(image_id)
    return {"ids": ids, "half_written": half}


def _reopen_count(directory: Path):
    """What the index itself says after the kill (it rebuilds its keypoint index if needed)."""
    from delf_es.index.embedded import EmbeddedBackend

    if not directory.exists():
        return 0
    try:
        with EmbeddedBackend(directory) as backend:
            return backend.count()
    except Exception as error:  # noqa: BLE001 - recorded: an index that cannot reopen is a failure
        return f"{type(error).__name__}: {error}"


def kill_rounds(tmp: Path, kills: int, images: int, side: int, seed: int) -> dict:
    rng = random.Random(seed)
    photos = _kill_photos(tmp / "kill-photos", images, side)
    data_dir = tmp / "kill-index"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DELF_ES_DATA_DIR": str(data_dir), "COLUMNS": "200"}
    env.pop("DELF_ES_ES_URL", None)
    env.pop("DELF_ES_REDIS_URL", None)
    directory = data_dir / "delf-images"
    reported: set[str] = set()
    rounds = []
    for number in range(kills + 1):
        final = number == kills
        log_path = tmp / f"kill-{number}.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen([sys.executable, "-m", "delf_es.cli", "-v", "index", str(tmp / "kill-photos")],
                                       env=env, stdout=subprocess.DEVNULL, stderr=log)
            delay = rng.uniform(3.0, 12.0)
            killed = False
            try:
                process.wait(timeout=None if final else delay)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
                killed = True
        text = log_path.read_text()
        committed_now = set()
        for match in re.finditer(r"committed \d+ image\(s\): (\[.*?\])", text):
            committed_now.update(json.loads(match.group(1)))
        reported |= committed_now
        extracted_now = set(re.findall(r"extracted (\S+) ", text))
        state = _index_state(directory)
        present = set(state["ids"])
        lost_reported = sorted(reported - present)
        # finished extractions of this round that are not in the index: work the kill threw away
        lost_work = sorted(extracted_now - present)
        duplicates = sorted(i for i, c in state["ids"].items() if c > 1)
        reopened = _reopen_count(directory)
        rounds.append({"round": number, "killed": killed, "after_s": None if final else round(delay, 2),
                       "exit": process.returncode, "committed_this_round": len(committed_now),
                       "extracted_this_round": len(extracted_now), "in_index": len(present),
                       "reported_saved_but_missing": lost_reported, "finished_work_lost": len(lost_work),
                       "duplicates": duplicates, "half_written": state["half_written"],
                       "reopened_count": reopened, "reopen_agrees": reopened == len(present)})
        print(f"  round {number}: killed={killed} in_index={len(present)} lost_reported={len(lost_reported)} "
              f"work_lost={len(lost_work)} dup={len(duplicates)} half={len(state['half_written'])}", flush=True)
    final_state = _index_state(directory)
    killed_rounds = [r for r in rounds if r["killed"]]
    return {
        "images": images, "side_px": side, "kills": len(killed_rounds),
        "images_reported_saved_but_lost": sum(len(r["reported_saved_but_missing"]) for r in rounds),
        "finished_work_lost_per_kill_max": max((r["finished_work_lost"] for r in killed_rounds), default=0),
        "finished_work_lost_per_kill_mean": round(float(np.mean([r["finished_work_lost"] for r in killed_rounds]))
                                                  if killed_rounds else 0.0, 3),
        "duplicates": sum(len(r["duplicates"]) for r in rounds),
        "half_written": sum(len(r["half_written"]) for r in rounds),
        "final_images_in_index": len(final_state["ids"]),
        "final_all_present": set(final_state["ids"]) == set(photos),
        "reopen_disagreements": sum(not r["reopen_agrees"] for r in rounds),
        "rounds": rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "robustness.json")
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--case-timeout", type=float, default=90.0)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--kill-images", type=int, default=40)
    parser.add_argument("--kill-side", type=int, default=256)
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--skip-kills", action="store_true")
    parser.add_argument("--plot-only", action="store_true", help="redraw the figure from --out")
    parser.add_argument("--only", default=None, help="regex: run only matching cases (debugging; not written out)")
    args = parser.parse_args()
    if args.worker:
        worker_main()
        return
    if args.plot_only:
        plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return
    result: dict = {"command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="delf-es-robustness-") as folder:
        tmp = Path(folder)
        if not args.skip_sweep:
            print("hostile inputs:", flush=True)
            result["hostile_inputs"] = sweep(tmp, args.seed, args.case_timeout, args.only)
            print(json.dumps(result["hostile_inputs"]["counts"]), flush=True)
        if not args.skip_kills:
            print("kill -9 rounds:", flush=True)
            result["kill_rounds"] = kill_rounds(tmp, args.kills, args.kill_images, args.kill_side, args.seed)
    result["load_average_1_5_15min_at_end"] = list(os.getloadavg())
    if args.only:
        print(json.dumps(result.get("hostile_inputs", {}).get("counts")))
        return
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    previous.update(result)  # a partial run (--skip-...) keeps the other part's last numbers
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(previous, indent=1))
    plot(previous, args.out.with_suffix(".png"))
    summary = {k: v for k, v in result.get("kill_rounds", {}).items() if k != "rounds"}
    print(json.dumps({"counts": result.get("hostile_inputs", {}).get("counts"), "kills": summary}, indent=1))



def plot(result: dict, out: Path) -> None:
    """Outcome counts per entry point, and per kill: committed images and work lost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    rows = result.get("hostile_inputs", {}).get("results", [])
    outcomes = ["typed_error", "correct", "wrongly_accepted", "wrongly_refused", "traceback", "hang"]
    kinds = sorted({r["kind"] for r in rows})
    for i, kind in enumerate(kinds):
        counts = [sum(r["kind"] == kind and r["outcome"] == o for r in rows) for o in outcomes]
        left.bar(np.arange(len(outcomes)) + i * 0.8 / max(1, len(kinds)), counts, width=0.8 / max(1, len(kinds)), label=kind)
    left.set_xticks(np.arange(len(outcomes)) + 0.3, outcomes, rotation=20)
    left.set_title(f"{len(rows)} hostile inputs")
    left.legend()
    rounds = result.get("kill_rounds", {}).get("rounds", [])
    if rounds:
        x = [r["round"] for r in rounds]
        right.bar(x, [r["in_index"] for r in rounds], color="tab:blue", label="images in the index after the round")
        right.plot(x, [r["finished_work_lost"] for r in rounds], "o-", color="tab:red", label="finished work lost")
        right.plot(x, [len(r["reported_saved_but_missing"]) for r in rounds], "x", color="k", label="reported saved, missing")
        right.set_xlabel("round (kill -9 at a random moment; last: run to the end)")
        right.set_title("kill -9 during `delf-es index`")
        right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
