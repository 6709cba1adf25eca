"""A real ``delf-es serve`` process on a free port, for integration, fuzzing and browser tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
#: The fast model of tests/integration/test_sdk.py, as environment variables.
FAST_ENV = {"DELF_ES_BACKBONE": "efficientnet-lite0", "DELF_ES_SCALES": "[0.7071, 1.0, 1.4142]",
            "DELF_ES_GLOBAL_SCALES": "[1.0]"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m delf_es.cli serve`` in its own process group; :meth:`stop` ends it by PID.

    Args:
        env: DELF_ES_* settings (the rest of the environment is kept, minus other DELF_ES_*).
        token: DELF_ES_API_TOKEN (None = no auth, loopback only).
    """

    def __init__(self, env: dict[str, str], log: Path, token: str | None = None, args: list[str] | None = None,
                 global_args: list[str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = token
        full = {**{k: v for k, v in os.environ.items() if not k.startswith("DELF_ES_")}, **env,
                "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                "DELF_ES_TORCH_THREADS": os.environ.get("DELF_ES_TORCH_THREADS", "1")}
        if token:
            full["DELF_ES_API_TOKEN"] = token
        self.log_path = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "delf_es.cli", *(global_args or []), "serve", "--port", str(self.port), *(args or [])],
            env=full, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def client(self, timeout: float = 120.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout)

    def wait_ready(self, timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                response = httpx.get(self.url + "/healthz", timeout=5)
                if response.status_code == 200:
                    return response.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"serve not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()  # our own child, by PID: uvicorn shuts down gracefully
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.flush()
        return self.proc.returncode


def huge_png() -> bytes:
    """A 9000 x 9000 px grey PNG (81 MP, over the 64 MP pixel cap) of a few hundred kB."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (9000, 9000)).save(buffer, format="PNG", optimize=False, compress_level=9)
    return buffer.getvalue()


def malformed_requests(photo: bytes, upload_cap: int, token: str | None) -> list[dict]:
    """Bad requests of every kind the API must refuse with a 4xx JSON error (httpx.request
    keyword arguments plus ``expect``, the status).  ``photo``: a real JPEG; ``upload_cap``:
    the server's api_max_upload_bytes."""
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    jpeg = {**auth, "Content-Type": "image/jpeg"}
    cases = [
        dict(method="GET", url="/v1/images/no-such-image", headers=auth, expect=404),
        dict(method="DELETE", url="/v1/images/no-such-image", headers=auth, expect=404),
        dict(method="GET", url="/v1/images/no-such-image/thumbnail", headers=auth, expect=404),
        dict(method="GET", url="/v1/images/..%2F..%2Fetc%2Fpasswd", headers=auth, expect=400),
        dict(method="GET", url="/v1/images/a%00b", headers=auth, expect=400),
        dict(method="GET", url="/v1/images/" + "x" * 10_000, headers=auth, expect=400),
        dict(method="PUT", url="/v1/images/..%2Fescape.jpg", content=photo, headers=jpeg, expect=400),
        dict(method="PUT", url="/v1/images/corrupt.jpg", content=b"\xff\xd8\xff\xe0 not really a jpeg", headers=jpeg, expect=400),
        dict(method="PUT", url="/v1/images/truncated.jpg", content=photo[: len(photo) // 3], headers=jpeg, expect=400),
        dict(method="PUT", url="/v1/images/text.jpg", content=b"hello world", headers=jpeg, expect=400),
        dict(method="PUT", url="/v1/images/empty.jpg", content=b"", headers=jpeg, expect=400),
        dict(method="PUT", url="/v1/images/huge.png", content=huge_png(), headers={**auth, "Content-Type": "image/png"}, expect=413),
        dict(method="PUT", url="/v1/images/big.jpg", content=b"\0" * (upload_cap + 1), headers=jpeg, expect=413),
        dict(method="PUT", url="/v1/images/x.jpg", content=photo, headers={**auth, "Content-Type": "text/plain"}, expect=400),
        dict(method="PUT", url="/v1/images/x.jpg", files={"file": ("x.jpg", photo)}, data={"metadata": "[1]"}, headers=auth, expect=400),
        dict(method="PUT", url="/v1/images/x.jpg", files={"file": ("x.jpg", photo)}, data={"metadata": "{bad json"}, headers=auth, expect=400),
        dict(method="POST", url="/v1/search", files={"file": ("q.jpg", photo)}, data={"filter": "{not json"}, headers=auth, expect=400),
        dict(method="POST", url="/v1/search", files={"file": ("q.jpg", photo)}, data={"filter": '"a string"'}, headers=auth, expect=400),
        dict(method="POST", url="/v1/search", files={"file": ("q.jpg", photo)}, data={"filter": '{"script": {"source": "1"}}'}, headers=auth, expect=400),
        dict(method="POST", url="/v1/search", files={"file": ("q.jpg", photo)}, data={"bbox": "1,2,3"}, headers=auth, expect=400),
        dict(method="POST", url="/v1/search", files={"file": ("q.jpg", photo)}, data={"bbox": "a,b,c,d"}, headers=auth, expect=400),
        dict(method="POST", url="/v1/search", files={"file": ("q.jpg", photo)}, data={"bbox": "300,300,100,100"}, headers=auth, expect=400),
        dict(method="POST", url="/v1/search", files={"file": ("q.jpg", photo)}, data={"bbox": "1e9,1e9,2e9,2e9"}, headers=auth, expect=400),
        dict(method="POST", url="/v1/search", files={"file": ("q.jpg", photo)}, data={"limit": "0"}, headers=auth, expect=400),
        dict(method="POST", url="/v1/search", files={"file": ("q.jpg", photo)}, data={"limit": "100000"}, headers=auth, expect=400),
        dict(method="POST", url="/v1/search", files={"file": ("q.jpg", b"GIF89a nonsense")}, headers=auth, expect=400),
        dict(method="POST", url="/v1/search", files={"other": ("q.jpg", photo)}, headers=auth, expect=400),
        dict(method="POST", url="/v1/search", json={"url": "file:///etc/passwd"}, headers=auth, expect=400),
        dict(method="POST", url="/v1/search", json={"url": "http://127.0.0.1:9200/"}, headers=auth, expect=400),
        dict(method="POST", url="/v1/search", json={"url": "http://169.254.169.254/latest/meta-data/"}, headers=auth, expect=400),
        dict(method="POST", url="/v1/search", json={"id": "no-such-image"}, headers=auth, expect=404),
        dict(method="POST", url="/v1/search", json={"id": "a", "url": "http://example.org/a.jpg"}, headers=auth, expect=400),
        dict(method="POST", url="/v1/search", json={"id": "a", "limit": "ten"}, headers=auth, expect=400),
        dict(method="POST", url="/v1/search", content=b"{oops", headers={**auth, "Content-Type": "application/json"}, expect=400),
        dict(method="POST", url="/v1/search", content=photo, headers=jpeg, expect=400),
        dict(method="POST", url="/v1/images/_bulk", json={"files": []}, headers=auth, expect=400),
        dict(method="POST", url="/v1/images/_bulk", files={"nofile": ("a", b"x")}, headers=auth, expect=400),
        dict(method="GET", url="/v1/tasks/no-such-task", headers=auth, expect=404),
        dict(method="GET", url="/v1/tasks/..%2F..", headers=auth, expect=404),
        dict(method="PATCH", url="/v1/search", headers=auth, expect=405),
        dict(method="GET", url="/v1/nothing-here", headers=auth, expect=404),
    ]
    if token:
        cases += [dict(method="GET", url="/v1/stats", expect=401),
                  dict(method="GET", url="/v1/stats", headers={"Authorization": "Bearer wrong"}, expect=403),
                  dict(method="POST", url="/v1/search", files={"file": ("q.jpg", photo)}, expect=401)]
    return cases


def check_error(response) -> None:
    """The Elasticsearch-shaped error body, no traceback."""
    body = response.json()
    assert set(body) == {"error", "status"} and body["status"] == response.status_code, body
    assert isinstance(body["error"]["type"], str) and body["error"]["reason"], body
    assert "Traceback" not in response.text
