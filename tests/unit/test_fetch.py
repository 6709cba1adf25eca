"""Behaviour of delf_es.fetch.fetch_url against a real HTTP server on 127.0.0.1.

Only 127.0.0.1 is ever contacted.  Tests that need a "public" server first make
the address policy treat exactly 127.0.0.1 as public; every other address keeps
the real policy, so refused redirect targets are never connected to.  Host names
ending in ``.test`` are resolved by a fake resolver, never by DNS.
"""

from __future__ import annotations

import contextlib
import datetime
import http.server
import io
import ipaddress
import pickle
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from PIL import Image

from delf_es import fetch
from delf_es.errors import FetchFailed, UnsafeURL
from delf_es.fetch import MAX_REDIRECTS, fetch_url
from delf_es.imageio import load_image_from_url
from delf_es.settings import Settings

PRIVATE_OK = Settings(allow_private_urls=True, url_timeout=5.0)
BIG = 5000


def assert_pickles(exc: BaseException) -> None:
    clone = pickle.loads(pickle.dumps(exc))
    assert type(clone) is type(exc)
    assert clone.args == exc.args
    assert str(clone) == str(exc)
    for attr in ("message", "url", "status"):
        assert getattr(clone, attr, None) == getattr(exc, attr, None)


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (9, 99, 199)).save(buf, "PNG")
    return buf.getvalue()


PNG = png_bytes()


class Handler(http.server.BaseHTTPRequestHandler):
    """Routes by path; records every request on the server."""

    protocol_version = "HTTP/1.0"  # close-delimited bodies unless a route says otherwise

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        self.server.requests.append((self.path, self.headers.get("Host")))  # type: ignore[attr-defined]
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        route = getattr(self, "route_" + parts.path.strip("/").replace("-", "_").replace(".", "_"), None)
        if route is None:
            self.send_error(404)
            return
        route(query)

    def _send(self, body: bytes, *, length: bool = True, content_type: str = "application/octet-stream") -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def route_image_png(self, query: dict) -> None:
        self._send(PNG, content_type="image/png")

    def route_bytes(self, query: dict) -> None:
        self._send(b"x" * int(query["n"][0]), length="nolength" not in query)

    def route_chunked(self, query: dict) -> None:
        self.protocol_version = "HTTP/1.1"
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        for _ in range(int(query["chunks"][0])):
            self.wfile.write(b"400\r\n" + b"y" * 0x400 + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")

    def route_short(self, query: dict) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"z" * 10)  # then the connection closes

    def route_redirect(self, query: dict) -> None:
        self.send_response(302)
        self.send_header("Location", query["to"][0])
        self.send_header("Content-Length", "0")
        self.end_headers()

    def route_loop(self, query: dict) -> None:
        self.route_redirect({"to": ["/loop"]})

    def route_error(self, query: dict) -> None:
        self.send_error(int(query["status"][0]))

    def route_trickle(self, query: dict) -> None:
        self.send_response(200)
        self.end_headers()
        with contextlib.suppress(OSError):
            for _ in range(200):  # ~20 s at most; ends as soon as the client hangs up
                self.wfile.write(b".")
                self.wfile.flush()
                time.sleep(0.1)


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[tuple[str, str | None]] = []

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port on 127.0.0.1 that accepts TCP connections (kernel backlog) but never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


@pytest.fixture
def loopback_is_public(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend 127.0.0.1 (only) is a public address; everything else keeps the real policy."""
    real = fetch._forbidden_reason

    def policy(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
        return None if ip == ipaddress.ip_address("127.0.0.1") else real(ip)

    monkeypatch.setattr(fetch, "_forbidden_reason", policy)


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Resolve ``*.test`` names from a table (a list of answers per name, one per
    lookup, the last repeated); anything else goes to the real resolver."""
    table: dict[str, list] = {}
    lookups: dict[str, int] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if not (isinstance(host, str) and host.endswith(".test")):
            return real(host, port, *args, **kwargs)
        count = lookups.get(host, 0)
        lookups[host] = count + 1
        answers = table[host]
        answer = answers[min(count, len(answers) - 1)]
        if isinstance(answer, BaseException):
            raise answer
        if callable(answer):
            return answer()
        return [
            (socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))
            for ip in answer
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    table["__lookups__"] = lookups  # type: ignore[assignment]
    return table


# --- address policy ------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1", "127.8.9.10", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254",
        "0.0.0.0", "100.64.0.1", "224.0.0.1", "240.0.0.1", "255.255.255.255",
        "::1", "::", "fe80::1", "fc00::1", "ff02::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1",
        "64:ff9b::a00:1", "2002:7f00:1::",
    ],
)
def test_non_public_addresses_are_forbidden(address: str) -> None:
    assert fetch._forbidden_reason(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert fetch._forbidden_reason(ipaddress.ip_address(address)) is None


# --- scheme and URL shape ------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://127.0.0.1/image.jpg",
        "gopher://127.0.0.1:70/",
        "data:image/png;base64,iVBORw0KGgo=",
        "javascript:alert(1)",
        "//127.0.0.1/image.png",
        "http:///image.png",
        "http://user:secret@127.0.0.1/image.png",
        "http://127.0.0.1:99999/image.png",
    ],
)
def test_non_http_or_malformed_urls_are_refused(url: str) -> None:
    with pytest.raises(UnsafeURL) as info:
        fetch_url(url, PRIVATE_OK)
    assert info.value.url == url
    assert_pickles(info.value)


# --- private addresses ----------------------------------------------------------------


def test_loopback_is_refused_by_default(server: Server) -> None:
    with pytest.raises(UnsafeURL, match="loopback") as info:
        fetch_url(server.base + "/image.png", Settings())
    assert server.requests == []  # refused before connecting
    assert_pickles(info.value)


def test_loopback_is_fetched_when_private_urls_are_allowed(server: Server) -> None:
    assert fetch_url(server.base + "/image.png", PRIVATE_OK) == PNG
    assert server.requests == [("/image.png", server.base.removeprefix("http://"))]


def test_public_server_is_fetched_with_the_default_policy(server: Server, loopback_is_public: None) -> None:
    assert fetch_url(server.base + "/image.png", Settings()) == PNG


@pytest.mark.parametrize(
    "target",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/",
        "http://127.0.0.2:{port}/image.png",
        "http://[::1]:{port}/image.png",
        "http://0.0.0.0:{port}/image.png",
        "http://[::ffff:127.0.0.2]:{port}/image.png",
    ],
)
def test_redirect_to_a_private_address_is_refused(server: Server, loopback_is_public: None, target: str) -> None:
    target = target.format(port=server.server_address[1])
    with pytest.raises(UnsafeURL, match="resolves to") as info:
        fetch_url(f"{server.base}/redirect?to={target}", Settings())
    assert info.value.url == target
    assert len(server.requests) == 1  # the redirect itself; its target was never contacted
    assert_pickles(info.value)


def test_redirect_to_another_scheme_is_refused(server: Server) -> None:
    with pytest.raises(UnsafeURL, match="scheme"):
        fetch_url(f"{server.base}/redirect?to=file:///etc/passwd", PRIVATE_OK)


def test_relative_redirect_is_followed(server: Server) -> None:
    assert fetch_url(f"{server.base}/redirect?to=/image.png", PRIVATE_OK) == PNG
    assert [path for path, _ in server.requests] == ["/redirect?to=/image.png", "/image.png"]


def test_too_many_redirects_raise_fetch_failed(server: Server) -> None:
    with pytest.raises(FetchFailed, match="redirects") as info:
        fetch_url(server.base + "/loop", PRIVATE_OK)
    assert len(server.requests) == MAX_REDIRECTS + 1
    assert_pickles(info.value)


def test_host_is_refused_when_any_address_is_private(fake_dns: dict, loopback_is_public: None) -> None:
    fake_dns["mixed.test"] = [["93.184.216.34", "10.1.2.3"]]
    with pytest.raises(UnsafeURL, match="10.1.2.3"):
        fetch_url("http://mixed.test/image.png", Settings())


def test_connection_goes_to_the_checked_address_without_resolving_again(
    server: Server, fake_dns: dict, loopback_is_public: None
) -> None:
    # First answer passes the check; a rebinding resolver would then hand out
    # 127.0.0.2, where nothing listens.  The fetch must use the first answer only.
    fake_dns["rebind.test"] = [["127.0.0.1"], ["127.0.0.2"]]
    port = server.server_address[1]
    assert fetch_url(f"http://rebind.test:{port}/image.png", Settings()) == PNG
    assert fake_dns["__lookups__"]["rebind.test"] == 1
    assert server.requests == [("/image.png", f"rebind.test:{port}")]  # Host header keeps the name


# --- size cap ----------------------------------------------------------------------


def test_body_over_cap_is_refused_from_content_length(server: Server) -> None:
    settings = Settings(allow_private_urls=True, url_max_bytes=BIG - 1)
    with pytest.raises(UnsafeURL, match="Content-Length") as info:
        fetch_url(f"{server.base}/bytes?n={BIG}", settings)
    assert_pickles(info.value)


def test_body_over_cap_is_refused_without_content_length(server: Server) -> None:
    settings = Settings(allow_private_urls=True, url_max_bytes=BIG - 1)
    with pytest.raises(UnsafeURL, match="url_max_bytes") as info:
        fetch_url(f"{server.base}/bytes?n={BIG}&nolength=1", settings)
    assert "Content-Length" not in str(info.value)  # caught while streaming


def test_chunked_body_over_cap_is_refused(server: Server) -> None:
    settings = Settings(allow_private_urls=True, url_max_bytes=10 * 1024 - 1)
    with pytest.raises(UnsafeURL, match="url_max_bytes"):
        fetch_url(f"{server.base}/chunked?chunks=10", settings)
    assert fetch_url(f"{server.base}/chunked?chunks=9", settings) == b"y" * 9 * 1024


@pytest.mark.parametrize("nolength", [False, True])
def test_body_exactly_at_cap_is_returned(server: Server, nolength: bool) -> None:
    settings = Settings(allow_private_urls=True, url_max_bytes=BIG)
    url = f"{server.base}/bytes?n={BIG}" + ("&nolength=1" if nolength else "")
    assert fetch_url(url, settings) == b"x" * BIG


# --- network and HTTP failures ---------------------------------------------------------


@pytest.mark.parametrize("status", [404, 500])
def test_http_error_status_raises_fetch_failed_with_status(server: Server, status: int) -> None:
    with pytest.raises(FetchFailed, match=str(status)) as info:
        fetch_url(f"{server.base}/error?status={status}", PRIVATE_OK)
    assert info.value.status == status
    assert_pickles(info.value)


def test_missing_path_gives_404_fetch_failed(server: Server) -> None:
    with pytest.raises(FetchFailed) as info:
        fetch_url(server.base + "/no/such/image.jpg", PRIVATE_OK)
    assert info.value.status == 404


def test_body_shorter_than_content_length_raises_fetch_failed(server: Server) -> None:
    with pytest.raises(FetchFailed, match="10 of 1000"):
        fetch_url(server.base + "/short", PRIVATE_OK)


def test_server_that_never_answers_times_out_with_fetch_failed(silent_port: int) -> None:
    settings = Settings(allow_private_urls=True, url_timeout=0.5)
    start = time.monotonic()
    with pytest.raises(FetchFailed, match="timed out") as info:
        fetch_url(f"http://127.0.0.1:{silent_port}/image.png", settings)
    assert time.monotonic() - start < 0.5 + 1.0
    assert info.value.status is None
    assert_pickles(info.value)


def test_deadline_covers_a_body_that_trickles_forever(server: Server) -> None:
    settings = Settings(allow_private_urls=True, url_timeout=0.6)
    start = time.monotonic()
    with pytest.raises(FetchFailed, match="timed out"):
        fetch_url(server.base + "/trickle", settings)
    assert time.monotonic() - start < 0.6 + 1.0


def test_slow_name_resolution_counts_against_the_deadline(fake_dns: dict, loopback_is_public: None) -> None:
    fake_dns["slow.test"] = [lambda: time.sleep(3) or []]
    start = time.monotonic()
    with pytest.raises(FetchFailed, match="timed out"):
        fetch_url("http://slow.test/image.png", Settings(url_timeout=0.3))
    assert time.monotonic() - start < 0.3 + 1.0


def test_unresolvable_host_raises_fetch_failed(fake_dns: dict) -> None:
    fake_dns["nx.test"] = [socket.gaierror(socket.EAI_NONAME, "Name or service not known")]
    with pytest.raises(FetchFailed, match="cannot resolve") as info:
        fetch_url("http://nx.test/image.png", Settings())
    assert_pickles(info.value)


def test_refused_connection_raises_fetch_failed() -> None:
    with socket.socket() as sock:  # find a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(FetchFailed, match="Connection"):
        fetch_url(f"http://127.0.0.1:{port}/image.png", PRIVATE_OK)


# --- HTTPS ---------------------------------------------------------------------------


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    """The test server behind TLS, with a self-signed certificate for ``cert-host.test``."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cert-host.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("cert-host.test")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    srv = Server()
    srv.socket = context.wrap_socket(srv.socket, server_side=True)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv, cert_path
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


@pytest.fixture
def trust(monkeypatch: pytest.MonkeyPatch):
    """Make fetch's TLS context trust one extra certificate file."""
    real = ssl.create_default_context

    def install(cert_path: Path) -> None:
        monkeypatch.setattr(ssl, "create_default_context", lambda *a, **k: real(cafile=str(cert_path)))

    return install


def test_https_certificate_is_checked_against_the_host_name_not_the_address(
    tls_server: tuple[Server, Path], trust, fake_dns: dict, loopback_is_public: None
) -> None:
    srv, cert_path = tls_server
    trust(cert_path)
    fake_dns["cert-host.test"] = [["127.0.0.1"]]
    url = f"https://cert-host.test:{srv.server_address[1]}/image.png"
    assert fetch_url(url, Settings()) == PNG
    assert srv.requests == [("/image.png", f"cert-host.test:{srv.server_address[1]}")]


def test_https_certificate_for_another_name_raises_fetch_failed(
    tls_server: tuple[Server, Path], trust, fake_dns: dict, loopback_is_public: None
) -> None:
    srv, cert_path = tls_server
    trust(cert_path)
    fake_dns["other-host.test"] = [["127.0.0.1"]]
    with pytest.raises(FetchFailed, match="certificate") as info:
        fetch_url(f"https://other-host.test:{srv.server_address[1]}/image.png", Settings())
    assert srv.requests == []
    assert_pickles(info.value)


def test_https_with_untrusted_certificate_raises_fetch_failed(tls_server: tuple[Server, Path]) -> None:
    srv, _ = tls_server
    with pytest.raises(FetchFailed, match="certificate"):
        fetch_url(f"https://127.0.0.1:{srv.server_address[1]}/image.png", PRIVATE_OK)
    assert srv.requests == []


# --- end to end with the image loader -------------------------------------------------


def test_load_image_from_url_fetches_and_decodes(server: Server) -> None:
    loaded = load_image_from_url(server.base + "/image.png", PRIVATE_OK)
    assert loaded.size == (40, 40)
    assert loaded.source == server.base + "/image.png"
    np.testing.assert_array_equal(loaded.pixels[5, 5], [9, 99, 199])


def test_load_image_from_url_keeps_the_private_address_refusal(server: Server) -> None:
    with pytest.raises(UnsafeURL):
        load_image_from_url(server.base + "/image.png", Settings())
    assert server.requests == []
