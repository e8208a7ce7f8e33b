"""Settings of `glmv serve` that are not the engine's (frozen, validated once)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glmv.errors import ConfigError

#: Parser names accepted for vLLM launch-script compatibility; glmv picks the parser from the
#: model, and these names select exactly that parser.
ACCEPTED_PARSERS = ("glm45", "glm4v", "glm41v", "auto")
#: Request bodies larger than this get 413: room for one media item of the default
#: --max-media-bytes (64 MiB) as a base64 data URL (x 4/3), plus the rest of the request.
DEFAULT_MAX_REQUEST_BYTES = 128 * 1024 * 1024


@dataclass(frozen=True)
class ServerConfig:
    """HTTP front of the engine."""

    host: str = "127.0.0.1"
    port: int = 8000
    served_model_names: tuple[str, ...] = ()  # names clients use; first is reported
    api_keys: tuple[str, ...] = ()  # any of them opens the API; empty = no key needed
    chat_template: str | None = None  # template source overriding the checkpoint's
    # Whether a request may send its own `chat_template` (vLLM's flag): a template is code the
    # server runs, sandboxed and bounded, but it can still spend a media worker's time.
    trust_request_chat_template: bool = False
    default_chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    reasoning_parser: str | None = None  # accepted for vLLM compatibility (see ACCEPTED_PARSERS)
    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = False  # accepted; tools are always parsed when the model has
    request_timeout: float | None = None  # seconds a request may run before it is ended
    max_queue_len: int = 1024  # requests in flight before new ones get 503
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # larger bodies get 413
    shutdown_timeout: float = 30.0  # seconds a SIGTERM/SIGINT drain waits before ending requests
    log_requests: bool = False  # one line per finished request

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {self.port}")
        for flag, name in (("--reasoning-parser", self.reasoning_parser),
                           ("--tool-call-parser", self.tool_call_parser)):
            if name is not None and name not in ACCEPTED_PARSERS:
                raise ConfigError(f"{flag} {name!r} is not a GLM-V parser; glmv chooses the "
                                  f"parser from the model (accepted names: "
                                  f"{', '.join(ACCEPTED_PARSERS)})")
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise ConfigError(f"--request-timeout must be > 0 seconds, got "
                              f"{self.request_timeout}")
        if not (math.isfinite(self.shutdown_timeout) and self.shutdown_timeout >= 0):
            raise ConfigError(f"--shutdown-timeout must be a number of seconds >= 0, got "
                              f"{self.shutdown_timeout}")
        if self.max_queue_len < 1:
            raise ConfigError(f"--max-queue-len must be >= 1, got {self.max_queue_len}")
        if self.max_request_bytes < 1:
            raise ConfigError(f"--max-request-bytes must be >= 1, got {self.max_request_bytes}")
        if any(not key for key in self.api_keys):
            raise ConfigError("--api-key must not be empty")


def load_chat_template(value: str | None) -> str | None:
    """`--chat-template`: a file path, or the template text itself."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if "{" not in value and path.is_file():
        return path.read_text(encoding="utf-8")
    if "{" not in value:
        raise ConfigError(f"--chat-template {value!r} is neither a file nor a template")
    return value


def parse_json_flag(flag: str, value: str | None) -> dict[str, Any]:
    """A flag whose value is a JSON object, e.g. --limit-mm-per-prompt '{"image": 4}'."""
    if value is None:
        return {}
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{flag} is not valid JSON ({exc.msg}): {value!r}") from None
    if not isinstance(parsed, dict):
        raise ConfigError(f"{flag} must be a JSON object, got {value!r}")
    return parsed
