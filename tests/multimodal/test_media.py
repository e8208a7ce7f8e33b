"""Fetching media under a MediaPolicy: local folders and symlinks, file:// URLs, data URLs, byte
limits, and http(s) against a real server on 127.0.0.1 (status codes, sizes, domains, redirects)."""

from __future__ import annotations

import base64
import http.server
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from glmv.errors import MediaError
from glmv.multimodal.media import MediaPolicy, fetch_bytes, local_file

PAYLOAD = bytes(range(256)) * 4  # 1 KiB with every byte value


# ------------------------------------------------------------------ local files


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """(allowed, outside): two sibling folders, each holding a file `a.bin`."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    for folder in (allowed, outside):
        folder.mkdir()
        (folder / "a.bin").write_bytes(PAYLOAD + folder.name.encode())
    return allowed, outside


def test_allowed_folder_is_read(folders: tuple[Path, Path]) -> None:
    allowed, _ = folders
    policy = MediaPolicy(allowed_local_paths=(str(allowed),))
    assert fetch_bytes(str(allowed / "a.bin"), policy) == PAYLOAD + b"allowed"
    nested = allowed / "sub" / "deeper"
    nested.mkdir(parents=True)
    (nested / "b.bin").write_bytes(b"nested")
    assert fetch_bytes(str(nested / "b.bin"), policy) == b"nested"


def test_outside_allowed_folders_is_refused(folders: tuple[Path, Path]) -> None:
    allowed, outside = folders
    target = str(outside / "a.bin")
    for policy in (MediaPolicy(), MediaPolicy(allowed_local_paths=(str(allowed),))):
        with pytest.raises(MediaError, match="outside the allowed media folders") as info:
            fetch_bytes(target, policy)
        assert target in str(info.value)


def test_dot_dot_cannot_leave_the_folder(folders: tuple[Path, Path]) -> None:
    allowed, _ = folders
    policy = MediaPolicy(allowed_local_paths=(str(allowed),))
    with pytest.raises(MediaError, match="outside the allowed media folders"):
        fetch_bytes(f"{allowed}/../outside/a.bin", policy)


def test_prefix_of_an_allowed_folder_is_not_inside_it(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data-private").mkdir()
    (tmp_path / "data-private" / "x").write_bytes(b"secret")
    policy = MediaPolicy(allowed_local_paths=(str(tmp_path / "data"),))
    with pytest.raises(MediaError, match="outside the allowed media folders"):
        fetch_bytes(str(tmp_path / "data-private" / "x"), policy)


def test_symlink_leaving_the_folder_is_refused(folders: tuple[Path, Path]) -> None:
    allowed, outside = folders
    policy = MediaPolicy(allowed_local_paths=(str(allowed),))
    (allowed / "escape.bin").symlink_to(outside / "a.bin")
    (allowed / "escape_dir").symlink_to(outside, target_is_directory=True)
    (allowed / "inside.bin").symlink_to(allowed / "a.bin")
    with pytest.raises(MediaError, match="outside the allowed media folders"):
        fetch_bytes(str(allowed / "escape.bin"), policy)
    with pytest.raises(MediaError, match="outside the allowed media folders"):
        fetch_bytes(str(allowed / "escape_dir" / "a.bin"), policy)
    # A link that stays inside is fine.
    assert fetch_bytes(str(allowed / "inside.bin"), policy) == PAYLOAD + b"allowed"


def test_allowed_folder_given_through_a_symlink(folders: tuple[Path, Path], tmp_path: Path) -> None:
    allowed, _ = folders
    link = tmp_path / "link-to-allowed"
    link.symlink_to(allowed, target_is_directory=True)
    policy = MediaPolicy(allowed_local_paths=(str(link),))
    assert fetch_bytes(str(allowed / "a.bin"), policy) == PAYLOAD + b"allowed"
    assert fetch_bytes(str(link / "a.bin"), policy) == PAYLOAD + b"allowed"


def test_single_folder_string_is_one_folder(folders: tuple[Path, Path]) -> None:
    # A plain string must not be read as a tuple of one-character folders (e.g. "/").
    allowed, outside = folders
    policy = MediaPolicy(allowed_local_paths=str(allowed))  # type: ignore[arg-type]
    assert fetch_bytes(str(allowed / "a.bin"), policy) == PAYLOAD + b"allowed"
    with pytest.raises(MediaError, match="outside the allowed media folders"):
        fetch_bytes(str(outside / "a.bin"), policy)


def test_file_urls_follow_the_same_rules(folders: tuple[Path, Path]) -> None:
    allowed, outside = folders
    policy = MediaPolicy(allowed_local_paths=(str(allowed),))
    assert fetch_bytes((allowed / "a.bin").as_uri(), policy) == PAYLOAD + b"allowed"
    with pytest.raises(MediaError, match="outside the allowed media folders") as info:
        fetch_bytes((outside / "a.bin").as_uri(), policy)
    assert str(outside / "a.bin") in str(info.value)
    (allowed / "escape.bin").symlink_to(outside / "a.bin")
    with pytest.raises(MediaError, match="outside the allowed media folders"):
        fetch_bytes((allowed / "escape.bin").as_uri(), policy)
    # file://localhost/... is local too; any other host is not a local file.
    assert fetch_bytes(f"file://localhost{allowed}/a.bin", policy) == PAYLOAD + b"allowed"
    with pytest.raises(MediaError, match="only local files"):
        fetch_bytes(f"file://fileserver{allowed}/a.bin", policy)
    # Percent-encoded names are decoded.
    (allowed / "with space.bin").write_bytes(b"spaced")
    assert fetch_bytes("file://" + quote(str(allowed / "with space.bin")), policy) == b"spaced"


def test_missing_file(folders: tuple[Path, Path]) -> None:
    allowed, _ = folders
    policy = MediaPolicy(allowed_local_paths=(str(allowed),))
    missing = str(allowed / "nope.png")
    with pytest.raises(MediaError, match="does not exist") as info:
        fetch_bytes(missing, policy)
    assert missing in str(info.value)
    with pytest.raises(MediaError, match="does not exist"):
        fetch_bytes(str(allowed), policy)  # a folder is not a media file


def test_file_byte_limit(folders: tuple[Path, Path]) -> None:
    allowed, _ = folders
    path = str(allowed / "a.bin")  # 1024 + 7 bytes
    assert len(fetch_bytes(path, MediaPolicy(allowed_local_paths=(str(allowed),),
                                             max_bytes=1031))) == 1031
    with pytest.raises(MediaError, match="1030-byte limit"):
        fetch_bytes(path, MediaPolicy(allowed_local_paths=(str(allowed),), max_bytes=1030))


def test_local_policy_allows_any_path(folders: tuple[Path, Path]) -> None:
    _, outside = folders
    assert fetch_bytes(str(outside / "a.bin"), MediaPolicy.local()) == PAYLOAD + b"outside"


# ------------------------------------------------------------------ data URLs


def test_data_url_base64() -> None:
    url = "data:image/png;base64," + base64.b64encode(PAYLOAD).decode()
    assert fetch_bytes(url, MediaPolicy()) == PAYLOAD
    # MIME-style line breaks inside the payload are tolerated.
    wrapped = base64.encodebytes(PAYLOAD).decode()
    assert "\n" in wrapped
    assert fetch_bytes("data:application/octet-stream;base64," + wrapped, MediaPolicy()) == PAYLOAD


@pytest.mark.parametrize("payload", ["abc", "!!!!not*base64$$", "QUJD\x00REVG", "QUJD=QUJD"])
def test_data_url_invalid_base64(payload: str) -> None:
    with pytest.raises(MediaError, match="not valid base64"):
        fetch_bytes("data:image/png;base64," + payload, MediaPolicy())


def test_data_url_percent_encoded() -> None:
    # RFC 2397: without ;base64 the data is percent-encoded octets, not UTF-8 text.
    url = "data:application/octet-stream," + quote(PAYLOAD, safe="")
    assert fetch_bytes(url, MediaPolicy()) == PAYLOAD
    assert fetch_bytes("data:,hello%20world", MediaPolicy()) == b"hello world"


def test_data_url_without_comma() -> None:
    with pytest.raises(MediaError, match="no ','"):
        fetch_bytes("data:image/png;base64", MediaPolicy())


def test_data_url_byte_limit() -> None:
    url = "data:image/png;base64," + base64.b64encode(PAYLOAD).decode()
    assert fetch_bytes(url, MediaPolicy(max_bytes=len(PAYLOAD))) == PAYLOAD
    with pytest.raises(MediaError, match=f"{len(PAYLOAD) - 1}-byte limit"):
        fetch_bytes(url, MediaPolicy(max_bytes=len(PAYLOAD) - 1))
    plain = "data:application/octet-stream," + "x" * 100
    assert fetch_bytes(plain, MediaPolicy(max_bytes=100)) == b"x" * 100
    with pytest.raises(MediaError, match="99-byte limit"):
        fetch_bytes(plain, MediaPolicy(max_bytes=99))


def test_local_file_checks_without_reading(folders: tuple[Path, Path]) -> None:
    allowed, outside = folders
    policy = MediaPolicy(allowed_local_paths=(str(allowed),))
    assert local_file(str(allowed / "a.bin"), policy) == (allowed / "a.bin").resolve()
    assert local_file(f"file://{allowed / 'a.bin'}", policy) == (allowed / "a.bin").resolve()
    for url in ("data:,x", "http://example.com/a.png", "https://example.com/a.png"):
        assert local_file(url, policy) is None
    with pytest.raises(MediaError, match="outside the allowed"):
        local_file(str(outside / "a.bin"), policy)
    with pytest.raises(MediaError, match="does not exist"):
        local_file(str(allowed / "missing.bin"), policy)


@pytest.mark.parametrize("source", ["file:///tmp/%00x", "/tmp/a\x00b"])
def test_invalid_local_paths_are_media_errors(source: str) -> None:
    with pytest.raises(MediaError, match="invalid local media path"):
        fetch_bytes(source, MediaPolicy.local())


@pytest.mark.parametrize("url", ["http://[::1/x", "http://example.com:99999/x",
                                 "http://exa mple.com/\x00"])
def test_malformed_urls_are_media_errors(url: str) -> None:
    with pytest.raises(MediaError):
        fetch_bytes(url, MediaPolicy(timeout_s=0.5))


# ------------------------------------------------------------------ http(s)


class _Handler(http.server.BaseHTTPRequestHandler):
    big = b"z" * 5000
    hits: list[str] = []  # noqa: RUF012 - shared request log of the test server

    def do_GET(self) -> None:
        type(self).hits.append(self.path)
        if self.path == "/ok":
            self._send(200, PAYLOAD)
        elif self.path == "/big":
            self._send(200, self.big)
        elif self.path == "/slow":
            time.sleep(1.0)
            self._send(200, b"late")
        elif self.path.startswith("/redirect-to/"):
            self.send_response(302)
            self.send_header("Location", self.path.removeprefix("/redirect-to/"))
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._send(404, b"not here")

    def _send(self, status: int, body: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except ConnectionError:  # the client gave up (timeout test)
            pass

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """Base URL of a tiny HTTP server on 127.0.0.1, running in a thread for this module."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def test_http_fetch(server: str) -> None:
    assert fetch_bytes(f"{server}/ok", MediaPolicy(timeout_s=5)) == PAYLOAD
    allowed = MediaPolicy(allowed_domains=("127.0.0.1",), timeout_s=5)
    assert fetch_bytes(f"{server}/ok", allowed) == PAYLOAD


def test_http_error_status(server: str) -> None:
    with pytest.raises(MediaError, match="HTTP 404") as info:
        fetch_bytes(f"{server}/missing.png", MediaPolicy(timeout_s=5))
    assert "/missing.png" in str(info.value)


def test_http_byte_limit(server: str) -> None:
    assert len(fetch_bytes(f"{server}/big", MediaPolicy(max_bytes=5000, timeout_s=5))) == 5000
    with pytest.raises(MediaError, match="4999-byte limit"):
        fetch_bytes(f"{server}/big", MediaPolicy(max_bytes=4999, timeout_s=5))


def test_http_domain_not_allowed(server: str) -> None:
    _Handler.hits.clear()
    policy = MediaPolicy(allowed_domains=("example.com",), timeout_s=5)
    with pytest.raises(MediaError, match=re.escape("'127.0.0.1' is not allowed")):
        fetch_bytes(f"{server}/ok", policy)
    assert _Handler.hits == []  # refused before any request is sent


def test_remote_disabled(server: str) -> None:
    _Handler.hits.clear()
    policy = MediaPolicy(allow_remote=False, allowed_local_paths=(os.sep,))
    for url in (f"{server}/ok", "https://example.com/cat.png"):
        with pytest.raises(MediaError, match="media URLs are not allowed"):
            fetch_bytes(url, policy)
    assert _Handler.hits == []


def test_redirect_to_a_domain_not_allowed(server: str) -> None:
    # 127.0.0.1 is allowed; the redirect goes to "localhost" (same server), which is not.
    port = server.rsplit(":", 1)[1]
    url = f"{server}/redirect-to/http://localhost:{port}/ok"
    assert fetch_bytes(url, MediaPolicy(allowed_domains=("127.0.0.1", "localhost"),
                                        timeout_s=5)) == PAYLOAD
    _Handler.hits.clear()
    with pytest.raises(MediaError, match="'localhost' is not allowed"):
        fetch_bytes(url, MediaPolicy(allowed_domains=("127.0.0.1",), timeout_s=5))
    assert _Handler.hits == [f"/redirect-to/http://localhost:{port}/ok"]


def test_http_timeout(server: str) -> None:
    with pytest.raises(MediaError, match="/slow failed"):
        fetch_bytes(f"{server}/slow", MediaPolicy(timeout_s=0.2))


def test_unreachable_server() -> None:
    # Port 9 (discard) on 127.0.0.1 is closed: a connection error, reported as a MediaError.
    with pytest.raises(MediaError, match=re.escape("fetching http://127.0.0.1:9/x failed")):
        fetch_bytes("http://127.0.0.1:9/x", MediaPolicy(timeout_s=2))
