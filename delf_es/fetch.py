"""Download a URL without becoming an SSRF proxy.

:func:`fetch_url` is the only way delf-es reads from the network on a user's
behalf.  Only the standard library is used (``http.client``), because the
connection has to go to the exact address that was checked:

1. The URL must be ``http`` or ``https``, with a host and no credentials.
2. The host is resolved once.  If **any** of its addresses is private, loopback,
   link-local, multicast, reserved, unspecified or otherwise not globally
   routable, the URL is refused (unless ``settings.allow_private_urls``).
3. The socket is connected to one of those checked addresses.  The name is not
   resolved again, so DNS rebinding cannot slip in between check and connect.
   TLS still verifies the certificate against the host name.
4. Redirects (at most :data:`MAX_REDIRECTS`) go through steps 1-3 again.
5. ``settings.url_timeout`` is one deadline, in seconds, for the whole fetch:
   resolving, connecting, redirects and reading the body.
6. ``settings.url_max_bytes`` caps the body: a larger ``Content-Length`` is
   refused before reading, and the count is checked while streaming.

Proxy environment variables (``HTTP_PROXY`` ...) are ignored on purpose: through
a proxy the address check would apply to the proxy, not to the target.
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import quote, urljoin, urlsplit

from delf_es.errors import FetchFailed, UnsafeURL
from delf_es.settings import Settings

__all__ = ["MAX_REDIRECTS", "fetch_url"]

logger = logging.getLogger(__name__)

MAX_REDIRECTS = 5
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_CHUNK_BYTES = 64 * 1024
# Characters left as they are when re-quoting the request target; everything else
# (spaces, CR/LF, non-ASCII) is percent-encoded.  '%' stays so existing escapes survive.
_SAFE_TARGET_CHARS = "/?&=%:@!$'()*+,;~-._"
_HEADERS = {
    "User-Agent": "delf-es",
    "Accept": "image/*, */*;q=0.5",
    "Accept-Encoding": "identity",
    "Connection": "close",
}

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


@dataclass(frozen=True)
class _Target:
    url: str
    scheme: str
    host: str
    port: int
    request_target: str  # path and query, percent-encoded


def fetch_url(url: str, settings: Settings) -> bytes:
    """Download ``url`` and return the response body.

    Args:
        url: an ``http://`` or ``https://`` URL.
        settings: uses ``url_timeout`` (s, one deadline for the whole fetch),
            ``url_max_bytes`` (body cap, bytes) and ``allow_private_urls``.

    Raises:
        UnsafeURL: refused by policy: another scheme, credentials in the URL, no
            host, a host with any non-public address (also after a redirect), or
            a body larger than ``url_max_bytes``.
        FetchFailed: the host cannot be resolved or reached, TLS fails, the
            deadline passes, the status is not 2xx, there are more than
            :data:`MAX_REDIRECTS` redirects, or the body is shorter than its
            ``Content-Length``.
    """
    deadline = time.monotonic() + settings.url_timeout
    current = url
    for hop in range(MAX_REDIRECTS + 1):
        target = _parse(current)
        addresses = _resolve(target, settings, deadline)
        location = None
        try:
            body, location = _get(target, addresses, settings, deadline)
        except (UnsafeURL, FetchFailed):
            raise
        except TimeoutError as exc:
            raise FetchFailed(f"timed out after {settings.url_timeout:g} s", current) from exc
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise FetchFailed(f"{type(exc).__name__}: {exc}", current) from exc
        if location is None:
            return body
        next_url = urljoin(current, location)
        logger.debug("redirect %d: %s -> %s", hop + 1, current, next_url)
        current = next_url
    raise FetchFailed(f"more than {MAX_REDIRECTS} redirects", url)


def _parse(url: str) -> _Target:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeURL(f"malformed URL: {exc}", url) from exc
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise UnsafeURL(f"scheme {scheme!r} is not allowed, only http and https", url)
    if parts.username is not None or parts.password is not None:
        raise UnsafeURL("credentials in the URL are not allowed", url)
    host = parts.hostname
    if not host:
        raise UnsafeURL("URL has no host", url)
    request_target = parts.path or "/"
    if parts.query:
        request_target += "?" + parts.query
    return _Target(
        url=url,
        scheme=scheme,
        host=host,
        port=port if port is not None else _DEFAULT_PORTS[scheme],
        request_target=quote(request_target, safe=_SAFE_TARGET_CHARS),
    )


def _forbidden_reason(ip: _IPAddress) -> str | None:
    """Why ``ip`` must not be fetched from, or ``None`` if it is a public address.

    IPv6 addresses that embed an IPv4 address (mapped ``::ffff:a.b.c.d``, NAT64,
    6to4) are judged by the embedded address as well.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            reason = _forbidden_reason(embedded)
            if reason is not None:
                return reason
    checks = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
        ("not globally routable", not ip.is_global),
    )
    for reason, hit in checks:
        if hit:
            return reason
    return None


def _resolve(target: _Target, settings: Settings, deadline: float) -> list[tuple[int, tuple]]:
    """Resolve the host once; return ``(family, sockaddr)`` pairs, all checked."""
    try:
        infos = _getaddrinfo(target.host, target.port, deadline)
    except UnicodeError as exc:
        raise UnsafeURL(f"invalid host name {target.host!r}", target.url) from exc
    except TimeoutError as exc:
        raise FetchFailed(f"timed out resolving {target.host!r}", target.url) from exc
    except OSError as exc:  # socket.gaierror
        raise FetchFailed(f"cannot resolve {target.host!r}: {exc}", target.url) from exc
    addresses: list[tuple[int, tuple]] = []
    for family, _type, _proto, _canon, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        if not settings.allow_private_urls:
            ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            reason = _forbidden_reason(ip)
            if reason is not None:
                raise UnsafeURL(
                    f"host {target.host!r} resolves to {ip}, which is {reason}; "
                    "only public addresses are fetched (see allow_private_urls)",
                    target.url,
                )
        if (family, sockaddr) not in addresses:
            addresses.append((family, sockaddr))
    if not addresses:
        raise FetchFailed(f"{target.host!r} has no IPv4 or IPv6 address", target.url)
    return addresses


def _getaddrinfo(host: str, port: int, deadline: float) -> list:
    """``socket.getaddrinfo`` bounded by ``deadline`` (it has no timeout of its own).

    On timeout the lookup thread is left to finish on its own (daemon thread).
    """
    outcome: dict[str, object] = {}

    def lookup() -> None:
        try:
            outcome["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except BaseException as exc:  # handed to the caller below
            outcome["error"] = exc

    thread = threading.Thread(target=lookup, name="delf-es-resolve", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    if thread.is_alive():
        raise TimeoutError(f"resolving {host!r} timed out")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["infos"]  # type: ignore[return-value]


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


def _connect(addresses: list[tuple[int, tuple]], deadline: float) -> socket.socket:
    """Connect to the first reachable checked address; never resolves a name."""
    last_error: OSError | None = None
    for family, sockaddr in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(_remaining(deadline))
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            last_error = exc
            if isinstance(exc, TimeoutError):
                break
    raise last_error if last_error is not None else OSError("no address to connect to")


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP connection to a pre-checked address; ``host`` is used only for the Host header."""

    def __init__(self, host: str, port: int, addresses: list[tuple[int, tuple]], deadline: float) -> None:
        super().__init__(host, port, timeout=_remaining(deadline))
        self._addresses = addresses
        self._deadline = deadline

    def connect(self) -> None:
        self.sock = _connect(self._addresses, self._deadline)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS connection to a pre-checked address; the certificate is verified for ``host``."""

    def __init__(self, host: str, port: int, addresses: list[tuple[int, tuple]], deadline: float) -> None:
        self._tls = ssl.create_default_context()
        super().__init__(host, port, timeout=_remaining(deadline), context=self._tls)
        self._addresses = addresses
        self._deadline = deadline

    def connect(self) -> None:
        sock = _connect(self._addresses, self._deadline)
        try:
            self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


def _get(
    target: _Target, addresses: list[tuple[int, tuple]], settings: Settings, deadline: float
) -> tuple[bytes, str | None]:
    """One GET.  Returns ``(body, None)``, or ``(b"", location)`` for a redirect."""
    cls = _PinnedHTTPSConnection if target.scheme == "https" else _PinnedHTTPConnection
    conn = cls(target.host, target.port, addresses, deadline)
    try:
        conn.request("GET", target.request_target, headers=_HEADERS)
        sock = conn.sock  # kept: http.client drops conn.sock once the response is read
        if sock is None:
            raise OSError("not connected")
        sock.settimeout(_remaining(deadline))
        response = conn.getresponse()
        status = response.status
        if status in _REDIRECT_STATUSES:
            location = response.getheader("Location")
            if not location:
                raise FetchFailed(f"HTTP {status} redirect without a Location header", target.url, status)
            return b"", location
        if not 200 <= status < 300:
            raise FetchFailed(f"HTTP {status} {response.reason}".rstrip(), target.url, status)
        return _read_capped(response, sock, target, settings, deadline), None
    finally:
        conn.close()


def _read_capped(
    response: http.client.HTTPResponse,
    sock: socket.socket,
    target: _Target,
    settings: Settings,
    deadline: float,
) -> bytes:
    cap = settings.url_max_bytes
    declared = _content_length(response)
    if declared is not None and declared > cap:
        raise UnsafeURL(
            f"response is {declared} bytes (Content-Length), more than url_max_bytes={cap}", target.url
        )
    chunks: list[bytes] = []
    total = 0
    while True:
        sock.settimeout(_remaining(deadline))
        chunk = response.read1(_CHUNK_BYTES)
        if not chunk:
            break
        total += len(chunk)
        if total > cap:
            raise UnsafeURL(f"response is more than url_max_bytes={cap} bytes", target.url)
        chunks.append(chunk)
    if declared is not None and total < declared:
        raise FetchFailed(f"connection closed after {total} of {declared} bytes", target.url, response.status)
    return b"".join(chunks)


def _content_length(response: http.client.HTTPResponse) -> int | None:
    if response.getheader("Transfer-Encoding"):  # chunked: Content-Length must be ignored
        return None
    value = response.getheader("Content-Length")
    try:
        length = int(value) if value is not None else None
    except ValueError:
        return None
    return length if length is not None and length >= 0 else None
