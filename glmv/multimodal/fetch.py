"""SSRF-safe http(s) fetching of media URLs.

Each hop of a fetch (the URL, then every redirect) goes through the same checks:

    URL --scheme http/https? --domain allowed? --resolve host ONCE (getaddrinfo)-->
        every address public? --connect to those checked addresses (pinned)-->
        GET with Host header + TLS SNI/certificate check for the real hostname
    3xx --> next hop (at most max_redirects), anything else but 2xx --> MediaError

Pinning the connection to the addresses that were checked means DNS cannot answer differently
between the check and the connection (DNS rebinding). Addresses are refused when any one of them
is loopback, private, link-local (cloud metadata 169.254.169.254 among them), unspecified,
multicast, reserved, shared (100.64/10) or otherwise not global, also when hidden in an IPv6 form
(IPv4-mapped/compatible, NAT64, 6to4, Teredo). Spellings like `http://2130706433/` or
`http://0x7f.1/` resolve to 127.0.0.1 and are refused like it.

The requests go through httpcore (httpx's engine) directly: pinning needs a network backend
that connects to the checked address whatever host it is asked for, and httpx's transport takes
none. The URL keeps the real hostname, so the Host header, SNI and certificate check use it.
Proxy settings from the environment are not used (the connection goes to the checked address).
One deadline covers the whole fetch (DNS, connects, TLS, every read of every hop); the byte
limit is checked against Content-Length before the body and while it streams. Nothing is shared
between calls but a read-only SSL context, so fetches may run concurrently in threads.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from glmv.errors import MediaError, MediaTooLargeError
from glmv.multimodal.media import MediaPolicy, describe_source

if TYPE_CHECKING:
    import ssl

    import httpcore
    import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_REDIRECTS = (301, 302, 303, 307, 308)
_SHARED_V4 = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT (RFC 6598)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known NAT64 prefix (RFC 6052)
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # local-use NAT64 (RFC 8215)
_METADATA = ipaddress.ip_address("169.254.169.254")
_PRIVATE_HINT = "--allow-private-media-urls lifts this for trusted networks"


# ---------------------------------------------------------------------------------- addresses


def forbidden_reason(ip: IPAddress) -> str | None:
    """Why a media fetch may not connect to `ip` ("loopback", "private", ...); None if public."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:
            embedded, decides = inner
            reason = forbidden_reason(embedded)
            if reason is not None:
                return f"{reason} (IPv4 {embedded} inside IPv6)"
            if decides:  # a mere IPv6 spelling of the IPv4 address
                return None
        if ip in _NAT64_LOCAL:
            return "local-use NAT64"
        if ip.is_site_local:
            return "site-local"
    if ip == _METADATA:
        return "link-local (cloud metadata service)"
    for reason, flag in (("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback),
                         ("link-local", ip.is_link_local), ("multicast", ip.is_multicast),
                         ("private", ip.is_private), ("reserved", ip.is_reserved)):
        if flag:
            return reason
    if isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED_V4:
        return "shared (carrier-grade NAT)"
    if not ip.is_global:
        return "non-global"
    return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, bool] | None:
    """An IPv4 address carried inside `ip`, and whether it alone decides (the IPv6 form routes
    straight to it), or None."""
    if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d
        return ip.ipv4_mapped, True
    packed = ip.packed
    if packed[:12] == bytes(12) and int(ip) > 1:  # ::a.b.c.d (IPv4-compatible, deprecated)
        return ipaddress.IPv4Address(packed[12:]), True
    if ip in _NAT64:
        return ipaddress.IPv4Address(packed[12:]), True
    if ip.sixtofour is not None:  # 2002:aabb:ccdd::/48
        return ip.sixtofour, False
    if ip.teredo is not None:  # 2001::/32: (server, client); a bad client decides
        server, client = ip.teredo
        return (client, False) if forbidden_reason(client) else (server, False)
    return None


def resolve(host: str, port: int, timeout: float) -> list[IPAddress]:
    """Every address `host` resolves to (one getaddrinfo call, at most `timeout` seconds).

    The lookup runs in a daemon thread so a resolver that hangs cannot hold the fetch past its
    deadline; the thread ends when the system resolver gives up.
    """
    result: dict[str, Any] = {}
    done = threading.Event()

    def lookup() -> None:
        try:
            result["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            result["error"] = exc
        finally:
            done.set()

    threading.Thread(target=lookup, name="glmv-media-dns", daemon=True).start()
    if not done.wait(max(timeout, 0.0)):
        raise TimeoutError(f"resolving {host} took longer than the fetch timeout")
    if "error" in result:
        raise MediaError(f"cannot resolve media host {host!r}: {result['error']}")
    addresses: list[IPAddress] = []
    for _, _, _, _, sockaddr in result["infos"]:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])  # drop an IPv6 scope id
        if ip not in addresses:
            addresses.append(ip)
    if not addresses:
        raise MediaError(f"media host {host!r} has no addresses")
    return addresses


# ---------------------------------------------------------------------------------- fetching


def fetch_url(url: str, policy: MediaPolicy) -> bytes:
    """The body of an http(s) URL under `policy` (domains, addresses, redirects, time, bytes)."""
    import httpcore
    import httpx

    deadline = time.monotonic() + policy.timeout_s
    shown = describe_source(url)
    try:
        current = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise MediaError(f"invalid media URL {shown!r}: {exc}") from exc
    try:
        for hop in range(policy.max_redirects + 1):
            addresses = _check_hop(current, policy, deadline)
            status, location, body = _get(current, addresses, policy, deadline)
            if status not in _REDIRECTS:
                if not 200 <= status < 300:
                    raise MediaError(f"fetching {shown} failed: HTTP {status}")
                assert body is not None
                return body
            if location is None:
                raise MediaError(f"fetching {shown} failed: HTTP {status} without a Location")
            if hop == policy.max_redirects:
                raise MediaError(f"fetching {shown} followed more than {policy.max_redirects} "
                                 "redirects (--max-media-redirects)")
            try:
                current = current.join(location)
            except (httpx.InvalidURL, ValueError) as exc:
                raise MediaError(f"fetching {shown}: bad redirect {location!r}: {exc}") from exc
    except (TimeoutError, httpcore.TimeoutException) as exc:
        raise MediaError(f"fetching {shown} failed: it took longer than {policy.timeout_s:g} s "
                         "(--media-fetch-timeout)") from exc
    except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol,
            OSError) as exc:
        raise MediaError(f"fetching {shown} failed: {type(exc).__name__}: {exc}") from exc
    raise AssertionError("unreachable")  # the loop returns or raises


def _check_hop(url: httpx.URL, policy: MediaPolicy, deadline: float) -> list[IPAddress]:
    """The checked addresses this hop may connect to (MediaError when any check fails)."""
    shown = describe_source(str(url))
    if url.scheme not in ("http", "https"):
        raise MediaError(f"media URL {shown!r} has scheme {url.scheme!r}; only http(s) URLs are "
                         "fetched (redirects included)")
    host = url.raw_host.decode("ascii")
    if not host:
        raise MediaError(f"media URL {shown!r} has no host")
    policy.check_domain(host)
    port = url.port or (443 if url.scheme == "https" else 80)
    addresses = resolve(host, port, deadline - time.monotonic())
    if not policy.allow_private_network:
        for ip in addresses:
            reason = forbidden_reason(ip)
            if reason is not None:
                what = f"{host} resolves to {ip}" if host.strip("[]") != str(ip) else str(ip)
                article = "an" if reason[0] in "aeiou" else "a"
                raise MediaError(f"media URL {shown!r} is refused: {what} is {article} {reason} "
                                 f"address ({_PRIVATE_HINT})")
    return addresses


def _get(url: httpx.URL, addresses: Sequence[IPAddress], policy: MediaPolicy,
         deadline: float) -> tuple[int, str | None, bytes | None]:
    """(status, Location header, body of a 2xx response) of one GET over a pinned connection."""
    import httpcore

    shown = describe_source(str(url))
    backend = _pinned_backend(addresses, deadline)
    target = url.raw_path  # path and query, as sent in the request line
    request_url = httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port,
                               target=target)
    headers = [(b"Accept", b"*/*"), (b"Accept-Encoding", b"identity"),
               (b"User-Agent", b"glmv-media-fetch")]
    remaining = max(deadline - time.monotonic(), 0.001)
    timeouts = {key: remaining for key in ("connect", "read", "write", "pool")}
    with httpcore.ConnectionPool(ssl_context=_ssl_context(), network_backend=backend,
                                 max_connections=1, retries=0) as pool, \
            pool.stream("GET", request_url, headers=headers,
                        extensions={"timeout": timeouts}) as response:
        fields = {name.lower(): value for name, value in response.headers}
        if response.status in _REDIRECTS:
            location = fields.get(b"location")
            return response.status, location.decode("latin-1") if location else None, None
        if not 200 <= response.status < 300:
            return response.status, None, None
        length = fields.get(b"content-length", b"").strip()
        if length.isdigit() and int(length) > policy.max_bytes:
            raise _too_large(shown, policy.max_bytes)
        return response.status, None, _read_body(response.iter_stream(), shown, policy.max_bytes)


def _read_body(chunks: Iterable[bytes], shown: str, max_bytes: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    for chunk in chunks:
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(shown, max_bytes)
        parts.append(chunk)
    return b"".join(parts)


def _too_large(shown: str, max_bytes: int) -> MediaTooLargeError:
    return MediaTooLargeError(f"{shown} is larger than the {max_bytes}-byte limit "
                              "(--max-media-bytes)")


@lru_cache(maxsize=1)
def _ssl_context() -> ssl.SSLContext:
    """Certificate verification as httpx does it (certifi's CA bundle), built once, read-only."""
    import httpx

    return httpx.create_ssl_context()


# ---------------------------------------------------------------------------------- transport


def _clamp(timeout: float | None, deadline: float) -> float:
    """`timeout` cut to what is left before `deadline` (TimeoutError once it has passed)."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("the media fetch deadline passed")
    return remaining if timeout is None else min(timeout, remaining)


def _pinned_backend(addresses: Sequence[IPAddress], deadline: float) -> httpcore.NetworkBackend:
    backend: httpcore.NetworkBackend = _backend_class()(addresses, deadline)
    return backend


@lru_cache(maxsize=1)
def _backend_class() -> type:
    """The pinned network backend (defined on first use: httpcore is imported lazily)."""
    import httpcore

    class DeadlineStream(httpcore.NetworkStream):
        """A connection whose every operation ends by the fetch deadline at the latest."""

        def __init__(self, inner: httpcore.NetworkStream, deadline: float) -> None:
            self._inner, self._deadline = inner, deadline

        def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
            return self._inner.read(max_bytes, _clamp(timeout, self._deadline))

        def write(self, buffer: bytes, timeout: float | None = None) -> None:
            self._inner.write(buffer, _clamp(timeout, self._deadline))

        def close(self) -> None:
            self._inner.close()

        def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                      timeout: float | None = None) -> httpcore.NetworkStream:
            # server_hostname is the URL's host: SNI and the certificate check use the real name.
            inner = self._inner.start_tls(ssl_context, server_hostname,
                                          _clamp(timeout, self._deadline))
            return DeadlineStream(inner, self._deadline)

        def get_extra_info(self, info: str) -> Any:
            return self._inner.get_extra_info(info)

    class PinnedBackend(httpcore.NetworkBackend):
        """Connects to the checked addresses, whatever host httpcore asks for.

        httpcore asks for the URL's hostname; ignoring it is what pins the connection (no second
        DNS lookup). Addresses are tried in order, as `socket.create_connection` does.
        """

        def __init__(self, addresses: Sequence[IPAddress], deadline: float) -> None:
            self._addresses = list(addresses)
            self._deadline = deadline
            self._inner = httpcore.SyncBackend()

        def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                        local_address: str | None = None,
                        socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
            error: Exception = MediaError(f"no address to connect to for {host}")
            for ip in self._addresses:
                try:
                    stream = self._inner.connect_tcp(str(ip), port,
                                                     _clamp(timeout, self._deadline),
                                                     local_address, socket_options)
                except httpcore.ConnectError as exc:
                    error = exc
                    continue
                return DeadlineStream(stream, self._deadline)
            raise error

        def connect_unix_socket(self, path: str, timeout: float | None = None,
                                socket_options: Iterable[Any] | None = None,
                                ) -> httpcore.NetworkStream:
            raise MediaError("media fetches do not use unix sockets")

        def sleep(self, seconds: float) -> None:
            time.sleep(seconds)

    return PinnedBackend
