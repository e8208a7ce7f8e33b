"""`glmv serve` flags -> settings: vLLM's names, JSON flags validated before the model loads."""

from __future__ import annotations

from typing import Any

import pytest

from glmv.cli import build_parser
from glmv.errors import ConfigError
from glmv.server.options import serve_args


def parse(*argv: str) -> Any:
    return serve_args(_namespace(*argv))


def _namespace(*argv: str) -> Any:
    args = build_parser().parse_args(["serve", *argv])
    args.model = args.model_flag or args.model or "demo"
    return args


def test_flags_reach_every_part(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GLMV_API_KEY", raising=False)
    s = parse("/models/glm", "--port", "9001", "--served-model-name", "a", "b",
              "--api-key", "k1", "--api-key", "k2", "--max-model-len", "4096",
              "--max-num-seqs", "8", "--kv-cache-memory", "2", "--dtype", "bfloat16",
              "--limit-mm-per-prompt", '{"image": 3, "video": 0}',
              "--allowed-local-media-path", str(tmp_path),
              "--allowed-media-domains", "example.com", "cdn.example.com",
              "--allow-private-media-urls",
              "--media-io-kwargs", '{"video": {"fps": 1.5}}',
              "--default-chat-template-kwargs", '{"enable_thinking": false}',
              "--mm-max-concurrent-calls", "3", "--mm-per-request-timeout", "12",
              "--request-timeout", "60", "--max-queue-len", "50",
              "--max-media-bytes", "1000000", "--max-image-pixels", "4000000",
              "--max-video-seconds", "120", "--max-video-frames", "5000",
              "--max-document-pages", "5", "--media-fetch-timeout", "3",
              "--max-media-redirects", "2", "--document-max-visual-tokens", "4096",
              "--office-timeout", "20",
              "--reasoning-parser", "glm45", "--tool-call-parser", "glm45",
              "--enable-auto-tool-choice")
    assert (s.engine.model, s.engine.max_model_len, s.engine.max_num_seqs,
            s.engine.kv_cache_memory, s.engine.dtype) == ("/models/glm", 4096, 8, 2.0, "bfloat16")
    assert s.server.port == 9001 and s.server.served_model_names == ("a", "b")
    assert s.server.api_keys == ("k1", "k2")
    assert s.server.default_chat_template_kwargs == {"enable_thinking": False}
    assert (s.server.request_timeout, s.server.max_queue_len) == (60, 50)
    assert (s.async_engine.mm_max_concurrent_calls, s.async_engine.mm_per_request_timeout,
            s.async_engine.max_queue_len) == (3, 12, 50)
    m = s.media
    assert dict(m.limit_per_prompt) == {"image": 3, "video": 0, "document": 4}  # default
    assert m.allowed_local_paths == (str(tmp_path),)
    assert m.allowed_domains == ("example.com", "cdn.example.com")
    assert m.allow_private_network
    assert (m.video_fps, m.video_num_frames) == (1.5, None)
    frames = parse("--media-io-kwargs", '{"video": {"num_frames": 16}}').media
    assert (frames.video_fps, frames.video_num_frames) == (None, 16)
    assert (m.max_bytes, m.max_image_pixels, m.max_video_seconds, m.max_video_frames,
            m.max_document_pages, m.timeout_s, m.max_redirects) == (
        1_000_000, 4_000_000, 120, 5000, 5, 3, 2)
    assert (m.document_max_visual_tokens, m.office_timeout_s) == (4096, 20)


def test_defaults_are_safe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GLMV_API_KEY", raising=False)
    s = parse()
    assert s.engine.model == "demo" and s.server.host == "127.0.0.1"
    assert s.server.api_keys == ()
    assert s.media.allowed_local_paths == () and not s.media.allow_private_network


def test_api_keys_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLMV_API_KEY", "a, b")
    assert parse().server.api_keys == ("a", "b")
    assert parse("--api-key", "c").server.api_keys == ("c",)


@pytest.mark.parametrize(("argv", "message"), [
    (("--limit-mm-per-prompt", "{image: 3}"), "--limit-mm-per-prompt is not valid JSON"),
    (("--limit-mm-per-prompt", '{"audio": 1}'), "known modalities"),
    (("--limit-mm-per-prompt", '{"image": -1}'), "integer >= 0"),
    (("--media-io-kwargs", '{"video": {"speed": 2}}'), "unknown video option"),
    (("--media-io-kwargs", '{"image": {}}'), "no options for 'image'"),
    (("--default-chat-template-kwargs", "[1]"), "must be a JSON object"),
    (("--reasoning-parser", "deepseek_r1"), "not a GLM-V parser"),
    (("--chat-template", "/no/such/file.jinja"), "neither a file nor a template"),
    (("--request-timeout", "0"), "--request-timeout"),
    (("--shutdown-timeout", "-1"), "--shutdown-timeout must be a number of seconds >= 0"),
    (("--shutdown-timeout", "nan"), "--shutdown-timeout"),
])
def test_bad_flags_fail_before_loading(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(*argv)


def test_shutdown_timeout_defaults_to_30_seconds_and_may_be_0() -> None:
    assert parse().server.shutdown_timeout == 30.0
    assert parse("--shutdown-timeout", "0").server.shutdown_timeout == 0.0


def test_chat_template_from_a_file(tmp_path: Any) -> None:
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert parse("--chat-template", str(path)).server.chat_template == path.read_text()


def test_request_chat_templates_are_off_unless_trusted() -> None:
    assert parse().server.trust_request_chat_template is False
    assert parse("--trust-request-chat-template").server.trust_request_chat_template is True
