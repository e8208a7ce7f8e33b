"""Fetching media bytes safely: data URLs, http(s) URLs and allowed local paths.

Local files are refused unless they sit under an allowed folder (symlinks resolved first), remote
URLs can be limited to allowed domains, every fetch has a timeout and a byte limit.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, unquote_to_bytes, urlparse

from glmv.errors import MediaError

DEFAULT_MAX_BYTES = 512 * 1024**2


@dataclass(frozen=True)
class MediaPolicy:
    """Where media may come from and how much of it."""

    allowed_local_paths: tuple[str, ...] = ()  # folders local files may be read from
    allow_remote: bool = True  # http(s) URLs
    allowed_domains: tuple[str, ...] | None = None  # None = any domain
    timeout_s: float = 10.0
    max_bytes: int = DEFAULT_MAX_BYTES
    _roots: tuple[Path, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # One folder or domain given as a plain string must not become a tuple of characters
        # (the folder "/" among them would allow every file).
        if isinstance(self.allowed_local_paths, (str, os.PathLike)):
            object.__setattr__(self, "allowed_local_paths", (os.fspath(self.allowed_local_paths),))
        if isinstance(self.allowed_domains, str):
            object.__setattr__(self, "allowed_domains", (self.allowed_domains,))
        roots = tuple(Path(p).expanduser().resolve() for p in self.allowed_local_paths)
        object.__setattr__(self, "_roots", roots)

    @classmethod
    def local(cls) -> MediaPolicy:
        """For command-line use on one's own files: every local path allowed."""
        return cls(allowed_local_paths=(os.path.abspath(os.sep),))

    def check_local(self, path: Path) -> Path:
        try:
            resolved = path.expanduser().resolve()
        except (OSError, ValueError) as exc:  # e.g. an embedded NUL byte
            raise MediaError(f"invalid local media path {str(path)!r}: {exc}") from exc
        if not any(resolved == root or root in resolved.parents for root in self._roots):
            raise MediaError(f"local file {str(path)!r} is outside the allowed media folders "
                             "(--allowed-local-media-path)")
        return resolved

    def check_domain(self, host: str) -> None:
        if not self.allow_remote:
            raise MediaError("media URLs are not allowed by this server")
        if self.allowed_domains is not None and host.lower() not in {
                d.lower() for d in self.allowed_domains}:
            raise MediaError(f"media domain {host!r} is not allowed (--allowed-media-domains)")


def describe_source(source: object, limit: int = 120) -> str:
    """A short name for a media source in error messages (data URLs are not echoed)."""
    text = str(source)
    if text.startswith("data:"):
        return f"data URL ({text.partition(',')[0]}, {len(text)} characters)"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _data_url(source: str, max_bytes: int) -> bytes:
    header, sep, payload = source.partition(",")
    if not sep:
        raise MediaError("data URL has no ',' separating header and data")
    too_large = MediaError(f"data URL is larger than the {max_bytes}-byte limit")
    if header.lower().endswith(";base64"):
        compact = "".join(payload.split())  # MIME-style line breaks are allowed
        if len(compact) // 4 * 3 - 2 > max_bytes:  # refuse before decoding
            raise too_large
        try:
            # validate=True: stray characters are an error, not silently dropped.
            data = base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MediaError(f"data URL is not valid base64: {exc}") from exc
    else:
        if len(payload) // 3 > max_bytes:
            raise too_large
        # RFC 2397: percent-encoded octets (not UTF-8 text, which would mangle binary data).
        data = unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise too_large
    return data


def _http(source: str, policy: MediaPolicy) -> bytes:
    import httpx

    try:
        host = urlparse(source).hostname or ""
    except ValueError as exc:
        raise MediaError(f"invalid media URL {describe_source(source)!r}: {exc}") from exc
    policy.check_domain(host)

    def check_redirect(request: httpx.Request) -> None:
        # Every hop of a redirect chain must be allowed, not just the first URL.
        policy.check_domain(request.url.host)

    client = httpx.Client(timeout=policy.timeout_s, follow_redirects=True,
                          event_hooks={"request": [check_redirect]})
    chunks, size = [], 0
    try:
        with client, client.stream("GET", source) as response:
            if response.status_code >= 400:
                raise MediaError(f"fetching {source} failed: HTTP {response.status_code}")
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > policy.max_bytes:
                    raise MediaError(f"{source} is larger than the {policy.max_bytes}-byte limit")
                chunks.append(chunk)
    except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
        raise MediaError(f"fetching {describe_source(source)} failed: {exc}") from exc
    return b"".join(chunks)


def local_file(source: str, policy: MediaPolicy) -> Path | None:
    """The checked local file a path or file:// URL names (None for data and http(s) URLs).

    Callers that can read a file themselves (video decoding) use this to avoid loading it whole.
    """
    if source.startswith(("data:", "http://", "https://")):
        return None
    path = Path(source)
    if source.startswith("file://"):
        url = urlparse(source)
        if url.netloc not in ("", "localhost"):
            raise MediaError(f"file URL {source!r} names host {url.netloc!r}; only local files "
                             "(file:///path) can be read")
        path = Path(unquote(url.path))
    resolved = policy.check_local(path)
    if not resolved.is_file():
        raise MediaError(f"media file {str(path)!r} does not exist")
    if resolved.stat().st_size > policy.max_bytes:
        raise MediaError(f"{path} is larger than the {policy.max_bytes}-byte limit")
    return resolved


def fetch_bytes(source: str, policy: MediaPolicy) -> bytes:
    """Bytes of a data URL, an http(s) URL, a file:// URL or a local path, under `policy`."""
    if source.startswith("data:"):
        return _data_url(source, policy.max_bytes)
    if source.startswith(("http://", "https://")):
        return _http(source, policy)
    path = local_file(source, policy)
    assert path is not None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise MediaError(f"cannot read {source}: {exc}") from exc
