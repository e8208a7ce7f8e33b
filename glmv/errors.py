"""Typed errors: every way a user's input can be wrong has a class and a message to act on.

The server maps `GlmvError.http_status` to an OpenAI-style JSON error; the CLI prints the message
without a traceback. Nothing here imports torch.
"""

from __future__ import annotations


class GlmvError(Exception):
    """Base class of every error glmv raises on purpose."""

    #: HTTP status the server answers with when this error reaches a request.
    http_status: int = 400


class ConfigError(GlmvError):
    """config.json (or a processor config) is missing a key, has a bad value, or is unsupported."""


class UnsupportedModelError(ConfigError):
    """The checkpoint's `model_type` or architecture is not one glmv implements."""


class CheckpointError(GlmvError):
    """A model folder cannot be used: a file is missing, unreadable or corrupt."""

    http_status = 500


class WeightMismatchError(CheckpointError):
    """The tensors in the checkpoint do not match the model: names every problem at once."""

    def __init__(
        self,
        missing: list[str],
        unexpected: list[str],
        shape_mismatches: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
        source: str = "",
    ) -> None:
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.shape_mismatches = sorted(shape_mismatches)
        lines = [f"checkpoint {source} does not match the model:" if source else
                 "checkpoint does not match the model:"]
        if self.missing:
            lines.append(f"  missing tensors ({len(self.missing)}): " + ", ".join(self.missing))
        if self.unexpected:
            lines.append(
                f"  unexpected tensors ({len(self.unexpected)}): " + ", ".join(self.unexpected)
            )
        for name, got, want in self.shape_mismatches:
            lines.append(f"  shape mismatch: {name} is {list(got)} in the file, model expects "
                         f"{list(want)}")
        super().__init__("\n".join(lines))


class TokenizerError(GlmvError):
    """tokenizer.json / tokenizer_config.json is missing, corrupt or lacks a required token."""

    http_status = 500


class ChatTemplateError(GlmvError):
    """The chat template failed to render these messages (bad message shape, template error)."""


class MediaError(GlmvError):
    """An image, video or document cannot be fetched or decoded."""


class ImageError(MediaError):
    """An image cannot be decoded or has a shape the processor refuses."""


class VideoError(MediaError):
    """A video cannot be decoded, has no frames, or lacks the timing the sampler needs."""


class PromptError(GlmvError):
    """The prompt and its media do not fit together (placeholder counts, length limits)."""


class SamplingParamsError(GlmvError):
    """A sampling parameter is out of range or contradicts another (min_tokens > max_tokens)."""


class EngineError(GlmvError):
    """The engine failed while running a request (a model step raised); other requests go on."""

    http_status = 500


class EngineDeadError(EngineError):
    """The engine cannot run any more: a rank of its tensor-parallel group died or a collective
    between them failed. Every request ends with this error and the server exits."""

    http_status = 503


class QueueFullError(GlmvError):
    """The server already holds as many requests as it may queue; the client should retry."""

    http_status = 503


class ShuttingDownError(EngineError):
    """The server is stopping: it takes no new requests, and ends those still running when the
    engine stops or its drain deadline (`--shutdown-timeout`) passes; retry elsewhere."""

    http_status = 503


class MediaTooLargeError(MediaError):
    """An image, video or document is over a size limit (bytes, pixels, frames, seconds, pages,
    visual tokens); the message names the limit and the flag that changes it."""

    http_status = 413
