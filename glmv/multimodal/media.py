"""Where media may come from and how much of it: the MediaPolicy, and reading media bytes safely.

    source --data: URL-------------------------> base64 / percent decoding, byte limit
           --http(s):// URL--------------------> fetch.py (SSRF checks, redirects, deadline)
           --file:// URL or path---------------> inside an allowed folder (symlinks, .. resolved)
    bytes  --sniff.py (magic numbers)----------> the format, checked against the content part

The format always comes from the bytes, never from a file name or a data URL's MIME type. No torch
here: the server's request validation imports this module.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal
from urllib.parse import unquote, unquote_to_bytes, urlparse

from glmv.errors import (
    ConfigError,
    ImageError,
    MediaError,
    MediaTooLargeError,
    PromptError,
    VideoError,
)
from glmv.multimodal.sniff import HEAD_BYTES, SUPPORTED, MediaFormat, sniff

DEFAULT_MAX_BYTES = 64 * 1024**2
Modality = Literal["image", "video", "document"]
MODALITIES: tuple[Modality, ...] = ("image", "video", "document")
#: Items per request when `limit_per_prompt` does not name the modality.
DEFAULT_LIMIT_PER_PROMPT: Mapping[str, int] = MappingProxyType(
    {"image": 32, "video": 4, "document": 4})

#: The `glmv serve` flag that sets each MediaPolicy field, named in every error message.
FLAGS: Mapping[str, str] = MappingProxyType({
    "allowed_local_paths": "--allowed-local-media-path",
    "allowed_domains": "--allowed-media-domains",
    "allow_private_network": "--allow-private-media-urls",
    "timeout_s": "--media-fetch-timeout",
    "max_bytes": "--max-media-bytes",
    "max_redirects": "--max-media-redirects",
    "max_image_pixels": "--max-image-pixels",
    "max_video_frames": "--max-video-frames",
    "max_video_seconds": "--max-video-seconds",
    "max_document_pages": "--max-document-pages",
    "document_max_visual_tokens": "--document-max-visual-tokens",
    "office_timeout_s": "--office-timeout",
    "limit_per_prompt": "--limit-mm-per-prompt",
    "video_fps": "--media-io-kwargs '{\"video\": {\"fps\": F}}'",
    "video_num_frames": "--media-io-kwargs '{\"video\": {\"num_frames\": N}}'",
})

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


@dataclass(frozen=True)
class MediaPolicy:
    """Where media may come from and how much of it one request may bring.

    Fields (the server sets each from the flag in FLAGS):

    - allowed_local_paths: folders whose files a request may name (file:// URL or plain path);
      symlinks and `..` are resolved before the check. Default (): no local files.
    - allow_remote: whether http(s) URLs are fetched at all. Default True.
    - allowed_domains: hostnames (exact match, case-insensitive) http(s) URLs may name, on every
      redirect hop too; None (default) = any domain.
    - allow_private_network: fetch from loopback, private, link-local (cloud metadata), shared
      and other non-global addresses. Default False: refused, whatever the URL spelling.
    - timeout_s: seconds one URL fetch may take in all (DNS, connects, redirects, body).
      Default 10.
    - max_bytes: bytes per image, video or document, from any source. Default 64 MiB.
    - max_redirects: redirects followed per URL, each re-checked. Default 5.
    - max_image_pixels: width*height of an image, read from its header before decoding.
      Default 50,000,000.
    - max_video_frames: frames per video (source frames per its metadata, before decoding).
      Default 108,000 (an hour at 30 fps).
    - max_video_seconds: duration per video in seconds, per its metadata. Default 3600.
    - max_document_pages: pages per PDF/PPT/PPTX document. Default 32.
    - document_max_visual_tokens: visual tokens of all pages of one document together; pages
      are rendered at the resolution that keeps them within it. Default 16384.
    - limit_per_prompt: items per request by modality ("image", "video", "document"); a missing
      key takes DEFAULT_LIMIT_PER_PROMPT (32 images, 4 videos, 4 documents); 0 forbids the
      modality. A document's pages do not count as images.
    - video_num_frames: sample this many frames, evenly spread over the whole video, instead of
      the model's own sampler (like vLLM's `num_frames`; -1 or None = the model's sampler).
      Default None.
    - video_fps: frames per second of video the sampler takes instead of the model's rate (the
      GLM-4.1V/4.5V sampler's `fps`; for GLM-4.6V it replaces the dynamic 3/1/0.5 frame-pairs-
      per-second table, its 640-frame cap stays). Default None. Exclusive with video_num_frames.
    - office_timeout_s: seconds a PPT/PPTX -> PDF conversion (LibreOffice) may take.
      Default 60.
    """

    allowed_local_paths: tuple[str, ...] = ()
    allow_remote: bool = True
    allowed_domains: tuple[str, ...] | None = None
    allow_private_network: bool = False
    timeout_s: float = 10.0
    max_bytes: int = DEFAULT_MAX_BYTES
    max_redirects: int = 5
    max_image_pixels: int = 50_000_000
    max_video_frames: int = 108_000
    max_video_seconds: float = 3600.0
    max_document_pages: int = 32
    document_max_visual_tokens: int = 16384
    limit_per_prompt: Mapping[str, int] = field(default_factory=dict, hash=False)
    video_num_frames: int | None = None
    video_fps: float | None = None
    office_timeout_s: float = 60.0
    _roots: tuple[Path, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # One folder or domain given as a plain string must not become a tuple of characters
        # (the folder "/" among them would allow every file).
        if isinstance(self.allowed_local_paths, (str, os.PathLike)):
            object.__setattr__(self, "allowed_local_paths", (os.fspath(self.allowed_local_paths),))
        object.__setattr__(self, "allowed_local_paths",
                           tuple(os.fspath(p) for p in self.allowed_local_paths))
        if isinstance(self.allowed_domains, str):
            object.__setattr__(self, "allowed_domains", (self.allowed_domains,))
        if self.allowed_domains is not None:
            object.__setattr__(self, "allowed_domains",
                               tuple(_normalize_domain(d) for d in self.allowed_domains))
        roots = tuple(Path(p).expanduser().resolve() for p in self.allowed_local_paths)
        object.__setattr__(self, "_roots", roots)
        self._validate_numbers()
        object.__setattr__(self, "limit_per_prompt", _full_limits(self.limit_per_prompt))
        if self.video_num_frames == -1:  # vLLM's "let the model's sampler pick"
            object.__setattr__(self, "video_num_frames", None)
        if self.video_num_frames is not None:
            _require_int(self, "video_num_frames", minimum=1)
        if self.video_fps is not None:
            _require_number(self, "video_fps", upper=1000.0)
            if self.video_num_frames is not None:
                raise ConfigError("MediaPolicy: video fps and num_frames are mutually exclusive "
                                  "(--media-io-kwargs); give one of them")

    def _validate_numbers(self) -> None:
        for name in ("max_bytes", "max_image_pixels", "max_video_frames", "max_document_pages",
                     "document_max_visual_tokens"):
            _require_int(self, name, minimum=1)
        _require_int(self, "max_redirects", minimum=0)
        for name in ("timeout_s", "max_video_seconds", "office_timeout_s"):
            _require_number(self, name)
        for name in ("allow_remote", "allow_private_network"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"MediaPolicy.{name} must be true or false, "
                                  f"got {getattr(self, name)!r}")

    @classmethod
    def local(cls) -> MediaPolicy:
        """For command-line use on one's own files and network: every local path and private
        network addresses allowed (the other limits keep their defaults)."""
        return cls(allowed_local_paths=(os.path.abspath(os.sep),), allow_private_network=True)

    def limit(self, modality: Modality) -> int:
        """Items of `modality` one request may carry."""
        return self.limit_per_prompt[modality]

    def check_item_counts(self, counts: Mapping[str, int]) -> None:
        """PromptError when a request carries more items of a modality than allowed."""
        for modality in MODALITIES:
            count, limit = counts.get(modality, 0), self.limit(modality)
            if count <= limit:
                continue
            if limit == 0:
                raise PromptError(f"this server does not accept {modality}s in requests "
                                  f"(--limit-mm-per-prompt sets {modality}: 0)")
            raise PromptError(f"the request has {count} {modality}s, more than the {limit} "
                              f"allowed per request (--limit-mm-per-prompt)")

    def check_local(self, path: Path) -> Path:
        """The resolved `path` if it lies inside an allowed folder, else MediaError."""
        try:
            resolved = path.expanduser().resolve()
        except (OSError, ValueError, RuntimeError) as exc:  # NUL byte, symlink loop
            raise MediaError(f"invalid local media path {str(path)!r}: {exc}") from exc
        if not any(resolved == root or root in resolved.parents for root in self._roots):
            raise MediaError(f"local file {str(path)!r} is outside the allowed media folders "
                             "(--allowed-local-media-path)")
        return resolved

    def check_domain(self, host: str) -> None:
        """MediaError unless http(s) media may come from `host` (IDNA/ASCII form)."""
        if not self.allow_remote:
            raise MediaError("media URLs are not allowed by this server")
        if self.allowed_domains is not None and \
                host.lower().rstrip(".") not in self.allowed_domains:
            raise MediaError(f"media domain {host!r} is not allowed (--allowed-media-domains)")


def _require_int(policy: MediaPolicy, name: str, minimum: int) -> None:
    value = getattr(policy, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"MediaPolicy.{name} must be an integer >= {minimum}, got {value!r} "
                          f"({FLAGS.get(name, name)})")


def _require_number(policy: MediaPolicy, name: str, upper: float = math.inf) -> None:
    value = getattr(policy, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or not 0 < value <= upper:
        bound = f" and <= {upper:g}" if math.isfinite(upper) else ""
        raise ConfigError(f"MediaPolicy.{name} must be a number > 0{bound}, got {value!r} "
                          f"({FLAGS.get(name, name)})")


def _full_limits(limits: Mapping[str, int]) -> Mapping[str, int]:
    if not isinstance(limits, Mapping):
        raise ConfigError(f"MediaPolicy.limit_per_prompt must map modalities to counts, got "
                          f"{limits!r} (--limit-mm-per-prompt)")
    full = dict(DEFAULT_LIMIT_PER_PROMPT)
    for name, value in limits.items():
        if name not in MODALITIES:
            raise ConfigError(f"--limit-mm-per-prompt names {name!r}; known modalities: "
                              f"{', '.join(MODALITIES)}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"--limit-mm-per-prompt: {name} must be an integer >= 0, "
                              f"got {value!r}")
        full[name] = value
    return MappingProxyType(full)


def _normalize_domain(domain: str) -> str:
    """A domain as fetch.py compares hosts: IDNA (punycode) ASCII, lower case, no final dot."""
    if not isinstance(domain, str) or not domain.strip(". "):
        raise ConfigError(f"--allowed-media-domains: {domain!r} is not a domain name")
    text = domain.strip().lower().rstrip(".")
    if text.isascii():
        return text
    import httpx  # the same IDNA rules as the URLs being checked

    try:
        return httpx.URL(f"http://{text}/").raw_host.decode("ascii")
    except (httpx.InvalidURL, UnicodeError, ValueError) as exc:
        raise ConfigError(f"--allowed-media-domains: {domain!r} is not a domain name") from exc


def describe_source(source: object, limit: int = 120) -> str:
    """A short name for a media source in error messages (data URLs are not echoed)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"{len(source)} bytes of media"
    text = str(source)
    if text.startswith("data:"):
        return f"data URL ({text.partition(',')[0][:60]}, {len(text)} characters)"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------- sources


def _too_large(what: str, max_bytes: int) -> MediaTooLargeError:
    return MediaTooLargeError(f"{what} is larger than the {max_bytes}-byte limit "
                              "(--max-media-bytes)")


def decode_base64(payload: str, max_bytes: int, what: str = "data URL") -> bytes:
    """Standard base64 (line breaks allowed) under a byte limit checked before decoding."""
    compact = "".join(payload.split())  # MIME-style line breaks are allowed
    if len(compact) // 4 * 3 - 2 > max_bytes:  # refuse before decoding
        raise _too_large(what, max_bytes)
    try:
        # validate=True: stray characters are an error, not silently dropped.
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError(f"{what} is not valid base64: {exc}") from exc
    if len(data) > max_bytes:
        raise _too_large(what, max_bytes)
    return data


def _data_url(source: str, max_bytes: int) -> bytes:
    header, sep, payload = source.partition(",")
    if not sep:
        raise MediaError("data URL has no ',' separating header and data")
    if header.lower().endswith(";base64"):
        return decode_base64(payload, max_bytes)
    if len(payload) // 3 > max_bytes:
        raise _too_large("data URL", max_bytes)
    # RFC 2397: percent-encoded octets (not UTF-8 text, which would mangle binary data).
    data = unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise _too_large("data URL", max_bytes)
    return data


def source_scheme(source: str) -> str | None:
    """The lower-case URL scheme of `source` ("data", "http", "file", ...), None for a path."""
    match = _SCHEME.match(source)
    return match.group(1).lower() if match else None


def local_file(source: str, policy: MediaPolicy) -> Path | None:
    """The checked local file a path or file:// URL names (None for data and http(s) URLs).

    Callers that can read a file themselves (video decoding) use this to avoid loading it whole.
    """
    scheme = source_scheme(source)
    if scheme in ("data", "http", "https"):
        return None
    path = Path(source)
    if scheme == "file":
        url = urlparse(source)
        if url.netloc not in ("", "localhost"):
            raise MediaError(f"file URL {source!r} names host {url.netloc!r}; only local files "
                             "(file:///path) can be read")
        path = Path(unquote(url.path))
    elif scheme is not None:
        raise MediaError(f"media URL scheme {scheme!r} is not supported; use http(s), data: or "
                         "a file path inside --allowed-local-media-path")
    resolved = policy.check_local(path)
    try:
        info = resolved.stat()
    except FileNotFoundError:
        raise MediaError(f"media file {str(path)!r} does not exist") from None
    except OSError as exc:
        raise MediaError(f"cannot read media file {str(path)!r}: {exc}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise MediaError(f"media file {str(path)!r} does not exist as a regular file")
    if info.st_size > policy.max_bytes:
        raise _too_large(str(path), policy.max_bytes)
    return resolved


def read_local(path: Path, max_bytes: int, limit: int | None = None) -> bytes:
    """Up to `limit` bytes (default: all) of a file `local_file` checked.

    O_NOFOLLOW: if the checked path was swapped for a symlink since, the read fails.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise MediaError(f"cannot read {path}: {exc}") from exc
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise MediaError(f"media file {str(path)!r} is not a regular file")
        data = file.read(max_bytes + 1 if limit is None else limit)
    if limit is None and len(data) > max_bytes:
        raise _too_large(str(path), max_bytes)
    return data


def fetch_bytes(source: str, policy: MediaPolicy) -> bytes:
    """Bytes of a data URL, an http(s) URL, a file:// URL or a local path, under `policy`."""
    scheme = source_scheme(source)
    if scheme == "data":
        return _data_url(source, policy.max_bytes)
    if scheme in ("http", "https"):
        from glmv.multimodal.fetch import fetch_url

        return fetch_url(source, policy)
    path = local_file(source, policy)
    assert path is not None
    return read_local(path, policy.max_bytes)


# ---------------------------------------------------------------------------------- formats

_PART_NAMES = {"image": "image_url", "video": "video_url", "document": "file"}
_NOUNS = {"image": "an image", "video": "a video", "document": "a document (PDF, PPT, PPTX)"}
_ERRORS: Mapping[str, type[MediaError]] = {"image": ImageError, "video": VideoError,
                                            "document": MediaError}
_VERBS = {"image": "cannot decode image", "video": "cannot decode video",
          "document": "cannot read document"}
_HOW_TO_SEND = {"image": "send images as image_url parts",
                "video": "send videos as video_url parts",
                "document": 'send documents as {"type": "file", "file": {...}} parts'}


def expect_format(data: bytes, modality: Modality) -> MediaFormat:
    """The sniffed format of `data` if it is a supported `modality`, else a clear error.

    The error says what the bytes really are (and how to send that), or that they are no
    supported image/video/document format at all.
    """
    fmt = sniff(data)
    error = _ERRORS[modality]
    part = _PART_NAMES[modality]
    if fmt is None:
        raise error(f"{_VERBS[modality]}: the data is not a supported image/video/document "
                    f"format ({_supported_list()})")
    if fmt.kind == modality:
        return fmt
    if fmt.kind == "unsupported":
        raise error(f"{_VERBS[modality]}: the {part} part holds {fmt.describe()}, which is not "
                    f"a supported format ({_supported_list()})")
    raise error(f"the {part} part holds {fmt.describe()}, not {_NOUNS[modality]}; "
                f"{_HOW_TO_SEND[fmt.kind]}")


def expect_file_format(path: Path, modality: Modality) -> MediaFormat:
    """`expect_format` on the first bytes of a checked local file."""
    return expect_format(read_local(path, max_bytes=HEAD_BYTES, limit=HEAD_BYTES), modality)


def _supported_list() -> str:
    return "; ".join(f"{kind}s: {names}" for kind, names in SUPPORTED.items())
