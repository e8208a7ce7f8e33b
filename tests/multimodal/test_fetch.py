"""SSRF-safe fetching (glmv/multimodal/fetch.py) against real HTTP(S) servers on loopback.

The servers count their hits, so "refused" always means: refused before any byte was sent.
Linux routes all of 127/8 to loopback, so a server on 127.0.0.2 plus an address checker that
calls 127.0.0.1 public and 127.0.0.2 private plays "public server redirects to internal one".
"""

from __future__ import annotations

import contextlib
import http.server
import ipaddress
import re
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from glmv.errors import MediaError, MediaTooLargeError
from glmv.multimodal import fetch
from glmv.multimodal.media import MediaPolicy, fetch_bytes
from tests.helpers import ServerThreads

PAYLOAD = bytes(range(256)) * 4
PRIVATE_OK = MediaPolicy(allow_private_network=True, timeout_s=5)


# ------------------------------------------------------------------ servers


@dataclass
class Server:
    """A threaded HTTP server on a loopback address, logging (path, Host header, SNI)."""

    host: str
    port: int = 0
    hits: list[tuple[str, str | None]] = field(default_factory=list)
    sni: list[str | None] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def paths(self) -> list[str]:
        return [path for path, _ in self.hits]


def _handler(server: Server) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            server.hits.append((self.path, self.headers.get("Host")))
            route = self.path.split("/")[1]
            # The client may give up early (limits, timeouts).
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                getattr(self, "route_" + route.replace("-", "_"), self.route_missing)()

        def route_ok(self) -> None:
            self.send(200, PAYLOAD)

        def route_big(self) -> None:
            self.send(200, b"z" * 5000)

        def route_stream(self) -> None:  # no Content-Length: the body ends when the socket does
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            for _ in range(5):
                self.wfile.write(b"s" * 1000)
                self.wfile.flush()

        def route_slow(self) -> None:
            time.sleep(4)
            self.send(200, b"late")

        def route_drip(self) -> None:  # every read is quick, the whole body takes 3 s
            self.send_response(200)
            self.send_header("Content-Length", "60")
            self.end_headers()
            for _ in range(60):
                self.wfile.write(b"d")
                self.wfile.flush()
                time.sleep(0.05)

        def route_redirect(self) -> None:  # /redirect/<status>/<location>
            _, _, status, location = self.path.split("/", 3)
            self.send_response(int(status))
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def route_chain(self) -> None:  # /chain/N: N more redirects, then the payload
            left = int(self.path.split("/")[2])
            if left == 0:
                self.send(200, PAYLOAD)
            else:
                self.send_response(302)
                self.send_header("Location", f"/chain/{left - 1}")
                self.send_header("Content-Length", "0")
                self.end_headers()

        def route_missing(self) -> None:
            self.send(404, b"not here")

        def send(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    """Start servers: `serve(host="127.0.0.1", tls=None)`; all are stopped after the test."""
    threads = ServerThreads()

    def start(host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> Server:
        server = Server(host)
        httpd = http.server.ThreadingHTTPServer((host, 0), _handler(server))
        httpd.daemon_threads = True
        if tls is not None:
            def record_sni(sock: Any, name: str | None, ctx: Any) -> None:
                server.sni.append(name)

            tls.sni_callback = record_sni
            httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
        server.port = httpd.server_address[1]
        threads.start(httpd)
        return server

    yield start
    threads.stop()


@pytest.fixture
def server(serve: Callable[..., Server]) -> Server:
    return serve()


def refused(url: str, policy: MediaPolicy, match: str) -> MediaError:
    with pytest.raises(MediaError, match=match) as info:
        fetch_bytes(url, policy)
    return info.value


# ------------------------------------------------------------------ the address checker


@pytest.mark.parametrize(("address", "reason"), [
    ("127.0.0.1", "loopback"), ("127.255.0.9", "loopback"), ("10.1.2.3", "private"),
    ("172.16.0.1", "private"), ("172.31.255.255", "private"), ("192.168.1.1", "private"),
    ("169.254.169.254", "cloud metadata"), ("169.254.1.1", "link-local"),
    ("0.0.0.0", "unspecified"), ("0.1.2.3", "private"), ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"), ("240.0.0.1", "reserved|private"),
    ("255.255.255.255", "reserved|private"), ("100.64.0.1", "shared"),
    ("100.127.255.254", "shared"),
    ("::1", "loopback"), ("::", "unspecified"), ("fc00::1", "private"), ("fd12:3456::1", "private"),
    ("fe80::1", "link-local"), ("ff02::1", "multicast"), ("fec0::1", "site-local"),
    ("::ffff:127.0.0.1", r"loopback \(IPv4 127\.0\.0\.1"), ("::ffff:10.0.0.1", "private"),
    ("::ffff:169.254.169.254", "cloud metadata"), ("::127.0.0.1", "loopback"),
    ("64:ff9b::a00:1", r"private \(IPv4 10\.0\.0\.1"), ("64:ff9b::7f00:1", "loopback"),
    ("64:ff9b:1::1", "NAT64"), ("2002:a00:1::", r"private \(IPv4 10\.0\.0\.1"),
    ("2002:7f00:1::1", "loopback"),
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", r"loopback \(IPv4 127\.0\.0\.1"),  # Teredo client
    ("8.8.8.8", None), ("1.1.1.1", None), ("2606:4700:4700::1111", None),
    ("::ffff:8.8.8.8", None), ("64:ff9b::808:808", None), ("2002:808:808::", None),
])
def test_forbidden_reason(address: str, reason: str | None) -> None:
    got = fetch.forbidden_reason(ipaddress.ip_address(address))
    if reason is None:
        assert got is None
    else:
        assert got is not None and re.search(reason, got), got


# ------------------------------------------------------------------ private addresses


def test_default_policy_refuses_loopback_without_a_hit(server: Server) -> None:
    error = refused(f"{server.url}/ok", MediaPolicy(timeout_s=5), "loopback")
    assert "--allow-private-media-urls" in str(error)
    assert server.hits == []


def test_private_network_allowed(server: Server) -> None:
    assert fetch_bytes(f"{server.url}/ok", PRIVATE_OK) == PAYLOAD
    assert server.hits == [("/ok", f"127.0.0.1:{server.port}")]
    assert fetch_bytes(f"{server.url}/ok", MediaPolicy.local()) == PAYLOAD


@pytest.mark.parametrize("host", ["2130706433", "0x7f.1", "127.1", "0x7f000001", "localhost",
                                  "[::ffff:127.0.0.1]", "0.0.0.0", "0177.0.0.1", "[::1]",
                                  "LocalHost", "[::ffff:7f00:1]"])
def test_other_spellings_of_loopback_are_refused(server: Server, host: str) -> None:
    url = f"http://{host}:{server.port}/ok"
    refused(url, MediaPolicy(timeout_s=5), "refused|invalid media URL")
    assert server.hits == []


@pytest.mark.parametrize("host", ["2130706433", "0x7f.1", "127.1", "0x7f000001"])
def test_numeric_spellings_really_reach_loopback(server: Server, host: str) -> None:
    # The refusals above matter: these spellings do lead to the server when allowed.
    assert fetch_bytes(f"http://{host}:{server.port}/ok", PRIVATE_OK) == PAYLOAD
    assert len(server.hits) == 1


def test_cloud_metadata_address() -> None:
    error = refused("http://169.254.169.254/latest/meta-data/", MediaPolicy(timeout_s=5),
                    "cloud metadata")
    assert "169.254.169.254 is a link-local" in str(error)


def test_any_bad_address_among_several_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = [ipaddress.ip_address("93.184.215.14"), ipaddress.ip_address("10.0.0.7")]
    monkeypatch.setattr(fetch, "resolve", lambda host, port, timeout: answers)
    refused("http://mixed.test/a.png", MediaPolicy(timeout_s=5), "resolves to 10.0.0.7")


# ------------------------------------------------------------------ redirects


@pytest.fixture
def two_networks(monkeypatch: pytest.MonkeyPatch) -> None:
    """127.0.0.1 counts as public, the rest of 127/8 as private (routing is the same)."""
    real = fetch.forbidden_reason

    def checker(ip: Any) -> str | None:
        if ip == ipaddress.ip_address("127.0.0.1"):
            return None
        return "private" if ip.version == 4 and ip.is_loopback else real(ip)

    monkeypatch.setattr(fetch, "forbidden_reason", checker)


@pytest.mark.usefixtures("two_networks")
def test_every_redirect_hop_is_checked(serve: Callable[..., Server]) -> None:
    public, internal = serve("127.0.0.1"), serve("127.0.0.2")
    url = f"{public.url}/redirect/302/{internal.url}/ok"
    error = refused(url, MediaPolicy(timeout_s=5), "127.0.0.2 is a private address")
    assert "--allow-private-media-urls" in str(error)
    assert public.paths() == [f"/redirect/302/{internal.url}/ok"]
    assert internal.hits == []
    # The same chain between two "public" hops is followed.
    assert fetch_bytes(f"{public.url}/redirect/307/{public.url}/ok",
                       MediaPolicy(timeout_s=5)) == PAYLOAD
    assert fetch_bytes(url, PRIVATE_OK) == PAYLOAD
    assert internal.paths() == ["/ok"]


@pytest.mark.usefixtures("two_networks")
def test_dns_is_asked_once_and_the_answer_pinned(serve: Callable[..., Server],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # DNS rebinding: the first answer passes the check, a second lookup would say 127.0.0.2.
    public, internal = serve("127.0.0.1"), serve("127.0.0.2")
    answers = iter(["127.0.0.1", "127.0.0.2", "127.0.0.2"])
    lookups: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != "rebind.test":
            return real_getaddrinfo(host, port, *args, **kwargs)
        lookups.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    url = f"http://rebind.test:{public.port}/ok"
    assert fetch_bytes(url, MediaPolicy(timeout_s=5)) == PAYLOAD
    assert lookups == ["rebind.test"]
    assert public.hits == [("/ok", f"rebind.test:{public.port}")]  # Host header: the real name
    assert internal.hits == []


def test_too_many_redirects(server: Server) -> None:
    policy = MediaPolicy(allow_private_network=True, max_redirects=3, timeout_s=5)
    assert fetch_bytes(f"{server.url}/chain/3", policy) == PAYLOAD
    server.hits.clear()
    error = refused(f"{server.url}/chain/4", policy, "more than 3 redirects")
    assert "--max-media-redirects" in str(error)
    assert server.paths() == ["/chain/4", "/chain/3", "/chain/2", "/chain/1"]
    none = MediaPolicy(allow_private_network=True, max_redirects=0, timeout_s=5)
    refused(f"{server.url}/chain/1", none, "more than 0 redirects")


@pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://example.com/x.png",
                                      "data:image/png;base64,AAAA", "gopher://127.0.0.1:70/"])
def test_redirect_to_another_scheme_is_refused(server: Server, location: str) -> None:
    refused(f"{server.url}/redirect/302/{location}", PRIVATE_OK, "only http\\(s\\) URLs")


def test_redirect_without_location(server: Server) -> None:
    refused(f"{server.url}/redirect/302/", PRIVATE_OK, "without a Location")


# ------------------------------------------------------------------ domains


def test_allowed_domains(server: Server) -> None:
    allowed = MediaPolicy(allowed_domains=("127.0.0.1",), allow_private_network=True, timeout_s=5)
    assert fetch_bytes(f"{server.url}/ok", allowed) == PAYLOAD
    server.hits.clear()
    other = MediaPolicy(allowed_domains=("example.com",), allow_private_network=True)
    error = refused(f"{server.url}/ok", other, "'127.0.0.1' is not allowed")
    assert "--allowed-media-domains" in str(error)
    assert server.hits == []


def test_redirect_to_a_domain_not_allowed(server: Server) -> None:
    url = f"{server.url}/redirect/302/http://localhost:{server.port}/ok"
    both = MediaPolicy(allowed_domains=("127.0.0.1", "LocalHost."), allow_private_network=True,
                       timeout_s=5)
    assert fetch_bytes(url, both) == PAYLOAD
    server.hits.clear()
    one = MediaPolicy(allowed_domains=("127.0.0.1",), allow_private_network=True, timeout_s=5)
    refused(url, one, "'localhost' is not allowed")
    assert server.paths() == [f"/redirect/302/http://localhost:{server.port}/ok"]


def test_international_domain_names_compare_in_ascii() -> None:
    policy = MediaPolicy(allowed_domains=("Bücher.example",))
    assert policy.allowed_domains == ("xn--bcher-kva.example",)
    policy.check_domain("xn--bcher-kva.example")


def test_remote_disabled(server: Server) -> None:
    policy = MediaPolicy(allow_remote=False, allow_private_network=True)
    for url in (f"{server.url}/ok", "https://example.com/cat.png"):
        refused(url, policy, "media URLs are not allowed")
    assert server.hits == []


# ------------------------------------------------------------------ sizes, time, failures


def test_byte_limit_from_content_length(server: Server) -> None:
    exact = MediaPolicy(allow_private_network=True, max_bytes=5000, timeout_s=5)
    assert len(fetch_bytes(f"{server.url}/big", exact)) == 5000
    small = MediaPolicy(allow_private_network=True, max_bytes=4999, timeout_s=5)
    with pytest.raises(MediaTooLargeError, match="4999-byte limit") as info:
        fetch_bytes(f"{server.url}/big", small)
    assert "--max-media-bytes" in str(info.value) and info.value.http_status == 413


def test_byte_limit_while_streaming(server: Server) -> None:
    exact = MediaPolicy(allow_private_network=True, max_bytes=5000, timeout_s=5)
    assert fetch_bytes(f"{server.url}/stream", exact) == b"s" * 5000
    small = MediaPolicy(allow_private_network=True, max_bytes=2500, timeout_s=5)
    with pytest.raises(MediaTooLargeError, match="2500-byte limit"):
        fetch_bytes(f"{server.url}/stream", small)


def test_timeout_covers_the_whole_fetch(server: Server) -> None:
    policy = MediaPolicy(allow_private_network=True, timeout_s=0.4)
    for path in ("/slow", "/drip"):  # no answer for 4 s; an answer one byte at a time (3 s)
        start = time.monotonic()
        error = refused(f"{server.url}{path}", policy, "took longer than 0.4 s")
        assert "--media-fetch-timeout" in str(error)
        # Ended by the timeout, not by the server finishing (a functional bound, not speed).
        assert time.monotonic() - start < 2.5


def test_slow_dns_is_bounded_by_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "slow-dns.test":
            time.sleep(5)
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    start = time.monotonic()
    refused("http://slow-dns.test/a.png", MediaPolicy(timeout_s=0.3), "took longer than 0.3 s")
    assert time.monotonic() - start < 3.0  # not waiting for the 5 s lookup


def test_http_error_status(server: Server) -> None:
    error = refused(f"{server.url}/missing.png", PRIVATE_OK, "HTTP 404")
    assert "/missing.png" in str(error)


def test_unreachable_server() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    refused(f"http://127.0.0.1:{port}/x", PRIVATE_OK, f"fetching http://127.0.0.1:{port}/x failed")


def test_unknown_host() -> None:
    refused("http://no-such-host.invalid/a.png", MediaPolicy(timeout_s=5), "cannot resolve")


@pytest.mark.parametrize("url", ["http://[::1/x", "http://example.com:99999/x",
                                 "http://exa mple.com/\x00", "http:///nohost", "https://"])
def test_malformed_urls(url: str) -> None:
    with pytest.raises(MediaError):
        fetch_bytes(url, MediaPolicy(timeout_s=0.5))


def test_concurrent_fetches(serve: Callable[..., Server]) -> None:
    server = serve()
    urls = [f"{server.url}/ok", f"{server.url}/big", f"{server.url}/chain/2"] * 6

    def one(index: int) -> bytes | str:
        policy = PRIVATE_OK if index % 2 == 0 else MediaPolicy(timeout_s=5)
        try:
            return fetch_bytes(urls[index], policy)
        except MediaError as exc:
            return str(exc)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(len(urls))))
    for index, result in enumerate(results):
        if index % 2:
            assert isinstance(result, str) and "loopback" in result
        else:
            assert result == (b"z" * 5000 if "/big" in urls[index] else PAYLOAD)
    assert len(server.hits) == sum(1 if "chain" not in urls[i] else 3
                                   for i in range(0, len(urls), 2))


# ------------------------------------------------------------------ TLS


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test CA and a server certificate for DNS name media.test (made with openssl)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command makes the test certificates")
    folder = tmp_path_factory.mktemp("tls")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=glmv test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=media.test")
    (folder / "ext.cnf").write_text("subjectAltName=DNS:media.test\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")
    return folder


@pytest.fixture
def tls_server(certificates: Path, serve: Callable[..., Server],
               monkeypatch: pytest.MonkeyPatch) -> Server:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificates / "server.pem", certificates / "server.key")
    server = serve("127.0.0.1", tls=context)
    client = ssl.create_default_context(cafile=str(certificates / "ca.pem"))
    monkeypatch.setattr(fetch, "_ssl_context", lambda: client)
    real = fetch.resolve

    def resolve(host: str, port: int, timeout: float) -> list[Any]:
        if host.endswith(".test"):
            return [ipaddress.ip_address("127.0.0.1")]
        return real(host, port, timeout)

    monkeypatch.setattr(fetch, "resolve", resolve)
    return server


def test_tls_checks_the_hostname_not_the_pinned_address(tls_server: Server) -> None:
    url = f"https://media.test:{tls_server.port}/ok"
    assert fetch_bytes(url, PRIVATE_OK) == PAYLOAD
    assert tls_server.hits == [("/ok", f"media.test:{tls_server.port}")]
    assert tls_server.sni == ["media.test"]
    # Pinned to the same address, a name the certificate does not cover fails verification...
    refused(f"https://other.test:{tls_server.port}/ok", PRIVATE_OK, "CERTIFICATE_VERIFY_FAILED")
    # ... and so does the bare address: the pinning never skips the certificate check.
    refused(f"https://127.0.0.1:{tls_server.port}/ok", PRIVATE_OK, "CERTIFICATE_VERIFY_FAILED")
    assert len(tls_server.hits) == 1
