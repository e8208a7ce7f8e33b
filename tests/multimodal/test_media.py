"""MediaPolicy (fields, defaults, validation, items per request) and reading media under it:
local folders and symlinks, file:// URLs, data URLs, byte limits. http(s): test_fetch.py."""

from __future__ import annotations

import base64
import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from glmv.errors import ConfigError, MediaError, MediaTooLargeError, PromptError
from glmv.multimodal.media import (
    DEFAULT_LIMIT_PER_PROMPT,
    FLAGS,
    MediaPolicy,
    describe_source,
    fetch_bytes,
    local_file,
    read_local,
)

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
    with pytest.raises(MediaError, match="does not exist as a regular file"):
        fetch_bytes(str(allowed), policy)  # a folder is not a media file
    os.mkfifo(allowed / "pipe")
    with pytest.raises(MediaError, match="does not exist as a regular file"):
        fetch_bytes(str(allowed / "pipe"), policy)  # nor a pipe (it would block the reader)


def test_a_file_swapped_for_a_symlink_after_the_check_is_not_read(
        folders: tuple[Path, Path]) -> None:
    allowed, outside = folders
    policy = MediaPolicy(allowed_local_paths=(str(allowed),))
    checked = local_file(str(allowed / "a.bin"), policy)
    assert checked is not None
    checked.unlink()
    checked.symlink_to(outside / "a.bin")  # the race: replaced between check and read
    with pytest.raises(MediaError, match="cannot read"):
        read_local(checked, policy.max_bytes)


def test_symlink_loop_is_a_media_error(folders: tuple[Path, Path]) -> None:
    allowed, _ = folders
    (allowed / "loop").symlink_to(allowed / "loop")
    with pytest.raises(MediaError):
        fetch_bytes(str(allowed / "loop"), MediaPolicy(allowed_local_paths=(str(allowed),)))


def test_file_byte_limit(folders: tuple[Path, Path]) -> None:
    allowed, _ = folders
    path = str(allowed / "a.bin")  # 1024 + 7 bytes
    assert len(fetch_bytes(path, MediaPolicy(allowed_local_paths=(str(allowed),),
                                             max_bytes=1031))) == 1031
    with pytest.raises(MediaTooLargeError, match="1030-byte limit") as info:
        fetch_bytes(path, MediaPolicy(allowed_local_paths=(str(allowed),), max_bytes=1030))
    assert "--max-media-bytes" in str(info.value) and info.value.http_status == 413


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
    with pytest.raises(MediaTooLargeError, match=f"{len(PAYLOAD) - 1}-byte limit"):
        fetch_bytes(url, MediaPolicy(max_bytes=len(PAYLOAD) - 1))
    plain = "data:application/octet-stream," + "x" * 100
    assert fetch_bytes(plain, MediaPolicy(max_bytes=100)) == b"x" * 100
    with pytest.raises(MediaTooLargeError, match="99-byte limit"):
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


@pytest.mark.parametrize("source", ["ftp://example.com/a.png", "gopher://127.0.0.1:70/",
                                    "jar:file:///a.zip!/b.png", "HTTPX://example.com/a"])
def test_other_url_schemes_are_refused(source: str) -> None:
    with pytest.raises(MediaError, match="is not supported"):
        fetch_bytes(source, MediaPolicy.local())


def test_scheme_is_case_insensitive(folders: tuple[Path, Path]) -> None:
    allowed, _ = folders
    policy = MediaPolicy(allowed_local_paths=(str(allowed),))
    assert fetch_bytes("DATA:,abc", policy) == b"abc"
    assert fetch_bytes("FILE://" + str(allowed / "a.bin"), policy) == PAYLOAD + b"allowed"
    with pytest.raises(MediaError, match="loopback"):
        fetch_bytes("HTTP://127.0.0.1:9/x", policy)  # an http URL, checked as one


def test_describe_source_does_not_echo_data() -> None:
    url = "data:image/png;base64," + "A" * 10_000
    assert describe_source(url) == "data URL (data:image/png;base64, 10022 characters)"
    assert describe_source("https://example.com/" + "x" * 500).endswith("...")
    assert describe_source(b"1234") == "4 bytes of media"


# ------------------------------------------------------------------ the policy


def test_policy_fields_and_defaults() -> None:
    # The server builds the policy from flags by these names.
    policy = MediaPolicy()
    defaults = {f.name: getattr(policy, f.name) for f in dataclasses.fields(policy) if f.init}
    assert defaults == {
        "allowed_local_paths": (), "allow_remote": True, "allowed_domains": None,
        "allow_private_network": False, "timeout_s": 10.0, "max_bytes": 64 * 1024**2,
        "max_redirects": 5, "max_image_pixels": 50_000_000, "max_video_frames": 108_000,
        "max_video_seconds": 3600.0, "max_document_pages": 32,
        "document_max_visual_tokens": 16384,
        "limit_per_prompt": {"image": 32, "video": 4, "document": 4},
        "video_num_frames": None, "video_fps": None, "office_timeout_s": 60.0,
    }
    assert set(FLAGS) <= set(defaults)
    assert dict(DEFAULT_LIMIT_PER_PROMPT) == dict(policy.limit_per_prompt)
    hash(policy)  # frozen and hashable, like every config
    local = MediaPolicy.local()
    assert local.allow_private_network and local.allowed_local_paths == (os.path.abspath("/"),)


def test_limits_per_prompt() -> None:
    policy = MediaPolicy(limit_per_prompt={"video": 1, "document": 0})
    assert dict(policy.limit_per_prompt) == {"image": 32, "video": 1, "document": 0}
    policy.check_item_counts({"image": 32, "video": 1})
    with pytest.raises(PromptError, match="2 videos, more than the 1 allowed") as info:
        policy.check_item_counts({"video": 2})
    assert "--limit-mm-per-prompt" in str(info.value)
    with pytest.raises(PromptError, match="33 images"):
        policy.check_item_counts({"image": 33})
    with pytest.raises(PromptError, match="does not accept documents") as info:
        policy.check_item_counts({"document": 1})
    assert "--limit-mm-per-prompt" in str(info.value) and info.value.http_status == 400


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"max_bytes": 0}, "max_bytes must be an integer >= 1.*--max-media-bytes"),
    ({"max_bytes": 1.5}, "max_bytes"), ({"max_image_pixels": -1}, "--max-image-pixels"),
    ({"max_video_frames": True}, "max_video_frames"), ({"max_document_pages": 0}, "pages"),
    ({"document_max_visual_tokens": 0}, "document_max_visual_tokens"),
    ({"max_redirects": -1}, "max_redirects must be an integer >= 0"),
    ({"timeout_s": 0}, "timeout_s must be a number > 0"),
    ({"timeout_s": float("inf")}, "--media-fetch-timeout"),
    ({"max_video_seconds": float("nan")}, "--max-video-seconds"),
    ({"office_timeout_s": -1}, "office_timeout_s"),
    ({"allow_remote": "yes"}, "allow_remote must be true or false"),
    ({"limit_per_prompt": {"audio": 1}}, "names 'audio'"),
    ({"limit_per_prompt": {"image": -1}}, "image must be an integer >= 0"),
    ({"limit_per_prompt": [1]}, "--limit-mm-per-prompt"),
    ({"video_num_frames": 0}, "video_num_frames must be an integer >= 1"),
    ({"video_num_frames": 2.5}, "video_num_frames"),
    ({"video_fps": 0}, "video_fps must be a number > 0 and <= 1000"),
    ({"video_fps": 5000}, "video_fps"),
    ({"video_fps": 2, "video_num_frames": 8}, "mutually exclusive"),
    ({"allowed_domains": ("",)}, "not a domain name"),
])
def test_policy_validation(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        MediaPolicy(**kwargs)


def test_video_num_frames_minus_one_means_the_model_sampler() -> None:
    # vLLM's recipe for GLM-V passes num_frames -1 so the model's own sampler picks frames.
    assert MediaPolicy(video_num_frames=-1).video_num_frames is None
    assert MediaPolicy(video_num_frames=-1, video_fps=1.0).video_fps == 1.0


def test_fetching_and_sniffing_modules_do_not_import_torch() -> None:
    # The server validates media in processes/threads that must not pay for torch.
    code = ("import sys, glmv.multimodal.media, glmv.multimodal.fetch, glmv.multimodal.sniff, "
            "glmv.multimodal.document; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
