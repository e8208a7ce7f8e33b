"""Where media may come from, through real `glmv serve` processes: SSRF and local paths.

HTTP servers in this process, on loopback, count every request they get, so "refused" means
refused before a byte was sent. Private addresses are the default server's refusal (no
--allow-private-media-urls). An allowed URL that redirects somewhere forbidden needs an allowed
first hop: with no public network here, a second server allows private addresses but only the
domain 127.0.0.1 (--allowed-media-domains), and every redirect target it must refuse -- another
loopback address, `localhost`, the cloud metadata address, file:// -- is one more hop that has to
pass the same checks. Local files: --allowed-local-media-path is the module's media folder;
paths outside it, `..` and symlinks leading out of it are refused, files inside are read.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import httpx
import numpy as np
import PIL.Image
import pytest

from tests.e2e.conftest import Server
from tests.helpers import ServerThreads


def png_bytes() -> bytes:
    pixels = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = png_bytes()


# ------------------------------------------------------------------ counting HTTP servers


@dataclass
class Origin:
    """A threaded HTTP server on one loopback address that records every request path.

    GET /ok.png: the PNG; GET /redirect/<url>: a 302 to <url> (percent-decoded).
    """

    host: str
    port: int = 0
    hits: list[str] = field(default_factory=list)

    def url(self, path: str = "/ok.png", host: str | None = None) -> str:
        return f"http://{host or self.host}:{self.port}{path}"


def _handler(origin: Origin) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            origin.hits.append(self.path)
            with contextlib.suppress(ConnectionError):
                if self.path.startswith("/redirect/"):
                    self.send_response(302)
                    self.send_header("Location", unquote(self.path[len("/redirect/"):]))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif self.path == "/ok.png":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(PNG)))
                    self.end_headers()
                    self.wfile.write(PNG)
                else:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    return Handler


class _IPv6Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


@pytest.fixture(scope="module")
def origins() -> Iterator[Callable[[str, int], Origin]]:
    """`start(host, port=0)` -> a counting server; all are stopped at the end of the module."""
    threads = ServerThreads()

    def start(host: str, port: int = 0) -> Origin:
        origin = Origin(host)
        server_class = _IPv6Server if ":" in host else http.server.ThreadingHTTPServer
        httpd = server_class((host, port), _handler(origin))
        httpd.daemon_threads = True
        origin.port = httpd.server_address[1]
        threads.start(httpd, poll_interval=0.05)
        return origin

    yield start
    threads.stop()


def chat(server: Server, part: dict[str, Any]) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": [part, {"type": "text", "text": "?"}]}],
            "max_tokens": 2}
    return httpx.post(server.api + "/chat/completions", json=body, timeout=60)


def image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def refusal(reply: httpx.Response) -> str:
    """The error message of a 4xx answer (AssertionError for anything else)."""
    assert 400 <= reply.status_code < 500, (reply.status_code, reply.text[:300])
    message: str = reply.json()["error"]["message"]
    return message


# ------------------------------------------------------------------ private addresses


@pytest.fixture(scope="module")
def default_server(serve: Callable[..., Server]) -> Server:
    """Media flags at their defaults, apart from the module's --allowed-local-media-path."""
    return serve("glm-4.6v-flash")


def test_private_addresses_are_refused_with_nothing_fetched(
        default_server: Server, origins: Callable[[str, int], Origin]) -> None:
    origin = origins("127.0.0.1", 0)
    port = origin.port
    try:  # the same port on ::1, so that [::1] and ::ffff: spellings have someone to reach
        v6 = origins("::1", port)
    except OSError:  # no IPv6 loopback on this machine
        v6 = None
    urls = {
        f"http://127.0.0.1:{port}/ok.png": "127.0.0.1 is a loopback address",
        f"http://[::1]:{port}/ok.png": "::1 is a loopback address",
        f"http://0.0.0.0:{port}/ok.png": "unspecified address",
        f"http://2130706433:{port}/ok.png": "resolves to 127.0.0.1",  # decimal
        f"http://0177.0.0.1:{port}/ok.png": "Invalid IPv4 address",  # octal: not even parsed
        f"http://0x7f.1:{port}/ok.png": "resolves to 127.0.0.1",  # hex, short form
        f"http://127.1:{port}/ok.png": "resolves to 127.0.0.1",
        f"http://[::ffff:127.0.0.1]:{port}/ok.png": "loopback (IPv4 127.0.0.1 inside IPv6)",
        f"http://localhost:{port}/ok.png": "localhost resolves to",  # a name for loopback
        "http://169.254.169.254/latest/meta-data/": "cloud metadata",
        f"http://10.0.0.1:{port}/ok.png": "10.0.0.1 is a private address",
        f"http://172.16.0.1:{port}/ok.png": "172.16.0.1 is a private address",
        f"http://192.168.0.1:{port}/ok.png": "192.168.0.1 is a private address",
        f"http://100.64.0.1:{port}/ok.png": "shared (carrier-grade NAT)",
    }
    for url, reason in urls.items():
        message = refusal(chat(default_server, image(url)))
        assert reason in message, (url, message)
        assert "--allow-private-media-urls" in message or "invalid media URL" in message
    # The same refusals for a video and a document URL.
    for part in ({"type": "video_url", "video_url": {"url": origin.url()}},
                 {"type": "file", "file": {"url": origin.url()}}):
        assert "loopback" in refusal(chat(default_server, part))
    assert origin.hits == []
    assert v6 is None or v6.hits == []


# ------------------------------------------------------------------ redirects


@pytest.fixture(scope="module")
def domain_server(serve: Callable[..., Server]) -> Server:
    """Private addresses allowed, but only the domain 127.0.0.1."""
    return serve("glm-4.6v-flash", "--allow-private-media-urls",
                 "--allowed-media-domains", "127.0.0.1")


def test_redirects_to_forbidden_targets_are_refused(
        domain_server: Server, origins: Callable[[str, int], Origin]) -> None:
    allowed = origins("127.0.0.1", 0)
    internal = origins("127.0.0.2", 0)  # Linux routes all of 127/8 to loopback

    def redirect(target: str) -> str:
        return allowed.url("/redirect/" + quote(target, safe=""))

    # The allowed server itself, directly and through a redirect: fetched.
    assert chat(domain_server, image(allowed.url())).status_code == 200
    assert chat(domain_server, image(redirect(allowed.url()))).status_code == 200
    assert allowed.hits.count("/ok.png") == 2
    allowed.hits.clear()

    targets = {
        internal.url(): "media domain '127.0.0.2' is not allowed",
        allowed.url(host="localhost"): "media domain 'localhost' is not allowed",
        allowed.url(host="[::1]"): "is not allowed (--allowed-media-domains)",
        allowed.url(host="2130706433"): "is not allowed (--allowed-media-domains)",
        "http://169.254.169.254/latest/meta-data/": "'169.254.169.254' is not allowed",
        "file:///etc/passwd": "only http(s) URLs are fetched",
    }
    for target, reason in targets.items():
        message = refusal(chat(domain_server, image(redirect(target))))
        assert reason in message, (target, message)
    # The first hop was asked each time, the targets never.
    assert allowed.hits == ["/redirect/" + quote(t, safe="") for t in targets]
    assert internal.hits == []
    # Not even directly.
    assert "'127.0.0.2' is not allowed" in refusal(chat(domain_server, image(internal.url())))
    assert internal.hits == []


# ------------------------------------------------------------------ local files


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder next to the media folder, not allowed; it holds secret.png."""
    folder = tmp_path_factory.mktemp("outside")
    (folder / "secret.png").write_bytes(PNG)
    return folder


def test_local_files(default_server: Server, media_dir: Path, outside: Path) -> None:
    inside = media_dir / "inside.png"
    inside.write_bytes(PNG)
    (media_dir / "sub").mkdir(exist_ok=True)
    secret = outside / "secret.png"
    links = {"link_out.png": secret, "link_in.png": inside, "linkdir": outside}
    for name, target in links.items():
        with contextlib.suppress(FileExistsError):
            os.symlink(target, media_dir / name)

    accepted = [str(inside), inside.as_uri(), f"file://localhost{inside}",
                str(media_dir / "sub" / ".." / "inside.png"),  # `..` that stays inside
                str(media_dir / "link_in.png")]  # a symlink that stays inside
    for source in accepted:
        reply = chat(default_server, image(source))
        assert reply.status_code == 200, (source, reply.text[:300])

    outside_sources = [
        str(secret), secret.as_uri(), "/etc/passwd", "file:///etc/passwd",
        str(outside / "missing.png"),  # the same answer whether the file exists or not
        f"{media_dir}/../{outside.name}/secret.png",
        f"{media_dir.as_uri()}/%2e%2e/{outside.name}/secret.png",  # percent-encoded ..
        str(media_dir / "link_out.png"),  # a symlink leading out
        str(media_dir / "linkdir" / "secret.png"),  # through a symlinked folder
    ]
    for source in outside_sources:
        message = refusal(chat(default_server, image(source)))
        assert "outside the allowed media folders (--allowed-local-media-path)" in message, \
            (source, message)
    # Every part that takes a path checks it the same way.
    for part in ({"type": "video_url", "video_url": {"url": str(media_dir / "link_out.png")}},
                 {"type": "file", "file": {"url": secret.as_uri()}}):
        assert "outside the allowed media folders" in refusal(chat(default_server, part))
    assert "names host" in refusal(chat(default_server, image(f"file://example.com{secret}")))
    assert "does not exist" in refusal(chat(default_server, image(str(media_dir / "no.png"))))
