"""Fetch a photo from a link a stranger typed, without letting the link reach anything but the public internet.

A server that downloads whatever it is told is the classic way into a private network (server-side request
forgery): cloud metadata at 169.254.169.254, admin pages on 10.x, the app's own port on 127.0.0.1. So the host is
resolved here, once; every address it resolves to is classified with the standard `ipaddress` module; and the
connection goes to an address that passed, with the original name kept for the Host header, TLS SNI and the
certificate check. A second DNS lookup (which a rebinding DNS server could answer differently) never happens,
because the HTTP client's network backend is our own and connects only to checked addresses. Redirects are
followed by hand, each hop checked again. Every network read and write is bounded by one deadline for the whole
fetch, so a server dripping a byte a second is cut at the total, and the body is read in chunks up to a byte cap
whatever Content-Length says. The bytes then go through the same decoder and bomb checks as uploads.

Every refusal is an `InputError` whose message names the reason, written for the person who pasted the link.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Callable, Iterable

import httpcore
import httpx

from .errors import InputError
from .images import LoadedImage, NotAnImage, load_image
from .settings import Settings

USER_AGENT = "PictureSoundtrack/1.0 (image-to-music app; fetches the one photo a visitor linked)"
MAX_REDIRECTS = 3
MAX_URL_CHARS = 2048
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
TESTING_LOOPBACK = ipaddress.IPv4Address("127.0.0.1")
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

Resolver = Callable[[str], Iterable[str]]
"""Maps a host name to the IP addresses (as text) it resolves to; injectable so tests can play DNS."""

# getaddrinfo cannot be interrupted, so it runs on a small pool and the fetch stops waiting at its deadline.
_DNS_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="url-dns")
_SSL_LOCK = threading.Lock()
_SSL_CONTEXT: ssl.SSLContext | None = None


@dataclass(frozen=True)
class FetchedBody:
    data: bytes
    url: str  # after redirects
    content_type: str  # as the server declared it: a hint, never trusted


# -- public API ----------------------------------------------------------------------------------------------------

def fetch_image(url: str, settings: Settings, *, resolver: Resolver | None = None,
                ssl_context: ssl.SSLContext | None = None) -> LoadedImage:
    """Download the photo `url` points at and decode it under the same rules as an upload."""
    body = fetch_bytes(url, settings, resolver=resolver, ssl_context=ssl_context)
    if not body.data:
        raise _refused("the page is empty")
    try:
        return load_image(body.data, max_pixels=settings.max_image_pixels, max_side=settings.max_image_side,
                          max_bytes=settings.max_upload_bytes)
    except NotAnImage:
        kind = body.content_type.split(";")[0].strip() or "an unknown type"
        raise _refused(f"the page is not an image (the server calls it {kind}); link straight to a JPEG, PNG, "
                       "WebP or GIF file") from None


def fetch_bytes(url: str, settings: Settings, *, resolver: Resolver | None = None,
                ssl_context: ssl.SSLContext | None = None) -> FetchedBody:
    """The raw body behind `url`, fetched under every rule in the module docstring; no decoding."""
    deadline = _Deadline(settings.url_total_timeout_s)
    current = parse_link(url, settings)
    backend = _CheckedBackend(resolver or system_resolver, deadline, settings.url_connect_timeout_s,
                              allow_loopback=settings.url_allow_loopback)
    pool = httpcore.ConnectionPool(ssl_context=ssl_context or _default_ssl_context(), network_backend=backend,
                                   max_connections=1, http1=True, http2=False, retries=0)
    try:
        redirects = 0
        while True:
            answer = _get(pool, current, settings, deadline)
            if isinstance(answer, FetchedBody):
                return answer
            if redirects == MAX_REDIRECTS:
                raise _refused(f"the link redirects more than {MAX_REDIRECTS} times")
            redirects += 1
            current = parse_link(answer, settings, redirected_from=current)
    finally:
        pool.close()


def parse_link(url: str, settings: Settings, *, redirected_from: httpx.URL | None = None) -> httpx.URL:
    """Check a link's form (scheme, credentials, port) before anything touches the network; a redirect's
    Location is read relative to the address that sent it."""
    text = (url or "").strip()
    redirected = redirected_from is not None
    where = "the link redirects to an address that" if redirected else "the link"
    if not text:
        raise InputError("No link was given. Paste the address of a photo (https://...).")
    if len(text) > MAX_URL_CHARS:
        raise _refused(f"{where} is longer than {MAX_URL_CHARS} characters")
    if not redirected and not re.match(r"[A-Za-z][A-Za-z0-9+.\-]*:", text):
        text = "https://" + text  # people paste "example.com/photo.jpg"
    try:
        parsed = redirected_from.join(text) if redirected else httpx.URL(text)
    except (httpx.InvalidURL, ValueError, TypeError):
        raise _refused(f"{where} is not a valid web address") from None
    if parsed.scheme not in ("http", "https"):
        raise _refused(f"only http and https links are accepted, not {parsed.scheme or 'this'}:")
    if parsed.userinfo:
        raise _refused("links with a user name or password in them are not accepted")
    if not parsed.raw_host:
        raise _refused(f"{where} has no host name")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    allowed = sorted(settings.url_ports)
    if port not in allowed:
        raise _refused(f"port {port} is not allowed (only {', '.join(map(str, allowed))})")
    return parsed


def address_refusal(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address, *,
                    allow_loopback: bool = False) -> str | None:
    """Why the app must not connect to `address`, or None when it is an ordinary public internet address.

    `allow_loopback` (tests only) lets exactly 127.0.0.1 through, where the test servers listen; other loopback
    forms (127.0.0.2, ::1, ::ffff:127.0.0.1) and every private or link-local address stay refused."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return "the host resolved to something that is not an IP address"
    if ip.version == 6:
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            inner = address_refusal(embedded)
            if inner is not None or ip.ipv4_mapped is not None or ip in _NAT64:
                return inner  # these two forms reach exactly the IPv4 host they carry
    elif allow_loopback and ip == TESTING_LOOPBACK:
        return None
    if ip.is_loopback:
        return "that address is this server itself (loopback)"
    if ip.is_link_local:
        return "that address is link-local (where cloud metadata services live)"
    if ip.is_multicast:
        return "that address is a multicast address"
    if ip.is_unspecified:
        return "that address is unspecified (0.0.0.0 or ::)"
    if ip.is_reserved:
        return "that address is in a reserved range"
    if ip.version == 4 and ip in _CGNAT:
        return "that address is on a private network (carrier-grade NAT)"
    if ip.is_private:
        return "that address is on a private network"
    if not ip.is_global:
        return "that address is not on the public internet"
    return None


def system_resolver(host: str) -> list[str]:
    """Every address the operating system's resolver gives for `host`."""
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def looks_like_url(path: object) -> bool:
    """True for anything with a URL scheme (`http://`, `HTTPS://`, `file:`, `data:`, ...): never a path of an
    uploaded file, which Gradio always gives as an absolute path in its cache."""
    return isinstance(path, str) and re.match(r"\s*[A-Za-z][A-Za-z0-9+.\-]*:", path) is not None


def refuse_remote_path(path: object) -> None:
    """Raise InputError when a file input's `path` is a link rather than an uploaded file.

    Gradio downloads an `http(s)://` FileData path itself, before the app's code runs, with no size cap and only a
    per-read timeout; the UI's image component calls this first so that links go through `fetch_image` instead."""
    if looks_like_url(path):
        raise InputError("A file input must be an uploaded file, not a link. To use a photo from the web, pass its "
                         "address as image_url (or paste it into 'Photo from a link').")


# -- internals -----------------------------------------------------------------------------------------------------

def _refused(reason: str) -> InputError:
    return InputError(f"Could not use the photo link: {reason}.")


class _Deadline:
    def __init__(self, total_s: float):
        self.total_s = total_s
        self._end = time.monotonic() + total_s

    def remaining(self) -> float:
        return self._end - time.monotonic()

    def clamp(self, timeout: float | None, error: type[Exception]) -> float:
        left = self.remaining()
        if left <= 0:
            raise error(f"total time of {self.total_s:g} s used up")
        return left if timeout is None else min(timeout, left)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address a transition form carries (mapped, 6to4, Teredo client, NAT64, IPv4-compatible): Python 3.11
    classifies ::ffff:127.0.0.1 as neither loopback nor private, so the inner address is checked on its own."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64 or (int(ip) >> 32 == 0 and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _default_ssl_context() -> ssl.SSLContext:
    global _SSL_CONTEXT
    with _SSL_LOCK:
        if _SSL_CONTEXT is None:
            import certifi  # an httpx dependency: the same CA bundle httpx itself uses

            _SSL_CONTEXT = ssl.create_default_context(cafile=certifi.where())
        return _SSL_CONTEXT


class _DeadlineStream(httpcore.NetworkStream):
    """Every read, write and TLS handshake waits at most until the fetch's deadline, so the total is a hard cap
    rather than a per-read allowance a slow-drip server could renew forever."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: _Deadline):
        self._inner = inner
        self._deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._deadline.clamp(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._deadline.clamp(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        inner = self._inner.start_tls(ssl_context, server_hostname,
                                      self._deadline.clamp(timeout, httpcore.ConnectTimeout))
        return _DeadlineStream(inner, self._deadline)

    def get_extra_info(self, info: str):
        return self._inner.get_extra_info(info)


class _CheckedBackend(httpcore.NetworkBackend):
    """httpcore's network backend with the name lookup done here: the host httpcore asks for is resolved once, every
    address is checked, and the socket connects to a checked address. httpcore keeps using the host name for the
    Host header, SNI and certificate verification."""

    def __init__(self, resolver: Resolver, deadline: _Deadline, connect_timeout_s: float, *, allow_loopback: bool):
        self._resolver = resolver
        self._deadline = deadline
        self._connect_timeout_s = connect_timeout_s
        self._allow_loopback = allow_loopback
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options=None) -> httpcore.NetworkStream:
        addresses = self._checked_addresses(host)
        error: Exception | None = None
        for address in addresses:
            wait = self._deadline.clamp(self._connect_timeout_s, httpcore.ConnectTimeout)
            try:
                stream = self._inner.connect_tcp(address, port, timeout=wait, socket_options=socket_options)
            except httpcore.ConnectError as exc:
                error = exc
                continue
            return _DeadlineStream(stream, self._deadline)
        raise error or httpcore.ConnectError(f"no address for {host}")

    def _checked_addresses(self, host: str) -> list[str]:
        literal = host.strip("[]")
        try:
            addresses = [str(ipaddress.ip_address(literal))]
        except ValueError:
            addresses = self._resolve(host)
        if not addresses:
            raise _refused(f"the host name {host} could not be found")
        for address in addresses:
            reason = address_refusal(address, allow_loopback=self._allow_loopback)
            if reason is not None:
                raise _refused(reason)
        return addresses

    def _resolve(self, host: str) -> list[str]:
        wait = self._deadline.clamp(self._connect_timeout_s, httpcore.ConnectTimeout)
        future = _DNS_POOL.submit(lambda: [str(a) for a in self._resolver(host)])
        try:
            return future.result(timeout=wait)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise _refused(f"the host name {host} did not resolve within {wait:.3g} s") from None
        except (OSError, UnicodeError):
            raise _refused(f"the host name {host} could not be found") from None


def _get(pool: httpcore.ConnectionPool, url: httpx.URL, settings: Settings,
         deadline: _Deadline) -> FetchedBody | str:
    """One request: the body of a 2xx answer, or the Location of a redirect."""
    host = url.host
    target = httpcore.URL(scheme=url.scheme.encode(), host=url.raw_host, port=url.port, target=url.raw_path)
    # No cookies, no credentials: only these headers ever leave, whatever earlier hops asked for.
    headers = [(b"Host", url.netloc), (b"User-Agent", USER_AGENT.encode()), (b"Accept", b"image/*"),
               (b"Accept-Encoding", b"identity"), (b"Connection", b"close")]
    total = settings.url_total_timeout_s
    timeouts = {"connect": settings.url_connect_timeout_s, "read": total, "write": total, "pool": total}
    cap = settings.max_upload_bytes
    started_body = False
    try:
        with pool.stream("GET", target, headers=headers, extensions={"timeout": timeouts}) as response:
            answer = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in response.headers}
            status = response.status
            if status in REDIRECT_STATUSES:
                location = answer.get("location", "").strip()
                if not location:
                    raise _refused(f"the server answered {status} (a redirect) without saying where to")
                return location
            if not 200 <= status < 300 or status in (204, 205, 206):
                raise _refused(f"the server answered {_status_text(status)}")
            encoding = answer.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise _refused(f"the server sent the photo compressed ({encoding}), which is not accepted")
            declared = answer.get("content-length", "")
            if declared.strip().isdigit() and int(declared) > cap:
                raise _too_large(settings)
            body = bytearray()
            started_body = True
            for chunk in response.iter_stream():
                body += chunk
                if len(body) > cap:
                    raise _too_large(settings)
            return FetchedBody(bytes(body), str(url), answer.get("content-type", ""))
    except httpcore.TimeoutException as exc:
        if deadline.remaining() <= 0 or not isinstance(exc, httpcore.ConnectTimeout):
            what = "send the whole photo" if started_body else "answer"
            raise _refused(f"the server did not {what} in {total:g} s") from None
        raise _refused(f"{host} did not accept a connection within {settings.url_connect_timeout_s:g} s") from None
    except httpcore.ConnectError as exc:
        causes = _causes(exc)
        if any(isinstance(cause, ssl.SSLCertVerificationError) for cause in causes):
            raise _refused(f"the HTTPS certificate of {host} is not valid for that name") from None
        if any(isinstance(cause, ssl.SSLError) for cause in causes):
            raise _refused(f"a secure connection to {host} could not be set up") from None
        raise _refused(f"could not connect to {host}") from None
    except httpcore.RemoteProtocolError:
        if started_body:
            raise _refused("the connection closed before the whole photo arrived") from None
        raise _refused("the server's answer was not valid HTTP") from None
    except (httpcore.NetworkError, httpcore.ProtocolError):
        raise _refused(f"the connection to {host} failed") from None


def _causes(exc: BaseException) -> list[BaseException]:
    """The exception and what it wraps: httpcore keeps the socket or TLS error as its first argument."""
    found: list[BaseException] = []
    while exc is not None and exc not in found and len(found) < 8:
        found.append(exc)
        inner = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else None
        exc = exc.__cause__ or exc.__context__ or inner
    return found


def _too_large(settings: Settings) -> InputError:
    return _refused(f"the image is larger than {settings.max_upload_mb:g} MB")


def _status_text(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)
