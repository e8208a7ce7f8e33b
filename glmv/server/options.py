"""`glmv serve` flags -> the settings of each part (engine, HTTP front, media, async engine).

Each flag is validated here or by the dataclass it lands in, so a bad launch fails before the
model loads, with the flag's name in the message.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from glmv.engine.async_engine import AsyncEngineConfig
from glmv.engine.config import EngineArgs, parallel_kwargs
from glmv.errors import ConfigError
from glmv.multimodal.media import MediaPolicy
from glmv.server.config import ServerConfig, load_chat_template, parse_json_flag
from glmv.server.launch import ServeArgs

#: Modalities `--limit-mm-per-prompt` may name.
MM_MODALITIES = ("image", "video", "document")
#: `--media-io-kwargs` keys per modality, and the MediaPolicy field each sets.
_MEDIA_IO_KEYS = {"video": {"fps": "video_fps", "num_frames": "video_num_frames"}}
#: The environment variable read for API keys when `--api-key` is not given.
API_KEY_ENV = "GLMV_API_KEY"


def serve_args(args: argparse.Namespace) -> ServeArgs:
    """All settings of `glmv serve` from its parsed command line."""
    engine = EngineArgs(
        model=args.model, dtype=args.dtype, device=args.device,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=args.enable_prefix_caching, quantization=args.quantization,
        **parallel_kwargs(args))
    return ServeArgs(engine=engine, server=server_config(args), media=media_policy(args),
                     async_engine=AsyncEngineConfig(
                         max_queue_len=args.max_queue_len,
                         mm_max_concurrent_calls=args.mm_max_concurrent_calls,
                         mm_per_request_timeout=args.mm_per_request_timeout))


def api_keys(flag_values: list[str] | None) -> tuple[str, ...]:
    """Keys from `--api-key` (repeatable), else from $GLMV_API_KEY (comma-separated)."""
    if flag_values:
        return tuple(flag_values)
    env = os.environ.get(API_KEY_ENV, "")
    return tuple(key.strip() for key in env.split(",") if key.strip())


def server_config(args: argparse.Namespace) -> ServerConfig:
    kwargs = parse_json_flag("--default-chat-template-kwargs", args.default_chat_template_kwargs)
    return ServerConfig(
        host=args.host, port=args.port,
        served_model_names=tuple(args.served_model_name or ()),
        api_keys=api_keys(args.api_key),
        chat_template=load_chat_template(args.chat_template),
        trust_request_chat_template=args.trust_request_chat_template,
        default_chat_template_kwargs=kwargs,
        reasoning_parser=args.reasoning_parser, tool_call_parser=args.tool_call_parser,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        request_timeout=args.request_timeout, max_queue_len=args.max_queue_len,
        max_request_bytes=args.max_request_bytes,
        shutdown_timeout=args.shutdown_timeout)


def media_policy(args: argparse.Namespace) -> MediaPolicy:
    limits = parse_json_flag("--limit-mm-per-prompt", args.limit_mm_per_prompt)
    for name, value in limits.items():
        if name not in MM_MODALITIES:
            raise ConfigError(f"--limit-mm-per-prompt names {name!r}; known modalities: "
                              f"{', '.join(MM_MODALITIES)}")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"--limit-mm-per-prompt: {name} must be an integer >= 0, "
                              f"got {value!r}")
    kwargs: dict[str, Any] = {
        "allowed_local_paths": tuple(args.allowed_local_media_path),
        "allowed_domains": (tuple(args.allowed_media_domains)
                            if args.allowed_media_domains else None),
        "allow_private_network": args.allow_private_media_urls,
        "limit_per_prompt": limits,
        **_media_io_kwargs(args.media_io_kwargs),
    }
    for flag, field in (("media_fetch_timeout", "timeout_s"),
                        ("max_media_bytes", "max_bytes"),
                        ("max_media_redirects", "max_redirects"),
                        ("max_image_pixels", "max_image_pixels"),
                        ("max_video_frames", "max_video_frames"),
                        ("max_video_seconds", "max_video_seconds"),
                        ("max_document_pages", "max_document_pages"),
                        ("document_max_visual_tokens", "document_max_visual_tokens"),
                        ("office_timeout", "office_timeout_s")):
        value = getattr(args, flag, None)
        if value is not None:
            kwargs[field] = value
    return MediaPolicy(**kwargs)


def _media_io_kwargs(value: str | None) -> dict[str, Any]:
    """`--media-io-kwargs '{"video": {"fps": 2, "num_frames": 16}}'` -> MediaPolicy fields."""
    out: dict[str, Any] = {}
    for modality, options in parse_json_flag("--media-io-kwargs", value).items():
        keys = _MEDIA_IO_KEYS.get(modality)
        if keys is None:
            raise ConfigError(f"--media-io-kwargs: no options for {modality!r}; known: "
                              f"{', '.join(_MEDIA_IO_KEYS)}")
        if not isinstance(options, dict):
            raise ConfigError(f"--media-io-kwargs: {modality} must map to an object")
        for key, option in options.items():
            if key not in keys:
                raise ConfigError(f"--media-io-kwargs: unknown {modality} option {key!r}; "
                                  f"known: {', '.join(keys)}")
            out[keys[key]] = option
    return out
