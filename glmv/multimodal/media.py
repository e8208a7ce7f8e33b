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
from urllib.parse import unquote, urlparse

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
        roots = tuple(Path(p).expanduser().resolve() for p in self.allowed_local_paths)
        object.__setattr__(self, "_roots", roots)

    @classmethod
    def local(cls) -> MediaPolicy:
        """For command-line use on one's own files: every local path allowed."""
        return cls(allowed_local_paths=(os.path.abspath(os.sep),))

    def check_local(self, path: Path) -> Path:
        resolved = path.expanduser().resolve()
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


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://", "data:", "file://"))


def _data_url(source: str, max_bytes: int) -> bytes:
    header, sep, payload = source.partition(",")
    if not sep:
        raise MediaError("data URL has no ',' separating header and data")
    if len(payload) * 3 // 4 > max_bytes:
        raise MediaError(f"data URL is larger than the {max_bytes}-byte limit")
    if header.endswith(";base64"):
        try:
            return base64.b64decode(payload, validate=False)
        except (binascii.Error, ValueError) as exc:
            raise MediaError(f"data URL is not valid base64: {exc}") from exc
    return unquote(payload).encode("latin-1", errors="replace")


def _http(source: str, policy: MediaPolicy) -> bytes:
    import httpx

    host = urlparse(source).hostname or ""
    policy.check_domain(host)
    chunks, size = [], 0
    try:
        with httpx.stream("GET", source, timeout=policy.timeout_s,
                          follow_redirects=True) as response:
            if response.status_code >= 400:
                raise MediaError(f"fetching {source} failed: HTTP {response.status_code}")
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > policy.max_bytes:
                    raise MediaError(f"{source} is larger than the {policy.max_bytes}-byte limit")
                chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise MediaError(f"fetching {source} failed: {exc}") from exc
    return b"".join(chunks)


def _local(path: Path, policy: MediaPolicy) -> bytes:
    resolved = policy.check_local(path)
    if not resolved.is_file():
        raise MediaError(f"media file {str(path)!r} does not exist")
    if resolved.stat().st_size > policy.max_bytes:
        raise MediaError(f"{path} is larger than the {policy.max_bytes}-byte limit")
    try:
        return resolved.read_bytes()
    except OSError as exc:
        raise MediaError(f"cannot read {path}: {exc}") from exc


def fetch_bytes(source: str, policy: MediaPolicy) -> bytes:
    """Bytes of a data URL, an http(s) URL, a file:// URL or a local path, under `policy`."""
    if source.startswith("data:"):
        return _data_url(source, policy.max_bytes)
    if source.startswith(("http://", "https://")):
        return _http(source, policy)
    if source.startswith("file://"):
        return _local(Path(unquote(urlparse(source).path)), policy)
    return _local(Path(source), policy)
